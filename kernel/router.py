"""The kernel router: a blind switch between capability sockets and schemes.

Every capability a process holds is one end of a SOCK_SEQPACKET pair; the
router holds the other end and maps it to a SchemeHandle (anonymous scheme id,
handle number, fd flags). A frame that arrives on a capability socket is
forwarded to the owning scheme with the handle and the sender's credentials
(SO_PASSCRED, filled in by Linux) prepended; the scheme's reply is routed back
by request id. Fds passed with a request are relayed to the scheme, each
marked with its handle number when it is a capability of that same scheme (so
rename can name a second directory). The router decodes only the fixed headers
(and the arguments of its own kernel operations): it knows no scheme names and
never looks at a forwarded request's body.

When a scheme answers NEW_HANDLE the router mints a new capability pair.
When the last capability for a handle closes (EOF: the holder closed it or
died) the router sends CLOSE to the scheme. When a scheme's channel reaches
EOF (its daemon died) every pending request on it fails with EIO, every
handle except its root goes stale, and the scheme can be given a new channel
(SCHEME_RESTART) under the same id, so root capabilities keep working.

No loop that serves several clients waits on one of them. A reply is sent
without waiting; if the holder's socket is full it is queued on that
capability's outbox and a writer task of that capability drains it. Each
capability's reader stops reading requests while its outbox is not empty,
while it has its account's per-capability bound of requests in flight, or
while its account (kernel/accounts.py) has too much in flight or queued: a
client that floods fills only its own socket. Running out of fds (or memory
for one) fails the one request with that errno; the router keeps serving.
"""

from __future__ import annotations

import collections
import errno
import itertools
import logging
import os
import resource
import select
import socket
import time
from dataclasses import dataclass, field

import trio

from kernel.accounts import CLIENT_LIMITS, SYSTEM_LIMITS, Account, FdPool, Limits, reserve_for
from wire import frames
from wire import protocol as P
from wire.channel import Channel
from wire.frames import Keep, Reply, Request, SchemeReply, SchemeRequest
from wire.linux import identity

log = logging.getLogger("kernel")

EMPTY_ARGS = P.pack([])


@dataclass(frozen=True)
class KernelOp:
    """An operation the router answers itself: its method, whether only a kernel
    capability may ask it, and whether only the supervisor's own one may (the clones it
    hands to the daemons it trusts create schemes, and that is all)."""

    method: str
    kernel_only: bool = True
    supervisor_only: bool = True


KERNEL_OPS = {
    P.CLONE: KernelOp("_op_clone", kernel_only=False, supervisor_only=False),
    P.GETFL: KernelOp("_op_getfl", kernel_only=False, supervisor_only=False),
    P.SCHEME_CREATE: KernelOp("_op_scheme_create", supervisor_only=False),
    P.SCHEME_RESTART: KernelOp("_op_scheme_restart"),
    P.ACCOUNT_NEW: KernelOp("_op_account_new"),
    P.KERNEL_STATUS: KernelOp("_op_kernel_status"),
    P.TRACE: KernelOp("_op_trace"),
}
MAX_TRACERS = 8
MAX_DETAIL = 16 * 1024  # bytes of a scheme's status detail passed on to `status` and `graph`
DETAIL_BUDGET = 32 * 1024  # bytes of details of all schemes in one status reply
STATUS_SCHEMES = 128  # schemes one status reply describes at most
STATUS_ACCOUNTS = 256  # accounts one status reply describes at most
HOLDINGS_PAGE = 2048  # (account, scheme, handle, count) rows in one status reply
STATUS_BUDGET = 100 * 1024  # bytes of a status reply: it must fit in one frame (MAX_FRAME)
TRACE_BODY = 4096  # bytes of a request's arguments or a reply's value a trace record carries
KERNEL_SCHEME_ID = 0  # pseudo-scheme answering SCHEME_CREATE and friends
SYSTEM_ACCOUNT_ID = 0  # the kernel capability's account: daemons, no quota
STATUS_TIMEOUT = 3.0  # a scheme slower than this shows its handle count as unknown
RESTART_WAIT = 5.0  # seconds requests to a crashed scheme wait for its next daemon
MAX_BACKLOG = 4096  # requests held for one scheme while it restarts
MAX_KEPT_ITEMS = 65536  # fds and capabilities in the state kept for one handle
MAX_KEPT_BODY = 4 * 1024 * 1024  # bytes of the state kept for one handle
KEPT_PART = P.MAX_FRAME - 4096  # body bytes of one RESTORE(_MORE) frame: room for 253 refs
RESTORE_TRIES = 5  # a restore short of fds tries again after 0.05, 0.1, 0.2... seconds
RESTORE_BACKOFF = 0.05
FDS_PER_TURN = 8  # a scheme's frame with more fds than this ends its channel's turn
MSG_CTRUNC = int(socket.MSG_CTRUNC)  # a plain int: socket.MSG_* are slow enum flags
# A send to a holder that is gone: nothing to tell anyone, its EOF cleans up.
HOLDER_GONE = frozenset({errno.EPIPE, errno.ECONNRESET, errno.ENOTCONN, errno.EBADF})


@dataclass(eq=False)
class ClientRequest:
    """A holder's request in flight at a scheme: the capability to answer, its tag, and
    the caller the scheme was told of (pid, uid, gid: the holder, or whom it serves)."""

    cap: Capability
    tag: int
    cred: tuple[int, int, int] = (0, 0, 0)
    started: float = 0.0  # when it was forwarded (for the trace)
    req_id: int = 0
    account: int = 0  # the account the scheme was told of: the holder's, or whom it serves

    def caller(self) -> tuple[int, int, int] | None:
        return self.cred

    def answered(self, router: Router, scheme: Scheme, reply: SchemeReply | None, flags: int,
                 fds: list[int]) -> None:
        router._answer_client(scheme, self, reply, flags, fds)

    def abandoned(self, router: Router) -> None:
        """The scheme died with the request in flight."""
        router._settle(self.cap)
        router._reply(self.cap, self.tag, P.ERR, errno.EIO)


@dataclass(eq=False)
class StatusQuery:
    """The router's own SCHEME_STATUS question to a scheme; the answer goes to a channel."""

    answer: trio.MemorySendChannel

    def caller(self) -> tuple[int, int, int] | None:
        return None  # the router's own question: it serves no one

    def answered(self, router: Router, scheme: Scheme, reply: SchemeReply | None, flags: int,
                 fds: list[int]) -> None:
        P.close_fds(fds)
        if reply is not None and reply.status == P.NEW_HANDLE:
            router._close_unclaimed(scheme, reply.handle)  # nobody will get a capability for it
        try:
            self.answer.send_nowait((reply.status, reply.value()) if reply else (P.ERR, errno.EIO))
        except P.ProtocolError:
            self.answer.send_nowait((P.ERR, errno.EIO))

    def abandoned(self, router: Router) -> None:
        self.answer.close()


@dataclass(eq=False)
class Tracer:
    """The router's end of a trace socket, and how many records its reader missed."""

    sock: socket.socket
    dropped: int = 0


