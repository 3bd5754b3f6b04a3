"""Replies to holders: sent at once, or kept in the capability's outbox until its holder reads.

A reply is never waited for: it is sent at once if the socket has room and
nothing waits before it, else it joins the capability's outbox, in order, and
the router reads no more of that capability's requests until the outbox is
empty (backpressure on the holder that does not read, on nobody else). The
bytes queued count against the holder's account, the fds against the account
that pays for the capability, whose quota may refuse them: the reply then
becomes ERR EMFILE. A reply sent into the socket still counts against a
client's account while its holder may leave it unread there (`Account.landed`).
"""

from __future__ import annotations

import collections
import errno
import logging
from typing import TYPE_CHECKING, Literal

import trio

from redoxcap.wire import protocol as P
from redoxcap.wire.frames import REPLY

if TYPE_CHECKING:
    from redoxcap.kernel.accounts import Account
    from redoxcap.kernel.capabilities import Capability
    from redoxcap.kernel.handles import HandleTable
    from redoxcap.wire.channel import Channel

log = logging.getLogger("kernel")

Delivery = Literal["sent", "queued", "full"]
SENT: Delivery = "sent"  # the holder has it, or is gone (nothing to tell anyone)
QUEUED: Delivery = "queued"  # in the outbox: a writer must drain it
FULL: Delivery = "full"  # its fds did not fit in the payer's quota: ERR EMFILE queued instead

# A send to a holder that is gone: nothing to tell anyone, its EOF cleans up.
HOLDER_GONE = frozenset({errno.EPIPE, errno.ECONNRESET, errno.ENOTCONN, errno.EBADF})


def error_reply(tag: int, err: int) -> bytes:
    """A reply frame ERR err to tag."""
    return REPLY.pack(tag, P.ERR) + P.pack(err)


def send_now(channel: Channel, frame: bytes | list, fds: list[int]) -> tuple[bytes, list[int]] | None:
    """Try to send one reply (bytes, or a list of buffers: a header and a body) without
    waiting; closes fds once done with them.

    Sending fds can fail on its own (ETOOMANYREFS, ENOBUFS, ENOMEM...): the request then
    fails with that errno instead of leaving its caller waiting.

    Returns:
        None when done with it (sent, or dropped because the holder is gone), else the
        frame (as bytes) and fds still to send: the same, or an ERR reply that replaced
        one that could not be sent as it was.
    """
    while True:
        try:
            if not channel.try_send(frame, fds):
                return (frame if type(frame) is bytes else b"".join(frame)), fds
        except OSError as exc:
            P.close_fds(fds)
            header = frame if type(frame) is bytes else frame[0]
            if exc.errno in HOLDER_GONE or len(header) < REPLY.size:
                return None
            tag, status = REPLY.unpack_from(header)
            if status == P.ERR:
                return None  # an error reply that cannot be sent either: nothing smaller to try
            frame, fds = error_reply(tag, exc.errno or errno.EIO), []
            continue
        P.close_fds(fds)
        return None


