"""A confined `redoxcap run` with a system up is done by the system (a runner forked from its
warm fork server, redoxcap/runner.py), for the `run` process that asked (redoxcap/launch.py):
the program gets what that process would have given it, and ends with it."""

from __future__ import annotations

import errno
import glob
import os
import select
import signal
import socket
import subprocess
import sys
import tempfile
import time

import msgpack
import pytest

from redoxcap import control, launch
from redoxcap.testing import REDOXCAP, file_daemons, spare_prepared
from redoxcap.testing.clients import SPARE_TITLE
from redoxcap.testing.system import booted
from redoxcap.testing.waiting import pid_alive, wait_for
from redoxcap.wire import protocol as P


def comm(pid: int) -> str:
    with open(f"/proc/{pid}/comm") as f:
        return f.read().strip()


def parent(pid: int) -> int:
    with open(f"/proc/{pid}/stat", "rb") as f:
        return int(f.read().rpartition(b")")[2].split()[1])


def daemon_pids(system) -> set[int]:
    info = system.status()
    return {info["supervisor"], *(d["pid"] for d in info["daemons"])}


def test_the_lean_sides_spelling_of_its_control_request_and_answer_is_msgpack():
    token = "ab" * 32
    assert msgpack.unpackb(launch.run_request(token)) == {"token": token, "op": "run"}
    assert msgpack.unpackb(launch.run_request("x" * 300)) == {"token": "x" * 300, "op": "run"}
    assert msgpack.packb({"ok": True}) == launch.OK_REPLY



def test_the_callers_resource_limits_are_read_as_the_resource_module_reads_them():
    """The `redoxcap` process reads its limits from /proc/self/limits (loading the resource
    module cost a run 0.2 ms): as getrlimit says them, lowered ones and unlimited ones."""
    code = """if True:
        import resource
        from redoxcap.launch import resource_limits
        resource.setrlimit(resource.RLIMIT_NOFILE, (200, resource.getrlimit(resource.RLIMIT_NOFILE)[1]))
        resource.setrlimit(resource.RLIMIT_CORE, (0, 12345678))
        resource.setrlimit(resource.RLIMIT_FSIZE, (2 ** 40, resource.RLIM_INFINITY))
        got = resource_limits()
        for name in dir(resource):
            if name.startswith("RLIMIT_"):
                number = getattr(resource, name)
                assert got[number] == resource.getrlimit(number), (name, got[number])
        print(got[resource.RLIMIT_CORE], got[resource.RLIMIT_FSIZE])
    """
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=False)
    assert out.returncode == 0, out.stderr
    assert out.stdout.split("\n")[0] == f"(0, 12345678) ({2 ** 40}, -1)"

def test_a_run_starts_in_the_system_and_passes_on_output_input_and_exit_code(redoxcap_module_system):
    system = redoxcap_module_system
    out = system.run("--", "sh", "-c", "read line; echo got $line; echo oops >&2; exit 7",
                     input="hello\n", check=False)
    assert (out.returncode, out.stdout, out.stderr) == (7, "got hello\n", "oops\n")
    # the program is not a child of the `run` process but of the system's runner
    run = system.start("run", "--", "sleep", "30")
    try:
        program = wait_for(lambda: next((c["pid"] for c in system.status()["clients"]
                                         if c["argv"] == ["sleep", "30"]), None), timeout=30)
        the_run = parent(program)
        runner = parent(the_run)
        assert comm(the_run) == comm(runner) == "runner"
        assert parent(runner) == int((system.state_dir / control.PID_NAME).read_text())
        assert run.pid not in (program, the_run, runner)
    finally:
        system.stop_background()


