"""The kernel router's routing loop: read, forward, relay, reply.

Every capability a process holds is one end of a SOCK_SEQPACKET pair; the
router holds the other end (kernel/capabilities.py). A request read on it is
forwarded to the owning scheme with the handle and the sender's credentials
(SO_PASSCRED, filled in by Linux) prepended; the scheme's reply is relayed (a
new handle becomes a new capability, fds pass on) and sent back to the holder.
The router slices only the fixed headers (struct): it knows no scheme names
and never looks at a forwarded request's body.

The loop pays once per batch, not per frame: every socket it reads is in one
level-triggered epoll (kernel/handles.py) behind a single trio wait; each pass
reads, without blocking, one request of each ready capability (of a client
account, one of its capabilities: they take turns) and a bounded batch of
each ready scheme's replies. A capability whose outbox is not empty, whose
request waits for a full scheme channel, that has its bound of requests in
flight, or whose account is saturated is not read until it drains: no client
holds up another. Beside the loop, each concern is a module that answers it
with values and decisions while only the loop sends (docs/protocol.md).
"""

from __future__ import annotations

import collections
import errno
import logging
import os
import select
import socket
import time

import trio

from redoxcap.kernel import operations, recovery
from redoxcap.kernel.accounts import CLIENT_LIMITS, SYSTEM_LIMITS, Account, Limits
from redoxcap.kernel.capabilities import Capability, ClientRequest
from redoxcap.kernel.handles import HandleTable
from redoxcap.kernel.outbox import deliver, write_outbox
from redoxcap.kernel.restart import Held, warn_now_and_then
from redoxcap.kernel.schemes import FULL, LOST, SENT, Scheme, Sent, StatusQuery
from redoxcap.kernel.trace import Trace
from redoxcap.wire import protocol as P
from redoxcap.wire.frames import (
    NEW_HANDLE_HDR,
    REPLY,
    REQUEST,
    SERVING,
    SERVING_ID,
    SREPLY,
    SREQUEST,
    Keep,
)
from redoxcap.wire.idle import IdleWait
from redoxcap.wire.ops import MAX_FDS_OF

log = logging.getLogger("kernel")

EVENTS_PER_PASS = 256  # ready sockets taken from the epoll per pass; the rest come first next pass
REPLIES_PER_PASS = 64  # a scheme's replies read per pass: then the others' turn
# the frames all the schemes a client made (NS_SCHEME_CREATE) may give in a pass, together:
# as a client's requests get one turn a pass, its schemes get a few frames, however many
CLIENT_REPLIES_PER_PASS = 8
FDS_PER_TURN = 8  # a scheme's frame with more fds than this ends its channel's turn
HANGUP = select.EPOLLRDHUP | select.EPOLLHUP | select.EPOLLERR
MSG_CTRUNC = int(socket.MSG_CTRUNC)  # a plain int: socket.MSG_* are slow enum flags
EMPTY_ARGS = P.pack([])
NO_CRED = (0, 0, 0)


def close_frame(number: int) -> bytes:
    """The router's CLOSE of handle number, to its scheme's daemon."""
    return SREQUEST.pack(0, number, 0, 0, 0, 0, P.CLOSE, 0) + EMPTY_ARGS

# how soon, and at most how seldom, the sockets of an account saturated by replies left unread
# in them are asked again whether their holders read (Account.recount_unread): nothing the
# loop watches tells, and a stuck client should cost the loop little
UNREAD_RECOUNT_FIRST, UNREAD_RECOUNT_MAX = 0.005, 0.5
EOF = (b"", [], 0, None)


