"""A confined program as `redoxcap run` starts it: its terminal, its signals, what it may
read and what environment it gets, and its end with the run's (the lookups and escapes
through rt are test_sandbox.py's).
"""

from __future__ import annotations

import errno
import fcntl
import json
import os
import re
import select
import signal
import struct
import subprocess
import sys
import tempfile
import termios
import textwrap
import threading
import time
import tty

from redoxcap.testing import REDOXCAP


class Output:
    """Reads what a process writes to fd, waiting up to timeout seconds for each thing asked
    (a slow machine may take long to start the program, and then to signal it)."""

    def __init__(self, fd: int, timeout: float = 30.0) -> None:
        self.fd = fd
        self.timeout = timeout
        self.data = b""

    def until(self, needle: bytes) -> bytes:
        """Read until needle has arrived; return everything read so far."""
        return self.match(re.escape(needle)).string

    def match(self, pattern: bytes) -> re.Match[bytes]:
        """Read until pattern is found in what has arrived; return the match."""
        deadline = time.monotonic() + self.timeout
        while (found := re.search(pattern, self.data)) is None:
            left = deadline - time.monotonic()
            if left <= 0 or not select.select([self.fd], [], [], left)[0]:
                raise AssertionError(f"no {pattern!r} in time; got {self.data!r}")
            chunk = os.read(self.fd, 4096)
            if not chunk:
                raise AssertionError(f"EOF before {pattern!r}; got {self.data!r}")
            self.data += chunk
        return found


def _pending_input(fd: int) -> int:
    return struct.unpack("i", fcntl.ioctl(fd, termios.FIONREAD, bytes(4)))[0]


TERMINAL_CLIENT = textwrap.dedent("""
    import fcntl, json, os
    TIOCSTI, TIOCLINUX, TIOCSCTTY = 0x5412, 0x541C, 0x540E

    def code(fn):
        try:
            fn()
            return 0
        except OSError as exc:
            return exc.errno

    def inject(fd):
        for c in b"touch /tmp/pwned-by-redoxcap\\n":
            fcntl.ioctl(fd, TIOCSTI, bytes([c]))

    with open("/proc/self/stat") as f:
        fields = f.read().rpartition(")")[2].split()
    results = {f"TIOCSTI fd{fd}": code(lambda: inject(fd)) for fd in (0, 1, 2)}
    results["TIOCLINUX"] = code(lambda: fcntl.ioctl(0, TIOCLINUX, bytes([2]) + bytes(12)))
    results["TIOCSCTTY"] = code(lambda: fcntl.ioctl(0, TIOCSCTTY, 1))
    results["own session"] = int(fields[3]) == os.getpid()
    results["tty_nr"] = int(fields[4])
    print("RESULTS " + json.dumps(results) + " END", flush=True)
""")


# Execs argv[1:] as the leader of a new session whose controlling terminal is stdin.
ON_ITS_OWN_TERMINAL = [
    sys.executable, "-c",
    ("import fcntl, os, sys, termios\n"
     "os.setsid()\n"
     "fcntl.ioctl(0, termios.TIOCSCTTY, 0)\n"
     "os.execvp(sys.argv[1], sys.argv[1:])\n"),
]


