"""One synchronous request on a capability fd: the syscall of rt and of the broker.

rt (the client runtime) and the broker (redoxcap/broker/, which acts for
unmodified programs) reach capabilities only through this module: `call`
and its two shapes (`call_value`, `call_fd`), `forget` when an fd is
closed, and the fallbacks both need, each written once here: `fstat` of a
host fd or a capability, `stat_at` (STATAT, else an O_PATH open and FSTAT
where a scheme has no STATAT).

A capability socket carries one request at a time (a reply goes to whoever
reads first), so each fd has a lock; calls are safe from several threads.
"""

from __future__ import annotations

import atexit
import errno
import os
import select
import socket
import threading
import time
from typing import Any, Self

from redoxcap.wire import frames as F
from redoxcap.wire import protocol as P
from redoxcap.wire.protocol import raise_errno
from redoxcap.wire.stat import Stat


class _Endpoint:
    """What this process keeps per capability fd: one request at a time (lock), the last
    request tag, and the socket object it is spoken through, made once and reused."""

    __slots__ = ("lock", "sock", "tag")

    def __init__(self) -> None:
        self.lock = threading.Lock()
        self.tag = 0
        self.sock: socket.socket | None = None

    def drop(self) -> None:
        if self.sock is not None:
            self.sock.detach()  # the fd is not the socket object's to close
            self.sock = None


_endpoints: dict[int, _Endpoint] = {}
_host: dict[int, bool] = {}  # fd -> whether it is a host fd (a passthrough file), not a capability
_guard = threading.Lock()


def _endpoint(fd: int) -> _Endpoint:
    endpoint = _endpoints.get(fd)
    if endpoint is None:
        with _guard:
            endpoint = _endpoints.setdefault(fd, _Endpoint())
    return endpoint


def forget(fd: int) -> None:
    """Drop what is known of a closed fd: its lock, tag, socket object and kind (its number
    may be reused)."""
    with _guard:
        endpoint = _endpoints.pop(fd, None)
        _host.pop(fd, None)
    if endpoint is not None:
        endpoint.drop()


@atexit.register
def _detach_all() -> None:
    """At exit, socket objects must not close fds whose numbers may now be something else."""
    for endpoint in list(_endpoints.values()):
        endpoint.drop()


def is_host_fd(fd: int, remember: bool = True) -> bool:
    """Whether fd is a plain host fd (a passthrough file), which rt serves with os.* calls.

    A capability is always a socket; anything else is a host fd. Asked once per
    fd and remembered until rt closes it (remember=False: not remembered, for an
    fd that something else will close). Asked with getsockopt (a socket object
    for it, which the fd's first call then speaks through), not fstat: under the
    broker, fstat is a call the broker answers, getsockopt is the kernel's.

    Raises:
        OSError: EBADF when fd is not open.
    """
    kind = _host.get(fd)
    if kind is None:
        try:
            sock = socket.socket(fileno=fd)
        except OSError as exc:
            if exc.errno != errno.ENOTSOCK:
                raise
            kind = True
        else:
            kind = False
            if remember and sock.type == socket.SOCK_SEQPACKET:
                endpoint = _endpoint(fd)
                with endpoint.lock:
                    if endpoint.sock is None:
                        endpoint.sock, sock = sock, None  # as call would make it
            if sock is not None:
                sock.detach()  # the fd is not the socket object's to close
        if remember:
            _host[fd] = kind
    return kind


class _Deadline(threading.local):
    """The timeout of this thread's calls (None waits for ever), and an fd whose turning
    readable ends their wait (give_up_when_readable)."""

    def __init__(self) -> None:
        self.seconds: float | None = None
        self.give_up: int | None = None


class _Timeouts:
    """How long a call waits for its reply: its thread's bound (rt.timeout), else the default."""

    def __init__(self) -> None:
        self.default: float | None = None
        self.thread = _Deadline()

    def current(self) -> float | None:
        seconds = self.thread.seconds
        return self.default if seconds is None else seconds


_timeouts = _Timeouts()


def set_default_timeout(seconds: float | None) -> None:
    """How long any call of this process waits for its reply (None: for ever).

    A server can be slow or never answer; a program that must not hang on
    one sets a default, and `timeout()` for a single call. A call that runs
    out of time fails with ETIMEDOUT; its late reply is recognised by its tag
    and dropped, so the capability stays usable.
    """
    if seconds is not None and seconds <= 0:
        raise ValueError("a timeout is a positive number of seconds")
    _timeouts.default = seconds


def give_up_when_readable(fd: int | None) -> None:
    """Have this thread's calls stop waiting for their replies, with EINTR, once fd is
    readable (None: never). The broker's thread: its program's pidfd, readable once the
    program has exited, when nothing the broker waits for is wanted any more (a process the
    program left behind may have it wait for a scheme of its own that never answers). Each
    call then polls before it reads: one syscall more. The late reply is dropped as a
    timed-out call's is."""
    _timeouts.thread.give_up = fd


