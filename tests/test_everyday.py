"""Everyday programs in a sandboxed host directory: `redoxcap run --dir DIR -- CMD`.

Each program runs twice on two copies of the same project: natively (cwd
the copy) and brokered by default in `--dir` (cwd the directory, seen at
its own path). Their output (with each directory's path written as
PROJECT) and the trees they leave (names, kinds, sizes, modes, and times
where the program sets them) must be equal. Then the same sandbox is
attacked: a sibling directory, symlinks and `..` out, exec of what lies
outside (also through a symlink swapped by a racing rename), sockets beyond
the grants.
"""

from __future__ import annotations

import base64
import hashlib
import os
import shutil
import socket
import stat
import subprocess
import sys
import tarfile
import textwrap
import urllib.request
import zipfile
from pathlib import Path

import pytest

from redoxcap.broker import available
from redoxcap.testing import REDOXCAP, System, free_port, wait_for

pytestmark = pytest.mark.skipif(available() is not None, reason=str(available()))

# The interpreter pyenv (or the distribution) installed, run by its own path: not a system tree.
BASE_PYTHON = str(Path(sys.base_prefix) / "bin" / "python3")
ENV = {"PATH": os.environ["PATH"], "LANG": "C.UTF-8", "HOME": "/nonexistent", "TZ": "UTC"}
GIT = ["git", "-c", "user.name=T", "-c", "user.email=t@example.org", "-c", "init.defaultBranch=main"]


@pytest.fixture
def twins(tmp_path: Path):
    """(the project handed to the sandbox, the native copy), both empty to start with."""
    project, native_copy = tmp_path / "project", tmp_path / "native" / "project"
    project.mkdir()
    native_copy.mkdir(parents=True)
    return project, native_copy


def native(copy: Path, argv: list[str], **kw) -> subprocess.CompletedProcess:
    return subprocess.run(argv, cwd=copy, env=ENV, capture_output=True, text=True, timeout=120,
                          check=False, **kw)


def sandboxed(system: System, project: Path, argv: list[str], *options: str, **kw
              ) -> subprocess.CompletedProcess:
    env_options = [x for name, value in ENV.items() if name != "PATH"
                   for x in ("--env", f"{name}={value}")]
    return system.run("--dir", str(project), *options, *env_options, "--", *argv, check=False,
                      timeout=120, **kw)


def tree(top: Path, times: bool = False) -> dict[str, tuple]:
    """What a program left: kind, size, permission bits (and mtime) of everything below top."""
    out = {}
    for dirpath, dirnames, filenames in os.walk(top):
        for name in sorted(dirnames + filenames):
            path = Path(dirpath, name)
            st = path.lstat()
            kind = stat.S_IFMT(st.st_mode)
            detail = os.readlink(path) if stat.S_ISLNK(st.st_mode) else \
                (st.st_size if stat.S_ISREG(st.st_mode) else None)
            when = st.st_mtime_ns if times and not stat.S_ISLNK(st.st_mode) else None
            out[str(path.relative_to(top))] = (kind, detail, stat.S_IMODE(st.st_mode), when)
    return out


def same_as_native(system: System, twins, build, argv: list[str], *options: str,
                   times: bool = False, skip: tuple[str, ...] = (), **kw) -> subprocess.CompletedProcess:
    """Build both copies, run argv in each, and compare output and the trees left."""
    project, copy = twins
    build(project)
    build(copy)
    expected = native(copy, argv, **kw)
    got = sandboxed(system, project, argv, *options, **kw)
    assert got.returncode == expected.returncode, (got.stderr, expected.stderr)
    assert got.stdout.replace(str(project), "PROJECT") == \
        expected.stdout.replace(str(copy), "PROJECT"), got.stderr
    ours, theirs = tree(project, times), tree(copy, times)
    for name in skip:
        for table in (ours, theirs):
            for key in [k for k in table if k == name or k.startswith(name + "/")]:
                del table[key]
    assert ours == theirs
    return got


# -- everyday programs, each against a native run -----------------------------------