def test_a_confined_client_cannot_push_keystrokes_into_the_callers_terminal(redoxcap_module_system):
    master, slave = os.openpty()
    run = None
    try:
        tty.setraw(slave)  # FIONREAD then counts every pending byte, not only whole lines
        # `run` gets the pty as its controlling terminal, as under an interactive shell.
        run = subprocess.Popen(
            [*ON_ITS_OWN_TERMINAL, *REDOXCAP, "--state-dir", str(redoxcap_module_system.state_dir), "run",
             "--ns", "", "--require-confine", "--no-broker", "--", sys.executable, "-c",
             TERMINAL_CLIENT],
            stdin=slave, stdout=slave, stderr=slave)
        data = Output(master).until(b" END")
        assert run.wait(timeout=30) == 0, data
        pending = _pending_input(slave)
        os.write(master, b"x")
        assert select.select([slave], [], [], 30)[0]  # control: typed input does show up
        assert _pending_input(slave) == 1
    finally:
        if run is not None and run.poll() is None:
            os.killpg(run.pid, signal.SIGKILL)
            run.wait()
        os.close(master)
        os.close(slave)
    results = json.loads(data.split(b"RESULTS ", 1)[1].split(b" END", 1)[0])
    assert results == {
        "TIOCSTI fd0": errno.EPERM, "TIOCSTI fd1": errno.EPERM, "TIOCSTI fd2": errno.EPERM,
        "TIOCLINUX": errno.EPERM, "TIOCSCTTY": errno.EPERM, "own session": True, "tty_nr": 0,
    }
    assert pending == 0
    assert not os.path.exists("/tmp/pwned-by-redoxcap")


SIGNALLED_CLIENT = textwrap.dedent("""
    import os, signal

    def report(signum, _frame):
        # os.write: the signal may land while print() is still busy with "ready".
        os.write(1, f"{os.getpid()} got {signal.Signals(signum).name}\\n".encode())
        if signum == signal.SIGTERM:
            os._exit(3)

    signal.signal(signal.SIGINT, report)
    signal.signal(signal.SIGTERM, report)
    kid = os.fork()
    if kid == 0:
        # Python drops signals that land while fork is still settling: say when it has.
        os.write(1, b"kid ready\\n")
        while True:
            signal.pause()
    print("ready", os.getpid(), kid, os.getsid(0), flush=True)
    while True:
        signal.pause()
""")


def test_ctrl_c_and_sigterm_to_run_reach_the_confined_client_and_its_children(redoxcap_module_system):
    run = subprocess.Popen(
        [*REDOXCAP, "--state-dir", str(redoxcap_module_system.state_dir), "run", "--require-confine", "--",
         sys.executable, "-c", SIGNALLED_CLIENT],
        stdout=subprocess.PIPE, start_new_session=True)
    pidfds = []
    try:
        out = Output(run.stdout.fileno())
        out.until(b"kid ready\n")
        client, kid, session = (int(x) for x in out.match(rb"ready (\d+) (\d+) (\d+)\n").groups())
        pidfds = [os.pidfd_open(client), os.pidfd_open(kid)]
        assert session == client  # a session of its own, out of reach of our terminal
        os.kill(run.pid, signal.SIGINT)  # what Ctrl-C at the terminal does: only `run` gets it
        out.until(f"{client} got SIGINT".encode())
        out.until(f"{kid} got SIGINT".encode())
        os.kill(run.pid, signal.SIGTERM)
        assert run.wait(timeout=30) == 3
        out.until(f"{kid} got SIGTERM".encode())
    finally:
        _stop(run, pidfds)


BUSY_CLIENT = textwrap.dedent("""
    import os, signal, sys, time

    got = 0

    def count(_signum, _frame):
        global got
        got += 1

    signal.signal(signal.SIGINT, count)
    print("ready", flush=True)
    wrong = 0
    for _ in range(int(sys.argv[1])):
        fd = os.open("f.txt", os.O_RDONLY)  # answered by the broker, with an fd it installs
        if fd < 3 or os.pread(fd, 5, 0) != b"hello":
            wrong += 1
        os.close(fd)
    print("done", wrong, got, flush=True)
    time.sleep(0.5)  # a Ctrl-C still on its way lands here, not in run's teardown
""")


