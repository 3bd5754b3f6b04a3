"""Tests for redoxcap.sandbox: each confinement test runs a real confined child."""

from __future__ import annotations

import errno
import json
import os
import shutil
import socket
import subprocess
import sys
import textwrap
import uuid

import pytest

import redoxcap
from redoxcap import sandbox
from redoxcap.sandbox import landlock, launcher
from redoxcap.wire import linux

ABI = sandbox.landlock_abi()
needs_landlock = pytest.mark.skipif(ABI < 1, reason="Landlock is not available")
needs_abi6 = pytest.mark.skipif(ABI < 6, reason="Landlock ABI < 6: no abstract-socket scoping")
needs_abi4 = pytest.mark.skipif(ABI < 4, reason="Landlock ABI < 4: no TCP rules")

TIMEOUT = 30

# Runs in the confined child: attempt(fn) returns 0 on success or the errno.
PRELUDE = textwrap.dedent(
    """
    import json, os, socket, sys

    def attempt(fn):
        try:
            fn()
        except OSError as exc:
            return exc.errno
        return 0

    results = {}
    """
)


def run_confined(
    code: str,
    *launcher_args: str,
    cwd: os.PathLike[str] | str,
    pass_fds: tuple[int, ...] = (),
    stdin: int | None = subprocess.DEVNULL,
    env: dict[str, str] | None = None,
) -> subprocess.CompletedProcess[str]:
    """Run ``python -m redoxcap.sandbox [args] -- python -c PRELUDE+code``."""
    cmd = [
        sys.executable,
        "-m",
        "redoxcap.sandbox",
        *launcher_args,
        "--",
        sys.executable,
        "-c",
        PRELUDE + textwrap.dedent(code) + "\nprint(json.dumps(results))\n",
    ]
    # run() kills and reaps the child on timeout, so nothing is left behind.
    return subprocess.run(
        cmd,
        check=False,
        cwd=cwd,
        pass_fds=pass_fds,
        stdin=stdin,
        env=env,
        capture_output=True,
        text=True,
        timeout=TIMEOUT,
    )


def results_of(proc: subprocess.CompletedProcess[str]) -> dict:
    assert proc.returncode == 0, proc.stderr
    return json.loads(proc.stdout.strip().splitlines()[-1])


@needs_landlock
def test_host_files_outside_allowed_set(tmp_path):
    secret = tmp_path / "secret.txt"
    secret.write_text("secret")
    proc = run_confined(
        f"""
        results["read_tmp"] = attempt(lambda: open({str(secret)!r}).read())
        results["write_tmp"] = attempt(lambda: open({str(secret)!r}, "w").write("x"))
        results["create_tmp"] = attempt(lambda: open({str(tmp_path / "new.txt")!r}, "x"))
        results["list_tmp"] = attempt(lambda: os.listdir({str(tmp_path)!r}))
        results["hostname"] = attempt(lambda: open("/etc/hostname").read())
        results["passwd"] = attempt(lambda: open("/etc/passwd").read())
        results["root"] = attempt(lambda: os.listdir("/root"))
        results["write_devnull"] = attempt(lambda: open("/dev/null", "w"))
        """,
        cwd=tmp_path,
    )
    res = results_of(proc)
    assert res == {
        "read_tmp": errno.EACCES,
        "write_tmp": errno.EACCES,
        "create_tmp": errno.EACCES,
        "list_tmp": errno.EACCES,
        "hostname": errno.EACCES,
        "passwd": errno.EACCES,
        "root": errno.EACCES,
        "write_devnull": errno.EACCES,
    }
    assert secret.read_text() == "secret"
    assert not (tmp_path / "new.txt").exists()


@needs_landlock
def test_read_and_write_paths(tmp_path):
    ro = tmp_path / "ro"
    rw = tmp_path / "rw"
    ro.mkdir()
    rw.mkdir()
    (ro / "data.txt").write_text("readable")
    ro_file = str(ro / "data.txt")
    out = str(rw / "out.txt")
    proc = run_confined(
        f"""
        results["ro_content"] = open({ro_file!r}).read()
        results["ro_write"] = attempt(lambda: open({ro_file!r}, "a").write("x"))
        results["ro_create"] = attempt(lambda: open({str(ro / "new")!r}, "x"))
        with open({out!r}, "w") as f:
            f.write("written")
        results["rw_mkdir"] = attempt(lambda: os.mkdir({str(rw / "sub")!r}))
        results["rw_listing"] = sorted(os.listdir({str(rw)!r}))
        """,
        "--read",
        str(ro),
        "--write",
        str(rw),
        cwd=tmp_path,
    )
    res = results_of(proc)
    assert res["ro_content"] == "readable"
    assert res["ro_write"] == errno.EACCES
    assert res["ro_create"] == errno.EACCES
    assert res["rw_mkdir"] == 0
    assert res["rw_listing"] == ["out.txt", "sub"]
    assert (rw / "out.txt").read_text() == "written"
    assert (ro / "data.txt").read_text() == "readable"


