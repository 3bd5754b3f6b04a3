"""The target's side: confine, install the broker's filter, hand over its listener, exec.

Runs in the child `run_brokered` forks, before anything of the program
runs, or in a fork made ahead for it (:class:`Starter`). Landlock
(redoxcap.sandbox) grants read and execute on the host trees only: every
path call is the broker's anyway, and the one the kernel still
runs itself (execve, whose path the broker checked but cannot pass by
copy) can then reach nothing but the host trees, whatever a racing thread
writes into its argument. The filter goes last, so that nothing between it
and exec makes a call the broker would have to answer before it holds the
listener.
"""

from __future__ import annotations

import array
import errno
import fcntl
import gc
import marshal
import os
import resource
import signal
import socket
import sys
import tempfile
from collections.abc import Sequence
from typing import NoReturn

from redoxcap.broker import filter as bpf
from redoxcap.launch import is_open
from redoxcap.wire import linux
from redoxcap.wire import protocol as P

EXIT_CANNOT_RUN = 126
EXIT_NOT_FOUND = 127


def _die(message: str, code: int = EXIT_CANNOT_RUN) -> NoReturn:
    os.write(2, f"redoxcap: {message}\n".encode(errors="replace"))
    os._exit(code)


def exec_target(argv: Sequence[str], env: dict[str, str], channel: socket.socket, parent: int,
                kernel_cwd: str | None, read_paths: Sequence[str] | None, keep_fds: Sequence[int],
                udp: bool = False) -> NoReturn:
    """Become the brokered program (never returns; exits 126 or 127 when it cannot).

    Args:
        argv: the program and its arguments (argv[0] is looked up on env's PATH).
        env: its environment.
        channel: the socket the listener fd is sent on (the broker holds the other end).
        parent: the broker's pid: the program is killed when it dies.
        kernel_cwd: an empty directory to stand in the kernel's cwd (no lookup the broker
            did not make is ever relative to anything; a removed one, or a handed directory
            the program runs in); None: the cwd this process has (a Starter's, removed).
        read_paths: what Landlock lets the kernel open on the program's behalf (the host
            trees); None: they come on channel before it confines itself (a Starter's run
            finds them while its child takes the run on: give_read_paths).
        keep_fds: fds the program inherits besides 0-2 (its capabilities for rt, and what
            `run --pass-fd` names); every other fd this process has is closed.
        udp: the run grants udp: UDP sockets may be made, and sends that can name a
            destination go to the broker (filter.py).
    """
    from redoxcap.sandbox import ConfinementUnavailable, close_fds_except, confine, die_with_parent

    machine = linux.machine()
    try:
        # Python ignores SIGPIPE and SIGXFSZ, and exec keeps what is ignored: give them back,
        # as subprocess does, so that `yes | head` ends as on a host
        for signum in (signal.SIGPIPE, signal.SIGXFSZ):
            signal.signal(signum, signal.SIG_DFL)
        os.setsid()  # a session of its own: no TIOCSTI into the caller's terminal
        die_with_parent(parent)
        if kernel_cwd is not None:
            os.chdir(kernel_cwd)
        close_fds_except({0, 1, 2, channel.fileno(), *keep_fds})
        for fd in keep_fds:
            os.set_inheritable(fd, True)
        if read_paths is None:
            read_paths = _receive_read_paths(channel)
        # the broker's filter below is the whole allow-list: no second one here
        confined = confine(read_paths, (), deny_network=True, install_filter=False)
    except ConfinementUnavailable as exc:
        _die(f"brokered programs need Landlock: {exc.strerror}")
    except OSError as exc:
        _die(f"cannot confine the program: {exc}")
    if machine is None:
        _die("seccomp user notification: unsupported architecture")
    try:
        listener = bpf.install(machine, signals_scoped=confined.scoped, udp=udp)
    except OSError as exc:
        _die(f"seccomp user notification is not available here: {exc.strerror}")
    try:
        # its number, not the fd (SCM_RIGHTS: a sendmsg may be the broker's to answer now,
        # udp): the broker takes the listener from this process (pidfd_getfd). run is
        # undumpable, and so is this fork of it until exec; pidfd_getfd needs it dumpable
        # (without CAP_SYS_PTRACE), as the program will be: only its exec follows
        linux.prctl(linux.PR_SET_DUMPABLE, 1)
        os.write(channel.fileno(), b"L" + listener.to_bytes(4, "little"))
    except OSError as exc:
        _die(f"cannot hand the listener to the broker: {exc.strerror}")
    # no answer is waited for: the exec is a call the broker answers, once it holds the
    # listener, which stays here until the exec (close-on-exec), as does the channel (the
    # broker kills this process if it cannot take it)
    sys.stdout.flush()
    sys.stderr.flush()
    try:
        os.execvpe(argv[0], list(argv), env)
    except OSError as exc:
        if exc.errno == errno.ENOENT:
            _die(f"{argv[0]}: command not found", EXIT_NOT_FOUND)
        _die(f"{argv[0]}: {exc.strerror}", EXIT_CANNOT_RUN)


