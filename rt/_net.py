"""Pipes and sockets through their schemes: pipe, shutdown, sendfd, recvfd."""

from __future__ import annotations

import os

from rt import protocol as P
from rt._call import call_fd, call_value
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
