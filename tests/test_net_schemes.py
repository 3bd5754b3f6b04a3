"""The tcp, udp and pipe schemes in memory: the scheme objects driven directly, no router.

A capability grants what it names: only a scheme's root opens endpoints, and
addresses are canonical numeric literals checked before any socket is made.
Sockets are real (loopback), so these tests see what the daemon would do.
"""

from __future__ import annotations

import errno
import ipaddress
import os
import random
import socket

import pytest
import trio

from redoxcap.schemes.framework import Caller, Request, SchemeError, invoke
from redoxcap.schemes.pipe import PipeScheme
from redoxcap.schemes.tcp import NetPolicy, TcpScheme
from redoxcap.schemes.udp import UdpScheme
from redoxcap.testing import free_port, nobody_listens
from redoxcap.wire import protocol as P


def req(op: int = 0) -> Request:
    return Request(Caller(os.getpid(), 0, 0), 0, op, [])


async def fails_with(err: int, coro) -> None:
    """Await coro and check that it raised the scheme error err."""
    with pytest.raises(SchemeError) as info:
        await coro
    assert info.value.errno == err, f"{errno.errorcode.get(info.value.errno)} != {errno.errorcode[err]}"


@pytest.fixture
def no_resolver(monkeypatch):
    """Fail the test if anything asks getaddrinfo (trio's or the stdlib's)."""
    def refuse(*args, **kwargs):
        raise AssertionError(f"getaddrinfo{args} called")

    monkeypatch.setattr(socket, "getaddrinfo", refuse)
    monkeypatch.setattr(trio.socket, "getaddrinfo", refuse)
    monkeypatch.setattr(trio._socket, "getaddrinfo", refuse)


# -- only the root opens ---------------------------------------------------------


async def test_a_pipe_end_opens_nothing_and_the_pipe_root_behaves():
    s = PipeScheme()
    root = s.root()
    r = (await invoke(s, req(), root, "openat", "", os.O_RDONLY, 0)).obj
    w = (await invoke(s, req(), r, "dup", b"write")).obj
    for end in (r, w):
        for path in ("", ".", "x"):
            await fails_with(errno.ENOTDIR, invoke(s, req(), end, "openat", path, os.O_RDONLY, 0))
    assert await invoke(s, req(), root, "fpath") == "/scheme/pipe"
    assert (await invoke(s, req(), root, "fstat")).st_mode & 0o170000 == 0o040000
    await fails_with(errno.EBADF, invoke(s, req(), root, "read", 1))
    await fails_with(errno.EBADF, invoke(s, req(), root, "write", b"x"))
    await fails_with(errno.EBADF, invoke(s, req(), root, "dup", b"write"))
    await fails_with(errno.EACCES, invoke(s, req(), root, "getdents", 0))
    await fails_with(errno.ENOTDIR, invoke(s, req(), r, "getdents", 0))
    await fails_with(errno.EOPNOTSUPP, invoke(s, req(), r, "recvfrom", 1))  # the framework's default
    await fails_with(errno.EOPNOTSUPP, invoke(s, req(), w, "sendto", b"x", "127.0.0.1", 9))
    await s.close(root)  # the router never does, but it must not crash
    assert (await invoke(s, req(), r, "fstat")).st_mode & 0o170000 == 0o010000


async def test_a_tcp_connection_or_listener_opens_nothing(no_resolver):
    s = TcpScheme()
    root = s.root()
    assert root is not UdpScheme().root() and root is not TcpScheme().root()
    listener = (await invoke(s, req(), root, "openat", "127.0.0.1/0", os.O_CREAT | os.O_RDWR, 0)).obj
    port = listener.sock.getsockname()[1]
    conn = (await invoke(s, req(), root, "openat", f"127.0.0.1/{port}", os.O_RDWR, 0)).obj
    accepted = (await invoke(s, req(), listener, "dup", b"accept")).obj
    other = free_port()
    for h in (listener, conn, accepted):
        for path, flags in [(f"127.0.0.1/{other}", os.O_CREAT | os.O_RDWR), (f"127.0.0.1/{port}", os.O_RDWR),
                            ("", os.O_RDONLY), (".", os.O_RDONLY)]:
            await fails_with(errno.ENOTDIR, invoke(s, req(), h, "openat", path, flags, 0))
    assert nobody_listens(other)  # no listener was made on the side
    for h in (listener, conn, accepted):
        await s.close(h)


