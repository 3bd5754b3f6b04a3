"""Path lookup that never leaves an anchor directory, done on fds.

The file scheme serves a host directory; every lookup a client asks for runs
relative to one of its handles and must stay beneath an *anchor*: the
scheme's root, or a directory opened with O_RESOLVE_BENEATH / O_RESOLVE_IN_ROOT.

Two modes, after Linux openat2(2):

- in-root (RESOLVE_IN_ROOT): `/` and absolute symlinks mean the anchor, and
  `..` at the anchor stays there. Every ordinary handle is in-root at the
  scheme's root, so nothing a client sends reaches the host outside it.
- beneath (RESOLVE_BENEATH): absolute paths and absolute symlinks are EXDEV,
  and so is a `..` that would leave the anchor.

The fast path asks Linux itself (openat2 with RESOLVE_IN_ROOT from the anchor,
or RESOLVE_BENEATH from the starting directory); only when that says EXDEV or
EAGAIN does the walk below run. The walk goes one component at a time on O_PATH
fds (never on host path strings), reads symlinks itself, and decides what
`..` means by asking where the anchor is: before each `..` it walks up from
the current directory to find its depth below the anchor, and after the last
one it checks again, so a rename racing the lookup ends in EAGAIN, never
outside.
"""

from __future__ import annotations

import ctypes
import errno
import os
import platform
import stat
import struct
from dataclasses import dataclass

MAX_LINKS = 40  # as Linux
MAX_DEPTH = 4096
_O_PATH_DIR = os.O_PATH | os.O_DIRECTORY | os.O_CLOEXEC

# openat2(2) (syscall 437 on x86_64 and aarch64), struct open_how {u64 flags, mode, resolve}
_SYS_OPENAT2 = 437 if platform.machine() in ("x86_64", "aarch64") else None
RESOLVE_NO_MAGICLINKS = 0x02
RESOLVE_BENEATH = 0x08
RESOLVE_IN_ROOT = 0x10
_libc = ctypes.CDLL(None, use_errno=True)


def openat2(dirfd: int, path: str, flags: int, mode: int, resolve: int) -> int:
    """Linux openat2(2); raises OSError (ENOSYS where the kernel lacks it)."""
    if _SYS_OPENAT2 is None:
        raise OSError(errno.ENOSYS, "openat2 is not available here")
    creates = flags & os.O_CREAT or flags & os.O_TMPFILE == os.O_TMPFILE
    how = struct.pack("QQQ", flags, mode if creates else 0, resolve)  # else EINVAL
    fd = _libc.syscall(_SYS_OPENAT2, dirfd, os.fsencode(path), how, len(how))
    if fd < 0:
        err = ctypes.get_errno()
        raise OSError(err, os.strerror(err))
    return fd


@dataclass(frozen=True)
class Anchor:
    """The directory a lookup may not leave.

    Attributes:
        fd: an O_PATH fd of the directory (not owned by the Anchor).
        dev, ino: its identity, to recognise it while walking up.
        beneath: True for RESOLVE_BENEATH rules, False for RESOLVE_IN_ROOT.
    """

    fd: int
    dev: int
    ino: int
    beneath: bool

    @classmethod
    def of(cls, fd: int, beneath: bool) -> Anchor:
        st = os.fstat(fd)
        return cls(fd, st.st_dev, st.st_ino, beneath)


def _is(st: os.stat_result, anchor: Anchor) -> bool:
    return st.st_dev == anchor.dev and st.st_ino == anchor.ino


def depth_below(fd: int, anchor: Anchor) -> int:
    """How many `..` steps from directory fd reach the anchor.

    Raises:
        OSError: EAGAIN when the anchor is not above fd (a rename moved it out).
    """
    cur = os.dup(fd)
    try:
        for depth in range(MAX_DEPTH):
            st = os.fstat(cur)
            if _is(st, anchor):
                return depth
            parent = os.open("..", _O_PATH_DIR, dir_fd=cur)
            os.close(cur)
            cur = parent
            if _is(os.fstat(cur), anchor):
                return depth + 1
            if os.path.samestat(os.fstat(cur), st):
                break  # reached the host's / without meeting the anchor
    finally:
        os.close(cur)
    raise OSError(errno.EAGAIN, "the directory moved out from beneath the anchor during the lookup")


