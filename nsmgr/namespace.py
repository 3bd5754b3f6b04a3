"""The namespace manager: a scheme whose handles are namespaces.

A namespace maps scheme names to capabilities (normally a scheme's root, but
any directory capability will do: that is how a subtree becomes `file` in a
child namespace). `openat(ns, "/scheme/NAME/rest")` is forwarded as
`openat(cap_of_NAME, "rest")` and the resulting fd is handed back; nsmgr takes
no part in anything done with that fd afterwards.

A directory registered as an entry is a boundary, whatever flags it was opened
with: nsmgr registers `openat(dir, ".", O_DIRECTORY | O_RESOLVE_IN_ROOT)` in
its place, so everything reached through the name stays inside it (`..` at its
top stays there, absolute symlinks mean the entry, and the flag sticks to every
fd opened through it). A scheme's root needs no such step, and keeps
surviving the scheme's restarts.

Errors follow Redox's nsmgr: a name not in the namespace is ENODEV, a missing
permission EACCES, registering an existing name EEXIST, a bad name or request
EINVAL. Stricter than Redox: a fork never gets a name or a permission its
parent handle lacks (asking for one is an error), and listings are sorted.
"""

from __future__ import annotations

import errno
import itertools
import os
import resource
import socket
import stat
from dataclasses import dataclass, field
from typing import Any

import trio

from redoxcap.nsmgr.generation import GenerationPage, retire
from redoxcap.schemes.framework import HandleRef, Opened, Reply, Request, Scheme, SchemeError
from redoxcap.wire import ops
from redoxcap.wire import protocol as P
from redoxcap.wire.aio import AsyncCapability
from redoxcap.wire.stat import Stat

SCHEME_PREFIX = "/scheme/"
STATUS_NAMESPACES = 48  # namespace handles `status` describes (the router passes 16 KiB on)
STATUS_NAMES = 24  # names of each it lists
SYSTEM_ACCOUNT = 0  # the router's account of the system's own requests
CLONES_AT_ONCE = 16  # clones a fork asks for at once: a namespace of thousands is no flood
# Entries a client's own capabilities make, in all namespaces together (NS_REGISTER, NS_MKNS's
# put): each is an fd of nsmgr's, which the router does not count again when a client
# registers the same capability under many names (a run's cwd 14,000 times took nsmgr to
# its last fd, and every new run failed). EMFILE past it, as for the capability quota: a
# client registers a handful (its own schemes' roots, a subtree as `file`), never hundreds.
MAX_PASSED_PER_ACCOUNT = 256
# The share of nsmgr's fd limit all clients' such entries may take together (ENFILE past
# it): the rest stays for what nsmgr does for every run.
PASSED_SHARE = 0.5


@dataclass(eq=False)
class Namespace:
    """One namespace handle: its names and what this handle may do with them."""

    entries: dict[str, AsyncCapability] = field(default_factory=dict)
    perms: int = P.PERM_ALL
    generation: int = 0  # changes so far (see nsmgr/generation.py)
    page: GenerationPage | None = None  # where holders read generation, once one asked
    root: bool = False  # the root namespace (handle 0)
    # name -> the client account whose capability it is (Passed: registered or put, not
    # cloned), for as long as the entry is
    payers: dict[str, int] = field(default_factory=dict)

    def changed(self) -> None:
        """Count a change: a holder that kept this namespace's roots drops them at its next open."""
        self.generation += 1
        if self.page is not None:
            self.page.value = self.generation

    def lookup(self, name: str) -> AsyncCapability:
        cap = self.entries.get(name)
        if cap is None:
            raise SchemeError(errno.ENODEV, f"no scheme {name!r} in this namespace")
        return cap

    def require(self, perm: int) -> None:
        if not self.perms & perm:
            raise SchemeError(errno.EACCES, "permission not granted to this namespace handle")


