"""The schemes beside files, through the real processes: clients run by `redoxcap run` or rt.

Clients that only use the schemes share the module's one system: those run by
`redoxcap run` use names of their own in it (`redoxcap_module_system`), those in this
process a namespace of their own (`redoxcap_isolated_client`). Tests that count every
handle a scheme holds, or mount directories, boot a system of their own.
"""

from __future__ import annotations

import errno
import os
import signal
import socket
import subprocess
import sys
from pathlib import Path

import pytest

import rt
from redoxcap.testing import REDOXCAP, System, booted, finish, wait_for

EXAMPLES = Path(__file__).resolve().parent.parent / "examples"


def start_client(system: System, *args: str, options: tuple[str, ...] = ()) -> subprocess.Popen:
    """A `redoxcap run [options]` client in the background (killed with the system's fixture)."""
    return system.start("run", *options, "--", sys.executable, *args)


def test_tcp_echo_between_two_clients(redoxcap_module_system):
    server = start_client(redoxcap_module_system, str(EXAMPLES / "tcp_echo.py"), "server")
    try:
        line = server.stdout.readline()
        assert line.startswith("listening on "), server.stderr.read()
        port = line.split()[-1]
        result = redoxcap_module_system.run("--", sys.executable, str(EXAMPLES / "tcp_echo.py"), "client", port, "ping pong")
        assert result.stdout.strip() == "echoed: ping pong"
    finally:
        finish(server)


def test_uds_echo_with_a_capability_passed_across(redoxcap_module_system):
    # two runs reach each other only through a uds scope they both name
    server = start_client(redoxcap_module_system, str(EXAMPLES / "uds_echo.py"), "server", "echo1",
                          options=("--uds-scope", "demo"))
    try:
        assert server.stdout.readline() == "listening\n"
        result = redoxcap_module_system.run("--uds-scope", "demo", "--", sys.executable, str(EXAMPLES / "uds_echo.py"),
                            "client", "echo1", "hi there")
        assert result.stdout.strip() == "echoed: hi there"
    finally:
        out = finish(server)
    assert "received a capability for /scheme/file/shared.txt holding: a file only the client opened" in out


def test_a_namespace_without_tcp_fails_with_enodev(redoxcap_module_system):
    result = redoxcap_module_system.run("--ns", "file,uds", "--", sys.executable, str(EXAMPLES / "no_tcp.py"))
    assert result.stdout.splitlines() == [
        "my schemes: ['file', 'uds']",
        "/scheme/tcp/127.0.0.1/80 -> ENODEV",
        "tcp:127.0.0.1/80 -> ENODEV",
        "/scheme/udp/127.0.0.1/53 -> ENODEV",
    ]


def test_a_pipe_between_a_client_and_a_child_it_spawns(redoxcap_module_system):
    code = (
        "import rt, sys\n"
        "r, w = rt.pipe()\n"
        "child = rt.spawn([sys.executable, '-c', 'import rt, sys; fd = int(sys.argv[1]);"
        " [rt.write(fd, b\"line %d\\\\n\" % i) for i in range(3)]', str(w)], pass_fds=[w])\n"
        "rt.close(w)\n"
        "data = b''\n"
        "while chunk := rt.read(r, 100):\n"
        "    data += chunk\n"
        "child.wait()\n"
        "print(data.decode(), end='')\n"
        "r2, w2 = rt.pipe(); rt.close(r2)\n"
        "import time; deadline = time.monotonic() + 10\n"
        "while time.monotonic() < deadline:  # close is asynchronous: the scheme learns of it soon\n"
        "    try:\n        rt.write(w2, b'x'); time.sleep(0.01)\n"
        "    except BrokenPipeError:\n        print('EPIPE'); break\n"
    )
    assert redoxcap_module_system.python(code).stdout == "line 0\nline 1\nline 2\nEPIPE\n"


def test_a_client_can_provide_a_scheme_of_its_own(redoxcap_module_system):
    result = redoxcap_module_system.run("--", sys.executable, str(EXAMPLES / "user_scheme.py"))
    lines = result.stdout.splitlines()
    assert lines[0].startswith("child read: hello, world (asked by pid ")
    assert lines[1] == "child exited with 0"
    assert "greeting" not in redoxcap_module_system.python("import rt; print(rt.schemes())").stdout  # only in its fork


def test_creating_a_scheme_needs_scheme_create_and_a_free_name(redoxcap_isolated_client):
    with pytest.raises(FileExistsError):
        rt.mkscheme("file")
    with pytest.raises(OSError) as info:
        rt.mkscheme("bad/name")
    assert info.value.errno == errno.EINVAL
    narrowed = rt.mkns(None, perms=rt.PERM_LIST | rt.PERM_INSERT)
    with pytest.raises(PermissionError):
        rt.mkscheme("mine", narrowed)
    rt.close(narrowed)


