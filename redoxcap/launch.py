"""`redoxcap run`'s lean side: hand a confined run to the running system, wait, pass its code on.

A launch is mostly an interpreter starting and importing; `run` itself
needs rt, the wire layer, the broker and the sandbox, about 70 ms of
imports on a cold interpreter, besides what the run does. The system's fork
server has all of that loaded already. So when a system is up, this process
(the console script, which has loaded nothing but this module) asks the
supervisor for a *runner* (control op `run`): a fork of that warm
interpreter (redoxcap/runner.py), which receives from us everything our
own `run` would have had (its standard fds and `--pass-fd` fds at the same
numbers, our current directory, umask, resource limits, nice value and environment,
the command line) and does the run exactly as :func:`redoxcap.run.main`
would here. Its messages are printed on our stderr, which it holds.

Between us and the runner there is one SOCK_SEQPACKET socket pair, our end
here and theirs passed with the control request:

    us -> runner   "R" with fds [payload, cwd, *standard and --pass-fd fds]: the run
                   (the payload is a memfd holding a marshal'd dict, see :func:`_payload`)
    us -> runner   "S" + one byte: a signal we got (SIGINT, SIGTERM, SIGHUP), to pass on
    runner -> us   "X" + 4 bytes (little-endian, signed): the run's exit code, the last word

EOF from the runner without "X" means it died (exit 1, saying so); our EOF
(this process killed) makes the runner kill the run. Nothing here imports
more than the interpreter has at start, bar `_socket`: no msgpack (the one
control request is a fixed map, spelled below), no `socket` or `signal`
(both load enum). Whatever this cannot do (no system up, a supervisor that
knows no `run`, an fd it cannot pass) returns None, and the caller runs
in-process as before.
"""

import _signal
import _socket
import marshal
import os
import sys

# the supervisor's answer to a request it took, {"ok": true} in msgpack
OK_REPLY = b"\x81\xa2ok\xc3"
CONTROL_SOCKET = "control.sock"  # redoxcap.control's SOCKET_NAME and TOKEN_NAME
CONTROL_TOKEN = "token"
CONNECT_TIMEOUT = 10.0  # seconds: the supervisor's accept and answer
FORWARDED = (_signal.SIGINT, _signal.SIGTERM, _signal.SIGHUP)
EXIT_FAILED = 1  # redoxcap.exits.EXIT_FAILED (exits loads signal, and so enum)
MAX_PASS_FDS = 64  # --pass-fd fds a runner takes (redoxcap.runner.MAX_FDS); more: run here


def default_state_dir() -> str:
    """Where a system keeps its control socket: $XDG_RUNTIME_DIR/redoxcap-UID (or the temp dir)."""
    base = os.environ.get("XDG_RUNTIME_DIR")
    if not base:
        import tempfile  # only where there is no runtime directory: it loads random and shutil

        base = tempfile.gettempdir()
    return os.path.join(base, f"redoxcap-{os.getuid()}")


def _msgpack_str(text: str) -> bytes:
    data = text.encode()
    if len(data) < 32:
        return bytes([0xA0 | len(data)]) + data
    if len(data) < 256:
        return b"\xd9" + bytes([len(data)]) + data
    return b"\xda" + len(data).to_bytes(2, "big") + data


def run_request(token: str) -> bytes:
    """The control request `{"token": token, "op": "run"}`, msgpack-encoded."""
    return b"\x82" + _msgpack_str("token") + _msgpack_str(token) + _msgpack_str("op") \
        + _msgpack_str("run")


def resource_limits() -> dict[int, tuple[int, int]]:
    """Our resource limits, {RLIMIT_* number: (soft, hard)} as resource.getrlimit says them
    (RLIM_INFINITY -1), read from /proc/self/limits: loading the resource module cost a run
    0.2 ms. Its lines (after a header) are the limits in RLIMIT_* order, each a name of 25
    columns and a space, then the soft and hard limits ("unlimited" or a number); where it
    cannot be read so, from the resource module."""
    try:
        with open("/proc/self/limits", "rb") as f:
            lines = f.read().splitlines()[1:]
        limits = {}
        for number, line in enumerate(lines):
            soft, hard = line[26:].split()[:2]
            limits[number] = (-1 if soft == b"unlimited" else int(soft),
                              -1 if hard == b"unlimited" else int(hard))
        if len(limits) >= 16:  # RLIMIT_CPU .. RLIMIT_RTTIME
            return limits
    except (OSError, ValueError):
        pass
    import resource

    return {number: resource.getrlimit(number) for number in
            {getattr(resource, name) for name in dir(resource) if name.startswith("RLIMIT_")}}


