"""The supervisor's control socket: its admission policy in memory, then floods against a real system.

The floods end with the test (their connections close, the supervisor's fd
limit is put back), so the real-system tests share the module's one system.
"""

from __future__ import annotations

import contextlib
import json
import os
import resource
import socket
import struct
import subprocess
import sys
from collections.abc import Iterator
from pathlib import Path

import pytest

from redoxcap import control
from redoxcap.control import Admission, Connection
from redoxcap.testing import System, pid_alive, wait_for
from redoxcap.wire import protocol as P

# -- the admission policy, without sockets -------------------------------------------


def test_admission_bounds_unauthenticated_connections_per_peer_pid():
    admission = Admission(limit=8, per_pid=2)
    a1, a2, a3, b1 = Connection(1), Connection(1), Connection(1), Connection(2)
    assert admission.admit(a1) == (True, None)
    assert admission.admit(a2) == (True, None)
    assert admission.admit(a3) == (False, None)  # pid 1 has its two waiting
    assert admission.admit(b1) == (True, None)  # other peers are not affected
    admission.authenticated(a1)
    assert admission.admit(a3) == (True, None)  # an authenticated one no longer counts


def test_a_full_table_drops_the_oldest_unauthenticated_connection():
    admission = Admission(limit=3, per_pid=3)
    old, owner_busy, middle = Connection(1), Connection(2), Connection(3)
    for conn in (owner_busy, old, middle):
        assert admission.admit(conn) == (True, None)
    admission.authenticated(owner_busy)  # being answered: never evicted
    newcomer = Connection(4)
    assert admission.admit(newcomer) == (True, old)
    assert admission.open == {owner_busy, middle, newcomer}
    assert admission.oldest_waiting() is middle


def test_a_table_full_of_authenticated_connections_refuses_newcomers():
    admission = Admission(limit=2, per_pid=2)
    for conn in (Connection(1), Connection(2)):
        admission.admit(conn)
        admission.authenticated(conn)
    assert admission.admit(Connection(3)) == (False, None)
    admission.release(next(iter(admission.open)))
    assert admission.admit(Connection(3)) == (True, None)


def test_released_connections_give_back_their_pid_slot():
    admission = Admission(limit=4, per_pid=1)
    conn = Connection(7)
    admission.admit(conn)
    admission.release(conn)
    admission.release(conn)  # twice is harmless
    assert admission.admit(Connection(7)) == (True, None)
    assert len(admission.open) == 1


# -- floods against a real system ----------------------------------------------------

FLOODER = """
import select, socket, struct, sys
path, count = sys.argv[1], int(sys.argv[2])

def connect():
    s = socket.socket(socket.AF_UNIX, socket.SOCK_SEQPACKET)
    s.setsockopt(socket.SOL_SOCKET, socket.SO_SNDTIMEO, struct.pack("ll", 5, 0))
    try:
        s.connect(path)
    except OSError:
        s.close()
        return None
    return s

socks = {}
poller = select.poll()
poller.register(sys.stdin.fileno(), select.POLLIN)

def fill():
    while len(socks) < count:
        s = connect()
        if s is None:
            return
        socks[s.fileno()] = s
        poller.register(s.fileno(), select.POLLIN)

fill()
print(len(socks), flush=True)
# keep the flood up: replace every connection the supervisor drops, until stdin closes
while True:
    for fd, _ in poller.poll():
        if fd == sys.stdin.fileno():
            raise SystemExit(0)
        poller.unregister(fd)
        socks.pop(fd).close()
    fill()
"""


def raise_own_fd_limit(needed: int) -> None:
    soft, hard = resource.getrlimit(resource.RLIMIT_NOFILE)
    if hard != resource.RLIM_INFINITY and hard < needed:
        try:  # root (CI) may raise its hard limit; anyone else cannot run this test
            resource.setrlimit(resource.RLIMIT_NOFILE, (needed, needed))
            return
        except (ValueError, OSError):
            pytest.skip(f"RLIMIT_NOFILE hard limit {hard} < {needed}, and it cannot be raised")
    resource.setrlimit(resource.RLIMIT_NOFILE, (max(soft, needed), hard))


@contextlib.contextmanager
def idle_connections(path: Path, count: int) -> Iterator[list[socket.socket]]:
    """count connections from this process that never send anything."""
    socks: list[socket.socket] = []
    try:
        for _ in range(count):
            s = socket.socket(socket.AF_UNIX, socket.SOCK_SEQPACKET)
            socks.append(s)
            s.setsockopt(socket.SOL_SOCKET, socket.SO_SNDTIMEO, struct.pack("ll", 5, 0))
            s.connect(str(path))
        yield socks
    finally:
        for s in socks:
            s.close()


