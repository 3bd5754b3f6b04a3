"""The uds scheme (`/scheme/uds/NAME`): stream connections named inside the scheme.

Names live in this daemon only (no host socket files), in *scopes*: a scope
is a handle holding its own table of names, so a name means something only
to the holders of that scope (Landlock's answer for abstract unix sockets).
The scheme's root is the system scope. `dup(scope, b"scope")` makes a new,
private, empty scope; `dup(root, b"scope:NAME")` opens the named shared
scope NAME (made on first use), so that two runs can share one on purpose;
only the system scope reaches named ones (EACCES from any other).
`openat(scope, ".", O_DIRECTORY)` (or "") is another handle on the same
scope. A scope lives while any handle on it or any listener in it lives.

Only a scope opens names: opening NAME with O_CREAT listens on it in that
scope (EADDRINUSE if taken there; the name is free again when the
listener's handle closes); opening NAME without it connects (ECONNREFUSED
if nobody listens in that scope); `dup(listener, b"accept")` waits for and
accepts one connection. An openat relative to a connection or a listener is
ENOTDIR; reading or writing a scope is EBADF. Connections are byte streams:
read returns what has arrived (b"" once the peer closed or shut down
writing), write to a peer that is gone is EPIPE, `shutdown(SHUT_WR)` ends
the stream for the peer.

Capabilities travel too: SENDFD queues the fd passed with the request for
the peer, RECVFD waits for the next one. Fds still queued when a connection
closes are closed. A capability of this scheme (a connection, listener or
scope) is refused with EINVAL: queued here, it could keep its own handle
open through the daemon forever (a connection sent into its own queue);
pass such a capability by other means (to a child with `rt.spawn`'s
pass_fds). At most MAX_QUEUED_FDS wait in one connection's queue: one more
is ETOOMANYREFS at once (not a wait, so that a stuck receiver never makes
the daemon hold the fds of senders' waiting requests).
"""

from __future__ import annotations

import errno
import os
import socket
import stat
from collections import deque
from dataclasses import dataclass, field

from redoxcap.schemes.framework import (
    Changed,
    HandleRef,
    Opened,
    Reply,
    Request,
    Scheme,
    SchemeError,
    daemon_cli,
    takes,
)
from redoxcap.wire import protocol as P
from redoxcap.wire.stat import Stat

STREAM_BUFFER = 256 * 1024  # bytes in flight one way before a writer waits
BACKLOG = 128
MAX_QUEUED_FDS = 64  # capabilities waiting in one connection's queue
SCOPE_PREFIX = b"scope:"


@dataclass(eq=False)
class Scope:
    """A table of names; `refs` counts the handles on it and the listeners in it."""

    label: str | None = None  # the name of a named shared scope; None for the others
    listeners: dict[str, Listener] = field(default_factory=dict)
    refs: int = 0


@dataclass(eq=False)
class Listener:
    name: str
    scope: Scope
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
    if not name or name in (".", "..") or "/" in name or len(name) > P.MAX_NAME:
        raise SchemeError(errno.EINVAL, "a uds name is one non-empty path component")
    return name


def _label(buf: bytes) -> str:
    """The NAME of b"scope:NAME", checked like a uds name."""
    try:
        label = buf[len(SCOPE_PREFIX):].decode()
    except UnicodeDecodeError:
        raise SchemeError(errno.EINVAL, "a scope name is UTF-8") from None
    if label != label.strip("/"):
        raise SchemeError(errno.EINVAL, "a scope name is one non-empty path component")
    return _name(label)


Handle = Scope | Listener | Connection


