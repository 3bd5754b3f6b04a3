"""The programs `redoxcap run` started on a system, as `status` and `graph` show them.

Each `run` tells the supervisor of the program it started (its pid, command
line, namespace names, cwd and router account); the supervisor keeps at most
MAX_CLIENTS and shows them a page at a time, so that a reply always fits in
one message however many there are.
"""

from __future__ import annotations

from redoxcap.daemons import alive
from redoxcap.wire import protocol as P

MAX_CLIENTS = 1024  # programs `status` remembers
CLIENTS_PAGE_BYTES = 48 * 1024  # of clients in one status reply (each `run` says at most 4 KiB)


class Programs:
    """The programs started on this system that still run, by pid."""

    def __init__(self) -> None:
        self.by_pid: dict[int, dict] = {}  # pid -> what `run` said of the program it started

    def add(self, pid: int, info: dict) -> None:
        """Note a program `redoxcap run` started here, for `status` and `graph`."""
        if len(self.by_pid) >= MAX_CLIENTS:  # the oldest that ended make room; else the oldest
            for old in [p for p in self.by_pid if not alive(p)] or [min(self.by_pid)]:
                del self.by_pid[old]
        self.by_pid[pid] = info

    def page(self, after: int | None) -> tuple[list[dict], int | None]:
        """The running programs with a pid above after, as many as fit in
        CLIENTS_PAGE_BYTES, and the pid to ask for the next page from (None if this is
        the last)."""
        page: list[dict] = []
        size = 0
        for pid, client in sorted(self.by_pid.items()):
            if after is not None and pid <= after:
                continue
            if not alive(pid):
                del self.by_pid[pid]  # it ended: its capabilities went with it
                continue
            entry = {**client, "pid": pid}
            size += len(P.pack(entry))
            if page and size > CLIENTS_PAGE_BYTES:
                return page, page[-1]["pid"]
            page.append(entry)
        return page, None
