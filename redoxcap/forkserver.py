"""The supervisor's fork server: the system's Python daemons start as forks of one warm interpreter.

A boot starts a dozen daemons (the router, nsmgr, each scheme), and each
used to be an interpreter of its own that imported trio and the system's
modules before doing anything: about a tenth of a second of CPU each, most
of a boot on two cores. The fork server (`python -E -P -m
redoxcap.forkserver --for SUPERVISOR MODULE...`) imports what those
modules' mains import, once, and then forks a daemon per request in a few
milliseconds; the daemon runs its module as `python -m MODULE ARGS` would
(runpy, `__main__`), with sys.argv set, and its name (`comm`, what `ps` and
`top` show) set to the module's last part.

Each daemon is made the supervisor's own child: the fork server forks a
child that forks the daemon and exits, and the supervisor, a child
subreaper (PR_SET_CHILD_SUBREAPER), adopts the orphan; so the supervisor
waits for it, reaps it and signals it through a pidfd as it would a
process it had started itself (:class:`ForkedProcess`).

The protocol, on a SOCK_SEQPACKET socket pair (the supervisor owns the
server and is its only peer): a request is a msgpack list `[module, args,
where]` with the fds the daemon inherits attached (SCM_RIGHTS), and
`args[where[i]]` becomes the number the i-th of them has in the daemon.
The answer is `{"pid": N}` (the daemon, once it has been adopted) or
`{"errno": E}`. The server exits when the socket reaches EOF, and dies with
the supervisor.

A spare (`[module, [""], [0], true]`, the one fd a socket) is forked before
anyone needs it: it waits on that socket for its arguments, sent as a
request is (`[args, where]` with the fds; :func:`assign`), and only then runs
its module; at EOF it exits. What a fork costs (the double fork of a 30 MB
interpreter, the copy-on-write faults of its first steps) is then off the
way of whoever asks for the daemon.
"""

from __future__ import annotations

import ast
import errno
import importlib.util
import os
import signal
import socket
import sys
from collections.abc import Sequence
from typing import TYPE_CHECKING

from redoxcap import PYTHON
from redoxcap.wire import linux
from redoxcap.wire import protocol as P

if TYPE_CHECKING:
    import trio

MAX_FDS = 8  # fds one daemon inherits through a request (its channel, a kernel capability)
IDLE = 0.05  # seconds without a request before a module asked for `--later` is loaded


# -- the supervisor's side -------------------------------------------------------


def _request(args: Sequence[str | int]) -> tuple[list[int], list]:
    """The fds among args and `[args, where]` as a request carries them."""
    return [a for a in args if isinstance(a, int)], \
        [[a if isinstance(a, str) else "" for a in args],
         [i for i, a in enumerate(args) if isinstance(a, int)]]


def assign(sock: socket.socket, args: Sequence[str | int]) -> None:
    """Send a spare (the other end of sock, which stays the caller's) the args it is to run
    its module with (an int: an fd it inherits, which stays the caller's).

    Raises:
        OSError: it is gone (EPIPE, ECONNRESET...).
    """
    fds, request = _request(args)
    sock.sendmsg([P.pack(request)], P.fds_ancillary(fds))


