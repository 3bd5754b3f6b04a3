"""What one client can make the uds daemon hold in its connections is bounded and charged to it.

Every request says which router account it is for; the bytes an account's
writes leave unread in connections and the fds its SENDFDs leave unreceived
are counted against that account, in all its connections together, and given
back when they are read or received or their connection closes. Past the
bounds a write waits (as for a full connection) and a SENDFD fails with an
errno, so a client with many connections parks no more than one with a few,
and another client is served all the same.
"""

from __future__ import annotations

import errno
import os
import sys

import pytest
import trio
import trio.testing
from test_hostile_more import riding_fds

from redoxcap.schemes.framework import Caller, Request, SchemeError, invoke
from redoxcap.schemes.uds import (
    ACCOUNT_BUFFER,
    ACCOUNT_QUEUED_FDS,
    MAX_QUEUED_FDS,
    STREAM_BUFFER,
    UdsScheme,
)
from redoxcap.testing import wait_for
from redoxcap.wire import protocol as P

QUOTA = 1024  # the default capability quota of a client account (kernel/accounts.py)
NOTHING_HELD = {"buffered": 0, "queued_fds": 0, "accounts": 0}  # the uds daemon's status detail


def fds_of(pid: int) -> int:
    return len(os.listdir(f"/proc/{pid}/fd"))


def vm_rss_kib(pid: int) -> int:
    with open(f"/proc/{pid}/status") as f:
        return next(int(line.split()[1]) for line in f if line.startswith("VmRSS:"))


# Listens on 8 names and connects 120 times to each, never accepting, writing STREAM_BUFFER
# (256 KiB) into each connection. Without a bound per account it parks 240 MiB in the
# daemon with every write answered at once; with one, a write waits once the account's
# bytes are all in connections: it stops at the first write that is not answered within
# 3 s, and says how many bytes its answered writes took.
UDS_BUFFER_FILLER = r"""
import errno, sys, rt
from redoxcap.wire import protocol as P
from redoxcap.wire.call import set_default_timeout
set_default_timeout(3)
data = b"x" * P.MAX_IO
held, written = [], 0
try:
    for l in range(8):
        held.append(rt.open(f"/scheme/uds/l{l}", rt.O_CREAT | rt.O_RDWR))
        for c in range(120):
            fd = rt.open(f"/scheme/uds/l{l}", rt.O_RDWR)
            held.append(fd)
            for _ in range(2):
                written += rt.write(fd, data)
except OSError as exc:
    assert exc.errno == errno.ETIMEDOUT, exc
    print("waited", flush=True)
print("ready", written, flush=True)
sys.stdin.read()
"""


def held_in_connections(system) -> dict:
    """What the uds daemon says it holds in connections (UdsScheme.status)."""
    return system.daemon("uds")["detail"]


def fill_uds_buffers(system) -> tuple[list[str], int]:
    """Run UDS_BUFFER_FILLER until it is ready: (what it said, the daemon's growth in KiB)."""
    uds = system.daemon("uds")["pid"]
    quiet = vm_rss_kib(uds)
    proc = system.start("run", "--", sys.executable, "-c", UDS_BUFFER_FILLER)
    said = []
    try:
        while not said or not said[-1].startswith("ready"):
            line = proc.stdout.readline()
            assert line, proc.stderr.read()
            said.append(line.strip())
        flooded = vm_rss_kib(uds)
    finally:
        proc.communicate("", timeout=60)
    return said, flooded - quiet


def test_bytes_a_client_parks_in_uds_connections_are_bounded(redoxcap_system):
    """One client with 960 unaccepted connections (fewer capabilities than its quota) once
    made the uds daemon hold 240 MiB, every write answered at once. Now its writes wait
    once its account's bytes are in connections, and the daemon grows by a few MiB."""
    said, grown = fill_uds_buffers(redoxcap_system)
    assert said == ["waited", f"ready {ACCOUNT_BUFFER}"]
    grown //= 1024
    assert grown < 64, f"the uds daemon grew by {grown} MiB for one client"
    # what the client's connections held is given back when it exits: the next has it all
    wait_for(lambda: held_in_connections(redoxcap_system) == NOTHING_HELD, timeout=30)
    again, _ = fill_uds_buffers(redoxcap_system)
    assert again == said
    wait_for(lambda: held_in_connections(redoxcap_system) == NOTHING_HELD, timeout=30)


