"""Unmodified programs run brokered inside a `--beneath` sandbox, compared with native runs.

Each program runs twice: natively with a copy of the tree as its cwd, and
through `redoxcap run --ns '' --cwd /box --beneath --brokered`, where the
box is the same tree in the file scheme. Their outputs must be equal. Then
the same programs try to read, list, create and exec outside the box, race
a path under an approved call, run many threads at once, and outlive the
broker.
"""

from __future__ import annotations

import errno
import glob
import json
import os
import shutil
import signal
import subprocess
import sys
import tarfile
import tempfile
import textwrap
import time
import zipfile
from pathlib import Path

import pytest

from redoxcap.broker import available
from redoxcap.testing import REDOXCAP, System, booted, pid_alive, wait_for

pytestmark = pytest.mark.skipif(available() is not None, reason=str(available()))

SANDBOX = ("--ns", "", "--cwd", "/box", "--beneath", "--brokered")
VENV_BIN = Path(sys.executable).parent
PYGMENTIZE = VENV_BIN / "pygmentize"


def build_box(box: Path) -> None:
    """A small tree with files, a subdirectory, links in and out, a JSON, a zip and a tar."""
    (box / "sub" / "deeper").mkdir(parents=True)
    (box / "a.txt").write_text("alpha\n" * 100)
    (box / "sub" / "b.txt").write_text("beta\n")
    (box / "sub" / "deeper" / "c.py").write_text("print('hi')\n")
    (box / "d.json").write_text('{"b": [1, 2], "a": {"x": null}}')
    os.symlink("sub/b.txt", box / "rel_link")
    os.symlink("../secret.txt", box / "out_link")
    with zipfile.ZipFile(box / "z.zip", "w") as z:
        z.writestr("inside.txt", "zipped\n")
    with tarfile.open(box / "t.tar", "w") as t:
        t.add(box / "sub", arcname="sub")


@pytest.fixture(scope="module")
def sandbox(tmp_path_factory):
    """A system whose file root holds the box and a secret next to it, and a native copy."""
    with booted(tmp_path_factory.mktemp("broker")) as system:
        (system.root / "secret.txt").write_text("the secret")
        build_box(system.root / "box")
        yield system


def native(box: Path, argv: list[str]) -> subprocess.CompletedProcess:
    return subprocess.run(argv, check=False, cwd=box, capture_output=True, text=True, timeout=60,
                          env={"PATH": os.environ["PATH"], "LANG": "C.UTF-8", "HOME": "/nonexistent"})


def brokered(system: System, argv: list[str], *options: str, **kw) -> subprocess.CompletedProcess:
    return system.run(*SANDBOX, *options, "--env", "LANG=C.UTF-8", "--env", "HOME=/nonexistent",
                      "--", *argv, check=False, **kw)


@pytest.fixture
def twin(sandbox: System, tmp_path: Path):
    """(a fresh copy of the box in the system, the native copy): for programs that write."""
    box = sandbox.root / "box"
    native_box = tmp_path / "box"
    shutil.copytree(box, native_box, symlinks=True)
    return sandbox, native_box


PROGRAMS = {
    "cat": ["cat", "a.txt", "sub/b.txt", "rel_link"],
    "ls -l": ["ls", "-l", "--time-style=+%s", ".", "sub"],
    "ls -R": ["ls", "-R"],
    "sh -c": ["sh", "-c", "for f in *; do echo \"$f\"; done; wc -c < a.txt; cd sub && pwd && cat b.txt"],
    "tar -t": ["tar", "-tvf", "t.tar"],
    "tar -c": ["sh", "-c", "tar -cf - a.txt sub | tar -tvf -"],
    "gzip": ["sh", "-c", "gzip -cn a.txt | md5sum; gzip -c a.txt | gzip -dc | md5sum"],
    "find": ["sh", "-c", "find . | sort; find . -type f -name '*.txt' | sort"],
    "head/wc/sort": ["sh", "-c", "head -3 a.txt | sort | uniq -c; wc -l a.txt sub/b.txt"],
    "python3 -m json.tool": [sys.executable, "-m", "json.tool", "--sort-keys", "d.json"],
    "python3 -m zipfile": [sys.executable, "-m", "zipfile", "-l", "z.zip"],
    "python3 -m tarfile": ["/usr/bin/python3", "-m", "tarfile", "-l", "t.tar"],
    "python3 -c os": [sys.executable, "-c",
                      "import os; print(os.getcwd(), sorted(os.listdir()), os.path.getsize('a.txt'))"],
    "pip --version": [sys.executable, "-m", "pip", "--version"],
}
if PYGMENTIZE.exists():
    PROGRAMS["pygmentize"] = [str(PYGMENTIZE), "-l", "python", "-f", "html", "sub/deeper/c.py"]


