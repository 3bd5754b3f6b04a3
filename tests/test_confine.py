"""Tests for redoxcap.sandbox: each confinement test runs a real confined child."""

from __future__ import annotations

import errno
import json
import os
import select
import shutil
import socket
import struct
import subprocess
import sys
import textwrap
import uuid

import pytest

import redoxcap
from redoxcap import sandbox
from redoxcap.sandbox import landlock, launcher, syscalls
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
METADATA_ATTACKS = textwrap.dedent(
    """
    import ctypes, fcntl, os, struct
    libc = ctypes.CDLL(None, use_errno=True)
    libc.syscall.restype = ctypes.c_long
    L = ctypes.c_long
    AT_FDCWD = -100
    FS_IOC_GETFLAGS, FS_IOC_SETFLAGS = 0x80086601, 0x40086602

    def raw(nr, *args):
        def call():
            if libc.syscall(L(nr), *args) < 0:
                err = ctypes.get_errno()
                raise OSError(err, os.strerror(err))
        return call

    def setflags(fd):
        try:
            flags = fcntl.ioctl(fd, FS_IOC_GETFLAGS, bytes(8))
        except OSError:  # an O_PATH fd: the filter must refuse before the kernel looks
            flags = bytes(8)
        fcntl.ioctl(fd, FS_IOC_SETFLAGS, flags)

    def attacks(path, fd, nrs):
        b, uid, gid = os.fsencode(path), L(os.getuid()), L(os.getgid())
        value = ctypes.create_string_buffer(b"v")
        # struct xattr_args {u64 value; u32 size; u32 flags}; struct file_attr is 24 bytes.
        xargs = ctypes.create_string_buffer(struct.pack("=QII", ctypes.addressof(value), 1, 0))
        fattr = ctypes.create_string_buffer(24)
        args = {
            "chmod": (b, L(0o777)),
            "fchmod": (L(fd), L(0o777)),
            "fchmodat": (L(AT_FDCWD), b, L(0o777)),
            "fchmodat2": (L(AT_FDCWD), b, L(0o777), L(0)),
            "chown": (b, uid, gid),
            "fchown": (L(fd), uid, gid),
            "lchown": (b, uid, gid),
            "fchownat": (L(AT_FDCWD), b, uid, gid, L(0)),
            "utime": (b, None),
            "utimes": (b, None),
            "futimesat": (L(AT_FDCWD), b, None),
            "utimensat": (L(AT_FDCWD), b, None, L(0)),
            "setxattr": (b, b"user.new", value, L(1), L(0)),
            "lsetxattr": (b, b"user.new", value, L(1), L(0)),
            "fsetxattr": (L(fd), b"user.new", value, L(1), L(0)),
            "removexattr": (b, b"user.keep"),
            "lremovexattr": (b, b"user.keep"),
            "fremovexattr": (L(fd), b"user.keep"),
            "setxattrat": (L(AT_FDCWD), b, L(0), b"user.new", xargs, L(16)),
            "removexattrat": (L(AT_FDCWD), b, L(0), b"user.keep"),
            "file_setattr": (L(AT_FDCWD), b, fattr, L(24), L(0)),
        }
        out = {name: raw(nr, *args[name]) for name, nr in nrs.items()}
        out.update({
            "os.chmod": lambda: os.chmod(path, 0o777),
            "os.chown": lambda: os.chown(path, os.getuid(), os.getgid()),
            "os.utime": lambda: os.utime(path, (1, 1)),
            "os.setxattr": lambda: os.setxattr(path, "user.new", b"v"),
            "os.removexattr": lambda: os.removexattr(path, "user.keep"),
            "os.fchmod": lambda: os.fchmod(fd, 0o777),
            "os.utime(fd)": lambda: os.utime(fd, (1, 1)),
            "FS_IOC_SETFLAGS": lambda: setflags(fd),
        })
        return out
    """
)