class timeout:
    """Bound the calls made in a with block (in this thread) to seconds each."""

    def __init__(self, seconds: float | None) -> None:
        if seconds is not None and seconds <= 0:
            raise ValueError("a timeout is a positive number of seconds")
        self.seconds = seconds
        self._saved: list[float | None] = []

    def __enter__(self) -> Self:
        self._saved.append(_timeouts.thread.seconds)
        _timeouts.thread.seconds = self.seconds
        return self

    def __exit__(self, *exc: object) -> None:
        _timeouts.thread.seconds = self._saved.pop()


def _wait(sock: socket.socket, event: int, deadline: float | None) -> None:
    """Wait until sock is ready for event; ETIMEDOUT after the deadline, EINTR once this
    thread's give-up fd is readable (give_up_when_readable)."""
    poller = select.poll()
    poller.register(sock, event)
    give_up = _timeouts.thread.give_up
    if give_up is not None:
        poller.register(give_up, select.POLLIN)
    while True:
        left = None if deadline is None else deadline - time.monotonic()
        if left is not None and left <= 0:
            raise OSError(errno.ETIMEDOUT, "no reply within the timeout")
        ready = poller.poll(None if left is None else max(1, int(left * 1000)))
        if any(fd == give_up for fd, _ in ready):
            raise OSError(errno.EINTR, "the call was given up")
        if ready:
            return


def call(fd: int, op: int, args: list | tuple = (), fds: list[int] | tuple[int, ...] = ()) -> tuple[Any, list[int]]:
    """Send one request on capability fd and wait for its reply.

    The reply is matched by its tag: replies to requests that gave up (a
    timeout) or that nobody asked for are dropped with every fd they carry.

    Args:
        fd: a capability fd.
        op: an operation number from wire.protocol.
        args: the operation's arguments.
        fds: fds to pass along (the caller keeps its copies).

    Returns:
        (value, fds received); the caller owns the received fds and must
        check what the value is: a capability can come from anyone.

    Raises:
        OSError: with the errno the scheme, nsmgr or router answered, EBADF
            if fd is not a capability, EIO for a malformed reply, ETIMEDOUT
            when the timeout (rt.timeout, rt.set_default_timeout) ran out.
    """
    seconds = _timeouts.current()
    deadline = None if seconds is None else time.monotonic() + seconds
    endpoint = _endpoint(fd)
    with endpoint.lock:
        tag = endpoint.tag = (endpoint.tag + 1) & 0xFFFF_FFFF
        frame = F.encode_request(op, tag, args)
        if len(frame) > P.MAX_FRAME:
            raise OSError(errno.E2BIG, "request too large for one frame")
        try:
            sock = endpoint.sock
            if sock is None:
                sock = socket.socket(fileno=fd)
                if sock.type != socket.SOCK_SEQPACKET:
                    sock.detach()
                    raise OSError(errno.EBADF, "not a capability")
                endpoint.sock = sock
            _send(sock, frame, P.fds_ancillary(fds), deadline)
            while True:
                data, received, flags = _receive(sock, deadline)
                if not data:
                    P.close_fds(received)
                    raise OSError(errno.EIO, "capability closed by its server")
                if len(data) >= F.REPLY.size and F.REPLY.unpack_from(data)[0] == tag:
                    break
                P.close_fds(received)  # a late or unasked-for reply: not ours to keep
        except OSError as exc:
            if exc.errno in (errno.ENOTSOCK, errno.EPIPE, errno.ECONNRESET, errno.ENOTCONN, errno.EBADF):
                endpoint.drop()  # the number may stand for something else by the next call
            if exc.errno in (errno.ENOTSOCK, errno.EPIPE, errno.ECONNRESET, errno.ENOTCONN):
                raise OSError(errno.EBADF, "not a capability (or its server is gone)") from None
            raise
    try:
        if flags & P.TRUNCATED:
            raise OSError(errno.EIO, "reply truncated")
        _tag, status, value = F.decode_reply(data)
    except P.ProtocolError:
        P.close_fds(received)
        raise OSError(errno.EIO, "malformed reply") from None
    except OSError:
        P.close_fds(received)
        raise
    if status != P.OK:
        P.close_fds(received)
        raise_errno(value)
    for new in received:  # a number just allocated: whatever was known of a closed fd there is stale
        _host.pop(new, None)
        stale = _endpoints.pop(new, None)
        if stale is not None:
            stale.drop()
    return value, received


