"""The tcp scheme (`/scheme/tcp/HOST/PORT`): TCP connections and listeners.

    python -m schemes.tcp --channel-fd N [--connect-timeout SECONDS]
                          [--allow-wildcard] [--allow-privileged-ports]

HOST is a numeric IPv4 or IPv6 address in canonical form (`127.0.0.1`,
`::1`; not `127.1`, `2130706433`, `0`, `[::1]`, `fe80::1%eth0` or a name:
nothing ever goes to a resolver); PORT is 1-65535 in ASCII decimal without
leading zeros. Anything else is EINVAL.

Opening HOST/PORT connects (ECONNREFUSED, ETIMEDOUT after --connect-timeout).
Opening with O_CREAT listens on HOST/PORT; port 0 picks one and `fpath` tells
which. Listening on a wildcard (`0.0.0.0`, `::`), multicast or broadcast
address needs `--allow-wildcard`, on a port below 1024 `--allow-privileged-ports`
(EACCES otherwise); connecting to any port is allowed.
`dup(listener, b"accept")` waits for one connection and returns it as a new
handle. read returns what has arrived (b"" at EOF), write sends everything,
`shutdown(SHUT_WR)` ends the stream for the peer. Every wait is a trio wait,
so a blocked read or accept never stalls other clients of the scheme.

`dup(root, b"grant:" + JSON)` makes a grant (schemes/netaddr.py): a root
that connects only to the peers and listens only on the endpoints it lists
(EACCES for anything else), and that can only be narrowed further. Opening
"." with O_DIRECTORY on a root or a grant is another handle on it (how
`rt.net_grant` gets the namespace's tcp). Roots and grants survive a restart
of the daemon; connections and listeners do not.

Only the scheme root or a grant opens endpoints: a connection or a listener
names one socket, not a directory, so `openat` relative to it is ENOTDIR. The
root itself cannot be read or written (EBADF).
"""

from __future__ import annotations

import argparse
import errno
import os
import socket
from dataclasses import dataclass, field

import trio

from schemes.framework import ROOT_STAT, Opened, Request, Scheme, SchemeError, daemon_cli
from schemes.netaddr import (
    DEFAULT_POLICY,
    GRANT_PREFIX,
    SOCKET_STAT,
    NetGrant,
    NetPolicy,
    NetRoot,
    add_policy_options,
    address_path,
    check_granted,
    check_local,
    check_remote,
    is_self_path,
    keep_dir,
    narrow,
    parse_endpoint,
    policy_from,
    restore_dir,
)
from wire import protocol as P
from wire.stat import Stat

DEFAULT_CONNECT_TIMEOUT = 10.0

@dataclass(eq=False)
class TcpSocket:
    sock: trio.socket.SocketType
    listening: bool
    read_lock: trio.Lock = field(default_factory=trio.Lock)  # one recv/accept at a time
    write_lock: trio.Lock = field(default_factory=trio.Lock)


