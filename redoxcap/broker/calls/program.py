"""What the broker holds for the program it serves, shared by every family of syscalls."""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any

from redoxcap.broker import net
from redoxcap.broker.calls.locate import Locator
from redoxcap.broker.calls.view import View
from redoxcap.broker.hostfs import HostTrees
from redoxcap.broker.pump import Pumps
from redoxcap.broker.state import (
    BoundedSet,
    CapabilityTable,
    Directory,
    Mount,
    Processes,
    StatusTable,
)
from redoxcap.wire import call as capability
from redoxcap.wire import protocol as P
from redoxcap.wire.linux import O_LARGEFILE
from redoxcap.wire.stat import Stat


class Program:
    """The program's capabilities, its processes, and what the broker tracks of its fds.

    Attributes:
        machine: "x86_64" or "aarch64" (struct layouts).
        hosts: the read-only host trees.
        processes: the per-process state (cwd, kernel cwd).
        locator: where its paths go (locate.py); view: the walk of handed directories.
        caps: the capabilities installed in it (directories, O_PATH), by socket identity.
        passed_files: regular files handed over as host fds (passthrough).
        snapshots: routed read-only files handed over as memory files, with their status.
        pumps: the routed files handed over as stream sockets.
        sockets: its network grants.
    """

    def __init__(self, machine: str, ns: int, hosts: HostTrees, processes: Processes,
                 passthrough: bool, mounts: Sequence[Mount] = (), grants: Any = None,
                 directfs_grant: int | None = None) -> None:
        self.machine = machine
        self.hosts = hosts
        self.processes = processes
        self.caps = CapabilityTable()
        self.locator = Locator(ns, hosts, mounts, self.caps, O_LARGEFILE.get(machine, 0),
                               passthrough, directfs_grant)
        self.view = View(self.locator)
        self.passed_files = BoundedSet()
        self.snapshots = StatusTable()
        self.pumps = Pumps()
        self.sockets = net.SocketGrants(grants)

    @property
    def mounts(self) -> list[Mount]:
        return self.locator.mounts

    @staticmethod
    def status_of_capability(fd: int) -> Stat:
        """FSTAT of a capability the broker holds."""
        return Stat.from_wire(capability.call_value(fd, P.FSTAT, kind=dict))

    def kernel_path(self, directory: Directory) -> str | None:
        """The host path at which the kernel finds a cwd of the broker's, if it can."""
        if directory.host:
            return directory.path
        mounted = self.locator.mount_of(directory.path)
        if mounted is not None and mounted[0].executable:
            return directory.path
        return None
