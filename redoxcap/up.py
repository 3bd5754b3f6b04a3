"""`redoxcap up` in the foreground: boot a System and serve the control socket.

The state directory (mode 0700) holds the control socket, the token and the
pid file while the system runs; all three are removed on the way out, however
the supervisor is asked to stop (`redoxcap down`, SIGINT, SIGTERM, or EOF on
the watch fd that a private `redoxcap run` passes).

One system per state directory: the supervisor takes an flock on
`STATE_DIR/supervisor.lock` before it writes anything there and holds it for
its whole life, so a second `up` fails with AlreadyRunning instead of
overwriting the first one's token and socket. It removes only the files it
created, and only while it still holds the lock.
"""

from __future__ import annotations

import contextlib
import errno
import fcntl
import logging
import os
import signal
import stat
from collections.abc import Iterator
from pathlib import Path

import trio

from redoxcap import control
from redoxcap.config import Config, ConfigError, make_mount
from redoxcap.daemons import BootFailed, SchemeSpec
from redoxcap.exits import EXIT_ALREADY_RUNNING, EXIT_BOOT_FAILED, Failure
from redoxcap.forkserver import ForkServer
from redoxcap.system import System
from redoxcap.wire import protocol as P
from redoxcap.wire.limits import raise_fd_limit
from redoxcap.wire.linux import identity

log = logging.getLogger("supervisor")


class SystemFailed(Exception):
    """The system could not go on (its kernel router died)."""


class AlreadyRunning(Exception):
    """Another supervisor holds the state directory; the message is fit for the user."""


@contextlib.contextmanager
def state_lock(state_dir: Path) -> Iterator[None]:
    """Hold the state directory's lock for the block; the lock file goes with it.

    Raises:
        AlreadyRunning: another supervisor holds it.
    """
    path = state_dir / control.LOCK_NAME
    while True:
        fd = os.open(path, os.O_RDWR | os.O_CREAT | os.O_NOFOLLOW | os.O_CLOEXEC, 0o600)
        try:
            fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except BlockingIOError:
            os.close(fd)
            raise AlreadyRunning(f"a system is already running at {state_dir}{_holder(state_dir)}") from None
        except BaseException:
            os.close(fd)
            raise
        # a supervisor on its way out unlinks the file before unlocking it: if we
        # locked that unlinked file, it proves nothing; lock the one at the path
        try:
            current = os.stat(path, follow_symlinks=False)
        except FileNotFoundError:
            current = None
        locked = os.fstat(fd)
        if current is not None and identity(current) == identity(locked):
            break
        os.close(fd)
    try:
        yield
    finally:
        path.unlink(missing_ok=True)  # still locked: nobody else can own this path now
        os.close(fd)


def _holder(state_dir: Path) -> str:
    """' (pid N)' for the running supervisor, if its pid file says so."""
    try:
        return f" (pid {int((state_dir / control.PID_NAME).read_text())})"
    except (OSError, ValueError):
        return " (it is still booting)"


def prepare_state_dir(state_dir: Path) -> None:
    """Create the state directory, private to its owner."""
    state_dir.mkdir(parents=True, exist_ok=True, mode=0o700)
    if state_dir.stat().st_uid != os.getuid():
        raise PermissionError(f"{state_dir} belongs to another user")
    os.chmod(state_dir, 0o700)


def serve(state_dir: Path, cfg: Config, *, trace: bool = False, watch_fd: int | None = None,
          ready_fd: int | None = None, forkserver: ForkServer | None = None) -> None:
    """`redoxcap up` in the foreground: run the system cfg describes until asked to stop.

    Args:
        state_dir: the state directory to serve.
        cfg: what to run (its root set).
        trace: have the router log every request and reply.
        watch_fd: stop when this inherited fd reaches EOF.
        ready_fd: a pipe to report readiness on (see :func:`main`).
        forkserver: the fork server started for cfg's schemes (owned from now on).

    Raises:
        Failure: EXIT_ALREADY_RUNNING, EXIT_BOOT_FAILED, or EXIT_FAILED when the
            system had to stop on its own.
    """
    logging.basicConfig(level=logging.INFO, format="supervisor[%(process)d] %(levelname)s %(message)s")
    info = {"root": str(cfg.root),
            "mounts": {m.name: {"path": str(m.path), "read_only": m.read_only} for m in cfg.mounts}}
    try:
        trio.run(main, state_dir, cfg.specs(), info, watch_fd, trace, ready_fd, forkserver)
    except AlreadyRunning as exc:
        raise Failure(str(exc), EXIT_ALREADY_RUNNING) from None
    except (BootFailed, OSError) as exc:
        raise Failure(f"boot failed: {exc}", EXIT_BOOT_FAILED) from None
    except SystemFailed as exc:
        raise Failure(f"stopped: {exc}") from None
    finally:
        if forkserver is not None:
            forkserver.close()  # when the system did not get to stop it (did not boot)


