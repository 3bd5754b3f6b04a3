"""Path lookup that never leaves an anchor directory, done on fds.

The file scheme serves a host directory; every lookup a client asks for runs
relative to one of its handles and must stay beneath an *anchor*: the
scheme's root, or a directory opened with O_RESOLVE_BENEATH / O_RESOLVE_IN_ROOT.
Building a host path string and checking it would lose to `..`, symlinks and
renames, so the lookup is a walk on fds, one component at a time, with
Linux's openat2(2) as the reference for every answer:

- in-root (RESOLVE_IN_ROOT): `/` and absolute symlinks mean the anchor, and
  `..` at the anchor stays there. Every ordinary handle is in-root at the
  scheme's root, so nothing a client sends reaches the host outside it.
- beneath (RESOLVE_BENEATH): absolute paths, absolute symlinks and a `..`
  that would leave the anchor are EXDEV.

Why a rename cannot let a walk out (cap-std's manual resolution): the walk
keeps the chain of directories it went down through as O_PATH fds, which pin
their inodes, and `..` pops that chain: it returns to the directory the walk
came from and never asks the host for a `..`. The bottom of the chain is the
anchor, where `..` is decided by the mode. Without a concurrent rename the
directory popped to is the real parent, so the answers are Linux's; with one,
the walk goes back to where it came from, which was beneath the anchor. The
one host `..` left is for a start directory below the anchor (a cwd beneath
a sandbox root): before its first `..` the walk climbs from the start to the
anchor with O_PATH opens and fstat only, never creating, reading or listing
anything, and a start that is no longer beneath its anchor is EXDEV.
Nothing is created or truncated before the last component.

Fast path (wire/beneath.py, which the broker uses too): Linux itself, with
openat2(RESOLVE_BENEATH) from the starting
directory. If that succeeds (or fails for any reason but EXDEV/EAGAIN), the
lookup never tried to leave the starting directory, which is beneath the
anchor, so the walk would have given the same answer. When the start is the
anchor, openat2 in the anchor's own mode is the answer.

Bounds: a walk follows at most MAXSYMLINKS symlinks, as Linux, and walks
at most MAX_WALK components in all (a `.` and a `..` count; past it, ELOOP,
as Linux answers a lookup that follows too many links): Linux bounds the
work of a lookup only by 40 links of PATH_MAX bytes each, some 84,000
components, which a client's links can make the scheme walk in Python, at
microseconds a component. A path of PATH_MAX bytes has at most 2048
components; MAX_WALK is four such paths, which no real lookup (however deep
the tree, however many links it follows on the way) comes near. The climb
from a start below its anchor is bounded apart (MAX_CLIMB).

Steps: `open_steps` and `parent_steps` are the lookups as generators, for a
caller that serves others meanwhile (the file scheme): they yield nothing
when Linux's openat2 answers; else once before the walk begins (nothing is
open yet: a caller that must not walk here can close the generator and try
again elsewhere) and then once every WALK_SLICE components (and climbed
directories), so that no walk holds its caller for long. `open_at` and
`resolve_parent` run them to the end.

The operations that act on a name (mkdir, unlink, rename...) get the parent
directory as an fd and the last component as the path wrote it, to hand to
the Linux *at call: Linux never follows the last component of those
operations and classifies `.`, `..` and a trailing slash itself, so they get
exactly Linux's errors.
"""

from __future__ import annotations

import errno
import os
import stat
from collections import deque
from collections.abc import Generator
from typing import TypeVar

from redoxcap.wire.beneath import Anchor, open_natively  # noqa: F401 - the scheme's own, re-exported
from redoxcap.wire.beneath import check_flags as _check_flags
from redoxcap.wire.beneath import check_path as _check_path
from redoxcap.wire.beneath import fd_identity as _identity
from redoxcap.wire.beneath import linux_lookup as _linux
from redoxcap.wire.linux import MAXSYMLINKS

MAX_CLIMB = 4096  # directories between a start directory and its anchor
MAX_WALK = 4 * 2048  # components one walk may take: four paths of PATH_MAX (see the module)
WALK_SLICE = 64  # components (or climbed directories) a walk takes between two yields

T = TypeVar("T")
Steps = Generator[None, None, T]  # a lookup as steps: see the module

