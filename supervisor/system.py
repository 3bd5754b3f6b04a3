"""Booting, watching and stopping the system: kernel, nsmgr and the scheme daemons.

The supervisor holds the kernel capability. For each daemon it asks the
router for a new anonymous scheme (SCHEME_CREATE: a request channel for the
daemon and a root capability), starts the daemon on that channel, and
registers a clone of the root capability in the root namespace under the
scheme's name. Names live only here and in nsmgr; the router knows ids.

When a daemon dies the router fails its pending requests with EIO; the
supervisor asks for a new channel for the same scheme id (SCHEME_RESTART) and
starts the daemon again. Root capabilities name the scheme id, not the
process, so every namespace that holds one keeps working. A restarted nsmgr
starts empty, so the supervisor registers every scheme in the root namespace
again (namespaces forked before the crash are gone).
"""

from __future__ import annotations

import errno
import logging
import os
import socket
import sys
import time
from dataclasses import dataclass, field

import trio

from rt import protocol as P
from rt.aio import AsyncCapability

log = logging.getLogger("supervisor")

RESTART_WINDOW = 10.0  # seconds
MAX_RESTARTS_IN_WINDOW = 5
STOP_GRACE = 3.0


@dataclass(frozen=True)
class SchemeSpec:
    """A scheme daemon to run: `python -m module --channel-fd N *args`, registered as name."""

    name: str
    module: str
    args: tuple[str, ...] = ()


@dataclass(eq=False)
class Daemon:
    """A running daemon and what the supervisor knows about it."""

    spec: SchemeSpec
    scheme_id: int = 0
    root: AsyncCapability | None = None  # the supervisor's own root capability
    process: trio.Process | None = None
    restarts: int = 0
    recent: list[float] = field(default_factory=list)
    failed: bool = False
    channel: int | None = None  # the daemon's end of its scheme channel, until started


def file_scheme(root: str, name: str = "file", read_only: bool = False) -> SchemeSpec:
    """The spec of a file scheme serving host directory root."""
    args = ("--root", root, "--name", name) + (("--read-only",) if read_only else ())
    return SchemeSpec(name, "schemes.file", args)


