"""A SOCK_SEQPACKET socket for trio programs: one frame per call, fds over SCM_RIGHTS.

trio has no SEQPACKET helpers, and its socket wrapper yields to the scheduler
around every call. Every frame crosses the router, so this class tries the
syscall first and waits for readiness only when it would block: an exchange
that does not block costs no scheduler round trip. Every FAIRNESS-th call
that did not block still yields, so a busy peer cannot starve other tasks
or escape cancellation.
"""

from __future__ import annotations

import fcntl
import socket
import struct
import termios
from collections.abc import Awaitable, Callable

import trio

from redoxcap.wire import protocol as P

_INT = bytes(4)  # an ioctl's int, for the kernel to fill in

FAIRNESS = 16


class Channel:
    """Owns one non-blocking SOCK_SEQPACKET socket.

    One task at a time may receive; any number may send (sends that would
    block queue on a lock).

    Args:
        sock: the socket; ownership passes to the channel.
    """

    __slots__ = ("_send_lock", "_unyielded", "_waited", "sock")

    def __init__(self, sock: socket.socket) -> None:
        sock.setblocking(False)
        self.sock = sock
        # made by the first send that would block (the router holds one channel per
        # capability, and most never fill their socket)
        self._send_lock: trio.Lock | None = None
        self._unyielded = 0
        # whether trio was ever asked to wait on the socket: only then may a task be
        # waiting when it closes (the router closes a channel per capability, and most
        # are never waited on: telling trio costs a failed epoll_ctl each)
        self._waited = False

    @classmethod
    def from_fd(cls, fd: int) -> Channel:
        """Take ownership of a socket fd."""
        return cls(socket.socket(fileno=fd))

    def fileno(self) -> int:
        return self.sock.fileno()

    async def yield_sometimes(self) -> None:
        """A checkpoint every FAIRNESS-th call: after a frame that did not have to wait."""
        self._unyielded += 1
        if self._unyielded >= FAIRNESS:
            self._unyielded = 0
            await trio.lowlevel.checkpoint()

    def try_recv(self, ancsize: int = P.CMSG_FDS) -> tuple[bytes, list[int], int, tuple | None] | None:
        """Receive one frame if one is waiting, without a checkpoint.

        Returns:
            As recv(); None when no frame is waiting (wait_readable(), then
            try again).

        Raises:
            OSError: the socket failed or was closed.
        """
        try:
            data, anc, flags, _ = self.sock.recvmsg(P.MAX_FRAME, ancsize, socket.MSG_CMSG_CLOEXEC)
        except BlockingIOError:
            self._unyielded = 0
            return None
        except ConnectionResetError:  # the peer closed with frames of ours unread: gone, as at EOF
            return b"", [], 0, None
        fds, cred = P.parse_ancillary(anc)
        return data, fds, flags, cred

    async def recv(self, ancsize: int = P.CMSG_FDS) -> tuple[bytes, list[int], int, tuple | None]:
        """Receive one frame.

        Returns:
            (data, fds, msg flags, (pid, uid, gid) or None); b"" and no fds is EOF
            (also when the peer reset the connection). The caller owns the fds.

        Raises:
            trio.ClosedResourceError: the channel was closed meanwhile.
            OSError: the socket failed.
        """
        while (received := self.try_recv(ancsize)) is None:
            await self.wait_readable()
        await self.yield_sometimes()
        return received

    async def send(self, frame: bytes, fds: list[int] | tuple[int, ...] = ()) -> None:
        """Send one frame with fds (the caller keeps its copies).

        Raises:
            trio.ClosedResourceError: the channel was closed meanwhile.
            OSError: the peer is gone (EPIPE, ECONNRESET) or the frame is too large.
        """
        anc = P.fds_ancillary(fds)
        if self._send_lock is None or not self._send_lock.locked():
            try:
                self.sock.sendmsg([frame], anc)
                await self.yield_sometimes()
                return
            except BlockingIOError:
                pass
        if self._send_lock is None:
            self._send_lock = trio.Lock()
        async with self._send_lock:
            while True:
                try:
                    self.sock.sendmsg([frame], anc)
                    return
                except BlockingIOError:
                    await self.wait_writable()

    def try_send(self, frame: bytes | list[bytes | memoryview],
                 fds: list[int] | tuple[int, ...] = ()) -> bool:
        """Send one frame only if the socket has room now (the caller keeps its fds).

        frame may be a list of buffers that together are the frame (a header and a
        body sliced from another frame: nothing is copied to join them).

        Returns:
            True if sent; False if it would block (or a blocked send is queued first).

        Raises:
            OSError: the peer is gone, the socket is closed, or the frame cannot be sent.
        """
        if self._send_lock is not None and self._send_lock.locked():
            return False  # a waiting send goes first: frames stay in order
        try:
            self.sock.sendmsg(frame if type(frame) is list else [frame], P.fds_ancillary(fds))
        except BlockingIOError:
            return False
        return True

    def unread_bytes(self) -> int:
        """What the kernel holds of the frames sent on this socket that the peer has not
        read yet (SIOCOUTQ: their buffers' true size); 0 once closed or gone."""
        fd = self.sock.fileno()
        if fd < 0:
            return 0
        try:
            return struct.unpack("i", fcntl.ioctl(fd, termios.TIOCOUTQ, _INT))[0]
        except OSError:
            return 0

    async def wait_readable(self) -> None:
        """Wait until a frame (or EOF) is waiting (trio.ClosedResourceError: the channel
        was closed meanwhile)."""
        await self._wait(trio.lowlevel.wait_readable)

    async def wait_writable(self) -> None:
        """Wait until a send may succeed, or the peer hung up and the send then fails
        (trio.ClosedResourceError: the channel was closed meanwhile)."""
        await self._wait(trio.lowlevel.wait_writable)

    async def _wait(self, wait: Callable[[socket.socket], Awaitable[None]]) -> None:
        if self.sock.fileno() < 0:
            raise trio.ClosedResourceError("channel closed")
        self._waited = True  # close() tells trio from now on
        await wait(self.sock)

    def close(self) -> None:
        """Close the socket; tasks waiting on it (only ever through this class: see
        _waited) get trio.ClosedResourceError."""
        if self.sock.fileno() >= 0:
            if self._waited:
                trio.lowlevel.notify_closing(self.sock)
            self.sock.close()
