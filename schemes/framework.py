"""The scheme framework: one class states the whole request protocol.

A scheme daemon subclasses `Scheme` and overrides the operations it serves.
The operations are declared once, in wire/ops.py: every one a scheme does
not override answers that declaration's errno (ENOSYS for most), and every
request's arguments are checked against the declared types before any
method runs. `serve()` reads requests from the channel the kernel router
gave the scheme, runs each in its own task (a slow request never holds up
the others; `inline_ops` run in place), and turns what the method returns
or raises into the reply:

- a plain value            -> OK with that value (a wire.stat.Stat is sent as its map)
- `Opened(obj, fdflags)`   -> a new handle; the router mints a capability for it
- `Reply(value, fds)`      -> OK with fds passed to the caller (then closed here)
- `SchemeError` / OSError  -> ERR with its errno; any other exception -> EIO, logged

Handles are typed at the edge: the annotation of a method's `h` parameter
(`h: PipeEnd`, `h: NetRoot | TcpSocket`) says which kinds of handle object
it takes, and a request on any other kind is answered by the framework with
the operation's `wrong_handle` errno (ENOTDIR for a path relative to a
file, EBADF otherwise) without calling the method.

Handles are numbered by the framework; handle 0 is the root (`Scheme.root()`),
which the router keeps across daemon restarts. When the router says CLOSE,
in-flight requests on that handle are cancelled and `close()` is called.
"""

from __future__ import annotations

import argparse
import collections
import errno
import functools
import inspect
import itertools
import logging
import os
import stat
import sys
import types
import typing
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any

import trio

from wire import ops
from wire import protocol as P
from wire.channel import Channel
from wire.frames import Keep, SchemeReply, SchemeRequest
from wire.limits import forbid_core_dumps, raise_fd_limit
from wire.stat import Stat

log = logging.getLogger("scheme")

RESOLVE_FLAGS = P.O_RESOLVE_BENEATH | P.O_RESOLVE_IN_ROOT
# Frames taken from the channel at once and served in turn per account (_waiting_requests);
# what they hold is bounded anyway by what the channel's socket buffer held.
MAX_BATCH = 256
KEPT_PART = P.MAX_FRAME - 4096  # bytes of a kept state's body in one KEEP or KEEP_MORE frame
# A root that opens things but lists nothing: a directory with search permission only.
ROOT_STAT = Stat(st_mode=stat.S_IFDIR | 0o111, st_nlink=2)


class SchemeError(Exception):
    """The one error a scheme method raises: carries the errno for the reply."""

    def __init__(self, err: int, message: str = "") -> None:
        super().__init__(err, message or os.strerror(err))
        self.errno = err


@dataclass(frozen=True)
class Caller:
    """Who sent a request, as verified by Linux (SO_PASSCRED at the router)."""

    pid: int
    uid: int
    gid: int


@dataclass(frozen=True)
class HandleRef:
    """A capability of this same scheme that the caller passed with a request.

    `number` names the handle in `Scheme.handles`; `fd` is the capability
    itself (closed with the request unless taken with `Request.take_fd`).
    """

    number: int
    fd: int


@dataclass
class Request:
    """One request as a method sees it.

    `passed` holds, for each capability the caller attached, a HandleRef
    (it is one of ours) or the fd (anything else). Fds left in `passed` are
    closed when the method returns; a method keeps one with `take_fd`.
    """

    caller: Caller
    handle: int
    op: int
    passed: list[HandleRef | int | None] = field(default_factory=list)
    changed: bool = False  # see keep_again
    # The router's id of this request: a scheme that makes requests of other schemes to
    # serve this one passes it (AsyncCapability.call(..., serving=req.id)), and those
    # schemes then see this request's caller, not this daemon.
    id: int | None = None
    # for each passed fd, what the router said it is (wire.frames.SchemeRequest.refs)
    refs: tuple[int, ...] = ()
    account: int = 0  # the router account the request is for (the client's)

    def is_capability(self, index: int) -> bool:
        """Whether the index-th passed fd is a capability the router serves (of any
        scheme), not some other fd or socket of the caller's."""
        return 0 <= index < len(self.refs) and self.refs[index] != P.NO_REF

    def keep_again(self) -> None:
        """The state of this request's handle changed: before the reply goes out, the
        framework hands the router the scheme's new `keep()` of it."""
        self.changed = True

    def take_fd(self, index: int) -> int:
        """Take ownership of the index-th passed capability fd (EINVAL if there is none)."""
        item = self.passed[index] if 0 <= index < len(self.passed) else None
        if item is None:
            raise SchemeError(errno.EINVAL, "expected a capability fd")
        self.passed[index] = None
        return item.fd if isinstance(item, HandleRef) else item

    def passed_fds(self) -> list[int]:
        """The passed fds not taken yet."""
        return [x.fd if isinstance(x, HandleRef) else x for x in self.passed if x is not None]


