"""A system's life through the CLI: one per state directory, `down`, failed schemes and `restart`."""

from __future__ import annotations

import signal
import subprocess
from pathlib import Path

from supervisor import control
from supervisor.cli import EXIT_ALREADY_RUNNING
from tests.conftest import REDOXCAP, System, pid_alive, shut_down, wait_for

# -- one system per state directory ----------------------------------------------------


def start_up(state_dir: Path, root: Path, *options: str) -> subprocess.Popen:
    root.mkdir(exist_ok=True)
    return subprocess.Popen([*REDOXCAP, "--state-dir", str(state_dir), "up", "--root", str(root), *options],
                            stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)


def stop_all(procs: list[subprocess.Popen]) -> None:
    for p in procs:
        if p.poll() is None:
            p.kill()
        p.communicate()


def test_of_two_concurrent_detached_ups_exactly_one_wins(tmp_path):
    system = System(tmp_path / "state", tmp_path / "root")
    procs = [start_up(system.state_dir, system.root, "--detach") for _ in range(2)]
    try:
        results = [p.communicate(timeout=60) for p in procs]
        codes = sorted(p.returncode for p in procs)
        assert codes == [0, EXIT_ALREADY_RUNNING], results
        loser = next(err for p, (_, err) in zip(procs, results) if p.returncode)
        assert "already running" in loser
        # the loser removed nothing of the winner's: it answers and `down` stops it
        supervisor = system.status()["supervisor"]
    finally:
        stop_all(procs)
        shut_down(system)  # `down`: no process and no file but the log left
    assert not pid_alive(supervisor)


def test_of_two_concurrent_foreground_ups_exactly_one_wins(tmp_path):
    system = System(tmp_path / "state", tmp_path / "root")
    procs = [start_up(system.state_dir, system.root) for _ in range(2)]
    try:
        loser = wait_for(lambda: next((p for p in procs if p.poll() is not None), None), timeout=60)
        winner = next(p for p in procs if p is not loser)
        assert loser.returncode == EXIT_ALREADY_RUNNING, loser.communicate()
        assert "already running" in loser.communicate()[1]
        info = wait_for(lambda: control.is_running(system.state_dir) and system.status(), timeout=60)
        assert info["supervisor"] == winner.pid
        pids = system.pids()
        system.cli("down")
        assert winner.wait(timeout=30) == 0
    finally:
        stop_all(procs)
    assert not any(pid_alive(pid) for pid in pids)
    assert list(system.state_dir.iterdir()) == []  # a foreground up writes no log


def test_a_killed_supervisor_leaves_no_stale_lock(tmp_path):
    system = System(tmp_path / "state", tmp_path / "root")
    proc = start_up(system.state_dir, system.root)
    try:
        wait_for(lambda: control.is_running(system.state_dir), timeout=60)
        pids = system.pids()
        proc.send_signal(signal.SIGKILL)
        proc.wait()
        # without the supervisor's kernel capability the router exits, and with it every daemon
        for pid in pids:
            wait_for(lambda pid=pid: not pid_alive(pid), timeout=20)
    finally:
        stop_all([proc])
    assert (system.state_dir / control.TOKEN_NAME).exists()  # stale, nobody removed it
    system.cli("up", "--detach", "--root", str(system.root))
    try:
        assert system.status()["supervisor"] not in pids
    finally:
        shut_down(system)


def test_down_waits_until_the_supervisor_has_exited(tmp_path):
    from tests.conftest import boot

    system = boot(tmp_path)
    supervisor = system.status()["supervisor"]
    try:
        system.cli("down")
        assert not pid_alive(supervisor)  # at once: `down` returned after the exit
    finally:
        shut_down(system)