def test_ctrl_c_in_the_middle_of_brokered_calls_loses_none_of_them(redoxcap_module_system, tmp_path):
    """Ctrl-C, passed on to the run, lands in the broker too, often in the middle of one of
    its ioctls: every call is still answered, and right. An interrupted ADDFD+SEND had Linux
    answer an open with 0 and no fd (and the broker's next answer to it then failed)."""
    (tmp_path / "f.txt").write_bytes(b"hello")
    run = subprocess.Popen(
        [*REDOXCAP, "--state-dir", str(redoxcap_module_system.state_dir), "run", "--dir", str(tmp_path),
         "--", sys.executable, "-c", BUSY_CLIENT, "4000"],
        stdout=subprocess.PIPE, start_new_session=True)
    stop = threading.Event()

    def press_ctrl_c() -> None:  # as fast as no terminal could, until the program is done
        while not stop.wait(0.0005):
            os.kill(run.pid, signal.SIGINT)

    presser = threading.Thread(target=press_ctrl_c)
    try:
        out = Output(run.stdout.fileno(), timeout=120)
        out.until(b"ready\n")
        presser.start()
        done = out.match(rb"done (\d+) (\d+)\n")
        stop.set()
        presser.join()
        assert run.wait(timeout=60) == 0
    finally:
        stop.set()
        if presser.is_alive():
            presser.join()
        _stop(run, [])
    wrong, got = (int(x) for x in done.groups())
    assert wrong == 0
    assert got > 0  # the signals did reach the program, through the broker's process


def _stop(run: subprocess.Popen, pidfds: list[int]) -> None:
    """Kill what a test started, whatever it left: run's process group, and each process a
    pidfd (closed here) names."""
    if run.poll() is None:
        os.killpg(run.pid, signal.SIGKILL)
    run.wait()
    for pidfd in pidfds:
        try:
            signal.pidfd_send_signal(pidfd, signal.SIGKILL)
        except ProcessLookupError:
            pass
        os.close(pidfd)
    run.stdout.close()


TOOL = textwrap.dedent("""
    import errno, os, sys

    def code(fn):
        try:
            fn()
            return "ok"
        except OSError as exc:
            return errno.errorcode[exc.errno]

    here = os.path.dirname(os.path.abspath(__file__))
    print("own file", code(lambda: open(__file__).read()))
    print("key beside it", code(lambda: open(os.path.join(here, ".ssh", "id_rsa")).read()))
    print("its directory", code(lambda: os.listdir(here)))
    print("its argument", code(lambda: open(sys.argv[1]).read()))
""")


def test_confinement_grants_a_program_and_its_script_but_not_their_directory_or_arguments(
        redoxcap_module_system, tmp_path):
    home = tmp_path / "home"
    (home / ".ssh").mkdir(parents=True)
    (home / ".ssh/id_rsa").write_text("PRIVATE KEY")
    (home / "notes.txt").write_text("PRIVATE NOTES")
    tool = home / "tool"
    tool.write_text(f"#!{sys.executable}\n{TOOL}")
    tool.chmod(0o755)
    (home / "script.py").write_text(TOOL)
    env = {**os.environ, "HOME": str(home)}

    def run(*command: str) -> subprocess.CompletedProcess:
        # `cd ~ && redoxcap run ...`
        # without the broker: what Landlock grants a program (with it: test_everyday.py)
        return redoxcap_module_system.run("--ns", "", "--require-confine", "--no-broker", "--", *command,
                                 cwd=home, env=env, check=False)

    expected = "own file ok\nkey beside it EACCES\nits directory EACCES\nits argument EACCES\n"
    assert run("./tool", "notes.txt").stdout == expected
    assert run(sys.executable, "script.py", "notes.txt").stdout == expected
    assert run(sys.executable, "-I", "-W", "ignore", "-X", "dev", "script.py",
               str(home / "notes.txt")).stdout == expected
    for command in (["cat", ".ssh/id_rsa"], ["head", "-c", "100", str(home / ".ssh/id_rsa")]):
        result = run(*command)
        assert result.returncode == 1, result
        assert "PRIVATE" not in result.stdout and "Permission denied" in result.stderr
    result = run(sys.executable, "-c", "print(open(__import__('sys').argv[1]).read())", "notes.txt")
    assert result.returncode == 1 and "PermissionError" in result.stderr and not result.stdout
    result = run(sys.executable, "-m", "base64", "-d", "notes.txt")
    assert result.returncode == 1 and "PermissionError" in result.stderr and not result.stdout


