"""Sockets of an unmodified program in a sandboxed host directory: exactly what
`--allow-listen`/`--allow-connect` and `--allow-udp-*` grant, however the address is raced.
"""

from __future__ import annotations

import errno
import os
import shutil
import socket
import subprocess
import textwrap
import threading
import urllib.request

import pytest
from test_everyday import BASE_PYTHON, sandboxed

from redoxcap.broker import available
from redoxcap.testing import REDOXCAP, free_port, wait_for

pytestmark = pytest.mark.skipif(available() is not None, reason=str(available()))


def test_http_server_serves_within_its_grant(redoxcap_module_system, tmp_path):
    project = tmp_path / "site"
    project.mkdir()
    (project / "index.txt").write_text("served from the sandbox\n")
    port = free_port()
    server = redoxcap_module_system.start("run", "--dir", str(project), "--allow-listen", f"127.0.0.1:{port}", "--",
                          BASE_PYTHON, "-m", "http.server", str(port), "--bind", "127.0.0.1")
    try:
        def fetch() -> bytes | None:
            try:
                with urllib.request.urlopen(f"http://127.0.0.1:{port}/index.txt", timeout=2) as r:
                    return r.read()
            except OSError:
                assert server.poll() is None, server.communicate()
                return None
        assert wait_for(fetch, timeout=60) == b"served from the sandbox\n"
    finally:
        server.terminate()
        server.communicate(timeout=30)
    other = free_port()
    got = sandboxed(redoxcap_module_system, project, [BASE_PYTHON, "-m", "http.server", str(other), "--bind",
                                      "127.0.0.1"], "--allow-listen", f"127.0.0.1:{port}")
    assert got.returncode != 0 and "Permission denied" in got.stderr


# What a test program starts with: the granted port and another, and attempt(what, call),
# which prints what and "ok" or the errno's name.
ATTEMPT = textwrap.dedent("""
    import errno, socket, sys
    granted, other = int(sys.argv[1]), int(sys.argv[2])
    def attempt(what, call):
        try:
            call()
            print(what, "ok")
        except OSError as exc:
            print(what, errno.errorcode.get(exc.errno, exc.errno))
""")

SOCKETS = ATTEMPT + textwrap.dedent("""
    tcp = lambda family=socket.AF_INET: socket.socket(family, socket.SOCK_STREAM)
    attempt("connect granted", lambda: tcp().connect(("127.0.0.1", granted)))
    attempt("connect other", lambda: tcp().connect(("127.0.0.1", other)))
    attempt("connect mapped", lambda: tcp(socket.AF_INET6).connect(("::ffff:127.0.0.1", other)))
    attempt("bind other", lambda: tcp().bind(("127.0.0.1", other)))
    attempt("bind wildcard", lambda: tcp().bind(("0.0.0.0", granted)))
    attempt("listen unbound", lambda: tcp().listen())
    attempt("udp", lambda: socket.socket(socket.AF_INET, socket.SOCK_DGRAM))
    attempt("raw", lambda: socket.socket(socket.AF_INET, socket.SOCK_RAW, socket.IPPROTO_ICMP))
    attempt("sctp", lambda: socket.socket(socket.AF_INET, socket.SOCK_STREAM, 132))
    attempt("fastopen", lambda: tcp().sendto(b"x", 0x20000000, ("127.0.0.1", other)))
    attempt("unix path", lambda: socket.socket(socket.AF_UNIX).connect("/run/anything.sock"))
    import ctypes, os
    libc = ctypes.CDLL(None, use_errno=True)
    def disconnect(s):  # connect to an AF_UNSPEC address, which Python's connect cannot say
        if libc.connect(s.fileno(), socket.AF_UNSPEC.to_bytes(2, sys.byteorder) + bytes(14), 16):
            raise OSError(ctypes.get_errno(), os.strerror(ctypes.get_errno()))
    t = tcp()
    t.connect(("127.0.0.1", granted))
    attempt("disconnect", lambda: disconnect(t))
    attempt("connect other after", lambda: t.connect(("127.0.0.1", other)))
    attempt("connect granted after", lambda: t.connect(("127.0.0.1", granted)))
""")


