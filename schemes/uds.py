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

What a client makes the daemon hold is bounded per router account (each
request says which it is for) and charged to it (`Ledger`): the bytes its
writes left in connections, unread, and the fds its SENDFDs left queued,
unreceived, in all its connections together. Past ACCOUNT_BUFFER bytes a
write waits, as for a full connection (STREAM_BUFFER), until some of the
account's bytes are read; past ACCOUNT_QUEUED_FDS fds a SENDFD is
ETOOMANYREFS, as for a full queue (Linux's errno for a sender with too many
fds in flight in unix sockets; EMFILE would say the caller's own table is
full, which closing its fds would not help). All accounts together queue
at most a share of the daemon's fd limit (QUEUED_FDS_SHARE; one more is
ENFILE), so that it keeps fds for the requests that come: Linux truncates
what a process cannot take, and the framework drops such a frame. Bytes
and fds are given back when they are read or received, or when the end
holding them closes (nobody can read them then; an end whose peer closed
keeps what it has not read, charged, until it reads or closes). Fds passed
with a read, write, accept or RECVFD, which take none, are closed before
the request waits, so that no waiting request holds fds either.
"""

from __future__ import annotations

import errno
import os
import resource
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
from redoxcap.wire.limits import raise_fd_limit
from redoxcap.wire.stat import Stat

STREAM_BUFFER = 256 * 1024  # bytes in flight one way before a writer waits
BACKLOG = 128
MAX_QUEUED_FDS = 64  # capabilities waiting in one connection's queue
# Bytes one account's writes may leave unread in all connections together: without it a
# client parks STREAM_BUFFER in each connection it opens (256 MiB with a thousand). 16
# full connections' worth keeps a program's streams flowing; the account's waiting
# writes add at most the router's 64 requests in flight of 128 KiB each.
ACCOUNT_BUFFER = 4 * 1024 * 1024
# Fds one account's SENDFDs may leave unreceived in all connections together: four full
# queues. A few hundred, not the 1,024 capabilities a client may hold (each of which it
# could send 64 times), so that many clients at their bound fit in the daemon's fds.
ACCOUNT_QUEUED_FDS = 256
# The share of the daemon's fd limit that all accounts together may queue (ENFILE past
# it): the rest stays for the fds that come with requests, since Linux truncates what a
# process cannot take and the framework drops a frame that came truncated.
QUEUED_FDS_SHARE = 0.5
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
    """One end of a connection; `inbox` and `fds` hold what the peer sent it.

    Each part is charged to the account whose request put it there (`Ledger`):
    `payers` holds [account, bytes] runs of `inbox`, oldest first, and `fds`
    (fd, account) pairs.
    """

    name: str
    inbox: bytearray = field(default_factory=bytearray)
    payers: deque[list[int]] = field(default_factory=deque)
    fds: deque[tuple[int, int]] = field(default_factory=deque)
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


@dataclass(eq=False)
class Charges:
    """What the daemon holds because of one account's requests."""

    buffered: int = 0  # bytes written into connections, not read yet
    queued_fds: int = 0  # fds sent into connections, not received yet
    # writers waiting for room under the account's bound, by the Changed each waits on
    # (a count: two requests may wait on one connection)
    waiting: dict[Changed, int] = field(default_factory=dict)


class Ledger:
    """The bytes and fds each account's requests left in connections, against the bounds.

    A write's bytes and a SENDFD's fd are charged to the request's account
    when they go into a connection, and given back when they are read or
    received, or when the end holding them closes (nobody can read them
    then). An account with nothing charged and nobody waiting has no entry.
    """

    def __init__(self, max_buffered: int, max_fds: int, max_fds_total: int) -> None:
        self.max_buffered = max_buffered  # per account
        self.max_fds = max_fds  # per account
        self.max_fds_total = max_fds_total  # all accounts together
        self.accounts: dict[int, Charges] = {}
        self.buffered = 0  # all accounts together
        self.queued_fds = 0

    def _of(self, account: int) -> Charges:
        charges = self.accounts.get(account)
        if charges is None:
            charges = self.accounts[account] = Charges()
        return charges

    def _settle(self, account: int, charges: Charges) -> None:
        if not (charges.buffered or charges.queued_fds or charges.waiting):
            del self.accounts[account]

    def room(self, account: int) -> int:
        """The bytes account may still put into connections."""
        charges = self.accounts.get(account)
        return self.max_buffered - (charges.buffered if charges else 0)

    def put_bytes(self, conn: Connection, account: int, data: bytes) -> None:
        """Append data to conn's inbox, charged to account."""
        conn.inbox += data
        if conn.payers and conn.payers[-1][0] == account:
            conn.payers[-1][1] += len(data)
        else:
            conn.payers.append([account, len(data)])
        self._of(account).buffered += len(data)
        self.buffered += len(data)

    def take_bytes(self, conn: Connection, n: int) -> bytes:
        """The first n bytes of conn's inbox (fewer if it holds fewer), taken out of it."""
        chunk = bytes(conn.inbox[:n])
        del conn.inbox[: len(chunk)]
        self._give_back(conn, len(chunk))
        return chunk

    def drop_bytes(self, conn: Connection) -> None:
        """Empty conn's inbox, which nobody will read."""
        self._give_back(conn, len(conn.inbox))
        conn.inbox.clear()

    def _give_back(self, conn: Connection, n: int) -> None:
        """The first n bytes of conn's inbox are gone: give them back to their accounts,
        and wake those accounts' writers waiting for room."""
        while n:
            run = conn.payers[0]
            part = min(n, run[1])
            run[1] -= part
            n -= part
            if not run[1]:
                conn.payers.popleft()
            charges = self.accounts[run[0]]
            charges.buffered -= part
            self.buffered -= part
            for changed in charges.waiting:
                changed.notify()
            self._settle(run[0], charges)

    async def wait_for_room(self, account: int, changed: Changed) -> None:
        """Wait for changed, which is also notified when bytes of account's are given back."""
        charges = self._of(account)
        charges.waiting[changed] = charges.waiting.get(changed, 0) + 1
        try:
            await changed.wait()
        finally:
            if charges.waiting[changed] > 1:
                charges.waiting[changed] -= 1
            else:
                del charges.waiting[changed]
            self._settle(account, charges)

    def queue_fd(self, conn: Connection, account: int, fd: int) -> None:
        """Queue fd for conn's holder, charged to account: the fd is the ledger's then.

        Raises:
            SchemeError: ETOOMANYREFS, account has max_fds queued already; ENFILE, all
                accounts together have max_fds_total. The fd stays the caller's.
        """
        charges = self.accounts.get(account)
        if charges is not None and charges.queued_fds >= self.max_fds:
            raise SchemeError(errno.ETOOMANYREFS, f"{self.max_fds} capabilities sent over uds "
                              "wait to be received already")
        if self.queued_fds >= self.max_fds_total:
            raise SchemeError(errno.ENFILE, "the uds daemon holds as many queued capabilities "
                              "as it may")
        conn.fds.append((fd, account))
        self._of(account).queued_fds += 1
        self.queued_fds += 1

    def receive_fd(self, conn: Connection) -> int:
        """The next fd queued for conn's holder (there is one), now the caller's."""
        fd, account = conn.fds.popleft()
        self._fd_gone(account)
        return fd

    def drop_fds(self, conn: Connection) -> None:
        """Close every fd queued for conn's holder, who will receive none of them."""
        P.close_fds([self.receive_fd(conn) for _ in range(len(conn.fds))])

    def _fd_gone(self, account: int) -> None:
        charges = self.accounts[account]
        charges.queued_fds -= 1
        self.queued_fds -= 1
        self._settle(account, charges)


