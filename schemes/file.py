"""The file scheme (`/scheme/NAME/...`): a host directory, and nothing outside it.

    python -m redoxcap.schemes.file --channel-fd N --root HOSTDIR [--name file] [--read-only] [--no-keep] [--no-passthrough]
        [--directfs-grant-fd N]

Every handle holds a real host fd and an anchor (schemes/resolve.py): the
scheme's root in in-root mode, unless the handle was opened with
O_RESOLVE_BENEATH or O_RESOLVE_IN_ROOT, or beneath a directory that was; then
the anchor is that directory and the flag sticks to everything opened beneath
it (it shows in the fdflags the router answers GETFL with). Lookups happen on
fds, so no `..`, symlink or rename race takes a client outside HOSTDIR, and
the name operations hand Linux only a parent directory fd and one name.

Flags: O_RDONLY/O_WRONLY/O_RDWR, O_CREAT, O_EXCL, O_TRUNC, O_APPEND,
O_DIRECTORY, O_NOFOLLOW, O_PATH and the two O_RESOLVE_* bits are served;
O_CLOEXEC, O_NONBLOCK, O_NOCTTY, O_LARGEFILE, O_SYNC, O_DSYNC and O_NOATIME are
harmless and accepted; any other bit is refused with EINVAL (a scheme never
ignores a flag it does not implement). Created files and directories get
`mode & 0o777 & ~0o022`: never set-uid, set-gid or sticky, since the daemon
may run as root and a client must not leave such a file for a host user.
With --read-only every operation that writes is EROFS.

Passthrough: an open with O_PASSTHROUGH of a regular file (not O_PATH) is
answered, after every check above, with the host fd itself (`Reply(None,
[fd])`) instead of a new handle, opened with exactly the access and status
flags asked for: reads, writes, seeks and mmap on it are native, and nothing
about it reaches the scheme again. Directories, O_PATH opens and anything
that is not a regular file stay handles (a host directory fd would let
lookups happen outside the scheme).

Native lookups (`--directfs-grant-fd N`): HOSTDIR on a directory handle
answers with O_PATH host fds of the directory and of its anchor, so that
the broker can resolve paths beneath it itself with openat2, exactly as
`wire.beneath.open_natively` does here; only to a request that passes
along the grant (an fd the supervisor gave this daemon and gives only to
brokers, recognised by its identity), and only when passthrough is allowed.

The daemon answers most requests in place (plain local syscalls), so it must
never block: files are opened O_NONBLOCK, which changes nothing for regular
files and directories and turns a FIFO that would hang the daemon into
ENXIO/EAGAIN.

A lookup that Linux's openat2 cannot answer alone is walked by the scheme
(schemes/resolve.py), never in the request loop: the method raises
RunInTask and is served again in a task, where the walk goes a slice at a
time, one walk at a time per client account (Workers.walk), at most
MAX_WALK components long (ELOOP past it). A client whose lookups took the
loop more CPU than COSTLY_LOOKUP (links that Linux follows for milliseconds)
a few times in a row has its lookups served in a task for a while, openat2
in a worker thread (Workers.lookup).

Other work that can take long runs in a worker thread, one at a time per
client account, so that a client doing it from many threads holds up
nobody else's requests: listings (a directory may hold a million names;
each open directory handle keeps a cursor, a host directory stream and the
last page it served, so a page costs a page, in the directory's own order,
never a fresh listing and sort of the whole directory), fsync, and freeing
a file's blocks (unlink, ftruncate).
"""

from __future__ import annotations

import errno
import os
import stat
import sys
import time
from collections.abc import Callable
from typing import Any

from redoxcap.schemes.file_work import (
    COSTLY_LOOKUP,
    RESOLVE_BITS,
    FileHandle,
    Workers,
    first_step,
    lookup_anchor,
    passed_directory,
    scheme_path,
)
from redoxcap.schemes.framework import (
    Opened,
    Reply,
    Request,
    RunInTask,
    Scheme,
    SchemeError,
    daemon_cli,
)
from redoxcap.schemes.resolve import Anchor, T, open_natively, open_steps, parent_steps
from redoxcap.wire import protocol as P
from redoxcap.wire.linux import (
    O_LARGEFILE,
    PATH_MAX,
    identity,
    machine,
)
from redoxcap.wire.stat import Stat

