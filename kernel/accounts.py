"""Accounts: who is charged for each fd the router holds, and their limits.

Every capability belongs to one account. The system account (the kernel
capability, everything minted through it, every daemon) has no quota; an
account made with ACCOUNT_NEW is a client's and has every limit below. The
router enforces them: a capability past the quota is EMFILE; a capability
whose account has too much in flight or queued stops being read until it
drains, so a client that floods slows only itself.

What a daemon holds because of a client is charged to that client, not to
the daemon's system account: a capability the namespace daemon holds in a client's
namespace, the channel of a scheme the client created, state kept for the
client's handles. Every client account also draws on one shared `FdPool`:
the router's fd limit less a reserve that only the system (restarts,
restores, the supervisor) may use, so that however many clients there are,
they cannot take the router's last fds.
"""

from __future__ import annotations

from collections.abc import Iterable
from dataclasses import dataclass, field, fields, replace
from typing import TYPE_CHECKING, Any

if TYPE_CHECKING:
    from redoxcap.kernel.capabilities import Capability

# Defaults for a client account; `python -m redoxcap.kernel` options override them.
MAX_CAPS_PER_ACCOUNT = 1024  # capabilities one client may hold (each costs the router an fd)
MAX_INFLIGHT_PER_ACCOUNT = 64  # requests of one client waiting for a scheme's reply
MAX_INFLIGHT_PER_CAP = 16  # requests on one capability waiting for a scheme's reply
# replies queued for sockets the client does not read, and sent into them unread
MAX_QUEUED_BYTES_PER_ACCOUNT = 16 * 1024 * 1024
# What the kernel charges a socket for a frame sent and not yet read (its skb's true size),
# about: the frame, half again, and a fixed cost (measured: 768 bytes for 20 bytes, 200 KiB
# for 132 KiB). An estimate only decides when to ask the sockets (Account.recount_unread).
SKB_COST = 768
# Daemons multiplex every client on one capability (a namespace's entry for a scheme), so a
# low bound there would let one client's slow requests stall all the others.
SYSTEM_MAX_INFLIGHT_PER_CAP = 4096


@dataclass(frozen=True)
class Limits:
    """What one account may use; None is no limit."""

    max_caps: int | None = MAX_CAPS_PER_ACCOUNT
    max_inflight: int | None = MAX_INFLIGHT_PER_ACCOUNT
    max_inflight_per_cap: int | None = MAX_INFLIGHT_PER_CAP
    max_queued_bytes: int | None = MAX_QUEUED_BYTES_PER_ACCOUNT

    def overridden(self, overrides: Any) -> Limits:
        """These limits with some replaced, as ACCOUNT_NEW's argument asks.

        Args:
            overrides: a map from field name to a positive int (untrusted input).

        Raises:
            TypeError: not a map.
            ValueError: an unknown name, or a value that is not a positive int.
        """
        if not isinstance(overrides, dict):
            raise TypeError("limits must be a map")
        names = {f.name for f in fields(self)}
        for name, value in overrides.items():
            if name not in names:
                raise ValueError(f"unknown limit {name!r}")
            if type(value) is not int or value < 1:
                raise ValueError(f"limit {name!r} must be a positive int")
        return replace(self, **overrides)


CLIENT_LIMITS = Limits()

# Of the router's RLIMIT_NOFILE, what client accounts together may never take: for the
# daemons' own capabilities, their channels, restores after a restart and the supervisor.
MIN_RESERVE = 256
RESERVE_SHARE = 4  # a quarter of the limit, at least MIN_RESERVE


