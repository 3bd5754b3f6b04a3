"""The tcp scheme (`/scheme/tcp/HOST/PORT`): TCP connections and listeners.

    python -m schemes.tcp --channel-fd N [--connect-timeout SECONDS]
                          [--allow-wildcard] [--allow-privileged-ports]

HOST is a numeric IPv4 or IPv6 address in canonical form (`127.0.0.1`,
`::1`; not `127.1`, `2130706433`, `0`, `[::1]`, `fe80::1%eth0` or a name:
nothing ever goes to a resolver); PORT is 1-65535 in ASCII decimal without
leading zeros. Anything else is EINVAL.

Opening HOST/PORT connects (ECONNREFUSED, ETIMEDOUT after --connect-timeout).
Opening with O_CREAT listens on HOST/PORT; port 0 picks one and `fpath` tells
which. Listening on a wildcard (`0.0.0.0`, `::`), multicast or broadcast
address needs `--allow-wildcard`, on a port below 1024 `--allow-privileged-ports`
(EACCES otherwise); connecting to any port is allowed.
`dup(listener, b"accept")` waits for one connection and returns it as a new
handle. read returns what has arrived (b"" at EOF), write sends everything,
`shutdown(SHUT_WR)` ends the stream for the peer. Every wait is a trio wait,
so a blocked read or accept never stalls other clients of the scheme.

Only the scheme root opens endpoints: a connection or a listener names one
socket, not a directory, so `openat` relative to it is ENOTDIR. The root
itself cannot be read or written (EBADF).
"""

from __future__ import annotations

import argparse
import errno
import ipaddress
import os
import socket
import stat
from dataclasses import dataclass, field

import trio

from schemes.framework import Opened, Request, Scheme, SchemeError, daemon_cli
from wire import protocol as P

DEFAULT_CONNECT_TIMEOUT = 10.0
FIRST_UNPRIVILEGED_PORT = 1024
# The root opens but cannot be listed: a directory with search permission only.
ROOT_STAT = {"st_mode": stat.S_IFDIR | 0o111, "st_nlink": 2}
BROADCAST = ipaddress.IPv4Address("255.255.255.255")
IPAddress = ipaddress.IPv4Address | ipaddress.IPv6Address


@dataclass(frozen=True)
class NetPolicy:
    """What a tcp or udp daemon lets any client with its root listen on or bind to."""

    allow_wildcard: bool = False  # 0.0.0.0, ::, multicast and broadcast addresses
    allow_privileged_ports: bool = False  # ports 1-1023


DEFAULT_POLICY = NetPolicy()


@dataclass(frozen=True)
class Endpoint:
    """A checked HOST/PORT: a canonical numeric address and a port in 0-65535."""

    ip: IPAddress
    port: int

    @property
    def family(self) -> int:
        return socket.AF_INET if self.ip.version == 4 else socket.AF_INET6

    @property
    def sockaddr(self) -> tuple:
        """The address for bind/connect/sendto: numeric, so no resolver is ever asked."""
        if self.ip.version == 4:
            return (str(self.ip), self.port)
        return (str(self.ip), self.port, 0, 0)


def parse_host(host: str) -> IPAddress:
    """A numeric IPv4/IPv6 address in exactly its canonical form; EINVAL otherwise.

    Raises:
        SchemeError: EINVAL for names, shorthand or padded forms, zone ids.
    """
    try:
        ip = ipaddress.ip_address(host)
    except ValueError:
        raise SchemeError(errno.EINVAL, "HOST is a numeric IPv4 or IPv6 address") from None
    if str(ip) != host or getattr(ip, "scope_id", None) is not None:
        # a zone id (`%eth0`) would send the name to getaddrinfo for translation
        raise SchemeError(errno.EINVAL, "HOST must be an address in canonical form")
    return ip


