"""A run the system does for `redoxcap run`: a warm fork that runs it as `run` would have.

`python -m redoxcap.runner --socket-fd N` is forked by the system's fork
server (which has this module, and so `redoxcap.run`, the broker and the
sandbox, loaded) when the supervisor takes a control request `run`
(redoxcap/launch.py is the other side, and says the protocol); or, as a
spare forked before it is needed (`--spare-fd N`), it waits for the
supervisor to pass it that socket. It is two processes:

- the *run*, forked at once (before a spare has a caller; a spare's run
  waits for the supervisor to pass it the caller's socket, one hop less
  than through the reaper), reads the run from the caller's socket
  (:func:`receive`): the command line and options, and the caller's
  environment, umask, resource limits, nice value, current directory and
  standard and `--pass-fd` fds; hands the reaper the caller's socket ("T");
  takes them on, each fd at the number it had there (:func:`take_on`); and
  calls :func:`redoxcap.entry.run_command` as the caller would have (the
  reaper sends the supervisor its note of the program started, "N", for
  `status`, so that no thread of the run's is started as the program is): its
  messages go to the caller's stderr, its result is its exit code, which it
  tells the reaper ("E") as soon as the program has ended and been reaped
  (its trace printed; the run's daemons are stopped and its directories
  removed after), when it has no child left (a process the program made a
  child of the run's, with CLONE_PARENT, is only ended once the run has
  exited and it is the reaper's; the code is said then); when the reaper
  has no child but the run either (no orphan of the program's), it first
  says the code to the caller ("X") itself, a hop sooner;
- the *reaper*, its parent, a child subreaper: it passes on the signals the
  caller forwards ("S"), reaps whatever the program leaves behind as it
  goes (orphans come here, not to the supervisor, which would never reap
  them), and says the exit code ("X") once nothing of the program is left:
  at once when the run's "E" comes and the run is its only child (the
  kernel's list of its children says so), else once the run has exited and
  it has killed and reaped what is left of the program's processes, and
  removed what is left of the directories the run made for the program (its
  private /tmp: "D"), which a run killed could not remove itself.

If the caller goes away (EOF), the run is killed: the program dies with
its broker, and what is left with it.

A spare told its system's state directory (`--state-dir`) takes the run's
first steps while it waits for a caller (:func:`_prepare`,
redoxcap.run.Prepared: the run's namespace, asked for and forked), so that
an everyday run starts from them; the run lets them go where they do not
fit it. Then, with no caller yet, it copies the pages of its objects that
it shares with the fork server (redoxcap.broker.launcher.own_pages), as the
Starter's child does, so that no copy-on-write fault is on the run's way.
"""

from __future__ import annotations

import marshal
import os
import select
import signal
import socket
import stat
import sys
import threading
import time
from collections.abc import Callable
from pathlib import Path

import redoxcap.broker  # loaded by the fork server, for every run's fork
import redoxcap.run
from redoxcap import control, entry, launch
from redoxcap.broker import filter as bpf
from redoxcap.broker import server as broker_server
from redoxcap.broker.launcher import own_pages
from redoxcap.exits import EXIT_FAILED
from redoxcap.sandbox.policy import project_package_locations
from redoxcap.sandbox.process import cap_last_cap
from redoxcap.wire import linux
from redoxcap.wire import protocol as P

RECEIVE_DEADLINE = 5.0  # seconds the caller has to send the run (it sends it before it asks)
MAX_FDS = launch.MAX_PASS_FDS + 5  # fds a run request carries: payload, cwd, 0-2, --pass-fd
MAX_PAYLOAD = 16 << 20  # bytes: the environment is most of it
FIRST_OWN_FD = 10  # where the runner's own fds go while it lays out the caller's
MAX_SCRATCH = 8  # directories a run says it made for its program (it makes two at most)
LEFT_BEHIND_GRACE = 1.0  # seconds a run may take to end once its program has exited, before
#                         what the program left behind is killed (it may be what holds it)
MAX_MESSAGE = 1 + 8192  # bytes of a message from the run: a directory's path, the note

# The brokered program's filter, compiled once in the fork server, not once per run (called
# as redoxcap.broker.launcher calls it: the cache knows its arguments by how they are passed),
# and the syscall names its broker knows numbers by.
if linux.machine() is not None:
    for _scoped in (True, False):
        bpf.program(linux.machine(), signals_scoped=_scoped, udp=False)
    broker_server.syscall_names(linux.machine())
