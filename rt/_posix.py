"""Files, directories and the cwd: POSIX-like calls, each one or a few capability requests.

Namespaces are in _namespace.py, starting programs in _spawn.py, the process's
own capabilities in _process.py.
"""

from __future__ import annotations

import errno
import fcntl
import os
import stat as _stat

from redoxcap.wire import call as capability
from redoxcap.wire import protocol as P
from redoxcap.wire.call import call_fd, call_value, directory_path, forget, is_host_fd
from redoxcap.wire.stat import Stat
from rt import _process
from rt._namespace import schemes
from rt._paths import (
    AT_FDCWD,
    SCHEME_ROOT,
    fspath,
    handed_dirs,
    locate,
    split_namespace_path,
    to_namespace_path,
)

StatResult = Stat  # what fstat and stat return (wire.stat.Stat, the schemes' own type)
MAX_LISTING = 1 << 20  # names in one listdir: a server could page for ever
MAX_LISTING_CHARS = 64 << 20

# -- files ---------------------------------------------------------------------


def open(path: str | os.PathLike, flags: int = os.O_RDONLY, mode: int = 0o666) -> int:
    """Open a file; returns a capability fd.

    Absolute paths go through the namespace (`/x` is `/scheme/file/x`),
    relative ones to openat(cwd_fd, ...).

    Raises:
        OSError: with the errno the scheme or nsmgr answered.
    """
    return openat(AT_FDCWD, path, flags, mode)


def openat(dirfd: int, path: str | os.PathLike, flags: int = os.O_RDONLY, mode: int = 0o666) -> int:
    """Open path relative to the directory capability dirfd (or the cwd for AT_FDCWD).

    With O_RESOLVE_BENEATH or O_RESOLVE_IN_ROOT and a directory fd, the
    namespace is never consulted, as with openat2(2): beneath, an absolute
    path is EXDEV; in-root, it is resolved with dirfd as `/`; `NAME:rest` is
    a file name. (With AT_FDCWD, an absolute path is a namespace path as
    always, and the flag binds the lookup beneath the namespace entry.)
    """
    if dirfd != AT_FDCWD and flags & (P.O_RESOLVE_BENEATH | P.O_RESOLVE_IN_ROOT):
        path = fspath(path)
        if flags & P.O_RESOLVE_BENEATH and path.startswith("/"):
            raise OSError(errno.EXDEV, "an absolute path cannot be beneath a directory")
        fd = dirfd
    else:
        fd, path, _ = locate(path, dirfd)
    return call_fd(fd, P.OPENAT, [path, flags, mode])


def read(fd: int, n: int) -> bytes:
    """Read up to n bytes; b"" at end of file. Large reads are split into frames."""
    if is_host_fd(fd):  # the hot path of passthrough
        return os.read(fd, n)
    if n < 0:
        raise OSError(errno.EINVAL, "negative read size")
    if n <= P.MAX_IO:
        return _read_chunk(fd, n)
    parts = []
    while n > 0:
        chunk = _read_chunk(fd, min(n, P.MAX_IO))
        if not chunk:
            break
        parts.append(chunk)
        n -= len(chunk)
    return b"".join(parts)


def write(fd: int, data: bytes | bytearray | memoryview) -> int:
    """Write data; returns the number of bytes written. Large writes are split into frames."""
    if is_host_fd(fd):
        return os.write(fd, data)
    data = bytes(data)
    if len(data) <= P.MAX_IO:
        return _write_chunk(fd, data)
    done = 0
    while done < len(data):
        n = _write_chunk(fd, data[done : done + P.MAX_IO])
        if n <= 0:
            break
        done += n
    return done


def _read_chunk(fd: int, n: int) -> bytes:
    data = call_value(fd, P.READ, [n], kind=bytes)
    if len(data) > n:
        raise OSError(errno.EIO, "the server answered more bytes than asked for")
    return data


def _write_chunk(fd: int, data: bytes) -> int:
    n = call_value(fd, P.WRITE, [data], kind=int)
    if not 0 <= n <= len(data):
        raise OSError(errno.EIO, "malformed write reply")
    return n


def lseek(fd: int, pos: int, whence: int = os.SEEK_SET) -> int:
    """Move fd's offset (shared by its clones); returns the new offset."""
    if is_host_fd(fd):
        return os.lseek(fd, pos, whence)
    offset = call_value(fd, P.LSEEK, [pos, whence], kind=int)
    if offset < 0:
        raise OSError(errno.EIO, "malformed lseek reply")
    return offset


def fstat(fd: int) -> StatResult:
    """Status of the file behind fd."""
    return capability.fstat(fd)


def stat(path: str | os.PathLike) -> StatResult:
    """Status of the file at path (symlinks followed)."""
    if _is_scheme_list(path):
        return fstat(_process.namespace_fd())
    where, name, _ = locate(path)
    return capability.stat_at(where, name)


def close(fd: int) -> None:
    """Close a capability fd; the scheme closes the handle when its last holder does."""
    forget(fd)
    os.close(fd)


