"""The kernel router: a blind switch between capability sockets and schemes.

Every capability a process holds is one end of a SOCK_SEQPACKET pair; the
router holds the other end (kernel/capabilities.py). The routing loop is this
module: a frame that arrives on a capability socket is read, forwarded to the
owning scheme with the handle and the sender's credentials (SO_PASSCRED,
filled in by Linux) prepended, the scheme's reply is relayed (a new handle
becomes a new capability, fds pass on) and sent back to the holder. The router
decodes only the fixed headers: it knows no scheme names and never looks at a
forwarded request's body.

Beside the loop, each concern has a module that owns its state and answers the
loop with values and decisions, while only the loop sends: accounts and their
bounds (accounts.py), replies its holder has no room for (outbox.py), schemes
(schemes.py) and what survives their restarts (restart.py), the trace
(trace.py), status pages (status.py) and the kernel's own operations
(operations.py).

No loop that serves several clients waits on one of them: a reply is sent
without waiting or queued; a capability whose outbox is not empty, that has
its bound of requests in flight, or whose account has too much in flight or
queued is not read until it drains. Running out of fds (or memory for one)
fails the one request with that errno; the router keeps serving.
"""

from __future__ import annotations

import errno
import itertools
import logging
import os
import resource
import select
import socket
import time

import trio

from kernel.accounts import (
    CLIENT_LIMITS,
    SYSTEM_ACCOUNT_ID,
    SYSTEM_LIMITS,
    Account,
    FdPool,
    Limits,
    reserve_for,
)
from kernel.capabilities import Capability, CapabilityTable, ClientRequest, SchemeHandle
from kernel.operations import OPERATIONS, KernelOp
from kernel.outbox import Outbox, error_reply, send_now
from kernel.restart import RESTART_WAIT, RESTORE_BACKOFF, RESTORE_TRIES, Held, Kept
from kernel.schemes import Scheme, SchemeTable, StatusQuery
from kernel.status import STATUS_TIMEOUT
from kernel.trace import Trace
from wire import protocol as P
from wire.channel import Channel
from wire.frames import NEW_HANDLE_HDR, REPLY, REQUEST, SERVING, SERVING_ID, SREPLY, SREQUEST
from wire.linux import identity

log = logging.getLogger("kernel")

KERNEL_SCHEME_ID = 0  # pseudo-scheme answering SCHEME_CREATE and friends
FDS_PER_TURN = 8  # a scheme's frame with more fds than this ends its channel's turn
MSG_CTRUNC = int(socket.MSG_CTRUNC)  # a plain int: socket.MSG_* are slow enum flags
EMPTY_ARGS = P.pack([])
NO_CRED = (0, 0, 0)


