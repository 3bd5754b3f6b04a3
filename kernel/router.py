"""The kernel router: a blind switch between capability sockets and schemes.

Every capability a process holds is one end of a SOCK_SEQPACKET pair; the
router holds the other end and maps it to a SchemeHandle (anonymous scheme id,
handle number, fd flags). A frame that arrives on a capability socket is
forwarded to the owning scheme with the handle and the sender's credentials
(SO_PASSCRED, filled in by Linux) prepended; the scheme's reply is routed back
by request id. Fds passed with a request are relayed to the scheme, each
marked with its handle number when it is a capability of that same scheme (so
rename can name a second directory). The router decodes only the fixed headers: it knows no scheme
names and never looks at a request's body.

When a scheme answers NEW_HANDLE the router mints a new capability pair.
When the last capability for a handle closes (EOF: the holder closed it or
died) the router sends CLOSE to the scheme. When a scheme's channel reaches
EOF (its daemon died) every pending request on it fails with EIO, every
handle except its root goes stale, and the scheme can be given a new channel
(SCHEME_RESTART) under the same id, so root capabilities keep working.
"""

from __future__ import annotations

import errno
import itertools
import logging
import os
import socket
from dataclasses import dataclass, field

import trio

from rt import protocol as P
from rt.channel import Channel

log = logging.getLogger("kernel")

KERNEL_SCHEME_ID = 0  # pseudo-scheme answering SCHEME_CREATE and friends
OP_NAMES = {op: name.upper() for op, (name, _) in P.SCHEME_OPS.items()}
STATUS_NAMES = {P.OK: "OK", P.ERR: "ERR", P.NEW_HANDLE: "NEW_HANDLE"}
STATUS_TIMEOUT = 3.0  # a scheme slower than this shows its handle count as unknown


@dataclass(eq=False)
class Scheme:
    """One anonymous scheme: its request channel and what is open on it."""

    id: int
    channel: Channel | None = None
    generation: int = 0
    alive: bool = False
    frames: int = 0
    pending: dict[int, tuple[Capability, int] | trio.MemorySendChannel] = field(
        default_factory=dict
    )
    handles: dict[int, SchemeHandle] = field(default_factory=dict)


@dataclass(eq=False)
class SchemeHandle:
    """A handle inside a scheme, shared by every capability cloned from it."""

    scheme: Scheme
    number: int
    generation: int
    fdflags: int = 0
    refs: int = 0

    @property
    def live(self) -> bool:
        s = self.scheme
        return s.alive and (self.number == P.ROOT_HANDLE or self.generation == s.generation)


@dataclass(eq=False)
class Capability:
    """The router's end of one capability socket."""

    channel: Channel
    handle: SchemeHandle
    # (st_dev, st_ino) of the holder's end: identifies the cap when it is passed back to
    # us. Both, or a file on another filesystem with the same inode number could pose as it.
    identity: tuple[int, int] | None


