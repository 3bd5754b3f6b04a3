"""What tcp and udp share: HOST/PORT paths, the listen policy, their root and grants.

HOST is a numeric IPv4 or IPv6 address in canonical form and PORT 1-65535 in
ASCII decimal; nothing ever goes to a resolver. Listening on or binding to a
wildcard, multicast or broadcast address, or a privileged port, needs the
daemon's grant (NetPolicy).

A *grant* is a narrowed root: `dup(root, b"grant:" + JSON)` with JSON an
object `{"connect": [[HOST, PORT], ...], "listen": [PORT or [HOST, PORT], ...]}`
(either key may be left out: nothing of that kind) opens only the endpoints
it lists, and EACCES for anything else. A bare listen PORT means the loopback
addresses (127.0.0.1 and ::1) on that port; listen port 0 lets the system
pick a free port. A grant never exceeds the daemon's policy (EACCES), is
narrowed again only to a subset of itself (EACCES for anything more), and
anything malformed is EINVAL.
"""

from __future__ import annotations

import argparse
import errno
import ipaddress
import json
import os
import socket
import stat
from dataclasses import dataclass
from typing import Any

from redoxcap.schemes.framework import ROOT_STAT, Opened, Request, Scheme, SchemeError, takes
from redoxcap.wire.stat import Stat

FIRST_UNPRIVILEGED_PORT = 1024
BROADCAST = ipaddress.IPv4Address("255.255.255.255")
SOCKET_STAT = Stat(st_mode=stat.S_IFSOCK | 0o777)
IPAddress = ipaddress.IPv4Address | ipaddress.IPv6Address
GRANT_PREFIX = b"grant:"
GRANT_KEYS = frozenset({"connect", "listen"})
MAX_GRANT_ENTRIES = 1024  # per kind; a grant is a list a person wrote, not a firewall
LOOPBACK = (ipaddress.IPv4Address("127.0.0.1"), ipaddress.IPv6Address("::1"))


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




@dataclass(frozen=True)
class NetGrant:
    """The object behind a narrowed tcp or udp root: it opens only the endpoints it lists.

    Attributes:
        connect: the peers it may connect to (and, from a udp socket bound
            through it, send datagrams to).
        listen: the local endpoints it may listen on (tcp) or bind to (udp);
            port 0 there asks the system for a free port.
    """

    connect: frozenset[Endpoint] = frozenset()
    listen: frozenset[Endpoint] = frozenset()

    def allows(self, ep: Endpoint, local: bool) -> bool:
        """Whether ep is granted as a local endpoint (local) or as a peer."""
        return ep in (self.listen if local else self.connect)

    def covers(self, other: NetGrant) -> bool:
        """Whether other grants nothing this grant does not."""
        return other.connect <= self.connect and other.listen <= self.listen

    def to_wire(self) -> dict[str, list[list[Any]]]:
        """The grant as the JSON object `dup` takes (sorted, every host spelled out)."""
        return {"connect": _sorted_pairs(self.connect), "listen": _sorted_pairs(self.listen)}


def _sorted_pairs(endpoints: frozenset[Endpoint]) -> list[list[Any]]:
    ordered = sorted(endpoints, key=lambda ep: (ep.ip.version, int(ep.ip), ep.port))
    return [[str(ep.ip), ep.port] for ep in ordered]


def _reject_constant(name: str) -> None:
    raise ValueError(f"{name} is not JSON")  # NaN and Infinity are not ports


def _unique_keys(pairs: list[tuple[str, Any]]) -> dict[str, Any]:
    keys = [k for k, _ in pairs]
    if len(set(keys)) != len(keys):
        raise ValueError("a key is given twice")  # which one would win is a guess
    return dict(pairs)


def _grant_port(value: object, *, local: bool) -> int:
    # bool is an int to Python, but `true` is not a port
    if type(value) is not int or not (0 if local else 1) <= value <= 65535:
        raise SchemeError(errno.EINVAL, "a granted PORT is an integer " + ("0-65535" if local else "1-65535"))
    return value


def _grant_endpoint(value: object, *, local: bool) -> list[Endpoint]:
    """One entry of a grant's list: [HOST, PORT], or (listen only) a bare PORT on loopback."""
    if local and type(value) is int:
        port = _grant_port(value, local=True)
        return [Endpoint(ip, port) for ip in LOOPBACK]
    if not (isinstance(value, list) and len(value) == 2 and isinstance(value[0], str)):
        raise SchemeError(errno.EINVAL, "a granted endpoint is [HOST, PORT]" + (" or PORT" if local else ""))
    ep = Endpoint(parse_host(value[0]), _grant_port(value[1], local=local))
    if not local:
        check_remote(ep)
    return [ep]


def parse_grant(text: bytes) -> NetGrant:
    """The JSON object after `grant:` -> NetGrant (see the module docstring).

    Raises:
        SchemeError: EINVAL for anything but an object with at most the keys
            connect and listen, each a list of at most MAX_GRANT_ENTRIES
            canonical endpoints.
    """
    try:
        value = json.loads(text.decode("utf-8"), object_pairs_hook=_unique_keys,
                           parse_constant=_reject_constant)
    except (UnicodeDecodeError, ValueError, RecursionError):
        raise SchemeError(errno.EINVAL, "a grant is a JSON object") from None
    if not isinstance(value, dict) or not set(value) <= GRANT_KEYS:
        raise SchemeError(errno.EINVAL, 'a grant is {"connect": [...], "listen": [...]}')
    kinds = {}
    for key in sorted(GRANT_KEYS):
        entries = value.get(key, [])
        if not isinstance(entries, list) or len(entries) > MAX_GRANT_ENTRIES:
            raise SchemeError(errno.EINVAL, f"a grant's {key} is a list of at most "
                                            f"{MAX_GRANT_ENTRIES} endpoints")
        kinds[key] = frozenset(ep for entry in entries
                               for ep in _grant_endpoint(entry, local=key == "listen"))
    return NetGrant(connect=kinds["connect"], listen=kinds["listen"])


