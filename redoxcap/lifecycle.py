"""A supervisor's life as the `redoxcap` commands see it: start it in the background,
wait until it is up, stop it; and the private system a `run` boots for one command.

A background supervisor is `redoxcap up` started in a new session, logging to
`STATE_DIR/supervisor.log`. It reports readiness on a pipe (`--ready-fd`: it
writes `up` once its control socket answers; EOF without `up` means it is
exiting, and its exit code says why). Its exit is waited for on a pidfd, and
a private system also stops when its watch pipe (`--watch-fd`) reaches EOF.
Nothing here sleeps to find out: every wait is on a pipe or a pidfd.
"""

from __future__ import annotations

import contextlib
import os
import re
import select
import signal
import sys
import tempfile
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import TYPE_CHECKING, Self

from redoxcap import PYTHON, control
from redoxcap.exits import EXIT_ALREADY_RUNNING, EXIT_BOOT_FAILED, Failure

if TYPE_CHECKING:
    import subprocess

    from redoxcap import config

# subprocess and shutil are loaded by what starts or removes a system, not with a `run`
# that only asks where the state directory is.

BOOT_TIMEOUT = 30.0  # seconds a supervisor has to report that it is up
STOP_TIMEOUT = 15.0  # seconds a supervisor has to exit once asked, before it is killed


def default_state_dir() -> Path:
    """Where a system keeps its control socket: $XDG_RUNTIME_DIR/redoxcap-UID (or the temp dir;
    the console script's lean side says, redoxcap/launch.py)."""
    from redoxcap.launch import default_state_dir as lean

    return Path(lean())


def up_options(cfg: config.Config, trace: bool = False) -> list[str]:
    """The `up` options that reproduce cfg (and --trace) in another process."""
    from redoxcap import config  # only who boots a system needs it (and trio, through it)

    argv = ["--root", str(cfg.root), "--schemes", ",".join(cfg.schemes)]
    for m in cfg.mounts:
        argv += ["--mount", config.mount_option_text(m)]
    for user in cfg.user_schemes:
        argv += ["--user-scheme", user.to_json()]
    return argv + (["--trace"] if trace else [])


def readable(fd: int, timeout: float) -> bool:
    """Whether fd becomes readable within timeout seconds (a pidfd does when its process exits)."""
    poller = select.poll()
    poller.register(fd, select.POLLIN)
    return bool(poller.poll(timeout * 1000))


class Supervisor:
    """A supervisor this process started in the background.

    Owns the read end of its readiness pipe (until :meth:`wait_until_up`) and
    a pidfd for its process (until :meth:`close`); close it in every case.

    Attributes:
        state_dir: the state directory it serves.
        process: its process (a child of ours, so its pid stays valid until reaped).
    """

    _ready_fd: int | None
    _pidfd: int | None

    def __init__(self, state_dir: Path, options: list[str], watch_fd: int | None = None) -> None:
        """Start `redoxcap up OPTIONS` in a new session.

        Args:
            state_dir: its state directory (created, mode 0700).
            options: `up` options (see :func:`up_options`).
            watch_fd: an fd it inherits and stops at when it reaches EOF.

        Raises:
            Failure: EXIT_BOOT_FAILED: the process could not be started.
        """
        self.state_dir = state_dir
        try:
            self.process, self._ready_fd, self._pidfd = _start_up(state_dir, options, watch_fd)
        except OSError as exc:
            raise Failure(f"boot failed: {exc}", EXIT_BOOT_FAILED) from None

    @property
    def pid(self) -> int:
        """The supervisor's pid."""
        return self.process.pid

    def close(self) -> None:
        """Close the fds this object holds (the process is left as it is)."""
        for fd in (self._ready_fd, self._pidfd):
            if fd is not None:
                os.close(fd)
        self._ready_fd = self._pidfd = None

    def __enter__(self) -> Self:
        return self

    def __exit__(self, *exc_info: object) -> None:
        self.close()

    def wait(self, timeout: float) -> int | None:
        """Its exit code if it exits within timeout seconds, else None."""
        assert self._pidfd is not None
        if not readable(self._pidfd, timeout):
            return None
        return self.process.wait()

    def kill(self) -> None:
        """SIGKILL it and reap it."""
        self.process.kill()
        self.process.wait()

    def wait_until_up(self, quote_log: bool = True) -> None:
        """Wait for its readiness report; on none, end it and raise why it failed.

        Args:
            quote_log: end the message with the end of its log (False when the
                log is shown anyway).

        Raises:
            Failure: EXIT_ALREADY_RUNNING when another system holds the state
                directory, EXIT_BOOT_FAILED when it exited (with the end of
                its log) or did not come up within BOOT_TIMEOUT (then it is killed).
        """
        ready, self._ready_fd = self._ready_fd, None
        assert ready is not None
        try:
            answered = readable(ready, BOOT_TIMEOUT)
            if answered and os.read(ready, 16).startswith(b"up"):
                return
        finally:
            os.close(ready)
        # EOF without `up`: the supervisor is exiting, and its exit code says why
        code = self.wait(BOOT_TIMEOUT) if answered else None
        if code is None:
            self.kill()
            raise Failure(f"the system did not come up within {BOOT_TIMEOUT:.0f}s", EXIT_BOOT_FAILED)
        if code == EXIT_ALREADY_RUNNING:
            raise Failure(f"a system is already running at {self.state_dir}", EXIT_ALREADY_RUNNING)
        if not quote_log:
            raise Failure(f"the system failed to boot (exit {code})", EXIT_BOOT_FAILED)
        log = (self.state_dir / control.LOG_NAME).read_text(errors="replace")[-2000:]
        raise Failure(f"the system failed to boot (exit {code}):\n{log}", EXIT_BOOT_FAILED)


