"""Sockets within the grants: bind, connect, listen and sends of an unmodified program's sockets.

The filter lets a brokered program create TCP sockets (and AF_UNIX streams),
UDP sockets in a run that grants udp, and traps every bind, connect and
listen. The broker reads the address once from the program's memory, checks
it against the run's grants (`--allow-listen`, `--allow-connect`, and
`--allow-udp-listen`, `--allow-udp-connect` for UDP), takes its own copy of
the socket (pidfd_getfd: the same socket, not a new one) and binds, connects
or listens on that copy itself (a connect to AF_UNSPEC, which names nothing,
dissolves the association there). The kernel never re-reads an address the
broker approved. Landlock still denies the program's own TCP bind and
connect, so a call that reached the kernel some other way would fail there
too; a listen on a socket the broker has not bound (which would bind a port
of the kernel's choosing on every address) is refused.

A datagram names its destination in each sendto/sendmsg/sendmmsg, in memory
the filter cannot read, and a UDP socket sends anywhere even when connected:
in a run that grants udp, every send that can name a destination comes to
the broker (`send`), which reads the whole message once and sends it on its
own copy of the socket, to a destination it checked. A send that names none
(write, send, sendto with addrlen 0) stays native: it goes to the peer the
broker connected the socket to, or fails with EDESTADDRREQ.

Not served: Unix sockets by path (EACCES, as before), UDP without a udp grant.
"""

from __future__ import annotations

import array
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
SOCKADDR_IN6_MIN = 24  # bytes of a sockaddr_in6 without its scope id (SIN6_LEN_RFC2133)


def _refused(why: str) -> OSError:
    return OSError(errno.EACCES, why)


Endpoint = tuple[str, int]


class SocketGrants:
    """What the run's grants let a brokered program bind to, connect to and send to.

    Built from `redoxcap.grants.net_grants` (None: no --allow-* option: nothing).

    Attributes:
        listen, connect: TCP endpoints (`--allow-listen`, `--allow-connect`).
        udp_listen, udp_connect: UDP endpoints to bind to, and to connect or send to.
    """

    def __init__(self, grants: dict[str, Any] | None) -> None:
        self.listen, self.connect = _endpoints((grants or {}).get("tcp"))
        self.udp_listen, self.udp_connect = _endpoints((grants or {}).get("udp"))

    @property
    def udp(self) -> bool:
        """Whether the run grants udp at all (then the filter lets UDP sockets be made)."""
        return bool(self.udp_listen or self.udp_connect)

    def may_bind(self, host: str, port: int, udp: bool = False) -> bool:
        return (host, port) in (self.udp_listen if udp else self.listen)

    def may_connect(self, host: str, port: int, udp: bool = False) -> bool:
        return (host, port) in (self.udp_connect if udp else self.connect)


def _endpoints(grant: Any) -> tuple[set[Endpoint], set[Endpoint]]:
    """(listen, connect) endpoints of one scheme's NetGrant (a bare port: both loopbacks)."""
    listen: set[Endpoint] = set()
    connect: set[Endpoint] = set()
    if grant is None:
        return listen, connect
    for entry in grant.listen:
        if isinstance(entry, int):
            listen.update((host, entry) for host in LOOPBACK)
        else:
            listen.add((_canonical(entry[0]), entry[1]))
    connect.update((_canonical(host), port) for host, port in grant.connect)
    return listen, connect


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
        if len(raw) < SOCKADDR_IN6_MIN:
            raise OSError(errno.EINVAL, "sockaddr_in6 too short")
        port = int.from_bytes(raw[2:4], "big")
        flowinfo = int.from_bytes(raw[4:8], "big")
        host = str(ipaddress.IPv6Address(raw[8:24]))
        scope = int.from_bytes(raw[24:28], "little") if len(raw) >= 28 else 0
        if scope:
            raise _refused("an address with a zone id is not granted")
        return family, _canonical(host), port, (host, port, flowinfo, 0)
    raise _refused("only TCP and UDP over IPv4 and IPv6 are served to a brokered program")


def owned_socket(fd: int) -> socket.socket:
    """A socket object on the broker's copy fd (owned by it from now on, on every path)."""
    try:
        return socket.socket(fileno=fd)
    except OSError:
        os.close(fd)
        raise


def is_udp(sock: socket.socket) -> bool:
    return (sock.family in (AF_INET, AF_INET6) and sock.type == socket.SOCK_DGRAM
            and sock.proto == socket.IPPROTO_UDP)


def is_tcp(sock: socket.socket) -> bool:
    return (sock.family in (AF_INET, AF_INET6) and sock.type == socket.SOCK_STREAM
            and sock.proto == socket.IPPROTO_TCP)


def inet_socket(fd: int) -> socket.socket:
    """A socket object on the broker's copy fd (owned by it now); EACCES unless TCP or UDP."""
    sock = owned_socket(fd)
    if not (is_tcp(sock) or is_udp(sock)):
        sock.close()
        raise _refused("only TCP and UDP sockets are served to a brokered program")
    return sock