def test_sockets_reach_exactly_what_is_granted(redoxcap_module_system, tmp_path):
    project = tmp_path / "net"
    project.mkdir()
    with socket.create_server(("127.0.0.1", 0)) as granted, \
            socket.create_server(("127.0.0.1", 0)) as other:
        granted_port, other_port = granted.getsockname()[1], other.getsockname()[1]
        other.settimeout(0)
        got = sandboxed(redoxcap_module_system, project, [BASE_PYTHON, "-c", SOCKETS, str(granted_port), str(other_port)],
                        "--allow-connect", f"127.0.0.1:{granted_port}")
        with pytest.raises(BlockingIOError):
            other.accept()  # nothing ever reached the port that was not granted
    lines = dict(line.rsplit(" ", 1) for line in got.stdout.splitlines())
    assert lines == {
        "connect granted": "ok", "connect other": "EACCES", "connect mapped": "EACCES",
        "bind other": "EACCES", "bind wildcard": "EACCES", "listen unbound": "EACCES",
        "udp": "EACCES", "raw": "EACCES", "sctp": "EACCES", "fastopen": "EACCES",
        "unix path": "EACCES", "disconnect": "ok", "connect other after": "EACCES",
        "connect granted after": "ok",
    }, got.stderr


CONNECT_RACE = textwrap.dedent("""
    import ctypes, os, socket, struct, sys, threading
    libc = ctypes.CDLL(None, use_errno=True)
    granted, other, rounds = int(sys.argv[1]), int(sys.argv[2]), int(sys.argv[3])
    def sockaddr(port):
        return struct.pack("!HH4s8x", socket.AF_INET, port, socket.inet_aton("127.0.0.1"))
    # the family is in host order, the port in network order
    good, bad = bytearray(sockaddr(granted)), bytearray(sockaddr(other))
    good[0:2], bad[0:2] = struct.pack("=H", socket.AF_INET), struct.pack("=H", socket.AF_INET)
    buf = ctypes.create_string_buffer(bytes(good), 16)
    stop = False
    def flip():
        while not stop:
            ctypes.memmove(buf, bytes(bad), 16)
            ctypes.memmove(buf, bytes(good), 16)
    threading.Thread(target=flip, daemon=True).start()
    outcomes = {}
    for _ in range(rounds):
        s = socket.socket()
        rc = libc.connect(s.fileno(), buf, 16)
        key = "ok" if rc == 0 else os.strerror(ctypes.get_errno())
        outcomes[key] = outcomes.get(key, 0) + 1
        s.close()
    stop = True
    print(sorted(outcomes.items()))
""")


def test_a_racing_address_never_connects_beyond_the_grant(redoxcap_module_system, tmp_path):
    """The broker reads the address once and connects its own copy of the socket: a thread
    that swaps the address for one not granted meanwhile never gets there."""
    project = tmp_path / "race-net"
    project.mkdir()
    with socket.create_server(("127.0.0.1", 0), backlog=512) as granted, \
            socket.create_server(("127.0.0.1", 0)) as other:
        granted_port, other_port = granted.getsockname()[1], other.getsockname()[1]
        other.settimeout(0)
        got = sandboxed(redoxcap_module_system, project, [BASE_PYTHON, "-c", CONNECT_RACE, str(granted_port),
                                          str(other_port), "300"],
                        "--allow-connect", f"127.0.0.1:{granted_port}")
        with pytest.raises(BlockingIOError):
            other.accept()
    assert got.returncode == 0 and "('ok'," in got.stdout, (got.stdout, got.stderr)


# -- UDP within --allow-udp-connect / --allow-udp-listen -------------------------------------

UDP_SOCKETS = ATTEMPT + textwrap.dedent("""
    udp = lambda family=socket.AF_INET: socket.socket(family, socket.SOCK_DGRAM)
    s = udp()
    attempt("sendto granted", lambda: s.sendto(b"sendto", ("127.0.0.1", granted)))
    attempt("sendto other", lambda: s.sendto(b"bad", ("127.0.0.1", other)))
    attempt("sendto mapped", lambda: udp(socket.AF_INET6).sendto(b"bad", ("::ffff:127.0.0.1", other)))
    attempt("sendmsg other", lambda: s.sendmsg([b"bad"], [], 0, ("127.0.0.1", other)))
    attempt("sendmsg granted", lambda: s.sendmsg([b"send", b"msg"], [], 0, ("127.0.0.1", granted)))
    attempt("send unconnected", lambda: s.send(b"bad"))
    attempt("connect other", lambda: udp().connect(("127.0.0.1", other)))
    attempt("bind other", lambda: udp().bind(("127.0.0.1", other)))
    attempt("listen", lambda: udp().listen())
    c = udp()
    attempt("connect granted", lambda: c.connect(("127.0.0.1", granted)))
    attempt("send connected", lambda: c.send(b"send"))
    attempt("sendto other when connected", lambda: c.sendto(b"bad", ("127.0.0.1", other)))
    attempt("write connected", lambda: c.makefile("wb", buffering=0).write(b"write"))
    c.settimeout(30)
    attempt("recv reply", lambda: print(c.recv(100).decode()))
    lsrr = bytes([131, 11, 4, 127, 0, 0, 2, 127, 0, 0, 1, 0])  # a source route through 127.0.0.2
    attempt("source route", lambda: c.setsockopt(socket.IPPROTO_IP, socket.IP_OPTIONS, lsrr))
    attempt("udplite", lambda: socket.socket(socket.AF_INET, socket.SOCK_DGRAM, 136))
    attempt("icmp", lambda: socket.socket(socket.AF_INET, socket.SOCK_DGRAM, socket.IPPROTO_ICMP))
""")


