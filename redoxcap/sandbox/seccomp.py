"""The seccomp-BPF filter: what Landlock does not mediate, refused by syscall number.

A tiny BPF assembler (:func:`bpf_stmt`, :func:`bpf_jump`) and the one filter
built with it (:func:`filter_program`): metadata changes (chmod, chown,
utime, xattrs in every form), io_uring, the terminal and inode-flag ioctls,
and, with ``deny_network``, ``socket(2)`` for every family but AF_UNIX.
Syscalls of a foreign ABI (i386, arm32, x32) are refused outright, because
their numbers differ from the ones checked here.
"""

from __future__ import annotations

import errno
import struct

from wire import linux

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

# linux/audit.h: EM_X86_64 (62) / EM_AARCH64 (183) | __AUDIT_ARCH_64BIT | __AUDIT_ARCH_LE.
_AUDIT_ARCH_64BIT = 0x80000000
_AUDIT_ARCH_LE = 0x40000000
AUDIT_ARCH = {
    "x86_64": 62 | _AUDIT_ARCH_64BIT | _AUDIT_ARCH_LE,  # 0xC000003E
    "aarch64": 183 | _AUDIT_ARCH_64BIT | _AUDIT_ARCH_LE,  # 0xC00000B7
}
_X32_SYSCALL_BIT = 0x40000000  # asm/unistd.h on x86_64

# linux/seccomp.h
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

Instruction = tuple[int, int, int, int]  # struct sock_filter: code, jt, jf, k


def bpf_stmt(code: int, k: int) -> Instruction:
    """A BPF statement (BPF_STMT in linux/filter.h)."""
    return (code, 0, 0, k)


def bpf_jump(code: int, k: int, jt: int, jf: int) -> Instruction:
    """A BPF conditional jump: jt or jf instructions ahead (BPF_JUMP in linux/filter.h)."""
    return (code, jt, jf, k)


def _ret_errno(err: int) -> Instruction:
    return bpf_stmt(BPF_RET | BPF_K, SECCOMP_RET_ERRNO | (err & SECCOMP_RET_DATA))


def filter_program(arch: str, deny_network: bool,
                   left_to_broker: frozenset[str] = frozenset()) -> bytes:
    """The filter for arch (a key of wire.linux.SYSCALLS) as an array of struct sock_filter.

    Args:
        arch: the machine the filter runs on.
        deny_network: also refuse ``socket(2)`` (EACCES) for every family but AF_UNIX.
        left_to_broker: syscalls not refused here because a broker's filter, installed
            after this one, answers them (an ERRNO here would win over its USER_NOTIF);
            "socket" leaves the socket(2) check to it too.

    Returns:
        The program, 8 bytes per instruction.
    """
    nrs = linux.SYSCALLS[arch]
    eperm = _ret_errno(errno.EPERM)
    allow = bpf_stmt(BPF_RET | BPF_K, SECCOMP_RET_ALLOW)
    prog = [
        # A foreign syscall ABI (i386 or arm32 compat) would bypass the numbers below.
        bpf_stmt(BPF_LD | BPF_W | BPF_ABS, _SECCOMP_DATA_ARCH),
        bpf_jump(BPF_JMP | BPF_JEQ | BPF_K, AUDIT_ARCH[arch], 1, 0),
        bpf_stmt(BPF_RET | BPF_K, SECCOMP_RET_KILL_PROCESS),
        bpf_stmt(BPF_LD | BPF_W | BPF_ABS, _SECCOMP_DATA_NR),
    ]
    if arch == "x86_64":
        # x32 syscalls share AUDIT_ARCH_X86_64 but use nr | 0x40000000: refuse them all.
        prog += [
            bpf_jump(BPF_JMP | BPF_JGE | BPF_K, _X32_SYSCALL_BIT, 0, 1),
            _ret_errno(errno.ENOSYS),
        ]
    for name in DENIED_SYSCALLS:
        if name in nrs and name not in left_to_broker:
            prog += [bpf_jump(BPF_JMP | BPF_JEQ | BPF_K, nrs[name], 0, 1), eperm]
    ioctls = [bpf_stmt(BPF_LD | BPF_W | BPF_ABS, _SECCOMP_DATA_ARG1_LO)]
    for request in DENIED_IOCTLS.values():
        ioctls += [bpf_jump(BPF_JMP | BPF_JEQ | BPF_K, request, 0, 1), eperm]
    ioctls.append(allow)
    prog.append(bpf_jump(BPF_JMP | BPF_JEQ | BPF_K, nrs["ioctl"], 0, len(ioctls)))
    prog += ioctls
    if deny_network and "socket" not in left_to_broker:
        prog += [
            bpf_jump(BPF_JMP | BPF_JEQ | BPF_K, nrs["socket"], 0, 3),
            # The kernel reads the domain as an int, so the low 32 bits decide.
            bpf_stmt(BPF_LD | BPF_W | BPF_ABS, _SECCOMP_DATA_ARG0_LO),
            bpf_jump(BPF_JMP | BPF_JEQ | BPF_K, AF_UNIX, 1, 0),
            _ret_errno(errno.EACCES),
        ]
    prog.append(allow)
    return b"".join(struct.pack("=HBBI", *insn) for insn in prog)


def install(arch: str, deny_network: bool, left_to_broker: frozenset[str] = frozenset()) -> None:
    """Install :func:`filter_program` on the calling thread (needs no_new_privs).

    Raises:
        OSError: Linux refused the filter.
    """
    linux.set_seccomp_filter(filter_program(arch, deny_network, left_to_broker))