_O_PATH_DIR = os.O_PATH | os.O_DIRECTORY | os.O_NOFOLLOW | os.O_CLOEXEC
_O_PATH_NOFOLLOW = os.O_PATH | os.O_NOFOLLOW | os.O_CLOEXEC


def _split(path: str) -> tuple[deque[str], bool]:
    """The components of path (no empty ones) and whether it ends in a slash."""
    parts = deque(c for c in path.split("/") if c)
    return parts, bool(parts) and path.endswith("/")


class _Walk:
    """One lookup in progress.

    `dirs` is the chain of directories the walk went down through, each an
    owned O_PATH fd: dirs[0] is the start directory (or the anchor after a
    restart or a climb), dirs[-1] the current directory. `ids` caches their
    identities, None until needed.
    """

    def __init__(self, anchor: Anchor, start_fd: int, absolute: bool) -> None:
        self.anchor = anchor
        self.links = 0
        self.walked = 0  # components taken, against MAX_WALK
        self.dirs: list[int] = []
        self.ids: list[int | None] = []
        if absolute:
            self.restart()
        else:  # ENOTDIR when start is not a directory, as Linux for a relative path
            self.dirs.append(os.open(".", _O_PATH_DIR, dir_fd=start_fd))
            self.ids.append(None)

    @property
    def cur(self) -> int:
        return self.dirs[-1]

    def close(self) -> None:
        while self.dirs:
            os.close(self.dirs.pop())
        self.ids.clear()

    def take(self) -> int:
        """The current directory's fd, now the caller's."""
        self.ids.pop()
        return self.dirs.pop()

    def _id(self, i: int) -> int:
        known = self.ids[i]
        if known is None:
            known = self.ids[i] = _identity(self.dirs[i])
        return known

    def restart(self) -> None:
        """An absolute path or symlink: the anchor in-root, EXDEV beneath."""
        if self.anchor.beneath:
            raise OSError(errno.EXDEV, "absolute path beneath a directory")
        fd = os.open(".", _O_PATH_DIR, dir_fd=self.anchor.fd)
        self.close()
        self.dirs.append(fd)
        self.ids.append(self.anchor.identity)

    def next_name(self, rest: deque[str]) -> str:
        """The next component of rest, counted against MAX_WALK (ELOOP past it)."""
        self.walked += 1
        if self.walked > MAX_WALK:
            raise OSError(errno.ELOOP, "the lookup walks too many components")
        return rest.popleft()

    def step(self, name: str, rest: deque[str]) -> None:
        """Walk one component that must be a directory (symlinks are spliced into rest)."""
        if name == ".":
            return
        if name == "..":
            self.up()
        else:
            self.down(name, rest)

    def down(self, name: str, rest: deque[str]) -> None:
        """Enter directory name, or put the contents of the symlink name in front of rest."""
        try:
            fd = os.open(name, _O_PATH_DIR, dir_fd=self.cur)
        except OSError as exc:
            if exc.errno != errno.ENOTDIR:
                raise
            body = self.link_body(name)
            if body is None:
                raise
            self.splice(body, rest)
            return
        self.dirs.append(fd)
        self.ids.append(None)

    def up(self) -> None:
        """`..`: back to the directory the walk came from (never the host's `..`)."""
        if len(self.dirs) == 1 and self._id(0) != self.anchor.identity:
            finish(self.climb())  # the steps' callers have climbed already
        if len(self.dirs) == 1:
            if self.anchor.beneath:
                raise OSError(errno.EXDEV, "'..' would leave the directory")
            return  # in-root: `..` at the root is the root
        os.close(self.dirs.pop())
        self.ids.pop()

    def climb(self) -> Steps[None]:
        """Before a `..` at a start directory below the anchor: put the directories from
        the anchor down to the start's parent under dirs[0], yielding every WALK_SLICE
        of them (nothing to do at the anchor or once climbed)."""
        if len(self.dirs) != 1 or self._id(0) == self.anchor.identity:
            return
        chain: list[int] = []
        ids: list[int] = []
        cur, cur_id = self.dirs[0], self._id(0)
        try:
            for climbed in range(1, MAX_CLIMB + 1):
                if climbed % WALK_SLICE == 0:
                    yield
                parent = os.open("..", _O_PATH_DIR, dir_fd=cur)
                chain.append(parent)
                parent_id = _identity(parent)
                ids.append(parent_id)
                if parent_id == self.anchor.identity:
                    break
                if parent_id == cur_id:  # the host's / (or ours): no anchor above
                    raise OSError(errno.EXDEV, "the directory is no longer beneath its anchor")
                cur, cur_id = parent, parent_id
            else:
                raise OSError(errno.EXDEV, "the directory is no longer beneath its anchor")
        except BaseException:
            for fd in chain:
                os.close(fd)
            raise
        self.dirs[:0] = reversed(chain)
        self.ids[:0] = reversed(ids)

    def link_body(self, name: str) -> str | None:
        """The contents of the symlink name in the current directory (None if it is not one)."""
        fd = os.open(name, _O_PATH_NOFOLLOW, dir_fd=self.cur)
        try:
            if not stat.S_ISLNK(os.fstat(fd).st_mode):
                return None
            return self.read_link(fd)
        finally:
            os.close(fd)

    def read_link(self, fd: int) -> str:
        """The contents of the symlink opened as fd (O_PATH|O_NOFOLLOW), counted against MAXSYMLINKS."""
        self.links += 1
        if self.links > MAXSYMLINKS:
            raise OSError(errno.ELOOP, os.strerror(errno.ELOOP))
        return os.readlink("", dir_fd=fd)

    def splice(self, body: str, rest: deque[str]) -> bool:
        """Walk body instead of the link; returns whether body ends in a slash."""
        if not body:
            raise OSError(errno.ENOENT, "empty symlink")
        if body.startswith("/"):
            self.restart()
        rest.extendleft(reversed([c for c in body.split("/") if c]))
        return body.endswith("/")