class Passed:
    """The entries clients' own capabilities make in namespaces, counted per account
    against the bounds (the system's, account 0, are not: the supervisor registers every
    daemon's root)."""

    def __init__(self, per_account: int, total: int) -> None:
        self.per_account, self.total = per_account, total
        self.accounts: dict[int, int] = {}
        self.count_all = 0

    def charge(self, account: int) -> None:
        """One more for account.

        Raises:
            SchemeError: EMFILE, account has per_account already; ENFILE, all have total.
        """
        if account == SYSTEM_ACCOUNT:
            return
        if self.accounts.get(account, 0) >= self.per_account:
            raise SchemeError(errno.EMFILE, f"{self.per_account} of this client's capabilities "
                              "are namespace entries already")
        if self.count_all >= self.total:
            raise SchemeError(errno.ENFILE, "nsmgr holds as many clients' capabilities as it may")
        self.count(account)

    def count(self, account: int) -> None:
        """One more for account, whatever the bounds (a restored namespace's)."""
        if account != SYSTEM_ACCOUNT:
            self.accounts[account] = self.accounts.get(account, 0) + 1
            self.count_all += 1

    def give_back(self, account: int | None) -> None:
        if account is None or account == SYSTEM_ACCOUNT:
            return
        left = self.accounts[account] - 1
        if left:
            self.accounts[account] = left
        else:
            del self.accounts[account]
        self.count_all -= 1


def split_scheme_path(path: str) -> tuple[str, str]:
    """'/scheme/NAME/rest' or legacy 'NAME:rest' -> (NAME, rest relative to its root).

    Raises:
        SchemeError: ENOENT for a path outside /scheme/, EINVAL for a bad name.
    """
    if path.startswith(SCHEME_PREFIX):
        name, _, rest = path[len(SCHEME_PREFIX) :].partition("/")
    elif ":" in path and "/" not in path.partition(":")[0]:
        name, _, rest = path.partition(":")
    else:
        raise SchemeError(errno.ENOENT, "a namespace path is /scheme/NAME/...")
    if not P.valid_scheme_name(name):
        raise SchemeError(errno.EINVAL, "bad scheme name")
    rest = rest.lstrip("/")
    return name, rest or "."


