"""Latency of rt calls, as ratios against a round-trip floor measured in the same run.

    python scripts/bench_latency.py [-n 3000]

The floor is one SOCK_SEQPACKET round trip between two plain Python
processes on different cores (blocking send/recv, no framework). A read through redoxcap is two
such round trips (client -> router -> scheme and back), an open through the
namespace four (client -> router -> nsmgr -> router -> scheme and back), so
the ideal ratios are 2 and 4; what exceeds them is the cost of the router,
the scheme framework and msgpack. Absolute times on shared 2-core machines
mean little; the ratios are what to compare between commits.
"""

from __future__ import annotations

import argparse
import os
import socket
import statistics
import tempfile
import time
from pathlib import Path

from benchsystem import private_system

import rt
from redoxcap import control


def floor(n: int) -> float:
    """Median-of-5 µs per raw round trip between two Python processes on different cores.

    The daemons spread over the cores, so the cross-core round trip is the
    honest unit; on one core the same exchange can be several times cheaper.
    """
    cpus = sorted(os.sched_getaffinity(0))
    a, b = socket.socketpair(socket.AF_UNIX, socket.SOCK_SEQPACKET)
    pid = os.fork()
    if pid == 0:
        os.sched_setaffinity(0, {cpus[-1]})
        a.close()
        while data := b.recv(4096):
            b.send(data)
        os._exit(0)
    b.close()
    os.sched_setaffinity(0, {cpus[0]})
    try:
        return statistics.median(_timed(n, lambda: (a.send(b"x" * 16), a.recv(4096))) for _ in range(5))
    finally:
        os.sched_setaffinity(0, cpus)
        a.close()
        os.waitpid(pid, 0)


def _timed(n: int, fn) -> float:
    start = time.perf_counter()
    for _ in range(n):
        fn()
    return (time.perf_counter() - start) / n * 1e6


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("-n", type=int, default=3000, help="calls per measurement")
    n = parser.parse_args().n
    with tempfile.TemporaryDirectory() as tmp:
        state, root = Path(tmp) / "state", Path(tmp) / "root"
        root.mkdir()
        (root / "f").write_bytes(b"x" * 4096)
        with private_system(root, state, "--schemes", "file,zero"):
            _, fds = control.request(state, "namespace")
            rt.setup(fds[0], None)
            zero = rt.open("/scheme/zero/")
            f = rt.open("/f")
            base = floor(n)
            rows = [
                ("read 1 byte, zero scheme", 2, lambda: rt.read(zero, 1)),
                ("lseek+read 4 KiB, file", 4, lambda: (rt.lseek(f, 0), rt.read(f, 4096))),
                ("fstat, file scheme", 2, lambda: rt.fstat(f)),
                ("open+close via nsmgr", 4, lambda: rt.close(rt.open("/f"))),
            ]
            print(f"round-trip floor: {base:.1f} µs (median of 5 x {n})")
            print(f"{'operation':<28} {'µs':>8} {'ratio':>6} {'ideal':>6}")
            for name, ideal, fn in rows:
                fn()
                took = statistics.median(_timed(max(n // 5, 1), fn) for _ in range(5))
                print(f"{name:<28} {took:>8.1f} {took / base:>6.2f} {ideal:>6}")
            big = root / "big"
            big.write_bytes(os.urandom(8 << 20))

            def read_all_rt():
                fd = rt.open("/big")
                while rt.read(fd, 1 << 20):
                    pass
                rt.close(fd)

            def read_all_os():
                fd = os.open(big, os.O_RDONLY)
                while os.read(fd, 1 << 20):
                    pass
                os.close(fd)

            rt_s = statistics.median(_timed(1, read_all_rt) for _ in range(5)) / 1e6
            os_s = statistics.median(_timed(1, read_all_os) for _ in range(5)) / 1e6
            print(f"\nreading 8 MiB: rt {8 / rt_s:.0f} MiB/s, os.read {8 / os_s:.0f} MiB/s, "
                  f"ratio {rt_s / os_s:.1f}x the time")
            rt.close(zero)
            rt.close(f)
            rt.setup(None, None)


if __name__ == "__main__":
    main()
