"""execve, execveat: the programs processes run; and memfd_create, of files none may run.

New processes are the kernel's to make (clone, fork and vfork are not the
broker's: state.py says how a child gets the cwd its parent had when it
forked). An exec cannot be emulated: the broker checks its copy of the path
and lets the kernel run the call (PROCEED); docs/sandbox.md says why that is
safe (Landlock bounds what the kernel may find to what the program could name).
Landlock does not check files of the kernel's internal mounts, though, and a
memory file is one: a racing thread could swap a checked fd, or a checked
path, for one (a `dup2` over the fd, `/proc/self/fd/N`). So the program's
memory files are the broker's to make, and none of them can be executed.
"""

from __future__ import annotations

import errno
import os
import stat
from typing import Any

from redoxcap.broker.calls.base import PROCEED, Call, Family, Install, c_int, close, error, syscall
from redoxcap.wire import linux
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

    @syscall()
    def memfd_create(self, call: Call) -> Install:
        """The broker's memfd_create(name, flags), never executable (linux.memfd_noexec:
        MFD_EXEC is EACCES), installed in the program."""
        try:
            name = call.mem.string(call.args[0], linux.MFD_NAME_MAX + 1)
        except OSError as exc:  # as Linux: a name too long is EINVAL
            raise error(errno.EINVAL if exc.errno == errno.ENAMETOOLONG else exc.errno) from None
        flags = call.args[1] & 0xFFFF_FFFF
        return Install(linux.memfd_noexec(name, flags | linux.MFD_CLOEXEC),
                       bool(flags & linux.MFD_CLOEXEC))

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