async def main(
    state_dir: Path,
    specs: list[SchemeSpec],
    info: dict | None = None,
    watch_fd: int | None = None,
    trace: bool = False,
    ready_fd: int | None = None,
    forkserver: ForkServer | None = None,
    task_status=trio.TASK_STATUS_IGNORED,
) -> None:
    """Run a system until asked to stop; everything it started is stopped on return.

    Args:
        state_dir: where the control socket, token and pid file live.
        specs: the scheme daemons to run besides the kernel and nsmgr.
        info: extra facts reported by `status` (the file root, mounts).
        watch_fd: stop when this inherited fd reaches EOF (a private run's pipe).
        trace: have the router log every request and reply.
        ready_fd: a pipe to write `up` to (and close) once the control socket
            answers; `up --detach` waits on it.
        forkserver: a fork server started for specs (see System; None: boot starts one).

    Raises:
        AlreadyRunning: another supervisor holds state_dir.
        BootFailed: a daemon could not be started or exited before the system was up.
        SystemFailed: the kernel router died.
    """
    raise_fd_limit()
    prepare_state_dir(state_dir)
    with state_lock(state_dir):
        await _serve_locked(state_dir, specs, info, watch_fd, trace, ready_fd, task_status,
                            forkserver)


async def _serve_locked(state_dir: Path, specs: list[SchemeSpec], info: dict | None,
                        watch_fd: int | None, trace: bool, ready_fd: int | None,
                        task_status: trio.TaskStatus, forkserver: ForkServer | None = None) -> None:
    """main(), once this supervisor holds the state directory's lock."""
    token = control.write_token(state_dir)
    pid_file = state_dir / control.PID_NAME
    pid_file.write_text(f"{os.getpid()}\n")
    system = System(specs, trace, forkserver)
    stop = trio.Event()

    async def ping(_request):
        return {}, []

    async def namespace(request):
        """A clone of the root namespace; with `account`, in a fresh router account, so
        that everything the client comes to hold is charged to it (and capped). With
        `account` and `scheme`, also a new anonymous scheme: its root (in that account),
        then its channel, for a daemon the client starts (`run`'s private /tmp, which no
        namespace names; made here, so that no daemon is asked before it is needed). With
        `account` and `directfs`, the directfs grant last."""
        if not request.get("account"):
            return {}, [await system.namespace.call_fd(P.CLONE)]
        # `directfs`: the grant too, last (what the directfs op hands out; one round trip less)
        grant = [os.dup(system.directfs_grant)] if request.get("directfs") is True else []
        limits = {k: v for k, v in request.items() if k in ("max_caps",) and type(v) is int}
        made: dict[str, list[int]] = {}  # what the calls below brought: ours until passed on
        failed: list[OSError] = []  # raised after both, as it came (not in an exception group)

        async def clone() -> None:
            try:
                made["clone"] = [await system.namespace.call_fd(P.CLONE)]
            except OSError as exc:
                failed.append(exc)

        async def scheme() -> None:
            try:
                made["scheme"] = (await system.kernel.call(P.SCHEME_CREATE, [{}]))[1]  # channel, root
            except OSError as exc:
                failed.append(exc)

        channel = None
        try:
            async with trio.open_nursery() as nursery:  # both at once: a round trip less
                nursery.start_soon(clone)
                if request.get("scheme") is True:
                    nursery.start_soon(scheme)
            if failed:
                raise failed[0]
            passed = made["clone"]
            if (scheme_fds := made.pop("scheme", None)) is not None:
                if len(scheme_fds) != 2:
                    P.close_fds(scheme_fds)
                    raise OSError(errno.EIO, "SCHEME_CREATE answered without channel and root")
                channel, root = scheme_fds
                passed.append(root)
            account, fds = await system.kernel.call(P.ACCOUNT_NEW, [limits or None], passed)
        except BaseException:
            if channel is not None:
                os.close(channel)
            P.close_fds(grant)
            raise
        finally:
            for fds_made in made.values():
                P.close_fds(fds_made)  # the clone and root are the account's own copies now
        return {"account": account}, fds + ([channel] if channel is not None else []) + grant

    async def prepared(request):
        """The spare runner `spare` (a pid) has taken a run's first steps in `account`
        (redoxcap.run.Prepared): `status` shows it, as the spare's, until the spare does a run."""
        spare, account = request.get("spare"), request.get("account")
        if type(spare) is not int or type(account) is not int:
            raise control.ControlError("prepared needs the spare's pid and the account")
        system.runners.prepared(spare, account)
        return {}, []

    async def status(request):
        """One page of the status (`clients_after`, `holdings_after`: where the previous
        page ended; `detail`: ask the daemons about their handles); see status.fetch."""
        clients_after = request.get("clients_after")
        holdings_after = request.get("holdings_after")
        page = await system.status(clients_after if type(clients_after) is int else None,
                                   holdings_after if isinstance(holdings_after, list) else None,
                                   detail=request.get("detail", True) is not False)
        return {"status": {**page, "state_dir": str(state_dir), **(info or {})}}, []

    async def shutdown(_request):
        stop.set()
        return {}, []

    async def mount(request):
        try:
            spec = make_mount(request.get("name"), request.get("path"), bool(request.get("read_only")))
        except (ConfigError, TypeError) as exc:
            raise control.ControlError(str(exc)) from None
        running = {d.spec.name: d.spec for d in system.daemons}
        if running.get(spec.name) == spec.spec():
            return {"added": False}, []  # the same mount is already there
        await system.add(spec.spec())
        return {"added": True}, []

    async def client(request):
        """`run` says which program it started, for `status` and `graph`."""
        pid = request.get("pid")
        if type(pid) is not int or pid <= 0:
            raise control.ControlError("client needs a pid")
        info = {key: request.get(key) for key in ("argv", "names", "cwd", "account")}
        if not isinstance(info["argv"], list) or not all(isinstance(a, str) for a in info["argv"]):
            raise control.ControlError("client needs argv, a list of strings")
        system.programs.add(pid, info)
        return {}, []

    async def trace(_request):
        """A socket the router streams the trace on, and the names of the scheme ids."""
        return {"schemes": system.scheme_names()}, [await system.kernel.call_fd(P.TRACE)]

    async def directfs(_request):
        """The grant a broker passes along to have a file scheme hand it a host directory
        (HOSTDIR) for native lookups; `run` keeps it from its program."""
        return {}, [os.dup(system.directfs_grant)]

    async def restart(request):
        name = request.get("name")
        if not isinstance(name, str):
            raise control.ControlError("restart needs a scheme name")
        try:
            return {"pid": await system.restart(name)}, []
        except KeyError:
            raise control.ControlError(f"no scheme named {name!r}") from None

    async def run(request):
        """Fork a runner (redoxcap/runner.py) to do a `redoxcap run` for the caller, whose
        end of their socket pair is the one fd passed with the request."""
        passed = request.get("passed_fds") or []
        if len(passed) != 1 or not stat.S_ISSOCK(os.fstat(passed[0]).st_mode):
            raise control.ControlError("run needs the runner's end of a socket pair")
        await system.runners.start(system.forkserver, nursery, passed[0], str(state_dir))
        return {}, []

    async def serve(request):
        """A file scheme daemon forked (from the fork server) for a run's `--dir` or its
        private /tmp, on the channel passed with the request; it ends with its scheme."""
        passed = request.get("passed_fds") or []
        path, name = request.get("path"), request.get("name")
        if len(passed) != 1 or not isinstance(path, str) or not os.path.isabs(path) or \
                not isinstance(name, str) or not name:
            raise control.ControlError("serve needs a channel, an absolute path and a name")
        args = ["--channel-fd", passed[0], "--root", path, "--name", name, "--no-keep",
                *(["--read-only"] if request.get("read_only") is True else []),
                *(["--directfs-grant-fd", system.directfs_grant]
                  if request.get("directfs") is True else [])]
        return {"pid": await system.runners.start_daemon(system.forkserver, nursery, args)}, []

    handlers = {"ping": ping, "namespace": namespace, "prepared": prepared, "status": status,
                "shutdown": shutdown,
                "trace": trace, "client": client, "run": run, "serve": serve,
                "mount": mount, "restart": restart, "directfs": directfs}
    try:
        async with trio.open_nursery() as nursery:
            try:
                await system.boot(nursery)
                await nursery.start(control.serve, state_dir / control.SOCKET_NAME, token, handlers)
                nursery.start_soon(_stop_on_signal, stop)
                if watch_fd is not None:
                    nursery.start_soon(_stop_on_eof, watch_fd, stop)
                nursery.start_soon(_stop_when_kernel_dies, system, stop)
                log.info("up: %d schemes, state in %s", len(specs), state_dir)
                if ready_fd is not None:
                    _report_ready(ready_fd)
                task_status.started(system)
                await stop.wait()
            finally:
                with trio.CancelScope(shield=True):
                    await system.stop()
                nursery.cancel_scope.cancel()
    except* BootFailed as failed:  # raised in the nursery's body, so it comes in a group
        raise failed.exceptions[0] from None
    finally:
        # ours: written after we took the lock, which we still hold
        for name in (control.TOKEN_NAME, control.PID_NAME, control.SOCKET_NAME):
            (state_dir / name).unlink(missing_ok=True)
    if system.failed:
        raise SystemFailed("the kernel router died")


def _report_ready(fd: int) -> None:
    try:
        os.write(fd, b"up\n")
    except OSError:
        pass  # whoever waited is gone; we run on regardless
    finally:
        os.close(fd)


async def _stop_on_signal(stop: trio.Event) -> None:
    with trio.open_signal_receiver(signal.SIGINT, signal.SIGTERM, signal.SIGHUP) as signals:
        async for _ in signals:
            stop.set()
            return


async def _stop_when_kernel_dies(system: System, stop: trio.Event) -> None:
    """Every capability is a socket the router holds: without it nothing can go on."""
    code = await system.kernel_process.wait()
    if not system.stopping:
        log.error("the kernel router exited (%s); every capability is gone, shutting down", code)
        system.failed = True
        stop.set()


async def _stop_on_eof(fd: int, stop: trio.Event) -> None:
    await trio.lowlevel.wait_readable(fd)
    stop.set()
