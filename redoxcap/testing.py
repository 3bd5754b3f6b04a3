"""pytest plugin: boot real redoxcap systems and test your own clients and schemes in them.

Installed with the package as the `pytest11` entry point `redoxcap`, so a
test file needs no import to use the fixtures:

- `redoxcap_system`: a private system (kernel, nsmgr and every scheme daemon)
  for one test, in a fresh state directory and file root under `tmp_path`.
- `redoxcap_client`: the same, with the test process's rt holding that
  system's root namespace and `/` as its cwd, so the test can call rt.
- `redoxcap_module_system`: one system shared by every test of a module.
  Cheaper (a boot takes seconds), for tests that leave nothing behind.
- `redoxcap_module_client`: `redoxcap_client` on the module's system.
- `redoxcap_isolated_client`: a client of the module's system that sees a
  fresh, empty directory of its own as the `file` scheme (a namespace forked
  from the root one), so tests sharing a system cannot see each other's files
  or names.

Every system is stopped with `redoxcap down` when its fixture ends, whatever
the test did, and the test fails if a process survived or a daemon logged a
traceback. The helpers are public too: `booted()` for a system with options
of its own, `wait_for()`, `finish()` for a background client, `free_port()`,
and `System` with `run`, `python`, `start`,
`status`, `daemon` and `log`.

Example::

    def test_my_client_writes_its_report(redoxcap_system):
        redoxcap_system.run("--", sys.executable, "my_client.py")
        assert (redoxcap_system.root / "report.txt").read_text() == "ok\\n"
"""

from __future__ import annotations

import contextlib
import dataclasses
import errno
import itertools
import os
import select
import signal
import socket
import subprocess
import sys
import time
import warnings
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any, TypeVar

import pytest

__all__ = [
    "REDOXCAP",
    "StatusTimeoutWarning",
    "System",
    "booted",
    "finish",
    "free_port",
    "holdings",
    "installed",
    "isolated",
    "no_new_traceback",
    "nobody_listens",
    "pid_alive",
    "redoxcap",
    "settled",
    "shut_down",
    "wait_exited",
    "wait_for",
]

REDOXCAP = [sys.executable, "-m", "redoxcap"]
"""The command line that starts the real CLI with this interpreter."""

T = TypeVar("T")


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


def pid_alive(pid: int) -> bool:
    """Whether process pid exists and is not a zombie."""
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    try:
        with open(f"/proc/{pid}/stat") as f:
            return f.read().rsplit(") ", 1)[-1][0] != "Z"
    except FileNotFoundError:
        return False


def wait_exited(pid: int, timeout: float = 10.0) -> None:
    """Wait until process pid has exited (on a pidfd: no polling); any process, not only a child.

    Args:
        pid: The process; one that is already gone returns at once.
        timeout: Seconds before the test fails.

    Raises:
        AssertionError: pid still runs after timeout seconds.
    """
    try:
        pidfd = os.pidfd_open(pid)
    except ProcessLookupError:
        return
    try:
        if not select.select([pidfd], [], [], timeout)[0]:
            raise AssertionError(f"process {pid} still runs after {timeout}s")
    finally:
        os.close(pidfd)


def wait_for(predicate: Callable[[], T], timeout: float = 10.0, interval: float = 0.05) -> T:
    """Call predicate until it returns a truthy value, and return that value.

    For conditions nothing can be waited on for, such as a counter in `status`.

    Args:
        predicate: Asked again every interval seconds.
        timeout: Seconds before the test fails.
        interval: Seconds between two calls.

    Returns:
        The first truthy value predicate returned.

    Raises:
        AssertionError: predicate stayed falsy for timeout seconds.
    """
    deadline = time.monotonic() + timeout
    while True:
        value = predicate()
        if value:
            return value
        if time.monotonic() > deadline:
            raise AssertionError(f"condition not met within {timeout}s: {predicate}")
        time.sleep(interval)


def finish(proc: subprocess.Popen, timeout: float = 30) -> str:
    """Let a background client (`System.start`) end and return its stdout.

    Closes its stdin (a client waiting on it goes on), and kills its whole
    process group if it has not ended after timeout seconds.

    Raises:
        AssertionError: it exited with a status other than 0 (its stderr says why).
        subprocess.TimeoutExpired: it did not end in time.
    """
    try:
        out, err = proc.communicate(timeout=timeout)
    except subprocess.TimeoutExpired:
        os.killpg(proc.pid, signal.SIGKILL)
        proc.communicate()
        raise
    assert proc.returncode == 0, err
    return out