@dataclass
class Opened:
    """Returned by an operation that creates a handle (openat, dup)."""

    obj: Any
    fdflags: int = 0
    value: Any = None


@dataclass
class Reply:
    """Returned by an operation that answers with fds; they are closed once sent."""

    value: Any = None
    fds: list[int] = field(default_factory=list)


class Changed:
    """Wakes every task waiting for a change of some state (an Event that re-arms).

    Schemes that block (pipes, in-daemon sockets) wait on one of these in a
    loop that re-checks their condition, and notify it whenever state changes.
    """

    def __init__(self) -> None:
        self._event = trio.Event()

    def notify(self) -> None:
        self._event.set()
        self._event = trio.Event()

    async def wait(self) -> None:
        await self._event.wait()


class Scheme:
    """Base class of every scheme daemon: one async method per operation.

    Each method gets the Request, the handle's object (whatever `openat` or
    `root` created; its annotation says which kinds it takes) and the
    request's arguments, already type-checked against wire/ops.py. The
    default of every operation (made from its declaration, see the end of
    this module) raises its errno.
    """

    name = "scheme"
    handles: dict[int, Any]  # number -> object, set by the framework when serving
    # The operations this scheme answers: the scheme operations of wire/ops.py
    # (nsmgr adds the namespace ones).
    operations: tuple[ops.Operation, ...] = ops.SCHEME_OPERATIONS
    # Operations this scheme answers without ever waiting (plain syscalls, memory):
    # the request loop runs them in place, without a task of their own. Anything
    # that can wait for another client (a read on a pipe, an accept) must not be here.
    inline_ops: frozenset[int] = frozenset()
    # Whether openat implements O_RESOLVE_BENEATH / O_RESOLVE_IN_ROOT. A scheme
    # that does not refuses them with EINVAL: it never ignores a flag.
    resolves_beneath = False

    def root(self) -> Any:
        """The object behind handle 0 (the scheme's root)."""
        return None

    async def close(self, h: Any) -> None:
        """The last capability for h is gone: release what it holds."""

    def status(self, handles: dict[int, Any]) -> Any:
        """What `redoxcap status` and `graph` show of this scheme's handles (a msgpack value).

        Args:
            handles: handle number -> object, every handle open now.
        """
        return None

    def keep(self, h: Any) -> tuple[Any, list[int]] | None:
        """What the router is to keep of handle h across a crash of this daemon.

        A scheme whose handles are host fds (the file scheme) or plain data (nsmgr)
        returns (a msgpack value, fds it still owns) and gets them back in
        `restore` in its next daemon; its clients then notice the crash as latency,
        not errors. None (the default): h dies with the daemon (EIO afterwards).
        Only schemes the supervisor created may keep state.
        """
        return None

    def restore(self, value: Any, fds: list[int]) -> Any:
        """The handle object for what `keep` returned, in the next daemon (fds are now ours)."""
        P.close_fds(fds)
        raise SchemeError(errno.ENOSYS, "this scheme keeps no state")


def _default(op: ops.Operation) -> Callable[..., Any]:
    async def operation(self: Scheme, req: Request, h: Any, *args: Any) -> Any:
        raise SchemeError(op.default)

    operation.__name__ = operation.__qualname__ = op.name
    operation.__doc__ = f"{op.doc} Not served by default: {errno.errorcode[op.default]}."
    return operation