class Router:
    """All of the router's state; one instance per kernel process."""

    def __init__(self, nursery: trio.Nursery, trace: bool = False) -> None:
        self._nursery = nursery
        self.trace = trace  # log one line per request and per reply
        self._schemes: dict[int, Scheme] = {}
        self._scheme_ids = itertools.count(1)
        self._req_ids = itertools.count(1)
        self._by_identity: dict[tuple[int, int], Capability] = {}
        self._kernel = Scheme(KERNEL_SCHEME_ID, alive=True)
        self._kernel_handle = SchemeHandle(self._kernel, P.ROOT_HANDLE, 0)
        self.frames = 0
        self._supervisor_cap: Capability | None = None
        self.supervisor_gone = trio.Event()

    # -- capabilities --------------------------------------------------------

    def adopt_kernel_capability(self, fd: int) -> None:
        """Serve an inherited socket as the supervisor's kernel capability.

        The router runs until it closes; clones of it (held by trusted daemons) do not
        keep the router up once the supervisor is gone.
        """
        channel = Channel.from_fd(fd)
        channel.sock.setsockopt(socket.SOL_SOCKET, socket.SO_PASSCRED, 1)
        self._supervisor_cap = self._start_capability(channel, self._kernel_handle, identity=None)

    def mint(self, handle: SchemeHandle) -> int:
        """Create a capability for handle; returns the holder's end (caller owns it)."""
        ours, theirs = socket.socketpair(socket.AF_UNIX, socket.SOCK_SEQPACKET)
        try:
            ours.setsockopt(socket.SOL_SOCKET, socket.SO_PASSCRED, 1)
            st = os.fstat(theirs.fileno())
            self._start_capability(Channel(ours), handle, (st.st_dev, st.st_ino))
        except BaseException:
            ours.close()
            theirs.close()
            raise
        return theirs.detach()

    def _start_capability(self, channel: Channel, handle: SchemeHandle,
                          identity: tuple[int, int] | None) -> Capability:
        cap = Capability(channel, handle, identity)
        handle.refs += 1
        if identity is not None:
            self._by_identity[identity] = cap
        self._nursery.start_soon(self._serve_capability, cap)
        return cap

    async def _serve_capability(self, cap: Capability) -> None:
        try:
            while True:
                try:
                    data, fds, flags, cred = await cap.channel.recv(P.CMSG_ALL)
                except (OSError, trio.ClosedResourceError):
                    break
                if not data and not fds:
                    break  # EOF: every holder closed it or died
                await self._on_request(cap, data, flags, fds, cred)
        finally:
            self._release(cap)

    def _release(self, cap: Capability) -> None:
        cap.channel.close()
        if cap is self._supervisor_cap:
            self.supervisor_gone.set()  # clones given to trusted daemons do not keep us up
        if cap.identity is not None:
            self._by_identity.pop(cap.identity, None)
        handle = cap.handle
        handle.refs -= 1
        if handle.refs:
            return
        scheme = handle.scheme
        if scheme is self._kernel:
            return
        if scheme.handles.get(handle.number) is handle:
            del scheme.handles[handle.number]
        if handle.live and handle.number != P.ROOT_HANDLE:
            self._nursery.start_soon(self._send_close, scheme, handle.number)

    async def _send_close(self, scheme: Scheme, number: int) -> None:
        frame = P.SREQUEST.pack(0, number, 0, 0, 0, P.CLOSE, 0) + P.pack([])
        await self._send_to_scheme(scheme, frame, [])

    # -- requests ------------------------------------------------------------

    async def _on_request(self, cap, data: bytes, flags: int, fds: list[int], cred) -> None:
        self.frames += 1
        if flags & P.TRUNCATED or len(data) < P.REQUEST.size:
            P.close_fds(fds)
            tag = P.REQUEST.unpack_from(data)[1] if len(data) >= P.REQUEST.size else 0
            await self._reply(cap, tag, P.ERR, errno.EINVAL)
            return
        op, tag = P.REQUEST.unpack_from(data)
        if op < P.FIRST_SCHEME_OP:
            P.close_fds(fds)
            await self._kernel_op(cap, op, tag, data)
            return
        handle = cap.handle
        scheme = handle.scheme
        if scheme is self._kernel or not handle.live:
            P.close_fds(fds)
            await self._reply(cap, tag, P.ERR, errno.EBADF if scheme is self._kernel else errno.EIO)
            return
        pid, uid, gid = cred or (0, 0, 0)
        refs = self._identify(scheme, fds) if fds else []
        req_id = next(self._req_ids)
        header = P.SREQUEST.pack(req_id, handle.number, pid, uid, gid, op, len(refs))
        frame = b"".join([header, *refs, data[P.REQUEST.size :]])
        scheme.pending[req_id] = (cap, tag)
        scheme.frames += 1
        if self.trace:
            log.info("req %d: pid %d -> scheme %d handle %d %s (%d fds)", req_id, pid,
                        scheme.id, handle.number, OP_NAMES.get(op, op), len(fds))
        try:
            await self._send_to_scheme(scheme, frame, fds)
        finally:
            P.close_fds(fds)

    def _identify(self, scheme: Scheme, fds: list[int]) -> list[bytes]:
        """For each passed fd: its handle number if it is a capability of this scheme."""
        refs = []
        for fd in fds:
            st = os.fstat(fd)
            cap = self._by_identity.get((st.st_dev, st.st_ino))
            same = cap is not None and cap.handle.scheme is scheme and cap.handle.live
            refs.append(P.REF.pack(cap.handle.number if same else P.NO_REF))
        return refs

    async def _send_to_scheme(self, scheme: Scheme, frame: bytes, fds: list[int]) -> None:
        channel = scheme.channel
        if channel is None:
            return
        try:
            await channel.send(frame, fds)
        except (OSError, trio.ClosedResourceError) as exc:
            log.warning("scheme %d: send failed: %s", scheme.id, exc)
            self._scheme_died(scheme)

    async def _reply(self, cap: Capability, tag: int, status: int, value, fds=()) -> None:
        frame = P.encode_reply(tag, status, value)
        await self._send_raw(cap, frame, fds)

    async def _send_raw(self, cap: Capability, frame: bytes, fds) -> None:
        try:
            await cap.channel.send(frame, fds)
        except (OSError, trio.ClosedResourceError):
            pass  # the holder is gone; its EOF cleans up

    # -- kernel operations ---------------------------------------------------

    async def _kernel_op(self, cap: Capability, op: int, tag: int, data: bytes) -> None:
        handle = cap.handle
        if op == P.CLONE:
            if not handle.live:
                await self._reply(cap, tag, P.ERR, errno.EIO)
                return
            fd = self.mint(handle)
            try:
                await self._reply(cap, tag, P.OK, None, [fd])
            finally:
                os.close(fd)
        elif op == P.GETFL:
            await self._reply(cap, tag, P.OK, handle.fdflags)
        elif handle.scheme is self._kernel and op == P.SCHEME_CREATE:
            scheme = Scheme(next(self._scheme_ids))
            self._schemes[scheme.id] = scheme
            channel_fd = self._attach_channel(scheme)
            root = SchemeHandle(scheme, P.ROOT_HANDLE, scheme.generation)
            scheme.handles[P.ROOT_HANDLE] = root
            root_fd = self.mint(root)
            try:
                await self._reply(cap, tag, P.OK, scheme.id, [channel_fd, root_fd])
            finally:
                os.close(channel_fd)
                os.close(root_fd)
        elif handle.scheme is self._kernel and op == P.SCHEME_RESTART:
            try:
                (scheme_id,) = P.unpack(memoryview(data)[P.REQUEST.size :])
                scheme = self._schemes[scheme_id]
            except (P.ProtocolError, TypeError, ValueError, KeyError):
                await self._reply(cap, tag, P.ERR, errno.EINVAL)
                return
            if scheme.alive:
                await self._reply(cap, tag, P.ERR, errno.EBUSY)
                return
            channel_fd = self._attach_channel(scheme)
            try:
                await self._reply(cap, tag, P.OK, scheme.id, [channel_fd])
            finally:
                os.close(channel_fd)
        elif handle.scheme is self._kernel and op == P.KERNEL_STATUS:
            await self._reply(cap, tag, P.OK, await self._status())
        else:
            await self._reply(cap, tag, P.ERR, errno.EINVAL)

    def _attach_channel(self, scheme: Scheme) -> int:
        """Give scheme a fresh request channel; returns the daemon's end."""
        ours, theirs = socket.socketpair(socket.AF_UNIX, socket.SOCK_SEQPACKET)
        scheme.channel = Channel(ours)
        scheme.generation += 1
        scheme.alive = True
        self._nursery.start_soon(self._serve_scheme, scheme, scheme.channel)
        return theirs.detach()

    async def _status(self) -> dict:
        caps: dict[int, int] = {}
        for cap in self._by_identity.values():
            sid = cap.handle.scheme.id
            caps[sid] = caps.get(sid, 0) + 1
        queries = {}
        async with trio.open_nursery() as nursery:
            for scheme in self._schemes.values():
                if scheme.alive:
                    queries[scheme.id] = reply = {}
                    nursery.start_soon(self._ask_status, scheme, reply)
        return {
            "frames": self.frames,
            "schemes": {
                str(s.id): {
                    "alive": s.alive,
                    "restarts": s.generation - 1,
                    "frames": s.frames,
                    "capabilities": caps.get(s.id, 0),
                    "handles": len(s.handles),
                    "scheme_handles": queries.get(s.id, {}).get("handles"),
                }
                for s in self._schemes.values()
            },
        }

    async def _ask_status(self, scheme: Scheme, into: dict) -> None:
        send, recv = trio.open_memory_channel(1)
        req_id = next(self._req_ids)
        scheme.pending[req_id] = send
        frame = P.SREQUEST.pack(req_id, P.ROOT_HANDLE, 0, 0, 0, P.SCHEME_STATUS, 0) + P.pack([])
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
                    data, fds, flags, _ = await channel.recv()
                except (OSError, trio.ClosedResourceError):
                    break
                if not data and not fds:
                    break
                try:
                    await self._on_reply(scheme, data, flags, fds)
                except Exception:
                    P.close_fds(fds)
                    log.exception("scheme %d: bad reply dropped", scheme.id)
        finally:
            if scheme.channel is channel:
                self._scheme_died(scheme)
            channel.close()

    async def _on_reply(self, scheme: Scheme, data: bytes, flags: int, fds: list[int]) -> None:
        if flags & P.TRUNCATED or len(data) < P.SREPLY.size:
            raise P.ProtocolError("truncated or short reply")
        req_id, status = P.SREPLY.unpack_from(data)
        waiter = scheme.pending.pop(req_id, None)
        if self.trace:
            log.info("req %d: <- scheme %d %s (%d fds)", req_id, scheme.id, STATUS_NAMES.get(status, status), len(fds))
        if waiter is None:
            P.close_fds(fds)
            return  # the request was abandoned (its capability closed) or never existed
        body = memoryview(data)[P.SREPLY.size :]
        if isinstance(waiter, trio.MemorySendChannel):
            P.close_fds(fds)
            try:
                waiter.send_nowait((status, P.unpack(body)))
            except P.ProtocolError:
                waiter.send_nowait((P.ERR, errno.EIO))
            return
        cap, tag = waiter
        try:
            if status == P.NEW_HANDLE:
                if len(body) < P.NEW_HANDLE_HDR.size:
                    log.warning("scheme %d: NEW_HANDLE reply without a handle", scheme.id)
                    await self._reply(cap, tag, P.ERR, errno.EIO)  # the caller must not hang
                    return
                number, fdflags = P.NEW_HANDLE_HDR.unpack_from(body)
                body = body[P.NEW_HANDLE_HDR.size :]
                handle = scheme.handles.get(number)
                if handle is None:
                    handle = SchemeHandle(scheme, number, scheme.generation, fdflags)
                    scheme.handles[number] = handle
                fds.insert(0, self.mint(handle))
                status = P.OK
            await self._send_raw(cap, P.REPLY.pack(tag, status) + body, fds)
        finally:
            P.close_fds(fds)

    def _scheme_died(self, scheme: Scheme) -> None:
        if not scheme.alive:
            return
        if scheme.pending:
            log.warning("scheme %d: daemon gone; failing %d pending requests", scheme.id, len(scheme.pending))
        scheme.alive = False
        if scheme.channel is not None:
            scheme.channel.close()
            scheme.channel = None
        root = scheme.handles.get(P.ROOT_HANDLE)
        scheme.handles = {P.ROOT_HANDLE: root} if root is not None else {}
        pending, scheme.pending = scheme.pending, {}
        for waiter in pending.values():
            if isinstance(waiter, trio.MemorySendChannel):
                waiter.close()
            else:
                cap, tag = waiter
                self._nursery.start_soon(self._reply, cap, tag, P.ERR, errno.EIO)


async def main(kernel_fd: int, trace: bool = False) -> None:
    """Run the router until the supervisor's kernel capability is closed.

    Args:
        kernel_fd: an inherited SOCK_SEQPACKET socket to serve as the first
            kernel capability (the supervisor holds its other end).
        trace: log every request and reply (ids and operation names only).
    """
    async with trio.open_nursery() as nursery:
        router = Router(nursery, trace)
        router.adopt_kernel_capability(kernel_fd)
        await router.supervisor_gone.wait()
        nursery.cancel_scope.cancel()