def open_at(anchor: Anchor, start_fd: int, path: str, flags: int, mode: int = 0o666) -> int:
    """Open path relative to directory start_fd without leaving anchor.

    Follows Linux openat2(2) with RESOLVE_BENEATH or RESOLVE_IN_ROOT (by
    `anchor.beneath`) and RESOLVE_NO_MAGICLINKS, with the anchor as the root
    and start_fd as where relative paths begin (the anchor or a directory
    beneath it).

    Args:
        anchor: the directory the lookup may not leave.
        start_fd: the directory relative paths start from.
        path: the client's path.
        flags: Linux open flags without the O_RESOLVE_* bits (O_CLOEXEC is added).
        mode: permission bits for O_CREAT (at most 0o7777).

    Returns:
        A new host fd, owned by the caller.

    Raises:
        OSError: with Linux's errno: ENOENT (also for an empty path), EXDEV for
            an escape beneath, ELOOP (also past MAX_WALK components), ENOTDIR,
            EEXIST, EISDIR, EINVAL for flags openat2 refuses (and a NUL in
            path), ENAMETOOLONG; EXDEV when start_fd is no longer beneath its
            anchor and the lookup climbs out of it.
    """
    return finish(open_steps(anchor, start_fd, path, flags, mode))


def open_steps(anchor: Anchor, start_fd: int, path: str, flags: int, mode: int = 0o666
               ) -> Steps[int]:
    """open_at as steps (see the module): yields before the walk and between its slices."""
    flags = _check_flags(flags, mode)  # before the path, as Linux
    _check_path(path)
    fd = _linux(anchor, start_fd, path, flags, mode)
    if fd is not None:
        return fd
    yield  # the walk begins
    return (yield from _walk_open(anchor, start_fd, path, flags, mode))


def finish(steps: Steps[T]) -> T:
    """Run a lookup's steps to the end: what it returns, or raises."""
    while True:
        try:
            next(steps)
        except StopIteration as done:
            return done.value


def _walk_open(anchor: Anchor, start_fd: int, path: str, flags: int, mode: int) -> Steps[int]:
    rest, must_be_dir = _split(path)
    walk = _Walk(anchor, start_fd, path.startswith("/"))
    try:
        while True:
            if not rest:  # the path named a directory itself: '/', '.', '..'
                return os.open(".", flags, mode, dir_fd=walk.cur)
            name = walk.next_name(rest)
            if walk.walked % WALK_SLICE == 0:
                yield
            if rest or name in (".", ".."):
                if name == "..":
                    yield from walk.climb()
                walk.step(name, rest)
                continue
            fd, body = _open_last(walk, name, flags, mode, must_be_dir)
            if fd is not None:
                return fd
            if walk.splice(body, rest):
                must_be_dir = True
    finally:
        walk.close()