def test_touch_sets_times_as_natively(redoxcap_module_system, twins):
    def build(d: Path) -> None:
        (d / "a").write_text("a")
        (d / "b").write_text("b")
    script = ("touch -d @1000000000 a && touch -r a b && touch -m -d '2001-02-03 04:05:06' c "
              "&& touch -a -d @5 a && ls -l --time-style=+%s a b c")
    same_as_native(redoxcap_module_system, twins, build, ["sh", "-c", script], times=True)


def test_cp_a_keeps_modes_times_and_links(redoxcap_module_system, twins):
    def build(d: Path) -> None:
        (d / "src" / "sub").mkdir(parents=True)
        (d / "src" / "run.sh").write_text("#!/bin/sh\necho hi\n")
        (d / "src" / "run.sh").chmod(0o750)
        (d / "src" / "sub" / "data").write_text("data\n" * 100)
        (d / "src" / "sub" / "data").chmod(0o600)
        os.symlink("sub/data", d / "src" / "link")
        (d / "src" / "sub").chmod(0o700)
        for path in [d / "src" / "run.sh", d / "src" / "sub" / "data", d / "src" / "sub", d / "src"]:
            os.utime(path, ns=(1_000_000_000_000_000_000, 1_100_000_000_000_000_000))
    same_as_native(redoxcap_module_system, twins, build, ["sh", "-c", "cp -a src dst && cat dst/link | wc -l"],
                   times=True)


def test_tar_xzf_restores_modes_and_times(redoxcap_module_system, twins, tmp_path):
    archive = tmp_path / "in.tgz"
    source = tmp_path / "source"
    (source / "pkg" / "bin").mkdir(parents=True)
    (source / "pkg" / "bin" / "tool").write_text("#!/bin/sh\necho tool\n")
    (source / "pkg" / "bin" / "tool").chmod(0o755)
    (source / "pkg" / "notes.txt").write_text("notes\n")
    (source / "pkg" / "notes.txt").chmod(0o640)
    os.symlink("bin/tool", source / "pkg" / "tool-link")
    (source / "pkg").chmod(0o750)
    for path in source.rglob("*"):
        os.utime(path, (1_200_000_000, 1_200_000_000), follow_symlinks=False)
    with tarfile.open(archive, "w:gz") as tar:
        tar.add(source / "pkg", arcname="pkg")

    def build(d: Path) -> None:
        shutil.copy2(archive, d / "in.tgz")
    same_as_native(redoxcap_module_system, twins, build, ["sh", "-c", "tar -xzf in.tgz && pkg/bin/tool"], times=True)


def test_make_builds_with_cc_runs_the_binary_and_knows_it_is_up_to_date(redoxcap_module_system, twins):
    def build(d: Path) -> None:
        (d / "hello.c").write_text('#include <stdio.h>\nint main(void){puts("hello from c");return 0;}\n')
        (d / "Makefile").write_text("all: hello\n\t./hello\nhello: hello.c\n\tcc -o hello hello.c\n")
    got = same_as_native(redoxcap_module_system, twins, build, ["sh", "-c", "make && make hello"])
    assert "hello from c" in got.stdout and "is up to date" in got.stdout


def test_git_makes_a_repository_commits_and_reads_it_back(redoxcap_module_system, twins):
    def build(d: Path) -> None:
        (d / "a.txt").write_text("alpha\n")
        (d / "sub").mkdir()
        (d / "sub" / "b.txt").write_text("beta\n")
    script = (f"{' '.join(GIT)} init -q && git add . && {' '.join(GIT)} commit -qm first "
              "&& echo more >> a.txt && git status --porcelain && git diff --stat "
              "&& git log --format=%s && git rev-parse HEAD^{tree} && git fsck --no-progress "
              "&& git stash -q && git status --porcelain && cat a.txt")
    got = same_as_native(redoxcap_module_system, twins, build, ["sh", "-c", script], skip=(".git",))
    assert "first" in got.stdout


