"""Where a path goes: every brokered path call locates its path here first.

Paths are resolved as rt resolves them (rt/_paths.py): a relative path, or
AT_FDCWD, goes to the cwd capability; an `*at` call's to the capability
behind its directory fd; an absolute path to the namespace (`/x` is
`/scheme/file/x`, `/scheme/NAME/...` names a scheme), unless it lies in a
directory handed over at a path of its own (`run --dir`, /tmp) or in the
read-only host trees (hostfs.py), which the broker serves itself. The
legacy `NAME:rest` form is not recognised: to an unmodified program, `a:b`
is a file name. A namespace path goes to the kept root of its name
(wire/roots.py, as rt does): one round trip to the scheme, nsmgr asked once
per name and again after any change of the namespace.

Which of these an absolute path goes to depends on the path alone (the
handed directories and the host trees are fixed for a run), so it is
worked out once per path (`Locator._placement`) and kept.

A `Location` is the answer: a capability and the path to send on it, or a
host path. `open_at`, `status_at` and `readlink_at` act on one: natively
where the capability's file scheme handed the broker its host directory
(native.py), else through the capability; view.py walks a path the way the
program sees its handed directories when their scheme cannot.
"""

from __future__ import annotations

import errno
import os
import posixpath
import stat
from collections.abc import Sequence
from dataclasses import dataclass
from typing import Any, NamedTuple

from redoxcap.broker.calls.base import Call, close
from redoxcap.broker.calls.native import HostDirectory
from redoxcap.broker.hostfs import HostTrees
from redoxcap.broker.memo import PathMemo
from redoxcap.broker.state import CapabilityTable, Directory, Mount
from redoxcap.wire import call as capability
from redoxcap.wire import linux
from redoxcap.wire import protocol as P
from redoxcap.wire.linux import AT_FDCWD
from redoxcap.wire.protocol import SCHEME_ROOT
from redoxcap.wire.roots import NamespaceRoots, Root
from redoxcap.wire.stat import Stat

FILE_ROOT = "/scheme/file/"
_EMPTY_ROOT = Stat(st_mode=stat.S_IFDIR | 0o555, st_nlink=2, st_ino=1)


@dataclass
class Location:
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
    # in a handed directory: the absolute path the program means, for the view walk
    view: str | None = None
    walk_first: bool = False  # `..` above the handed directory: only the view walk is right
    # the trusted directory cap stands for (the cwd or a handed directory), whose host
    # directory may serve the lookup natively; None: through the capability only
    origin: Directory | Mount | None = None
    ns_path: str = ""  # for a namespace location: `/scheme/NAME/rest` (cap is NAME's root)

    def close(self) -> None:
        if self.owned is not None:
            close(self.owned)
            self.owned = None


class Placement(NamedTuple):
    """Where an absolute path goes, as far as it depends on the path alone (Locator._placement).

    host: the host trees serve it (hostfs; a directory above a handed one, for its status
    only, or a name beside one, absent); else it lies in mount, at rest below its root,
    whose `..` leave it when walk_first (above_mount). beside: a host path that is a name
    beside a handed directory (hostfs.HostTrees.beside_handed).
    """

    host: bool
    mount: Mount | None
    rest: str
    walk_first: bool
    beside: bool


