"""rename, renameat, renameat2, link, linkat: the calls that name two paths.

As rt's two-path calls: one request on one capability when both paths are
located in it, else on the first with the second's directory passed along
(the scheme answers EXDEV for a directory of another scheme).
"""

from __future__ import annotations

import errno
import os

from redoxcap.broker.calls.base import Call, Family, c_int, close, error, syscall
from redoxcap.broker.calls.locate import Location
from redoxcap.wire import protocol as P
from redoxcap.wire.call import call_value
from redoxcap.wire.linux import AT_FDCWD, RENAME_NOREPLACE


class TwoPaths(Family):
    """The rename and link calls."""

    @syscall()
    def rename(self, call: Call) -> int:
        return self._two_paths(call, P.RENAMEAT, AT_FDCWD, call.args[0], AT_FDCWD, call.args[1])

    @syscall()
    def renameat(self, call: Call) -> int:
        a = call.args
        return self._two_paths(call, P.RENAMEAT, c_int(a[0]), a[1], c_int(a[2]), a[3])

    @syscall()
    def renameat2(self, call: Call) -> int:
        a = call.args
        flags = c_int(a[4])
        if flags & ~RENAME_NOREPLACE:
            raise OSError(errno.EINVAL, "RENAME_EXCHANGE and RENAME_WHITEOUT are not served")
        return self._two_paths(call, P.RENAMEAT, c_int(a[0]), a[1], c_int(a[2]), a[3],
                               noreplace=bool(flags))

    @syscall()
    def link(self, call: Call) -> int:
        return self._two_paths(call, P.LINKAT, AT_FDCWD, call.args[0], AT_FDCWD, call.args[1])

    @syscall()
    def linkat(self, call: Call) -> int:
        a = call.args
        if c_int(a[4]):  # AT_SYMLINK_FOLLOW, AT_EMPTY_PATH: LINKAT never follows old
            raise OSError(errno.EINVAL, "linkat flags are not served")
        return self._two_paths(call, P.LINKAT, c_int(a[0]), a[1], c_int(a[2]), a[3])

    def _two_paths(self, call: Call, op: int, olddir: int, old: int, newdir: int, new: int,
                   noreplace: bool = False) -> int:
        locator, view = self.program.locator, self.program.view
        view.names_changed()  # a renamed directory, or a link renamed over one

        def send(src: Location, dst: Location) -> None:
            if src.host or dst.host:
                raise error(errno.EROFS if src.host and dst.host else errno.EXDEV)
            if noreplace:
                try:
                    locator.status_at(dst, follow=False)
                except FileNotFoundError:
                    pass
                else:
                    raise OSError(errno.EEXIST, os.strerror(errno.EEXIST))
            self._send(op, src, dst)

        src = locator.locate(call, olddir, locator.path(call, old))
        try:
            dst = locator.locate(call, newdir, locator.path(call, new))
            try:
                view.in_view(src, False, lambda s: view.in_view(dst, False, lambda d: send(s, d)))
            finally:
                dst.close()
        finally:
            src.close()
        return 0

    def _send(self, op: int, src: Location, dst: Location) -> None:
        """One capability, or the second directory passed along."""
        if src.cap == dst.cap:
            call_value(src.cap, op, [src.path, dst.path])
            return
        locator = self.program.locator
        opened: list[int] = []
        try:
            fd1, p1 = src.cap, src.path
            fd2, p2 = dst.cap, dst.path
            if src.namespace:
                fd1, p1 = locator.open_scheme_root(p1), P.split_namespace_path(p1)[1]
                opened.append(fd1)
            if dst.namespace:
                fd2, p2 = locator.open_scheme_root(p2), P.split_namespace_path(p2)[1]
                opened.append(fd2)
            call_value(fd1, op, [p1, p2], [fd2])
        finally:
            for fd in opened:
                close(fd)
