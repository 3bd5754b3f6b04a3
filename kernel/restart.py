"""Restart state: what the router keeps of a scheme for its next daemon, and what waits for it.

A scheme the supervisor made may send, besides its replies, KEEP frames (a new
handle's may come in its NEW_HANDLE_KEPT reply instead): the state of one of
its handles (opaque bytes and fds), which the router holds while the handle
has a capability and hands to the scheme's next daemon after
a crash (RESUME, then a RESTORE per kept handle), so the handle lives on.
Requests that come while the daemon is down wait for the next one (the
backlog), for RESTART_WAIT seconds at most. A `RestartState` per scheme holds
all of it and tells the router what to hold, restore or fail; the router does
the sending. docs/protocol.md, "Restarts", says the same in prose.
"""

from __future__ import annotations

import collections
import errno
import logging
import os
import socket
import time
from dataclasses import dataclass, field
from typing import TYPE_CHECKING

from redoxcap.wire import protocol as P
from redoxcap.wire.frames import SREQUEST, Keep

if TYPE_CHECKING:
    from redoxcap.kernel.accounts import Account
    from redoxcap.kernel.capabilities import Capability, CapabilityTable, SchemeHandle

log = logging.getLogger("kernel")

RESTART_WAIT = 5.0  # seconds requests to a crashed scheme wait for its next daemon
MAX_BACKLOG = 4096  # requests held for one scheme while it restarts
MAX_KEPT_ITEMS = 65536  # fds and capabilities in the state kept for one handle
MAX_KEPT_BODY = 4 * 1024 * 1024  # bytes of the state kept for one handle
KEPT_PART = P.MAX_FRAME - 4096  # body bytes of one RESTORE(_MORE) frame: room for 253 refs
RESTORE_TRIES = 5  # a restore short of fds tries again after 0.05, 0.1, 0.2... seconds
RESTORE_BACKOFF = 0.05
MSG_CTRUNC = int(socket.MSG_CTRUNC)  # a plain int: socket.MSG_* are slow enum flags
WARNING_EVERY = 1.0  # seconds: at most one warning of each kind so often (warn_now_and_then)

_warned: dict[str, list[float]] = {}  # a warning's format -> [when last logged, not logged since]


def warn_now_and_then(what: str, *args: object) -> None:
    """Log a warning of a daemon's malformed frames at most once every WARNING_EVERY seconds
    of each kind (what), saying how many were not logged since: a client's own scheme
    sends them as fast as it likes, and the log is the operator's (a line per frame was
    megabytes a second)."""
    now = time.monotonic()
    last = _warned.get(what)
    if last is not None and now - last[0] < WARNING_EVERY:
        last[1] += 1
        return
    skipped = last[1] if last is not None else 0
    _warned[what] = [now, 0]
    log.warning(what + (f" ({skipped:d} more not logged)" if skipped else ""), *args)


@dataclass(eq=False, slots=True)
class PartialKeep:
    """The first frames (KEEP_MORE) of a state that comes in several: its fds (or the
    handles of capabilities among them) and the first bytes of its body."""

    items: list = field(default_factory=list)
    body: bytearray = field(default_factory=bytearray)


@dataclass(eq=False, slots=True)
class Kept:
    """A handle's state kept for its scheme: opaque bytes and, in the order the daemon
    sent them, fds the router holds (host files) or the handles of capabilities it sent
    (a namespace's entries: kept as references, with no fd, and minted anew for the
    next daemon). The fds are charged to payer."""

    items: list[int | SchemeHandle]
    body: bytes
    payer: Account

    @property
    def fds(self) -> list[int]:
        return [item for item in self.items if type(item) is int]


@dataclass(eq=False, slots=True)
class Held:
    """A request held while its scheme's daemon restarts."""

    cap: Capability
    tag: int
    cred: tuple[int, int, int]
    op: int
    body: bytes
    fds: list[int]
    serving: int | None = None
    account: int | None = None  # the account it is made for (for a request serving another)
    payer: Account | None = None  # the account its fds are charged to while it is held