def _metadata_syscalls() -> dict[str, int]:
    """The denied metadata syscalls this architecture has, by name."""
    machine = linux.machine()
    assert machine is not None
    nrs = linux.SYSCALLS[machine]
    return {n: nrs[n] for n in (*syscalls.METADATA, *syscalls.XATTR_WRITES) if n in nrs}


def _metadata_of(path) -> tuple:
    st = os.stat(path)
    xattrs = {name: os.getxattr(path, name) for name in os.listxattr(path)}
    return st.st_mode, st.st_uid, st.st_gid, st.st_mtime_ns, st.st_atime_ns, xattrs


def _prepare_victim(path) -> None:
    path.write_text("victim")
    os.chmod(path, 0o600)
    os.setxattr(path, "user.keep", b"kept")
    os.utime(path, ns=(1_000_000_000, 2_000_000_000))


def test_metadata_attacks_do_change_an_unconfined_file(tmp_path):
    """Control: each attack below does what its name says when nothing stops it."""
    nrs = _metadata_syscalls()
    code = METADATA_ATTACKS + textwrap.dedent(
        f"""
        import json
        results = {{}}
        for name in {sorted(nrs)!r} + ["os.chmod", "os.setxattr", "os.removexattr",
                                       "os.fchmod", "FS_IOC_SETFLAGS"]:
            path = os.path.join({str(tmp_path)!r}, name)
            with open(path, "w"):
                pass
            os.setxattr(path, "user.keep", b"kept")
            fd = os.open(path, os.O_RDWR)
            try:
                fn = attacks(path, fd, {nrs!r})[name]
                try:
                    fn()
                    results[name] = 0
                except OSError as exc:
                    results[name] = exc.errno
            finally:
                os.close(fd)
        print(json.dumps(results))
        """
    )
    proc = subprocess.run([sys.executable, "-c", code], check=False, capture_output=True,
                          text=True, timeout=TIMEOUT)
    assert proc.returncode == 0, proc.stderr
    results = json.loads(proc.stdout)
    assert results == dict.fromkeys(results, 0)
    assert os.stat(tmp_path / "chmod").st_mode & 0o777 == 0o777
    assert os.listxattr(tmp_path / "removexattrat") == []
    assert os.getxattr(tmp_path / "setxattr", "user.new") == b"v"


@needs_landlock
def test_metadata_of_host_granted_and_scratch_files_cannot_change(tmp_path):
    home = tmp_path / "home"
    granted = tmp_path / "granted"
    scratch = tmp_path / "scratch"
    for d in (home, granted, scratch):
        d.mkdir()
    host_file, granted_file = home / "token", granted / "script.py"
    for victim in (host_file, granted_file):
        _prepare_victim(victim)
    before = {str(p): _metadata_of(p) for p in (host_file, granted_file, home)}
    nrs = _metadata_syscalls()
    proc = run_confined(
        METADATA_ATTACKS + textwrap.dedent(
            f"""
            mine = os.path.join(os.environ["TMPDIR"], "mine")
            with open(mine, "w"):
                pass
            targets = {{
                # Visible only through stat: an O_PATH fd is all one gets.
                "host": ({str(host_file)!r}, os.open({str(host_file)!r}, os.O_PATH)),
                "host dir": ({str(home)!r}, os.open({str(home)!r}, os.O_PATH)),
                "granted": ({str(granted_file)!r}, os.open({str(granted_file)!r}, os.O_RDONLY)),
                "scratch": (mine, os.open(mine, os.O_RDWR)),
            }}
            for label, (path, fd) in targets.items():
                for name, fn in attacks(path, fd, {nrs!r}).items():
                    results[label + " " + name] = attempt(fn)
            results["scratch mode"] = oct(os.stat(mine).st_mode & 0o7777)
            """
        ),
        "--read",
        str(granted),
        "--write",
        str(scratch),
        cwd=tmp_path,
        env={**os.environ, "TMPDIR": str(scratch)},
    )
    res = results_of(proc)
    assert res.pop("scratch mode") == oct(0o666 & ~_umask())
    assert len(res) == 4 * (len(nrs) + 8)
    assert {k: v for k, v in res.items() if v != errno.EPERM} == {}
    assert {str(p): _metadata_of(p) for p in (host_file, granted_file, home)} == before


