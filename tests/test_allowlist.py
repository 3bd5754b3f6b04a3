"""Attacks on the system from a confined program, in both modes, through the real CLI.

Each attack of issue 17 runs for real from `redoxcap run --ns '' --cwd /jail
--beneath` (rt alone, and under the broker), and the victim is inspected from
outside: the router's limits, priority, affinity and state; a POSIX message
queue of the host; the inode generation of a file it can read; a host writer
that must not be held by a lease. The other classes of call the allow-list
refuses run too, each with the errno the list gives. Then the fds a program
inherits, the daemons' core dumps, and the modules every process of the
system imports.
"""

from __future__ import annotations

import contextlib
import ctypes
import errno
import fcntl
import json
import os
import resource
import shutil
import signal
import struct
import subprocess
import sys
import textwrap
import threading
from pathlib import Path

import pytest

from redoxcap.sandbox import syscalls as S
from redoxcap.testing import booted, wait_exited
from redoxcap.wire import linux

MACHINE = linux.machine()
NRS = linux.SYSCALLS[MACHINE] if MACHINE else {}
MODES = {"rt": ["--no-broker"], "brokered": []}
SANDBOX = ["--ns", "", "--cwd", "/jail", "--beneath"]
QUEUE = "redoxcap-test-victim"  # a host POSIX message queue that exists before the attack
NEW_QUEUE = "redoxcap-test-created"  # one the attack tries to create
FS_IOC_GETVERSION = linux.IOCTLS["FS_IOC_GETVERSION"]
_libc = ctypes.CDLL(None, use_errno=True)
_libc.syscall.restype = ctypes.c_long

pytestmark = pytest.mark.skipif(MACHINE is None, reason="no syscall list for this machine")


def syscall(name: str, *args) -> int:
    """A raw syscall from this (unconfined) process: its result, or -errno."""
    words = [ctypes.c_long(a) if isinstance(a, int) else a for a in args]
    result = _libc.syscall(ctypes.c_long(NRS[name]), *words)
    return result if result >= 0 else -ctypes.get_errno()


def queue_exists(name: str) -> bool:
    fd = syscall("mq_open", name.encode(), os.O_RDONLY, 0, None)
    if fd >= 0:
        os.close(fd)
    return fd >= 0