class Router:
    """The routing loop and the tables it consults; one instance per kernel process.

    Args:
        nursery: where capability, scheme and writer tasks run.
        verbose: log each request the router refuses itself (out of fds, over a quota).
        client_limits: the limits of an account made by ACCOUNT_NEW without arguments.
        system_limits: the limits of the system account.
    """

    def __init__(self, nursery: trio.Nursery, verbose: bool = False,
                 client_limits: Limits = CLIENT_LIMITS, system_limits: Limits = SYSTEM_LIMITS) -> None:
        self._nursery = nursery
        self.verbose = verbose
        self.client_limits = client_limits
        self.schemes = SchemeTable()
        self.capabilities = CapabilityTable()
        self.trace = Trace()
        self._req_ids = itertools.count(1)
        self._account_ids = itertools.count(SYSTEM_ACCOUNT_ID + 1)
        self.kernel_scheme = Scheme(KERNEL_SCHEME_ID, alive=True)
        self._kernel_handle = SchemeHandle(self.kernel_scheme, P.ROOT_HANDLE, 0)
        # every account that still holds a capability or has a request in flight
        self.accounts: dict[int, Account] = {}
        self.system_account = Account(SYSTEM_ACCOUNT_ID, system_limits, listed=self.accounts)
        self.accounts[SYSTEM_ACCOUNT_ID] = self.system_account
        # what client accounts may hold together: the fd limit less the system's reserve
        self.fd_limit = resource.getrlimit(resource.RLIMIT_NOFILE)[0]
        self.reserve = reserve_for(self.fd_limit)
        self.client_pool = FdPool(self.fd_limit - self.reserve)
        self.frames = 0
        self._starved = False  # the last socketpair failed (logged once per episode)
        self.supervisor_cap: Capability | None = None
        self.supervisor_gone = trio.Event()
        # Parked readers do not recv, so they would not see EOF: watch their sockets for hangup.
        self._hangups = select.epoll()
        self._parked: dict[int, Capability] = {}
        nursery.start_soon(self._watch_hangups)

    def close(self) -> None:
        """Release what the router holds besides its tasks' sockets."""
        self._hangups.close()
        self.trace.close()

    # -- what the kernel's operations use (kernel/operations.py) -----------------

    def adopt_kernel_capability(self, fd: int) -> None:
        """Serve an inherited socket as the supervisor's kernel capability.

        The router runs until it closes; clones of it (held by trusted daemons) do not
        keep the router up once the supervisor is gone.
        """
        channel = Channel.from_fd(fd)
        channel.sock.setsockopt(socket.SOL_SOCKET, socket.SO_PASSCRED, 1)
        self.supervisor_cap = self._start_capability(channel, self._kernel_handle, None,
                                                     self.system_account)

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
            self._start_capability(Channel(ours), handle, identity(st), account, payer)
        except BaseException:
            ours.close()
            theirs.close()
            raise
        return theirs.detach()

    def socketpair(self) -> tuple[socket.socket, socket.socket]:
        """A SEQPACKET pair; says once in the log when the router runs out of fds.

        Raises:
            OSError: EMFILE, ENFILE, ENOMEM...: the one request that needed it fails.
        """
        try:
            pair = socket.socketpair(socket.AF_UNIX, socket.SOCK_SEQPACKET)
        except OSError as exc:
            if not self._starved:
                log.warning("out of fds (%s): failing requests that need one until some close", exc)
            self._starved = True
            raise
        self._starved = False
        return pair

    def new_account(self, overrides: dict) -> Account:
        """A fresh client account: the default limits with overrides (ACCOUNT_NEW's)."""
        return Account(next(self._account_ids), self.client_limits.overridden(overrides),
                       pool=self.client_pool, listed=self.accounts)

    def summary(self) -> dict:
        """The router's totals, for KERNEL_STATUS."""
        return {"schemes": len(self.schemes.by_id), "accounts": len(self.accounts),
                "capabilities": len(self.capabilities), "fd_limit": self.fd_limit,
                "reserve": self.reserve, "client_fds": self.client_pool.used,
                "client_fd_limit": self.client_pool.limit}

    def attach_channel(self, scheme: Scheme) -> int:
        """Give scheme a fresh request channel; returns the daemon's end. A restarted
        scheme's new daemon gets its kept state first (_restore).

        Raises:
            OSError: the router is out of fds (or memory); scheme is unchanged.
        """
        ours, theirs = self.socketpair()
        ours.setsockopt(socket.SOL_SOCKET, socket.SO_PASSCRED, 1)  # the daemon's pid on its frames
        scheme.channel = Channel(ours)
        (scheme.payer or self.system_account).charge_fds(1)  # our end, for as long as it is open
        self.schemes.set_daemon(scheme, None)
        scheme.attached += 1
        scheme.next_generation()
        scheme.alive = True
        scheme.died = trio.Event()
        scheme.restart.waiting = False
        self._nursery.start_soon(self._serve_scheme, scheme, scheme.channel)
        if scheme.attached > 1:
            scheme.restart.restoring = True
            self._nursery.start_soon(self._restore, scheme, scheme.channel)
        return theirs.detach()

    def free_scheme(self, scheme: Scheme) -> None:
        """No capability names scheme any more, so no request can reach it: close its
        channel (its daemon sees EOF) and forget it, with all it cost its creator."""
        if scheme.freed or scheme is self.kernel_scheme:
            return
        scheme.freed = True
        self.schemes.remove(scheme)
        self.unref(*scheme.restart.forget_all())
        self._scheme_died(scheme)

    async def ask_status(self, scheme: Scheme, into: dict) -> None:
        """Ask scheme's daemon SCHEME_STATUS and put its answer (a map) into into."""
        send, recv = trio.open_memory_channel(1)
        req_id = next(self._req_ids)
        scheme.pending[req_id] = StatusQuery(send)
        frame = SREQUEST.pack(req_id, P.ROOT_HANDLE, 0, 0, 0, 0, P.SCHEME_STATUS, 0) + EMPTY_ARGS
        with trio.move_on_after(STATUS_TIMEOUT):
            await self._send_to_scheme(scheme, frame, [])
            try:
                status, value = await recv.receive()
            except trio.EndOfChannel:
                status, value = P.ERR, None  # the daemon died meanwhile
            if status == P.OK and isinstance(value, dict):
                into.update(value)
        scheme.pending.pop(req_id, None)

    # -- capabilities --------------------------------------------------------------

    def _start_capability(self, channel: Channel, handle: SchemeHandle, identity: int | None,
                          account: Account, payer: Account | None = None) -> Capability:
        cap = Capability(channel, handle, identity, account, payer or account)
        handle.refs += 1
        cap.payer.charge_caps(1)
        self.capabilities.add(cap)
        self._nursery.start_soon(self._serve_capability, cap)
        return cap

    def _move(self, cap: Capability, account: Account, payer: Account) -> None:
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
            self._resume(account.take_over(cap, old, queued_bytes))
            cap.wake()  # it may have been parked for its old account

    def _release(self, cap: Capability) -> None:
        """cap's holder is gone (EOF, hangup, or an internal error): let go of it."""
        if cap.closed:
            return
        cap.closed = True
        cap.wake()
        self._unwatch(cap, cap.channel.fileno())  # its fd number may be reused once closed
        cap.channel.close()
        cap.account.blocked.discard(cap)
        if cap.outbox:
            cap.outbox.drop(cap.account, cap.payer)
        self._resume(cap.account.drained())
        cap.payer.charge_caps(-1)
        if cap is self.supervisor_cap:
            self.supervisor_gone.set()  # clones given to trusted daemons do not keep us up
        self.capabilities.remove(cap)
        self.unref(cap.handle)

    def unref(self, *handles: SchemeHandle) -> None:
        """Capabilities (or kept states) that named handles are gone. At a handle's last one
        the scheme closes it, and a scheme left without any handle is freed."""
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
                self._nursery.start_soon(self._send_close, scheme, handle.number)
            if not scheme.handles:
                self.free_scheme(scheme)

    def _close_unclaimed(self, scheme: Scheme, number: int) -> None:
        """A scheme opened handle number but no capability came of it: tell it to close it."""
        handle = scheme.handles.get(number)
        if handle is not None and handle.refs:
            return  # capabilities hold it; the last one's EOF sends CLOSE
        scheme.handles.pop(number, None)
        if number != P.ROOT_HANDLE:
            self.unref(*scheme.restart.forget(number))
            if scheme.alive:
                self._nursery.start_soon(self._send_close, scheme, number)
        if not scheme.handles:
            self.free_scheme(scheme)

    async def _send_close(self, scheme: Scheme, number: int) -> None:
        frame = SREQUEST.pack(0, number, 0, 0, 0, 0, P.CLOSE, 0) + EMPTY_ARGS
        await self._send_to_scheme(scheme, frame, [])

    # -- reading requests ---------------------------------------------------------------

    async def _serve_capability(self, cap: Capability) -> None:
        """Read cap's requests one at a time, within its account's bounds, until EOF."""
        try:
            while True:
                # Reading and counting happen within the account's turn, so the account's
                # bounds see every request read.
                account = cap.account
                cap.turn = await account.take_turn()
                try:
                    if not account.may_read(cap):
                        wait = "park"
                    else:
                        try:
                            received = cap.channel.try_recv(P.CMSG_ALL)
                        except OSError:
                            break
                        if received is None:
                            wait = "readable"
                        else:
                            data, fds, flags, cred = received
                            if not data and not fds:
                                break  # EOF: every holder closed it or died
                            await self._on_request(cap, data, flags, fds, cred)
                            wait = None
                finally:
                    self._end_turn(cap)
                if wait == "park":
                    await self._park(cap)
                    if cap.hung_up or cap.closed:
                        break  # its requests still unread have no one to answer to
                elif wait == "readable":
                    # Most capabilities sit here, idle: waiting on trio directly rather than
                    # in Channel.recv keeps their task's stack (memory) smaller.
                    try:
                        await trio.lowlevel.wait_readable(cap.channel.sock)
                    except (OSError, trio.ClosedResourceError):
                        break
                elif account.system:
                    await trio.lowlevel.checkpoint()  # one request per capability, then the others'
        except Exception:
            log.exception("capability of scheme %d: dropped after an internal error", cap.handle.scheme.id)
        finally:
            self._release(cap)

    @staticmethod
    def _end_turn(cap: Capability) -> None:
        """Give back the account's turn cap's reader holds, if it holds it."""
        if cap.turn is not None:
            cap.turn.release()
            cap.turn = None

    async def _park(self, cap: Capability) -> None:
        """Wait until cap.wake() (it drained, or it moved accounts) or its holder hangs up."""
        fd = cap.channel.fileno()
        cap.wakeup = trio.Event()
        self._hangups.register(fd, select.EPOLLRDHUP)
        self._parked[fd] = cap
        try:
            await cap.wakeup.wait()
        finally:
            cap.wakeup = None
            self._unwatch(cap, fd)

    def _unwatch(self, cap: Capability, fd: int) -> None:
        """Stop watching a parked capability's socket for hangup (before it is closed)."""
        if fd >= 0 and self._parked.get(fd) is cap:
            del self._parked[fd]
            self._hangups.unregister(fd)

    async def _watch_hangups(self) -> None:
        while True:
            await trio.lowlevel.wait_readable(self._hangups)
            for fd, _ in self._hangups.poll(0):
                cap = self._parked.pop(fd, None)
                if cap is not None:
                    self._hangups.unregister(fd)  # level-triggered: it would fire again
                    cap.hung_up = True
                    cap.wake()

    @staticmethod
    def _resume(caps) -> None:
        """Let capabilities that waited read again."""
        for cap in caps:
            cap.wake()

    def _settle(self, cap: Capability) -> None:
        """One of cap's requests was answered (or never will be)."""
        self._resume(cap.account.settled(cap))

    async def _on_request(self, cap: Capability, data: bytes, flags: int, fds: list[int], cred) -> None:
        self.frames += 1
        if flags & P.TRUNCATED or len(data) < REQUEST.size:
            P.close_fds(fds)
            tag = REQUEST.unpack_from(data)[1] if len(data) >= REQUEST.size else 0
            # The buffer fits every fd a message can carry, so a control truncation of a
            # whole frame means Linux could not give us the fds: we are out of them.
            whole = len(data) >= REQUEST.size and flags & P.TRUNCATED == MSG_CTRUNC
            self._reply(cap, tag, P.ERR, errno.EMFILE if whole else errno.EINVAL)
            return
        op, tag = REQUEST.unpack_from(data)
        start = REQUEST.size
        serving = None
        if op & SERVING:  # a daemon's request for one it serves: the served one's caller
            if len(data) < REQUEST.size + SERVING_ID.size:
                P.close_fds(fds)
                self._reply(cap, tag, P.ERR, errno.EINVAL)
                return
            op &= ~SERVING
            (serving,) = SERVING_ID.unpack_from(data, start)
            start += SERVING_ID.size
        body = memoryview(data)[start:]
        cred = cred or NO_CRED
        if op < P.FIRST_SCHEME_OP:
            try:
                payer = None
                if serving is not None:  # a daemon clones or creates for a client
                    cred, for_account = self.schemes.served_caller(serving, cred)
                    if cap.account is self.system_account:  # charged to it (see _answer_client)
                        payer = self._account(for_account)
                self._kernel_op(cap, op, tag, body, fds, payer)
            except OSError as exc:
                self._reply(cap, tag, P.ERR, exc.errno)  # not a request the sender serves
            finally:
                P.close_fds(fds)
            return
        handle = cap.handle
        scheme = handle.scheme
        for_account = None
        try:
            if scheme is self.kernel_scheme:
                raise OSError(errno.EBADF, "the kernel capability is not a scheme's")
            if not handle.current:
                raise OSError(errno.EIO, "a handle of a dead daemon")
            if serving is not None:
                cred, for_account = self.schemes.served_caller(serving, cred)
        except OSError as exc:
            P.close_fds(fds)
            self._reply(cap, tag, P.ERR, exc.errno)
            return
        if not scheme.alive or scheme.restart.restoring:
            self._hold_for_restart(scheme, Held(cap, tag, cred, op, bytes(body), fds, serving, for_account))
            return
        await self._forward(cap, tag, cred, op, body, fds, serving=serving, for_account=for_account)

    def _account(self, account_id: int) -> Account:
        """The account of that id (the system's if it is gone)."""
        return self.accounts.get(account_id, self.system_account)

    def _kernel_op(self, cap: Capability, op: int, tag: int, body: memoryview, fds: list[int],
                   payer: Account | None) -> None:
        """Answer an operation of the router's own (kernel/operations.py); fds stay the caller's."""
        kop = OPERATIONS.get(op)
        if (kop is None or (kop.kernel_only and cap.handle.scheme is not self.kernel_scheme)
                or (kop.supervisor_only and cap is not self.supervisor_cap)):
            self._reply(cap, tag, P.ERR, errno.EINVAL)
        elif kop.waits:
            self._nursery.start_soon(self._answer_kernel_op, kop, cap, tag, bytes(body), payer)
        else:
            try:
                value, reply_fds = kop.run(self, cap, body, fds, payer)
            except P.ProtocolError:
                self._reply(cap, tag, P.ERR, errno.EINVAL)
            except OSError as exc:
                self._refuse(cap, tag, exc)
            else:
                self._reply(cap, tag, P.OK, value, reply_fds)

    async def _answer_kernel_op(self, kop: KernelOp, cap: Capability, tag: int, body: bytes,
                                payer: Account | None) -> None:
        """Answer an operation of the router's own that may wait, in a task of its own."""
        try:
            value, reply_fds = await kop.run(self, cap, body, [], payer)
        except P.ProtocolError:
            self._reply(cap, tag, P.ERR, errno.EINVAL)
        except OSError as exc:
            self._refuse(cap, tag, exc)
        else:
            self._reply(cap, tag, P.OK, value, reply_fds)

    def _hold_for_restart(self, scheme: Scheme, held: Held) -> None:
        """Hold a request for the next daemon of scheme (EIO if none is expected)."""
        cap = held.cap
        if not scheme.restart.hold(held):
            P.close_fds(held.fds)
            self._reply(cap, held.tag, P.ERR, errno.EIO)
            return
        cap.account.started(cap)  # it waits like a request at the scheme, within the same bounds
        cap.account.charge_fds(len(held.fds))

    # -- forwarding -------------------------------------------------------------------

    async def _forward(self, cap: Capability, tag: int, cred: tuple[int, int, int], op: int,
                       body: bytes | memoryview, fds: list[int], counted: bool = False,
                       serving: int | None = None, for_account: int | None = None) -> None:
        """Send a request on to cap's scheme; takes ownership of fds.

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
                self._settle(cap)
                P.close_fds(fds)
                self._reply(cap, tag, P.ERR, errno.EIO)
                return
        try:
            if fds and not account.room_for_caps(len(fds)):
                # held while the scheme takes them: they count against the quota
                raise OSError(errno.EMFILE, "fds over the account's quota")
            refs = self.capabilities.refs_for(scheme, fds) if fds else ()
        except OSError as exc:
            P.close_fds(fds)
            if counted:
                self._settle(cap)
            self._reply(cap, tag, P.ERR, exc.errno or errno.EIO)
            return
        req_id = next(self._req_ids)
        shown = account.id if for_account is None else for_account
        pid, uid, gid = cred
        header = SREQUEST.pack(req_id, handle.number, pid, uid, gid, shown, op, len(refs))
        frame = b"".join((header, *(ref.to_bytes(8, "little") for ref in refs), body))
        waiter = ClientRequest(cap, tag, cred, req_id, shown)
        scheme.pending[req_id] = waiter
        if self.trace:
            waiter.started = time.monotonic()
            self.trace.call(req_id, serving, pid, uid, scheme.id, handle.number, op, account.id,
                            len(fds), body)
        if not counted:
            account.started(cap)
        scheme.frames += 1
        account.charge_fds(len(fds))
        # Counted: the account's other capabilities may go on. A scheme slow to read its
        # channel (a client's own scheme that never reads) then holds up this one only.
        self._end_turn(cap)
        try:
            sent = await self._send_to_scheme(scheme, frame, fds, before_dying=req_id)
        except BaseException:
            P.close_fds(fds)
            raise
        finally:
            account.charge_fds(-len(fds))
        if sent:
            P.close_fds(fds)
            return
        # The daemon was gone before it could have seen this request: it waits for the next
        # one like the requests that come while the scheme is down.
        self._settle(cap)
        self._hold_for_restart(scheme, Held(cap, tag, cred, op, bytes(body), fds, serving, for_account))

    async def _send_to_scheme(self, scheme: Scheme, frame: bytes, fds: list[int],
                              before_dying: int | None = None) -> bool:
        """Send a frame to scheme's daemon; False if it could not take it (it died).

        before_dying: the request id of the frame, which is taken out of the pending
        requests before they fail (the caller decides what becomes of it).
        """
        channel = scheme.channel
        if channel is not None:
            try:
                await channel.send(frame, fds)
                return True
            except (OSError, trio.ClosedResourceError) as exc:
                if scheme.channel is channel:
                    log.warning("scheme %d: send failed: %s", scheme.id, exc)
                    scheme.pending.pop(before_dying, None)
                    self._scheme_died(scheme)
        scheme.pending.pop(before_dying, None)
        return False

    # -- replies from schemes -------------------------------------------------------------

    async def _serve_scheme(self, scheme: Scheme, channel: Channel) -> None:
        try:
            while True:
                try:
                    data, fds, flags, cred = await channel.recv(P.CMSG_ALL)
                except (OSError, trio.ClosedResourceError):
                    break
                if not data and not fds:
                    break
                if cred is not None and cred != scheme.daemon and scheme.channel is channel:
                    self.schemes.set_daemon(scheme, cred)  # who serves the scheme, as Linux tells us
                try:
                    self._on_reply(scheme, data, flags, fds)  # never waits: other clients' replies follow
                except Exception:
                    P.close_fds(fds)
                    log.exception("scheme %d: bad reply dropped", scheme.id)
                if len(fds) > FDS_PER_TURN:
                    # a frame of many fds costs a syscall or two each: others' turn now, not
                    # after the next 15 such frames (a client's scheme may send nothing else)
                    await trio.lowlevel.checkpoint()
        finally:
            if scheme.channel is channel:
                self._scheme_died(scheme)
            channel.close()

    def _on_reply(self, scheme: Scheme, data: bytes, flags: int, fds: list[int]) -> None:
        if len(data) < SREPLY.size:
            P.close_fds(fds)
            log.warning("scheme %d: reply shorter than its header dropped", scheme.id)
            return
        req_id, status = SREPLY.unpack_from(data)
        if status == P.KEEP or status == P.KEEP_MORE:
            self.unref(*scheme.restart.keep(req_id, data, status == P.KEEP, flags & P.TRUNCATED, fds,
                                            self.capabilities, scheme.handles, self.system_account))
            return
        if status == P.HELLO:  # its sender is now known (see _serve_scheme)
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
                self._close_unclaimed(scheme, new[0])  # nobody will get a capability for it
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
        self._settle(cap)
        if self.trace:
            self.trace.reply(waiter.req_id, waiter.started, scheme.id, waiter.cred[0], len(fds),
                             status, body, new[0] if new else 0)
        if flags & P.TRUNCATED:
            P.close_fds(fds)
            if new is not None:
                self._close_unclaimed(scheme, new[0])
            log.warning("scheme %d: truncated reply to tag %d", scheme.id, tag)
            # control truncation alone: Linux could not give us the fds it carried
            self._reply(cap, tag, P.ERR, errno.EMFILE if flags & P.TRUNCATED == MSG_CTRUNC else errno.EIO)
            return
        if status is None:
            P.close_fds(fds)
            log.warning("scheme %d: NEW_HANDLE reply without a handle", scheme.id)
            self._reply(cap, tag, P.ERR, errno.EIO)  # the caller must not hang
            return
        # a daemon's request for a client (an open of a client's path through its
        # namespace): what it gets is held by the daemon and charged to the client. Only a
        # system daemon's: a client's own daemon serving another must not spend its quota.
        payer = (cap.account if waiter.account == cap.account.id or cap.account is not self.system_account
                 else self._account(waiter.account))
        if fds or new is not None:
            self._relay(scheme, cap, tag, P.OK if new is not None else status, body, fds, new, payer)
        else:
            self._deliver(cap, REPLY.pack(tag, status) + body, [])

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
                self.unref(*scheme.restart.confirm(number, payer))  # its state came just before
        except OSError as exc:
            P.close_fds(fds)  # capabilities among them reach EOF unless someone else holds them
            if new is not None:
                self._close_unclaimed(scheme, new[0])
            self._refuse(cap, tag, exc)
            return
        for moved in moving.values():
            self._move(moved, account, payer)
        self._deliver(cap, REPLY.pack(tag, status) + body, fds)

    # -- replies to holders: never wait ------------------------------------------------

    def _reply(self, cap: Capability, tag: int, status: int, value, fds: list[int] | None = None) -> None:
        """Answer a request on cap; takes ownership of fds."""
        self._deliver(cap, REPLY.pack(tag, status) + P.pack(value), fds or [])

    def _refuse(self, cap: Capability, tag: int, exc: OSError) -> None:
        """Fail one request because the router could not make or take an fd."""
        if self.verbose:
            log.info("tag %d refused: %s", tag, exc)
        self._deliver(cap, error_reply(tag, exc.errno or errno.EIO), [])

    def _deliver(self, cap: Capability, frame: bytes, fds: list[int]) -> None:
        """Send frame to cap's holder now, or queue it on cap's outbox; never waits.

        Takes ownership of fds: they are closed once sent or dropped.
        """
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
                self._resume(cap.account.drained())
        except Exception:
            log.exception("capability of scheme %d: dropped after an internal error", cap.handle.scheme.id)
            self._release(cap)
        finally:
            cap.writing = False
            if cap.closed and cap.outbox:
                cap.outbox.drop(cap.account, cap.payer)
                self._resume(cap.account.drained())
            if not cap.outbox:
                cap.outbox = None  # drained: give its memory back
            cap.wake()

    # -- daemons that die and come back ---------------------------------------------

    def _scheme_died(self, scheme: Scheme) -> None:
        if not scheme.alive:
            return
        if scheme.pending and not scheme.freed:
            log.warning("scheme %d: daemon gone; failing %d pending requests", scheme.id, len(scheme.pending))
        scheme.alive = False
        scheme.died.set()
        if scheme.channel is not None:
            scheme.channel.close()
            scheme.channel = None
            (scheme.payer or self.system_account).charge_fds(-1)
        self.schemes.set_daemon(scheme, None)
        self.unref(*scheme.restart.died())
        scheme.next_generation()
        # the root and the kept handles live on in the next daemon; the rest go stale
        scheme.handles = {n: h for n, h in scheme.handles.items() if h.current}
        pending, scheme.pending = scheme.pending, {}
        for waiter in pending.values():
            if type(waiter) is StatusQuery:
                waiter.abandoned()
            else:  # the scheme died with the request in flight
                self._settle(waiter.cap)
                self._reply(waiter.cap, waiter.tag, P.ERR, errno.EIO)
        if scheme.freed or not scheme.restart.restartable:
            return  # no daemon will come: what comes for it now fails at once (EIO)
        scheme.restart.waiting = True
        self._nursery.start_soon(self._give_up_waiting, scheme, scheme.generation)

    async def _give_up_waiting(self, scheme: Scheme, generation: int) -> None:
        """Requests wait RESTART_WAIT seconds for a new daemon; then EIO, as before."""
        await trio.sleep(RESTART_WAIT)
        if scheme.generation != generation or scheme.alive:
            return  # it came back
        for held in scheme.restart.give_up():
            held.cap.account.charge_fds(-len(held.fds))
            P.close_fds(held.fds)
            self._settle(held.cap)
            self._reply(held.cap, held.tag, P.ERR, errno.EIO)

    async def _restore(self, scheme: Scheme, channel: Channel) -> None:
        """Give a restarted daemon RESUME, the state kept for its handles, then the requests
        that waited for it; requests that come meanwhile wait behind them. A handle whose
        state cannot be handed back (the router out of fds even after a few tries) fails
        with EIO from then on; none is ever silently another."""
        restart = scheme.restart
        try:
            if not await self._send_to_scheme(scheme, restart.resume_frame(), []):
                return  # it died again
            for number, kept in list(restart.kept.items()):
                if scheme.channel is not channel:
                    return  # it died again
                if restart.kept.get(number) is not kept:
                    continue  # its last capability closed meanwhile
                try:
                    await self._restore_one(scheme, number, kept)
                except OSError as exc:
                    log.warning("scheme %d: handle %d could not be restored (%s); it fails from now on",
                                scheme.id, number, exc)
                    self.unref(*restart.forget(number))
                    scheme.fail_handle(number)
            while restart.backlog and scheme.channel is channel:
                held = restart.backlog.popleft()
                await self._forward(held.cap, held.tag, held.cred, held.op, held.body, held.fds,
                                    counted=True, serving=held.serving, for_account=held.account)
        finally:
            if scheme.channel is channel:
                restart.restoring = False

    async def _restore_one(self, scheme: Scheme, number: int, kept: Kept) -> None:
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
                            copies.append(self.mint(item, self.system_account, kept.payer, force=True))
                    break
                except OSError as exc:
                    if exc.errno not in (errno.EMFILE, errno.ENFILE, errno.ENOMEM) or attempt + 1 == RESTORE_TRIES:
                        raise
                    await trio.sleep(RESTORE_BACKOFF * 2**attempt)  # fds may come free meanwhile
                    if scheme.restart.kept.get(number) is not kept:
                        return
            for frame, chunk in scheme.restart.restore_frames(number, kept, copies):
                if not await self._send_to_scheme(scheme, frame, chunk):
                    return  # it died again: its successor is given the state
        finally:
            P.close_fds(copies)


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
