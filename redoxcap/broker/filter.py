"""The broker's seccomp filter: which syscalls the broker answers, which are refused.

Every syscall that names a path is handed to the broker
(SECCOMP_RET_USER_NOTIF), so no lookup of the target's ever runs in the
kernel; the calls that would go around a path broker (io_uring, file
handles, another process's memory or fds, mounts, new namespaces) and the
metadata changes the capability protocol has no operation for are refused in
the filter itself (SECCOMP_RET_ERRNO), which costs nothing at run time.
Everything else runs natively. The filter is inherited by threads and
children and survives execve; with no broker left on the listener, a
trapped call fails with ENOSYS (fail closed).

A self-contained BPF builder, kept small on purpose (it will share
redoxcap/sandbox/seccomp.py's one day). x86_64 and aarch64; aarch64 lacks
the legacy non-*at calls, whose names are skipped.
"""

from __future__ import annotations

import ctypes
import errno
import socket
import struct

from wire import linux

# Metadata changes the broker serves through the capabilities (CHMODAT, UTIMENSAT, CHOWNAT).
METADATA = (
    "chmod", "fchmod", "fchmodat", "fchmodat2", "chown", "fchown", "lchown", "fchownat",
    "utime", "utimes", "futimesat", "utimensat",
)
# Socket calls the broker performs itself on its own copy of the socket, within the grants.
SOCKET_CALLS = ("bind", "connect", "listen")
# Trapped: the broker reads their arguments once and answers them (handlers.py).
BROKERED = (
    "open", "openat", "openat2", "creat", "stat", "lstat", "newfstatat", "fstat", "statx",
    "access", "faccessat", "faccessat2", "readlink", "readlinkat", "getdents64", "mkdir",
    "mkdirat", "unlink", "unlinkat", "rmdir", "rename", "renameat", "renameat2", "link",
    "linkat", "symlink", "symlinkat", "truncate", "chdir", "fchdir", "getcwd", "execve",
    "execveat", "fork", "vfork", *METADATA, *SOCKET_CALLS,
)
XATTRS = (
    "getxattr", "lgetxattr", "listxattr", "llistxattr", "getxattrat", "listxattrat",
    "file_getattr", "setxattr", "lsetxattr", "fsetxattr", "removexattr", "lremovexattr",
    "fremovexattr", "setxattrat", "removexattrat", "file_setattr",
)
# What the sandbox's own filter (redoxcap/sandbox/seccomp.py, installed first, whose ERRNO
# would win over this filter's USER_NOTIF) leaves to this one: the calls above and socket(2),
# which this filter checks itself, and the xattr calls, which it refuses as "not supported".
LEFT_TO_BROKER = frozenset({*METADATA, *SOCKET_CALLS, *XATTRS, "socket"})
# Refused in the filter, by errno.
REFUSED: dict[int, tuple[str, ...]] = {
    # metadata the protocol cannot change, and what only an administrator does
    errno.EPERM: (
        "mknod", "mknodat", "mount", "umount2", "pivot_root", "chroot", "acct",
        "swapon", "swapoff", "quotactl", "quotactl_fd", "uselib", "open_tree", "open_tree_attr",
        "move_mount", "fsopen", "fsconfig", "fsmount", "fspick", "mount_setattr", "bpf",
        "unshare", "setns",
        # around a path broker: file handles, another process's memory and fds; and
        # userfaultfd, which could hold the broker in a fault while it reads an argument
        "name_to_handle_at", "open_by_handle_at", "ptrace", "process_vm_readv",
        "process_vm_writev", "pidfd_getfd", "userfaultfd",
    ),
    # path calls with no capability operation behind them: "not supported here"
    errno.EACCES: ("inotify_add_watch", "fanotify_mark"),
    # the protocol has no xattrs: "not supported here" (cp -a and tar fall back to chmod)
    errno.ENOTSUP: XATTRS,
    # ENOSYS makes libraries fall back: io_uring to plain calls, clone3 to clone
    errno.ENOSYS: ("io_uring_setup", "io_uring_enter", "io_uring_register", "clone3",
                   "getdents", "statfs"),
}
# clone(2) flags that make a new namespace (a user namespace grants mount rights in it).
CLONE_NEW_NAMESPACES = 0x7E02_0080
CLONE_THREAD = 0x0001_0000
_SOCK_TYPE_MASK = 0xF  # the type without SOCK_NONBLOCK / SOCK_CLOEXEC
# AF_UNIX types whose sendmsg cannot name an address: a datagram socket could send to any
# named socket on the host, which Landlock does not mediate.
_UNIX_TYPES_ALLOWED = (socket.SOCK_STREAM, socket.SOCK_SEQPACKET)
# TCP only (protocol 0 or IPPROTO_TCP): the broker binds and connects it within the grants.
# Not UDP (a datagram's sendto/sendmsg names any address, in memory the filter cannot read),
# not SCTP or MPTCP (a sendmsg may connect), not raw or netlink sockets.
_INET_FAMILIES = (socket.AF_INET, socket.AF_INET6)
_TCP_PROTOCOLS = (0, socket.IPPROTO_TCP)
# sendto/sendmsg/sendmmsg with MSG_FASTOPEN connect a TCP socket without connect(2).
MSG_FASTOPEN = 0x2000_0000
_SEND_FLAGS_ARG = {"sendto": 3, "sendmsg": 2, "sendmmsg": 3}