@pytest.mark.parametrize("name", list(PROGRAMS))
def test_an_unmodified_program_gives_what_it_gives_natively(sandbox, tmp_path, name):
    argv = PROGRAMS[name]
    copy = tmp_path / "box"
    shutil.copytree(sandbox.root / "box", copy, symlinks=True)
    expected = native(copy, argv)
    got = brokered(sandbox, argv)
    assert (got.returncode, got.stdout) == (expected.returncode, expected.stdout.replace(str(copy), "/box")), \
        got.stderr
    assert "Traceback" not in got.stderr


WRITES = ("mkdir -p new/deeper && echo made > new/deeper/f.txt && mv new/deeper/f.txt moved.txt"
          " && ln -s moved.txt link && ln moved.txt hard && cat link hard"
          " && mkdir out && tar -xmf t.tar -C out --no-same-owner --no-same-permissions"
          " && rm -r new hard && rmdir out/sub 2>/dev/null; find . | sort")


def test_programs_that_write_leave_the_tree_they_leave_natively(twin):
    system, native_box = twin
    box = system.root / "box"
    expected = native(native_box, ["sh", "-c", WRITES])
    got = brokered(system, ["sh", "-c", WRITES])
    try:
        assert (got.returncode, got.stdout) == (expected.returncode, expected.stdout), got.stderr
        assert (box / "moved.txt").read_text() == "made\n"
    finally:
        for name in ("moved.txt", "link", "out"):
            path = box / name
            if path.is_dir() and not path.is_symlink():
                shutil.rmtree(path)
            elif path.exists() or path.is_symlink():
                path.unlink()


ESCAPES = {
    "cat ../secret.txt": (["cat", "../secret.txt"], "Invalid cross-device link"),
    "cat out_link": (["cat", "out_link"], "Invalid cross-device link"),
    # what was not handed is absent, as on a host where it does not exist
    "cat /secret.txt": (["cat", "/secret.txt"], "No such file or directory"),
    "cat /etc/shadow": (["cat", "/etc/shadow"], "No such file or directory"),
    "ls ..": (["ls", ".."], "Invalid cross-device link"),
    "ls /": (["ls", "/"], ("No such file or directory", "Permission denied")),
    # a directory above a host tree (pyenv's) can be stat'ed, not listed
    "ls /root": (["ls", "/root"], ("No such file or directory", "Permission denied")),
    "ls /usr/../root": (["ls", "/usr/../root"], "Permission denied"),
    "create ../x": (["sh", "-c", "echo x > ../escaped.txt"], "Invalid cross-device link"),
    "create /var/x": (["sh", "-c", "echo x > /var/escaped.txt"], "Permission denied"),
    "write the host trees": (["sh", "-c", "echo x > /usr/escaped.txt"], "Read-only file system"),
    "exec from the box": (["sh", "-c", "./mytrue"], "Permission denied"),
    "link a host file in": (["ln", "/usr/bin/env", "envlink"], "Invalid cross-device link"),
    "link out": (["ln", "mytrue", "/usr/bin/mytrue"], "Invalid cross-device link"),
    "python open": ([sys.executable, "-c", "open('/etc/hostname')"], "No such file or directory"),
    "python listdir": ([sys.executable, "-c", "import os; os.listdir('/home')"],
                       "No such file or directory"),
}


@pytest.mark.parametrize("name", list(ESCAPES))
def test_reading_listing_creating_or_executing_outside_fails(sandbox, name):
    argv, message = ESCAPES[name]
    box = sandbox.root / "box"
    shutil.copy("/usr/bin/true", box / "mytrue")
    try:
        got = brokered(sandbox, argv)
    finally:
        (box / "mytrue").unlink()
    assert got.returncode != 0
    assert any(m in got.stderr for m in ((message,) if isinstance(message, str) else message)), \
        got.stderr
    assert "the secret" not in got.stdout
    assert not (sandbox.root / "escaped.txt").exists()
    assert not Path("/var/escaped.txt").exists() and not Path("/usr/escaped.txt").exists()