class NamespaceScheme(Scheme):
    """nsmgr's scheme: handle 0 is the root namespace, which holds every permission.

    Its handles also answer the namespace operations (NS_*), and every path
    operation is forwarded to the scheme the path names (_forwarder).
    """

    name = "nsmgr"
    operations = ops.SCHEME_OPERATIONS + ops.NAMESPACE_OPERATIONS
    resolves_beneath = True  # passed on to the scheme that owns the path, which decides

    def __init__(self, kernel_fd: int | None = None, max_passed_total: int | None = None) -> None:
        """max_passed_total: the entries of clients' capabilities all accounts may have
        together (default: a PASSED_SHARE of the soft RLIMIT_NOFILE now)."""
        self.kernel = AsyncCapability(kernel_fd) if kernel_fd is not None else None
        if max_passed_total is None:
            max_passed_total = int(resource.getrlimit(resource.RLIMIT_NOFILE)[0] * PASSED_SHARE)
        self.passed = Passed(MAX_PASSED_PER_ACCOUNT, max_passed_total)
        # account -> its turn at forking: a fork is a round trip per entry, so one client
        # forking from many threads takes no more of nsmgr than one doing it from one
        self._forking: dict[int, trio.Lock] = {}
        self._boot_page: GenerationPage | None = None  # the root's, until a restore replaces it

    def root(self) -> Namespace:
        """The root namespace, with its generation page from the start: it is the system's,
        lives as long as nsmgr, and every client's first open through it would make one."""
        ns = Namespace(root=True)
        try:
            ns.page = GenerationPage.create(0)
        except OSError:
            pass  # made when first asked for
        self._boot_page = ns.page
        return ns

    async def ns_scheme_create(self, req: Request, ns: Namespace, name: str) -> Reply:
        """A new scheme registered as name in this namespace; the caller gets its channel.

        Whoever holds the channel serves the scheme (schemes.framework.serve):
        this is how a client provides a scheme of its own, as in Redox.
        """
        ns.require(P.PERM_SCHEME_CREATE)
        if not P.valid_scheme_name(name):
            raise SchemeError(errno.EINVAL, "bad scheme name")
        if name in ns.entries:
            raise SchemeError(errno.EEXIST, f"{name!r} is already registered")
        if self.kernel is None:
            raise SchemeError(errno.ENOSYS, "this nsmgr was given no kernel capability")
        # serving the request: the router charges the scheme and its root to the caller
        _, fds = await self.kernel.call(P.SCHEME_CREATE, [], serving=req.id)
        if len(fds) != 2:
            P.close_fds(fds)
            raise SchemeError(errno.EIO, "malformed SCHEME_CREATE reply")
        channel, root = fds
        if name in ns.entries:  # registered while we waited
            P.close_fds([channel, root])
            raise SchemeError(errno.EEXIST, f"{name!r} is already registered")
        ns.entries[name] = AsyncCapability(root)
        ns.changed()
        req.keep_again()
        return Reply(None, [channel])

    # -- path operations: forwarded to the entry the path names ---------------

    async def openat(self, req: Request, ns: Namespace, path: str, flags: int, mode: int) -> Reply:
        """Open `/scheme/NAME/rest` as openat(NAME's entry, rest) and relay the capability."""
        name, rest = split_scheme_path(path)
        return Reply(None, [await ns.lookup(name).call_fd(ops.OPENAT, [rest, flags, mode], serving=req.id)])

    async def statat(self, req: Request, ns: Namespace, path: str, flags: int) -> Any:
        return await self._forward(req, ns, ops.STATAT, [path, flags])

    async def mkdirat(self, req: Request, ns: Namespace, path: str, mode: int) -> None:
        await self._forward(req, ns, ops.MKDIRAT, [path, mode])

    async def unlinkat(self, req: Request, ns: Namespace, path: str, flags: int) -> None:
        await self._forward(req, ns, ops.UNLINKAT, [path, flags])

    async def symlinkat(self, req: Request, ns: Namespace, target: str, path: str) -> None:
        await self._forward(req, ns, ops.SYMLINKAT, [target, path])

    async def readlinkat(self, req: Request, ns: Namespace, path: str) -> Any:
        return await self._forward(req, ns, ops.READLINKAT, [path])

    async def chmodat(self, req: Request, ns: Namespace, path: str, mode: int, flags: int) -> None:
        await self._forward(req, ns, ops.CHMODAT, [path, mode, flags])

    async def utimensat(self, req: Request, ns: Namespace, path: str, atime: int | None,
                        mtime: int | None, flags: int) -> None:
        await self._forward(req, ns, ops.UTIMENSAT, [path, atime, mtime, flags])

    async def chownat(self, req: Request, ns: Namespace, path: str, uid: int, gid: int,
                      flags: int) -> None:
        await self._forward(req, ns, ops.CHOWNAT, [path, uid, gid, flags])

    async def renameat(self, req: Request, ns: Namespace, old: str, new: str) -> None:
        await self._forward_two_paths(req, ns, ops.RENAMEAT, old, new)

    async def linkat(self, req: Request, ns: Namespace, old: str, new: str) -> None:
        await self._forward_two_paths(req, ns, ops.LINKAT, old, new)

    async def _forward(self, req: Request, ns: Namespace, number: int, args: list) -> Any:
        """A path operation whose answer is a value: the path (where wire/ops.py declares it)
        names the entry, and the rest of it goes there with the other arguments."""
        at = ops.BY_NUMBER[number].path
        name, args[at] = split_scheme_path(args[at])
        return await _forward(ns.lookup(name), number, args, serving=req.id)

    async def _forward_two_paths(self, req: Request, ns: Namespace, number: int, old: str,
                                 new: str) -> None:
        """old is a namespace path; new is relative to a passed directory capability, or
        another namespace path in the same scheme (EXDEV across schemes)."""
        name, old_rest = split_scheme_path(old)
        cap = ns.lookup(name)
        if req.passed:
            if len(req.passed) != 1:
                raise SchemeError(errno.EINVAL, "one directory capability at most")
            fd = req.take_fd(0)
            try:
                await _forward(cap, number, [old_rest, new], [fd], serving=req.id)
            finally:
                P.close_fds([fd])
            return
        new_name, new_rest = split_scheme_path(new)
        ns.lookup(new_name)
        if new_name != name:
            raise SchemeError(errno.EXDEV, "rename across schemes")
        await _forward(cap, number, [old_rest, new_rest], serving=req.id)

    async def fpath(self, req: Request, ns: Namespace) -> str:
        return "/scheme/"

    async def fstat(self, req: Request, ns: Namespace) -> Stat:
        return Stat(st_mode=stat.S_IFDIR | 0o555, st_size=len(ns.entries), st_nlink=2)

    async def getdents(self, req: Request, ns: Namespace, start: int) -> list[str]:
        return P.page_of_names(await self.ns_list(req, ns), start)

    # -- namespace operations ------------------------------------------------

    async def ns_list(self, req: Request, ns: Namespace) -> list[str]:
        ns.require(P.PERM_LIST)
        return sorted(ns.entries)

    async def ns_perms(self, req: Request, ns: Namespace) -> int:
        return ns.perms

    async def ns_root(self, req: Request, ns: Namespace, name: str, page: int) -> Reply:
        """A clone of name's entry (the scheme's root, or the in-root directory registered
        as name), for a holder to open the rest through itself, as an open of
        `/scheme/NAME` would; with page, also a read-only fd of the namespace's generation
        page (nsmgr/generation.py), made on first use. The value is the generation before
        the clone was taken. Charged to the caller, like anything it opens."""
        if not P.valid_scheme_name(name):
            raise SchemeError(errno.EINVAL, "bad scheme name")
        entry = ns.lookup(name)
        reader = self._page_reader(req, ns) if page else None
        generation = ns.generation
        try:
            root = await entry.call_fd(P.CLONE, serving=req.id)
        except BaseException:
            if reader is not None:
                os.close(reader)
            raise
        return Reply(generation, [root] if reader is None else [root, reader])

    @staticmethod
    def _page_reader(req: Request, ns: Namespace) -> int:
        """A reader of ns's page: one page per namespace, made when first asked for (and
        made anew when someone sealed the last one further)."""
        if ns.page is not None and not ns.page.live():
            ns.page.close()
            ns.page = None
        if ns.page is None:
            try:
                ns.page = GenerationPage.create(ns.generation)
            except OSError as exc:
                raise SchemeError(exc.errno or errno.ENOMEM, "no generation page") from None
            req.keep_again()  # kept with the namespace, charged to its payer
        try:
            return ns.page.reader()
        except OSError as exc:
            raise SchemeError(exc.errno or errno.EMFILE, "no generation page") from None

    async def ns_mkns(self, req: Request, ns: Namespace, names: list | None, perms: int | None,
                      put: list | None) -> Opened:
        """A fork of ns: its entries names (None: every one) cloned, with at most its perms.

        put: the names of the capabilities passed with the request, in order, each to stand
        in the fork as that name instead of ns's entry (not cloned, then) or as a new one,
        as an unregister and a register on the fork would: so ns needs INSERT, and DELETE
        for a name it would clone. One round trip where a run used three (its private uds
        scope in place of the system's).
        """
        if perms is None:
            perms = ns.perms
        if perms & ~ns.perms:
            raise SchemeError(errno.EACCES, "a fork cannot have more permissions than its parent")
        every = names is None
        if every:
            names = sorted(ns.entries)
        for name in names:
            if not P.valid_scheme_name(name):
                raise SchemeError(errno.EINVAL, "bad scheme name")
            ns.lookup(name)
        put = put or []
        if (len(put) != len(req.passed) or len(set(put)) != len(put)
                or not all(type(name) is str and P.valid_scheme_name(name) for name in put)):
            raise SchemeError(errno.EINVAL, "put names each passed capability once")
        if put:
            ns.require(P.PERM_INSERT)
            if set(put) & set(names):
                ns.require(P.PERM_DELETE)
            names = [name for name in names if name not in put]
        child = Namespace(perms=perms)
        turn = self._forking.setdefault(req.account, trio.Lock())
        try:
            async with turn:
                await self._clone_entries(req, ns, child, names, every)
            for index, name in enumerate(put):
                self.passed.charge(req.account)
                try:
                    child.entries[name] = await self._passed_entry(req, index)
                except BaseException:
                    self.passed.give_back(req.account)
                    raise
                child.payers[name] = req.account
        except BaseException:
            await self.close(child)
            raise
        finally:
            if not turn.locked() and not turn.statistics().tasks_waiting:
                self._forking.pop(req.account, None)
        return Opened(child)

    async def _clone_entries(self, req: Request, ns: Namespace, child: Namespace, names: list,
                             every: bool) -> None:
        """Clone ns's entries names into child (a name whose scheme is down for good is
        left out of a fork of every name).

        The clones are asked for at once (CLONES_AT_ONCE at a time), each on its own entry,
        so that a fork costs the router a pass, not a round trip per name (every run forks
        one). Whatever
        comes back is child's, and closed with it, on every path (an error, a cancel)."""
        entries = {}
        for name in dict.fromkeys(names):
            entry = ns.entries.get(name)
            if entry is None:  # unregistered while this fork waited for its turn
                if every:
                    continue
                raise SchemeError(errno.ENODEV, f"no scheme {name!r} in this namespace")
            entries[name] = entry
        answers: dict[str, int | OSError] = {}
        at_once = trio.CapacityLimiter(CLONES_AT_ONCE)

        async def clone(name: str, entry: AsyncCapability) -> None:
            try:  # serving the request: the clone is charged to the caller's account
                async with at_once:
                    answers[name] = await entry.call_fd(P.CLONE, serving=req.id)
            except OSError as exc:  # kept for the caller, in names' order, not raised here
                answers[name] = exc

        try:
            async with trio.open_nursery() as nursery:
                for name, entry in entries.items():
                    nursery.start_soon(clone, name, entry)
        finally:
            failure = None
            for name in entries:
                answer = answers.get(name)
                if isinstance(answer, int):
                    child.entries[name] = AsyncCapability(answer)
                elif isinstance(answer, OSError) and failure is None and not (
                        every and answer.errno == errno.EIO):  # EIO: a scheme down for good,
                    failure = answer                          # which a fork of "all" leaves out
        if failure is not None:
            raise failure

    async def ns_narrow(self, req: Request, ns: Namespace, perms: int) -> None:
        if perms & ~ns.perms:
            raise SchemeError(errno.EACCES, "permissions can only be narrowed")
        ns.perms = perms
        ns.changed()
        req.keep_again()

    async def ns_register(self, req: Request, ns: Namespace, name: str) -> None:
        """Register the passed capability as name; a directory becomes a boundary."""
        ns.require(P.PERM_INSERT)
        if not P.valid_scheme_name(name):
            raise SchemeError(errno.EINVAL, "bad scheme name")
        if len(req.passed) != 1:
            raise SchemeError(errno.EINVAL, "register takes exactly one capability")
        if name in ns.entries:
            raise SchemeError(errno.EEXIST, f"{name!r} is already registered")
        self.passed.charge(req.account)
        try:
            entry = await self._passed_entry(req, 0)
            if name in ns.entries:  # registered while we asked
                entry.close()
                raise SchemeError(errno.EEXIST, f"{name!r} is already registered")
        except BaseException:
            self.passed.give_back(req.account)
            raise
        ns.entries[name] = entry
        ns.payers[name] = req.account
        ns.changed()
        req.keep_again()

    @staticmethod
    async def _passed_entry(req: Request, index: int) -> AsyncCapability:
        """The index-th capability passed with req, taken as a namespace entry (_as_entry).

        Raises:
            SchemeError: EINVAL for what is not a capability of the router's (or is one of
                nsmgr's own namespaces); ENOTDIR (_as_entry).
        """
        if isinstance(req.passed[index], HandleRef):
            # nsmgr would hold a reference to itself: the namespace could never close
            raise SchemeError(errno.EINVAL, "a namespace cannot be registered in a namespace")
        if not req.is_capability(index):
            # a socket of the caller's own would have nsmgr talk to it outside the router,
            # where nothing bounds or charges what it sends back
            raise SchemeError(errno.EINVAL, "register takes a capability")
        fd = req.take_fd(index)
        try:
            with socket.socket(fileno=os.dup(fd)) as probe:
                if probe.type != socket.SOCK_SEQPACKET:
                    raise OSError(errno.EINVAL, "not a capability")
        except OSError:
            os.close(fd)
            raise SchemeError(errno.EINVAL, "register takes a capability (a SEQPACKET socket)") from None
        return await _as_entry(AsyncCapability(fd), req.id)

    async def ns_unregister(self, req: Request, ns: Namespace, name: str) -> None:
        ns.require(P.PERM_DELETE)
        cap = ns.lookup(name)
        del ns.entries[name]
        self.passed.give_back(ns.payers.pop(name, None))
        ns.changed()
        req.keep_again()
        cap.close()

    def status(self, handles: dict) -> dict:
        """Names and permissions of the first namespace handles, for `status` and `graph`
        (at most STATUS_NAMESPACES of them, STATUS_NAMES names each: it stays small)."""
        shown = itertools.islice(handles.items(), STATUS_NAMESPACES)
        return {"namespaces": {str(number): {"names": sorted(itertools.islice(ns.entries, STATUS_NAMES)),
                                             "perms": ns.perms}
                               for number, ns in shown},
                "count": len(handles)}

    def keep(self, ns: Namespace) -> tuple[dict, list[int]]:
        """A namespace is its entries, permissions and generation: the router keeps the
        entries' capabilities (and the generation page, if one was asked for) across a
        crash of nsmgr, and the next nsmgr serves the same namespace (so no client
        notices more than a delay)."""
        names = sorted(ns.entries)
        fds = [ns.entries[n].fileno() for n in names]
        if ns.page is not None:
            fds.append(ns.page.fd)
        return {"perms": ns.perms, "names": names, "generation": ns.generation,
                "page": ns.page is not None, "root": ns.root, "payers": ns.payers}, fds

    def restore(self, value: dict, fds: list[int]) -> Namespace:
        """The kept namespace, its generation counted on (a change may have been made but
        not kept before the crash: holders drop what they kept, to be sure). The last
        nsmgr's page is retired: nobody can write it any more (nsmgr/generation.py); the
        next holder that asks gets a new one."""
        try:
            names, perms = value["names"], value["perms"]
            generation, has_page = value.get("generation", 0), value.get("page", False)
            if (not isinstance(names, list) or len(names) + bool(has_page) != len(fds)
                    or type(perms) is not int or type(generation) is not int):
                raise ValueError("kept namespace does not match its fds")
        except (KeyError, TypeError, ValueError):
            P.close_fds(fds)
            raise
        if has_page:
            generation = max(generation, retire(fds.pop()))
        ns = Namespace({name: AsyncCapability(fd) for name, fd in zip(names, fds)}, perms,
                       generation, root=value.get("root") is True)
        payers = value.get("payers")
        if isinstance(payers, dict):  # counted again: they are still what they were
            for name, account in payers.items():
                if name in ns.entries and type(account) is int:
                    ns.payers[name] = account
                    self.passed.count(account)
        if ns.root:  # the page root() made for the root it replaces is the restored root's
            ns.page, self._boot_page = self._boot_page, None
        ns.changed()
        return ns

    async def close(self, ns: Namespace) -> None:
        entries, ns.entries = ns.entries, {}
        payers, ns.payers = ns.payers, {}
        for account in payers.values():
            self.passed.give_back(account)
        for cap in entries.values():
            cap.close()
        if ns.page is not None:
            ns.page.close()
            ns.page = None


