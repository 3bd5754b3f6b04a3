"""The launcher: confine this process (:func:`confine`), leave the terminal, exec COMMAND.

`redoxcap run --no-broker` starts a confined client with :func:`spawn_confined`:
a fork of `run` itself that confines itself and execs COMMAND (no second
interpreter). ``python -E -P -m redoxcap.sandbox [--read PATH]... [--write
PATH]... [--no-network-deny] [--require] -- COMMAND ARGS...`` does the same
steps in a process of its own, for whoever needs a launcher to exec. See
:mod:`redoxcap.sandbox` for what is confined.
"""

from __future__ import annotations

import errno
import os
import platform
import signal
import sys
from collections.abc import Callable, Iterable, Mapping, Sequence
from dataclasses import dataclass

from redoxcap.exits import EXIT_CANNOT_RUN, EXIT_NOT_FOUND, EXIT_USAGE
from redoxcap.sandbox import landlock, policy, process, seccomp
from redoxcap.wire import linux


class ConfinementUnavailable(OSError):
    """Landlock is not available (old kernel, disabled LSM or unsupported arch)."""


@dataclass(frozen=True)
class ConfineResult:
    """What :func:`confine` applied.

    Attributes:
        abi: Landlock ABI version of the running kernel.
        filesystem: Landlock filesystem rules are enforced.
        network: Landlock denies TCP bind and connect (ABI >= 4).
        scoped: abstract Unix sockets and signals are scoped (ABI >= 6).
        seccomp: the ``confined`` seccomp filter (the allow-list of
            redoxcap/sandbox/syscalls.py) is installed.
    """

    abi: int
    filesystem: bool
    network: bool
    scoped: bool
    seccomp: bool


def confine(
    read_paths: Iterable[str],
    write_paths: Iterable[str] = (),
    *,
    deny_network: bool = True,
    install_filter: bool = True,
) -> ConfineResult:
    """Confine the calling thread (and what it execs) with Landlock and seccomp.

    Landlock, the seccomp filter and the capability sets apply to the calling
    thread only: call this in a single-threaded process right before ``exec``.
    The confinement cannot be undone. It does not change the session: the
    launcher (:func:`main`) does that.

    Args:
        read_paths: files and directories granted read and execute (and listing
            for directories). Paths that do not exist are skipped.
        write_paths: files and directories granted read and write, including
            creating, removing and renaming entries beneath them, but not
            execute. Paths that do not exist are skipped.
        deny_network: deny TCP bind/connect with Landlock (ABI >= 4) and make
            ``socket(2)`` fail with EACCES for every family except AF_UNIX
            (stream and seqpacket). The rest of the allow-list applies either way.
        install_filter: install the ``confined`` seccomp filter; the broker's
            launcher installs the ``brokered`` one itself, from the same list
            (two filters would refuse what the broker answers).

    Returns:
        A :class:`ConfineResult` describing what was applied.

    Raises:
        ConfinementUnavailable: Landlock is not supported here; nothing was applied.
        OSError: a step failed after Landlock was found; the process may be
            partially confined and must not go on to run untrusted code.
    """
    arch = linux.machine()
    if arch is None:
        raise ConfinementUnavailable(
            errno.ENOSYS, f"Landlock confinement: unsupported architecture {platform.machine()!r}"
        )
    abi = landlock.landlock_abi()
    if abi < 1:
        raise ConfinementUnavailable(
            errno.EOPNOTSUPP,
            "Landlock is not available (kernel < 5.13 or the LSM is not enabled)",
        )
    handled_fs = landlock.handled_fs(abi)
    handled_net = landlock.handled_net(abi, deny_network)
    scoped = landlock.scopes(abi)
    # Read now: /proc/sys is out of reach once Landlock applies.
    cap_last = process.cap_last_cap()
    with landlock.Ruleset(abi, handled_fs, handled_net, scoped) as ruleset:
        for path in read_paths:
            ruleset.allow_beneath(os.fspath(path), policy.GRANT_READ & handled_fs)
        for path in write_paths:
            ruleset.allow_beneath(os.fspath(path), policy.GRANT_WRITE & handled_fs)
        # Required for unprivileged restrict_self and for seccomp filters.
        linux.prctl(linux.PR_SET_NO_NEW_PRIVS, 1)
        ruleset.restrict_self()
    process.drop_capabilities(cap_last)
    if install_filter:
        seccomp.install(arch, deny_network=deny_network,
                        signals_scoped=bool(scoped & landlock.SCOPE_SIGNAL))
    return ConfineResult(
        abi=abi,
        filesystem=True,
        network=bool(handled_net),
        scoped=bool(scoped),
        seccomp=install_filter,
    )


