"""Pipes and sockets through their schemes: pipe, shutdown, sendfd, recvfd, uds_scope."""

from __future__ import annotations

import os

from rt import protocol as P
from rt._call import call, call_fd
from rt._posix import close, dup
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
    call(fd, P.SHUTDOWN, [how])


def sendfd(sock_fd: int, cap_fd: int) -> None:
    """Send a capability over a uds connection (the caller keeps its copy)."""
    call(sock_fd, P.SENDFD, [], [cap_fd])


def recvfd(sock_fd: int) -> int:
    """Receive the next capability sent over a uds connection."""
    return call_fd(sock_fd, P.RECVFD)


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
    own = rt_open("/scheme/uds", os.O_DIRECTORY)
    try:
        return dup(own, how)
    finally:
        close(own)