def _granted(sock: socket.socket, raw: bytes, may: Callable[[str, int, bool], bool],
             what: str, mapped_refusal: int | None = None) -> tuple:
    """sock's address from raw, if its family is sock's and may(host, port, udp) allows it;
    what is "listen" or "connect", for the option the error names. With mapped_refusal, a
    UDP IPv6 socket also takes an IPv4 address, as its IPv4-mapped one (as Linux's connect
    and send do), unless it is IPv6-only: mapped_refusal is the errno then (the kernel's).

    Raises:
        OSError: EAFNOSUPPORT for another family; EACCES (see _refused) where no grant
            names the address.
    """
    udp = is_udp(sock)
    family, host, port, address = parse_sockaddr(raw)
    if family != sock.family:
        if not (mapped_refusal and udp and (family, sock.family) == (AF_INET, AF_INET6)):
            if sock.family == AF_INET6 and len(raw) < SOCKADDR_IN6_MIN:
                raise OSError(errno.EINVAL, "sockaddr_in6 too short")  # the kernel's first check
            raise OSError(errno.EAFNOSUPPORT, "address family does not match the socket")
        if sock.getsockopt(socket.IPPROTO_IPV6, socket.IPV6_V6ONLY):
            raise OSError(mapped_refusal, os.strerror(mapped_refusal))
        address = (f"::ffff:{host}", port, 0, 0)
    if not may(host, port, udp):
        option = f"--allow-udp-{what}" if udp else f"--allow-{what}"
        raise _refused(f"{host} port {port} is not granted ({option})")
    return address


def bind(grants: SocketGrants, fd: int, raw: bytes) -> None:
    """Bind the broker's copy fd (owned) to raw's address if granted."""
    with inet_socket(fd) as sock:
        sock.bind(_granted(sock, raw, grants.may_bind, "listen"))


def connect(grants: SocketGrants, fd: int, raw: bytes) -> None:
    """Connect the broker's copy fd (owned) to raw's address if granted; an AF_UNSPEC
    address dissolves the socket's association instead, as Linux's connect does (it
    reaches nothing: a UDP socket then sends only where it names a destination, which is
    checked; a TCP one may connect again).

    A non-blocking TCP socket answers EINPROGRESS, as the program's own connect would.
    """
    with inet_socket(fd) as sock:
        if len(raw) >= 2 and int.from_bytes(raw[:2], "little") == socket.AF_UNSPEC:
            # Python's connect takes no AF_UNSPEC address: a zeroed one, of the program's length
            linux.syscall("connect", sock.fileno(), bytes(len(raw)), len(raw))
            return
        err = sock.connect_ex(_granted(sock, raw, grants.may_connect, "connect",
                                       errno.EAFNOSUPPORT))
        if err:
            raise OSError(err, os.strerror(err))


def listen(fd: int, backlog: int) -> None:
    """Listen on the broker's copy fd (owned), a TCP socket the broker bound (port != 0)."""
    with inet_socket(fd) as sock:
        if not is_tcp(sock):
            raise OSError(errno.EOPNOTSUPP, "listen on a datagram socket")
        if sock.getsockname()[1] == 0:
            raise _refused("listen binds an unbound socket to any port: bind it first")
        sock.listen(backlog)


def check_destination(grants: SocketGrants, sock: socket.socket, raw: bytes) -> tuple:
    """The address a datagram of the UDP socket sock may go to (raw, read once), if granted
    (an IPv4 one on an IPv6 socket as its IPv4-mapped one, as the kernel takes it).

    Raises:
        OSError: EACCES for an address not in --allow-udp-connect, EINVAL or EAFNOSUPPORT
            for a malformed one, ENETUNREACH for an IPv4 one on an IPv6-only socket, as the
            kernel's.
    """
    return _granted(sock, raw, grants.may_connect, "connect", errno.ENETUNREACH)


SEND_MAX = 512 * 1024  # the most one brokered send carries (a stream socket's send is short)


def send(grants: SocketGrants, sock: socket.socket, buffers: list[bytes], name: bytes | None,
         fds: list[int], flags: int) -> int:
    """Send one message, read once from the program, on the broker's copy of its socket.

    Args:
        grants: the run's grants.
        sock: the broker's copy (the caller owns it).
        buffers: the message's bytes.
        name: the destination the program named (None: none).
        fds: the broker's copies of the fds an SCM_RIGHTS message passes (the caller owns them).
        flags: the send's flags (MSG_FASTOPEN never reaches here: the filter refuses it).

    Returns:
        The bytes sent.

    Raises:
        OSError: EACCES for a destination not granted, or a socket the broker does not
            serve; the kernel's errno of the send otherwise.
    """
    if is_udp(sock):
        if fds:
            raise OSError(errno.EINVAL, "SCM_RIGHTS on a UDP socket")
        if name is None:  # to the peer the broker connected it to, or EDESTADDRREQ
            return sock.sendmsg(buffers, [], flags)
        return sock.sendmsg(buffers, [], flags, check_destination(grants, sock, name))
    stream_types = (socket.SOCK_STREAM, socket.SOCK_SEQPACKET)
    if not (is_tcp(sock) or (sock.family == AF_UNIX and sock.type in stream_types)):
        raise _refused("only TCP, UDP and Unix stream sockets are served to a brokered program")
    if name is not None and sock.family == AF_UNIX and sock.type == socket.SOCK_STREAM:
        raise OSError(errno.EISCONN, "a Unix stream socket takes no address")
    # TCP and seqpacket ignore a name: the message goes to the peer
    control = [(socket.SOL_SOCKET, socket.SCM_RIGHTS, array.array("i", fds).tobytes())] if fds else []
    return sock.sendmsg(buffers, control, flags)