class System:
    """One running system: `boot()` it in a nursery, `stop()` it on the way out."""

    def __init__(self, specs: list[SchemeSpec], trace: bool = False) -> None:
        self.specs = specs
        self.trace = trace
        self.kernel: AsyncCapability | None = None
        self.kernel_process: trio.Process | None = None
        self.nsmgr = Daemon(SchemeSpec("nsmgr", "nsmgr"))
        self.daemons: list[Daemon] = []
        self.stopping = False
        self.failed = False  # set when the system had to stop on its own (the router died)
        self.started = time.time()
        self._nursery: trio.Nursery | None = None

    @property
    def namespace(self) -> AsyncCapability:
        """The root namespace (all names, all permissions)."""
        assert self.nsmgr.root is not None
        return self.nsmgr.root

    async def boot(self, nursery: trio.Nursery) -> None:
        """Start the kernel, nsmgr and every scheme; return when all are registered."""
        self._nursery = nursery
        ours, theirs = _socketpair()
        try:
            self.kernel_process = await trio.lowlevel.open_process(
                [sys.executable, "-m", "kernel", "--kernel-fd", str(theirs),
                 *(["--trace"] if self.trace else [])], pass_fds=[theirs]
            )
        finally:
            os.close(theirs)
        self.kernel = AsyncCapability(ours)
        await self._create(self.nsmgr)
        await self._start(self.nsmgr, nursery)
        for spec in self.specs:
            await self.add(spec)

    async def add(self, spec: SchemeSpec) -> None:
        """Start one more scheme daemon and register it in the root namespace.

        Raises:
            OSError: EEXIST if a scheme of that name runs already.
        """
        if any(d.spec.name == spec.name for d in self.daemons):
            raise OSError(errno.EEXIST, f"a scheme named {spec.name!r} is already running")
        daemon = Daemon(spec)
        await self._create(daemon)
        await self._start(daemon, self._nursery)
        self.daemons.append(daemon)
        await self._register(daemon)

    async def _create(self, daemon: Daemon) -> None:
        assert self.kernel is not None
        scheme_id, fds = await self.kernel.call(P.SCHEME_CREATE)
        channel, root = fds
        daemon.scheme_id = scheme_id
        daemon.root = AsyncCapability(root)
        daemon.channel = channel

    async def _start(self, daemon: Daemon, nursery: trio.Nursery) -> None:
        channel, daemon.channel = daemon.channel, None
        assert channel is not None
        fds, args = [channel], list(daemon.spec.args)
        try:
            if daemon is self.nsmgr:
                # nsmgr creates schemes for namespaces that hold SCHEME_CREATE
                assert self.kernel is not None
                fds.append(await self.kernel.call_fd(P.CLONE))
                args += ["--kernel-fd", str(fds[-1])]
            daemon.process = await trio.lowlevel.open_process(
                [sys.executable, "-m", daemon.spec.module, "--channel-fd", str(channel), *args],
                pass_fds=fds,
            )
        finally:
            for fd in fds:
                os.close(fd)
        nursery.start_soon(self._watch, daemon, daemon.process, nursery)

    async def _register(self, daemon: Daemon) -> None:
        assert daemon.root is not None
        clone = await daemon.root.call_fd(P.CLONE)
        try:
            await self.namespace.call(P.NS_REGISTER, [daemon.spec.name], [clone])
        finally:
            os.close(clone)

    async def _watch(self, daemon: Daemon, process: trio.Process, nursery: trio.Nursery) -> None:
        code = await process.wait()
        if self.stopping:
            return
        log.warning("%s (pid %d) exited with %s; restarting", daemon.spec.name, process.pid, code)
        now = time.monotonic()
        daemon.recent = [t for t in daemon.recent if now - t < RESTART_WINDOW] + [now]
        if len(daemon.recent) > MAX_RESTARTS_IN_WINDOW:
            log.error("%s keeps dying; not restarting it again", daemon.spec.name)
            daemon.failed = True
            return
        assert self.kernel is not None
        try:
            with trio.fail_after(5):
                # the router notices the dead channel on its own; wait until it has
                while True:
                    try:
                        _, fds = await self.kernel.call(P.SCHEME_RESTART, [daemon.scheme_id])
                        break
                    except OSError as exc:
                        if exc.errno != errno.EBUSY:  # the router has not seen the EOF yet
                            raise
                        await trio.sleep(0.01)
            daemon.channel = fds[0]
            await self._start(daemon, nursery)
            daemon.restarts += 1
            if daemon is self.nsmgr:
                for other in self.daemons:
                    await self._register(other)
        except (OSError, trio.TooSlowError) as exc:
            log.error("could not restart %s: %s", daemon.spec.name, exc)
            daemon.failed = True

    async def status(self) -> dict:
        """Per daemon: pid, scheme id, restarts and the router's counters."""
        assert self.kernel is not None
        kernel, _ = await self.kernel.call(P.KERNEL_STATUS)
        per_scheme = kernel["schemes"]
        daemons = [{"name": "kernel", "pid": self.kernel_process.pid, "frames": kernel["frames"]}]
        for d in [self.nsmgr, *self.daemons]:
            counters = per_scheme.get(str(d.scheme_id), {})
            daemons.append({
                "name": d.spec.name,
                "module": d.spec.module,
                "args": list(d.spec.args),
                "pid": d.process.pid if d.process and d.process.returncode is None else None,
                "scheme_id": d.scheme_id,
                "restarts": d.restarts,
                "failed": d.failed,
                **counters,
            })
        for d in daemons:
            d["rss_kib"] = rss_kib(d["pid"]) if d["pid"] else None
        return {"supervisor": os.getpid(), "uptime": time.time() - self.started,
                "daemons": daemons}

    async def stop(self) -> None:
        """Stop every process this system started (kernel last)."""
        self.stopping = True
        for d in [*self.daemons, self.nsmgr]:
            if d.root is not None:
                d.root.close()
        # The router exits when the supervisor's kernel capability closes, and each
        # daemon exits when its channel to the router reaches EOF.
        if self.kernel is not None:
            self.kernel.close()
        processes = [d.process for d in [*self.daemons, self.nsmgr] if d.process]
        if self.kernel_process is not None:
            processes.insert(0, self.kernel_process)
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


def _socketpair() -> tuple[int, int]:
    a, b = socket.socketpair(socket.AF_UNIX, socket.SOCK_SEQPACKET)
    return a.detach(), b.detach()