class Outbox:
    """The replies of one capability waiting for its holder's socket to have room.

    It owns the fds of the replies in it; what it holds is charged to the accounts
    given to each method (the holder's for bytes, the payer's for fds).
    """

    __slots__ = ("_replies", "bytes", "fds")

    def __init__(self) -> None:
        self._replies: collections.deque[tuple[bytes, list[int]]] = collections.deque()
        self.bytes = 0
        self.fds = 0

    def __bool__(self) -> bool:
        return bool(self._replies)

    def offer(self, channel: Channel, frame: bytes | list, fds: list[int], account: Account,
              payer: Account) -> Delivery:
        """Send a reply now if nothing waits before it and the socket has room, else queue
        it; never waits. Takes ownership of fds."""
        if not self._replies:
            left = send_now(channel, frame, fds)
            if left is None:
                return SENT
            frame, fds = left
        elif type(frame) is not bytes:
            frame = b"".join(frame)
        return self.queue(frame, fds, account, payer)

    def queue(self, frame: bytes, fds: list[int], account: Account, payer: Account) -> Delivery:
        """Queue a reply its holder's socket had no room for; takes ownership of fds."""
        delivery = QUEUED
        if fds and not payer.room_for_caps(len(fds)):
            # queued fds are router fds held for the capability's payer (a client, for one a
            # daemon holds for it): past its quota the reply fails
            P.close_fds(fds)
            frame, fds, delivery = error_reply(REPLY.unpack_from(frame)[0], errno.EMFILE), [], FULL
        self._replies.append((frame, fds))
        self._count(len(frame), len(fds), account, payer)
        return delivery

    def flush(self, cap: Capability) -> bool:
        """Send what cap's holder's socket has room for now, in order.

        Returns:
            Whether the outbox is empty.
        """
        account, payer = cap.account, cap.payer
        while self._replies:
            frame, fds = self._replies[0]
            left = send_now(cap.channel, frame, fds)
            if left is not None:
                self._replies[0] = left
                self._count(len(left[0]) - len(frame), len(left[1]) - len(fds), account, payer)
                return False
            self._replies.popleft()
            self._count(-len(frame), -len(fds), account, payer)
            landed(cap, frame)
        return True

    def drop(self, account: Account, payer: Account) -> None:
        """Forget every reply (the holder is gone): close their fds, uncharge them."""
        while self._replies:
            frame, fds = self._replies.popleft()
            P.close_fds(fds)
            self._count(-len(frame), -len(fds), account, payer)

    def _count(self, nbytes: int, nfds: int, account: Account, payer: Account) -> None:
        self.bytes += nbytes
        self.fds += nfds
        account.queued(nbytes)
        payer.charge_fds(nfds)



def landed(cap: Capability, frame: bytes | list) -> None:
    """frame went into cap's socket: a client's account counts it while it may be unread."""
    account = cap.account
    if account.limits.max_queued_bytes is not None:
        account.landed(cap, len(frame) if type(frame) is bytes else len(frame[0]) + len(frame[1]))


def deliver(cap: Capability, frame: bytes | list, fds: list[int]) -> bool:
    """Send frame (bytes, or a header and a body) to cap's holder now, or queue it on cap's
    outbox; never waits. Takes ownership of fds: closed once sent or dropped.

    Returns:
        Whether a writer must now drain cap's outbox (`write_outbox`, in a task).
    """
    if cap.closed:
        P.close_fds(fds)
        return False
    if cap.outbox is None:  # made on first use: most capabilities never need one
        left = send_now(cap.channel, frame, fds)
        if left is None:
            landed(cap, frame)
            return False
        cap.outbox = Outbox()
        cap.outbox.queue(*left, cap.account, cap.payer)
    elif cap.outbox.offer(cap.channel, frame, fds, cap.account, cap.payer) == SENT:
        landed(cap, frame)
    if cap.outbox and not cap.writing:
        cap.writing = True
        return True
    return False


async def write_outbox(cap: Capability, table: HandleTable) -> None:
    """Drain cap's outbox as its holder reads; the one task that waits on its socket.
    What waited for it (cap, and its account's capabilities) is read again as it drains."""
    try:
        while cap.outbox and not cap.closed:
            try:
                await cap.channel.wait_writable()
            except trio.ClosedResourceError:
                break
            if cap.closed:
                break  # released while we were woken: the outbox is gone
            cap.outbox.flush(cap)
            table.resume(cap.account.drained())
    except Exception:
        log.exception("capability of scheme %d: dropped after an internal error", cap.handle.scheme.id)
        table.release(cap)
    finally:
        cap.writing = False
        if cap.closed and cap.outbox:
            cap.outbox.drop(cap.account, cap.payer)
            table.resume(cap.account.drained())
        if not cap.outbox:
            cap.outbox = None  # drained: give its memory back
        table.resume((cap,))