@pytest.mark.parametrize("passed", [7, None], ids=["with --pass-fd", "from the prepared steps"])
def test_a_run_gets_the_callers_cwd_umask_limits_nice_value_and_pass_fd(redoxcap_module_system,
                                                                       tmp_path, passed):
    """Without --pass-fd, the program is the spare's fork made ahead (launcher.Starter),
    which takes on what the run took on from its caller after it was made."""
    if passed is None:
        spare_prepared(redoxcap_module_system)
    read, write = os.pipe()
    run = [*REDOXCAP, "--state-dir", str(redoxcap_module_system.state_dir), "run", "--dir", ".",
           *(["--pass-fd", "7"] if passed else []), "--", "sh", "-c",
           "umask; ulimit -n; pwd; python3 -c 'import os; print(os.nice(0))'; "
           + ("echo through the fd >&7" if passed else "echo through the fd")]
    # a caller with umask 077, at most 200 fds, nice 7, and the pipe at 7 (a number sh can name)
    caller = ("import os, resource; os.umask(0o077); os.nice(7 - os.nice(0)); "
              "resource.setrlimit(resource.RLIMIT_NOFILE, (200, resource.getrlimit(resource.RLIMIT_NOFILE)[1])); "
              f"os.dup2({write}, 7); os.execv({run[0]!r}, {run!r})")
    try:
        out = subprocess.run([sys.executable, "-c", caller], cwd=tmp_path, capture_output=True,
                             text=True, timeout=60, check=False, pass_fds=[write])
        os.close(write)
        write = -1
        assert out.returncode == 0, out.stderr
        assert out.stdout.split()[:4] == ["0077", "200", str(tmp_path), "7"]
        if passed:
            assert os.read(read, 100) == b"through the fd\n"
    finally:
        os.close(read)
        if write >= 0:
            os.close(write)


def test_what_the_program_leaves_running_ends_with_the_run(redoxcap_module_system):
    # (what is left holds none of run's output: run's end is not our wait for their EOF)
    out = redoxcap_module_system.run(
        "--", "sh", "-c", "sleep 300 >/dev/null 2>&1 & echo $!; "
                          "setsid sleep 300 >/dev/null 2>&1 & echo $!; sleep 0.2")
    left = [int(pid) for pid in out.stdout.split()]
    assert len(left) == 2
    # killed and reaped before `run` exits: gone, not even zombies
    assert not [pid for pid in left if os.path.exists(f"/proc/{pid}")]


def test_a_failure_is_said_on_the_callers_stderr_with_runs_exit_code(redoxcap_module_system):
    out = redoxcap_module_system.run("--", "no-such-program-here", check=False)
    assert out.returncode == 127
    assert "no-such-program-here" in out.stderr
    out = redoxcap_module_system.run("--ns", "nonesuch", "--", "true", check=False)
    assert out.returncode == 2
    assert "nonesuch" in out.stderr


def test_sigterm_to_run_reaches_the_program_and_its_code_comes_back(redoxcap_module_system):
    run = redoxcap_module_system.start(
        "run", "--", sys.executable, "-c",
        "import signal, sys; print('ready', flush=True); "
        "signal.signal(signal.SIGTERM, lambda *_: sys.exit(42)); signal.pause()")
    try:
        assert select.select([run.stdout], [], [], 30)[0]
        assert run.stdout.readline() == "ready\n"
        run.send_signal(signal.SIGTERM)
        assert run.wait(timeout=30) == 42
    finally:
        redoxcap_module_system.stop_background()


def test_an_unconfined_run_stays_in_the_callers_process(redoxcap_module_system):
    run = redoxcap_module_system.start("run", "--no-confine", "--", "sh", "-c", "echo $PPID")
    try:
        assert int(run.stdout.readline()) == run.pid
        assert run.wait(timeout=30) == 0
    finally:
        redoxcap_module_system.stop_background()


def _runner_request(state_dir, fds: list[int]) -> dict:
    token = (state_dir / control.TOKEN_NAME).read_text()
    with socket.socket(socket.AF_UNIX, socket.SOCK_SEQPACKET) as sock:
        sock.settimeout(30)
        sock.connect(str(state_dir / control.SOCKET_NAME))
        sock.sendmsg([launch.run_request(token)],
                       [(socket.SOL_SOCKET, socket.SCM_RIGHTS, b"".join(
                           fd.to_bytes(4, sys.byteorder) for fd in fds))] if fds else [])
        return msgpack.unpackb(sock.recv(4096))