def parse_port(port: str) -> int:
    """PORT in ASCII decimal, 0-65535, without sign, spaces or leading zeros; EINVAL otherwise."""
    if not (0 < len(port) <= 5 and port.isascii() and port.isdigit()) or str(int(port)) != port:
        raise SchemeError(errno.EINVAL, "PORT is a decimal number 0-65535")
    value = int(port)
    if value > 65535:
        raise SchemeError(errno.EINVAL, "PORT is a decimal number 0-65535")
    return value


def parse_endpoint(path: str) -> Endpoint:
    """`HOST/PORT` (leading slashes allowed, as from `/scheme/NAME/HOST/PORT`) -> Endpoint.

    Raises:
        SchemeError: EINVAL for anything but a canonical numeric address and port.
    """
    host, slash, port = path.lstrip("/").rpartition("/")
    if not slash:
        raise SchemeError(errno.EINVAL, "a path is HOST/PORT")
    return Endpoint(parse_host(host), parse_port(port))


def _plain(ip: IPAddress) -> IPAddress:
    """The IPv4 address inside an IPv4-mapped IPv6 one (`::ffff:0:0` is 0.0.0.0)."""
    mapped = getattr(ip, "ipv4_mapped", None)
    return mapped if mapped is not None else ip


def check_local(ep: Endpoint, policy: NetPolicy) -> None:
    """May a client listen on / bind to ep? Port 0 picks a free port.

    Raises:
        SchemeError: EACCES for a wildcard, multicast or broadcast address or a
            privileged port that the policy does not allow.
    """
    ip = _plain(ep.ip)
    if (ip.is_unspecified or ip.is_multicast or ip == BROADCAST) and not policy.allow_wildcard:
        raise SchemeError(errno.EACCES, f"{ep.ip} needs --allow-wildcard")
    if 0 < ep.port < FIRST_UNPRIVILEGED_PORT and not policy.allow_privileged_ports:
        raise SchemeError(errno.EACCES, f"port {ep.port} needs --allow-privileged-ports")


def check_remote(ep: Endpoint) -> None:
    """Is ep a peer one can connect or send to?

    Raises:
        SchemeError: EINVAL for port 0 or an unspecified address (not a peer).
    """
    if ep.port == 0 or _plain(ep.ip).is_unspecified:
        raise SchemeError(errno.EINVAL, "a peer has an address and a port")


def address_path(scheme: str, addr: tuple) -> str:
    """`/scheme/NAME/HOST/PORT` for a socket address."""
    return f"/scheme/{scheme}/{addr[0]}/{addr[1]}"


def add_policy_options(parser: argparse.ArgumentParser) -> None:
    """The options that widen what clients may listen on or bind to (all off by default)."""
    parser.add_argument("--allow-wildcard", action="store_true",
                        help="let clients listen on or bind to 0.0.0.0, ::, multicast, broadcast")
    parser.add_argument("--allow-privileged-ports", action="store_true",
                        help="let clients listen on or bind to ports below 1024")


def policy_from(args: argparse.Namespace) -> NetPolicy:
    """The NetPolicy the parsed options ask for."""
    return NetPolicy(allow_wildcard=args.allow_wildcard,
                     allow_privileged_ports=args.allow_privileged_ports)


class NetRoot:
    """The object behind a tcp or udp scheme root (handle 0): the only handle that opens."""

    def __init__(self, scheme: str) -> None:
        self.scheme = scheme

    def __repr__(self) -> str:
        return f"NetRoot({self.scheme!r})"


@dataclass(eq=False)
class TcpSocket:
    sock: trio.socket.SocketType
    listening: bool
    read_lock: trio.Lock = field(default_factory=trio.Lock)  # one recv/accept at a time
    write_lock: trio.Lock = field(default_factory=trio.Lock)


