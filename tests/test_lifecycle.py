"""A system's life through the CLI: one per state directory, `down`, daemons that die
and come back (a scheme, nsmgr) or take the system with them (the kernel router),
schemes that fail for good, and `restart`.

Every test here kills, restarts or stops its system, so each has one of its own.
"""

from __future__ import annotations

import errno
import os
import signal
import subprocess
from pathlib import Path

import pytest

import rt
from redoxcap import control
from redoxcap.config import Config
from redoxcap.exits import EXIT_ALREADY_RUNNING
from redoxcap.system import MAX_RESTARTS_IN_WINDOW
from redoxcap.testing import (
    REDOXCAP,
    System,
    booted,
    pid_alive,
    redoxcap,
    shut_down,
    wait_exited,
    wait_for,
)

BUILTIN = sorted(Config().schemes)  # what a default system registers

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
    with booted(tmp_path) as again:  # the same state directory and root
        assert again.status()["supervisor"] not in pids


def test_down_waits_until_the_supervisor_has_exited(tmp_path):
    with booted(tmp_path) as system:
        supervisor = system.status()["supervisor"]
        system.cli("down")
        assert not pid_alive(supervisor)  # at once: `down` returned after the exit


# -- daemons that die ------------------------------------------------------------------


def test_a_killed_scheme_comes_back_and_old_fds_fail_cleanly(redoxcap_client):
    (redoxcap_client.root / "f").write_text("before")
    old = rt.open("/f")  # the file scheme keeps its handles across a restart (test_restart.py)
    zero = rt.open("/scheme/zero")  # zero keeps nothing
    victim = redoxcap_client.daemon("zero")["pid"]
    os.kill(victim, signal.SIGKILL)
    wait_exited(victim)  # a status asked of a dying scheme would wait 3 s for its answer
    wait_for(lambda: redoxcap_client.daemon("zero")["restarts"] == 1 and redoxcap_client.daemon("zero")["pid"])
    assert redoxcap_client.daemon("zero")["pid"] != victim
    with pytest.raises(OSError) as info:
        rt.read(zero, 10)  # its handle died with the daemon: an errno, not a hang
    assert info.value.errno == errno.EIO
    rt.close(zero)
    assert rt.read(old, 10) == b"before"
    rt.close(old)
    with rt.open_file("/f") as f:  # the namespace's root capability still works
        assert f.read() == "before"
    result = redoxcap_client.python("import rt; print(rt.listdir('/'))")
    assert result.stdout.strip() == "['f']"


def test_a_killed_nsmgr_comes_back_with_every_scheme_registered(redoxcap_system):
    victim = redoxcap_system.daemon("nsmgr")["pid"]
    os.kill(victim, signal.SIGKILL)
    wait_exited(victim)
    wait_for(lambda: redoxcap_system.daemon("nsmgr")["restarts"] == 1)
    result = redoxcap_system.python("import rt; print(rt.schemes())")
    assert result.stdout.strip() == str(BUILTIN)


def test_a_dead_kernel_router_stops_the_whole_system_cleanly(tmp_path):
    with booted(tmp_path) as system:
        pids = system.pids()
        kernel = system.daemon("kernel")["pid"]
        os.kill(kernel, signal.SIGKILL)
        for pid in pids:
            wait_exited(pid)
        assert sorted(p.name for p in system.state_dir.iterdir()) == [control.LOG_NAME]
        assert "the kernel router exited" in system.log()


def test_down_stops_everything_and_up_refuses_twice(tmp_path):
    with booted(tmp_path) as system:
        pids = system.pids()
        again = system.cli("up", "--detach", "--root", str(system.root), check=False)
        assert again.returncode == 4
        system.cli("down")
        for pid in pids:
            wait_for(lambda pid=pid: not pid_alive(pid))
        assert sorted(p.name for p in system.state_dir.iterdir()) == [control.LOG_NAME]
        gone = system.cli("status", check=False)
        assert gone.returncode == 3 and "no system is running" in gone.stderr


def children_of(pid: int) -> set[int]:
    with open(f"/proc/{pid}/task/{pid}/children") as f:
        return {int(p) for p in f.read().split()}


def test_the_daemons_are_forked_children_of_the_supervisor_and_go_with_the_system(tmp_path):
    """The router, nsmgr and every scheme come from the fork server (one interpreter that
    loaded them all), yet each is the supervisor's own child, named after its module, and
    `down` leaves neither them nor the fork server behind."""
    with booted(tmp_path) as system:
        info = system.status()
        supervisor = info["supervisor"]
        daemons = {d["name"]: d["pid"] for d in info["daemons"] if d.get("pid")}
        assert set(daemons) == {"kernel", "nsmgr", *BUILTIN}
        children = children_of(supervisor)
        assert set(daemons.values()) <= children
        for name, pid in daemons.items():
            comm = Path(f"/proc/{pid}/comm").read_text().strip()
            assert comm == name, (name, comm)
        # ps shows what each runs, not the fork server's command line
        shown = Path(f"/proc/{daemons['zero']}/cmdline").read_bytes().rstrip(b"\0").decode()
        assert " -m redoxcap.schemes.zero --channel-fd " in shown, shown
        servers = [p for p in children - set(daemons.values())
                   if b"redoxcap.forkserver" in Path(f"/proc/{p}/cmdline").read_bytes()]
        assert len(servers) == 1, children
        old = daemons["zero"]
        os.kill(old, signal.SIGKILL)  # a restart is forked too
        wait_exited(old)  # a status asked of a dying scheme has no answer from it
        wait_for(lambda: system.daemon("zero").get("pid") not in (None, old))
        new = system.daemon("zero")["pid"]
        assert new in children_of(supervisor)
        assert Path(f"/proc/{new}/comm").read_text().strip() == "zero"
        system.cli("down")
        for pid in [supervisor, *servers, *daemons.values(), new]:
            wait_for(lambda pid=pid: not pid_alive(pid))


