"""Narrow network grants through the real processes: rt.net_grant and `run --allow-*`.

A program run with `--allow-connect HOST:PORT` reaches that listener and
nothing else (EACCES); one run with `--allow-listen PORT` listens there only.
The grant is the namespace's tcp entry, so nsmgr forwards to it as to a root.
"""

from __future__ import annotations

import errno
import json
import os
import signal
import socket
import sys
from collections.abc import Iterator

import pytest

import rt
from redoxcap.exits import EXIT_USAGE
from redoxcap.grants import parse_net_address
from redoxcap.testing import free_port, nobody_listens
from redoxcap.wire import protocol as P
from redoxcap.wire.call import call_fd

# A client that tries each (path, flags) and prints what came of it: "ok" or an errno name.
TRY = """
import errno, json, sys
import rt
results = []
for path, flags in json.loads(sys.argv[1]):
    try:
        rt.close(rt.open(path, flags))
        results.append("ok")
    except OSError as exc:
        results.append(errno.errorcode[exc.errno])
print(json.dumps(results))
"""
CONNECT, LISTEN = os.O_RDWR, os.O_CREAT | os.O_RDWR


@pytest.fixture
def listener() -> Iterator[int]:
    """The port of a host listener on 127.0.0.1 (connects complete in its backlog)."""
    with socket.create_server(("127.0.0.1", 0)) as sock:
        yield sock.getsockname()[1]


def attempts(system, options: list[str], tries: list[tuple[str, int]]) -> list[str]:
    """Run TRY with options; what came of each try."""
    result = system.run(*options, "--", sys.executable, "-c", TRY, json.dumps(tries))
    return json.loads(result.stdout)


def test_parse_net_address_takes_host_port_ipv6_in_brackets_and_bare_listen_ports():
    assert parse_net_address("--allow-connect", "127.0.0.1:80", listen=False) == ("127.0.0.1", 80)
    assert parse_net_address("--allow-connect", "[::1]:443", listen=False) == ("::1", 443)
    assert parse_net_address("--allow-connect", "[0:0::1]:443", listen=False) == ("::1", 443)
    assert parse_net_address("--allow-listen", "9000", listen=True) == 9000
    assert parse_net_address("--allow-listen", "0", listen=True) == 0
    assert parse_net_address("--allow-listen", "127.0.0.2:9000", listen=True) == ("127.0.0.2", 9000)
    for text, listen in [("80", False), ("localhost:80", False), ("::1:80", False), ("[::1]80", False),
                         ("[127.0.0.1]:80", False), ("127.0.0.1:0", False), ("127.0.0.1:65536", False),
                         ("127.0.0.1:+80", False), ("127.0.0.1:", False), ("[fe80::1%eth0]:80", False),
                         ("127.1:80", False), ("-1", True), ("http", True), ("[::1]", True), ("", True)]:
        with pytest.raises(Exception) as info:
            parse_net_address("--allow-x", text, listen=listen)
        assert getattr(info.value, "code", None) == EXIT_USAGE, text
        assert str(info.value).startswith(f"--allow-x {text}:")


def test_rt_net_grant_narrows_the_namespaces_tcp(redoxcap_module_client, listener):
    other = free_port()
    grant = rt.net_grant(connect=[("127.0.0.1", listener)])
    try:
        assert rt.fpath(grant) == "/scheme/tcp"
        rt.close(rt.openat(grant, f"127.0.0.1/{listener}", rt.O_RDWR))
        with pytest.raises(PermissionError):
            rt.openat(grant, f"127.0.0.1/{other}", rt.O_RDWR)
        with pytest.raises(PermissionError):
            rt.openat(grant, f"127.0.0.1/{other}", rt.O_CREAT | rt.O_RDWR)
        assert nobody_listens(other)
        with pytest.raises(PermissionError):  # narrowing never widens
            rt.net_grant(connect=[("127.0.0.1", other)], base=grant)
        nothing = rt.net_grant(base=grant)
        with pytest.raises(PermissionError):
            rt.openat(nothing, f"127.0.0.1/{listener}", rt.O_RDWR)
        rt.close(nothing)
        # as a namespace's tcp, it is what /scheme/tcp/... reaches
        fork = rt.mkns(["tcp"])
        try:
            rt.unregister(fork, "tcp")
            rt.register(fork, "tcp", grant)
            rt.close(call_fd(fork, P.OPENAT, [f"/scheme/tcp/127.0.0.1/{listener}", CONNECT, 0]))
            with pytest.raises(PermissionError):
                call_fd(fork, P.OPENAT, [f"/scheme/tcp/127.0.0.1/{other}", CONNECT, 0])
        finally:
            rt.close(fork)
    finally:
        rt.close(grant)
    with pytest.raises(OSError) as info:
        rt.net_grant(connect=[("localhost", 80)])
    assert info.value.errno == errno.EINVAL
    with pytest.raises(PermissionError):  # beyond the daemon's policy
        rt.net_grant(listen=[80], scheme="udp")