# Bytes of a Starter's request (argv, environment), and of the read paths that follow it:
# one SOCK_SEQPACKET message each; a run whose request or paths are bigger forks its program
# as it would without a Starter.
MAX_START_REQUEST = 128 << 10
MAX_START_FDS = 253  # SCM_RIGHTS' limit: 0-2, the program's namespace and cwd, --pass-fd
_RLIMITS = sorted({getattr(resource, n) for n in dir(resource) if n.startswith("RLIMIT_")})


class Starter:
    """A fork of the run, made before its program is known, that waits to become it.

    A spare runner makes one while it waits for its caller (redoxcap.run.Prepared), so
    that the fork of a big interpreter is not on the program's way: at once the child keeps
    nothing but 0-2 and its socket, dies with its parent, and makes its cwd a removed
    directory (the program's kernel cwd, unless it runs in a handed one). `start` sends it
    exec_target's arguments and the fds the program gets, each to go to the number it has
    in the run, with the umask, nice value and resource limits the run has taken on from
    its caller since (what a fork made then would have inherited); `close` lets an unused
    one go (it exits at EOF) and reaps it.
    """

    def __init__(self) -> None:
        ours, theirs = socket.socketpair(socket.AF_UNIX, socket.SOCK_SEQPACKET | socket.SOCK_CLOEXEC)
        parent = os.getpid()
        pid = os.fork()
        if pid == 0:  # the child: never returns
            ours.close()
            _wait_to_start(theirs, parent)
        theirs.close()
        self.pid: int | None = pid
        self._sock: socket.socket | None = ours

    def start(self, argv: Sequence[str], env: dict[str, str], kernel_cwd: str | None,
              keep_fds: Sequence[int], udp: bool) -> tuple[int, socket.socket]:
        """Have the child exec_target(argv, ...), keep_fds and this process's 0-2 at their
        numbers; (its pid, the socket its listener comes on: the caller's, which sends it
        the read paths with give_read_paths next). Used up either way.

        Raises:
            OSError: the request could not be sent (the child is gone, or the request is too
                big): the child is let go, and the caller forks its program itself.
        """
        assert self._sock is not None and self.pid is not None
        numbers = [n for n in (0, 1, 2) if is_open(n)] + list(keep_fds)
        umask = os.umask(0)
        os.umask(umask)
        attributes = (umask, os.getpriority(os.PRIO_PROCESS, 0),
                      [(n, *resource.getrlimit(n)) for n in _RLIMITS])
        request = marshal.dumps((list(argv), env, kernel_cwd, numbers, udp, attributes))
        try:
            if len(request) > MAX_START_REQUEST or len(numbers) > MAX_START_FDS:
                raise OSError(errno.E2BIG, "too big a request for the starter")
            self._sock.sendmsg([request], [(socket.SOL_SOCKET, socket.SCM_RIGHTS,
                                            array.array("i", numbers).tobytes())])
        except OSError:
            self.close()
            raise
        sock, self._sock = self._sock, None
        return self.pid, sock

    def close(self) -> None:
        """Let an unused child go and reap it (nothing once started)."""
        if self._sock is not None:
            self._sock.close()
            self._sock = None
            os.waitpid(self.pid, 0)


