"""The scheme framework: one class states the whole request protocol.

A scheme daemon subclasses `Scheme` and overrides the operations it serves;
every operation it does not override fails with ENOSYS. `serve()` reads
requests from the channel the kernel router gave the scheme, runs each in its
own task (a slow request never holds up the others), and turns what the
method returns or raises into the reply:

- a plain value            -> OK with that value
- `Opened(obj, fdflags)`   -> a new handle; the router mints a capability for it
- `Reply(value, fds)`      -> OK with fds passed to the caller (then closed here)
- `SchemeError` / OSError  -> ERR with its errno; any other exception -> EIO, logged

Handles are numbered by the framework; handle 0 is the root (`Scheme.root()`),
which the router keeps across daemon restarts. When the router says CLOSE,
in-flight requests on that handle are cancelled and `close()` is called.
"""

from __future__ import annotations

import argparse
import errno
import itertools
import logging
import os
import struct
import sys
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any

import trio

from wire import protocol as P
from wire.channel import Channel
from wire.limits import raise_fd_limit

log = logging.getLogger("scheme")

RESOLVE_FLAGS = P.O_RESOLVE_BENEATH | P.O_RESOLVE_IN_ROOT


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
    `root` created) and the request's arguments, already type-checked
    against wire.protocol.SCHEME_OPS.
    """

    name = "scheme"
    handles: dict[int, Any]  # number -> object, set by the framework when serving
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

    async def openat(self, req: Request, h: Any, path: str, flags: int, mode: int) -> Opened | Reply:
        """Open path relative to handle h."""
        raise SchemeError(errno.ENOSYS)

    async def read(self, req: Request, h: Any, n: int) -> bytes:
        """Read up to n bytes at the handle's offset; b"" at end of file."""
        raise SchemeError(errno.ENOSYS)

    async def write(self, req: Request, h: Any, data: bytes) -> int:
        """Write data; returns how many bytes were taken."""
        raise SchemeError(errno.ENOSYS)

    async def lseek(self, req: Request, h: Any, pos: int, whence: int) -> int:
        """Move the handle's offset; returns the new offset."""
        raise SchemeError(errno.ESPIPE)

    async def fstat(self, req: Request, h: Any) -> dict:
        """Status as a dict of os.stat_result field names (st_mode, st_size, ...)."""
        raise SchemeError(errno.ENOSYS)

    async def ftruncate(self, req: Request, h: Any, length: int) -> None:
        """Set the size of the handle's file."""
        raise SchemeError(errno.EINVAL)

    async def fsync(self, req: Request, h: Any) -> None:
        """Flush the handle's data to stable storage."""
        raise SchemeError(errno.EINVAL)

    async def getdents(self, req: Request, h: Any, start: int) -> list[str]:
        """The names in a directory handle, sorted, without . and .., from index start
        on, as many as fit in one reply (wire.protocol.page_of_names); [] past the end."""
        raise SchemeError(errno.ENOTDIR)

    async def fpath(self, req: Request, h: Any) -> str:
        """The handle's path as /scheme/NAME/..."""
        raise SchemeError(errno.ENOSYS)

    async def mkdirat(self, req: Request, h: Any, path: str, mode: int) -> None:
        """Create a directory at path relative to h."""
        raise SchemeError(errno.ENOSYS)

    async def unlinkat(self, req: Request, h: Any, path: str, flags: int) -> None:
        """Remove a name (a directory with AT_REMOVEDIR)."""
        raise SchemeError(errno.ENOSYS)

    async def renameat(self, req: Request, h: Any, old: str, new: str) -> None:
        """Rename old (relative to h) to new (relative to the passed HandleRef, or h)."""
        raise SchemeError(errno.ENOSYS)

    async def symlinkat(self, req: Request, h: Any, target: str, path: str) -> None:
        """Create a symlink at path whose contents are target."""
        raise SchemeError(errno.ENOSYS)

    async def readlinkat(self, req: Request, h: Any, path: str) -> str:
        """The contents of the symlink at path."""
        raise SchemeError(errno.ENOSYS)

    async def linkat(self, req: Request, h: Any, old: str, new: str) -> None:
        """Create a hard link new (relative to the passed HandleRef, or h) to old."""
        raise SchemeError(errno.ENOSYS)

    async def dup(self, req: Request, h: Any, buf: bytes) -> Opened | Reply:
        """A new handle derived from h; buf says how (b"" is a plain copy)."""
        raise SchemeError(errno.ENOSYS)

    async def shutdown(self, req: Request, h: Any, how: int) -> None:
        """Shut down one or both directions of a connection."""
        raise SchemeError(errno.ENOTSOCK)

    async def sendfd(self, req: Request, h: Any) -> None:
        """Queue the capability passed with the request for the peer of h to receive."""
        raise SchemeError(errno.EOPNOTSUPP)

    async def recvfd(self, req: Request, h: Any) -> Reply:
        """Receive the next capability sent by the peer (Reply with one fd)."""
        raise SchemeError(errno.EOPNOTSUPP)

    async def recvfrom(self, req: Request, h: Any, n: int) -> list:
        """Receive one datagram cut to n bytes: [data, sender host, sender port]."""
        raise SchemeError(errno.EOPNOTSUPP)

    async def sendto(self, req: Request, h: Any, data: bytes, host: str, port: int) -> int:
        """Send data as one datagram to host and port; returns the bytes sent."""
        raise SchemeError(errno.EOPNOTSUPP)

    async def ns_list(self, req: Request, h: Any) -> list[str]:
        """Namespaces (nsmgr): the names, sorted."""
        raise SchemeError(errno.ENOSYS)

    async def ns_mkns(self, req: Request, h: Any, names: list | None, perms: int | None) -> Opened:
        """Namespaces: a fork holding names (all for None) with at most perms."""
        raise SchemeError(errno.ENOSYS)

    async def ns_narrow(self, req: Request, h: Any, perms: int) -> None:
        """Namespaces: keep only perms on this handle."""
        raise SchemeError(errno.ENOSYS)

    async def ns_register(self, req: Request, h: Any, name: str) -> None:
        """Namespaces: register the passed capability as name."""
        raise SchemeError(errno.ENOSYS)

    async def ns_unregister(self, req: Request, h: Any, name: str) -> None:
        """Namespaces: remove name."""
        raise SchemeError(errno.ENOSYS)

    async def ns_perms(self, req: Request, h: Any) -> int:
        """Namespaces: this handle's permissions."""
        raise SchemeError(errno.ENOSYS)

    async def ns_scheme_create(self, req: Request, h: Any, name: str) -> Reply:
        """Namespaces: a new scheme registered as name; Reply with its channel fd."""
        raise SchemeError(errno.ENOSYS)

    async def close(self, h: Any) -> None:
        """The last capability for h is gone: release what it holds."""