# -- a scheme that failed for good ------------------------------------------------------

UDP_ECHO = """
import rt
server = rt.open("/scheme/udp/127.0.0.1/0", rt.O_CREAT | rt.O_RDWR)
port = rt.fpath(server).rsplit("/", 1)[1]
peer = rt.open(f"/scheme/udp/127.0.0.1/{port}", rt.O_RDWR)
rt.write(peer, b"ping")
assert rt.read(server, 100) == b"ping"
print("echo ok")
"""

OPEN_UDP = """
import rt, time
start = time.monotonic()
try:
    rt.open("/scheme/udp/127.0.0.1/9", rt.O_RDWR)
except OSError as exc:
    print(exc.errno, time.monotonic() - start)
"""


def daemon_info(system: System, name: str) -> dict:
    """One daemon's status, asked in-process (a CLI start would cost most of a restart window)."""
    reply, _ = control.request(system.state_dir, "status")
    return next(d for d in reply["status"]["daemons"] if d["name"] == name)


def kill_until_failed(system: System, name: str) -> dict:
    """SIGKILL name's daemon each time it comes back, until the supervisor gives up on it."""
    info = daemon_info(system, name)
    for _ in range(MAX_RESTARTS_IN_WINDOW + 1):
        assert info["state"] == "running", info
        os.kill(info["pid"], signal.SIGKILL)
        old = info["pid"]
        wait_exited(old)  # a status asked of a dying scheme would wait 3 s for its answer

        def next_state(old: int = old) -> dict | None:
            d = daemon_info(system, name)
            return d if d["state"] == "failed" or d["pid"] not in (None, old) else None

        info = wait_for(next_state, interval=0.01)
    return info


def test_a_failed_scheme_breaks_only_its_own_clients_and_restart_brings_it_back(redoxcap_client):
    system = redoxcap_client
    # a namespace forked while udp was alive still holds udp's root
    _, (root_ns,) = control.request(system.state_dir, "namespace")
    forked = rt.mkns(None, ns=root_ns)
    os.close(root_ns)
    try:
        assert kill_until_failed(system, "udp")["state"] == "failed"
        assert "FAILED" in next(line for line in system.cli("status").stdout.splitlines()
                                if line.startswith("udp "))

        # a default run gets every live scheme and works
        run = system.python("import rt; print(rt.schemes())", check=False)
        assert run.returncode == 0, run.stderr
        assert eval(run.stdout) == [n for n in BUILTIN if n != "udp"]
        # the failed name is simply absent there: ENODEV at once, like any name a namespace lacks
        code, seconds = system.python(OPEN_UDP).stdout.split()
        assert int(code) == errno.ENODEV and float(seconds) < 1
        # where the name is still held, the router answers EIO at once: nothing hangs
        rt.setup(forked, None)
        with pytest.raises(OSError) as info:
            rt.open("/scheme/udp/127.0.0.1/9", rt.O_RDWR)
        assert info.value.errno == errno.EIO
        forked = None  # rt owns it now; the fixture closes it

        restarted = system.cli("restart", "udp")
        assert "udp restarted" in restarted.stdout
        udp = daemon_info(system, "udp")
        assert udp["state"] == "running" and pid_alive(udp["pid"])
        assert system.python(UDP_ECHO).stdout.strip() == "echo ok"
        assert "udp" in eval(system.python("import rt; print(rt.schemes())").stdout)
    finally:
        if forked is not None:
            os.close(forked)


def test_restart_replaces_a_running_daemon_and_refuses_unknown_names(redoxcap_system):
    old = daemon_info(redoxcap_system, "zero")["pid"]
    redoxcap_system.cli("restart", "zero")
    assert not pid_alive(old)
    new = daemon_info(redoxcap_system, "zero")
    assert new["state"] == "running" and new["pid"] != old and new["restarts"] == 1
    zeros = redoxcap_system.python("import rt; print(rt.read(rt.open('/scheme/zero'), 3))").stdout.strip()
    assert zeros == repr(b"\0\0\0")
    unknown = redoxcap_system.cli("restart", "nosuch", check=False)
    assert unknown.returncode == 1 and "no scheme named 'nosuch'" in unknown.stderr
    missing = redoxcap(redoxcap_system.state_dir / "elsewhere", "restart", "zero", check=False)
    assert missing.returncode == 3