class ForkServer:
    """The fork server a supervisor started (owned: :meth:`aclose` ends it).

    The supervisor must be a child subreaper before it asks for a daemon
    (:func:`adopt_orphans`).
    """

    def __init__(self, modules: Sequence[str], later: Sequence[str] = ()) -> None:
        """Start `python -E -P -m redoxcap.forkserver` preloading what modules' mains import
        (later: once the boot's requests are served).

        Raises:
            OSError: it could not be started.
        """
        import subprocess

        ours, theirs = socket.socketpair(socket.AF_UNIX, socket.SOCK_SEQPACKET)
        try:
            self.process = subprocess.Popen(
                [*PYTHON, "-m", "redoxcap.forkserver", "--for", str(os.getpid()),
                 "--socket-fd", str(theirs.fileno()),
                 *(f"--later={m}" for m in later), *modules],
                pass_fds=[theirs.fileno()], stdin=subprocess.DEVNULL)
        except BaseException:
            ours.close()
            raise
        finally:
            theirs.close()
        self._sock = ours
        self._pidfd: int | None = os.pidfd_open(self.process.pid)  # our unreaped child's
        self._lock: trio.Lock | None = None

    async def spawn(self, module: str, args: Sequence[str | int], spare: bool = False
                    ) -> ForkedProcess:
        """Start `python -m module *args` as a fork; an int in args is an fd it inherits (which
        stays the caller's), named there by the number it has in the daemon. A spare's args
        are one socket fd, on which it waits for its own (:func:`assign`).

        Raises:
            OSError: the server could not fork it (or is gone: EPIPE, ECONNRESET).
        """
        import trio

        if self._lock is None:
            self._lock = trio.Lock()
        fds, request = _request(args)
        request.insert(0, module)
        if spare:
            request.append(True)
        sock = trio.socket.from_stdlib_socket(self._sock.dup())
        with sock:
            async with self._lock:  # one request at a time: answers come in order
                await sock.sendmsg([P.pack(request)], P.fds_ancillary(fds))
                data = await sock.recv(256)
        reply = P.unpack(data) if data else None
        if not isinstance(reply, dict):
            raise OSError(errno.ECONNRESET, "the fork server is gone")
        if "errno" in reply:
            raise OSError(reply["errno"], f"the fork server could not start {module}")
        return ForkedProcess(reply["pid"])

    def close(self) -> None:
        """End the server now, from code that is not async (a supervisor that never booted)."""
        if self._pidfd is None:
            return
        self._sock.close()
        self.process.kill()
        self.process.wait()
        os.close(self._pidfd)
        self._pidfd = None

    async def aclose(self, grace: float) -> None:
        """End the server (EOF on its socket) and reap it; killed if it has not gone in grace s."""
        import trio

        self._sock.close()
        with trio.move_on_after(grace):
            await trio.lowlevel.wait_readable(self._pidfd)
        if self.process.poll() is None:
            self.process.kill()
            await trio.lowlevel.wait_readable(self._pidfd)
        self.process.wait()  # it has exited: the pidfd was readable
        os.close(self._pidfd)
        self._pidfd = None


def adopt_orphans() -> None:
    """Make this process a child subreaper: orphans among its descendants become its children."""
    linux.prctl(linux.PRCTL_OPTIONS["PR_SET_CHILD_SUBREAPER"], 1)


class ForkedProcess:
    """A daemon the fork server started, now a child of ours: trio.Process's part the
    supervisor uses (pid, returncode, wait, terminate, kill), through a pidfd."""

    def __init__(self, pid: int) -> None:
        self.pid = pid
        self.returncode: int | None = None
        # ours to reap (adopted before the fork server answered), so the pid cannot be reused
        self._pidfd: int | None = os.pidfd_open(pid)
        self._waiting: trio.Lock | None = None

    async def wait(self) -> int:
        """Wait until it exits (several tasks may); its exit status (-N: killed by signal N)."""
        import trio

        if self._waiting is None:
            self._waiting = trio.Lock()
        async with self._waiting:
            if self.returncode is None:
                assert self._pidfd is not None
                await trio.lowlevel.wait_readable(self._pidfd)
                # readable: it has exited, so this does not block
                _, status = os.waitpid(self.pid, os.WNOHANG)  # noqa: ASYNC222
                self.returncode = os.waitstatus_to_exitcode(status)
                os.close(self._pidfd)
                self._pidfd = None
        return self.returncode

    def send_signal(self, signum: int) -> None:
        """Signal it unless it has been reaped."""
        if self._pidfd is not None:
            try:
                signal.pidfd_send_signal(self._pidfd, signum)
            except ProcessLookupError:
                pass  # exited, not yet reaped

    def terminate(self) -> None:
        """SIGTERM."""
        self.send_signal(signal.SIGTERM)

    def kill(self) -> None:
        """SIGKILL."""
        self.send_signal(signal.SIGKILL)


# -- the server ------------------------------------------------------------------


def preload(module: str) -> None:
    """Import what `python -m module` imports before it runs: a package's __main__'s imports,
    or a plain module itself (its main is under `if __name__ == "__main__"`)."""
    spec = importlib.util.find_spec(module)
    if spec is None:
        return
    if spec.submodule_search_locations is None:
        __import__(module)
        return
    main = importlib.util.find_spec(f"{module}.__main__")
    if main is None or main.origin is None:
        return
    with open(main.origin, encoding="utf-8") as f:
        tree = ast.parse(f.read())
    for node in tree.body:
        if isinstance(node, ast.Import):
            for alias in node.names:
                __import__(alias.name)
        elif isinstance(node, ast.ImportFrom) and node.module and not node.level:
            __import__(node.module)