# SENDFD of one and the same capability (one zero fd: the router counts one capability)
# 64 times (MAX_QUEUED_FDS) into each of its connections, which nobody accepts. It stops
# at the first SENDFD that fails (the errno it got) or is not answered within 5 s, or
# after 40,960.
UDS_FD_PARKER = r"""
import sys, rt
from redoxcap.wire.call import call, set_default_timeout
from redoxcap.wire import protocol as P
set_default_timeout(5)
z = rt.open("/scheme/zero")
held, sent = [], 0
try:
    for l in range(8):
        held.append(rt.open(f"/scheme/uds/f{l}", rt.O_CREAT | rt.O_RDWR))
        for c in range(80):
            fd = rt.open(f"/scheme/uds/f{l}", rt.O_RDWR)
            held.append(fd)
            for k in range(64):
                call(fd, P.SENDFD, [], [z])
                sent += 1
except OSError as exc:
    print("stopped:", exc.errno, exc, flush=True)
print("ready", sent, len(held), flush=True)
sys.stdin.read()
"""

UDS_VICTIM = r"""
import rt
from redoxcap.wire.call import call, set_default_timeout
from redoxcap.wire import protocol as P
set_default_timeout(10)
listener = rt.open("/scheme/uds/v", rt.O_CREAT | rt.O_RDWR)
conn = rt.open("/scheme/uds/v", rt.O_RDWR)
call(conn, P.SENDFD, [], [rt.open("/scheme/zero")])
print("served", flush=True)
"""


def test_fds_a_client_queues_in_uds_connections_are_charged_and_leave_others_served(
        redoxcap_system):
    """One client with fewer than 700 capabilities once made the uds daemon hold every fd
    it may open (64 queued copies of one capability per connection), after which the
    daemon dropped every frame that carried an fd: another client's SENDFD was never
    answered. Now the client's SENDFDs fail with an errno past its account's bound, the
    daemon holds far fewer fds than the client's quota, and another client is served."""
    uds = redoxcap_system.daemon("uds")["pid"]
    before = fds_of(uds)
    attacker = redoxcap_system.start("run", "--", sys.executable, "-c", UDS_FD_PARKER)
    try:
        said = []
        while not said or not said[-1].startswith("ready"):
            line = attacker.stdout.readline()
            assert line, attacker.stderr.read()
            said.append(line.strip())
        held = fds_of(uds) - before
        victim = redoxcap_system.python(UDS_VICTIM, check=False, timeout=120)
    finally:
        attacker.communicate("", timeout=60)
    wait_for(lambda: fds_of(uds) <= before + 2, timeout=30)
    assert held <= QUOTA and victim.returncode == 0, (
        f"the uds daemon held {held} fds for one client ({said}); another client's "
        f"SENDFD: exit {victim.returncode}, {victim.stderr.strip()[-200:]!r}")
    assert said[0].startswith(f"stopped: {errno.ETOOMANYREFS} ")
    assert said[-1].split()[1] == str(ACCOUNT_QUEUED_FDS)
    wait_for(lambda: held_in_connections(redoxcap_system) == NOTHING_HELD, timeout=30)


# One account's bounds used up, given back by reading and receiving (every end stays
# open), and used up again: the same bytes and fds each time. A write that waits is the
# last of a fill (3 s, then the client stops waiting for its reply); the daemon still
# holds it, and it goes on once there is room, so its bytes are read with the rest.
UDS_BOUNDS_REUSED = r"""
import errno, sys, rt
from redoxcap.wire import protocol as P
from redoxcap.wire.call import call, set_default_timeout
set_default_timeout(3)
data = b"x" * P.MAX_IO

def fill(name):
    listener = rt.open(f"/scheme/uds/{name}", rt.O_CREAT | rt.O_RDWR)
    sizes = []
    try:
        while True:
            fd = rt.open(f"/scheme/uds/{name}", rt.O_RDWR)
            sizes.append(0)
            for _ in range(2):
                sizes[-1] += rt.write(fd, data)
    except TimeoutError:
        sizes[-1] += len(data)  # the write that waits: all of it comes in later
    for size in sizes:  # in the order they connected
        end = rt.dup(listener, b"accept")
        while size:
            size -= len(rt.read(end, size))
    return sum(sizes) - len(data)

def queue(name):
    listener = rt.open(f"/scheme/uds/{name}", rt.O_CREAT | rt.O_RDWR)
    z = rt.open("/scheme/zero")
    counts = []
    try:
        while True:
            fd = rt.open(f"/scheme/uds/{name}", rt.O_RDWR)
            counts.append(0)
            for _ in range(64):
                call(fd, P.SENDFD, [], [z])
                counts[-1] += 1
    except OSError as exc:
        assert exc.errno == errno.ETOOMANYREFS, exc
    for count in counts:
        end = rt.dup(listener, b"accept")
        for _ in range(count):
            rt.close(rt.recvfd(end))
    return sum(counts)

print("bytes", fill("b1"), fill("b2"), "fds", queue("f1"), queue("f2"), flush=True)
"""


