"""The request protocol a scheme implements: the `Scheme` class, one method per operation.

What a method gets (a `Request`, the handle's object, the arguments checked
against wire/ops.py) and what it returns (a value, `Opened`, `Reply`) or
raises (`SchemeError`, the one errno-carrying error) are defined here; the
loop that calls the methods is in _server.py.
"""

from __future__ import annotations

import errno
import inspect
import os
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any, ClassVar, TypeVar

from redoxcap.wire import ops
from redoxcap.wire import protocol as P
from redoxcap.wire.stat import Stat

Method = TypeVar("Method", bound=Callable[..., Any])


class SchemeError(Exception):
    """The one error a scheme method raises: carries the errno for the reply."""

    def __init__(self, err: int, message: str = "") -> None:
        super().__init__(err, message or os.strerror(err))
        self.errno = err


class RunInTask(Exception):
    """Raised by a method the request loop calls in place (`Request.inline`) that finds it
    has long work to do (the file scheme's lookups that leave openat2's fast path): the
    framework calls it again for the same request in a task of its own, as it calls a
    method that is not in `inline_ops`. Raise it only before changing anything."""


def unserved(number: int) -> SchemeError:
    """The error of an operation a scheme does not serve: its declared errno (wire/ops.py)."""
    op = ops.BY_NUMBER[number]
    return SchemeError(op.default, f"{op.constant} is not served by this scheme")


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
    # The method runs in the request loop itself (an `inline_ops` operation): it must not
    # wait, nor work long; it raises RunInTask to be called again in a task (inline False).
    inline: bool = False

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


def takes(*kinds: type) -> Callable[[Method], Method]:
    """Declare the kinds of handle object an operation method takes.

    A request on a handle of any other kind is answered by the framework with
    the operation's `wrong_handle` errno (ENOTDIR for a path relative to a
    file, EBADF otherwise) without calling the method. A method without it
    takes every handle of its scheme.

        @takes(PipeRoot, PipeEnd)
        async def fstat(self, req: Request, h: PipeRoot | PipeEnd) -> Stat: ...

    Raises:
        TypeError: at import, for no kind, or a kind that is not a class or is any (object, Any).
    """
    if not kinds or not all(isinstance(kind, type) and kind not in (object, Any) for kind in kinds):
        raise TypeError(f"@takes needs the classes of the handles a method takes, not {kinds!r}")

    def declare(method: Method) -> Method:
        method.__takes__ = kinds  # type: ignore[attr-defined]
        return method

    return declare


