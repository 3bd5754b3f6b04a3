"""Holes found by the fourth red-team pass: one run against other runs, the system that
forks them, and the broker under load (each test fails while the hole is open).

The attacker is the confined program of a `redoxcap run` done by a system that is up (a
warm fork of its fork server); what it must not reach is any process outside its run, nor
anything a later run or the system picks up from it.
"""

from __future__ import annotations

import signal
import subprocess
import sys
import time

import pytest

from redoxcap.broker import available

pytestmark = pytest.mark.skipif(available() is not None, reason=str(available()))


def pid_max() -> int:
    with open("/proc/sys/kernel/pid_max", encoding="ascii") as f:
        return int(f.read())


PRLIMIT_SCAN = r"""
import ctypes, os, sys
libc = ctypes.CDLL(None, use_errno=True)
PRLIMIT64 = {"x86_64": 302, "aarch64": 261}[os.uname().machine]
RLIMIT_NOFILE = 7
class rlimit(ctypes.Structure):
    _fields_ = [("cur", ctypes.c_uint64), ("max", ctypes.c_uint64)]
me, old, low = os.getpid(), rlimit(), rlimit(16, 16)
reached = [pid for pid in range(1, int(sys.argv[1]) + 1)
           if pid != me and libc.syscall(PRLIMIT64, pid, RLIMIT_NOFILE, None, ctypes.byref(old)) == 0]
for pid in reached:  # what a hostile program does with them: 16 fds, for good
    libc.syscall(PRLIMIT64, pid, RLIMIT_NOFILE, ctypes.byref(low), None)
own = libc.syscall(PRLIMIT64, 0, RLIMIT_NOFILE, None, ctypes.byref(old))
print("reached", reached, "itself", own, flush=True)
"""


def test_the_filters_own_pid_is_the_programs_not_the_fork_servers(redoxcap_system, tmp_path):
    """docs/sandbox.md: `prlimit64`, `setpriority`, the `sched_set*` calls and `ioprio_set`
    work "on its own process only" (the filter allows pid 0 or the program's own pid). The
    brokered filter is compiled once, in the fork server (redoxcap/runner.py warms
    broker.filter.program at import), and seccomp.filter_program puts os.getpid() of the
    process that compiles it for "own pid": the fork server's. So every run's program may
    prlimit64 the system's fork server (and not itself: prlimit64(getpid()) is EPERM). Here
    a run finds it by scanning every pid with a harmless get, and lowers its RLIMIT_NOFILE to
    16: from then on every run the system forks fails ("Too many open files" in the runner),
    as would a daemon's restart; RLIMIT_CPU would kill it, RLIMIT_AS starve it. (Where
    Landlock has no signal scope, the kill family is "own pid only" too: such a program could
    SIGKILL the fork server.) Now these calls take 0 alone, the caller itself, and the
    kill family's own pid is filled in by the program (test_syscall_list.py)."""
    project = tmp_path / "proj"
    project.mkdir()
    (project / "scan.py").write_text(PRLIMIT_SCAN)
    got = redoxcap_system.run("--dir", str(project), "--", sys.executable, str(project / "scan.py"),
                              str(pid_max()), check=False, timeout=120)
    assert got.returncode == 0, got.stderr
    assert "reached [] itself 0" in got.stdout, got.stdout
    other = tmp_path / "other"
    other.mkdir()
    after = redoxcap_system.run("--dir", str(other), "--", "sh", "-c", "echo later run ok",
                                check=False, timeout=60)
    assert after.returncode == 0 and "later run ok" in after.stdout, after.stderr


STALL = r"""
import ctypes, os, signal, sys, threading, time
import rt
if sys.argv[2] == "clone-parent":  # a process left behind as the run's own child
    CLONE = {"x86_64": 56, "aarch64": 220}[os.uname().machine]
    child = ctypes.CDLL(None, use_errno=True).syscall(CLONE, 0x8000 | signal.SIGCHLD, 0, 0, 0, 0)
else:  # double-forked, an orphan: the reaper's
    child = os.fork()
    if child == 0 and os.fork():
        os._exit(0)
if child == 0:
    os.setsid()  # a session of its own
    channel = rt.mkscheme("stall")  # a scheme of its own that never answers
    threading.Thread(target=os.stat, args=("/scheme/stall/x",), daemon=True).start()
    time.sleep(float(sys.argv[1]))
    os._exit(0)
time.sleep(1)  # the broker is busy with the orphan's stat by now
print("top exits", flush=True)
"""
LINGER = 40.0  # seconds the orphan stays


def start_stalling_run(system, tmp_path, how="double-fork", *options):
    project = tmp_path / "proj"
    project.mkdir()
    (project / "stall.py").write_text(STALL)
    run = system.start("run", *options, "--dir", str(project), "--", sys.executable,
                       str(project / "stall.py"), str(LINGER), how)
    assert run.stdout.readline().strip() == "top exits", run.stderr.read()
    return run


def ends_with_ctrl_c(run) -> None:
    """SIGINT to `run`, a second after the program left its orphan stalling the broker,
    ends it within 10 s."""
    time.sleep(1)
    start = time.monotonic()
    run.send_signal(signal.SIGINT)
    ended = ended_within(run, 10)
    if not ended:
        run.wait(LINGER + 30)
    assert ended, f"SIGINT did not end `run`: it returned {time.monotonic() - start:.0f} s later"