@needs_landlock
def test_write_path_is_not_executable(tmp_path):
    rw = tmp_path / "rw"
    rw.mkdir()
    true_bin = shutil.which("true")
    assert true_bin is not None
    copy = rw / "true"
    shutil.copy(true_bin, copy)
    proc = run_confined(
        f"""
        import subprocess
        results["exec_rw"] = attempt(lambda: subprocess.run([{str(copy)!r}]))
        results["exec_usr"] = subprocess.run([{true_bin!r}]).returncode
        """,
        "--write",
        str(rw),
        cwd=tmp_path,
    )
    res = results_of(proc)
    assert res == {"exec_rw": errno.EACCES, "exec_usr": 0}


@needs_landlock
def test_network_sockets_denied(tmp_path):
    listener = socket.socket(socket.AF_INET, socket.SOCK_STREAM)
    try:
        listener.bind(("127.0.0.1", 0))
        listener.listen()
        port = listener.getsockname()[1]
        proc = run_confined(
            f"""
            def tcp_connect():
                with socket.create_connection(("127.0.0.1", {port}), timeout=5):
                    pass
            def tcp_bind():
                with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as s:
                    s.bind(("127.0.0.1", 0))
            results["tcp_connect"] = attempt(tcp_connect)
            results["tcp_bind"] = attempt(tcp_bind)
            results["udp"] = attempt(lambda: socket.socket(socket.AF_INET, socket.SOCK_DGRAM))
            results["udp6"] = attempt(lambda: socket.socket(socket.AF_INET6, socket.SOCK_DGRAM))
            results["netlink"] = attempt(
                lambda: socket.socket(socket.AF_NETLINK, socket.SOCK_RAW, 0))
            results["packet"] = attempt(
                lambda: socket.socket(socket.AF_PACKET, socket.SOCK_RAW, 0))
            """,
            cwd=tmp_path,
        )
        res = results_of(proc)
    finally:
        listener.close()
    assert res == {
        "tcp_connect": errno.EACCES,
        "tcp_bind": errno.EACCES,
        "udp": errno.EACCES,
        "udp6": errno.EACCES,
        "netlink": errno.EACCES,
        "packet": errno.EACCES,
    }


@needs_abi4
def test_inherited_tcp_socket_cannot_connect_or_bind(tmp_path):
    # seccomp only filters socket(2): these sockets exist already, so Landlock must deny.
    listener = socket.socket(socket.AF_INET, socket.SOCK_STREAM)
    to_connect = socket.socket(socket.AF_INET, socket.SOCK_STREAM)
    to_bind = socket.socket(socket.AF_INET, socket.SOCK_STREAM)
    try:
        listener.bind(("127.0.0.1", 0))
        listener.listen()
        port = listener.getsockname()[1]
        proc = run_confined(
            f"""
            c = socket.socket(fileno={to_connect.fileno()})
            b = socket.socket(fileno={to_bind.fileno()})
            results["connect"] = attempt(lambda: c.connect(("127.0.0.1", {port})))
            results["bind"] = attempt(lambda: b.bind(("127.0.0.1", 0)))
            """,
            cwd=tmp_path,
            pass_fds=(to_connect.fileno(), to_bind.fileno()),
        )
        res = results_of(proc)
    finally:
        for s in (listener, to_connect, to_bind):
            s.close()
    assert res == {"connect": errno.EACCES, "bind": errno.EACCES}


@needs_landlock
def test_no_network_deny_allows_sockets_but_keeps_the_metadata_rules(tmp_path):
    scratch = tmp_path / "scratch"
    scratch.mkdir()
    proc = run_confined(
        f"""
        results["udp"] = attempt(lambda: socket.socket(socket.AF_INET, socket.SOCK_DGRAM).close())
        open({str(scratch / "f")!r}, "w").close()
        results["chmod"] = attempt(lambda: os.chmod({str(scratch / "f")!r}, 0o777))
        """,
        "--no-network-deny",
        "--write",
        str(scratch),
        cwd=tmp_path,
    )
    assert results_of(proc) == {"udp": 0, "chmod": errno.EPERM}