def test_a_confined_client_gets_a_minimal_environment_plus_what_env_names(redoxcap_module_system, tmp_path):
    caller = {
        "PATH": os.environ["PATH"], "HOME": str(tmp_path), "LANG": "C.UTF-8", "LC_ALL": "C.UTF-8",
        "TERM": "dumb", "TZ": "UTC", "REDOXCAP_NOTE": "ours", "FOO": "foo",
        "AWS_SECRET_ACCESS_KEY": "wJalrXUtnFEMI/K7MDENG", "GITHUB_TOKEN": "ghp_secret",
    }
    dump = "import json, os; print(json.dumps(dict(os.environ)))"

    def client_env(*options: str) -> dict[str, str]:
        env = json.loads(redoxcap_module_system.python(dump, *options, env=caller, cwd=tmp_path).stdout)
        for name in ("REDOXCAP_NS_FD", "REDOXCAP_CWD_FD"):  # set by run; rt takes them
            assert env.pop(name).isdigit()
        assert env.pop("REDOXCAP_CWD") == "/"
        return env

    minimal = {k: caller[k] for k in ("PATH", "HOME", "LANG", "LC_ALL", "TERM", "TZ",
                                      "REDOXCAP_NOTE")}
    got = client_env()
    assert got.pop("TMPDIR").startswith(tempfile.gettempdir())
    assert got == minimal
    got = client_env("--env", "FOO", "--env", "NEW=a=b", "--env", "ABSENT", "--env", "TZ=CET")
    got.pop("TMPDIR")
    assert got == {**minimal, "FOO": "foo", "NEW": "a=b", "TZ": "CET"}
    got = client_env("--inherit-env")
    assert got.pop("TMPDIR") != caller.get("TMPDIR")
    assert got == caller
    assert client_env("--no-confine") == caller
    bad = redoxcap_module_system.python(dump, "--env", "=x", env=caller, check=False)
    assert bad.returncode == 2 and "NAME or NAME=VALUE" in bad.stderr


def test_a_confined_client_dies_with_a_killed_run(redoxcap_module_system):
    # Out of the terminal's session, no hangup would end it: run's death must.
    run = subprocess.Popen(
        [*REDOXCAP, "--state-dir", str(redoxcap_module_system.state_dir), "run", "--require-confine", "--",
         sys.executable, "-c", "import os, signal; print(os.getpid(), flush=True); signal.pause()"],
        stdout=subprocess.PIPE, start_new_session=True)
    pidfd = None
    try:
        client = int(Output(run.stdout.fileno()).until(b"\n"))
        pidfd = os.pidfd_open(client)
        os.killpg(run.pid, signal.SIGKILL)
        assert select.select([pidfd], [], [], 30)[0], "the client outlived run"
    finally:
        _stop(run, [pidfd] if pidfd is not None else [])


def test_a_package_planted_in_the_cwd_does_not_run_as_the_launcher(redoxcap_module_system, tmp_path):
    # A client that can write where `run` is later started from must not get code run unconfined.
    planted = tmp_path / "planted"
    (planted / "redoxcap/sandbox").mkdir(parents=True)
    marker = tmp_path / "ran-unconfined"
    (planted / "redoxcap/__init__.py").write_text("")
    for module in ("__init__.py", "__main__.py"):
        (planted / "redoxcap/sandbox" / module).write_text(f"open({str(marker)!r}, 'w').close()\n")
    result = subprocess.run(
        [sys.executable, "-P", "-m", "redoxcap", "--state-dir", str(redoxcap_module_system.state_dir), "run",
         "--require-confine", "--", sys.executable, "-c", "print('client ran')"],
        cwd=planted, capture_output=True, text=True, timeout=60, check=False)
    assert result.returncode == 0, result.stderr
    assert result.stdout == "client ran\n"
    assert not marker.exists()
