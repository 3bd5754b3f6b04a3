"""The udp scheme (`/scheme/udp/HOST/PORT`): datagram sockets, one datagram per read or write.

Opening HOST/PORT gives a socket connected to it; opening with O_CREAT gives
one bound to HOST/PORT (port 0 picks one; `fpath` tells which). A read returns
one datagram (cut to n bytes, as recv does). A bound socket has no peer of
its own: each read remembers the datagram's sender and a write answers the
last one (EDESTADDRREQ before any datagram arrived), which is all an echo
server needs without a sendto operation. Datagrams larger than MAX_IO are
EMSGSIZE.
"""

from __future__ import annotations

import errno
import os
import socket
import stat
from dataclasses import dataclass, field

import trio

from rt import protocol as P
from schemes.framework import Opened, Request, Scheme, SchemeError, daemon_cli
from schemes.tcp import address_path, resolve, split_host_port


@dataclass(eq=False)
class UdpSocket:
    sock: trio.socket.SocketType
    bound: bool
    peer: tuple | None = None
    read_lock: trio.Lock = field(default_factory=trio.Lock)
    write_lock: trio.Lock = field(default_factory=trio.Lock)


class UdpScheme(Scheme):
    """Serves UDP sockets."""

    name = "udp"

    async def openat(self, req: Request, h, path: str, flags: int, mode: int) -> Opened:
        host, port = split_host_port(path)
        family, addr = await resolve(host, port, socket.SOCK_DGRAM)
        sock = trio.socket.socket(family, socket.SOCK_DGRAM)
        try:
            if flags & os.O_CREAT:
                await sock.bind(addr)
                return Opened(UdpSocket(sock, bound=True), fdflags=flags)
            await sock.connect(addr)
            return Opened(UdpSocket(sock, bound=False, peer=addr), fdflags=flags & os.O_ACCMODE)
        except BaseException:
            sock.close()
            raise

    def _socket(self, h) -> UdpSocket:
        if not isinstance(h, UdpSocket):
            raise SchemeError(errno.EBADF)
        return h

    async def read(self, req: Request, h, n: int) -> bytes:
        s = self._socket(h)
        if n < 0:
            raise SchemeError(errno.EINVAL)
        async with s.read_lock:
            data, sender = await s.sock.recvfrom(P.MAX_IO)
        if s.bound:
            s.peer = sender
        return data[:n]

    async def write(self, req: Request, h, data: bytes) -> int:
        s = self._socket(h)
        if len(data) > P.MAX_IO:
            raise SchemeError(errno.EMSGSIZE)
        async with s.write_lock:
            if not s.bound:
                return await s.sock.send(data)
            if s.peer is None:
                raise SchemeError(errno.EDESTADDRREQ, "no datagram has arrived to answer")
            return await s.sock.sendto(data, s.peer)

    async def fstat(self, req: Request, h) -> dict:
        return {"st_mode": stat.S_IFSOCK | 0o777}

    async def fpath(self, req: Request, h) -> str:
        if not isinstance(h, UdpSocket):
            return f"/scheme/{self.name}"
        return address_path(self.name, h.sock.getsockname() if h.bound else h.peer)

    async def close(self, h) -> None:
        if isinstance(h, UdpSocket):
            h.sock.close()


if __name__ == "__main__":
    daemon_cli("schemes.udp", lambda args: UdpScheme())