@needs_abi6
def test_abstract_unix_socket_is_scoped(tmp_path):
    name = f"\0redoxcap-confine-test-{uuid.uuid4().hex}"
    listener = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
    try:
        listener.bind(name)
        listener.listen()
        proc = run_confined(
            f"""
            def connect():
                with socket.socket(socket.AF_UNIX, socket.SOCK_STREAM) as s:
                    s.connect({name!r})
            results["abstract"] = attempt(connect)
            """,
            cwd=tmp_path,
        )
        res = results_of(proc)
    finally:
        listener.close()
    assert res == {"abstract": errno.EPERM}


@needs_landlock
def test_socketpair_and_inherited_fd_work(tmp_path):
    parent_end, child_end = socket.socketpair()
    try:
        parent_end.sendall(b"ping")
        proc = run_confined(
            f"""
            a, b = socket.socketpair()
            a.sendall(b"local")
            results["socketpair"] = b.recv(16).decode()
            inherited = socket.socket(fileno={child_end.fileno()})
            results["inherited_recv"] = inherited.recv(16).decode()
            inherited.sendall(b"pong")
            """,
            cwd=tmp_path,
            pass_fds=(child_end.fileno(),),
        )
        res = results_of(proc)
        parent_end.settimeout(5)
        assert parent_end.recv(16) == b"pong"
    finally:
        parent_end.close()
        child_end.close()
    assert res == {"socketpair": "local", "inherited_recv": "ping"}


@needs_landlock
def test_io_uring_is_refused(tmp_path):
    proc = run_confined(
        """
        import ctypes
        libc = ctypes.CDLL(None, use_errno=True)
        params = ctypes.create_string_buffer(120)
        ret = libc.syscall(425, 1, params)
        results["io_uring_setup"] = ctypes.get_errno() if ret < 0 else 0
        if ret >= 0:
            os.close(ret)
        """,
        cwd=tmp_path,
    )
    assert results_of(proc) == {"io_uring_setup": errno.ENOSYS}  # as where there is none


@needs_landlock
def test_confine_result(tmp_path):
    code = textwrap.dedent(
        """
        import dataclasses, json
        from redoxcap.sandbox import confine, interpreter_read_paths
        print(json.dumps(dataclasses.asdict(confine(interpreter_read_paths()))))
        """
    )
    proc = subprocess.run(
        [sys.executable, "-c", code],
        check=False,
        cwd=tmp_path,
        capture_output=True,
        text=True,
        timeout=TIMEOUT,
    )
    assert proc.returncode == 0, proc.stderr
    assert json.loads(proc.stdout) == {
        "abi": ABI,
        "filesystem": True,
        "network": ABI >= 4,
        "scoped": ABI >= 6,
        "seccomp": True,
    }


def _launch_with_abi_zero(tmp_path, *launcher_args: str) -> subprocess.CompletedProcess[str]:
    code = textwrap.dedent(
        f"""
        import sys
        import redoxcap.sandbox.landlock as landlock
        from redoxcap.sandbox.launcher import main
        landlock.landlock_abi = lambda: 0
        sys.exit(main([*{list(launcher_args)!r}, "--", sys.executable, "-c", "print('ran')"]))
        """
    )
    return subprocess.run(
        [sys.executable, "-c", code],
        check=False,
        cwd=tmp_path,
        capture_output=True,
        text=True,
        timeout=TIMEOUT,
    )


def test_require_without_landlock_exits_126(tmp_path):
    proc = _launch_with_abi_zero(tmp_path, "--require")
    assert proc.returncode == 126
    assert proc.stdout == ""
    lines = proc.stderr.strip().splitlines()
    assert len(lines) == 1 and "Landlock" in lines[0]


def test_missing_landlock_warns_and_runs_unconfined(tmp_path):
    proc = _launch_with_abi_zero(tmp_path)
    assert proc.returncode == 0, proc.stderr
    assert proc.stdout == "ran\n"
    lines = proc.stderr.strip().splitlines()
    assert len(lines) == 1 and "warning" in lines[0] and "unconfined" in lines[0]


