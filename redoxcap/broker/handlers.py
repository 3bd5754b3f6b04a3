"""The brokered syscalls: each one read once, resolved through the capabilities, answered.

Every handler gets a `Call` (the notification, the thread's memory opened
before the id was checked, and its process) and returns the syscall's
answer: an int (its return value), an `Install` (an fd to put in the
target's table as the return value, ADDFD + SEND), or `PROCEED` (let the
kernel run it: only for calls without a path whose effect is bounded by the
fds the target already holds, see docs/sandbox.md); or raises OSError for an
errno. Path arguments are read once into the broker and only that copy is
acted on.

Paths are resolved as rt resolves them (rt/_paths.py): a relative path, or
AT_FDCWD, goes to the cwd capability; an `*at` call's to the capability
behind its directory fd; an absolute path to the namespace (`/x` is
`/scheme/file/x`, `/scheme/NAME/...` names a scheme), unless it lies in the
read-only host trees (hostfs.py), which the broker serves itself. The
legacy `NAME:rest` form is not recognised: to an unmodified program,
`a:b` is a file name.
"""

from __future__ import annotations

import errno
import fcntl
import os
import posixpath
import stat
import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass, replace
from typing import Any

from redoxcap.broker import net
from redoxcap.broker.hostfs import WRITABLE_DEVICES, HostTrees
from redoxcap.broker.memory import Memory
from redoxcap.broker.notify import Notification
from redoxcap.broker.pump import Pumps, snapshot
from redoxcap.broker.state import (
    BoundedSet,
    CapabilityTable,
    Directory,
    Mount,
    Process,
    Processes,
    StatusTable,
)
from redoxcap.broker.structs import pack_dirents, pack_stat, pack_statx
from redoxcap.sandbox.syscalls import brokered_names
from rt._call import call_fd, call_value, forget
from rt._paths import SCHEME_ROOT, split_namespace_path
from wire import linux
from wire import protocol as P
from wire.linux import (
    AT_EMPTY_PATH,
    AT_FDCWD,
    AT_REMOVEDIR,
    AT_SYMLINK_NOFOLLOW,
    DT_DIR,
    DT_UNKNOWN,
    O_LARGEFILE,
    OPEN_HOW,
    RENAME_NOREPLACE,
    RESOLVE_BENEATH,
    RESOLVE_CACHED,
    RESOLVE_IN_ROOT,
    RESOLVE_NO_MAGICLINKS,
)
from wire.stat import Stat


def _error(err: int) -> OSError:
    """An OSError whose errno is err (OSError(err) alone leaves errno None: EIO to the program)."""
    return OSError(err, os.strerror(err))


_O_TMPFILE_BIT = os.O_TMPFILE & ~os.O_DIRECTORY
TTY = "/dev/tty"
MAX_PLAIN_DIRS = 1 << 16


_FILE_ROOT = "/scheme/file/"
UTIME_NOW, UTIME_OMIT = (1 << 30) - 1, (1 << 30) - 2
_ID_UNCHANGED = 0xFFFF_FFFF  # uid_t/gid_t -1
_EMPTY_ROOT = Stat(st_mode=stat.S_IFDIR | 0o555, st_nlink=2, st_ino=1)


class _Proceed:
    def __repr__(self) -> str:
        return "PROCEED"


PROCEED = _Proceed()


@dataclass(frozen=True, slots=True)
class Install:
    """Answer with a new fd in the target: a copy of fd (the broker closes its own)."""

    fd: int
    cloexec: bool


@dataclass
class Call:
    """One notification being answered."""

    notif: Notification
    mem: Memory
    process: Process

    @property
    def args(self) -> tuple[int, ...]:
        return self.notif.args


@dataclass
class _Location:
    """Where a path operation goes: a capability and the path to send on it, or a host path.

    `owned` is a duplicate of a target's fd that the broker closes afterwards.
    """

    cap: int | None
    path: str
    host: bool
    resolve: int = 0
    owned: int | None = None
    namespace: bool = False
    absolute: str = ""  # for a namespace location: the path the program named
    # in a handed directory: the absolute path the program means, for resolve_view
    view: str | None = None
    walk_first: bool = False  # `..` above the handed directory: only resolve_view is right

    def close(self) -> None:
        if self.owned is not None:
            _close(self.owned)
            self.owned = None


def _close(fd: int) -> None:
    forget(fd)  # rt's per-fd lock and tag: the number will be reused
    os.close(fd)


def _int(value: int) -> int:
    """A C int argument (the low 32 bits, signed)."""
    value &= 0xFFFF_FFFF
    return value - (1 << 32) if value & 0x8000_0000 else value