def test_the_root_is_the_namespaces_root_for_cd_and_ls(sandbox):
    """`/` is the namespace's root, as `/x` is its file scheme's `/x`: `cd /` works (a
    shell's, pyenv's shims'), and `ls /` lists the file root, though a handed /tmp lies
    beneath it (with `--ns ''`, as the sandbox has, there is nothing: ESCAPES' `ls /`)."""
    got = sandbox.run("--", "sh", "-c", "cd /tmp && cd / && pwd && ls /", check=False)
    assert got.returncode == 0, got.stderr
    where, *listed = got.stdout.split()
    assert where == "/" and sorted(listed) == sorted(os.listdir(sandbox.root))


def test_the_cwd_is_reached_by_its_own_absolute_path_beside_a_handed_tmp(sandbox):
    """`cd "$PWD"` (pyenv's shims do it) reaches the cwd capability in the `--ns ''` sandbox,
    whose /tmp, a handed directory, makes every other name at `/` absent; a name beside
    the cwd stays absent."""
    got = brokered(sandbox, ["sh", "-c", "cd /box && pwd && head -1 a.txt && ls /secret.txt"])
    assert got.stdout.split() == ["/box", "alpha"], got.stderr
    assert got.returncode != 0 and "secret.txt" in got.stderr
    # a default run's namespace has `file`: `/x` beside /tmp is its /x, as `/x/y` is its /x/y
    got = sandbox.run("--", "sh", "-c", "cd /box && cat /secret.txt")
    assert got.stdout == "the secret", got.stderr


def test_exec_of_a_host_file_outside_the_trees_fails(sandbox, tmp_path):
    script = tmp_path / "escape.sh"
    script.write_text("#!/bin/sh\necho escaped\n")
    script.chmod(0o755)
    got = brokered(sandbox, ["sh", "-c", f"{script}; echo rc=$?"])
    assert "escaped" not in got.stdout
    assert "rc=126" in got.stdout or "rc=127" in got.stdout


MEMFD = textwrap.dedent("""
    import ctypes, errno, mmap, os, stat
    libc = ctypes.CDLL(None, use_errno=True)
    def attempt(what, call):
        try:
            print(what, call())
        except OSError as exc:
            print(what, errno.errorcode[exc.errno])
    fd = os.memfd_create("scratch", os.MFD_CLOEXEC | os.MFD_ALLOW_SEALING)
    os.write(fd, b"#!/bin/sh\\necho ran\\n")
    attempt("read back", lambda: os.pread(fd, 9, 0).decode())
    attempt("mapped", lambda: mmap.mmap(fd, 9)[:2].decode())
    attempt("cloexec", lambda: not os.get_inheritable(fd))
    attempt("mode", lambda: oct(stat.S_IMODE(os.fstat(fd).st_mode)))
    def fcntl_seal(fd):
        import fcntl
        fcntl.fcntl(fd, fcntl.F_ADD_SEALS, fcntl.F_SEAL_GROW)
        return "ok"
    attempt("sealed", lambda: fcntl_seal(fd))
    attempt("chmod +x", lambda: os.fchmod(fd, 0o755))
    attempt("fexecve", lambda: os.execve(fd, ["x"], {}))
    attempt("exec via proc", lambda: os.execv(f"/proc/self/fd/{fd}", ["x"]))
    attempt("MFD_EXEC", lambda: os.memfd_create("x", 0x10))
    attempt("long name", lambda: os.memfd_create("n" * 250))
    attempt("longest name", lambda: os.close(os.memfd_create("n" * 249)) or "ok")
    attempt("bad flags", lambda: os.memfd_create("x", 0x1000))
    attempt("cloexec unasked", lambda: not os.get_inheritable(os.memfd_create("y", 0)))
""")


