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