# Linux's own O_LARGEFILE bit (Python's os.O_LARGEFILE is 0 on 64-bit machines)
_O_LARGEFILE = O_LARGEFILE.get(machine(), 0)
SERVED = (os.O_WRONLY | os.O_RDWR | os.O_CREAT | os.O_EXCL | os.O_TRUNC | os.O_APPEND
          | os.O_DIRECTORY | os.O_NOFOLLOW | os.O_PATH | RESOLVE_BITS | P.O_PASSTHROUGH)
HARMLESS = (os.O_CLOEXEC | os.O_NONBLOCK | os.O_NOCTTY | _O_LARGEFILE | os.O_SYNC | os.O_DSYNC
            | os.O_NOATIME)
ONLY_AT_OPEN = os.O_CREAT | os.O_EXCL | os.O_TRUNC | os.O_NOCTTY | os.O_CLOEXEC  # not in fdflags
UMASK = 0o022
MODE_BITS = 0o777
OFF_MAX = 2**63 - 1
STATUS_PATHS = 256  # handles whose path `status` reports
WHENCES = (os.SEEK_SET, os.SEEK_CUR, os.SEEK_END, os.SEEK_DATA, os.SEEK_HOLE)


def _mode(mode: int) -> int:
    """The permission bits a created file or directory gets (EINVAL beyond 0o7777)."""
    if not 0 <= mode <= 0o7777:
        raise SchemeError(errno.EINVAL, "mode out of range")
    return mode & MODE_BITS & ~UMASK


