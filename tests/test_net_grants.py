"""Narrow network grants in memory: a tcp or udp capability that reaches only what it lists.

`dup(root, b"grant:" + JSON)` makes a grant; opening through it is EACCES for
every endpoint it does not list, a grant narrows only to a subset of itself,
and a grant never exceeds the daemon's policy. Sockets are real (loopback).
"""

from __future__ import annotations

import errno
import json
import os
import socket

import pytest
import trio

from redoxcap.schemes.framework import Caller, Request, SchemeError, invoke
from redoxcap.schemes.netaddr import MAX_GRANT_ENTRIES, NetGrant, NetRoot
from redoxcap.schemes.tcp import NetPolicy, TcpScheme
from redoxcap.schemes.udp import UdpScheme
from redoxcap.testing import free_port, nobody_listens

LISTEN = os.O_CREAT | os.O_RDWR


def req() -> Request:
    return Request(Caller(os.getpid(), 0, 0), 0, 0, [])


async def fails_with(err: int, coro) -> None:
    """Await coro and check that it raised the scheme error err."""
    with pytest.raises(SchemeError) as info:
        await coro
    assert info.value.errno == err, f"{errno.errorcode.get(info.value.errno)} != {errno.errorcode[err]}"


def grant_buf(connect=(), listen=()) -> bytes:
    return b"grant:" + json.dumps({"connect": [list(c) for c in connect],
                                   "listen": [p if isinstance(p, int) else list(p) for p in listen]}).encode()


async def grant(s, base, connect=(), listen=()):
    return (await invoke(s, req(), base, "dup", grant_buf(connect, listen))).obj


@pytest.fixture
def listeners():
    """make() -> the port of a new host listener on 127.0.0.1; all closed afterwards."""
    made: list[socket.socket] = []

    def make() -> int:
        sock = socket.create_server(("127.0.0.1", 0))
        made.append(sock)
        return sock.getsockname()[1]

    yield make
    for sock in made:
        sock.close()


async def test_a_connect_grant_reaches_its_peers_and_nothing_else(listeners):
    s = TcpScheme()
    allowed, other = listeners(), listeners()
    g = await grant(s, s.root(), connect=[("127.0.0.1", allowed)])
    conn = (await invoke(s, req(), g, "openat", f"127.0.0.1/{allowed}", os.O_RDWR, 0)).obj
    assert await invoke(s, req(), conn, "fpath") == f"/scheme/tcp/127.0.0.1/{allowed}"
    await s.close(conn)
    await fails_with(errno.EACCES, invoke(s, req(), g, "openat", f"127.0.0.1/{other}", os.O_RDWR, 0))
    await fails_with(errno.EACCES, invoke(s, req(), g, "openat", f"::ffff:7f00:1/{allowed}", os.O_RDWR, 0))
    port = free_port()
    for path in (f"127.0.0.1/{port}", "127.0.0.1/0", f"127.0.0.1/{allowed}"):
        await fails_with(errno.EACCES, invoke(s, req(), g, "openat", path, LISTEN, 0))
    assert nobody_listens(port)
    # malformed is still EINVAL, and the policy still speaks first
    await fails_with(errno.EINVAL, invoke(s, req(), g, "openat", "127.1/80", os.O_RDWR, 0))
    await fails_with(errno.EACCES, invoke(s, req(), g, "openat", "0.0.0.0/0", LISTEN, 0))


async def test_a_grant_looks_like_a_root_so_a_namespace_can_hold_it():
    for s in (TcpScheme(), UdpScheme()):
        g = await grant(s, s.root(), connect=[("127.0.0.1", 9)])
        assert isinstance(g, NetGrant)
        assert await invoke(s, req(), g, "fpath") == await invoke(s, req(), s.root(), "fpath")
        assert await invoke(s, req(), g, "fstat") == await invoke(s, req(), s.root(), "fstat")
        await fails_with(errno.EACCES, invoke(s, req(), g, "getdents", 0))
        await fails_with(errno.EBADF, invoke(s, req(), g, "read", 1))
        await fails_with(errno.EBADF, invoke(s, req(), g, "write", b"x"))
        # "." with O_DIRECTORY is another handle on the same grant (or root)
        again = await invoke(s, req(), g, "openat", ".", os.O_RDONLY | os.O_DIRECTORY, 0)
        assert again.obj is g and again.fdflags & os.O_DIRECTORY
        assert (await invoke(s, req(), s.root(), "openat", "", os.O_DIRECTORY, 0)).obj is s.root()
        await fails_with(errno.EINVAL, invoke(s, req(), g, "openat", ".", os.O_RDONLY, 0))
        await s.close(g)


