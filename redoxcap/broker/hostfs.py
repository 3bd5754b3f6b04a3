"""The read-only host allow-list: the system files a program needs to start.

An unmodified program reads its interpreter, shared libraries, locale and
time zone data from fixed host paths (`/lib64/ld-linux-x86-64.so.2`,
`/usr/lib/...`). The broker serves those itself, read-only, from a short
list of host trees (`DEFAULT_TREES` plus what `--ro-host` adds), and every
other absolute path goes to the program's namespace. A path belongs to the
host when its first components name a tree of the list (`/usr/lib/x` is in
`/usr`; `/etc/passwd` is in `/etc/passwd`; `/etc/shadow` is in nothing).

Resolution happens here, not in a kernel lookup on the program's behalf:

- a path without symlinks or `..` is opened with openat2(RESOLVE_NO_SYMLINKS)
  from `/`: every component is beneath the tree it starts in;
- otherwise it is walked one component at a time: a relative symlink is
  spliced in, an absolute one (merged /usr: `/lib -> usr/lib`,
  `/etc/localtime -> /usr/share/zoneinfo/...`) restarts from `/`, and `..`
  pops the walk, which may only pass through the trees and their ancestors
  (a step anywhere else is EACCES); the result must lie in a tree, and is
  opened with RESOLVE_NO_SYMLINKS, so a symlink swapped in meanwhile fails.

The trees are system directories the program cannot write (Landlock gives it
no write access and the broker opens nothing here for writing), so their
symlinks are the distribution's, not an attacker's. Only the character
devices in WRITABLE_DEVICES may be opened for writing.
"""

from __future__ import annotations

import errno
import os
import stat
from collections import deque
from collections.abc import Iterable

from redoxcap.broker.memo import PathMemo
from redoxcap.wire.linux import (
    MAXSYMLINKS,
    O_TMPFILE_BIT,
    RESOLVE_NO_MAGICLINKS,
    RESOLVE_NO_SYMLINKS,
    openat2,
)

DEFAULT_TREES = (
    "/usr", "/lib", "/lib32", "/lib64", "/libx32", "/bin", "/sbin",
    "/etc/ld.so.cache", "/etc/ld.so.conf", "/etc/ld.so.conf.d", "/etc/localtime",
    "/etc/nsswitch.conf", "/etc/passwd", "/etc/group", "/etc/alternatives", "/etc/locale.alias",
    "/dev/null", "/dev/zero", "/dev/full", "/dev/random", "/dev/urandom",
)
# names resolve looks up at once at most (deeper than any tree's directories; each is checked
# against the allow-list first, so a path of 2,000 names costs no 2,000 squared steps)
MAX_AHEAD = 64
WRITABLE_DEVICES = frozenset({"/dev/null", "/dev/zero", "/dev/full"})
_WRITE_FLAGS = os.O_WRONLY | os.O_RDWR | os.O_CREAT | os.O_TRUNC | os.O_APPEND | O_TMPFILE_BIT
# What a host open may carry besides the access mode (O_CLOEXEC is the target's fd flag).
_PASSED_FLAGS = (os.O_NONBLOCK | os.O_DIRECTORY | os.O_NOFOLLOW | os.O_NOCTTY | os.O_PATH
                 | os.O_NOATIME | os.O_DSYNC | os.O_SYNC | os.O_CREAT | os.O_TRUNC | os.O_APPEND
                 | os.O_WRONLY | os.O_RDWR)


def link_body(fd: int) -> str:
    """The body of the symlink an O_PATH | O_NOFOLLOW fd was opened on (EINVAL if it names
    anything else), read on the fd itself: no second lookup of its path."""
    if not stat.S_ISLNK(os.fstat(fd).st_mode):
        raise OSError(errno.EINVAL, os.strerror(errno.EINVAL))
    return os.readlink("", dir_fd=fd)


def _parts(path: str) -> list[str]:
    return [c for c in path.split("/") if c and c != "."]