# What every brokered run asks and no run changes, asked once here: whether this kernel can
# broker (its Landlock ABI among it), the last capability its program drops, and where
# redoxcap's packages are (each run's program may import them).
redoxcap.broker.available()
cap_last_cap()
project_package_locations()


class BadRequest(Exception):
    """The run request is not one this runner can take."""


def receive(sock: socket.socket) -> tuple[dict, list[int]]:
    """Read the run: its payload (see launch._payload) and the fds it names, in its order.

    Raises:
        BadRequest: nothing in time, or not a run request.
    """
    sock.settimeout(RECEIVE_DEADLINE)
    try:
        data, anc, flags, _ = sock.recvmsg(2, socket.CMSG_SPACE(MAX_FDS * 4),
                                           socket.MSG_CMSG_CLOEXEC)
    except OSError as exc:
        raise BadRequest(f"no run request: {exc}") from None
    fds = P.parse_ancillary(anc)[0]
    try:
        if data != b"R" or flags & (socket.MSG_CTRUNC | socket.MSG_TRUNC) or len(fds) < 2:
            raise BadRequest("malformed run request")
        run = _read_payload(fds[0])
        os.close(fds.pop(0))  # read: the payload is done with
        numbers = run.get("fds")
        if not isinstance(numbers, list) or len(numbers) != len(fds) - 1 or \
                not all(type(n) is int and 0 <= n < 1 << 20 for n in numbers) or \
                len(set(numbers)) != len(numbers):
            raise BadRequest("malformed run request: its fds")
        return run, fds
    except BaseException:
        for fd in fds:
            os.close(fd)
        raise


def _is_socket(fd: int) -> bool:
    try:
        return stat.S_ISSOCK(os.fstat(fd).st_mode)
    except OSError:
        return False


def wait_for_a_caller(fd: int) -> int | None:
    """A spare's wait: the caller's socket, as the supervisor passes it on fd (closed here);
    None at EOF."""
    with socket.socket(fileno=fd) as sock:
        try:
            _, anc, _, _ = sock.recvmsg(1, socket.CMSG_SPACE(4), socket.MSG_CMSG_CLOEXEC)
        except OSError:
            return None
    fds = P.parse_ancillary(anc)[0]
    for extra in fds[1:]:
        os.close(extra)
    return fds[0] if fds else None


def _read_payload(fd: int) -> dict:
    try:
        size = os.fstat(fd).st_size
        if size > MAX_PAYLOAD:
            raise BadRequest("run request too large")
        run = marshal.loads(os.pread(fd, size, 0))
    except (OSError, EOFError, ValueError, TypeError):
        raise BadRequest("malformed run request") from None
    command = run.get("command") if isinstance(run, dict) else None
    if not isinstance(run, dict) or not isinstance(run.get("state_dir"), str) or \
            not isinstance(command, list) or not all(isinstance(a, str) for a in command) or \
            not isinstance(run.get("options"), dict) or not isinstance(run.get("environ"), dict):
        raise BadRequest("malformed run request")
    return run


def take_on(run: dict, fds: list[int], *ours: socket.socket) -> list[socket.socket]:
    """Become the caller: its fds at their numbers (0-2 it had closed stay closed), its cwd,
    umask, resource limits and nice value (as far as ours allow) and environment. fds: cwd, then the fds
    run["fds"] numbers; all of them are closed or in place afterwards.

    Returns:
        ours, each moved out of the way of the caller's fds (the sockets given are detached).
    """
    cwd, passed, numbers = fds[0], fds[1:], run["fds"]
    # first everything of ours out of the way of the numbers the caller's fds take
    low = max([FIRST_OWN_FD, *numbers]) + 1
    cwd = _move(cwd, low)
    moved = [_move(fd, low) for fd in passed]
    kept = [_move(sock.detach(), low) for sock in ours]
    for number in (0, 1, 2):
        if number not in numbers:
            _close(number)  # closed there: closed for the program too
    for fd, number in zip(moved, numbers, strict=True):
        os.dup2(fd, number, inheritable=number <= 2)
        os.close(fd)
    try:
        os.fchdir(cwd)
    finally:
        os.close(cwd)
    if type(run.get("umask")) is int:
        os.umask(run["umask"] & 0o777)
    if type(run.get("nice")) is int:
        try:
            os.setpriority(os.PRIO_PROCESS, 0, run["nice"])
        except OSError:
            pass  # a priority above ours, which we may not give
    _limit(run.get("rlimits"))
    _take_environment(run["environ"])
    return [socket.socket(fileno=fd) for fd in kept]