class _Server:
    """The request loop for one scheme on one channel."""

    def __init__(self, scheme: Scheme, channel: Channel) -> None:
        self.scheme = scheme
        self.channel = channel
        self.handles: dict[int, Any] = {P.ROOT_HANDLE: scheme.root()}
        scheme.handles = self.handles  # lets two-handle operations resolve a HandleRef
        self.inflight: dict[int, set[trio.CancelScope]] = {}
        self.numbers = itertools.count(1)

    async def run(self) -> None:
        async with trio.open_nursery() as nursery:
            while True:
                data, fds, flags, _ = await self.channel.recv()
                if not data and not fds:
                    break  # the router is gone
                if flags & P.TRUNCATED or len(data) < P.SREQUEST.size:
                    P.close_fds(fds)
                    log.warning("%s: malformed frame from the router dropped", self.scheme.name)
                    continue
                req_id, number, pid, uid, gid, op, nrefs = P.SREQUEST.unpack_from(data)
                if op == P.CLOSE:
                    P.close_fds(fds)
                    nursery.start_soon(self._close, number)
                    continue
                args = (req_id, number, Caller(pid, uid, gid), op, nrefs, data, fds)
                if op in self.scheme.inline_ops:
                    await self._handle(*args)  # never blocks: no task, no cancel scope
                else:
                    nursery.start_soon(self._handle, *args)

    async def _close(self, number: int) -> None:
        obj = self.handles.pop(number, None)
        for scope in self.inflight.pop(number, ()):
            scope.cancel()
        if obj is not None:
            try:
                await self.scheme.close(obj)
            except Exception:
                log.exception("%s: close failed", self.scheme.name)

    def _passed(self, data: bytes, nrefs: int, fds: list[int]) -> tuple[list, int]:
        """Pair the ref slots with the relayed fds; returns (passed, body offset)."""
        if nrefs != len(fds):
            raise ValueError("fd count does not match the header")
        offset = P.SREQUEST.size
        passed: list[HandleRef | int | None] = []
        for fd in fds:
            (ref,) = P.REF.unpack_from(data, offset)
            offset += P.REF.size
            passed.append(fd if ref == P.NO_REF else HandleRef(ref, fd))
        return passed, offset

    async def _handle(self, req_id, number, caller, op, nrefs, data, fds) -> None:
        req = None
        try:
            try:
                passed, offset = self._passed(data, nrefs, fds)
            except (ValueError, struct.error):
                raise P.ProtocolError("bad fd references") from None
            req = Request(caller, number, op, passed)
            fds = []  # owned by req.passed now
            with memoryview(data) as frame:
                args = P.unpack(frame[offset:]) if op != P.SCHEME_STATUS else []
            del data  # the arguments are decoded: a request waiting in a daemon holds no frame
            result = await self._call(req, number, op, args)
        except (SchemeError, OSError) as exc:
            await self._send(req_id, P.ERR, exc.errno or errno.EIO)
        except P.ProtocolError:
            await self._send(req_id, P.ERR, errno.EINVAL)
        except trio.Cancelled:
            raise
        except Exception:
            log.exception("%s: op %d failed", self.scheme.name, op)
            await self._send(req_id, P.ERR, errno.EIO)
        else:
            await self._answer(req_id, result)
        finally:
            P.close_fds(fds)
            if req is not None:
                P.close_fds(req.passed_fds())

    async def _call(self, req: Request, number: int, op: int, args: Any) -> Any:
        if op == P.SCHEME_STATUS:
            return {"handles": len(self.handles) - 1, "requests": sum(map(len, self.inflight.values()))}
        spec = P.SCHEME_OPS.get(op)
        if spec is None:
            raise SchemeError(errno.ENOSYS, f"unknown operation {op}")
        name, types = spec
        if not isinstance(args, list) or len(args) != len(types):
            raise P.ProtocolError("wrong number of arguments")
        for arg, allowed in zip(args, types):
            if type(arg) not in allowed:
                raise P.ProtocolError("argument of the wrong type")
            if type(arg) is str:
                if "\0" in arg:
                    raise P.ProtocolError("a path or name with a NUL byte")
                if len(arg) > P.MAX_PATH:
                    raise SchemeError(errno.ENAMETOOLONG)
        if number not in self.handles:
            raise SchemeError(errno.EBADF)
        obj = self.handles[number]
        if op == P.OPENAT and args[1] & RESOLVE_FLAGS and not self.scheme.resolves_beneath:
            raise SchemeError(errno.EINVAL, f"the {self.scheme.name} scheme has no O_RESOLVE_* lookups")
        method = getattr(self.scheme, name)
        if op in self.scheme.inline_ops:
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
            try:
                body = P.pack(value)
            except (TypeError, ValueError, OverflowError, UnicodeEncodeError) as exc:
                # e.g. a host symlink whose target is not UTF-8: it cannot travel
                log.warning("%s: result of request %d cannot be encoded: %s", self.scheme.name, req_id, exc)
                await self._send(req_id, P.ERR, errno.EIO)
                return
            if isinstance(result, Opened):
                number = next(self.numbers)
                self.handles[number] = result.obj
                header = P.SREPLY.pack(req_id, P.NEW_HANDLE) + P.NEW_HANDLE_HDR.pack(number, result.fdflags)
            else:
                header = P.SREPLY.pack(req_id, P.OK)
            await self._send_frame(header + body, fds)
        finally:
            P.close_fds(fds)

    async def _send(self, req_id: int, status: int, value: Any) -> None:
        await self._send_frame(P.SREPLY.pack(req_id, status) + P.pack(value), [])

    async def _send_frame(self, frame: bytes, fds: list[int]) -> None:
        if len(frame) > P.MAX_FRAME:  # e.g. a huge directory listing: an error, not a lost reply
            req_id, _ = P.SREPLY.unpack_from(frame)
            log.warning("%s: reply to %d too large (%d bytes)", self.scheme.name, req_id, len(frame))
            frame, fds = P.SREPLY.pack(req_id, P.ERR) + P.pack(errno.EOVERFLOW), []
        try:
            await self.channel.send(frame, fds)
        except (OSError, trio.ClosedResourceError) as exc:
            # The router is gone (the request loop sees EOF next) or the frame
            # cannot be sent; either way there is no one to tell.
            log.warning("%s: reply not sent: %s", self.scheme.name, exc)


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
    parser = argparse.ArgumentParser(prog=f"python -m {module}", description=sys.modules["__main__"].__doc__)
    parser.add_argument("--channel-fd", type=int, required=True,
                        help="inherited scheme channel from the router's SCHEME_CREATE")
    if configure is not None:
        configure(parser)
    args = parser.parse_args()
    daemon_main(make(args), args.channel_fd)


def daemon_main(scheme: Scheme, channel_fd: int) -> None:
    """Entry point shared by the scheme daemons' __main__ modules."""
    logging.basicConfig(
        level=logging.WARNING,
        format=f"{scheme.name}[%(process)d] %(levelname)s %(message)s",
    )
    raise_fd_limit()
    try:
        trio.run(serve, scheme, channel_fd)
    except KeyboardInterrupt:
        pass
