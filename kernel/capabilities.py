"""Capabilities: the router's ends of capability sockets, the handles they name, and their table.

Every capability a process holds is one end of a SOCK_SEQPACKET pair; the
router holds the other end (a `Capability`) and maps it to a `SchemeHandle`
(anonymous scheme id, handle number, fd flags), which every clone of it
shares. The router recognises its capabilities when they are passed back to it
by the (device, inode) of the holder's end (`CapabilityTable`), so a scheme
can be told that an fd passed with a request is one of its own handles.
"""

from __future__ import annotations

import os
from collections.abc import Iterator
from dataclasses import dataclass
from typing import TYPE_CHECKING

from redoxcap.wire import protocol as P
from redoxcap.wire.linux import identity

if TYPE_CHECKING:
    from redoxcap.kernel.accounts import Account
    from redoxcap.kernel.outbox import Outbox
    from redoxcap.kernel.schemes import Scheme
    from redoxcap.wire.channel import Channel


@dataclass(eq=False, slots=True)
class SchemeHandle:
    """A handle inside a scheme, shared by every capability cloned from it."""

    scheme: Scheme
    number: int
    generation: int
    fdflags: int = 0
    refs: int = 0  # capabilities naming it, and kept states that hold it (Kept.items)
    payer: Account | None = None  # who pays for the state kept for it (None: the system)

    @property
    def current(self) -> bool:
        """Whether the handle is still the scheme's: its root, or one of this generation
        (opened by the daemon that runs now, or kept across restarts: those are moved on
        to each new generation)."""
        return self.number == P.ROOT_HANDLE or self.generation == self.scheme.generation

    @property
    def live(self) -> bool:
        return self.scheme.alive and self.current


@dataclass(eq=False, slots=True)
class Capability:
    """The router's end of one capability socket."""

    channel: Channel
    handle: SchemeHandle
    # st_dev and st_ino of the holder's end (identity()): identifies the cap when it is passed
    # back to us. Both, or a file on another filesystem with the same inode number could pose
    # as it.
    identity: int | None
    # whose bounds its requests count against: its holder's (a client, or the system for
    # anything a daemon holds)
    account: Account
    # who its fd is charged to: its holder, or the client a daemon holds it for
    payer: Account
    inflight: int = 0  # requests forwarded to the scheme and not yet answered
    # replies waiting for the holder's socket to have room; made on first use (most
    # capabilities never need one)
    outbox: Outbox | None = None
    writing: bool = False  # a writer task is draining the outbox
    sending: int = 0  # its requests waiting for their scheme's channel to have room
    # what replies sent into its socket may hold there unread (Account.landed), estimated
    unread: int = 0
    parked: bool = False  # not read for now (backpressure): only its hangup is watched
    closed: bool = False

    def queued(self) -> tuple[int, int]:
        """(bytes, fds) in its outbox."""
        return (self.outbox.bytes, self.outbox.fds) if self.outbox else (0, 0)


@dataclass(eq=False, slots=True)
class ClientRequest:
    """A holder's request in flight at a scheme: the capability to answer, its tag, and
    the caller the scheme was told of (pid, uid, gid: the holder, or whom it serves)."""

    cap: Capability
    tag: int
    cred: tuple[int, int, int]
    req_id: int
    account: int  # the account the scheme was told of: the holder's, or whom it serves
    started: float = 0.0  # when it was forwarded (only while tracing)
    # fds that rode on it, which its daemon holds until it answers: charged to payer till then
    fds: int = 0
    payer: Account | None = None

    def hold_fds(self, payer: Account, n: int) -> None:
        """The daemon holds the n fds that rode on it: payer pays for them until
        `release_fds` (its reply, or its daemon's end)."""
        if n:
            self.fds, self.payer = n, payer
            payer.charge_fds(n)

    def release_fds(self) -> None:
        if self.fds and self.payer is not None:
            self.payer.charge_fds(-self.fds)
            self.fds = 0

    def caller(self) -> tuple[int, int, int] | None:
        return self.cred


class CapabilityTable:
    """Every capability the router holds that a holder could pass back, by identity."""

    __slots__ = ("_by_identity",)

    def __init__(self) -> None:
        self._by_identity: dict[int, Capability] = {}

    def __len__(self) -> int:
        return len(self._by_identity)

    def __iter__(self) -> Iterator[Capability]:
        return iter(self._by_identity.values())

    def add(self, cap: Capability) -> None:
        if cap.identity is not None:
            self._by_identity[cap.identity] = cap

    def remove(self, cap: Capability) -> None:
        if cap.identity is not None:
            self._by_identity.pop(cap.identity, None)

    def of_fd(self, fd: int) -> Capability | None:
        """The capability whose holder's end fd is, if it is one of ours.

        Raises:
            OSError: fstat failed.
        """
        return self._by_identity.get(identity(os.fstat(fd)))

    def refs_for(self, scheme: Scheme, fds: list[int]) -> tuple[int, ...]:
        """For each fd passed to scheme: its handle number if it is a live capability of
        this scheme, FOREIGN_REF for another scheme's, NO_REF for anything else.

        Raises:
            OSError: fstat failed (out of memory).
        """
        refs = []
        for fd in fds:
            cap = self.of_fd(fd)
            if cap is None:
                refs.append(P.NO_REF)
            elif cap.handle.scheme is scheme and cap.handle.live:
                refs.append(cap.handle.number)
            else:
                refs.append(P.FOREIGN_REF)
        return tuple(refs)