class Syscalls:
    """The handlers, one method per syscall, and what they share."""

    def __init__(self, machine: str, ns: int, hosts: HostTrees, processes: Processes,
                 passthrough: bool, mounts: Sequence[Mount] = (), grants: Any = None) -> None:
        """Build the table of handlers, by syscall number for machine.

        Args:
            machine: "x86_64" or "aarch64" (struct layouts).
            ns: the namespace capability (the broker's own).
            hosts: the read-only host trees.
            processes: the per-process state.
            passthrough: ask schemes for host fds of regular files (O_PASSTHROUGH).
            mounts: the directories handed over at paths of their own (`run --dir`, /tmp).
            grants: the run's network grants (redoxcap.run.NetGrant by scheme), None for none.
        """
        self.machine = machine
        self.ns = ns
        self.hosts = hosts
        self.processes = processes
        self.passthrough = passthrough
        self.mounts = sorted(mounts, key=lambda m: -len(m.visible))
        self._mount_parts = [(m, [c for c in m.visible.split("/") if c]) for m in self.mounts]
        self.sockets = net.SocketGrants(grants)
        self.caps = CapabilityTable()
        self.passed_files = BoundedSet()  # regular files handed over as host fds (passthrough)
        self.snapshots = StatusTable()  # routed read-only files handed over as memory files
        # directories of handed ones the view walk found to be directories, not links: it
        # skips their STATAT until the program renames, removes or links anything
        self._plain_dirs: set[tuple[int, str]] = set()
        self.pumps = Pumps()
        self.o_largefile = O_LARGEFILE.get(machine, 0)
        names = linux.SYSCALLS[machine]
        self.table: dict[int, Callable[[Call], Any]] = {
            names[name]: getattr(self, name) for name in brokered_names() if name in names
        }

    # -- reading arguments and resolving paths --------------------------------

    def path(self, call: Call, addr: int) -> str:
        """The path at addr, as the wire can carry it (ENOENT for one that is not UTF-8)."""
        raw = call.mem.string(addr)
        try:
            return raw.decode()
        except UnicodeDecodeError:
            raise OSError(errno.ENOENT, "a path that is not UTF-8 has no capability") from None

    def target_fd(self, call: Call, fd: int) -> int:
        """A duplicate, owned by the broker, of the target's fd (EBADF if it has none)."""
        try:
            return linux.pidfd_getfd(call.process.pidfd, fd)
        except OSError as exc:
            raise OSError(errno.EBADF if exc.errno in (errno.EBADF, errno.EINVAL) else exc.errno,
                          "bad file descriptor") from None

    def directory(self, call: Call, dirfd: int) -> tuple[int, str, bool, int | None]:
        """What a directory fd stands for: (fd to use, host path, is host, fd to close).

        Raises:
            OSError: ENOTDIR for an fd that is neither a capability nor a host-tree directory.
        """
        if dirfd == AT_FDCWD:
            cwd = call.process.cwd
            return cwd.fd, cwd.path, cwd.host, None
        dup = self.target_fd(call, dirfd)
        kept = False
        try:
            st = os.fstat(dup)
            if stat.S_ISSOCK(st.st_mode) and linux.identity(st) in self.caps:
                kept = True
                return dup, "", False, dup
            if stat.S_ISDIR(st.st_mode):
                real = os.readlink(f"/proc/self/fd/{dup}")
                if self.hosts.inside(real):
                    return -1, real, True, None
                raise OSError(errno.EACCES, "a directory outside the host trees")
            raise OSError(errno.ENOTDIR, os.strerror(errno.ENOTDIR))
        finally:
            if not kept:
                _close(dup)

    def locate(self, call: Call, dirfd: int, path: str, resolve: int = 0) -> _Location:
        """Where a path operation relative to dirfd goes (ENOENT for an empty path)."""
        if not path:
            raise OSError(errno.ENOENT, "empty path")
        absolute = path.startswith("/")
        if resolve and dirfd != AT_FDCWD:  # openat2's flags: as rt.openat, never the namespace
            if absolute and resolve & P.O_RESOLVE_BENEATH:
                raise OSError(errno.EXDEV, "an absolute path cannot be beneath a directory")
            fd, _, host, owned = self.directory(call, dirfd)
            if host:
                raise OSError(errno.EINVAL, "RESOLVE_* lookups are served in capabilities only")
            return _Location(fd, path, False, resolve, owned)
        if absolute:
            placed = self._placed(path, resolve)
            if placed is not None:
                return placed
            cwd = call.process.cwd
            scheme_path = path == SCHEME_ROOT or path.startswith(SCHEME_ROOT + "/")
            if not cwd.host and not scheme_path and (
                    path == cwd.path or path.startswith(cwd.path.rstrip("/") + "/")):
                # the cwd at the path getcwd tells (a shell's `cd sub` is chdir("$PWD/sub")):
                # beneath the cwd capability, with its rules, whatever the namespace holds
                return _Location(cwd.fd, path[len(cwd.path):].lstrip("/") or ".", False, resolve)
            ns_path = path if path == SCHEME_ROOT or path.startswith(SCHEME_ROOT + "/") \
                else "/scheme/file" + path
            return _Location(self.ns, ns_path, False, resolve, None, True, path)
        fd, host_path, host, owned = self.directory(call, dirfd)
        if host:
            return _Location(None, posixpath.join(host_path, path), True)
        loc = _Location(fd, path, False, resolve, owned)
        if dirfd == AT_FDCWD and not resolve:
            mounted = self.mount_of(call.process.cwd.path)
            if mounted is not None:  # the cwd is in a handed directory: it has a program path
                view = call.process.cwd.path.rstrip("/") + "/" + path
                loc.view, loc.walk_first = view, self._above_mount(mounted[0], view)
        return loc

    def _placed(self, path: str, resolve: int = 0) -> _Location | None:
        """An absolute path above or beside a handed directory, in one, or in the host trees
        (the deepest wins); None for the namespace's."""
        parts = [c for c in path.split("/") if c]
        mounted = self.mount_of(path)
        depth = self._depth(mounted[0]) if mounted is not None else -1
        above = self.hosts.handed_above
        if ".." not in parts and (tuple(parts) in above or (
                parts and tuple(parts[:-1]) in above and depth < len(parts))):
            return _Location(None, path, True)  # status only, or absent (hostfs)
        if mounted is not None and self.hosts.depth(path) <= depth:
            return self._in_mount(mounted[0], mounted[1], path, resolve)
        if self.hosts.claims(path):
            return _Location(None, path, True)
        return None

    def _in_mount(self, mount: Mount, rest: str, path: str, resolve: int = 0) -> _Location:
        """The location of an absolute path in a handed directory (rest: below it)."""
        loc = _Location(mount.cap, rest, False, resolve)
        if not resolve:
            loc.view, loc.walk_first = path, self._above_mount(mount, path)
        return loc

    @staticmethod
    def _above_mount(mount: Mount, path: str) -> bool:
        """Whether path's `..` leave the handed directory (where its scheme would stop them)."""
        return ".." in path.split("/") and not mount.holds(posixpath.normpath(path))

    def in_view(self, loc: _Location, follow: bool, act: Callable[[_Location], Any]) -> Any:
        """act(loc), resolved as the program sees its files where the handed directory's scheme
        cannot: an absolute symlink in it (a venv's `bin/python` -> the interpreter) points into
        the program's view, not into the directory, and `..` above it leaves it. The scheme
        resolves in-root, so such a lookup fails there (ENOENT, ENOTDIR, ELOOP); then the
        broker walks the path itself (resolve_view) and acts on where it leads."""
        if loc.walk_first and loc.view is not None:
            other = self.resolve_view(loc.view, follow)
            if other is not None:
                try:
                    return act(other)
                finally:
                    other.close()
        try:
            return act(loc)
        except OSError as exc:
            if exc.errno not in (errno.ENOENT, errno.ENOTDIR, errno.ELOOP) or loc.view is None:
                raise
            other = self.resolve_view(loc.view, follow)
            if other is None:
                raise
        try:
            return act(other)
        finally:
            other.close()

    def resolve_view(self, path: str, follow: bool, links: list[int] | None = None
                     ) -> _Location | None:
        """Walk an absolute path in a handed directory one component at a time (a STATAT
        each, beneath its root): a relative symlink is spliced in, an absolute one and a `..`
        above the directory go on from there as the program's own absolute path. Every step
        is one the program could take by naming the result directly.

        Returns:
            Where the path leads, or None when the walk met neither (the scheme's answer stands).

        Raises:
            OSError: ELOOP past 40 links, ENOTDIR, ENOENT for a missing directory on the way.
        """
        links = [0] if links is None else links
        placed = self._placed(path)
        mounted = self.mount_of(path)
        if placed is None or placed.view is None or mounted is None:
            return self._restart(path, follow, links)
        mount, rest = mounted
        parts = [c for c in rest.split("/") if c and c != "."]
        trailing = "/" if path.endswith("/") else ""
        stack: list[str] = []
        moved = False
        i = 0
        while i < len(parts):
            name, last = parts[i], i == len(parts) - 1
            if name == "..":
                moved = True
                if stack:
                    stack.pop()
                    i += 1
                    continue
                up = posixpath.dirname(mount.visible.rstrip("/")) or "/"
                return self._restart(posixpath.join(up, *parts[i + 1:]) + trailing, follow, links)
            where = "/".join([*stack, name])
            if not last and (mount.cap, where) in self._plain_dirs:
                stack.append(name)  # a directory, not a link, when the walk last looked
                i += 1
                continue
            try:
                st = Stat.from_wire(call_value(mount.cap, P.STATAT,
                                               [where, os.O_NOFOLLOW | P.O_RESOLVE_BENEATH], kind=dict))
            except FileNotFoundError:
                if not last:
                    raise
                stack.append(name)
                break
            if stat.S_ISLNK(st.st_mode) and (not last or follow or trailing):
                links[0] += 1
                if links[0] > 40:
                    raise _error(errno.ELOOP)
                body = call_value(mount.cap, P.READLINKAT, [where], kind=str)
                moved = True
                if body.startswith("/"):
                    tail = "/".join(parts[i + 1:])
                    return self._restart(body.rstrip("/") + ("/" + tail if tail else "") + trailing
                                         if body != "/" else "/" + tail + trailing, follow, links)
                parts[i:i + 1] = [c for c in body.split("/") if c and c != "."]
                continue
            if not last and not stat.S_ISDIR(st.st_mode):
                raise _error(errno.ENOTDIR)
            if stat.S_ISDIR(st.st_mode):
                if len(self._plain_dirs) >= MAX_PLAIN_DIRS:
                    self._plain_dirs.clear()
                self._plain_dirs.add((mount.cap, where))
            stack.append(name)
            i += 1
        if not moved:
            return None
        return _Location(mount.cap, ("/".join(stack) + trailing if stack else "."), False)

    def _restart(self, path: str, follow: bool, links: list[int]) -> _Location:
        """The location of a program path a walk arrived at."""
        placed = self._placed(path)
        if placed is not None and placed.view is not None:
            walked = self.resolve_view(path, follow, links)
            return walked if walked is not None else replace(placed, view=None, walk_first=False)
        if placed is not None:
            return placed
        ns_path = path if path == SCHEME_ROOT or path.startswith(SCHEME_ROOT + "/") \
            else "/scheme/file" + path
        return _Location(self.ns, ns_path, False, 0, None, True, path)

    def _depth(self, mount: Mount) -> int:
        return len([c for c in mount.visible.split("/") if c])

    def mount_of(self, path: str) -> tuple[Mount, str] | None:
        """The handed directory an absolute path lies in (the deepest), and the path below it."""
        parts = [c for c in path.split("/") if c]
        for mount, prefix in self._mount_parts:
            if parts[:len(prefix)] == prefix:
                rest = "/".join(parts[len(prefix):])
                return mount, (rest + "/" if rest and path.endswith("/") else rest) or "."
        return None

    def ancestor_status(self, path: str) -> os.stat_result | None:
        """The host's status of a directory above a handed directory or a host tree (so
        that walking up to them works: realpath, getcwd -P, an interpreter's getpath), or None."""
        parts = [c for c in path.split("/") if c]
        if ".." in parts or "." in parts:
            return None
        if not any(len(prefix) > len(parts) and prefix[:len(parts)] == parts
                   for _, prefix in self._mount_parts) and not self.hosts.above(parts):
            return None
        try:
            return os.stat("/" + "/".join(parts))
        except OSError:
            return None

    def open_at(self, loc: _Location, flags: int, mode: int, passthrough: bool) -> int:
        """Open at a location; returns the broker's fd (a capability or a host fd)."""
        flags &= ~(os.O_CLOEXEC | self.o_largefile)
        if loc.host:
            return self.hosts.open(loc.path, flags, mode)
        if passthrough and self.passthrough and not flags & (os.O_PATH | os.O_DIRECTORY):
            flags |= P.O_PASSTHROUGH
        return call_fd(loc.cap, P.OPENAT, [loc.path, flags | loc.resolve, mode & 0o7777])

    def status_at(self, loc: _Location, follow: bool) -> Any:
        """The status (os.stat_result or Stat) of what a location names."""
        if loc.host:
            return self.hosts.stat(loc.path, follow)
        nofollow = 0 if follow else os.O_NOFOLLOW
        try:
            try:  # one request where the scheme answers STATAT
                value = call_value(loc.cap, P.STATAT, [loc.path, nofollow | loc.resolve], kind=dict)
                return Stat.from_wire(value)
            except OSError as exc:
                if exc.errno != errno.ENOSYS:
                    raise
            fd = self.open_at(loc, os.O_PATH | nofollow, 0, False)
        except OSError as exc:
            if exc.errno == errno.ENODEV and loc.namespace:
                above = self.ancestor_status(loc.absolute)
                if above is not None:
                    return above
                if loc.path.rstrip("/") + "/" == _FILE_ROOT:
                    return _EMPTY_ROOT  # `/` without a file scheme: there, but empty (rm checks it)
            raise
        try:
            return self.status_of_capability(fd)
        finally:
            _close(fd)

    def status_of_capability(self, fd: int) -> Stat:
        return Stat.from_wire(call_value(fd, P.FSTAT, kind=dict))

    def status_of_fd(self, call: Call, fd: int) -> Any:
        """fstat of the target's fd (or its cwd for AT_FDCWD), a capability or not."""
        if fd == AT_FDCWD:
            cwd = call.process.cwd
            return os.fstat(cwd.fd) if cwd.host else self.status_of_capability(cwd.fd)
        dup = self.target_fd(call, fd)
        try:
            st = os.fstat(dup)
            if stat.S_ISSOCK(st.st_mode) and linux.identity(st) in self.caps:
                return self.status_of_capability(dup)
            routed = self.pumps.capability_of(linux.identity(st)) if stat.S_ISSOCK(st.st_mode) else None
            if routed is not None:  # a routed file is the file, not the socket that carries it
                return self.status_of_capability(routed)
            copied = self.snapshots.get(linux.identity(st)) if stat.S_ISREG(st.st_mode) else None
            return copied if copied is not None else st
        finally:
            _close(dup)

    def stat_into(self, call: Call, dirfd: int, addr: int, flags: int, buf: int,
                  pack: Callable[[Any], bytes]) -> int:
        path = self.path(call, addr)
        if not path and flags & AT_EMPTY_PATH:
            st = self.status_of_fd(call, dirfd)
        else:
            loc = self.locate(call, dirfd, path)
            follow = not flags & AT_SYMLINK_NOFOLLOW
            try:
                st = self.in_view(loc, follow, lambda at: self.status_at(at, follow))
            finally:
                loc.close()
        call.mem.write(buf, pack(st))
        return 0

    # -- opening ---------------------------------------------------------------

    def _open(self, call: Call, dirfd: int, addr: int, flags: int, mode: int,
              resolve: int = 0) -> Install:
        path = self.path(call, addr)
        if path == TTY and dirfd == AT_FDCWD:
            return Install(self.terminal(call), bool(flags & os.O_CLOEXEC))
        loc = self.locate(call, dirfd, path, resolve)
        try:
            fd, from_host = self.in_view(loc, not flags & os.O_NOFOLLOW, lambda at: (
                self.open_at(at, flags, mode, passthrough=True), at.host))
        except OSError as exc:
            if exc.errno == errno.ENODEV and loc.namespace:  # nothing was handed there
                if flags & os.O_DIRECTORY and self.ancestor_status(loc.absolute) is not None:
                    raise OSError(errno.EACCES, "a directory above what was handed") from None
                raise _error(errno.EACCES if flags & (os.O_CREAT | _O_TMPFILE_BIT)
                             else errno.ENOENT) from None
            raise
        finally:
            loc.close()
        try:
            if not from_host:
                st = os.fstat(fd)
                if stat.S_ISREG(st.st_mode):
                    self.passed_files.add(linux.identity(st))
            fd = self.for_the_program(fd, flags)
        except BaseException:
            _close(fd)
            raise
        return Install(fd, bool(flags & os.O_CLOEXEC))

    def terminal(self, call: Call) -> int:
        """/dev/tty: the terminal the program was given as fd 0, 1 or 2 (a copy of that fd:
        nothing it did not hold already), ENXIO when none is one, as for a process without
        a controlling terminal."""
        for fd in (0, 1, 2):
            try:
                dup = self.target_fd(call, fd)
            except OSError:
                continue
            if os.isatty(dup):
                return dup
            _close(dup)
        raise OSError(errno.ENXIO, "no terminal was given")

    def for_the_program(self, fd: int, flags: int) -> int:
        """What the program gets for an fd just opened (owned; the answer is owned too).

        A host fd (passthrough, the host trees) as it is; a directory or O_PATH
        capability as it is, recorded, for the `*at` calls, getdents and fstat
        that name it; any other capability (a file without passthrough, a
        device, a connection) through a pump, since read(2) and write(2) on a
        capability socket would speak frames.
        """
        st = os.fstat(fd)
        if not stat.S_ISSOCK(st.st_mode):
            return fd
        if not flags & (os.O_PATH | os.O_DIRECTORY):
            try:
                status = self.status_of_capability(fd)
            except OSError:
                status = None
            is_dir = status is not None and stat.S_ISDIR(status.st_mode)
            if status is not None and stat.S_ISREG(status.st_mode) and \
                    flags & os.O_ACCMODE == os.O_RDONLY and not flags & os.O_TRUNC:
                copy = snapshot(fd, status.st_size)
                if copy is not None:
                    self.snapshots.add(linux.identity(os.fstat(copy)), status)
                    _close(fd)
                    return copy
            if not is_dir:
                return self.pumps.start(fd, flags)
        self.caps.add(linux.identity(st))
        return fd

    def open(self, call: Call) -> Install:
        return self._open(call, AT_FDCWD, call.args[0], _int(call.args[1]), call.args[2])

    def creat(self, call: Call) -> Install:
        flags = os.O_CREAT | os.O_WRONLY | os.O_TRUNC
        return self._open(call, AT_FDCWD, call.args[0], flags, call.args[1])

    def openat(self, call: Call) -> Install:
        a = call.args
        return self._open(call, _int(a[0]), a[1], _int(a[2]), a[3])

    def openat2(self, call: Call) -> Install:
        a = call.args
        size = a[3]
        if size < OPEN_HOW.size:
            raise OSError(errno.EINVAL, "struct open_how too small")
        if size > 4096:
            raise OSError(errno.E2BIG, "struct open_how too large")
        raw = call.mem.read(a[2], size)
        if any(raw[OPEN_HOW.size:]):
            raise OSError(errno.E2BIG, "unknown open_how fields")
        flags = int.from_bytes(raw[0:8], "little")
        mode = int.from_bytes(raw[8:16], "little")
        resolve = int.from_bytes(raw[16:24], "little")
        if resolve & RESOLVE_CACHED:
            raise OSError(errno.EAGAIN, "nothing is cached here")
        if resolve & ~(RESOLVE_BENEATH | RESOLVE_IN_ROOT | RESOLVE_NO_MAGICLINKS):
            raise OSError(errno.EINVAL, "RESOLVE_NO_XDEV and RESOLVE_NO_SYMLINKS are not served")
        if resolve & RESOLVE_BENEATH and resolve & RESOLVE_IN_ROOT:
            raise _error(errno.EINVAL)
        if mode & ~0o7777 or (mode and not flags & (os.O_CREAT | os.O_TMPFILE)):
            raise _error(errno.EINVAL)
        ours = (P.O_RESOLVE_BENEATH if resolve & RESOLVE_BENEATH else 0) | (
            P.O_RESOLVE_IN_ROOT if resolve & RESOLVE_IN_ROOT else 0)
        return self._open(call, _int(a[0]), a[1], flags & 0xFFFF_FFFF, mode, ours)

    # -- status ----------------------------------------------------------------

    def _pack_stat(self, st: Any) -> bytes:
        return pack_stat(self.machine, st)

    def stat(self, call: Call) -> int:
        return self.stat_into(call, AT_FDCWD, call.args[0], 0, call.args[1], self._pack_stat)

    def lstat(self, call: Call) -> int:
        return self.stat_into(call, AT_FDCWD, call.args[0], AT_SYMLINK_NOFOLLOW, call.args[1],
                              self._pack_stat)

    def newfstatat(self, call: Call) -> int:
        a = call.args
        return self.stat_into(call, _int(a[0]), a[1], _int(a[3]), a[2], self._pack_stat)

    def fstat(self, call: Call) -> int:
        st = self.status_of_fd(call, _int(call.args[0]))
        call.mem.write(call.args[1], self._pack_stat(st))
        return 0

    def statx(self, call: Call) -> int:
        a = call.args
        return self.stat_into(call, _int(a[0]), a[1], _int(a[2]), a[4], pack_statx)

    def _access(self, call: Call, dirfd: int, addr: int, mode: int, flags: int) -> int:
        if mode & ~7:
            raise _error(errno.EINVAL)
        loc = self.locate(call, dirfd, self.path(call, addr))
        follow = not flags & AT_SYMLINK_NOFOLLOW

        def check(at: _Location) -> Any:
            st = self.status_at(at, follow)
            if mode & os.W_OK and at.host and at.path not in WRITABLE_DEVICES:
                raise OSError(errno.EROFS, os.strerror(errno.EROFS))
            return st

        try:
            st = self.in_view(loc, follow, check)
        finally:
            loc.close()
        _check_access(st.st_mode, st.st_uid, st.st_gid, mode)
        return 0

    def access(self, call: Call) -> int:
        return self._access(call, AT_FDCWD, call.args[0], _int(call.args[1]), 0)

    def faccessat(self, call: Call) -> int:
        a = call.args
        return self._access(call, _int(a[0]), a[1], _int(a[2]), 0)

    def faccessat2(self, call: Call) -> int:
        a = call.args
        return self._access(call, _int(a[0]), a[1], _int(a[2]), _int(a[3]))

    def _readlink(self, call: Call, dirfd: int, addr: int, buf: int, size: int) -> int:
        if _int(size) <= 0:
            raise _error(errno.EINVAL)
        loc = self.locate(call, dirfd, self.path(call, addr))

        def read_link(at: _Location) -> str:
            if at.host:
                return self.hosts.readlink(at.path)
            try:
                return call_value(at.cap, P.READLINKAT, [at.path], kind=str)
            except OSError as exc:
                if exc.errno == errno.ENODEV and at.namespace and \
                        self.ancestor_status(at.absolute) is not None:
                    raise _error(errno.EINVAL) from None  # a directory, not a link
                raise

        try:
            body = self.in_view(loc, False, read_link)
        finally:
            loc.close()
        data = body.encode(errors="surrogateescape")[:size]
        call.mem.write(buf, data)
        return len(data)

    def readlink(self, call: Call) -> int:
        a = call.args
        return self._readlink(call, AT_FDCWD, a[0], a[1], a[2])

    def readlinkat(self, call: Call) -> int:
        a = call.args
        return self._readlink(call, _int(a[0]), a[1], a[2], a[3])

    def getdents64(self, call: Call) -> Any:
        """Listed by the scheme for a capability (names in its order, with their d_type);
        a host directory lists itself: the kernel acts on the fd, not on a path."""
        fd, buf, size = _int(call.args[0]), call.args[1], call.args[2] & 0xFFFF_FFFF
        dup = self.target_fd(call, fd)
        try:
            identity = linux.identity(os.fstat(dup))
            if identity not in self.caps:
                return PROCEED
            start = self.caps.position(identity)
            # `.` and `..` first, as Linux lists them (ls -a, and programs that count on them)
            dots = [(".", DT_DIR), ("..", DT_DIR)][start:]
            entries = dots + self._listing(dup, max(0, start - 2))
        finally:
            _close(dup)
        data, count = pack_dirents(entries, start, size)
        if entries and not count:
            raise OSError(errno.EINVAL, "buffer too small")
        call.mem.write(buf, data)
        self.caps.advance(identity, start + count)
        return len(data)

    def _listing(self, fd: int, start: int) -> list[tuple[str, int]]:
        """(name, d_type) from position start: READDIR, or GETDENTS (types unknown) where
        the scheme has no READDIR."""
        try:
            page = call_value(fd, P.READDIR, [start], kind=list)
            if all(isinstance(e, list) and len(e) == 2 and isinstance(e[0], str)
                   and type(e[1]) is int and 0 <= e[1] < 16 for e in page):
                return [(name, d_type) for name, d_type in page]
            raise OSError(errno.EIO, "malformed listing")
        except OSError as exc:
            if exc.errno != errno.ENOSYS:
                raise
        names = call_value(fd, P.GETDENTS, [start], kind=list)
        if not all(isinstance(n, str) for n in names):
            raise OSError(errno.EIO, "malformed listing")
        return [(name, DT_UNKNOWN) for name in names]

    # -- the cwd -----------------------------------------------------------------

    def getcwd(self, call: Call) -> int:
        data = call.process.cwd.path.encode() + b"\0"
        if len(data) > call.args[1]:
            raise OSError(errno.ERANGE, os.strerror(errno.ERANGE))
        call.mem.write(call.args[0], data)
        return len(data)

    def chdir(self, call: Call) -> Any:
        """The broker's cwd of the process changes; when the new one is a host directory the
        kernel reaches by the same path (a handed directory, a host tree), the kernel's too:
        the call goes on (CONTINUE), so that a relative execve finds what the broker found.
        Whatever a racing thread writes there, the kernel's cwd only serves execve, which
        Landlock bounds to what the program could name anyway (docs/sandbox.md)."""
        path = self.path(call, call.args[0])
        loc = self.locate(call, AT_FDCWD, path)

        def enter(at: _Location) -> Directory:
            if at.host:
                real = self.hosts.resolve(at.path)
                fd = os.open(real, os.O_PATH | os.O_DIRECTORY | os.O_CLOEXEC)
                return Directory(fd, real, True)
            fd = call_fd(at.cap, P.OPENAT, [at.path, os.O_RDONLY | os.O_DIRECTORY | at.resolve, 0])
            try:
                where = self._where(fd, at, call.process.cwd)
            except BaseException:
                _close(fd)
                raise
            return Directory(fd, where, False)

        try:
            new = self.in_view(loc, True, enter)
        except OSError as exc:
            if exc.errno == errno.ENODEV and loc.namespace:
                raise _error(errno.ENOENT) from None
            raise
        finally:
            loc.close()
        process = call.process
        process.set_cwd(new)
        reached = self.kernel_path(new)
        if reached is not None and (path.startswith("/") or process.kernel_cwd is not None):
            base = "/" if path.startswith("/") else process.kernel_cwd
            if os.path.realpath(os.path.join(base, path)) == reached:
                process.kernel_cwd = reached
                return PROCEED
        return 0

    def kernel_path(self, directory: Directory) -> str | None:
        """The host path at which the kernel finds a cwd of the broker's, if it can."""
        if directory.host:
            return directory.path
        mounted = self.mount_of(directory.path)
        if mounted is not None and mounted[0].executable:
            return directory.path
        return None

    def _mounted_path(self, scheme_path: str) -> str | None:
        """The path a program sees for `/scheme/NAME/rest` of a handed directory, or None."""
        for mount in self.mounts:
            root = f"{SCHEME_ROOT}/{mount.scheme}"
            if mount.scheme and (scheme_path == root or scheme_path.startswith(root + "/")):
                return mount.visible.rstrip("/") + scheme_path[len(root):] or "/"
        return None

    def _where(self, fd: int, loc: _Location, cwd: Directory) -> str:
        """getcwd's string for a directory capability just opened at loc (after symlinks)."""
        from rt._posix import _display, _physical

        try:
            shown = self._mounted_path(call_value(fd, P.FPATH, kind=str))
            if shown is not None:
                return shown
        except OSError:
            pass
        try:
            if loc.namespace:
                root_path, _ = split_namespace_path(loc.path)
                root = call_fd(self.ns, P.OPENAT, [root_path, os.O_RDONLY | os.O_DIRECTORY, 0])
                try:
                    return _physical(fd, root, "/" if root_path == "/scheme/file" else root_path)
                finally:
                    _close(root)
            if not cwd.host:
                return _physical(fd, cwd.fd, cwd.path)
        except OSError:
            pass
        return _display(call_value(fd, P.FPATH, kind=str))


    def fchdir(self, call: Call) -> int:
        dup: int | None = self.target_fd(call, _int(call.args[0]))
        try:
            st = os.fstat(dup)
            if stat.S_ISSOCK(st.st_mode) and linux.identity(st) in self.caps:
                if not stat.S_ISDIR(self.status_of_capability(dup).st_mode):
                    raise OSError(errno.ENOTDIR, os.strerror(errno.ENOTDIR))
                new_fd = call_fd(dup, P.CLONE)  # the broker's own: the target may close or use its fd
            elif stat.S_ISDIR(st.st_mode) and self.hosts.inside(real := os.readlink(f"/proc/self/fd/{dup}")):
                call.process.set_cwd(Directory(dup, real, True))
                dup = None  # the cwd's now
                return 0
            else:
                raise OSError(errno.ENOTDIR, os.strerror(errno.ENOTDIR))
        finally:
            if dup is not None:
                _close(dup)
        try:
            where = self._where(new_fd, _Location(new_fd, "", False), call.process.cwd)
        except BaseException:
            _close(new_fd)
            raise
        call.process.set_cwd(Directory(new_fd, where, False))
        return 0

    # -- names -----------------------------------------------------------------

    def _on_name(self, call: Call, dirfd: int, addr: int, op: int, extra: list) -> int:
        if op != P.MKDIRAT:
            self._plain_dirs.clear()  # a directory may go, and a link take its name
        loc = self.locate(call, dirfd, self.path(call, addr))

        def change(at: _Location) -> None:
            if at.host:
                try:
                    self.hosts.stat(at.path, follow=False)
                    exists = True
                except OSError:
                    exists = False
                raise OSError(errno.EEXIST if op == P.MKDIRAT and exists else errno.EROFS,
                              "the host trees are read-only")
            call_value(at.cap, op, [at.path, *extra])

        try:
            self.in_view(loc, False, change)
        finally:
            loc.close()
        return 0

    def mkdir(self, call: Call) -> int:
        return self._on_name(call, AT_FDCWD, call.args[0], P.MKDIRAT, [call.args[1] & 0o7777])

    def mkdirat(self, call: Call) -> int:
        a = call.args
        return self._on_name(call, _int(a[0]), a[1], P.MKDIRAT, [a[2] & 0o7777])

    def unlink(self, call: Call) -> int:
        return self._on_name(call, AT_FDCWD, call.args[0], P.UNLINKAT, [0])

    def rmdir(self, call: Call) -> int:
        return self._on_name(call, AT_FDCWD, call.args[0], P.UNLINKAT, [P.AT_REMOVEDIR])

    def unlinkat(self, call: Call) -> int:
        a = call.args
        flags = _int(a[2])
        if flags & ~AT_REMOVEDIR:
            raise _error(errno.EINVAL)
        return self._on_name(call, _int(a[0]), a[1], P.UNLINKAT, [flags])

    def _symlink(self, call: Call, target_addr: int, dirfd: int, addr: int) -> int:
        self._plain_dirs.clear()
        target = self.path(call, target_addr)
        loc = self.locate(call, dirfd, self.path(call, addr))

        def make(at: _Location) -> None:
            if at.host:
                raise OSError(errno.EROFS, "the host trees are read-only")
            call_value(at.cap, P.SYMLINKAT, [target, at.path])

        try:
            self.in_view(loc, False, make)
        finally:
            loc.close()
        return 0

    def symlink(self, call: Call) -> int:
        return self._symlink(call, call.args[0], AT_FDCWD, call.args[1])

    def symlinkat(self, call: Call) -> int:
        a = call.args
        return self._symlink(call, a[0], _int(a[1]), a[2])

    def _two_paths(self, call: Call, op: int, olddir: int, old: int, newdir: int, new: int,
                   noreplace: bool = False) -> int:
        self._plain_dirs.clear()  # a renamed directory, or a link renamed over one
        def send(src: _Location, dst: _Location) -> None:
            if src.host or dst.host:
                raise _error(errno.EROFS if src.host and dst.host else errno.EXDEV)
            if noreplace:
                try:
                    self.status_at(dst, follow=False)
                except FileNotFoundError:
                    pass
                else:
                    raise OSError(errno.EEXIST, os.strerror(errno.EEXIST))
            self._send_two(op, src, dst)

        src = self.locate(call, olddir, self.path(call, old))
        try:
            dst = self.locate(call, newdir, self.path(call, new))
            try:
                self.in_view(src, False, lambda s: self.in_view(dst, False, lambda d: send(s, d)))
            finally:
                dst.close()
        finally:
            src.close()
        return 0

    def _send_two(self, op: int, src: _Location, dst: _Location) -> None:
        """As rt's two-path calls: one capability, or the second directory passed along."""
        if src.cap == dst.cap:
            call_value(src.cap, op, [src.path, dst.path])
            return
        opened: list[int] = []
        try:
            fd1, p1 = src.cap, src.path
            fd2, p2 = dst.cap, dst.path
            if src.namespace:
                root, p1 = split_namespace_path(p1)
                fd1 = call_fd(self.ns, P.OPENAT, [root, os.O_DIRECTORY, 0])
                opened.append(fd1)
            if dst.namespace:
                root, p2 = split_namespace_path(p2)
                fd2 = call_fd(self.ns, P.OPENAT, [root, os.O_DIRECTORY, 0])
                opened.append(fd2)
            call_value(fd1, op, [p1, p2], [fd2])
        finally:
            for fd in opened:
                _close(fd)

    def rename(self, call: Call) -> int:
        return self._two_paths(call, P.RENAMEAT, AT_FDCWD, call.args[0], AT_FDCWD, call.args[1])

    def renameat(self, call: Call) -> int:
        a = call.args
        return self._two_paths(call, P.RENAMEAT, _int(a[0]), a[1], _int(a[2]), a[3])

    def renameat2(self, call: Call) -> int:
        a = call.args
        flags = _int(a[4])
        if flags & ~RENAME_NOREPLACE:
            raise OSError(errno.EINVAL, "RENAME_EXCHANGE and RENAME_WHITEOUT are not served")
        return self._two_paths(call, P.RENAMEAT, _int(a[0]), a[1], _int(a[2]), a[3],
                               noreplace=bool(flags))

    def link(self, call: Call) -> int:
        return self._two_paths(call, P.LINKAT, AT_FDCWD, call.args[0], AT_FDCWD, call.args[1])

    def linkat(self, call: Call) -> int:
        a = call.args
        if _int(a[4]):  # AT_SYMLINK_FOLLOW, AT_EMPTY_PATH: LINKAT never follows old
            raise OSError(errno.EINVAL, "linkat flags are not served")
        return self._two_paths(call, P.LINKAT, _int(a[0]), a[1], _int(a[2]), a[3])

    def truncate(self, call: Call) -> int:
        length = call.args[1]
        if length >= 1 << 63:
            raise _error(errno.EINVAL)
        loc = self.locate(call, AT_FDCWD, self.path(call, call.args[0]))

        def open_for_writing(at: _Location) -> int:
            if at.host:
                raise OSError(errno.EROFS, "the host trees are read-only")
            return self.open_at(at, os.O_WRONLY, 0, passthrough=True)

        try:
            fd = self.in_view(loc, True, open_for_writing)
        finally:
            loc.close()
        try:
            if stat.S_ISSOCK(os.fstat(fd).st_mode):
                call_value(fd, P.FTRUNCATE, [length])
            else:
                os.ftruncate(fd, length)
        finally:
            _close(fd)
        return 0

    # -- processes -------------------------------------------------------------------

    def clone(self, call: Call) -> Any:
        """A new process (not a thread: the filter lets those run): it will start in the cwd
        its parent has now, even if the parent changes directory before the child's first call."""
        self.processes.forking(call.process)
        return PROCEED

    fork = vfork = clone

    # -- exec ----------------------------------------------------------------------

    def _executable(self, call: Call, path: str) -> None:
        """An exec'd file must be a regular executable file in the host trees or in a handed
        directory the kernel reaches at the same path (see docs/sandbox.md); a relative path
        only while the kernel's cwd is the broker's.

        Raises:
            OSError: ENOENT for a path nothing was handed at, EACCES for anything else.
        """
        process = call.process
        if not path.startswith("/"):
            here = self.kernel_path(process.cwd)
            if here is None or process.kernel_cwd != here:
                raise OSError(errno.EACCES, "a relative program where the kernel cannot find it")
            loc = self.locate(call, AT_FDCWD, path)
        else:
            placed = self._placed(path)
            mounted = self.mount_of(path)
            if placed is not None and placed.view is not None and mounted is not None:
                if not mounted[0].executable:
                    raise OSError(errno.EACCES, "programs in this directory cannot be executed")
                loc = placed
            elif placed is not None:
                loc = placed
            else:
                try:
                    self.status_at(self.locate(call, AT_FDCWD, path), follow=True)
                except OSError as exc:
                    if exc.errno in (errno.ENODEV, errno.ENOENT):
                        raise _error(errno.ENOENT) from None
                raise OSError(errno.EACCES, "only files of the host trees and handed directories "
                              "are executed")
        try:
            st = self.in_view(loc, True, lambda at: os.stat(self.hosts.resolve(at.path)) if at.host
                              else self.status_at(at, True))
        finally:
            loc.close()
        if not stat.S_ISREG(st.st_mode) or not st.st_mode & 0o111:
            raise OSError(errno.EACCES, os.strerror(errno.EACCES))

    def execve(self, call: Call) -> Any:
        self._executable(call, self.path(call, call.args[0]))
        return PROCEED

    def execveat(self, call: Call) -> Any:
        a = call.args
        path = self.path(call, a[1])
        if path:
            if not path.startswith("/") and _int(a[0]) != AT_FDCWD:
                raise OSError(errno.EACCES, "execveat relative to a directory fd is not served")
            self._executable(call, path)
            return PROCEED
        if not _int(a[4]) & AT_EMPTY_PATH:
            raise _error(errno.ENOENT)
        dup = self.target_fd(call, _int(a[0]))
        try:
            real = os.readlink(f"/proc/self/fd/{dup}")
            reachable = self.hosts.inside(real) or any(
                m.executable and (real == m.path or real.startswith(m.path.rstrip("/") + "/"))
                for m in self.mounts)
            if not stat.S_ISREG(os.fstat(dup).st_mode) or not reachable:
                raise OSError(errno.EACCES, "only files of the host trees and handed directories "
                              "are executed")
        finally:
            _close(dup)
        return PROCEED

    # -- metadata --------------------------------------------------------------------

    def _metadata(self, call: Call, dirfd: int, addr: int, op: int, args: list, flags: int) -> int:
        """A metadata change (CHMODAT, UTIMENSAT, CHOWNAT) of a path, or of dirfd's file for
        a NULL or empty path with AT_EMPTY_PATH."""
        if flags & ~(AT_SYMLINK_NOFOLLOW | AT_EMPTY_PATH):
            raise _error(errno.EINVAL)
        path = self.path(call, addr) if addr else ""
        if not path:
            if addr and not flags & AT_EMPTY_PATH:
                raise _error(errno.ENOENT)
            if dirfd == AT_FDCWD and not addr:
                raise _error(errno.EFAULT)
            return self._metadata_of_fd(call, dirfd, op, args)
        loc = self.locate(call, dirfd, path)
        nofollow = os.O_NOFOLLOW if flags & AT_SYMLINK_NOFOLLOW else 0

        def change(at: _Location) -> None:
            if at.host:
                raise OSError(errno.EROFS, "the host trees are read-only")
            call_value(at.cap, op, [at.path, *args, nofollow | at.resolve])

        try:
            self.in_view(loc, not nofollow, change)
        finally:
            loc.close()
        return 0

    def _metadata_of_fd(self, call: Call, fd: int, op: int, args: list) -> int:
        """As _metadata, on the file behind the target's fd: a capability asks its scheme; a
        file handed over as a host fd is changed here when it was opened for writing (its
        scheme allowed that), through its handed directory otherwise."""
        if fd == AT_FDCWD:
            cwd = call.process.cwd
            if cwd.host:
                raise OSError(errno.EROFS, "the host trees are read-only")
            call_value(cwd.fd, op, ["", *args, 0])
            return 0
        dup = self.target_fd(call, fd)
        try:
            st = os.fstat(dup)
            identity = linux.identity(st)
            if stat.S_ISSOCK(st.st_mode):
                cap = dup if identity in self.caps else self.pumps.capability_of(identity)
                if cap is None:
                    raise OSError(errno.EPERM, "not a file")
                call_value(cap, op, ["", *args, 0])
                return 0
            if not stat.S_ISREG(st.st_mode) or identity not in self.passed_files:
                raise OSError(errno.EROFS if self.hosts.inside(os.readlink(f"/proc/self/fd/{dup}"))
                              else errno.EPERM, "not a file of the program's capabilities")
            if fcntl.fcntl(dup, fcntl.F_GETFL) & os.O_ACCMODE != os.O_RDONLY:
                _change_host_file(dup, st, op, args)
                return 0
            real = os.readlink(f"/proc/self/fd/{dup}")
            for mount in self.mounts:
                if real.startswith(mount.path.rstrip("/") + "/"):
                    call_value(mount.cap, op, [real[len(mount.path):].lstrip("/"), *args,
                                               os.O_NOFOLLOW])
                    return 0
            raise OSError(errno.EPERM, "a file opened read-only outside the handed directories")
        finally:
            _close(dup)

    def _mode(self, value: int) -> list:
        return [value & 0o7777]

    def chmod(self, call: Call) -> int:
        return self._metadata(call, AT_FDCWD, call.args[0], P.CHMODAT, self._mode(call.args[1]), 0)

    def fchmod(self, call: Call) -> int:
        return self._metadata_of_fd(call, _int(call.args[0]), P.CHMODAT, self._mode(call.args[1]))

    def fchmodat(self, call: Call) -> int:
        a = call.args
        return self._metadata(call, _int(a[0]), a[1], P.CHMODAT, self._mode(a[2]), 0) if a[1] \
            else _raise(errno.EFAULT)

    def fchmodat2(self, call: Call) -> int:
        a = call.args
        return self._metadata(call, _int(a[0]), a[1], P.CHMODAT, self._mode(a[2]), _int(a[3]))

    def _ids(self, uid: int, gid: int) -> list:
        uid, gid = uid & 0xFFFF_FFFF, gid & 0xFFFF_FFFF
        return [-1 if uid == _ID_UNCHANGED else uid, -1 if gid == _ID_UNCHANGED else gid]

    def chown(self, call: Call) -> int:
        a = call.args
        return self._metadata(call, AT_FDCWD, a[0], P.CHOWNAT, self._ids(a[1], a[2]), 0)

    def lchown(self, call: Call) -> int:
        a = call.args
        return self._metadata(call, AT_FDCWD, a[0], P.CHOWNAT, self._ids(a[1], a[2]),
                              AT_SYMLINK_NOFOLLOW)

    def fchown(self, call: Call) -> int:
        a = call.args
        return self._metadata_of_fd(call, _int(a[0]), P.CHOWNAT, self._ids(a[1], a[2]))

    def fchownat(self, call: Call) -> int:
        a = call.args
        return self._metadata(call, _int(a[0]), a[1], P.CHOWNAT, self._ids(a[2], a[3]), _int(a[4]))

    def _times(self, call: Call, addr: int, unit: int, fields: int = 2) -> list:
        """[atime, mtime] in ns from two (seconds, fraction) pairs at addr (NULL: now);
        fraction in `unit` ns (timespec: 1, timeval: 1000; utimbuf has none: fields=1)."""
        if not addr:
            now = time.time_ns()
            return [now, now]
        raw = call.mem.read(addr, 16 if fields == 1 else 32)
        values = [int.from_bytes(raw[i:i + 8], "little", signed=True) for i in range(0, len(raw), 8)]
        if fields == 1:
            return [values[0] * 1_000_000_000, values[1] * 1_000_000_000]
        out: list[int | None] = []
        for sec, frac in (values[0:2], values[2:4]):
            if unit == 1 and frac == UTIME_NOW:
                out.append(time.time_ns())
            elif unit == 1 and frac == UTIME_OMIT:
                out.append(None)
            elif not 0 <= frac < 1_000_000_000 // unit:
                raise _error(errno.EINVAL)
            else:
                out.append(sec * 1_000_000_000 + frac * unit)
        return out

    def utimensat(self, call: Call) -> int:
        a = call.args
        times = self._times(call, a[2], 1)
        return self._metadata(call, _int(a[0]), a[1], P.UTIMENSAT, times, _int(a[3]))

    def utimes(self, call: Call) -> int:
        return self._metadata(call, AT_FDCWD, call.args[0], P.UTIMENSAT,
                              self._times(call, call.args[1], 1000), 0)

    def futimesat(self, call: Call) -> int:
        a = call.args
        return self._metadata(call, _int(a[0]), a[1], P.UTIMENSAT, self._times(call, a[2], 1000), 0)

    def utime(self, call: Call) -> int:
        return self._metadata(call, AT_FDCWD, call.args[0], P.UTIMENSAT,
                              self._times(call, call.args[1], 1, fields=1), 0)


    # -- sockets (redoxcap/broker/net.py) ------------------------------------------

    def _sockaddr(self, call: Call, addr: int, size: int) -> bytes:
        size = _int(size)
        if not 0 < size <= net.MAX_SOCKADDR:
            raise _error(errno.EINVAL)
        return call.mem.read(addr, size)

    def bind(self, call: Call) -> int:
        a = call.args
        raw = self._sockaddr(call, a[1], a[2])
        net.bind(self.sockets, self._socket_copy(call, _int(a[0])), raw)
        return 0

    def connect(self, call: Call) -> int:
        a = call.args
        raw = self._sockaddr(call, a[1], a[2])
        net.connect(self.sockets, self._socket_copy(call, _int(a[0])), raw)
        return 0

    def listen(self, call: Call) -> int:
        net.listen(self._socket_copy(call, _int(call.args[0])), max(0, _int(call.args[1])))
        return 0

    def _socket_copy(self, call: Call, fd: int) -> int:
        """The broker's copy of the target's socket fd (ENOTSOCK for anything else)."""
        dup = self.target_fd(call, fd)
        if not stat.S_ISSOCK(os.fstat(dup).st_mode):
            _close(dup)
            raise _error(errno.ENOTSOCK)
        forget(dup)
        return dup


