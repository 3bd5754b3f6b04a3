"""The tcp scheme (`/scheme/tcp/HOST/PORT`): TCP connections and listeners.

    python -m schemes.tcp --channel-fd N [--connect-timeout SECONDS]

Opening HOST/PORT connects (ECONNREFUSED, ETIMEDOUT after --connect-timeout,
EHOSTUNREACH for a name that does not resolve). Opening with O_CREAT listens
on HOST/PORT; port 0 picks one and `fpath` tells which.
`dup(listener, b"accept")` waits for one connection and returns it as a new
handle. read returns what has arrived (b"" at EOF), write sends everything,
`shutdown(SHUT_WR)` ends the stream for the peer. Every wait is a trio wait,
so a blocked read or accept never stalls other clients of the scheme.
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

DEFAULT_CONNECT_TIMEOUT = 10.0


@dataclass(eq=False)
class TcpSocket:
    sock: trio.socket.SocketType
    listening: bool
    read_lock: trio.Lock = field(default_factory=trio.Lock)  # one recv/accept at a time
    write_lock: trio.Lock = field(default_factory=trio.Lock)


def split_host_port(path: str) -> tuple[str, int]:
    """'HOST/PORT' -> (HOST, PORT); EINVAL for anything else."""
    host, slash, port = path.strip("/").rpartition("/")
    if not slash or not host or "/" in host or not port.isdigit() or not 0 <= int(port) <= 65535:
        raise SchemeError(errno.EINVAL, "a tcp path is HOST/PORT")
    return host, int(port)


async def resolve(host: str, port: int, kind: int) -> tuple[int, tuple]:
    """(family, sockaddr) for host and port."""
    try:
        infos = await trio.socket.getaddrinfo(host, port, type=kind)
    except socket.gaierror:
        raise SchemeError(errno.EHOSTUNREACH, f"cannot resolve {host!r}") from None
    family, _, _, _, addr = infos[0]
    return family, addr


def address_path(scheme: str, addr: tuple) -> str:
    return f"/scheme/{scheme}/{addr[0]}/{addr[1]}"


class TcpScheme(Scheme):
    """Serves TCP sockets."""

    name = "tcp"

    def __init__(self, connect_timeout: float = DEFAULT_CONNECT_TIMEOUT) -> None:
        self.connect_timeout = connect_timeout

    async def openat(self, req: Request, h, path: str, flags: int, mode: int) -> Opened:
        host, port = split_host_port(path)
        family, addr = await resolve(host, port, socket.SOCK_STREAM)
        sock = trio.socket.socket(family, socket.SOCK_STREAM)
        try:
            if flags & os.O_CREAT:
                sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
                await sock.bind(addr)
                sock.listen(128)
                return Opened(TcpSocket(sock, listening=True), fdflags=flags)
            with trio.move_on_after(self.connect_timeout) as scope:
                await sock.connect(addr)
            if scope.cancelled_caught:
                raise SchemeError(errno.ETIMEDOUT)
            return Opened(TcpSocket(sock, listening=False), fdflags=flags & os.O_ACCMODE)
        except BaseException:
            sock.close()
            raise

    async def dup(self, req: Request, h, buf: bytes) -> Opened:
        if buf != b"accept" or not isinstance(h, TcpSocket) or not h.listening:
            raise SchemeError(errno.EINVAL, 'tcp dup takes b"accept" on a listener')
        async with h.read_lock:
            conn, _ = await h.sock.accept()
        return Opened(TcpSocket(conn, listening=False), fdflags=os.O_RDWR)

    def _stream(self, h) -> TcpSocket:
        if not isinstance(h, TcpSocket) or h.listening:
            raise SchemeError(errno.ENOTCONN)
        return h

    async def read(self, req: Request, h, n: int) -> bytes:
        s = self._stream(h)
        if n < 0:
            raise SchemeError(errno.EINVAL)
        async with s.read_lock:
            return await s.sock.recv(min(n, P.MAX_IO))

    async def write(self, req: Request, h, data: bytes) -> int:
        s = self._stream(h)
        view = memoryview(data)
        async with s.write_lock:
            while view:
                sent = await s.sock.send(view)
                view = view[sent:]
        return len(data)

    async def shutdown(self, req: Request, h, how: int) -> None:
        s = self._stream(h)
        if how not in (socket.SHUT_RD, socket.SHUT_WR, socket.SHUT_RDWR):
            raise SchemeError(errno.EINVAL)
        s.sock.shutdown(how)

    async def fstat(self, req: Request, h) -> dict:
        return {"st_mode": stat.S_IFSOCK | 0o777}

    async def fpath(self, req: Request, h) -> str:
        if not isinstance(h, TcpSocket):
            return f"/scheme/{self.name}"
        addr = h.sock.getsockname() if h.listening else h.sock.getpeername()
        return address_path(self.name, addr)

    async def close(self, h) -> None:
        if isinstance(h, TcpSocket):
            h.sock.close()


if __name__ == "__main__":
    def _options(parser):
        parser.add_argument("--connect-timeout", type=float, default=DEFAULT_CONNECT_TIMEOUT,
                            help="seconds before a connect fails with ETIMEDOUT")

    daemon_cli("schemes.tcp", lambda a: TcpScheme(a.connect_timeout), _options)
