"""Confine the current process with Landlock and seccomp before it execs a client.

What is confined, once :func:`confine` returns (and inherited across ``execve``):

* Filesystem (Landlock): every access right known to the running ABI (1..7) is
  handled, so a path can be opened, listed, executed, created, removed,
  renamed across directories, truncated or ``ioctl``-ed (devices) only if it
  lies beneath a granted path. ``read_paths`` get read, list and execute;
  ``write_paths`` get read, list and write/create/remove but not execute.
* TCP (Landlock ABI >= 4, with ``deny_network``): no ``bind`` or ``connect`` on
  TCP sockets, including sockets inherited from the parent.
* Other sockets (seccomp-BPF, with ``deny_network``): ``socket(2)`` fails with
  EACCES for every address family except AF_UNIX, which covers UDP, raw and
  netlink sockets that Landlock ABI 7 cannot restrict. ``socketpair(AF_UNIX)``
  keeps working.
* Metadata (seccomp-BPF, always): chmod, chown, utime and setxattr/removexattr
  in every form (path, ``l``, ``f``, ``*at``, ``fchmodat2``, ``setxattrat``,
  ``file_setattr``) and the ``ioctl`` requests that set inode flags fail with
  EPERM on every path and fd, the client's own scratch files included: Landlock
  does not mediate them. ``io_uring_setup`` is refused too (EPERM), because
  io_uring sets xattrs and creates sockets without those syscalls.
* The terminal (seccomp-BPF, always, and the launcher): ``ioctl`` TIOCSTI,
  TIOCLINUX, TIOCCONS, TIOCSETD, TIOCSCTTY and TIOCVHANGUP fail with EPERM on
  any fd, and the launcher runs COMMAND in a new session without a controlling
  terminal, so it can neither inject input into the caller's terminal nor
  regain it (CVE-2017-5226). Without the terminal's hangup to end it, the
  launcher has the kernel kill COMMAND when the launcher's parent dies.
* Capabilities: none. The effective, permitted, inheritable and ambient sets are
  cleared and, when running as root, the bounding set too, so ``execve`` gives
  none back; the uid stays.
* IPC scopes (Landlock ABI >= 6): no connecting to abstract Unix sockets and
  no signals to processes outside the new Landlock domain.
* ``no_new_privs`` is set, so set-uid binaries cannot regain privileges.

What is NOT confined:

* File descriptors opened before confinement (inherited or passed over a
  socket) keep the access they were opened with; this is how capabilities are
  handed to the client on purpose.
* Landlock ABI 7 cannot restrict ``connect()`` to a *named* (pathname) Unix
  socket: a confined client can connect to any listening socket whose path it
  can resolve, including the supervisor's control socket. That socket must
  therefore authenticate its peers itself instead of trusting "who can reach it".
* ``stat``, ``chdir``, ``access``, ``readlink``, ``getxattr`` and similar
  metadata *reads* are not covered by Landlock: a client learns which host
  paths exist, their size, owner, mode and times, but not their contents.
* Sockets created by the parent and inherited are not subject to the seccomp
  ``socket`` filter (only Landlock's TCP rules apply to them).
* Bytes written to a terminal on fds 0-2 reach it: escape sequences that make
  a terminal emulator answer by typing are the terminal's to refuse.

Use it as a launcher::

    python -m redoxcap.confine [--read PATH]... [--write PATH]... \\
        [--no-network-deny] [--require] -- COMMAND ARGS...

The module only imports the standard library so the launcher starts fast.
"""

from __future__ import annotations

import argparse
import ctypes
import errno
import os
import platform
import re
import signal
import stat
import struct
import sys
from collections.abc import Iterable, Sequence
from dataclasses import dataclass

__all__ = [
    "DENIED_IOCTLS",
    "DENIED_SYSCALLS",
    "ConfineResult",
    "ConfinementUnavailable",
    "confine",
    "die_with_parent",
    "interpreter_read_paths",
    "landlock_abi",
    "leave_terminal",
    "main",
    "python_script",
]