# linux/bpf_common.h and linux/filter.h
_LD_W_ABS = 0x00 | 0x00 | 0x20
_ALU_AND_K = 0x04 | 0x50
_JEQ_K = 0x05 | 0x10
_JGE_K = 0x05 | 0x30
_JSET_K = 0x05 | 0x40
_RET_K = 0x06
_TAX, _TXA = 0x07 | 0x00, 0x07 | 0x80
_DATA_NR, _DATA_ARCH, _DATA_ARG0, _DATA_ARG1 = 0, 4, 16, 24  # low words (little-endian)
_DATA_ARG2 = 32


def _stmt(code: int, k: int) -> tuple[int, int, int, int]:
    return (code, 0, 0, k)


def _jump(code: int, k: int, jt: int, jf: int) -> tuple[int, int, int, int]:
    return (code, jt, jf, k)


def _ret_errno(err: int) -> tuple[int, int, int, int]:
    return _stmt(_RET_K, linux.SECCOMP_RET_ERRNO | err)


def program(machine: str) -> bytes:
    """The filter for machine ("x86_64" or "aarch64") as an array of struct sock_filter."""
    nrs = linux.SYSCALLS[machine]
    notify = _stmt(_RET_K, linux.SECCOMP_RET_USER_NOTIF)
    allow = _stmt(_RET_K, linux.SECCOMP_RET_ALLOW)
    prog = [
        # A foreign syscall ABI (i386, arm32) has other numbers: none of it runs.
        _stmt(_LD_W_ABS, _DATA_ARCH),
        _jump(_JEQ_K, linux.AUDIT_ARCH[machine], 1, 0),
        _stmt(_RET_K, linux.SECCOMP_RET_KILL_PROCESS),
        _stmt(_LD_W_ABS, _DATA_NR),
    ]
    if machine == "x86_64":
        prog += [_jump(_JGE_K, linux.X32_SYSCALL_BIT, 0, 1), _ret_errno(errno.ENOSYS)]
    # clone: a new namespace is EPERM; a thread runs; a new process goes by the broker, which
    # notes the parent's cwd for it (arg0 is the flags on both machines)
    prog += [
        _jump(_JEQ_K, nrs["clone"], 0, 6),
        _stmt(_LD_W_ABS, _DATA_ARG0),
        _jump(_JSET_K, CLONE_NEW_NAMESPACES, 0, 1),
        _ret_errno(errno.EPERM),
        _jump(_JSET_K, CLONE_THREAD, 0, 1),
        allow,
        notify,
    ]
    for name in BROKERED:
        if name in nrs:
            prog += [_jump(_JEQ_K, nrs[name], 0, 1), notify]
    for err, names in REFUSED.items():
        for name in names:
            if name in nrs:
                prog += [_jump(_JEQ_K, nrs[name], 0, 1), _ret_errno(err)]
    eacces = _ret_errno(errno.EACCES)
    prog += [  # socketpair: AF_UNIX streams only
        _jump(_JEQ_K, nrs["socketpair"], 0, 8),
        _stmt(_LD_W_ABS, _DATA_ARG0),
        _jump(_JEQ_K, socket.AF_UNIX, 0, 5),
        _stmt(_LD_W_ABS, _DATA_ARG1),
        _stmt(_ALU_AND_K, _SOCK_TYPE_MASK),
        _jump(_JEQ_K, _UNIX_TYPES_ALLOWED[0], 2, 0),
        _jump(_JEQ_K, _UNIX_TYPES_ALLOWED[1], 1, 0),
        eacces,
        _stmt(_LD_W_ABS, _DATA_NR),
    ]
    prog += [  # socket: AF_UNIX streams, and TCP over IPv4/IPv6 (block of 18)
        _jump(_JEQ_K, nrs["socket"], 0, 17),
        _stmt(_LD_W_ABS, _DATA_ARG1),
        _stmt(_ALU_AND_K, _SOCK_TYPE_MASK),
        _stmt(_TAX, 0),  # X = the type
        _stmt(_LD_W_ABS, _DATA_ARG0),  # A = the family
        _jump(_JEQ_K, socket.AF_UNIX, 0, 3),
        _stmt(_TXA, 0),
        _jump(_JEQ_K, _UNIX_TYPES_ALLOWED[0], 9, 0),
        _jump(_JEQ_K, _UNIX_TYPES_ALLOWED[1], 8, 7),
        _jump(_JEQ_K, _INET_FAMILIES[0], 1, 0),
        _jump(_JEQ_K, _INET_FAMILIES[1], 0, 5),
        _stmt(_TXA, 0),
        _jump(_JEQ_K, socket.SOCK_STREAM, 0, 3),
        _stmt(_LD_W_ABS, _DATA_ARG2),  # the protocol
        _jump(_JEQ_K, _TCP_PROTOCOLS[0], 2, 0),
        _jump(_JEQ_K, _TCP_PROTOCOLS[1], 1, 0),
        eacces,
        allow,
    ]
    for name, arg in _SEND_FLAGS_ARG.items():
        if name in nrs:
            prog += [
                _jump(_JEQ_K, nrs[name], 0, 4),
                _stmt(_LD_W_ABS, _DATA_ARG0 + 8 * arg),
                _jump(_JSET_K, MSG_FASTOPEN, 0, 1),
                eacces,
                _stmt(_LD_W_ABS, _DATA_NR),
            ]
    prog.append(allow)
    return b"".join(struct.pack("=HBBI", *insn) for insn in prog)