def test_git_and_sqlite3_without_passthrough_see_their_files_whole(redoxcap_module_system, twins):
    """Every byte routed: what git reads is the file (a read-only file comes whole, as a memory
    file it can map; fstat describes the file, not what carries it), and sqlite3, which needs
    pread on a file it writes, stops with an error; nothing reads as empty or corrupt."""
    project, _ = twins
    (project / "a.txt").write_text("alpha\n")
    setup = (f"{' '.join(GIT)} init -q && git add . && {' '.join(GIT)} commit -qm first "
             "&& sqlite3 db 'create table t(x); insert into t values (1), (2);' "
             "&& echo db > .git/info/exclude")
    assert sandboxed(redoxcap_module_system, project, ["sh", "-c", setup]).returncode == 0
    script = ("git log --format=%s && git cat-file -p HEAD^{tree} && echo more >> a.txt && "
              f"git status --short && {' '.join(GIT)} commit -qam second && git log --format=%s")
    got = sandboxed(redoxcap_module_system, project, ["sh", "-c", script], "--no-passthrough")
    assert "corrupt" not in got.stderr and "empty" not in got.stderr, got.stderr
    blob = subprocess.run(["git", "rev-parse", "HEAD~1:a.txt"], cwd=project, capture_output=True,
                          text=True, check=True).stdout.strip()
    assert got.stdout == f"first\n100644 blob {blob}\ta.txt\n M a.txt\nsecond\nfirst\n", got.stderr
    got = sandboxed(redoxcap_module_system, project, ["sqlite3", "db", "select sum(x) from t"], "--no-passthrough")
    assert got.stdout == "3\n" or "disk I/O error" in got.stderr, got.stderr
    assert "malformed" not in got.stderr, got.stderr


def test_sqlite3_creates_and_queries_a_database(redoxcap_module_system, twins):
    def build(d: Path) -> None:
        pass
    script = ("sqlite3 db 'create table t(x, y); insert into t values (1, \"a\"), (2, \"b\");' && "
              "sqlite3 db 'update t set y = y || y; select x, y from t order by x; pragma integrity_check;'")
    same_as_native(redoxcap_module_system, twins, build, ["sh", "-c", script], skip=("db",))


@pytest.mark.parametrize("editor", ["ed", "vim"])
def test_an_editor_edits_a_file(redoxcap_module_system, twins, editor):
    if shutil.which(editor) is None:
        pytest.skip(f"{editor} is not installed")

    def build(d: Path) -> None:
        (d / "notes.txt").write_text("one\ntwo\nthree\n")
    if editor == "ed":
        argv, stdin = ["ed", "-s", "notes.txt"], "2s/two/TWO/\n$a\nfour\n.\nw\nq\n"
    else:
        argv, stdin = ["vim", "-N", "-u", "NONE", "-i", "NONE", "-es", "-c", "2s/two/TWO/",
                       "-c", "wq", "notes.txt"], ""
    same_as_native(redoxcap_module_system, twins, build, argv, input=stdin)
    assert "TWO" in (twins[0] / "notes.txt").read_text()


def _wheel(path: Path) -> None:
    """A pure-Python wheel of a tiny package, built here (no network, no build backend)."""
    files = {
        "hello_pkg/__init__.py": "def hi():\n    return 'hi from a wheel'\n",
        "hello_pkg-1.0.dist-info/METADATA": "Metadata-Version: 2.1\nName: hello-pkg\nVersion: 1.0\n",
        "hello_pkg-1.0.dist-info/WHEEL": "Wheel-Version: 1.0\nGenerator: test\n"
                                         "Root-Is-Purelib: true\nTag: py3-none-any\n",
    }
    record = []
    with zipfile.ZipFile(path, "w") as z:
        for name, text in files.items():
            data = text.encode()
            z.writestr(name, data)
            digest = base64.urlsafe_b64encode(hashlib.sha256(data).digest()).rstrip(b"=").decode()
            record.append(f"{name},sha256={digest},{len(data)}")
        record.append("hello_pkg-1.0.dist-info/RECORD,,")
        z.writestr("hello_pkg-1.0.dist-info/RECORD", "\n".join(record) + "\n")


def test_a_venv_installs_a_local_wheel_and_runs_it(redoxcap_module_system, twins):
    """python3 -m venv (the interpreter by its own path, outside the system trees), pip
    install of a local wheel into it, and the venv's python importing it."""
    def build(d: Path) -> None:
        _wheel(d / "hello_pkg-1.0-py3-none-any.whl")
    script = (f"{BASE_PYTHON} -m venv --without-pip v && "
              f"{BASE_PYTHON} -m pip --python v/bin/python install -q --no-index --no-cache-dir "
              "--disable-pip-version-check ./hello_pkg-1.0-py3-none-any.whl && "
              "v/bin/python -c 'import hello_pkg, sys; print(hello_pkg.hi(), sys.prefix)' && "
              "ls v/lib/python3*/site-packages | grep hello")
    got = same_as_native(redoxcap_module_system, twins, build, ["sh", "-c", script], skip=("v",))
    assert "hi from a wheel PROJECT/v" in got.stdout.replace(str(twins[0]), "PROJECT")


