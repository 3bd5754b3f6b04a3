"""Native lookups: paths beneath a directory its file scheme handed the broker, resolved here.

A lookup through a capability costs a round trip through the router and
the scheme for every stat and open. For a directory of a file scheme that
allows passthrough, the scheme hands the broker (HOSTDIR, with the
system's directfs grant passed along; the program never holds the grant)
O_PATH host fds of the directory and of its anchor, and the broker resolves
paths beneath them itself with the scheme's own fast path
(`wire.beneath.open_natively`: openat2 with RESOLVE_BENEATH or
RESOLVE_IN_ROOT and RESOLVE_NO_MAGICLINKS, the whole lookup in the kernel,
so a rename racing it cannot lead out). Where that alone cannot answer (a
`..` above the start directory, EAGAIN from a racing rename), and for every
open that would create a file, write on a read-only mount, or is not of a
regular file, the lookup goes to the scheme as before. What the broker gets
natively is what the scheme would have answered: a status, or the host fd
of a regular file that passthrough would have handed over.

The broker asks only capabilities it trusts to be its file schemes': the
cwd and the handed directories `run` opened before the program started,
and directories opened beneath them (a scheme of the program's own must
never see the grant).
"""

from __future__ import annotations

import errno
import os
import stat

from redoxcap.broker.hostfs import link_body
from redoxcap.wire import linux
from redoxcap.wire import protocol as P
from redoxcap.wire.beneath import Anchor, open_natively
from redoxcap.wire.call import call, forget

# open flags a native open serves; anything else (O_CREAT, O_DIRECTORY, O_PATH...) is the scheme's
NATIVE_OPEN = (os.O_ACCMODE | os.O_APPEND | os.O_NOFOLLOW | os.O_NONBLOCK | os.O_NOCTTY | os.O_SYNC
               | os.O_DSYNC | os.O_TRUNC)


class HostDirectory:
    """The host directory behind one directory capability, and its anchor's rules."""

    def __init__(self, start: int, anchor_fd: int, beneath: bool, read_only: bool) -> None:
        """Args: start and anchor_fd are owned from now on (the same fd when the directory is
        its own anchor); beneath: RESOLVE_BENEATH rules at the anchor, else RESOLVE_IN_ROOT;
        read_only: the scheme refuses every write."""
        self.start = start
        self.anchor = Anchor.of(anchor_fd, beneath)
        self.start_identity = linux.identity(os.fstat(start))
        self.read_only = read_only

    @classmethod
    def ask(cls, cap: int, grant: int) -> HostDirectory | None:
        """HOSTDIR on directory capability cap, with the grant; None where the scheme does
        not hand one over (not a file scheme, no passthrough, no grant)."""
        try:
            value, fds = call(cap, P.HOSTDIR, [], [grant])
        except OSError:
            return None
        try:
            if not isinstance(value, dict) or len(fds) not in (1, 2) or not all(
                    stat.S_ISDIR(os.fstat(fd).st_mode) for fd in fds):
                raise OSError(errno.EIO, "a malformed HOSTDIR reply")
            host = cls(fds[0], fds[-1], bool(value.get("beneath")), bool(value.get("read_only", True)))
        except OSError:
            P.close_fds(fds)
            return None
        for fd in fds:
            forget(fd)  # numbers just received: nothing the capability layer knew of them holds
        return host

    def close(self) -> None:
        if self.anchor.fd != self.start:
            os.close(self.anchor.fd)
        os.close(self.start)

    def _lookup(self, path: str, flags: int, resolve: int) -> int | None:
        """An fd of path (flags as Linux's), as the scheme would look it up; None: the scheme's."""
        anchor = self.anchor
        if resolve:  # the program's own O_RESOLVE_*: the directory itself is the anchor, as there
            anchor = Anchor(self.start, self.start_identity, bool(resolve & P.O_RESOLVE_BENEATH))
        return open_natively(anchor, self.start, path, flags)

    def open(self, path: str, flags: int, resolve: int) -> int | None:
        """A host fd of the regular file at path, opened with flags as passthrough would
        have handed it over; None when the scheme must answer."""
        if flags & ~NATIVE_OPEN or flags & os.O_ACCMODE == os.O_ACCMODE:
            return None
        if self.read_only and (flags & os.O_ACCMODE != os.O_RDONLY or flags & os.O_TRUNC):
            return None  # the scheme answers EROFS
        fd = self._lookup(path, flags | os.O_NONBLOCK, resolve)  # a FIFO must not hang the broker
        if fd is None:
            return None
        if not stat.S_ISREG(os.fstat(fd).st_mode):
            os.close(fd)  # a directory, a device or a FIFO is a capability: the scheme's
            return None
        if not flags & os.O_NONBLOCK:
            os.set_blocking(fd, True)
        return fd

    def status(self, path: str, follow: bool, resolve: int) -> os.stat_result | None:
        """The status of path as STATAT would answer it; None when the scheme must answer."""
        fd = self._lookup(path, os.O_PATH | (0 if follow else os.O_NOFOLLOW), resolve)
        if fd is None:
            return None
        try:
            return os.fstat(fd)
        finally:
            os.close(fd)

    def readlink(self, path: str, resolve: int) -> str | None:
        """The symlink at path as READLINKAT would answer it (EINVAL for anything else)."""
        fd = self._lookup(path, os.O_PATH | os.O_NOFOLLOW, resolve)
        if fd is None:
            return None
        try:
            return link_body(fd)
        finally:
            os.close(fd)