# Syscall numbers: x86_64 (asm/unistd_64.h) and aarch64 (asm-generic/unistd.h).
# aarch64 has only the *at forms of the path calls (no chmod, chown, utime ...).
_SYSCALLS = {
    "x86_64": {
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
# Syscalls that change a file's mode, owner, times, attributes or xattrs, which
# Landlock does not mediate; refused with EPERM on every path and fd (names an
# architecture lacks are skipped). io_uring can do the same (IORING_OP_SETXATTR)
# and create sockets (IORING_OP_SOCKET) without these syscalls.
DENIED_SYSCALLS = (
    "chmod",
    "fchmod",
    "fchmodat",
    "fchmodat2",
    "chown",
    "fchown",
    "lchown",
    "fchownat",
    "utime",
    "utimes",
    "futimesat",
    "utimensat",
    "setxattr",
    "lsetxattr",
    "fsetxattr",
    "removexattr",
    "lremovexattr",
    "fremovexattr",
    "setxattrat",
    "removexattrat",
    "file_setattr",
    "io_uring_setup",
)
# ioctl requests refused with EPERM on any fd (asm-generic/ioctls.h, linux/fs.h;
# the same values on x86_64 and aarch64). The kernel reads the request as an
# unsigned int, so its low 32 bits decide.
DENIED_IOCTLS = {
    # Push input into a terminal or take it over (CVE-2017-5226 and its kin).
    "TIOCSTI": 0x5412,
    "TIOCLINUX": 0x541C,
    "TIOCCONS": 0x541D,
    "TIOCSETD": 0x5423,
    "TIOCSCTTY": 0x540E,
    "TIOCVHANGUP": 0x5437,
    # Change inode flags and attributes of a file that is only open for reading.
    "FS_IOC_SETFLAGS": 0x40086602,
    "FS_IOC32_SETFLAGS": 0x40046602,
    "FS_IOC_SETVERSION": 0x40087602,
    "FS_IOC32_SETVERSION": 0x40047602,
    "FS_IOC_FSSETXATTR": 0x401C5820,
    "FS_IOC_ENABLE_VERITY": 0x40806685,
    "FS_IOC_SET_ENCRYPTION_POLICY": 0x800C6613,
}
_MACHINE_ALIASES = {"amd64": "x86_64", "arm64": "aarch64"}

# linux/audit.h: EM_X86_64 (62) / EM_AARCH64 (183) | __AUDIT_ARCH_64BIT | __AUDIT_ARCH_LE.
_AUDIT_ARCH_64BIT = 0x80000000
_AUDIT_ARCH_LE = 0x40000000
_AUDIT_ARCH = {
    "x86_64": 62 | _AUDIT_ARCH_64BIT | _AUDIT_ARCH_LE,  # 0xC000003E
    "aarch64": 183 | _AUDIT_ARCH_64BIT | _AUDIT_ARCH_LE,  # 0xC00000B7
}
_X32_SYSCALL_BIT = 0x40000000  # asm/unistd.h on x86_64

# linux/landlock.h
LANDLOCK_CREATE_RULESET_VERSION = 1 << 0
LANDLOCK_RULE_PATH_BENEATH = 1

ACCESS_FS_EXECUTE = 1 << 0
ACCESS_FS_WRITE_FILE = 1 << 1
ACCESS_FS_READ_FILE = 1 << 2
ACCESS_FS_READ_DIR = 1 << 3
ACCESS_FS_REMOVE_DIR = 1 << 4
ACCESS_FS_REMOVE_FILE = 1 << 5
ACCESS_FS_MAKE_CHAR = 1 << 6
ACCESS_FS_MAKE_DIR = 1 << 7
ACCESS_FS_MAKE_REG = 1 << 8
ACCESS_FS_MAKE_SOCK = 1 << 9
ACCESS_FS_MAKE_FIFO = 1 << 10
ACCESS_FS_MAKE_BLOCK = 1 << 11
ACCESS_FS_MAKE_SYM = 1 << 12
ACCESS_FS_REFER = 1 << 13  # ABI 2
ACCESS_FS_TRUNCATE = 1 << 14  # ABI 3
ACCESS_FS_IOCTL_DEV = 1 << 15  # ABI 5

ACCESS_NET_BIND_TCP = 1 << 0  # ABI 4
ACCESS_NET_CONNECT_TCP = 1 << 1  # ABI 4

SCOPE_ABSTRACT_UNIX_SOCKET = 1 << 0  # ABI 6
SCOPE_SIGNAL = 1 << 1  # ABI 6

_ACCESS_FS_V1 = (1 << 13) - 1  # EXECUTE .. MAKE_SYM
# Only these rights may be granted on a non-directory, or add_rule fails with EINVAL.
_ACCESS_FILE = (
    ACCESS_FS_EXECUTE
    | ACCESS_FS_WRITE_FILE
    | ACCESS_FS_READ_FILE
    | ACCESS_FS_TRUNCATE
    | ACCESS_FS_IOCTL_DEV
)
_GRANT_READ = ACCESS_FS_EXECUTE | ACCESS_FS_READ_FILE | ACCESS_FS_READ_DIR
# No EXECUTE on writable trees (W^X); no MAKE_CHAR/MAKE_BLOCK or IOCTL_DEV either.
_GRANT_WRITE = (
    ACCESS_FS_READ_FILE
    | ACCESS_FS_READ_DIR
    | ACCESS_FS_WRITE_FILE
    | ACCESS_FS_TRUNCATE
    | ACCESS_FS_REMOVE_DIR
    | ACCESS_FS_REMOVE_FILE
    | ACCESS_FS_MAKE_DIR
    | ACCESS_FS_MAKE_REG
    | ACCESS_FS_MAKE_SOCK
    | ACCESS_FS_MAKE_FIFO
    | ACCESS_FS_MAKE_SYM
    | ACCESS_FS_REFER
)

# linux/prctl.h
PR_SET_PDEATHSIG = 1
PR_SET_SECCOMP = 22
PR_CAPBSET_DROP = 24
PR_SET_NO_NEW_PRIVS = 38
PR_CAP_AMBIENT = 47
PR_CAP_AMBIENT_CLEAR_ALL = 4

# linux/capability.h
_LINUX_CAPABILITY_VERSION_3 = 0x20080522
_CAP_LAST_CAP_FALLBACK = 63  # every bit of the 64-bit sets, if /proc/sys is unreadable

# linux/seccomp.h
SECCOMP_MODE_FILTER = 2
SECCOMP_RET_KILL_PROCESS = 0x80000000
SECCOMP_RET_ERRNO = 0x00050000
SECCOMP_RET_ALLOW = 0x7FFF0000
SECCOMP_RET_DATA = 0x0000FFFF

# struct seccomp_data offsets: int nr; __u32 arch; __u64 instruction_pointer; __u64 args[6].
_SECCOMP_DATA_NR = 0
_SECCOMP_DATA_ARCH = 4
_SECCOMP_DATA_ARG0_LO = 16  # low 32 bits of args[0] on little-endian arches
_SECCOMP_DATA_ARG1_LO = 24  # low 32 bits of args[1]

# linux/bpf_common.h
BPF_LD = 0x00
BPF_JMP = 0x05
BPF_RET = 0x06
BPF_W = 0x00
BPF_ABS = 0x20
BPF_JEQ = 0x10
BPF_JGE = 0x30
BPF_K = 0x00

AF_UNIX = 1

# Trees that are never granted wholesale, even if they show up on sys.path.
_TOO_BROAD = frozenset({"/", "/etc", "/root", "/home", "/tmp", "/var", "/var/tmp", "/dev", "/proc"})
_SYSTEM_READ_PATHS = (
    "/usr",
    "/lib",
    "/lib64",
    "/bin",
    "/etc/ld.so.cache",
    "/etc/localtime",
    "/dev/null",
    "/dev/urandom",
    "/proc/self",
)
_PROJECT_PACKAGES = ("rt", "wire", "kernel", "nsmgr", "schemes", "redoxcap")


class ConfinementUnavailable(OSError):
    """Landlock is not available (old kernel, disabled LSM or unsupported arch)."""


@dataclass(frozen=True)
class ConfineResult:
    """What :func:`confine` applied.

    Attributes:
        abi: Landlock ABI version of the running kernel.
        filesystem: Landlock filesystem rules are enforced.
        network: Landlock denies TCP bind and connect (ABI >= 4).
        scoped: abstract Unix sockets and signals are scoped (ABI >= 6).
        seccomp: the seccomp filter (metadata, terminal ioctls, io_uring and,
            with ``deny_network``, ``socket(2)``) is installed.
    """

    abi: int
    filesystem: bool
    network: bool
    scoped: bool
    seccomp: bool


def _machine() -> str | None:
    machine = platform.machine().lower()
    machine = _MACHINE_ALIASES.get(machine, machine)
    return machine if machine in _SYSCALLS else None


_libc: ctypes.CDLL | None = None


def _libc_handle() -> ctypes.CDLL:
    global _libc
    if _libc is None:
        lib = ctypes.CDLL(None, use_errno=True)
        lib.syscall.restype = ctypes.c_long
        lib.prctl.restype = ctypes.c_int
        _libc = lib
    return _libc


def _syscall(name: str, *args: int | ctypes.c_void_p) -> int:
    """Invoke a raw syscall by name; raise OSError on failure."""
    machine = _machine()
    if machine is None:
        raise ConfinementUnavailable(
            errno.ENOSYS, f"unsupported architecture {platform.machine()!r}"
        )
    # All arguments are passed as full machine words: syscall(2) is variadic.
    cargs = [a if isinstance(a, ctypes.c_void_p) else ctypes.c_ulong(a) for a in args]
    ctypes.set_errno(0)
    ret = _libc_handle().syscall(ctypes.c_long(_SYSCALLS[machine][name]), *cargs)
    if ret < 0:
        err = ctypes.get_errno()
        raise OSError(err, f"{name}: {os.strerror(err)}")
    return ret


def _prctl(option: int, arg2: int, arg3: int = 0, arg4: int = 0, arg5: int = 0) -> None:
    ctypes.set_errno(0)
    ret = _libc_handle().prctl(
        ctypes.c_int(option),
        ctypes.c_ulong(arg2),
        ctypes.c_ulong(arg3),
        ctypes.c_ulong(arg4),
        ctypes.c_ulong(arg5),
    )
    if ret != 0:
        err = ctypes.get_errno()
        raise OSError(err, f"prctl({option}): {os.strerror(err)}")


def landlock_abi() -> int:
    """Return the Landlock ABI version of the running kernel.

    Returns:
        The ABI version (1 or more), or 0 when Landlock is not supported: kernel
        without Landlock, Landlock disabled at boot, or an architecture this
        module has no syscall numbers for.

    Raises:
        OSError: the version query failed for another reason.
    """
    if _machine() is None:
        return 0
    try:
        return _syscall(
            "landlock_create_ruleset", ctypes.c_void_p(None), 0, LANDLOCK_CREATE_RULESET_VERSION
        )
    except OSError as exc:
        # ENOSYS: not built in; EOPNOTSUPP: built in but not enabled at boot.
        if exc.errno in (errno.ENOSYS, errno.EOPNOTSUPP):
            return 0
        raise


def _handled_fs(abi: int) -> int:
    handled = _ACCESS_FS_V1
    if abi >= 2:
        handled |= ACCESS_FS_REFER
    if abi >= 3:
        handled |= ACCESS_FS_TRUNCATE
    if abi >= 5:
        handled |= ACCESS_FS_IOCTL_DEV
    return handled


def _add_path_rule(ruleset_fd: int, path: str, access: int) -> bool:
    """Grant ``access`` beneath ``path``; return False if the path does not exist."""
    try:
        fd = os.open(path, os.O_PATH | os.O_CLOEXEC)
    except (FileNotFoundError, NotADirectoryError):
        return False
    try:
        if not stat.S_ISDIR(os.fstat(fd).st_mode):
            access &= _ACCESS_FILE
        if not access:
            return True
        # struct landlock_path_beneath_attr is packed: __u64 allowed_access; __s32 parent_fd.
        attr = ctypes.create_string_buffer(struct.pack("=Qi", access, fd))
        _syscall(
            "landlock_add_rule",
            ruleset_fd,
            LANDLOCK_RULE_PATH_BENEATH,
            ctypes.c_void_p(ctypes.addressof(attr)),
            0,
        )
    except OSError as exc:
        raise OSError(exc.errno, f"landlock_add_rule({path!r}): {os.strerror(exc.errno)}") from exc
    finally:
        os.close(fd)
    return True


def _bpf_stmt(code: int, k: int) -> tuple[int, int, int, int]:
    return (code, 0, 0, k)


def _bpf_jump(code: int, k: int, jt: int, jf: int) -> tuple[int, int, int, int]:
    return (code, jt, jf, k)


def _seccomp_filter(machine: str, deny_network: bool) -> bytes:
    """Build the seccomp-BPF program as an array of struct sock_filter."""
    nrs = _SYSCALLS[machine]
    eperm = _bpf_stmt(BPF_RET | BPF_K, SECCOMP_RET_ERRNO | (errno.EPERM & SECCOMP_RET_DATA))
    allow = _bpf_stmt(BPF_RET | BPF_K, SECCOMP_RET_ALLOW)
    prog = [
        # A foreign syscall ABI (i386 or arm32 compat) would bypass the numbers below.
        _bpf_stmt(BPF_LD | BPF_W | BPF_ABS, _SECCOMP_DATA_ARCH),
        _bpf_jump(BPF_JMP | BPF_JEQ | BPF_K, _AUDIT_ARCH[machine], 1, 0),
        _bpf_stmt(BPF_RET | BPF_K, SECCOMP_RET_KILL_PROCESS),
        _bpf_stmt(BPF_LD | BPF_W | BPF_ABS, _SECCOMP_DATA_NR),
    ]
    if machine == "x86_64":
        # x32 syscalls share AUDIT_ARCH_X86_64 but use nr | 0x40000000: refuse them all.
        prog += [
            _bpf_jump(BPF_JMP | BPF_JGE | BPF_K, _X32_SYSCALL_BIT, 0, 1),
            _bpf_stmt(BPF_RET | BPF_K, SECCOMP_RET_ERRNO | (errno.ENOSYS & SECCOMP_RET_DATA)),
        ]
    for name in DENIED_SYSCALLS:
        if name in nrs:
            prog += [_bpf_jump(BPF_JMP | BPF_JEQ | BPF_K, nrs[name], 0, 1), eperm]
    ioctls = [_bpf_stmt(BPF_LD | BPF_W | BPF_ABS, _SECCOMP_DATA_ARG1_LO)]
    for request in DENIED_IOCTLS.values():
        ioctls += [_bpf_jump(BPF_JMP | BPF_JEQ | BPF_K, request, 0, 1), eperm]
    ioctls.append(allow)
    prog.append(_bpf_jump(BPF_JMP | BPF_JEQ | BPF_K, nrs["ioctl"], 0, len(ioctls)))
    prog += ioctls
    if deny_network:
        eacces = SECCOMP_RET_ERRNO | (errno.EACCES & SECCOMP_RET_DATA)
        prog += [
            _bpf_jump(BPF_JMP | BPF_JEQ | BPF_K, nrs["socket"], 0, 3),
            # The kernel reads the domain as an int, so the low 32 bits decide.
            _bpf_stmt(BPF_LD | BPF_W | BPF_ABS, _SECCOMP_DATA_ARG0_LO),
            _bpf_jump(BPF_JMP | BPF_JEQ | BPF_K, AF_UNIX, 1, 0),
            _bpf_stmt(BPF_RET | BPF_K, eacces),
        ]
    prog.append(allow)
    return b"".join(struct.pack("=HBBI", *insn) for insn in prog)


class _SockFprog(ctypes.Structure):
    _fields_ = [("len", ctypes.c_ushort), ("filter", ctypes.c_void_p)]


def _install_seccomp_filter(machine: str, deny_network: bool) -> None:
    code = _seccomp_filter(machine, deny_network)
    buf = ctypes.create_string_buffer(code, len(code))
    prog = _SockFprog(len(code) // 8, ctypes.addressof(buf))
    _prctl(PR_SET_SECCOMP, SECCOMP_MODE_FILTER, ctypes.addressof(prog))


def _cap_last_cap() -> int:
    try:
        with open("/proc/sys/kernel/cap_last_cap") as f:
            return int(f.read())
    except (OSError, ValueError):
        return _CAP_LAST_CAP_FALLBACK


def _drop_capabilities(cap_last: int) -> None:
    """Leave the calling thread, and what it execs, without any capability.

    The uid stays: a root client keeps uid 0 but loses CAP_SYS_ADMIN (TIOCSTI
    on any tty), CAP_SYS_MODULE, CAP_DAC_OVERRIDE and the rest.
    """
    if os.geteuid() == 0:
        # An empty bounding set keeps execve from handing root its caps back.
        for cap in range(cap_last + 1):
            try:
                _prctl(PR_CAPBSET_DROP, cap)
            except OSError as exc:
                if exc.errno != errno.EINVAL:  # EINVAL: a cap this kernel does not know
                    raise
    _prctl(PR_CAP_AMBIENT, PR_CAP_AMBIENT_CLEAR_ALL)
    # struct __user_cap_header_struct {u32 version; int pid}; two zeroed data structs.
    header = ctypes.create_string_buffer(struct.pack("=Ii", _LINUX_CAPABILITY_VERSION_3, 0))
    data = ctypes.create_string_buffer(24)
    _syscall(
        "capset",
        ctypes.c_void_p(ctypes.addressof(header)),
        ctypes.c_void_p(ctypes.addressof(data)),
    )


def confine(
    read_paths: Iterable[str],
    write_paths: Iterable[str] = (),
    *,
    deny_network: bool = True,
) -> ConfineResult:
    """Confine the calling thread (and what it execs) with Landlock and seccomp.

    Landlock, the seccomp filter and the capability sets apply to the calling
    thread only: call this in a single-threaded process right before ``exec``.
    The confinement cannot be undone. It does not change the session: the
    launcher (:func:`main`) does that.

    Args:
        read_paths: files and directories granted read and execute (and listing
            for directories). Paths that do not exist are skipped.
        write_paths: files and directories granted read and write, including
            creating, removing and renaming entries beneath them, but not
            execute. Paths that do not exist are skipped.
        deny_network: deny TCP bind/connect with Landlock (ABI >= 4) and make
            ``socket(2)`` fail with EACCES for every family except AF_UNIX. The
            metadata, terminal and io_uring rules apply either way.

    Returns:
        A :class:`ConfineResult` describing what was applied.

    Raises:
        ConfinementUnavailable: Landlock is not supported here; nothing was applied.
        OSError: a step failed after Landlock was found; the process may be
            partially confined and must not go on to run untrusted code.
    """
    machine = _machine()
    if machine is None:
        raise ConfinementUnavailable(
            errno.ENOSYS, f"Landlock confinement: unsupported architecture {platform.machine()!r}"
        )
    abi = landlock_abi()
    if abi < 1:
        raise ConfinementUnavailable(
            errno.EOPNOTSUPP,
            "Landlock is not available (kernel < 5.13 or the LSM is not enabled)",
        )

    handled_fs = _handled_fs(abi)
    handled_net = 0
    if deny_network and abi >= 4:
        handled_net = ACCESS_NET_BIND_TCP | ACCESS_NET_CONNECT_TCP
    scoped = SCOPE_ABSTRACT_UNIX_SOCKET | SCOPE_SIGNAL if abi >= 6 else 0
    # Pass only the struct fields this ABI knows so older kernels accept the size.
    attr_size = 8 if abi < 4 else 16 if abi < 6 else 24
    attr = ctypes.create_string_buffer(
        struct.pack("=QQQ", handled_fs, handled_net, scoped)[:attr_size], attr_size
    )

    # Read now: /proc/sys is out of reach once Landlock applies.
    cap_last = _cap_last_cap()
    ruleset_fd = _syscall(
        "landlock_create_ruleset", ctypes.c_void_p(ctypes.addressof(attr)), attr_size, 0
    )
    try:
        for path in read_paths:
            _add_path_rule(ruleset_fd, os.fspath(path), _GRANT_READ & handled_fs)
        for path in write_paths:
            _add_path_rule(ruleset_fd, os.fspath(path), _GRANT_WRITE & handled_fs)
        # Required for unprivileged restrict_self and for seccomp filters.
        _prctl(PR_SET_NO_NEW_PRIVS, 1)
        _syscall("landlock_restrict_self", ruleset_fd, 0)
    finally:
        os.close(ruleset_fd)

    _install_seccomp_filter(machine, deny_network)
    _drop_capabilities(cap_last)
    return ConfineResult(
        abi=abi,
        filesystem=True,
        network=bool(handled_net),
        scoped=bool(scoped),
        seccomp=True,
    )


def _find_spec_locations(name: str) -> list[str]:
    """Locations of a top-level package, found without importing it."""
    import importlib.util

    try:
        spec = importlib.util.find_spec(name)
    except (ImportError, ValueError):
        return []
    if spec is None:
        return []
    if spec.submodule_search_locations:
        return [str(p) for p in spec.submodule_search_locations]
    if spec.origin and os.path.isabs(spec.origin):
        return [spec.origin]
    return []


def _holds(directory: str, path: str) -> bool:
    """Whether path is directory or lies beneath it (both real paths)."""
    return path == directory or path.startswith(directory.rstrip(os.sep) + os.sep)


def _installed_roots() -> list[str]:
    """Real paths of the trees that hold the interpreter and installed packages."""
    import site

    roots = [sys.prefix, sys.base_prefix, sys.exec_prefix, sys.base_exec_prefix]
    roots += [p for p in _SYSTEM_READ_PATHS if p in ("/usr", "/lib", "/lib64", "/bin")]
    if site.ENABLE_USER_SITE:
        roots.append(site.getusersitepackages())
    return [os.path.realpath(r) for r in roots if r]


def interpreter_read_paths() -> list[str]:
    """Paths this Python interpreter needs to start and import installed packages.

    Includes the executable, the prefixes, the standard library, the ``sys.path``
    entries that lie beneath a prefix, the user site-packages or a system
    directory, a few system paths (``/usr``, ``/lib``, ``/lib64``, ``/bin``, the
    loader cache, the local time zone, ``/dev/null``, ``/dev/urandom``,
    ``/proc/self``) and the directories of the project's top-level packages.
    Never included: broad trees such as ``/``, ``/etc``, ``/root``, ``/home`` and
    ``/tmp``; any directory that is or contains the current directory or
    ``$HOME``; ``sys.path`` entries elsewhere (a source checkout, ``PYTHONPATH``
    directories), of which only the project's packages are granted.

    Returns:
        A list of absolute paths without duplicates; some may not exist
        (:func:`confine` skips those).
    """
    import sysconfig

    guarded: list[str] = []  # what must stay out of reach, with everything beneath
    try:
        guarded.append(os.path.realpath(os.getcwd()))
    except OSError:
        pass
    home = os.path.expanduser("~")
    if home and home != "~":
        guarded.append(os.path.realpath(home))
    roots = _installed_roots()

    out: list[str] = []
    seen: set[str] = set()

    def add(path: str | None, *, check: bool = True) -> None:
        if not path or not os.path.isabs(path):
            return
        path = os.path.normpath(path)
        real = os.path.realpath(path)
        if check and (
            path in _TOO_BROAD or real in _TOO_BROAD or any(_holds(real, g) for g in guarded)
        ):
            return
        if path not in seen:
            seen.add(path)
            out.append(path)

    if sys.executable:
        add(sys.executable)
        add(os.path.realpath(sys.executable))
    for prefix in (sys.prefix, sys.base_prefix, sys.exec_prefix, sys.base_exec_prefix):
        add(prefix)
    for key in ("stdlib", "platstdlib", "purelib", "platlib"):
        add(sysconfig.get_path(key))
    add(os.path.dirname(os.__file__))
    for entry in sys.path:
        # "" is the current directory; a checkout or PYTHONPATH entry may hold anything.
        if entry and os.path.exists(entry):
            real = os.path.realpath(entry)
            if any(_holds(root, real) for root in roots):
                add(os.path.abspath(entry))
    for name in _PROJECT_PACKAGES:
        for location in _find_spec_locations(name):
            add(location)
    for path in _SYSTEM_READ_PATHS:
        add(path, check=False)
    return out


_PYTHON_NAME = re.compile(r"python(3(\.[0-9]+)?)?")
_PYTHON_FLAGS = frozenset("bBdEhiIOPqRsSuvVx?")  # interpreter options without a value


def python_script(command: Sequence[str]) -> str | None:
    """The script file a Python interpreter command runs, or None.

    ``python [options] script.py args`` runs ``script.py``; ``-c``, ``-m``, ``-``
    (stdin) and other programs run no script file, and their arguments are
    data that the program must reach through its capabilities.

    Args:
        command: an argv whose first element names the program.

    Returns:
        The absolute path of the script when ``command[0]`` is named ``python``,
        ``python3`` or ``python3.X`` and its first argument after the
        interpreter's options is an existing regular file; otherwise None.
    """
    if not command or not _PYTHON_NAME.fullmatch(os.path.basename(command[0])):
        return None
    args = iter(command[1:])
    script = None
    for arg in args:
        if arg == "--":
            script = next(args, None)
            break
        if arg == "--check-hash-based-pycs":
            next(args, None)
            continue
        if arg.startswith("--check-hash-based-pycs="):
            continue
        if arg.startswith("--") or arg == "-":
            return None  # --help, --version ... or a script read from stdin
        if not arg.startswith("-"):
            script = arg
            break
        for i, flag in enumerate(arg[1:], 1):
            if flag in "WX":  # the value is the rest of the argument, or the next one
                if i == len(arg) - 1:
                    next(args, None)
                break
            if flag not in _PYTHON_FLAGS:  # -c, -m or an option Python refuses
                return None
    if script is None or not os.path.isfile(script):
        return None
    return os.path.abspath(script)


def _resolve_command(command: str) -> str | None:
    """Resolve ``command`` like execvp does; return its real path or None."""
    if os.sep in command:
        candidates: Sequence[str] = [command]
    else:
        candidates = [os.path.join(d or os.curdir, command) for d in os.get_exec_path()]
    for candidate in candidates:
        if os.path.isfile(candidate) and os.access(candidate, os.X_OK):
            return os.path.realpath(candidate)
    return None


def _controlling_tty() -> int:
    """The device number of this process's controlling terminal, 0 for none."""
    with open("/proc/self/stat") as f:
        # Fields after "(comm)": state ppid pgrp session tty_nr ...
        return int(f.read().rpartition(")")[2].split()[4])


def leave_terminal() -> None:
    """Run from now on in a new session without a controlling terminal.

    A process without a controlling terminal cannot TIOCSTI into the caller's
    terminal (without CAP_SYS_ADMIN) and gets no job-control signals from it.

    Raises:
        OSError: EPERM when this process leads a process group (setsid(2)
            refuses) or leads a session that has a controlling terminal; start
            it with ``setsid`` or ``start_new_session=True`` instead.
    """
    if os.getsid(0) != os.getpid():
        os.setsid()
    elif _controlling_tty() != 0:
        raise OSError(errno.EPERM, "this session leader has a controlling terminal")


def die_with_parent(parent: int) -> None:
    """Have the kernel SIGKILL this process (and what it execs) when parent dies.

    In a session of its own, the client no longer gets the terminal's hangup;
    this keeps it from outliving the ``redoxcap run`` that started it.

    Args:
        parent: the pid this process had as its parent when it started.

    Raises:
        OSError: ESRCH when parent has already died.
    """
    _prctl(PR_SET_PDEATHSIG, signal.SIGKILL)
    if os.getppid() != parent:  # it died before the prctl took effect
        raise OSError(errno.ESRCH, "the parent process has already exited")


def _parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="python -m redoxcap.confine",
        description="Confine with Landlock and seccomp, then exec COMMAND.",
    )
    parser.add_argument(
        "--read",
        action="append",
        default=[],
        metavar="PATH",
        help="grant read+execute beneath PATH",
    )
    parser.add_argument(
        "--write", action="append", default=[], metavar="PATH", help="grant read+write beneath PATH"
    )
    parser.add_argument(
        "--no-network-deny",
        dest="deny_network",
        action="store_false",
        help="do not restrict TCP or socket(2) (metadata and terminal rules stay)",
    )
    parser.add_argument(
        "--require",
        action="store_true",
        help="exit 126 instead of running unconfined when Landlock is unavailable",
    )
    parser.add_argument("command", nargs=argparse.REMAINDER, help="-- COMMAND ARGS...")
    return parser


def main(argv: Sequence[str] | None = None) -> int:
    """Launcher: confine this process, leave the terminal, then exec COMMAND.

    COMMAND keeps every inherited fd but runs in a new session without a
    controlling terminal (see :func:`leave_terminal`), and is killed when the
    process that started the launcher dies (see :func:`die_with_parent`).

    Args:
        argv: arguments without the program name; defaults to ``sys.argv[1:]``.

    Returns:
        An exit status, only when COMMAND was not executed: 126 when confinement
        is required but unavailable or failed or no new session could be
        started, 127 when COMMAND is not found,
        2 on a usage error. On success this function does not return.
    """
    parent = os.getppid()
    args = _parser().parse_args(list(sys.argv[1:] if argv is None else argv))
    command = list(args.command)
    if command and command[0] == "--":
        command = command[1:]
    if not command:
        print("confine: no COMMAND given (usage: ... -- COMMAND ARGS...)", file=sys.stderr)
        return 2
    executable = _resolve_command(command[0])
    if executable is None:
        print(f"confine: {command[0]}: command not found", file=sys.stderr)
        return 127

    # The executable file itself, never its directory (`./tool` in $HOME).
    reads = interpreter_read_paths() + list(args.read) + [executable]
    try:
        confine(reads, list(args.write), deny_network=args.deny_network)
    except ConfinementUnavailable as exc:
        if args.require:
            print(f"confine: error: {exc.strerror}; refusing to run unconfined", file=sys.stderr)
            return 126
        print(f"confine: warning: {exc.strerror}; running unconfined", file=sys.stderr)
    except OSError as exc:
        # Partially applied confinement is never a reason to run the client anyway.
        print(f"confine: error: confinement failed: {exc}", file=sys.stderr)
        return 126
    try:
        leave_terminal()
    except OSError as exc:
        # A client in the caller's session could push keystrokes into its terminal.
        print(f"confine: error: cannot start a new session: {exc.strerror}", file=sys.stderr)
        return 126
    try:
        die_with_parent(parent)
    except OSError as exc:
        print(f"confine: error: {exc.strerror}", file=sys.stderr)
        return 126
    sys.stdout.flush()
    sys.stderr.flush()
    try:
        # execvp keeps every fd that is not close-on-exec; nothing is closed here.
        os.execvp(command[0], command)
    except OSError as exc:
        print(f"confine: exec {command[0]}: {exc.strerror}", file=sys.stderr)
        return 126
    return 126  # unreachable: execvp does not return on success


if __name__ == "__main__":
    sys.exit(main())