def _take_environment(theirs: dict) -> None:
    """Make os.environ the caller's environment (its str names and values), setting and
    unsetting only the names that differ: ours is the system's, most often the caller's
    own, and clearing and refilling it cost a run a few tenths of a millisecond."""
    wanted = {k: v for k, v in theirs.items() if isinstance(k, str) and isinstance(v, str)}
    for name in [name for name in os.environ if name not in wanted]:
        del os.environ[name]
    for name, value in wanted.items():
        if os.environ.get(name) != value:
            os.environ[name] = value


def _move(fd: int, low: int) -> int:
    """fd at a number >= low (closed where it was): never at one the caller's fds take."""
    new = _dup_at_least(fd, low)
    os.close(fd)
    return new


def _dup_at_least(fd: int, low: int) -> int:
    import fcntl

    return fcntl.fcntl(fd, fcntl.F_DUPFD_CLOEXEC, low)


def _close(fd: int | None) -> None:
    if fd is None:
        return
    try:
        os.close(fd)
    except OSError:
        pass


def _limit(rlimits: object) -> None:
    """Take on the caller's resource limits, each lowered to what ours allow."""
    import resource

    if not isinstance(rlimits, dict):
        return
    for number, value in rlimits.items():
        if type(number) is not int or not (isinstance(value, tuple) and len(value) == 2):
            continue
        soft, hard = value
        try:
            our_hard = resource.getrlimit(number)[1]
            if our_hard != resource.RLIM_INFINITY and (hard == resource.RLIM_INFINITY or hard > our_hard):
                hard = our_hard
            if soft == resource.RLIM_INFINITY or (hard != resource.RLIM_INFINITY and soft > hard):
                soft = hard
            resource.setrlimit(number, (soft, hard))
        except (OSError, ValueError):
            pass


def serve(caller: int | None, spare: int | None, state_dir: str | None = None) -> int:
    """Do one run: for the caller at the other end of the socket caller, or, as a spare,
    for the one whose socket the supervisor passes on spare (a spare told state_dir, its
    system's, takes the run's first steps while it waits). This process's exit code.

    This process is the reaper: it forks the run at once (before a spare has a caller).
    A spare's run waits for the caller's socket itself, and hands us a copy with "T"
    once it has read the run (one hop less between the caller and its run); otherwise
    we hand the run the caller's socket ("C").
    """
    linux.prctl(linux.PRCTL_OPTIONS["PR_SET_CHILD_SUBREAPER"], 1)
    wake_r, wake_w = os.pipe2(os.O_NONBLOCK | os.O_CLOEXEC)
    signal.set_wakeup_fd(wake_w)
    signal.signal(signal.SIGCHLD, lambda *_: None)  # only to wake the poll below
    for signum in (signal.SIGINT, signal.SIGTERM, signal.SIGHUP):
        signal.signal(signum, signal.SIG_IGN)  # the caller's to send, through "S"
    ours, theirs = socket.socketpair(socket.AF_UNIX, socket.SOCK_SEQPACKET)
    pid = os.fork()
    if pid == 0:
        for fd in (wake_r, wake_w, ours.detach()):
            _close(fd)
        _run(theirs, spare, state_dir)
    theirs.close()
    sock = None
    if spare is not None:
        _close(spare)  # the run's to wait on
    elif caller is not None and _is_socket(caller):
        try:
            ours.sendmsg([b"C"], [(socket.SOL_SOCKET, socket.SCM_RIGHTS,
                                   caller.to_bytes(4, sys.byteorder))])
        except OSError:
            pass  # the run is gone: _watch reaps it
        sock = socket.socket(fileno=caller)
    else:  # the supervisor passes on sockets only; should anything else come: no run
        if caller is not None:
            _close(caller)
        ours.close()  # the run ends at our EOF
        os.waitpid(pid, 0)
        return 0
    scratch: list[str] = []
    code, sock, ended = _watch(sock, ours, pid, wake_r, scratch)
    if not ended:
        _end_the_rest()
        _remove_scratch(scratch)  # what a run killed (or crashed) could not remove itself
    if sock is not None:
        try:
            sock.send(b"X" + code.to_bytes(4, sys.byteorder, signed=True))
        except OSError:
            pass  # the caller is gone
        sock.close()
    if ended:  # the caller has its code: the run's own exit (its teardown) is no one's wait
        os.waitpid(pid, 0)
        _end_the_rest()
        _remove_scratch(scratch)
    return 0