class _SockFprog(ctypes.Structure):
    _fields_ = [("len", ctypes.c_ushort), ("filter", ctypes.c_void_p)]


def install(machine: str) -> int:
    """Install the filter on the calling thread and return the new listener fd.

    The caller must have set PR_SET_NO_NEW_PRIVS (or hold CAP_SYS_ADMIN), and
    must be single-threaded: the filter applies to this thread and what it
    starts or execs.

    Raises:
        OSError: EBUSY when a filter with a listener is already installed (no
            nesting), EINVAL/ENOSYS where the kernel lacks user notification.
    """
    code = program(machine)
    buf = ctypes.create_string_buffer(code, len(code))
    fprog = _SockFprog(len(code) // 8, ctypes.addressof(buf))
    flags = linux.SECCOMP_FILTER_FLAG_NEW_LISTENER | linux.SECCOMP_FILTER_FLAG_WAIT_KILLABLE_RECV
    try:
        return linux.syscall("seccomp", linux.SECCOMP_SET_MODE_FILTER, flags,
                             ctypes.c_void_p(ctypes.addressof(fprog)))
    except OSError as exc:
        if exc.errno != errno.EINVAL:
            raise
    # kernels before 6.0 know no WAIT_KILLABLE_RECV: a signal may then restart a call
    return linux.syscall("seccomp", linux.SECCOMP_SET_MODE_FILTER,
                         linux.SECCOMP_FILTER_FLAG_NEW_LISTENER,
                         ctypes.c_void_p(ctypes.addressof(fprog)))