def reserve_for(fd_limit: int) -> int:
    """The fds kept back from client accounts out of a router's fd_limit."""
    return min(fd_limit, max(MIN_RESERVE, fd_limit // RESERVE_SHARE))


@dataclass(eq=False)
class FdPool:
    """The router fds that every client account draws on together.

    Attributes:
        limit: what client accounts may hold in all (the fd limit less the reserve);
            None for no limit.
        used: what they hold now.
    """

    limit: int | None
    used: int = 0

    def room_for(self, n: int) -> bool:
        return self.limit is None or self.used + n <= self.limit


SYSTEM_LIMITS = Limits(max_caps=None, max_inflight=None,
                       max_inflight_per_cap=SYSTEM_MAX_INFLIGHT_PER_CAP, max_queued_bytes=None)
SYSTEM_ACCOUNT_ID = 0  # the kernel capability's account: daemons, no quota


@dataclass(eq=False)
class Account:
    """The capabilities, in-flight requests and queued reply bytes charged to one client.

    Its counters change only through its methods, which keep the fds all client
    accounts share and the list of accounts that hold something (`listed`) right.
    """

    id: int
    limits: Limits
    caps: int = 0
    inflight: int = 0
    queued_bytes: int = 0
    # bytes of replies sent into its capabilities' sockets that their holders may not have
    # read yet, and those capabilities: kernel memory the router's sockets hold for it (a
    # socket takes ~200 KiB of them; 1,000 capabilities, 200 MiB). Estimated as replies go
    # out, asked of the sockets when the estimate reaches the bound (`landed`); counted with
    # queued_bytes against max_queued_bytes
    unread: int = 0
    unread_caps: set[Capability] = field(default_factory=set)
    recount_at: int = 0  # unread + queued_bytes at which `landed` asks the sockets next
    # fds the router holds for it besides its capabilities' sockets: in queued replies and
    # in requests being forwarded; they count against max_caps, which bounds the router's fds
    held_fds: int = 0
    # capabilities whose reading waits until it drains
    blocked: set[Capability] = field(default_factory=set)
    # the fds every client account shares (None for the system account: it has the reserve)
    pool: FdPool | None = None
    # the accounts that hold something, by id: it lists itself there while it does
    listed: dict[int, Account] | None = None
    # the routing loop's pass in which a request of it was last read
    turn: int = -1
    # the pass in which its schemes' channels were last read, and the frames they may still
    # give in it (reply_budget)
    reply_pass: int = -1
    replies_left: int = 0

    def __post_init__(self) -> None:
        self.recount_at = self.limits.max_queued_bytes or 0

    @property
    def system(self) -> bool:
        return self.limits.max_caps is None

    def room_for_caps(self, n: int) -> bool:
        """Whether n more capabilities (or other fds held for it) fit under the quota, and
        in the fds all client accounts share."""
        if self.limits.max_caps is None:
            return True
        return (self.caps + self.held_fds + n <= self.limits.max_caps
                and (self.pool is None or self.pool.room_for(n)))

    def charge_caps(self, n: int) -> None:
        """n more capabilities (negative: fewer) are charged to this account."""
        self.caps += n
        if self.pool is not None:
            self.pool.used += n
        self._list()

    def charge_fds(self, n: int) -> None:
        """n more fds besides capabilities (queued, in flight, kept) are held for it."""
        if not n:
            return
        self.held_fds += n
        if self.pool is not None:
            self.pool.used += n
        self._list()

    def _list(self) -> None:
        """Be listed while it holds something; the system account always is."""
        if self.listed is None:
            return
        if self.caps or self.inflight or self.held_fds or self.id == SYSTEM_ACCOUNT_ID:
            self.listed[self.id] = self
        else:
            self.listed.pop(self.id, None)

    def take_turn(self, pass_number: int) -> bool:
        """Whether one more of its requests may be read in this pass of the routing loop.

        A client account gets one request read per pass however many of its capabilities
        have requests waiting, as a client waiting with a single request does (the others
        stay ready and come first in the next pass); the system account's daemons serve
        every client, so each of its capabilities gets one.
        """
        if self.limits.max_caps is None:
            return True
        if self.turn == pass_number:
            return False
        self.turn = pass_number
        return True

    def reply_budget(self, pass_number: int, per_pass: int) -> int:
        """How many more frames the channels of the schemes it pays for (a client's own
        schemes) may give in this pass of the routing loop: per_pass among all of them,
        however many it has, as its requests get one turn a pass (each of the system's
        daemons reads per_pass of its own). The reader takes off what it read
        (`replies_left`)."""
        if self.reply_pass != pass_number:
            self.reply_pass, self.replies_left = pass_number, per_pass
        return self.replies_left

    def may_read(self, cap: Capability) -> bool:
        """Whether cap's next request may be read now (else backpressure: it waits).

        A capability whose holder does not read its replies, whose last request waits
        for a scheme's channel to have room, or that has its bound of requests in flight,
        waits for itself; one whose account is saturated waits in `blocked` until
        `drained` gives it back.
        """
        if cap.outbox or cap.sending:
            return False
        per_cap = self.limits.max_inflight_per_cap
        if per_cap is not None and cap.inflight >= per_cap:
            return False
        if self.saturated:
            self.blocked.add(cap)
            return False
        return True

    def started(self, cap: Capability, n: int = 1) -> None:
        """n requests of cap's are now in flight (forwarded, or held for a restart)."""
        cap.inflight += n
        self.inflight += n

    def waits_to_send(self, cap: Capability, nfds: int) -> None:
        """One of cap's requests, with nfds fds, waits for its scheme's channel to have room:
        cap is not read meanwhile, and the fds count against the quota."""
        cap.sending += 1
        self.charge_fds(nfds)

    def sent(self, cap: Capability, nfds: int) -> Iterable[Capability]:
        """The request `waits_to_send` told of has left (or failed; its fds are no longer
        held for it here).

        Returns:
            The capabilities that may read again: cap.
        """
        cap.sending -= 1
        self.charge_fds(-nfds)
        return (cap,)

    def settled(self, cap: Capability) -> Iterable[Capability]:
        """One of cap's requests was answered (or never will be).

        Returns:
            The capabilities that may read again: cap itself, and those of this account
            that waited for it to drain.
        """
        cap.inflight -= 1
        self.inflight -= 1
        if not self.inflight:
            self._list()
        return (cap, *self.drained()) if self.blocked else (cap,)

    def queued(self, nbytes: int) -> None:
        """nbytes more of replies (negative: fewer) wait in its capabilities' outboxes."""
        self.queued_bytes += nbytes

    def landed(self, cap: Capability, nbytes: int) -> None:
        """A reply of nbytes went into cap's socket, where its holder may leave it unread.
        Only for an account with a max_queued_bytes (a client's)."""
        cost = nbytes + (nbytes >> 1) + SKB_COST
        cap.unread += cost
        self.unread += cost
        self.unread_caps.add(cap)
        if self.unread + self.queued_bytes >= self.recount_at:
            self.recount_unread()

    def recount_unread(self) -> None:
        """Put what its capabilities' sockets hold unread now (their holders read meanwhile)
        in place of the estimate."""
        for cap in list(self.unread_caps):
            held = 0 if cap.closed else cap.channel.unread_bytes()
            self.unread += held - cap.unread
            cap.unread = held
            if not held:
                self.unread_caps.discard(cap)
        # not again before the bound, nor before an eighth of it more has gone out (or an
        # account just under it would have every reply ask all its sockets)
        limit = self.limits.max_queued_bytes or 0
        self.recount_at = max(limit, self.unread + self.queued_bytes + limit // 8)

    def forget_unread(self, cap: Capability) -> None:
        """cap is gone or counted elsewhere: what its socket holds is no longer this account's."""
        self.unread -= cap.unread
        cap.unread = 0
        self.unread_caps.discard(cap)

    @property
    def over_unread(self) -> bool:
        """Whether replies left unread in its sockets keep it saturated: only its holders'
        reading ends that, which no socket the router watches tells (the router asks the
        sockets now and then: Router._recount_unread)."""
        lim = self.limits.max_queued_bytes
        return bool(self.unread) and lim is not None and self.queued_bytes + self.unread >= lim

    def drained(self) -> Iterable[Capability]:
        """The capabilities that waited for this account, once it is below its limits."""
        if self.blocked and not self.saturated:
            blocked, self.blocked = self.blocked, set()
            return blocked
        return ()

    def take_over(self, cap: Capability, old: Account, queued_bytes: int) -> Iterable[Capability]:
        """Count cap's requests in flight and its queued reply bytes here instead of old.

        Returns:
            old's capabilities that may read again now that it has less.
        """
        old.inflight -= cap.inflight
        old.queued_bytes -= queued_bytes
        old.blocked.discard(cap)
        unread = cap.unread
        old.forget_unread(cap)
        if unread and self.limits.max_queued_bytes is not None:
            cap.unread = unread
            self.unread += unread
            self.unread_caps.add(cap)
        self.inflight += cap.inflight
        self.queued_bytes += queued_bytes
        old._list()
        self._list()
        return old.drained()

    @property
    def saturated(self) -> bool:
        """Too much in flight or queued: stop reading this account's requests."""
        lim = self.limits
        return ((lim.max_inflight is not None and self.inflight >= lim.max_inflight)
                or (lim.max_queued_bytes is not None
                    and self.queued_bytes + self.unread >= lim.max_queued_bytes))

    def counters(self) -> dict[str, int | None]:
        """What KERNEL_STATUS reports for this account (what its sockets hold unread now,
        not the estimate)."""
        if self.unread:
            self.recount_unread()
        return {"caps": self.caps, "inflight": self.inflight, "queued_bytes": self.queued_bytes,
                "unread_bytes": self.unread,
                "held_fds": self.held_fds, "max_caps": self.limits.max_caps}