def free_port(kind: int = socket.SOCK_STREAM, host: str = "127.0.0.1") -> int:
    """A port of host (IPv4 or IPv6) that nothing of kind uses right now."""
    family = socket.AF_INET6 if ":" in host else socket.AF_INET
    with socket.socket(family, kind) as s:
        s.bind((host, 0))
        return s.getsockname()[1]


def nobody_listens(port: int) -> bool:
    """Whether a plain TCP connect to 127.0.0.1:port is refused."""
    with socket.socket() as probe:
        return probe.connect_ex(("127.0.0.1", port)) == errno.ECONNREFUSED


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
            with contextlib.suppress(subprocess.TimeoutExpired):
                proc.communicate(timeout=10)

    def status(self) -> dict:
        """What `redoxcap status --json` shows: the supervisor's pid and one dict per daemon.

        Asked over the control socket from this process (what the CLI does,
        without starting an interpreter for it: tests ask often).

        The router asks each scheme for its own count of handles and gives up
        on a scheme after 3 s, showing `scheme_handles` as None: a status
        taken while a scheme is busy or dying costs that long. It does not
        pass silently: a `StatusTimeoutWarning` names the schemes.

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
        self.started.update([info["supervisor"], *(d["pid"] for d in info["daemons"] if d.get("pid"))])
        silent = [d["name"] for d in info["daemons"]
                  if "scheme_handles" in d and d["scheme_handles"] is None and d.get("pid")]
        if silent:
            warnings.warn(StatusTimeoutWarning(f"{', '.join(silent)} did not answer the router's "
                                               "status query (it waits up to 3 s)"), stacklevel=2)
        return info

    def daemon(self, name: str) -> dict:
        """One daemon's entry in `status()`: pid, restarts, state and the router's counters."""
        return next(d for d in self.status()["daemons"] if d["name"] == name)

    def pids(self) -> list[int]:
        """The supervisor's pid and those of every running daemon."""
        info = self.status()
        return [info["supervisor"]] + [d["pid"] for d in info["daemons"] if d.get("pid")]

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

    system.stop_background()
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


@contextlib.contextmanager
def installed(system: System, namespace: int | None = None) -> Iterator[System]:
    """Make this process an rt client of system for the block: a namespace, and `/` as cwd.

    Args:
        system: The running system.
        namespace: A namespace fd to install, which the block then owns; by
            default the system's root namespace.

    Yields:
        system.
    """
    import rt
    from redoxcap import control

    if namespace is None:
        _, (namespace,) = control.request(system.state_dir, "namespace")
    rt.setup(namespace, None)
    try:
        rt.setup(namespace, rt.open("/", rt.O_DIRECTORY), "/")
        yield system
    finally:
        rt.setup(None, None)


def holdings(system: System) -> dict[str, tuple[int, int]]:
    """What the router holds for each scheme: (capabilities, handles)."""
    return {d["name"]: (d.get("capabilities"), d.get("handles"))
            for d in system.status()["daemons"] if d["name"] != "kernel"}


@contextlib.contextmanager
def no_new_traceback(system: System) -> Iterator[None]:
    """Fail if a daemon of system logs a traceback during the block.

    On a system shared by several tests this names the test that caused it;
    `shut_down` checks the whole log only when the system stops.

    Raises:
        AssertionError: a traceback was logged during the block (checked only
            when the block itself succeeded).
    """
    start = len(system.log())
    yield
    logged = system.log()[start:]
    assert "Traceback" not in logged, f"a daemon logged a traceback:\n{logged}"


@contextlib.contextmanager
def isolated(system: System, name: str) -> Iterator[System]:
    """Make this process a client of system that sees only a directory of its own as `file`.

    The directory `name` is created in the system's root; the namespace is
    forked from the root one with every name, and its `file` entry replaced
    by that directory (a capability-style bind mount: nothing reached through
    it leaves the directory). Other names (zero, tcp, uds...) are shared.
    `rt.fpath` still answers from the file scheme's own root, so a file `/f`
    shows as `/scheme/file/NAME/f`.

    Args:
        system: The running system.
        name: The directory's name in the system's root; must not exist.

    Yields:
        A view of system whose `root` is the directory.
    """
    import rt

    (system.root / name).mkdir()
    with installed(system):
        own = rt.mkns(None, perms=rt.PERM_ALL)
        box = rt.open(f"/{name}", rt.O_DIRECTORY)
        try:
            rt.unregister(own, "file")
            rt.register(own, "file", box)
        except BaseException:
            rt.close(own)
            raise
        finally:
            rt.close(box)
    view = dataclasses.replace(system, root=system.root / name, _background=[])
    try:
        with no_new_traceback(system), installed(view, own):
            yield view
    finally:
        view.stop_background()


