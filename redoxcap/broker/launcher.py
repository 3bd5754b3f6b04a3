"""The target's side: confine, install the broker's filter, hand over its listener, exec.

Runs in the child `run_brokered` forks, before anything of the program
runs. Landlock (redoxcap.sandbox) grants read and execute on the host trees
only: every path call is the broker's anyway, and the one the kernel still
runs itself (execve, whose path the broker checked but cannot pass by
copy) can then reach nothing but the host trees, whatever a racing thread
writes into its argument. The filter goes last, so that nothing between it
and exec makes a call the broker would have to answer before it holds the
listener.
"""

from __future__ import annotations

import errno
import os
import socket
import sys
from collections.abc import Sequence
from typing import NoReturn

from redoxcap.broker import filter as bpf
from redoxcap.wire import linux
from redoxcap.wire import protocol as P

EXIT_CANNOT_RUN = 126
EXIT_NOT_FOUND = 127


def _die(message: str, code: int = EXIT_CANNOT_RUN) -> NoReturn:
    os.write(2, f"redoxcap: {message}\n".encode(errors="replace"))
    os._exit(code)


def exec_target(argv: Sequence[str], env: dict[str, str], channel: socket.socket, parent: int,
                kernel_cwd: str, read_paths: Sequence[str], keep_fds: Sequence[int]) -> NoReturn:
    """Become the brokered program (never returns; exits 126 or 127 when it cannot).

    Args:
        argv: the program and its arguments (argv[0] is looked up on env's PATH).
        env: its environment.
        channel: the socket the listener fd is sent on (the broker holds the other end).
        parent: the broker's pid: the program is killed when it dies.
        kernel_cwd: an empty directory to stand in the kernel's cwd (no lookup the broker
            did not make is ever relative to anything).
        read_paths: what Landlock lets the kernel open on the program's behalf (the host trees).
        keep_fds: fds the program inherits besides 0-2 (its capabilities for rt, and what
            `run --pass-fd` names); every other fd this process has is closed.
    """
    from redoxcap.sandbox import ConfinementUnavailable, close_fds_except, confine, die_with_parent

    machine = linux.machine()
    try:
        os.setsid()  # a session of its own: no TIOCSTI into the caller's terminal
        die_with_parent(parent)
        os.chdir(kernel_cwd)
        close_fds_except({0, 1, 2, channel.fileno(), *keep_fds})
        for fd in keep_fds:
            os.set_inheritable(fd, True)
        # the broker's filter below is the whole allow-list: no second one here
        confined = confine(read_paths, (), deny_network=True, install_filter=False)
    except ConfinementUnavailable as exc:
        _die(f"brokered programs need Landlock: {exc.strerror}")
    except OSError as exc:
        _die(f"cannot confine the program: {exc}")
    if machine is None:
        _die("seccomp user notification: unsupported architecture")
    try:
        listener = bpf.install(machine, signals_scoped=confined.scoped)
    except OSError as exc:
        _die(f"seccomp user notification is not available here: {exc.strerror}")
    try:
        channel.sendmsg([b"L"], P.fds_ancillary([listener]))
    except OSError as exc:
        _die(f"cannot hand the listener to the broker: {exc.strerror}")
    os.close(listener)
    channel.close()
    sys.stdout.flush()
    sys.stderr.flush()
    try:
        os.execvpe(argv[0], list(argv), env)
    except OSError as exc:
        if exc.errno == errno.ENOENT:
            _die(f"{argv[0]}: command not found", EXIT_NOT_FOUND)
        _die(f"{argv[0]}: {exc.strerror}", EXIT_CANNOT_RUN)
