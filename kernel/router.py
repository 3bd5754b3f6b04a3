"""The kernel router: a blind switch between capability sockets and schemes.

Every capability a process holds is one end of a SOCK_SEQPACKET pair; the
router holds the other end (kernel/capabilities.py). The routing loop is this
module: a frame that arrives on a capability socket is read, forwarded to the
owning scheme with the handle and the sender's credentials (SO_PASSCRED,
filled in by Linux) prepended, the scheme's reply is relayed (a new handle
becomes a new capability, fds pass on) and sent back to the holder. The router
decodes only the fixed headers (sliced with struct): it knows no scheme names
and never looks at a forwarded request's body.

The loop pays once per batch, not per frame: every socket it reads is in one
level-triggered epoll (kernel/handles.py), behind a single trio wait; each pass
reads, without blocking, one request of each ready capability (one per client
account: its capabilities take turns) and a bounded batch of replies of each
ready scheme, then yields to the other tasks.

Beside the loop, each concern has a module that owns its state and answers the
loop with values and decisions, while only the loop sends: the table of what
the router holds (handles.py), capabilities (capabilities.py), accounts and
their bounds (accounts.py), replies a holder has no room for (outbox.py),
schemes (schemes.py), what survives their restarts (restart.py) and how a
new daemon gets it back (recovery.py), the trace (trace.py), status pages
(status.py) and the kernel's own operations (operations.py).

No loop that serves several clients waits on one of them: a reply is sent
without waiting or queued; a capability whose outbox is not empty, whose
request waits for a full scheme channel, that has its bound of requests in
flight, or whose account has too much in flight or queued is not read until
it drains. Running out of fds (or memory for one) fails the one request with
that errno; the router keeps serving.
"""

from __future__ import annotations

import errno
import itertools
import logging
import select
import socket
import time

import trio

from kernel import recovery
from kernel.accounts import CLIENT_LIMITS, SYSTEM_LIMITS, Account, Limits
from kernel.capabilities import Capability, ClientRequest, SchemeHandle
from kernel.handles import HandleTable
from kernel.operations import OPERATIONS, KernelOp
from kernel.outbox import Outbox, error_reply, send_now
from kernel.restart import Held
from kernel.schemes import Scheme, StatusQuery
from kernel.status import STATUS_TIMEOUT
from kernel.trace import Trace
from wire import protocol as P
from wire.channel import Channel
from wire.frames import NEW_HANDLE_HDR, REPLY, REQUEST, SERVING, SERVING_ID, SREPLY, SREQUEST

log = logging.getLogger("kernel")

