"""The exit codes of `redoxcap` and of its sandbox launcher, and how `run` waits for its
command; a leaf module (nothing of the project).

Every failure maps onto one of these (`redoxcap --help` prints the table).
`run` passes its command's own exit code through; 126 and 127 are the shell's
codes for a command that could not be run or was not found, which `run` and
the launcher use only when COMMAND never ran.
"""

from __future__ import annotations

import os
import signal
from typing import Any

EXIT_OK = 0
EXIT_FAILED = 1
EXIT_USAGE = 2
EXIT_NOT_RUNNING = 3
EXIT_ALREADY_RUNNING = 4
EXIT_BOOT_FAILED = 5
EXIT_CANNOT_RUN = 126
EXIT_NOT_FOUND = 127

MEANINGS = {
    EXIT_OK: "success (for `run`: the command's own exit code is passed through)",
    EXIT_FAILED: "a request failed (the message says why)",
    EXIT_USAGE: "usage error",
    EXIT_NOT_RUNNING: "no system is running at the state directory",
    EXIT_ALREADY_RUNNING: "a system is already running there",
    EXIT_BOOT_FAILED: "the system failed to boot (a daemon that could not start is named)",
    EXIT_CANNOT_RUN: "`run`: COMMAND never ran: it could not be confined (--require-confine) or executed",
    EXIT_NOT_FOUND: "`run`: COMMAND was not found or could not be started",
}


class Failure(Exception):
    """A failure the command reports as `redoxcap: MESSAGE` and exits with code.

    Attributes:
        code: one of the EXIT_* codes.
    """

    def __init__(self, message: str, code: int = EXIT_FAILED) -> None:
        super().__init__(message)
        self.code = code


def wait_forwarding_signals(proc: Any, *, group: bool = False) -> int:
    """Wait for proc (a Popen, or anything with pid, returncode, send_signal and wait),
    passing on SIGINT, SIGTERM and SIGHUP; return its exit code.

    With group, proc leads its own process group (a new session), which the
    terminal no longer signals: Ctrl-C reaches only `run`, and goes on to the
    whole group as it would have from the terminal.

    Returns:
        proc's exit code, or 128+N when signal N ended it.
    """
    def forward(signum: int, _frame: object) -> None:
        if proc.returncode is not None:
            return
        if not group:
            proc.send_signal(signum)
            return
        try:
            # Not yet reaped, so the group id cannot have been reused.
            os.killpg(proc.pid, signum)
        except ProcessLookupError:
            pass

    old = {s: signal.signal(s, forward) for s in (signal.SIGINT, signal.SIGTERM, signal.SIGHUP)}
    try:
        code = proc.wait()
    finally:
        for s, handler in old.items():
            signal.signal(s, handler)
    return 128 - code if code < 0 else code