def _resolve_command(command: str, env: Mapping[str, str] | None = None) -> str | None:
    """Resolve ``command`` like execvp does (on env's PATH); return its real path or None."""
    if os.sep in command:
        candidates: Sequence[str] = [command]
    else:
        candidates = [os.path.join(d or os.curdir, command) for d in os.get_exec_path(env)]
    for candidate in candidates:
        if os.path.isfile(candidate) and os.access(candidate, os.X_OK):
            return os.path.realpath(candidate)
    return None


def _parser():
    import argparse

    parser = argparse.ArgumentParser(
        prog="python -m redoxcap.sandbox",
        description="Confine with Landlock and seccomp, then exec COMMAND.",
    )
    parser.add_argument(
        "--read",
        action="append",
        default=[],
        metavar="PATH",
        help="grant read+execute beneath PATH",
    )
    parser.add_argument(
        "--write", action="append", default=[], metavar="PATH", help="grant read+write beneath PATH"
    )
    parser.add_argument(
        "--no-network-deny",
        dest="deny_network",
        action="store_false",
        help="do not restrict TCP or socket(2) (metadata and terminal rules stay)",
    )
    parser.add_argument(
        "--require",
        action="store_true",
        help="exit 126 instead of running unconfined when Landlock is unavailable",
    )
    parser.add_argument("command", nargs=argparse.REMAINDER, help="-- COMMAND ARGS...")
    return parser


def main(argv: Sequence[str] | None = None) -> int:
    """Launcher: confine this process, leave the terminal, then exec COMMAND.

    COMMAND keeps every inherited fd but runs in a new session without a
    controlling terminal (see :func:`~redoxcap.sandbox.process.leave_terminal`),
    and is killed when the process that started the launcher dies (see
    :func:`~redoxcap.sandbox.process.die_with_parent`).

    Args:
        argv: arguments without the program name; defaults to ``sys.argv[1:]``.

    Returns:
        An exit status, only when COMMAND was not executed: 126 when confinement
        is required but unavailable or failed or no new session could be
        started, 127 when COMMAND is not found,
        2 on a usage error. On success this function does not return.
    """
    parent = os.getppid()
    args = _parser().parse_args(list(sys.argv[1:] if argv is None else argv))
    command = list(args.command)
    if command and command[0] == "--":
        command = command[1:]
    if not command:
        _say("redoxcap: no COMMAND given (usage: ... -- COMMAND ARGS...)")
        return EXIT_USAGE
    return _confine_and_exec(command, None, args.read, args.write, deny_network=args.deny_network,
                             require=args.require, parent=parent, say=_print)


def _print(message: str) -> None:
    print(message, file=sys.stderr)


def _say(message: str) -> None:
    # straight to fd 2: in a child forked from a threaded `run`, sys.stderr's lock may be held
    os.write(2, (message + "\n").encode(errors="replace"))


def _confine_and_exec(command: Sequence[str], env: Mapping[str, str] | None,
                      reads: Iterable[str], writes: Iterable[str], *, deny_network: bool,
                      require: bool, parent: int, say: Callable[[str], None] = _say) -> int:
    """The launcher's steps: confine, leave the terminal, die with parent, exec command.

    Args:
        env: command's environment (None: this process's).
        say: how to tell the user why command cannot run.

    Returns:
        An exit status, only when command was not executed (see :func:`main`).
    """
    if env is None:
        sys.stdout.flush()
        sys.stderr.flush()
    executable = _resolve_command(command[0], env)
    if executable is None:
        say(f"redoxcap: {command[0]}: command not found")
        return EXIT_NOT_FOUND

    # The executable file itself, never its directory (`./tool` in $HOME).
    reads = policy.interpreter_read_paths() + list(reads) + [executable]
    try:
        confine(reads, list(writes), deny_network=deny_network)
    except ConfinementUnavailable as exc:
        if require:
            say(f"redoxcap: error: {exc.strerror}; refusing to run unconfined")
            return EXIT_CANNOT_RUN
        say(f"redoxcap: warning: {exc.strerror}; running unconfined")
    except OSError as exc:
        # Partially applied confinement is never a reason to run the client anyway.
        say(f"redoxcap: error: confinement failed: {exc}")
        return EXIT_CANNOT_RUN
    try:
        process.leave_terminal()
    except OSError as exc:
        # A client in the caller's session could push keystrokes into its terminal.
        say(f"redoxcap: error: cannot start a new session: {exc.strerror}")
        return EXIT_CANNOT_RUN
    try:
        process.die_with_parent(parent)
    except OSError as exc:
        say(f"redoxcap: error: {exc.strerror}")
        return EXIT_CANNOT_RUN
    try:
        # exec keeps every fd that is not close-on-exec; nothing is closed here.
        if env is None:
            os.execvp(command[0], list(command))
        else:
            os.execvpe(command[0], list(command), dict(env))
    except OSError as exc:
        say(f"redoxcap: exec {command[0]}: {exc.strerror}")
        return EXIT_CANNOT_RUN
    return EXIT_CANNOT_RUN  # unreachable: exec does not return on success


