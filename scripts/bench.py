"""redoxcap against its floors, in one run on one machine: rt, passthrough, the broker, scaling.

    python scripts/bench.py [--json] [--smoke] [-n 2000] [--plot FILE]

Boots a private system and measures, in this order:

- floors: native open+read 4 KiB+close of a host file; the round trip R of
  a plain two-process SOCK_SEQPACKET ping, cross-core and pinned to one core;
- rt: open via the namespace, openat via the cwd, stat, fstat, listdir of 100
  entries, open+close on a mount that keeps its handles across restarts and
  on one that does not (:nokeep), read and write of 4 KiB and 64 KiB routed and on a passthrough fd
  (O_PASSTHROUGH) next to os.read/os.write, bulk 64 MiB read and write
  (routed, passthrough, native);
- the broker: what one brokered syscall costs an unmodified Python program
  (getcwd, answered by the broker alone; stat and open via the cwd and via
  the namespace; stat of a host-tree file), timed inside the program;
- unmodified `cat`, `ls -R` and `python3 -c pass`, brokered against native
  (whole runs: fork, confinement, exec, the program);
- scaling: aggregate ops/s and p99 of openat+read+close via the cwd with 1,
  4, 16 and 64 client processes;
- memory: the router's and the file scheme's resident memory per open
  capability, with 5,000 open.

Latencies are medians in µs with their ratio to the floor they are compared
against (R cross-core unless said otherwise); throughputs are ratios to
native. Absolute times on a shared 2-core machine mean little; the ratios
are what to compare between commits. --smoke runs every part with tiny
counts (the test suite does, to keep the script working); --json prints one
JSON object instead of the tables; --plot writes the scaling run as a PNG
where matplotlib is installed.
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
from pathlib import Path

from benchsystem import private_system

import rt
from redoxcap import control
from wire.protocol import O_PASSTHROUGH

KIB, MIB = 1024, 1024 * 1024


def _timed(n: int, fn: Callable[[], object]) -> float:
    """µs per call of fn over n calls."""
    start = time.perf_counter()
    for _ in range(n):
        fn()
    return (time.perf_counter() - start) / n * 1e6


def median_us(n: int, fn: Callable[[], object], rounds: int = 5) -> float:
    """Median over rounds of the µs per call (one warm-up call first)."""
    fn()
    return statistics.median(_timed(max(n // rounds, 1), fn) for _ in range(rounds))


# -- floors --------------------------------------------------------------------


def ping_floor(n: int, pinned: bool) -> float:
    """µs per SOCK_SEQPACKET round trip between two plain processes (cross-core or one core)."""
    cpus = sorted(os.sched_getaffinity(0))
    a, b = socket.socketpair(socket.AF_UNIX, socket.SOCK_SEQPACKET)
    pid = os.fork()
    if pid == 0:
        try:
            os.sched_setaffinity(0, {cpus[0] if pinned else cpus[-1]})
            a.close()
            while data := b.recv(4096):
                b.send(data)
        finally:
            os._exit(0)
    b.close()
    os.sched_setaffinity(0, {cpus[0]})
    try:
        return median_us(n, lambda: (a.send(b"x" * 16), a.recv(4096)))
    finally:
        os.sched_setaffinity(0, cpus)
        a.close()
        os.waitpid(pid, 0)


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


def rt_calls(n: int, root: Path) -> dict[str, float]:
    out: dict[str, float] = {}
    out["open+close via the namespace"] = median_us(n, lambda: rt.close(rt.open("/f")))
    out["openat+close via the cwd"] = median_us(n, lambda: rt.close(rt.openat(rt.AT_FDCWD, "f")))
    out["stat via the namespace"] = median_us(n, lambda: rt.stat("/f"))
    fd = rt.open("/f")
    out["fstat"] = median_us(n, lambda: rt.fstat(fd))
    rt.close(fd)
    out["listdir of 100 entries"] = median_us(max(n // 10, 5), lambda: rt.listdir("/d100"))
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


def bulk_io(root: Path, bulk: int, rounds: int = 9) -> dict[str, float]:
    """MiB/s moving bulk bytes in 1 MiB calls on an open fd: routed, passthrough, native.

    The open and close are outside the timing: this is the data path (an open
    is measured above).
    """
    out: dict[str, float] = {}
    chunk = b"b" * MIB
    for kind in ("routed", "passthrough", "native"):
        native = kind == "native"
        extra = O_PASSTHROUGH if kind == "passthrough" else 0
        for name in ("read", "write"):
            seconds = []
            for _ in range(rounds):
                if name == "read":
                    fd = os.open(root / "big", os.O_RDONLY) if native else rt.open("/big", extra)
                else:
                    flags = os.O_WRONLY | os.O_CREAT | os.O_TRUNC
                    fd = (os.open(root / "bulkw", flags, 0o644) if native
                          else rt.open("/bulkw", flags | extra))
                read, write = (os.read, os.write) if native else (rt.read, rt.write)
                start = time.perf_counter()
                if name == "read":
                    while read(fd, MIB):
                        pass
                else:
                    for _ in range(bulk // MIB):
                        write(fd, chunk)
                seconds.append(time.perf_counter() - start)
                (os.close if native else rt.close)(fd)
            size = (root / "big").stat().st_size if name == "read" else bulk
            out[f"bulk {name} {size // MIB} MiB {kind}"] = size / MIB / statistics.median(seconds)
    (root / "bulkw").unlink()
    return out


# -- the broker ------------------------------------------------------------------

PROBE = textwrap.dedent("""
    import json, os, sys, time
    n = int(sys.argv[1])
    def t(fn):
        fn()
        start = time.perf_counter()
        for _ in range(n):
            fn()
        return (time.perf_counter() - start) / n * 1e6
    out = {
        "getcwd (the broker alone)": t(os.getcwd),
        "stat of a host-tree file": t(lambda: os.stat("/usr/bin/ls")),
        "stat via the cwd": t(lambda: os.stat("f")),
        "open+close via the cwd": t(lambda: os.close(os.open("f", os.O_RDONLY))),
        "stat via the namespace": t(lambda: os.stat("/scheme/file/f")),
        "open+close via the namespace": t(lambda: os.close(os.open("/scheme/file/f", os.O_RDONLY))),
    }
    fd = os.open("big", os.O_RDONLY)
    out["pread 4 KiB on the brokered fd"] = t(lambda: os.pread(fd, 4096, 0))
    print(json.dumps(out))
