"""A well-behaved client's latency, quiet and while another client floods the system.

    python scripts/bench_flood.py [-n 2000] [--caps 8] [--reading]

Boots a private system, then times `open + read 4 KiB + close` of one file
(through the namespace: four round trips to nsmgr and the file scheme) one
call at a time: first with nothing else running, then while a flooding
`redoxcap run` client sends requests on clones of its cwd and namespace
capabilities as fast as it can. By default the flooder never reads a reply
(the attack of issue 8: it must slow only itself). With --reading it reads
every reply as fast as it can, so it keeps the schemes busy the whole time
(fair sharing of two cores, a harder test than the router's backpressure).

Prints the median and p99 of both phases and the p99 ratio (target: within
3x of quiet). Times on shared 2-core machines mean little on their own; the
ratio is measured in one run.
"""

from __future__ import annotations

import argparse
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

from benchsystem import private_system

import rt
from redoxcap import control

FLOODER = r"""
import socket, sys, threading
import rt
from rt import _process
from redoxcap.wire import frames as F
from redoxcap.wire import protocol as P

caps, reading = int(sys.argv[1]), sys.argv[2] == "reading"
fds = [rt.clone(_process.cwd_fd() if i % 2 else _process.namespace_fd()) for i in range(caps)]
started = threading.Barrier(caps + 1)

def flood(fd, op):
    s = socket.socket(fileno=fd)
    s.setblocking(True)
    frame = F.encode_request(op, 0, [])
    started.wait()
    if reading:  # keep a window of requests in flight, read every reply
        for _ in range(16):
            s.send(frame)
        while True:
            s.recv(P.MAX_FRAME)
            s.send(frame)
    while True:
        s.send(frame)  # blocks once the router stops reading it

for i, fd in enumerate(fds):
    threading.Thread(target=flood, args=(fd, P.FPATH if i % 2 else P.NS_LIST), daemon=True).start()
started.wait()
print("flooding", flush=True)
sys.stdin.read()
"""


def latencies(n: int) -> list[float]:
    """µs of n open+read+close calls, one at a time."""
    times = []
    for _ in range(n):
        start = time.perf_counter()
        fd = rt.open("/f")
        rt.read(fd, 4096)
        rt.close(fd)
        times.append((time.perf_counter() - start) * 1e6)
    return times


def summary(times: list[float]) -> tuple[float, float]:
    """(median, p99) in µs."""
    ordered = sorted(times)
    return statistics.median(ordered), ordered[min(len(ordered) - 1, int(len(ordered) * 0.99))]


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("-n", type=int, default=2000, help="calls per phase")
    parser.add_argument("--caps", type=int, default=8, help="capabilities the flooder floods")
    parser.add_argument("--reading", action="store_true", help="the flooder reads its replies")
    args = parser.parse_args()
    with tempfile.TemporaryDirectory() as tmp:
        state, root = Path(tmp) / "state", Path(tmp) / "root"
        root.mkdir()
        (root / "f").write_bytes(b"x" * 4096)
        with private_system(root, state, "--schemes", "file,zero") as cli:
            flooder = None
            try:
                _, fds = control.request(state, "namespace")
                rt.setup(fds[0], None)
                latencies(200)  # warm up
                quiet = summary(latencies(args.n))
                flooder = subprocess.Popen(
                    [*cli, "run", "--", sys.executable, "-c", FLOODER, str(args.caps),
                     "reading" if args.reading else "silent"],
                    stdin=subprocess.PIPE, stdout=subprocess.PIPE, text=True)
                if flooder.stdout.readline() != "flooding\n":
                    raise SystemExit("the flooding client did not start")
                latencies(200)  # let the flood take hold
                flooded = summary(latencies(args.n))
                mode = "reads its replies" if args.reading else "never reads a reply"
                print(f"open+read 4 KiB+close, {args.n} calls per phase; flooder: {args.caps} "
                      f"capabilities, {mode}")
                print(f"{'phase':<10} {'median µs':>10} {'p99 µs':>10}")
                print(f"{'quiet':<10} {quiet[0]:>10.1f} {quiet[1]:>10.1f}")
                print(f"{'flooded':<10} {flooded[0]:>10.1f} {flooded[1]:>10.1f}")
                ratio = flooded[1] / quiet[1]
                print(f"p99 ratio flooded/quiet: {ratio:.2f} (target <= 3: {'met' if ratio <= 3 else 'missed'})")
                rt.setup(None, None)
            finally:
                if flooder is not None:
                    flooder.communicate("", timeout=30)


if __name__ == "__main__":
    main()
