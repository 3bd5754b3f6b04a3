"""The handle table: what the router holds, for whom, and when each thing goes.

The capabilities (the router's ends of capability sockets), the scheme handles
they name, the schemes and the accounts they are charged to, and the poller
(one level-triggered epoll) that watches every socket the routing loop reads.
Its methods mint and release capabilities and free what nothing names any
more; they never send: a handle whose last capability went is put on
`closing` and a scheme nothing can reach on `freed`, and the routing loop
(kernel/router.py) tells the daemons.
"""

from __future__ import annotations

import _socket
import errno
import itertools
import logging
import os
import resource
import select
import socket
from collections.abc import Iterable

import trio

from redoxcap.kernel.accounts import SYSTEM_ACCOUNT_ID, Account, FdPool, Limits, reserve_for
from redoxcap.kernel.capabilities import Capability, CapabilityTable, ClientRequest, SchemeHandle
from redoxcap.kernel.schemes import Scheme, SchemeTable, StatusQuery
from redoxcap.wire import protocol as P
from redoxcap.wire.channel import Channel
from redoxcap.wire.linux import identity

log = logging.getLogger("kernel")

KERNEL_SCHEME_ID = 0  # pseudo-scheme answering SCHEME_CREATE and friends
READING = select.EPOLLIN | select.EPOLLRDHUP
PARKED = select.EPOLLRDHUP  # a parked capability is not read, but its hangup is seen