def test_what_an_account_was_charged_is_given_back_when_read_received_or_closed(redoxcap_system):
    """The counts do not drift: a client that read and received what its bounds held can use
    them whole again, and once it has exited (every end closed) the daemon holds nothing."""
    said = redoxcap_system.python(UDS_BOUNDS_REUSED, timeout=120).stdout.split()
    assert said == ["bytes", str(ACCOUNT_BUFFER), str(ACCOUNT_BUFFER),
                    "fds", str(ACCOUNT_QUEUED_FDS), str(ACCOUNT_QUEUED_FDS)]
    wait_for(lambda: held_in_connections(redoxcap_system) == NOTHING_HELD, timeout=30)


# 64 READs (the account's bound of requests in flight: 16 on each of 4 clones) on a uds
# connection nobody writes to, each with 253 copies of one junk fd riding along: held
# while the reads waited, they were some 16,000 fds the client made the daemon hold.
UDS_RIDING_FDS = riding_fds(
    'listener = rt.open("/scheme/uds/quiet", rt.O_CREAT | rt.O_RDWR)\n'
    'conn = rt.open("/scheme/uds/quiet", rt.O_RDWR)\n'
    "caps = [conn] + [rt.clone(conn) for _ in range(3)]",
    "F.encode_request(P.READ, i + 1, [1])",
    then="replies = [F.decode_reply(s.recv(P.MAX_FRAME)) for s in socks for _ in range(16)]\n"
         "print(sorted({(status, value) for _, status, value in replies}), flush=True)")


def test_fds_riding_on_uds_requests_that_wait_are_not_held(redoxcap_system):
    """Fds passed with a request that takes none (a read) never wait in the daemon: the
    router refuses them (EINVAL, every fd closed; wire/ops.py's max_fds), and the daemon
    closes any that come with an operation that takes none before it waits. The daemon
    held all 16,192 of them, for as long as the reads waited."""
    daemon = redoxcap_system.daemon("uds")
    uds, before = daemon["pid"], fds_of(daemon["pid"])
    proc = redoxcap_system.start("run", "--", sys.executable, "-c", UDS_RIDING_FDS)
    try:
        line = proc.stdout.readline()
        assert line == f"{[(P.ERR, errno.EINVAL)]}\n", proc.stderr.read() if proc.poll() is not None else line
        held = fds_of(uds) - before
    finally:
        proc.communicate("", timeout=60)
    assert held <= 16, f"the uds daemon holds {held} fds for reads that wait"


# -- the same, in memory: the scheme's methods called directly -------------------------------


def req(account: int, op: int = 0, passed=()) -> Request:
    return Request(Caller(os.getpid(), 0, 0), 0, op, list(passed), account=account)


async def connected(s: UdsScheme, name: str):
    """(listener, connecting end, accepted end) of a new connection on name."""
    listener = (await invoke(s, req(0), s.root(), "openat", name, os.O_CREAT | os.O_RDWR, 0)).obj
    client = (await invoke(s, req(0), s.root(), "openat", name, os.O_RDWR, 0)).obj
    server = (await invoke(s, req(0), listener, "dup", b"accept")).obj
    return listener, client, server


async def sendfd(s: UdsScheme, account: int, conn, fd: int) -> int:
    """SENDFD of a dup of fd on conn for account: 0, or the errno; leftovers closed as the
    framework closes them."""
    request = req(account, P.SENDFD, [os.dup(fd)])
    try:
        await invoke(s, request, conn, "sendfd")
        return 0
    except SchemeError as exc:
        return exc.errno
    finally:
        P.close_fds(request.passed_fds())