@pytest.mark.parametrize("what", ["nothing", "garbage", "no fds", "a bad payload", "an fd that is no socket"])
def test_a_bad_run_request_ends_its_runner_and_harms_nothing(redoxcap_module_system, what):
    system = redoxcap_module_system
    before = daemon_pids(system)
    if what in ("an fd that is no socket", "no fds"):
        read, write = os.pipe()
        reply = _runner_request(system.state_dir, [read] if what != "no fds" else [])
        assert reply["ok"] is False and "socket" in reply["error"]
        os.close(read)
        os.close(write)
    else:
        ours, theirs = socket.socketpair(socket.AF_UNIX, socket.SOCK_SEQPACKET)
        with ours:
            if what == "garbage":
                ours.send(b"R" * 2)
            elif what == "a bad payload":
                bad = os.memfd_create("bad")
                os.write(bad, b"\x00 not marshal")
                ours.sendmsg([b"R"], [(socket.SOL_SOCKET, socket.SCM_RIGHTS, b"".join(
                    fd.to_bytes(4, sys.byteorder) for fd in (bad, bad)))])
                os.close(bad)
            assert _runner_request(system.state_dir, [theirs.fileno()]) == {"ok": True}
            theirs.close()
            # the runner says nothing (no exit code: no run) and goes; "nothing": at its deadline
            ours.settimeout(60)
            assert ours.recv(16) == b""
    assert system.cli("run", "--", "true").returncode == 0
    assert daemon_pids(system) == before  # no daemon restarted or lost


def private_tmps() -> set[str]:
    return set(glob.glob(os.path.join(tempfile.gettempdir(), "redoxcap-tmp-*")))


def test_a_run_after_the_caller_was_killed_leaves_no_runner_and_no_files(redoxcap_module_system):
    """Killed with its caller, the run cannot remove the program's private /tmp itself:
    its reaper does, with what the program left there."""
    system = redoxcap_module_system
    run = system.start("run", "--", "sh", "-c", "echo left > /tmp/behind; exec sleep 300")
    try:
        program = wait_for(lambda: next((c["pid"] for c in system.status()["clients"]
                                         if c["argv"][0] == "sh"), None), timeout=30)
        # the program's /tmp (made ahead by the spare that took the run, or by the run)
        made = wait_for(lambda: {d for d in private_tmps()
                                 if os.path.exists(os.path.join(d, "behind"))}, timeout=30)
        runner = parent(parent(program))
        os.killpg(run.pid, signal.SIGKILL)
        deadline = time.monotonic() + 30
        while (pid_alive(program) or pid_alive(runner)) and time.monotonic() < deadline:
            time.sleep(0.05)
        assert not pid_alive(program) and not pid_alive(runner)
        assert not any(os.path.exists(d) for d in made), made
    finally:
        system.stop_background()


def test_a_programs_tmp_is_made_ahead_by_the_spare_that_takes_its_run(tmp_path, monkeypatch):
    """The spare waiting for the next run has made its program's private /tmp already (off
    the run's way); the run removes it when it ends, and the next spare's goes with the
    system."""
    base = tmp_path / "tmpdir"
    base.mkdir()
    monkeypatch.setenv("TMPDIR", str(base))  # the system's and every caller's here

    def made() -> set:
        return set(base.glob("redoxcap-tmp-*"))

    (tmp_path / "system").mkdir()
    with booted(tmp_path / "system") as system:
        spare_prepared(system)
        (ahead,) = wait_for(lambda: made() if len(made()) == 1 else None)  # the next spare's
        run = system.start("run", "--", "sh", "-c", "echo here > /tmp/f; read x")
        try:
            wait_for(lambda: (ahead / "f").exists())
            assert (ahead / "f").read_text() == "here\n"
            run.stdin.write("done\n")
            run.stdin.flush()
            assert run.wait(timeout=60) == 0
        finally:
            system.stop_background()
        wait_for(lambda: not ahead.exists())
        wait_for(lambda: len(made()) == 1)  # the spare after it has made its own
    wait_for(lambda: not made(), timeout=10)


def test_a_runs_dir_and_tmp_are_served_by_daemons_the_system_forks(redoxcap_module_system, tmp_path):
    system = redoxcap_module_system
    (tmp_path / "here.txt").write_text("mine\n")
    run = system.start("run", "--dir", str(tmp_path), "--", "sh", "-c",
                       "cat here.txt; echo t > /tmp/t; cat /tmp/t; read done")
    try:
        assert run.stdout.readline() == "mine\n"
        assert run.stdout.readline() == "t\n"
        supervisor = int((system.state_dir / control.PID_NAME).read_text())

        def served() -> list[str]:
            lines = []
            for pid, line in file_daemons(system):
                try:  # one that ended since status named it serves nothing
                    forked_by = parent(pid)
                except OSError:
                    continue
                assert forked_by == supervisor  # a warm fork, not an interpreter of the run's
                lines.append(line)
            return lines

        lines = served()
        assert any("--name dir" in line and str(tmp_path) in line for line in lines), lines
        assert any("--name tmp" in line for line in lines), lines
        run.stdin.write("\n")
        run.stdin.flush()
        assert run.wait(timeout=30) == 0
        wait_for(lambda: not served(), timeout=30)  # they end with the run
    finally:
        system.stop_background()


