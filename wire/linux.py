"""The Linux calls Python's os module lacks, in one place: raw syscall(2) and openat2(2).

Every ctypes call into libc in the project goes through here, so that the
syscall numbers, the errno handling and the one libc handle live once.
x86_64 and aarch64 are supported; elsewhere `syscall` raises ENOSYS.
"""

from __future__ import annotations

import ctypes
import errno
import os
import platform
import struct

# Syscall numbers: x86_64 (asm/unistd_64.h) and aarch64 (asm-generic/unistd.h).
# aarch64 has only the *at forms of the path calls (no open, stat, mkdir, rename ...).
SYSCALLS: dict[str, dict[str, int]] = {
    "x86_64": {
        "openat2": 437, "seccomp": 317, "pidfd_open": 434, "pidfd_getfd": 438,
        # path calls, and the rest of what the broker (redoxcap/broker) must see or refuse
        "open": 2, "stat": 4, "fstat": 5, "lstat": 6, "access": 21, "connect": 42, "bind": 49,
        "socket": 41, "socketpair": 53, "clone": 56, "fork": 57, "vfork": 58, "execve": 59, "truncate": 76,
        "getdents": 78, "getcwd": 79, "chdir": 80, "fchdir": 81, "rename": 82, "mkdir": 83,
        "rmdir": 84, "creat": 85, "link": 86, "unlink": 87, "symlink": 88, "readlink": 89,
        "chmod": 90, "fchmod": 91, "chown": 92, "fchown": 93, "lchown": 94, "ptrace": 101,
        "utime": 132, "mknod": 133, "uselib": 134, "statfs": 137, "pivot_root": 155,
        "chroot": 161, "acct": 163, "mount": 165, "umount2": 166, "swapon": 167, "swapoff": 168,
        "quotactl": 179, "setxattr": 188, "lsetxattr": 189, "fsetxattr": 190, "getxattr": 191,
        "lgetxattr": 192, "listxattr": 194, "llistxattr": 195, "removexattr": 197,
        "lremovexattr": 198, "fremovexattr": 199, "getdents64": 217, "utimes": 235,
        "inotify_add_watch": 254, "openat": 257, "mkdirat": 258, "mknodat": 259,
        "fchownat": 260, "futimesat": 261, "newfstatat": 262, "unlinkat": 263, "renameat": 264,
        "linkat": 265, "symlinkat": 266, "readlinkat": 267, "fchmodat": 268, "faccessat": 269,
        "unshare": 272, "utimensat": 280, "fanotify_mark": 301, "name_to_handle_at": 303,
        "open_by_handle_at": 304, "setns": 308, "process_vm_readv": 310,
        "process_vm_writev": 311, "renameat2": 316, "bpf": 321, "execveat": 322,
        "userfaultfd": 323, "statx": 332,
        "io_uring_setup": 425, "io_uring_enter": 426, "io_uring_register": 427,
        "open_tree": 428, "move_mount": 429, "fsopen": 430, "fsconfig": 431, "fsmount": 432,
        "fspick": 433, "clone3": 435, "faccessat2": 439, "mount_setattr": 442,
        "quotactl_fd": 443, "fchmodat2": 452, "setxattrat": 463, "getxattrat": 464,
        "listxattrat": 465, "removexattrat": 466, "open_tree_attr": 467, "file_getattr": 468,
        "file_setattr": 469,
    },
    "aarch64": {
        "openat2": 437, "seccomp": 277, "pidfd_open": 434, "pidfd_getfd": 438,
        "getcwd": 17, "setxattr": 5, "lsetxattr": 6, "fsetxattr": 7, "getxattr": 8,
        "lgetxattr": 9, "listxattr": 11, "llistxattr": 12, "removexattr": 14,
        "lremovexattr": 15, "fremovexattr": 16, "inotify_add_watch": 27, "mknodat": 33,
        "mkdirat": 34, "unlinkat": 35, "symlinkat": 36, "linkat": 37, "renameat": 38,
        "umount2": 39, "mount": 40, "pivot_root": 41, "statfs": 43, "truncate": 45,
        "faccessat": 48, "chdir": 49, "fchdir": 50, "chroot": 51, "fchmod": 52, "fchmodat": 53,
        "fchownat": 54, "fchown": 55, "openat": 56, "quotactl": 60, "getdents64": 61,
        "readlinkat": 78, "newfstatat": 79, "fstat": 80, "utimensat": 88, "acct": 89,
        "unshare": 97, "ptrace": 117, "socket": 198, "socketpair": 199, "bind": 200,
        "connect": 203, "clone": 220, "execve": 221, "swapon": 224, "swapoff": 225,
        "fanotify_mark": 263, "name_to_handle_at": 264, "open_by_handle_at": 265,
        "setns": 268, "process_vm_readv": 270, "process_vm_writev": 271, "renameat2": 276,
        "bpf": 280, "execveat": 281, "userfaultfd": 282, "statx": 291, "io_uring_setup": 425,
        "io_uring_enter": 426, "io_uring_register": 427, "open_tree": 428, "move_mount": 429,
        "fsopen": 430, "fsconfig": 431, "fsmount": 432, "fspick": 433, "clone3": 435,
        "faccessat2": 439, "mount_setattr": 442, "quotactl_fd": 443, "fchmodat2": 452,
        "setxattrat": 463, "getxattrat": 464, "listxattrat": 465, "removexattrat": 466,
        "open_tree_attr": 467, "file_getattr": 468, "file_setattr": 469,
    },
}
_MACHINE_ALIASES = {"amd64": "x86_64", "arm64": "aarch64"}

