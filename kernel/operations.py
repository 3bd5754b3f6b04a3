"""The operations the router answers itself, one function each, in one table.

CLONE and GETFL work on any capability; SCHEME_CREATE on a kernel capability
(the supervisor's, or a clone of it that a trusted daemon holds); the rest only
on the supervisor's own (EINVAL elsewhere, as for an unknown operation). Each
function gets the router's view (`Kernel`), the capability asked, the request's
undecoded arguments, the fds passed with it (the caller's: it closes them) and
the account to charge for what it makes (None: the asker's), and returns the
reply's value and fds; it raises OSError with the errno to answer instead (a
malformed argument is ProtocolError: EINVAL). The router sends the reply.
"""

from __future__ import annotations

import _socket
import errno
import os
from collections.abc import Awaitable, Callable
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any, Protocol

import trio

from redoxcap.kernel import status
from redoxcap.kernel.capabilities import SchemeHandle
from redoxcap.kernel.restart import RESTART_WAIT
from redoxcap.wire import protocol as P

if TYPE_CHECKING:
    from redoxcap.kernel.accounts import Account, Limits
    from redoxcap.kernel.capabilities import Capability, CapabilityTable
    from redoxcap.kernel.schemes import Scheme, SchemeTable
    from redoxcap.kernel.trace import Trace

Answer = tuple[Any, list[int]]  # the reply's value and the fds it carries (the reply owns them)


class Kernel(Protocol):
    """What the kernel's own operations use of the router."""

    supervisor_cap: Capability | None
    kernel_scheme: Scheme
    schemes: SchemeTable
    accounts: dict[int, Account]
    capabilities: CapabilityTable
    trace: Trace
    frames: int

    def mint(self, handle: SchemeHandle, account: Account, payer: Account | None = None) -> int: ...
    def socketpair(self) -> tuple[_socket.socket, _socket.socket]: ...
    def attach_channel(self, scheme: Scheme) -> int: ...
    def free_scheme(self, scheme: Scheme) -> None: ...
    def new_account(self, limits: Limits | dict) -> Account: ...
    def summary(self) -> dict: ...
    def request_id(self) -> int: ...
    async def send_to_scheme(self, scheme: Scheme, frame: bytes, fds: list[int]) -> bool: ...
    def reply(self, cap: Capability, tag: int, status: int, value, fds: list[int] | None = None
              ) -> None: ...
    def tidy(self) -> None: ...
    def start_soon(self, fn: Callable[..., Awaitable[Any]], *args: Any) -> None: ...


@dataclass(frozen=True, slots=True)
class KernelOp:
    """An operation the router answers itself.

    Attributes:
        run: the function (a coroutine function when `waits`).
        kernel_only: only a kernel capability may ask it.
        supervisor_only: only the supervisor's own may (the clones it hands to the
            daemons it trusts create schemes, and that is all).
        waits: it may wait (for a daemon, a scheme's answer): it runs in a task of its own.
    """

    run: Callable[..., Answer | Awaitable[Answer]]
    kernel_only: bool = True
    supervisor_only: bool = True
    waits: bool = False


def permitted(k: Kernel, cap: Capability, op: int) -> KernelOp | None:
    """The operation op of the router's own, if cap may ask it."""
    kop = OPERATIONS.get(op)
    if (kop is None or (kop.kernel_only and cap.handle.scheme is not k.kernel_scheme)
            or (kop.supervisor_only and cap is not k.supervisor_cap)):
        return None
    return kop


def answer(k: Kernel, kop: KernelOp, cap: Capability, body, fds: list[int],
           payer: Account | None) -> tuple[int, Any, list[int]]:
    """Run an operation that does not wait; its reply (status, value, fds). fds stay the caller's."""
    try:
        value, reply_fds = kop.run(k, cap, body, fds, payer)
    except P.ProtocolError:
        return P.ERR, errno.EINVAL, []
    except OSError as exc:
        return P.ERR, exc.errno or errno.EIO, []
    return P.OK, value, reply_fds


def serve(k: Kernel, cap: Capability, op: int, tag: int, body: memoryview, fds: list[int],
          payer: Account | None) -> None:
    """Answer op, an operation of the router's own, on cap (fds stay the caller's): at once,
    or in a task of its own for one that may wait."""
    kop = permitted(k, cap, op)
    if kop is None:
        k.reply(cap, tag, P.ERR, errno.EINVAL)
    elif kop.waits:
        k.start_soon(_serve_waiting, k, kop, cap, tag, bytes(body), payer)
    else:
        k.reply(cap, tag, *answer(k, kop, cap, body, fds, payer))


async def _serve_waiting(k: Kernel, kop: KernelOp, cap: Capability, tag: int, body: bytes,
                         payer: Account | None) -> None:
    k.reply(cap, tag, *await answer_waiting(k, kop, cap, body, payer))
    k.tidy()


async def answer_waiting(k: Kernel, kop: KernelOp, cap: Capability, body: bytes,
                         payer: Account | None) -> tuple[int, Any, list[int]]:
    """Run an operation that may wait (`KernelOp.waits`); its reply (status, value, fds)."""
    try:
        value, reply_fds = await kop.run(k, cap, body, [], payer)
    except P.ProtocolError:
        return P.ERR, errno.EINVAL, []
    except OSError as exc:
        return P.ERR, exc.errno or errno.EIO, []
    return P.OK, value, reply_fds


def _options(body: bytes | memoryview) -> dict:
    """The one optional map of arguments: [options], [nil] or []."""
    args = P.unpack(body)
    options = args[0] if isinstance(args, list) and args and args[0] is not None else {}
    if not isinstance(args, list) or not isinstance(options, dict):
        raise P.ProtocolError("takes [options] or []")
    return options