def test_zero_rand_and_null(redoxcap_isolated_client):
    zero, rand, null = rt.open("/scheme/zero"), rt.open("rand:"), rt.open("/scheme/null", rt.O_RDWR)
    assert rt.read(zero, 1000) == bytes(1000)
    a, b = rt.read(rand, 64), rt.read(rand, 64)
    assert len(a) == 64 and a != b and len(set(a)) > 16
    assert rt.write(null, b"gone") == 4 and rt.read(null, 10) == b""
    for fd in (zero, rand, null):
        rt.close(fd)


def test_schemes_without_resolve_beneath_refuse_the_flag(redoxcap_isolated_client):
    for path in ("/scheme/zero", "/scheme/pipe", "/scheme/uds/x", "/scheme/tcp/127.0.0.1/0"):
        for flag in (rt.O_RESOLVE_BENEATH, rt.O_RESOLVE_IN_ROOT):
            with pytest.raises(OSError) as info:
                rt.open(path, rt.O_RDWR | rt.O_CREAT | flag)
            assert info.value.errno == errno.EINVAL, path


def test_udp_echo(redoxcap_isolated_client):
    server = rt.open("/scheme/udp/127.0.0.1/0", rt.O_CREAT | rt.O_RDWR)
    port = int(rt.fpath(server).rsplit("/", 1)[1])
    with pytest.raises(OSError) as info:
        rt.write(server, b"to nobody")  # a bound socket has no peer: it says where with sendto
    assert info.value.errno == errno.EDESTADDRREQ
    peer = rt.open(f"/scheme/udp/127.0.0.1/{port}", rt.O_RDWR)
    rt.write(peer, b"one")
    rt.write(peer, b"two")
    data, sender = rt.recvfrom(server, 100)  # one datagram per read
    assert data == b"one" and sender[0] == "127.0.0.1"
    assert rt.sendto(server, b"ONE", sender) == 3
    assert rt.read(server, 100) == b"two"
    assert rt.recvfrom(peer, 100) == (b"ONE", ("127.0.0.1", port))
    with pytest.raises(OSError) as info:
        rt.sendto(peer, b"x", ("127.0.0.1", port))
    assert info.value.errno == errno.EISCONN
    rt.close(peer)
    rt.close(server)


def test_tcp_errors_are_errnos(redoxcap_isolated_client):
    with socket.socket() as unused:  # a port nobody listens on (a close in a scheme is asynchronous)
        unused.bind(("127.0.0.1", 0))
        port = unused.getsockname()[1]
    for path, err in [
        (f"/scheme/tcp/127.0.0.1/{port}", errno.ECONNREFUSED),
        ("/scheme/tcp/127.0.0.1/99999", errno.EINVAL),
        ("/scheme/tcp/127.0.0.1", errno.EINVAL),
        ("/scheme/tcp/no.such.host.invalid/80", errno.EINVAL),  # names never reach a resolver
    ]:
        with pytest.raises(OSError) as info:
            rt.open(path, rt.O_RDWR)
        assert info.value.errno == err, path


def test_a_blocked_accept_does_not_stall_other_clients(redoxcap_isolated_client):
    listener = rt.open("/scheme/tcp/127.0.0.1/0", rt.O_CREAT | rt.O_RDWR)
    theirs = rt.clone(listener)  # never share one capability socket between two processes
    waiter = rt.spawn([sys.executable, "-c", "import rt, sys; rt.dup(int(sys.argv[1]), b'accept')",
                       str(theirs)], pass_fds=[theirs])
    rt.close(theirs)
    try:
        other = rt.open("/scheme/udp/127.0.0.1/0", rt.O_CREAT | rt.O_RDWR)  # served meanwhile
        second = rt.open("/scheme/tcp/127.0.0.1/0", rt.O_CREAT | rt.O_RDWR)
        assert rt.fpath(second) != rt.fpath(listener)
        rt.close(other)
        rt.close(second)
    finally:
        waiter.kill()
        waiter.wait()
    rt.close(listener)


def test_the_log_scheme_writes_lines_with_the_writers_pid(redoxcap_module_system):
    code = "import os, rt\nfd = rt.open('/scheme/log/demo', rt.O_WRONLY)\n" \
           "rt.write(fd, b'first line\\nsecond ')\nrt.write(fd, b'line\\n')\nprint(os.getpid())\n"
    pid = redoxcap_module_system.python(code).stdout.strip()
    log = wait_for(lambda: "second line" in redoxcap_module_system.log() and redoxcap_module_system.log())
    assert f"log[{pid}] demo: first line" in log
    assert f"log[{pid}] demo: second line" in log


