"""Sockets within the grants: bind, connect and listen of an unmodified program's TCP sockets.

The filter lets a brokered program create TCP sockets (and AF_UNIX streams)
and traps every bind, connect and listen. The broker reads the address once
from the program's memory, checks it against the run's grants
(`--allow-listen`, `--allow-connect`), takes its own copy of the socket
(pidfd_getfd: the same socket, not a new one) and binds, connects or listens
on that copy itself. The kernel never re-reads an address the broker
approved. Landlock still denies the program's own TCP bind and connect, so a
call that reached the kernel some other way would fail there too; a listen
on a socket the broker has not bound (which would bind a port of the
kernel's choosing on every address) is refused.

Not served: UDP (a datagram names its destination in every sendto/sendmsg,
in memory a filter cannot read), Unix sockets by path (EACCES, as before).
"""

from __future__ import annotations

import errno
import ipaddress
import os
import socket
from collections.abc import Callable
from typing import Any

from redoxcap.wire import linux

AF_INET, AF_INET6, AF_UNIX = socket.AF_INET, socket.AF_INET6, socket.AF_UNIX
LOOPBACK = ("127.0.0.1", "::1")
MAX_SOCKADDR = linux.SOCKADDR_STORAGE_SIZE


def _refused(why: str) -> OSError:
    return OSError(errno.EACCES, why)


class SocketGrants:
    """What the run's grants let a brokered program bind to and connect to (TCP).

    Built from `redoxcap.grants.net_grants` (None: no --allow-* option: nothing).
    """

    def __init__(self, grants: dict[str, Any] | None) -> None:
        self.listen: set[tuple[str, int]] = set()
        self.connect: set[tuple[str, int]] = set()
        tcp = (grants or {}).get("tcp")
        if tcp is None:
            return
        for entry in tcp.listen:
            if isinstance(entry, int):
                self.listen.update((host, entry) for host in LOOPBACK)
            else:
                self.listen.add((_canonical(entry[0]), entry[1]))
        self.connect.update((_canonical(host), port) for host, port in tcp.connect)

    def may_bind(self, host: str, port: int) -> bool:
        return (host, port) in self.listen

    def may_connect(self, host: str, port: int) -> bool:
        return (host, port) in self.connect


def _canonical(host: str) -> str:
    """A numeric address as the grants hold it (an IPv4-mapped IPv6 address as IPv4)."""
    ip = ipaddress.ip_address(host)
    if isinstance(ip, ipaddress.IPv6Address) and ip.ipv4_mapped is not None:
        ip = ip.ipv4_mapped
    return str(ip)


def parse_sockaddr(raw: bytes) -> tuple[int, str, int, tuple]:
    """(family, canonical host, port, the address as Python's socket module takes it).

    Raises:
        OSError: EINVAL for a malformed address, EACCES for a family the broker does not
            serve (a path, an abstract name, anything but IPv4 and IPv6).
    """
    if len(raw) < 2:
        raise OSError(errno.EINVAL, "address too short")
    family = int.from_bytes(raw[:2], "little")
    if family == AF_INET:
        if len(raw) < 16:
            raise OSError(errno.EINVAL, "sockaddr_in too short")
        port = int.from_bytes(raw[2:4], "big")
        host = str(ipaddress.IPv4Address(raw[4:8]))
        return family, host, port, (host, port)
    if family == AF_INET6:
        if len(raw) < 24:
            raise OSError(errno.EINVAL, "sockaddr_in6 too short")
        port = int.from_bytes(raw[2:4], "big")
        flowinfo = int.from_bytes(raw[4:8], "big")
        host = str(ipaddress.IPv6Address(raw[8:24]))
        scope = int.from_bytes(raw[24:28], "little") if len(raw) >= 28 else 0
        if scope:
            raise _refused("an address with a zone id is not granted")
        return family, _canonical(host), port, (host, port, flowinfo, 0)
    raise _refused("only TCP over IPv4 and IPv6 is served to a brokered program")


def tcp_socket(fd: int) -> socket.socket:
    """A socket object on the broker's copy fd (owned by it now); EACCES unless TCP."""
    try:
        sock = socket.socket(fileno=fd)
    except OSError:
        os.close(fd)
        raise
    if sock.family not in (AF_INET, AF_INET6) or sock.type != socket.SOCK_STREAM:
        sock.close()
        raise _refused("only TCP sockets are served to a brokered program")
    return sock


def _granted(sock: socket.socket, raw: bytes, may: Callable[[str, int], bool], option: str
             ) -> tuple:
    """sock's address from raw, if its family is sock's and may(host, port) allows it.

    Raises:
        OSError: EAFNOSUPPORT for another family; EACCES (see _refused) where option grants
            no such address.
    """
    family, host, port, address = parse_sockaddr(raw)
    if family != sock.family:
        raise OSError(errno.EAFNOSUPPORT, "address family does not match the socket")
    if not may(host, port):
        raise _refused(f"{host} port {port} is not granted ({option})")
    return address


def bind(grants: SocketGrants, fd: int, raw: bytes) -> None:
    """Bind the broker's copy fd (owned) to raw's address if granted."""
    with tcp_socket(fd) as sock:
        sock.bind(_granted(sock, raw, grants.may_bind, "--allow-listen"))


def connect(grants: SocketGrants, fd: int, raw: bytes) -> None:
    """Connect the broker's copy fd (owned) to raw's address if granted.

    A non-blocking socket answers EINPROGRESS, as the program's own connect would.
    """
    with tcp_socket(fd) as sock:
        err = sock.connect_ex(_granted(sock, raw, grants.may_connect, "--allow-connect"))
        if err:
            raise OSError(err, os.strerror(err))


def listen(fd: int, backlog: int) -> None:
    """Listen on the broker's copy fd (owned), a TCP socket the broker bound (port != 0)."""
    with tcp_socket(fd) as sock:
        if sock.getsockname()[1] == 0:
            raise _refused("listen binds an unbound socket to any port: bind it first")
        sock.listen(backlog)