def _run(reaper: socket.socket, spare: int | None, state_dir: str | None = None) -> None:
    """In the fork: wait for the caller's socket (on spare, from the supervisor, else from
    the reaper), take the run from it and do it as the caller's `run` would have (never
    returns). A spare told state_dir takes the run's first steps before it waits
    (:func:`_prepare`). Says "T" to the reaper once it has read the run (with a copy of the
    caller's socket when the supervisor gave it to us: the reaper reads it from then on),
    "B" if it could not, "D" with the path of each directory it makes for the program (for
    the reaper to remove should this process be killed first), "N" with its note of the
    program it started (for the reaper to send the supervisor), and "E" with the exit code
    as soon as the program has ended (the rest of the run's own end comes after)."""
    code = EXIT_FAILED
    prepared = caller_sock = None
    said: list[int] = []  # the exit code, once said to the reaper
    try:
        signal.set_wakeup_fd(-1)
        for signum in (signal.SIGCHLD, signal.SIGTERM, signal.SIGHUP):
            signal.signal(signum, signal.SIG_DFL)
        signal.signal(signal.SIGINT, signal.default_int_handler)
        linux.prctl(linux.PRCTL_OPTIONS["PR_SET_CHILD_SUBREAPER"], 0)
        if spare is not None:
            prepared = _prepare(state_dir, _telling(reaper))
            if not select.select([spare], [], [], 0)[0]:  # no caller yet: while it waits
                own_pages()
            caller = wait_for_a_caller(spare)
            if caller is not None and not _is_socket(caller):
                _close(caller)  # the supervisor passes on sockets only
                caller = None
        else:
            _, anc, _, _ = reaper.recvmsg(1, socket.CMSG_SPACE(4), socket.MSG_CMSG_CLOEXEC)
            passed = P.parse_ancillary(anc)[0]
            caller = passed[0] if passed else None
        if caller is None:
            os._exit(0)  # a spare nobody needed (what it prepared goes with it; its directory
            #              the reaper removes)
        sock = socket.socket(fileno=caller)
        try:
            run, fds = receive(sock)
        except BadRequest as exc:
            reaper.send(b"B")
            print(f"redoxcap runner: {exc}", file=sys.stderr)
            os._exit(EXIT_FAILED)
        # the run's message is read: the caller's socket is the reaper's to read now
        reaper.sendmsg([b"T"], [(socket.SOL_SOCKET, socket.SCM_RIGHTS,
                                 sock.fileno().to_bytes(4, sys.byteorder))] if spare is not None
                       else [])
        if prepared is not None and prepared[1] & set(run["fds"]):
            prepared[0].close()  # the caller's fds go where its capabilities are: not used
            prepared = None
        # the caller's socket stays ours too: the end is said on it from here when it can be
        caller_sock, reaper = take_on(run, fds, sock, reaper)

        def ended(code: int) -> None:  # the caller has its code while the run ends
            if _say_the_end(reaper, code, caller_sock):
                said.append(code)

        # the system that forked us is up: run need not ask
        code = entry.run_command(run["state_dir"], run["command"],
                                 {**run["options"], "system_up": True,
                                  "prepared": prepared[0] if prepared is not None else None,
                                  "on_scratch": _telling(reaper),
                                  "note": _noting(reaper, run["state_dir"]), "ended": ended})
    except SystemExit as exc:
        code = exc.code if isinstance(exc.code, int) else EXIT_FAILED
    except BaseException:  # noqa: BLE001 - as the command would: say what, exit 1
        import traceback

        traceback.print_exc()
    finally:
        if prepared is not None:
            prepared[0].close()  # not taken: the run failed before it started the program
        if not said:
            _say_the_end(reaper, code, caller_sock)
        else:
            _flush()
        os._exit(code)