def narrow(h: NetRoot | NetGrant, buf: bytes, policy: NetPolicy) -> NetGrant:
    """The grant `dup(h, buf)` asks for, with buf = b"grant:" + JSON.

    Raises:
        SchemeError: EINVAL for a malformed grant; EACCES for a listen the
            daemon's policy does not allow, or (h a grant) for anything h lacks.
    """
    grant = parse_grant(buf[len(GRANT_PREFIX):])
    for ep in grant.listen:
        check_local(ep, policy)
    if isinstance(h, NetGrant) and not h.covers(grant):
        raise SchemeError(errno.EACCES, "a grant can only be narrowed")
    return grant


def check_granted(h: NetRoot | NetGrant, ep: Endpoint, local: bool) -> None:
    """Does h reach ep (as a local endpoint if local, else as a peer)? A root reaches all.

    Raises:
        SchemeError: EACCES when h is a grant that does not list ep.
    """
    if isinstance(h, NetGrant) and not h.allows(ep, local):
        what = "listen on" if local else "reach"
        raise SchemeError(errno.EACCES, f"this capability may not {what} {ep.ip}/{ep.port}")


def endpoint_to_open(h: NetRoot | NetGrant, path: str, flags: int,
                     policy: NetPolicy) -> tuple[Endpoint, bool]:
    """What an openat of HOST/PORT on a root or grant h may open: (the endpoint, whether
    it is a local one to listen on or bind to: O_CREAT).

    Raises:
        SchemeError: EINVAL for a malformed path, ENOTDIR with O_DIRECTORY (a socket is
            not a directory: never an ignored flag), EACCES for what the policy or the
            grant does not allow.
    """
    ep = parse_endpoint(path)
    if flags & os.O_DIRECTORY:
        raise SchemeError(errno.ENOTDIR, "HOST/PORT names a socket, not a directory")
    local = bool(flags & os.O_CREAT)
    if local:
        check_local(ep, policy)
    else:
        check_remote(ep)
    check_granted(h, ep, local=local)
    return ep, local


def is_self_path(path: str, flags: int) -> bool:
    """`openat(h, ".", O_DIRECTORY)` (or "" or "/"): another handle on the root or grant h."""
    return path.strip("/") in ("", ".") and bool(flags & os.O_DIRECTORY) and not flags & os.O_CREAT


def keep_dir(h: NetRoot | NetGrant) -> tuple[dict, list[int]]:
    """What the router keeps of a root or grant handle across a crash of the daemon."""
    return ({"root": True} if isinstance(h, NetRoot) else {"grant": h.to_wire()}), []


def restore_dir(value: Any, root: NetRoot, policy: NetPolicy) -> NetRoot | NetGrant:
    """The handle object for what keep_dir returned, checked again like a new grant.

    Raises:
        SchemeError: EINVAL for a kept value that is not one keep_dir makes.
    """
    if value == {"root": True}:
        return root
    if not (isinstance(value, dict) and set(value) == {"grant"}):
        raise SchemeError(errno.EINVAL, "not a kept root or grant")
    return narrow(root, GRANT_PREFIX + json.dumps(value["grant"]).encode(), policy)


class NetScheme(Scheme):
    """What tcp and udp share: a root and grants that open HOST/PORT endpoints, and
    sockets (objects with a `sock`) that die with the daemon. Subclasses open and serve
    the sockets (`openat` after `endpoint_to_open`) and say a socket's fpath."""

    def __init__(self, policy: NetPolicy = DEFAULT_POLICY) -> None:
        self.policy = policy
        self._root = NetRoot(self.name)

    def root(self) -> NetRoot:
        return self._root

    def socket_path(self, h: Any) -> str:
        """`/scheme/NAME/HOST/PORT` of a socket handle."""
        raise NotImplementedError

    def narrowed(self, h: NetRoot | NetGrant, buf: bytes) -> Opened:
        """dup(root or grant, b"grant:..."): a grant of at most what h grants."""
        if not buf.startswith(GRANT_PREFIX):
            raise SchemeError(errno.EINVAL, f'{self.name} dup takes b"grant:..." on a root or a grant')
        return Opened(narrow(h, buf, self.policy), fdflags=os.O_RDONLY | os.O_DIRECTORY)

    async def fstat(self, req: Request, h: Any) -> Stat:
        return ROOT_STAT if isinstance(h, NetRoot | NetGrant) else SOCKET_STAT

    @takes(NetRoot, NetGrant)
    async def getdents(self, req: Request, h: NetRoot | NetGrant, start: int) -> list[str]:
        raise SchemeError(errno.EACCES, "the network cannot be listed")

    async def fpath(self, req: Request, h: Any) -> str:
        if isinstance(h, NetRoot | NetGrant):
            # a grant is what /scheme/NAME names in the namespace that holds it
            return f"/scheme/{self.name}"
        return self.socket_path(h)

    async def close(self, h: Any) -> None:
        if not isinstance(h, NetRoot | NetGrant):
            h.sock.close()

    def keep(self, h: Any) -> tuple[dict, list[int]] | None:
        """A root or grant is plain data, kept across a crash; a socket dies with the daemon."""
        return keep_dir(h) if isinstance(h, NetRoot | NetGrant) else None

    def restore(self, value: dict, fds: list[int]) -> NetRoot | NetGrant:
        return restore_dir(value, self._root, self.policy)