async def test_a_listen_port_means_loopback_and_a_host_means_that_host():
    s = TcpScheme()
    port = free_port(host="::1")
    g = await grant(s, s.root(), listen=[port, ("127.0.0.2", 0)])
    made = []
    for path in (f"127.0.0.1/{port}", f"::1/{port}", "127.0.0.2/0"):
        made.append((await invoke(s, req(), g, "openat", path, LISTEN, 0)).obj)
    assert made[2].sock.getsockname()[0] == "127.0.0.2" and made[2].sock.getsockname()[1] > 0
    for path in (f"127.0.0.2/{port}", f"127.0.0.1/{port + 1 if port < 65535 else port - 1}",
                 "127.0.0.1/0", f"::ffff:7f00:1/{port}"):
        await fails_with(errno.EACCES, invoke(s, req(), g, "openat", path, LISTEN, 0))
    # a listen grant is no connect grant, even to its own listener
    await fails_with(errno.EACCES, invoke(s, req(), g, "openat", f"127.0.0.1/{port}", os.O_RDWR, 0))
    for h in made:
        await s.close(h)


async def test_a_grant_narrows_only_to_a_subset_of_itself(listeners):
    s = TcpScheme()
    a, b = listeners(), listeners()
    wide = await grant(s, s.root(), connect=[("127.0.0.1", a), ("127.0.0.1", b)], listen=[5000])
    same = await grant(s, wide, connect=[("127.0.0.1", b), ("127.0.0.1", a)], listen=[5000])
    assert same == wide
    narrow = await grant(s, wide, connect=[("127.0.0.1", a)], listen=[("::1", 5000)])
    await s.close((await invoke(s, req(), narrow, "openat", f"127.0.0.1/{a}", os.O_RDWR, 0)).obj)
    await fails_with(errno.EACCES, invoke(s, req(), narrow, "openat", f"127.0.0.1/{b}", os.O_RDWR, 0))
    await fails_with(errno.EACCES, invoke(s, req(), narrow, "openat", "127.0.0.1/5000", LISTEN, 0))
    nothing = await grant(s, narrow)
    await fails_with(errno.EACCES, invoke(s, req(), nothing, "openat", f"127.0.0.1/{a}", os.O_RDWR, 0))
    for base, connect, listen in [
        (narrow, [("127.0.0.1", a), ("127.0.0.1", b)], []),  # back to what it had: no
        (narrow, [], [5000]),  # 5000 on 127.0.0.1 too
        (wide, [("127.0.0.1", a)], [5001]),
        (wide, [("127.0.0.2", a)], []),
        (nothing, [("127.0.0.1", a)], []),
    ]:
        await fails_with(errno.EACCES, invoke(s, req(), base, "dup", grant_buf(connect, listen)))


async def test_a_grant_never_exceeds_the_daemons_policy():
    for make in (TcpScheme, UdpScheme):
        s = make()
        for listen in ([80], [("0.0.0.0", 0)], [("::", 8080)], [("224.0.0.1", 5000)],
                       [("255.255.255.255", 5000)]):
            await fails_with(errno.EACCES, invoke(s, req(), s.root(), "dup", grant_buf(listen=listen)))
        wide = make(policy=NetPolicy(allow_wildcard=True))
        g = await grant(wide, wide.root(), listen=[("0.0.0.0", 0)])
        h = (await invoke(wide, req(), g, "openat", "0.0.0.0/0", LISTEN, 0)).obj
        await wide.close(h)


MALFORMED = [
    b"grant:", b"grant:[]", b"grant:null", b"grant:{", b'grant:{"connect": []} x', b"grant:\xff{}",
    b'grant:{"bind": []}', b'grant:{"connect": [], "connect": []}', b'grant:{"connect": {}}',
    b'grant:{"connect": "127.0.0.1:80"}', b'grant:{"connect": [80]}',
    b'grant:{"connect": [["localhost", 80]]}', b'grant:{"connect": [["127.1", 80]]}',
    b'grant:{"connect": [["[::1]", 80]]}', b'grant:{"connect": [["fe80::1%eth0", 80]]}',
    b'grant:{"connect": [["127.0.0.1", 0]]}', b'grant:{"connect": [["0.0.0.0", 80]]}',
    b'grant:{"connect": [["127.0.0.1", 65536]]}', b'grant:{"connect": [["127.0.0.1", "80"]]}',
    b'grant:{"connect": [["127.0.0.1", 80.0]]}', b'grant:{"connect": [["127.0.0.1", true]]}',
    b'grant:{"connect": [["127.0.0.1", NaN]]}', b'grant:{"connect": [["127.0.0.1"]]}',
    b'grant:{"connect": [["127.0.0.1", 80, 1]]}', b'grant:{"connect": [[80, "127.0.0.1"]]}',
    b'grant:{"listen": [-1]}', b'grant:{"listen": [65536]}', b'grant:{"listen": ["5000"]}',
    b'grant:{"listen": [[5000]]}', b'grant:{"listen": [true]}', b'grant:{"listen": null}',
    b"grant:" + b"[" * 100_000 + b"]" * 100_000,
    b'grant:{"listen": [' + b",".join([b"5000"] * (MAX_GRANT_ENTRIES + 1)) + b"]}",
    b"grants:{}", b"accept", b"",
]


