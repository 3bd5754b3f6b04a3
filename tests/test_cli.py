"""The `redoxcap` command against a running system: `status`, the control socket
that answers only its owner, `run` with a namespace, a cwd and an exit code, the
example client, a private system for a `run` without one, and `up --trace`.

Most tests share the module's one system (`redoxcap_module_system`) and touch only names
of their own in it; those that need a system of their own say why.
"""

from __future__ import annotations

import errno
import json
import os
import socket
import subprocess
import sys
import tempfile
from pathlib import Path

from redoxcap import control
from redoxcap.testing import REDOXCAP, booted, pid_alive, wait_for
from redoxcap.wire import protocol as P

EXAMPLES = Path(__file__).resolve().parent.parent / "examples"


def test_status_json_reports_every_daemon(redoxcap_module_system):
    info = json.loads(redoxcap_module_system.cli("status", "--json").stdout)
    names = [d["name"] for d in info["daemons"]]
    assert names[:3] == ["kernel", "nsmgr", "file"]
    for d in info["daemons"]:
        assert pid_alive(d["pid"])
        assert 1000 < d["rss_kib"] < 500_000  # a Python process, measured
    human = redoxcap_module_system.cli("status").stdout
    assert "nsmgr" in human and "file" in human


def test_output_its_reader_stops_reading_is_no_error(redoxcap_module_system):
    """`redoxcap status | head -1`: what reads the output goes away before all of it is
    written, and the command ends as a tool SIGPIPE ends would, without a word."""
    for command in (["status"], ["status", "--json"], ["graph"]):
        read, write = os.pipe()
        proc = subprocess.Popen([*REDOXCAP, "--state-dir", str(redoxcap_module_system.state_dir),
                                 *command], stdout=write, stderr=subprocess.PIPE)
        os.close(write)
        os.close(read)  # before it writes anything
        _, err = proc.communicate(timeout=60)
        assert proc.returncode == 1, command
        assert err == b"", (command, err)


def test_the_control_socket_only_answers_its_owner(redoxcap_module_system):
    with socket.socket(socket.AF_UNIX, socket.SOCK_SEQPACKET) as s:
        s.connect(str(redoxcap_module_system.state_dir / control.SOCKET_NAME))
        s.send(P.pack({"token": "guess", "op": "namespace"}))
        data, anc, _, _ = s.recvmsg(4096, P.CMSG_FDS)
    assert anc == []
    assert P.unpack(data) == {"ok": False, "error": "permission denied: bad token"}
    # another uid with the right token is refused too
    token = (redoxcap_module_system.state_dir / control.TOKEN_NAME).read_text()
    code = (
        "import os, socket, sys\n"
        "from redoxcap.wire import protocol as P\n"
        "os.setgid(65534); os.setuid(65534)\n"
        "s = socket.socket(socket.AF_UNIX, socket.SOCK_SEQPACKET)\n"
        f"s.connect({str(redoxcap_module_system.state_dir / control.SOCKET_NAME)!r})\n"
        "try:\n"  # the supervisor may have closed it already
        f"    s.send(P.pack({{'token': {token!r}, 'op': 'namespace'}}))\n"
        "except BrokenPipeError:\n"
        "    pass\n"
        "try:\n"
        "    print(repr(s.recv(4096)))\n"
        "except ConnectionResetError:\n"  # closed with our request unread
        "    print(repr(b''))\n"
    )
    # a hard link in a directory that uid can search reaches the same socket
    with tempfile.TemporaryDirectory() as public:  # same filesystem as pytest tmp_path
        os.chmod(public, 0o755)
        link = Path(public) / "control.sock"
        os.link(redoxcap_module_system.state_dir / control.SOCKET_NAME, link)
        os.chmod(link, 0o777)
        out = subprocess.run([sys.executable, "-c", code.replace(
            repr(str(redoxcap_module_system.state_dir / control.SOCKET_NAME)), repr(str(link)))],
            capture_output=True, text=True, timeout=30, check=False)
    assert out.stdout.strip() == "b''", out.stderr  # closed before anything is read


def test_run_hands_the_command_its_namespace_and_cwd(redoxcap_module_system):
    (redoxcap_module_system.root / "run-cwd").mkdir()
    result = redoxcap_module_system.python(
        "import rt; print(rt.getcwd()); print(rt.schemes()); print(rt.listdir())",
        "--cwd", "/run-cwd", "--ns", "file,zero",
    )
    assert result.stdout.split("\n")[:3] == ["/run-cwd", "['file', 'zero']", "[]"]


