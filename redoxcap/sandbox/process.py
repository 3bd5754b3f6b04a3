"""What the confined process gives up besides files and network: capabilities, the caller's
terminal session, and a life beyond the process that started it.
"""

from __future__ import annotations

import ctypes
import errno
import functools
import os
import signal
import struct

from redoxcap.wire import linux

# linux/capability.h
_LINUX_CAPABILITY_VERSION_3 = 0x20080522
_CAP_LAST_CAP_FALLBACK = 63  # every bit of the 64-bit sets, if /proc/sys is unreadable


@functools.cache
def cap_last_cap() -> int:
    """The highest capability number this kernel knows (read it before Landlock hides /proc/sys;
    read once per process, and before the fork server forks runs)."""
    try:
        with open("/proc/sys/kernel/cap_last_cap") as f:
            return int(f.read())
    except (OSError, ValueError):
        return _CAP_LAST_CAP_FALLBACK


def drop_capabilities(cap_last: int) -> None:
    """Leave the calling thread, and what it execs, without any capability.

    The uid stays: a root client keeps uid 0 but loses CAP_SYS_ADMIN (TIOCSTI
    on any tty), CAP_SYS_MODULE, CAP_DAC_OVERRIDE and the rest.

    Args:
        cap_last: :func:`cap_last_cap`, read before confinement.

    Raises:
        OSError: prctl or capset failed.
    """
    if os.geteuid() == 0:
        # An empty bounding set keeps execve from handing root its caps back (libc's prctl
        # called here as linux.prctl calls it, without its per-call set-up: 41 calls)
        prctl, drop, zero = linux.libc().prctl, ctypes.c_int(linux.PR_CAPBSET_DROP), ctypes.c_ulong(0)
        for cap in range(cap_last + 1):
            if prctl(drop, ctypes.c_ulong(cap), zero, zero, zero) != 0:
                err = ctypes.get_errno()
                if err != errno.EINVAL:  # EINVAL: a cap this kernel does not know
                    raise OSError(err, f"prctl(PR_CAPBSET_DROP, {cap}): {os.strerror(err)}")
    linux.prctl(linux.PR_CAP_AMBIENT, linux.PR_CAP_AMBIENT_CLEAR_ALL)
    # struct __user_cap_header_struct {u32 version; int pid}; two zeroed data structs.
    header = bytearray(struct.pack("=Ii", _LINUX_CAPABILITY_VERSION_3, 0))
    linux.syscall("capset", header, bytes(24))


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
    linux.prctl(linux.PR_SET_PDEATHSIG, signal.SIGKILL)
    if os.getppid() != parent:  # it died before the prctl took effect
        raise OSError(errno.ESRCH, "the parent process has already exited")


def close_fds_except(keep: set[int]) -> None:
    """Close every fd of this process but those in keep (close_range, gap by gap)."""
    low = 0
    for fd in sorted(keep):
        if fd > low:
            os.closerange(low, fd)
        low = max(low, fd + 1)
    os.closerange(low, 2**31 - 1)
