"""The udp scheme (`/scheme/udp/HOST/PORT`): datagram sockets, one datagram per operation.

    python -m schemes.udp --channel-fd N [--allow-wildcard] [--allow-privileged-ports]

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

A read returns one datagram (cut to n bytes, as recv does). Datagrams larger
than MAX_IO are EMSGSIZE. Only the scheme root opens sockets: `openat`
relative to a socket is ENOTDIR, and the root cannot be read or written (EBADF).
"""

from __future__ import annotations

import argparse
import errno
import os
import socket
from dataclasses import dataclass, field

import trio

from schemes.framework import ROOT_STAT, Opened, Request, Scheme, SchemeError, daemon_cli
from schemes.netaddr import (
    DEFAULT_POLICY,
    SOCKET_STAT,
    Endpoint,
    NetPolicy,
    NetRoot,
    add_policy_options,
    address_path,
    check_local,
    check_remote,
    parse_endpoint,
    parse_host,
    policy_from,
)
from wire import protocol as P
from wire.stat import Stat


@dataclass(eq=False)
class UdpSocket:
    sock: trio.socket.SocketType
    bound: bool
    peer: tuple | None = None  # a connected socket's peer; None when bound
    read_lock: trio.Lock = field(default_factory=trio.Lock)
    write_lock: trio.Lock = field(default_factory=trio.Lock)


class UdpScheme(Scheme):
    """Serves UDP sockets."""

    name = "udp"

    def __init__(self, policy: NetPolicy = DEFAULT_POLICY) -> None:
        self.policy = policy
        self._root = NetRoot(self.name)

    def root(self) -> NetRoot:
        return self._root

    async def openat(self, req: Request, h: NetRoot, path: str, flags: int, mode: int) -> Opened:
        ep = parse_endpoint(path)
        bind = bool(flags & os.O_CREAT)
        if bind:
            check_local(ep, self.policy)
        else:
            check_remote(ep)
        sock = trio.socket.socket(ep.family, socket.SOCK_DGRAM)
        try:
            if bind:
                await sock.bind(ep.sockaddr)
                return Opened(UdpSocket(sock, bound=True), fdflags=flags)
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

    async def read(self, req: Request, h: UdpSocket, n: int) -> bytes:
        data, _ = await self._receive(h, n)
        return data

    async def recvfrom(self, req: Request, h: UdpSocket, n: int) -> list:
        data, sender = await self._receive(h, n)
        return [data, sender[0], sender[1]]

    async def write(self, req: Request, h: UdpSocket, data: bytes) -> int:
        s = h
        if s.bound:
            raise SchemeError(errno.EDESTADDRREQ, "a bound socket writes with sendto")
        if len(data) > P.MAX_IO:
            raise SchemeError(errno.EMSGSIZE)
        async with s.write_lock:
            return await s.sock.send(data)

    async def sendto(self, req: Request, h: UdpSocket, data: bytes, host: str, port: int) -> int:
        s = h
        if not s.bound:
            raise SchemeError(errno.EISCONN, "a connected socket writes to its peer")
        if not 0 < port <= 65535:
            raise SchemeError(errno.EINVAL, "PORT is 1-65535")
        ep = Endpoint(parse_host(host), port)
        check_remote(ep)
        if ep.family != s.sock.family:
            # the stdlib would hand a foreign-family host to getaddrinfo
            raise SchemeError(errno.EAFNOSUPPORT, "the address is of the other IP family")
        if len(data) > P.MAX_IO:
            raise SchemeError(errno.EMSGSIZE)
        async with s.write_lock:
            return await s.sock.sendto(data, ep.sockaddr)

    async def fstat(self, req: Request, h: NetRoot | UdpSocket) -> Stat:
        return ROOT_STAT if h is self._root else SOCKET_STAT

    async def getdents(self, req: Request, h: NetRoot, start: int) -> list[str]:
        raise SchemeError(errno.EACCES, "the network cannot be listed")

    async def fpath(self, req: Request, h: NetRoot | UdpSocket) -> str:
        if h is self._root:
            return f"/scheme/{self.name}"
        return address_path(self.name, h.sock.getsockname() if h.bound else h.peer)

    async def close(self, h: NetRoot | UdpSocket) -> None:
        if h is not self._root:
            h.sock.close()


def _options(parser: argparse.ArgumentParser) -> None:
    add_policy_options(parser)


if __name__ == "__main__":
    daemon_cli("schemes.udp", lambda args: UdpScheme(policy_from(args)), _options)
