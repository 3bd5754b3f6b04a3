"""Capabilities for trio programs (nsmgr, the supervisor, schemes that are clients).

`AsyncCapability` lets many tasks of one process have requests in flight on
one capability at once: each request carries a tag, the router echoes it, and
whichever waiting task currently holds the reading role hands each reply to
the task that asked. No background task is needed.
"""

from __future__ import annotations

import errno
import itertools
from typing import Any

import trio

from redoxcap.wire import protocol as P
from redoxcap.wire.channel import Channel
from redoxcap.wire.frames import REPLY, Request
from redoxcap.wire.protocol import raise_errno


class _Waiter:
    __slots__ = ("event", "reply", "waiting")

    def __init__(self) -> None:
        self.event = trio.Event()
        self.reply: tuple[int, Any, list[int]] | None = None
        self.waiting = False  # parked in _wait, able to take the reading role


class AsyncCapability:
    """Owns one capability fd and serves concurrent requests on it.

    Args:
        fd: a capability fd; ownership passes to this object.
    """

    def __init__(self, fd: int) -> None:
        self.channel = Channel.from_fd(fd)
        self._tags = itertools.count(1)
        self._waiters: dict[int, _Waiter] = {}
        self._reading = False

    def fileno(self) -> int:
        return self.channel.fileno()

    def close(self) -> None:
        self.channel.close()
        for waiter in self._waiters.values():
            waiter.event.set()

    async def call(self, op: int, args: list | tuple = (), fds: list[int] | tuple[int, ...] = (),
                   serving: int | None = None) -> tuple[Any, list[int]]:
        """Send one request and wait for its reply.

        Args:
            op: an operation number from wire.protocol.
            args: the operation's arguments.
            fds: fds to pass (the caller keeps its copies).
            serving: the id of the request a scheme daemon makes this one to serve
                (`Request.id`): the scheme it reaches sees that request's caller.

        Returns:
            (value, received fds); the caller owns the fds.

        Raises:
            OSError: with the errno of an ERR reply; EIO if the capability died.
        """
        tag = next(self._tags) & 0xFFFF_FFFF
        waiter = self._waiters[tag] = _Waiter()
        try:
            await self.channel.send(Request.of(op, tag, args, serving).encode(), fds)
            await self._wait(waiter)
        except trio.ClosedResourceError:
            raise OSError(errno.EBADF, "capability closed") from None
        except BaseException:
            if waiter.reply is not None:
                P.close_fds(waiter.reply[2])
            raise
        finally:
            del self._waiters[tag]
        status, value, received = waiter.reply
        if status != P.OK:
            P.close_fds(received)
            raise_errno(value)
        return value, received

    async def call_fd(self, op: int, args: list | tuple = (), fds: list[int] | tuple[int, ...] = (),
                      serving: int | None = None) -> int:
        """A request whose answer is exactly one new capability fd."""
        _, received = await self.call(op, args, fds, serving)
        if len(received) != 1:
            P.close_fds(received)
            raise OSError(errno.EIO, "expected one capability in the reply")
        return received[0]

    async def _wait(self, waiter: _Waiter) -> None:
        while waiter.reply is None:
            if self.channel.fileno() < 0:
                raise OSError(errno.EBADF, "capability closed")
            if self._reading:
                waiter.waiting = True
                try:
                    await waiter.event.wait()
                finally:
                    waiter.waiting = False
                waiter.event = trio.Event()
                continue
            self._reading = True
            try:
                while waiter.reply is None:
                    self._dispatch(*await self.channel.recv())
            finally:
                self._reading = False
                # Hand the reading role to a task parked in _wait: one still blocked
                # sending (the router stopped reading us) would never come to read.
                for other in self._waiters.values():
                    if other.reply is None and other.waiting:
                        other.event.set()
                        break

    def _dispatch(self, data: bytes, fds: list[int], flags: int, _cred) -> None:
        if not data:
            P.close_fds(fds)
            for w in self._waiters.values():
                w.reply = (P.ERR, errno.EIO, [])
                w.event.set()
            return
        if len(data) < REPLY.size:
            P.close_fds(fds)
            return
        tag, status = REPLY.unpack_from(data)
        w = self._waiters.get(tag)
        if w is None:
            P.close_fds(fds)
            return
        try:
            if flags & P.TRUNCATED:
                raise P.ProtocolError("truncated reply")
            w.reply = (status, P.unpack(memoryview(data)[REPLY.size :]), fds)
        except P.ProtocolError:
            P.close_fds(fds)
            w.reply = (P.ERR, errno.EIO, [])
        w.event.set()

