"""Everyday programs in a sandboxed host directory: `redoxcap run --dir DIR -- CMD`.

Each program runs twice on two copies of the same project: natively (cwd
the copy) and brokered by default in `--dir` (cwd the directory, seen at
its own path). Their output (with each directory's path written as
PROJECT) and the trees they leave (names, kinds, sizes, modes, and times
where the program sets them) must be equal. Then the same sandbox is
attacked in test_everyday_reach.py (what lies outside) and
test_everyday_net.py (sockets beyond the grants).
"""

from __future__ import annotations

import base64
import hashlib
import os
import shutil
import stat
import subprocess
import sys
import tarfile
import zipfile
from pathlib import Path

import pytest

from redoxcap.broker import available
from redoxcap.testing import System

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


@pytest.mark.parametrize("existing", [True, False], ids=["existing", "new"])
def test_sqlite3_without_passthrough_stops_with_an_error_and_leaves_the_database_whole(
        redoxcap_module_system, twins, existing):
    """sqlite3 preads and pwrites the database it opened for writing; a routed fd is a stream
    (ESPIPE), so under --no-passthrough it stops at its first read with "disk I/O error"
    before it writes anything: the database is as it was (an existing one byte for byte, a new
    one empty), and the same command run natively on it afterwards does what it does on the
    native copy."""
    project, copy = twins
    for d in (project, copy):
        if existing:
            subprocess.run(["sqlite3", "db", "create table t(x); insert into t values (1);"],
                           cwd=d, check=True)
    before = (project / "db").read_bytes() if existing else None
    sql = ("create table if not exists t(x); insert into t values (2); "
           "select x from t order by x; pragma integrity_check;")
    argv = ["sqlite3", "db", sql]
    expected = native(copy, argv)
    assert expected.returncode == 0, expected.stderr
    got = sandboxed(redoxcap_module_system, project, argv, "--no-passthrough")
    assert got.returncode != 0 and "disk I/O error" in got.stderr, (got.stdout, got.stderr)
    assert "broker:" not in got.stderr, got.stderr  # nothing went wrong on the broker's side
    assert (project / "db").read_bytes() == (before if existing else b"")
    assert sorted(p.name for p in project.iterdir()) == ["db"]  # no journal left behind
    after = native(project, argv)
    assert (after.returncode, after.stdout) == (expected.returncode, expected.stdout), after.stderr
    assert tree(project) == tree(copy)


def test_a_file_written_without_passthrough_reads_whole_in_the_next_command(
        redoxcap_module_system, twins):
    """A routed write returns once queued, and the pump writes it on: the broker lets no call
    of the program run before what it wrote is in the file, so a file written and closed
    reads whole in the next command, every time, as natively."""
    script = "for i in $(seq 1 60); do seq 1 30000 > f; wc -c < f; done; cat f | tail -n 1"
    got = same_as_native(redoxcap_module_system, twins, lambda d: None, ["sh", "-c", script],
                         "--no-passthrough")
    assert got.stdout.splitlines()[-1] == "30000"


def test_a_pipeline_ends_as_natively(redoxcap_module_system, twins):
    """SIGPIPE ends a writer whose reader went away, as on a host (the broker's own Python
    ignores it, and exec keeps what is ignored)."""
    got = same_as_native(redoxcap_module_system, twins, lambda d: None,
                         ["sh", "-c", "(yes; echo $? > status) | head -n 1; cat status"])
    assert got.stdout == "y\n141\n" and "Broken pipe" not in got.stderr, got.stderr


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