@dataclass(eq=False)
class Scheme:
    """One anonymous scheme: its request channel and what is open on it."""

    id: int
    channel: Channel | None = None
    generation: int = 0
    alive: bool = False
    frames: int = 0
    pending: dict[int, ClientRequest | StatusQuery] = field(default_factory=dict)
    handles: dict[int, SchemeHandle] = field(default_factory=dict)
    # handle number -> the state its daemon asked us to keep (KEEP): handed back to the
    # next daemon after a crash (RESTORE), so that the handle lives on
    kept: dict[int, Kept] = field(default_factory=dict)
    provisional: dict[int, Kept] = field(default_factory=dict)  # for a NEW_HANDLE on its way
    # requests on live handles that came while the daemon was down, for its successor
    backlog: collections.deque[Held] = field(default_factory=collections.deque)
    keeps: bool = False  # may KEEP state for its handles (only schemes the supervisor made)
    # may get a new daemon (SCHEME_RESTART: only schemes the supervisor made), so requests
    # wait for one a while when it dies
    restartable: bool = False
    top: int = 0  # the highest handle number the scheme's daemons have used
    attached: int = 0  # daemons it has had (1 + restarts)
    daemon: tuple[int, int, int] | None = None  # (pid, uid, gid) of its daemon, once it said HELLO
    waiting_for_restart: bool = False  # dead, and requests wait for a restart (for a while)
    restoring: bool = False  # a new daemon is being given its state: new requests wait
    died: trio.Event = field(default_factory=trio.Event)  # set when its daemon's channel ends
    # who pays for the router's end of its channel (a client that created it; None: the system)
    payer: Account | None = None
    freed: bool = False  # its last capability went: it is gone for good
    # handle -> what KEEP_MORE frames brought so far of the state to keep for it
    partial: dict[int, PartialKeep] = field(default_factory=dict)
    # request id -> the errno its reply becomes: its KEEP could not be stored
    keep_failed: dict[int, int] = field(default_factory=dict)


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
    payer: Account | None = None
    inflight: int = 0  # requests forwarded to the scheme and not yet answered
    # replies (frame, fds owned by the outbox) waiting for the holder's socket to have room;
    # made on first use (an empty deque is 0.7 KiB, and most capabilities never need one)
    outbox: collections.deque[tuple[bytes, list[int]]] | None = None
    writing: bool = False  # a writer task is draining the outbox
    closed: bool = False
    hung_up: bool = False  # the holder went away while the reader was parked
    turn: trio.Lock | None = None  # its account's turn (a trio.Lock) while its reader holds it
    _wakeup: trio.Event | None = None  # set while the reader is parked

    def wake(self) -> None:
        """Let a parked reader check again whether it may read."""
        if self._wakeup is not None:
            self._wakeup.set()

    def queued(self) -> tuple[int, int]:
        """(bytes, fds) in its outbox."""
        if not self.outbox:
            return 0, 0
        return sum(len(frame) for frame, _ in self.outbox), sum(len(fds) for _, fds in self.outbox)