def test_a_programs_memory_files_work_and_can_never_be_executed(sandbox):
    """memfd_create is the broker's: the file reads, maps and seals as one of the kernel's,
    but has no execute bit, cannot get one, and no exec of it runs (an exec whose fd or path a
    racing thread swapped for one would run it otherwise: Landlock does not check it)."""
    got = brokered(sandbox, [sys.executable, "-c", MEMFD])
    assert dict(line.rsplit(" ", 1) for line in got.stdout.splitlines()) == {
        "read back": "#!/bin/sh", "mapped": "#!", "cloexec": "True", "mode": "0o666",
        "sealed": "ok", "chmod +x": "EPERM", "fexecve": "EACCES", "exec via proc": "ENOENT",
        "MFD_EXEC": "EACCES", "long name": "EINVAL", "longest name": "ok", "bad flags": "EINVAL",
        "cloexec unasked": "False",
    }, got.stderr


RACE = textwrap.dedent("""
    import ctypes, json, os, sys, threading
    libc = ctypes.CDLL(None, use_errno=True)
    inside = (sys.argv[3] if len(sys.argv) > 3 else "a.txt").encode() + b"\\0"
    outside = sys.argv[1].encode() + b"\\0"
    buf = ctypes.create_string_buffer(max(len(inside), len(outside)))
    stop = False
    def flip():
        while not stop:
            ctypes.memmove(buf, outside, len(outside))
            ctypes.memmove(buf, inside, len(inside))
    threading.Thread(target=flip, daemon=True).start()
    got = {"inside": 0, "outside": 0, "error": 0}
    for _ in range(int(sys.argv[2])):
        fd = libc.open(buf, os.O_RDONLY)
        if fd < 0:
            got["error"] += 1
            continue
        data = os.read(fd, 64)
        os.close(fd)
        got["outside" if b"secret" in data else "inside"] += 1
    stop = True
    print(json.dumps(got))
""")


def test_a_racing_thread_swapping_the_path_never_gets_out(sandbox, tmp_path):
    secret = tmp_path / "host_secret.txt"  # a host file the kernel would open if it re-read the path
    secret.write_text("secret on the host")
    got = brokered(sandbox, [sys.executable, "-c", RACE, str(secret), "2000"], timeout=120)
    assert got.returncode == 0, got.stderr
    counts = json.loads(got.stdout)
    assert counts["outside"] == 0
    assert counts["inside"] > 0


def test_a_continued_host_open_swapped_by_a_racing_thread_reads_no_secret(sandbox, tmp_path):
    """A read-only open of a host-tree file, no symlink on the way, is let through: the
    kernel opens it (CONTINUE) and reads the path again. A thread swapping it for a host file
    outside the trees meanwhile gets no further than Landlock lets the program read."""
    secret = tmp_path / "host_secret.txt"
    secret.write_text("secret on the host")
    inside = os.path.realpath(os.__file__)  # the interpreter's own tree: a host tree of the run
    trace = tmp_path / "trace.jsonl"
    got = brokered(sandbox, [sys.executable, "-c", RACE, str(secret), "2000", inside],
                   f"--trace={trace}", "--trace-json", timeout=120)
    assert got.returncode == 0, got.stderr
    counts = json.loads(got.stdout)
    assert counts["outside"] == 0
    assert counts["inside"] > 0
    opens = [json.loads(line) for line in trace.read_text().splitlines()]
    # (the trace reads the path after the answer, so `about` may be either)
    opens = [r for r in opens if r["op"] == "openat" and r["about"] in (inside, str(secret))]
    assert sum(r["result"] == "proceed" for r in opens) > 100, opens[:5]


def test_a_broker_failing_before_it_took_the_listener_leaves_no_program_waiting(sandbox):
    """The program's fork says where its listener is and goes on to exec, a call only the
    broker can answer: a broker that fails before it took the listener (here the caller's
    `meanwhile` work, once the fork has said so) kills and reaps it; nothing is left waiting."""
    import rt
    from redoxcap import control
    from redoxcap.broker import start_brokered

    _, fds = control.request(sandbox.state_dir, "namespace")
    rt.setup(fds[0], None)
    seen: list[int] = []

    def meanwhile(pid: int) -> None:
        seen.append(pid)
        time.sleep(0.5)  # the fork has confined itself and said where its listener is
        raise RuntimeError("the caller's work failed")

    try:
        cwd = rt.open("/", rt.O_DIRECTORY)
        with pytest.raises(RuntimeError):
            start_brokered(["/bin/true"], fds[0], cwd, "/", {"PATH": "/usr/bin:/bin"},
                           meanwhile=meanwhile)
        rt.close(cwd)
        try:
            assert os.waitpid(seen[0], os.WNOHANG) == (0, 0), "reaped already"
        except ChildProcessError:
            pass  # reaped by start_brokered, as it should be
        else:
            os.kill(seen[0], signal.SIGKILL)
            os.waitpid(seen[0], 0)
            pytest.fail("the program's fork was left waiting in its exec")
    finally:
        rt.setup(None, None)


