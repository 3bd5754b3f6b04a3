"""A running system, driven through the real CLI: `booted` starts one, `shut_down` checks it."""

from __future__ import annotations

import contextlib
import dataclasses
import os
import signal
import subprocess
import sys
import warnings
from collections.abc import Iterator
from pathlib import Path
from typing import Any

from redoxcap.testing.waiting import pid_alive

REDOXCAP = [sys.executable, "-m", "redoxcap"]
"""The command line that starts the real CLI with this interpreter."""


def redoxcap(state_dir: Path, *args: str, check: bool = True, timeout: float = 60,
             **kwargs: Any) -> subprocess.CompletedProcess:
    """Run the real CLI, `redoxcap --state-dir STATE_DIR ARGS...`, and capture its output.

    Args:
        state_dir: The system's state directory.
        *args: The command and its options, e.g. `"status", "--json"`.
        check: Fail the test when the command exits with anything but 0.
        timeout: Seconds before the command is killed and the test fails.
        **kwargs: Passed to `subprocess.run` (e.g. `input`, `env`).

    Returns:
        The finished process, with `stdout` and `stderr` as text.

    Raises:
        AssertionError: check is set and the command failed; the message holds its output.
    """
    proc = subprocess.run([*REDOXCAP, "--state-dir", str(state_dir), *args], capture_output=True,
                          text=True, timeout=timeout, check=False, **kwargs)
    if check and proc.returncode != 0:
        raise AssertionError(f"redoxcap {' '.join(args)} exited {proc.returncode}:\n"
                             f"{proc.stdout}\n{proc.stderr}")
    return proc

class StatusTimeoutWarning(UserWarning):
    """A scheme did not answer the router's status query in time (see `System.status`)."""

@dataclasses.dataclass
class System:
    """A running system, driven through the real CLI.

    Attributes:
        state_dir: Its state directory (control socket, token and log).
        root: The host directory its `file` scheme serves (for an isolated
            client: the test's own directory in it).
        started: Pids of every process the system ran, collected from
            `status` by `pids()`; `shut_down` checks that each is gone.
    """

    state_dir: Path
    root: Path
    started: set[int] = dataclasses.field(default_factory=set, repr=False)
    _background: list[subprocess.Popen] = dataclasses.field(default_factory=list, repr=False)

    def cli(self, *args: str, **kwargs: Any) -> subprocess.CompletedProcess:
        """`redoxcap --state-dir STATE_DIR ARGS...`; see `redoxcap()`."""
        return redoxcap(self.state_dir, *args, **kwargs)

    def run(self, *command: str, check: bool = True, **kwargs: Any) -> subprocess.CompletedProcess:
        """`redoxcap run [OPTIONS] -- COMMAND` in this system.

        Args:
            *command: Options of `run`, then `"--"` and the command.
            check: Fail the test when the run exits with anything but 0.
            **kwargs: See `redoxcap()`.
        """
        return self.cli("run", *command, check=check, **kwargs)

    def python(self, code: str, *options: str, check: bool = True,
               **kwargs: Any) -> subprocess.CompletedProcess:
        """Run Python code as a client: `redoxcap run OPTIONS -- python -c CODE`.

        Args:
            code: The program; it uses `import rt` to reach the system.
            *options: Options of `run`, e.g. `"--ns", "file,zero"`.
            check: Fail the test when the client exits with anything but 0.
            **kwargs: See `redoxcap()`.
        """
        return self.run(*options, "--", sys.executable, "-c", code, check=check, **kwargs)

    def start(self, *command: str, **kwargs: Any) -> subprocess.Popen:
        """Start `redoxcap [ARGS...]` in the background, in a session of its own.

        For a client that must run while the test does something else, e.g.
        `system.start("run", "--", sys.executable, "server.py")`. Its stdin,
        stdout and stderr are pipes in text mode unless kwargs says otherwise.
        Whatever is still running when the system's fixture ends is killed
        (the whole process group) before the system is stopped.

        Args:
            *command: The CLI's arguments after `--state-dir STATE_DIR`.
            **kwargs: Passed to `subprocess.Popen`.

        Returns:
            The started process.
        """
        options: dict[str, Any] = {"stdin": subprocess.PIPE, "stdout": subprocess.PIPE,
                                   "stderr": subprocess.PIPE, "text": True}
        options.update(kwargs)
        proc = subprocess.Popen([*REDOXCAP, "--state-dir", str(self.state_dir), *command],
                                start_new_session=True, **options)
        self._background.append(proc)
        return proc

    def stop_background(self) -> None:
        """Kill every process `start` started that is still running, and reap them all."""
        while self._background:
            proc = self._background.pop()
            if proc.poll() is None:
                with contextlib.suppress(ProcessLookupError):
                    os.killpg(proc.pid, signal.SIGKILL)
            try:
                proc.communicate(timeout=10)
            except ValueError:  # the test closed a pipe of its own: reaped all the same
                proc.wait(timeout=10)
            except subprocess.TimeoutExpired:
                pass

    def status(self) -> dict:
        """What `redoxcap status --json` shows: the supervisor's pid and one dict per daemon.

        Asked over the control socket from this process (what the CLI does,
        without starting an interpreter for it: tests ask often).

        The router asks each scheme for its own count of handles and gives up
        on a scheme after 3 s, showing `scheme_handles` as None: a status
        taken while a scheme is busy costs that long (one whose daemon died
        before it could be asked shows None at once). It does not pass
        silently: a `StatusTimeoutWarning` names the schemes.

        Raises:
            AssertionError: the system is not running or did not answer.
        """
        from redoxcap import control
        from redoxcap.status import fetch

        def request(state_dir: Path, op: str, timeout: float, **args: Any) -> tuple[dict, list[int]]:
            reply, fds = control.request(state_dir, op, timeout, **args)
            for fd in fds:
                os.close(fd)
            return reply, []

        try:
            info = fetch(self.state_dir, request=request)
        except control.ControlError as exc:
            raise AssertionError(f"status: {exc}") from None
        self.started.update([info["supervisor"], *(d["pid"] for d in info["daemons"] if d.get("pid")),
                             *info.get("runners", [])])
        silent = [d["name"] for d in info["daemons"]
                  if "scheme_handles" in d and d["scheme_handles"] is None and d.get("pid")]
        if silent:
            warnings.warn(StatusTimeoutWarning(f"{', '.join(silent)} did not answer the router's "
                                               "status query (its daemon was gone, or busy for "
                                               "3 s)"), stacklevel=2)
        return info

    def daemon(self, name: str) -> dict:
        """One daemon's entry in `status()`: pid, restarts, state and the router's counters."""
        return next(d for d in self.status()["daemons"] if d["name"] == name)

    def pids(self) -> list[int]:
        """The supervisor's pid and those of every running daemon, and of its runners (the
        processes doing `redoxcap run`s for it, and a spare)."""
        info = self.status()
        return [info["supervisor"]] + [d["pid"] for d in info["daemons"] if d.get("pid")] \
            + info.get("runners", [])

    def log(self) -> str:
        """What the supervisor and the daemons logged so far (empty for a foreground `up`)."""
        from redoxcap import control

        path = self.state_dir / control.LOG_NAME
        return path.read_text(errors="replace") if path.exists() else ""

