"""What the supervisor knows of each daemon, and how one starts.

A :class:`SchemeSpec` says what to run (`python -m MODULE`, a user's module
from a directory of its own, or a user's command); a :class:`Daemon` is one
running under the supervisor (its process, scheme id, restarts, state). The
system's own Python daemons are forks of one warm fork server
(:func:`start_forkserver`, redoxcap/forkserver.py).
"""

from __future__ import annotations

import logging
import os
from collections.abc import Awaitable, Callable
from dataclasses import dataclass, field
from typing import TYPE_CHECKING

from redoxcap import PYTHON

if TYPE_CHECKING:
    import trio

    from redoxcap.forkserver import ForkedProcess, ForkServer
    from redoxcap.wire.aio import AsyncCapability

# trio is imported where a daemon is made or stopped (in the supervisor), not here: config
# reads SchemeSpec, and a `redoxcap` command that only configures a system does not load it.

log = logging.getLogger("supervisor")
STOP_GRACE = 3.0  # seconds a daemon has to exit after SIGTERM, before SIGKILL
RETRY_FIRST = 0.1  # seconds before a failed restart is tried again; doubled each time
RETRY_MAX = 5.0  # the longest wait between two tries


# what `python -m MODULE` runs (and how it reports a missing module), from a directory that is
# appended to sys.path rather than put first
_RUN_USER_MODULE = ("import runpy, sys; where, module = sys.argv[1:3]; del sys.argv[1:3]; "
                    "sys.path.append(where); runpy._run_module_as_main(module)")


def _trio():  # the trio module, imported on first use (in the supervisor)
    import trio

    return trio


class BootFailed(Exception):
    """The system could not boot: a daemon could not be started, or exited before it was up."""


@dataclass(frozen=True)
class SchemeSpec:
    """A scheme daemon to run, registered as name: `python -m module --channel-fd N *args`,
    or, for a user's daemon given as a program, `*command --channel-fd N`.

    env is added to the supervisor's environment and cwd is where the daemon
    starts (None: the supervisor's own).
    """

    name: str
    module: str
    args: tuple[str, ...] = ()
    command: tuple[str, ...] = ()
    env: tuple[tuple[str, str], ...] = ()
    cwd: str | None = None

    def argv(self, channel_fd: int) -> list[str]:
        """The daemon's command line, given the fd number of its scheme channel."""
        return [*self.program(), "--channel-fd", str(channel_fd), *self.args]

    def program(self) -> list[str]:
        """The command line before the daemon's options: `python -m MODULE`, or its command."""
        if self.command:
            return list(self.command)
        if self.cwd is None:
            return [*PYTHON, "-m", self.module]
        # a module of the user's, from the directory the config names: appended to sys.path,
        # so that the system's own modules still come from where it is installed
        return [*PYTHON, "-c", _RUN_USER_MODULE, self.cwd, self.module]

    @property
    def forkable(self) -> bool:
        """A module of the system's own, run as the supervisor's environment has it: the fork
        server can start it (redoxcap/forkserver.py)."""
        return not self.command and self.cwd is None and not self.env


@dataclass(eq=False)
class Daemon:
    """A running daemon and what the supervisor knows about it."""

    spec: SchemeSpec
    scheme_id: int = 0
    root: AsyncCapability | None = None  # the supervisor's own root capability
    process: trio.Process | None = None
    restarts: int = 0
    recent: list[float] = field(default_factory=list)  # starts of the lives of its crash loop
    started: float = 0.0  # when its process was started (monotonic)
    failed: bool = False
    registered: bool = False  # its name is in the root namespace
    channel: int | None = None  # the daemon's end of its scheme channel, until started
    # held while its process is replaced, so a crash and a `restart` never both do it
    lock: trio.Lock = field(default_factory=lambda: _trio().Lock())

    @property
    def state(self) -> str:
        """`running`, `restarting` (between two processes) or `failed` (given up on)."""
        if self.failed:
            return "failed"
        return "running" if self.process is not None and self.process.returncode is None else "restarting"

    def describe(self, counters: dict) -> dict:
        """What `status` shows of it, with the router's counters for its scheme."""
        spec = self.spec
        return {
            "name": spec.name,
            "module": spec.module,
            "args": list(spec.args),
            **({"command": list(spec.command)} if spec.command else {}),
            "pid": self.process.pid if self.process and self.process.returncode is None else None,
            "scheme_id": self.scheme_id,
            "restarts": self.restarts,
            "failed": self.failed,
            "state": self.state,
            **counters,
        }


