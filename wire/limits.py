"""Resource limits every process of the system sets for itself at start."""

from __future__ import annotations

import resource

from redoxcap.wire import linux


def raise_fd_limit() -> int:
    """Raise this process's soft RLIMIT_NOFILE to its hard limit.

    Returns:
        The soft limit now in force (unchanged if Linux refused to raise it).
    """
    soft, hard = resource.getrlimit(resource.RLIMIT_NOFILE)
    if hard == resource.RLIM_INFINITY:
        # Linux caps RLIMIT_NOFILE at fs.nr_open; "infinity" is refused with EPERM
        try:
            with open("/proc/sys/fs/nr_open") as f:
                hard = int(f.read())
        except (OSError, ValueError):
            return soft
    if soft >= hard:
        return soft
    try:
        # a daemon serves many clients: running out of fds must be one client's error
        resource.setrlimit(resource.RLIMIT_NOFILE, (hard, resource.getrlimit(resource.RLIMIT_NOFILE)[1]))
    except (ValueError, OSError):
        return soft
    return hard


def forbid_core_dumps() -> None:
    """Make this process undumpable, with a hard core limit of 0, for the rest of its life.

    A daemon's memory holds other clients' data: no signal a client can cause (a CPU limit
    raised on it, a crash) may write it to a core file, and a process of the same uid without
    capabilities (a sandboxed one) can neither ptrace it nor read its /proc/PID files.
    """
    resource.setrlimit(resource.RLIMIT_CORE, (0, 0))
    linux.prctl(linux.PR_SET_DUMPABLE, 0)
