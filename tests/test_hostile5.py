"""A fifth hostile pass: pipes, files, nsmgr, the router's replies, udp/tcp/log, control.

Each test here failed on the code it was written against (main 8f8c3d3) and says
what it showed, measured from outside through the real processes.
"""

from __future__ import annotations

import re
import shutil
import subprocess
import sys
import time

import pytest

MIB = 1024 * 1024
QUEUED_BOUND = 16 * MIB  # a client account's reply bytes queued (kernel/accounts.py)


def socket_write_bytes(pid: int) -> int:
    """The bytes sent on pid's Unix sockets that their peers have not read yet (the sum
    of each socket's wmem as `ss -xmp` reports it): kernel memory the sender's sends hold."""
    out = subprocess.run(["ss", "-xmpa"], capture_output=True, text=True, check=True).stdout
    lines = out.splitlines()
    total = 0
    for i, line in enumerate(lines):
        if f"pid={pid}," not in line:
            continue
        for text in lines[i:i + 2]:
            match = re.search(r"skmem:\(r\d+,rb\d+,t(\d+)", text)
            if match:
                total += int(match.group(1))
                break
    return total


def most_of(measure, seconds: float) -> int:
    """The most measure() answered while polled for that long."""
    most = measure()
    end = time.monotonic() + seconds
    while time.monotonic() < end:
        time.sleep(0.2)
        most = max(most, measure())
    return most


# Clones one capability of /scheme/zero up to argv[1] times, sends four READs of MAX_IO
# bytes on each without reading a reply, says `ready` and holds on; given a line, reads every
# reply that came and then makes one call more (its account must be served again).
NEVER_READS = r"""
import os, socket, sys, rt
from redoxcap.wire import frames as F
from redoxcap.wire import protocol as P
z = rt.open('/scheme/zero', os.O_RDONLY)
caps = [z]
try:
    while len(caps) < int(sys.argv[1]):
        caps.append(rt.clone(z))
except OSError:
    pass  # the quota: as many as it allows
frame = F.encode_request(P.READ, 1, [P.MAX_IO])
socks = [socket.socket(fileno=c) for c in caps]
for s in socks:
    s.setblocking(False)
sent = 0
for _ in range(4):
    for s in socks:
        try:
            s.send(frame)
            sent += 1
        except BlockingIOError:
            pass
print('ready', len(caps), sent, flush=True)
sys.stdin.readline()
import select, time
got, deadline = 0, time.monotonic() + 60
while got < sent and time.monotonic() < deadline:  # the rest come as the router resumes
    for s in socks:
        try:
            while s.recv(P.MAX_FRAME):
                got += 1
        except BlockingIOError:
            pass
    time.sleep(0.01)
start = time.monotonic()
data = rt.read(rt.clone(z), 1)
print('served again', got == sent, len(data), round(time.monotonic() - start, 1), flush=True)
"""


@pytest.mark.skipif(shutil.which("ss") is None, reason="needs ss (iproute2)")
def test_replies_a_client_never_reads_are_bounded_by_its_queued_bytes(redoxcap_system):
    """A client that never reads its replies is meant to stop being served once 16 MiB
    of replies wait for it (`max_queued_bytes`): the router's outbox. But the router
    counts only what its outbox holds, not what it has sent into the client's sockets:
    every capability's socket takes about one 128 KiB reply (its SO_SNDBUF) that the
    router counts as delivered. One client with 1,000 clones of /scheme/zero, four
    unread READs on each, made the router's sockets hold 85-130 MB of kernel memory
    (~210 MiB of MemAvailable gone in one run), 5-8x its bound besides the 16 MiB its
    outbox may hold too, and every further client account as much again: memory the
    machine runs out of, charged to no one. Now what its sockets hold unread counts
    against the bound (kernel/accounts.py, Account.landed), and once it reads, every
    reply comes and it is served again."""
    router = redoxcap_system.daemon("kernel")["pid"]
    before = socket_write_bytes(router)
    proc = redoxcap_system.start("run", "--", sys.executable, "-c", NEVER_READS, "1000")
    try:
        line = proc.stdout.readline()
        assert line.startswith("ready"), proc.stderr.read()
        held = most_of(lambda: socket_write_bytes(router) - before, 5)
        out, err = proc.communicate("go\n", timeout=120)
    finally:
        if proc.poll() is None:
            proc.kill()
            proc.communicate()
    assert "served again True 1" in out, (out, err)
    assert held <= 2 * QUEUED_BOUND, (
        f"the router holds {held / MIB:.0f} MiB in sockets of replies one client never "
        f"reads; its bound is {QUEUED_BOUND // MIB} MiB")


def tcp_memory() -> int:
    """Bytes of the host's TCP buffers in use (/proc/net/sockstat, in pages)."""
    with open("/proc/net/sockstat") as f:
        for line in f:
            if line.startswith("TCP:"):
                words = line.split()
                return int(words[words.index("mem") + 1]) * 4096
    raise AssertionError("no TCP line in /proc/net/sockstat")


