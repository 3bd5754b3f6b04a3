"""Pipes and sockets through their schemes: pipe, shutdown, sendfd, recvfd."""

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