""")


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


def broker_calls(n: int, tmp: Path, ns: int, cwd: int) -> dict[str, float]:
    out = tmp / "probe.json"
    brokered_run([sys.executable, "-c", PROBE, str(n)], out, ns, cwd, [])
    return json.loads(out.read_text())


def programs(rounds: int, root: Path, tmp: Path, ns: int, cwd: int) -> dict[str, dict[str, float]]:
    """Whole runs of unmodified programs: brokered and native wall seconds (medians)."""
    cases = {
        "cat": ["cat", "big"],
        "ls -R": ["ls", "-R", "tree"],
        "python3 -c pass": ["/usr/bin/python3", "-c", "pass"],
    }
    out: dict[str, dict[str, float]] = {}
    for name, argv in cases.items():
        native_s = []
        for _ in range(rounds):
            start = time.perf_counter()
            subprocess.run(argv, cwd=root, stdout=subprocess.DEVNULL, check=True)
            native_s.append(time.perf_counter() - start)
        brokered_s = [brokered_run(argv, tmp / "out", ns, cwd, []) for _ in range(rounds)]
        out[name] = {"native ms": statistics.median(native_s) * 1e3,
                     "brokered ms": statistics.median(brokered_s) * 1e3}
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


def scaling(counts: list[int], seconds: float) -> dict[int, dict[str, float]]:
    """Aggregate ops/s and p99 µs of openat+read 4 KiB+close via the cwd, per client count."""
    out: dict[int, dict[str, float]] = {}
    for count in counts:
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
        out[count] = {"ops/s": len(lats) / seconds,
                      "p99 µs": lats[min(len(lats) - 1, int(len(lats) * 0.99))] * 1e6 if lats else 0.0}
    return out


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


# -- report ------------------------------------------------------------------------


def report(r: dict) -> None:
    R, Rp = r["floors"]["R cross-core µs"], r["floors"]["R pinned µs"]
    nat = r["floors"]["native open+read 4 KiB+close µs"]
    print(f"floors: R cross-core {R:.1f} µs, R pinned {Rp:.1f} µs, "
          f"native open+read 4 KiB+close {nat:.1f} µs")
    print(f"\n{'rt call':<40} {'µs':>9} {'/R':>6} {'target':>8}")
    targets = {"open+close via the namespace": "<= 5 R", "fstat": "<= 2.5 R"}
    for name, us in r["rt"].items():
        print(f"{name:<40} {us:>9.1f} {us / R:>6.2f} {targets.get(name, ''):>8}")
    kept, unkept = r["keep"].values()
    print(f"\nkeeping handles across restarts: open+close {kept:.1f} µs kept, {unkept:.1f} µs "
          f"not kept ({kept / unkept:.2f}x)")
    print(f"\n{'read/write':<40} {'µs':>9} {'/R':>6} {'/native':>8}")
    for name, us in r["io"].items():
        base = r["io"][name.rsplit(" ", 1)[0] + " native"]
        target = "<= 1.5" if name.endswith("4 KiB passthrough") else ""
        print(f"{name:<40} {us:>9.1f} {us / R:>6.2f} {us / base:>8.2f} {target}")
    print(f"\n{'bulk':<40} {'MiB/s':>9} {'of native':>10}")
    for name, speed in r["bulk"].items():
        base = r["bulk"][name.rsplit(" ", 1)[0] + " native"]
        target = ">= 90%" if name.endswith("passthrough") else ""
        print(f"{name:<40} {speed:>9.0f} {speed / base:>9.0%} {target}")
    print(f"\n{'brokered call (unmodified python3)':<40} {'µs':>9} {'/R':>6} {'target':>8}")
    for name, us in r["broker"].items():
        target = "<= 6 R" if name == "open+close via the namespace" else ""
        print(f"{name:<40} {us:>9.1f} {us / R:>6.2f} {target:>8}")
    print(f"\n{'whole program':<40} {'native ms':>10} {'brokered ms':>12} {'ratio':>6}")
    for name, t in r["programs"].items():
        print(f"{name:<40} {t['native ms']:>10.1f} {t['brokered ms']:>12.1f} "
              f"{t['brokered ms'] / t['native ms']:>6.1f}")
    print(f"\n{'clients':<10} {'ops/s':>10} {'p99 µs':>10}   (openat+read 4 KiB+close via the cwd;"
          " target: 64 >= 4)")
    for count, s in r["scaling"].items():
        print(f"{count:<10} {s['ops/s']:>10.0f} {s['p99 µs']:>10.0f}")
    print()
    for name, kib in r["memory"].items():
        print(f"{name}: {kib:.2f}" + ("   (target: router <= 4)" if name.startswith("kernel") else ""))


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
    args = parser.parse_args(argv)
    n = 20 if args.smoke else args.n
    bulk = 4 * MIB if args.smoke else 64 * MIB
    counts = [1, 4] if args.smoke else [1, 4, 16, 64]
    seconds = 0.3 if args.smoke else 2.0
    caps = 200 if args.smoke else 5000
    r: dict = {"smoke": args.smoke, "n": n}
    with tempfile.TemporaryDirectory(prefix="redoxcap-bench-") as tmp_name:
        tmp = Path(tmp_name)
        root, state = tmp / "root", tmp / "state"
        root.mkdir()
        build_root(root, bulk)
        r["floors"] = {
            "R cross-core µs": ping_floor(n, pinned=False),
            "R pinned µs": ping_floor(n, pinned=True),
            "native open+read 4 KiB+close µs": native_open_read(n, root / "f"),
        }
        # the root again as mounts `kept` and `unkept` (:nokeep): what keeping handles costs
        with private_system(root, state, "--mount", f"kept={root}", "--mount", f"unkept={root}:nokeep"):
            _, fds = control.request(state, "namespace")
            rt.setup(fds[0], None)
            cwd = rt.open("/", rt.O_DIRECTORY)
            rt.setup(fds[0], cwd, "/")
            try:
                r["rt"] = rt_calls(n, root)
                r["keep"] = keep_cost(n)
                r["io"] = io_calls(n, root)
                r["bulk"] = bulk_io(root, bulk, 3 if args.smoke else 9)
                r["broker"] = broker_calls(n, tmp, fds[0], cwd)
                r["programs"] = programs(1 if args.smoke else 5, root, tmp, fds[0], cwd)
                r["scaling"] = scaling(counts, seconds)
                r["memory"] = memory(state, caps)
            finally:
                rt.setup(None, None)
    if args.json:
        print(json.dumps(r, indent=1))
    else:
        report(r)
    if args.plot:
        plot(r["scaling"], args.plot)
    shutil.rmtree(tmp_name, ignore_errors=True)
    return 0


if __name__ == "__main__":
    sys.exit(main())
