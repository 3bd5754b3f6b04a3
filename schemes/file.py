"""The file scheme (`/scheme/NAME/...`): a host directory, and nothing outside it.

    python -m schemes.file --channel-fd N --root HOSTDIR [--name file] [--read-only]

Every handle holds a real host fd and an anchor (schemes/resolve.py): the
scheme's root in in-root mode, unless the handle was opened with
O_RESOLVE_BENEATH or O_RESOLVE_IN_ROOT, or beneath a directory that was; then
the anchor is that directory and the flag sticks to everything opened beneath
it (the router reports it through GETFL). Lookups happen on fds, so no `..`,
symlink or rename race takes a client outside HOSTDIR.

Flags: O_RDONLY/O_WRONLY/O_RDWR, O_CREAT, O_EXCL, O_TRUNC, O_APPEND,
O_DIRECTORY, O_NOFOLLOW, O_PATH and the two O_RESOLVE_* bits are served;
O_CLOEXEC, O_NONBLOCK, O_NOCTTY, O_LARGEFILE, O_SYNC, O_DSYNC and O_NOATIME are
harmless and accepted; any other bit is refused with EINVAL (a scheme never
ignores a flag it does not implement). With --read-only every write is EROFS.
"""

from __future__ import annotations

import errno
import os
import stat
from dataclasses import dataclass

from rt import protocol as P
from schemes.framework import HandleRef, Opened, Request, Scheme, SchemeError, daemon_cli
from schemes.resolve import Anchor, open_at, resolve_parent

RESOLVE_BITS = P.O_RESOLVE_BENEATH | P.O_RESOLVE_IN_ROOT
SERVED = (os.O_ACCMODE | os.O_CREAT | os.O_EXCL | os.O_TRUNC | os.O_APPEND | os.O_DIRECTORY
          | os.O_NOFOLLOW | os.O_PATH | RESOLVE_BITS)
HARMLESS = (os.O_CLOEXEC | os.O_NONBLOCK | os.O_NOCTTY | getattr(os, "O_LARGEFILE", 0)
            | os.O_SYNC | os.O_DSYNC | getattr(os, "O_NOATIME", 0))
WRITE_FLAGS = os.O_WRONLY | os.O_RDWR | os.O_CREAT | os.O_TRUNC | os.O_APPEND
UMASK = 0o022
# Never setuid, setgid or sticky: the daemon may run as root, and a client must not be
# able to leave a set-uid file in the host directory for a host user to run.
MODE_BITS = 0o777
STAT_FIELDS = ("st_mode", "st_ino", "st_dev", "st_nlink", "st_uid", "st_gid", "st_size",
               "st_atime_ns", "st_mtime_ns", "st_ctime_ns", "st_blocks", "st_blksize")


def _utf8(name: str) -> bool:
    """Whether a host name can travel in a frame (paths are UTF-8 strings on the wire).

    A name that is not valid UTF-8 cannot be named by any client, so listings leave it out.
    """
    try:
        name.encode()
        return True
    except UnicodeEncodeError:
        return False


@dataclass(eq=False)
class FileHandle:
    """An open host file or directory and the rules for lookups beneath it."""

    fd: int
    is_dir: bool
    anchor: Anchor
    anchor_owned: bool  # the anchor's fd is ours to close (a sticky O_RESOLVE_* directory)
    fdflags: int = 0