THREADS = textwrap.dedent("""
    import os, threading
    errors = []
    def work(n):
        try:
            for i in range(60):
                with open("a.txt") as f:
                    assert f.read() == "alpha\\n" * 100
                assert os.stat("sub/b.txt").st_size == 5
                assert "deeper" in os.listdir("sub")
                os.makedirs(f"t{n}", exist_ok=True)
                with open(f"t{n}/f", "w") as f:
                    f.write(str(i))
                os.unlink(f"t{n}/f")
                os.rmdir(f"t{n}")
        except Exception as exc:
            errors.append(repr(exc))
    threads = [threading.Thread(target=work, args=(n,)) for n in range(8)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    print("errors", errors)
""")


def test_a_multithreaded_program_works(sandbox):
    got = brokered(sandbox, [sys.executable, "-c", THREADS], timeout=120)
    assert got.stdout.strip() == "errors []", got.stderr


def test_children_are_brokered_the_same_way(sandbox):
    code = ("import subprocess; print(subprocess.run(['cat', 'sub/b.txt'], capture_output=True).stdout);"
            "print(subprocess.run(['cat', '../secret.txt'], capture_output=True).returncode)")
    got = brokered(sandbox, [sys.executable, "-c", code])
    assert got.stdout.splitlines() == ["b'beta\\n'", "1"], got.stderr


ORPHAN = textwrap.dedent("""
    import os, sys
    if os.fork() == 0:
        os.setsid()
        print("ready", os.getppid(), flush=True)
        sys.stdin.readline()  # until the test has killed the broker
        try:
            os.open("a.txt", os.O_RDONLY)
            print("opened", flush=True)
        except OSError as exc:
            print("errno", exc.errno, flush=True)
        os._exit(0)
    sys.stdin.readline()  # the broker stays until this process exits
""")


def test_with_the_broker_gone_a_brokered_call_fails_with_enosys(sandbox):
    # in-process: the broker is this `run` (a runner would kill the orphan with the run)
    cmd = [*REDOXCAP, "--state-dir", str(sandbox.state_dir), "run", "--in-process", *SANDBOX,
           "--", sys.executable, "-c", ORPHAN]
    tmps = os.path.join(tempfile.gettempdir(), "redoxcap-tmp-*")
    before = set(glob.glob(tmps))
    run = subprocess.Popen(cmd, stdin=subprocess.PIPE, stdout=subprocess.PIPE, text=True)
    try:
        ready, main = run.stdout.readline().split()
        assert ready == "ready"
        run.send_signal(signal.SIGKILL)  # the broker (its child dies with it; the orphan lives on)
        run.wait(timeout=30)
        # the child's SIGKILL (PR_SET_PDEATHSIG) takes a moment: gone, it cannot read our line
        wait_for(lambda: not pid_alive(int(main)))
        run.stdin.write("go\n")
        run.stdin.flush()
        assert run.stdout.readline().split() == ["errno", str(errno.ENOSYS)]
    finally:
        run.stdin.close()  # the orphan exits on EOF if it is still waiting
        run.stdout.close()
        if run.poll() is None:
            run.kill()
            run.wait()
        for left in set(glob.glob(tmps)) - before:  # the killed run's private /tmp: nothing
            shutil.rmtree(left, ignore_errors=True)  # outlived it to remove it