def serve(sock: socket.socket, later: Sequence[str] = ()) -> None:
    """Fork a daemon per request until the supervisor closes the socket; preload the later
    modules one by one whenever no request has come for IDLE seconds."""
    import select

    later = list(later)
    while True:
        if later and not select.select([sock], [], [], IDLE)[0]:
            preload(later.pop(0))
            continue
        try:
            data, anc, flags, _ = sock.recvmsg(1 << 16, P.CMSG_FDS, socket.MSG_CMSG_CLOEXEC)
        except OSError:
            return
        fds = P.parse_ancillary(anc)[0]
        if not data:
            P.close_fds(fds)
            return
        try:
            request = P.unpack(data)
            if flags & P.TRUNCATED or len(fds) > MAX_FDS:
                raise ValueError("truncated")
            module, args, where, *spare = request
            if not isinstance(module, str) or spare not in ([], [True]) or \
                    not _well_formed(args, where, fds) or (spare and len(fds) != 1):
                raise ValueError("malformed")
            reply = {"pid": _fork_daemon(module, args, dict(zip(where, fds)), sock, bool(spare))}
        except (ValueError, TypeError, P.ProtocolError):
            reply = {"errno": errno.EINVAL}
        except OSError as exc:
            reply = {"errno": exc.errno or errno.EIO}
        finally:
            P.close_fds(fds)
        sock.send(P.pack(reply))


def _well_formed(args: object, where: object, fds: list[int]) -> bool:
    return isinstance(args, list) and all(isinstance(a, str) for a in args) and \
        isinstance(where, list) and all(type(i) is int and 0 <= i < len(args) for i in where) \
        and sorted(where) == where and len(where) == len(fds)


def _fork_daemon(module: str, args: list[str], fds: dict[int, int], sock: socket.socket,
                 spare: bool = False) -> int:
    """Fork a child that forks the daemon, tells us its pid and exits; return the pid once
    the child has exited (the daemon is the supervisor's then)."""
    report_r, report_w = os.pipe()
    try:
        child = os.fork()
    except BaseException:
        os.close(report_r)
        os.close(report_w)
        raise
    if child == 0:
        try:
            os.close(report_r)
            daemon = os.fork()
            if daemon == 0:
                os.close(report_w)
                _become(module, args, fds, sock, spare)
            os.write(report_w, str(daemon).encode())
        finally:
            os._exit(0)
    os.close(report_w)
    try:
        pid_text = b""
        while chunk := os.read(report_r, 32):
            pid_text += chunk
    finally:
        os.close(report_r)
        os.waitpid(child, 0)  # from here on the daemon is an orphan, adopted by the supervisor
    if not pid_text:
        raise OSError(errno.EAGAIN, "could not fork")
    return int(pid_text)


def _become(module: str, args: list[str], fds: dict[int, int], sock: socket.socket,
            spare: bool = False) -> None:
    """In the daemon: run module as `python -m module args` would, then exit (never returns);
    a spare first waits for its args on the socket fds[0] (:func:`_assigned`).

    fds: argument index -> the fd it names (by its number here).
    """
    code = 1
    try:
        sock.close()
        if spare:
            _title_for_ps(module, ["(a spare)"])
            args, fds = _assigned(fds[0])
        for fd in fds.values():
            os.set_inheritable(fd, True)  # as an fd `python -m` was given would be
        argv = [str(fds[i]) if i in fds else arg for i, arg in enumerate(args)]
        signal.signal(signal.SIGINT, signal.default_int_handler)  # as in a fresh interpreter
        _title_for_ps(module, argv)
        import runpy

        sys.argv = [module, *argv]
        sys.modules.pop(module, None)  # preloaded: runpy would warn that it runs it again
        runpy.run_module(module, run_name="__main__", alter_sys=True)
        code = 0
    except SystemExit as exc:
        code = exc.code if isinstance(exc.code, int) else (0 if exc.code is None else 1)
        if exc.code is not None and not isinstance(exc.code, int):
            print(exc.code, file=sys.stderr)
    except KeyboardInterrupt:
        signal.signal(signal.SIGINT, signal.SIG_DFL)
        _flush()
        os.kill(os.getpid(), signal.SIGINT)
    except BaseException:  # noqa: BLE001 - as the interpreter would: say what, exit 1
        import traceback

        traceback.print_exc()
    _flush()
    os._exit(code)