class UdsScheme(Scheme):
    """Serves named stream connections between the holders of one scope."""

    name = "uds"

    def __init__(self) -> None:
        self.system = Scope()
        self.named: dict[str, Scope] = {}

    def root(self) -> Scope:
        return self.system

    def _on(self, scope: Scope) -> Opened:
        """A new handle on scope (counted until its close)."""
        scope.refs += 1
        return Opened(scope, fdflags=os.O_RDONLY | os.O_DIRECTORY)

    def _release(self, scope: Scope) -> None:
        scope.refs -= 1
        if scope.refs <= 0 and scope.label is not None and self.named.get(scope.label) is scope:
            del self.named[scope.label]  # nobody can reach it: the name starts afresh

    @takes(Scope)
    async def openat(self, req: Request, h: Scope, path: str, flags: int, mode: int) -> Opened:
        """Listen on (O_CREAT) or connect to a name in the scope h; "." is h itself."""
        if path.strip("/") in ("", ".") and not flags & os.O_CREAT:
            return self._on(h)
        name = _name(path)
        if flags & os.O_DIRECTORY:
            raise SchemeError(errno.ENOTDIR, "a uds name is a socket, not a scope")
        if flags & os.O_CREAT:
            if name in h.listeners:
                raise SchemeError(errno.EADDRINUSE)
            listener = h.listeners[name] = Listener(name, h)
            h.refs += 1
            return Opened(listener, fdflags=flags)
        listener = h.listeners.get(name)
        if listener is None:
            raise SchemeError(errno.ECONNREFUSED)
        if len(listener.pending) >= BACKLOG:
            raise SchemeError(errno.EAGAIN, "the listener's backlog is full")
        ours, theirs = Connection(name), Connection(name)
        ours.peer, theirs.peer = theirs, ours
        listener.pending.append(theirs)
        listener.changed.notify()
        return Opened(ours, fdflags=flags & os.O_ACCMODE)

    async def dup(self, req: Request, h: Handle, buf: bytes) -> Opened:
        """b"accept" on a listener; b"scope", b"scope:NAME" (system scope only) or b"" on a scope."""
        if isinstance(h, Scope):
            if buf == b"":
                return self._on(h)
            if buf == b"scope":
                return self._on(Scope())
            if buf.startswith(SCOPE_PREFIX):
                label = _label(buf)
                if h is not self.system:
                    raise SchemeError(errno.EACCES, "only the system scope reaches named scopes")
                scope = self.named.get(label)
                if scope is None:
                    scope = self.named[label] = Scope(label)
                return self._on(scope)
            raise SchemeError(errno.EINVAL, 'uds dup takes b"scope" or b"scope:NAME" on a scope')
        if buf != b"accept" or not isinstance(h, Listener):
            raise SchemeError(errno.EINVAL, 'uds dup takes b"accept" on a listener')
        while not h.pending:
            await h.changed.wait()
        conn = h.pending.popleft()
        if conn.peer is not None and conn.peer.closed:
            conn.closed = True
        return Opened(conn, fdflags=os.O_RDWR)

    def _conn(self, h: Handle) -> Connection:
        if isinstance(h, Scope):
            raise SchemeError(errno.EBADF, "a scope is not a connection")
        if not isinstance(h, Connection):
            raise SchemeError(errno.ENOTCONN)
        return h

    async def read(self, req: Request, h: Handle, n: int) -> bytes:
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

    async def write(self, req: Request, h: Handle, data: bytes) -> int:
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

    async def shutdown(self, req: Request, h: Handle, how: int) -> None:
        conn = self._conn(h)
        if how not in (socket.SHUT_RD, socket.SHUT_WR, socket.SHUT_RDWR):
            raise SchemeError(errno.EINVAL)
        if how in (socket.SHUT_WR, socket.SHUT_RDWR):
            conn.write_shut = True
        if how in (socket.SHUT_RD, socket.SHUT_RDWR):
            conn.read_shut = True
        conn.wake_both()

    async def sendfd(self, req: Request, h: Handle) -> None:
        """Queue the passed capability for the peer: never one of ours, at most MAX_QUEUED_FDS."""
        conn = self._conn(h)
        if len(req.passed) != 1:
            raise SchemeError(errno.EINVAL, "sendfd takes exactly one capability")
        if isinstance(req.passed[0], HandleRef):
            # queued here, it could hold its own handle open through us forever
            raise SchemeError(errno.EINVAL, "a uds capability cannot travel over uds")
        peer = conn.peer
        if conn.write_shut or peer is None or peer.closed:
            raise SchemeError(errno.EPIPE)
        if len(peer.fds) >= MAX_QUEUED_FDS:
            raise SchemeError(errno.ETOOMANYREFS, "the peer's queue of capabilities is full")
        peer.fds.append(req.take_fd(0))
        conn.wake_both()

    async def recvfd(self, req: Request, h: Handle) -> Reply:
        conn = self._conn(h)
        while not conn.fds:
            if conn.eof():
                raise SchemeError(errno.ENOTCONN, "the peer is gone and sent no more fds")
            await conn.changed.wait()
        return Reply(None, [conn.fds.popleft()])

    async def fstat(self, req: Request, h: Handle) -> Stat:
        if isinstance(h, Scope):
            return Stat(st_mode=stat.S_IFDIR | 0o755, st_size=len(h.listeners), st_nlink=2)
        size = len(h.inbox) if isinstance(h, Connection) else 0
        return Stat(st_mode=stat.S_IFSOCK | 0o777, st_size=size)

    async def fpath(self, req: Request, h: Handle) -> str:
        # a scope is what /scheme/uds names in the namespace that holds it
        if isinstance(h, Scope):
            return f"/scheme/{self.name}"
        return f"/scheme/{self.name}/{h.name}"

    @takes(Scope)
    async def getdents(self, req: Request, h: Scope, start: int) -> list[str]:
        return P.page_of_names(sorted(h.listeners), start)

    async def close(self, h: Handle) -> None:
        if isinstance(h, Scope):
            self._release(h)
        elif isinstance(h, Listener):
            h.closed = True
            if h.scope.listeners.get(h.name) is h:
                del h.scope.listeners[h.name]
            self._release(h.scope)
            while h.pending:  # connections never accepted: their clients see EOF
                await self.close(h.pending.popleft())
            h.changed.notify()
        elif isinstance(h, Connection):
            h.closed = True
            P.close_fds(list(h.fds))
            h.fds.clear()
            h.wake_both()


if __name__ == "__main__":
    daemon_cli("redoxcap.schemes.uds", lambda args: UdsScheme())