def test_without_passthrough_every_byte_is_routed_and_programs_still_work(twin):
    system, native_box = twin
    script = "echo routed > r.txt; cat r.txt a.txt | wc -c; python3 -c 'print(open(\"d.json\").read())'"
    expected = native(native_box, ["sh", "-c", script])
    got = brokered(system, ["sh", "-c", script], "--no-passthrough")
    try:
        assert (got.returncode, got.stdout) == (expected.returncode, expected.stdout), got.stderr
    finally:
        (system.root / "box" / "r.txt").unlink(missing_ok=True)


def test_device_schemes_reach_an_unmodified_program_as_the_hosts_devices(sandbox):
    got = sandbox.run("--ns", "zero,null", "--cwd", "/box", "--beneath", "--brokered", "--",
                      "sh", "-c", "head -c 4 /scheme/zero/ | od -An -tx1; echo gone > /scheme/null/",
                      check=False)
    assert (got.returncode, got.stdout.split()) == (0, ["00"] * 4), got.stderr
    is_device = textwrap.dedent("""
        import os, stat
        fd = os.open('/scheme/zero', os.O_RDONLY)
        try:
            where = os.lseek(fd, 0, os.SEEK_SET)
        except OSError as exc:
            where = exc.strerror
        print(stat.S_ISCHR(os.fstat(fd).st_mode), where)
    """)
    got = sandbox.run("--ns", "zero", "--cwd", "/box", "--beneath", "--brokered", "--",
                      sys.executable, "-c", is_device, check=False)
    assert (got.returncode, got.stdout) == (0, "True 0\n"), got.stderr  # passed through, not pumped
    got = sandbox.run("--ns", "zero", "--cwd", "/box", "--beneath", "--brokered", "--no-passthrough",
                      "--", sys.executable, "-c", is_device, check=False)
    # a pump, whose fstat still describes the device it routes
    assert (got.returncode, got.stdout) == (0, "True Illegal seek\n"), got.stderr


def test_ro_host_serves_a_host_tree_read_only(sandbox, tmp_path):
    extra = tmp_path / "shared-data"
    extra.mkdir()
    (extra / "data.txt").write_text("host data\n")
    read = ["cat", f"{extra}/data.txt"]
    assert brokered(sandbox, read).returncode != 0
    got = brokered(sandbox, read, "--ro-host", str(extra))
    assert (got.returncode, got.stdout) == (0, "host data\n"), got.stderr
    got = brokered(sandbox, ["sh", "-c", f"echo x > {extra}/new.txt"], "--ro-host", str(extra))
    assert "Read-only file system" in got.stderr and not (extra / "new.txt").exists()


def test_an_rt_program_keeps_its_capabilities_when_brokered(sandbox):
    project = Path(__file__).resolve().parent.parent
    code = "import os, rt; print(rt.listdir('sub') == sorted(os.listdir('sub')), rt.getcwd())"
    got = brokered(sandbox, [sys.executable, "-c", code], "--ro-host", str(project))
    assert got.stdout.split() == ["True", "/box"], got.stderr


def test_run_says_why_it_cannot_broker(sandbox, monkeypatch):
    from click.testing import CliRunner

    import redoxcap.broker
    from redoxcap.cli import main

    runner = CliRunner()
    state = ["--state-dir", str(sandbox.state_dir), "run"]
    result = runner.invoke(main, [*state, "--brokered", "--no-confine", "--", "true"])
    assert result.exit_code == 2 and "--no-confine" in result.output
    monkeypatch.setattr(redoxcap.broker, "available", lambda: "no user notification here")
    result = runner.invoke(main, [*state, "--brokered", "--in-process", "--", "true"])
    assert result.exit_code == 1
    assert "no user notification here; a program written with rt runs with --no-broker" in result.output


FORK_THEN_CHDIR = textwrap.dedent("""
    import os, sys
    r, w = os.pipe()
    pid = os.fork()
    if pid == 0:
        os.read(r, 1)  # its first brokered call comes after the parent has moved
        print(open("a.txt").read(6).strip(), flush=True)
        os._exit(0)
    if sys.argv[1] == "chdir":
        os.chdir("sub")
    else:
        os.fchdir(os.open("sub", os.O_RDONLY | os.O_DIRECTORY))
    late = os.fork()  # forked after the move: starts in sub
    if late == 0:
        print(open("b.txt").read().strip(), flush=True)
        os._exit(0)
    os.waitpid(late, 0)
    os.chdir("deeper")  # and moved again before the first child's first call
    os.write(w, b"x")
    os.waitpid(pid, 0)
    print(os.getcwd(), os.path.exists("c.py"))
""")


