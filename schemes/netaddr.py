"""What tcp and udp share: HOST/PORT paths, the listen policy and their root.

HOST is a numeric IPv4 or IPv6 address in canonical form and PORT 1-65535 in
ASCII decimal; nothing ever goes to a resolver. Listening on or binding to a
wildcard, multicast or broadcast address, or a privileged port, needs the
daemon's grant (NetPolicy).
"""

from __future__ import annotations

import argparse
import errno
import ipaddress
import socket
import stat
from dataclasses import dataclass

from schemes.framework import SchemeError
from wire.stat import Stat

FIRST_UNPRIVILEGED_PORT = 1024
BROADCAST = ipaddress.IPv4Address("255.255.255.255")
SOCKET_STAT = Stat(st_mode=stat.S_IFSOCK | 0o777)
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