def _wait_to_start(sock: socket.socket, parent: int) -> NoReturn:
    """In a Starter's child: wait for the request, take it on and become the program."""
    from redoxcap.sandbox import close_fds_except, die_with_parent

    try:
        die_with_parent(parent)
        linux.prctl(linux.PR_SET_DUMPABLE, 0)  # as the run is (exec_target's to undo)
        close_fds_except({0, 1, 2, sock.fileno()})
        # the program's kernel cwd where none is given: a removed directory, where no lookup
        # works (made now, not on the program's way)
        empty = tempfile.mkdtemp(prefix="redoxcap-empty-")
        os.chdir(empty)
        os.rmdir(empty)
        own_pages()
        data, anc, flags, _ = sock.recvmsg(MAX_START_REQUEST + 1,
                                           socket.CMSG_SPACE(4 * MAX_START_FDS))
        if not data:
            os._exit(0)  # let go unused
        fds = P.parse_ancillary(anc)[0]
        if flags & (socket.MSG_TRUNC | socket.MSG_CTRUNC):
            raise OSError(errno.EMSGSIZE, "a request cut short")
        argv, env, kernel_cwd, numbers, udp, (umask, nice, rlimits) = marshal.loads(data)
        if len(fds) != len(numbers):
            raise OSError(errno.EBADF, "fds and numbers differ")
        # everything received out of the way of the numbers the fds go to, then each to its
        low = max([2, *numbers]) + 1
        sock = socket.socket(fileno=_moved(sock.detach(), low))
        fds = [_moved(fd, low) for fd in fds]
        for number in (0, 1, 2):
            if number not in numbers:
                os.close(number)  # closed in the run: closed for the program too
        for fd, number in zip(fds, numbers, strict=True):
            os.dup2(fd, number, inheritable=number <= 2)
            os.close(fd)
        os.umask(umask)
        for number, soft, hard in rlimits:
            resource.setrlimit(number, (soft, hard))
        try:
            os.setpriority(os.PRIO_PROCESS, 0, nice)
        except OSError:
            pass  # a priority above the spare's, which the run could not take on either
    except BaseException as exc:  # noqa: BLE001 - no program: say why, as exec_target does
        _die(f"cannot start the program: {exc}")
    exec_target(argv, env, sock, parent, kernel_cwd, None, [n for n in numbers if n > 2], udp=udp)


def own_pages() -> None:
    """Copy this fork's pages of Python objects now, while it waits for a run: a fork shares
    its parent's memory until it writes it, and every object a run's first steps touch
    (a refcount is a write) cost a copy-on-write fault then, some 450 of them in a spare's
    run and 170 in its Starter's child (1.5 ms of the run's way here). Listing every object
    the collector tracks writes each one's refcount: 4 ms and about 8 MB of each process,
    taken while nothing waits for it."""
    gc.get_objects()


def give_read_paths(sock: socket.socket, read_paths: Sequence[str]) -> None:
    """Send a started Starter's child (on the socket start returned) the paths Landlock
    lets it read, which it waits for before it confines itself.

    Raises:
        OSError: E2BIG, nothing sent: too many for one message (let the child go: it
            exits at EOF); any other: the child is gone.
    """
    data = marshal.dumps([os.fspath(p) for p in read_paths])
    if len(data) > MAX_START_REQUEST:
        raise OSError(errno.E2BIG, "too many read paths for the starter")
    sock.send(data)


def _receive_read_paths(channel: socket.socket) -> list[str]:
    """In a Starter's child: the read paths its run sends once it has them (give_read_paths);
    at EOF (the run forks its program instead, or failed) it exits, saying nothing."""
    data = channel.recv(MAX_START_REQUEST + 1)
    if not data:
        os._exit(EXIT_CANNOT_RUN)
    paths = marshal.loads(data)
    if not isinstance(paths, list) or not all(isinstance(p, str) for p in paths):
        raise OSError(errno.EINVAL, "malformed read paths")
    return paths


def _moved(fd: int, low: int) -> int:
    new = fcntl.fcntl(fd, fcntl.F_DUPFD_CLOEXEC, low)
    os.close(fd)
    return new

