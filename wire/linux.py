"""The Linux calls Python's os module lacks, in one place: raw syscall(2), prctl(2), openat2(2).

Every ctypes call into libc in the project goes through here, so that the
syscall numbers, the errno handling and the one libc handle live once; the
sandbox (Landlock, seccomp, capabilities) and the file scheme (openat2) call
these. x86_64 and aarch64 are supported; elsewhere `syscall` raises ENOSYS.
"""

from __future__ import annotations

import ctypes
import errno
import os
import platform
import struct

# Syscall numbers: x86_64 (asm/unistd_64.h) and aarch64 (asm-generic/unistd.h).
# aarch64 has only the *at forms of the path calls (no chmod, chown, utime ...).
# Besides the calls made here, the seccomp filter names the calls it refuses.
SYSCALLS: dict[str, dict[str, int]] = {
    "x86_64": {
        "openat2": 437,
        "landlock_create_ruleset": 444,
        "landlock_add_rule": 445,
        "landlock_restrict_self": 446,
        "socket": 41,
        "io_uring_setup": 425,
        "ioctl": 16,
        "capset": 126,
        "chmod": 90,
        "fchmod": 91,
        "fchmodat": 268,
        "fchmodat2": 452,
        "chown": 92,
        "fchown": 93,
        "lchown": 94,
        "fchownat": 260,
        "utime": 132,
        "utimes": 235,
        "futimesat": 261,
        "utimensat": 280,
        "setxattr": 188,
        "lsetxattr": 189,
        "fsetxattr": 190,
        "removexattr": 197,
        "lremovexattr": 198,
        "fremovexattr": 199,
        "setxattrat": 463,
        "removexattrat": 466,
        "file_setattr": 469,
        # the broker (redoxcap/broker): the path calls it answers, the ones it refuses
        "open": 2, "stat": 4, "fstat": 5, "lstat": 6, "access": 21, "connect": 42, "bind": 49,
        "socketpair": 53, "clone": 56, "fork": 57, "vfork": 58, "execve": 59, "truncate": 76,
        "getdents": 78, "getcwd": 79, "chdir": 80, "fchdir": 81, "rename": 82, "mkdir": 83,
        "rmdir": 84, "creat": 85, "link": 86, "unlink": 87, "symlink": 88, "readlink": 89,
        "ptrace": 101, "mknod": 133, "uselib": 134, "statfs": 137, "pivot_root": 155,
        "chroot": 161, "acct": 163, "mount": 165, "umount2": 166, "swapon": 167, "swapoff": 168,
        "quotactl": 179, "getxattr": 191, "lgetxattr": 192, "listxattr": 194, "llistxattr": 195,
        "getdents64": 217, "inotify_add_watch": 254, "openat": 257, "mkdirat": 258,
        "mknodat": 259, "newfstatat": 262, "unlinkat": 263, "renameat": 264, "linkat": 265,
        "symlinkat": 266, "readlinkat": 267, "faccessat": 269, "unshare": 272,
        "fanotify_mark": 301, "name_to_handle_at": 303, "open_by_handle_at": 304, "setns": 308,
        "process_vm_readv": 310, "process_vm_writev": 311, "renameat2": 316, "seccomp": 317,
        "bpf": 321, "execveat": 322, "userfaultfd": 323, "statx": 332, "io_uring_enter": 426,
        "io_uring_register": 427, "open_tree": 428, "move_mount": 429, "fsopen": 430,
        "fsconfig": 431, "fsmount": 432, "fspick": 433, "pidfd_open": 434, "clone3": 435,
        "pidfd_getfd": 438, "faccessat2": 439, "mount_setattr": 442, "quotactl_fd": 443,
        "getxattrat": 464, "listxattrat": 465, "open_tree_attr": 467, "file_getattr": 468,
        "sendto": 44, "sendmsg": 46, "listen": 50, "sendmmsg": 307,
    },
    "aarch64": {
        "openat2": 437,
        "landlock_create_ruleset": 444,
        "landlock_add_rule": 445,
        "landlock_restrict_self": 446,
        "socket": 198,
        "io_uring_setup": 425,
        "ioctl": 29,
        "capset": 91,
        "fchmod": 52,
        "fchmodat": 53,
        "fchmodat2": 452,
        "fchown": 55,
        "fchownat": 54,
        "utimensat": 88,
        "setxattr": 5,
        "lsetxattr": 6,
        "fsetxattr": 7,
        "removexattr": 14,
        "lremovexattr": 15,
        "fremovexattr": 16,
        "setxattrat": 463,
        "removexattrat": 466,
        "file_setattr": 469,
        # the broker (redoxcap/broker): the path calls it answers, the ones it refuses
        "getxattr": 8, "lgetxattr": 9, "listxattr": 11, "llistxattr": 12, "getcwd": 17,
        "inotify_add_watch": 27, "mknodat": 33, "mkdirat": 34, "unlinkat": 35, "symlinkat": 36,
        "linkat": 37, "renameat": 38, "umount2": 39, "mount": 40, "pivot_root": 41,
        "statfs": 43, "truncate": 45, "faccessat": 48, "chdir": 49, "fchdir": 50, "chroot": 51,
        "openat": 56, "quotactl": 60, "getdents64": 61, "readlinkat": 78, "newfstatat": 79,
        "fstat": 80, "acct": 89, "unshare": 97, "ptrace": 117, "socketpair": 199, "bind": 200,
        "connect": 203, "clone": 220, "execve": 221, "swapon": 224, "swapoff": 225,
        "fanotify_mark": 263, "name_to_handle_at": 264, "open_by_handle_at": 265, "setns": 268,
        "process_vm_readv": 270, "process_vm_writev": 271, "renameat2": 276, "seccomp": 277,
        "bpf": 280, "execveat": 281, "userfaultfd": 282, "statx": 291, "io_uring_enter": 426,
        "io_uring_register": 427, "open_tree": 428, "move_mount": 429, "fsopen": 430,
        "fsconfig": 431, "fsmount": 432, "fspick": 433, "pidfd_open": 434, "clone3": 435,
        "pidfd_getfd": 438, "faccessat2": 439, "mount_setattr": 442, "quotactl_fd": 443,
        "getxattrat": 464, "listxattrat": 465, "open_tree_attr": 467, "file_getattr": 468,
        "listen": 201, "sendto": 206, "sendmsg": 211, "sendmmsg": 269,
    },
}
_MACHINE_ALIASES = {"amd64": "x86_64", "arm64": "aarch64"}