def test_http_server_serves_within_its_grant(redoxcap_module_system, tmp_path):
    project = tmp_path / "site"
    project.mkdir()
    (project / "index.txt").write_text("served from the sandbox\n")
    port = free_port()
    server = redoxcap_module_system.start("run", "--dir", str(project), "--allow-listen", f"127.0.0.1:{port}", "--",
                          BASE_PYTHON, "-m", "http.server", str(port), "--bind", "127.0.0.1")
    try:
        def fetch() -> bytes | None:
            try:
                with urllib.request.urlopen(f"http://127.0.0.1:{port}/index.txt", timeout=2) as r:
                    return r.read()
            except OSError:
                assert server.poll() is None, server.communicate()
                return None
        assert wait_for(fetch, timeout=60) == b"served from the sandbox\n"
    finally:
        server.terminate()
        server.communicate(timeout=30)
    other = free_port()
    got = sandboxed(redoxcap_module_system, project, [BASE_PYTHON, "-m", "http.server", str(other), "--bind",
                                      "127.0.0.1"], "--allow-listen", f"127.0.0.1:{port}")
    assert got.returncode != 0 and "Permission denied" in got.stderr


SOCKETS = textwrap.dedent("""
    import errno, socket, sys
    granted, other = int(sys.argv[1]), int(sys.argv[2])
    def attempt(what, call):
        try:
            call()
            print(what, "ok")
        except OSError as exc:
            print(what, errno.errorcode.get(exc.errno, exc.errno))
    tcp = lambda family=socket.AF_INET: socket.socket(family, socket.SOCK_STREAM)
    attempt("connect granted", lambda: tcp().connect(("127.0.0.1", granted)))
    attempt("connect other", lambda: tcp().connect(("127.0.0.1", other)))
    attempt("connect mapped", lambda: tcp(socket.AF_INET6).connect(("::ffff:127.0.0.1", other)))
    attempt("bind other", lambda: tcp().bind(("127.0.0.1", other)))
    attempt("bind wildcard", lambda: tcp().bind(("0.0.0.0", granted)))
    attempt("listen unbound", lambda: tcp().listen())
    attempt("udp", lambda: socket.socket(socket.AF_INET, socket.SOCK_DGRAM))
    attempt("raw", lambda: socket.socket(socket.AF_INET, socket.SOCK_RAW, socket.IPPROTO_ICMP))
    attempt("sctp", lambda: socket.socket(socket.AF_INET, socket.SOCK_STREAM, 132))
    attempt("fastopen", lambda: tcp().sendto(b"x", 0x20000000, ("127.0.0.1", other)))
    attempt("unix path", lambda: socket.socket(socket.AF_UNIX).connect("/run/anything.sock"))
""")


def test_sockets_reach_exactly_what_is_granted(redoxcap_module_system, tmp_path):
    project = tmp_path / "net"
    project.mkdir()
    with socket.create_server(("127.0.0.1", 0)) as granted, \
            socket.create_server(("127.0.0.1", 0)) as other:
        granted_port, other_port = granted.getsockname()[1], other.getsockname()[1]
        other.settimeout(0)
        got = sandboxed(redoxcap_module_system, project, [BASE_PYTHON, "-c", SOCKETS, str(granted_port), str(other_port)],
                        "--allow-connect", f"127.0.0.1:{granted_port}")
        with pytest.raises(BlockingIOError):
            other.accept()  # nothing ever reached the port that was not granted
    lines = dict(line.rsplit(" ", 1) for line in got.stdout.splitlines())
    assert lines == {
        "connect granted": "ok", "connect other": "EACCES", "connect mapped": "EACCES",
        "bind other": "EACCES", "bind wildcard": "EACCES", "listen unbound": "EACCES",
        "udp": "EACCES", "raw": "EACCES", "sctp": "EACCES", "fastopen": "EACCES",
        "unix path": "EACCES",
    }, got.stderr