class Locator:
    """Paths of one program to Locations, and the two acts every family needs on them."""

    def __init__(self, ns: int, hosts: HostTrees, mounts: Sequence[Mount],
                 caps: CapabilityTable, o_largefile: int, passthrough: bool,
                 directfs_grant: int | None = None) -> None:
        """Args:
            ns: the namespace capability (the broker's own).
            hosts: the read-only host trees.
            mounts: the directories handed over at paths of their own (`run --dir`, /tmp).
            caps: the capabilities the broker installed in the program.
            o_largefile: Linux's O_LARGEFILE bit on this machine (dropped from opens).
            passthrough: ask schemes for host fds of regular files (O_PASSTHROUGH).
            directfs_grant: the system's grant (owned from now on) for native lookups
                (native.py); None: every lookup goes through the capabilities.
        """
        self.ns = ns
        self.hosts = hosts
        self.mounts = sorted(mounts, key=lambda m: -len(m.visible))
        self._mount_parts = [(m, [c for c in m.visible.split("/") if c]) for m in self.mounts]
        self.caps = caps
        self.o_largefile = o_largefile
        self.passthrough = passthrough
        self.grant = directfs_grant if passthrough else None
        if directfs_grant is not None and self.grant is None:
            os.close(directfs_grant)
        self._mount_natives: dict[Mount, HostDirectory | None] = {}
        self.roots = NamespaceRoots()  # the namespace entries' roots, kept
        # the roots the syscall being answered uses: given back when the next one starts
        # (one syscall at a time), so that none is closed under a call that uses it
        self._held: list[Root] = []
        self._answering: int | None = None
        # where an absolute path is placed (see `placed`), worked out once per path: the
        # handed directories and the host trees are a run's from its start, so the answer
        # for a path never changes (redoxcap/broker/memo.py); and a cwd's handed directory,
        # which a relative path's every call asks of the cwd's path
        self._placement = PathMemo(self._place)
        self._cwd_mount = PathMemo(self.mount_of)

    def close(self) -> None:
        """Release the grant, the handed directories' host directories and the kept roots."""
        self._give_back()
        self.roots.clear()
        for native in self._mount_natives.values():
            if native is not None:
                native.close()
        self._mount_natives.clear()
        if self.grant is not None:
            os.close(self.grant)
            self.grant = None

    # -- the program's arguments -------------------------------------------------------------

    @staticmethod
    def path(call: Call, addr: int) -> str:
        """The path at addr, as the wire can carry it (ENOENT for one that is not UTF-8)."""
        raw = call.mem.string(addr)
        try:
            return raw.decode()
        except UnicodeDecodeError:
            raise OSError(errno.ENOENT, "a path that is not UTF-8 has no capability") from None

    @staticmethod
    def target_fd(call: Call, fd: int) -> int:
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
                close(dup)

    # -- locating ------------------------------------------------------------------------------

    def locate(self, call: Call, dirfd: int, path: str, resolve: int = 0) -> Location:
        """Where a path operation relative to dirfd goes (ENOENT for an empty path)."""
        if call.notif.id != self._answering:  # a new syscall: the last one's roots are free
            self._give_back()
            self._answering = call.notif.id
        if not path:
            raise OSError(errno.ENOENT, "empty path")
        absolute = path.startswith("/")
        if resolve and dirfd != AT_FDCWD:  # openat2's flags: as rt.openat, never the namespace
            if absolute and resolve & P.O_RESOLVE_BENEATH:
                raise OSError(errno.EXDEV, "an absolute path cannot be beneath a directory")
            fd, _, host, owned = self.directory(call, dirfd)
            if host:
                raise OSError(errno.EINVAL, "RESOLVE_* lookups are served in capabilities only")
            return Location(fd, path, False, resolve, owned)
        if absolute:
            if not path.strip("/"):  # `/` is the namespace's root where it has one (as `/x` is
                try:                  # its `/scheme/file/x`), not the status-only view above
                    return self.in_namespace("/", resolve)  # a handed /tmp: `cd /` works
                except OSError:
                    pass  # no `file` (`run --dir`): that view
            placement = self._placement(path)
            placed = self._location(placement, path, resolve)
            cwd = call.process.cwd
            # the cwd at the path getcwd tells (a shell's `cd sub` is chdir("$PWD/sub"),
            # pyenv's shims `cd "$PWD"`): beneath the cwd capability, with its rules,
            # whatever the namespace holds, where no handed directory or host tree is
            in_cwd = not cwd.host and not _scheme_path(path) and (
                path == cwd.path or path.startswith(cwd.path.rstrip("/") + "/"))
            if placement is not None and placement.beside:
                # a name beside a handed directory (a handed /tmp is beside every `/x`):
                # the cwd's, or the namespace's where it has `file` (as `/x/y` is), else absent
                if not in_cwd:
                    try:
                        return self.in_namespace(path, resolve)
                    except OSError:
                        return placed
            elif placed is not None:
                return placed
            if in_cwd:
                return Location(cwd.fd, path[len(cwd.path):].lstrip("/") or ".", False, resolve,
                                origin=cwd if cwd.trusted else None)
            return self.in_namespace(path, resolve)
        fd, host_path, host, owned = self.directory(call, dirfd)
        if host:
            return Location(None, posixpath.join(host_path, path), True)
        loc = Location(fd, path, False, resolve, owned)
        if dirfd == AT_FDCWD and call.process.cwd.trusted:
            loc.origin = call.process.cwd
        if dirfd == AT_FDCWD and not resolve:
            mounted = self._cwd_mount(call.process.cwd.path)
            if mounted is not None:  # the cwd is in a handed directory: it has a program path
                view = call.process.cwd.path.rstrip("/") + "/" + path
                loc.view, loc.walk_first = view, above_mount(mounted[0], view)
        return loc

    def in_namespace(self, path: str, resolve: int = 0) -> Location:
        """An absolute path through the namespace: `/scheme/NAME/rest` as it is, any other
        `/x` as `/scheme/file/x`, sent as `rest` on NAME's kept root (or on the namespace
        capability, for nsmgr to forward, where it hands out no root). The one place that
        decides how a namespace path is reached."""
        ns_path = path if _scheme_path(path) else "/scheme/file" + path
        cap, rest, root = self.roots.take(self.ns, ns_path)
        if root is not None:
            self._held.append(root)
        return Location(cap, rest, False, resolve, None, True, path, ns_path=ns_path)

    def open_scheme_root(self, loc: Location) -> int | None:
        """A directory capability (owned by the caller) for the root of the scheme a
        namespace location names; None when loc.cap is that root (kept, not the caller's)."""
        if loc.cap != self.ns:
            return None
        root, _ = P.split_namespace_path(loc.ns_path)
        return capability.call_fd(self.ns, P.OPENAT, [root, os.O_RDONLY | os.O_DIRECTORY, 0])

    def _give_back(self) -> None:
        held, self._held = self._held, []
        for root in held:
            self.roots.give_back(root)

    def placed(self, path: str, resolve: int = 0) -> Location | None:
        """An absolute path above or beside a handed directory, in one, or in the host trees
        (the deepest wins); None for the namespace's."""
        return self._location(self._placement(path), path, resolve)

    def _place(self, path: str) -> Placement | None:
        """The placement of an absolute path, worked out (`_placement` keeps it)."""
        parts = [c for c in path.split("/") if c]
        mounted = self.mount_of(path)
        depth = _depth(mounted[0]) if mounted is not None else -1
        above = self.hosts.handed_above
        if ".." not in parts and (tuple(parts) in above or (
                parts and tuple(parts[:-1]) in above and depth < len(parts))):
            return self._host_placement(path)  # status only, or absent (hostfs)
        if mounted is not None and self.hosts.depth(path) <= depth:
            mount, rest = mounted
            return Placement(False, mount, rest, above_mount(mount, path), False)
        if self.hosts.claims(path):
            return self._host_placement(path)
        return None

    def _host_placement(self, path: str) -> Placement:
        return Placement(True, None, path, False, self.hosts.beside_handed(path))

    @staticmethod
    def _location(placement: Placement | None, path: str, resolve: int) -> Location | None:
        """The Location of a placed path (a new one: callers may change theirs)."""
        if placement is None:
            return None
        if placement.host:
            return Location(None, path, True)
        mount = placement.mount
        assert mount is not None
        loc = Location(mount.cap, placement.rest, False, resolve, origin=mount)
        if not resolve:
            loc.view, loc.walk_first = path, placement.walk_first
        return loc

    def mount_of(self, path: str) -> tuple[Mount, str] | None:
        """The handed directory an absolute path lies in (the deepest), and the path below it."""
        parts = [c for c in path.split("/") if c]
        for mount, prefix in self._mount_parts:
            if parts[:len(prefix)] == prefix:
                rest = "/".join(parts[len(prefix):])
                return mount, (rest + "/" if rest and path.endswith("/") else rest) or "."
        return None

    def mounted_path(self, scheme_path: str) -> str | None:
        """The path a program sees for `/scheme/NAME/rest` of a handed directory, or None."""
        for mount in self.mounts:
            root = f"{SCHEME_ROOT}/{mount.scheme}"
            if mount.scheme and (scheme_path == root or scheme_path.startswith(root + "/")):
                return mount.visible.rstrip("/") + scheme_path[len(root):] or "/"
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

    # -- acting at a location ------------------------------------------------------------------

    def open_at(self, loc: Location, flags: int, mode: int, passthrough: bool) -> int:
        """Open at a location; returns the broker's fd (a capability or a host fd).

        passthrough asks the scheme for a host fd of a regular file (O_PASSTHROUGH), or
        opens it natively where the scheme handed over its directory.
        """
        flags &= ~(os.O_CLOEXEC | self.o_largefile)
        if loc.host:
            return self.hosts.open(loc.path, flags, mode)
        if passthrough and self.passthrough and not flags & (os.O_PATH | os.O_DIRECTORY):
            native = self.native(loc)
            fd = native.open(loc.path, flags, loc.resolve) if native is not None else None
            if fd is not None:
                return fd
            flags |= P.O_PASSTHROUGH
        return capability.call_fd(loc.cap, P.OPENAT, [loc.path, flags | loc.resolve, mode & 0o7777])

    def status_at(self, loc: Location, follow: bool) -> Any:
        """The status (os.stat_result or Stat) of what a location names."""
        if loc.host:
            return self.hosts.stat(loc.path, follow)
        native = self.native(loc)
        st = native.status(loc.path, follow, loc.resolve) if native is not None else None
        if st is not None:
            return st
        try:
            return capability.stat_at(loc.cap, loc.path, (0 if follow else os.O_NOFOLLOW) | loc.resolve)
        except OSError as exc:
            if exc.errno == errno.ENODEV and loc.namespace:
                above = self.ancestor_status(loc.absolute)
                if above is not None:
                    return above
                if loc.ns_path.rstrip("/") + "/" == FILE_ROOT:
                    return _EMPTY_ROOT  # `/` without a file scheme: there, but empty (rm checks it)
            raise

    def readlink_at(self, loc: Location) -> str:
        """The contents of the symlink a capability location names (EINVAL for anything else)."""
        native = self.native(loc)
        body = native.readlink(loc.path, loc.resolve) if native is not None else None
        if body is not None:
            return body
        return capability.call_value(loc.cap, P.READLINKAT, [loc.path], kind=str)

    def adopt_roots(self, roots: NamespaceRoots) -> None:
        """Use roots (owned from now on), taken ahead on the broker's namespace fd (warmed
        as `warm` would), in place of those it has, which hold nothing yet."""
        self.roots.clear()
        self.roots = roots

    def warm(self, cwd: Directory) -> None:
        """Ask now what the program's first lookups would ask: the host directory of a cwd
        that is no handed directory's (whose daemon may still be starting: not waited for
        here), and, unless the cwd is `/` (then every absolute path is looked up beneath it,
        see `locate`), the namespace's `file` root with its generation page, or, where `file`
        is absent (`run --dir`), that it is (remembered: wire/roots.py). `start_brokered`
        calls it while the program confines itself; what is refused is asked when needed."""
        if cwd.trusted and not cwd.host and self.mount_of(cwd.path) is None:
            self.native(Location(cwd.fd, ".", False, origin=cwd))
        if not cwd.host and cwd.path == "/":
            return
        try:
            _, _, root = self.roots.take(self.ns, FILE_ROOT)
        except OSError:
            return
        if root is not None:
            self.roots.give_back(root)

    def native(self, loc: Location) -> HostDirectory | None:
        """The host directory that serves loc's lookup natively, asked for once per trusted
        directory; None: through the capability."""
        origin = loc.origin
        if origin is None or self.grant is None:
            return None
        if isinstance(origin, Mount):
            if origin not in self._mount_natives:
                self._mount_natives[origin] = HostDirectory.ask(origin.cap, self.grant)
            return self._mount_natives[origin]
        if not origin.native_asked:
            origin.native_asked = True
            origin.native = HostDirectory.ask(origin.fd, self.grant)
        return origin.native


def above_mount(mount: Mount, path: str) -> bool:
    """Whether path's `..` leave the handed directory (where its scheme would stop them)."""
    return ".." in path.split("/") and not mount.holds(posixpath.normpath(path))


def _depth(mount: Mount) -> int:
    return len([c for c in mount.visible.split("/") if c])


def _scheme_path(path: str) -> bool:
    return path == SCHEME_ROOT or path.startswith(SCHEME_ROOT + "/")
