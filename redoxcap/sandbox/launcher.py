"""The launcher: confine this process (:func:`confine`), leave the terminal, exec COMMAND.

``python -P -m redoxcap.sandbox [--read PATH]... [--write PATH]...
[--no-network-deny] [--require] -- COMMAND ARGS...`` is how `redoxcap run`
starts a confined client; see :mod:`redoxcap.sandbox` for what is confined.
"""

from __future__ import annotations

import argparse
import errno
import os
import platform
import sys
from collections.abc import Iterable, Sequence
from dataclasses import dataclass

from redoxcap.exits import EXIT_CANNOT_RUN, EXIT_NOT_FOUND, EXIT_USAGE
from redoxcap.sandbox import landlock, policy, process, seccomp
from wire import linux


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
        seccomp: the seccomp filter (metadata, terminal ioctls, io_uring and,
            with ``deny_network``, ``socket(2)``) is installed.
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
    left_to_broker: frozenset[str] = frozenset(),
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
            ``socket(2)`` fail with EACCES for every family except AF_UNIX. The
            metadata, terminal and io_uring rules apply either way.
        left_to_broker: syscalls the seccomp filter leaves to a broker's filter that the
            caller installs next (see :func:`redoxcap.sandbox.seccomp.filter_program`).

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
    seccomp.install(arch, deny_network, left_to_broker)
    process.drop_capabilities(cap_last)
    return ConfineResult(
        abi=abi,
        filesystem=True,
        network=bool(handled_net),
        scoped=bool(scoped),
        seccomp=True,
    )


def _resolve_command(command: str) -> str | None:
    """Resolve ``command`` like execvp does; return its real path or None."""
    if os.sep in command:
        candidates: Sequence[str] = [command]
    else:
        candidates = [os.path.join(d or os.curdir, command) for d in os.get_exec_path()]
    for candidate in candidates:
        if os.path.isfile(candidate) and os.access(candidate, os.X_OK):
            return os.path.realpath(candidate)
    return None


def _parser() -> argparse.ArgumentParser:
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
        print("redoxcap: no COMMAND given (usage: ... -- COMMAND ARGS...)", file=sys.stderr)
        return EXIT_USAGE
    executable = _resolve_command(command[0])
    if executable is None:
        print(f"redoxcap: {command[0]}: command not found", file=sys.stderr)
        return EXIT_NOT_FOUND

    # The executable file itself, never its directory (`./tool` in $HOME).
    reads = policy.interpreter_read_paths() + list(args.read) + [executable]
    try:
        confine(reads, list(args.write), deny_network=args.deny_network)
    except ConfinementUnavailable as exc:
        if args.require:
            print(f"redoxcap: error: {exc.strerror}; refusing to run unconfined", file=sys.stderr)
            return EXIT_CANNOT_RUN
        print(f"redoxcap: warning: {exc.strerror}; running unconfined", file=sys.stderr)
    except OSError as exc:
        # Partially applied confinement is never a reason to run the client anyway.
        print(f"redoxcap: error: confinement failed: {exc}", file=sys.stderr)
        return EXIT_CANNOT_RUN
    try:
        process.leave_terminal()
    except OSError as exc:
        # A client in the caller's session could push keystrokes into its terminal.
        print(f"redoxcap: error: cannot start a new session: {exc.strerror}", file=sys.stderr)
        return EXIT_CANNOT_RUN
    try:
        process.die_with_parent(parent)
    except OSError as exc:
        print(f"redoxcap: error: {exc.strerror}", file=sys.stderr)
        return EXIT_CANNOT_RUN
    sys.stdout.flush()
    sys.stderr.flush()
    try:
        # execvp keeps every fd that is not close-on-exec; nothing is closed here.
        os.execvp(command[0], command)
    except OSError as exc:
        print(f"redoxcap: exec {command[0]}: {exc.strerror}", file=sys.stderr)
        return EXIT_CANNOT_RUN
    return EXIT_CANNOT_RUN  # unreachable: execvp does not return on success