def _say_the_end(reaper: socket.socket, code: int, caller: socket.socket | None = None) -> bool:
    """Tell the reaper the run's exit code ("E", for it to say to the caller at once), our
    messages flushed first, unless we have a child left: a process the program made ours
    (CLONE_PARENT) ends with us, and the reaper says the code once we have exited. Whether
    it was said. When nothing of the program is left either among the reaper's children
    (the orphans it reaps), it is said to the caller ("X") from here first, a hop sooner
    than through the reaper (whose own "X" then finds the caller gone, or unread)."""
    _flush()
    try:
        if _childless():
            end = code.to_bytes(4, sys.byteorder, signed=True)
            if caller is not None and _child_pids(str(os.getppid())) == [os.getpid()]:
                try:
                    caller.send(b"X" + end)
                except OSError:
                    pass  # the caller is gone: the reaper finds so too
            reaper.send(b"E" + end)
            return True
    except (OSError, OverflowError, AttributeError):
        pass  # the reaper learns it from our exit status instead
    return False


def _flush() -> None:
    for stream in (sys.stdout, sys.stderr):
        try:
            stream.flush()
        except (OSError, ValueError):
            pass


def _telling(reaper: socket.socket) -> Callable[[str], None]:
    """on_scratch for run.main: tell the reaper ("D") of each directory the run makes for
    its program, for it to remove should the run be killed before it does."""
    def tell(path: str) -> None:
        try:
            reaper.send(b"D" + os.fsencode(path))
        except OSError:
            pass  # the reaper is gone: so is our caller, and we with it

    return tell


def _noting(reaper: socket.socket, state_dir: str) -> Callable[[dict], None]:
    """note for run.main: the reaper sends the supervisor the run's note of its program
    ("N"), from a thread of its own, while the run serves the program."""
    def note(client: dict) -> None:
        try:
            reaper.send(b"N" + marshal.dumps((state_dir, client)))
        except OSError:
            pass  # the reaper is gone (and so is our caller): nobody to show it to

    return note


def _prepare(state_dir: str | None, on_scratch: Callable[[str], None]
             ) -> tuple[redoxcap.run.Prepared, set[int]] | None:
    """The first steps of the run to come, taken while a spare waits for its caller
    (redoxcap.run.Prepared: its namespace, made and forked, and its private directory, told
    to on_scratch), and the fds they hold; None where they could not be taken (the run takes
    them itself, and says why it could not)."""
    if state_dir is None:
        return None
    before = _open_fds()
    try:
        prepared = redoxcap.run.Prepared(Path(state_dir), on_scratch)
    except Exception as exc:  # noqa: BLE001 - the run does it all itself then
        print(f"redoxcap runner: a run's first steps could not be taken ahead: {exc}",
              file=sys.stderr)
        return None
    fds = _open_fds() - before
    if type(prepared.account) is int:  # for `status`: what the spare holds, and that it is ready
        try:
            control.request(Path(state_dir), "prepared", spare=os.getppid(),  # (the reaper)
                            account=prepared.account)
        except (control.ControlError, OSError):
            pass
    return prepared, fds


def _open_fds() -> set[int]:
    return {int(name) for name in os.listdir("/proc/self/fd")}