async def test_the_tcp_root_answers_sanely():
    s = TcpScheme()
    root = s.root()
    assert await invoke(s, req(), root, "fpath") == "/scheme/tcp"
    assert (await invoke(s, req(), root, "fstat")).st_mode & 0o170000 == 0o040000
    await fails_with(errno.EBADF, invoke(s, req(), root, "read", 1))
    await fails_with(errno.EBADF, invoke(s, req(), root, "write", b"x"))
    await fails_with(errno.EBADF, invoke(s, req(), root, "shutdown", socket.SHUT_WR))
    await fails_with(errno.EINVAL, invoke(s, req(), root, "dup", b"accept"))
    await fails_with(errno.EACCES, invoke(s, req(), root, "getdents", 0))
    await fails_with(errno.EOPNOTSUPP, invoke(s, req(), root, "recvfrom", 1))
    await s.close(root)


async def test_a_udp_socket_opens_nothing_and_the_udp_root_answers_sanely(no_resolver):
    s = UdpScheme()
    root = s.root()
    bound = (await invoke(s, req(), root, "openat", "127.0.0.1/0", os.O_CREAT | os.O_RDWR, 0)).obj
    port = bound.sock.getsockname()[1]
    connected = (await invoke(s, req(), root, "openat", f"127.0.0.1/{port}", os.O_RDWR, 0)).obj
    for h in (bound, connected):
        for path, flags in [("127.0.0.1/0", os.O_CREAT), (f"127.0.0.1/{port}", os.O_RDWR), ("", 0)]:
            await fails_with(errno.ENOTDIR, invoke(s, req(), h, "openat", path, flags, 0))
    assert await invoke(s, req(), root, "fpath") == "/scheme/udp"
    assert await invoke(s, req(), bound, "fpath") == f"/scheme/udp/127.0.0.1/{port}"
    assert await invoke(s, req(), connected, "fpath") == f"/scheme/udp/127.0.0.1/{port}"
    assert (await invoke(s, req(), root, "fstat")).st_mode & 0o170000 == 0o040000
    assert (await invoke(s, req(), bound, "fstat")).st_mode & 0o170000 == 0o140000
    for op in (invoke(s, req(), root, "read", 1), invoke(s, req(), root, "write", b"x"), invoke(s, req(), root, "recvfrom", 1),
               invoke(s, req(), root, "sendto", b"x", "127.0.0.1", port)):
        await fails_with(errno.EBADF, op)
    await fails_with(errno.EACCES, invoke(s, req(), root, "getdents", 0))
    await s.close(bound)
    await s.close(connected)


# -- addresses -------------------------------------------------------------------

BAD_ADDRESSES = [
    # hosts that are not canonical numeric literals
    "127.1/80", "2130706433/80", "0/80", "0x7f.1/80", "0x7f.0.0.1/80", "127.000.0.1/80",
    "127.0.0.01/80", "0177.0.0.1/80", "localhost/80", "example.com/80", "no.such.host.invalid/80",
    "[::1]/80", "0:0:0:0:0:0:0:1/80", "::0001/80", "::FFFF:127.0.0.1/80", "fe80::1%eth0/80",
    "::1%1/80", " 127.0.0.1/80", "127.0.0.1 /80", "127.0.0.1./80", "١٢٧.0.0.1/80",
    "１２７.0.0.1/80", "127.0.0.1\n/80", "/80", "127.0.0.1", "", "/", "//", "a/b/80",
    # ports that are not ASCII decimal 1-65535
    "127.0.0.1/²", "127.0.0.1/٨٠", "127.0.0.1/８０", "127.0.0.1/+80", "127.0.0.1/-1",
    "127.0.0.1/ 80", "127.0.0.1/80 ", "127.0.0.1/080", "127.0.0.1/0x50", "127.0.0.1/1e3",
    "127.0.0.1/65536", "127.0.0.1/99999", "127.0.0.1/" + "9" * 5000, "127.0.0.1/80/",
    "127.0.0.1/", "127.0.0.1/1_000", "::1/", "::1/http",
]