def start_forkserver(specs: list[SchemeSpec]) -> ForkServer | None:
    """Start the fork server a system's Python daemons come from (redoxcap/forkserver.py),
    loading what the kernel's, nsmgr's and each of specs' mains import, and make this process
    their parent (a child subreaper). None when it could not start: then every daemon is an
    interpreter of its own.

    Start it early: it loads while the supervisor itself still does (trio, the lock).
    """
    from redoxcap.forkserver import ForkServer, adopt_orphans

    modules = ["redoxcap.kernel", "redoxcap.nsmgr", *(s.module for s in specs if s.forkable)]
    try:
        adopt_orphans()  # the daemons it forks become our children
        # `run`'s runner (the run, the broker, the sandbox) once the boot is done
        return ForkServer(list(dict.fromkeys(modules)), later=["redoxcap.runner"])
    except OSError as exc:
        log.warning("no fork server (%s): each daemon starts an interpreter of its own", exc)
        return None


def file_scheme(root: str, name: str = "file", read_only: bool = False, keep: bool = True,
                passthrough: bool = True) -> SchemeSpec:
    """The spec of a file scheme serving host directory root."""
    args = ("--root", root, "--name", name) + (("--read-only",) if read_only else ()) \
        + (() if keep else ("--no-keep",)) + (() if passthrough else ("--no-passthrough",))
    return SchemeSpec(name, "redoxcap.schemes.file", args)


async def terminate(proc: trio.Process) -> None:
    """SIGTERM, then SIGKILL after STOP_GRACE; returns once proc has exited."""
    import trio

    try:
        proc.terminate()
        with trio.move_on_after(STOP_GRACE):
            await proc.wait()
    finally:
        if proc.returncode is None:
            proc.kill()
            with trio.CancelScope(shield=True):
                await proc.wait()


def alive(pid: int) -> bool:
    """Whether pid runs (a zombie does not count)."""
    try:
        with open(f"/proc/{pid}/stat") as f:
            return f.read().rpartition(")")[2].split()[0] != "Z"
    except OSError:
        return False


def rss_kib(pid: int) -> int | None:
    """Resident memory of a process in KiB, from /proc (None if it is gone)."""
    try:
        with open(f"/proc/{pid}/status") as f:
            for line in f:
                if line.startswith("VmRSS:"):
                    return int(line.split()[1])
    except (OSError, ValueError):
        pass
    return None


async def open_process(forkserver: ForkServer | None, spec: SchemeSpec, args: list[str | int]
                       ) -> trio.Process | ForkedProcess:
    """Start spec's daemon with args after its program (`python -m MODULE`, or its command);
    an int in args is an fd it inherits, named there by its number. Forked from forkserver
    when it is a module of the system's own, run in the supervisor's environment; a process
    of its own otherwise (or when the fork server fails)."""
    import trio

    if forkserver is not None and spec.forkable:
        try:
            return await forkserver.spawn(spec.module, args)
        except OSError as exc:
            log.warning("the fork server could not start %s (%s); starting it on its own",
                        spec.name, exc)
    return await trio.lowlevel.open_process(
        [*spec.program(), *map(str, args)], pass_fds=[a for a in args if isinstance(a, int)],
        env={**os.environ, **dict(spec.env)} if spec.env else None, cwd=spec.cwd)


async def stop_processes(processes: list) -> None:
    """Wait STOP_GRACE for processes to exit on their own (their channels closed), then
    SIGTERM those left, then SIGKILL those left after another STOP_GRACE; reap them all."""
    import trio

    with trio.move_on_after(STOP_GRACE):
        for proc in processes:
            await proc.wait()
    for proc in processes:
        if proc.returncode is None:
            proc.terminate()
    with trio.move_on_after(STOP_GRACE):
        for proc in processes:
            await proc.wait()
    for proc in processes:
        if proc.returncode is None:
            proc.kill()
            await proc.wait()


async def with_backoff(daemon: Daemon, attempt: Callable[[], Awaitable[None]],
                       go_on: Callable[[], bool]) -> None:
    """attempt() to bring daemon back until it works, go_on() says no more or daemon is given
    up on: RETRY_FIRST seconds after a failure, then twice as long each time up to RETRY_MAX."""
    import trio

    delay = RETRY_FIRST
    while go_on() and not daemon.failed:
        try:
            await attempt()
            return
        except (OSError, trio.TooSlowError) as exc:
            log.warning("could not restart %s: %s; trying again in %.1fs",
                        daemon.spec.name, exc, delay)
        await trio.sleep(delay)
        delay = min(delay * 2, RETRY_MAX)
