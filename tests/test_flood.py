"""A real system under a client that floods and never reads its replies.

The flooder is an ordinary `redoxcap run` client: it clones its cwd and
namespace capabilities and sends raw requests on the clones without ever
reading a reply. The router must stop reading from it (its own sends block)
while every other client keeps being served, and must not buffer the flood.
The floods end with their clients, so the tests share the module's one system.
"""

from __future__ import annotations

import os
import signal
import subprocess
import sys
import threading

import rt
from redoxcap.testing import spare_prepared, wait_for

FLOODER = r"""
import socket, sys, threading
import rt
from rt import _process
from redoxcap.wire import frames as F
from redoxcap.wire import protocol as P

caps = [rt.clone(_process.cwd_fd()) for _ in range(2)]
caps += [rt.clone(_process.namespace_fd()) for _ in range(2)]
started = threading.Barrier(len(caps) + 1)

def flood(cap, op):
    s = socket.socket(fileno=cap)
    s.setblocking(True)
    frame = F.encode_request(op, 0, [])
    for i in range(20_000):
        if i == 200:  # fits in its own socket even if the router read nothing
            started.wait()
        s.send(frame)  # blocks once the router stops reading it
    print("the router read all of it", flush=True)

for i, cap in enumerate(caps):
    threading.Thread(target=flood, args=(cap, P.FPATH if i < 2 else P.NS_LIST), daemon=True).start()
started.wait()
print("flooding", flush=True)
sys.stdin.read()  # hold the capabilities, read no reply, until the test is done
"""


def vm_rss_kib(pid: int) -> int:
    with open(f"/proc/{pid}/status") as f:
        return next(int(line.split()[1]) for line in f if line.startswith("VmRSS:"))


def victim_round_trips(count: int) -> None:
    for _ in range(count):
        fd = rt.open("/f", rt.O_RDONLY)
        try:
            assert rt.read(fd, 100) == b"hello"
        finally:
            rt.close(fd)
        assert rt.stat("/f").st_size == 5


def test_a_client_flooding_without_reading_slows_only_itself(redoxcap_isolated_client):
    system = redoxcap_isolated_client
    (system.root / "f").write_bytes(b"hello")
    kernel_pid = system.daemon("kernel")["pid"]
    victim_round_trips(20)  # warm up
    rss_before = vm_rss_kib(kernel_pid)
    frames = system.daemon("file")["frames"]
    flooder = system.start("run", "--", sys.executable, "-c", FLOODER)
    try:
        assert flooder.stdout.readline() == "flooding\n", flooder.stderr.read()
        # the flood reaches the schemes: the router forwards what it reads of it
        wait_for(lambda: system.daemon("file")["frames"] > frames + 100)
        outcome: list[Exception | None] = []

        def victim() -> None:
            try:
                victim_round_trips(100)
                outcome.append(None)
            except Exception as exc:  # noqa: BLE001 - reported by the assert below
                outcome.append(exc)

        thread = threading.Thread(target=victim, daemon=True)
        thread.start()
        thread.join(timeout=60)  # generous: the victim hangs for good if the router blocks
        assert outcome == [None], "another client's open/stat did not complete during the flood"
        assert flooder.poll() is None  # still flooding: its sends block, nothing else does
        growth = vm_rss_kib(kernel_pid) - rss_before
        assert growth < 32 * 1024, f"the router grew by {growth} KiB under the flood"
    finally:
        try:
            out, _ = flooder.communicate("", timeout=30)  # stdin closes: it exits
        except subprocess.TimeoutExpired:
            os.killpg(flooder.pid, signal.SIGKILL)
            flooder.communicate()
            raise
    assert "the router read all of it" not in out, "the router read a flood nobody answered"


CLONER = r"""
import errno, resource, time, rt
from rt import _process
soft, hard = resource.getrlimit(resource.RLIMIT_NOFILE)
resource.setrlimit(resource.RLIMIT_NOFILE, (min(hard, 4096), hard))
held = []
try:
    while True:
        held.append(rt.clone(_process.cwd_fd()))
except OSError as exc:
    print(errno.errorcode[exc.errno], len(held), flush=True)
rt.close(held.pop())
for _ in range(500):  # a close reaches the router asynchronously (it reads the EOF)
    try:
        rt.close(rt.clone(_process.cwd_fd()))
        print("again", flush=True)
        break
    except OSError:
        time.sleep(0.01)
"""


def test_a_client_that_clones_without_end_hits_its_quota_not_the_router(redoxcap_module_system):
    """Issue 8 item 2: each `redoxcap run` is an account of its own; at its quota a
    clone is EMFILE for that client, and the router and every other client go on."""
    kernel = redoxcap_module_system.daemon("kernel")["pid"]
    spare_prepared(redoxcap_module_system)  # counted before as after (it holds a cwd and more)
    fds_before = len(os.listdir(f"/proc/{kernel}/fd"))
    result = redoxcap_module_system.python(CLONER)
    err, count, again = result.stdout.split()
    assert (err, again) == ("EMFILE", "again")
    assert 1000 <= int(count) < 1024  # the default quota, less the namespace and cwd
    assert redoxcap_module_system.daemon("kernel")["pid"] == kernel
    assert redoxcap_module_system.python("import rt; print(rt.listdir('/'))").returncode == 0
    wait_for(lambda: len(os.listdir(f"/proc/{kernel}/fd")) <= fds_before + 2)  # all released


PIPE_FLOODER = r"""
import socket, sys, threading
import rt
from redoxcap.wire import frames as F
from redoxcap.wire import protocol as P

r, w = rt.pipe()  # nobody ever reads r
ends = [w] + [rt.clone(w) for _ in range(7)]
frame = F.encode_request(P.WRITE, 0, [b"x" * P.MAX_IO])
started = threading.Barrier(len(ends) + 1)

def flood(cap):
    s = socket.socket(fileno=cap)
    s.setblocking(True)
    for i in range(200):
        if i == 1:
            started.wait()
        s.send(frame)  # blocks once the router stops reading this end
    print("the router took every write", flush=True)

for cap in ends:
    threading.Thread(target=flood, args=(cap,), daemon=True).start()
started.wait()
print("flooding", flush=True)
sys.stdin.read()
"""


def test_writes_queued_on_a_pipe_nobody_reads_hold_bounded_memory(redoxcap_module_system):
    """Issue 8 item 5: 1,600 writes of 128 KiB at a full pipe. The pipe holds 64 KiB and
    the writers; the router lets each client have only so many requests in flight, so
    the pipe daemon holds a bounded number of them, not every write ever sent."""
    pipe = redoxcap_module_system.daemon("pipe")["pid"]
    quiet = vm_rss_kib(pipe)
    proc = redoxcap_module_system.start("run", "--", sys.executable, "-c", PIPE_FLOODER)
    try:
        assert proc.stdout.readline() == "flooding\n"
        wait_for(lambda: redoxcap_module_system.daemon("pipe")["frames"] >= 64)  # as many as the router lets through
        flooded = vm_rss_kib(pipe)
        assert flooded - quiet < 64 * 1024, (quiet, flooded)  # KiB: 1,600 writes would be 200 MiB
    finally:
        proc.communicate("", timeout=60)  # stdin closes: it exits
    wait_for(lambda: redoxcap_module_system.daemon("pipe")["scheme_handles"] == 0)