RESOLVE_NO_MAGICLINKS = 0x02
RESOLVE_BENEATH = 0x08
RESOLVE_IN_ROOT = 0x10

# linux/seccomp.h: filters that hand a syscall to a supervising process (the broker)
SECCOMP_SET_MODE_FILTER = 1
SECCOMP_GET_NOTIF_SIZES = 3
SECCOMP_FILTER_FLAG_NEW_LISTENER = 1 << 3
SECCOMP_FILTER_FLAG_WAIT_KILLABLE_RECV = 1 << 5  # Linux 6.0: only a fatal signal interrupts
SECCOMP_RET_KILL_PROCESS = 0x8000_0000
SECCOMP_RET_ERRNO = 0x0005_0000
SECCOMP_RET_USER_NOTIF = 0x7FC0_0000
SECCOMP_RET_ALLOW = 0x7FFF_0000
SECCOMP_USER_NOTIF_FLAG_CONTINUE = 1
SECCOMP_ADDFD_FLAG_SETFD = 1
SECCOMP_ADDFD_FLAG_SEND = 2
SECCOMP_USER_NOTIF_FD_SYNC_WAKE_UP = 1  # Linux 6.6: wake the waiter on the broker's CPU
# _IOWR('!', 0, struct seccomp_notif) and friends (the same on x86_64 and aarch64)
SECCOMP_IOCTL_NOTIF_RECV = 0xC050_2100
SECCOMP_IOCTL_NOTIF_SEND = 0xC018_2101
SECCOMP_IOCTL_NOTIF_ID_VALID = 0x4008_2102
SECCOMP_IOCTL_NOTIF_ADDFD = 0x4018_2103
SECCOMP_IOCTL_NOTIF_SET_FLAGS = 0x4008_2104
# linux/audit.h: the arch word of struct seccomp_data
AUDIT_ARCH = {"x86_64": 0xC000_003E, "aarch64": 0xC000_00B7}
X32_SYSCALL_BIT = 0x4000_0000  # x86_64: x32 calls share AUDIT_ARCH_X86_64

_libc: ctypes.CDLL | None = None


def machine() -> str | None:
    """The machine name SYSCALLS knows this host by (None: an unsupported architecture)."""
    name = platform.machine().lower()
    name = _MACHINE_ALIASES.get(name, name)
    return name if name in SYSCALLS else None


def libc() -> ctypes.CDLL:
    """The process's libc, with errno kept for every call."""
    global _libc
    if _libc is None:
        lib = ctypes.CDLL(None, use_errno=True)
        lib.syscall.restype = ctypes.c_long
        lib.prctl.restype = ctypes.c_int
        _libc = lib
    return _libc


def syscall(name: str, *args: int | bytes | ctypes.c_void_p) -> int:
    """Invoke the raw syscall called name (a key of SYSCALLS).

    Args:
        name: the syscall.
        args: its arguments; ints are passed as full machine words (syscall(2)
            is variadic), bytes as pointers to their contents.

    Returns:
        The syscall's non-negative result.

    Raises:
        OSError: the syscall's errno; ENOSYS on an unsupported architecture.
    """
    arch = machine()
    if arch is None or name not in SYSCALLS[arch]:
        raise OSError(errno.ENOSYS, f"{name}: not available on {platform.machine()}")
    cargs = [ctypes.c_ulong(a) if isinstance(a, int) else a for a in args]
    ctypes.set_errno(0)
    ret = libc().syscall(ctypes.c_long(SYSCALLS[arch][name]), *cargs)
    if ret < 0:
        err = ctypes.get_errno()
        raise OSError(err, f"{name}: {os.strerror(err)}")
    return ret


def openat2(dirfd: int, path: str, flags: int, mode: int, resolve: int) -> int:
    """Linux openat2(2).

    Args:
        dirfd: the directory path is relative to.
        path: the path (no NUL).
        flags: Linux open flags, passed as they are.
        mode: permission bits; only sent with O_CREAT (openat2 refuses it otherwise).
        resolve: RESOLVE_* bits.

    Returns:
        The new fd.

    Raises:
        OSError: Linux's errno; ENOSYS where this machine has no openat2.
    """
    how = struct.pack("QQQ", flags, mode if flags & os.O_CREAT else 0, resolve)
    try:
        return syscall("openat2", ctypes.c_int(dirfd), os.fsencode(path), how, len(how))
    except OSError as exc:
        raise OSError(exc.errno, os.strerror(exc.errno)) from None


def ioctl(fd: int, request: int, buf: ctypes.Array | None) -> int:
    """ioctl(2) with a pointer argument (a ctypes buffer the kernel reads or fills in place).

    Raises:
        OSError: the ioctl's errno.
    """
    lib = libc()
    ctypes.set_errno(0)
    ret = lib.ioctl(ctypes.c_int(fd), ctypes.c_ulong(request), buf)
    if ret < 0:
        err = ctypes.get_errno()
        raise OSError(err, os.strerror(err))
    return ret


def pidfd_getfd(pidfd: int, targetfd: int) -> int:
    """A duplicate, in this process, of another process's fd targetfd (close-on-exec).

    Raises:
        OSError: EBADF (no such fd), EPERM (not allowed to ptrace it), ESRCH (it exited).
    """
    return syscall("pidfd_getfd", ctypes.c_int(pidfd), ctypes.c_int(targetfd), 0)