class _Walk:
    """One lookup in progress: the current directory fd (owned) and the link budget."""

    def __init__(self, anchor: Anchor, start_fd: int) -> None:
        self.anchor = anchor
        self.cur = os.open(".", _O_PATH_DIR, dir_fd=start_fd)
        self.links = 0
        self.climbed = False

    def close(self) -> None:
        if self.cur >= 0:
            os.close(self.cur)
            self.cur = -1

    def _move(self, fd: int) -> None:
        os.close(self.cur)
        self.cur = fd

    def restart_at_anchor(self) -> None:
        if self.anchor.beneath:
            raise OSError(errno.EXDEV, "absolute path beneath a directory")
        self._move(os.open(".", _O_PATH_DIR, dir_fd=self.anchor.fd))

    def up(self) -> None:
        if depth_below(self.cur, self.anchor) == 0:
            if self.anchor.beneath:
                raise OSError(errno.EXDEV, "'..' would leave the directory")
            return  # in-root: .. at the root is the root
        self._move(os.open("..", _O_PATH_DIR, dir_fd=self.cur))
        self.climbed = True

    def follow(self, name: str) -> list[str]:
        """The components of the symlink name (in cur) to walk instead of it."""
        self.links += 1
        if self.links > MAX_LINKS:
            raise OSError(errno.ELOOP, os.strerror(errno.ELOOP))
        target = os.readlink(name, dir_fd=self.cur)
        if not target:
            raise OSError(errno.ENOENT, "empty symlink")
        if target.startswith("/"):
            self.restart_at_anchor()
        return target.split("/")

    def parent_of_last(self, components: list[str]) -> tuple[str | None, bool]:
        """Walk all but the last name; returns (last name or None for the dir itself,
        whether something (a slash, '.', '..') followed it so it must be a directory)."""
        pending = list(reversed(components))
        while pending:
            name = pending.pop()
            if name in ("", "."):
                continue
            if name == "..":
                self.up()
                continue
            if all(rest in ("", ".") for rest in pending):
                return name, bool(pending)
            st = os.stat(name, dir_fd=self.cur, follow_symlinks=False)
            if stat.S_ISLNK(st.st_mode):
                pending.extend(reversed(self.follow(name)))
            elif not stat.S_ISDIR(st.st_mode):
                raise OSError(errno.ENOTDIR, os.strerror(errno.ENOTDIR))
            else:
                self._move(os.open(name, _O_PATH_DIR | os.O_NOFOLLOW, dir_fd=self.cur))
        return None, True

    def verify(self) -> None:
        """After a `..`, check that where we are is still beneath the anchor."""
        if self.climbed:
            depth_below(self.cur, self.anchor)


def _start(anchor: Anchor, start_fd: int, path: str) -> tuple[_Walk, list[str]]:
    if not path:
        raise OSError(errno.ENOENT, "empty path")
    walk = _Walk(anchor, start_fd)
    try:
        if path.startswith("/"):
            walk.restart_at_anchor()
    except BaseException:
        walk.close()
        raise
    return walk, path.split("/")