class Router:
    """All of the router's state; one instance per kernel process.

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
        self._schemes: dict[int, Scheme] = {}
        self._scheme_ids = itertools.count(1)
        self._req_ids = itertools.count(1)
        self._account_ids = itertools.count(SYSTEM_ACCOUNT_ID + 1)
        self._by_identity: dict[int, Capability] = {}
        self._kernel = Scheme(KERNEL_SCHEME_ID, alive=True)
        self._kernel_handle = SchemeHandle(self._kernel, P.ROOT_HANDLE, 0)
        self.system_account = Account(SYSTEM_ACCOUNT_ID, system_limits)
        # what client accounts may hold together: the fd limit less the system's reserve
        self.fd_limit = resource.getrlimit(resource.RLIMIT_NOFILE)[0]
        self.reserve = reserve_for(self.fd_limit)
        self.client_pool = FdPool(self.fd_limit - self.reserve)
        # daemon pid -> the schemes it serves (to check a claim to serve a request)
        self._served_by: dict[int, set[Scheme]] = {}
        # every account that still holds a capability or has a request in flight
        self._accounts: dict[int, Account] = {SYSTEM_ACCOUNT_ID: self.system_account}
        self.frames = 0
        self._starved = False  # the last socketpair failed (logged once per episode)
        self._supervisor_cap: Capability | None = None
        self.supervisor_gone = trio.Event()
        # Parked readers do not recv, so they would not see EOF: watch their sockets for hangup.
        self._hangups = select.epoll()
        self._parked: dict[int, Capability] = {}
        self._tracers: list[Tracer] = []  # who asked for a record of every call (TRACE)
        nursery.start_soon(self._watch_hangups)

    def close(self) -> None:
        """Release what the router holds besides its tasks' sockets."""
        self._hangups.close()

    # -- capabilities --------------------------------------------------------

    def adopt_kernel_capability(self, fd: int) -> None:
        """Serve an inherited socket as the supervisor's kernel capability.

        The router runs until it closes; clones of it (held by trusted daemons) do not
        keep the router up once the supervisor is gone.
        """
        channel = Channel.from_fd(fd)
        channel.sock.setsockopt(socket.SOL_SOCKET, socket.SO_PASSCRED, 1)
        self._supervisor_cap = self._start_capability(
            channel, self._kernel_handle, None, self.system_account)

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
        ours, theirs = self._socketpair()
        try:
            ours.setsockopt(socket.SOL_SOCKET, socket.SO_PASSCRED, 1)
            st = os.fstat(theirs.fileno())
            self._start_capability(Channel(ours), handle, identity(st), account, payer)
        except BaseException:
            ours.close()
            theirs.close()
            raise
        return theirs.detach()

    def _socketpair(self) -> tuple[socket.socket, socket.socket]:
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

    def _start_capability(self, channel: Channel, handle: SchemeHandle,
                          identity: int | None, account: Account,
                          payer: Account | None = None) -> Capability:
        cap = Capability(channel, handle, identity, account, payer or account)
        handle.refs += 1
        cap.payer.charge_caps(1)
        self._accounts[cap.payer.id] = cap.payer  # listed again if it had gone idle
        if identity is not None:
            self._by_identity[identity] = cap
        self._nursery.start_soon(self._serve_capability, cap)
        return cap

    def _capability_of(self, fd: int) -> Capability | None:
        """The capability whose holder's end fd is, if it is one of ours.

        Raises:
            OSError: fstat failed.
        """
        st = os.fstat(fd)
        return self._by_identity.get(identity(st))

    def _move(self, cap: Capability, account: Account, payer: Account | None = None) -> None:
        """Count cap, and what it has in flight and queued, against account from now on,
        and charge its fd to payer (account by default)."""
        payer = payer or account
        queued_bytes, queued_fds = cap.queued()
        if cap.payer is not payer:  # its fd and the fds queued for it
            old_payer, cap.payer = cap.payer, payer
            old_payer.charge_caps(-1)
            old_payer.charge_fds(-queued_fds)
            payer.charge_caps(1)
            payer.charge_fds(queued_fds)
            self._forget_if_idle(old_payer)
        old = cap.account
        if old is account:
            return
        old.inflight -= cap.inflight
        old.queued_bytes -= queued_bytes
        old.blocked.discard(cap)
        account.inflight += cap.inflight
        account.queued_bytes += queued_bytes
        cap.account = account
        old.wake_if_drained()
        self._forget_if_idle(old)
        cap.wake()  # it may have been parked for its old account

    def _forget_if_idle(self, account: Account) -> None:
        """Stop listing an account that holds nothing any more."""
        if (not account.caps and not account.inflight and not account.held_fds
                and account is not self.system_account):
            self._accounts.pop(account.id, None)

    def _account(self, account_id: int) -> Account:
        """The account of that id (the system's if it is gone)."""
        return self._accounts.get(account_id, self.system_account)

    async def _serve_capability(self, cap: Capability) -> None:
        """Read cap's requests one at a time, within its account's bounds, until EOF."""
        try:
            while True:
                # A client account's capabilities take turns: however many of them have
                # requests waiting, the account gets about one request handled per pass of
                # the scheduler, as a client waiting with a single request does. (trio's
                # acquire yields once it holds the lock: the account's other capabilities
                # queue behind it meanwhile, and everyone else runs.) Reading and counting
                # happen within the turn, so the account's bounds see every request read.
                account = cap.account
                took_turn = not account.system
                if took_turn:
                    if account.turn is None:
                        account.turn = trio.Lock()
                    await account.turn.acquire()
                    cap.turn = account.turn
                try:
                    if self._must_wait(cap):
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
                elif not took_turn:
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

    def _must_wait(self, cap: Capability) -> bool:
        """Whether cap's reader must stop reading requests for now (backpressure)."""
        if cap.outbox:
            return True  # its holder is not reading replies: read no more requests
        account = cap.account
        per_cap = account.limits.max_inflight_per_cap
        if per_cap is not None and cap.inflight >= per_cap:
            return True
        if account.saturated:
            account.blocked.add(cap)
            return True
        return False

    async def _park(self, cap: Capability) -> None:
        """Wait until cap.wake() (it drained, or it moved accounts) or its holder hangs up."""
        fd = cap.channel.fileno()
        cap._wakeup = trio.Event()
        self._hangups.register(fd, select.EPOLLRDHUP)
        self._parked[fd] = cap
        try:
            await cap._wakeup.wait()
        finally:
            cap._wakeup = None
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

    def _release(self, cap: Capability) -> None:
        if cap.closed:
            return
        cap.closed = True
        cap.wake()
        self._unwatch(cap, cap.channel.fileno())  # its fd number may be reused once closed
        cap.channel.close()
        self._drop_outbox(cap)
        account, payer = cap.account, cap.payer  # (its outbox was dropped: nothing queued)
        payer.charge_caps(-1)
        account.blocked.discard(cap)
        self._forget_if_idle(account)
        if payer is not account:
            self._forget_if_idle(payer)
        if cap is self._supervisor_cap:
            self.supervisor_gone.set()  # clones given to trusted daemons do not keep us up
        if cap.identity is not None:
            self._by_identity.pop(cap.identity, None)
        self._unref(cap.handle)

    def _unref(self, handle: SchemeHandle) -> None:
        """A capability (or a kept state) that named handle is gone. At the last one the
        scheme closes the handle, and a scheme left without any handle is freed."""
        handle.refs -= 1
        if handle.refs:
            return
        scheme = handle.scheme
        if scheme is self._kernel:
            return
        was_live = handle.live
        if scheme.handles.get(handle.number) is handle:  # not a stale one whose number came back
            del scheme.handles[handle.number]
            if handle.number != P.ROOT_HANDLE:
                self._forget_kept(scheme, handle.number)
        if was_live and handle.number != P.ROOT_HANDLE:
            self._nursery.start_soon(self._send_close, scheme, handle.number)
        if not scheme.handles:
            self._free_scheme(scheme)

    def _close_unclaimed(self, scheme: Scheme, number: int) -> None:
        """A scheme opened handle number but no capability came of it: tell it to close it."""
        handle = scheme.handles.get(number)
        if handle is not None and handle.refs:
            return  # capabilities hold it; the last one's EOF sends CLOSE
        scheme.handles.pop(number, None)
        if number != P.ROOT_HANDLE:
            self._forget_kept(scheme, number)
        if scheme.alive and number != P.ROOT_HANDLE:
            self._nursery.start_soon(self._send_close, scheme, number)
        if not scheme.handles:
            self._free_scheme(scheme)

    def _free_scheme(self, scheme: Scheme) -> None:
        """No capability names scheme any more, so no request can reach it: close its
        channel (its daemon sees EOF) and forget it, with all it cost its creator."""
        if scheme.freed or scheme is self._kernel:
            return
        scheme.freed = True
        self._schemes.pop(scheme.id, None)
        for number in [*scheme.kept, *scheme.provisional]:
            self._forget_kept(scheme, number)
        self._drop_partial_keeps(scheme)
        self._scheme_died(scheme)

    def _forget_kept(self, scheme: Scheme, number: int) -> None:
        for table in (scheme.kept, scheme.provisional):
            kept = table.pop(number, None)
            if kept is not None:
                self._drop_kept(kept)

    def _drop_kept(self, kept: Kept) -> None:
        """Give back what a kept state held: its fds, and its references to handles."""
        items = list(kept.items)
        kept.items.clear()
        fds = [item for item in items if type(item) is int]
        P.close_fds(fds)
        kept.payer.charge_fds(-len(fds))
        self._forget_if_idle(kept.payer)
        for item in items:
            if type(item) is not int:
                self._unref(item)

    def _drop_partial_keeps(self, scheme: Scheme, number: int | None = None) -> None:
        """Forget the parts of KEEPs whose last frame never came (their fds are not charged):
        every handle's, or number's."""
        if number is None:
            partial, scheme.partial = scheme.partial, {}
        else:
            partial = {number: scheme.partial.pop(number, None) or PartialKeep()}
        for part in partial.values():
            P.close_fds([item for item in part.items if type(item) is int])
            for item in part.items:
                if type(item) is not int:
                    self._unref(item)

    async def _send_close(self, scheme: Scheme, number: int) -> None:
        frame = SchemeRequest(0, number, 0, 0, 0, P.CLOSE, (), EMPTY_ARGS).encode()
        await self._send_to_scheme(scheme, frame, [])

    # -- replies to holders: never wait ---------------------------------------

    def _reply(self, cap: Capability, tag: int, status: int, value, fds: list[int] | None = None) -> None:
        """Answer a request on cap; takes ownership of fds."""
        self._deliver(cap, Reply.of(tag, status, value).encode(), fds or [])

    def _deliver(self, cap: Capability, frame: bytes, fds: list[int]) -> None:
        """Send frame to cap's holder now, or queue it on cap's outbox; never waits.

        Takes ownership of fds: they are closed once sent or dropped.
        """
        if cap.closed:
            P.close_fds(fds)
            return
        if not cap.outbox:
            left = self._send_now(cap, frame, fds)
            if left is None:
                return
            frame, fds = left
        account = cap.account
        if fds and not cap.payer.room_for_caps(len(fds)):
            # queued fds are router fds held for the capability's payer (a client, for one a
            # daemon holds for it): past its quota the reply fails
            P.close_fds(fds)
            frame, fds = Reply.of(Reply.tag_of(frame), P.ERR, errno.EMFILE).encode(), []
        if cap.outbox is None:
            cap.outbox = collections.deque()
        cap.outbox.append((frame, fds))
        account.queued_bytes += len(frame)
        cap.payer.charge_fds(len(fds))
        if not cap.writing:
            cap.writing = True
            self._nursery.start_soon(self._write_outbox, cap)

    def _send_now(self, cap: Capability, frame: bytes, fds: list[int]) -> tuple[bytes, list[int]] | None:
        """Try to send one reply without waiting.

        Returns:
            None when done with it (sent, or dropped because the holder is gone; its fds
            are closed), else the frame and fds still to send: the same, or an ERR reply
            that replaced one that could not be sent as it was.
        """
        while True:
            try:
                if not cap.channel.try_send(frame, fds):
                    return frame, fds
            except OSError as exc:
                P.close_fds(fds)
                replacement = self._error_for_failed_send(cap, frame, exc)
                if replacement is None:
                    return None
                frame, fds = replacement, []
                continue
            P.close_fds(fds)
            return None

    def _error_for_failed_send(self, cap: Capability, frame: bytes, exc: OSError) -> bytes | None:
        """The ERR reply that tells the holder why its reply could not be sent, if any.

        Sending fds can fail on its own (ETOOMANYREFS, ENOBUFS, ENOMEM...): the request
        then fails with that errno instead of leaving its caller waiting.
        """
        if exc.errno in HOLDER_GONE or cap.closed:
            return None
        reply = Reply.decode(frame)
        if reply.status == P.ERR:
            return None  # an error reply that cannot be sent either: nothing smaller to try
        return Reply.of(reply.tag, P.ERR, exc.errno or errno.EIO).encode()

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
                frame, fds = cap.outbox[0]
                left = self._send_now(cap, frame, fds)
                if left is not None:
                    cap.outbox[0] = left
                    cap.account.queued_bytes += len(left[0]) - len(frame)
                    cap.payer.charge_fds(len(left[1]) - len(fds))
                    continue
                cap.outbox.popleft()
                cap.account.queued_bytes -= len(frame)
                cap.payer.charge_fds(-len(fds))
                cap.account.wake_if_drained()
        except Exception:
            log.exception("capability of scheme %d: dropped after an internal error", cap.handle.scheme.id)
            self._release(cap)
        finally:
            cap.writing = False
            if cap.closed:
                self._drop_outbox(cap)
            if not cap.outbox:
                cap.outbox = None  # drained: give its memory back
            cap.wake()

    def _drop_outbox(self, cap: Capability) -> None:
        account = cap.account
        while cap.outbox:
            frame, fds = cap.outbox.popleft()
            P.close_fds(fds)
            account.queued_bytes -= len(frame)
            cap.payer.charge_fds(-len(fds))
        account.wake_if_drained()

    def _settle(self, cap: Capability) -> None:
        """One of cap's requests was answered (or never will be): it is no longer in flight."""
        cap.inflight -= 1
        cap.account.inflight -= 1
        cap.wake()
        cap.account.wake_if_drained()
        if cap.closed:
            self._forget_if_idle(cap.account)

    # -- requests ------------------------------------------------------------

    async def _on_request(self, cap: Capability, data: bytes, flags: int, fds: list[int], cred) -> None:
        self.frames += 1
        try:
            request = Request.decode(data)
        except P.ProtocolError:
            request = None
        if flags & P.TRUNCATED or request is None:
            P.close_fds(fds)
            whole = request is not None and flags & P.TRUNCATED == MSG_CTRUNC
            # The buffer fits every fd a message can carry, so a control truncation of a
            # whole frame means Linux could not give us the fds: we are out of them.
            self._reply(cap, Request.tag_of(data), P.ERR, errno.EMFILE if whole else errno.EINVAL)
            return
        op, tag = request.op, request.tag
        if op < P.FIRST_SCHEME_OP:
            try:
                payer = None
                if request.serving is not None:  # a daemon clones or creates for a client
                    served = self._served_caller(request.serving, cred or (0, 0, 0))
                    if served is None:
                        self._reply(cap, tag, P.ERR, errno.EPERM)
                        return
                    if cap.account is self.system_account:  # see _answer_client
                        payer = self._account(served[1])
                await self._kernel_op(cap, request, fds, payer)
            finally:
                P.close_fds(fds)
            return
        handle = cap.handle
        scheme = handle.scheme
        if scheme is self._kernel or not handle.current:
            P.close_fds(fds)
            self._reply(cap, tag, P.ERR, errno.EBADF if scheme is self._kernel else errno.EIO)
            return
        cred = cred or (0, 0, 0)
        for_account = None
        if request.serving is not None:
            served = self._served_caller(request.serving, cred)
            if served is None:
                P.close_fds(fds)
                self._reply(cap, tag, P.ERR, errno.EPERM)  # not a request the sender serves
                return
            cred, for_account = served
        if not scheme.alive or scheme.restoring:
            self._hold_for_restart(scheme, Held(cap, tag, cred, op, bytes(request.body), fds,
                                                request.serving, for_account))
            return
        await self._forward(cap, tag, cred, op, request.body, fds, serving=request.serving,
                            for_account=for_account)

    def _served_caller(self, req_id: int, sender: tuple[int, int, int]
                       ) -> tuple[tuple[int, int, int], int] | None:
        """The caller of request req_id and the account it was made for, if the sender is
        the daemon serving it; else None.

        A daemon that forwards a request (opening a client's path for it) names the
        request it serves; the scheme it reaches then sees that request's caller,
        as Linux reported it to us. No process can claim a request it does not serve:
        the claim must come from the very process (pid and uid, from SO_PASSCRED) of
        the daemon the request was sent to, while it is still in flight there.
        """
        for scheme in self._served_by.get(sender[0], ()):
            waiter = scheme.pending.get(req_id)
            if waiter is not None:
                caller = waiter.caller()
                daemon = scheme.daemon
                if caller is None or daemon is None or daemon[:2] != sender[:2]:
                    return None
                return caller, waiter.account
        return None

    def _hold_for_restart(self, scheme: Scheme, parked: Held) -> None:
        """Hold a request for the next daemon of scheme (EIO if none is expected)."""
        cap = parked.cap
        if not (scheme.waiting_for_restart or scheme.restoring) or len(scheme.backlog) >= MAX_BACKLOG:
            P.close_fds(parked.fds)
            self._reply(cap, parked.tag, P.ERR, errno.EIO)
            return
        scheme.backlog.append(parked)
        cap.inflight += 1  # it waits like a request at the scheme, within the same bounds
        cap.account.inflight += 1
        cap.account.charge_fds(len(parked.fds))

    async def _forward(self, cap: Capability, tag: int, cred: tuple[int, int, int], op: int,
                       body: frames.Body, fds: list[int], counted: bool = False,
                       serving: int | None = None, for_account: int | None = None) -> None:
        """Send a request on to cap's scheme; takes ownership of fds.

        counted: the request already counts as in flight (it was parked).
        serving: the request this one serves, for the trace.
        for_account: the account of the client it serves (None: cap's own), which
            the scheme is told so that it serves clients in turn.
        """
        handle = cap.handle
        scheme = handle.scheme
        pid, uid, gid = cred
        account = cap.account
        if counted:
            account.charge_fds(-len(fds))
            if not handle.live:  # closed, or its scheme went down again
                self._settle(cap)
                P.close_fds(fds)
                self._reply(cap, tag, P.ERR, errno.EIO)
                return
        if fds and not account.room_for_caps(len(fds)):
            P.close_fds(fds)  # held while the scheme takes them: they count against the quota
            if counted:
                self._settle(cap)
            self._reply(cap, tag, P.ERR, errno.EMFILE)
            return
        try:
            refs = self._identify(scheme, fds) if fds else ()
        except OSError as exc:
            P.close_fds(fds)
            if counted:
                self._settle(cap)
            self._reply(cap, tag, P.ERR, exc.errno or errno.EIO)
            return
        req_id = next(self._req_ids)
        shown = account.id if for_account is None else for_account
        frame = SchemeRequest(req_id, handle.number, pid, uid, gid, op, refs, body, shown).encode()
        scheme.pending[req_id] = ClientRequest(cap, tag, cred, time.monotonic(), req_id, shown)
        if self._tracers:
            self._trace({"k": "call", "id": req_id, "parent": serving, "t": time.time(),
                         "pid": pid, "uid": uid, "scheme": scheme.id, "handle": handle.number,
                         "op": op, "account": account.id, "fds": len(fds),
                         "args": bytes(body[:TRACE_BODY])})
        if not counted:
            cap.inflight += 1
            cap.account.inflight += 1
        scheme.frames += 1
        if fds:
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
            if fds:
                account.charge_fds(-len(fds))
        if sent:
            P.close_fds(fds)
            return
        # The daemon was gone before it could have seen this request: it waits for the next
        # one like the requests that come while the scheme is down.
        self._settle(cap)
        self._hold_for_restart(scheme, Held(cap, tag, cred, op, bytes(body), fds, serving, for_account))

    def _identify(self, scheme: Scheme, fds: list[int]) -> tuple[int, ...]:
        """For each passed fd: its handle number if it is a capability of this scheme.

        Raises:
            OSError: fstat failed (out of memory).
        """
        refs = []
        for fd in fds:
            st = os.fstat(fd)
            cap = self._by_identity.get(identity(st))
            if cap is None:
                refs.append(P.NO_REF)
            elif cap.handle.scheme is scheme and cap.handle.live:
                refs.append(cap.handle.number)
            else:
                refs.append(P.FOREIGN_REF)
        return tuple(refs)

    async def _send_to_scheme(self, scheme: Scheme, frame: bytes, fds: list[int],
                              before_dying: int | None = None) -> bool:
        """Send a frame to scheme's daemon; False if it could not take it (it died).

        before_dying: the request id of the frame, which is taken out of the pending
        requests before they fail (the caller decides what becomes of it).
        """
        channel = scheme.channel
        if channel is None:
            if before_dying is not None:
                scheme.pending.pop(before_dying, None)
            return False
        try:
            await channel.send(frame, fds)
            return True
        except (OSError, trio.ClosedResourceError) as exc:
            if before_dying is not None:
                scheme.pending.pop(before_dying, None)
            if scheme.channel is channel:
                log.warning("scheme %d: send failed: %s", scheme.id, exc)
                self._scheme_died(scheme)
            return False

    # -- kernel operations ---------------------------------------------------

    async def _kernel_op(self, cap: Capability, request: Request, fds: list[int],
                         payer: Account | None = None) -> None:
        """Answer an operation of the router's own; fds stay the caller's.

        CLONE and GETFL work on any capability, SCHEME_CREATE on a kernel capability,
        the rest only on the supervisor's (EINVAL elsewhere, as for an unknown operation).
        """
        op = KERNEL_OPS.get(request.op)
        if (op is None or (op.kernel_only and cap.handle.scheme is not self._kernel)
                or (op.supervisor_only and cap is not self._supervisor_cap)):
            self._reply(cap, request.tag, P.ERR, errno.EINVAL)
            return
        await getattr(self, op.method)(cap, request, fds, payer)

    async def _op_clone(self, cap: Capability, request: Request, fds: list[int],
                            payer: Account | None = None) -> None:
        if not cap.handle.live:
            self._reply(cap, request.tag, P.ERR, errno.EIO)
            return
        try:
            fd = self.mint(cap.handle, cap.account, payer)
        except OSError as exc:
            self._refuse(cap, request.tag, exc)
            return
        self._reply(cap, request.tag, P.OK, None, [fd])

    async def _op_getfl(self, cap: Capability, request: Request, fds: list[int],
                            payer: Account | None = None) -> None:
        self._reply(cap, request.tag, P.OK, cap.handle.fdflags)

    async def _op_scheme_create(self, cap: Capability, request: Request, fds: list[int],
                            payer: Account | None = None) -> None:
        try:
            args = request.args()
            options = args[0] if args else {}
            if not isinstance(options, dict):
                raise TypeError("SCHEME_CREATE takes [options] or []")
        except (P.ProtocolError, TypeError):
            self._reply(cap, request.tag, P.ERR, errno.EINVAL)
            return
        # Only the supervisor's own kernel capability may let a scheme keep state here: a
        # scheme served by a client (created through a clone of the kernel capability)
        # could fill the router with fds.
        keeps = bool(options.get("keeps")) and cap is self._supervisor_cap
        self._scheme_create(cap, request.tag, keeps, payer)

    async def _op_scheme_restart(self, cap: Capability, request: Request, fds: list[int],
                            payer: Account | None = None) -> None:
        tag = request.tag
        try:
            (scheme_id,) = request.args()
            scheme = self._schemes[scheme_id]
        except (P.ProtocolError, TypeError, ValueError, KeyError):
            self._reply(cap, tag, P.ERR, errno.EINVAL)
            return
        if scheme.alive:
            # its daemon has exited but the EOF may not have reached us yet: wait for it
            self._nursery.start_soon(self._restart_when_dead, cap, tag, scheme)
            return
        self._restart(cap, tag, scheme)

    async def _restart_when_dead(self, cap: Capability, tag: int, scheme: Scheme) -> None:
        with trio.move_on_after(RESTART_WAIT):
            await scheme.died.wait()
        if scheme.alive:
            self._reply(cap, tag, P.ERR, errno.EBUSY)  # the old daemon still serves it
            return
        self._restart(cap, tag, scheme)

    def _restart(self, cap: Capability, tag: int, scheme: Scheme) -> None:
        try:
            channel_fd = self._attach_channel(scheme)
        except OSError as exc:
            self._refuse(cap, tag, exc)
            return
        self._reply(cap, tag, P.OK, scheme.id, [channel_fd])

    async def _op_account_new(self, cap: Capability, request: Request, fds: list[int],
                            payer: Account | None = None) -> None:
        self._account_new(cap, request.tag, request, fds)

    async def _op_trace(self, cap: Capability, request: Request, fds: list[int],
                            payer: Account | None = None) -> None:
        """A socket on which a record of every call and every reply follows (until closed).

        The records are msgpack maps with the raw arguments and values: the router
        never decodes them; the reader does (redoxcap/trace.py). A reader that does
        not keep up loses records (counted in the next one it gets), never slows us.
        """
        if len(self._tracers) >= MAX_TRACERS:
            self._reply(cap, request.tag, P.ERR, errno.EBUSY)
            return
        try:
            ours, theirs = self._socketpair()
        except OSError as exc:
            self._refuse(cap, request.tag, exc)
            return
        ours.setblocking(False)
        self._tracers.append(Tracer(ours))
        self._reply(cap, request.tag, P.OK, None, [theirs.detach()])

    def _trace_reply(self, scheme: Scheme, waiter: ClientRequest, reply: SchemeReply | None,
                     fds: list[int]) -> None:
        record = {"k": "reply", "id": waiter.req_id, "t": time.time(),
                  "dur": time.monotonic() - waiter.started, "scheme": scheme.id, "fds": len(fds),
                  "pid": waiter.cred[0]}
        if reply is None:
            record.update(status=P.ERR, value=P.pack(errno.EIO))
        else:
            record.update(status=reply.status, value=bytes(reply.body[:TRACE_BODY]),
                          handle=reply.handle)
        self._trace(record)

    def _trace(self, record: dict) -> None:
        """Send a record to every tracer that has room; never waits."""
        frame = None
        for tracer in list(self._tracers):
            if tracer.dropped:
                record["dropped"] = tracer.dropped
                frame = None
            frame = frame or P.pack(record)
            try:
                tracer.sock.send(frame, socket.MSG_DONTWAIT)
                tracer.dropped = 0
            except BlockingIOError:
                tracer.dropped += 1  # it reads too slowly: it loses records, we do not wait
            except OSError:
                self._tracers.remove(tracer)
                tracer.sock.close()
            record.pop("dropped", None)

    async def _op_kernel_status(self, cap: Capability, request: Request, fds: list[int],
                            payer: Account | None = None) -> None:
        try:
            args = request.args()
            options = args[0] if args else {}
            if not isinstance(options, dict):
                raise TypeError("KERNEL_STATUS takes [options] or []")
        except (P.ProtocolError, TypeError):
            self._reply(cap, request.tag, P.ERR, errno.EINVAL)
            return
        self._reply(cap, request.tag, P.OK, await self._status(options))

    def _refuse(self, cap: Capability, tag: int, exc: OSError) -> None:
        """Fail one request because the router could not make or take an fd."""
        if self.verbose:
            log.info("tag %d refused: %s", tag, exc)
        self._reply(cap, tag, P.ERR, exc.errno or errno.EIO)

    def _scheme_create(self, cap: Capability, tag: int, keeps: bool = False,
                       payer: Account | None = None) -> None:
        """A new scheme: its channel and root capability, charged to payer (the client a
        daemon creates it for; by default the asker's account)."""
        payer = payer or cap.account
        if not payer.room_for_caps(2):  # the router's end of the channel, and the root
            self._reply(cap, tag, P.ERR, errno.EMFILE)
            return
        scheme = Scheme(next(self._scheme_ids), keeps=keeps, restartable=cap is self._supervisor_cap,
                        payer=None if payer is self.system_account else payer)
        try:
            channel_fd = self._attach_channel(scheme)
        except OSError as exc:
            self._refuse(cap, tag, exc)
            return
        root = SchemeHandle(scheme, P.ROOT_HANDLE, scheme.generation, payer=scheme.payer)
        scheme.handles[P.ROOT_HANDLE] = root
        try:
            root_fd = self.mint(root, cap.account, payer)
        except OSError as exc:
            os.close(channel_fd)
            self._free_scheme(scheme)  # never registered: it just goes away
            self._refuse(cap, tag, exc)
            return
        self._schemes[scheme.id] = scheme
        self._reply(cap, tag, P.OK, scheme.id, [channel_fd, root_fd])

    def _account_new(self, cap: Capability, tag: int, request: Request, fds: list[int]) -> None:
        """ACCOUNT_NEW: clones of the passed capabilities, charged to a fresh account."""
        try:
            args = request.args()
            if not isinstance(args, list) or len(args) > 1 or not fds:
                raise ValueError("expected [limits or nil] and at least one capability")
            limits = self.client_limits.overridden(args[0] if args and args[0] is not None else {})
        except (P.ProtocolError, TypeError, ValueError):
            self._reply(cap, tag, P.ERR, errno.EINVAL)
            return
        try:
            originals = [self._capability_of(fd) for fd in fds]
        except OSError as exc:
            self._refuse(cap, tag, exc)
            return
        if any(c is None for c in originals):
            self._reply(cap, tag, P.ERR, errno.EBADF)  # not a capability
            return
        if not all(c.handle.live for c in originals):
            self._reply(cap, tag, P.ERR, errno.EIO)
            return
        account = Account(next(self._account_ids), limits, pool=self.client_pool)
        if not account.room_for_caps(len(originals)):
            self._reply(cap, tag, P.ERR, errno.EMFILE)
            return
        clones: list[int] = []
        try:
            for original in originals:
                clones.append(self.mint(original.handle, account))
        except OSError as exc:
            P.close_fds(clones)  # their EOF releases them
            self._refuse(cap, tag, exc)
            return
        self._accounts[account.id] = account
        self._reply(cap, tag, P.OK, account.id, clones)

    def _attach_channel(self, scheme: Scheme) -> int:
        """Give scheme a fresh request channel; returns the daemon's end.

        Raises:
            OSError: the router is out of fds (or memory); scheme is unchanged.
        """
        ours, theirs = self._socketpair()
        ours.setsockopt(socket.SOL_SOCKET, socket.SO_PASSCRED, 1)  # the daemon's pid on its frames
        scheme.channel = Channel(ours)
        (scheme.payer or self.system_account).charge_fds(1)  # our end, for as long as it is open
        self._set_daemon(scheme, None)
        scheme.attached += 1
        restart = scheme.attached > 1
        self._next_generation(scheme)
        scheme.alive = True
        scheme.died = trio.Event()
        scheme.waiting_for_restart = False
        self._nursery.start_soon(self._serve_scheme, scheme, scheme.channel)
        if restart:
            scheme.restoring = True
            self._nursery.start_soon(self._restore, scheme, scheme.channel)
        return theirs.detach()

    def _next_generation(self, scheme: Scheme) -> None:
        """Handles of the old generation go stale, but the kept ones move on with it."""
        scheme.generation += 1
        for number in scheme.kept:
            handle = scheme.handles.get(number)
            if handle is not None:
                handle.generation = scheme.generation

    async def _restore(self, scheme: Scheme, channel: Channel) -> None:
        """Give a restarted daemon the state kept for its handles, then the requests
        that waited for it; requests that come meanwhile wait behind them.

        RESUME goes first: whatever becomes of the restores, the new daemon numbers
        new handles above every number its predecessors used, so a new handle never
        takes the number of one the router still maps. A handle whose state cannot be
        handed back (the router out of fds even after a few tries) fails with EIO from
        then on; none is ever silently another.
        """
        try:
            resume = SchemeRequest(0, P.ROOT_HANDLE, 0, 0, 0, P.RESUME, (), P.pack([scheme.top + 1]))
            if not await self._send_to_scheme(scheme, resume.encode(), []):
                return  # it died again
            for number, kept in list(scheme.kept.items()):
                if scheme.channel is not channel:
                    return  # it died again
                if scheme.kept.get(number) is not kept:
                    continue  # its last capability closed meanwhile
                try:
                    await self._restore_one(scheme, number, kept)
                except OSError as exc:
                    log.warning("scheme %d: handle %d could not be restored (%s); it fails from now on",
                                scheme.id, number, exc)
                    self._fail_handle(scheme, number)
            while scheme.backlog and scheme.channel is channel:
                parked = scheme.backlog.popleft()
                await self._forward(parked.cap, parked.tag, parked.cred, parked.op, parked.body,
                                    parked.fds, counted=True, serving=parked.serving,
                                    for_account=parked.account)
        finally:
            if scheme.channel is channel:
                scheme.restoring = False

    async def _restore_one(self, scheme: Scheme, number: int, kept: Kept) -> None:
        """Send one handle's kept state to the scheme's new daemon (RESTORE, after as many
        RESTORE_MORE frames as its fds need): a copy of each fd, a new capability (held
        by the daemon, charged to the state's payer) for each handle it named.

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
                    if scheme.kept.get(number) is not kept:
                        return
            body = kept.body
            parts = max(-(-len(copies) // P.MAX_FDS), -(-len(body) // KEPT_PART), 1)
            for i in range(parts):
                chunk = copies[i * P.MAX_FDS : (i + 1) * P.MAX_FDS]
                frame = SchemeRequest(0, number, 0, 0, 0, P.RESTORE if i == parts - 1 else P.RESTORE_MORE,
                                      (P.NO_REF,) * len(chunk), body[i * KEPT_PART : (i + 1) * KEPT_PART])
                if not await self._send_to_scheme(scheme, frame.encode(), chunk):
                    return  # it died again: its successor is given the state
        finally:
            P.close_fds(copies)

    def _fail_handle(self, scheme: Scheme, number: int) -> None:
        """A kept handle the new daemon could not be given: forget its state, and let
        every request on it fail (EIO) as on any handle of a dead daemon."""
        self._forget_kept(scheme, number)
        handle = scheme.handles.get(number)
        if handle is not None and number != P.ROOT_HANDLE:
            handle.generation = -1  # never current again

    async def _status(self, options: dict) -> dict:
        """KERNEL_STATUS: counters, one page at a time, so that the reply always fits in
        a frame however many schemes, accounts and capabilities there are.

        Args:
            options: `schemes` (ids; default: the first STATUS_SCHEMES), `accounts` (ids;
                default: the first STATUS_ACCOUNTS), `holdings_after` (the last
                [account, scheme, handle] of the previous page; default: the first page),
                `detail` (false: do not ask the schemes how many handles they have and
                what they are; default true).

        Returns:
            `frames`, `summary` (totals), `schemes`, `accounts`, a page of `holdings`
            and `holdings_next` (the cursor of the next page, or nil).
        """
        schemes = _pick(self._schemes, options.get("schemes"), STATUS_SCHEMES)
        accounts = _pick(self._accounts, options.get("accounts"), STATUS_ACCOUNTS)
        after = options.get("holdings_after")
        after = tuple(after) if isinstance(after, list) and len(after) == 3 else None
        caps: dict[int, int] = {}
        holdings: dict[tuple[int, int, int], int] = {}  # (account, scheme, handle) -> capabilities
        for cap in self._by_identity.values():
            sid = cap.handle.scheme.id
            caps[sid] = caps.get(sid, 0) + 1
            key = (cap.account.id, sid, cap.handle.number)
            if after is None or key > after:
                holdings[key] = holdings.get(key, 0) + 1
        keys = sorted(holdings)
        page, more = keys[:HOLDINGS_PAGE], len(keys) > HOLDINGS_PAGE
        queries: dict[int, dict] = {}
        if options.get("detail", True):
            async with trio.open_nursery() as nursery:
                for scheme in schemes:
                    if scheme.alive:
                        queries[scheme.id] = reply = {}
                        nursery.start_soon(self._ask_status, scheme, reply)
        budget = DETAIL_BUDGET
        described = {}
        for s in schemes:
            detail, size = _bounded(queries.get(s.id, {}).get("detail"))
            if size > budget:
                detail, size = {"too large": True}, 0
            budget -= size
            described[str(s.id)] = {
                "alive": s.alive, "restarts": max(s.attached - 1, 0), "kept": len(s.kept),
                "frames": s.frames, "capabilities": caps.get(s.id, 0), "handles": len(s.handles),
                "scheme_handles": queries.get(s.id, {}).get("handles"), "detail": detail,
            }
        status = {
            "frames": self.frames,
            "summary": {"schemes": len(self._schemes), "accounts": len(self._accounts),
                        "capabilities": len(self._by_identity), "fd_limit": self.fd_limit,
                        "reserve": self.reserve, "client_fds": self.client_pool.used,
                        "client_fd_limit": self.client_pool.limit},
            "schemes": described,
            "accounts": {str(a.id): a.counters() for a in accounts},
            "holdings": [[*key, holdings[key]] for key in page],
            "holdings_next": list(page[-1]) if more and page else None,
        }
        while len(P.pack(status)) > STATUS_BUDGET and len(status["holdings"]) > 1:
            # the details made it large: a shorter page of holdings (the rest comes next)
            status["holdings"] = status["holdings"][: len(status["holdings"]) // 2]
            status["holdings_next"] = status["holdings"][-1][:3]
        return status

    async def _ask_status(self, scheme: Scheme, into: dict) -> None:
        send, recv = trio.open_memory_channel(1)
        req_id = next(self._req_ids)
        scheme.pending[req_id] = StatusQuery(send)
        frame = SchemeRequest(req_id, P.ROOT_HANDLE, 0, 0, 0, P.SCHEME_STATUS, (), EMPTY_ARGS).encode()
        with trio.move_on_after(STATUS_TIMEOUT):
            await self._send_to_scheme(scheme, frame, [])
            try:
                status, value = await recv.receive()
            except trio.EndOfChannel:
                status, value = P.ERR, None  # the daemon died meanwhile
            if status == P.OK and isinstance(value, dict):
                into.update(value)
        scheme.pending.pop(req_id, None)

    # -- replies from schemes ------------------------------------------------

    async def _serve_scheme(self, scheme: Scheme, channel) -> None:
        try:
            while True:
                try:
                    data, fds, flags, cred = await channel.recv(P.CMSG_ALL)
                except (OSError, trio.ClosedResourceError):
                    break
                if not data and not fds:
                    break
                if cred is not None and cred != scheme.daemon and scheme.channel is channel:
                    self._set_daemon(scheme, cred)  # who serves the scheme, as Linux tells us
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
        req_id = SchemeReply.req_id_of(data)
        if req_id is None:
            P.close_fds(fds)
            log.warning("scheme %d: reply shorter than its header dropped", scheme.id)
            return
        status = SchemeReply.status_of(data)
        if status == P.KEEP or status == P.KEEP_MORE:
            self._on_keep(scheme, req_id, status, data, flags, fds)
            return
        if status == P.HELLO:  # its sender is now known (see _serve_scheme)
            P.close_fds(fds)
            return
        try:
            reply = SchemeReply.decode(data)
        except P.ProtocolError:
            reply = None  # a NEW_HANDLE without its handle
        waiter = scheme.pending.pop(req_id, None)
        failed = scheme.keep_failed.pop(req_id, None) if scheme.keep_failed else None
        if waiter is None or failed is not None:  # abandoned, never asked, or not kept
            P.close_fds(fds)
            if reply is not None and reply.status == P.NEW_HANDLE:
                self._close_unclaimed(scheme, reply.handle)  # nobody will get a capability for it
            if waiter is not None:  # acknowledged only once kept: its state could not be
                waiter.answered(self, scheme, SchemeReply.of(req_id, P.ERR, failed), 0, [])
            return
        waiter.answered(self, scheme, reply, flags, fds)

    def _on_keep(self, scheme: Scheme, req_id: int, status: int, data: bytes, flags: int,
                 fds: list[int]) -> None:
        """A daemon's state for one of its handles, to hold for a restart (KEEP_MORE: a
        part of it, more frames follow). Capabilities in it are kept as references to
        their handles (no fd); other fds are held and charged to the handle's payer.

        A state that cannot be held (out of fds, over the payer's quota, malformed)
        fails the request it was sent for (req_id): its reply becomes ERR, since it
        would not survive a restart, and the handle's older state is forgotten, so that
        a restart fails it rather than hand back more than it has now.
        """
        try:
            if not scheme.keeps:
                raise P.ProtocolError("this scheme may not keep state in the router")
            keep = Keep.decode(data)
            if keep.nfds > len(fds):
                raise P.ProtocolError("KEEP with more fds than it carries")
        except P.ProtocolError as exc:
            P.close_fds(fds)
            log.warning("scheme %d: bad KEEP dropped: %s", scheme.id, exc)
            if req_id:
                scheme.keep_failed[req_id] = errno.EIO
            return
        number = keep.handle
        part = scheme.partial.pop(number, None) or PartialKeep()
        items = part.items
        P.close_fds(fds[keep.nfds :])
        state_fds = fds[: keep.nfds]
        try:
            if flags & P.TRUNCATED:  # Linux could not give us every fd (out of them), or too long
                raise OSError(errno.EMFILE if flags & P.TRUNCATED == MSG_CTRUNC else errno.E2BIG,
                              "KEEP truncated")
            self._take_kept(items, state_fds)
            part.body += keep.body
            if len(items) > MAX_KEPT_ITEMS or len(part.body) > MAX_KEPT_BODY:
                raise OSError(errno.E2BIG, "state too large to keep")
            if status == P.KEEP_MORE:
                scheme.partial[number] = part
                return
            kept = Kept(items, bytes(part.body), self.system_account)
            self.system_account.charge_fds(len(kept.fds))
            self._store_kept(scheme, number, kept)
        except OSError as exc:
            P.close_fds(state_fds)  # those not taken yet (taken ones are -1)
            scheme.partial[number] = part
            self._drop_partial_keeps(scheme, number)
            if number in scheme.handles:
                self._forget_kept(scheme, number)
            log.warning("scheme %d: state of handle %d not kept: %s", scheme.id, number, exc)
            if req_id:
                scheme.keep_failed[req_id] = exc.errno or errno.EIO

    def _take_kept(self, items: list, fds: list[int]) -> None:
        """Append fds to a kept state: a capability as its handle (the fd is closed), any
        other fd as it is. Each fd taken is set to -1 in fds.

        Raises:
            OSError: fstat failed (out of memory).
        """
        for i, fd in enumerate(fds):
            cap = self._capability_of(fd)
            if cap is not None:
                cap.handle.refs += 1
                items.append(cap.handle)
                os.close(fd)
            else:
                items.append(fd)
            fds[i] = -1

    def _store_kept(self, scheme: Scheme, number: int, kept: Kept) -> None:
        """Hold a complete kept state for handle number (forgetting its older one).

        Raises:
            OSError: EMFILE when its fds do not fit in the quota of the handle's payer;
                kept is then given back.
        """
        if not kept.items and not kept.body:
            self._forget_kept(scheme, number)  # an empty KEEP forgets it
            return
        n = len(kept.fds)
        if number == P.ROOT_HANDLE or number in scheme.handles:
            handle = scheme.handles.get(number)
            payer = handle.payer if handle is not None and handle.payer is not None else self.system_account
            old = scheme.kept.get(number)
            held = len(old.fds) if old is not None and old.payer is payer else 0
            if n > held and not payer.room_for_caps(n - held):
                self._drop_kept(kept)
                raise OSError(errno.EMFILE, "quota of the handle's account exceeded")
            self._forget_kept(scheme, number)
            self._charge_kept(kept, payer)
            scheme.kept[number] = kept
        else:  # a new handle's state comes just before its NEW_HANDLE reply (see _relay)
            self._forget_kept(scheme, number)
            scheme.provisional[number] = kept

    def _answer_client(self, scheme: Scheme, waiter: ClientRequest, reply: SchemeReply | None,
                       flags: int, fds: list[int]) -> None:
        """Relay a scheme's reply (None: a malformed NEW_HANDLE) to the request's holder."""
        cap, tag = waiter.cap, waiter.tag
        self._settle(cap)
        new = (reply.handle, reply.fdflags) if reply is not None and reply.status == P.NEW_HANDLE else None
        if self._tracers:
            self._trace_reply(scheme, waiter, reply, fds)
        if flags & P.TRUNCATED:
            P.close_fds(fds)
            if new is not None:
                self._close_unclaimed(scheme, new[0])
            log.warning("scheme %d: truncated reply to tag %d", scheme.id, tag)
            # control truncation alone: Linux could not give us the fds it carried
            self._reply(cap, tag, P.ERR, errno.EMFILE if flags & P.TRUNCATED == MSG_CTRUNC else errno.EIO)
            return
        if reply is None:
            P.close_fds(fds)
            log.warning("scheme %d: NEW_HANDLE reply without a handle", scheme.id)
            self._reply(cap, tag, P.ERR, errno.EIO)  # the caller must not hang
            return
        # a daemon's request for a client (an open of a client's path through its
        # namespace): what it gets is held by the daemon and charged to the client. Only a
        # system daemon's: a client's own daemon serving another must not spend its quota.
        payer = (None if waiter.account == cap.account.id or cap.account is not self.system_account
                 else self._account(waiter.account))
        self._relay(scheme, cap, tag, P.OK if new is not None else reply.status, reply.body, fds, new,
                    payer)

    def _relay(self, scheme: Scheme, cap: Capability, tag: int, status: int, body: memoryview,
               fds: list[int], new: tuple[int, int] | None, payer: Account | None = None) -> None:
        """Pass a scheme's reply on to cap's holder, with its fds and any new capability.

        Capabilities in the reply count against cap's account from now on, and are
        charged to payer (by default that account too), with any state kept for a new
        handle; if they do not fit in its quota, or the router cannot mint, the reply
        becomes ERR (EMFILE, ENFILE...) and every fd it carried is closed.
        """
        account = cap.account
        payer = payer or account
        try:
            passed = [self._capability_of(fd) for fd in fds]
            moving = {id(c): c for c in passed
                      if c is not None and (c.account is not account or c.payer is not payer)}
            provisional = scheme.provisional.get(new[0]) if new is not None else None
            kept_fds = len(provisional.fds) if provisional is not None else 0
            charged = sum(1 for c in moving.values() if c.payer is not payer) if moving else 0
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
                scheme.top = max(scheme.top, number)
                if provisional is not None:  # its state came just before it: keep it now
                    del scheme.provisional[number]
                    self._forget_kept(scheme, number)
                    self._charge_kept(provisional, payer)
                    scheme.kept[number] = provisional
        except OSError as exc:
            P.close_fds(fds)  # capabilities among them reach EOF unless someone else holds them
            if new is not None:
                self._close_unclaimed(scheme, new[0])
            self._refuse(cap, tag, exc)
            return
        for moved in moving.values():
            self._move(moved, account, payer)
        self._deliver(cap, Reply(tag, status, body).encode(), fds)

    def _charge_kept(self, kept: Kept, payer: Account) -> None:
        """Charge a kept state's fds to payer from now on."""
        n = len(kept.fds)
        kept.payer.charge_fds(-n)
        payer.charge_fds(n)
        kept.payer = payer

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
        self._set_daemon(scheme, None)
        scheme.restoring = False
        scheme.keep_failed.clear()
        self._drop_partial_keeps(scheme)
        for number in list(scheme.provisional):  # their requests fail: the handles never were
            self._forget_kept(scheme, number)
        self._next_generation(scheme)
        # the root and the kept handles live on in the next daemon; the rest go stale
        scheme.handles = {n: h for n, h in scheme.handles.items() if h.current}
        pending, scheme.pending = scheme.pending, {}
        for waiter in pending.values():
            waiter.abandoned(self)
        if scheme.freed or not scheme.restartable:
            return  # no daemon will come: what comes for it now fails at once (EIO)
        scheme.waiting_for_restart = True
        self._nursery.start_soon(self._give_up_waiting, scheme, scheme.generation)

    def _set_daemon(self, scheme: Scheme, daemon: tuple[int, int, int] | None) -> None:
        """Note which process serves scheme now (from SO_PASSCRED; None: none)."""
        if scheme.daemon is not None:
            schemes = self._served_by.get(scheme.daemon[0])
            if schemes is not None:
                schemes.discard(scheme)
                if not schemes:
                    del self._served_by[scheme.daemon[0]]
        scheme.daemon = daemon
        if daemon is not None:
            self._served_by.setdefault(daemon[0], set()).add(scheme)

    async def _give_up_waiting(self, scheme: Scheme, generation: int) -> None:
        """Requests wait RESTART_WAIT seconds for a new daemon; then EIO, as before."""
        await trio.sleep(RESTART_WAIT)
        if scheme.generation != generation or scheme.alive:
            return  # it came back
        scheme.waiting_for_restart = False
        while scheme.backlog:
            parked = scheme.backlog.popleft()
            parked.cap.account.charge_fds(-len(parked.fds))
            P.close_fds(parked.fds)
            self._settle(parked.cap)
            self._reply(parked.cap, parked.tag, P.ERR, errno.EIO)


def _bounded(detail: object) -> tuple[object, int]:
    """A scheme's description of its handles, if it is small enough to pass on (a scheme
    served by a client must not be able to make every status reply huge), and its size."""
    if detail is None:
        return None, 0
    try:
        size = len(P.pack(detail))
    except (TypeError, ValueError, OverflowError):
        return None, 0
    return (detail, size) if size <= MAX_DETAIL else ({"too large": True}, 0)


def _pick(table: dict, ids: object, most: int) -> list:
    """The entries of table (keyed by id) that ids names, or the first ones by id; at
    most `most` either way."""
    if isinstance(ids, list):
        return [table[i] for i in ids[:most] if type(i) is int and i in table]
    return [table[i] for i in sorted(table)[:most]]


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