# Runs in the confined program: each attack's errno (0: it worked), then it holds its fds open
# until a line comes on stdin, so that the test can check from outside who is held up.
ATTACKS = textwrap.dedent("""
    import ctypes, fcntl, json, os, socket, struct, sys
    NRS, QUEUE, NEW_QUEUE = json.loads(sys.argv[1]), sys.argv[2], sys.argv[3]
    libc = ctypes.CDLL(None, use_errno=True)
    libc.syscall.restype = ctypes.c_long

    def raw(name, *args):
        words = [ctypes.c_long(a) if isinstance(a, int) else a for a in args]
        return 0 if libc.syscall(ctypes.c_long(NRS[name]), *words) >= 0 else ctypes.get_errno()

    def attempt(fn):
        try:
            fn()
        except OSError as exc:
            return exc.errno
        return 0

    ns = socket.socket(fileno=os.dup(int(os.environ["REDOXCAP_NS_FD"])))
    router = struct.unpack("3i", ns.getsockopt(socket.SOL_SOCKET, socket.SO_PEERCRED, 12))[0]
    ns.detach()
    zero = ctypes.create_string_buffer(16)  # struct rlimit {0, 0}
    eight = ctypes.create_string_buffer(struct.pack("QQ", 8, 8))
    core = ctypes.create_string_buffer(struct.pack("QQ", 2**63, 2**63))
    mask = ctypes.create_string_buffer(struct.pack("Q", 1))
    out = {"router": router}
    out["prlimit64 RLIMIT_CPU"] = raw("prlimit64", router, 0, zero, None)
    out["prlimit64 RLIMIT_NOFILE"] = raw("prlimit64", router, 7, eight, None)
    out["prlimit64 RLIMIT_CORE"] = raw("prlimit64", router, 4, core, None)
    out["setpriority PRIO_PROCESS"] = raw("setpriority", 0, router, 19)
    out["setpriority PRIO_USER"] = raw("setpriority", 2, 0, 19)
    out["sched_setaffinity"] = raw("sched_setaffinity", router, 8, mask)
    out["ioprio_set"] = raw("ioprio_set", 1, router, 7 << 13)
    out["kill SIGSTOP"] = attempt(lambda: os.kill(router, 19))
    out["kill 0"] = attempt(lambda: os.kill(router, 0))
    out["ptrace attach"] = raw("ptrace", 16, router, 0, 0)
    out["mq_unlink"] = raw("mq_unlink", QUEUE.encode())
    out["mq_open O_CREAT"] = raw("mq_open", NEW_QUEUE.encode(), os.O_CREAT | os.O_RDWR, 0o600, None)
    out["shmget"] = raw("shmget", 0, 4096, 0o1000 | 0o600)  # IPC_PRIVATE, IPC_CREAT
    out["msgget"] = raw("msgget", 0, 0o1000 | 0o600)
    out["add_key"] = raw("add_key", b"user", b"redoxcap-test", b"x", 1, -4)  # the user keyring
    out["keyctl"] = raw("keyctl", 0, -4, 0)  # KEYCTL_GET_KEYRING_ID
    out["inotify_init1"] = raw("inotify_init1", 0)
    out["fanotify_init"] = raw("fanotify_init", 0, 0)
    out["io_uring_setup"] = raw("io_uring_setup", 1, ctypes.create_string_buffer(120))
    out["bpf"] = raw("bpf", 0, None, 0)
    out["perf_event_open"] = raw("perf_event_open", ctypes.create_string_buffer(128), 0, -1, -1, 0)
    out["userfaultfd"] = raw("userfaultfd", 0)
    out["name_to_handle_at"] = raw("name_to_handle_at", -100, b".", None, None, 0)
    out["fsopen"] = raw("fsopen", b"tmpfs", 0)
    out["unshare"] = raw("unshare", 0x10000000)  # CLONE_NEWUSER
    out["process_vm_readv"] = raw("process_vm_readv", router, None, 0, None, 0, 0)
    out["syslog"] = raw("syslog", 10, None, 0)  # SYSLOG_ACTION_SIZE_BUFFER
    if "X32" in NRS:  # x86_64: the same getpid through the x32 ABI
        failed = libc.syscall(ctypes.c_long(NRS["X32"] | NRS["getpid"])) < 0
        out["x32 getpid"] = ctypes.get_errno() if failed else 0
    with open(__file__, "rb") as mine:  # read-only: the file of its own script
        version = ctypes.create_string_buffer(8)
        out["EXT4_IOC_SETVERSION"] = attempt(lambda: fcntl.ioctl(mine, 0x40086604, b"\\x07" * 8))
        out["FS_IOC_SETVERSION"] = attempt(lambda: fcntl.ioctl(mine, 0x40087602, b"\\x07" * 8))
        out["FS_IOC_SETFLAGS"] = attempt(lambda: fcntl.ioctl(mine, 0x40086602, b"\\x00" * 8))
        out["F_SETLEASE"] = attempt(lambda: fcntl.fcntl(mine, fcntl.F_SETLEASE, fcntl.F_RDLCK))
        out["F_NOTIFY"] = attempt(lambda: fcntl.fcntl(mine, 1026, 0x80000001))
        def readable(path):
            with open(path, "rb") as f:
                f.read(1)
        out["/proc/self/net/unix"] = attempt(lambda: readable("/proc/self/net/unix"))
        out["/proc/self/mountinfo"] = attempt(lambda: readable("/proc/self/mountinfo"))
        out["/proc/self/task/N/net/unix"] = attempt(
            lambda: readable(f"/proc/self/task/{os.getpid()}/net/unix"))
        out["/proc/ROUTER/status"] = attempt(lambda: readable(f"/proc/{router}/status"))
        out["/proc/1/environ"] = attempt(lambda: readable("/proc/1/environ"))
        print(json.dumps(out), flush=True)
        sys.stdin.readline()  # holds the script open (any lease with it) while the test writes
""")