def dup(fd: int, buf: bytes = b"") -> int:
    """Ask fd's scheme for a new handle derived from fd (its own offset); buf says how."""
    return call_fd(fd, P.DUP, [bytes(buf)])


def clone(fd: int) -> int:
    """A new capability fd for the same handle (shared offset), made by the router.

    For a host fd: os.dup (the same open file, shared offset).
    """
    if is_host_fd(fd):
        return os.dup(fd)
    return call_fd(fd, P.CLONE)


def getfl(fd: int) -> int:
    """The open flags of fd's handle, including a sticky O_RESOLVE_BENEATH (F_GETFL for a host fd)."""
    if is_host_fd(fd):
        return fcntl.fcntl(fd, fcntl.F_GETFL)
    return call_value(fd, P.GETFL, kind=int)


def fpath(fd: int) -> str:
    """The scheme's path for fd, as /scheme/NAME/..."""
    return call_value(fd, P.FPATH, kind=str)


def fsync(fd: int) -> None:
    """Flush fd's data to stable storage (EINVAL where the scheme has none)."""
    if is_host_fd(fd):
        return os.fsync(fd)
    call_value(fd, P.FSYNC)


def ftruncate(fd: int, length: int) -> None:
    """Set the size of fd's file to length bytes."""
    if is_host_fd(fd):
        return os.ftruncate(fd, length)
    call_value(fd, P.FTRUNCATE, [length])


# -- directories and names ---------------------------------------------------


# -- metadata ------------------------------------------------------------------


def chmod(path: str | os.PathLike, mode: int, *, follow_symlinks: bool = True) -> None:
    """Set the permission bits of the file at path (set-uid, set-gid and sticky are dropped).

    Raises:
        OSError: EROFS on a read-only mount, EOPNOTSUPP for a symlink itself.
    """
    where, name, _ = locate(path)
    call_value(where, P.CHMODAT, [name, mode, 0 if follow_symlinks else os.O_NOFOLLOW])


def fchmod(fd: int, mode: int) -> None:
    """chmod of the file behind fd (a host fd: os.fchmod, permission bits only)."""
    if is_host_fd(fd):
        os.fchmod(fd, mode & 0o777)
        return
    call_value(fd, P.CHMODAT, ["", mode, 0])


def _times(ns: tuple[int | None, int | None] | None) -> list[int | None]:
    """(atime, mtime) in nanoseconds (None keeps one); None sets both to now."""
    if ns is None:
        import time

        now = time.time_ns()
        return [now, now]
    if len(ns) != 2:
        raise TypeError("ns must be (atime_ns, mtime_ns)")
    return [ns[0], ns[1]]


def utime(path: str | os.PathLike, ns: tuple[int | None, int | None] | None = None, *,
          follow_symlinks: bool = True) -> None:
    """Set the access and modification times of the file at path (nanoseconds; see _times)."""
    where, name, _ = locate(path)
    call_value(where, P.UTIMENSAT, [name, *_times(ns), 0 if follow_symlinks else os.O_NOFOLLOW])


def futime(fd: int, ns: tuple[int | None, int | None] | None = None) -> None:
    """utime of the file behind fd."""
    times = _times(ns)
    if is_host_fd(fd):
        st = os.fstat(fd)
        os.utime(fd, ns=(st.st_atime_ns if times[0] is None else times[0],
                         st.st_mtime_ns if times[1] is None else times[1]))
        return
    call_value(fd, P.UTIMENSAT, ["", *times, 0])


def chown(path: str | os.PathLike, uid: int, gid: int, *, follow_symlinks: bool = True) -> None:
    """Accept a change of owner that changes nothing (-1, your own ids, the file's); else EPERM."""
    where, name, _ = locate(path)
    call_value(where, P.CHOWNAT, [name, uid, gid, 0 if follow_symlinks else os.O_NOFOLLOW])


def fchown(fd: int, uid: int, gid: int) -> None:
    """chown of the file behind fd (no change is ever made; EPERM for another owner)."""
    if is_host_fd(fd):
        st = os.fstat(fd)
        if uid not in (-1, os.getuid(), st.st_uid) or gid not in (-1, os.getgid(), st.st_gid):
            raise OSError(errno.EPERM, "a file is never given to another owner")
        return
    call_value(fd, P.CHOWNAT, ["", uid, gid, 0])


def _is_scheme_list(path) -> bool:
    return fspath(path).rstrip("/") == SCHEME_ROOT


def listdir(path: str | os.PathLike = ".") -> list[str]:
    """Names in a directory, sorted; `/scheme` lists the namespace's schemes."""
    if _is_scheme_list(path):
        return schemes()
    fd = open(path, os.O_RDONLY | os.O_DIRECTORY)
    try:
        names: list[str] = []
        size = 0
        while page := call_value(fd, P.GETDENTS, [len(names)], kind=list):
            size += sum(len(name) for name in page if isinstance(name, str))
            if not all(isinstance(name, str) for name in page):
                raise OSError(errno.EIO, "malformed directory listing")
            if len(names) + len(page) > MAX_LISTING or size > MAX_LISTING_CHARS:
                raise OSError(errno.EOVERFLOW, "directory listing too large")
            names += page
        return sorted(names)  # schemes list in their own order (the file scheme: the host's)
    finally:
        close(fd)


