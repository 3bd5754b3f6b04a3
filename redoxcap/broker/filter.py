"""The broker's seccomp filter: the sandbox's allow-list, with every path call for the broker.

The filter is the ``brokered`` form of the one list in
redoxcap/sandbox/syscalls.py: every syscall that names a path (and fstat,
getdents64 and execve) returns SECCOMP_RET_USER_NOTIF, so no lookup of the
target's ever runs in the kernel; forks are native (redoxcap/broker/state.py);
everything else is allowed, checked or refused there, exactly as for a
program confined without the broker. In a run that grants udp, UDP sockets
may be made and every send that can name a destination is the broker's too
(the list's ``brokered-udp`` mode); other runs keep every send native. The filter is inherited by threads and
children and survives execve; with no broker left on the listener, a trapped
call fails with ENOSYS (fail closed).
"""

from __future__ import annotations

import ctypes
import errno
import functools
import os
import sys

from redoxcap.sandbox import seccomp
from redoxcap.sandbox import syscalls as S
from redoxcap.wire import linux

BROKERED = S.brokered_names()


def program(machine: str, *, signals_scoped: bool = True, udp: bool = False,
            self_pid: int | None = None) -> bytes:
    """The filter for machine ("x86_64" or "aarch64") as an array of struct sock_filter
    (udp: for a run that grants udp) for the process self_pid (default: the caller, which
    exec keeps): its "own pid" in the argument checks. Compiled once per process (the
    runner's come warm from the fork server, redoxcap/runner.py) and given the pid here:
    a filter compiled in the fork server must not name the fork server as the program's
    own process (prlimit64, setpriority, sched_set*, ioprio_set, and the kill family where
    Landlock has no signal scope, would reach it)."""
    code, places = _compiled(machine, signals_scoped, udp)
    pid = (os.getpid() if self_pid is None else self_pid).to_bytes(4, sys.byteorder)
    out = bytearray(code)
    for at in places:
        out[at + 4:at + 8] = pid  # struct sock_filter: u16 code, u8 jt, u8 jf, u32 k
    return bytes(out)


@functools.cache
def _compiled(machine: str, signals_scoped: bool, udp: bool) -> tuple[bytes, tuple[int, ...]]:
    """The filter compiled for a placeholder pid, and the byte offsets of the instructions
    that compare an argument with the program's own pid (found as the instructions that
    differ between two compilations for two pids)."""
    mode = S.BROKERED_UDP if udp else S.BROKERED
    one, two = (seccomp.filter_program(machine, mode, deny_network=True,
                                       signals_scoped=signals_scoped, self_pid=pid)
                for pid in (_PLACEHOLDER, _PLACEHOLDER + 1))
    places = tuple(at for at in range(0, len(one), 8) if one[at:at + 8] != two[at:at + 8])
    return one, places


_PLACEHOLDER = 0x7FFF_0000  # above any pid (PID_MAX_LIMIT is 2**22)


class _SockFprog(ctypes.Structure):
    _fields_ = [("len", ctypes.c_ushort), ("filter", ctypes.c_void_p)]


def install(machine: str, *, signals_scoped: bool = True, udp: bool = False) -> int:
    """Install the filter on the calling thread and return the new listener fd.

    The caller must have set PR_SET_NO_NEW_PRIVS (or hold CAP_SYS_ADMIN), and
    must be single-threaded: the filter applies to this thread and what it
    starts or execs.

    Raises:
        OSError: EBUSY when a filter with a listener is already installed (no
            nesting), EINVAL/ENOSYS where the kernel lacks user notification.
    """
    code = program(machine, signals_scoped=signals_scoped, udp=udp)
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