@pytest.mark.parametrize("buf", MALFORMED, ids=lambda b: repr(b[:40]))
@pytest.mark.parametrize("make", [TcpScheme, UdpScheme])
async def test_a_malformed_grant_is_einval(make, buf):
    s = make()
    await fails_with(errno.EINVAL, invoke(s, req(), s.root(), "dup", buf))
    g = await grant(s, s.root(), connect=[("127.0.0.1", 80)])
    await fails_with(errno.EINVAL, invoke(s, req(), g, "dup", buf))


async def test_sockets_make_no_grants(listeners):
    t = TcpScheme()
    port = listeners()
    conn = (await invoke(t, req(), t.root(), "openat", f"127.0.0.1/{port}", os.O_RDWR, 0)).obj
    await fails_with(errno.EINVAL, invoke(t, req(), conn, "dup", grant_buf()))
    await t.close(conn)
    u = UdpScheme()
    bound = (await invoke(u, req(), u.root(), "openat", "127.0.0.1/0", LISTEN, 0)).obj
    await fails_with(errno.EBADF, invoke(u, req(), bound, "dup", grant_buf()))
    await u.close(bound)


async def test_udp_through_a_grant_reaches_only_granted_peers():
    s = UdpScheme()
    root = s.root()
    peer = (await invoke(s, req(), root, "openat", "127.0.0.1/0", LISTEN, 0)).obj
    stranger = (await invoke(s, req(), root, "openat", "127.0.0.1/0", LISTEN, 0)).obj
    peer_port, stranger_port = peer.sock.getsockname()[1], stranger.sock.getsockname()[1]
    g = await grant(s, root, connect=[("127.0.0.1", peer_port)], listen=[("127.0.0.1", 0)])
    connected = (await invoke(s, req(), g, "openat", f"127.0.0.1/{peer_port}", os.O_RDWR, 0)).obj
    await fails_with(errno.EACCES, invoke(s, req(), g, "openat", f"127.0.0.1/{stranger_port}", os.O_RDWR, 0))
    await fails_with(errno.EACCES, invoke(s, req(), g, "openat", f"127.0.0.1/{free_port(socket.SOCK_DGRAM)}",
                                          LISTEN, 0))
    bound = (await invoke(s, req(), g, "openat", "127.0.0.1/0", LISTEN, 0)).obj
    bound_port = bound.sock.getsockname()[1]
    await fails_with(errno.EACCES, invoke(s, req(), bound, "sendto", b"no", "127.0.0.1", stranger_port))
    with trio.fail_after(5):
        assert await invoke(s, req(), bound, "sendto", b"yes", "127.0.0.1", peer_port) == 3
        assert await invoke(s, req(), peer, "recvfrom", 10) == [b"yes", "127.0.0.1", bound_port]
        # it hears from anyone, as a listener accepts anyone
        await invoke(s, req(), stranger, "sendto", b"hi", "127.0.0.1", bound_port)
        assert await invoke(s, req(), bound, "recvfrom", 10) == [b"hi", "127.0.0.1", stranger_port]
        await invoke(s, req(), connected, "write", b"ok")
        assert (await invoke(s, req(), peer, "recvfrom", 10))[0] == b"ok"
    # a socket bound through the root sends anywhere, as before
    free = (await invoke(s, req(), root, "openat", "127.0.0.1/0", LISTEN, 0)).obj
    assert await invoke(s, req(), free, "sendto", b"x", "127.0.0.1", stranger_port) == 1
    for h in (peer, stranger, connected, bound, free):
        await s.close(h)


async def test_roots_and_grants_survive_a_restart_and_sockets_do_not(listeners):
    for make in (TcpScheme, UdpScheme):
        old, new = make(), make()
        g = await grant(old, old.root(), connect=[("::1", 443), ("127.0.0.1", 80)], listen=[9000])
        value, fds = old.keep(g)
        assert fds == [] and new.restore(value, []) == g
        value, fds = old.keep(old.root())
        assert new.restore(value, fds) is new.root() and isinstance(new.root(), NetRoot)
        with pytest.raises(SchemeError):
            new.restore({"grant": {"listen": [80]}}, [])  # beyond the new daemon's policy
    s = TcpScheme()
    conn = (await invoke(s, req(), s.root(), "openat", f"127.0.0.1/{listeners()}", os.O_RDWR, 0)).obj
    assert s.keep(conn) is None
    await s.close(conn)
