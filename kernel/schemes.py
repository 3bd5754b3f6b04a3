"""Schemes as the router knows them: anonymous ids, a request channel, open handles.

The router knows no scheme names. A `Scheme` is an id, the channel to its
daemon, the handles open on it, the requests in flight there (by the
router's request id) and its restart state (kernel/restart.py). The
`SchemeTable` gives ids and knows which daemon process serves which scheme,
to check a daemon's claim that it serves a client's request.
"""

from __future__ import annotations

import collections

import errno
import itertools
import logging
from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Literal

import trio

from redoxcap.kernel.restart import RestartState
from redoxcap.wire import protocol as P

if TYPE_CHECKING:
    from redoxcap.kernel.accounts import Account
    from redoxcap.kernel.capabilities import ClientRequest, SchemeHandle
    from redoxcap.wire.channel import Channel

log = logging.getLogger("kernel")

# What became of a frame for a daemon: sent; its channel is full (send it later); the
# daemon is lost (the router must treat it as dead); or it was gone before (nothing to do).
Sent = Literal["sent", "full", "lost", "gone"]
SENT, FULL, LOST, GONE = "sent", "full", "lost", "gone"


@dataclass(eq=False, slots=True)
class StatusQuery:
    """The router's own SCHEME_STATUS question to a scheme; the answer goes to a channel."""

    answer: trio.MemorySendChannel
    account: int = 0

    def caller(self) -> tuple[int, int, int] | None:
        return None  # the router's own question: it serves no one

    def answered(self, status: int | None, body: bytes | memoryview) -> None:
        """The daemon's reply (status None: malformed) to it: (status, the decoded value)."""
        try:
            answer = (status, P.unpack(body)) if status is not None else (P.ERR, errno.EIO)
        except P.ProtocolError:
            answer = (P.ERR, errno.EIO)
        self.answer.send_nowait(answer)

    def abandoned(self) -> None:
        self.answer.close()


@dataclass(eq=False)
class Scheme:
    """One anonymous scheme: its request channel and what is open on it."""

    id: int
    channel: Channel | None = None
    generation: int = 0
    alive: bool = False
    frames: int = 0
    pending: dict[int, ClientRequest | StatusQuery] = field(default_factory=dict)
    handles: dict[int, SchemeHandle] = field(default_factory=dict)
    restart: RestartState = field(default_factory=RestartState)
    attached: int = 0  # daemons it has had (1 + restarts)
    daemon: tuple[int, int, int] | None = None  # (pid, uid, gid) of its daemon, once it said HELLO
    died: trio.Event = field(default_factory=trio.Event)  # set when its daemon's channel ends
    # who pays for the router's end of its channel (a client that created it; None: the system)
    payer: Account | None = None
    freed: bool = False  # its last capability went: it is gone for good
    # a client's scheme whose channel is not watched for now: its payer had no frames left
    # in a pass (Router._park_scheme); it waits in the router's queue of that payer's
    waiting: bool = False
    # handle numbers whose CLOSE waits for room in its channel, in order, and whether a task
    # of the router's sends them (Router.tidy): one task a scheme, however many there are
    closes_owed: collections.deque[int] = field(default_factory=collections.deque)
    sending_closes: bool = False

    def try_send(self, frame: bytes | list, fds: list[int] | tuple[int, ...] = ()) -> Sent:
        """Send a frame to its daemon if the channel has room now; the caller keeps fds."""
        channel = self.channel
        if channel is None:
            return GONE
        try:
            return SENT if channel.try_send(frame, fds) else FULL
        except OSError as exc:
            log.warning("scheme %d: send failed: %s", self.id, exc)
            return LOST

    async def send(self, frame: bytes, fds: list[int] | tuple[int, ...] = ()) -> Sent:
        """Send a frame to its daemon, waiting for room (in order behind other waiting
        sends); the caller keeps fds. Never "full"."""
        channel = self.channel
        if channel is None:
            return GONE
        try:
            await channel.send(frame, fds)
        except (OSError, trio.ClosedResourceError) as exc:
            if self.channel is not channel:
                return GONE  # it died (and may have come back) while we waited
            log.warning("scheme %d: send failed: %s", self.id, exc)
            return LOST
        return SENT

    def next_generation(self) -> None:
        """Handles of the old generation go stale, but the kept ones move on with it."""
        self.generation += 1
        for number in self.restart.kept:
            handle = self.handles.get(number)
            if handle is not None:
                handle.generation = self.generation

    def fail_handle(self, number: int) -> None:
        """A kept handle the new daemon could not be given: every request on it fails
        (EIO) from now on, as on any handle of a dead daemon."""
        handle = self.handles.get(number)
        if handle is not None and number != 0:
            handle.generation = -1  # never current again


class SchemeTable:
    """The live schemes by id, and which daemon process serves which."""

    def __init__(self) -> None:
        self.by_id: dict[int, Scheme] = {}
        self._ids = itertools.count(1)
        self._served_by: dict[int, set[Scheme]] = {}  # daemon pid -> the schemes it serves

    def new(self, **kwargs) -> Scheme:
        """A scheme with the next id (listed once `add`ed)."""
        return Scheme(next(self._ids), **kwargs)

    def add(self, scheme: Scheme) -> None:
        self.by_id[scheme.id] = scheme

    def remove(self, scheme: Scheme) -> None:
        self.by_id.pop(scheme.id, None)

    def set_daemon(self, scheme: Scheme, daemon: tuple[int, int, int] | None) -> None:
        """Note which process serves scheme now (from SO_PASSCRED; None: none)."""
        if scheme.daemon is not None:
            schemes = self._served_by.get(scheme.daemon[0])
            if schemes is not None:
                schemes.discard(scheme)
                if not schemes:
                    del self._served_by[scheme.daemon[0]]
        scheme.daemon = daemon
        if daemon is not None:
            self._served_by.setdefault(daemon[0], set()).add(scheme)

    def served_caller(self, req_id: int, sender: tuple[int, int, int]
                      ) -> tuple[tuple[int, int, int], int]:
        """The caller of request req_id and the account it was made for, if the sender is
        the daemon serving it.

        A daemon that forwards a request (opening a client's path for it) names the
        request it serves; the scheme it reaches then sees that request's caller,
        as Linux reported it to us. No process can claim a request it does not serve:
        the claim must come from the very process (pid and uid, from SO_PASSCRED) of
        the daemon the request was sent to, while it is still in flight there.

        Raises:
            OSError: EPERM for any other claim.
        """
        for scheme in self._served_by.get(sender[0], ()):
            waiter = scheme.pending.get(req_id)
            if waiter is not None:
                caller = waiter.caller()
                daemon = scheme.daemon
                if caller is None or daemon is None or daemon[:2] != sender[:2]:
                    break
                return caller, waiter.account
        raise OSError(errno.EPERM, "not a request the sender serves")
