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

from dataclasses import dataclass, field, fields, replace
from typing import Any

# Defaults for a client account; `python -m kernel` options override them.
MAX_CAPS_PER_ACCOUNT = 1024  # capabilities one client may hold (each costs the router an fd)
MAX_INFLIGHT_PER_ACCOUNT = 64  # requests of one client waiting for a scheme's reply
MAX_INFLIGHT_PER_CAP = 16  # requests on one capability waiting for a scheme's reply
MAX_QUEUED_BYTES_PER_ACCOUNT = 16 * 1024 * 1024  # replies queued for sockets the client does not read
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


@dataclass(eq=False)
class Account:
    """The capabilities, in-flight requests and queued reply bytes charged to one client."""

    id: int
    limits: Limits
    caps: int = 0
    inflight: int = 0
    queued_bytes: int = 0
    # fds the router holds for it besides its capabilities' sockets: in queued replies and
    # in requests being forwarded; they count against max_caps, which bounds the router's fds
    held_fds: int = 0
    # readers of this account's capabilities parked until it drains (any object with wake())
    blocked: set = field(default_factory=set)
    # the fds every client account shares (None for the system account: it has the reserve)
    pool: FdPool | None = None
    # the router's lock for a client account's turns: one request of the account at a time,
    # however many of its capabilities have requests waiting (made on first use)
    turn: Any = None

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

    def charge_fds(self, n: int) -> None:
        """n more fds besides capabilities (queued, in flight, kept) are held for it."""
        self.held_fds += n
        if self.pool is not None:
            self.pool.used += n

    @property
    def saturated(self) -> bool:
        """Too much in flight or queued: stop reading this account's requests."""
        lim = self.limits
        return ((lim.max_inflight is not None and self.inflight >= lim.max_inflight)
                or (lim.max_queued_bytes is not None and self.queued_bytes >= lim.max_queued_bytes))

    def wake_if_drained(self) -> None:
        """Let this account's parked readers read again once it is below its limits."""
        if self.blocked and not self.saturated:
            blocked, self.blocked = self.blocked, set()
            for reader in blocked:
                reader.wake()

    def counters(self) -> dict[str, int | None]:
        """What KERNEL_STATUS reports for this account."""
        return {"caps": self.caps, "inflight": self.inflight, "queued_bytes": self.queued_bytes,
                "held_fds": self.held_fds, "max_caps": self.limits.max_caps}
