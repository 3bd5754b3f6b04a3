"""execve, execveat: the programs processes run.

New processes are the kernel's to make (clone, fork and vfork are not the
broker's: state.py says how a child gets the cwd its parent had when it
forked). An exec cannot be emulated: the broker checks its copy of the path
and lets the kernel run the call (PROCEED); docs/sandbox.md says why that is
safe (Landlock bounds what the kernel may find to what the program could name).
"""

from __future__ import annotations

import errno
import os
import stat
from typing import Any

from redoxcap.broker.calls.base import PROCEED, Call, Family, c_int, close, error, syscall
from redoxcap.wire.linux import AT_EMPTY_PATH, AT_FDCWD


class Processes(Family):
    """The process calls."""

    @syscall()
    def execve(self, call: Call) -> Any:
        self._executable(call, self.program.locator.path(call, call.args[0]))
        return PROCEED

    @syscall()
    def execveat(self, call: Call) -> Any:
        program = self.program
        a = call.args
        path = program.locator.path(call, a[1])
        if path:
            if not path.startswith("/") and c_int(a[0]) != AT_FDCWD:
                raise OSError(errno.EACCES, "execveat relative to a directory fd is not served")
            self._executable(call, path)
            return PROCEED
        if not c_int(a[4]) & AT_EMPTY_PATH:
            raise error(errno.ENOENT)
        dup = program.locator.target_fd(call, c_int(a[0]))
        try:
            real = os.readlink(f"/proc/self/fd/{dup}")
            reachable = program.hosts.inside(real) or any(
                m.executable and (real == m.path or real.startswith(m.path.rstrip("/") + "/"))
                for m in program.mounts)
            if not stat.S_ISREG(os.fstat(dup).st_mode) or not reachable:
                raise OSError(errno.EACCES, "only files of the host trees and handed directories "
                              "are executed")
        finally:
            close(dup)
        return PROCEED

    def _executable(self, call: Call, path: str) -> None:
        """An exec'd file must be a regular executable file in the host trees or in a handed
        directory the kernel reaches at the same path (see docs/sandbox.md); a relative path
        only while the kernel's cwd is the broker's.

        Raises:
            OSError: ENOENT for a path nothing was handed at, EACCES for anything else.
        """
        program, locator = self.program, self.program.locator
        process = call.process
        if not path.startswith("/"):
            here = program.kernel_path(process.cwd)
            if here is None or process.kernel_cwd != here:
                raise OSError(errno.EACCES, "a relative program where the kernel cannot find it")
            loc = locator.locate(call, AT_FDCWD, path)
        else:
            placed = locator.placed(path)
            mounted = locator.mount_of(path)
            if placed is not None and placed.view is not None and mounted is not None:
                if not mounted[0].executable:
                    raise OSError(errno.EACCES, "programs in this directory cannot be executed")
                loc = placed
            elif placed is not None:
                loc = placed
            else:
                try:
                    locator.status_at(locator.locate(call, AT_FDCWD, path), follow=True)
                except OSError as exc:
                    if exc.errno in (errno.ENODEV, errno.ENOENT):
                        raise error(errno.ENOENT) from None
                raise OSError(errno.EACCES, "only files of the host trees and handed directories "
                              "are executed")
        try:
            st = program.view.in_view(loc, True, lambda at: os.stat(program.hosts.resolve(at.path))
                                      if at.host else locator.status_at(at, True))
        finally:
            loc.close()
        if not stat.S_ISREG(st.st_mode) or not st.st_mode & 0o111:
            raise OSError(errno.EACCES, os.strerror(errno.EACCES))