def spare_daemons(system) -> list[int]:
    return [pid for pid, _ in file_daemons(system, spares=True)]


def test_a_dir_run_is_served_by_the_spare_daemon_the_last_one_left(redoxcap_system, tmp_path):
    """Once a run has had a file scheme daemon, the system forks a spare one when that run
    ends, which waits for its arguments: the next --dir run's daemon is that process, told
    its directory, and it serves the run's writes; `down` ends a spare nobody used."""
    system = redoxcap_system
    assert not spare_daemons(system)  # none before a run has had a daemon
    system.run("--dir", str(tmp_path), "--", "true")
    wait_for(lambda: len(spare_daemons(system)) == 1)
    [spare] = spare_daemons(system)
    run = system.start("run", "--dir", str(tmp_path), "--", "sh", "-c",
                       "echo made > made.txt; cat made.txt; read done")
    try:
        assert run.stdout.readline() == "made\n"
        with open(f"/proc/{spare}/cmdline", "rb") as f:
            told = f.read().replace(b"\0", b" ").decode()
        assert "--name dir" in told and str(tmp_path) in told and SPARE_TITLE not in told, told
        run.stdin.write("\n")
        run.stdin.flush()
        assert run.wait(timeout=30) == 0
    finally:
        system.stop_background()
    assert (tmp_path / "made.txt").read_text() == "made\n"
    wait_for(lambda: not pid_alive(spare))  # it ended with the run's scheme
    wait_for(lambda: len(spare_daemons(system)) == 1)  # and the next spare waits
    [unused] = spare_daemons(system)
    system.cli("down")
    wait_for(lambda: not pid_alive(unused))


@pytest.mark.parametrize("token", ["right", "wrong"])
def test_an_fd_passed_with_a_control_request_is_not_kept(redoxcap_module_system, token):
    """Whoever sends a request (with the token or without), the supervisor keeps no fd of theirs
    once it has answered: the read end of our pipe, passed along, is closed everywhere but here
    (its write end then fails with EPIPE)."""
    state = redoxcap_module_system.state_dir
    secret = (state / control.TOKEN_NAME).read_text() if token == "right" else "0" * 64
    read, write = os.pipe()
    try:
        with socket.socket(socket.AF_UNIX, socket.SOCK_SEQPACKET) as sock:
            sock.settimeout(30)
            sock.connect(str(state / control.SOCKET_NAME))
            # a `serve` with a pipe for a channel: refused (no path), or refused (bad token)
            sock.sendmsg([msgpack.packb({"token": secret, "op": "serve", "name": "x"})],
                         [(socket.SOL_SOCKET, socket.SCM_RIGHTS, read.to_bytes(4, sys.byteorder))])
            reply = msgpack.unpackb(sock.recv(4096))
        assert reply["ok"] is False
        os.close(read)
        read = -1
        with pytest.raises(BrokenPipeError):
            os.write(write, b"x")
    finally:
        os.close(write)
        if read >= 0:
            os.close(read)


def test_serve_refuses_what_is_no_directory_to_serve(redoxcap_module_system):
    read, write = os.pipe()
    try:
        for bad in ({"path": "relative", "name": "x"}, {"path": "/tmp"}, {"name": "x"}):
            with pytest.raises(control.ControlError):
                control.request(redoxcap_module_system.state_dir, "serve", passing=read, **bad)
        with pytest.raises(control.ControlError):  # no channel at all
            control.request(redoxcap_module_system.state_dir, "serve", path="/tmp", name="x")
    finally:
        os.close(read)
        os.close(write)


def run_holding(system, numbers: list[int], code: str) -> tuple[subprocess.CompletedProcess, bytes]:
    """`redoxcap run --pass-fd N... -- python -c code` by a caller holding a pipe's write end
    at each of numbers: how the run ended, and what came through the pipe."""
    read, write = os.pipe()
    run = [*REDOXCAP, "--state-dir", str(system.state_dir), "run",
           *(f"--pass-fd={n}" for n in numbers), "--", sys.executable, "-c", code]
    caller = f"import os; [os.dup2({write}, n) for n in {numbers!r}]; os.execv({run[0]!r}, {run!r})"
    try:
        out = subprocess.run([sys.executable, "-c", caller], capture_output=True, text=True,
                             timeout=60, check=False, pass_fds=[write])
        os.close(write)
        write = -1
        return out, os.read(read, 1000)
    finally:
        os.close(read)
        if write >= 0:
            os.close(write)