def _start_up(state_dir: Path, options: list[str],
              watch_fd: int | None) -> tuple[subprocess.Popen, int, int]:
    """Start `redoxcap up OPTIONS`; returns its process, its readiness pipe and a pidfd."""
    import subprocess

    state_dir.mkdir(parents=True, exist_ok=True, mode=0o700)
    ready_r, ready_w = os.pipe()
    argv = [*PYTHON, "-m", "redoxcap", "--state-dir", str(state_dir), "up", *options,
            "--ready-fd", str(ready_w)]
    pass_fds: tuple[int, ...] = (ready_w,)
    if watch_fd is not None:
        argv += ["--watch-fd", str(watch_fd)]
        pass_fds += (watch_fd,)
    try:
        with open(state_dir / control.LOG_NAME, "ab") as log:
            proc = subprocess.Popen(argv, stdin=subprocess.DEVNULL, stdout=log, stderr=log,
                                    start_new_session=True, pass_fds=pass_fds)
    except BaseException:
        os.close(ready_r)
        raise
    finally:
        os.close(ready_w)  # the child's copy alone keeps the pipe open
    try:
        # Not reaped until we wait for it, so this pidfd is our child's.
        return proc, ready_r, os.pidfd_open(proc.pid)
    except BaseException:
        os.close(ready_r)
        proc.kill()
        proc.wait()
        raise


def start_detached(state_dir: Path, cfg: config.Config, trace: bool = False) -> int:
    """Boot a system in the background and return its supervisor's pid once it is up.

    Raises:
        Failure: it could not be started or did not come up (see :class:`Supervisor`).
    """
    with Supervisor(state_dir, up_options(cfg, trace)) as supervisor:
        supervisor.wait_until_up()
        return supervisor.pid


def stop(state_dir: Path, wait: float = STOP_TIMEOUT) -> bool:
    """Ask the supervisor at state_dir to stop and wait until its process has exited.

    The process waited for is the one that answers on the socket (SO_PEERCRED,
    pinned with a pidfd before asking), never a pid read from a file.

    Returns:
        True if it exited by itself, False if it had to be killed after wait seconds.

    Raises:
        control.NotRunning: nothing answers at state_dir.
        control.ControlError: the supervisor refused or failed the request.
    """
    with control.connect(state_dir, 10.0) as (sock, token):
        try:
            pidfd = os.pidfd_open(control.peer_cred(sock)[0])
        except ProcessLookupError:
            raise control.NotRunning(f"no system is running at {state_dir}") from None
        try:
            # it answers after we hold the pidfd, so the pidfd is the supervisor's
            control.exchange(sock, token, "shutdown", 10.0, {})
            sock.close()
            if readable(pidfd, wait):
                return True
            signal.pidfd_send_signal(pidfd, signal.SIGKILL)
            readable(pidfd, wait)
            return False
        finally:
            os.close(pidfd)


@contextlib.contextmanager
def private_system(cfg: config.Config, log: Path | None = None,
                   meanwhile: Callable[[], object] | None = None) -> Iterator[Path]:
    """A system of its own for the block (a `run` with none up); yields its state directory.

    It stops when the block ends, or when this process dies (its watch pipe
    reaches EOF either way); its temporary state directory is removed, but
    not its log: it is appended to log, or, without one, what it says besides
    the supervisor's routine notes (lines written to /scheme/log, warnings,
    errors) goes to stderr.

    meanwhile, when given, is called once the supervisor has been started and
    before it is waited for: the caller's own preparations overlap the boot.

    Raises:
        Failure: it did not boot (see :class:`Supervisor`).
    """
    state_dir = Path(tempfile.mkdtemp(prefix="redoxcap-run-"))
    watch_r, watch_w = os.pipe()
    try:
        try:
            supervisor = Supervisor(state_dir, up_options(cfg), watch_r)
        finally:
            os.close(watch_r)
        with supervisor:
            try:
                if meanwhile is not None:
                    meanwhile()
                supervisor.wait_until_up(quote_log=log is not None)  # else _keep_log shows it
                yield state_dir
            finally:
                os.close(watch_w)  # the supervisor stops when this pipe reaches EOF
                watch_w = None
                if supervisor.wait(STOP_TIMEOUT) is None:
                    supervisor.kill()
    finally:
        if watch_w is not None:
            os.close(watch_w)
        _keep_log(state_dir / control.LOG_NAME, log)
        import shutil

        shutil.rmtree(state_dir, ignore_errors=True)


def _keep_log(path: Path, log: Path | None) -> None:
    """Save a private system's log before its state directory goes."""
    try:
        text = path.read_text(errors="replace")
    except OSError:
        return
    if log is not None:
        with open(log, "a", encoding="utf-8") as out:
            out.write(text)
        return
    routine = re.compile(r"^supervisor\[\d+\] INFO ")
    for line in text.splitlines():
        if line and not routine.match(line):
            print(line, file=sys.stderr)
