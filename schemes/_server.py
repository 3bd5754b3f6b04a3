"""The request loop of a scheme daemon: frames from the router in, method calls, replies out.

One `_Server` serves one `Scheme` on its channel: it decodes each request,
checks its arguments against the operation's declaration (wire/ops.py) and
its handle against the method's `@takes`, calls the method (in place for
`inline_ops`, else in a task of its own), and turns what the method returns
or raises into the reply. It also acts on the router's own frames (CLOSE,
RESTORE, RESUME) and hands the router the state of the handles a scheme
keeps (KEEP frames, or carried in a new handle's reply: NEW_HANDLE_KEPT).

Turns: the loop reads every frame waiting on the channel (while fewer than
MAX_BATCH requests wait to be served) into a queue per account, and serves
them one of each account in turn, each account's in the order they came. It
serves in place for at most TURN seconds before it yields and reads the
channel again; the requests left over keep their place, and those read
meanwhile take their turn among them. So a client whose requests are costly
(or many) makes another client's request wait for about one request of its
own, not for a batch of them. A method run in place that finds it has long
work to do raises RunInTask and is called again in a task.
"""

from __future__ import annotations

import collections
import errno
import itertools
import logging
import time
from collections.abc import Iterator
from typing import Any

import trio

from redoxcap.schemes._scheme import (
    Caller,
    HandleRef,
    Opened,
    Reply,
    Request,
    RunInTask,
    Scheme,
    SchemeError,
)
from redoxcap.wire import ops
from redoxcap.wire import protocol as P
from redoxcap.wire.channel import Channel
from redoxcap.wire.frames import Keep, SchemeReply, SchemeRequest
from redoxcap.wire.idle import ReadableWait
from redoxcap.wire.stat import Stat

log = logging.getLogger("scheme")

RESOLVE_FLAGS = P.O_RESOLVE_BENEATH | P.O_RESOLVE_IN_ROOT
# Requests read from the channel and waiting to be served, at most (the channel is read
# again once fewer wait): what they hold is bounded by what that many frames can hold.
MAX_BATCH = 256
TURN = 0.001  # seconds of requests served in place before the channel is read again
KEPT_PART = P.MAX_FRAME - 4096  # bytes of a kept state's body in one KEEP or KEEP_MORE frame