# -- programs inside the sandbox, and what they cannot reach ----------------------------


def test_scripts_and_binaries_inside_run_and_a_symlink_out_does_not(redoxcap_module_system, tmp_path):
    project, outside = tmp_path / "proj", tmp_path / "outside"
    (project / "sub").mkdir(parents=True)
    outside.mkdir()
    marker = outside / "ran"
    (outside / "evil.sh").write_text(f"#!/bin/sh\ntouch {marker}\n")
    (outside / "evil.sh").chmod(0o755)
    (project / "run.sh").write_text('#!/bin/sh\necho "run.sh in $(pwd)"\n')
    (project / "run.sh").chmod(0o755)
    shutil.copy(project / "run.sh", project / "sub" / "run.sh")
    os.symlink(outside / "evil.sh", project / "evil")
    os.symlink("/usr/bin/true", project / "true")
    script = "./run.sh; (cd sub && ./run.sh); ./true && echo true ran; ./evil; echo evil=$?"
    got = sandboxed(redoxcap_module_system, project, ["sh", "-c", script])
    assert got.stdout.splitlines() == [f"run.sh in {project}", f"run.sh in {project}/sub",
                                       "true ran", "evil=127"], got.stderr
    assert not marker.exists()


RENAME_RACE = textwrap.dedent("""
    import os, subprocess, sys, threading
    stop = False
    def swap():
        while not stop:
            os.replace("good", "prog")
            os.symlink(sys.argv[1], "evil.tmp")
            os.replace("evil.tmp", "prog")
            with open("good", "w") as f:
                f.write("#!/bin/sh\\nexit 0\\n")
            os.chmod("good", 0o755)
    threading.Thread(target=swap, daemon=True).start()
    outcomes = {}
    for _ in range(int(sys.argv[2])):
        try:
            code = subprocess.run(["./prog"]).returncode
        except OSError as exc:
            code = exc.strerror
        outcomes[code] = outcomes.get(code, 0) + 1
    stop = True
    print(sorted(outcomes.items(), key=str))
""")


def test_a_racing_rename_never_execs_what_lies_outside(redoxcap_module_system, tmp_path):
    """The broker checks ./prog and lets the kernel exec it; a thread swaps in a symlink to a
    host script outside meanwhile. Landlock checks the file the kernel resolved: the outside
    script never runs, however the race goes."""
    project, outside = tmp_path / "race", tmp_path / "outside"
    project.mkdir()
    outside.mkdir()
    marker = outside / "ran"
    (outside / "evil.sh").write_text(f"#!/bin/sh\ntouch {marker}\n")
    (outside / "evil.sh").chmod(0o755)
    (project / "good").write_text("#!/bin/sh\nexit 0\n")
    (project / "good").chmod(0o755)
    got = sandboxed(redoxcap_module_system, project, [BASE_PYTHON, "-c", RENAME_RACE, str(outside / "evil.sh"), "150"])
    assert got.returncode == 0, got.stderr
    assert "(0," in got.stdout, got.stdout  # the good one ran, so the race was live
    assert not marker.exists()


def test_what_was_not_handed_is_absent_and_cannot_be_written(redoxcap_module_system, tmp_path):
    project, sibling = tmp_path / "proj", tmp_path / "sibling"
    project.mkdir()
    sibling.mkdir()
    (sibling / "secret.txt").write_text("the secret")
    os.symlink(sibling / "secret.txt", project / "abs-link")
    os.symlink("../sibling/secret.txt", project / "rel-link")
    attempts = {
        "cat ../sibling/secret.txt": "No such file or directory",
        f"cat {sibling}/secret.txt": "No such file or directory",
        "cat abs-link": "No such file or directory",
        "cat rel-link": "No such file or directory",
        "cat /etc/gitconfig": "No such file or directory",
        "echo x > ../escaped.txt": "Permission denied",
        # beside the handed directory nothing is there, so no directory to create in
        f"echo x > {sibling}/escaped.txt": "Directory nonexistent",
        "mkdir /etc/x": "Permission denied",
        "echo x > /usr/escaped.txt": "Read-only file system",
        "ls ..": "Permission denied",
    }
    for command, message in attempts.items():
        got = sandboxed(redoxcap_module_system, project, ["sh", "-c", command])
        assert got.returncode != 0 and message in got.stderr, (command, got.stderr)
        assert "the secret" not in got.stdout
    assert sorted(p.name for p in tmp_path.iterdir()) == ["proj", "sibling"]
    assert sorted(p.name for p in sibling.iterdir()) == ["secret.txt"]