for _op in ops.SCHEME_OPERATIONS:
    setattr(Scheme, _op.name, _default(_op))


@functools.cache
def _handle_kinds(cls: type) -> dict[int, tuple[type, ...]]:
    """For each operation whose method annotates its handle parameter, the classes it takes."""
    kinds = {}
    for op in cls.operations:
        method = getattr(cls, op.name)
        params = list(inspect.signature(method).parameters)  # self, req, the handle, args...
        try:
            hint = typing.get_type_hints(method).get(params[2]) if len(params) > 2 else None
        except (NameError, TypeError):
            hint = None  # an annotation that names nothing importable: no check
        classes = typing.get_args(hint) if isinstance(hint, types.UnionType) else (hint,)
        if hint is not None and all(isinstance(c, type) and c not in (object, Any) for c in classes):
            kinds[op.number] = tuple(classes)
    return kinds


def check_handle(scheme: Scheme, op: ops.Operation, obj: Any) -> None:
    """Raise op's wrong_handle errno unless scheme's method for op takes handles like obj."""
    kinds = _handle_kinds(type(scheme)).get(op.number)
    if kinds is not None and not isinstance(obj, kinds):
        raise SchemeError(op.wrong_handle, f"{op.name} does not take a {type(obj).__name__}")


async def invoke(scheme: Scheme, req: Request, obj: Any, name: str, *args: Any) -> Any:
    """Call scheme's method `name` on handle object obj as a request would, after the
    framework's check of the handle's kind (for tests that drive a scheme in memory)."""
    op = next(op for op in scheme.operations if op.name == name)
    check_handle(scheme, op, obj)
    return await getattr(scheme, name)(req, obj, *args)


