"""The brokered syscalls, by family, and the one table that dispatches them.

Which syscalls the filter hands to the broker is decided once, by the
`brokered` column of redoxcap/sandbox/syscalls.py (`brokered_names()`).
Each family module answers a group of them (one method per syscall, marked
`@syscall`); `Syscalls` builds the dispatch table from the families, and a
brokered syscall no family answers, or a handler for one the filter never
hands over, fails at import (and at construction, for other families).

    base.py         Call, the answers (Install, PROCEED), Family and @syscall
    program.py      what the broker holds for the program it serves
    locate.py       where a path goes (a capability and a path, or a host path)
    view.py         symlinks and `..` in a handed directory, as the program sees them
    native.py       lookups beneath a host directory its file scheme handed over (HOSTDIR)
    opening.py      open, creat, openat, openat2
    status.py       stat, lstat, newfstatat, fstat, statx, access, readlink
    directories.py  getdents64, getcwd, chdir, fchdir
    names.py        mkdir, unlink, rmdir, symlink, truncate
    two_paths.py    rename, link
    metadata.py     chmod, utime, chown
    processes.py    execve, execveat
    sockets.py      bind, connect, listen; sendto, sendmsg, sendmmsg where udp is granted
"""

from __future__ import annotations

import os
from collections.abc import Iterable, Sequence
from typing import Any

from redoxcap.broker.calls.base import PROCEED, Call, Family, Handler, Install
from redoxcap.broker.calls.directories import Directories
from redoxcap.broker.calls.metadata import Metadata
from redoxcap.broker.calls.names import Names
from redoxcap.broker.calls.opening import Opening
from redoxcap.broker.calls.processes import Processes as ProcessCalls
from redoxcap.broker.calls.program import Program
from redoxcap.broker.calls.sockets import Sockets
from redoxcap.broker.calls.status import Status
from redoxcap.broker.calls.two_paths import TwoPaths
from redoxcap.broker.hostfs import HostTrees
from redoxcap.broker.state import Mount, Processes
from redoxcap.sandbox.syscalls import brokered_names
from redoxcap.wire import linux

FAMILIES: tuple[type[Family], ...] = (Opening, Status, Directories, Names, TwoPaths, Metadata,
                                      ProcessCalls, Sockets)


class HandlerTableError(Exception):
    """The families do not answer exactly the syscalls the filter hands to the broker."""


def check_families(families: Iterable[type[Family]], brokered: frozenset[str]) -> None:
    """Fail unless the families answer each brokered syscall exactly once and nothing else.

    Raises:
        HandlerTableError: naming the syscalls missing, handled twice, or not brokered.
    """
    seen: dict[str, str] = {}
    twice = []
    for family in families:
        for name in family.handles:
            if name in seen:
                twice.append(f"{name} ({seen[name]} and {family.__name__})")
            seen[name] = family.__name__
    missing, extra = sorted(brokered - seen.keys()), sorted(seen.keys() - brokered)
    problems = ([f"brokered but not handled: {', '.join(missing)}"] if missing else []) + \
        ([f"handled but never brokered: {', '.join(extra)}"] if extra else []) + \
        ([f"handled twice: {', '.join(twice)}"] if twice else [])
    if problems:
        raise HandlerTableError("; ".join(problems) + " (redoxcap/sandbox/syscalls.py decides)")


check_families(FAMILIES, brokered_names())  # at import: a filter and a dispatch that disagree never run


class Syscalls:
    """The dispatch table of one broker: handlers by syscall number, over one Program."""

    def __init__(self, machine: str, ns: int, hosts: HostTrees, processes: Processes,
                 passthrough: bool, mounts: Sequence[Mount] = (), grants: Any = None,
                 families: Sequence[type[Family]] = FAMILIES, directfs_grant: int | None = None
                 ) -> None:
        """Build the table of handlers, by syscall number for machine.

        Args:
            machine: "x86_64" or "aarch64" (struct layouts, syscall numbers).
            ns: the namespace capability (the broker's own).
            hosts: the read-only host trees.
            processes: the per-process state.
            passthrough: ask schemes for host fds of regular files (O_PASSTHROUGH).
            mounts: the directories handed over at paths of their own (`run --dir`, /tmp).
            grants: the run's network grants (redoxcap.grants.NetGrant by scheme), None for none.
            families: the families that answer (every brokered syscall exactly once).
            directfs_grant: the system's grant for native lookups (owned from now on; see
                native.py), None for none.

        Raises:
            HandlerTableError: families that do not answer exactly the brokered syscalls.
        """
        try:
            if families is not FAMILIES:  # those were checked at import
                check_families(families, brokered_names())
        except HandlerTableError:
            if directfs_grant is not None:
                os.close(directfs_grant)
            raise
        self.machine = machine
        self.program = Program(machine, ns, hosts, processes, passthrough, mounts, grants,
                               directfs_grant)
        by_name: dict[str, Handler] = {}
        for family in families:
            by_name.update(family(self.program).handlers())
        numbers = linux.SYSCALLS[machine]  # a name the machine lacks never arrives
        self.table: dict[int, Handler] = {numbers[name]: handler for name, handler in by_name.items()
                                          if name in numbers}

    @property
    def pumps(self) -> Any:
        return self.program.pumps

    def close(self) -> None:
        """Release what the broker holds for native lookups (the grant, host directories)."""
        self.program.locator.close()


__all__ = ["FAMILIES", "PROCEED", "Call", "Family", "HandlerTableError", "Install", "Syscalls",
           "check_families"]