def test_more_pass_fds_than_a_runner_takes_still_run(redoxcap_module_system):
    """Past launch.MAX_PASS_FDS the run is done in the `redoxcap` process: the same run."""
    numbers = list(range(10, 11 + launch.MAX_PASS_FDS))
    out, through = run_holding(redoxcap_module_system, numbers,
                               f"import os; os.write({numbers[-1]}, b'the last one')")
    assert out.returncode == 0, out.stderr
    assert through == b"the last one"


def test_a_run_prepared_before_a_mount_was_added_has_the_mount(redoxcap_system, tmp_path):
    """The spare forked the program's namespace before `--mount` added a scheme to the
    system's: the run sees that the root namespace changed since, and forks it afresh."""
    spare_prepared(redoxcap_system)
    (tmp_path / "extra").mkdir()
    (tmp_path / "extra" / "note.txt").write_text("mounted since")
    out = redoxcap_system.run("--mount", f"extra={tmp_path / 'extra'}", "--", "sh", "-c",
                              "cat /scheme/extra/note.txt")
    assert out.stdout == "mounted since"


def test_a_run_prepared_ahead_is_the_run_asked_for(redoxcap_system, tmp_path):
    """Runs started from what a spare prepared get what the same runs get when they take
    every step themselves (with --trace they do): the same names (a --dir run's without
    `file`), a private /tmp of their own, empty, the same cwd (the spare's is `file`'s root,
    which a --cwd run lets go); without the broker or passthrough too: a file the program
    opens in its cwd is then a copy of the scheme's bytes, which its own write through
    another fd does not change; with it the host file itself, as natively looked up beneath
    the host directory a spare asks for ahead."""
    (redoxcap_system.root / "sub").mkdir(exist_ok=True)
    brokered = ("import os, rt; print(','.join(rt.schemes())); print(os.listdir('/tmp')); "
                "open('/tmp/mine', 'w').close(); print(os.getcwd(), 'sub' in os.listdir('.')); "
                "fd = os.open('f.txt', os.O_RDONLY); open('f.txt', 'w').write('g'); "
                "os.stat('f.txt'); print(os.read(fd, 1).decode())")
    rt_only = "import rt; print(','.join(rt.schemes())); print(rt.listdir('/'))"
    shapes = {"default": ([], brokered), "dir": (["--dir", str(tmp_path)], brokered),
              "routed": (["--no-passthrough"], brokered), "rt only": (["--no-broker"], rt_only),
              "cwd": (["--cwd", "/sub"], brokered)}
    got = {}
    for shape, (options, code) in shapes.items():
        for way in ("prepared", "by itself"):
            for where in (redoxcap_system.root, redoxcap_system.root / "sub", tmp_path):
                (where / "f.txt").write_text("f")
            spare_prepared(redoxcap_system)
            traced = ["--trace", str(tmp_path / "trace")] if way == "by itself" else []
            got[shape, way] = redoxcap_system.run(
                *options, *traced, "--", sys.executable, "-c", code).stdout.split()
    for shape in shapes:
        assert got[shape, "prepared"] == got[shape, "by itself"], shape
    names, with_dir = got["default", "prepared"][0].split(","), got["dir", "prepared"][0].split(",")
    assert "file" in names and "uds" in names
    assert sorted(with_dir) == sorted([n for n in names if n != "file"] + ["dir"])
    assert got["default", "prepared"][1] == got["dir", "prepared"][1] == "[]"
    assert got["default", "prepared"][2:] == ["/", "True", "g"]
    assert got["cwd", "prepared"][2:] == ["/sub", "False", "g"]
    assert got["dir", "prepared"][4] == "g" and got["routed", "prepared"][4] == "f"


def children(pid: int) -> list[int]:
    with open(f"/proc/{pid}/task/{pid}/children") as f:
        return [int(child) for child in f.read().split()]


