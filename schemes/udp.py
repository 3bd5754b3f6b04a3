"""The udp scheme (`/scheme/udp/HOST/PORT`): datagram sockets, one datagram per operation.

    python -m redoxcap.schemes.udp --channel-fd N [--allow-wildcard] [--allow-privileged-ports]

HOST and PORT are as for tcp: a canonical numeric IPv4/IPv6 address and a
port 1-65535 in ASCII (EINVAL otherwise; nothing goes to a resolver).

Opening HOST/PORT gives a socket connected to it: read and write exchange
datagrams with that peer, `recvfrom` also says who sent (always the peer)
and `sendto` is EISCONN. Opening with O_CREAT gives a socket bound to
HOST/PORT (port 0 picks one; `fpath` tells which): it has no peer, so
`recvfrom` says who sent each datagram and `sendto` says where each goes;
a plain read gives just the data and a plain write is EDESTADDRREQ. Binding
to a wildcard, multicast or broadcast address needs `--allow-wildcard`, to a
port below 1024 `--allow-privileged-ports` (EACCES otherwise).

`dup(root, b"grant:" + JSON)` makes a grant (schemes/netaddr.py): a root
that connects only to the peers and binds only to the endpoints it lists
(EACCES for anything else), and that can only be narrowed further; a socket
bound through a grant `sendto`s only its connect peers (EACCES), and
receives from anyone. Opening "." with O_DIRECTORY on a root or a grant is
another handle on it. Roots and grants survive a restart of the daemon;
sockets do not.

A read returns one datagram (cut to n bytes, as recv does). Datagrams larger
than MAX_IO are EMSGSIZE. Only the scheme root or a grant opens sockets:
`openat` relative to a socket is ENOTDIR, and the root cannot be read or
written (EBADF).
"""

from __future__ import annotations

import argparse
import errno
import os
import socket
from dataclasses import dataclass, field

import trio

from redoxcap.schemes.framework import Opened, Request, SchemeError, daemon_cli, takes
from redoxcap.schemes.netaddr import (
    Endpoint,
    NetGrant,
    NetRoot,
    NetScheme,
    add_policy_options,
    address_path,
    check_granted,
    check_remote,
    endpoint_to_open,
    is_self_path,
    parse_host,
    policy_from,
)
from redoxcap.wire import protocol as P


@dataclass(eq=False)
class UdpSocket:
    sock: trio.socket.SocketType
    bound: bool
    peer: tuple | None = None  # a connected socket's peer; None when bound
    granted: NetRoot | NetGrant | None = None  # what it was opened through: where sendto may go
    read_lock: trio.Lock = field(default_factory=trio.Lock)
    write_lock: trio.Lock = field(default_factory=trio.Lock)


class UdpScheme(NetScheme):
    """Serves UDP sockets."""

    name = "udp"


    @takes(NetRoot, NetGrant)
    async def openat(self, req: Request, h: NetRoot | NetGrant, path: str, flags: int,
                     mode: int) -> Opened:
        if is_self_path(path, flags):
            return Opened(h, fdflags=os.O_RDONLY | os.O_DIRECTORY)
        ep, bind = endpoint_to_open(h, path, flags, self.policy)
        sock = trio.socket.socket(ep.family, socket.SOCK_DGRAM)
        try:
            if bind:
                await sock.bind(ep.sockaddr)
                return Opened(UdpSocket(sock, bound=True, granted=h), fdflags=flags)
            await sock.connect(ep.sockaddr)
            connected = UdpSocket(sock, bound=False, peer=ep.sockaddr)
            return Opened(connected, fdflags=flags & os.O_ACCMODE)
        except BaseException:
            sock.close()
            raise

    async def _receive(self, s: UdpSocket, n: int) -> tuple[bytes, tuple]:
        if n < 0:
            raise SchemeError(errno.EINVAL)
        async with s.read_lock:
            data, sender = await s.sock.recvfrom(P.MAX_IO)
        return data[:n], sender

    @takes(UdpSocket)
    async def read(self, req: Request, h: UdpSocket, n: int) -> bytes:
        data, _ = await self._receive(h, n)
        return data

    @takes(UdpSocket)
    async def recvfrom(self, req: Request, h: UdpSocket, n: int) -> list:
        data, sender = await self._receive(h, n)
        return [data, sender[0], sender[1]]

    @takes(UdpSocket)
    async def write(self, req: Request, h: UdpSocket, data: bytes) -> int:
        s = h
        if s.bound:
            raise SchemeError(errno.EDESTADDRREQ, "a bound socket writes with sendto")
        if len(data) > P.MAX_IO:
            raise SchemeError(errno.EMSGSIZE)
        async with s.write_lock:
            return await s.sock.send(data)

    @takes(UdpSocket)
    async def sendto(self, req: Request, h: UdpSocket, data: bytes, host: str, port: int) -> int:
        s = h
        if not s.bound:
            raise SchemeError(errno.EISCONN, "a connected socket writes to its peer")
        if not 0 < port <= 65535:
            raise SchemeError(errno.EINVAL, "PORT is 1-65535")
        ep = Endpoint(parse_host(host), port)
        check_remote(ep)
        if s.granted is not None:
            check_granted(s.granted, ep, local=False)
        if ep.family != s.sock.family:
            # the stdlib would hand a foreign-family host to getaddrinfo
            raise SchemeError(errno.EAFNOSUPPORT, "the address is of the other IP family")
        if len(data) > P.MAX_IO:
            raise SchemeError(errno.EMSGSIZE)
        async with s.write_lock:
            return await s.sock.sendto(data, ep.sockaddr)

    @takes(NetRoot, NetGrant)
    async def dup(self, req: Request, h: NetRoot | NetGrant, buf: bytes) -> Opened:
        return self.narrowed(h, buf)

    def socket_path(self, h: UdpSocket) -> str:
        return address_path(self.name, h.sock.getsockname() if h.bound else h.peer)


def _options(parser: argparse.ArgumentParser) -> None:
    add_policy_options(parser)


if __name__ == "__main__":
    daemon_cli("redoxcap.schemes.udp", lambda args: UdpScheme(policy_from(args)), _options)