def test_run_with_an_empty_namespace_cannot_open_absolute_paths(redoxcap_module_system):
    result = redoxcap_module_system.python(
        "import rt\n"
        "try:\n    rt.open('/x')\nexcept OSError as e:\n    print(e.errno)\n",
        "--ns", "",
    )
    assert result.stdout.strip() == str(errno.ENODEV)


def test_run_passes_the_exit_code_and_reports_bad_options(redoxcap_module_system):
    assert redoxcap_module_system.python("raise SystemExit(7)", check=False).returncode == 7
    bad = redoxcap_module_system.python("pass", "--ns", "file,nosuch", check=False)
    assert bad.returncode == 2 and "no scheme named 'nosuch'" in bad.stderr
    bad = redoxcap_module_system.run("--bogus", "--", sys.executable, "-c", "pass", check=False)
    assert bad.returncode == 2 and "No such option" in bad.stderr  # not a command to run
    bad = redoxcap_module_system.python("pass", "--cwd", "/nonexistent-cwd-of-redoxcap", check=False)
    assert bad.returncode == 1
    assert bad.stderr.startswith("redoxcap: --cwd /nonexistent-cwd-of-redoxcap: No such file or "
                                 "directory (a path in the system's file scheme: make the directory "
                                 "nonexistent-cwd-of-redoxcap below its --root")


def test_the_example_client_runs(redoxcap_module_system):
    result = redoxcap_module_system.run("--", sys.executable, str(EXAMPLES / "hello.py"))
    assert "hello.txt" in result.stdout


def test_run_without_a_system_boots_a_private_one_and_stops_it(tmp_path):
    state = tmp_path / "none"
    root = tmp_path / "root"
    root.mkdir()  # a --root must exist (only the default one is made)
    out = subprocess.run(
        [*REDOXCAP, "--state-dir", str(state), "run", "--root", str(root), "--",
         sys.executable, "-c", ("import rt, os; rt.close(rt.open('/made', rt.O_CREAT|rt.O_WRONLY));"
                                "print(os.getppid())")],
        capture_output=True, text=True, timeout=60, check=False)
    assert out.returncode == 0, out.stderr
    assert (root / "made").exists()
    assert not state.exists()
    leftovers = subprocess.run(["pgrep", "-f", f"--root {root}"], capture_output=True, text=True,
                               check=False)
    assert leftovers.stdout == ""


def test_trace_shows_each_request_and_reply_with_the_callers_pid(tmp_path):
    with booted(tmp_path, "--trace") as system:  # a system of its own: traced from its start
        out = system.python("import os, rt; rt.close(rt.open('/made', rt.O_CREAT | rt.O_WRONLY));"
                            "print(os.getpid())")
        pid = out.stdout.strip()
        lines = wait_for(lambda: [line for line in system.log().splitlines()
                                  if f"pid {pid} " in line and "OPENAT" in line] or None)
        # rt asked nsmgr for file's root, then opened through it: one call, straight to file
        assert any(" file " in line and " made -> handle " in line and " pid " in line.split(" file ")[0]
                   for line in lines), lines
        log = system.log()
        assert any(f"pid {pid} nsmgr   NS_ROOT    file -> " in line for line in log.splitlines()), log


def test_max_caps_bounds_what_a_run_may_hold(redoxcap_module_system):
    code = ("import errno, rt\n"
            "fds = []\n"
            "try:\n"
            "    while True:\n"
            "        fds.append(rt.open('/scheme/zero'))\n"
            "except OSError as e:\n"
            "    print(len(fds), errno.errorcode[e.errno])\n")
    counts = []
    for quota in (32, 64):
        count, err = redoxcap_module_system.python(code, "--max-caps", str(quota)).stdout.split()
        assert err == "EMFILE"
        counts.append(int(count))
    # the run's namespace (and each entry nsmgr holds in it for the run) and its cwd count
    # too: a few capabilities fewer than the quota, and every one more of quota is one more
    assert 0 < counts[0] < 32 - 8 and counts[1] - counts[0] == 32, counts
    too_few = redoxcap_module_system.python("pass", "--max-caps", "15", check=False)
    assert too_few.returncode == 2 and "16<=x" in too_few.stderr