def test_a_run_whose_program_fork_made_ahead_is_gone_forks_the_program_itself(redoxcap_system):
    """The spare's fork to become the program (launcher.Starter) killed while it waits: the
    run notices as it hands it the program, and forks the program itself."""
    spare_prepared(redoxcap_system)
    supervisor = redoxcap_system.status()["supervisor"]
    (spare,) = [pid for pid in children(supervisor) if comm(pid) == "runner"]
    (the_run,) = children(spare)
    (starter,) = children(the_run)
    os.kill(starter, signal.SIGKILL)
    wait_for(lambda: not pid_alive(starter))
    out = redoxcap_system.run("--", "sh", "-c", "echo still-runs; echo $PPID")
    assert out.stdout.split() == ["still-runs", str(the_run)]


def test_a_run_with_more_read_paths_than_its_fork_made_ahead_takes_forks_the_program(
        redoxcap_system, tmp_path):
    """The read paths go to the spare's fork made ahead after the run (launcher.give_read_paths);
    more than one message holds, and the run lets that fork go and forks the program itself."""
    spare_prepared(redoxcap_system)
    paths = [str(tmp_path / f"not-there-{i:05d}-{'x' * 40}") for i in range(3000)]  # 200 KB
    out = redoxcap_system.run(*[a for p in paths for a in ("--ro-host", p)], "--", "sh", "-c",
                              "echo still-runs")
    assert out.stdout.split() == ["still-runs"]


@pytest.mark.parametrize("forked", [False, True], ids=["made ahead", "forked by the run"])
def test_a_brokered_programs_kernel_cwd_is_a_removed_directory(redoxcap_module_system,
                                                               tmp_path, forked):
    """No lookup the broker did not make is relative to anything: the kernel's cwd of the
    program (which a Starter made ahead, or the run made; --trace runs fork) is removed."""
    system = redoxcap_module_system
    spare_prepared(system)
    traced = ["--trace", str(tmp_path / "trace")] if forked else []
    system.start("run", *traced, "--", "sleep", "30")
    try:
        program = wait_for(lambda: next((c["pid"] for c in system.status()["clients"]
                                         if c["argv"] == ["sleep", "30"]), None), timeout=30)
        where = os.readlink(f"/proc/{program}/cwd")
        assert os.path.basename(where).startswith("redoxcap-empty-")
        assert where.endswith(" (deleted)")
    finally:
        system.stop_background()


def test_a_program_whose_environment_is_too_big_to_hand_the_fork_made_ahead_runs(
        redoxcap_module_system):
    """200 KB of environment is more than the spare's fork made ahead takes in one message
    (launcher.MAX_START_REQUEST): the run forks the program itself."""
    spare_prepared(redoxcap_module_system)
    big = "x" * 100_000
    out = redoxcap_module_system.run("--env", f"A={big}", "--env", f"B={big}", "--", "sh", "-c",
                                     "echo ${#A} ${#B}")
    assert out.stdout.split() == ["100000", "100000"]


def test_a_caller_with_a_relative_tmpdir_gets_its_private_tmp_there(redoxcap_module_system,
                                                                     tmp_path):
    """The run makes the program's /tmp in the caller's $TMPDIR, relative to the caller's
    directory as tempfile would take it, and removes it after."""
    scratch = tmp_path / "scratch"
    scratch.mkdir()
    run = subprocess.Popen([*REDOXCAP, "--state-dir", str(redoxcap_module_system.state_dir),
                            "run", "--", "sh", "-c", "echo kept > /tmp/f && cat /tmp/f && { read x || true; }"],
                           cwd=tmp_path, env={**os.environ, "TMPDIR": "scratch"},
                           stdin=subprocess.PIPE, stdout=subprocess.PIPE, text=True)
    try:
        assert run.stdout.readline() == "kept\n"
        (made,) = os.listdir(scratch)  # while the program runs: its /tmp, with what it wrote
        assert made.startswith("redoxcap-tmp-") and (scratch / made / "f").read_text() == "kept\n"
    finally:
        run.stdin.close()
        run.wait(timeout=60)
        run.stdout.close()
    assert run.returncode == 0
    wait_for(lambda: not os.listdir(scratch))  # the run's end comes after ours


def test_pass_fds_at_every_low_number_reach_the_program(redoxcap_module_system):
    """The caller's --pass-fd fds go to their numbers in the runner, wherever what the
    runner received them with (their cwd among them) landed first, and wherever the spare
    keeps what it prepared (the run then takes its first steps itself)."""
    spare_prepared(redoxcap_module_system)
    numbers = list(range(3, 3 + launch.MAX_PASS_FDS))
    out, through = run_holding(redoxcap_module_system, numbers,
                               f"import os, rt; [os.write(n, b'x') for n in {numbers!r}]; "
                               "print(rt.schemes())")
    assert out.returncode == 0, out.stderr
    assert "'file'" in out.stdout
    assert through == b"x" * len(numbers)