def test_require_in_process(monkeypatch, capsys):
    # Nothing may be applied to or exec'd over the test process, even if main is broken.
    def forbidden(*args, **kwargs):
        raise AssertionError("must not be reached without Landlock and with --require")

    monkeypatch.setattr(landlock, "landlock_abi", lambda: 0)
    monkeypatch.setattr(linux, "syscall", forbidden)
    monkeypatch.setattr(linux, "prctl", forbidden)
    monkeypatch.setattr(os, "execvp", forbidden)
    assert launcher.main(["--require", "--", sys.executable, "-c", "pass"]) == 126
    err = capsys.readouterr().err
    assert err.count("\n") == 1 and "Landlock" in err


def test_confine_unavailable_on_unsupported_arch(monkeypatch):
    monkeypatch.setattr(linux.platform, "machine", lambda: "riscv64")
    assert sandbox.landlock_abi() == 0
    with pytest.raises(sandbox.ConfinementUnavailable):
        sandbox.confine(["/usr"])


def test_interpreter_read_paths_is_minimal(tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    monkeypatch.setattr(sys, "path", ["", str(tmp_path), *sys.path])
    paths = sandbox.interpreter_read_paths()
    for broad in ("/", "/etc", "/root", "/home", "/tmp", str(tmp_path), os.path.expanduser("~")):
        assert broad not in paths
    assert all(os.path.isabs(p) for p in paths)
    assert len(paths) == len(set(paths))
    assert sys.executable in paths
    assert "/usr" in paths and "/etc/ld.so.cache" in paths
    spec_dir = os.path.dirname(redoxcap.__file__)
    assert spec_dir in paths


# Runs in a client: every metadata syscall the filter refuses, as a raw syscall
# with the arguments that make it change PATH (or FD), plus the libc wrappers.
def test_the_launcher_refuses_to_run_when_it_cannot_leave_the_callers_session(tmp_path):
    # A process group leader cannot setsid(2): running in the caller's session is no fallback.
    proc = subprocess.run(
        [sys.executable, "-m", "redoxcap.sandbox", "--", sys.executable, "-c", "print('ran')"],
        check=False, cwd=tmp_path, capture_output=True, text=True, timeout=TIMEOUT,
        process_group=0,
    )
    assert proc.returncode == 126
    assert proc.stdout == ""
    assert "new session" in proc.stderr


@pytest.mark.parametrize("command, script", [
    (["python3", "s.py", "data.txt"], "s.py"),
    (["/usr/bin/python3.11", "-I", "-W", "ignore", "-Xdev", "s.py"], "s.py"),
    (["python", "-u", "-X", "dev", "--", "s.py"], "s.py"),
    (["python3", "-OO", "--check-hash-based-pycs", "never", "s.py"], "s.py"),
    (["python3", "-c", "pass", "s.py"], None),
    (["python3", "-Ic", "pass", "s.py"], None),
    (["python3", "-m", "json.tool", "s.py"], None),
    (["python3", "-", "s.py"], None),
    (["python3", "--version", "s.py"], None),
    (["python3", "data.txt"], "data.txt"),
    (["python3", "missing.py"], None),
    (["python3", "."], None),
    (["cat", "s.py"], None),
    (["head", "-n1", "s.py"], None),
    (["pythonista", "s.py"], None),
    (["python3"], None),
])
def test_python_script_is_only_the_script_an_interpreter_runs(tmp_path, monkeypatch, command,
                                                                 script):
    monkeypatch.chdir(tmp_path)
    (tmp_path / "s.py").write_text("pass")
    (tmp_path / "data.txt").write_text("x")
    want = None if script is None else str(tmp_path / script)
    assert sandbox.python_script(command) == want


def test_read_paths_leave_out_checkouts_and_trees_holding_the_cwd_or_home(tmp_path, monkeypatch):
    home = tmp_path / "home"
    work = home / "work"
    checkout = tmp_path / "checkout"
    for d in (work, checkout / "pkg"):
        d.mkdir(parents=True)
    (checkout / "pyproject.toml").write_text("")
    monkeypatch.chdir(work)
    monkeypatch.setenv("HOME", str(home))
    monkeypatch.setattr(sys, "path", [str(work), str(home), str(tmp_path), str(checkout),
                                      "/", *sys.path])
    paths = sandbox.interpreter_read_paths()
    for held in (str(work), str(home), str(tmp_path), str(checkout), "/"):
        assert held not in paths
    assert not any(p == d or d.startswith(p + "/") for p in paths for d in (str(work), str(home)))
    # The installed packages and the project's own package directories stay.
    assert os.path.dirname(redoxcap.__file__) in paths
    assert os.path.dirname(pytest.__file__).rpartition("/")[0] in paths  # site-packages
