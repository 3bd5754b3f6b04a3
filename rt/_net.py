"""Pipes and sockets through their schemes: pipe, shutdown, sendfd, recvfd, recvfrom, sendto,
uds_scope, net_grant."""

from __future__ import annotations

import errno
import json
import os
from collections.abc import Iterable

from redoxcap.wire import protocol as P
from redoxcap.wire.call import call_fd, call_value
from rt._paths import located
from rt._posix import clone, close, dup
from rt._posix import open as rt_open


def pipe() -> tuple[int, int]:
    """A new pipe from the pipe scheme: (read end, write end).

    Reads return b"" once every write end is closed; writes fail with EPIPE
    once every read end is.
    """
    read_end = rt_open("/scheme/pipe", os.O_RDONLY)
    try:
        return read_end, dup(read_end, b"write")
    except BaseException:
        close(read_end)
        raise


def shutdown(fd: int, how: int) -> None:
    """Shut down one or both directions of a connection (socket.SHUT_*)."""
    call_value(fd, P.SHUTDOWN, [how])


def sendfd(sock_fd: int, cap_fd: int) -> None:
    """Send a capability over a uds connection; the caller's copy stays its own.

    What travels is a clone (the same handle, a socket of its own), so the
    receiver can never read the replies meant for the sender.
    """
    copy = clone(cap_fd)
    try:
        call_value(sock_fd, P.SENDFD, [], [copy])
    finally:
        close(copy)


def recvfd(sock_fd: int) -> int:
    """Receive the next capability sent over a uds connection."""
    return call_fd(sock_fd, P.RECVFD)


def recvfrom(fd: int, n: int) -> tuple[bytes, tuple[str, int]]:
    """Receive one datagram (cut to n bytes) and who sent it.

    Args:
        fd: a udp socket (bound: any sender; connected: always its peer).
        n: the most bytes to return.

    Returns:
        (data, (host, port)) of the sender.

    Raises:
        OSError: EOPNOTSUPP where the scheme has no datagrams, EIO for a
            malformed reply.
    """
    if n < 0:
        raise OSError(errno.EINVAL, "negative read size")
    value = call_value(fd, P.RECVFROM, [min(n, P.MAX_IO)], kind=list)
    if not (len(value) == 3 and type(value[0]) is bytes and type(value[1]) is str and type(value[2]) is int and len(value[0]) <= n):
        raise OSError(errno.EIO, "malformed recvfrom reply")
    data, host, port = value
    return data, (host, port)


def sendto(fd: int, data: bytes | bytearray | memoryview, address: tuple[str, int]) -> int:
    """Send data as one datagram to address from a bound udp socket.

    Args:
        fd: a bound udp socket (a connected one is EISCONN).
        data: the datagram.
        address: (host, port): a canonical numeric IP address and a port 1-65535.

    Returns:
        The number of bytes sent.

    Raises:
        OSError: EINVAL for a malformed address, EMSGSIZE for a datagram too
            large for one frame, EIO for a malformed reply.
    """
    host, port = address
    if not isinstance(host, str) or type(port) is not int:
        raise OSError(errno.EINVAL, "address is (host: str, port: int)")
    data = bytes(data)
    if len(data) > P.MAX_IO:
        raise OSError(errno.EMSGSIZE, "datagram too large for one frame")
    value = call_value(fd, P.SENDTO, [data, host, port], kind=int)
    if not 0 <= value <= len(data):
        raise OSError(errno.EIO, "malformed sendto reply")
    return value


def uds_scope(name: str | None = None, base: int | None = None) -> int:
    """A uds scope: a new private one, or the shared scope called name.

    A scope is a table of uds names of its own: listeners in it are reached
    only through it. Register it as `uds` in a namespace (`rt.unregister` and
    `rt.register`) so that `/scheme/uds/NAME` means NAME in it, or open names
    relative to it with `rt.openat(scope, NAME, ...)`.

    Args:
        name: None for a new, empty, private scope; otherwise the named
            shared scope (made on first use, kept while a handle on it or a
            listener in it lives), which every holder of the system scope
            can reach.
        base: the uds scope to derive from (e.g. from
            `rt.open("/scheme/uds", rt.O_DIRECTORY)`); None for the
            namespace's `/scheme/uds`. A named scope needs the system scope.

    Returns:
        A capability for the scope.

    Raises:
        OSError: EACCES for a named scope from a base that is not the system
            scope, EINVAL for a bad name, ENODEV without uds in the namespace.
    """
    how = b"scope" if name is None else b"scope:" + name.encode()
    if base is not None:
        return dup(base, how)
    with located("/scheme/uds") as (where, rest):
        if rest == ".":  # the namespace's kept uds root: derived from at once, nothing opened
            return dup(where, how)
    own = rt_open("/scheme/uds", os.O_DIRECTORY)
    try:
        return dup(own, how)
    finally:
        close(own)


def net_grant(connect: Iterable[tuple[str, int]] = (), listen: Iterable[int | tuple[str, int]] = (),
              base: int | None = None, scheme: str = "tcp") -> int:
    """A tcp or udp capability that reaches only the given peers and listen endpoints.

    Opening anything else through it is EACCES, and so is narrowing it to
    anything it lacks. Register it in a namespace in place of the scheme's
    entry (`rt.unregister(ns, "tcp")`, `rt.register(ns, "tcp", fd)`) so that
    a program started there reaches only what it lists. For udp, a socket
    bound through it `sendto`s only the connect peers.

    Args:
        connect: (host, port) peers it may connect to; hosts are canonical
            numeric IPv4/IPv6 addresses (`127.0.0.1`, `::1`), ports 1-65535.
        listen: where it may listen (tcp) or bind (udp): a port alone means
            that port on 127.0.0.1 and ::1, (host, port) that address; port 0
            lets the system pick a free one.
        base: the root or grant to narrow (the scheme it belongs to decides);
            None for the namespace's `/scheme/SCHEME`.
        scheme: with base None, the name to narrow (`tcp` or `udp`).

    Returns:
        A capability for the grant.

    Raises:
        OSError: EACCES for more than base (or the daemon's policy) allows,
            EINVAL for a malformed host or port, ENODEV without scheme in the
            namespace.
    """
    try:
        buf = b"grant:" + json.dumps({
            "connect": [[host, port] for host, port in connect],
            "listen": [p if isinstance(p, int) else [p[0], p[1]] for p in listen],
        }).encode()
    except (TypeError, ValueError, IndexError):
        raise OSError(errno.EINVAL, "connect is (host, port) pairs, listen ports or pairs") from None
    if base is not None:
        return dup(base, buf)
    if not P.valid_scheme_name(scheme):
        raise OSError(errno.EINVAL, f"bad scheme name {scheme!r}")
    own = rt_open(f"/scheme/{scheme}", os.O_DIRECTORY)
    try:
        return dup(own, buf)
    finally:
        close(own)