def test_run_allow_connect_reaches_that_port_only(redoxcap_module_system, listener):
    other = free_port()
    got = attempts(redoxcap_module_system, ["--allow-connect", f"127.0.0.1:{listener}"], [
        (f"/scheme/tcp/127.0.0.1/{listener}", CONNECT),
        (f"/scheme/tcp/127.0.0.1/{other}", CONNECT),
        (f"/scheme/tcp/127.0.0.1/{other}", LISTEN),
        ("/scheme/tcp/127.0.0.1/0", LISTEN),
        (f"/scheme/udp/127.0.0.1/{listener}", CONNECT),  # no --allow-udp-*: udp reaches nothing
        ("/scheme/udp/127.0.0.1/0", LISTEN),
    ])
    assert got == ["ok", "EACCES", "EACCES", "EACCES", "EACCES", "EACCES"]
    assert nobody_listens(other)


def test_run_allow_listen_listens_there_only(redoxcap_module_system, listener):
    port, other = free_port(), free_port()
    got = attempts(redoxcap_module_system, ["--allow-listen", str(port), "--allow-udp-listen", f"127.0.0.1:{port}"], [
        (f"/scheme/tcp/127.0.0.1/{port}", LISTEN),
        (f"/scheme/tcp/127.0.0.1/{other}", LISTEN),
        ("/scheme/tcp/127.0.0.1/0", LISTEN),
        (f"/scheme/tcp/127.0.0.1/{listener}", CONNECT),
        (f"/scheme/udp/127.0.0.1/{port}", LISTEN),
        (f"/scheme/udp/::1/{port}", LISTEN),  # a host was given for udp: only that one
    ])
    assert got == ["ok", "EACCES", "EACCES", "EACCES", "ok", "EACCES"]


def test_run_without_allow_options_gets_the_whole_tcp(redoxcap_module_system, listener):
    got = attempts(redoxcap_module_system, [], [(f"/scheme/tcp/127.0.0.1/{listener}", CONNECT),
                                       ("/scheme/tcp/127.0.0.1/0", LISTEN)])
    assert got == ["ok", "ok"]


@pytest.mark.parametrize("options, message", [
    (["--allow-connect", "localhost:80"], "--allow-connect localhost:80: HOST is a numeric"),
    (["--allow-connect", "::1:80"], "in brackets"),
    (["--allow-listen", "80"], "--allow-listen: Permission denied"),  # beyond the daemon's policy
    (["--ns", "file", "--allow-connect", "127.0.0.1:80"], "the namespace has no tcp"),
])
def test_run_allow_options_errors_are_usage_errors(redoxcap_module_system, options, message):
    result = redoxcap_module_system.run(*options, "--", sys.executable, "-c", "print('ran')", check=False)
    assert result.returncode == EXIT_USAGE, result.stderr
    assert result.stderr.startswith("redoxcap: ") and message in result.stderr
    assert "ran" not in result.stdout and "Traceback" not in result.stderr


def test_a_grant_survives_a_restart_of_the_tcp_daemon(redoxcap_module_client, listener):
    """The router keeps a grant (plain data) for the next daemon, as it keeps the root."""
    grant = rt.net_grant(connect=[("127.0.0.1", listener)])
    try:
        os.kill(redoxcap_module_client.daemon("tcp")["pid"], signal.SIGKILL)
        try:  # requests made while it is down wait for the next daemon
            rt.close(rt.openat(grant, f"127.0.0.1/{listener}", rt.O_RDWR))
        except OSError as exc:  # unless this one was already in flight to the dead one
            assert exc.errno == errno.EIO
            rt.close(rt.openat(grant, f"127.0.0.1/{listener}", rt.O_RDWR))
        with pytest.raises(PermissionError):
            rt.openat(grant, f"127.0.0.1/{free_port()}", rt.O_RDWR)
    finally:
        rt.close(grant)