@pytest.mark.parametrize("path", BAD_ADDRESSES)
@pytest.mark.parametrize("flags", [os.O_RDWR, os.O_CREAT | os.O_RDWR])
@pytest.mark.parametrize("make", [TcpScheme, UdpScheme])
async def test_only_canonical_numeric_addresses_and_ascii_ports(make, flags, path, no_resolver):
    s = make()
    await fails_with(errno.EINVAL, invoke(s, req(), s.root(), "openat", path, flags, 0))


@pytest.mark.parametrize("make", [TcpScheme, UdpScheme])
async def test_port_zero_only_picks_a_port_when_listening(make, no_resolver):
    s = make()
    h = (await invoke(s, req(), s.root(), "openat", "127.0.0.1/0", os.O_CREAT | os.O_RDWR, 0)).obj
    assert h.sock.getsockname()[1] > 0
    await s.close(h)
    await fails_with(errno.EINVAL, invoke(s, req(), s.root(), "openat", "127.0.0.1/0", os.O_RDWR, 0))
    await fails_with(errno.EINVAL, invoke(s, req(), s.root(), "openat", "0.0.0.0/9", os.O_RDWR, 0))


@pytest.mark.parametrize("path", [
    "0.0.0.0/0", "::/0", "::ffff:0:0/0", "224.0.0.1/0", "239.1.2.3/0", "ff02::1/0",
    "255.255.255.255/0", "127.0.0.1/80", "127.0.0.53/53", "::1/22", "127.0.0.1/1023",
])
@pytest.mark.parametrize("make", [TcpScheme, UdpScheme])
async def test_wildcard_multicast_broadcast_and_privileged_listens_need_a_grant(make, path, no_resolver):
    s = make()
    await fails_with(errno.EACCES, invoke(s, req(), s.root(), "openat", path, os.O_CREAT | os.O_RDWR, 0))


@pytest.mark.parametrize("make", [TcpScheme, UdpScheme])
async def test_the_daemon_options_grant_wildcard_and_privileged_listens(make, no_resolver):
    s = make(policy=NetPolicy(allow_wildcard=True))
    h = (await invoke(s, req(), s.root(), "openat", "0.0.0.0/0", os.O_CREAT | os.O_RDWR, 0)).obj
    assert h.sock.getsockname()[0] == "0.0.0.0"
    await s.close(h)
    await fails_with(errno.EACCES, invoke(s, req(), s.root(), "openat", "127.0.0.1/80", os.O_CREAT, 0))
    if os.geteuid() != 0:
        return  # Linux itself refuses privileged ports to others
    s = make(policy=NetPolicy(allow_privileged_ports=True))
    for port in random.sample(range(600, 1000), 20):  # any free one will do
        try:
            h = (await invoke(s, req(), s.root(), "openat", f"127.0.0.1/{port}", os.O_CREAT | os.O_RDWR, 0)).obj
        except SchemeError as exc:
            assert exc.errno == errno.EADDRINUSE
            continue
        assert h.sock.getsockname()[1] == port
        await s.close(h)
        break
    else:
        pytest.fail("no free privileged port to try")


async def test_connecting_to_a_privileged_port_is_allowed(no_resolver):
    s = TcpScheme()
    port = next(p for p in range(1, 1024) if nobody_listens(p))
    with pytest.raises(ConnectionRefusedError):  # Linux's answer (the daemon sends its errno)
        await invoke(s, req(), s.root(), "openat", f"127.0.0.1/{port}", os.O_RDWR, 0)


async def test_ipv6_literals_work(no_resolver):
    s = TcpScheme()
    listener = (await invoke(s, req(), s.root(), "openat", "::1/0", os.O_CREAT | os.O_RDWR, 0)).obj
    port = listener.sock.getsockname()[1]
    conn = (await invoke(s, req(), s.root(), "openat", f"/::1/{port}", os.O_RDWR, 0)).obj
    assert await invoke(s, req(), conn, "fpath") == f"/scheme/tcp/::1/{port}"
    await s.close(conn)
    await s.close(listener)


def _canonical(path: str) -> bool:
    """The test's own idea of a valid HOST/PORT (to keep valid ones off the network)."""
    host, _, port = path.lstrip("/").rpartition("/")
    try:
        ok_host = str(ipaddress.ip_address(host)) == host
    except ValueError:
        return False
    return ok_host and port.isascii() and port.isdigit() and str(int(port)) == port