class Scheme:
    """Base class of every scheme daemon: the whole request protocol, one method per operation.

    Each operation method gets the Request, the handle's object (whatever
    `root`, `openat` or `dup` made; `@takes` says which kinds it accepts) and
    the request's arguments, already type-checked against the operation's
    declaration in wire/ops.py. It returns the reply's value, an `Opened`
    (a new handle) or a `Reply` (a value and fds), and raises only
    `SchemeError`. Every method below answers its operation's declared errno
    (mostly ENOSYS): a scheme overrides the ones it serves.

    A subclass is checked when it is defined: every operation it answers has a
    coroutine method taking exactly the declared arguments, and `@takes` is on
    operations only. A mistake is a TypeError at import, never a check that is
    silently not made.
    """

    name = "scheme"
    handles: dict[int, Any]  # number -> object, set by the framework when serving
    # The operations this scheme answers: the scheme operations of wire/ops.py
    # (nsmgr adds the namespace ones).
    operations: tuple[ops.Operation, ...] = ops.SCHEME_OPERATIONS
    # Operations this scheme answers without ever waiting (plain syscalls, memory):
    # the request loop runs them in place, without a task of their own. Anything
    # that can wait for another client (a read on a pipe, an accept) must not be here;
    # a request that turns out to be long work raises RunInTask (served in a task).
    inline_ops: frozenset[int] = frozenset()
    # Whether openat implements O_RESOLVE_BENEATH / O_RESOLVE_IN_ROOT. A scheme
    # that does not refuses them with EINVAL: it never ignores a flag.
    resolves_beneath = False
    # op number -> the handle classes its method takes (@takes), built for each subclass
    handle_kinds: ClassVar[dict[int, tuple[type, ...]]] = {}

    def __init_subclass__(cls, **kwargs: Any) -> None:
        super().__init_subclass__(**kwargs)
        cls.handle_kinds = _declared_handle_kinds(cls)

    # -- the handles' life ---------------------------------------------------

    def root(self) -> Any:
        """The object behind handle 0 (the scheme's root)."""
        return None

    async def close(self, h: Any) -> None:
        """The last capability for h is gone: release what it holds."""

    def close_now(self, h: Any) -> bool:
        """Release h at once, if that cannot block (the server then needs no task for a
        CLOSE, which is half of every open+close); False leaves it to :meth:`close`."""
        return False

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

    # -- opening and naming --------------------------------------------------

    async def openat(self, req: Request, h: Any, path: str, flags: int, mode: int) -> Opened | Reply:
        """Open path relative to h (a directory, the scheme's root or a scope): a new handle,
        or a Reply with a host fd for O_PASSTHROUGH. Flags are Linux's plus O_RESOLVE_*
        (refused with EINVAL unless `resolves_beneath`)."""
        raise unserved(ops.OPENAT)

    async def dup(self, req: Request, h: Any, buf: bytes) -> Opened:
        """A new handle derived from h; buf says how (b"" is a plain copy with its own offset)."""
        raise unserved(ops.DUP)

    async def fpath(self, req: Request, h: Any) -> str:
        """h's path as /scheme/NAME/..."""
        raise unserved(ops.FPATH)

    async def fstat(self, req: Request, h: Any) -> Stat:
        """Status of h's file."""
        raise unserved(ops.FSTAT)

    async def statat(self, req: Request, h: Any, path: str, flags: int) -> Stat:
        """Status of the file at path relative to h, in one round trip (flags: O_NOFOLLOW for
        the link itself, O_RESOLVE_*; what openat with O_PATH and fstat answer)."""
        raise unserved(ops.STATAT)

    # -- data ------------------------------------------------------------------

    async def read(self, req: Request, h: Any, n: int) -> bytes:
        """Up to n bytes at h's offset; b"" at end of file."""
        raise unserved(ops.READ)

    async def write(self, req: Request, h: Any, data: bytes) -> int:
        """Write data; answer how many bytes were taken."""
        raise unserved(ops.WRITE)

    async def lseek(self, req: Request, h: Any, pos: int, whence: int) -> int:
        """Move h's offset; answer the new offset."""
        raise unserved(ops.LSEEK)

    async def ftruncate(self, req: Request, h: Any, length: int) -> None:
        """Set the size of h's file."""
        raise unserved(ops.FTRUNCATE)

    async def fsync(self, req: Request, h: Any) -> None:
        """Flush h's data to stable storage."""
        raise unserved(ops.FSYNC)

    # -- directories -----------------------------------------------------------

    async def getdents(self, req: Request, h: Any, start: int) -> list[str]:
        """The names in directory h, without . and .., from index start on, in an order
        that stays the same while h lists (the file scheme: the host directory's; others:
        sorted), as many as fit in one reply (`wire.protocol.page_of_names`)."""
        raise unserved(ops.GETDENTS)

    async def readdir(self, req: Request, h: Any, start: int) -> list[list]:
        """getdents with each entry's type: [name, d_type] (Linux's DT_*, 0 when unknown)."""
        raise unserved(ops.READDIR)

    async def mkdirat(self, req: Request, h: Any, path: str, mode: int) -> None:
        """Create a directory at path relative to h."""
        raise unserved(ops.MKDIRAT)

    async def unlinkat(self, req: Request, h: Any, path: str, flags: int) -> None:
        """Remove a name (a directory with flags AT_REMOVEDIR)."""
        raise unserved(ops.UNLINKAT)

    async def renameat(self, req: Request, h: Any, old: str, new: str) -> None:
        """Rename old (relative to h) to new (relative to the passed directory capability,
        `req.passed[0]`, or h)."""
        raise unserved(ops.RENAMEAT)

    async def linkat(self, req: Request, h: Any, old: str, new: str) -> None:
        """Create a hard link new (relative to the passed directory capability, or h) to old."""
        raise unserved(ops.LINKAT)

    async def symlinkat(self, req: Request, h: Any, target: str, path: str) -> None:
        """Create a symlink at path whose contents are target."""
        raise unserved(ops.SYMLINKAT)

    async def readlinkat(self, req: Request, h: Any, path: str) -> str:
        """The contents of the symlink at path."""
        raise unserved(ops.READLINKAT)

    # -- metadata --------------------------------------------------------------

    async def chmodat(self, req: Request, h: Any, path: str, mode: int, flags: int) -> None:
        """Set the permission bits (mode & 0o777; set-uid, set-gid and sticky are dropped) of
        the file at path relative to h, or of h's own file for an empty path (flags:
        O_NOFOLLOW, O_RESOLVE_*)."""
        raise unserved(ops.CHMODAT)

    async def utimensat(self, req: Request, h: Any, path: str, atime: int | None,
                        mtime: int | None, flags: int) -> None:
        """Set the access and modification times (ns since the epoch; None leaves one as it
        is) of the file at path relative to h, or of h's own for an empty path."""
        raise unserved(ops.UTIMENSAT)

    async def chownat(self, req: Request, h: Any, path: str, uid: int, gid: int, flags: int) -> None:
        """Accept a change of owner that changes nothing: each id -1, the caller's own or the
        file's; anything else is EPERM (a file is never given to another user)."""
        raise unserved(ops.CHOWNAT)

    async def hostdir(self, req: Request, h: Any) -> Reply:
        """The host directory behind directory handle h, for the broker's native lookups
        (docs/sandbox.md): answered only with the scheme's directfs grant passed along (an
        fd of the supervisor's that no client is given), by a scheme that allows
        passthrough."""
        raise unserved(ops.HOSTDIR)

    # -- connections -------------------------------------------------------------

    async def shutdown(self, req: Request, h: Any, how: int) -> None:
        """Shut down one or both directions of connection h."""
        raise unserved(ops.SHUTDOWN)

    async def sendfd(self, req: Request, h: Any) -> None:
        """Queue the capability passed with the request for the peer of h."""
        raise unserved(ops.SENDFD)

    async def recvfd(self, req: Request, h: Any) -> Reply:
        """The next capability the peer of h sent."""
        raise unserved(ops.RECVFD)

    async def recvfrom(self, req: Request, h: Any, n: int) -> list:
        """One datagram (cut to n bytes) and who sent it: [data, host, port]."""
        raise unserved(ops.RECVFROM)

    async def sendto(self, req: Request, h: Any, data: bytes, host: str, port: int) -> int:
        """Send data as one datagram to host and port; answer the bytes sent."""
        raise unserved(ops.SENDTO)