def test_a_client_killed_mid_operation_leaks_nothing(redoxcap_system):
    def handles():
        """Each scheme's own count of open handles, less the spare runner's (the private uds
        scope it made for the next run: `charged`), None while a scheme is slow to answer."""
        counts = {d["name"]: d["scheme_handles"] - d.get("charged", (0, 0))[1]
                  if d["scheme_handles"] is not None else None
                  for d in redoxcap_system.status()["daemons"] if d["name"] in ("tcp", "pipe", "uds")}
        return counts if None not in counts.values() else None

    baseline = wait_for(handles)
    holder = start_client(redoxcap_system, "-c",
                          "import rt, sys\n"
                          "l = rt.open('/scheme/tcp/127.0.0.1/0', rt.O_CREAT|rt.O_RDWR)\n"
                          "u = rt.open('/scheme/uds/held', rt.O_CREAT|rt.O_RDWR)\n"
                          "r, w = rt.pipe()\n"
                          "print('ready', flush=True)\n"
                          "rt.read(r, 10)\n",  # blocks forever in the pipe scheme
                          options=("--uds-scope", "system"))  # the name `again` checks below
    try:
        assert holder.stdout.readline() == "ready\n"
        busy = wait_for(handles)
        assert all(busy[name] > baseline[name] for name in baseline)
    finally:
        os.killpg(holder.pid, signal.SIGKILL)
        holder.communicate()
    wait_for(lambda: handles() == baseline)
    again = redoxcap_system.python("import rt; rt.close(rt.open('/scheme/uds/held', rt.O_CREAT))",
                          "--uds-scope", "system")
    assert again.returncode == 0  # the name was freed with the dead listener


def test_a_read_only_mount_refuses_writes(tmp_path):
    docs = tmp_path / "docs"
    docs.mkdir()
    (docs / "readme.txt").write_text("read me")
    with booted(tmp_path, "--mount", f"docs={docs}:ro") as system:
        code = (
            "import errno, rt\n"
            "print(rt.open_file('/scheme/docs/readme.txt').read())\n"
            "for fn in (lambda: rt.open('/scheme/docs/new', rt.O_CREAT|rt.O_WRONLY),\n"
            "           lambda: rt.open('/scheme/docs/readme.txt', rt.O_WRONLY),\n"
            "           lambda: rt.mkdir('/scheme/docs/d'), lambda: rt.unlink('/scheme/docs/readme.txt')):\n"
            "    try:\n        fn()\n    except OSError as e:\n        print(errno.errorcode[e.errno])\n"
        )
        assert system.python(code).stdout.split() == ["read", "me"] + ["EROFS"] * 4
        assert sorted(p.name for p in docs.iterdir()) == ["readme.txt"]
        info = system.daemon("docs")
        assert info["module"] == "redoxcap.schemes.file" and "--read-only" in info["args"]


def test_run_mount_adds_a_writable_mount_to_a_running_system(redoxcap_system, tmp_path):
    data = tmp_path / "data"
    data.mkdir()
    result = redoxcap_system.python("import rt; rt.open_file('/scheme/data/out.txt', 'w').write('x'); print(rt.fpath(rt.open('data:out.txt')))",
                           "--mount", f"data={data}")
    assert result.stdout.strip() == "/scheme/data/out.txt"
    assert (data / "out.txt").read_text() == "x"
    bad = redoxcap_system.python("pass", "--mount", "data=/nonexistent-dir", check=False)
    assert bad.returncode == 2 and "/nonexistent-dir does not exist" in bad.stderr


def test_a_config_file_sets_root_schemes_and_mounts(tmp_path):
    photos = tmp_path / "photos"
    photos.mkdir()
    config = tmp_path / "redoxcap.toml"
    config.write_text(f'root = "{tmp_path / "cfgroot"}"\nschemes = ["file", "zero"]\n'
                      f'[mount.photos]\npath = "{photos}"\nread_only = true\n')
    missing = subprocess.run(  # a root the file names must be there, as a mount's must
        [*REDOXCAP, "--state-dir", str(tmp_path / "st"), "run", "--config", str(config), "--", "true"],
        capture_output=True, text=True, timeout=60, check=False)
    assert missing.returncode == 2 and "cfgroot does not exist" in missing.stderr
    (tmp_path / "cfgroot").mkdir()
    out = subprocess.run(
        [*REDOXCAP, "--state-dir", str(tmp_path / "st"), "run", "--config", str(config), "--",
         sys.executable, "-c", "import rt; print(rt.schemes())"],
        capture_output=True, text=True, timeout=60, check=False)
    assert out.returncode == 0, out.stderr
    assert out.stdout.strip() == "['file', 'photos', 'zero']"
    assert (tmp_path / "cfgroot").is_dir()