def open_at(anchor: Anchor, start_fd: int, path: str, flags: int, mode: int = 0o666) -> int:
    """Open path relative to directory start_fd without leaving anchor.

    Args:
        anchor: the directory the lookup may not leave; start_fd is beneath it.
        start_fd: the directory relative paths start from.
        path: the client's path.
        flags: Linux open flags (O_CLOEXEC is added).
        mode: permission bits for O_CREAT.

    Returns:
        A new host fd (the caller owns it).

    Raises:
        OSError: as Linux openat2 would: EXDEV for an escape beneath, ELOOP,
            ENOTDIR, ENOENT, EEXIST, EISDIR...; EAGAIN when a rename raced it.
    """
    flags |= os.O_CLOEXEC
    if not path:
        raise OSError(errno.ENOENT, "empty path")
    fast = _fast_path(anchor, start_fd, path, flags, mode)
    if fast is not None:
        return fast
    walk, components = _start(anchor, start_fd, path)
    try:
        while True:
            name, must_be_dir = walk.parent_of_last(components)
            if name is None:
                if flags & os.O_CREAT and not flags & os.O_DIRECTORY:
                    raise OSError(errno.EISDIR, os.strerror(errno.EISDIR))
                fd = os.open(".", flags & ~(os.O_CREAT | os.O_EXCL), dir_fd=walk.cur)
                break
            try:
                st = os.stat(name, dir_fd=walk.cur, follow_symlinks=False)
            except FileNotFoundError:
                if not flags & os.O_CREAT:
                    raise
                if must_be_dir:
                    raise OSError(errno.EISDIR, os.strerror(errno.EISDIR)) from None
                fd = os.open(name, flags | os.O_NOFOLLOW, mode, dir_fd=walk.cur)
                break
            if flags & os.O_CREAT and flags & os.O_EXCL:
                raise OSError(errno.EEXIST, os.strerror(errno.EEXIST))
            if stat.S_ISLNK(st.st_mode):
                if flags & os.O_NOFOLLOW and not must_be_dir:
                    if flags & os.O_PATH:
                        fd = os.open(name, flags, dir_fd=walk.cur)
                        break
                    raise OSError(errno.ELOOP, os.strerror(errno.ELOOP))
                components = walk.follow(name) + ([""] if must_be_dir else [])
                continue
            if must_be_dir and not stat.S_ISDIR(st.st_mode):
                raise OSError(errno.ENOTDIR, os.strerror(errno.ENOTDIR))
            fd = os.open(name, flags | os.O_NOFOLLOW | (os.O_DIRECTORY if must_be_dir else 0),
                         mode, dir_fd=walk.cur)
            break
        try:
            walk.verify()
        except BaseException:
            os.close(fd)
            raise
        return fd
    finally:
        walk.close()


def _fast_path(anchor: Anchor, start_fd: int, path: str, flags: int, mode: int) -> int | None:
    """Linux's own answer where it is exactly ours; None when the walk must decide."""
    in_root_at_anchor = not anchor.beneath and _same_dir(start_fd, anchor)
    try:
        if in_root_at_anchor:
            return openat2(anchor.fd, path, flags, mode, RESOLVE_IN_ROOT | RESOLVE_NO_MAGICLINKS)
        return openat2(start_fd, path, flags, mode, RESOLVE_BENEATH | RESOLVE_NO_MAGICLINKS)
    except OSError as exc:
        if exc.errno in (errno.EXDEV, errno.EAGAIN, errno.ENOSYS):
            if exc.errno == errno.EXDEV and anchor.beneath and _same_dir(start_fd, anchor):
                raise  # leaving start is leaving the anchor
            return None
        raise


def _same_dir(fd: int, anchor: Anchor) -> bool:
    return fd == anchor.fd or _is(os.fstat(fd), anchor)


def resolve_parent(anchor: Anchor, start_fd: int, path: str) -> tuple[int, str | None, bool]:
    """Resolve all but the last component of path, for operations on a name.

    Returns:
        (an O_PATH fd of the parent directory, owned by the caller; the last
        name, or None when the path names a directory itself ('.', '..', '/');
        whether a trailing slash requires the name to be a directory).

    Raises:
        OSError: as open_at, for the components before the last.
    """
    walk, components = _start(anchor, start_fd, path)
    try:
        name, must_be_dir = walk.parent_of_last(components)
        walk.verify()
        fd, walk.cur = walk.cur, -1
        return fd, name, must_be_dir
    finally:
        walk.close()
