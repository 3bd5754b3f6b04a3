"""Waiting in tests: for a process to end, for a condition, for a background client."""

from __future__ import annotations

import os
import select
import signal
import subprocess
import time
from collections.abc import Callable
from typing import TypeVar

T = TypeVar("T")


def pid_alive(pid: int) -> bool:
    """Whether process pid exists and is not a zombie."""
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    try:
        with open(f"/proc/{pid}/stat") as f:
            return f.read().rsplit(") ", 1)[-1][0] != "Z"
    except FileNotFoundError:
        return False

def wait_exited(pid: int, timeout: float = 10.0) -> None:
    """Wait until process pid has exited (on a pidfd: no polling); any process, not only a child.

    Args:
        pid: The process; one that is already gone returns at once.
        timeout: Seconds before the test fails.

    Raises:
        AssertionError: pid still runs after timeout seconds.
    """
    try:
        pidfd = os.pidfd_open(pid)
    except ProcessLookupError:
        return
    try:
        if not select.select([pidfd], [], [], timeout)[0]:
            raise AssertionError(f"process {pid} still runs after {timeout}s")
    finally:
        os.close(pidfd)

def wait_for(predicate: Callable[[], T], timeout: float = 10.0, interval: float = 0.05) -> T:
    """Call predicate until it returns a truthy value, and return that value.

    For conditions nothing can be waited on for, such as a counter in `status`.

    Args:
        predicate: Asked again every interval seconds.
        timeout: Seconds before the test fails.
        interval: Seconds between two calls.

    Returns:
        The first truthy value predicate returned.

    Raises:
        AssertionError: predicate stayed falsy for timeout seconds.
    """
    deadline = time.monotonic() + timeout
    while True:
        value = predicate()
        if value:
            return value
        if time.monotonic() > deadline:
            raise AssertionError(f"condition not met within {timeout}s: {predicate}")
        time.sleep(interval)

def finish(proc: subprocess.Popen, timeout: float = 30) -> str:
    """Let a background client (`System.start`) end and return its stdout.

    Closes its stdin (a client waiting on it goes on), and kills its whole
    process group if it has not ended after timeout seconds.

    Raises:
        AssertionError: it exited with a status other than 0 (its stderr says why).
        subprocess.TimeoutExpired: it did not end in time.
    """
    try:
        out, err = proc.communicate(timeout=timeout)
    except subprocess.TimeoutExpired:
        os.killpg(proc.pid, signal.SIGKILL)
        proc.communicate()
        raise
    assert proc.returncode == 0, err
    return out
