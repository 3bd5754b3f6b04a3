"""rt: the runtime client programs import (the role of redox-rt and relibc).

A process reaches resources only through capability fds: its namespace fd
(served by nsmgr) and its current-directory fd, which a process started by
`redoxcap run` or `rt.spawn` inherits and rt adopts on first use (`rt.adopt()`
does it at once). Importing rt does nothing else. Every call below is
one or a few requests on such fds; errors are OSError subclasses with the
errno the scheme answered. Safe to use from several threads.
"""

import os as _os

from redoxcap.wire.call import set_default_timeout, timeout
from redoxcap.wire.linux import AT_FDCWD
from redoxcap.wire.protocol import (
    AT_REMOVEDIR,
    O_RESOLVE_BENEATH,
    O_RESOLVE_IN_ROOT,
    PERM_ALL,
    PERM_DELETE,
    PERM_INSERT,
    PERM_LIST,
    PERM_SCHEME_CREATE,
)
from rt import _process
from rt._fileio import open_file
from rt._namespace import (
    getns,
    mkns,
    mkscheme,
    narrow,
    nsperms,
    register,
    schemes,
    setns,
    unregister,
)
from rt._net import net_grant, pipe, recvfd, recvfrom, sendfd, sendto, shutdown, uds_scope
from rt._posix import (
    StatResult,
    chdir,
    chmod,
    chown,
    clone,
    close,
    dup,
    fchdir,
    fchmod,
    fchown,
    fpath,
    fstat,
    fsync,
    ftruncate,
    futime,
    getcwd,
    getfl,
    link,
    listdir,
    lseek,
    mkdir,
    open,
    openat,
    read,
    readlink,
    rename,
    rmdir,
    stat,
    symlink,
    unlink,
    utime,
    write,
)
from rt._process import setup
from rt._spawn import spawn

O_RDONLY = _os.O_RDONLY
O_WRONLY = _os.O_WRONLY
O_RDWR = _os.O_RDWR
O_CREAT = _os.O_CREAT
O_EXCL = _os.O_EXCL
O_TRUNC = _os.O_TRUNC
O_APPEND = _os.O_APPEND
O_DIRECTORY = _os.O_DIRECTORY
O_NOFOLLOW = _os.O_NOFOLLOW
O_CLOEXEC = _os.O_CLOEXEC
O_NONBLOCK = _os.O_NONBLOCK
O_PATH = _os.O_PATH
SEEK_SET, SEEK_CUR, SEEK_END = _os.SEEK_SET, _os.SEEK_CUR, _os.SEEK_END

__all__ = [
    "AT_FDCWD",
    "AT_REMOVEDIR",
    "O_APPEND",
    "O_CLOEXEC",
    "O_CREAT",
    "O_DIRECTORY",
    "O_EXCL",
    "O_NOFOLLOW",
    "O_NONBLOCK",
    "O_PATH",
    "O_RDONLY",
    "O_RDWR",
    "O_RESOLVE_BENEATH",
    "O_RESOLVE_IN_ROOT",
    "O_TRUNC",
    "O_WRONLY",
    "PERM_ALL",
    "PERM_DELETE",
    "PERM_INSERT",
    "PERM_LIST",
    "PERM_SCHEME_CREATE",
    "SEEK_CUR",
    "SEEK_END",
    "SEEK_SET",
    "StatResult",
    "adopt",
    "chdir",
    "chmod",
    "chown",
    "clone",
    "close",
    "dup",
    "fchdir",
    "fchmod",
    "fchown",
    "fpath",
    "fstat",
    "fsync",
    "ftruncate",
    "futime",
    "getcwd",
    "getfl",
    "getns",
    "link",
    "listdir",
    "lseek",
    "mkdir",
    "mkns",
    "mkscheme",
    "narrow",
    "net_grant",
    "nsperms",
    "open",
    "open_file",
    "openat",
    "pipe",
    "read",
    "readlink",
    "recvfd",
    "recvfrom",
    "register",
    "rename",
    "rmdir",
    "schemes",
    "sendfd",
    "sendto",
    "set_default_timeout",
    "setns",
    "setup",
    "shutdown",
    "spawn",
    "stat",
    "symlink",
    "timeout",
    "uds_scope",
    "unlink",
    "unregister",
    "utime",
    "write",
]

adopt = _process.adopt_from_environment