EVENTS_PER_PASS = 256  # ready sockets taken from the epoll per pass; the rest come first next pass
REPLIES_PER_PASS = 64  # a scheme's replies read per pass: then the others' turn
FDS_PER_TURN = 8  # a scheme's frame with more fds than this ends its channel's turn
HANGUP = select.EPOLLRDHUP | select.EPOLLHUP | select.EPOLLERR
MSG_CTRUNC = int(socket.MSG_CTRUNC)  # a plain int: socket.MSG_* are slow enum flags
EMPTY_ARGS = P.pack([])
NO_CRED = (0, 0, 0)
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
        self.verbose = verbose
        self.table = table = HandleTable(client_limits, system_limits)
        # what the kernel's operations read (kernel/operations.py, Kernel)
        self.schemes, self.capabilities, self.accounts = table.schemes, table.capabilities, table.accounts
        self.kernel_scheme, self.system_account = table.kernel_scheme, table.system_account
        self.mint, self.socketpair = table.mint, table.socketpair
        self.new_account, self.summary = table.new_account, table.summary
        self.trace = Trace()
        self.frames = 0
        self.supervisor_gone = trio.Event()
        self._req_ids = itertools.count(1)
        self._pass = 0
        nursery.start_soon(self._route)

    @property
    def supervisor_cap(self) -> Capability | None:
        return self.table.supervisor_cap

    def close(self) -> None:
        """Release what the router holds besides its sockets."""
        self.table.close()
        self.trace.close()

    # -- what the kernel's operations use (kernel/operations.py) -----------------

    def adopt_kernel_capability(self, fd: int) -> None:
        """Serve an inherited socket as the supervisor's kernel capability.

        The router runs until it closes; clones of it (held by trusted daemons) do not
        keep the router up once the supervisor is gone.
        """
        channel = Channel.from_fd(fd)
        channel.sock.setsockopt(socket.SOL_SOCKET, socket.SO_PASSCRED, 1)
        self.table.supervisor_cap = self.table.start_capability(
            channel, self.table.kernel_handle, None, self.system_account)

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

    async def ask_status(self, scheme: Scheme, into: dict) -> None:
        """Ask scheme's daemon SCHEME_STATUS and put its answer (a map) into into."""
        send, recv = trio.open_memory_channel(1)
        req_id = next(self._req_ids)
        scheme.pending[req_id] = StatusQuery(send)
        frame = SREQUEST.pack(req_id, P.ROOT_HANDLE, 0, 0, 0, 0, P.SCHEME_STATUS, 0) + EMPTY_ARGS
        with trio.move_on_after(STATUS_TIMEOUT):
            await self.send_to_scheme(scheme, frame, [])
            try:
                status, value = await recv.receive()
            except trio.EndOfChannel:
                status, value = P.ERR, None  # the daemon died meanwhile
            if status == P.OK and isinstance(value, dict):
                into.update(value)
        scheme.pending.pop(req_id, None)

    # -- the loop ----------------------------------------------------------------------

    async def _route(self) -> None:
        """Read every ready socket once per pass, without blocking, and yield once."""
        poller, watched = self.table.poller, self.table.watched
        while True:
            await trio.lowlevel.wait_readable(poller)
            self._pass += 1
            for fd, events in poller.poll(0, EVENTS_PER_PASS):
                ready = watched.get(fd)
                if type(ready) is Capability:
                    try:
                        self._read_capability(ready, events)
                    except Exception:
                        log.exception("capability of scheme %d: dropped after an internal error",
                                      ready.handle.scheme.id)
                        self._release(ready)
                elif ready is not None:
                    self._read_scheme(ready)
            self.tidy()

    def _read_capability(self, cap: Capability, events: int) -> None:
        """Read one request of cap if its account's bounds and turn let it."""
        if cap.parked:
            if events & HANGUP:
                self._release(cap)  # its requests still unread have no one to answer to
            return
        account = cap.account
        if not account.may_read(cap):
            self.table.park(cap)
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
            self._release(cap)  # EOF: every holder closed it or died
            return
        self._on_request(cap, data, flags, fds, cred)

    def _read_scheme(self, scheme: Scheme) -> None:
        """Read a bounded batch of scheme's replies."""
        channel = scheme.channel
        for _ in range(REPLIES_PER_PASS):
            if scheme.channel is not channel:
                return  # it died (or was freed) while we relayed
            try:
                received = channel.try_recv(P.CMSG_ALL)
            except OSError:
                received = EOF
            if received is None:
                return
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

    def tidy(self) -> None:
        """Tell daemons what the table let go of: CLOSE for handles no capability names,
        EOF on the channels of schemes nothing can reach."""
        table = self.table
        while table.closing or table.freed:
            closing, table.closing = table.closing, []
            for scheme, number in closing:
                self._post(scheme, SREQUEST.pack(0, number, 0, 0, 0, 0, P.CLOSE, 0) + EMPTY_ARGS)
            freed, table.freed = table.freed, []
            for scheme in freed:
                self.scheme_died(scheme)

    def _release(self, cap: Capability) -> None:
        """cap's holder is gone (EOF, hangup, or an internal error): let go of it."""
        self.table.release(cap)
        if cap is self.table.supervisor_cap:
            self.supervisor_gone.set()  # clones given to trusted daemons do not keep us up

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
        except OSError as exc:
            P.close_fds(fds)
            self.reply(cap, tag, P.ERR, exc.errno)
            return
        if op < P.FIRST_SCHEME_OP:
            payer = None
            if serving is not None and cap.account is self.system_account:
                payer = self.table.account(for_account)  # charged to it (see _answer_client)
            try:
                self._kernel_op(cap, op, tag, memoryview(data)[start:], fds, payer)
            finally:
                P.close_fds(fds)
            return
        scheme = handle.scheme
        body = memoryview(data)[start:]
        cred = cred or NO_CRED
        if not scheme.alive or scheme.restart.restoring:
            self.hold_for_restart(scheme, Held(cap, tag, cred, op, bytes(body), fds, serving, for_account))
            return
        self.forward(cap, tag, cred, op, body, fds, serving=serving, for_account=for_account)

    def _kernel_op(self, cap: Capability, op: int, tag: int, body: memoryview, fds: list[int],
                   payer: Account | None) -> None:
        """Answer an operation of the router's own (kernel/operations.py); fds stay the caller's."""
        kop = OPERATIONS.get(op)
        if (kop is None or (kop.kernel_only and cap.handle.scheme is not self.kernel_scheme)
                or (kop.supervisor_only and cap is not self.table.supervisor_cap)):
            self.reply(cap, tag, P.ERR, errno.EINVAL)
        elif kop.waits:
            self._nursery.start_soon(self._answer_kernel_op, kop, cap, tag, bytes(body), payer)
        else:
            self._answer(cap, tag, kop.run, body, fds, payer)

    async def _answer_kernel_op(self, kop: KernelOp, cap: Capability, tag: int, body: bytes,
                                payer: Account | None) -> None:
        """Answer an operation of the router's own that may wait, in a task of its own."""
        try:
            value, reply_fds = await kop.run(self, cap, body, [], payer)
        except P.ProtocolError:
            self.reply(cap, tag, P.ERR, errno.EINVAL)
        except OSError as exc:
            self._refuse(cap, tag, exc)
        else:
            self.reply(cap, tag, P.OK, value, reply_fds)
        self.tidy()

    def _answer(self, cap: Capability, tag: int, run, body: memoryview, fds: list[int],
                payer: Account | None) -> None:
        try:
            value, reply_fds = run(self, cap, body, fds, payer)
        except P.ProtocolError:
            self.reply(cap, tag, P.ERR, errno.EINVAL)
        except OSError as exc:
            self._refuse(cap, tag, exc)
        else:
            self.reply(cap, tag, P.OK, value, reply_fds)

    def hold_for_restart(self, scheme: Scheme, held: Held) -> None:
        """Hold a request for the next daemon of scheme (EIO if none is expected)."""
        cap = held.cap
        if not scheme.restart.hold(held):
            P.close_fds(held.fds)
            self.reply(cap, held.tag, P.ERR, errno.EIO)
            return
        cap.account.started(cap)  # it waits like a request at the scheme, within the same bounds
        cap.account.charge_fds(len(held.fds))

    def forward(self, cap: Capability, tag: int, cred: tuple[int, int, int], op: int,
                body: bytes | memoryview, fds: list[int], counted: bool = False,
                serving: int | None = None, for_account: int | None = None) -> None:
        """Send a request on to cap's scheme now, or in a task once its channel has room;
        takes ownership of fds.

        counted: the request already counts as in flight (it was held for a restart).
        serving: the request this one serves, for the trace.
        for_account: the account of the client it serves (None: cap's own), which
            the scheme is told so that it serves clients in turn.
        """
        handle = cap.handle
        scheme = handle.scheme
        account = cap.account
        if counted:
            account.charge_fds(-len(fds))
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
        except OSError as exc:
            P.close_fds(fds)
            if counted:
                self.settle(cap)
            self.reply(cap, tag, P.ERR, exc.errno or errno.EIO)
            return
        req_id = next(self._req_ids)
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
        channel = scheme.channel
        try:
            sent = channel is not None and channel.try_send(frame, fds)
        except OSError as exc:
            self._lost(scheme, channel, exc)
            sent = False
        if sent:
            scheme.pending[req_id] = waiter
            P.close_fds(fds)
            return
        held = Held(cap, tag, cred, op, bytes(body), fds, serving, for_account)
        if scheme.channel is channel and channel is not None:  # full: the daemon reads slowly
            cap.sending += 1  # this capability waits for it; the account's others go on
            account.charge_fds(len(fds))  # held while it waits: they count against the quota
            self._nursery.start_soon(self._forward_when_room, scheme, b"".join(frame), waiter, held)
            return
        # the daemon was gone before it could have seen this request: it waits for the next
        # one like the requests that come while the scheme is down
        self.settle(cap)
        self.hold_for_restart(scheme, held)

    async def _forward_when_room(self, scheme: Scheme, frame: bytes, waiter: ClientRequest,
                                 held: Held) -> None:
        """Send a request whose scheme's channel was full, in order behind the others."""
        cap, account = held.cap, held.cap.account
        try:
            sent = await self.send_to_scheme(scheme, frame, held.fds)
            if sent:
                scheme.pending[waiter.req_id] = waiter
        finally:
            account.charge_fds(-len(held.fds))
            cap.sending -= 1
            self.table.resume((cap,))
        if sent:
            P.close_fds(held.fds)
        else:
            self.settle(cap)
            self.hold_for_restart(scheme, held)
        self.tidy()

    def _post(self, scheme: Scheme, frame: bytes) -> None:
        """Send a frame of the router's own to scheme's daemon now, or in a task if it is full."""
        channel = scheme.channel
        if channel is None:
            return
        try:
            if channel.try_send(frame):
                return
        except OSError as exc:
            self._lost(scheme, channel, exc)
            return
        self._nursery.start_soon(self.send_to_scheme, scheme, frame, [])

    async def send_to_scheme(self, scheme: Scheme, frame: bytes, fds: list[int]) -> bool:
        """Send a frame to scheme's daemon, waiting for room; False if it died first."""
        channel = scheme.channel
        if channel is None:
            return False
        try:
            await channel.send(frame, fds)
            return True
        except (OSError, trio.ClosedResourceError) as exc:
            self._lost(scheme, channel, exc)
            return False

    def _lost(self, scheme: Scheme, channel: Channel | None, exc: Exception) -> None:
        """A send to scheme's daemon failed: it is gone (unless it is already another's)."""
        if scheme.channel is channel:
            log.warning("scheme %d: send failed: %s", scheme.id, exc)
            self.scheme_died(scheme)

    # -- replies from schemes -------------------------------------------------------------

    def _on_reply(self, scheme: Scheme, data: bytes, flags: int, fds: list[int]) -> None:
        if len(data) < SREPLY.size:
            P.close_fds(fds)
            log.warning("scheme %d: reply shorter than its header dropped", scheme.id)
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
        if status == P.NEW_HANDLE:
            if len(data) >= SREPLY.size + NEW_HANDLE_HDR.size:
                new = NEW_HANDLE_HDR.unpack_from(data, start)
                start += NEW_HANDLE_HDR.size
            else:
                status = None  # a NEW_HANDLE without its handle
        waiter = scheme.pending.pop(req_id, None)
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
                try:
                    answer = (status, P.unpack(body)) if status is not None else (P.ERR, errno.EIO)
                except P.ProtocolError:
                    answer = (P.ERR, errno.EIO)
                waiter.answered(*answer)
            elif waiter is not None:
                self._answer_client(scheme, waiter, status, body, 0, [], None)
            return
        self._answer_client(scheme, waiter, status, memoryview(data)[start:], flags, fds, new)

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
            log.warning("scheme %d: truncated reply to tag %d", scheme.id, tag)
            # control truncation alone: Linux could not give us the fds it carried
            self.reply(cap, tag, P.ERR, errno.EMFILE if flags & P.TRUNCATED == MSG_CTRUNC else errno.EIO)
            return
        if status is None:
            P.close_fds(fds)
            log.warning("scheme %d: NEW_HANDLE reply without a handle", scheme.id)
            self.reply(cap, tag, P.ERR, errno.EIO)  # the caller must not hang
            return
        if not fds and new is None:
            self._deliver(cap, [REPLY.pack(tag, status), body], fds)
            return
        # a daemon's request for a client (an open of a client's path through its
        # namespace): what it gets is held by the daemon and charged to the client. Only a
        # system daemon's: a client's own daemon serving another must not spend its quota.
        payer = (cap.account if waiter.account == cap.account.id or cap.account is not self.system_account
                 else self.table.account(waiter.account))
        self._relay(scheme, cap, tag, P.OK if new is not None else status, body, fds, new, payer)

    def _relay(self, scheme: Scheme, cap: Capability, tag: int, status: int, body: memoryview,
               fds: list[int], new: tuple[int, int] | None, payer: Account) -> None:
        """Pass a scheme's reply with fds on to cap's holder, with any new capability.

        Capabilities in the reply count against cap's account from now on, and are
        charged to payer, with any state kept for a new handle; if they do not fit in its
        quota, or the router cannot mint, the reply becomes ERR (EMFILE, ENFILE...) and
        every fd it carried is closed.
        """
        account = cap.account
        try:
            passed = [self.capabilities.of_fd(fd) for fd in fds]
            moving = {id(c): c for c in passed
                      if c is not None and (c.account is not account or c.payer is not payer)}
            kept_fds = scheme.restart.provisional_fds(new[0]) if new is not None else 0
            charged = sum(1 for c in moving.values() if c.payer is not payer)
            if not payer.room_for_caps(charged + (new is not None) + kept_fds):
                raise OSError(errno.EMFILE, "capability quota of the account exceeded")
            if new is not None:
                number, fdflags = new
                handle = scheme.handles.get(number)
                if handle is None:
                    handle = SchemeHandle(scheme, number, scheme.generation, fdflags,
                                          payer=None if payer is self.system_account else payer)
                    scheme.handles[number] = handle
                fds.insert(0, self.mint(handle, account, payer))
                scheme.restart.top = max(scheme.restart.top, number)
                self.table.unref(*scheme.restart.confirm(number, payer))  # its state came just before
        except OSError as exc:
            P.close_fds(fds)  # capabilities among them reach EOF unless someone else holds them
            if new is not None:
                self.table.close_unclaimed(scheme, new[0])
            self._refuse(cap, tag, exc)
            return
        for moved in moving.values():
            self.table.move(moved, account, payer)
        self._deliver(cap, [REPLY.pack(tag, status), body], fds)

    # -- replies to holders: never wait ------------------------------------------------

    def reply(self, cap: Capability, tag: int, status: int, value, fds: list[int] | None = None) -> None:
        """Answer a request on cap; takes ownership of fds."""
        self._deliver(cap, REPLY.pack(tag, status) + P.pack(value), fds or [])

    def _refuse(self, cap: Capability, tag: int, exc: OSError) -> None:
        """Fail one request because the router could not make or take an fd."""
        if self.verbose:
            log.info("tag %d refused: %s", tag, exc)
        self._deliver(cap, error_reply(tag, exc.errno or errno.EIO), [])

    def _deliver(self, cap: Capability, frame: bytes | list, fds: list[int]) -> None:
        """Send frame (bytes, or a header and a body) to cap's holder now, or queue it on
        cap's outbox; never waits. Takes ownership of fds: closed once sent or dropped."""
        if cap.closed:
            P.close_fds(fds)
            return
        if cap.outbox is None:  # made on first use: most capabilities never need one
            left = send_now(cap.channel, frame, fds)
            if left is None:
                return
            cap.outbox = Outbox()
            cap.outbox.queue(*left, cap.account, cap.payer)
        else:
            cap.outbox.offer(cap.channel, frame, fds, cap.account, cap.payer)
        if cap.outbox and not cap.writing:
            cap.writing = True
            self._nursery.start_soon(self._write_outbox, cap)

    async def _write_outbox(self, cap: Capability) -> None:
        """Drain cap's outbox as its holder reads; the one task that waits on its socket."""
        try:
            while cap.outbox and not cap.closed:
                try:
                    await cap.channel.wait_writable()
                except trio.ClosedResourceError:
                    break
                if cap.closed:
                    break  # released while we were woken: the outbox is gone
                cap.outbox.flush(cap.channel, cap.account, cap.payer)
                self.table.resume(cap.account.drained())
        except Exception:
            log.exception("capability of scheme %d: dropped after an internal error", cap.handle.scheme.id)
            self._release(cap)
        finally:
            cap.writing = False
            if cap.closed and cap.outbox:
                cap.outbox.drop(cap.account, cap.payer)
                self.table.resume(cap.account.drained())
            if not cap.outbox:
                cap.outbox = None  # drained: give its memory back
            self.table.resume((cap,))
            self.tidy()

    # -- daemons that die ----------------------------------------------------------------

    def scheme_died(self, scheme: Scheme) -> None:
        """scheme's daemon is gone (or it was freed): fail what was in flight there, and
        let requests wait for its next daemon if one may come."""
        if not scheme.alive:
            return
        for waiter in self.table.scheme_died(scheme):
            if type(waiter) is StatusQuery:
                waiter.abandoned()
            else:  # the scheme died with the request in flight
                self.settle(waiter.cap)
                self.reply(waiter.cap, waiter.tag, P.ERR, errno.EIO)
        if scheme.freed or not scheme.restart.restartable:
            return  # no daemon will come: what comes for it now fails at once (EIO)
        scheme.restart.waiting = True
        self._nursery.start_soon(recovery.give_up_waiting, self, scheme, scheme.generation)


async def main(kernel_fd: int, verbose: bool = False, client_limits: Limits = CLIENT_LIMITS,
               system_limits: Limits = SYSTEM_LIMITS) -> None:
    """Run the router until the supervisor's kernel capability is closed.

    Args:
        kernel_fd: an inherited SOCK_SEQPACKET socket to serve as the first
            kernel capability (the supervisor holds its other end).
        verbose: log each request the router refuses itself.
        client_limits: the default limits of accounts made by ACCOUNT_NEW.
        system_limits: the limits of the system account (the kernel capability's).
    """
    async with trio.open_nursery() as nursery:
        router = Router(nursery, verbose, client_limits, system_limits)
        try:
            router.adopt_kernel_capability(kernel_fd)
            await router.supervisor_gone.wait()
        finally:
            nursery.cancel_scope.cancel()
    router.close()
