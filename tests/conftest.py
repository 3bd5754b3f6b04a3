"""Fixtures that boot real systems: kernel, nsmgr and scheme daemons as processes.

`system` boots one with `redoxcap up --detach` in a private state directory
and file root, and stops it afterwards with `redoxcap down`, checking that
every process it started is gone and that no daemon logged a traceback.
`client` additionally installs that system's root namespace and cwd in this
test process's rt, so a test can call rt directly.
"""

from __future__ import annotations

import contextlib
import json
import os
import signal
import socket
import subprocess
import sys
import threading
import time
from dataclasses import dataclass
from pathlib import Path

import pytest

import rt
from redoxcap import control
from wire import protocol as P

REDOXCAP = [sys.executable, "-m", "redoxcap"]


def redoxcap(state_dir: Path, *args: str, check: bool = True, timeout: float = 60, **kw) -> subprocess.CompletedProcess:
    """Run the real CLI against state_dir."""
    proc = subprocess.run([*REDOXCAP, "--state-dir", str(state_dir), *args],
                          capture_output=True, text=True, timeout=timeout, check=False, **kw)
    if check and proc.returncode != 0:
        raise AssertionError(f"redoxcap {' '.join(args)} exited {proc.returncode}:\n{proc.stdout}\n{proc.stderr}")
    return proc


def pid_alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    # a zombie is gone for our purposes
    try:
        with open(f"/proc/{pid}/stat") as f:
            return f.read().split(") ")[-1][0] != "Z"
    except FileNotFoundError:
        return False


@dataclass
class System:
    state_dir: Path
    root: Path

    def cli(self, *args: str, **kw) -> subprocess.CompletedProcess:
        return redoxcap(self.state_dir, *args, **kw)

    def run(self, *command: str, check: bool = True, **kw) -> subprocess.CompletedProcess:
        """`redoxcap run [options] -- command`; options come before a '--' in command."""
        return self.cli("run", *command, check=check, **kw)

    def python(self, code: str, *options: str, check: bool = True, **kw) -> subprocess.CompletedProcess:
        """Run a Python client program through `redoxcap run`."""
        return self.run(*options, "--", sys.executable, "-c", code, check=check, **kw)

    def status(self) -> dict:
        return json.loads(self.cli("status", "--json").stdout)

    def daemon(self, name: str) -> dict:
        return next(d for d in self.status()["daemons"] if d["name"] == name)

    def pids(self) -> list[int]:
        info = self.status()
        return [info["supervisor"]] + [d["pid"] for d in info["daemons"] if d.get("pid")]

    def log(self) -> str:
        path = self.state_dir / control.LOG_NAME
        return path.read_text(errors="replace") if path.exists() else ""


def wait_for(predicate, timeout: float = 10.0, interval: float = 0.05):
    """Poll predicate until it returns a truthy value; fail after timeout."""
    deadline = time.monotonic() + timeout
    while True:
        value = predicate()
        if value:
            return value
        if time.monotonic() > deadline:
            raise AssertionError(f"condition not met within {timeout}s: {predicate}")
        time.sleep(interval)


def boot(tmp_path: Path, *extra: str) -> System:
    state_dir = tmp_path / "state"
    root = tmp_path / "root"
    root.mkdir(exist_ok=True)
    redoxcap(state_dir, "up", "--detach", "--root", str(root), *extra)
    return System(state_dir, root)


def shut_down(system: System) -> None:
    """Stop system and check it left nothing behind."""
    try:
        pids = system.pids()
    except AssertionError:
        pids = []
    system.cli("down", check=False)
    for pid in pids:
        if pid_alive(pid):
            os.kill(pid, signal.SIGKILL)
            raise AssertionError(f"process {pid} survived `redoxcap down`")
    leftovers = [p.name for p in system.state_dir.iterdir() if p.name != control.LOG_NAME]
    assert leftovers == [], f"`down` left {leftovers} in the state directory"
    log = system.log()
    assert "Traceback" not in log, f"a daemon logged a traceback:\n{log}"


@pytest.fixture
def system(tmp_path: Path):
    sys_ = boot(tmp_path)
    try:
        yield sys_
    finally:
        shut_down(sys_)


@pytest.fixture
def client(system: System):
    """The system, with this process's rt holding its root namespace and `/` as cwd."""
    with _as_client(system):
        yield system


@pytest.fixture(scope="module")
def shared_system(tmp_path_factory):
    """One system for a whole test module: for tests that leave nothing behind them."""
    sys_ = boot(tmp_path_factory.mktemp("shared"))
    try:
        yield sys_
    finally:
        shut_down(sys_)


@pytest.fixture
def shared_client(shared_system: System):
    """`client` on the module's shared system."""
    with _as_client(shared_system):
        yield shared_system


@contextlib.contextmanager
def _as_client(system: System):
    _, fds = control.request(system.state_dir, "namespace")
    rt.setup(fds[0], None)
    rt.setup(fds[0], rt.open("/", rt.O_DIRECTORY), "/")
    try:
        yield
    finally:
        rt.setup(None, None)


class HostileScheme:
    """A scheme served by hand from a thread of the test process, to play a server that lies.

    Registered in the test's namespace as name (`rt.mkscheme`); every OPENAT is
    answered with handle 1, every other request with what answer(op, args)
    returns: (status, raw msgpack body, fds to attach), or None for no answer.
    """

    def __init__(self, name: str, answer) -> None:
        self.sock = socket.socket(fileno=rt.mkscheme(name))
        self.answer = answer
        self.thread = threading.Thread(target=self._serve, daemon=True)
        self.thread.start()

    def _serve(self) -> None:
        while True:
            try:
                data, anc, _, _ = self.sock.recvmsg(P.MAX_FRAME, P.CMSG_FDS)
            except OSError:
                return
            if not data:
                return
            P.close_fds(P.parse_ancillary(anc)[0])
            req_id, _handle, _pid, _uid, _gid, op, nrefs = P.SREQUEST.unpack_from(data)
            if op == P.CLOSE:
                continue
            args = P.unpack(data[P.SREQUEST.size + 8 * nrefs :])
            reply = self.answer(op, args)
            if op == P.OPENAT and (reply is None or reply[0] == P.OK):
                fds = reply[2] if reply else []
                body = P.SREPLY.pack(req_id, P.NEW_HANDLE) + P.NEW_HANDLE_HDR.pack(1, 0) + P.pack(None)
            elif reply is None:
                continue
            else:
                status, raw, fds = reply
                body = P.SREPLY.pack(req_id, status) + raw
            try:
                self.sock.sendmsg([body], P.fds_ancillary(fds))
            finally:
                P.close_fds(fds)

    def close(self) -> None:
        self.sock.shutdown(socket.SHUT_RDWR)
        self.thread.join(timeout=10)
        self.sock.close()


@pytest.fixture
def hostile_scheme():
    """make(name, answer) -> a HostileScheme registered as name; all are stopped afterwards."""
    made: list[HostileScheme] = []

    def make(name: str, answer) -> HostileScheme:
        made.append(HostileScheme(name, answer))
        return made[-1]

    yield make
    for scheme in made:
        scheme.close()