class ConfinedProcess:
    """A child :func:`spawn_confined` started, shaped like subprocess.Popen for who waits on it.

    Attributes:
        pid: its pid (a child of ours: valid until :meth:`wait` reaps it).
        returncode: None while it runs; then its exit status (-N: killed by signal N).
    """

    def __init__(self, pid: int) -> None:
        self.pid = pid
        self.returncode: int | None = None

    def poll(self) -> int | None:
        """Its status if it has exited (reaping it), else None."""
        if self.returncode is None:
            pid, status = os.waitpid(self.pid, os.WNOHANG)
            if pid:
                self.returncode = os.waitstatus_to_exitcode(status)
        return self.returncode

    def wait(self) -> int:
        """Wait until it exits; its status as Popen.returncode."""
        if self.returncode is None:
            _, status = os.waitpid(self.pid, 0)
            self.returncode = os.waitstatus_to_exitcode(status)
        return self.returncode

    def send_signal(self, signum: int) -> None:
        """Signal it, unless it has been reaped (its pid may be another's by then)."""
        if self.returncode is None:
            os.kill(self.pid, signum)

    def kill(self) -> None:
        """SIGKILL it."""
        self.send_signal(signal.SIGKILL)


def spawn_confined(command: Sequence[str], env: Mapping[str, str], *,
                   read_paths: Iterable[str] = (), write_paths: Iterable[str] = (),
                   keep_fds: Sequence[int] = (), require: bool = False,
                   deny_network: bool = True) -> ConfinedProcess:
    """Start command confined, as the launcher would, from a fork of this process.

    The child keeps fds 0-2 and keep_fds (made inheritable) and closes every
    other, then takes the launcher's steps (:func:`main`): the interpreter's
    paths, read_paths and the executable readable, write_paths writable,
    Landlock and the seccomp allow-list, a new session, killed when this
    process dies, exec with env. When it cannot, it says why on fd 2 and
    exits 126 (or 127: command not found), as the launcher does.

    Call it from a process without threads of its own running Python (a
    thread of the trace printer is fine: the child only makes syscalls and
    writes to fd 2).

    Returns:
        The child, once it has executed command or given up (as Popen returns once
        the program runs): a signal sent to its process group from then on reaches it.
    """
    command, env = list(command), dict(env)
    read_paths, write_paths = list(read_paths), list(write_paths)
    parent = os.getpid()
    sys.stdout.flush()  # or the child's copy of the buffers would print them again
    sys.stderr.flush()
    started, exec_done = os.pipe()  # close-on-exec: EOF once the child has executed or exited
    try:
        pid = os.fork()
    except BaseException:
        os.close(started)
        os.close(exec_done)
        raise
    if pid:
        os.close(exec_done)
        try:
            os.read(started, 1)
        finally:
            os.close(started)
        return ConfinedProcess(pid)
    keep = {0, 1, 2, exec_done, *keep_fds}
    code = EXIT_CANNOT_RUN
    try:
        # first: a Ctrl-C meant for `run` must not reach the child through the old session
        process.leave_terminal()
        process.close_fds_except(keep)
        for fd in keep_fds:
            os.set_inheritable(fd, True)
        code = _confine_and_exec(command, env, read_paths, write_paths,
                                 deny_network=deny_network, require=require, parent=parent)
    except BaseException as exc:  # noqa: BLE001 - never back into the caller's code in the child
        try:
            _say(f"redoxcap: error: cannot start {command[0]}: {exc}")
        finally:
            os._exit(EXIT_CANNOT_RUN)
    os._exit(code)