# What each attack gets: the list's errno for the refused classes. Reading the parts of /proc
# it was not given fails whatever the errno (Landlock's EACCES rt-only; the broker's ENOENT or
# ENODEV: no /proc in the namespace).
REFUSED = {
    "prlimit64 RLIMIT_CPU": errno.EPERM, "prlimit64 RLIMIT_NOFILE": errno.EPERM,
    "prlimit64 RLIMIT_CORE": errno.EPERM, "setpriority PRIO_PROCESS": errno.EPERM,
    "setpriority PRIO_USER": errno.EPERM, "sched_setaffinity": errno.EPERM,
    "ioprio_set": errno.EPERM, "kill SIGSTOP": errno.EPERM, "kill 0": errno.EPERM,
    "ptrace attach": errno.EPERM, "mq_unlink": errno.EPERM, "mq_open O_CREAT": errno.EPERM,
    "shmget": errno.EPERM, "msgget": errno.EPERM, "add_key": errno.EPERM, "keyctl": errno.EPERM,
    "inotify_init1": errno.ENOSYS, "fanotify_init": errno.ENOSYS, "io_uring_setup": errno.ENOSYS,
    "bpf": errno.EPERM, "perf_event_open": errno.EPERM, "userfaultfd": errno.EPERM,
    "name_to_handle_at": errno.EPERM, "fsopen": errno.EPERM, "unshare": errno.EPERM,
    "process_vm_readv": errno.EPERM, "syslog": errno.EPERM, "EXT4_IOC_SETVERSION": errno.EPERM,
    "FS_IOC_SETVERSION": errno.EPERM, "FS_IOC_SETFLAGS": errno.EPERM, "F_SETLEASE": errno.EPERM,
    "F_NOTIFY": errno.EPERM,
    **({"x32 getpid": errno.ENOSYS} if MACHINE == "x86_64" else {}),
}
UNREADABLE = ("/proc/self/net/unix", "/proc/self/mountinfo", "/proc/self/task/N/net/unix",
              "/proc/ROUTER/status", "/proc/1/environ")


@pytest.fixture(scope="module")
def attacked(tmp_path_factory):
    """A system with a jail holding the attack script, and a host message queue to attack."""
    with booted(tmp_path_factory.mktemp("allowlist")) as system:
        jail = system.root / "jail"
        jail.mkdir()
        (jail / "attack.py").write_text(ATTACKS)
        fd = syscall("mq_open", QUEUE.encode(), os.O_CREAT | os.O_RDWR, 0o600, None)
        assert fd >= 0, os.strerror(-fd)
        os.close(fd)
        try:
            yield system
        finally:
            syscall("mq_unlink", QUEUE.encode())
            syscall("mq_unlink", NEW_QUEUE.encode())


def router_state(pid: int) -> dict:
    """Everything of the router's an attack would change, read from outside."""
    return {
        "limits": Path(f"/proc/{pid}/limits").read_text(),
        "nice": os.getpriority(os.PRIO_PROCESS, pid),
        "affinity": os.sched_getaffinity(pid),
        "stopped": Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()[0] in "Tt",
    }


def generation(path: Path) -> int | None:
    """The inode generation of path (None where the filesystem has none to show)."""
    buf = bytearray(8)
    with open(path, "rb") as f:
        try:
            fcntl.ioctl(f, FS_IOC_GETVERSION, buf)
        except OSError:
            return None
    return struct.unpack("=q", buf)[0]


