"""The baselines bench.py measures against, in the same run: the round trip R of a plain
two-process SOCK_SEQPACKET ping (cross-core and pinned), native I/O, and the way a row is
taken against them (the median of ratios, round by round, with R pinged around each chunk).
"""

from __future__ import annotations

import os
import socket
import statistics
import time
from collections.abc import Callable
from pathlib import Path
from typing import Self


def _timed(n: int, fn: Callable[[], object]) -> float:
    """µs per call of fn over n calls."""
    start = time.perf_counter()
    for _ in range(n):
        fn()
    return (time.perf_counter() - start) / n * 1e6


def _median_call_us(n: int, fn: Callable[[], object]) -> float:
    """The median µs of n calls of fn, each timed alone (a preempted call is one call, not a mean's tail)."""
    took = []
    for _ in range(n):
        start = time.perf_counter()
        fn()
        took.append(time.perf_counter() - start)
    return statistics.median(took) * 1e6


def median_us(n: int, fn: Callable[[], object], rounds: int = 5) -> float:
    """Median over rounds of the µs per call (one warm-up call first)."""
    fn()
    return statistics.median(_timed(max(n // rounds, 1), fn) for _ in range(rounds))


# -- floors --------------------------------------------------------------------


class Floor:
    """R, the round trip of a plain SOCK_SEQPACKET ping between two Python processes.

    The echo process stays up for the whole run, so R can be measured again
    beside each latency: pinned to the last core while this process pings from
    the first (cross-core, the honest unit: the daemons spread over the cores),
    or both on the first (same_core).
    """

    def __init__(self, same_core: bool = False) -> None:
        self._cpus = sorted(os.sched_getaffinity(0))
        self._sock, theirs = socket.socketpair(socket.AF_UNIX, socket.SOCK_SEQPACKET)
        self._pid = os.fork()
        if self._pid == 0:
            try:
                os.sched_setaffinity(0, {self._cpus[0] if same_core else self._cpus[-1]})
                self._sock.close()
                while data := theirs.recv(4096):
                    theirs.send(data)
            finally:
                os._exit(0)
        theirs.close()

    def round_trip_us(self, calls: int) -> float:
        """The median µs of calls round trips (this process on the first core meanwhile)."""
        os.sched_setaffinity(0, {self._cpus[0]})
        try:
            return _median_call_us(calls, lambda: (self._sock.send(b"x" * 16), self._sock.recv(4096)))
        finally:
            os.sched_setaffinity(0, self._cpus)

    def close(self) -> None:
        self._sock.close()
        os.waitpid(self._pid, 0)

    def __enter__(self) -> Self:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()


def ping_floor(n: int, same_core: bool) -> float:
    """The median over 5 chunks of n // 5 pings of their median µs per round trip."""
    with Floor(same_core) as floor:
        floor.round_trip_us(max(n // 5, 1))
        return statistics.median(floor.round_trip_us(max(n // 5, 1)) for _ in range(5))


def against_floor(floor: Floor, calls: int, chunk: Callable[[], float], rounds: int) -> dict[str, float]:
    """A latency as µs and as R, the median of its ratios to R measured beside it.

    Args:
        floor: the echo process R is measured with.
        calls: how many calls one chunk makes (R is pinged as often, at least 100 times).
        chunk: makes the calls and returns their median µs.
        rounds: how many chunks; each is divided by the mean of R just before and just after it.

    Returns:
        {"µs": the median over chunks of their median call, "R µs": the same of R, "/R":
        the median of the per-chunk ratios}.
    """
    pings = max(calls, 100)
    chunk()  # warm-up
    floors, times = [floor.round_trip_us(pings)], []
    for _ in range(rounds):
        times.append(chunk())
        floors.append(floor.round_trip_us(pings))
    ratios = [t / ((before + after) / 2) for t, before, after in zip(times, floors, floors[1:])]
    return {"µs": statistics.median(times), "R µs": statistics.median(floors),
            "/R": statistics.median(ratios)}


def latency(floor: Floor, n: int, fn: Callable[[], object], rounds: int) -> dict[str, float]:
    """against_floor for a call made in this process: n calls in all, over rounds chunks."""
    calls = max(n // rounds, 1)
    return against_floor(floor, calls, lambda: _median_call_us(calls, fn), rounds)


def native_open_read(n: int, path: Path) -> float:
    def once() -> None:
        fd = os.open(path, os.O_RDONLY)
        os.read(fd, 4096)
        os.close(fd)
    return median_us(n, once)


# -- the system ------------------------------------------------------------------