def _send(sock: socket.socket, frame: bytes, anc: list, deadline: float | None) -> None:
    # bounded: never block in sendmsg (another holder of the socket may fill it meanwhile)
    nowait = socket.MSG_DONTWAIT if deadline is not None or _timeouts.thread.give_up is not None else 0
    while True:
        try:
            sock.sendmsg([frame], anc, nowait)
            return
        except BlockingIOError:  # someone made the fd non-blocking
            _wait(sock, select.POLLOUT, deadline)


_RECV_FLAGS = int(socket.MSG_CMSG_CLOEXEC)
_RECV_FLAGS_NOWAIT = int(socket.MSG_CMSG_CLOEXEC | socket.MSG_DONTWAIT)


def _receive(sock: socket.socket, deadline: float | None) -> tuple[bytes, list[int], int]:
    # A bounded wait polls, then reads without blocking: another holder of the socket (a
    # scheme it was passed to on a RENAMEAT, a process the program left behind) may take
    # the frame in between, and a blocking read would then wait past the bound for ever.
    bounded = deadline is not None or _timeouts.thread.give_up is not None
    while True:
        if bounded:
            _wait(sock, select.POLLIN, deadline)
        try:
            data, anc, flags, _ = sock.recvmsg(P.MAX_FRAME, P.CMSG_FDS,
                                               _RECV_FLAGS_NOWAIT if bounded else _RECV_FLAGS)
        except BlockingIOError:
            if not bounded:
                _wait(sock, select.POLLIN, deadline)
            continue
        return data, P.parse_ancillary(anc)[0], flags


def call_value(fd: int, op: int, args: list | tuple = (), fds: list[int] | tuple[int, ...] = (),
               kind: type | tuple[type, ...] = object) -> Any:
    """A request whose answer is a value of kind and no fds (any it carries are closed).

    Raises:
        OSError: EIO when the value is not of kind; as call otherwise.
    """
    value, received = call(fd, op, args, fds)
    P.close_fds(received)
    if not isinstance(value, kind) or (kind is int and isinstance(value, bool)):
        raise OSError(errno.EIO, f"malformed reply: expected {getattr(kind, '__name__', kind)}")
    return value


def call_fd(fd: int, op: int, args: list | tuple = (), fds: list[int] | tuple[int, ...] = ()) -> int:
    """A request whose answer is exactly one new capability fd."""
    _, received = call(fd, op, args, fds)
    if len(received) != 1:
        P.close_fds(received)
        raise OSError(errno.EIO, "expected one capability in the reply")
    return received[0]


# -- the fallbacks rt and the broker share ---------------------------------------


def fstat(fd: int) -> Stat:
    """The status of the file behind fd: a host fd (a passthrough file) asks Linux, a
    capability its scheme (FSTAT)."""
    if is_host_fd(fd):
        return Stat.of(os.fstat(fd))
    return Stat.from_wire(call_value(fd, P.FSTAT, kind=dict))


def stat_at(fd: int, path: str, flags: int = 0) -> Stat:
    """The status of path relative to capability fd: one STATAT where the scheme answers it,
    else an O_PATH open and FSTAT of what it opened.

    Args:
        fd: a directory capability, or a namespace (path is then a namespace path).
        path: the path to look up.
        flags: O_NOFOLLOW (the last symlink itself) and the O_RESOLVE_* bits.

    Raises:
        OSError: the lookup's errno, as call.
    """
    try:
        return Stat.from_wire(call_value(fd, P.STATAT, [path, flags], kind=dict))
    except OSError as exc:
        if exc.errno != errno.ENOSYS:
            raise
    opened = call_fd(fd, P.OPENAT, [path, os.O_PATH | flags, 0])
    try:
        return Stat.from_wire(call_value(opened, P.FSTAT, kind=dict))
    finally:
        forget(opened)
        os.close(opened)


def directory_path(fd: int, base_fd: int, base_path: str) -> str:
    """The path of directory capability fd, given that directory base_fd is at base_path.

    Both fpaths come from the scheme, after symlinks: walk up from base_path
    as far as they differ and down to fd's (what getcwd says after a chdir).

    Raises:
        OSError: EXDEV when they are in different schemes, or fd is above what
            base_path knows.
    """
    here = call_value(fd, P.FPATH, kind=str).rstrip("/").split("/")
    base = call_value(base_fd, P.FPATH, kind=str).rstrip("/").split("/")
    if here[:3] != base[:3]:
        raise OSError(errno.EXDEV, "not in the same scheme as the cwd")
    common = 0
    while common < min(len(here), len(base)) and here[common] == base[common]:
        common += 1
    parts = base_path.rstrip("/").split("/")
    ups = len(base) - common
    if ups > len(parts) - 1:
        raise OSError(errno.EXDEV, "above the cwd's known path")
    kept = parts[: len(parts) - ups] if ups else parts
    return "/".join(kept + here[common:]) or "/"