def open_for_writing_in_time(path: Path, seconds: float = 5.0) -> bool:
    """Whether a host writer gets path open within seconds (a lease would hold it 45 s)."""
    done = threading.Event()

    def writer():
        with open(path, "ab"):
            done.set()

    thread = threading.Thread(target=writer, daemon=True)
    thread.start()
    return done.wait(seconds)


@pytest.mark.parametrize("mode", MODES)
def test_a_confined_program_reaches_no_process_kernel_object_or_metadata_of_the_host(attacked, mode):
    router = attacked.daemon("kernel")["pid"]
    script = attacked.root / "jail" / "attack.py"
    before, gen_before = router_state(router), generation(script)
    # rt alone, the interpreter is given its script by name (Landlock grants that one file);
    # under the broker it opens it through the cwd capability
    target = "attack.py" if mode == "brokered" else str(script)
    nrs = {**NRS, "X32": linux.X32_SYSCALL_BIT} if MACHINE == "x86_64" else NRS
    proc = attacked.start("run", *SANDBOX, *MODES[mode], "--", sys.executable, target,
                          json.dumps(nrs), QUEUE, NEW_QUEUE)
    try:
        line = proc.stdout.readline()
        assert line, proc.stderr.read() if proc.poll() is not None else "no output"
        got = json.loads(line)
        # the host writer is not held by a lease while the program holds the file open
        assert open_for_writing_in_time(script)
        proc.stdin.write("\n")
        proc.stdin.flush()
        assert proc.wait(timeout=30) == 0, proc.stderr.read()
    finally:
        if proc.poll() is None:
            proc.kill()
            proc.wait()
    assert got.pop("router") == router
    unreadable = {name: got.pop(name) for name in UNREADABLE}
    assert got == REFUSED
    assert all(unreadable.values()), unreadable
    if mode == "rt":
        assert set(unreadable.values()) == {errno.EACCES}  # Landlock
    assert router_state(router) == before
    assert queue_exists(QUEUE) and not queue_exists(NEW_QUEUE)
    if gen_before is None:
        pytest.skip("this filesystem shows no inode generation: the ioctls' refusal was checked")
    assert generation(script) == gen_before


I386_GETPID = "int main(void) { long r; __asm__ volatile (\"int $0x80\" : \"=a\"(r) : \"a\"(20)); return r > 0 ? 0 : 3; }\n"


@pytest.mark.skipif(MACHINE != "x86_64" or shutil.which("cc") is None,
                    reason="the i386 ABI is x86_64's, and needs a C compiler to reach")
def test_a_32_bit_syscall_kills_the_program(attacked, tmp_path):
    source, probe = tmp_path / "probe.c", tmp_path / "probe"
    source.write_text(I386_GETPID)
    subprocess.run(["cc", "-o", str(probe), str(source)], check=True, timeout=60)
    assert subprocess.run([str(probe)], check=False, timeout=30).returncode == 0  # natively
    # rt alone: Landlock lets the command's own file run (the broker runs host trees only)
    confined = attacked.run(*SANDBOX, "--", str(probe), check=False)
    assert confined.returncode == 128 + signal.SIGSYS


def test_a_confined_program_still_reads_its_own_proc_files(attacked):
    """rt alone: Landlock grants the listed files of its own /proc/PID (the broker serves no
    /proc: there it is a path like any other, not in the namespace)."""
    code = ("import os\n"
            "print(open('/proc/self/status').read().splitlines()[0].split()[0])\n"
            "print(len(os.listdir('/proc/self/fd')) > 2)\n")
    out = attacked.run(*SANDBOX, *MODES["rt"], "--", sys.executable, "-c", code).stdout.split()
    assert out == ["Name:", "True"]


def test_the_errnos_above_are_the_lists():
    """The attack's expectations come from the one list, not from a second copy of it."""
    rule_of = {name: rule for rule in S.rules() for name in rule.names}
    for attack, err in REFUSED.items():
        call = attack.split()[0]
        rule = rule_of.get(call)
        if rule is None:
            continue  # an ioctl or an fcntl (checked in test_syscall_list.py), or a /proc read
        action = rule.action(S.CONFINED)
        if call == "kill":  # allowed by the list: Landlock's signal scope answers EPERM
            assert isinstance(action, S.Allow)
        elif isinstance(action, S.Refuse):
            assert action.errno == err, attack
        else:
            assert isinstance(action, S.Check), attack


