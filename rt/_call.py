"""One synchronous request on a capability fd: the syscall of the runtime.

A capability socket carries one request at a time (a reply goes to whoever
reads first), so each fd has a lock; rt is safe to use from several threads.
"""

from __future__ import annotations

import errno
import os
import select
import socket
import threading
from typing import Any

from rt import protocol as P

_locks: dict[int, threading.Lock] = {}
_locks_guard = threading.Lock()


def _lock_for(fd: int) -> threading.Lock:
    with _locks_guard:
        lock = _locks.get(fd)
        if lock is None:
            lock = _locks[fd] = threading.Lock()
        return lock


def forget(fd: int) -> None:
    """Drop the lock of a closed fd (its number may be reused)."""
    with _locks_guard:
        _locks.pop(fd, None)


def raise_errno(err: Any) -> None:
    """Raise the OSError subclass for an errno received in a reply."""
    if not isinstance(err, int) or err <= 0:
        err = errno.EIO
    raise OSError(err, os.strerror(err))


def _blocking(fn, sock: socket.socket, event: int, *args):
    """fn(*args), waiting for readiness if the fd was made non-blocking by someone."""
    while True:
        try:
            return fn(*args)
        except BlockingIOError:
            poller = select.poll()
            poller.register(sock, event)
            poller.poll()


def call(fd: int, op: int, args: list | tuple = (), fds: list[int] | tuple[int, ...] = ()) -> tuple[Any, list[int]]:
    """Send one request on capability fd and wait for its reply.

    Args:
        fd: a capability fd.
        op: an operation number from rt.protocol.
        args: the operation's arguments.
        fds: fds to pass along (the caller keeps its copies).

    Returns:
        (value, fds received); the caller owns the received fds.

    Raises:
        OSError: with the errno the scheme, nsmgr or router answered, EBADF
            if fd is not a capability.
    """
    frame = P.encode_request(op, 0, args)
    if len(frame) > P.MAX_FRAME:
        raise OSError(errno.E2BIG, "request too large for one frame")
    sock = None
    with _lock_for(fd):
        try:
            sock = socket.socket(fileno=fd)
            if sock.type != socket.SOCK_SEQPACKET:
                raise OSError(errno.EBADF, "not a capability")
            _blocking(sock.sendmsg, sock, select.POLLOUT, [frame], P.fds_ancillary(fds))
            data, anc, flags, _ = _blocking(
                sock.recvmsg, sock, select.POLLIN, P.MAX_FRAME, P.CMSG_FDS, socket.MSG_CMSG_CLOEXEC)
        except OSError as exc:
            if exc.errno in (errno.ENOTSOCK, errno.EPIPE, errno.ECONNRESET, errno.ENOTCONN):
                raise OSError(errno.EBADF, "not a capability (or its server is gone)") from None
            raise
        finally:
            if sock is not None:
                sock.detach()
    received, _ = P.parse_ancillary(anc)
    try:
        if not data:
            raise OSError(errno.EIO, "capability closed by the router")
        if flags & P.TRUNCATED:
            raise OSError(errno.EIO, "reply truncated")
        _tag, status, value = P.decode_reply(data)
    except P.ProtocolError:
        P.close_fds(received)
        raise OSError(errno.EIO, "malformed reply") from None
    except OSError:
        P.close_fds(received)
        raise
    if status != P.OK:
        P.close_fds(received)
        raise_errno(value)
    return value, received


def call_fd(fd: int, op: int, args: list | tuple = (), fds: list[int] | tuple[int, ...] = ()) -> int:
    """A request whose answer is exactly one new capability fd."""
    _, received = call(fd, op, args, fds)
    if len(received) != 1:
        P.close_fds(received)
        raise OSError(errno.EIO, "expected one capability in the reply")
    return received[0]
