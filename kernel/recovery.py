"""Recovery: what the router does when a daemon dies, and how its next one gets back
what the router kept for it.

When a daemon dies, what was in flight there fails (`fail_in_flight`), and
requests to its scheme wait (`hold`; kernel/restart.py holds them) for
RESTART_WAIT seconds; `give_up_waiting` then fails them. When the
supervisor attaches a new daemon, `restore` hands it RESUME, the state kept
for each handle (copies of the fds, new capabilities for the handles), then
the requests that waited, before any new one. These are tasks beside the
routing loop; they send through the loop's public methods (`RoutingLoop`).
"""

from __future__ import annotations

import errno
import logging
import os
from typing import TYPE_CHECKING, Protocol

import trio

from redoxcap.kernel.restart import RESTART_WAIT, RESTORE_BACKOFF, RESTORE_TRIES, Held, Kept
from redoxcap.kernel.schemes import StatusQuery
from redoxcap.wire import protocol as P

if TYPE_CHECKING:
    from redoxcap.kernel.accounts import Account
    from redoxcap.kernel.capabilities import Capability, SchemeHandle
    from redoxcap.kernel.handles import HandleTable
    from redoxcap.kernel.schemes import Scheme
    from redoxcap.wire.channel import Channel

log = logging.getLogger("kernel")


class RoutingLoop(Protocol):
    """What recovery uses of the routing loop (kernel/router.py)."""

    table: HandleTable
    system_account: Account

    def mint(self, handle: SchemeHandle, account: Account, payer: Account | None = None,
             force: bool = False) -> int: ...
    def reply(self, cap: Capability, tag: int, status: int, value, fds: list[int] | None = None) -> None: ...
    def settle(self, cap: Capability) -> None: ...
    def forward(self, cap: Capability, tag: int, cred: tuple[int, int, int], op: int, body: bytes,
                fds: list[int], held: Account | None = None, serving: int | None = None,
                for_account: int | None = None) -> None: ...
    async def send_to_scheme(self, scheme: Scheme, frame: bytes, fds: list[int]) -> bool: ...
    def tidy(self) -> None: ...


def fail_in_flight(loop: RoutingLoop, scheme: Scheme) -> bool:
    """scheme's daemon is gone (or the scheme was freed): fail what was in flight there.

    Returns:
        Whether requests now wait for its next daemon (`give_up_waiting` must then run):
        False if it was already dead, or if no daemon will come (what comes for it now
        fails at once, EIO).
    """
    if not scheme.alive:
        return False
    for waiter in loop.table.scheme_died(scheme):
        if type(waiter) is StatusQuery:
            waiter.abandoned()
        else:  # the scheme died with the request in flight
            waiter.release_fds()
            loop.settle(waiter.cap)
            loop.reply(waiter.cap, waiter.tag, P.ERR, errno.EIO)
    if scheme.freed or not scheme.restart.restartable:
        return False
    scheme.restart.waiting = True
    return True


def hold(loop: RoutingLoop, scheme: Scheme, held: Held) -> None:
    """Hold a request for the next daemon of scheme (EIO if none is expected); it counts
    as in flight meanwhile, within the same bounds."""
    cap = held.cap
    payer = cap.account
    if held.fds and not payer.room_for_caps(len(held.fds)):
        # held here, they count against the quota, as they would at a live daemon
        P.close_fds(held.fds)
        loop.reply(cap, held.tag, P.ERR, errno.EMFILE)
        return
    if not scheme.restart.hold(held):
        P.close_fds(held.fds)
        loop.reply(cap, held.tag, P.ERR, errno.EIO)
        return
    payer.started(cap)
    payer.charge_fds(len(held.fds))
    held.payer = payer  # given back to it, wherever the capability has moved by then


async def give_up_waiting(loop: RoutingLoop, scheme: Scheme, generation: int) -> None:
    """Requests wait RESTART_WAIT seconds for a new daemon; then EIO, as before."""
    await trio.sleep(RESTART_WAIT)
    if scheme.generation != generation or scheme.alive:
        return  # it came back
    for held in scheme.restart.give_up():
        if held.payer is not None:
            held.payer.charge_fds(-len(held.fds))
        P.close_fds(held.fds)
        loop.settle(held.cap)
        loop.reply(held.cap, held.tag, P.ERR, errno.EIO)


async def restore(loop: RoutingLoop, scheme: Scheme, channel: Channel) -> None:
    """Give a restarted daemon RESUME, the state kept for its handles, then the requests
    that waited for it; requests that come meanwhile wait behind them. A handle whose
    state cannot be handed back (the router out of fds even after a few tries) fails
    with EIO from then on; none is ever silently another."""
    restart = scheme.restart
    try:
        if not await loop.send_to_scheme(scheme, restart.resume_frame(), []):
            return  # it died again
        for number, kept in list(restart.kept.items()):
            if scheme.channel is not channel:
                return  # it died again
            if restart.kept.get(number) is not kept:
                continue  # its last capability closed meanwhile
            try:
                await _restore_one(loop, scheme, number, kept)
            except OSError as exc:
                log.warning("scheme %d: handle %d could not be restored (%s); it fails from now on",
                            scheme.id, number, exc)
                loop.table.unref(*restart.forget(number))
                scheme.fail_handle(number)
        while restart.backlog and scheme.channel is channel:
            held = restart.backlog.popleft()
            loop.forward(held.cap, held.tag, held.cred, held.op, held.body, held.fds,
                         held=held.payer, serving=held.serving, for_account=held.account)
            await trio.lowlevel.checkpoint()  # the backlog goes out at the loop's pace
    finally:
        if scheme.channel is channel:
            restart.restoring = False
        loop.tidy()


async def _restore_one(loop: RoutingLoop, scheme: Scheme, number: int, kept: Kept) -> None:
    """Send one handle's kept state to the scheme's new daemon: a copy of each fd, a new
    capability (held by the daemon, charged to the state's payer) for each handle.

    Raises:
        OSError: the router had no fds for the copies, after RESTORE_TRIES tries.
    """
    copies: list[int] = []
    try:
        for attempt in range(RESTORE_TRIES):
            try:
                for item in kept.items[len(copies):]:
                    if type(item) is int:
                        copies.append(os.dup(item))
                    else:  # given back as it was: past the payer's quota if need be
                        copies.append(loop.mint(item, loop.system_account, kept.payer, force=True))
                break
            except OSError as exc:
                if exc.errno not in (errno.EMFILE, errno.ENFILE, errno.ENOMEM) or attempt + 1 == RESTORE_TRIES:
                    raise
                await trio.sleep(RESTORE_BACKOFF * 2**attempt)  # fds may come free meanwhile
                if scheme.restart.kept.get(number) is not kept:
                    return
        for frame, chunk in scheme.restart.restore_frames(number, kept, copies):
            if not await loop.send_to_scheme(scheme, frame, chunk):
                return  # it died again: its successor is given the state
    finally:
        P.close_fds(copies)
