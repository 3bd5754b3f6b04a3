"""stat, lstat, newfstatat, fstat, statx, access and readlink: what a name or an fd is.

The status is packed in the layout of the program's machine (structs.py).
An fd the broker handed over stands for what was opened: a capability for
its file (FSTAT), a routed file's pump or memory file for the file too.
"""

from __future__ import annotations

import errno
import os
import stat
from collections.abc import Callable
from typing import Any

from redoxcap.broker.calls.base import Call, Family, c_int, close, error, syscall
from redoxcap.broker.calls.locate import Location
from redoxcap.broker.hostfs import WRITABLE_DEVICES
from redoxcap.broker.structs import pack_stat, pack_statx
from redoxcap.wire import linux
from redoxcap.wire.linux import AT_EMPTY_PATH, AT_FDCWD, AT_SYMLINK_NOFOLLOW


class Status(Family):
    """The status calls."""

    def _pack_stat(self, st: Any) -> bytes:
        return pack_stat(self.program.machine, st)

    @syscall()
    def stat(self, call: Call) -> int:
        return self._stat_into(call, AT_FDCWD, call.args[0], 0, call.args[1], self._pack_stat)

    @syscall()
    def lstat(self, call: Call) -> int:
        return self._stat_into(call, AT_FDCWD, call.args[0], AT_SYMLINK_NOFOLLOW, call.args[1],
                               self._pack_stat)

    @syscall()
    def newfstatat(self, call: Call) -> int:
        a = call.args
        return self._stat_into(call, c_int(a[0]), a[1], c_int(a[3]), a[2], self._pack_stat)

    @syscall()
    def fstat(self, call: Call) -> int:
        st = self.status_of_fd(call, c_int(call.args[0]))
        call.mem.write(call.args[1], self._pack_stat(st))
        return 0

    @syscall()
    def statx(self, call: Call) -> int:
        a = call.args
        return self._stat_into(call, c_int(a[0]), a[1], c_int(a[2]), a[4], pack_statx)

    def _stat_into(self, call: Call, dirfd: int, addr: int, flags: int, buf: int,
                   pack: Callable[[Any], bytes]) -> int:
        program, locator = self.program, self.program.locator
        path = locator.path(call, addr)
        if not path and flags & AT_EMPTY_PATH:
            st = self.status_of_fd(call, dirfd)
        else:
            loc = locator.locate(call, dirfd, path)
            follow = not flags & AT_SYMLINK_NOFOLLOW
            try:
                st = program.view.in_view(loc, follow, lambda at: locator.status_at(at, follow))
            finally:
                loc.close()
        call.mem.write(buf, pack(st))
        return 0

    def status_of_fd(self, call: Call, fd: int) -> Any:
        """fstat of the target's fd (or its cwd for AT_FDCWD), a capability or not."""
        program = self.program
        if fd == AT_FDCWD:
            cwd = call.process.cwd
            return os.fstat(cwd.fd) if cwd.host else program.status_of_capability(cwd.fd)
        dup = program.locator.target_fd(call, fd)
        try:
            st = os.fstat(dup)
            if stat.S_ISSOCK(st.st_mode) and linux.identity(st) in program.caps:
                return program.status_of_capability(dup)
            routed = program.pumps.capability_of(linux.identity(st)) if stat.S_ISSOCK(st.st_mode) \
                else None
            if routed is not None:  # a routed file is the file, not the socket that carries it
                return program.status_of_capability(routed)
            copied = program.snapshots.get(linux.identity(st)) if stat.S_ISREG(st.st_mode) else None
            return copied if copied is not None else st
        finally:
            close(dup)

    # -- access ----------------------------------------------------------------------------------

    @syscall()
    def access(self, call: Call) -> int:
        return self._access(call, AT_FDCWD, call.args[0], c_int(call.args[1]), 0)

    @syscall()
    def faccessat(self, call: Call) -> int:
        a = call.args
        return self._access(call, c_int(a[0]), a[1], c_int(a[2]), 0)

    @syscall()
    def faccessat2(self, call: Call) -> int:
        a = call.args
        return self._access(call, c_int(a[0]), a[1], c_int(a[2]), c_int(a[3]))

    def _access(self, call: Call, dirfd: int, addr: int, mode: int, flags: int) -> int:
        if mode & ~7:
            raise error(errno.EINVAL)
        program, locator = self.program, self.program.locator
        loc = locator.locate(call, dirfd, locator.path(call, addr))
        follow = not flags & AT_SYMLINK_NOFOLLOW

        def check(at: Location) -> Any:
            st = locator.status_at(at, follow)
            if mode & os.W_OK and at.host and at.path not in WRITABLE_DEVICES:
                raise OSError(errno.EROFS, os.strerror(errno.EROFS))
            return st

        try:
            st = program.view.in_view(loc, follow, check)
        finally:
            loc.close()
        _check_access(st.st_mode, st.st_uid, st.st_gid, mode)
        return 0

    # -- symlinks --------------------------------------------------------------------------------

    @syscall()
    def readlink(self, call: Call) -> int:
        a = call.args
        return self._readlink(call, AT_FDCWD, a[0], a[1], a[2])

    @syscall()
    def readlinkat(self, call: Call) -> int:
        a = call.args
        return self._readlink(call, c_int(a[0]), a[1], a[2], a[3])

    def _readlink(self, call: Call, dirfd: int, addr: int, buf: int, size: int) -> int:
        if c_int(size) <= 0:
            raise error(errno.EINVAL)
        program, locator = self.program, self.program.locator
        loc = locator.locate(call, dirfd, locator.path(call, addr))

        def read_link(at: Location) -> str:
            if at.host:
                return program.hosts.readlink(at.path)
            try:
                return locator.readlink_at(at)
            except OSError as exc:
                if exc.errno == errno.ENODEV and at.namespace and \
                        locator.ancestor_status(at.absolute) is not None:
                    raise error(errno.EINVAL) from None  # a directory, not a link
                raise

        try:
            body = program.view.in_view(loc, False, read_link)
        finally:
            loc.close()
        data = body.encode(errors="surrogateescape")[:size]
        call.mem.write(buf, data)
        return len(data)


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
