"""open, creat, openat, openat2: a path opened through the capabilities, an fd installed.

What the program gets for what was opened (docs/sandbox.md, "What an open
gives the program"): a host fd as it is (passthrough, the host trees); a
directory or O_PATH capability as it is, recorded for the calls that name
it later; any other capability as a memory file of its bytes (a regular
file opened read-only) or through a pump (pump.py).
"""

from __future__ import annotations

import errno
import os
import stat

from redoxcap.broker.calls.base import (
    PROCEED,
    Call,
    Family,
    Install,
    Proceed,
    c_int,
    close,
    error,
    syscall,
)
from redoxcap.broker.pump import snapshot
from redoxcap.wire import linux
from redoxcap.wire import protocol as P
from redoxcap.wire.linux import (
    AT_FDCWD,
    O_TMPFILE_BIT,
    OPEN_HOW,
    RESOLVE_BENEATH,
    RESOLVE_CACHED,
    RESOLVE_IN_ROOT,
    RESOLVE_NO_MAGICLINKS,
)

TTY = "/dev/tty"
# What a continued open may not carry: it must read a file and no more (O_PATH opens check
# no Landlock right at all: the fd would name any host file to fstat)
_NOT_READING = os.O_ACCMODE | os.O_CREAT | os.O_TRUNC | O_TMPFILE_BIT | os.O_PATH


def _reads_only(flags: int) -> bool:
    return not flags & _NOT_READING


class Opening(Family):
    """The open calls."""

    @syscall()
    def open(self, call: Call) -> Install | Proceed:
        return self._open(call, AT_FDCWD, call.args[0], c_int(call.args[1]), call.args[2],
                          continuable=True)

    @syscall()
    def creat(self, call: Call) -> Install:
        flags = os.O_CREAT | os.O_WRONLY | os.O_TRUNC
        return self._open(call, AT_FDCWD, call.args[0], flags, call.args[1])

    @syscall()
    def openat(self, call: Call) -> Install | Proceed:
        a = call.args
        return self._open(call, c_int(a[0]), a[1], c_int(a[2]), a[3], continuable=True)

    @syscall()
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
        flags, mode, resolve = OPEN_HOW.unpack_from(raw)
        if resolve & RESOLVE_CACHED:
            raise OSError(errno.EAGAIN, "nothing is cached here")
        if resolve & ~(RESOLVE_BENEATH | RESOLVE_IN_ROOT | RESOLVE_NO_MAGICLINKS):
            raise OSError(errno.EINVAL, "RESOLVE_NO_XDEV and RESOLVE_NO_SYMLINKS are not served")
        if resolve & RESOLVE_BENEATH and resolve & RESOLVE_IN_ROOT:
            raise error(errno.EINVAL)
        if mode & ~0o7777 or (mode and not flags & (os.O_CREAT | os.O_TMPFILE)):
            raise error(errno.EINVAL)
        ours = (P.O_RESOLVE_BENEATH if resolve & RESOLVE_BENEATH else 0) | (
            P.O_RESOLVE_IN_ROOT if resolve & RESOLVE_IN_ROOT else 0)
        return self._open(call, c_int(a[0]), a[1], flags & 0xFFFF_FFFF, mode, ours)

    def _open(self, call: Call, dirfd: int, addr: int, flags: int, mode: int,
              resolve: int = 0, continuable: bool = False) -> Install | Proceed:
        """The open; continuable: its flags are registers, which the kernel cannot be made to
        read otherwise than the broker did (open, openat; not openat2's struct)."""
        program, locator = self.program, self.program.locator
        path = locator.path(call, addr)
        if flags & (os.O_CREAT | O_TMPFILE_BIT):
            mode = call.created_mode(mode)
        if path == TTY and dirfd == AT_FDCWD:
            return Install(self.terminal(call), bool(flags & os.O_CLOEXEC))
        loc = locator.locate(call, dirfd, path, resolve)
        try:
            if continuable and loc.host and path.startswith("/") and _reads_only(flags):
                # the kernel opens what the broker found, and no fd is installed (ADDFD waits
                # for the target). Landlock bounds it whatever a racing thread writes over the
                # path (docs/sandbox.md, "Why never CONTINUE a path the broker decided on")
                program.hosts.find(path, not flags & os.O_NOFOLLOW)
                return PROCEED
            fd, from_host = program.view.in_view(loc, not flags & os.O_NOFOLLOW, lambda at: (
                locator.open_at(at, flags, mode, passthrough=True), at.host))
        except OSError as exc:
            if exc.errno == errno.ENODEV and loc.namespace:  # nothing was handed there
                if flags & os.O_DIRECTORY and locator.ancestor_status(loc.absolute) is not None:
                    raise OSError(errno.EACCES, "a directory above what was handed") from None
                raise error(errno.EACCES if flags & (os.O_CREAT | O_TMPFILE_BIT)
                            else errno.ENOENT) from None
            raise
        finally:
            loc.close()
        try:
            if not from_host:
                st = os.fstat(fd)
                if stat.S_ISREG(st.st_mode):
                    program.passed_files.add(linux.identity(st))
            fd = self.for_the_program(fd, flags)
        except BaseException:
            close(fd)
            raise
        return Install(fd, bool(flags & os.O_CLOEXEC))

    def terminal(self, call: Call) -> int:
        """/dev/tty: the terminal the program was given as fd 0, 1 or 2 (a copy of that fd:
        nothing it did not hold already), ENXIO when none is one, as for a process without
        a controlling terminal."""
        for fd in (0, 1, 2):
            try:
                dup = self.program.locator.target_fd(call, fd)
            except OSError:
                continue
            if os.isatty(dup):
                return dup
            close(dup)
        raise OSError(errno.ENXIO, "no terminal was given")

    def for_the_program(self, fd: int, flags: int) -> int:
        """What the program gets for an fd just opened (owned; the answer is owned too).

        A host fd (passthrough, the host trees) as it is; a directory or O_PATH
        capability as it is, recorded, for the `*at` calls, getdents and fstat
        that name it; any other capability (a file without passthrough, a
        device, a connection) through a pump, since read(2) and write(2) on a
        capability socket would speak frames.
        """
        program = self.program
        st = os.fstat(fd)
        if not stat.S_ISSOCK(st.st_mode):
            return fd
        if not flags & (os.O_PATH | os.O_DIRECTORY):
            try:
                status = program.status_of_capability(fd)
            except OSError:
                status = None
            is_dir = status is not None and stat.S_ISDIR(status.st_mode)
            if status is not None and stat.S_ISREG(status.st_mode) and \
                    flags & os.O_ACCMODE == os.O_RDONLY and not flags & os.O_TRUNC:
                copy = snapshot(fd, status.st_size)
                if copy is not None:
                    program.snapshots.add(linux.identity(os.fstat(copy)), status)
                    close(fd)
                    return copy
            if not is_dir:
                regular = status is not None and stat.S_ISREG(status.st_mode)
                return program.pumps.start(fd, flags, regular_file=regular)
        program.caps.add(linux.identity(st))
        return fd
