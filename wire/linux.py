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
SYSCALLS: dict[str, dict[str, int]] = {
    "x86_64": {"openat2": 437},
    "aarch64": {"openat2": 437},
}
_MACHINE_ALIASES = {"amd64": "x86_64", "arm64": "aarch64"}

RESOLVE_NO_MAGICLINKS = 0x02
RESOLVE_BENEATH = 0x08
RESOLVE_IN_ROOT = 0x10

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