def _udp_server(host: str = "127.0.0.1") -> socket.socket:
    s = socket.socket(socket.AF_INET, socket.SOCK_DGRAM)
    s.bind((host, 0))
    return s


def _datagrams(sock: socket.socket) -> list[bytes]:
    """What has arrived on sock so far (it never waits for more)."""
    sock.setblocking(False)
    out = []
    while True:
        try:
            out.append(sock.recv(65536))
        except BlockingIOError:
            return out


def test_udp_reaches_exactly_what_is_granted(redoxcap_module_system, tmp_path):
    """--allow-udp-connect: sendto, sendmsg, connect and send reach the granted peer; any other
    destination, named in any way, is EACCES and never receives a datagram."""
    project = tmp_path / "udp"
    project.mkdir()
    with _udp_server() as granted, _udp_server() as other:
        granted_port, other_port = granted.getsockname()[1], other.getsockname()[1]
        granted.settimeout(60)

        def answer() -> None:  # the reply to the connected socket's datagram
            data, sender = granted.recvfrom(100)
            while data != b"write":
                data, sender = granted.recvfrom(100)
            granted.sendto(b"reply", sender)

        replier = threading.Thread(target=answer)
        replier.start()
        got = sandboxed(redoxcap_module_system, project,
                        [BASE_PYTHON, "-c", UDP_SOCKETS, str(granted_port), str(other_port)],
                        "--allow-udp-connect", f"127.0.0.1:{granted_port}")
        replier.join(timeout=60)
        assert _datagrams(other) == []  # nothing ever reached the port that was not granted
    lines = [line for line in got.stdout.splitlines() if line != "reply"]
    assert dict(line.rsplit(" ", 1) for line in lines) == {
        "sendto granted": "ok", "sendto other": "EACCES", "sendto mapped": "EACCES",
        "sendmsg other": "EACCES", "sendmsg granted": "ok", "send unconnected": "EDESTADDRREQ",
        "connect other": "EACCES", "bind other": "EACCES", "listen": errno.errorcode[errno.EOPNOTSUPP],
        "connect granted": "ok", "send connected": "ok", "sendto other when connected": "EACCES",
        "write connected": "ok", "recv reply": "ok", "source route": "EACCES", "udplite": "EACCES",
        "icmp": "EACCES",
    }, got.stderr
    assert "reply" in got.stdout.splitlines(), got.stdout