def _umask() -> int:
    mask = os.umask(0)
    os.umask(mask)
    return mask


# Terminal ioctls with an argument that would act if the filter let them through.
TERMINAL_ATTACKS = textwrap.dedent(
    """
    import ctypes, fcntl, struct
    TIOCSTI, TIOCLINUX, TIOCCONS, TIOCSETD, TIOCSCTTY, TIOCVHANGUP = (
        0x5412, 0x541C, 0x541D, 0x5423, 0x540E, 0x5437)
    terminal_attacks = {
        "TIOCSTI": lambda fd: [fcntl.ioctl(fd, TIOCSTI, bytes([c])) for c in b"touch /tmp/pwned\\n"],
        "TIOCLINUX": lambda fd: fcntl.ioctl(fd, TIOCLINUX, bytes([2]) + bytes(12)),
        "TIOCCONS": lambda fd: fcntl.ioctl(fd, TIOCCONS),
        "TIOCSETD": lambda fd: fcntl.ioctl(fd, TIOCSETD, struct.pack("i", 0)),
        "TIOCSCTTY": lambda fd: fcntl.ioctl(fd, TIOCSCTTY, 1),
        "TIOCVHANGUP": lambda fd: fcntl.ioctl(fd, TIOCVHANGUP),
    }

    def process_facts():
        with open("/proc/self/stat") as f:
            fields = f.read().rpartition(")")[2].split()
        caps = {line.split(":")[0]: int(line.split()[1], 16)
                for line in open("/proc/self/status") if line.startswith("Cap")}
        return {"session leader": int(fields[3]) == os.getpid(), "tty_nr": int(fields[4]),
                "caps": caps, "uid": os.getuid()}
    """
)


def _pending_input(fd: int) -> int:
    import fcntl
    import termios

    return struct.unpack("i", fcntl.ioctl(fd, termios.FIONREAD, bytes(4)))[0]


@needs_landlock
def test_a_client_cannot_inject_into_or_take_the_terminal_and_has_no_capabilities(tmp_path):
    import tty

    master, slave = os.openpty()
    try:
        tty.setraw(slave)  # FIONREAD then counts every pending byte, not only whole lines
        os.write(master, b"x")
        assert select.select([slave], [], [], TIMEOUT)[0]  # typed input reaches the queue later
        assert _pending_input(slave) == 1  # the probe sees pending input (TIOCSTI's is at once)
        os.read(slave, 1)
        proc = run_confined(
            TERMINAL_ATTACKS + textwrap.dedent(
                """
                for name, fn in terminal_attacks.items():
                    for fd in (0, 1, 2):
                        results[f"{name} fd{fd}"] = attempt(lambda: fn(fd))
                results.update(process_facts())
                """
            ),
            cwd=tmp_path,
            stdin=slave,
        )
        res = results_of(proc)
        assert _pending_input(slave) == 0
    finally:
        os.close(master)
        os.close(slave)
    facts = {k: res.pop(k) for k in ("session leader", "tty_nr", "caps", "uid")}
    assert res == dict.fromkeys(res, errno.EPERM) and len(res) == 18
    assert facts["session leader"] and facts["tty_nr"] == 0
    assert facts["uid"] == os.getuid()
    if os.geteuid() == 0:
        assert facts["caps"] == dict.fromkeys(facts["caps"], 0)
    else:
        assert {k: v for k, v in facts["caps"].items() if k != "CapBnd"} == {
            "CapInh": 0, "CapPrm": 0, "CapEff": 0, "CapAmb": 0}


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