class HostTrees:
    """The allow-list, and lookups in it (host paths; nothing here is a capability)."""

    def __init__(self, trees: Iterable[str], handed: Iterable[str] = ()) -> None:
        """Take absolute host paths (trees that do not exist are kept: they match nothing).

        handed are the paths of the directories handed over (`run --dir`): the
        directories above them are served too, for their status only (so that a
        walk up to them works), and a name beside them is absent (ENOENT).
        """
        self.trees = sorted({os.path.normpath(t) for t in trees if os.path.isabs(t)})
        handed_parts = {tuple(_parts(h)) for h in handed if os.path.isabs(h)}
        self.handed_above = {hp[:i] for hp in handed_parts for i in range(len(hp))} - handed_parts
        self._handed = handed_parts  # walked through on the way to what is above another
        self._tree_parts = [tuple(_parts(t)) for t in self.trees]
        self._tree_set = set(self._tree_parts)
        self._depths = sorted({len(tp) for tp in self._tree_parts})
        self._above = {tp[:i] for tp in self._tree_parts for i in range(len(tp))}
        self._root = os.open("/", os.O_PATH | os.O_DIRECTORY | os.O_CLOEXEC)
        # the path one openat2 looks an absolute path up by, worked out once per path
        self._plain = PathMemo(self._plain_of)

    def close(self) -> None:
        if self._root >= 0:
            os.close(self._root)
            self._root = -1

    def _in_tree(self, parts: tuple[str, ...] | list[str]) -> bool:
        n, trees = len(parts), self._tree_set  # (a loop: called for every step of a walk)
        for depth in self._depths:  # ascending
            if depth > n:
                return False
            if tuple(parts[:depth]) in trees:
                return True
        return False

    def claims(self, path: str) -> bool:
        """Whether an absolute path belongs to the host (its first components name a tree)."""
        return self._in_tree(path.split("/")[1:])

    def depth(self, path: str) -> int:
        """How many components of an absolute path name the deepest tree it is in (0: none)."""
        parts = [c for c in path.split("/") if c]
        return max((d for d in self._depths if d <= len(parts) and tuple(parts[:d]) in self._tree_set),
                   default=0)

    def above(self, parts: list[str]) -> bool:
        """Whether the path of these components is a directory above a tree (not in one)."""
        return tuple(parts) in self._above and not self._in_tree(parts)

    def inside(self, real: str) -> bool:
        """Whether a real (symlink-free, absolute) path lies in a tree."""
        return self._in_tree(_parts(real))

    def _passable(self, parts: tuple[str, ...]) -> bool:
        return (parts in self._above or parts in self.handed_above or parts in self._handed
                or self._in_tree(parts))

    def beside_handed(self, path: str) -> bool:
        """Whether an absolute path is a name beside a handed directory (in one that is above
        it) that is neither a tree, above one, nor handed or above a handed one: absent here
        (ENOENT)."""
        parts = tuple(_parts(path))
        return ".." not in parts and bool(parts) and parts[:-1] in self.handed_above \
            and not self._passable(parts)

    def is_above(self, parts: tuple[str, ...]) -> bool:
        """Whether these components name a directory above a tree or a handed directory."""
        return (parts in self._above or parts in self.handed_above) and not self._in_tree(parts)

    def resolve(self, path: str, follow: bool = True) -> str:
        """The real host path an absolute path names (the last symlink followed if follow).

        Raises:
            OSError: ENOENT, ENOTDIR, ELOOP as Linux; EACCES for a step outside the trees.
        """
        if not path.startswith("/"):
            raise OSError(errno.EINVAL, "not an absolute path")
        todo = deque(_parts(path))
        must_be_dir = path.endswith(("/", "/."))
        cur: list[str] = []
        links = 0
        while todo:
            name = todo.popleft()
            if name == "..":
                if cur:
                    cur.pop()
                continue
            run = self._directories_ahead(cur, name, todo)
            if run:  # they all are plain directories, as the walk below would have found
                cur += run
                for _ in range(len(run) - 1):
                    todo.popleft()
                continue
            step = tuple(cur) + (name,)
            if not self._passable(step):
                if tuple(cur) in self.handed_above:  # beside a handed directory: not there
                    raise OSError(errno.ENOENT, os.strerror(errno.ENOENT))
                raise OSError(errno.EACCES, "outside the host allow-list")
            real = "/" + "/".join(step)
            st = os.lstat(real)
            last = not todo
            if stat.S_ISLNK(st.st_mode) and (not last or follow or must_be_dir):
                links += 1
                if links > MAXSYMLINKS:
                    raise OSError(errno.ELOOP, os.strerror(errno.ELOOP))
                body = os.readlink(real)
                if body.startswith("/"):
                    cur = []
                todo.extendleft(reversed(_parts(body)))
                continue
            if not last and not stat.S_ISDIR(st.st_mode):
                raise OSError(errno.ENOTDIR, os.strerror(errno.ENOTDIR))
            cur = list(step)
        real = "/" + "/".join(cur)
        if not self.inside(real):
            raise OSError(errno.EACCES, "outside the host allow-list")
        if must_be_dir and not stat.S_ISDIR(os.stat(real).st_mode):
            raise OSError(errno.ENOTDIR, os.strerror(errno.ENOTDIR))
        return real

    # whether resolve looks up the directories ahead of a `..` or of the last name in one
    # openat2 (False: one step at a time, as tests compare)
    batched = True

    def _directories_ahead(self, cur: list[str], name: str, todo: deque[str]) -> list[str]:
        """name and the names after it up to a `..` or the last name, when there are two or
        more, each step may be walked (:meth:`_passable`) and Linux finds them all plain
        directories (no symlink) from cur in one openat2; else [] (resolve walks them one
        by one, with the errors and links it finds in their order)."""
        run = [name]
        for i, ahead in enumerate(todo):
            if ahead == ".." or i == len(todo) - 1 or len(run) == MAX_AHEAD:
                break
            run.append(ahead)
        if len(run) < 2 or not self.batched or not todo:
            return []
        if not all(self._passable(tuple(cur) + tuple(run[:i])) for i in range(1, len(run) + 1)):
            return []
        try:
            fd = openat2(self._root, "/".join(cur + run),
                         os.O_PATH | os.O_DIRECTORY | os.O_NOFOLLOW | os.O_CLOEXEC, 0,
                         RESOLVE_NO_SYMLINKS | RESOLVE_NO_MAGICLINKS)
        except OSError:
            return []  # a link, a name missing, a file: one by one
        os.close(fd)
        return run

    def find(self, path: str, follow: bool = True) -> None:
        """Look an absolute path up as open does, without opening it: the kernel, looking it
        up itself, then reaches the same file, since the walk follows the host's own
        symlinks from `/` as Linux does (one openat2 of O_PATH, which opens no device and
        waits on no FIFO, where no symlink is on the way).

        Raises:
            OSError: ENOENT, ENOTDIR, ELOOP, EACCES... as open would.
        """
        plain = self._plain(path)
        if plain is not None:
            try:
                fd = openat2(self._root, plain, os.O_PATH | os.O_CLOEXEC, 0,
                             RESOLVE_NO_SYMLINKS | RESOLVE_NO_MAGICLINKS)
            except OSError as exc:
                if exc.errno != errno.ELOOP:
                    raise
            else:
                os.close(fd)
                return
        self.resolve(path, follow)

    def open(self, path: str, flags: int, mode: int = 0) -> int:
        """Open an absolute host path read-only (writable only for WRITABLE_DEVICES).

        Raises:
            OSError: EROFS for a write, as resolve otherwise.
        """
        follow = not flags & os.O_NOFOLLOW
        writes = flags & _WRITE_FLAGS or flags & os.O_ACCMODE != os.O_RDONLY
        if flags & os.O_PATH:
            writes = False
        host = flags & _PASSED_FLAGS
        if flags & os.O_PATH:
            # the kernel installs no O_PATH fd in another process (ADDFD: EBADF): a read-only
            # one stands in, which reads no more than the program may (O_NONBLOCK: a FIFO's
            # open does not wait; a symlink itself, with O_NOFOLLOW, is ELOOP)
            host = host & (os.O_DIRECTORY | os.O_NOFOLLOW) | os.O_RDONLY | os.O_NONBLOCK
        if not writes:  # one openat2 when no symlink is on the way (ELOOP: walk)
            plain = self._plain(path)
            if plain is not None:
                try:
                    return openat2(self._root, plain or ".", host | os.O_CLOEXEC, mode,
                                   RESOLVE_NO_SYMLINKS | RESOLVE_NO_MAGICLINKS)
                except OSError as exc:
                    if exc.errno != errno.ELOOP:
                        raise
        real = self._fast(path, follow)
        if real is None:
            try:
                real = self.resolve(path, follow)
            except FileNotFoundError:
                if not flags & os.O_CREAT or flags & os.O_DIRECTORY:
                    raise
                self.resolve(os.path.dirname(path.rstrip("/")) or "/")  # ENOENT if it is missing too
                raise OSError(errno.EROFS, os.strerror(errno.EROFS)) from None
        if writes and (real not in WRITABLE_DEVICES or flags & O_TMPFILE_BIT):
            if flags & os.O_CREAT and flags & os.O_EXCL:
                raise OSError(errno.EEXIST, os.strerror(errno.EEXIST))
            raise OSError(errno.EROFS, os.strerror(errno.EROFS))
        if not follow:
            host |= os.O_NOFOLLOW
        return openat2(self._root, real.lstrip("/") or ".", host | os.O_CLOEXEC, mode,
                       RESOLVE_NO_SYMLINKS | RESOLVE_NO_MAGICLINKS)

    def _fast(self, path: str, follow: bool) -> str | None:
        """path itself when it has no `..` and no symlink on the way (one lstat per call)."""
        parts = _parts(path)
        if ".." in parts or path.endswith("/"):
            return None
        real = "/" + "/".join(parts)
        if not self.inside(real):
            return None
        try:
            fd = openat2(self._root, real.lstrip("/") or ".", os.O_PATH | os.O_NOFOLLOW | os.O_CLOEXEC,
                         0, RESOLVE_NO_SYMLINKS | RESOLVE_NO_MAGICLINKS)
        except OSError:
            return None  # a symlink on the way (ELOOP) or an error the walk will name
        try:
            if follow and stat.S_ISLNK(os.fstat(fd).st_mode):
                return None
        finally:
            os.close(fd)
        return real

    def stat(self, path: str, follow: bool = True) -> os.stat_result:
        """lstat/stat of an absolute host path in the trees (or a directory above one)."""
        plain = self._plain(path)
        if plain is None:
            parts = _parts(path)
            if ".." not in parts and self.is_above(tuple(parts)):
                return os.stat("/" + "/".join(parts), follow_symlinks=follow)
        else:
            try:  # no symlink on the way: one openat2
                fd = openat2(self._root, plain, os.O_PATH | os.O_NOFOLLOW | os.O_CLOEXEC, 0,
                             RESOLVE_NO_SYMLINKS | RESOLVE_NO_MAGICLINKS)
            except OSError as exc:
                if exc.errno != errno.ELOOP:
                    raise
            else:
                try:
                    st = os.fstat(fd)
                finally:
                    os.close(fd)
                if not (follow and stat.S_ISLNK(st.st_mode)):
                    return st
        return os.stat(self.resolve(path, follow), follow_symlinks=False)

    def readlink(self, path: str) -> str:
        """The body of the symlink at an absolute host path (EINVAL if it is none)."""
        plain = self._plain(path)
        if plain is None:
            if self.is_above(tuple(_parts(path))):
                raise OSError(errno.EINVAL, os.strerror(errno.EINVAL))
            return os.readlink(self.resolve(path, follow=False))
        # no symlink on the way: the link is read on the fd that found it (one openat2, no
        # second lookup). Its error is the walk's (as for stat: every step of a path in a
        # tree may be walked, and the walk meets the same directories up to the name that
        # fails; gcc's realpath asks for many a missing header); ELOOP, a link on the way,
        # is the walk's to follow
        try:
            fd = openat2(self._root, plain or ".", os.O_PATH | os.O_NOFOLLOW | os.O_CLOEXEC, 0,
                         RESOLVE_NO_SYMLINKS | RESOLVE_NO_MAGICLINKS)
        except OSError as exc:
            if exc.errno != errno.ELOOP:
                raise
            return os.readlink(self.resolve(path, follow=False))
        try:
            return link_body(fd)
        finally:
            os.close(fd)

    def _plain_of(self, path: str) -> str | None:
        """The path relative to `/` that one openat2 with RESOLVE_NO_SYMLINKS looks an absolute
        path up by (its names joined, `.` dropped: "" for `/`), when it lies in a tree and
        has no `..` and no trailing `/`; else None (the walk's, or above the trees). It
        depends on the path and the trees alone: `_plain` keeps it (redoxcap/broker/memo.py)."""
        parts = _parts(path)
        if ".." in parts or path.endswith("/") or not self._in_tree(parts):
            return None
        return "/".join(parts)