class TcpScheme(Scheme):
    """Serves TCP sockets."""

    name = "tcp"

    def __init__(self, connect_timeout: float = DEFAULT_CONNECT_TIMEOUT,
                 policy: NetPolicy = DEFAULT_POLICY) -> None:
        self.connect_timeout = connect_timeout
        self.policy = policy
        self._root = NetRoot(self.name)

    def root(self) -> NetRoot:
        return self._root

    async def openat(self, req: Request, h: NetRoot | TcpSocket, path: str, flags: int,
                     mode: int) -> Opened:
        if h is not self._root:
            raise SchemeError(errno.ENOTDIR, "a tcp socket is not a directory")
        ep = parse_endpoint(path)
        listen = bool(flags & os.O_CREAT)
        if listen:
            check_local(ep, self.policy)
        else:
            check_remote(ep)
        sock = trio.socket.socket(ep.family, socket.SOCK_STREAM)
        try:
            if listen:
                sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
                await sock.bind(ep.sockaddr)
                sock.listen(128)
                return Opened(TcpSocket(sock, listening=True), fdflags=flags)
            with trio.move_on_after(self.connect_timeout) as scope:
                await sock.connect(ep.sockaddr)
            if scope.cancelled_caught:
                raise SchemeError(errno.ETIMEDOUT)
            return Opened(TcpSocket(sock, listening=False), fdflags=flags & os.O_ACCMODE)
        except BaseException:
            sock.close()
            raise

    async def dup(self, req: Request, h: NetRoot | TcpSocket, buf: bytes) -> Opened:
        if buf != b"accept" or not isinstance(h, TcpSocket) or not h.listening:
            raise SchemeError(errno.EINVAL, 'tcp dup takes b"accept" on a listener')
        async with h.read_lock:
            conn, _ = await h.sock.accept()
        return Opened(TcpSocket(conn, listening=False), fdflags=os.O_RDWR)

    def _stream(self, h: NetRoot | TcpSocket) -> TcpSocket:
        if not isinstance(h, TcpSocket):
            raise SchemeError(errno.EBADF, "the tcp root is not a socket")
        if h.listening:
            raise SchemeError(errno.ENOTCONN)
        return h

    async def read(self, req: Request, h: NetRoot | TcpSocket, n: int) -> bytes:
        s = self._stream(h)
        if n < 0:
            raise SchemeError(errno.EINVAL)
        async with s.read_lock:
            return await s.sock.recv(min(n, P.MAX_IO))

    async def write(self, req: Request, h: NetRoot | TcpSocket, data: bytes) -> int:
        s = self._stream(h)
        view = memoryview(data)
        async with s.write_lock:
            while view:
                sent = await s.sock.send(view)
                view = view[sent:]
        return len(data)

    async def shutdown(self, req: Request, h: NetRoot | TcpSocket, how: int) -> None:
        s = self._stream(h)
        if how not in (socket.SHUT_RD, socket.SHUT_WR, socket.SHUT_RDWR):
            raise SchemeError(errno.EINVAL)
        s.sock.shutdown(how)

    async def fstat(self, req: Request, h: NetRoot | TcpSocket) -> dict:
        if not isinstance(h, TcpSocket):
            return dict(ROOT_STAT)
        return {"st_mode": stat.S_IFSOCK | 0o777}

    async def getdents(self, req: Request, h: NetRoot | TcpSocket, start: int) -> list[str]:
        if h is self._root:
            raise SchemeError(errno.EACCES, "the network cannot be listed")
        raise SchemeError(errno.ENOTDIR)

    async def fpath(self, req: Request, h: NetRoot | TcpSocket) -> str:
        if not isinstance(h, TcpSocket):
            return f"/scheme/{self.name}"
        addr = h.sock.getsockname() if h.listening else h.sock.getpeername()
        return address_path(self.name, addr)

    async def close(self, h: NetRoot | TcpSocket) -> None:
        if isinstance(h, TcpSocket):
            h.sock.close()


def _options(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--connect-timeout", type=float, default=DEFAULT_CONNECT_TIMEOUT,
                        help="seconds before a connect fails with ETIMEDOUT")
    add_policy_options(parser)


if __name__ == "__main__":
    daemon_cli("schemes.tcp", lambda a: TcpScheme(a.connect_timeout, policy_from(a)), _options)