async def test_fuzzed_addresses_are_errnos_never_tracebacks(no_resolver):
    rng = random.Random(9)
    pieces = ["127.0.0.1", "::1", "::", "0", "1", "80", "65535", "65536", "/", ".", ":", "%", "[", "]",
              "+", "-", " ", "\t", "\n", "x", "0x", "²", "٨", "８", "\u200b", "\udcff", "ß", "é", "e3", "_",
              "255", "::ffff:", "ff02::", "0.0.0.0", "\x00", "9" * 40]
    seen = 0
    for _ in range(3000):
        path = "".join(rng.choice(pieces) for _ in range(rng.randint(0, 6)))
        if _canonical(path):
            continue  # a real address: not malformed, and could reach a real host
        flags = rng.choice([os.O_RDWR, os.O_CREAT | os.O_RDWR])
        for s in (TcpScheme(), UdpScheme()):
            with pytest.raises(SchemeError) as info:
                await invoke(s, req(), s.root(), "openat", path, flags, 0)
            assert info.value.errno in (errno.EINVAL, errno.EACCES), path
            seen += 1
    assert seen > 4000
    u = UdpScheme()
    bound = (await invoke(u, req(), u.root(), "openat", "127.0.0.1/0", os.O_CREAT | os.O_RDWR, 0)).obj
    for _ in range(2000):
        host = "".join(rng.choice(pieces) for _ in range(rng.randint(0, 4)))
        port = rng.choice([0, 1, 80, 65535, 65536, -1, 2**63])
        try:
            await invoke(u, req(), bound, "sendto", b"x", host, port)
        except SchemeError as exc:
            assert exc.errno in (errno.EINVAL, errno.EAFNOSUPPORT, errno.EACCES), (host, port)
        except OSError as exc:  # a valid address Linux refuses (broadcast): still an errno
            assert exc.errno, (host, port)
    await u.close(bound)


# -- udp: datagrams say who sent them and where they go --------------------------


async def test_a_bound_udp_socket_answers_each_sender_with_sendto(no_resolver):
    s = UdpScheme()
    root = s.root()
    server = (await invoke(s, req(), root, "openat", "127.0.0.1/0", os.O_CREAT | os.O_RDWR, 0)).obj
    port = server.sock.getsockname()[1]
    await fails_with(errno.EDESTADDRREQ, invoke(s, req(), server, "write", b"to nobody"))
    a = (await invoke(s, req(), root, "openat", f"127.0.0.1/{port}", os.O_RDWR, 0)).obj
    b = (await invoke(s, req(), root, "openat", f"127.0.0.1/{port}", os.O_RDWR, 0)).obj
    await invoke(s, req(), a, "write", b"from a")
    await invoke(s, req(), b, "write", b"from b")
    with trio.fail_after(5):
        got = [await invoke(s, req(), server, "recvfrom", 100) for _ in range(2)]
        senders = {data: (host, sport) for data, host, sport in got}
        assert senders == {b"from a": ("127.0.0.1", a.sock.getsockname()[1]),
                           b"from b": ("127.0.0.1", b.sock.getsockname()[1])}
        # answer in the opposite order from arrival: each reply still reaches its asker
        for data in (b"from b", b"from a"):
            host, sport = senders[data]
            assert await invoke(s, req(), server, "sendto", data.upper(), host, sport) == len(data)
        assert await invoke(s, req(), a, "read", 100) == b"FROM A"
        assert await invoke(s, req(), b, "recvfrom", 100) == [b"FROM B", "127.0.0.1", port]  # its peer
        await invoke(s, req(), a, "write", b"plain read")
        assert await invoke(s, req(), server, "read", 5) == b"plain"  # just the data, cut to n
    await fails_with(errno.EISCONN, invoke(s, req(), a, "sendto", b"x", "127.0.0.1", port))
    for host, sport, err in [("127.1", port, errno.EINVAL), ("localhost", port, errno.EINVAL),
                             ("127.0.0.1", 0, errno.EINVAL), ("127.0.0.1", 65536, errno.EINVAL),
                             ("0.0.0.0", port, errno.EINVAL), ("::1", port, errno.EAFNOSUPPORT)]:
        await fails_with(err, invoke(s, req(), server, "sendto", b"x", host, sport))
    await fails_with(errno.EMSGSIZE, invoke(s, req(), server, "sendto", b"x" * (P.MAX_IO + 1), "127.0.0.1", port))
    for h in (a, b, server):
        await s.close(h)