def clone(k: Kernel, cap: Capability, body, fds: list[int], payer: Account | None) -> Answer:
    """CLONE: a new capability for the same handle (shared offset), in the asker's
    account (charged to payer for a daemon serving a client)."""
    if not cap.handle.live:
        raise OSError(errno.EIO, "handle of a dead daemon")
    return None, [k.mint(cap.handle, cap.account, payer)]


def getfl(k: Kernel, cap: Capability, body, fds: list[int], payer: Account | None) -> Answer:
    """GETFL: the fd flags the scheme gave the handle."""
    return cap.handle.fdflags, []


def scheme_create(k: Kernel, cap: Capability, body, fds: list[int], payer: Account | None) -> Answer:
    """SCHEME_CREATE [options]: a new anonymous scheme, its id; fds: the daemon's end of its
    channel and its root capability, charged to payer (by default the asker's account)."""
    options = _options(body)
    # Only the supervisor's own kernel capability may let a scheme keep state here: a
    # scheme served by a client (created through a clone of the kernel capability)
    # could fill the router with fds.
    supervisor = cap is k.supervisor_cap
    keeps = bool(options.get("keeps")) and supervisor
    payer = payer or cap.account
    if not payer.room_for_caps(2):  # the router's end of the channel, and the root
        raise OSError(errno.EMFILE, "capability quota of the account exceeded")
    scheme = k.schemes.new(payer=None if payer.system else payer)
    scheme.restart.keeps, scheme.restart.restartable = keeps, supervisor
    channel_fd = k.attach_channel(scheme)
    root = SchemeHandle(scheme, P.ROOT_HANDLE, scheme.generation, payer=scheme.payer)
    scheme.handles[P.ROOT_HANDLE] = root
    try:
        root_fd = k.mint(root, cap.account, payer)
    except OSError:
        os.close(channel_fd)
        k.free_scheme(scheme)  # never registered: it just goes away
        raise
    k.schemes.add(scheme)
    return scheme.id, [channel_fd, root_fd]


async def scheme_restart(k: Kernel, cap: Capability, body, fds: list[int],
                         payer: Account | None) -> Answer:
    """SCHEME_RESTART [id]: a new channel for a scheme whose daemon died, once the router
    has seen the old one's channel end (EBUSY if it still serves after RESTART_WAIT)."""
    try:
        (scheme_id,) = P.unpack(body)
        scheme = k.schemes.by_id[scheme_id]
    except (TypeError, ValueError, KeyError):
        raise OSError(errno.EINVAL, "no such scheme") from None
    if scheme.alive:
        # its daemon has exited but the EOF may not have reached us yet: wait for it
        with trio.move_on_after(RESTART_WAIT):
            await scheme.died.wait()
        if scheme.alive:
            raise OSError(errno.EBUSY, "the old daemon still serves it")
    return scheme.id, [k.attach_channel(scheme)]


def account_new(k: Kernel, cap: Capability, body, fds: list[int], payer: Account | None) -> Answer:
    """ACCOUNT_NEW [limits]: clones of the passed capabilities, charged to a fresh account."""
    args = P.unpack(body)
    if not isinstance(args, list) or len(args) > 1 or not fds:
        raise P.ProtocolError("expected [limits or nil] and at least one capability")
    try:
        account = k.new_account(args[0] if args and args[0] is not None else {})
    except (TypeError, ValueError):
        raise P.ProtocolError("bad limits") from None
    originals = [k.capabilities.of_fd(fd) for fd in fds]
    if any(c is None for c in originals):
        raise OSError(errno.EBADF, "not a capability")
    if not all(c.handle.live for c in originals):
        raise OSError(errno.EIO, "handle of a dead daemon")
    if not account.room_for_caps(len(originals)):
        raise OSError(errno.EMFILE, "over the new account's quota")
    clones: list[int] = []
    try:
        for original in originals:
            clones.append(k.mint(original.handle, account))
    except OSError:
        P.close_fds(clones)  # their EOF releases them
        raise
    return account.id, clones


async def kernel_status(k: Kernel, cap: Capability, body, fds: list[int],
                        payer: Account | None) -> Answer:
    """KERNEL_STATUS [options]: one page of what the router holds (kernel/status.py)."""
    options = _options(body)
    schemes = status.schemes_asked(options, k.schemes.by_id)
    answers: dict[int, dict] = {}
    if options.get("detail", True):
        async with trio.open_nursery() as nursery:
            for scheme in schemes:
                if scheme.alive:
                    answers[scheme.id] = into = {}
                    nursery.start_soon(status.ask, scheme, into, k.request_id(), k.send_to_scheme)
    return status.page(options, schemes, k.accounts, k.capabilities, answers, k.frames,
                       k.summary()), []


def trace(k: Kernel, cap: Capability, body, fds: list[int], payer: Account | None) -> Answer:
    """TRACE: a socket on which a record of every call and every reply follows (until
    closed); kernel/trace.py."""
    if k.trace.full:
        raise OSError(errno.EBUSY, "too many tracers")
    ours, theirs = k.socketpair()
    k.trace.add(ours)
    return None, [theirs.detach()]


OPERATIONS: dict[int, KernelOp] = {
    P.CLONE: KernelOp(clone, kernel_only=False, supervisor_only=False),
    P.GETFL: KernelOp(getfl, kernel_only=False, supervisor_only=False),
    P.SCHEME_CREATE: KernelOp(scheme_create, supervisor_only=False),
    P.SCHEME_RESTART: KernelOp(scheme_restart, waits=True),
    P.ACCOUNT_NEW: KernelOp(account_new),
    P.KERNEL_STATUS: KernelOp(kernel_status, waits=True),
    P.TRACE: KernelOp(trace),
}
