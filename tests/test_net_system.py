"""tcp, udp and pipe capabilities through the real processes: each grants what it names.

The tests share the module's one system, each with a namespace of its own
(`redoxcap_isolated_client`). The plugin fails any test whose daemons logged a traceback,
so the malformed addresses below also check that the daemons answer them calmly.
"""

from __future__ import annotations

import errno
import subprocess
import sys
from concurrent.futures import ThreadPoolExecutor

import pytest

import rt
from redoxcap.testing import free_port, nobody_listens
from redoxcap.wire import protocol as P
from redoxcap.wire.call import call


def port_of(fd: int) -> int:
    return int(rt.fpath(fd).rsplit("/", 1)[1])


def test_a_socket_or_pipe_capability_opens_nothing_else(redoxcap_isolated_client):
    listener = rt.open("/scheme/tcp/127.0.0.1/0", rt.O_CREAT | rt.O_RDWR)
    port = port_of(listener)
    conn = rt.open(f"/scheme/tcp/127.0.0.1/{port}", rt.O_RDWR)
    accepted = rt.dup(listener, b"accept")
    bound = rt.open("/scheme/udp/127.0.0.1/0", rt.O_CREAT | rt.O_RDWR)
    connected = rt.open(f"/scheme/udp/127.0.0.1/{port_of(bound)}", rt.O_RDWR)
    r, w = rt.pipe()
    other = free_port()
    for fd in (listener, conn, accepted, bound, connected, r, w):
        for path, flags in [(f"127.0.0.1/{other}", rt.O_CREAT | rt.O_RDWR),
                            (f"127.0.0.1/{port}", rt.O_RDWR), (".", rt.O_RDONLY)]:
            with pytest.raises(NotADirectoryError):
                rt.openat(fd, path, flags)
    assert nobody_listens(other)  # no listener appeared on the port asked for
    rt.write(conn, b"still works")
    assert rt.read(accepted, 100) == b"still works"
    for fd in (listener, conn, accepted, bound, connected, r, w):
        rt.close(fd)


def test_a_bound_udp_server_answers_each_client_with_sendto(redoxcap_isolated_client):
    server = rt.open("/scheme/udp/127.0.0.1/0", rt.O_CREAT | rt.O_RDWR)
    port = port_of(server)
    second = rt.clone(server)  # two reads in flight at once, each on its own socket
    clients = {name: rt.open(f"/scheme/udp/127.0.0.1/{port}", rt.O_RDWR) for name in (b"a", b"b")}

    def serve_one(fd: int) -> tuple[str, int]:
        data, sender = rt.recvfrom(fd, 100)
        rt.sendto(fd, b"answer for " + data, sender)
        return sender

    with ThreadPoolExecutor(2) as pool:
        waiting = [pool.submit(serve_one, fd) for fd in (server, second)]
        for name, fd in clients.items():
            rt.write(fd, name)
        senders = {f.result(timeout=10) for f in waiting}
    assert len(senders) == 2
    for sender in senders:
        rt.sendto(server, b"end", sender)  # anything misdelivered would arrive before this
    for name, fd in clients.items():
        assert rt.read(fd, 100) == b"answer for " + name
        assert rt.read(fd, 100) == b"end"
    for fd in (server, second, *clients.values()):
        rt.close(fd)


def test_sendto_and_recvfrom_arguments_are_checked(redoxcap_isolated_client):
    server = rt.open("/scheme/udp/127.0.0.1/0", rt.O_CREAT | rt.O_RDWR)
    for address in [("127.1", 9), ("localhost", 9), ("127.0.0.1", 0), ("127.0.0.1", 70000)]:
        with pytest.raises(OSError) as info:
            rt.sendto(server, b"x", address)
        assert info.value.errno == errno.EINVAL, address
    for args in ([b"x", "127.0.0.1", "9"], [b"x", "127.0.0.1"], ["x", "127.0.0.1", 9]):
        with pytest.raises(OSError) as info:
            call(server, P.SENDTO, args)  # the framework checks types before the scheme sees them
        assert info.value.errno == errno.EINVAL
    zero = rt.open("/scheme/zero")
    with pytest.raises(OSError) as info:
        rt.recvfrom(zero, 10)
    assert info.value.errno == errno.EOPNOTSUPP
    rt.close(zero)
    rt.close(server)


BAD = ["127.1/80", "2130706433/80", "0/80", "0x7f.1/80", "127.000.0.1/80", "localhost/80",
       "[::1]/80", "fe80::1%lo/80", "127.0.0.1/²", "127.0.0.1/٨٠", "127.0.0.1/+80",
       "127.0.0.1/ 80", "127.0.0.1/080", "127.0.0.1/65536", "127.0.0.1/0"]


@pytest.mark.parametrize("scheme", ["tcp", "udp"])
def test_malformed_addresses_are_einval_and_grants_are_eacces(redoxcap_isolated_client, scheme):
    for path in BAD:
        with pytest.raises(OSError) as info:
            rt.open(f"/scheme/{scheme}/{path}", rt.O_RDWR)
        assert info.value.errno == errno.EINVAL, path
        if not path.endswith("/0"):  # port 0 is for listening
            with pytest.raises(OSError) as info:
                rt.open(f"/scheme/{scheme}/{path}", rt.O_CREAT | rt.O_RDWR)
            assert info.value.errno == errno.EINVAL, path
    privileged = next(p for p in range(1000, 1024) if nobody_listens(p))
    for path in [f"127.0.0.1/{privileged}", "127.0.0.53/53", "0.0.0.0/0", "::/0", "224.0.0.1/0",
                 "255.255.255.255/0"]:
        with pytest.raises(PermissionError):
            rt.open(f"/scheme/{scheme}/{path}", rt.O_CREAT | rt.O_RDWR)
    assert nobody_listens(privileged)


def test_connecting_to_a_privileged_port_is_allowed(redoxcap_isolated_client):
    port = next(p for p in range(1, 1024) if nobody_listens(p))
    with pytest.raises(ConnectionRefusedError):  # refused by Linux, not by the scheme
        rt.open(f"/scheme/tcp/127.0.0.1/{port}", rt.O_RDWR)


@pytest.mark.parametrize("module", ["redoxcap.schemes.tcp", "redoxcap.schemes.udp"])
def test_the_daemons_offer_the_grants_as_options(module):
    out = subprocess.run([sys.executable, "-m", module, "--help"], capture_output=True, text=True,
                         timeout=30, check=True).stdout
    assert "--allow-wildcard" in out and "--allow-privileged-ports" in out