class FileScheme(Scheme):
    """Serves one host directory; see the module docstring."""

    # local syscalls only: nothing waits for a client; listings, fsync, ftruncate and
    # unlink, which can take long, go to a worker thread (and a lookup that must be
    # walked raises RunInTask)
    inline_ops = frozenset(P.SCHEME_OPS) - {P.GETDENTS, P.READDIR, P.FSYNC, P.FTRUNCATE, P.UNLINKAT}
    resolves_beneath = True

    def __init__(self, root: str, name: str = "file", read_only: bool = False,
                 keep: bool = True, passthrough: bool = True, grant_fd: int | None = None) -> None:
        """Open root (an O_PATH directory fd held for the daemon's life).

        Args:
            root: the host directory to serve.
            name: the scheme's name, for fpath.
            read_only: refuse every write with EROFS.
            keep: have the router keep every open handle across a crash of this daemon.
            passthrough: answer O_PASSTHROUGH with host fds (else with handles: every
                read and write stays routed).
            grant_fd: the directfs grant (owned from now on): HOSTDIR answers only a
                request that passes the same file along.
        """
        self.name = name
        self.read_only = read_only
        self.keeps_handles = keep
        self.passthrough = passthrough
        self.root_fd = os.open(root, os.O_PATH | os.O_DIRECTORY | os.O_CLOEXEC)
        self.root_anchor = Anchor.of(self.root_fd, beneath=False)
        self.handles = {}
        self.work = Workers(self.root_fd)  # what runs in worker threads, and directory cursors
        # kept open, so that no other file can come to have its identity
        self.grant_fd = grant_fd
        self.grant = identity(os.fstat(grant_fd)) if grant_fd is not None else None

    def root(self) -> FileHandle:
        flags = os.O_RDONLY | os.O_DIRECTORY
        return FileHandle(self.root_fd, True, self.root_anchor, False, flags, flags)

    def _writable(self) -> None:
        if self.read_only:
            raise SchemeError(errno.EROFS)

    # -- lookups ---------------------------------------------------------------

    # In the request loop, a lookup is Linux's openat2 alone, timed (_in_place); a walk,
    # or any lookup of an account whose lookups lately cost the loop more than
    # COSTLY_LOOKUP, raises RunInTask, and the request is served again in a task, where
    # Workers.lookup runs it (that account's openat2 in a worker thread; a walk a slice
    # at a time, one walk at a time per account).

    def _in_place(self, req: Request, timed: bool, first: Callable[..., T], *args: Any) -> T:
        """first(*args), the openat2 part of a lookup, in the request loop: RunInTask for
        an account whose lookups are costly, and one that takes too much CPU counts
        against it (unless not timed: an open with O_TRUNC frees the file's blocks too)."""
        work = self.work
        if work.costly(req.account):
            raise RunInTask
        if not timed:
            return first(*args)
        start = time.thread_time()  # CPU time (the kernel's too): being preempted is no cost
        try:
            return first(*args)
        finally:
            if time.thread_time() - start > COSTLY_LOOKUP:
                work.mark_costly(req.account)

    async def _open(self, req: Request, h: FileHandle, anchor: Anchor, path: str, flags: int,
                    mode: int = 0o666) -> int:
        """resolve.open_at from h (see _in_place)."""
        if req.inline:
            fd = self._in_place(req, not flags & os.O_TRUNC, open_natively, anchor, h.fd, path,
                                flags, mode)
            if fd is None:
                raise RunInTask  # only the walk answers
            return fd
        return await self.work.lookup(req.account, h, open_steps(anchor, h.fd, path, flags, mode))

    async def _parent(self, req: Request, h: FileHandle, path: str) -> tuple[int, str]:
        """resolve.resolve_parent beneath h's anchor (see _in_place)."""
        steps = parent_steps(h.anchor, h.fd, path)
        if not req.inline:
            return await self.work.lookup(req.account, h, steps)
        done, value = self._in_place(req, True, first_step, steps)
        if not done:
            steps.close()
            raise RunInTask  # only the walk answers
        return value

    # -- opening -------------------------------------------------------------

    async def openat(self, req: Request, h: FileHandle, path: str, flags: int, mode: int
                     ) -> Opened | Reply:
        """Open path relative to h; a directory opened with an O_RESOLVE_* flag becomes an anchor.

        With O_PASSTHROUGH, a regular file is answered with its host fd (see the module).
        """
        if (flags & ~(SERVED | HARMLESS) or flags & os.O_ACCMODE == os.O_ACCMODE
                or flags & RESOLVE_BITS == RESOLVE_BITS):
            raise SchemeError(errno.EINVAL, "unsupported open flag")
        passthrough = bool(flags & P.O_PASSTHROUGH) and self.passthrough
        flags &= ~P.O_PASSTHROUGH
        path_only = bool(flags & os.O_PATH)
        if not path_only and (flags & os.O_ACCMODE != os.O_RDONLY or flags & (os.O_CREAT | os.O_TRUNC)):
            self._writable()
        mode = _mode(mode) if flags & os.O_CREAT else 0
        anchor = lookup_anchor(h, path, flags)
        host = flags & ~(RESOLVE_BITS | os.O_CLOEXEC)
        if not path_only:
            host |= os.O_NONBLOCK
        fd = await self._open(req, h, anchor, path, host, mode)
        try:
            st_mode = os.fstat(fd).st_mode
            if passthrough and stat.S_ISREG(st_mode) and not path_only:
                if not flags & os.O_NONBLOCK:  # the daemon's own O_NONBLOCK is not the client's
                    os.set_blocking(fd, True)
                return Reply(None, [fd])  # the framework closes our copy once it is sent
            is_dir = stat.S_ISDIR(st_mode)
            if is_dir and flags & RESOLVE_BITS:  # the new directory anchors what is beneath it
                new = Anchor.of(fd, beneath=bool(flags & P.O_RESOLVE_BENEATH))
                anchor, owned = Anchor(os.dup(fd), new.identity, new.beneath), True
            else:
                anchor, owned = self._share(anchor)
        except BaseException:
            os.close(fd)
            raise
        sticky = flags & RESOLVE_BITS or h.fdflags & RESOLVE_BITS
        fdflags = (flags & ~(RESOLVE_BITS | ONLY_AT_OPEN)) | sticky
        handle = FileHandle(fd, is_dir, anchor, owned, fdflags, host)
        return Opened(handle, fdflags=fdflags)

    def _share(self, anchor: Anchor) -> tuple[Anchor, bool]:
        """The anchor for a new handle: the root's is shared, any other gets its own fd."""
        if anchor.fd == self.root_fd:
            return anchor, False
        return Anchor(os.dup(anchor.fd), anchor.identity, anchor.beneath), True

    async def dup(self, req: Request, h: FileHandle, buf: bytes) -> Opened:
        """b"": a new handle on the same file with its own offset; any other buf is EINVAL.

        Directories reopen "." relative to their own fd. An O_PATH handle has
        no offset or status to keep apart, so a plain dup of its fd is the
        same as a fresh open (and keeps a symlink handle on the symlink).
        Files reopen their own fd's /proc/self/fd entry: that names exactly
        the inode this handle holds (after renames and unlinks too), was
        opened by the scheme itself, and is reopened with the handle's own
        access mode, so no client text is looked up and nothing is gained.
        """
        if buf:
            raise SchemeError(errno.EINVAL, "the file scheme knows no dup buffers")
        flags = (h.host_flags & ~(os.O_CREAT | os.O_EXCL | os.O_TRUNC | os.O_NOFOLLOW)) | os.O_CLOEXEC
        if h.host_flags & os.O_PATH and not h.is_dir:
            fd = os.dup(h.fd)
        elif h.is_dir:
            fd = os.open(".", flags | os.O_DIRECTORY, dir_fd=h.fd)
        else:
            fd = os.open(f"/proc/self/fd/{h.fd}", flags & ~os.O_DIRECTORY)
        try:
            anchor, owned = self._share(h.anchor)
        except BaseException:
            os.close(fd)
            raise
        handle = FileHandle(fd, h.is_dir, anchor, owned, h.fdflags, h.host_flags)
        return Opened(handle, fdflags=h.fdflags)

    def status(self, handles: dict) -> dict:
        """Where each open handle is (the first few hundred), for `status` and `graph`."""
        paths = {}
        for number, h in list(handles.items())[:STATUS_PATHS]:
            try:
                paths[str(number)] = scheme_path(self.name, self.root_fd, h.fd)
            except (OSError, SchemeError):
                paths[str(number)] = "(gone)"
        return {"paths": paths}

    def keep(self, h: FileHandle) -> tuple[dict, list[int]] | None:
        """A handle is its host fd (and its anchor's): the router keeps them across a crash,
        with the flags, so the next daemon serves the same open file at the same offset."""
        if h.fd == self.root_fd or not self.keeps_handles:
            return None  # the root is made anew from --root
        state = {"dir": h.is_dir, "fdflags": h.fdflags, "host": h.host_flags,
                 "beneath": h.anchor.beneath, "own": h.anchor_owned}
        return state, [h.fd] + ([h.anchor.fd] if h.anchor_owned else [])

    def restore(self, value: dict, fds: list[int]) -> FileHandle:
        try:
            own = bool(value["own"])
            if len(fds) != 1 + own:
                raise ValueError("fds do not match the kept state")
            anchor = Anchor.of(fds[1], bool(value["beneath"])) if own else self.root_anchor
            return FileHandle(fds[0], bool(value["dir"]), anchor, own, int(value["fdflags"]),
                              int(value["host"]))
        except (KeyError, TypeError, ValueError, OSError):
            P.close_fds(fds)
            raise

    async def close(self, h: FileHandle) -> None:
        if h.busy is not None:
            await h.busy.acquire()  # a worker thread may be using its fd: let it finish
        self._release(h)

    def close_now(self, h: FileHandle) -> bool:
        if h.busy is not None:  # a worker thread may have it: close waits for it
            return False
        self._release(h)
        return True

    def _release(self, h: FileHandle) -> None:
        self.work.forget(h)
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
        if whence not in WHENCES or not -OFF_MAX - 1 <= pos <= OFF_MAX:
            raise SchemeError(errno.EINVAL)
        return os.lseek(h.fd, pos, whence)

    async def fstat(self, req: Request, h: FileHandle) -> Stat:
        return Stat.of(os.fstat(h.fd))

    async def ftruncate(self, req: Request, h: FileHandle, length: int) -> None:
        self._writable()
        if length < 0:
            raise SchemeError(errno.EINVAL)
        if length > OFF_MAX:
            raise SchemeError(errno.EFBIG)
        await self.work.run(req.account, h, os.ftruncate, h.fd, length)  # freeing blocks takes time

    async def statat(self, req: Request, h: FileHandle, path: str, flags: int) -> Stat:
        """Status of path relative to h, as openat(O_PATH) and fstat would answer, in one request.

        flags: O_NOFOLLOW (the last symlink itself) and the O_RESOLVE_* bits; others are EINVAL.
        """
        if flags & ~(os.O_NOFOLLOW | RESOLVE_BITS) or flags & RESOLVE_BITS == RESOLVE_BITS:
            raise SchemeError(errno.EINVAL, "unsupported flag")
        anchor = lookup_anchor(h, path, flags)
        fd = await self._open(req, h, anchor, path, os.O_PATH | (flags & os.O_NOFOLLOW))
        try:
            return Stat.of(os.fstat(fd))
        finally:
            os.close(fd)

    async def hostdir(self, req: Request, h: FileHandle) -> Reply:
        """O_PATH host fds of directory h and of its anchor (when that is another), for the
        broker's native lookups; only with the grant passed along (see the module)."""
        passed = req.passed[0] if len(req.passed) == 1 else None
        if self.grant is None or not isinstance(passed, int) or \
                identity(os.fstat(passed)) != self.grant:
            raise SchemeError(errno.EPERM, "native lookups are for the broker")
        if not self.passthrough:
            raise SchemeError(errno.EOPNOTSUPP, "every lookup of this scheme is routed")
        if not h.is_dir:
            raise SchemeError(errno.ENOTDIR)
        fds = [os.open(".", os.O_PATH | os.O_DIRECTORY | os.O_CLOEXEC, dir_fd=h.fd)]
        try:
            if identity(os.fstat(fds[0])) != h.anchor.identity:
                fds.append(os.open(".", os.O_PATH | os.O_DIRECTORY | os.O_CLOEXEC, dir_fd=h.anchor.fd))
        except BaseException:
            P.close_fds(fds)
            raise
        return Reply({"beneath": h.anchor.beneath, "read_only": self.read_only}, fds)

    async def fsync(self, req: Request, h: FileHandle) -> None:
        """Flush to disk, in a worker thread: it may take long, and others need not wait."""
        await self.work.run(req.account, h, os.fsync, h.fd)

    async def getdents(self, req: Request, h: FileHandle, start: int) -> list[str]:
        """The names from index start on, in the directory's order, a page at a time (see
        the module: each handle keeps a cursor)."""
        return [name for name, _ in await self.work.page(req.account, h, start)]

    async def readdir(self, req: Request, h: FileHandle, start: int) -> list[list]:
        """getdents with each entry's type ([name, DT_*]), from the host's own d_type."""
        return [[name, d_type] for name, d_type in await self.work.page(req.account, h, start)]

    async def fpath(self, req: Request, h: FileHandle) -> str:
        """/scheme/NAME and the handle's path below the root, as it is now (after renames).

        ENOENT when the file was removed or moved out of the root by the host.
        """
        return scheme_path(self.name, self.root_fd, h.fd)

    # -- names ---------------------------------------------------------------

    async def mkdirat(self, req: Request, h: FileHandle, path: str, mode: int) -> None:
        self._writable()
        mode = _mode(mode)
        parent, name = await self._parent(req, h, path)
        try:
            os.mkdir(name, mode, dir_fd=parent)
        finally:
            os.close(parent)

    async def unlinkat(self, req: Request, h: FileHandle, path: str, flags: int) -> None:
        if flags & ~P.AT_REMOVEDIR:
            raise SchemeError(errno.EINVAL)
        self._writable()
        parent, name = await self._parent(req, h, path)
        try:
            # removing a large file frees its blocks, which takes time: in a worker thread
            await self.work.run(req.account, h, self._unlink, parent, name, path, flags)
        finally:
            os.close(parent)

    @staticmethod
    def _unlink(parent: int, name: str, path: str, flags: int) -> None:
        if not flags & P.AT_REMOVEDIR:
            os.unlink(name, dir_fd=parent)
        elif not path.strip("/"):
            raise SchemeError(errno.EBUSY)  # rmdir("/"), as Linux
        else:
            os.rmdir(name, dir_fd=parent)

    async def renameat(self, req: Request, h: FileHandle, old: str, new: str) -> None:
        """Rename old (relative to h) to new (relative to the passed directory, or h)."""
        self._writable()
        target = passed_directory(req, self.handles, h)
        src, src_name = await self._parent(req, h, old)
        try:
            dst, dst_name = await self._parent(req, target, new)
            try:
                os.rename(src_name, dst_name, src_dir_fd=src, dst_dir_fd=dst)
            finally:
                os.close(dst)
        finally:
            os.close(src)

    async def linkat(self, req: Request, h: FileHandle, old: str, new: str) -> None:
        """A hard link new (relative to the passed directory, or h) to old, which is not followed.

        As Linux: old is looked up first (a trailing slash follows it and asks
        for a directory), then new's parent; a directory is EPERM, after
        new's own errors (EEXIST, ENOENT).
        """
        self._writable()
        target = passed_directory(req, self.handles, h)
        fd = await self._open(req, h, h.anchor, old, os.O_PATH | os.O_NOFOLLOW)
        try:
            old_is_dir = stat.S_ISDIR(os.fstat(fd).st_mode)
        finally:
            os.close(fd)
        dst, dst_name = await self._parent(req, target, new)
        try:
            if old_is_dir:
                try:
                    os.stat(dst_name.rstrip("/"), dir_fd=dst, follow_symlinks=False)
                except FileNotFoundError:
                    raise SchemeError(errno.ENOENT if dst_name.endswith("/") else errno.EPERM) from None
                raise SchemeError(errno.EEXIST)
            src, src_name = await self._parent(req, h, old)
            try:  # old is not a directory, so it has no trailing slash: a plain name in src
                os.link(src_name, dst_name, src_dir_fd=src, dst_dir_fd=dst, follow_symlinks=False)
            finally:
                os.close(src)
        finally:
            os.close(dst)

    async def symlinkat(self, req: Request, h: FileHandle, target: str, path: str) -> None:
        """A symlink at path holding target verbatim: it is checked when followed, never here."""
        self._writable()
        if not target:
            raise SchemeError(errno.ENOENT)
        if "\0" in target:
            raise SchemeError(errno.EINVAL)
        if len(target.encode()) >= PATH_MAX:
            raise SchemeError(errno.ENAMETOOLONG)
        parent, name = await self._parent(req, h, path)
        try:
            os.symlink(target, name, dir_fd=parent)
        finally:
            os.close(parent)

    # -- metadata --------------------------------------------------------------

    async def _metadata_target(self, req: Request, h: FileHandle, path: str, flags: int) -> int:
        """An O_PATH fd of what a metadata operation changes: h's own file for an empty
        path, else path looked up beneath h as openat would (O_NOFOLLOW: the symlink itself)."""
        if flags & ~(os.O_NOFOLLOW | RESOLVE_BITS) or flags & RESOLVE_BITS == RESOLVE_BITS:
            raise SchemeError(errno.EINVAL, "unsupported flag")
        self._writable()
        if not path:
            return os.dup(h.fd)
        return await self._open(req, h, lookup_anchor(h, path, flags), path,
                                os.O_PATH | (flags & os.O_NOFOLLOW))

    async def chmodat(self, req: Request, h: FileHandle, path: str, mode: int, flags: int) -> None:
        """Set the permission bits only: a client never leaves a set-uid, set-gid or sticky file."""
        if not 0 <= mode <= 0o7777:
            raise SchemeError(errno.EINVAL, "mode out of range")
        fd = await self._metadata_target(req, h, path, flags)
        try:
            if stat.S_ISLNK(os.fstat(fd).st_mode):
                raise SchemeError(errno.EOPNOTSUPP, "a symlink has no mode of its own")
            # the magic link names exactly the inode looked up beneath the anchor
            os.chmod(f"/proc/self/fd/{fd}", mode & MODE_BITS)
        finally:
            os.close(fd)

    async def utimensat(self, req: Request, h: FileHandle, path: str, atime: int | None,
                        mtime: int | None, flags: int) -> None:
        """Set the times (nanoseconds; None keeps one); a symlink itself with O_NOFOLLOW."""
        for t in (atime, mtime):
            if t is not None and not -OFF_MAX - 1 <= t <= OFF_MAX:
                raise SchemeError(errno.EINVAL, "time out of range")
        fd = await self._metadata_target(req, h, path, flags)
        try:
            st = os.fstat(fd)
            times = (st.st_atime_ns if atime is None else atime,
                     st.st_mtime_ns if mtime is None else mtime)
            if not stat.S_ISLNK(st.st_mode):
                os.utime(f"/proc/self/fd/{fd}", ns=times)
                return
        finally:
            os.close(fd)
        # the link itself: its name in its parent, never followed
        parent, name = await self._parent(req, h, path)
        try:
            os.utime(name, ns=times, dir_fd=parent, follow_symlinks=False)
        finally:
            os.close(parent)

    async def chownat(self, req: Request, h: FileHandle, path: str, uid: int, gid: int,
                      flags: int) -> None:
        """Accept only what changes nothing: -1, the caller's own id, or the file's."""
        fd = await self._metadata_target(req, h, path, flags)
        try:
            st = os.fstat(fd)
        finally:
            os.close(fd)
        if uid not in (-1, req.caller.uid, st.st_uid) or gid not in (-1, req.caller.gid, st.st_gid):
            raise SchemeError(errno.EPERM, "a file is never given to another owner")

    async def readlinkat(self, req: Request, h: FileHandle, path: str) -> str:
        """The contents of the symlink at path; EINVAL for anything else (as Linux)."""
        fd = await self._open(req, h, h.anchor, path, os.O_PATH | os.O_NOFOLLOW)
        try:
            if not stat.S_ISLNK(os.fstat(fd).st_mode):
                raise SchemeError(errno.EINVAL)
            return os.readlink("", dir_fd=fd)
        finally:
            os.close(fd)


if __name__ == "__main__":
    def _options(parser):
        parser.add_argument("--root", required=True, help="the host directory to serve")
        parser.add_argument("--name", default="file", help="the scheme's name, for fpath")
        parser.add_argument("--read-only", action="store_true", help="refuse every write with EROFS")
        parser.add_argument("--no-keep", dest="keep", action="store_false",
                            help="open handles die with this daemon (EIO) instead of being kept")
        parser.add_argument("--no-passthrough", dest="passthrough", action="store_false",
                            help="answer O_PASSTHROUGH with handles: every read and write routed")
        parser.add_argument("--directfs-grant-fd", type=int, default=None, metavar="N",
                            help="the grant HOSTDIR asks for (an inherited fd)")

    os.umask(UMASK)  # with the masking above: created modes are exactly mode & 0o755
    sys.setswitchinterval(0.001)  # a listing thread lets the requests loop run every ms
    daemon_cli("redoxcap.schemes.file",
               lambda a: FileScheme(a.root, a.name, a.read_only, a.keep, a.passthrough,
                                    a.directfs_grant_fd), _options)