def test_metadata_changes_stay_inside_and_never_make_set_uid_files(redoxcap_module_system, tmp_path):
    project, sibling = tmp_path / "proj", tmp_path / "sibling"
    project.mkdir()
    sibling.mkdir()
    (sibling / "secret.txt").write_text("the secret")
    (sibling / "secret.txt").chmod(0o600)
    os.symlink(sibling / "secret.txt", project / "abs-link")
    (project / "tool").write_text("x")
    script = ("chmod 4755 tool; chmod g+s tool; stat -c %a tool; chmod 666 abs-link; "
              "touch -d @1 abs-link; chown 4242 tool; echo chown=$?; chmod 644 /usr/bin/env")
    got = sandboxed(redoxcap_module_system, project, ["sh", "-c", script])
    assert got.stdout.splitlines()[0] == "755", got.stdout
    assert "chown=1" in got.stdout
    assert "Read-only file system" in got.stderr
    assert stat.S_IMODE((sibling / "secret.txt").stat().st_mode) == 0o600
    assert (sibling / "secret.txt").stat().st_mtime > 1_000_000
    assert (project / "tool").stat().st_uid == os.getuid()


def test_a_read_only_dir_answers_erofs_and_its_files_keep_their_metadata(redoxcap_module_system, tmp_path):
    project, data = tmp_path / "proj", tmp_path / "data"
    project.mkdir()
    data.mkdir()
    (data / "f").write_text("data\n")
    before = (data / "f").stat()
    script = (f"cat {data}/f; echo x > {data}/g; touch {data}/f; chmod 777 {data}/f; "
              f"rm {data}/f; ls {data}")
    got = redoxcap_module_system.run("--dir", str(project), "--dir", f"{data}:ro", "--", "sh", "-c", script,
                     check=False)
    assert got.stdout == "data\nf\n", got.stderr
    assert got.stderr.count("Read-only file system") == 4, got.stderr
    after = (data / "f").stat()
    assert (after.st_mode, after.st_mtime_ns) == (before.st_mode, before.st_mtime_ns)


def test_each_dir_is_at_its_own_path_and_tmp_is_private(redoxcap_module_system, tmp_path):
    one, two = tmp_path / "one", tmp_path / "two"
    one.mkdir()
    two.mkdir()
    (two / "f").write_text("two\n")
    script = (f"pwd; cat {two}/f; echo mine > /tmp/x; cat /tmp/x; ls /tmp; echo $TMPDIR; "
              f"cd {two} && pwd && ls")
    got = redoxcap_module_system.run("--dir", str(one), "--dir", str(two), "--", "sh", "-c", script)
    assert got.stdout.splitlines() == [str(one), "two", "mine", "x", "/tmp", str(two), "f"]
    assert not Path("/tmp/x").exists() or Path("/tmp/x").read_text() != "mine\n"


def daemons_of(pid: int) -> list[str]:
    """The command lines of pid's children that are file scheme daemons."""
    with open(f"/proc/{pid}/task/{pid}/children") as f:
        children = f.read().split()
    lines = []
    for child in children:
        try:
            args = Path(f"/proc/{child}/cmdline").read_bytes().split(b"\0")
        except OSError:
            continue
        if any(b"redoxcap.schemes.file" in a for a in args):
            lines.append(" ".join(a.decode(errors="replace") for a in args))
    return lines


