"""getdents64, getcwd, chdir and fchdir: listing directories and the cwd of each process.

The cwd is the broker's (state.py): a capability, or a host-tree directory,
per process. Listings of a capability come from its scheme (names in its
order, with their d_type); a host directory lists itself.
"""

from __future__ import annotations

import errno
import os
import stat
from typing import Any

from redoxcap.broker.calls.base import PROCEED, Call, Family, c_int, close, error, syscall
from redoxcap.broker.calls.locate import FILE_ROOT, Location
from redoxcap.broker.state import Directory
from redoxcap.broker.structs import pack_dirents
from redoxcap.wire import linux
from redoxcap.wire import protocol as P
from redoxcap.wire.call import call_fd, call_value, directory_path
from redoxcap.wire.linux import AT_FDCWD, DT_DIR, DT_UNKNOWN


class Directories(Family):
    """The listing and cwd calls."""

    @syscall()
    def getdents64(self, call: Call) -> Any:
        """Listed by the scheme for a capability (names in its order, with their d_type);
        a host directory lists itself: the kernel acts on the fd, not on a path."""
        caps = self.program.caps
        fd, buf, size = c_int(call.args[0]), call.args[1], call.args[2] & 0xFFFF_FFFF
        dup = self.program.locator.target_fd(call, fd)
        try:
            identity = linux.identity(os.fstat(dup))
            if identity not in caps:
                return PROCEED
            start = caps.position(identity)
            # `.` and `..` first, as Linux lists them (ls -a, and programs that count on them)
            dots = [(".", DT_DIR), ("..", DT_DIR)][start:]
            entries = dots + _listing(dup, max(0, start - 2))
        finally:
            close(dup)
        data, count = pack_dirents(entries, start, size)
        if entries and not count:
            raise OSError(errno.EINVAL, "buffer too small")
        call.mem.write(buf, data)
        caps.advance(identity, start + count)
        return len(data)

    @syscall()
    def getcwd(self, call: Call) -> int:
        data = call.process.cwd.path.encode() + b"\0"
        if len(data) > call.args[1]:
            raise OSError(errno.ERANGE, os.strerror(errno.ERANGE))
        call.mem.write(call.args[0], data)
        return len(data)

    @syscall()
    def chdir(self, call: Call) -> Any:
        """The broker's cwd of the process changes; when the new one is a host directory the
        kernel reaches by the same path (a handed directory, a host tree), the kernel's too:
        the call goes on (CONTINUE), so that a relative execve finds what the broker found.
        Whatever a racing thread writes there, the kernel's cwd only serves execve, which
        Landlock bounds to what the program could name anyway (docs/sandbox.md)."""
        program, locator = self.program, self.program.locator
        path = locator.path(call, call.args[0])
        loc = locator.locate(call, AT_FDCWD, path)

        def enter(at: Location) -> Directory:
            if at.host:
                real = program.hosts.resolve(at.path)
                fd = os.open(real, os.O_PATH | os.O_DIRECTORY | os.O_CLOEXEC)
                return Directory(fd, real, True)
            fd = call_fd(at.cap, P.OPENAT, [at.path, os.O_RDONLY | os.O_DIRECTORY | at.resolve, 0])
            try:
                where = self._where(fd, at, call.process.cwd)
            except BaseException:
                close(fd)
                raise
            # beneath a trusted directory, in its scheme: native lookups may be asked of it too
            return Directory(fd, where, False, trusted=at.origin is not None)

        try:
            new = program.view.in_view(loc, True, enter)
        except OSError as exc:
            if exc.errno == errno.ENODEV and loc.namespace:
                raise error(errno.ENOENT) from None
            raise
        finally:
            loc.close()
        process = call.process
        program.processes.leaving(process)
        process.set_cwd(new)
        reached = program.kernel_path(new)
        if reached is not None and (path.startswith("/") or process.kernel_cwd is not None):
            base = "/" if path.startswith("/") else process.kernel_cwd
            if os.path.realpath(os.path.join(base, path)) == reached:
                process.kernel_cwd = reached
                return PROCEED
        return 0

    @syscall()
    def fchdir(self, call: Call) -> int:
        program = self.program
        dup: int | None = program.locator.target_fd(call, c_int(call.args[0]))
        try:
            st = os.fstat(dup)
            if stat.S_ISSOCK(st.st_mode) and linux.identity(st) in program.caps:
                if not stat.S_ISDIR(program.status_of_capability(dup).st_mode):
                    raise OSError(errno.ENOTDIR, os.strerror(errno.ENOTDIR))
                new_fd = call_fd(dup, P.CLONE)  # the broker's own: the target may close or use its fd
            elif stat.S_ISDIR(st.st_mode) and \
                    program.hosts.inside(real := os.readlink(f"/proc/self/fd/{dup}")):
                program.processes.leaving(call.process)
                call.process.set_cwd(Directory(dup, real, True))
                dup = None  # the cwd's now
                return 0
            else:
                raise OSError(errno.ENOTDIR, os.strerror(errno.ENOTDIR))
        finally:
            if dup is not None:
                close(dup)
        try:
            where = self._where(new_fd, Location(new_fd, "", False), call.process.cwd)
        except BaseException:
            close(new_fd)
            raise
        program.processes.leaving(call.process)
        call.process.set_cwd(Directory(new_fd, where, False))
        return 0

    def _where(self, fd: int, loc: Location, cwd: Directory) -> str:
        """getcwd's string for a directory capability just opened at loc (after symlinks)."""
        locator = self.program.locator
        try:
            shown = locator.mounted_path(call_value(fd, P.FPATH, kind=str))
            if shown is not None:
                return shown
        except OSError:
            pass
        try:
            if loc.namespace:
                root_path, _ = P.split_namespace_path(loc.ns_path)
                root = locator.open_scheme_root(loc)
                try:
                    return directory_path(fd, loc.cap if root is None else root,
                                          _display(root_path))
                finally:
                    if root is not None:
                        close(root)
            if not cwd.host:
                return directory_path(fd, cwd.fd, cwd.path)
        except OSError:
            pass
        return _display(call_value(fd, P.FPATH, kind=str))


def _display(scheme_path: str) -> str:
    """/scheme/file/x is the program's /x; any other scheme path is shown as it is."""
    if scheme_path + "/" == FILE_ROOT or scheme_path.startswith(FILE_ROOT):
        return scheme_path[len(FILE_ROOT) - 1:] or "/"
    return scheme_path


def _listing(fd: int, start: int) -> list[tuple[str, int]]:
    """(name, d_type) from position start: READDIR, or GETDENTS (types unknown) where the
    scheme has no READDIR."""
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