def mkdir(path: str | os.PathLike, mode: int = 0o777) -> None:
    """Create a directory (EEXIST if the name is taken)."""
    fd, path, _ = locate(path)
    call_value(fd, P.MKDIRAT, [path, mode])


def unlink(path: str | os.PathLike) -> None:
    """Remove a name that is not a directory (EISDIR if it is one)."""
    fd, path, _ = locate(path)
    call_value(fd, P.UNLINKAT, [path, 0])


def rmdir(path: str | os.PathLike) -> None:
    """Remove an empty directory (ENOTEMPTY, ENOTDIR otherwise)."""
    fd, path, _ = locate(path)
    call_value(fd, P.UNLINKAT, [path, P.AT_REMOVEDIR])


def symlink(target: str | os.PathLike, path: str | os.PathLike) -> None:
    """Create a symlink at path holding target (stored verbatim)."""
    fd, path, _ = locate(path)
    call_value(fd, P.SYMLINKAT, [os.fsdecode(os.fspath(target)), path])


def readlink(path: str | os.PathLike) -> str:
    """The target stored in the symlink at path (EINVAL if it is not one)."""
    fd, path, _ = locate(path)
    return call_value(fd, P.READLINKAT, [path], kind=str)


def rename(src: str | os.PathLike, dst: str | os.PathLike) -> None:
    """Rename src to dst (both in one scheme, else EXDEV)."""
    _two_path(P.RENAMEAT, src, dst)


def link(src: str | os.PathLike, dst: str | os.PathLike) -> None:
    """Create a hard link dst to src."""
    _two_path(P.LINKAT, src, dst)


def _two_path(op: int, src, dst) -> None:
    fd1, p1, ns1 = locate(src)
    fd2, p2, ns2 = locate(dst)
    if fd1 == fd2:  # both through the namespace, or both relative to the cwd
        call_value(fd1, op, [p1, p2])
        return
    opened = []
    try:
        if ns1:
            root, p1 = split_namespace_path(p1)
            fd1 = open(root, os.O_DIRECTORY)
            opened.append(fd1)
        if ns2:
            root, p2 = split_namespace_path(p2)
            fd2 = open(root, os.O_DIRECTORY)
            opened.append(fd2)
        call_value(fd1, op, [p1, p2], [fd2])
    finally:
        for fd in opened:
            close(fd)


def chdir(path: str | os.PathLike) -> None:
    """Make the directory at path the cwd (an fd; the old one is closed).

    getcwd's string is derived from where the scheme says the new directory
    really is (fpath), so `..` and symlinks cannot make it lie.
    """
    path = fspath(path)
    fd = open(path, os.O_RDONLY | os.O_DIRECTORY)
    try:
        ns_path = to_namespace_path(path)
        if ns_path is None:
            new = directory_path(fd, _process.cwd_fd(), _process.cwd_path())
        else:
            new = physical_path(fd, ns_path)
    except BaseException:
        close(fd)
        raise
    _process.replace_cwd(fd, new)


def fchdir(fd: int) -> None:
    """Make the directory fd the cwd (rt keeps its own clone); ENOTDIR otherwise."""
    if not _stat.S_ISDIR(fstat(fd).st_mode):
        raise OSError(errno.ENOTDIR, os.strerror(errno.ENOTDIR))
    new = clone(fd)
    try:
        try:
            path = directory_path(new, _process.cwd_fd(), _process.cwd_path())
        except OSError:
            path = _display(fpath(new))
    except BaseException:
        close(new)
        raise
    _process.replace_cwd(new, path)


def _display(scheme_path: str) -> str:
    """/scheme/file/x is shown as the POSIX path /x, a handed directory at its own path."""
    for visible, name in handed_dirs():
        root = f"{SCHEME_ROOT}/{name}"
        if scheme_path == root or scheme_path.startswith(root + "/"):
            return (visible.rstrip("/") + scheme_path[len(root):]) or "/"
    if scheme_path == "/scheme/file" or scheme_path.startswith("/scheme/file/"):
        return scheme_path[len("/scheme/file") :] or "/"
    return scheme_path


def physical_path(fd: int, ns_path: str) -> str:
    """The path of fd, opened as namespace path ns_path, measured from its scheme's root.

    Used for getcwd's string (here and by `redoxcap run`): after symlinks, not as typed.
    """
    root_path, _ = split_namespace_path(ns_path)
    root = open(root_path, os.O_RDONLY | os.O_DIRECTORY)
    try:
        shown = _display(root_path)
        return directory_path(fd, root, shown)
    finally:
        close(root)


def getcwd() -> str:
    """The cached path of the cwd."""
    return _process.cwd_path()