def _payload(state_dir: str, command: list[str], options: dict, numbers: list[int]) -> int:
    """A memfd holding the run for the runner (see redoxcap/runner.py, `Run`)."""
    limits = resource_limits()
    umask = os.umask(0)
    os.umask(umask)
    data = marshal.dumps({"state_dir": state_dir, "command": list(command),
                          "options": {k: list(v) if isinstance(v, tuple) else v
                                      for k, v in options.items()},
                          "environ": dict(os.environ), "umask": umask, "rlimits": limits,
                          "nice": os.getpriority(os.PRIO_PROCESS, 0), "fds": numbers})
    fd = os.memfd_create("redoxcap-run", os.MFD_CLOEXEC)
    try:
        view = memoryview(data)
        while view:
            view = view[os.write(fd, view):]
        os.lseek(fd, 0, os.SEEK_SET)
    except BaseException:
        os.close(fd)
        raise
    return fd


def run_in_system(state_dir: str, command: list[str], options: dict) -> int | None:
    """Have the system up at state_dir do the run; its exit code (None: run it here instead).

    Args:
        state_dir: an absolute path.
        command, options: as redoxcap.entry.parse_run read them (paths as strings).
    """
    pass_fds = list(options.get("pass_fds", ()))
    numbers = [n for n in (0, 1, 2) if is_open(n)] + pass_fds
    if len(pass_fds) > MAX_PASS_FDS or not all(is_open(n) for n in pass_fds):
        return None  # more than a runner takes, or one run says is not open (and how)
    try:
        with open(os.path.join(state_dir, CONTROL_TOKEN), encoding="ascii") as f:
            token = f.read()
    except (OSError, ValueError):
        return None
    taken = False  # whether a runner took the run (ours is then _wait's)
    control = _socket.socket(_socket.AF_UNIX, _socket.SOCK_SEQPACKET | _socket.SOCK_CLOEXEC)
    ours, theirs = _socket.socketpair(_socket.AF_UNIX,
                                      _socket.SOCK_SEQPACKET | _socket.SOCK_CLOEXEC)
    try:
        control.settimeout(CONNECT_TIMEOUT)
        try:
            control.connect(os.path.join(state_dir, CONTROL_SOCKET))
            payload = _payload(state_dir, command, options, numbers)
        except OSError:
            return None
        try:
            cwd = os.open(".", os.O_PATH | os.O_DIRECTORY | os.O_CLOEXEC)
        except OSError:  # a current directory we cannot name: run says so
            os.close(payload)
            return None
        try:
            # queued for the runner before it exists: it reads this first
            ours.sendmsg([b"R"], [_rights([payload, cwd, *numbers])])
            control.sendmsg([run_request(token)], [_rights([theirs.fileno()])])
            reply = control.recv(256)
        except OSError:
            return None
        finally:
            os.close(payload)
            os.close(cwd)
        if reply != OK_REPLY:  # no runner was started: whatever the reason, run does it here
            return None
        taken = True
    finally:
        control.close()
        theirs.close()
        if not taken:
            ours.close()  # no runner on the other end: run does it here, without it
    try:
        return _wait(ours)
    finally:
        ours.close()


def _wait(sock: _socket.socket) -> int:
    """Pass our signals on to the runner until it says the run's exit code."""
    def forward(signum: int, _frame: object) -> None:
        try:
            sock.send(b"S" + bytes([signum]))
        except OSError:
            pass  # the runner is gone: its EOF follows

    for signum in FORWARDED:
        _signal.signal(signum, forward)
    while True:
        data = sock.recv(16)
        if data[:1] == b"X" and len(data) == 5:
            return int.from_bytes(data[1:], "little", signed=True)
        if not data:
            os.write(2, b"redoxcap: the run's process ended without an exit code\n")
            return EXIT_FAILED


def _rights(fds: list[int]) -> tuple[int, int, bytes]:
    return (_socket.SOL_SOCKET, _socket.SCM_RIGHTS,
            b"".join(fd.to_bytes(4, sys.byteorder, signed=True) for fd in fds))


def is_open(fd: int) -> bool:
    """Whether fd is an open fd of this process."""
    try:
        os.fstat(fd)
        return True
    except OSError:
        return False