class HandleTable:
    """Every capability, handle, scheme and account the router holds.

    Args:
        client_limits: the limits of an account made by ACCOUNT_NEW without arguments.
        system_limits: the limits of the system account.
    """

    def __init__(self, client_limits: Limits, system_limits: Limits) -> None:
        self.schemes = SchemeTable()
        self.capabilities = CapabilityTable()
        self.client_limits = client_limits
        self._account_ids = itertools.count(SYSTEM_ACCOUNT_ID + 1)
        # every account that still holds a capability or has a request in flight
        self.accounts: dict[int, Account] = {}
        self.system_account = Account(SYSTEM_ACCOUNT_ID, system_limits, listed=self.accounts)
        self.accounts[SYSTEM_ACCOUNT_ID] = self.system_account
        # what client accounts may hold together: the fd limit less the system's reserve
        self.fd_limit = resource.getrlimit(resource.RLIMIT_NOFILE)[0]
        self.reserve = reserve_for(self.fd_limit)
        self.client_pool = FdPool(self.fd_limit - self.reserve)
        self.kernel_scheme = Scheme(KERNEL_SCHEME_ID, alive=True)
        self.kernel_handle = SchemeHandle(self.kernel_scheme, P.ROOT_HANDLE, 0)
        self.supervisor_cap: Capability | None = None
        self.supervisor_gone = trio.Event()  # its kernel capability closed: the router ends
        self.request_ids = itertools.count(1)  # the router's ids of requests sent to daemons
        self.poller = select.epoll()
        self.watched: dict[int, Capability | Scheme] = {}  # fd -> what the loop reads there
        self.closing: list[tuple[Scheme, int]] = []  # handles whose daemon must hear CLOSE
        self.freed: list[Scheme] = []  # schemes nothing names any more: their channels close
        self._starved = False  # the last socketpair failed (logged once per episode)

    def close(self) -> None:
        self.poller.close()

    # -- making ------------------------------------------------------------------------

    def socketpair(self) -> tuple[_socket.socket, _socket.socket]:
        """A SEQPACKET pair (close-on-exec); says once in the log when the router runs out of
        fds. Plain _socket objects: socket.socketpair wraps each in a socket.socket, which
        was an eighth of the router's time for an open.

        Raises:
            OSError: EMFILE, ENFILE, ENOMEM...: the one request that needed it fails.
        """
        try:
            pair = _socket.socketpair(_socket.AF_UNIX, _socket.SOCK_SEQPACKET | _socket.SOCK_CLOEXEC)
        except OSError as exc:
            if not self._starved:
                log.warning("out of fds (%s): failing requests that need one until some close", exc)
            self._starved = True
            raise
        self._starved = False
        return pair

    def mint(self, handle: SchemeHandle, account: Account, payer: Account | None = None,
             force: bool = False) -> int:
        """Create a capability for handle, held under account's bounds and charged to payer
        (account itself by default; the client a daemon holds it for).

        force: charge payer even past its quota (a restore gives back what it held).

        Returns:
            The holder's end; the caller owns it.

        Raises:
            OSError: EMFILE if payer is at its quota; whatever socketpair or fstat
                raise when the router is out of fds or memory (EMFILE, ENFILE, ENOMEM...).
        """
        payer = payer or account
        if not force and not payer.room_for_caps(1):
            raise OSError(errno.EMFILE, "capability quota of the account exceeded")
        ours, theirs = self.socketpair()
        try:
            ours.setsockopt(socket.SOL_SOCKET, socket.SO_PASSCRED, 1)
            st = os.fstat(theirs.fileno())
            self.start_capability(Channel(ours), handle, identity(st), account, payer)
        except BaseException:
            ours.close()
            theirs.close()
            raise
        return theirs.detach()

    def start_capability(self, channel: Channel, handle: SchemeHandle, identity: int | None,
                         account: Account, payer: Account | None = None) -> Capability:
        """Hold channel as a capability for handle from now on, and watch it."""
        cap = Capability(channel, handle, identity, account, payer or account)
        self.poller.register(channel.fileno(), READING)
        self.watched[channel.fileno()] = cap
        handle.refs += 1
        cap.payer.charge_caps(1)
        self.capabilities.add(cap)
        return cap

    def adopt_supervisor(self, fd: int) -> None:
        """Hold an inherited socket as the supervisor's kernel capability: the router runs
        until it closes (clones of it, held by trusted daemons, do not keep it up)."""
        channel = Channel.from_fd(fd)
        channel.sock.setsockopt(socket.SOL_SOCKET, socket.SO_PASSCRED, 1)
        self.supervisor_cap = self.start_capability(channel, self.kernel_handle, None,
                                                    self.system_account)

    def new_account(self, overrides: dict) -> Account:
        """A fresh client account: the default limits with overrides (ACCOUNT_NEW's)."""
        return Account(next(self._account_ids), self.client_limits.overridden(overrides),
                       pool=self.client_pool, listed=self.accounts)

    def account(self, account_id: int) -> Account:
        """The account of that id (the system's if it is gone)."""
        return self.accounts.get(account_id, self.system_account)

    def summary(self) -> dict:
        """The router's totals, for KERNEL_STATUS."""
        return {"schemes": len(self.schemes.by_id), "accounts": len(self.accounts),
                "capabilities": len(self.capabilities), "fd_limit": self.fd_limit,
                "reserve": self.reserve, "client_fds": self.client_pool.used,
                "client_fd_limit": self.client_pool.limit}

    def attach(self, scheme: Scheme) -> int:
        """Give scheme a fresh request channel, watched; returns the daemon's end.

        Raises:
            OSError: the router is out of fds (or memory); scheme is unchanged.
        """
        ours, theirs = self.socketpair()
        ours.setsockopt(socket.SOL_SOCKET, socket.SO_PASSCRED, 1)  # the daemon's pid on its frames
        scheme.channel = Channel(ours)
        self.poller.register(ours.fileno(), select.EPOLLIN)
        self.watched[ours.fileno()] = scheme
        (scheme.payer or self.system_account).charge_fds(1)  # our end, for as long as it is open
        self.schemes.set_daemon(scheme, None)
        scheme.attached += 1
        scheme.next_generation()
        scheme.alive = True
        scheme.died = trio.Event()
        scheme.restart.waiting = False
        return theirs.detach()

    # -- reading or not ----------------------------------------------------------------

    def park(self, cap: Capability) -> None:
        """Stop reading cap's requests for now; its hangup is still seen."""
        if not cap.parked and not cap.closed:
            cap.parked = True
            self.poller.modify(cap.channel.fileno(), PARKED)

    def resume(self, caps: Iterable[Capability]) -> None:
        """Read these parked capabilities again (requests they have waiting show at once:
        the poller is level-triggered)."""
        for cap in caps:
            if cap.parked and not cap.closed:
                cap.parked = False
                self.poller.modify(cap.channel.fileno(), READING)

    def _unwatch(self, channel: Channel) -> None:
        """Stop watching a socket, before it is closed (its number may come back)."""
        fd = channel.fileno()
        if fd >= 0 and self.watched.pop(fd, None) is not None:
            self.poller.unregister(fd)

    def move(self, cap: Capability, account: Account, payer: Account) -> None:
        """Count cap, and what it has in flight and queued, against account from now on,
        and charge its fd (and the fds queued for it) to payer."""
        queued_bytes, queued_fds = cap.queued()
        if cap.payer is not payer:
            old_payer, cap.payer = cap.payer, payer
            payer.charge_caps(1)
            payer.charge_fds(queued_fds)
            old_payer.charge_caps(-1)
            old_payer.charge_fds(-queued_fds)
        old = cap.account
        if old is not account:
            cap.account = account
            self.resume((*account.take_over(cap, old, queued_bytes), cap))

    def relay_fds(self, scheme: Scheme, account: Account, fds: list[int],
                  new: tuple[int, int] | None, payer: Account) -> None:
        """Take in what a scheme's reply passes to a holder in account: capabilities among
        fds count against account from now on and are charged to payer, and a new handle
        (number, fd flags) becomes a capability, put first in fds, with any state kept for it.

        Raises:
            OSError: EMFILE past payer's quota, or what minting raises (ENFILE...); nothing
                was taken in (the caller closes fds and the new handle).
        """
        passed = [self.capabilities.of_fd(fd) for fd in fds]
        # A client's capability relayed to another account is cloned for it, not moved: the
        # client still holds the socket it passed (SCM_RIGHTS copies it), and what it does
        # on it must stay its own to pay for, not the receiver's (a victim it handed it to)
        # nor the system account's (which has no bounds). The system's capabilities move (a
        # daemon hands a client what it opened for it, and keeps no copy).
        cloned = [i for i, c in enumerate(passed)
                  if c is not None and c.account is not account and not c.account.system]
        moving = {id(c): c for i, c in enumerate(passed) if c is not None and i not in cloned
                  and (c.account is not account or c.payer is not payer)}
        kept_fds = scheme.restart.provisional_fds(new[0]) if new is not None else 0
        charged = sum(1 for c in moving.values() if c.payer is not payer) + len(cloned)
        if not payer.room_for_caps(charged + (new is not None) + kept_fds):
            raise OSError(errno.EMFILE, "capability quota of the account exceeded")
        for i in cloned:  # on an error, the caller closes fds: clones made so far reach EOF
            clone = self.mint(passed[i].handle, account, payer)  # type: ignore[union-attr]
            os.close(fds[i])
            fds[i] = clone
        if new is not None:
            number, fdflags = new
            handle = scheme.handles.get(number)
            if handle is None:
                handle = SchemeHandle(scheme, number, scheme.generation, fdflags,
                                      payer=None if payer is self.system_account else payer)
                scheme.handles[number] = handle
            fds.insert(0, self.mint(handle, account, payer))
            scheme.restart.top = max(scheme.restart.top, number)
            self.unref(*scheme.restart.confirm(number, payer))  # its state came just before
        for moved in moving.values():
            self.move(moved, account, payer)

    # -- letting go --------------------------------------------------------------------

    def release(self, cap: Capability) -> None:
        """cap's holder is gone (EOF, hangup, or an internal error): let go of it."""
        if cap.closed:
            return
        cap.closed = True
        self._unwatch(cap.channel)
        cap.channel.close()
        cap.account.blocked.discard(cap)
        if cap.unread:
            cap.account.forget_unread(cap)
        if cap.outbox:
            cap.outbox.drop(cap.account, cap.payer)
        self.resume(cap.account.drained())
        cap.payer.charge_caps(-1)
        if cap is self.supervisor_cap:
            self.supervisor_gone.set()  # clones given to trusted daemons do not keep us up
        self.capabilities.remove(cap)
        self.unref(cap.handle)

    def unref(self, *handles: SchemeHandle) -> None:
        """Capabilities (or kept states) that named handles are gone. At a handle's last one
        the scheme is to close it, and a scheme left without any handle is freed."""
        for handle in handles:
            handle.refs -= 1
            if handle.refs:
                continue
            scheme = handle.scheme
            if scheme is self.kernel_scheme:
                continue
            was_live = handle.live
            if scheme.handles.get(handle.number) is handle:  # not a stale one whose number came back
                del scheme.handles[handle.number]
                if handle.number != P.ROOT_HANDLE:
                    self.unref(*scheme.restart.forget(handle.number))
            if was_live and handle.number != P.ROOT_HANDLE:
                self.closing.append((scheme, handle.number))
            if not scheme.handles:
                self.free(scheme)

    def close_unclaimed(self, scheme: Scheme, number: int) -> None:
        """A scheme opened handle number but no capability came of it: it is to close it."""
        handle = scheme.handles.get(number)
        if handle is not None and handle.refs:
            return  # capabilities hold it; the last one's EOF sends CLOSE
        scheme.handles.pop(number, None)
        if number != P.ROOT_HANDLE:
            self.unref(*scheme.restart.forget(number))
            if scheme.alive:
                self.closing.append((scheme, number))
        if not scheme.handles:
            self.free(scheme)

    def free(self, scheme: Scheme) -> None:
        """No capability names scheme any more, so no request can reach it: forget it, with
        all it cost its creator; its channel is to close (its daemon sees EOF)."""
        if scheme.freed or scheme is self.kernel_scheme:
            return
        scheme.freed = True
        self.schemes.remove(scheme)
        self.unref(*scheme.restart.forget_all())
        self.freed.append(scheme)

    def scheme_died(self, scheme: Scheme) -> list[ClientRequest | StatusQuery]:
        """scheme's daemon is gone (or its channel is to close): close its channel; its
        handles but the root and the kept ones go stale.

        Returns:
            The requests that were in flight there: the loop answers them.
        """
        if not scheme.alive:
            return []
        if scheme.pending and not scheme.freed:
            log.warning("scheme %d: daemon gone; failing %d pending requests", scheme.id, len(scheme.pending))
        scheme.alive = False
        scheme.died.set()
        if scheme.channel is not None:
            self._unwatch(scheme.channel)
            scheme.channel.close()
            scheme.channel = None
            (scheme.payer or self.system_account).charge_fds(-1)
        self.schemes.set_daemon(scheme, None)
        scheme.owed_closes.clear()  # its handles but the kept ones go stale: closed for it
        self.unref(*scheme.restart.died())
        scheme.next_generation()
        # the root and the kept handles live on in the next daemon; the rest go stale
        scheme.handles = {n: h for n, h in scheme.handles.items() if h.current}
        pending, scheme.pending = scheme.pending, {}
        return list(pending.values())