def shut_down(system: System) -> None:
    """Stop system with `redoxcap down` and check that it left nothing behind.

    Processes started with `System.start` are killed first. Every process
    the system was seen running (`System.started`, plus what `status` says
    now) must be gone once `down` returns; a survivor is killed and the test
    fails. So it does if `down` left files other than the log in the state
    directory, or if anything logged a traceback.

    Args:
        system: The system; it need not be running any more.

    Raises:
        AssertionError: something survived, was left behind or crashed.
    """
    from redoxcap import control

    try:
        system.stop_background()
    finally:  # the system goes down whatever happened to the test's own processes
        with contextlib.suppress(AssertionError):  # not running (any more): nothing to ask
            system.pids()
        system.cli("down", check=False)
    survivors = sorted(pid for pid in system.started if pid_alive(pid))
    for pid in survivors:
        with contextlib.suppress(ProcessLookupError):
            os.kill(pid, signal.SIGKILL)
    assert survivors == [], f"processes {survivors} survived `redoxcap down`"
    if system.state_dir.exists():
        leftovers = sorted(p.name for p in system.state_dir.iterdir() if p.name != control.LOG_NAME)
        assert leftovers == [], f"`down` left {leftovers} in the state directory"
    log = system.log()
    assert "Traceback" not in log, f"a daemon logged a traceback:\n{log}"

@contextlib.contextmanager
def booted(tmp_path: Path, *up_options: str) -> Iterator[System]:
    """Boot a system with `redoxcap up --detach` for the block, and always stop it.

    The state directory is `tmp_path/state` and the file root `tmp_path/root`
    (created). The system is stopped by `shut_down` however the block ends;
    when the block raised, that exception is the one reported, with any
    shutdown failure added as a note.

    Args:
        tmp_path: A directory of the test's own.
        *up_options: More options for `up`, e.g. `"--trace"` or
            `"--mount", "docs=/srv/docs:ro"`.

    Yields:
        The running system.
    """
    root = tmp_path / "root"
    root.mkdir(exist_ok=True)
    system = System(tmp_path / "state", root)
    try:
        system.cli("up", "--detach", "--root", str(root), *up_options)
        system.pids()
        yield system
    except BaseException as exc:
        try:
            shut_down(system)
        except AssertionError as problem:
            exc.add_note(f"and stopping the system failed: {problem}")
        raise
    shut_down(system)