def _close_passed(req: Request) -> None:
    """Close the fds passed with a request that takes none, before it waits: held while it
    waits (a read nobody answers), they would be fds a client makes the daemon hold."""
    P.close_fds(req.passed_fds())
    req.passed[:] = [None] * len(req.passed)


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

    def __init__(self, max_queued_fds_total: int | None = None) -> None:
        """max_queued_fds_total: the fds all accounts together may queue (default: a
        QUEUED_FDS_SHARE of the soft RLIMIT_NOFILE now)."""
        self.system = Scope()
        self.named: dict[str, Scope] = {}
        if max_queued_fds_total is None:
            soft = resource.getrlimit(resource.RLIMIT_NOFILE)[0]
            max_queued_fds_total = int(soft * QUEUED_FDS_SHARE)
        self.ledger = Ledger(ACCOUNT_BUFFER, ACCOUNT_QUEUED_FDS, max_queued_fds_total)

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
        _close_passed(req)
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
        _close_passed(req)
        if n < 0:
            raise SchemeError(errno.EINVAL)
        while not conn.inbox:
            if conn.eof() or conn.read_shut or n == 0:
                return b""
            await conn.changed.wait()
        chunk = self.ledger.take_bytes(conn, min(n, P.MAX_IO))
        conn.wake_both()
        return chunk

    async def write(self, req: Request, h: Handle, data: bytes) -> int:
        """Put data in the peer's inbox, waiting while it holds STREAM_BUFFER or the
        request's account has ACCOUNT_BUFFER in connections."""
        conn = self._conn(h)
        _close_passed(req)
        done = 0
        while done < len(data):
            peer = conn.peer
            if conn.write_shut or peer is None or peer.closed or peer.read_shut:
                if done:
                    return done
                raise SchemeError(errno.EPIPE)
            room = min(STREAM_BUFFER - len(peer.inbox), self.ledger.room(req.account))
            if room > 0:
                take = min(room, len(data) - done)
                self.ledger.put_bytes(peer, req.account, data[done : done + take])
                done += take
                conn.wake_both()
            else:
                await self.ledger.wait_for_room(req.account, conn.changed)
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
        """Queue the passed capability for the peer: never one of ours, at most MAX_QUEUED_FDS
        in the peer's queue and ACCOUNT_QUEUED_FDS of the request's account in all queues."""
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
        fd = req.take_fd(0)
        try:
            self.ledger.queue_fd(peer, req.account, fd)
        except SchemeError:
            os.close(fd)
            raise
        conn.wake_both()

    async def recvfd(self, req: Request, h: Handle) -> Reply:
        conn = self._conn(h)
        _close_passed(req)
        while not conn.fds:
            if conn.eof():
                raise SchemeError(errno.ENOTCONN, "the peer is gone and sent no more fds")
            await conn.changed.wait()
        return Reply(None, [self.ledger.receive_fd(conn)])

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

    def status(self, handles: dict) -> dict:
        """What the daemon holds in connections: bytes, fds, and for how many accounts."""
        return {"buffered": self.ledger.buffered, "queued_fds": self.ledger.queued_fds,
                "accounts": len(self.ledger.accounts)}

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
            self.ledger.drop_fds(h)
            self.ledger.drop_bytes(h)
            h.wake_both()


def _daemon(args: object) -> UdsScheme:
    # the fd limit daemon_main raises to, taken now: a share of it may wait in queues
    return UdsScheme(max_queued_fds_total=int(raise_fd_limit() * QUEUED_FDS_SHARE))


if __name__ == "__main__":
    daemon_cli("redoxcap.schemes.uds", _daemon)