TAKE_ON_HIGH_FD = r"""
import os, socket, sys
from redoxcap import runner
fillers = [os.open("/dev/null", os.O_RDONLY) for _ in range(14)]
ours, _theirs = socket.socketpair(socket.AF_UNIX, socket.SOCK_SEQPACKET)
r, w = os.pipe()  # both above the first number take_on keeps its own fds at
cwd = os.open(".", os.O_PATH | os.O_DIRECTORY)
os.close(0)  # a number free below it, where a plain dup would land
(kept,) = runner.take_on({"fds": [1], "environ": dict(os.environ)}, [cwd, w], ours)
os.write(1, b"x")  # the caller's fd 1 is the pipe's write end
ok = os.read(r, 1) == b"x" and kept.fileno() >= 11
try:
    os.fstat(0)
    ok = False  # closed there: closed here
except OSError:
    pass
os._exit(0 if ok else 3)
"""


def test_take_on_lays_out_a_callers_fds_that_arrive_at_high_numbers():
    """A passed fd the runner holds at a high number is moved to one no caller fd takes, not
    to the lowest free one (which may be a standard fd the caller had closed)."""
    out = subprocess.run([sys.executable, "-c", TAKE_ON_HIGH_FD], capture_output=True,
                         timeout=60, check=False)
    assert out.returncode == 0, out


CLONE_PARENT_SIBLING = r"""
import ctypes, os, sys, time
libc = ctypes.CDLL(None, use_errno=True)
CLONE_PARENT, SIGCHLD, SYS_clone = 0x8000, 17, 56
pid = libc.syscall(SYS_clone, CLONE_PARENT | SIGCHLD, 0, 0, 0, 0)
if pid == 0:
    time.sleep(300)  # a sibling of ours: the child of whoever started us, not ours
    os._exit(0)
print(pid, flush=True)
os._exit(0)
"""


@pytest.mark.skipif(os.uname().machine != "x86_64", reason="the clone syscall number is x86_64's")
def test_a_process_made_the_runs_own_child_ends_before_run_returns(redoxcap_module_system):
    """CLONE_PARENT makes the program's new process a child of its parent (the run, not
    the program): it is not among the reaper's orphans, and must still be ended before
    `run` returns, not after."""
    out = redoxcap_module_system.run("--", sys.executable, "-c", CLONE_PARENT_SIBLING)
    (pid,) = [int(word) for word in out.stdout.split()]
    assert not os.path.exists(f"/proc/{pid}")  # killed and reaped, not even a zombie


def test_a_spare_let_go_unused_holds_nothing(redoxcap_system):
    """What run.Prepared takes ahead (the clones, the host directory behind the cwd's, the
    fork, the private directory) is let go with it when no run takes it."""
    import redoxcap.run

    before = set(os.listdir("/proc/self/fd"))
    made: list[str] = []
    prepared = redoxcap.run.Prepared(redoxcap_system.state_dir, made.append)
    try:
        assert prepared._cwd_host is not None and len(set(os.listdir("/proc/self/fd"))) > len(before)
    finally:
        prepared.close()
    assert set(os.listdir("/proc/self/fd")) <= before
    assert made and not os.path.exists(made[0])


def test_a_spare_whose_clones_fail_half_way_holds_nothing(redoxcap_system, monkeypatch):
    """run.Prepared makes the broker's clones ahead; one refused (the account's quota) must
    not leave those made before it open."""
    import redoxcap.run

    real, made = redoxcap.run.call_fd, []

    def third_refused(fd: int, op: int, *args: object) -> int:
        if op == P.CLONE and len(made) == 2:
            raise OSError(errno.EMFILE, "quota")
        new = real(fd, op, *args)
        if op == P.CLONE:
            made.append(new)
        return new

    before = set(os.listdir("/proc/self/fd"))
    monkeypatch.setattr(redoxcap.run, "call_fd", third_refused)
    with pytest.raises(OSError):
        redoxcap.run.Prepared(redoxcap_system.state_dir)
    assert len(made) == 2
    assert set(os.listdir("/proc/self/fd")) <= before