UDP_EDGES = ATTEMPT + textwrap.dedent("""
    import ctypes, os, struct
    libc = ctypes.CDLL(None, use_errno=True)
    def raw(fn, sock, *args):  # what Python's socket methods cannot say: the C call itself
        if fn(sock.fileno(), *args) < 0:
            err = ctypes.get_errno()
            raise OSError(err, os.strerror(err))
    def sin(port):  # a struct sockaddr_in of 127.0.0.1:port
        return (struct.pack("=H", socket.AF_INET) + struct.pack("!H", port)
                + socket.inet_aton("127.0.0.1") + bytes(8))
    unspec = struct.pack("=H", socket.AF_UNSPEC) + bytes(14)
    v6 = socket.socket(socket.AF_INET6, socket.SOCK_DGRAM)
    attempt("sendto v4 on v6", lambda: raw(libc.sendto, v6, b"v4 on v6", 8, 0, sin(granted), 16))
    attempt("sendto v4 on v6 other", lambda: raw(libc.sendto, v6, b"bad", 3, 0, sin(other), 16))
    attempt("connect v4 on v6 other", lambda: raw(libc.connect, v6, sin(other), 16))
    attempt("connect v4 on v6", lambda: raw(libc.connect, v6, sin(granted), 16))
    attempt("send v4 on v6", lambda: v6.send(b"connected v4 on v6"))
    attempt("disconnect v6", lambda: raw(libc.connect, v6, unspec, 16))
    attempt("send disconnected v6", lambda: v6.send(b"bad"))
    only6 = socket.socket(socket.AF_INET6, socket.SOCK_DGRAM)
    only6.setsockopt(socket.IPPROTO_IPV6, socket.IPV6_V6ONLY, 1)
    attempt("connect v4 on v6-only", lambda: raw(libc.connect, only6, sin(granted), 16))
    attempt("sendto v4 on v6-only", lambda: raw(libc.sendto, only6, b"bad", 3, 0, sin(granted), 16))
    v4 = socket.socket(socket.AF_INET, socket.SOCK_DGRAM)
    attempt("connect v4", lambda: v4.connect(("127.0.0.1", granted)))
    attempt("disconnect v4", lambda: raw(libc.connect, v4, unspec, 16))
    attempt("send disconnected v4", lambda: v4.send(b"bad"))
    attempt("sendto disconnected v4", lambda: v4.sendto(b"after", ("127.0.0.1", granted)))
    attempt("connect other after", lambda: v4.connect(("127.0.0.1", other)))
    attempt("bind v4 on v6", lambda: raw(libc.bind, socket.socket(socket.AF_INET6, socket.SOCK_DGRAM),
                                         sin(granted), 16))
""")


def test_udp_disconnects_and_takes_ipv4_on_an_ipv6_socket_as_linux_does(redoxcap_module_system,
                                                                          tmp_path):
    """connect(AF_UNSPEC) dissolves a socket's association (it then sends only where it names a
    granted destination); an IPv6 socket connects and sends to a granted IPv4 address, as
    its IPv4-mapped one, unless it is IPv6-only (the kernel's errnos); nothing reaches a
    port not granted."""
    project = tmp_path / "udp-edges"
    project.mkdir()
    with _udp_server() as granted, _udp_server() as other:
        granted_port, other_port = granted.getsockname()[1], other.getsockname()[1]
        got = sandboxed(redoxcap_module_system, project,
                        [BASE_PYTHON, "-c", UDP_EDGES, str(granted_port), str(other_port)],
                        "--allow-udp-connect", f"127.0.0.1:{granted_port}",
                        "--allow-udp-listen", str(granted_port))
        assert _datagrams(other) == []
        assert sorted(_datagrams(granted)) == [b"after", b"connected v4 on v6", b"v4 on v6"]
    assert dict(line.rsplit(" ", 1) for line in got.stdout.splitlines()) == {
        "sendto v4 on v6": "ok", "sendto v4 on v6 other": "EACCES",
        "connect v4 on v6 other": "EACCES", "connect v4 on v6": "ok", "send v4 on v6": "ok",
        "disconnect v6": "ok", "send disconnected v6": "EDESTADDRREQ",
        "connect v4 on v6-only": "EAFNOSUPPORT", "sendto v4 on v6-only": "ENETUNREACH",
        "connect v4": "ok", "disconnect v4": "ok", "send disconnected v4": "EDESTADDRREQ",
        "sendto disconnected v4": "ok", "connect other after": "EACCES",
        "bind v4 on v6": "EINVAL",
    }, got.stderr


UDP_LISTEN = textwrap.dedent("""
    import errno, socket, sys
    port, peer, other = int(sys.argv[1]), int(sys.argv[2]), int(sys.argv[3])
    def attempt(what, call):
        try:
            call()
            print(what, "ok", flush=True)
        except OSError as exc:
            print(what, errno.errorcode.get(exc.errno, exc.errno), flush=True)
    attempt("bind other", lambda: socket.socket(socket.AF_INET, socket.SOCK_DGRAM).bind(("127.0.0.1", other)))
    attempt("bind wildcard", lambda: socket.socket(socket.AF_INET, socket.SOCK_DGRAM).bind(("0.0.0.0", port)))
    s = socket.socket(socket.AF_INET, socket.SOCK_DGRAM)
    s.bind(("127.0.0.1", port))
    s.settimeout(60)
    print("ready", flush=True)
    for _ in range(2):
        data, sender = s.recvfrom(100)
        print("got", data.decode(), flush=True)
        attempt("answer " + data.decode(), lambda: s.sendto(b"answer", sender))
""")