def _watch(sock: socket.socket | None, run: socket.socket, pid: int, wake: int,
           scratch: list[str]) -> tuple[int, socket.socket | None, bool]:
    """Reap orphans until the run ends and, once it has taken the run, pass the caller's
    signals on to it, noting in scratch the directories the run says it made ("D") and
    sending the supervisor its note ("N"); (its exit code, the caller's socket once the run
    has taken the run, whether that code came before the run's exit with nothing of the
    program left to end: "E" with none but the run among our children)."""
    poller = select.poll()
    poller.register(run.fileno(), select.POLLIN)
    poller.register(wake, select.POLLIN)
    run.setblocking(False)
    taken, caller, noted = False, True, False
    program: int | None = None  # a pidfd of the program, once the run has noted it
    left: float | None = None  # when the program exited, while the run has not ended
    while True:
        timeout = None if left is None else max(0, round((left - time.monotonic()) * 1000))
        events = poller.poll(timeout)
        if left is not None and time.monotonic() >= left:
            # the program has exited, and the run has not ended since: what the program left
            # behind may be what holds it up (the broker waits for a call of an orphan's to a
            # scheme of the orphan's own that never answers); it dies now, not at the run's end
            _end_the_rest(but=pid)
            _end_the_runs_confined(pid)
            left = time.monotonic() + LEFT_BEHIND_GRACE
        for fd, _ in events:
            if fd == program:
                poller.unregister(fd)
                os.close(fd)
                program, left = None, time.monotonic() + LEFT_BEHIND_GRACE
            elif fd == wake:
                _drain(wake)
            elif fd == run.fileno():
                said, passed = _receive_from_run(run)
                if said is None:
                    continue  # woken for nothing
                if said[:1] == b"T" and not taken:
                    taken = True
                    if sock is None and passed:
                        sock = socket.socket(fileno=passed.pop(0))
                    if sock is not None:
                        sock.setblocking(False)
                        poller.register(sock.fileno(), select.POLLIN)
                elif said[:1] == b"D" and len(scratch) < MAX_SCRATCH:
                    scratch.append(os.fsdecode(said[1:]))
                elif said[:1] == b"N" and not noted:
                    noted = True
                    program = _send_note(said[1:])
                    if program is not None:
                        poller.register(program, select.POLLIN)
                elif said[:1] == b"E" and len(said) == 5 and caller and _only_child(pid):
                    _close(program)
                    return int.from_bytes(said[1:], sys.byteorder, signed=True), \
                        (sock if taken else None), True
                elif not said:  # EOF: the run is gone, or going
                    poller.unregister(fd)
                for extra in passed:
                    _close(extra)
            else:
                data = _receive(sock)
                if data is None:
                    continue
                if not data:  # the caller is gone: so is the run
                    poller.unregister(fd)
                    caller = False
                    _send(pid, signal.SIGKILL)
                elif data[:1] == b"S" and len(data) == 2 and data[1] in (
                        signal.SIGINT, signal.SIGTERM, signal.SIGHUP):
                    _send(pid, data[1])
        code = _reap(pid)
        if code is not None:
            _close(program)
            return (code if caller else EXIT_FAILED), (sock if taken else None), False


def _receive_from_run(run: socket.socket) -> tuple[bytes | None, list[int]]:
    """A message of the run's and the fds it came with: (b"", []) at EOF, (None, []) for
    none yet."""
    try:
        data, anc, _, _ = run.recvmsg(MAX_MESSAGE, socket.CMSG_SPACE(4), socket.MSG_CMSG_CLOEXEC)
    except BlockingIOError:
        return None, []
    except OSError:
        return b"", []
    return data, P.parse_ancillary(anc)[0]


def _send_note(data: bytes) -> int | None:
    """Send the supervisor the run's note of its program (redoxcap.run.note_the_client), from
    a thread: the signals and the end of the run are not kept waiting for it. A pidfd of the
    program it names (None: none, or it has gone already)."""
    try:
        state_dir, client = marshal.loads(data)
    except (EOFError, ValueError, TypeError):
        return None
    if not (isinstance(state_dir, str) and isinstance(client, dict)):
        return None
    threading.Thread(target=redoxcap.run.note_the_client, args=(Path(state_dir), client),
                     daemon=True, name="redoxcap client note").start()
    if type(client.get("pid")) is not int or client["pid"] <= 0:
        return None
    try:
        # the run's child, not reaped before the run has seen it exit: the pid is its
        return os.pidfd_open(client["pid"])
    except OSError:
        return None


def _remove_scratch(scratch: list[str]) -> None:
    """Remove what is left of the directories the run made for its program (each one of
    tempfile's `redoxcap-*` directories, as run.run makes them)."""
    for path in scratch:
        if os.path.isabs(path) and os.path.basename(path).startswith("redoxcap-") and \
                os.path.isdir(path) and not os.path.islink(path):
            import shutil

            shutil.rmtree(path, ignore_errors=True)


def _child_pids(process: str = "self") -> list[int] | None:
    """Our children (or process's, a pid), from the kernel's list of each of its threads'
    (None where it keeps none: a kernel without CONFIG_PROC_CHILDREN)."""
    try:
        pids = []
        for tid in os.listdir(f"/proc/{process}/task"):
            with open(f"/proc/{process}/task/{tid}/children", "rb") as f:
                pids += map(int, f.read().split())
        return pids
    except (OSError, ValueError):
        return None


def _childless() -> bool:
    """Whether no thread of ours has a child left (False where the kernel does not say)."""
    return _child_pids() == []


def _only_child(pid: int) -> bool:
    """Whether pid (the run) is our one child: nothing of the program is left running
    (every process of it is ours or the run's, and the run has reaped the program and has
    no child left). False where the kernel does not list a task's children."""
    return _child_pids() == [pid]