class TcpScheme(Scheme):
    """Serves TCP sockets."""

    name = "tcp"

    def __init__(self, connect_timeout: float = DEFAULT_CONNECT_TIMEOUT,
                 policy: NetPolicy = DEFAULT_POLICY) -> None:
        self.connect_timeout = connect_timeout
        self.policy = policy
        self._root = NetRoot(self.name)

    def root(self) -> NetRoot:
        return self._root

    async def openat(self, req: Request, h: NetRoot | NetGrant, path: str, flags: int,
                     mode: int) -> Opened:
        if is_self_path(path, flags):
            return Opened(h, fdflags=os.O_RDONLY | os.O_DIRECTORY)
        ep = parse_endpoint(path)
        listen = bool(flags & os.O_CREAT)
        if listen:
            check_local(ep, self.policy)
        else:
            check_remote(ep)
        check_granted(h, ep, local=listen)
        sock = trio.socket.socket(ep.family, socket.SOCK_STREAM)
        try:
            if listen:
                sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
                await sock.bind(ep.sockaddr)
                sock.listen(128)
                return Opened(TcpSocket(sock, listening=True), fdflags=flags)
            with trio.move_on_after(self.connect_timeout) as scope:
                await sock.connect(ep.sockaddr)
            if scope.cancelled_caught:
                raise SchemeError(errno.ETIMEDOUT)
            return Opened(TcpSocket(sock, listening=False), fdflags=flags & os.O_ACCMODE)
        except BaseException:
            sock.close()
            raise

    async def dup(self, req: Request, h: NetRoot | NetGrant | TcpSocket, buf: bytes) -> Opened:
        if not isinstance(h, TcpSocket):
            if buf.startswith(GRANT_PREFIX):
                return Opened(narrow(h, buf, self.policy), fdflags=os.O_RDONLY | os.O_DIRECTORY)
            raise SchemeError(errno.EINVAL, 'tcp dup takes b"grant:..." on a root or a grant')
        if buf != b"accept" or not h.listening:
            raise SchemeError(errno.EINVAL, 'tcp dup takes b"accept" on a listener')
        async with h.read_lock:
            conn, _ = await h.sock.accept()
        return Opened(TcpSocket(conn, listening=False), fdflags=os.O_RDWR)

    def _stream(self, h: TcpSocket) -> TcpSocket:
        if h.listening:
            raise SchemeError(errno.ENOTCONN)
        return h

    async def read(self, req: Request, h: TcpSocket, n: int) -> bytes:
        s = self._stream(h)
        if n < 0:
            raise SchemeError(errno.EINVAL)
        async with s.read_lock:
            return await s.sock.recv(min(n, P.MAX_IO))

    async def write(self, req: Request, h: TcpSocket, data: bytes) -> int:
        s = self._stream(h)
        view = memoryview(data)
        async with s.write_lock:
            while view:
                sent = await s.sock.send(view)
                view = view[sent:]
        return len(data)

    async def shutdown(self, req: Request, h: TcpSocket, how: int) -> None:
        s = self._stream(h)
        if how not in (socket.SHUT_RD, socket.SHUT_WR, socket.SHUT_RDWR):
            raise SchemeError(errno.EINVAL)
        s.sock.shutdown(how)

    async def fstat(self, req: Request, h: NetRoot | NetGrant | TcpSocket) -> Stat:
        return SOCKET_STAT if isinstance(h, TcpSocket) else ROOT_STAT

    async def getdents(self, req: Request, h: NetRoot | NetGrant, start: int) -> list[str]:
        raise SchemeError(errno.EACCES, "the network cannot be listed")

    async def fpath(self, req: Request, h: NetRoot | NetGrant | TcpSocket) -> str:
        if not isinstance(h, TcpSocket):
            # a grant is what /scheme/tcp names in the namespace that holds it
            return f"/scheme/{self.name}"
        addr = h.sock.getsockname() if h.listening else h.sock.getpeername()
        return address_path(self.name, addr)

    async def close(self, h: NetRoot | NetGrant | TcpSocket) -> None:
        if isinstance(h, TcpSocket):
            h.sock.close()

    def keep(self, h: NetRoot | NetGrant | TcpSocket) -> tuple[dict, list[int]] | None:
        """A root or grant is plain data, kept across a crash; a socket dies with the daemon."""
        return None if isinstance(h, TcpSocket) else keep_dir(h)

    def restore(self, value: dict, fds: list[int]) -> NetRoot | NetGrant:
        return restore_dir(value, self._root, self.policy)


def _options(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--connect-timeout", type=float, default=DEFAULT_CONNECT_TIMEOUT,
                        help="seconds before a connect fails with ETIMEDOUT")
    add_policy_options(parser)


if __name__ == "__main__":
    daemon_cli("schemes.tcp", lambda a: TcpScheme(a.connect_timeout, policy_from(a)), _options)
