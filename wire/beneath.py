"""Lookups beneath an anchor directory that Linux's openat2 answers alone.

The file scheme resolves every client path beneath an anchor (its root, or a
directory opened with O_RESOLVE_BENEATH / O_RESOLVE_IN_ROOT; see
schemes/resolve.py, whose walk answers what openat2 cannot). Its fast path
is here, with the `Anchor` it works on, because the broker uses the very
same code for its native lookups in a directory a file scheme handed it
(redoxcap/broker/calls/native.py): what either opens natively is what the
scheme's walk would have opened.
"""

from __future__ import annotations

import errno
import os
import stat
from dataclasses import dataclass

from redoxcap.wire.linux import (
    O_TMPFILE_BIT,
    PATH_MAX,
    RESOLVE_BENEATH,
    RESOLVE_IN_ROOT,
    RESOLVE_NO_MAGICLINKS,
    identity,
    machine,
    openat2,
)

_O_PATH_ALLOWED = os.O_PATH | os.O_DIRECTORY | os.O_NOFOLLOW | os.O_CLOEXEC

_have_openat2 = machine() is not None  # until the kernel says ENOSYS


@dataclass(frozen=True)
class Anchor:
    """The directory a lookup may not leave.

    Attributes:
        fd: a directory fd (normally O_PATH); not owned by the Anchor.
        identity: its wire.linux.identity, to recognise it while walking.
        beneath: True for RESOLVE_BENEATH rules, False for RESOLVE_IN_ROOT.
    """

    fd: int
    identity: int
    beneath: bool

    @classmethod
    def of(cls, fd: int, beneath: bool = False) -> Anchor:
        """The anchor at directory fd (which stays the caller's).

        Raises:
            OSError: ENOTDIR if fd is not a directory.
        """
        st = os.fstat(fd)
        if not stat.S_ISDIR(st.st_mode):
            raise OSError(errno.ENOTDIR, os.strerror(errno.ENOTDIR))
        return cls(fd, identity(st), beneath)


def fd_identity(fd: int) -> int:
    """The wire.linux.identity of what fd is open on."""
    return identity(os.fstat(fd))


def check_path(path: str) -> None:
    """What Linux refuses of a path before any lookup (ENOENT, EINVAL, ENAMETOOLONG)."""
    if not path:
        raise OSError(errno.ENOENT, "empty path")
    if "\0" in path:
        raise OSError(errno.EINVAL, "NUL in a path")
    if len(os.fsencode(path)) >= PATH_MAX:
        raise OSError(errno.ENAMETOOLONG, os.strerror(errno.ENAMETOOLONG))


def check_flags(flags: int, mode: int) -> int:
    """What openat2 refuses before any lookup; returns flags with O_CLOEXEC."""
    if flags & os.O_PATH and flags & ~_O_PATH_ALLOWED:
        raise OSError(errno.EINVAL, "O_PATH takes only O_DIRECTORY, O_NOFOLLOW, O_CLOEXEC")
    if flags & os.O_CREAT and flags & os.O_DIRECTORY:
        raise OSError(errno.EINVAL, "O_CREAT with O_DIRECTORY")
    if flags & O_TMPFILE_BIT:
        raise OSError(errno.EINVAL, "O_TMPFILE is not served")
    if flags & os.O_CREAT and mode & ~0o7777:
        raise OSError(errno.EINVAL, "mode bits beyond 0o7777")
    return flags | os.O_CLOEXEC


def linux_lookup(anchor: Anchor, start_fd: int, path: str, flags: int, mode: int) -> int | None:
    """Linux's own answer where it is exactly the walk's; None when the walk must decide."""
    global _have_openat2
    if not _have_openat2:
        return None
    try:
        if not path.startswith("/"):
            try:
                return openat2(start_fd, path, flags, mode, RESOLVE_BENEATH | RESOLVE_NO_MAGICLINKS)
            except OSError as exc:
                if exc.errno not in (errno.EXDEV, errno.EAGAIN):
                    raise
                if exc.errno == errno.EAGAIN or fd_identity(start_fd) != anchor.identity:
                    return None
                if anchor.beneath:
                    raise  # leaving the start is leaving the anchor
        elif anchor.beneath:
            raise OSError(errno.EXDEV, "absolute path beneath a directory")
        elif fd_identity(start_fd) != anchor.identity:
            return None
        return openat2(start_fd, path, flags, mode, RESOLVE_IN_ROOT | RESOLVE_NO_MAGICLINKS)
    except OSError as exc:
        if exc.errno == errno.ENOSYS:
            _have_openat2 = False
            return None
        if exc.errno == errno.EAGAIN:
            return None
        raise


def open_natively(anchor: Anchor, start_fd: int, path: str, flags: int, mode: int = 0) -> int | None:
    """redoxcap.schemes.resolve.open_at's answer where Linux's openat2 alone gives it, else None.

    For the broker's native lookups in a directory its file scheme handed it
    (HOSTDIR): what this opens is exactly what open_at would; None means that
    only the walk (the scheme itself) can answer.

    Raises:
        OSError: as schemes.resolve.open_at.
    """
    flags = check_flags(flags, mode)
    check_path(path)
    return linux_lookup(anchor, start_fd, path, flags, mode)