def test_udp_listen_binds_and_receives_and_answers_only_granted_peers(redoxcap_module_system, tmp_path):
    """--allow-udp-listen: the program binds there and nowhere else, receives from anyone, and
    answers only the peers --allow-udp-connect names."""
    project = tmp_path / "udp-listen"
    project.mkdir()
    port = free_port()
    with _udp_server() as peer, _udp_server() as stranger:
        peer_port = peer.getsockname()[1]
        server = redoxcap_module_system.start(
            "run", "--dir", str(project), "--allow-udp-listen", f"127.0.0.1:{port}",
            "--allow-udp-connect", f"127.0.0.1:{peer_port}", "--",
            BASE_PYTHON, "-c", UDP_LISTEN, str(port), str(peer_port), str(free_port()))
        try:
            lines = []
            while "ready" not in lines:
                line = server.stdout.readline()
                assert line, server.communicate()
                lines.append(line.strip())
            stranger.sendto(b"stranger", ("127.0.0.1", port))
            peer.sendto(b"peer", ("127.0.0.1", port))
            out, err = server.communicate(timeout=60)
        finally:
            if server.poll() is None:
                server.kill()
                server.communicate()
        peer.settimeout(30)
        assert peer.recv(100) == b"answer"
        assert _datagrams(stranger) == []
    assert lines[:2] == ["bind other EACCES", "bind wildcard EACCES"], (lines, err)
    assert out.splitlines() == ["got stranger", "answer stranger EACCES", "got peer", "answer peer ok"], err


UDP_RACE = textwrap.dedent("""
    import ctypes, os, socket, struct, sys, threading
    libc = ctypes.CDLL(None, use_errno=True)
    granted, other, rounds = int(sys.argv[1]), int(sys.argv[2]), int(sys.argv[3])
    def sockaddr(port):
        return struct.pack("=H", socket.AF_INET) + struct.pack("!H4s8x", port, socket.inet_aton("127.0.0.1"))
    good, bad = sockaddr(granted), sockaddr(other)
    buf = ctypes.create_string_buffer(good, 16)
    class iovec(ctypes.Structure):
        _fields_ = [("base", ctypes.c_void_p), ("len", ctypes.c_size_t)]
    class msghdr(ctypes.Structure):
        _fields_ = [("name", ctypes.c_void_p), ("namelen", ctypes.c_uint32), ("iov", ctypes.c_void_p),
                    ("iovlen", ctypes.c_size_t), ("control", ctypes.c_void_p),
                    ("controllen", ctypes.c_size_t), ("flags", ctypes.c_int)]
    class mmsghdr(ctypes.Structure):
        _fields_ = [("hdr", msghdr), ("len", ctypes.c_uint)]
    payload = ctypes.create_string_buffer(b"x", 1)
    io = iovec(ctypes.addressof(payload), 1)
    hdr = msghdr(ctypes.addressof(buf), 16, ctypes.addressof(io), 1, None, 0, 0)
    vec = (mmsghdr * 2)(mmsghdr(hdr, 0), mmsghdr(hdr, 0))
    stop = False
    def flip():
        while not stop:
            ctypes.memmove(buf, bad, 16)
            ctypes.memmove(buf, good, 16)
    threading.Thread(target=flip, daemon=True).start()
    outcomes = {}
    s = socket.socket(socket.AF_INET, socket.SOCK_DGRAM)
    for i in range(rounds):
        if i % 3 == 0:
            rc = libc.sendto(s.fileno(), payload, 1, 0, buf, 16)
        elif i % 3 == 1:
            rc = libc.sendmsg(s.fileno(), ctypes.byref(hdr), 0)
        else:
            rc = libc.sendmmsg(s.fileno(), vec, 2, 0)
        key = "ok" if rc >= 0 else os.strerror(ctypes.get_errno())
        outcomes[key] = outcomes.get(key, 0) + 1
    stop = True
    print(sorted(outcomes.items()))
""")