@pytest.mark.parametrize("mode", MODES)
def test_only_fds_0_1_and_2_reach_a_program_unless_passed(attacked, mode):
    r, w = os.pipe()
    os.write(w, b"inherited")
    os.close(w)
    code = ("import os, sys\n"
            "fd = int(sys.argv[1])\n"
            "try:\n"
            "    print(os.read(fd, 64).decode())\n"
            "except OSError as exc:\n"
            "    print(exc.errno)\n")
    try:
        base = ["run", *SANDBOX, *MODES[mode]]
        leaked = attacked.cli(*base, "--", sys.executable, "-c", code, str(r), pass_fds=(r,))
        assert leaked.stdout.strip() == str(errno.EBADF)
        passed = attacked.cli(*base, "--pass-fd", str(r), "--", sys.executable, "-c", code, str(r),
                              pass_fds=(r,))
        assert passed.stdout.strip() == "inherited"
    finally:
        os.close(r)
    bad = attacked.cli("run", "--pass-fd", "999", "--", "true", check=False)
    assert bad.returncode == 2 and "--pass-fd 999" in bad.stderr


def crash_with_core_limit_raised(pid: int) -> None:
    """What root (not the sandbox) can do to a process: raise its core limit (a hard limit of
    0 stays 0 without CAP_SYS_RESOURCE), then SIGSEGV it."""
    with contextlib.suppress(PermissionError):
        resource.prlimit(pid, resource.RLIMIT_CORE, (resource.RLIM_INFINITY,) * 2)
    with contextlib.suppress(ProcessLookupError):
        os.kill(pid, signal.SIGSEGV)


def test_no_daemon_can_dump_core_even_when_its_core_limit_is_raised(tmp_path):
    """Each daemon has a hard core limit of 0 and is undumpable: a crash forced on it after
    root raised that limit from outside still writes nothing, where a dumpable process of the
    same uid, treated the same, leaves a core file in its directory."""
    if Path("/proc/sys/kernel/core_pattern").read_text().strip() not in ("core", "core.%p"):
        pytest.skip("core files do not land in the process's directory here (core_pattern)")
    cli = shutil.which("redoxcap", path=os.path.dirname(sys.executable))
    assert cli is not None
    here = tmp_path / "cwd"  # every process's cwd: where a core file would land
    here.mkdir()
    control = subprocess.Popen([sys.executable, "-c", "import time; time.sleep(60)"], cwd=here)
    crash_with_core_limit_raised(control.pid)
    control.wait(timeout=30)
    assert [p.name for p in here.iterdir()] != [], "a dumpable process left no core: cannot tell"
    for core in here.iterdir():
        core.unlink()
    state = tmp_path / "state"
    subprocess.run([cli, "--state-dir", str(state), "up", "--detach", "--root", str(tmp_path)],
                   cwd=here, check=True, capture_output=True, timeout=60)
    try:
        info = json.loads(subprocess.run([cli, "--state-dir", str(state), "status", "--json"],
                                         check=True, capture_output=True, timeout=60).stdout)
        daemons = {d["name"]: d["pid"] for d in info["daemons"] if d.get("pid")}
        victims = [daemons["zero"], daemons["nsmgr"], daemons["kernel"], info["supervisor"]]
        for pid in victims:
            limits = Path(f"/proc/{pid}/limits").read_text().splitlines()
            core = next(line for line in limits if line.startswith("Max core file size"))
            assert core.split()[4:6] == ["0", "0"], (pid, core)
        for pid in victims:
            crash_with_core_limit_raised(pid)
            wait_exited(pid, timeout=30)
    finally:
        subprocess.run([cli, "--state-dir", str(state), "down"], check=False, capture_output=True, timeout=60)
    assert [p.name for p in here.iterdir()] == []


