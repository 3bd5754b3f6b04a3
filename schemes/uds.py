"""The uds scheme (`/scheme/uds/NAME`): stream connections named inside the scheme.

Names live in this daemon only (no host socket files). Opening NAME with
O_CREAT listens on it (EADDRINUSE if taken; the name is free again when the
listener's handle closes); opening NAME without it connects (ECONNREFUSED if
nobody listens); `dup(listener, b"accept")` waits for and accepts one
connection. Connections are byte streams: read returns what has arrived
(b"" once the peer closed or shut down writing), write to a peer that is
gone is EPIPE, `shutdown(SHUT_WR)` ends the stream for the peer.

Capabilities travel too: SENDFD queues the fd passed with the request for
the peer, RECVFD waits for the next one. Fds still queued when a connection
closes are closed.
"""

from __future__ import annotations

import errno
import os
import socket
import stat
from collections import deque
from dataclasses import dataclass, field

from rt import protocol as P
from schemes.framework import Changed, Opened, Reply, Request, Scheme, SchemeError, daemon_cli

STREAM_BUFFER = 256 * 1024  # bytes in flight one way before a writer waits
BACKLOG = 128


@dataclass(eq=False)
class Listener:
    name: str
    pending: deque = field(default_factory=deque)
    changed: Changed = field(default_factory=Changed)
    closed: bool = False


@dataclass(eq=False)
class Connection:
    """One end of a connection; `inbox` and `fds` hold what the peer sent it."""

    name: str
    inbox: bytearray = field(default_factory=bytearray)
    fds: deque = field(default_factory=deque)
    changed: Changed = field(default_factory=Changed)
    peer: Connection | None = None
    closed: bool = False
    write_shut: bool = False  # this end will send no more
    read_shut: bool = False

    def wake_both(self) -> None:
        self.changed.notify()
        if self.peer is not None:
            self.peer.changed.notify()

    def eof(self) -> bool:
        peer = self.peer
        return peer is None or peer.closed or peer.write_shut


def _name(path: str) -> str:
    name = path.strip("/")
    if not name or name == "." or "/" in name or len(name) > P.MAX_NAME:
        raise SchemeError(errno.EINVAL, "a uds name is one non-empty path component")
    return name


class UdsScheme(Scheme):
    """Serves named stream connections between its clients."""

    name = "uds"

    def __init__(self) -> None:
        self.listeners: dict[str, Listener] = {}

    async def openat(self, req: Request, h, path: str, flags: int, mode: int) -> Opened:
        name = _name(path)
        if flags & os.O_CREAT:
            if name in self.listeners:
                raise SchemeError(errno.EADDRINUSE)
            listener = self.listeners[name] = Listener(name)
            return Opened(listener, fdflags=flags)
        listener = self.listeners.get(name)
        if listener is None:
            raise SchemeError(errno.ECONNREFUSED)
        if len(listener.pending) >= BACKLOG:
            raise SchemeError(errno.EAGAIN, "the listener's backlog is full")
        ours, theirs = Connection(name), Connection(name)
        ours.peer, theirs.peer = theirs, ours
        listener.pending.append(theirs)
        listener.changed.notify()
        return Opened(ours, fdflags=flags & os.O_ACCMODE)

    async def dup(self, req: Request, h, buf: bytes) -> Opened:
        if buf != b"accept" or not isinstance(h, Listener):
            raise SchemeError(errno.EINVAL, 'uds dup takes b"accept" on a listener')
        while not h.pending:
            await h.changed.wait()
        conn = h.pending.popleft()
        if conn.peer is not None and conn.peer.closed:
            conn.closed = True
        return Opened(conn, fdflags=os.O_RDWR)

    def _conn(self, h) -> Connection:
        if not isinstance(h, Connection):
            raise SchemeError(errno.ENOTCONN)
        return h

    async def read(self, req: Request, h, n: int) -> bytes:
        conn = self._conn(h)
        if n < 0:
            raise SchemeError(errno.EINVAL)
        while not conn.inbox:
            if conn.eof() or conn.read_shut or n == 0:
                return b""
            await conn.changed.wait()
        chunk = bytes(conn.inbox[: min(n, P.MAX_IO)])
        del conn.inbox[: len(chunk)]
        conn.wake_both()
        return chunk

    async def write(self, req: Request, h, data: bytes) -> int:
        conn = self._conn(h)
        done = 0
        while done < len(data):
            peer = conn.peer
            if conn.write_shut or peer is None or peer.closed or peer.read_shut:
                if done:
                    return done
                raise SchemeError(errno.EPIPE)
            room = STREAM_BUFFER - len(peer.inbox)
            if room > 0:
                take = min(room, len(data) - done)
                peer.inbox += data[done : done + take]
                done += take
                conn.wake_both()
            else:
                await conn.changed.wait()
        return done

    async def shutdown(self, req: Request, h, how: int) -> None:
        conn = self._conn(h)
        if how not in (socket.SHUT_RD, socket.SHUT_WR, socket.SHUT_RDWR):
            raise SchemeError(errno.EINVAL)
        if how in (socket.SHUT_WR, socket.SHUT_RDWR):
            conn.write_shut = True
        if how in (socket.SHUT_RD, socket.SHUT_RDWR):
            conn.read_shut = True
        conn.wake_both()

    async def sendfd(self, req: Request, h) -> None:
        conn = self._conn(h)
        if len(req.passed) != 1:
            raise SchemeError(errno.EINVAL, "sendfd takes exactly one capability")
        peer = conn.peer
        if conn.write_shut or peer is None or peer.closed:
            raise SchemeError(errno.EPIPE)
        peer.fds.append(req.take_fd(0))
        conn.wake_both()

    async def recvfd(self, req: Request, h) -> Reply:
        conn = self._conn(h)
        while not conn.fds:
            if conn.eof():
                raise SchemeError(errno.ENOTCONN, "the peer is gone and sent no more fds")
            await conn.changed.wait()
        return Reply(None, [conn.fds.popleft()])

    async def fstat(self, req: Request, h) -> dict:
        size = len(h.inbox) if isinstance(h, Connection) else 0
        return {"st_mode": stat.S_IFSOCK | 0o777, "st_size": size}

    async def fpath(self, req: Request, h) -> str:
        name = getattr(h, "name", "")
        return f"/scheme/{self.name}/{name}" if name else f"/scheme/{self.name}"

    async def close(self, h) -> None:
        if isinstance(h, Listener):
            h.closed = True
            if self.listeners.get(h.name) is h:
                del self.listeners[h.name]
            while h.pending:  # connections never accepted: their clients see EOF
                await self.close(h.pending.popleft())
            h.changed.notify()
        elif isinstance(h, Connection):
            h.closed = True
            P.close_fds(list(h.fds))
            h.fds.clear()
            h.wake_both()


if __name__ == "__main__":
    daemon_cli("schemes.uds", lambda args: UdsScheme())