async def _forward(cap: AsyncCapability, op: int, args: list, fds: list[int] = (),
                   serving: int | None = None) -> object:
    """A request on an entry whose answer carries no fds; any it carries are closed."""
    value, received = await cap.call(op, args, fds, serving)
    P.close_fds(received)
    return value


async def _as_entry(cap: AsyncCapability, serving: int | None = None) -> AsyncCapability:
    """What to keep for a registered capability (owned; the argument is consumed).

    A directory that is not a scheme's root (whose fpath is exactly
    `/scheme/NAME`) is reopened in-root at itself, so that nothing reached
    through the entry leaves it. A scheme's root, or a directory of a scheme
    without O_RESOLVE_* lookups (which answers EINVAL), is kept as it is:
    what an openat on it means is that scheme's business. Anything else (a
    file, a connection) is not a namespace entry: ENOTDIR. That also keeps
    cycles out: a connection whose queue holds this namespace could otherwise
    be held by it, and neither would ever close.

    Raises:
        SchemeError: ENOTDIR for a capability that is neither a directory nor a root.
    """
    try:
        st = await _forward(cap, P.FSTAT, [], serving=serving)
        is_dir = isinstance(st, dict) and stat.S_ISDIR(st.get("st_mode", 0))
    except OSError:
        is_dir = True  # a scheme that cannot say: try to make it a boundary
    try:
        where = await _forward(cap, P.FPATH, [], serving=serving)
    except OSError:
        where = None
    root = isinstance(where, str) and where.startswith(SCHEME_PREFIX) and "/" not in where[len(SCHEME_PREFIX):]
    if root:
        return cap
    if not is_dir:
        cap.close()
        raise SchemeError(errno.ENOTDIR, "a namespace entry is a directory or a scheme's root")
    try:
        fd = await cap.call_fd(P.OPENAT, [".", os.O_RDONLY | os.O_DIRECTORY | P.O_RESOLVE_IN_ROOT, 0],
                               serving=serving)
    except OSError as exc:
        if exc.errno in (errno.ENOTDIR, errno.EINVAL, errno.ENOSYS, errno.ENOENT):
            return cap
        cap.close()
        raise
    cap.close()
    return AsyncCapability(fd)