# argv[1] listeners on 127.0.0.1; on each, argv[2] connections, each written 60,000 bytes
# and closed at once (one thread per listener): they wait in the listener's backlog, never
# accepted, their data unread. What it keeps: the listeners' capabilities, nothing else.
BACKLOG_FILLER = r"""
import os, sys, threading, rt
def fill(listener, port):
    tcp = rt.open('/scheme/tcp', os.O_RDONLY | os.O_DIRECTORY)  # a handle of its own
    for j in range(int(sys.argv[2])):
        try:
            conn = rt.openat(tcp, f'127.0.0.1/{port}', os.O_RDWR)
        except TimeoutError:
            break  # the backlog is full: Linux drops the connection attempt
        try:
            rt.write(conn, b'x' * 60000)
        finally:
            rt.close(conn)
    rt.close(tcp)
listeners = [rt.open('/scheme/tcp/127.0.0.1/0', os.O_CREAT | os.O_RDWR)
             for _ in range(int(sys.argv[1]))]
threads = [threading.Thread(target=fill, args=(listener, rt.fpath(listener).rsplit('/', 1)[1]))
           for listener in listeners]
for thread in threads:
    thread.start()
for thread in threads:
    thread.join()
print('ready', len(listeners), flush=True)
sys.stdin.read()
"""
TCP_SOCKET_BUFFER = 64 * 1024  # schemes/tcp.py SOCKET_BUFFER; Linux doubles it
LISTEN_BACKLOG, MAX_LISTENERS = 16, 64  # schemes/tcp.py


def test_connections_waiting_in_a_listeners_backlog_are_bounded_per_account(redoxcap_system):
    """Connections waiting in a tcp listener's backlog are no one's capability, yet each
    holds what its peer sent. With listen(128), a client connecting to its own listeners,
    writing 60 KB and closing, made 8 listener capabilities hold ~60 MiB of the host's TCP
    memory (~7.5 MiB each); a client's 1,024 capabilities would have held ~7.5 GB, past the
    host's tcp_mem limit (a few GB), where every TCP socket on the host, every other
    client's, is under memory pressure. Now a backlog is 16 (connects past it time out, as
    Linux drops them) and an account holds at most 64 listeners (EMFILE): what its waiting
    connections hold is about what its capabilities of accepted ones may."""
    before = tcp_memory()
    proc = redoxcap_system.start("run", "--", sys.executable, "-c", BACKLOG_FILLER, "8", "120")
    try:
        line = proc.stdout.readline()
        assert line.startswith("ready"), proc.stderr.read()
        held = most_of(lambda: tcp_memory() - before, 2)
    finally:
        proc.communicate("", timeout=60)
    bound = 8 * (LISTEN_BACKLOG + 1) * 2 * TCP_SOCKET_BUFFER  # a full receive buffer each
    assert held <= bound, (f"8 listener capabilities hold {held / MIB:.0f} MiB of TCP memory "
                           f"in their backlogs; at most {bound / MIB:.0f} MiB should wait there")


def test_a_client_holds_a_bounded_number_of_listeners(redoxcap_system):
    """The other half of the bound above: past 64 listeners an open is EMFILE, closing one
    makes room again, and another client's listeners are not counted against it."""
    program = f"""
import errno, os, time, rt
listeners = [rt.open('/scheme/tcp/127.0.0.1/0', os.O_CREAT | os.O_RDWR) for _ in range({MAX_LISTENERS})]
try:
    rt.open('/scheme/tcp/127.0.0.1/0', os.O_CREAT | os.O_RDWR)
    print('65th opened')
except OSError as exc:
    print('65th', errno.errorcode[exc.errno])
rt.close(listeners.pop())
for _ in range(500):  # the daemon hears of the close after the router does
    try:
        listeners.append(rt.open('/scheme/tcp/127.0.0.1/0', os.O_CREAT | os.O_RDWR))
        break
    except OSError as exc:
        assert exc.errno == errno.EMFILE, exc
        time.sleep(0.01)
conn = rt.open(rt.fpath(listeners[-1]), os.O_RDWR)  # the new one listens
print('again ok', flush=True)
input()
"""
    first = redoxcap_system.start("run", "--", sys.executable, "-c", program)
    try:
        assert first.stdout.readline().strip() == "65th EMFILE", first.stderr.read()
        assert first.stdout.readline().strip() == "again ok", first.stderr.read()
        other = redoxcap_system.python("import os, rt; rt.open('/scheme/tcp/127.0.0.1/0', "
                                       "os.O_CREAT | os.O_RDWR); print('other ok')", timeout=60)
        assert "other ok" in other.stdout
    finally:
        first.communicate("\n", timeout=60)
