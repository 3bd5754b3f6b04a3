"""mkdir, unlink, rmdir, symlink, truncate: calls that change one name (or its file).

Each is one scheme operation on the capability the name is located in
(MKDIRAT, UNLINKAT, SYMLINKAT; truncate opens for writing); the host trees
are read-only.
"""

from __future__ import annotations

import errno
import os
import stat

from redoxcap.broker.calls.base import Call, Family, c_int, close, error, syscall
from redoxcap.broker.calls.locate import Location
from redoxcap.wire import protocol as P
from redoxcap.wire.call import call_value
from redoxcap.wire.linux import AT_FDCWD, AT_REMOVEDIR


class Names(Family):
    """The calls on one name."""

    @syscall()
    def mkdir(self, call: Call) -> int:
        return self._on_name(call, AT_FDCWD, call.args[0], P.MKDIRAT,
                             [call.created_mode(call.args[1])])

    @syscall()
    def mkdirat(self, call: Call) -> int:
        a = call.args
        return self._on_name(call, c_int(a[0]), a[1], P.MKDIRAT, [call.created_mode(a[2])])

    @syscall()
    def unlink(self, call: Call) -> int:
        return self._on_name(call, AT_FDCWD, call.args[0], P.UNLINKAT, [0])

    @syscall()
    def rmdir(self, call: Call) -> int:
        return self._on_name(call, AT_FDCWD, call.args[0], P.UNLINKAT, [P.AT_REMOVEDIR])

    @syscall()
    def unlinkat(self, call: Call) -> int:
        a = call.args
        flags = c_int(a[2])
        if flags & ~AT_REMOVEDIR:
            raise error(errno.EINVAL)
        return self._on_name(call, c_int(a[0]), a[1], P.UNLINKAT, [flags])

    def _on_name(self, call: Call, dirfd: int, addr: int, op: int, extra: list) -> int:
        program, locator = self.program, self.program.locator
        if op != P.MKDIRAT:
            program.view.names_changed()
        loc = locator.locate(call, dirfd, locator.path(call, addr))

        def change(at: Location) -> None:
            if at.host:
                try:
                    program.hosts.stat(at.path, follow=False)
                    exists = True
                except OSError:
                    exists = False
                raise OSError(errno.EEXIST if op == P.MKDIRAT and exists else errno.EROFS,
                              "the host trees are read-only")
            call_value(at.cap, op, [at.path, *extra])

        try:
            program.view.in_view(loc, False, change)
        finally:
            loc.close()
        return 0

    @syscall()
    def symlink(self, call: Call) -> int:
        return self._symlink(call, call.args[0], AT_FDCWD, call.args[1])

    @syscall()
    def symlinkat(self, call: Call) -> int:
        a = call.args
        return self._symlink(call, a[0], c_int(a[1]), a[2])

    def _symlink(self, call: Call, target_addr: int, dirfd: int, addr: int) -> int:
        program, locator = self.program, self.program.locator
        program.view.names_changed()
        target = locator.path(call, target_addr)
        loc = locator.locate(call, dirfd, locator.path(call, addr))

        def make(at: Location) -> None:
            if at.host:
                raise OSError(errno.EROFS, "the host trees are read-only")
            call_value(at.cap, P.SYMLINKAT, [target, at.path])

        try:
            program.view.in_view(loc, False, make)
        finally:
            loc.close()
        return 0

    @syscall()
    def truncate(self, call: Call) -> int:
        length = call.args[1]
        if length >= 1 << 63:
            raise error(errno.EINVAL)
        program, locator = self.program, self.program.locator
        loc = locator.locate(call, AT_FDCWD, locator.path(call, call.args[0]))

        def open_for_writing(at: Location) -> int:
            if at.host:
                raise OSError(errno.EROFS, "the host trees are read-only")
            return locator.open_at(at, os.O_WRONLY, 0, passthrough=True)

        try:
            fd = program.view.in_view(loc, True, open_for_writing)
        finally:
            loc.close()
        try:
            if stat.S_ISSOCK(os.fstat(fd).st_mode):
                call_value(fd, P.FTRUNCATE, [length])
            else:
                os.ftruncate(fd, length)
        finally:
            close(fd)
        return 0