def test_a_racing_address_never_sends_a_datagram_beyond_the_grant(redoxcap_module_system, tmp_path):
    """The broker reads a datagram's address once and sends it on its own copy of the socket:
    a thread that swaps the address for one not granted under 300 sendto, sendmsg and
    sendmmsg calls never gets a datagram there."""
    project = tmp_path / "race-udp"
    project.mkdir()
    with _udp_server() as granted, _udp_server() as other:
        granted_port, other_port = granted.getsockname()[1], other.getsockname()[1]
        got = sandboxed(redoxcap_module_system, project,
                        [BASE_PYTHON, "-c", UDP_RACE, str(granted_port), str(other_port), "300"],
                        "--allow-udp-connect", f"127.0.0.1:{granted_port}")
        assert _datagrams(other) == []
        assert len(_datagrams(granted)) > 0
    assert got.returncode == 0 and "('ok'," in got.stdout, (got.stdout, got.stderr)


UDP_RUN_OTHER_SOCKETS = textwrap.dedent("""
    import os, socket, sys, threading
    port = int(sys.argv[1])
    a, b = socket.socketpair()
    r, w = os.pipe()
    socket.send_fds(a, [b"fd"], [w])  # a sendmsg the broker sends, with the fd it passes
    msg, fds, _, _ = socket.recv_fds(b, 10, 1)
    os.write(fds[0], b"through the passed fd")
    print(msg.decode(), os.read(r, 100).decode())
    s, p = socket.socketpair(socket.AF_UNIX, socket.SOCK_SEQPACKET)
    s.sendmsg([b"z" * 200000])
    print("record", len(p.recv(1 << 20)))
    server = socket.create_server(("127.0.0.1", port))
    got = []
    def serve():
        conn, _ = server.accept()
        while data := conn.recv(1 << 20):
            got.append(len(data))
    t = threading.Thread(target=serve)
    t.start()
    with socket.create_connection(("127.0.0.1", port)) as c:
        c.sendall(b"x" * (3 << 20))  # longer than one brokered send: short sends, resumed
        sent = c.sendmsg([b"y" * 1000])
    t.join()
    print("tcp", sum(got), sent)
    u = socket.socket(socket.AF_INET6, socket.SOCK_DGRAM)
    u.bind(("::1", port))
    u.sendto(b"six", ("::1", port))
    print("udp6", u.recvfrom(10)[0].decode())
""")


def test_a_run_granting_udp_keeps_its_other_sockets_working(redoxcap_module_system, tmp_path):
    """Where udp is granted, every sendmsg is the broker's: Unix sockets still pass fds and
    whole records, TCP still streams megabytes, and IPv6 UDP works within its grants."""
    project = tmp_path / "udp-others"
    project.mkdir()
    port = free_port()
    got = sandboxed(redoxcap_module_system, project,
                    [BASE_PYTHON, "-c", UDP_RUN_OTHER_SOCKETS, str(port)],
                    "--allow-listen", f"127.0.0.1:{port}", "--allow-connect", f"127.0.0.1:{port}",
                    "--allow-udp-listen", f"[::1]:{port}", "--allow-udp-connect", f"[::1]:{port}")
    assert got.stdout.splitlines() == [
        "fd through the passed fd", "record 200000", f"tcp {(3 << 20) + 1000} 1000", "udp6 six",
    ], got.stderr


@pytest.mark.skipif(os.geteuid() != 0 or shutil.which("setpriv") is None,
                    reason="needs root and setpriv to run without CAP_SYS_PTRACE")
def test_a_run_without_cap_sys_ptrace_brokers_its_program(tmp_path):
    """As a user without CAP_SYS_PTRACE runs it: the broker still takes the program's listener
    and fds (pidfd_getfd needs the program dumpable, while run itself is not), with udp too."""
    project = tmp_path / "p"
    project.mkdir()
    env = dict(os.environ, XDG_DATA_HOME=str(tmp_path / "data"))
    send = ("import socket, sys; socket.socket(socket.AF_INET, socket.SOCK_DGRAM)"
            ".sendto(b'no ptrace', ('127.0.0.1', int(sys.argv[1])))")
    with _udp_server() as granted:
        port = granted.getsockname()[1]
        got = subprocess.run(
            ["setpriv", "--bounding-set=-sys_ptrace", *REDOXCAP, "--state-dir", str(tmp_path / "s"),
             "run", "--dir", str(project), "--allow-udp-connect", f"127.0.0.1:{port}", "--",
             BASE_PYTHON, "-c", send, str(port)],
            capture_output=True, text=True, timeout=120, check=False, env=env)
        assert got.returncode == 0, got.stderr
        assert _datagrams(granted) == [b"no ptrace"]