class FileScheme(Scheme):
    """Serves one host directory."""

    inline_ops = frozenset(P.SCHEME_OPS)  # local syscalls only: nothing waits for a client
    resolves_beneath = True

    def __init__(self, root: str, name: str = "file", read_only: bool = False) -> None:
        self.name = name
        self.read_only = read_only
        self.root_fd = os.open(root, os.O_PATH | os.O_DIRECTORY | os.O_CLOEXEC)
        self.root_real = os.path.realpath(root)
        self.root_anchor = Anchor.of(self.root_fd, beneath=False)
        self.handles = {}

    def root(self) -> FileHandle:
        return FileHandle(self.root_fd, True, self.root_anchor, anchor_owned=False)

    def _writable(self) -> None:
        if self.read_only:
            raise SchemeError(errno.EROFS)

    def _anchor_for(self, h: FileHandle, flags: int) -> Anchor:
        """Where a lookup from h may not go past.

        The flag on the openat makes h itself the anchor; without it the
        lookup keeps h's anchor (the sandbox root it was opened beneath, or
        the scheme's root). An in-root lookup cannot loosen a beneath handle.
        """
        if not h.is_dir:
            raise SchemeError(errno.ENOTDIR)
        if flags & P.O_RESOLVE_BENEATH:
            return Anchor.of(h.fd, beneath=True)
        if flags & P.O_RESOLVE_IN_ROOT and not h.anchor.beneath:
            return Anchor.of(h.fd, beneath=False)
        return h.anchor

    # -- opening -------------------------------------------------------------

    async def openat(self, req: Request, h: FileHandle, path: str, flags: int, mode: int) -> Opened:
        if flags & ~(SERVED | HARMLESS) or flags & P.O_RESOLVE_BENEATH and flags & P.O_RESOLVE_IN_ROOT:
            raise SchemeError(errno.EINVAL, "unsupported open flag")
        if flags & WRITE_FLAGS and not flags & os.O_PATH:
            self._writable()
        anchor = self._anchor_for(h, flags)
        fd = open_at(anchor, h.fd, path, flags & ~RESOLVE_BITS, mode & ~UMASK & MODE_BITS)
        return self._adopt(fd, anchor, flags)

    def _adopt(self, fd: int, anchor: Anchor, flags: int) -> Opened:
        """Wrap a new host fd in a handle.

        A directory opened with an O_RESOLVE_* flag becomes the anchor of
        everything opened beneath it (the flag sticks); otherwise the handle
        keeps the anchor its lookup had. Anchors other than the scheme's root
        hold their own dup of the directory's fd.
        """
        try:
            is_dir = stat.S_ISDIR(os.fstat(fd).st_mode)
            if is_dir and flags & RESOLVE_BITS:
                anchor = Anchor.of(fd, beneath=bool(flags & P.O_RESOLVE_BENEATH))
            owned = anchor.fd != self.root_fd
            if owned:
                anchor = Anchor(os.dup(anchor.fd), anchor.dev, anchor.ino, anchor.beneath)
        except BaseException:
            os.close(fd)
            raise
        sticky = 0
        if owned:
            sticky = P.O_RESOLVE_BENEATH if anchor.beneath else P.O_RESOLVE_IN_ROOT
        fdflags = (flags & ~RESOLVE_BITS) | sticky
        return Opened(FileHandle(fd, is_dir, anchor, owned, fdflags), fdflags=fdflags)

    async def dup(self, req: Request, h: FileHandle, buf: bytes) -> Opened:
        if buf:
            raise SchemeError(errno.EINVAL, "the file scheme knows no dup buffers")
        # A fresh open file description (its own offset) of the same file: reopen "."
        # for directories; for files, through our own fd's /proc entry, which names
        # exactly this inode and cannot be redirected by a client.
        flags = h.fdflags & ~(RESOLVE_BITS | os.O_CREAT | os.O_EXCL | os.O_TRUNC)
        if h.is_dir:
            fd = os.open(".", flags | os.O_CLOEXEC, dir_fd=h.fd)
        else:
            fd = os.open(f"/proc/self/fd/{h.fd}", flags | os.O_CLOEXEC)
        return self._adopt(fd, h.anchor, h.fdflags & ~RESOLVE_BITS)

    async def close(self, h: FileHandle) -> None:
        if h.fd != self.root_fd:
            os.close(h.fd)
        if h.anchor_owned:
            os.close(h.anchor.fd)

    # -- data ----------------------------------------------------------------

    async def read(self, req: Request, h: FileHandle, n: int) -> bytes:
        if n < 0:
            raise SchemeError(errno.EINVAL)
        return os.read(h.fd, min(n, P.MAX_IO))

    async def write(self, req: Request, h: FileHandle, data: bytes) -> int:
        self._writable()
        return os.write(h.fd, data)

    async def lseek(self, req: Request, h: FileHandle, pos: int, whence: int) -> int:
        if whence not in (os.SEEK_SET, os.SEEK_CUR, os.SEEK_END, os.SEEK_DATA, os.SEEK_HOLE):
            raise SchemeError(errno.EINVAL)
        return os.lseek(h.fd, pos, whence)

    async def fstat(self, req: Request, h: FileHandle) -> dict:
        st = os.fstat(h.fd)
        return {name: getattr(st, name) for name in STAT_FIELDS}

    async def ftruncate(self, req: Request, h: FileHandle, length: int) -> None:
        self._writable()
        if length < 0:
            raise SchemeError(errno.EINVAL)
        os.ftruncate(h.fd, length)

    async def fsync(self, req: Request, h: FileHandle) -> None:
        os.fsync(h.fd)

    async def getdents(self, req: Request, h: FileHandle, start: int) -> list[str]:
        if not h.is_dir:
            raise SchemeError(errno.ENOTDIR)
        fd = os.open(".", os.O_RDONLY | os.O_DIRECTORY | os.O_CLOEXEC, dir_fd=h.fd)
        try:
            return P.page_of_names(sorted(filter(_utf8, os.listdir(fd))), start)
        finally:
            os.close(fd)

    async def fpath(self, req: Request, h: FileHandle) -> str:
        real = os.readlink(f"/proc/self/fd/{h.fd}")  # where the inode is now, after renames
        if real == self.root_real:
            return f"/scheme/{self.name}"
        if real.startswith(self.root_real.rstrip("/") + "/"):
            return f"/scheme/{self.name}" + real[len(self.root_real.rstrip("/")) :]
        raise SchemeError(errno.ENOENT, "the file is no longer beneath the scheme's root")

    # -- names ---------------------------------------------------------------

    def _parent(self, h: FileHandle, path: str) -> tuple[int, str | None, bool]:
        return resolve_parent(self._anchor_for(h, 0), h.fd, path)

    def _target_dir(self, req: Request, h: FileHandle) -> FileHandle:
        """The directory a second path is relative to: a passed capability of ours, or h."""
        if not req.passed:
            return h
        ref = req.passed[0]
        if not isinstance(ref, HandleRef) or ref.number not in self.handles:
            raise SchemeError(errno.EXDEV, "the second directory is not in this scheme")
        target = self.handles[ref.number]
        if not target.is_dir:
            raise SchemeError(errno.ENOTDIR)
        return target

    async def mkdirat(self, req: Request, h: FileHandle, path: str, mode: int) -> None:
        self._writable()
        parent, name, _ = self._parent(h, path)
        try:
            if name is None:
                raise SchemeError(errno.EEXIST)
            os.mkdir(name, mode & ~UMASK & MODE_BITS, dir_fd=parent)
        finally:
            os.close(parent)

    async def unlinkat(self, req: Request, h: FileHandle, path: str, flags: int) -> None:
        if flags & ~P.AT_REMOVEDIR:
            raise SchemeError(errno.EINVAL)
        self._writable()
        parent, name, must_be_dir = self._parent(h, path)
        try:
            if flags & P.AT_REMOVEDIR:
                if name is None:  # as Linux: rmdir(".") EINVAL, rmdir("..") ENOTEMPTY, rmdir("/") EBUSY
                    last = path.rstrip("/").rpartition("/")[2]
                    raise SchemeError({".": errno.EINVAL, "..": errno.ENOTEMPTY}.get(last, errno.EBUSY))
                os.rmdir(name, dir_fd=parent)
            else:
                if name is None or must_be_dir:
                    st = os.stat(name or ".", dir_fd=parent, follow_symlinks=False)
                    raise SchemeError(errno.EISDIR if stat.S_ISDIR(st.st_mode) else errno.ENOTDIR)
                os.unlink(name, dir_fd=parent)
        finally:
            os.close(parent)

    async def renameat(self, req: Request, h: FileHandle, old: str, new: str) -> None:
        await self._two_names(req, h, old, new, os.rename)

    async def linkat(self, req: Request, h: FileHandle, old: str, new: str) -> None:
        def link(src, dst, *, src_dir_fd, dst_dir_fd):
            os.link(src, dst, src_dir_fd=src_dir_fd, dst_dir_fd=dst_dir_fd, follow_symlinks=False)

        await self._two_names(req, h, old, new, link)

    async def _two_names(self, req: Request, h: FileHandle, old: str, new: str, fn) -> None:
        self._writable()
        target = self._target_dir(req, h)
        src, src_name, _ = self._parent(h, old)
        try:
            dst, dst_name, _ = self._parent(target, new)
            try:
                if src_name is None or dst_name is None:
                    raise SchemeError(errno.EBUSY if fn is os.rename else errno.EPERM)
                fn(src_name, dst_name, src_dir_fd=src, dst_dir_fd=dst)
            finally:
                os.close(dst)
        finally:
            os.close(src)

    async def symlinkat(self, req: Request, h: FileHandle, target: str, path: str) -> None:
        self._writable()
        if not target or "\0" in target:
            raise SchemeError(errno.ENOENT if not target else errno.EINVAL)
        parent, name, _ = self._parent(h, path)
        try:
            if name is None:
                raise SchemeError(errno.EEXIST)
            os.symlink(target, name, dir_fd=parent)  # checked when followed, never here
        finally:
            os.close(parent)

    async def readlinkat(self, req: Request, h: FileHandle, path: str) -> str:
        parent, name, must_be_dir = self._parent(h, path)
        try:
            if name is None or must_be_dir:
                raise SchemeError(errno.EINVAL)
            return os.readlink(name, dir_fd=parent)
        finally:
            os.close(parent)


if __name__ == "__main__":
    def _options(parser):
        parser.add_argument("--root", required=True, help="the host directory to serve")
        parser.add_argument("--name", default="file", help="the scheme's name, for fpath")
        parser.add_argument("--read-only", action="store_true", help="refuse every write with EROFS")

    daemon_cli("schemes.file", lambda a: FileScheme(a.root, a.name, a.read_only), _options)