@contextlib.contextmanager
def flooders(path: Path, processes: int, each: int) -> Iterator[list[int]]:
    """processes peers that each keep each connections open, reconnecting whatever is dropped."""
    procs: list[subprocess.Popen] = []
    try:
        for _ in range(processes):
            procs.append(subprocess.Popen([sys.executable, "-c", FLOODER, str(path), str(each)],
                                          stdin=subprocess.PIPE, stdout=subprocess.PIPE, text=True))
        yield [int(p.stdout.readline() or 0) for p in procs]  # each is connected once over
    finally:
        for p in procs:
            p.stdin.close()
        for p in procs:
            try:
                p.wait(timeout=10)
            except subprocess.TimeoutExpired:
                p.kill()
                p.wait()
            p.stdout.close()


@contextlib.contextmanager
def fd_limit_of(pid: int, soft: int) -> Iterator[None]:
    """Lower another process's soft RLIMIT_NOFILE for the block."""
    old = resource.prlimit(pid, resource.RLIMIT_NOFILE)
    resource.prlimit(pid, resource.RLIMIT_NOFILE, (soft, old[1]))
    try:
        yield
    finally:
        resource.prlimit(pid, resource.RLIMIT_NOFILE, old)


def status_from_the_cli(system: System) -> dict:
    """`redoxcap status --json` from a process of its own (this one holds the flood's connections)."""
    return json.loads(system.cli("status", "--json").stdout)


def test_a_flood_of_idle_control_connections_neither_kills_nor_starves_the_supervisor(redoxcap_module_system):
    raise_own_fd_limit(1500)
    path = redoxcap_module_system.state_dir / control.SOCKET_NAME
    before = status_from_the_cli(redoxcap_module_system)
    supervisor = before["supervisor"]
    daemons = {d["name"]: d["pid"] for d in before["daemons"]}
    quiet_fds = len(os.listdir(f"/proc/{supervisor}/fd"))
    with idle_connections(path, 1000) as held, flooders(path, processes=6, each=100) as counts:
        assert len(held) == 1000 and counts == [100] * 6
        # the owner is answered while 1,600 connections are open or being replaced
        for _ in range(3):
            assert status_from_the_cli(redoxcap_module_system)["supervisor"] == supervisor
        # and when the supervisor runs out of fds (fewer than the flood wants): EMFILE at accept
        with fd_limit_of(supervisor, quiet_fds + 6):
            for _ in range(3):
                assert status_from_the_cli(redoxcap_module_system)["supervisor"] == supervisor
            wait_for(lambda: "accept failed (Too many open files)" in redoxcap_module_system.log())
    assert pid_alive(supervisor)
    after = status_from_the_cli(redoxcap_module_system)
    assert {d["name"]: d["pid"] for d in after["daemons"]} == daemons
    assert all(pid_alive(pid) for pid in daemons.values())
    assert "dropping connections that do not authenticate" in redoxcap_module_system.log()
    # a default run still works: the module's system is whole
    assert redoxcap_module_system.python("import rt; print(len(rt.schemes()))").stdout.strip() == str(len(daemons) - 2)


def test_a_connection_that_does_not_authenticate_in_time_is_dropped(redoxcap_module_system):
    path = redoxcap_module_system.state_dir / control.SOCKET_NAME
    with idle_connections(path, 1) as (sock,):
        sock.settimeout(10)
        assert sock.recv(100) == b""  # closed by the supervisor after AUTH_DEADLINE, unanswered
    assert redoxcap_module_system.status()["supervisor"]


def test_fds_passed_to_the_control_socket_are_not_kept(redoxcap_module_system):
    path = redoxcap_module_system.state_dir / control.SOCKET_NAME
    supervisor = redoxcap_module_system.status()["supervisor"]
    fds_before = len(os.listdir(f"/proc/{supervisor}/fd"))
    r, w = os.pipe()
    try:
        with idle_connections(path, 1) as (sock,):
            sock.sendmsg([P.pack({"token": "guess", "op": "ping"})], P.fds_ancillary([r] * 100))
            assert P.unpack(sock.recv(4096)) == {"ok": False, "error": "permission denied: bad token"}
    finally:
        os.close(r)
        os.close(w)
    wait_for(lambda: len(os.listdir(f"/proc/{supervisor}/fd")) <= fds_before)
