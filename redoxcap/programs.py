"""The programs `redoxcap run` started on a system, as `status` and `graph` show them, and
the runners that did those runs for it.

Each `run` tells the supervisor of the program it started (its pid, command
line, namespace names, cwd and router account); the supervisor keeps at most
MAX_CLIENTS and shows them a page at a time, so that a reply always fits in
one message however many there are.

A `redoxcap run` with the system up has the system do it (redoxcap/launch.py):
the supervisor forks a runner (redoxcap/runner.py) from its fork server, at
most MAX_RUNNERS at once, and reaps each when it ends (:class:`Runners`).
"""

from __future__ import annotations

import errno
from typing import TYPE_CHECKING

from redoxcap.daemons import alive
from redoxcap.wire import protocol as P

if TYPE_CHECKING:
    import trio

    from redoxcap.forkserver import ForkedProcess, ForkServer

MAX_CLIENTS = 1024  # programs `status` remembers
MAX_RUNNERS = 256  # runs the system does at once for `redoxcap run`
RUNNER_MODULE = "redoxcap.runner"
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


class Runners:
    """The runners forked for `redoxcap run`, each reaped when it ends."""

    def __init__(self) -> None:
        self.running: set[ForkedProcess] = set()

    async def start(self, forkserver: ForkServer | None, nursery: trio.Nursery, sock: int) -> int:
        """Fork a runner for the run whose caller holds the other end of sock (which stays
        ours to close); its pid.

        Raises:
            OSError: ENOSYS without a fork server, EAGAIN with MAX_RUNNERS running, or
                what the fork server said.
        """
        if forkserver is None:
            raise OSError(errno.ENOSYS, "this system has no fork server to run from")
        if len(self.running) >= MAX_RUNNERS:
            raise OSError(errno.EAGAIN, f"{MAX_RUNNERS} runs at once already")
        runner = await forkserver.spawn(RUNNER_MODULE, ["--socket-fd", sock])
        self.running.add(runner)
        nursery.start_soon(self._reap, runner)
        return runner.pid

    async def _reap(self, runner: ForkedProcess) -> None:
        try:
            await runner.wait()
        finally:
            self.running.discard(runner)
