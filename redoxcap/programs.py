"""The programs `redoxcap run` started on a system, as `status` and `graph` show them, and
the runners that did those runs for it.

Each `run` tells the supervisor of the program it started (its pid, command
line, namespace names, cwd and router account); the supervisor keeps at most
MAX_CLIENTS and shows them a page at a time, so that a reply always fits in
one message however many there are.

A `redoxcap run` with the system up has the system do it (redoxcap/launch.py):
the supervisor hands it to a runner (redoxcap/runner.py) forked from its fork
server, at most MAX_RUNNERS at once, and reaps each when it ends
(:class:`Runners`).
"""

from __future__ import annotations

import errno
import socket
from collections.abc import Callable
from typing import TYPE_CHECKING

from redoxcap.daemons import alive
from redoxcap.forkserver import assign
from redoxcap.wire import protocol as P

if TYPE_CHECKING:
    import trio

    from redoxcap.forkserver import ForkedProcess, ForkServer

MAX_CLIENTS = 1024  # programs `status` remembers
MAX_RUNNERS = 256  # runs the system does at once for `redoxcap run` (and their daemons)
RUNNER_MODULE = "redoxcap.runner"
FILE_SCHEME_MODULE = "redoxcap.schemes.file"
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
    """The runners forked for `redoxcap run`, each reaped when it ends, and a spare.

    A run is handed to the spare when there is one: a runner forked before it
    was needed, waiting on a socket of ours for its caller's (`--spare-fd`),
    so that the fork server's double fork is not in the run's way. The next
    spare is made once that run has ended, not while it runs: a launch is
    CPU-bound on two cores, and making a spare then took CPU from the run
    (the next caller's interpreter, starting meanwhile, leaves a core free). A
    run that comes while a spare is being made waits for it rather than have
    the fork server fork another.

    Once a run has had a file scheme daemon (`--dir`, its /tmp), a spare daemon
    is made too, at the same moments: the next such daemon is that spare, told
    its arguments (redoxcap.forkserver.assign), not a fork made while the run
    sets itself up, whose start took the run's two cores for some 5 ms.
    """

    def __init__(self) -> None:
        self.running: set[ForkedProcess] = set()
        self._spare: tuple[ForkedProcess, socket.socket] | None = None  # and our end of its socket
        self._made: trio.Event | None = None  # while a spare is being made: set once it is
        self._closing = False
        # where spares come from, and the state directory they are told
        self._source: tuple[ForkServer, trio.Nursery, str | None] | None = None
        self._then_a_spare: set[ForkedProcess] = set()  # runners whose end brings the next spare
        self._prepared: tuple[int, int] | None = None  # (a spare's pid, the account it prepared)
        self._daemon_spare: tuple[ForkedProcess, socket.socket] | None = None  # and our end
        self._daemon_wanted = False  # a run has had a file scheme daemon: keep a spare one
        self._daemon_making = False

    async def start(self, forkserver: ForkServer | None, nursery: trio.Nursery, sock: int,
                    state_dir: str | None = None) -> int:
        """Hand the run whose caller holds the other end of sock (which stays ours to close)
        to a runner; its pid. A spare made afterwards is told state_dir, the system's, to take
        a run's first steps while it waits (redoxcap/runner.py).

        Raises:
            OSError: ENOSYS without a fork server, EAGAIN with MAX_RUNNERS running, or
                what the fork server said.
        """
        if forkserver is None:
            raise OSError(errno.ENOSYS, "this system has no fork server to run from")
        self._source = (forkserver, nursery, state_dir)
        if self._spare is None and self._made is not None:
            await self._made.wait()  # the fork server is at it already: sooner than another
        spare, self._spare = self._spare, None
        if spare is not None:
            runner, channel = spare
            with channel:
                try:
                    channel.sendmsg([b"G"], P.fds_ancillary([sock]))  # room for it: its first
                    self._then_a_spare.add(runner)
                    return runner.pid
                except OSError:  # it died meanwhile: reaped by _reap; fork one now
                    pass
        if len(self.running) >= MAX_RUNNERS:
            raise OSError(errno.EAGAIN, f"{MAX_RUNNERS} runs at once already")
        runner = await forkserver.spawn(RUNNER_MODULE, ["--socket-fd", sock])
        self._adopt(runner, nursery)
        self._then_a_spare.add(runner)
        return runner.pid

    def _make_spare_soon(self) -> None:
        """Start making a spare, unless there is one, one is being made, or none may be."""
        import trio

        if self._spare is None and self._made is None and not self._closing and \
                self._source is not None and len(self.running) < MAX_RUNNERS:
            self._made = trio.Event()
            forkserver, nursery, state_dir = self._source
            nursery.start_soon(self._make_spare, forkserver, nursery, state_dir)

    def prepared(self, pid: int, account: int) -> None:
        """The runner pid, a spare, took a run's first steps in account (redoxcap.run.Prepared)."""
        self._prepared = (pid, account)

    @property
    def spare_account(self) -> int | None:
        """The router account of what the spare prepared while it waits for a run (None:
        no spare, or one that prepared nothing, or one that has its run now)."""
        if self._spare is not None and self._prepared is not None and \
                self._prepared[0] == self._spare[0].pid:
            return self._prepared[1]
        return None

    def pids(self) -> list[int]:
        """The runners' pids (the spare's too) and those of the daemons forked for runs."""
        return sorted(r.pid for r in self.running)

    async def aclose(self, grace: float) -> None:
        """Let the spare go, and give the runs under way grace seconds to end (they are the
        callers' to end: what is left is left running)."""
        import trio

        self._closing = True
        for spare in (self._spare, self._daemon_spare):
            if spare is not None:
                spare[1].close()  # EOF: it goes
        self._spare = self._daemon_spare = None
        with trio.move_on_after(grace):
            while self.running:
                await next(iter(self.running)).wait()

    async def _make_spare(self, forkserver: ForkServer, nursery: trio.Nursery,
                          state_dir: str | None) -> None:
        try:
            self._spare = await self._spawn_waiting(
                forkserver, nursery, RUNNER_MODULE, lambda fd: [
                    "--spare-fd", fd, *(["--state-dir", state_dir] if state_dir is not None else [])])
        finally:
            made, self._made = self._made, None
            if made is not None:
                made.set()  # who waited looks again: at the spare, or (none made) forks one

    async def start_daemon(self, forkserver: ForkServer | None, nursery: trio.Nursery,
                           args: list[str | int]) -> int:
        """Fork a file scheme daemon for a run (`python -m redoxcap.schemes.file ARGS`, an int
        in args an fd it inherits), reaped here when it ends; its pid.

        Raises:
            OSError: ENOSYS without a fork server, EAGAIN with MAX_RUNNERS running.
        """
        if forkserver is None:
            raise OSError(errno.ENOSYS, "this system has no fork server to run from")
        self._daemon_wanted = True
        spare, self._daemon_spare = self._daemon_spare, None
        if spare is not None:
            daemon, channel = spare
            with channel:
                try:
                    assign(channel, args)
                    return daemon.pid
                except OSError:  # it died meanwhile: reaped by _reap; fork one now
                    pass
        if len(self.running) >= MAX_RUNNERS:
            raise OSError(errno.EAGAIN, f"{MAX_RUNNERS} runs and their daemons at once already")
        daemon = await forkserver.spawn(FILE_SCHEME_MODULE, args)
        self._adopt(daemon, nursery)
        return daemon.pid

    def _make_daemon_spare_soon(self) -> None:
        """Start making a spare file scheme daemon, where runs have had daemons and there is
        none, nor one being made."""
        if self._daemon_wanted and self._daemon_spare is None and not self._daemon_making \
                and not self._closing and self._source is not None \
                and len(self.running) < MAX_RUNNERS:
            self._daemon_making = True
            forkserver, nursery, _ = self._source
            nursery.start_soon(self._make_daemon_spare, forkserver, nursery)

    async def _make_daemon_spare(self, forkserver: ForkServer, nursery: trio.Nursery) -> None:
        try:
            spare = await self._spawn_waiting(forkserver, nursery, FILE_SCHEME_MODULE,
                                              lambda fd: [fd], spare=True)
            if spare is not None and self._closing:
                spare[1].close()  # EOF: it goes
                spare = None
            self._daemon_spare = spare
        finally:
            self._daemon_making = False

    async def _spawn_waiting(self, forkserver: ForkServer, nursery: trio.Nursery, module: str,
                             args: Callable[[int], list[str | int]], spare: bool = False
                             ) -> tuple[ForkedProcess, socket.socket] | None:
        """Fork module (args: its arguments, given the fd of its end of a new socket pair),
        adopted; the process and our end (non-blocking), or None where the fork server could
        not fork it."""
        ours, theirs = socket.socketpair(socket.AF_UNIX, socket.SOCK_SEQPACKET)
        try:
            try:
                process = await forkserver.spawn(module, args(theirs.fileno()), spare=spare)
            finally:
                theirs.close()
        except BaseException as exc:  # cancelled too: our end goes with the spare not made
            ours.close()
            if not isinstance(exc, OSError):
                raise
            return None
        ours.setblocking(False)
        self._adopt(process, nursery)
        return process, ours

    def _adopt(self, runner: ForkedProcess, nursery: trio.Nursery) -> None:
        self.running.add(runner)
        nursery.start_soon(self._reap, runner)

    async def _reap(self, runner: ForkedProcess) -> None:
        try:
            await runner.wait()
        finally:
            self.running.discard(runner)
            if self._spare is not None and self._spare[0] is runner:
                self._spare[1].close()
                self._spare = None
            if self._daemon_spare is not None and self._daemon_spare[0] is runner:
                self._daemon_spare[1].close()
                self._daemon_spare = None
        if runner in self._then_a_spare:  # a run has ended: the next one's spares, now
            self._then_a_spare.discard(runner)
            self._make_spare_soon()
            self._make_daemon_spare_soon()