def test_the_private_tmp_daemon_starts_when_the_program_first_uses_tmp(redoxcap_module_system):
    script = "echo ready; read go; echo mine > /tmp/f; cat /tmp/f; read done"
    run = redoxcap_module_system.start("run", "--", "sh", "-c", script)
    try:
        assert run.stdout.readline() == "ready\n"
        assert daemons_of(run.pid) == []  # nothing of /tmp asked yet: no interpreter for it
        run.stdin.write("go\n")
        run.stdin.flush()
        assert run.stdout.readline() == "mine\n"
        served = daemons_of(run.pid)
        assert len(served) == 1 and "--name tmp" in served[0], served
        run.stdin.write("done\n")
        run.stdin.flush()
        assert run.wait(60) == 0, run.stderr.read()
    finally:
        if run.poll() is None:
            run.kill()
            run.wait()


def test_an_rt_program_sees_the_dir_at_its_path_without_the_broker(redoxcap_module_system, tmp_path):
    project = tmp_path / "rt-proj"
    project.mkdir()
    (project / "a.txt").write_text("alpha\n")
    code = ("import rt; print(rt.getcwd(), rt.listdir());"
            f"print(rt.open_file('{project}/a.txt').read(), end='');"
            "rt.chmod('a.txt', 0o600); rt.utime('a.txt', (1, 2_000_000_000));"
            "print(sorted(rt.schemes()))")
    got = redoxcap_module_system.run("--dir", str(project), "--no-broker", "--", sys.executable, "-c", code)
    lines = got.stdout.splitlines()
    assert lines[:2] == [f"{project} ['a.txt']", "alpha"]
    assert "file" not in lines[2]
    st = (project / "a.txt").stat()
    assert (stat.S_IMODE(st.st_mode), st.st_mtime_ns) == (0o600, 2_000_000_000)


def test_the_dir_daemons_go_when_the_run_ends(redoxcap_module_system, tmp_path):
    project = tmp_path / "gone"
    project.mkdir()
    redoxcap_module_system.run("--dir", str(project), "--", "true")
    ps = subprocess.run(["ps", "-eo", "args"], capture_output=True, text=True, check=True).stdout
    assert str(project) not in ps


# -- clear errors ---------------------------------------------------------------------


def test_a_missing_command_is_127_command_not_found(redoxcap_module_system, tmp_path):
    got = redoxcap_module_system.run("--dir", str(tmp_path), "--", "no-such-command-here", check=False)
    assert got.returncode == 127 and "no-such-command-here: command not found" in got.stderr


def test_options_are_checked_before_anything_runs(redoxcap_module_system, tmp_path):
    got = redoxcap_module_system.run("--dir", str(tmp_path / "missing"), "--", "true", check=False)
    assert got.returncode == 2 and "does not exist" in got.stderr
    got = redoxcap_module_system.run("--cwd", str(tmp_path), "--", "true", check=False)
    assert got.returncode != 0 and f"--dir {tmp_path}" in got.stderr
    state = tmp_path / "state"
    for args, message in [(["up", "--root", str(tmp_path / "no" / "such")], "does not exist"),
                          (["up", "--mount", f"bad name={tmp_path}"], "mount name"),
                          (["run", "--mount", f"bad name={tmp_path}", "--", "true"], "mount name")]:
        got = subprocess.run([*REDOXCAP, "--state-dir", str(state), *args], capture_output=True,
                             text=True, timeout=60, check=False)
        assert got.returncode == 2 and message in got.stderr, (args, got.stderr)
    assert not (tmp_path / "no").exists()


def test_a_private_system_boots_for_a_dir_run_and_leaves_nothing(tmp_path):
    project = tmp_path / "p"
    project.mkdir()
    state = tmp_path / "state"
    env = dict(os.environ, XDG_DATA_HOME=str(tmp_path / "data"))
    got = subprocess.run([*REDOXCAP, "--state-dir", str(state), "run", "--dir", str(project), "--",
                          "sh", "-c", "echo made > out.txt && pwd"], capture_output=True, text=True,
                         timeout=120, check=False, env=env)
    assert (got.returncode, got.stdout) == (0, f"{project}\n"), got.stderr
    assert (project / "out.txt").read_text() == "made\n"
    assert not (state / "control.sock").exists()