async def test_an_accounts_writes_wait_once_its_bytes_in_all_its_connections_reach_the_bound():
    s = UdsScheme()
    full = ACCOUNT_BUFFER // STREAM_BUFFER
    pairs = [await connected(s, f"c{i}") for i in range(full + 1)]
    for _, client, _ in pairs[:full]:
        assert await invoke(s, req(1), client, "write", b"x" * STREAM_BUFFER) == STREAM_BUFFER
    _, client, server = pairs[full]
    assert await invoke(s, req(2), client, "write", b"y") == 1  # another account's bound
    wrote = []

    async def writer() -> None:
        wrote.append(await invoke(s, req(1), client, "write", b"z" * 10))

    with trio.fail_after(5):
        async with trio.open_nursery() as nursery:
            nursery.start_soon(writer)
            await trio.testing.wait_all_tasks_blocked()
            assert wrote == []  # room in this connection, none in the account's bound
            assert await invoke(s, req(3), pairs[0][2], "read", 4) == b"xxxx"
            await trio.testing.wait_all_tasks_blocked()
            assert wrote == []  # 4 bytes taken, 6 to go
            await invoke(s, req(3), pairs[1][2], "read", 100)
    assert wrote == [10]
    assert await invoke(s, req(3), server, "read", 100) == b"y" + b"z" * 10
    assert s.ledger.room(1) == 104  # the 10 bytes read are given back too
    # the reading end's close gives back what it held; the writing end's keeps it readable
    await s.close(pairs[0][2])
    await s.close(pairs[1][1])
    assert s.ledger.room(1) == STREAM_BUFFER + 100
    left = STREAM_BUFFER - 100
    while left:  # a read takes at most P.MAX_IO
        left -= len(await invoke(s, req(3), pairs[1][2], "read", left))
    assert s.ledger.room(1) == 2 * STREAM_BUFFER
    for listener, client, server in pairs:
        for h in (client, server, listener):
            await s.close(h)
    assert s.ledger.accounts == {} and s.ledger.buffered == 0


async def test_a_write_waiting_for_the_accounts_bound_ends_when_its_peer_closes():
    s = UdsScheme()
    _, client, server = await connected(s, "waits")
    others = [await connected(s, f"c{i}") for i in range(ACCOUNT_BUFFER // STREAM_BUFFER)]
    for _, other, _ in others:
        await invoke(s, req(1), other, "write", b"x" * STREAM_BUFFER)
    with trio.fail_after(5):
        async with trio.open_nursery() as nursery:
            failed = []

            async def writer() -> None:
                with pytest.raises(SchemeError) as info:
                    await invoke(s, req(1), client, "write", b"z")
                failed.append(info.value.errno)

            nursery.start_soon(writer)
            await trio.testing.wait_all_tasks_blocked()
            await s.close(server)
    assert failed == [errno.EPIPE]
    for _, _, other_server in others:
        await s.close(other_server)
    assert s.ledger.accounts == {}


async def test_an_accounts_queued_fds_are_bounded_in_all_its_connections_and_given_back():
    s = UdsScheme(max_queued_fds_total=ACCOUNT_QUEUED_FDS + 2)
    r, w = os.pipe()
    fds_before = len(os.listdir("/proc/self/fd"))
    full = ACCOUNT_QUEUED_FDS // MAX_QUEUED_FDS
    pairs = [await connected(s, f"c{i}") for i in range(full + 2)]
    for _, client, _ in pairs[:full]:
        for _ in range(MAX_QUEUED_FDS):
            assert await sendfd(s, 1, client, r) == 0
    client, spare = pairs[full][1], pairs[full + 1][1]
    assert await sendfd(s, 1, client, r) == errno.ETOOMANYREFS  # room in this queue
    # the bound of all accounts together (here 2 more than one account's)
    assert [await sendfd(s, 2, client, r) for _ in range(3)] == [0, 0, errno.ENFILE]
    # an fd received, or closed with the end it waited for, is given back to its sender
    os.close((await invoke(s, req(3), pairs[0][2], "recvfd")).fds[0])
    assert await sendfd(s, 1, client, r) == 0
    assert await sendfd(s, 1, client, r) == errno.ETOOMANYREFS
    await s.close(pairs[1][2])
    assert [await sendfd(s, 1, spare, r) for _ in range(MAX_QUEUED_FDS)] == [0] * MAX_QUEUED_FDS
    assert s.ledger.accounts[1].queued_fds == ACCOUNT_QUEUED_FDS
    assert s.ledger.queued_fds == ACCOUNT_QUEUED_FDS + 2
    for listener, client, server in pairs:
        for h in (client, server, listener):
            await s.close(h)
    assert s.ledger.accounts == {} and s.ledger.queued_fds == 0
    assert len(os.listdir("/proc/self/fd")) == fds_before
    os.close(r)
    os.close(w)


async def test_fds_passed_with_a_uds_request_that_waits_are_closed_before_it_waits():
    s = UdsScheme()
    _, client, _ = await connected(s, "quiet")
    r, w = os.pipe()
    request = req(1, P.READ, [os.dup(r) for _ in range(10)])
    fds_before = len(os.listdir("/proc/self/fd"))
    with trio.fail_after(5):
        async with trio.open_nursery() as nursery:
            nursery.start_soon(invoke, s, request, client, "read", 1)
            await trio.testing.wait_all_tasks_blocked()
            assert len(os.listdir("/proc/self/fd")) == fds_before - 10
            nursery.cancel_scope.cancel()
    os.close(r)
    os.close(w)