class _Server:
    """The request loop for one scheme on one channel."""

    def __init__(self, scheme: Scheme, channel: Channel) -> None:
        self.scheme = scheme
        self.channel = channel
        self.handles: dict[int, Any] = {P.ROOT_HANDLE: scheme.root()}
        scheme.handles = self.handles  # lets two-handle operations resolve a HandleRef
        self.inflight: dict[int, set[trio.CancelScope]] = {}
        self.numbers = itertools.count(1)
        self.operations = {op.number: op for op in scheme.operations}
        # handle -> (fds, body) of a RESTORE that came in RESTORE_MORE frames so far
        self.restoring: dict[int, tuple[list[int], bytearray]] = {}
        # held while the new state of a changed handle is taken and sent: two changes of one
        # handle must reach the router in the order their states were taken, and the frames
        # of one KEEP must not have another's between them
        self._keeping = trio.Lock()

    async def run(self) -> None:
        # Who we are, before anything else: the router learns our pid from it (SO_PASSCRED)
        # and then believes our claims to serve the requests it sent us.
        await self._send_reply(SchemeReply.of(0, P.HELLO, None), [])
        async with trio.open_nursery() as nursery:
            while True:
                batch = await self._waiting_requests(nursery)
                if batch is None:
                    break  # the router is gone
                for request, fds in batch:
                    if request.op in self.scheme.inline_ops:
                        await self._handle(request, fds)  # never blocks: no task, no cancel scope
                        # and then the others' turn: requests whose answer came back (an
                        # open nsmgr forwarded) need not wait for the whole batch
                        await trio.lowlevel.checkpoint()
                    else:
                        nursery.start_soon(self._handle, request, fds)

    async def _waiting_requests(self, nursery: trio.Nursery
                                ) -> list[tuple[SchemeRequest, list[int]]] | None:
        """Every request waiting on the channel now (at least one, at most MAX_BATCH), in
        the order to serve them: one of each account in turn, each account's in the order
        they came. The router's own frames (CLOSE, RESTORE, RESUME) are acted on here, in
        the order they came. None when the router has gone away.

        Taken in arrival order, a client with many requests in flight (up to its
        account's bound) would put them all in front of another client's one.
        """
        queues: dict[int, collections.deque[tuple[SchemeRequest, list[int]]]] = {}
        received = await self.channel.recv()
        taken = 0
        while received is not None:
            data, fds, flags, _ = received
            if not data and not fds:
                if not queues:
                    return None
                break  # serve what came before the end; the next call sees it again
            taken += 1
            try:
                if flags & P.TRUNCATED:
                    raise P.ProtocolError("truncated")
                request = SchemeRequest.decode(data)
            except P.ProtocolError:
                P.close_fds(fds)
                log.warning("%s: malformed frame from the router dropped", self.scheme.name)
                request = None
            del data  # the request holds what it needs
            if request is None:
                pass
            elif request.op == P.CLOSE:
                P.close_fds(fds)
                nursery.start_soon(self._close, request.handle)
            elif request.op == P.RESTORE_MORE:
                part_fds, body = self.restoring.setdefault(request.handle, ([], bytearray()))
                part_fds.extend(fds)
                body += request.body
            elif request.op == P.RESTORE:
                part_fds, body = self.restoring.pop(request.handle, ([], bytearray()))
                body += request.body
                self._restore(request.handle, bytes(body), part_fds + fds)
            elif request.op == P.RESUME:
                P.close_fds(fds)  # it carries none; any that came are ours to close
                self._resume(request)
            else:
                queues.setdefault(request.account, collections.deque()).append((request, fds))
            if taken >= MAX_BATCH:
                break
            try:
                received = self.channel.try_recv()
            except OSError:
                break  # the channel failed: the next recv says how
        order = []
        while queues:
            for account in list(queues):
                queue = queues[account]
                order.append(queue.popleft())
                if not queue:
                    del queues[account]
        return order

    def _restore(self, number: int, body: bytes, fds: list[int]) -> None:
        """A handle the router kept for us while our predecessor died. One that cannot be
        restored (its fds lost to a daemon out of fds) answers EBADF from now on: its
        number is never given to another handle (RESUME came first)."""
        try:
            self.handles[number] = self.scheme.restore(P.unpack(body), fds)
        except Exception as exc:  # noqa: BLE001 - whatever the state was, the handle is lost
            P.close_fds(fds)
            log.warning("%s: handle %d could not be restored: %r", self.scheme.name, number, exc)

    def _resume(self, request: SchemeRequest) -> None:
        """Before the restores: number new handles above every number the router maps."""
        try:
            (first,) = request.args()
            self.numbers = itertools.count(max(int(first), max(self.handles) + 1))
        except (P.ProtocolError, TypeError, ValueError):
            log.warning("%s: malformed RESUME ignored", self.scheme.name)

    async def _send_keep(self, number: int, obj: Any, req_id: int, changed: bool = False) -> None:
        """Hand the router the scheme's state for handle number (nothing if it keeps none),
        in as many frames as it needs; req_id is the request it is kept for (the router
        fails that request if it cannot keep the state).

        changed: an existing handle's new state (`keep_again`), which other requests on
            it may be changing too: taken and sent under a lock, so the last one sent is
            the last one taken. A new handle's number is its own: no lock.

        Raises:
            OSError: the state could not be sent (the request must fail: a restart would
                not bring it back).
        """
        if not changed:
            await self._send_state(number, obj, req_id)
            return
        async with self._keeping:
            await self._send_state(number, obj, req_id)

    async def _send_state(self, number: int, obj: Any, req_id: int) -> None:
        state = self.scheme.keep(obj)
        if state is None:
            return
        value, fds = state
        try:
            body = P.pack(value)
        except (TypeError, ValueError, OverflowError) as exc:
            raise OSError(errno.EIO, f"state cannot be encoded: {exc}") from None
        parts = max(-(-len(fds) // P.MAX_FDS), -(-len(body) // KEPT_PART), 1)
        try:
            for i in range(parts):
                part_fds = fds[i * P.MAX_FDS : (i + 1) * P.MAX_FDS]
                keep = Keep(number, len(part_fds), body[i * KEPT_PART : (i + 1) * KEPT_PART], req_id,
                            more=i < parts - 1)
                await self.channel.send(keep.encode(), part_fds)
        except trio.ClosedResourceError:
            raise OSError(errno.EIO, "the router is gone") from None

    async def _close(self, number: int) -> None:
        obj = self.handles.pop(number, None)
        for scope in self.inflight.pop(number, ()):
            scope.cancel()
        if obj is not None:
            try:
                await self.scheme.close(obj)
            except Exception:
                log.exception("%s: close failed", self.scheme.name)

    async def _handle(self, request: SchemeRequest, fds: list[int]) -> None:
        req = None
        req_id = request.req_id
        try:
            if len(request.refs) != len(fds):
                raise P.ProtocolError("fd count does not match the header")
            passed = [fd if ref >= P.FOREIGN_REF else HandleRef(ref, fd)
                      for ref, fd in zip(request.refs, fds)]
            req = Request(Caller(request.pid, request.uid, request.gid), request.handle, request.op,
                          passed, id=req_id, refs=request.refs, account=request.account)
            fds = []  # owned by req.passed now
            args = request.args() if request.op != P.SCHEME_STATUS else []
            del request  # the arguments are decoded: a request waiting in a daemon holds no frame
            result = await self._call(req, req.handle, req.op, args)
            if req.changed and req.handle in self.handles:
                try:
                    await self._send_keep(req.handle, self.handles[req.handle], req_id, changed=True)
                except BaseException:
                    _close_result(result)
                    raise
        except (SchemeError, OSError) as exc:
            await self._send(req_id, P.ERR, exc.errno or errno.EIO)
        except P.ProtocolError:
            await self._send(req_id, P.ERR, errno.EINVAL)
        except trio.Cancelled:
            raise
        except Exception:
            log.exception("%s: op %d failed", self.scheme.name, req.op if req else -1)
            await self._send(req_id, P.ERR, errno.EIO)
        else:
            await self._answer(req_id, result)
        finally:
            P.close_fds(fds)
            if req is not None:
                P.close_fds(req.passed_fds())

    async def _call(self, req: Request, number: int, op_number: int, args: Any) -> Any:
        if op_number == P.SCHEME_STATUS:
            return {"handles": len(self.handles) - 1, "requests": sum(map(len, self.inflight.values())),
                    "detail": self.scheme.status(self.handles)}
        op = self.operations.get(op_number)
        if op is None:
            raise SchemeError(errno.ENOSYS, f"unknown operation {op_number}")
        if not isinstance(args, list) or len(args) != len(op.args):
            raise P.ProtocolError("wrong number of arguments")
        for value, arg in zip(args, op.args):
            if type(value) not in arg.types:
                raise P.ProtocolError(f"{op.name}: {arg.name} must be {arg.type_names}")
            if type(value) is str:
                if "\0" in value:
                    raise P.ProtocolError("a path or name with a NUL byte")
                if len(value) > P.MAX_PATH:
                    raise SchemeError(errno.ENAMETOOLONG)
        if number not in self.handles:
            raise SchemeError(errno.EBADF)
        obj = self.handles[number]
        check_handle(self.scheme, op, obj)
        if op_number == P.OPENAT and args[1] & RESOLVE_FLAGS and not self.scheme.resolves_beneath:
            raise SchemeError(errno.EINVAL, f"the {self.scheme.name} scheme has no O_RESOLVE_* lookups")
        method = getattr(self.scheme, op.name)
        if op_number in self.scheme.inline_ops:
            return await method(req, obj, *args)
        with trio.CancelScope() as scope:
            self.inflight.setdefault(number, set()).add(scope)
            try:
                return await method(req, obj, *args)
            finally:
                scopes = self.inflight.get(number)
                if scopes is not None:
                    scopes.discard(scope)
                    if not scopes:
                        del self.inflight[number]
        raise SchemeError(errno.EBADF, "handle closed during the request")

    async def _answer(self, req_id: int, result: Any) -> None:
        fds = result.fds if isinstance(result, Reply) else []
        try:
            value = result.value if isinstance(result, (Opened, Reply)) else result
            if isinstance(value, Stat):
                value = value.to_wire()
            try:
                if isinstance(result, Opened):
                    number = next(self.numbers)
                    reply = SchemeReply.new_handle(req_id, number, result.fdflags, value)
                    self.handles[number] = result.obj
                    # kept before the capability exists, so no acknowledged handle is lost
                    try:
                        await self._send_keep(number, result.obj, req_id)
                    except OSError as exc:
                        log.warning("%s: state of a new handle not kept: %s", self.scheme.name, exc)
                        await self._close(number)
                        await self._send(req_id, P.ERR, exc.errno or errno.EIO)
                        return
                else:
                    reply = SchemeReply.of(req_id, P.OK, value)
            except (TypeError, ValueError, OverflowError, UnicodeEncodeError) as exc:
                # e.g. a host symlink whose target is not UTF-8: it cannot travel
                log.warning("%s: result of request %d cannot be encoded: %s", self.scheme.name, req_id, exc)
                await self._send(req_id, P.ERR, errno.EIO)
                return
            await self._send_reply(reply, fds)
        finally:
            P.close_fds(fds)

    async def _send(self, req_id: int, status: int, value: Any) -> None:
        await self._send_reply(SchemeReply.of(req_id, status, value), [])

    async def _send_reply(self, reply: SchemeReply, fds: list[int]) -> None:
        frame = reply.encode()
        if len(frame) > P.MAX_FRAME:  # e.g. a huge directory listing: an error, not a lost reply
            log.warning("%s: reply to %d too large (%d bytes)", self.scheme.name, reply.req_id, len(frame))
            frame, fds = SchemeReply.of(reply.req_id, P.ERR, errno.EOVERFLOW).encode(), []
        try:
            await self.channel.send(frame, fds)
        except (OSError, trio.ClosedResourceError) as exc:
            # The router is gone (the request loop sees EOF next) or the frame
            # cannot be sent; either way there is no one to tell.
            log.warning("%s: reply not sent: %s", self.scheme.name, exc)


def _close_result(result: Any) -> None:
    """Close the fds of a result that will not be sent (its handle object stays the
    method's: an Opened that was never numbered is the scheme's to forget)."""
    if isinstance(result, Reply):
        P.close_fds(result.fds)


async def serve(scheme: Scheme, channel_fd: int) -> None:
    """Serve scheme on the channel fd the router gave it, until the router goes away.

    Args:
        scheme: the scheme to serve.
        channel_fd: this daemon's end of the scheme channel (ownership passes here).
    """
    channel = Channel.from_fd(channel_fd)
    try:
        await _Server(scheme, channel).run()
    finally:
        channel.close()


def daemon_cli(
    module: str,
    make: Callable[[argparse.Namespace], Scheme],
    configure: Callable[[argparse.ArgumentParser], None] | None = None,
) -> None:
    """`python -m MODULE --channel-fd N [options]`: the shared __main__ of scheme daemons.

    Args:
        module: the daemon's module name, for --help.
        make: builds the scheme from the parsed arguments.
        configure: adds the daemon's own options to the parser.
    """
    forbid_core_dumps()
    parser = argparse.ArgumentParser(prog=f"python -m {module}", description=sys.modules["__main__"].__doc__)
    parser.add_argument("--channel-fd", type=int, required=True,
                        help="inherited scheme channel from the router's SCHEME_CREATE")
    if configure is not None:
        configure(parser)
    args = parser.parse_args()
    daemon_main(make(args), args.channel_fd)


def daemon_main(scheme: Scheme, channel_fd: int) -> None:
    """Entry point shared by the scheme daemons' __main__ modules."""
    forbid_core_dumps()
    logging.basicConfig(
        level=logging.WARNING,
        format=f"{scheme.name}[%(process)d] %(levelname)s %(message)s",
    )
    raise_fd_limit()
    try:
        trio.run(serve, scheme, channel_fd)
    except KeyboardInterrupt:
        pass