def test_dev_tty_is_the_terminal_the_program_was_given(redoxcap_module_system, tmp_path):
    master, slave = os.openpty()
    try:
        got = redoxcap_module_system.run("--dir", str(tmp_path), "--", "sh", "-c", "echo to-the-tty > /dev/tty",
                         stdin=slave, check=False)
        assert got.returncode == 0, got.stderr
        assert b"to-the-tty" in os.read(master, 1024)
    finally:
        os.close(master)
        os.close(slave)
    got = redoxcap_module_system.run("--dir", str(tmp_path), "--", "sh", "-c", "echo x > /dev/tty",
                     stdin=subprocess.DEVNULL, check=False)
    assert got.returncode != 0 and "No such device or address" in got.stderr


CHMOD_RACE = textwrap.dedent("""
    import os, sys, threading
    outside, rounds = sys.argv[1], int(sys.argv[2])
    stop = False
    def swap():
        while not stop:
            os.symlink(outside, "flip.tmp")
            os.replace("flip.tmp", "flip")
            with open("flip.tmp", "w") as f:
                f.write("mine")
            os.replace("flip.tmp", "flip")
    open("flip", "w").close()
    threading.Thread(target=swap, daemon=True).start()
    changed = 0
    for _ in range(rounds):
        for call in (lambda: os.chmod("flip", 0o777), lambda: os.utime("flip", (1, 1))):
            try:
                call()
                changed += 1
            except OSError:
                pass
    stop = True
    print(changed)
""")


def test_a_racing_symlink_never_lets_chmod_or_utime_reach_outside(redoxcap_module_system, tmp_path):
    project, outside = tmp_path / "proj", tmp_path / "outside"
    project.mkdir()
    outside.mkdir()
    secret = outside / "secret.txt"
    secret.write_text("the secret")
    secret.chmod(0o600)
    before = secret.stat()
    got = sandboxed(redoxcap_module_system, project, [BASE_PYTHON, "-c", CHMOD_RACE, str(secret), "300"])
    assert got.returncode == 0 and int(got.stdout) > 0, got.stderr  # its own file did change
    after = secret.stat()
    assert (after.st_mode, after.st_mtime_ns) == (before.st_mode, before.st_mtime_ns)


CONNECT_RACE = textwrap.dedent("""
    import ctypes, os, socket, struct, sys, threading
    libc = ctypes.CDLL(None, use_errno=True)
    granted, other, rounds = int(sys.argv[1]), int(sys.argv[2]), int(sys.argv[3])
    def sockaddr(port):
        return struct.pack("!HH4s8x", socket.AF_INET, port, socket.inet_aton("127.0.0.1"))
    # the family is in host order, the port in network order
    good, bad = bytearray(sockaddr(granted)), bytearray(sockaddr(other))
    good[0:2], bad[0:2] = struct.pack("=H", socket.AF_INET), struct.pack("=H", socket.AF_INET)
    buf = ctypes.create_string_buffer(bytes(good), 16)
    stop = False
    def flip():
        while not stop:
            ctypes.memmove(buf, bytes(bad), 16)
            ctypes.memmove(buf, bytes(good), 16)
    threading.Thread(target=flip, daemon=True).start()
    outcomes = {}
    for _ in range(rounds):
        s = socket.socket()
        rc = libc.connect(s.fileno(), buf, 16)
        key = "ok" if rc == 0 else os.strerror(ctypes.get_errno())
        outcomes[key] = outcomes.get(key, 0) + 1
        s.close()
    stop = True
    print(sorted(outcomes.items()))
""")


def test_a_racing_address_never_connects_beyond_the_grant(redoxcap_module_system, tmp_path):
    """The broker reads the address once and connects its own copy of the socket: a thread
    that swaps the address for one not granted meanwhile never gets there."""
    project = tmp_path / "race-net"
    project.mkdir()
    with socket.create_server(("127.0.0.1", 0), backlog=512) as granted, \
            socket.create_server(("127.0.0.1", 0)) as other:
        granted_port, other_port = granted.getsockname()[1], other.getsockname()[1]
        other.settimeout(0)
        got = sandboxed(redoxcap_module_system, project, [BASE_PYTHON, "-c", CONNECT_RACE, str(granted_port),
                                          str(other_port), "300"],
                        "--allow-connect", f"127.0.0.1:{granted_port}")
        with pytest.raises(BlockingIOError):
            other.accept()
    assert got.returncode == 0 and "('ok'," in got.stdout, (got.stdout, got.stderr)