def _declared_handle_kinds(cls: type[Scheme]) -> dict[int, tuple[type, ...]]:
    """Check cls's operation methods against their declarations; the kinds each takes.

    Raises:
        TypeError: an operation without a coroutine method, a method whose parameters
            are not (self, req, h, *the declared arguments), or @takes on a method that
            is not one of cls's operations.
    """
    names = {op.name for op in cls.operations}
    for attr, value in vars(cls).items():
        if hasattr(value, "__takes__") and attr not in names:
            raise TypeError(f"{cls.__name__}.{attr}: @takes on a method that is not an operation")
    kinds = {}
    for op in cls.operations:
        method = getattr(cls, op.name, None)
        if method is None or not inspect.iscoroutinefunction(method):
            raise TypeError(f"{cls.__name__} answers {op.constant} but has no async method {op.name}")
        params = list(inspect.signature(method).parameters.values())
        if not any(p.kind is p.VAR_POSITIONAL for p in params) and len(params) != 3 + len(op.args):
            declared = ", ".join(["self", "req", "h", *(a.name for a in op.args)])
            raise TypeError(f"{cls.__name__}.{op.name} must take ({declared}), as wire/ops.py "
                            f"declares {op.constant}")
        if hasattr(method, "__takes__"):
            kinds[op.number] = method.__takes__
    return kinds