@pytest.mark.parametrize("how", ["chdir", "fchdir"])
def test_a_child_starts_where_its_parent_was_when_it_forked(sandbox, how):
    """Forks are the kernel's: the broker gives a child that has made no call yet the
    directory its parent leaves, each time the parent moves."""
    got = brokered(sandbox, [sys.executable, "-c", FORK_THEN_CHDIR, how])
    assert got.stdout.split() == ["beta", "alpha", "/box/sub/deeper", "True"], got.stderr


FORKS_WHILE_CHILDREN_END = textwrap.dedent("""
    import os, signal
    signal.signal(signal.SIGCHLD, lambda *_: None)  # a handler: a signal may interrupt a call
    failed = 0
    for _ in range(300):
        try:
            pid = os.fork()
        except OSError:
            failed += 1
            continue
        if pid == 0:
            os._exit(0)  # its end signals the parent, which is forking the next
    while True:
        try:
            os.wait()
        except ChildProcessError:
            break
        except InterruptedError:
            continue
    print(failed)
""")


def test_forks_never_fail_while_children_end(sandbox):
    """A fork the broker held could be interrupted by SIGCHLD before it took it, and fail
    with EINTR (which Linux's fork never does: dash said "Cannot fork", 4-15 in 300 here)."""
    got = brokered(sandbox, [sys.executable, "-c", FORKS_WHILE_CHILDREN_END])
    assert got.stdout.split() == ["0"], got.stderr


def test_run_trace_shows_each_brokered_syscall_and_its_refusals(sandbox, tmp_path):
    # to a file: on stderr, cat's own message would share lines with the records
    trace = tmp_path / "trace.jsonl"
    out = brokered(sandbox, ["sh", "-c", "cat a.txt >/dev/null; echo $$; cat ../secret.txt; exit 3"],
                   f"--trace={trace}", "--trace-json")
    assert out.returncode != 0 and "the secret" not in out.stdout
    records = [json.loads(line) for line in trace.read_text().splitlines()]
    syscalls = [r for r in records if r["scheme"] == "syscall"]
    shell = int(out.stdout.split()[0])
    # the shell's own calls carry its pid; cat's a child's, and the refused open says why
    assert any(r["pid"] == shell for r in syscalls), syscalls[:5]
    refused = [r for r in syscalls if r["about"] == "../secret.txt"]
    assert refused and refused[-1]["result"] == "EXDEV" and refused[-1]["pid"] != shell
    assert any(r["about"] == "a.txt" and r["result"] == "fd" for r in syscalls)
    # the lookups were native (beneath the host directory the file scheme handed the broker):
    # no scheme call for them, only the broker's one HOSTDIR for the cwd
    assert not [r for r in records if r["scheme"] == "file" and r["op"] in ("OPENAT", "STATAT")
                and r["about"] in ("a.txt", "../secret.txt")], records
    assert any(r["scheme"] == "file" and r["op"] == "HOSTDIR" for r in records), records


def test_with_no_passthrough_the_trace_shows_every_lookup_the_scheme_answered(sandbox, tmp_path):
    trace = tmp_path / "trace.jsonl"
    out = brokered(sandbox, ["sh", "-c", "cat a.txt >/dev/null; cat ../secret.txt; exit 3"],
                   "--no-passthrough", f"--trace={trace}", "--trace-json")
    assert out.returncode != 0 and "the secret" not in out.stdout
    records = [json.loads(line) for line in trace.read_text().splitlines()]
    refused = [r for r in records if r["scheme"] == "syscall" and r["about"] == "../secret.txt"]
    assert refused and refused[-1]["result"] == "EXDEV"
    # the scheme calls behind the open and the refusal, as the file scheme answered them
    assert any(r["scheme"] == "file" and r["op"] == "OPENAT" and r["about"] == "a.txt"
               for r in records), records
    assert any(r["scheme"] == "file" and r["about"] == "../secret.txt" and r["result"] == "EXDEV"
               for r in records)
    assert not any(r["op"] == "HOSTDIR" for r in records)  # no host directory was asked for
