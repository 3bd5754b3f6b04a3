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

A restart that fails (the router or the supervisor out of fds or memory for a
moment, nsmgr dying again while the schemes are registered in it) is tried
again after RETRY_FIRST seconds, then twice as long each time up to RETRY_MAX,
for as long as it takes: pressure on the system never leaves a daemon down
once it is gone. FAILED is only for a daemon that keeps dying on its own: one
that dies more than MAX_RESTARTS_IN_WINDOW times in a row, each time
within RESTART_WINDOW seconds of its start (a crash loop, however slowly the
machine starts it), is FAILED: it is not restarted again, and its name is removed from the
root namespace, so namespaces forked from it (every default `redoxcap run`)
work for every live scheme and answer ENODEV for the failed one, as for any
name they lack. Namespaces that still hold its root get EIO from the router
at once. `restart(name)` brings it (or a running daemon) back under the same
scheme id and registers it again.
"""

from __future__ import annotations

import errno
import logging
import os
import socket
import time
from typing import TYPE_CHECKING, NoReturn

from redoxcap.daemons import (
    STOP_GRACE,
    BootFailed,
    Daemon,
    SchemeSpec,
    open_process,
    rss_kib,
    start_forkserver,
    stop_processes,
    terminate,
    with_backoff,
)
from redoxcap.programs import Programs, Runners
from redoxcap.wire import protocol as P

if TYPE_CHECKING:
    import trio

    from redoxcap.forkserver import ForkServer
    from redoxcap.wire.aio import AsyncCapability

# trio (and wire.aio, on it) are imported by the methods that run in the supervisor, not here:
# config reads SchemeSpec, and a `redoxcap` command that only configures a system does not
# pay for trio.

log = logging.getLogger("supervisor")

RESTART_WINDOW = 10.0  # seconds
MAX_RESTARTS_IN_WINDOW = 5


class System:
    """One running system: `boot()` it in a nursery, `stop()` it on the way out."""

    def __init__(self, specs: list[SchemeSpec], trace: bool = False,
                 forkserver: ForkServer | None = None) -> None:
        """A system of the kernel, nsmgr and specs' daemons, not yet booted.

        Args:
            specs: the scheme daemons besides nsmgr.
            trace: log every call the router forwards.
            forkserver: one :func:`start_forkserver` started for specs (owned from now on);
                None: boot() starts it.
        """
        self.specs = specs
        self.trace = trace
        self.kernel: AsyncCapability | None = None
        self.kernel_process: trio.Process | None = None
        self.nsmgr = Daemon(SchemeSpec("nsmgr", "redoxcap.nsmgr"))
        self.daemons: list[Daemon] = []
        self.stopping = False
        self.failed = False  # set when the system had to stop on its own (the router died)
        self.started = time.time()
        self._nursery: trio.Nursery | None = None
        self.programs = Programs()  # what `run` said of each program it started here
        self.runners = Runners()  # the processes doing runs for `redoxcap run`, and a spare
        self._booting: trio.CancelScope | None = None  # while boot() runs
        self._registering: trio.CancelScope | None = None  # while boot() registers the daemons
        self._forkserver = forkserver  # what the Python daemons are forked from
        self._boot_failure: str | None = None  # why boot() failed, said by the daemon that exited
        # what a file scheme asks a broker for before it hands over a host directory (HOSTDIR):
        # every file scheme daemon gets a copy, `run` one for its broker, no client ever one
        self.directfs_grant = os.memfd_create("redoxcap-directfs-grant", os.MFD_CLOEXEC)

    @property
    def forkserver(self) -> ForkServer | None:
        """What the Python daemons (and `run`'s runners) are forked from, once booted."""
        return self._forkserver

    @property
    def namespace(self) -> AsyncCapability:
        """The root namespace (all names, all permissions)."""
        assert self.nsmgr.root is not None
        return self.nsmgr.root

    async def boot(self, nursery: trio.Nursery) -> None:
        """Start the kernel, nsmgr and every scheme; return when all are registered.

        A daemon that exits before then is not restarted (it cannot start, and would
        only loop): the boot fails, naming it.

        Raises:
            BootFailed: a process could not be started, or exited before the system was up.
        """
        import trio

        try:
            with trio.CancelScope() as self._booting:  # _watch cancels it when a daemon exits
                try:
                    await self._boot(nursery)
                except OSError as exc:
                    await self._boot_failed("the system", exc)
        finally:
            self._booting = None
        if self._boot_failure is not None:
            raise BootFailed(self._boot_failure)

    async def _boot(self, nursery: trio.Nursery) -> None:
        import trio

        from redoxcap.wire.aio import AsyncCapability

        self._nursery = nursery
        if self._forkserver is None:
            self._forkserver = start_forkserver(self.specs)
        ours, theirs = _socketpair()
        try:
            self.kernel_process = await open_process(self._forkserver, SchemeSpec("kernel", "redoxcap.kernel"),
                                                           ["--kernel-fd", theirs])
        finally:
            os.close(theirs)
        self.kernel = AsyncCapability(ours)
        if self.trace:  # before anything else, so that the boot shows too
            nursery.start_soon(self.log_trace)
        await self._create(self.nsmgr)
        await self._start(self.nsmgr, nursery)
        # Every daemon starts at once (most of a boot is interpreters starting, which overlap)
        # and is registered as soon as it answers; registration order does not matter.
        for spec in self.specs:
            try:
                await self._launch(spec)
            except OSError as exc:
                await self._boot_failed(f"scheme {spec.name}", exc)
        failures: list[tuple[str, OSError]] = []
        with trio.CancelScope() as self._registering:
            async with trio.open_nursery() as registering:
                for daemon in self.daemons:
                    registering.start_soon(self._register_at_boot, daemon, failures)
        self._registering = None
        if self._boot_failure is not None:
            return  # a daemon exited: boot() says which
        if failures:
            name, exc = failures[0]
            await self._boot_failed(f"scheme {name}", exc)

    async def _register_at_boot(self, daemon: Daemon, failures: list[tuple[str, OSError]]) -> None:
        try:
            await self._register(daemon)
        except OSError as exc:
            failures.append((daemon.spec.name, exc))

    async def _boot_failed(self, what: str, exc: OSError) -> NoReturn:
        """Fail the boot because what failed with exc, unless a daemon's exit explains it."""
        import trio

        if exc.errno == errno.EIO:  # what requests to a daemon that exited get: _watch says which
            await trio.sleep(STOP_GRACE)
        reason = exc.strerror or str(exc)
        raise BootFailed(f"{what}: {reason}: {exc.filename}" if exc.filename else f"{what}: {reason}")

    async def add(self, spec: SchemeSpec) -> None:
        """Start one more scheme daemon and register it in the root namespace.

        Raises:
            OSError: EEXIST if a scheme of that name runs already.
        """
        await self._register(await self._launch(spec))

    async def _launch(self, spec: SchemeSpec) -> Daemon:
        """Create scheme spec and start its daemon, not yet registered; returns it (in self.daemons).

        Raises:
            OSError: EEXIST if a scheme of that name runs already.
        """
        if any(d.spec.name == spec.name for d in self.daemons):
            raise OSError(errno.EEXIST, f"a scheme named {spec.name!r} is already running")
        daemon = Daemon(spec)
        await self._create(daemon)
        try:
            await self._start(daemon, self._nursery)
        except BaseException:
            # no daemon: its root goes (the scheme id stays unused), and so does its channel
            assert daemon.root is not None
            daemon.root.close()
            if daemon.channel is not None:
                os.close(daemon.channel)
                daemon.channel = None
            raise
        self.daemons.append(daemon)
        return daemon

    async def _create(self, daemon: Daemon) -> None:
        from redoxcap.wire.aio import AsyncCapability

        assert self.kernel is not None
        scheme_id, fds = await self.kernel.call(P.SCHEME_CREATE, [{"keeps": True}])
        channel, root = fds
        daemon.scheme_id = scheme_id
        daemon.root = AsyncCapability(root)
        daemon.channel = channel

    async def _start(self, daemon: Daemon, nursery: trio.Nursery) -> None:
        """Start daemon on its channel (nsmgr gets a clone of the kernel capability, a file
        scheme a copy of the directfs grant) and watch it in nursery."""
        channel, daemon.channel = daemon.channel, None
        assert channel is not None
        fds, extra = [channel], []
        try:
            if daemon is self.nsmgr:
                # nsmgr creates schemes for namespaces that hold SCHEME_CREATE
                assert self.kernel is not None
                fds.append(await self.kernel.call_fd(P.CLONE))
                extra += ["--kernel-fd", fds[-1]]
            if daemon.spec.module == "redoxcap.schemes.file" and not daemon.spec.command \
                    and self.directfs_grant >= 0:
                fds.append(os.dup(self.directfs_grant))
                extra += ["--directfs-grant-fd", fds[-1]]
            daemon.started = time.monotonic()
            daemon.process = await open_process(self._forkserver, 
                daemon.spec, ["--channel-fd", channel, *daemon.spec.args, *extra])
        finally:
            for fd in fds:
                os.close(fd)
        nursery.start_soon(self._watch, daemon, daemon.process)

    async def _register(self, daemon: Daemon) -> None:
        assert daemon.root is not None
        clone = await daemon.root.call_fd(P.CLONE)
        try:
            await self.namespace.call(P.NS_REGISTER, [daemon.spec.name], [clone])
        except OSError as exc:
            if exc.errno != errno.EEXIST:  # registered meanwhile by a restarting nsmgr
                raise
        finally:
            os.close(clone)
        daemon.registered = True

    async def _unregister(self, daemon: Daemon) -> None:
        daemon.registered = False
        try:
            await self.namespace.call(P.NS_UNREGISTER, [daemon.spec.name])
        except OSError as exc:
            # ENODEV: not there; EIO: nsmgr is down, and registers only live schemes when back
            if exc.errno not in (errno.ENODEV, errno.EIO):
                raise

    async def _watch(self, daemon: Daemon, process: trio.Process) -> None:
        import trio

        code = await process.wait()
        async with daemon.lock:
            if self.stopping or daemon.process is not process:
                return  # stopping, or restart() replaced this process on purpose
            if self._booting is not None:
                self._boot_failure = (f"scheme {daemon.spec.name}: its daemon (pid {process.pid}) "
                                      f"exited with {code} before the system was up")
                if self._registering is not None:
                    # the others are answering their registration: the boot stops once they
                    # have (a bounded while), so that no daemon is left with a reply in flight
                    self._registering.deadline = min(self._registering.deadline,
                                                     trio.current_time() + STOP_GRACE)
                else:
                    self._booting.cancel()
                return
            log.warning("%s (pid %d) exited with %s; restarting", daemon.spec.name, process.pid, code)
            # a life shorter than the window continues a crash loop; a longer one ends it
            short = time.monotonic() - daemon.started < RESTART_WINDOW
            daemon.recent = [*daemon.recent, daemon.started] if short else [daemon.started]
            if len(daemon.recent) > MAX_RESTARTS_IN_WINDOW:
                log.error("%s keeps dying; not restarting it again (FAILED; `redoxcap restart %s` "
                          "tries again)", daemon.spec.name, daemon.spec.name)
                await self._give_up(daemon)
                return
            await self._respawn_until_up(daemon)

    async def _respawn_until_up(self, daemon: Daemon) -> None:
        """_respawn, tried again with backoff until it works (or the system stops): a
        restart fails when the system is short of something for now, not because the
        daemon is broken. The caller holds daemon.lock."""
        await with_backoff(daemon, lambda: self._respawn(daemon), lambda: not self.stopping)

    async def _retry_later(self, daemon: Daemon) -> None:
        """Go on trying, with backoff, a restart that `restart()` could not make."""
        async def restart_and_register() -> None:
            if (daemon is self.nsmgr or daemon.process is None
                    or daemon.process.returncode is not None):
                await self._respawn(daemon)
            if daemon is not self.nsmgr and not daemon.registered:
                await self._register(daemon)

        async with daemon.lock:
            await with_backoff(daemon, restart_and_register, lambda: not self.stopping)

    async def _give_up(self, daemon: Daemon) -> None:
        """Mark daemon FAILED and take its name out of the root namespace."""
        daemon.failed = True
        if daemon is not self.nsmgr and daemon.registered:
            try:
                await self._unregister(daemon)
            except OSError as exc:
                log.error("could not unregister %s: %s", daemon.spec.name, exc)

    async def _respawn(self, daemon: Daemon) -> None:
        """Start a new process for daemon's scheme, whose old process has exited (none
        if the one started by an earlier, failed try runs), and for nsmgr register every
        live scheme in it again.

        Raises:
            OSError, trio.TooSlowError: the router refused a channel, the process could
                not be started, or a registration failed; trying again is safe.
        """
        assert self.kernel is not None and daemon.root is not None
        if daemon.process is None or daemon.process.returncode is not None:
            # The router answers once it has seen the old daemon's channel end (or EBUSY if
            # that daemon still serves it after a while): nothing to poll here.
            _, fds = await self.kernel.call(P.SCHEME_RESTART, [daemon.scheme_id])
            daemon.channel = fds[0]
            assert self._nursery is not None
            await self._start(daemon, self._nursery)
            daemon.restarts += 1
        if daemon is self.nsmgr:
            # the router kept the root namespace for the new nsmgr; register what it lacks
            for other in self.daemons:
                if not other.failed:
                    await self._register(other)

    def scheme_names(self) -> dict[str, str]:
        """Scheme id (as a string, for msgpack maps) -> name, for reading the trace."""
        return {str(d.scheme_id): d.spec.name for d in [self.nsmgr, *self.daemons]}

    async def log_trace(self) -> None:
        """`up --trace`: every call the router forwards, one line each, into the log."""
        from redoxcap.trace import trace_into

        assert self.kernel is not None
        fd = await self.kernel.call_fd(P.TRACE)
        await trace_into(fd, self.scheme_names, lambda line: log.info("trace %s", line))

    def daemon(self, name: str) -> Daemon:
        """The daemon of scheme name (`nsmgr` included).

        Raises:
            KeyError: no such scheme.
        """
        for daemon in [self.nsmgr, *self.daemons]:
            if daemon.spec.name == name:
                return daemon
        raise KeyError(name)

    async def restart(self, name: str) -> int:
        """Restart scheme name's daemon, running or FAILED, under its scheme id.

        A running daemon is stopped first (its open handles fail with EIO, as
        after a crash); a FAILED one gets a fresh restart budget and its name
        back in the root namespace.

        Returns:
            The new daemon's pid.

        Raises:
            KeyError: no such scheme.
            OSError: the router refused a new channel, or the daemon could not be started
                or registered; it is tried again in the background, with backoff.
        """
        import trio

        daemon = self.daemon(name)
        async with daemon.lock:
            old, daemon.process = daemon.process, None  # its watcher leaves this exit to us
            if old is not None:
                await terminate(old)
            daemon.failed = False
            daemon.recent.clear()
            try:
                await self._respawn(daemon)
                if daemon is not self.nsmgr and not daemon.registered:
                    await self._register(daemon)
            except (OSError, trio.TooSlowError):
                # short of something for now: the caller hears of it, and it goes on trying
                assert self._nursery is not None
                self._nursery.start_soon(self._retry_later, daemon)
                raise
            log.info("%s restarted on request (pid %d)", name, daemon.process.pid)
            return daemon.process.pid

    async def status(self, clients_after: int | None = None, holdings_after: list | None = None,
                     detail: bool = True) -> dict:
        """Per daemon: pid, scheme id, restarts and the router's counters; a page of the
        running clients and one of the router's holdings, each small enough that the
        whole answer fits in one message however many there are.

        Args:
            clients_after: the pid the previous page of clients ended with (None: from
                the first).
            holdings_after: the `holdings_next` of the previous page (None: the first).
            detail: ask the daemons how many handles they have and what they are.

        Returns:
            The status, with `clients_next` and `holdings_next`: what to ask for the next
            pages (None where nothing is left).
        """
        assert self.kernel is not None
        clients, clients_next = self.programs.page(clients_after)
        ids = [d.scheme_id for d in [self.nsmgr, *self.daemons]]
        spare = self.runners.spare_account
        listed = [c["account"] for c in clients if type(c.get("account")) is int]
        options = {"schemes": ids, "accounts": listed + ([spare] if spare is not None else []),
                   "holdings_after": holdings_after, "detail": detail,
                   **({"charged_to": spare} if spare is not None else {})}
        kernel, _ = await self.kernel.call(P.KERNEL_STATUS, [options])
        per_scheme = kernel["schemes"]
        daemons = [{"name": "kernel", "pid": self.kernel_process.pid, "frames": kernel["frames"]}]
        daemons += [d.describe(per_scheme.get(str(d.scheme_id), {})) for d in [self.nsmgr, *self.daemons]]
        for d in daemons:
            d["rss_kib"] = rss_kib(d["pid"]) if d["pid"] else None
        accounts = kernel.get("accounts", {})
        for client in clients:
            counters = accounts.get(str(client.get("account")), {})
            client["capabilities"] = counters.get("caps", 0)
            # every router fd charged to it: its capabilities, and what is held for it
            client["router_fds"] = counters.get("caps", 0) + counters.get("held_fds", 0)
        return {"supervisor": os.getpid(), "uptime": time.time() - self.started,
                "daemons": daemons, "runners": self.runners.pids(),
                # what the spare runner holds for the next run (redoxcap.run.Prepared); each
                # daemon's `charged`: how much of what the router holds for it that is
                "spare": None if spare is None else {
                    "account": spare, "capabilities": accounts.get(str(spare), {}).get("caps", 0)},
                "clients": clients, "clients_next": clients_next,
                "holdings": kernel.get("holdings", []), "holdings_next": kernel.get("holdings_next"),
                "summary": kernel.get("summary", {})}

    async def stop(self) -> None:
        """Stop every process this system started (kernel last)."""
        self.stopping = True
        await self.runners.aclose(STOP_GRACE)
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
        await stop_processes(processes)
        if self.directfs_grant >= 0:
            os.close(self.directfs_grant)
            self.directfs_grant = -1
        if self._forkserver is not None:
            await self._forkserver.aclose(STOP_GRACE)
            self._forkserver = None


def _socketpair() -> tuple[int, int]:
    a, b = socket.socketpair(socket.AF_UNIX, socket.SOCK_SEQPACKET)
    return a.detach(), b.detach()