SHADOW = textwrap.dedent("""
    import os, sys
    with open({marker!r}, "a") as f:
        f.write(f"{{os.getpid()}} {{__name__}} {{sys.argv!r}}\\n")
""")


def _shadow_packages(where: Path, names: tuple[str, ...], marker: Path) -> None:
    """Packages named as the system's own that write a line to marker when imported."""
    for name in names:
        package = where / name
        package.mkdir(parents=True)
        for module in ("__init__.py", "__main__.py"):
            (package / module).write_text(SHADOW.format(marker=str(marker)))


def test_the_system_never_imports_its_modules_from_the_cwd_or_pythonpath(tmp_path):
    """Every process `redoxcap` starts (supervisor, router, nsmgr, schemes, the launcher)
    ignores a project's packages in the directory where it is typed, and PYTHONPATH."""
    cli = shutil.which("redoxcap", path=os.path.dirname(sys.executable))
    assert cli is not None, "the redoxcap command is not installed beside this interpreter"
    marker, project, elsewhere = tmp_path / "imported", tmp_path / "project", tmp_path / "pythonpath"
    _shadow_packages(project, ("wire", "kernel", "nsmgr", "schemes", "rt", "redoxcap"), marker)
    # the command itself runs with -E here (it would take redoxcap from PYTHONPATH otherwise,
    # as any Python program would); PYTHONPATH stays in the environment it hands on, and
    # every process it starts must ignore it
    _shadow_packages(elsewhere, ("rt", "redoxcap"), marker)
    env = {**os.environ, "PYTHONPATH": str(elsewhere)}
    state, root = tmp_path / "state", tmp_path / "root"
    root.mkdir()
    base = [sys.executable, "-E", cli, "--state-dir", str(state)]
    try:
        subprocess.run([*base, "up", "--detach", "--root", str(root)], cwd=project, env=env,
                       check=True, capture_output=True, timeout=60)
        for mode in MODES.values():
            ran = subprocess.run([*base, "run", *mode, "--", sys.executable, "-c", "print('ran')"],
                                 cwd=project, env=env, capture_output=True, text=True, timeout=60,
                                 check=False)
            assert ran.stdout.strip() == "ran", ran.stderr
    finally:
        subprocess.run([*base, "down"], check=False, cwd=project, env=env, capture_output=True, timeout=60)
    private = subprocess.run([sys.executable, "-E", cli, "--state-dir", str(tmp_path / "private"), "run", "--root",
                              str(root), "--", sys.executable, "-c", "print('ran')"], cwd=project,
                             env=env, capture_output=True, text=True, timeout=60, check=False)
    assert private.stdout.strip() == "ran", private.stderr
    assert not marker.exists(), marker.read_text()


def test_forbid_core_dumps_makes_a_process_undumpable_for_good():
    """What every daemon runs first (its hard core limit of 0 above shows it ran there)."""
    code = textwrap.dedent("""
        import ctypes, resource
        from redoxcap.wire.limits import forbid_core_dumps
        forbid_core_dumps()
        libc = ctypes.CDLL(None, use_errno=True)
        print(libc.prctl(3, 0, 0, 0, 0), resource.getrlimit(resource.RLIMIT_CORE))  # GET_DUMPABLE
        try:
            resource.setrlimit(resource.RLIMIT_CORE, (1, 1))
        except ValueError:
            print("cannot raise")
    """)
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True,
                         timeout=30).stdout.splitlines()
    assert out[0] == "0 (0, 0)"
    assert out[1:] == ["cannot raise"] or not has_sys_resource()


def has_sys_resource() -> bool:
    effective = int(next(line for line in Path("/proc/self/status").read_text().splitlines()
                         if line.startswith("CapEff")).split()[1], 16)
    return bool(effective >> 24 & 1)  # CAP_SYS_RESOURCE