def _assigned(fd: int) -> tuple[list[str], dict[int, int]]:
    """A spare's wait: the args and fds it runs its module with, sent on socket fd (closed
    here) as :func:`assign` sends them; it exits at EOF (let go unused). Meanwhile it copies
    the pages of its objects it shares with the server (listing every object the collector
    tracks writes its refcount), so that its first steps take no copy-on-write fault."""
    import gc

    gc.get_objects()
    with socket.socket(fileno=fd) as sock:
        data, anc, flags, _ = sock.recvmsg(1 << 16, P.CMSG_FDS, socket.MSG_CMSG_CLOEXEC)
    fds = P.parse_ancillary(anc)[0]
    request = None
    try:
        request = P.unpack(data) if data and not flags & P.TRUNCATED else None
    except P.ProtocolError:
        pass
    if not isinstance(request, list) or len(request) != 2 or \
            not _well_formed(request[0], request[1], fds) or len(fds) > MAX_FDS:
        P.close_fds(fds)
        os._exit(0 if not data else 1)  # let go unused, or a malformed assignment
    args, where = request
    return args, dict(zip(where, fds))


def _title_for_ps(module: str, args: list[str]) -> None:
    """Show this fork in ps and top as what it runs: its name (`comm`) is module's last part,
    and its command line `python -m MODULE ARGS`, cut to the room the fork server's own
    command line leaves (the bytes between /proc/self/stat's arg_start and arg_end, this
    process's own memory, rewritten in place as setproctitle does)."""
    import ctypes

    name = ctypes.create_string_buffer(module.rpartition(".")[2].encode()[:15])
    try:
        linux.prctl(linux.PRCTL_OPTIONS["PR_SET_NAME"], ctypes.addressof(name))
        with open("/proc/self/stat", "rb") as f:
            fields = f.read().rpartition(b")")[2].split()  # from field 3 (state) on
        start, end = int(fields[48 - 3]), int(fields[49 - 3])  # arg_start, arg_end
    except (OSError, ValueError, IndexError):
        return  # a name for ps only
    title = " ".join([os.path.basename(sys.executable), "-m", module, *args]).encode()
    room = end - start
    if room > 1:
        title = title[: room - 1]
        ctypes.memmove(start, title + bytes(room - len(title)), room)


def _flush() -> None:
    import logging

    logging.shutdown()
    for stream in (sys.stdout, sys.stderr):
        try:
            stream.flush()
        except (OSError, ValueError):
            pass


def main(argv: Sequence[str] | None = None) -> int:
    """`python -E -P -m redoxcap.forkserver --for PID --socket-fd N MODULE...`."""
    import argparse

    from redoxcap.sandbox.process import die_with_parent
    from redoxcap.wire.limits import forbid_core_dumps

    parser = argparse.ArgumentParser(prog="python -m redoxcap.forkserver", description=__doc__)
    parser.add_argument("--for", dest="parent", type=int, required=True,
                        help="the supervisor's pid: the server dies with it")
    parser.add_argument("--socket-fd", type=int, required=True, help="the socket to serve")
    parser.add_argument("--later", action="append", default=[], metavar="MODULE",
                        help="a module to load once the requests of a boot are served "
                             "(repeatable)")
    parser.add_argument("modules", nargs="*", help="modules whose mains' imports to load now")
    args = parser.parse_args(argv)
    forbid_core_dumps()  # it forks every daemon: nothing of theirs, but undumpable like them
    die_with_parent(args.parent)
    # Ctrl-C at a foreground `up` is the supervisor's to handle; EOF on the socket ends us
    signal.signal(signal.SIGINT, signal.SIG_IGN)
    sock = socket.socket(fileno=args.socket_fd)
    for module in args.modules:
        preload(module)
    serve(sock, args.later)
    return 0


if __name__ == "__main__":
    sys.exit(main())