def _open_last(walk: _Walk, name: str, flags: int, mode: int, must_be_dir: bool
               ) -> tuple[int | None, str]:
    """Open the last component: (fd, "") or, for a symlink to follow, (None, its contents)."""
    if flags & os.O_CREAT:
        if must_be_dir:
            raise OSError(errno.EISDIR, os.strerror(errno.EISDIR))
        try:
            return os.open(name, flags | os.O_NOFOLLOW, mode, dir_fd=walk.cur), ""
        except OSError as exc:
            # O_EXCL never follows (EEXIST even for a dangling link); O_NOFOLLOW is ELOOP
            if exc.errno != errno.ELOOP or flags & (os.O_EXCL | os.O_NOFOLLOW):
                raise
            body = walk.link_body(name)
            if body is None:
                raise
            return None, body
    follow = must_be_dir or not flags & os.O_NOFOLLOW  # a trailing slash follows, as Linux
    host = flags | os.O_NOFOLLOW | (os.O_DIRECTORY if must_be_dir else 0)
    try:
        fd = os.open(name, host, dir_fd=walk.cur)
    except OSError as exc:
        if not follow or exc.errno not in (errno.ELOOP, errno.ENOTDIR):
            raise
        body = walk.link_body(name)
        if body is None:
            raise
        return None, body
    if follow and flags & os.O_PATH:  # O_PATH|O_NOFOLLOW opened the link itself
        try:
            body = walk.read_link(fd) if stat.S_ISLNK(os.fstat(fd).st_mode) else None
        except BaseException:
            os.close(fd)
            raise
        if body is not None:
            os.close(fd)
            return None, body
    return fd, ""


def resolve_parent(anchor: Anchor, start_fd: int, path: str) -> tuple[int, str]:
    """Resolve all but the last component of path, for the operations on a name.

    Symlinks are followed in every component but the last, under the same
    rules as open_at. The last component comes back as the path wrote it,
    with one trailing slash if the path had any, and "." for a path of only
    slashes (in-root). Hand it to the Linux *at call relative to the returned
    directory: Linux never follows the last component of mkdir, unlink, rmdir,
    rename, symlink or the new name of link, and classifies ".", ".." and a
    trailing slash itself, so the errors are Linux's (rmdir of "." EINVAL, of
    ".." ENOTEMPTY, mkdir of ".." EEXIST...); only rmdir("/") differs (Linux
    says EBUSY). Calls that follow the last component (readlink, the old
    name of link when it has a trailing slash) need open_at instead.

    Args:
        anchor: the directory the lookup may not leave.
        start_fd: the directory relative paths start from.
        path: the client's path.

    Returns:
        (an O_PATH fd of the parent directory, owned by the caller; the last component).

    Raises:
        OSError: ENOENT for an empty path, EXDEV for "/" beneath, and what
            open_at raises for the components before the last.
    """
    return finish(parent_steps(anchor, start_fd, path))


def parent_steps(anchor: Anchor, start_fd: int, path: str) -> Steps[tuple[int, str]]:
    """resolve_parent as steps (see the module): yields before the walk and between its slices."""
    _check_path(path)
    parts, trailing = _split(path)
    absolute = path.startswith("/")
    if not parts:
        if anchor.beneath:
            raise OSError(errno.EXDEV, "absolute path beneath a directory")
        return os.open(".", _O_PATH_DIR, dir_fd=anchor.fd), "."
    last = parts.pop()
    if trailing and last not in (".", ".."):
        last += "/"
    if not parts and not absolute:
        return os.open(".", _O_PATH_DIR, dir_fd=start_fd), last
    dir_path = ("/" if absolute else "") + "/".join(parts)
    fd = _linux(anchor, start_fd, dir_path, os.O_PATH | os.O_DIRECTORY | os.O_CLOEXEC, 0)
    if fd is not None:
        return fd, last
    yield  # the walk begins
    walk = _Walk(anchor, start_fd, absolute)
    try:
        while parts:
            name = walk.next_name(parts)
            if walk.walked % WALK_SLICE == 0:
                yield
            if name == "..":
                yield from walk.climb()
            walk.step(name, parts)
        return walk.take(), last
    finally:
        walk.close()