@dataclass(eq=False)
class RestartState:
    """What one scheme keeps across a restart of its daemon and what waits for the next one.

    Its methods that let go of kept states return the handles those states named: the
    router drops its reference to each (`Router.unref`), which may close the handle.

    Attributes:
        keeps: the scheme may KEEP state (only schemes the supervisor made).
        restartable: it may get a new daemon (SCHEME_RESTART), so requests wait a while.
        kept: handle number -> its state, for the next daemon.
        provisional: the state of a new handle whose NEW_HANDLE reply is on its way.
        partial: what KEEP_MORE frames brought so far of a state, per handle.
        keep_failed: request id -> the errno its reply becomes: its KEEP was not stored.
        backlog: requests on live handles that came while the daemon was down.
        top: the highest handle number the scheme's daemons have used.
        waiting: dead, and requests wait for a restart (for a while).
        restoring: a new daemon is being given its state: new requests wait.
    """

    keeps: bool = False
    restartable: bool = False
    kept: dict[int, Kept] = field(default_factory=dict)
    provisional: dict[int, Kept] = field(default_factory=dict)
    partial: dict[int, PartialKeep] = field(default_factory=dict)
    keep_failed: dict[int, int] = field(default_factory=dict)
    backlog: collections.deque[Held] = field(default_factory=collections.deque)
    top: int = 0
    waiting: bool = False
    restoring: bool = False

    # -- requests while the daemon is down -----------------------------------------

    def hold(self, held: Held) -> bool:
        """Hold a request for the next daemon; False if none is expected (or too many
        wait): it fails with EIO."""
        if not (self.waiting or self.restoring) or len(self.backlog) >= MAX_BACKLOG:
            return False
        self.backlog.append(held)
        return True

    def give_up(self) -> list[Held]:
        """No daemon came in time: the requests that waited, to fail."""
        self.waiting = False
        held = list(self.backlog)
        self.backlog.clear()
        return held

    def died(self) -> list[SchemeHandle]:
        """The daemon is gone: drop what was on its way (the requests of provisional
        states fail: their handles never were)."""
        self.restoring = False
        self.keep_failed.clear()
        released = self.drop_partial()
        for number in list(self.provisional):
            released += self.forget(number)
        return released

    # -- KEEP ------------------------------------------------------------------------

    def keep(self, req_id: int, data: bytes, last: bool, truncated: int, fds: list[int],
             table: CapabilityTable, handles: dict[int, SchemeHandle],
             system: Account) -> list[SchemeHandle]:
        """Take a KEEP (last) or KEEP_MORE frame of a daemon's; takes ownership of fds.
        See :meth:`take` for what becomes of it.

        Args:
            truncated: the frame's MSG_TRUNC/MSG_CTRUNC flags.
            handles: the scheme's handles, by number.
            system: the system account, which pays until a handle's payer is known.
        """
        if not self.keeps:
            # a client's own scheme: nothing of it is kept, nor remembered (its frames may
            # name request ids that never come back, as many as it likes)
            P.close_fds(fds)
            warn_now_and_then("bad KEEP dropped: this scheme may not keep state in the router")
            return []
        try:
            keep = Keep.decode(data)
        except P.ProtocolError as exc:
            return self.refuse(req_id, fds, exc)
        return self.take(keep, last, truncated, fds, table, handles, system)

    def refuse(self, req_id: int, fds: list[int], exc: Exception) -> list[SchemeHandle]:
        """A malformed state: its fds are closed and its request (req_id) fails (EIO)."""
        P.close_fds(fds)
        warn_now_and_then("bad KEEP dropped: %s", exc)
        if req_id:
            self.keep_failed[req_id] = errno.EIO
        return []

    def take(self, keep: Keep, last: bool, truncated: int, fds: list[int],
             table: CapabilityTable, handles: dict[int, SchemeHandle],
             system: Account) -> list[SchemeHandle]:
        """Take a state a daemon sent for one of its handles (a KEEP frame's, or the one a
        NEW_HANDLE_KEPT reply carries); takes ownership of fds, of which the first
        keep.nfds are the state's.

        Capabilities in it are kept as references to their handles (no fd); other fds are
        held and charged to the handle's payer. A state that cannot be held (out of fds,
        over the payer's quota, malformed) fails the request it was sent for (keep.req_id):
        its reply becomes ERR (keep_failed), since it would not survive a restart, and the
        handle's older state is forgotten, so that a restart fails it rather than hand back
        more than it has now.

        Returns:
            The handles that states let go of name no longer (for the caller to unref).
        """
        req_id = keep.req_id
        try:
            if not self.keeps:
                raise P.ProtocolError("this scheme may not keep state in the router")
            if keep.nfds > len(fds):
                raise P.ProtocolError("KEEP with more fds than it carries")
        except P.ProtocolError as exc:
            return self.refuse(req_id, fds, exc)
        number = keep.handle
        part = self.partial.pop(number, None) or PartialKeep()
        P.close_fds(fds[keep.nfds :])
        state_fds = fds[: keep.nfds]
        released: list[SchemeHandle] = []
        try:
            if truncated:  # Linux could not give us every fd (out of them), or too long
                raise OSError(errno.EMFILE if truncated == MSG_CTRUNC else errno.E2BIG, "KEEP truncated")
            _take(part.items, state_fds, table)
            part.body += keep.body
            if len(part.items) > MAX_KEPT_ITEMS or len(part.body) > MAX_KEPT_BODY:
                raise OSError(errno.E2BIG, "state too large to keep")
            if not last:
                self.partial[number] = part
                return []
            kept = Kept(part.items, bytes(part.body), system)
            system.charge_fds(len(kept.fds))
            self._store(number, kept, handles, system, released)
        except OSError as exc:
            P.close_fds(state_fds)  # those not taken yet (taken ones are -1)
            self.partial[number] = part
            released += self.drop_partial(number)
            if number in handles:
                released += self.forget(number)
            warn_now_and_then("state of handle %d not kept: %s", number, exc)
            if req_id:
                self.keep_failed[req_id] = exc.errno or errno.EIO
        return released

    def _store(self, number: int, kept: Kept, handles: dict[int, SchemeHandle], system: Account,
               released: list[SchemeHandle]) -> None:
        """Hold a complete kept state for handle number (forgetting its older one); the
        handles let go of are added to released.

        Raises:
            OSError: EMFILE when its fds do not fit in the quota of the handle's payer;
                kept is then given back.
        """
        if not kept.items and not kept.body:
            released += self.forget(number)  # an empty KEEP forgets it
            return
        if number != P.ROOT_HANDLE and number not in handles:
            # a new handle's state comes with its NEW_HANDLE reply or before it: see confirm()
            released += self.forget(number)
            self.provisional[number] = kept
            return
        handle = handles.get(number)
        payer = handle.payer if handle is not None and handle.payer is not None else system
        old = self.kept.get(number)
        held = len(old.fds) if old is not None and old.payer is payer else 0
        n = len(kept.fds)
        if n > held and not payer.room_for_caps(n - held):
            released += _drop(kept)
            raise OSError(errno.EMFILE, "quota of the handle's account exceeded")
        released += self.forget(number)
        _charge(kept, payer)
        self.kept[number] = kept

    def provisional_fds(self, number: int) -> int:
        """How many fds the state kept for a new handle on its way holds."""
        kept = self.provisional.get(number)
        return len(kept.fds) if kept is not None else 0

    def confirm(self, number: int, payer: Account) -> list[SchemeHandle]:
        """The new handle number got its capability: keep its state now, charged to payer."""
        kept = self.provisional.pop(number, None)
        if kept is None:
            return []
        released = self.forget(number)
        _charge(kept, payer)
        self.kept[number] = kept
        return released

    # -- letting go --------------------------------------------------------------------

    def forget(self, number: int) -> list[SchemeHandle]:
        """Let go of the state kept for handle number (kept or provisional)."""
        released: list[SchemeHandle] = []
        for table in (self.kept, self.provisional):
            kept = table.pop(number, None)
            if kept is not None:
                released += _drop(kept)
        return released

    def forget_all(self) -> list[SchemeHandle]:
        """Let go of everything (the scheme is freed)."""
        released = []
        for number in [*self.kept, *self.provisional]:
            released += self.forget(number)
        return released + self.drop_partial()

    def drop_partial(self, number: int | None = None) -> list[SchemeHandle]:
        """Forget the parts of KEEPs whose last frame never came (their fds are not
        charged): every handle's, or number's."""
        if number is None:
            partial, self.partial = self.partial, {}
        else:
            partial = {number: self.partial.pop(number, None) or PartialKeep()}
        released = []
        for part in partial.values():
            P.close_fds([item for item in part.items if type(item) is int])
            released += [item for item in part.items if type(item) is not int]
        return released

    # -- restoring -----------------------------------------------------------------------

    def resume_frame(self) -> bytes:
        """RESUME, the first frame a new daemon gets: the next free handle number, above
        every number its predecessors used, so that no new handle ever takes the number
        of one the router still maps, whatever becomes of the restores."""
        return SREQUEST.pack(0, P.ROOT_HANDLE, 0, 0, 0, 0, P.RESUME, 0) + P.pack([self.top + 1])

    @staticmethod
    def restore_frames(number: int, kept: Kept, copies: list[int]) -> list[tuple[bytes, list[int]]]:
        """The RESTORE frame of a kept state, after as many RESTORE_MORE as its fds and
        body need; copies are the fds to send (a copy of each kept fd, a new capability
        for each kept handle), in order."""
        body = kept.body
        parts = max(-(-len(copies) // P.MAX_FDS), -(-len(body) // KEPT_PART), 1)
        frames = []
        for i in range(parts):
            chunk = copies[i * P.MAX_FDS : (i + 1) * P.MAX_FDS]
            op = P.RESTORE if i == parts - 1 else P.RESTORE_MORE
            header = SREQUEST.pack(0, number, 0, 0, 0, 0, op, len(chunk))
            refs = P.NO_REF.to_bytes(8, "little") * len(chunk)
            frames.append((header + refs + body[i * KEPT_PART : (i + 1) * KEPT_PART], chunk))
        return frames


def _take(items: list, fds: list[int], table: CapabilityTable) -> None:
    """Append fds to a kept state: a capability as its handle (the fd is closed), any
    other fd as it is. Each fd taken is set to -1 in fds.

    Raises:
        OSError: fstat failed (out of memory).
    """
    for i, fd in enumerate(fds):
        cap = table.of_fd(fd)
        if cap is not None:
            cap.handle.refs += 1
            items.append(cap.handle)
            os.close(fd)
        else:
            items.append(fd)
        fds[i] = -1


def _drop(kept: Kept) -> list[SchemeHandle]:
    """Give back what a kept state held: close its fds; returns the handles it named."""
    items = list(kept.items)
    kept.items.clear()
    fds = [item for item in items if type(item) is int]
    P.close_fds(fds)
    kept.payer.charge_fds(-len(fds))
    return [item for item in items if type(item) is not int]


def _charge(kept: Kept, payer: Account) -> None:
    """Charge a kept state's fds to payer from now on."""
    n = len(kept.fds)
    kept.payer.charge_fds(-n)
    payer.charge_fds(n)
    kept.payer = payer