def check_handle(scheme: Scheme, op: ops.Operation, obj: Any) -> None:
    """Raise op's wrong_handle errno unless scheme's method for op takes handles like obj."""
    kinds = scheme.handle_kinds.get(op.number)
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
        self._closing: list[int] = []  # handles to close after the requests read before (CLOSE)
        # account -> its requests read and not yet served, in order; the account whose
        # turn is next first
        self._waiting: dict[int, collections.deque[tuple[SchemeRequest, list[int]]]] = {}
        self._nursery: trio.Nursery | None = None  # the request tasks' (while serving)
        self.numbers = itertools.count(1)
        # op number -> (its declaration, the scheme's bound method, the handle kinds it takes)
        self.operations = {op.number: (op, getattr(scheme, op.name), scheme.handle_kinds.get(op.number))
                           for op in scheme.operations}
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
        readable = ReadableWait(self.channel)
        try:
            await self._serve(readable)
        finally:
            readable.close()

    async def _serve(self, readable: ReadableWait) -> None:
        inline_ops = self.scheme.inline_ops
        waiting = self._waiting
        clock = time.perf_counter
        async with trio.open_nursery() as nursery:
            self._nursery = nursery
            drained = True
            while True:
                # The one yield per turn: waiting for the next frame lets every task that
                # the last turn started or woke run first (a checkpoint when frames or
                # requests are left). With nothing else to run, the wait is the channel's
                # own epoll_wait (wire/idle.py): no turn of trio's scheduler per frame.
                if drained and not waiting:
                    await readable()
                else:
                    await trio.lowlevel.checkpoint()
                drained = self._read_requests(nursery)
                if drained is None:
                    break  # the router is gone
                # one of each account in turn, for at most TURN: what is left waits for the
                # next turn, in its place
                end = clock() + TURN
                turn = self._in_turn()
                for request, fds in turn:
                    if request.op not in inline_ops:
                        nursery.start_soon(self._handle, request, fds)
                        continue
                    decoded = self._decode(request, fds, True)
                    if type(decoded) is int:
                        await self._send(request.req_id, P.ERR, decoded)
                    else:  # never blocks: no task, no cancel scope
                        await self._respond(*decoded)
                    if clock() > end:
                        break
                turn.close()
                # handles closed here and now go after the requests read before the
                # close, which their clients wait for (a close has no reply)
                if self._closing:
                    self._close_read(nursery)

    def _in_turn(self) -> Iterator[tuple[SchemeRequest, list[int]]]:
        """Take the waiting requests one of each account in turn, each account's in the
        order they came. Closed before the end, the accounts taken from in the round cut
        short go behind the others, so that the next turn goes on where this one stopped."""
        waiting = self._waiting
        while waiting:
            if len(waiting) == 1:  # one client: its requests in order
                account = next(iter(waiting))
                queue = waiting[account]
                while queue:
                    item = queue.popleft()
                    if not queue:  # gone before the yield: the turn may end there
                        del waiting[account]
                    yield item
                return
            order = list(waiting)
            taken = 0
            try:
                for account in order:
                    queue = waiting[account]
                    taken += 1
                    item = queue.popleft()
                    if not queue:
                        del waiting[account]
                    yield item
            finally:
                if taken < len(order):
                    for account in order[:taken]:
                        if account in waiting:
                            waiting[account] = waiting.pop(account)

    def _close_read(self, nursery: trio.Nursery) -> None:
        """Close the handles the router said CLOSE for, but those with requests still
        waiting for their turn (they are closed after them); one with requests in flight
        in a task of its own, which cancels them."""
        closing, self._closing = self._closing, []
        busy = {request.handle for queue in self._waiting.values() for request, _ in queue}
        for number in closing:
            if number in busy:
                self._closing.append(number)
            elif self.inflight.get(number) or not self._close_now(number):
                nursery.start_soon(self._close, number)

    def _read_requests(self, nursery: trio.Nursery) -> bool | None:
        """Read the frames waiting on the channel, while fewer than MAX_BATCH requests wait:
        each request goes to the back of its account's queue (`_waiting`). The router's
        own frames (CLOSE, RESTORE, RESUME) are acted on here, in the order they came.

        Taken in arrival order, a client with many requests in flight (up to its
        account's bound) would put them all in front of another client's one.

        Returns:
            whether the channel was read until it had nothing left (so that the next
            turn may wait for a frame); None when the router has gone away.
        """
        waiting = self._waiting
        room = MAX_BATCH - sum(map(len, waiting.values())) if waiting else MAX_BATCH
        while room > 0:
            try:
                received = self.channel.try_recv()
            except OSError:
                if not waiting:
                    raise
                return False  # the channel failed: the next read says how
            if received is None:
                return True
            data, fds, flags, _ = received
            if not data and not fds:
                # EOF: serve what came before the end; the next read sees it again
                return None if not waiting else False
            try:
                if flags & P.TRUNCATED:
                    raise P.ProtocolError("truncated")
                request = SchemeRequest.decode(data)
            except P.ProtocolError:
                P.close_fds(fds)
                log.warning("%s: malformed frame from the router dropped", self.scheme.name)
                continue
            del data  # the request holds what it needs
            if request.op == P.CLOSE:
                P.close_fds(fds)
                self._closing.append(request.handle)  # closed after the requests before it
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
                queue = waiting.get(request.account)
                if queue is None:
                    queue = waiting[request.account] = collections.deque()
                queue.append((request, fds))
                room -= 1
        return False

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

    async def _keep_changed(self, number: int, obj: Any, req_id: int) -> None:
        """Hand the router the new state of handle number (`keep_again`), before the reply
        to the request that changed it (req_id: the router fails that request if it cannot
        keep the state). Other requests on the handle may be changing it too: the state is
        taken and sent under a lock, so the last one sent is the last one taken.

        Raises:
            OSError: the state could not be sent (the request must fail: a restart would
                not bring it back).
        """
        async with self._keeping:
            state = self._state(obj)
            if state is not None:
                await self._send_kept(number, *state, req_id)

    def _state(self, obj: Any) -> tuple[bytes, list[int]] | None:
        """The scheme's `keep()` of handle object obj, encoded: (body, fds the handle owns),
        None if it keeps nothing.

        Raises:
            OSError: EIO, the state cannot be encoded.
        """
        state = self.scheme.keep(obj)
        if state is None:
            return None
        value, fds = state
        try:
            return P.pack(value), fds
        except (TypeError, ValueError, OverflowError) as exc:
            raise OSError(errno.EIO, f"state cannot be encoded: {exc}") from None

    async def _send_kept(self, number: int, body: bytes, fds: list[int], req_id: int) -> None:
        """Send a state as KEEP frames: KEEP_MORE ones while it needs more than one."""
        parts = max(-(-len(fds) // P.MAX_FDS), -(-len(body) // KEPT_PART), 1)
        try:
            for i in range(parts):
                part_fds = fds[i * P.MAX_FDS : (i + 1) * P.MAX_FDS]
                keep = Keep(number, len(part_fds), body[i * KEPT_PART : (i + 1) * KEPT_PART], req_id,
                            more=i < parts - 1)
                await self._put(keep.encode(), part_fds)
        except trio.ClosedResourceError:
            raise OSError(errno.EIO, "the router is gone") from None

    async def _keep_new(self, reply: SchemeReply, obj: Any, fds: list[int]
                        ) -> tuple[SchemeReply, list[int]]:
        """Have the router keep a new handle's state before its capability exists, so that
        no acknowledged handle is lost: in the NEW_HANDLE reply itself (NEW_HANDLE_KEPT, one
        frame) when it fits, else in KEEP frames sent first. Returns the reply to send and
        its fds (the state's, which the handle keeps owning, before the reply's own).

        Raises:
            OSError: the state cannot be encoded or sent.
        """
        state = self._state(obj)
        if state is None:
            return reply, fds
        body, state_fds = state
        if (len(state_fds) + len(fds) <= P.MAX_FDS
                and len(body) + len(reply.body) <= KEPT_PART):
            return reply.keeping(len(state_fds), body), [*state_fds, *fds]
        await self._send_kept(reply.handle, body, state_fds, reply.req_id)
        return reply, fds

    def _close_now(self, number: int) -> bool:
        """Close handle number (no request of it in flight or waiting: those read before
        the CLOSE were served, or started as tasks, as a close task would have let them)
        here and now, if the scheme can release it without blocking; False: a task of its
        own must (:meth:`_close`)."""
        obj = self.handles.get(number)
        if obj is not None:
            try:
                if not self.scheme.close_now(obj):
                    return False
            except Exception:
                log.exception("%s: close failed", self.scheme.name)
            del self.handles[number]
        return True

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
        """Serve one request in a task of its own."""
        req_id = request.req_id
        decoded = self._decode(request, fds, False)
        del request  # the arguments are decoded: a request waiting in a daemon holds no frame
        if type(decoded) is int:
            await self._send(req_id, P.ERR, decoded)
        else:
            await self._respond(*decoded)

    def _decode(self, request: SchemeRequest, fds: list[int], inline: bool
                ) -> tuple[Request, Any] | int:
        """The Request a method sees (owning fds from now on) and its decoded arguments;
        or the errno to answer, the fds closed."""
        try:
            if len(request.refs) != len(fds):
                raise P.ProtocolError("fd count does not match the header")
            args = request.args() if request.op != P.SCHEME_STATUS else []
        except P.ProtocolError:
            P.close_fds(fds)
            return errno.EINVAL
        except Exception:
            P.close_fds(fds)
            log.exception("%s: op %d not decoded", self.scheme.name, request.op)
            return errno.EIO
        passed = [fd if ref >= P.FOREIGN_REF else HandleRef(ref, fd)
                  for ref, fd in zip(request.refs, fds)]
        req = Request(Caller(request.pid, request.uid, request.gid), request.handle, request.op,
                      passed, id=request.req_id, refs=request.refs, account=request.account,
                      inline=inline)
        return req, args

    async def _respond(self, req: Request, args: Any) -> None:
        """Call req's method and answer it; the fds passed with it are closed after, unless
        the method asked to run in a task (RunInTask), which then owns them."""
        req_id = req.id
        moved = False
        try:
            result = await self._call(req, req.handle, req.op, args)
            if req.changed and req.handle in self.handles:
                try:
                    await self._keep_changed(req.handle, self.handles[req.handle], req_id)
                except BaseException:
                    _close_result(result)
                    raise
        except RunInTask:
            if not req.inline or self._nursery is None:
                log.error("%s: op %d asked for a task outside the loop", self.scheme.name, req.op)
                await self._send(req_id, P.ERR, errno.EIO)
            else:
                req.inline = False
                self._nursery.start_soon(self._respond, req, args)
                moved = True
        except (SchemeError, OSError) as exc:
            await self._send(req_id, P.ERR, exc.errno or errno.EIO)
        except P.ProtocolError:
            await self._send(req_id, P.ERR, errno.EINVAL)
        except trio.Cancelled:
            raise
        except Exception:
            log.exception("%s: op %d failed", self.scheme.name, req.op)
            await self._send(req_id, P.ERR, errno.EIO)
        else:
            await self._answer(req_id, result)
        finally:
            if not moved:
                P.close_fds(req.passed_fds())

    async def _call(self, req: Request, number: int, op_number: int, args: Any) -> Any:
        if op_number == P.SCHEME_STATUS:
            return {"handles": len(self.handles) - 1, "requests": sum(map(len, self.inflight.values())),
                    "detail": self.scheme.status(self.handles)}
        served = self.operations.get(op_number)
        if served is None:
            raise SchemeError(errno.ENOSYS, f"unknown operation {op_number}")
        op, method, kinds = served
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
        if kinds is not None and not isinstance(obj, kinds):
            raise SchemeError(op.wrong_handle, f"{op.name} does not take a {type(obj).__name__}")
        if op_number == P.OPENAT and args[1] & RESOLVE_FLAGS and not self.scheme.resolves_beneath:
            raise SchemeError(errno.EINVAL, f"the {self.scheme.name} scheme has no O_RESOLVE_* lookups")
        if req.inline:
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
        sent = fds  # a new handle's reply also sends its state's fds, which stay its own
        try:
            value = result.value if isinstance(result, (Opened, Reply)) else result
            if isinstance(value, Stat):
                value = value.to_wire()
            try:
                if isinstance(result, Opened):
                    number = next(self.numbers)
                    reply = SchemeReply.new_handle(req_id, number, result.fdflags, value)
                    self.handles[number] = result.obj
                    try:
                        reply, sent = await self._keep_new(reply, result.obj, fds)
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
            await self._send_reply(reply, sent)
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
            await self._put(frame, fds)
        except (OSError, trio.ClosedResourceError) as exc:
            # The router is gone (the request loop sees EOF next) or the frame
            # cannot be sent; either way there is no one to tell.
            log.warning("%s: reply not sent: %s", self.scheme.name, exc)

    async def _put(self, frame: bytes, fds: list[int]) -> None:
        """Send a frame to the router; a scheduler pass only when its socket is full (the
        request loop yields once per batch, not once per reply)."""
        if not self.channel.try_send(frame, fds):
            await self.channel.send(frame, fds)


def _close_result(result: Any) -> None:
    """Close the fds of a result that will not be sent (its handle object stays the
    method's: an Opened that was never numbered is the scheme's to forget)."""
    if isinstance(result, Reply):
        P.close_fds(result.fds)