def ended_within(run, seconds: float) -> bool:
    try:
        run.wait(seconds)
        return True
    except subprocess.TimeoutExpired:
        return False


@pytest.mark.parametrize("how", ["double-fork", "clone-parent"])
def test_a_process_left_behind_cannot_keep_the_run_going_after_its_program_exits(
        redoxcap_system, tmp_path, how):
    """README: with a system up, "whatever COMMAND leaves running is killed when it exits".
    The broker answers the program's calls one at a time and waits for each capability's
    answer; a process the program leaves behind (double-forked, a session of its own) asks
    it to stat a path in a scheme it serves itself and never answers. When the program
    exits, the broker is still waiting: the run never reaps it, the reaper never kills the
    orphan, and `redoxcap run` does not return for as long as the orphan likes (here 40 s;
    forever if it loops), with the orphan running on, still holding the run's capabilities.
    A build's `timeout`, a CI job's step: all hang on it. The same from a process the program
    made a child of the run's own (CLONE_PARENT), which the reaper does not see."""
    run = start_stalling_run(redoxcap_system, tmp_path, how)
    start = time.monotonic()
    ended = ended_within(run, 10)
    took = time.monotonic() - start
    if not ended:
        run.wait(LINGER + 30)
        took = time.monotonic() - start
    assert ended, f"`run` returned {took:.0f} s after its program exited (when the orphan left)"


def test_ctrl_c_ends_a_run_whose_broker_an_orphan_stalls(redoxcap_system, tmp_path):
    """docs/sandbox.md: a call that waits "holds up the program's other calls; it can stall
    only itself (`run` ends with Ctrl-C as always)". Not so once the program has exited and
    a process it left behind stalls the broker (as above): SIGINT (and SIGTERM) to `run` are
    passed on to the program's process group, which is gone, and the broker still waits; the
    run goes on until the orphan lets it (only SIGKILL of `run` ends it)."""
    ends_with_ctrl_c(start_stalling_run(redoxcap_system, tmp_path))


def test_ctrl_c_ends_an_in_process_run_whose_broker_an_orphan_stalls(redoxcap_system, tmp_path):
    """The same with `run --in-process` (as every run with no system up is done):
    there the orphan is documented to outlive the program, but `run`
    "ends with Ctrl-C as always"; it does not: SIGINT goes to the program's process group,
    gone, while the broker waits on the orphan's scheme, and `run` returns only when the
    orphan lets it. Now the broker's thread gives up a capability call (EINTR) once the
    program has exited (wire/call.py, give_up_when_readable), in every kind of run."""
    ends_with_ctrl_c(start_stalling_run(redoxcap_system, tmp_path, "double-fork", "--in-process"))


BY_NUMBER = r"""
import ctypes, os
libc = ctypes.CDLL(None, use_errno=True)
PRLIMIT64 = {"x86_64": 302, "aarch64": 261}[os.uname().machine]
class rlimit(ctypes.Structure):
    _fields_ = [("cur", ctypes.c_uint64), ("max", ctypes.c_uint64)]
def tries(who):
    old = rlimit()
    by_number = libc.syscall(PRLIMIT64, os.getpid(), 7, None, ctypes.byref(old))
    itself = libc.syscall(PRLIMIT64, 0, 7, None, ctypes.byref(old))
    try:
        os.setpriority(os.PRIO_PROCESS, os.getpid(), 1)
        renice = "ok"
    except PermissionError:
        renice = "EPERM"
    os.setpriority(os.PRIO_PROCESS, 0, 1)  # nice(1): works
    os.sched_setaffinity(0, os.sched_getaffinity(0))  # taskset with a command: works
    print(who, by_number, itself, renice, flush=True)
tries("top")
child = os.fork()
if child == 0:
    tries("child")
    os._exit(0)
os.waitpid(child, 0)
"""


def test_a_process_acts_on_itself_by_0_never_by_a_pid_that_can_be_anyones(redoxcap_system,
                                                                          tmp_path):
    """The filter let prlimit64, setpriority, sched_set* and ioprio_set name "its own
    process": a pid fixed when the filter was made, the program's first process. Once that
    process had exited, its pid was free for anyone's: a process it left behind (which a
    run done in the `redoxcap` process, --in-process or with no system up, leaves running)
    cycled pids by forking until the program's pid was taken, then set the limits (or the
    nice value, the CPUs, the scheduler) of whatever took it: a `sleep` the test started,
    outside any sandbox (this test, before: it took a minute of forking). Now every process
    of the run acts on itself as 0 (what setrlimit, nice and taskset with a command pass),
    and never by a pid: its own is EPERM as any other."""
    project = tmp_path / "proj"
    project.mkdir()
    (project / "self.py").write_text(BY_NUMBER)
    for options in ((), ("--in-process",)):
        got = redoxcap_system.run(*options, "--dir", str(project), "--", sys.executable,
                                  str(project / "self.py"), timeout=60)
        assert got.stdout.splitlines() == ["top -1 0 EPERM", "child -1 0 EPERM"], got