def _raise(err: int) -> int:
    raise _error(err)


def _change_host_file(fd: int, st: os.stat_result, op: int, args: list) -> None:
    """A metadata change on a host fd of a file the program may write (permission bits only,
    no owner ever changed)."""
    if op == P.CHMODAT:
        os.fchmod(fd, args[0] & 0o777)
    elif op == P.UTIMENSAT:
        os.utime(fd, ns=(st.st_atime_ns if args[0] is None else args[0],
                         st.st_mtime_ns if args[1] is None else args[1]))
    elif args[0] not in (-1, os.geteuid(), st.st_uid) or args[1] not in (-1, os.getegid(), st.st_gid):
        raise OSError(errno.EPERM, "a file is never given to another owner")


def _check_access(mode: int, uid: int, gid: int, want: int) -> None:
    """access(2)'s permission check against the broker's own ids (EACCES)."""
    if not want:
        return
    if os.geteuid() == 0:
        if want & os.X_OK and not (stat.S_ISDIR(mode) or mode & 0o111):
            raise OSError(errno.EACCES, os.strerror(errno.EACCES))
        return
    shift = 6 if uid == os.geteuid() else 3 if gid in (os.getegid(), *os.getgroups()) else 0
    if (mode >> shift) & want != want:
        raise OSError(errno.EACCES, os.strerror(errno.EACCES))


__all__ = ["PROCEED", "Call", "Install", "Syscalls"]
