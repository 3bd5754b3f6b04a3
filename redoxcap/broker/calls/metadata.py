"""chmod, utime and chown in all their forms: metadata changed through scheme operations.

A path's change is CHMODAT, UTIMENSAT or CHOWNAT on the capability it is
located in (permission bits only; an owner change only where it changes
nothing). On an fd: its capability asks its scheme; a file handed over as
a host fd is changed on the broker's copy when the program opened it for
writing (its scheme allowed that), through its handed directory otherwise.
"""

from __future__ import annotations

import errno
import fcntl
import os
import stat
import time

from redoxcap.broker.calls.base import Call, Family, c_int, close, error, syscall
from redoxcap.broker.calls.locate import Location
from redoxcap.wire import linux
from redoxcap.wire import protocol as P
from redoxcap.wire.call import call_value
from redoxcap.wire.linux import (
    AT_EMPTY_PATH,
    AT_FDCWD,
    AT_SYMLINK_NOFOLLOW,
    ID_UNCHANGED,
    UTIME_NOW,
    UTIME_OMIT,
)


class Metadata(Family):
    """The chmod, utime and chown calls."""

    @syscall()
    def chmod(self, call: Call) -> int:
        return self._change(call, AT_FDCWD, call.args[0], P.CHMODAT, _mode(call.args[1]), 0)

    @syscall()
    def fchmod(self, call: Call) -> int:
        return self._change_fd(call, c_int(call.args[0]), P.CHMODAT, _mode(call.args[1]))

    @syscall()
    def fchmodat(self, call: Call) -> int:
        a = call.args
        if not a[1]:
            raise error(errno.EFAULT)
        return self._change(call, c_int(a[0]), a[1], P.CHMODAT, _mode(a[2]), 0)

    @syscall()
    def fchmodat2(self, call: Call) -> int:
        a = call.args
        return self._change(call, c_int(a[0]), a[1], P.CHMODAT, _mode(a[2]), c_int(a[3]))

    @syscall()
    def chown(self, call: Call) -> int:
        a = call.args
        return self._change(call, AT_FDCWD, a[0], P.CHOWNAT, _ids(a[1], a[2]), 0)

    @syscall()
    def lchown(self, call: Call) -> int:
        a = call.args
        return self._change(call, AT_FDCWD, a[0], P.CHOWNAT, _ids(a[1], a[2]), AT_SYMLINK_NOFOLLOW)

    @syscall()
    def fchown(self, call: Call) -> int:
        a = call.args
        return self._change_fd(call, c_int(a[0]), P.CHOWNAT, _ids(a[1], a[2]))

    @syscall()
    def fchownat(self, call: Call) -> int:
        a = call.args
        return self._change(call, c_int(a[0]), a[1], P.CHOWNAT, _ids(a[2], a[3]), c_int(a[4]))

    @syscall()
    def utimensat(self, call: Call) -> int:
        a = call.args
        times = _times(call, a[2], 1)
        return self._change(call, c_int(a[0]), a[1], P.UTIMENSAT, times, c_int(a[3]))

    @syscall()
    def utimes(self, call: Call) -> int:
        return self._change(call, AT_FDCWD, call.args[0], P.UTIMENSAT,
                            _times(call, call.args[1], 1000), 0)

    @syscall()
    def futimesat(self, call: Call) -> int:
        a = call.args
        return self._change(call, c_int(a[0]), a[1], P.UTIMENSAT, _times(call, a[2], 1000), 0)

    @syscall()
    def utime(self, call: Call) -> int:
        return self._change(call, AT_FDCWD, call.args[0], P.UTIMENSAT,
                            _times(call, call.args[1], 1, fields=1), 0)

    def _change(self, call: Call, dirfd: int, addr: int, op: int, args: list, flags: int) -> int:
        """A metadata change (CHMODAT, UTIMENSAT, CHOWNAT) of a path, or of dirfd's file for
        a NULL or empty path with AT_EMPTY_PATH."""
        if flags & ~(AT_SYMLINK_NOFOLLOW | AT_EMPTY_PATH):
            raise error(errno.EINVAL)
        program, locator = self.program, self.program.locator
        path = locator.path(call, addr) if addr else ""
        if not path:
            if addr and not flags & AT_EMPTY_PATH:
                raise error(errno.ENOENT)
            if dirfd == AT_FDCWD and not addr:
                raise error(errno.EFAULT)
            return self._change_fd(call, dirfd, op, args)
        loc = locator.locate(call, dirfd, path)
        nofollow = os.O_NOFOLLOW if flags & AT_SYMLINK_NOFOLLOW else 0

        def change(at: Location) -> None:
            if at.host:
                raise OSError(errno.EROFS, "the host trees are read-only")
            call_value(at.cap, op, [at.path, *args, nofollow | at.resolve])

        try:
            program.view.in_view(loc, not nofollow, change)
        finally:
            loc.close()
        return 0

    def _change_fd(self, call: Call, fd: int, op: int, args: list) -> int:
        """As _change, on the file behind the target's fd (see the module)."""
        program = self.program
        if fd == AT_FDCWD:
            cwd = call.process.cwd
            if cwd.host:
                raise OSError(errno.EROFS, "the host trees are read-only")
            call_value(cwd.fd, op, ["", *args, 0])
            return 0
        dup = program.locator.target_fd(call, fd)
        try:
            st = os.fstat(dup)
            identity = linux.identity(st)
            if stat.S_ISSOCK(st.st_mode):
                cap = dup if identity in program.caps else program.pumps.capability_of(identity)
                if cap is None:
                    raise OSError(errno.EPERM, "not a file")
                call_value(cap, op, ["", *args, 0])
                return 0
            if not stat.S_ISREG(st.st_mode) or identity not in program.passed_files:
                raise OSError(errno.EROFS if program.hosts.inside(os.readlink(f"/proc/self/fd/{dup}"))
                              else errno.EPERM, "not a file of the program's capabilities")
            if fcntl.fcntl(dup, fcntl.F_GETFL) & os.O_ACCMODE != os.O_RDONLY:
                _change_host_file(dup, st, op, args)
                return 0
            real = os.readlink(f"/proc/self/fd/{dup}")
            for mount in program.mounts:
                if real.startswith(mount.path.rstrip("/") + "/"):
                    call_value(mount.cap, op, [real[len(mount.path):].lstrip("/"), *args,
                                               os.O_NOFOLLOW])
                    return 0
            raise OSError(errno.EPERM, "a file opened read-only outside the handed directories")
        finally:
            close(dup)


def _mode(value: int) -> list:
    return [value & 0o7777]


def _ids(uid: int, gid: int) -> list:
    uid, gid = uid & 0xFFFF_FFFF, gid & 0xFFFF_FFFF
    return [-1 if uid == ID_UNCHANGED else uid, -1 if gid == ID_UNCHANGED else gid]


def _times(call: Call, addr: int, unit: int, fields: int = 2) -> list:
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
            raise error(errno.EINVAL)
        else:
            out.append(sec * 1_000_000_000 + frac * unit)
    return out


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