def _drain(fd: int) -> None:
    """Empty the (non-blocking) pipe the signals wake us through."""
    try:
        while len(os.read(fd, 512)) == 512:
            pass
    except BlockingIOError:
        pass


def _receive(sock: socket.socket) -> bytes | None:
    """A message from a non-blocking socket: b"" at EOF (or a reset), None for none yet."""
    try:
        return sock.recv(16)
    except BlockingIOError:
        return None
    except OSError:
        return b""


def _send(pid: int, signum: int) -> None:
    try:
        os.kill(pid, signum)  # not reaped before _watch returns: the pid is still the run's
    except ProcessLookupError:
        pass


def _reap(pid: int) -> int | None:
    """Reap every child that has exited; the run's exit code once it is among them."""
    code = None
    while True:
        try:
            child, status = os.waitpid(-1, os.WNOHANG)
        except ChildProcessError:
            return code
        if child == 0:
            return code
        if child == pid:
            code = os.waitstatus_to_exitcode(status)
            code = 128 - code if code < 0 else code


def _end_the_rest(but: int | None = None) -> None:
    """Kill and reap what the program left running (our children now, as orphans), all but
    the child but (the run, which goes on)."""
    while True:
        try:
            os.waitid(os.P_ALL, 0, os.WEXITED | os.WNOHANG | os.WNOWAIT)
        except ChildProcessError:
            return  # none at all, the common case: no look through /proc
        children = [child for child in _children() if child != but]
        if not children:
            return
        for child in children:  # not reaped: the pids are still theirs
            try:
                os.kill(child, signal.SIGKILL)
            except ProcessLookupError:
                pass
        for child in children:  # their own children are ours now: the next round's
            try:
                os.waitpid(child, 0)
            except ChildProcessError:
                pass


def _end_the_runs_confined(run: int) -> None:
    """SIGKILL the children of the run's that are the program's (a process it made the run's
    child, with CLONE_PARENT): each one under a seccomp filter (the run itself is under
    none, and so are the processes it starts itself); the run reaps them."""
    for child in _child_pids(str(run)) or []:
        try:
            pidfd = os.pidfd_open(child)
        except OSError:
            continue  # gone
        try:
            # the pidfd is this process's whatever the run reaps: checked after it is held
            with open(f"/proc/{child}/status", "rb") as f:
                status = dict(line.split(b":", 1) for line in f.read().splitlines() if b":" in line)
            if int(status.get(b"PPid", b"0")) == run and status.get(b"Seccomp", b"").strip() == b"2":
                signal.pidfd_send_signal(pidfd, signal.SIGKILL)
        except (OSError, ValueError):
            pass
        finally:
            os.close(pidfd)


def _children() -> list[int]:
    """Our children, from /proc (this kernel may not have /proc/self/task/*/children)."""
    me, found = os.getpid(), []
    for name in os.listdir("/proc"):
        if not name.isdigit():
            continue
        try:
            with open(f"/proc/{name}/stat", "rb") as f:
                fields = f.read().rpartition(b")")[2].split()
        except OSError:
            continue
        if len(fields) > 1 and int(fields[1]) == me:
            found.append(int(name))
    return found


def main(argv: list[str] | None = None) -> int:
    """`python -E -P -m redoxcap.runner --socket-fd N | --spare-fd N [--state-dir S]` (forked by
    the fork server)."""
    import argparse

    parser = argparse.ArgumentParser(prog="python -m redoxcap.runner", description=__doc__)
    given = parser.add_mutually_exclusive_group(required=True)
    given.add_argument("--socket-fd", type=int,
                       help="the socket pair end the caller of `redoxcap run` holds the other of")
    given.add_argument("--spare-fd", type=int,
                       help="a spare: wait for that socket on this one (the supervisor's)")
    parser.add_argument("--state-dir",
                        help="a spare's system: take the run's first steps while waiting")
    args = parser.parse_args(argv)
    for fd in (args.socket_fd, args.spare_fd):
        if fd is not None and not _is_socket(fd):
            print(f"redoxcap runner: fd {fd} is no socket", file=sys.stderr)
            return EXIT_FAILED
    return serve(args.socket_fd, args.spare_fd, args.state_dir)


if __name__ == "__main__":
    sys.exit(main())