def settled(system: System, before: dict[str, tuple[int, int]], timeout: float = 10) -> None:
    """Wait until the router holds, for every scheme, no more than `before` (from `holdings`).

    Closes reach the router asynchronously, so this waits a moment for them;
    and "no more" rather than "as much", since closes of an earlier test may
    still have been on their way when `before` was taken.

    Raises:
        AssertionError: a scheme still has more capabilities or handles after
            timeout seconds.
    """
    def no_more() -> bool:
        now = holdings(system)
        return all(now.get(name, (0, 0))[0] <= caps and now.get(name, (0, 0))[1] <= handles
                   for name, (caps, handles) in before.items())

    try:
        wait_for(no_more, timeout=timeout)
    except AssertionError:
        raise AssertionError(f"capabilities were left open: (capabilities, handles) per scheme "
                             f"were {before}, are {holdings(system)}") from None


_FAILED = pytest.StashKey[bool]()


@pytest.hookimpl(hookwrapper=True)
def pytest_runtest_makereport(item: pytest.Item, call: pytest.CallInfo) -> Iterator[None]:
    """Note on the item whether the test itself failed (its fixtures then skip their checks)."""
    outcome = yield
    report = outcome.get_result()
    if report.when == "call" and report.failed:
        item.stash[_FAILED] = True


def _test_directory_name(request: pytest.FixtureRequest) -> str:
    """A name for the test's own directory: its name, made safe, and unique in the session."""
    safe = "".join(c if c.isalnum() or c in "-_." else "_" for c in request.node.name)[:100]
    return f"{safe}-{next(_numbers)}"


_numbers = itertools.count(1)


@pytest.fixture
def redoxcap_system(tmp_path: Path) -> Iterator[System]:
    """A private system for this test, stopped and checked afterwards (see `booted`)."""
    with booted(tmp_path) as system:
        yield system


@pytest.fixture
def redoxcap_client(redoxcap_system: System) -> Iterator[System]:
    """`redoxcap_system`, with this process's rt holding its root namespace and `/` as cwd."""
    with installed(redoxcap_system):
        yield redoxcap_system


@pytest.fixture(scope="module")
def redoxcap_module_system(tmp_path_factory: pytest.TempPathFactory) -> Iterator[System]:
    """One system for every test of the module that asks for it; for tests that leave nothing behind."""
    with booted(tmp_path_factory.mktemp("redoxcap")) as system:
        yield system


@pytest.fixture
def redoxcap_module_client(redoxcap_module_system: System,
                           request: pytest.FixtureRequest) -> Iterator[System]:
    """`redoxcap_client` on the module's shared system: its root namespace, `/` as cwd.

    Afterwards the router must hold no more capabilities and handles per
    scheme than before the test (unless the test failed anyway).
    """
    before = holdings(redoxcap_module_system)
    with no_new_traceback(redoxcap_module_system), installed(redoxcap_module_system):
        yield redoxcap_module_system
    if not request.node.stash.get(_FAILED, False):
        settled(redoxcap_module_system, before)


@pytest.fixture
def redoxcap_isolated_client(redoxcap_module_system: System,
                             request: pytest.FixtureRequest) -> Iterator[System]:
    """A client of the module's shared system that sees a fresh directory of its own as `file`.

    The yielded system's `root` is that directory on the host; `run` and
    `python` still start clients in the whole system (its root namespace).
    Afterwards the router must hold no more capabilities and handles per
    scheme than before the test (unless the test failed anyway), so the next
    test finds the system as this one did.
    """
    before = holdings(redoxcap_module_system)
    with isolated(redoxcap_module_system, _test_directory_name(request)) as view:
        yield view
    if not request.node.stash.get(_FAILED, False):
        settled(redoxcap_module_system, before)