RESOLVE_NO_MAGICLINKS = 0x02
RESOLVE_BENEATH = 0x08
RESOLVE_IN_ROOT = 0x10

# linux/prctl.h
PR_SET_PDEATHSIG = 1
PR_SET_SECCOMP = 22
PR_CAPBSET_DROP = 24
PR_SET_NO_NEW_PRIVS = 38
PR_CAP_AMBIENT = 47
PR_CAP_AMBIENT_CLEAR_ALL = 4

# linux/seccomp.h
SECCOMP_MODE_FILTER = 2

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

SyscallArg = int | bytes | bytearray | ctypes.c_void_p | ctypes.c_int | None

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


def _word(arg: SyscallArg) -> object:
    """arg as syscall(2) takes it: a full machine word or a pointer."""
    if isinstance(arg, int):
        return ctypes.c_ulong(arg)
    if isinstance(arg, bytearray):
        return (ctypes.c_char * len(arg)).from_buffer(arg)
    return arg


def syscall(name: str, *args: SyscallArg) -> int:
    """Invoke the raw syscall called name (a key of SYSCALLS).

    Args:
        name: the syscall.
        args: its arguments; ints are passed as full machine words (syscall(2)
            is variadic), bytes as pointers to their contents (which the
            kernel only reads), a bytearray as a pointer to memory the kernel
            may write, None as NULL.

    Returns:
        The syscall's non-negative result.

    Raises:
        OSError: the syscall's errno; ENOSYS on an unsupported architecture.
    """
    arch = machine()
    if arch is None or name not in SYSCALLS[arch]:
        raise OSError(errno.ENOSYS, f"{name}: not available on {platform.machine()}")
    cargs = [_word(a) for a in args]
    ctypes.set_errno(0)
    ret = libc().syscall(ctypes.c_long(SYSCALLS[arch][name]), *cargs)
    if ret < 0:
        err = ctypes.get_errno()
        raise OSError(err, f"{name}: {os.strerror(err)}")
    return ret


def prctl(option: int, arg2: int = 0, arg3: int = 0, arg4: int = 0, arg5: int = 0) -> None:
    """Linux prctl(2) with integer arguments.

    Raises:
        OSError: Linux's errno.
    """
    ctypes.set_errno(0)
    args = (ctypes.c_ulong(a) for a in (arg2, arg3, arg4, arg5))
    if libc().prctl(ctypes.c_int(option), *args) != 0:
        err = ctypes.get_errno()
        raise OSError(err, f"prctl({option}): {os.strerror(err)}")


class _SockFprog(ctypes.Structure):
    """struct sock_fprog: a BPF program's length in instructions and its address."""

    _fields_ = [("len", ctypes.c_ushort), ("filter", ctypes.c_void_p)]


def set_seccomp_filter(program: bytes) -> None:
    """Install a seccomp-BPF filter on the calling thread (prctl PR_SET_SECCOMP).

    Args:
        program: an array of struct sock_filter (8 bytes each).

    Raises:
        OSError: Linux's errno (EACCES without no_new_privs, EINVAL for a bad program).
    """
    buf = ctypes.create_string_buffer(program, len(program))
    fprog = _SockFprog(len(program) // 8, ctypes.addressof(buf))
    prctl(PR_SET_SECCOMP, SECCOMP_MODE_FILTER, ctypes.addressof(fprog))


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