class Router:
    """The routing loop over the router's table; one instance per kernel process.

    Args:
        nursery: where writer, restore and waiting kernel-operation tasks run.
        verbose: log each request the router refuses itself (out of fds, over a quota).
        client_limits: the limits of an account made by ACCOUNT_NEW without arguments.
        system_limits: the limits of the system account.
    """

    def __init__(self, nursery: trio.Nursery, verbose: bool = False,
                 client_limits: Limits = CLIENT_LIMITS, system_limits: Limits = SYSTEM_LIMITS) -> None:
        self._nursery = nursery
        self.start_soon = nursery.start_soon  # for the kernel's operations that wait
        self.verbose = verbose
        self.table = table = HandleTable(client_limits, system_limits)
        # what the kernel's operations read (kernel/operations.py, Kernel)
        self.schemes, self.capabilities, self.accounts = table.schemes, table.capabilities, table.accounts
        self.kernel_scheme, self.system_account = table.kernel_scheme, table.system_account
        self.mint, self.socketpair = table.mint, table.socketpair
        self.new_account, self.summary = table.new_account, table.summary
        self.supervisor_gone = table.supervisor_gone
        self.trace = Trace()
        self.frames = 0
        self._pass = 0
        self._ended: list[Capability] = []  # capabilities read to EOF in this pass (see tidy)
        # per client account, its schemes that had frames when it had none left in a pass:
        # not watched until their turn comes again (_unpark_schemes)
        self._waiting_schemes: dict[Account, collections.deque[Scheme]] = {}
        self._recounting: set[Account] = set()  # accounts a _recount_unread task watches
        nursery.start_soon(self._route)

    @property
    def supervisor_cap(self) -> Capability | None:
        return self.table.supervisor_cap

    def close(self) -> None:
        """Release what the router holds besides its sockets."""
        self.table.close()
        self.trace.close()

    # -- what the kernel's operations use (kernel/operations.py) -----------------

    def attach_channel(self, scheme: Scheme) -> int:
        """Give scheme a fresh request channel; returns the daemon's end. A restarted
        scheme's new daemon gets its kept state first (kernel/recovery.py).

        Raises:
            OSError: the router is out of fds (or memory); scheme is unchanged.
        """
        fd = self.table.attach(scheme)
        if scheme.attached > 1:
            scheme.restart.restoring = True
            self._nursery.start_soon(recovery.restore, self, scheme, scheme.channel)
        return fd

    def free_scheme(self, scheme: Scheme) -> None:
        """No capability names scheme any more: its daemon sees EOF, its cost is given back."""
        self.table.free(scheme)
        self.tidy()

    def request_id(self) -> int:
        """A fresh id for a frame to a daemon (its reply names it)."""
        return next(self.table.request_ids)

    # -- the loop ----------------------------------------------------------------------

    async def _route(self) -> None:
        """Read every ready socket once per pass, without blocking. Between passes the loop
        waits in the router's epoll itself while trio has nothing else to run, else yields
        to trio first (wire/idle.py): a wake-up costs one epoll_wait, not a turn of trio."""
        poller, watched = self.table.poller, self.table.watched
        idle = IdleWait.of(poller)
        try:
            while True:
                if idle is not None:
                    batch = await idle.poll(poller, EVENTS_PER_PASS)
                else:
                    await trio.lowlevel.wait_readable(poller)
                    batch = poller.poll(0, EVENTS_PER_PASS)
                self._pass += 1
                for fd, events in batch:
                    ready = watched.get(fd)
                    if type(ready) is Capability:
                        try:
                            self._read_capability(ready, events)
                        except Exception:
                            log.exception("capability of scheme %d: dropped after an internal error",
                                          ready.handle.scheme.id)
                            self.table.release(ready)
                    elif ready is not None:
                        try:
                            self._read_scheme(ready)
                        except Exception:
                            log.exception("scheme %d: its channel is closed after an internal error", ready.id)
                            self.scheme_died(ready)
                if self._waiting_schemes:
                    self._unpark_schemes()
                self.tidy()
        finally:
            if idle is not None:
                idle.close()

    def _read_capability(self, cap: Capability, events: int) -> None:
        """Read one request of cap if its account's bounds and turn let it."""
        if cap.parked:
            if events & HANGUP:
                self.table.release(cap)  # its requests still unread have no one to answer to
            return
        account = cap.account
        if not account.may_read(cap):
            self.table.park(cap)
            if account.over_unread and account not in self._recounting:
                self._recounting.add(account)
                self._nursery.start_soon(self._recount_unread, account)
            return
        if not account.take_turn(self._pass):
            return  # still ready: it comes first in the next pass
        try:
            received = cap.channel.try_recv(P.CMSG_ALL)
        except OSError:
            received = EOF
        if received is None:
            return
        data, fds, flags, cred = received
        if not data and not fds:
            # EOF: every holder closed it or died. Let go of it once the pass has read the
            # rest: a client that closes one fd and then calls on another (every open+close)
            # has its call forwarded before its close is cleaned up.
            self._ended.append(cap)
            return
        self._on_request(cap, data, flags, fds, cred)

    def _read_scheme(self, scheme: Scheme) -> None:
        """Read a bounded batch of scheme's replies: REPLIES_PER_PASS of a system daemon's,
        as many among every scheme a client pays for (one of its own, made with
        NS_SCHEME_CREATE: a client with hundreds of them, each flooding its channel with
        junk, would take hundreds of turns a pass from the other clients' one)."""
        channel = scheme.channel
        payer = scheme.payer
        if payer is None:
            batch = REPLIES_PER_PASS
        else:
            batch = payer.reply_budget(self._pass, CLIENT_REPLIES_PER_PASS)
            if batch <= 0:
                self._park_scheme(scheme, payer)
                return
        for _ in range(batch):
            if scheme.channel is not channel:
                return  # it died (or was freed) while we relayed
            try:
                received = channel.try_recv(P.CMSG_ALL)
            except OSError:
                received = EOF
            if received is None:
                return
            if payer is not None:
                payer.replies_left -= 1
            data, fds, flags, cred = received
            if not data and not fds:
                self.scheme_died(scheme)
                return
            if cred is not None and cred != scheme.daemon:
                self.schemes.set_daemon(scheme, cred)  # who serves the scheme, as Linux tells us
            try:
                self._on_reply(scheme, data, flags, fds)
            except Exception:
                P.close_fds(fds)
                log.exception("scheme %d: bad reply dropped", scheme.id)
            if len(fds) > FDS_PER_TURN:
                return  # a frame of many fds costs a syscall or two each: others' turn now

    def _park_scheme(self, scheme: Scheme, payer: Account) -> None:
        """Stop watching a client's scheme whose payer has no frames left in this pass: it
        waits, in order, for a later pass (else each of a client's hundreds of flooded
        channels would be an event of every pass)."""
        channel = scheme.channel
        if scheme.waiting or channel is None:
            return
        scheme.waiting = True
        self.table.poller.modify(channel.fileno(), 0)
        self._waiting_schemes.setdefault(payer, collections.deque()).append(scheme)

    def _unpark_schemes(self) -> None:
        """Watch again, at the end of a pass, as many of each account's waiting schemes as
        it has frames a pass (a channel with frames shows at once: level-triggered)."""
        for payer, waiting in list(self._waiting_schemes.items()):
            for _ in range(min(len(waiting), CLIENT_REPLIES_PER_PASS)):
                scheme = waiting.popleft()
                scheme.waiting = False
                if scheme.channel is not None and self.table.watched.get(scheme.channel.fileno()) is scheme:
                    self.table.poller.modify(scheme.channel.fileno(), select.EPOLLIN)
            if not waiting:
                del self._waiting_schemes[payer]

    async def _recount_unread(self, account: Account) -> None:
        """Ask account's sockets, less and less often, what its holders left unread, for as
        long as that keeps it saturated; then read its capabilities again."""
        delay = UNREAD_RECOUNT_FIRST
        try:
            while account.over_unread:
                await trio.sleep(delay)
                account.recount_unread()
                delay = min(delay * 2, UNREAD_RECOUNT_MAX)
            self.table.resume(account.drained())
        finally:
            self._recounting.discard(account)

    def tidy(self) -> None:
        """Tell daemons what the table let go of: CLOSE for handles no capability names,
        EOF on the channels of schemes nothing can reach."""
        table = self.table
        if self._ended:
            ended, self._ended = self._ended, []
            for cap in ended:
                table.release(cap)
        while table.closing or table.freed:
            closing, table.closing = table.closing, []
            for scheme, number in closing:
                if scheme.owed_closes:  # in order, after those that wait already
                    self._owe_close(scheme, number)
                    continue
                sent = scheme.try_send(close_frame(number))
                if sent == FULL:
                    self._owe_close(scheme, number)
                elif sent == LOST:
                    self.scheme_died(scheme)
            freed, table.freed = table.freed, []
            for scheme in freed:
                self.scheme_died(scheme)

    def _owe_close(self, scheme: Scheme, number: int) -> None:
        """Keep the CLOSE of handle number for one task per scheme to send as its channel has
        room, in order: a handle's number, not a task and a frame each (a client's scheme
        that reads nothing made the router keep 50,000 tasks, 211 MB). Each number is of a
        handle that had a capability, so what a scheme is owed is bounded by the
        capabilities its callers could hold (their quotas); how many it is owed tells
        nothing of the scheme, which its callers' closing at once fills (a scheme taken for
        dead past 4,096 let 8 clients kill another's honest service)."""
        scheme.owed_closes.append(number)
        if not scheme.closing and scheme.channel is not None:
            scheme.closing = True
            self._nursery.start_soon(self._send_owed_closes, scheme, scheme.channel)

    async def _send_owed_closes(self, scheme: Scheme, channel: object) -> None:
        try:
            while scheme.owed_closes and scheme.channel is channel:
                if not await self.send_to_scheme(scheme, close_frame(scheme.owed_closes[0]), []):
                    break  # gone: its handles went stale with it, their CLOSEs too
                if scheme.channel is channel and scheme.owed_closes:
                    scheme.owed_closes.popleft()
        finally:
            scheme.closing = False

    def settle(self, cap: Capability) -> None:
        """One of cap's requests was answered (or never will be)."""
        self.table.resume(cap.account.settled(cap))

    # -- requests --------------------------------------------------------------------

    def _on_request(self, cap: Capability, data: bytes, flags: int, fds: list[int], cred) -> None:
        self.frames += 1
        if flags & P.TRUNCATED or len(data) < REQUEST.size:
            P.close_fds(fds)
            tag = REQUEST.unpack_from(data)[1] if len(data) >= REQUEST.size else 0
            # The buffer fits every fd a message can carry, so a control truncation of a
            # whole frame means Linux could not give us the fds: we are out of them.
            whole = len(data) >= REQUEST.size and flags & P.TRUNCATED == MSG_CTRUNC
            self.reply(cap, tag, P.ERR, errno.EMFILE if whole else errno.EINVAL)
            return
        op, tag = REQUEST.unpack_from(data)
        start = REQUEST.size
        serving = for_account = None
        handle = cap.handle
        try:
            if op & SERVING:  # a daemon's request for one it serves: the served one's caller
                if len(data) < REQUEST.size + SERVING_ID.size:
                    raise OSError(errno.EINVAL, "no served request")
                op &= ~SERVING
                (serving,) = SERVING_ID.unpack_from(data, start)
                start += SERVING_ID.size
                cred, for_account = self.schemes.served_caller(serving, cred or NO_CRED)
            if op >= P.FIRST_SCHEME_OP and handle.scheme is self.kernel_scheme:
                raise OSError(errno.EBADF, "the kernel capability is not a scheme's")
            if op >= P.FIRST_SCHEME_OP and not handle.current:
                raise OSError(errno.EIO, "a handle of a dead daemon")
            if fds and op >= P.FIRST_SCHEME_OP and len(fds) > MAX_FDS_OF.get(op, P.MAX_FDS):
                # fds riding on an operation that takes none (a READ of a pipe with the
                # pipe's own ends) would be held by its daemon for as long as it waits
                raise OSError(errno.EINVAL, "more fds than the operation takes")
        except OSError as exc:
            P.close_fds(fds)
            self.reply(cap, tag, P.ERR, exc.errno)
            return
        if op < P.FIRST_SCHEME_OP:
            payer = None
            if serving is not None and cap.account is self.system_account:
                payer = self.table.account(for_account)  # charged to it (see _answer_client)
            try:
                operations.serve(self, cap, op, tag, memoryview(data)[start:], fds, payer)
            finally:
                P.close_fds(fds)
            return
        scheme = handle.scheme
        body = memoryview(data)[start:]
        cred = cred or NO_CRED
        if not scheme.alive or scheme.restart.restoring:
            recovery.hold(self, scheme, Held(cap, tag, cred, op, bytes(body), fds, serving, for_account))
            return
        self.forward(cap, tag, cred, op, body, fds, serving=serving, for_account=for_account)

    def forward(self, cap: Capability, tag: int, cred: tuple[int, int, int], op: int,
                body: bytes | memoryview, fds: list[int], held: Account | None = None,
                serving: int | None = None, for_account: int | None = None) -> None:
        """Send a request on to cap's scheme now, or in a task once its channel has room;
        takes ownership of fds.

        held: the account that paid for its fds while it was held for a restart (it
            already counts as in flight); None for a new request.
        serving: the request this one serves, for the trace.
        for_account: the account of the client it serves (None: cap's own), which
            the scheme is told so that it serves clients in turn.
        """
        handle = cap.handle
        scheme = handle.scheme
        account = cap.account
        counted = held is not None
        if held is not None:
            held.charge_fds(-len(fds))
            if not handle.live:  # closed, or its scheme went down again
                self.settle(cap)
                P.close_fds(fds)
                self.reply(cap, tag, P.ERR, errno.EIO)
                return
        try:
            if fds and not account.room_for_caps(len(fds)):
                # held while the scheme takes them: they count against the quota
                raise OSError(errno.EMFILE, "fds over the account's quota")
            refs = self.capabilities.refs_for(scheme, fds) if fds else ()
            cloned = self._own_copies(fds, refs, account) if P.FOREIGN_REF in refs else 0
        except OSError as exc:
            P.close_fds(fds)
            if counted:
                self.settle(cap)
            self.reply(cap, tag, P.ERR, exc.errno or errno.EIO)
            return
        riding = len(fds) - cloned  # held for it while its daemon has them (clones are paid)
        req_id = self.request_id()
        shown = account.id if for_account is None else for_account
        pid, uid, gid = cred
        header = SREQUEST.pack(req_id, handle.number, pid, uid, gid, shown, op, len(refs))
        frame = [header, b"".join(ref.to_bytes(8, "little") for ref in refs), body] if refs else [header, body]
        waiter = ClientRequest(cap, tag, cred, req_id, shown)
        if self.trace:
            waiter.started = time.monotonic()
            self.trace.call(req_id, serving, pid, uid, scheme.id, handle.number, op, account.id,
                            len(fds), body)
        if not counted:
            account.started(cap)
        scheme.frames += 1
        sent = scheme.try_send(frame, fds)
        if sent == SENT:
            scheme.pending[req_id] = waiter
            if fds:
                waiter.hold_fds(account, riding)
                P.close_fds(fds)
            return
        held = Held(cap, tag, cred, op, bytes(body), fds, serving, for_account)
        if sent == FULL:  # the daemon reads slowly: only this capability waits for it
            account.waits_to_send(cap, riding)
            self._nursery.start_soon(self._forward_when_room, scheme, b"".join(frame), waiter,
                                     held, account, riding)
            return
        self._unsent(scheme, held, sent)

    def _own_copies(self, fds: list[int], refs: tuple[int, ...], payer: Account) -> int:
        """Put in fds, for each capability of another scheme riding on a request (a directory
        for RENAMEAT, a capability passed on to another process or registered in a
        namespace), a clone the daemon holds alone, paid for by payer for as long as it
        does: the caller's own socket would let a client's scheme read the caller's replies
        on it, and the caller read those of a daemon that calls on it (forwarding to a name
        the caller registered).
        A capability of the scheme itself goes as it is: its replies are that scheme's.

        Returns:
            How many were cloned.

        Raises:
            OSError: EMFILE past payer's quota, or what minting raises; the caller closes
                fds (the clones made so far reach EOF).
        """
        cloned = 0
        for i, ref in enumerate(refs):
            if ref != P.FOREIGN_REF:
                continue
            cap = self.capabilities.of_fd(fds[i])
            if cap is None:  # gone since refs_for looked (it was ours a moment ago)
                continue
            clone = self.table.mint(cap.handle, self.system_account, payer)
            os.close(fds[i])
            fds[i] = clone
            cloned += 1
        return cloned

    async def _forward_when_room(self, scheme: Scheme, frame: bytes, waiter: ClientRequest,
                                 held: Held, account: Account, riding: int) -> None:
        """Send a request whose scheme's channel was full, in order behind the others
        (account: where its riding fds are charged, even if the capability moves meanwhile)."""
        sent = await scheme.send(frame, held.fds)
        self.table.resume(account.sent(held.cap, riding))
        if sent == SENT:
            scheme.pending[waiter.req_id] = waiter
            waiter.hold_fds(account, riding)
            P.close_fds(held.fds)
            return
        self._unsent(scheme, held, sent)
        self.tidy()

    def _unsent(self, scheme: Scheme, held: Held, sent: Sent) -> None:
        """The daemon was gone before it could see a request: it waits for the next one."""
        if sent == LOST:
            self.scheme_died(scheme)
        self.settle(held.cap)
        recovery.hold(self, scheme, held)

    async def send_to_scheme(self, scheme: Scheme, frame: bytes, fds: list[int]) -> bool:
        """Send a frame of the router's own to scheme's daemon, waiting for room; False if
        the daemon is gone."""
        sent = await scheme.send(frame, fds)
        if sent == LOST:
            self.scheme_died(scheme)
        return sent == SENT

    # -- replies from schemes -------------------------------------------------------------

    def _on_reply(self, scheme: Scheme, data: bytes, flags: int, fds: list[int]) -> None:
        if len(data) < SREPLY.size:
            P.close_fds(fds)
            warn_now_and_then("scheme %d: reply shorter than its header dropped", scheme.id)
            return
        req_id, status = SREPLY.unpack_from(data)
        if status == P.KEEP or status == P.KEEP_MORE:
            self.table.unref(*scheme.restart.keep(req_id, data, status == P.KEEP, flags & P.TRUNCATED,
                                                  fds, self.capabilities, scheme.handles,
                                                  self.system_account))
            return
        if status == P.HELLO:  # its sender is now known (see _read_scheme)
            P.close_fds(fds)
            return
        start, new = SREPLY.size, None
        if status == P.NEW_HANDLE or status == P.NEW_HANDLE_KEPT:
            if len(data) >= SREPLY.size + NEW_HANDLE_HDR.size:
                new = NEW_HANDLE_HDR.unpack_from(data, start)
                start += NEW_HANDLE_HDR.size
                if status == P.NEW_HANDLE_KEPT:  # its KEEP first, as if it had come just before
                    start, fds = self._keep_carried(scheme, req_id, new[0], data, start, flags, fds)
                    status = P.NEW_HANDLE
            else:
                status = None  # a NEW_HANDLE without its handle
        waiter = scheme.pending.pop(req_id, None)
        if type(waiter) is ClientRequest and waiter.fds:
            waiter.release_fds()  # the daemon is done with what rode on it
        failed = scheme.restart.keep_failed.pop(req_id, None) if scheme.restart.keep_failed else None
        if waiter is None or failed is not None or type(waiter) is StatusQuery:
            # abandoned, never asked, not kept, or the router's own question
            P.close_fds(fds)
            if new is not None:
                self.table.close_unclaimed(scheme, new[0])  # nobody will get a capability for it
            if failed is not None:  # acknowledged only once kept: its state could not be
                status, body = P.ERR, P.pack(failed)
            else:
                body = memoryview(data)[start:]
            if type(waiter) is StatusQuery:
                waiter.answered(status, body)
            elif waiter is not None:
                self._answer_client(scheme, waiter, status, body, 0, [], None)
            return
        self._answer_client(scheme, waiter, status, memoryview(data)[start:], flags, fds, new)

    def _keep_carried(self, scheme: Scheme, req_id: int, number: int, data: bytes, start: int,
                      flags: int, fds: list[int]) -> tuple[int, list[int]]:
        """Take the state a NEW_HANDLE_KEPT reply carries for its new handle (its first fds)
        as a KEEP frame's; returns where the reply's body begins and the fds left to relay.
        A state that cannot be kept fails the reply (RestartState.take)."""
        restart = scheme.restart
        try:
            keep, start = Keep.carried(data, start, req_id, number)
        except P.ProtocolError as exc:
            restart.refuse(req_id, fds, exc)  # which fds were its state is unknown: all go
            return len(data), []
        self.table.unref(*restart.take(keep, True, flags & P.TRUNCATED, fds[: keep.nfds],
                                       self.capabilities, scheme.handles, self.system_account))
        return start, fds[keep.nfds :]

    def _answer_client(self, scheme: Scheme, waiter: ClientRequest, status: int | None,
                       body: memoryview | bytes, flags: int, fds: list[int],
                       new: tuple[int, int] | None) -> None:
        """Relay a scheme's reply (status None: a malformed NEW_HANDLE) to the request's holder."""
        cap, tag = waiter.cap, waiter.tag
        self.settle(cap)
        if self.trace:
            self.trace.reply(waiter.req_id, waiter.started, scheme.id, waiter.cred[0], len(fds),
                             status, body, new[0] if new else 0)
        if flags & P.TRUNCATED:
            P.close_fds(fds)
            if new is not None:
                self.table.close_unclaimed(scheme, new[0])
            warn_now_and_then("scheme %d: truncated reply to tag %d", scheme.id, tag)
            # control truncation alone: Linux could not give us the fds it carried
            self.reply(cap, tag, P.ERR, errno.EMFILE if flags & P.TRUNCATED == MSG_CTRUNC else errno.EIO)
            return
        if status is None:
            P.close_fds(fds)
            warn_now_and_then("scheme %d: NEW_HANDLE reply without a handle", scheme.id)
            self.reply(cap, tag, P.ERR, errno.EIO)  # the caller must not hang
            return
        if not fds and new is None:
            self._deliver(cap, [REPLY.pack(tag, status), body], fds)
            return
        # a daemon's request for a client (an open of a client's path through its
        # namespace): what it gets is held by the daemon and charged to the client. Only a
        # system daemon's: a client's own daemon serving another must not spend its quota.
        # Past payer's quota, or with the router out of fds, the reply becomes ERR.
        payer = (cap.account if waiter.account == cap.account.id or cap.account is not self.system_account
                 else self.table.account(waiter.account))
        try:
            self.table.relay_fds(scheme, cap.account, fds, new, payer)
        except OSError as exc:
            P.close_fds(fds)  # capabilities among them reach EOF unless someone else holds them
            if new is not None:
                self.table.close_unclaimed(scheme, new[0])
            self.reply(cap, tag, P.ERR, exc.errno or errno.EIO)
            return
        self._deliver(cap, [REPLY.pack(tag, P.OK if new is not None else status), body], fds)

    # -- replies to holders: never wait ------------------------------------------------

    def reply(self, cap: Capability, tag: int, status: int, value, fds: list[int] | None = None) -> None:
        """Answer a request on cap the router answers itself; takes ownership of fds."""
        if status == P.ERR and self.verbose:
            log.info("tag %d refused: %s", tag, errno.errorcode.get(value, value))
        self._deliver(cap, REPLY.pack(tag, status) + P.pack(value), fds or [])

    def _deliver(self, cap: Capability, frame: bytes | list, fds: list[int]) -> None:
        """Send frame to cap's holder now or queue it (kernel/outbox.py); never waits."""
        if deliver(cap, frame, fds):
            self._nursery.start_soon(self._write_outbox, cap)

    async def _write_outbox(self, cap: Capability) -> None:
        await write_outbox(cap, self.table)
        self.tidy()  # it may have let go of cap

    # -- daemons that die ----------------------------------------------------------------

    def scheme_died(self, scheme: Scheme) -> None:
        """scheme's daemon is gone (or it was freed): what was in flight there fails, and
        requests wait for its next daemon if one may come (kernel/recovery.py)."""
        if recovery.fail_in_flight(self, scheme):
            self._nursery.start_soon(recovery.give_up_waiting, self, scheme, scheme.generation)

