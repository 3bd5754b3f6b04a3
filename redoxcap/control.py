"""The supervisor's control socket: how `redoxcap` commands talk to a running system.

One SOCK_SEQPACKET Unix socket, `STATE_DIR/control.sock`. A request is one
msgpack map `{"token": ..., "op": ...}`; the answer is one map
`{"ok": true, ...}` or `{"ok": false, "error": "..."}`, with fds attached
where an op hands out capabilities.

It only answers its owner: the peer's uid (SO_PEERCRED, from Linux) must be
the supervisor's, and the request must carry the secret from
`STATE_DIR/token` (mode 0600). Landlock cannot stop a confined client from
connect()ing to a named socket, but it can stop it from reading the token.

Such a client (same uid, no token) may still flood the socket, so the server
never lets connections pile up: a peer of another uid is closed at accept
before anything is read; at most MAX_CONNECTIONS are open at once, and at most
MAX_WAITING_PER_PID of them unauthenticated per peer process; a connection
that has not sent its request within AUTH_DEADLINE is dropped; when the table
is full the oldest unauthenticated connection makes room for the new one (the
owner's request is already queued when it is accepted, so it is read before
it can become the oldest); accept errors such as EMFILE are logged
(rate-limited) and waited out, never raised.

Operations:
    namespace  -> a clone of the root namespace capability (fds[0]); with `account`, in a
                  fresh router account ({"account": N}; `max_caps` caps it); with `account`
                  and `scheme`, also a new anonymous scheme's root (in that account, fds[1])
                  and its channel (fds[2]), for a daemon the caller starts; with `account`
                  and `directfs`, what `directfs` hands out, last
    status     -> {"status": {...}}: one page of what `redoxcap status --json` prints
                  (`clients_after`, `holdings_after`: where the last page ended, as its
                  `clients_next` and `holdings_next` say; status.fetch joins them)
    client     -> {}: note the program `run` started (`pid`, `argv`, `names`, `cwd`, `account`;
                  a runner's reaper sends it for its run, argv cut to fit a request)
    trace      -> {"schemes": {id: name}} and a socket the router streams the trace on
    restart    -> {"pid": N}: restart scheme `name` (also a FAILED one)
    mount      -> {"added": bool}: serve host directory `path` as scheme `name`
    directfs   -> the grant a broker passes with HOSTDIR to its file schemes (fds[0])
    run        -> {}: a runner (redoxcap/runner.py) forked for the socket passed with the
                  request, which does a `redoxcap run` for its peer (redoxcap/launch.py)
    serve      -> {"pid": N}: a file scheme daemon forked to serve host directory `path` as
                  `name` (`read_only`, `directfs`: with the system's grant) on the channel
                  passed with the request, for a run's `--dir` or private /tmp; it ends with
                  its scheme
    prepared   -> {}: the spare runner `spare` (its pid) took a run's first steps in router
                  account `account` (redoxcap.run.Prepared); `status` shows it as `spare`
    shutdown   -> stops the system after answering
    ping       -> {}
"""

from __future__ import annotations

import contextlib
import errno
import logging
import math
import os
import socket
import struct
import time
from collections import Counter
from collections.abc import Awaitable, Callable, Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING, Any

from redoxcap.wire import protocol as P
from redoxcap.wire.linux import UCRED

if TYPE_CHECKING:
    import trio

# trio is imported by the server half only: a client (`redoxcap run`, `status`) never pays for it.

log = logging.getLogger("supervisor")

SOCKET_NAME = "control.sock"
TOKEN_NAME = "token"
PID_NAME = "supervisor.pid"
LOCK_NAME = "supervisor.lock"
LOG_NAME = "supervisor.log"
MAX_REQUEST = 4096
PASSED_FD_SPACE = socket.CMSG_SPACE(4)  # a request carries at most one fd (`run`'s socket)

MAX_CONNECTIONS = 32  # open control connections at once, authenticated or not
MAX_WAITING_PER_PID = 4  # unauthenticated connections one peer process may hold
AUTH_DEADLINE = 1.0  # seconds a connection has to send its request
REPLY_DEADLINE = 5.0  # seconds a peer has to take its reply
ACCEPT_BACKOFF = 0.1  # after a failed accept, wait this long at most for a connection to end
LISTEN_BACKLOG = 128
LOG_INTERVAL = 5.0  # at most one warning of each kind this often
# accept() errors that say "not now" (resources, a peer gone), not "the listener is broken"
ACCEPT_ERRORS = frozenset({errno.EMFILE, errno.ENFILE, errno.ENOBUFS, errno.ENOMEM,
                           errno.ECONNABORTED, errno.EPROTO})

Handler = Callable[[dict], Awaitable[tuple[dict, list[int]]]]


class ControlError(Exception):
    """A control request failed; the message is fit for the user."""


class NotRunning(ControlError):
    """No system answers at this state directory."""


def write_token(state_dir: Path) -> bytes:
    """Create a fresh secret readable only by its owner; returns it."""
    import secrets  # the server's: a client only reads the token

    token = secrets.token_hex(32).encode()
    path = state_dir / TOKEN_NAME
    fd = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_TRUNC | os.O_NOFOLLOW, 0o600)
    try:
        os.fchmod(fd, 0o600)
        os.write(fd, token)
    finally:
        os.close(fd)
    return token


def peer_cred(sock: Any) -> tuple[int, int]:
    """(pid, uid) of the process at the other end of a Unix socket (SO_PEERCRED)."""
    cred = sock.getsockopt(socket.SOL_SOCKET, socket.SO_PEERCRED, UCRED.size)
    pid, uid, _ = UCRED.unpack(cred)
    return pid, uid


def peer_uid(sock: Any) -> int:
    """The uid of the process at the other end of a Unix socket (SO_PEERCRED)."""
    return peer_cred(sock)[1]


# -- who may stay connected ------------------------------------------------------


@dataclass(eq=False)
class Connection:
    """One accepted control connection (its socket is owned by the task answering it)."""

    pid: int
    sock: Any = None  # a trio socket
    scope: trio.CancelScope = field(default_factory=lambda: _trio().CancelScope())

    def drop(self) -> None:
        """Close it now (the fd is free at once) and stop the task answering it."""
        if self.sock is not None:
            self.sock.close()
        self.scope.cancel()


class Admission:
    """Which control connections stay open: a policy without I/O.

    At most `limit` connections are open; an unauthenticated one also counts
    against its peer pid (`per_pid`). When the table is full, the oldest
    unauthenticated connection makes room; when every open connection has
    authenticated, the newcomer is refused.
    """

    def __init__(self, limit: int = MAX_CONNECTIONS, per_pid: int = MAX_WAITING_PER_PID) -> None:
        self.limit = limit
        self.per_pid = per_pid
        self.open: set[Connection] = set()
        self.waiting: dict[Connection, None] = {}  # unauthenticated, oldest first
        self._waiting_by_pid: Counter[int] = Counter()

    def admit(self, conn: Connection) -> tuple[bool, Connection | None]:
        """Decide on a new connection.

        Returns:
            (whether conn is admitted, an older connection the caller must drop
            to make room for it, or None).
        """
        if self._waiting_by_pid[conn.pid] >= self.per_pid:
            return False, None
        victim = None
        if len(self.open) >= self.limit:
            victim = self.oldest_waiting()
            if victim is None:
                return False, None
            self.release(victim)
        self.open.add(conn)
        self.waiting[conn] = None
        self._waiting_by_pid[conn.pid] += 1
        return True, victim

    def authenticated(self, conn: Connection) -> None:
        """conn sent a valid request: it no longer counts against its pid or risks eviction."""
        if conn in self.waiting:
            del self.waiting[conn]
            self._uncount(conn.pid)

    def release(self, conn: Connection) -> None:
        """conn is closed (or about to be)."""
        self.open.discard(conn)
        self.authenticated(conn)

    def oldest_waiting(self) -> Connection | None:
        """The unauthenticated connection accepted first, if any."""
        return next(iter(self.waiting), None)

    def _uncount(self, pid: int) -> None:
        self._waiting_by_pid[pid] -= 1
        if self._waiting_by_pid[pid] <= 0:
            del self._waiting_by_pid[pid]


class RateLimitedLog:
    """Warnings of one kind at most once per interval, with a count of those held back."""

    def __init__(self, interval: float = LOG_INTERVAL) -> None:
        self.interval = interval
        self._last: dict[str, float] = {}
        self._held: Counter[str] = Counter()

    def warning(self, kind: str, message: str, *args: object) -> None:
        """Log message (%-formatted with args) unless a `kind` warning was logged recently."""
        now = time.monotonic()
        if now - self._last.get(kind, -math.inf) < self.interval:
            self._held[kind] += 1
            return
        self._last[kind] = now
        held = self._held.pop(kind, 0)
        suffix = f" ({held} more like it since the last report)" if held else ""
        log.warning("control socket: " + message + suffix, *args)


# -- the server -----------------------------------------------------------------


def _trio():
    import trio

    return trio


async def serve(path: Path, token: bytes, handlers: dict[str, Handler],
                task_status: trio.TaskStatus[None] | None = None) -> None:
    """Answer control requests on path until cancelled.

    Args:
        path: where to bind the socket (removed first if stale). The caller
            must hold the state directory's lock: the path is removed on return.
        token: the secret every request must carry.
        handlers: op name -> async function returning (reply dict, fds to pass).
        task_status: nursery.start's, told once the socket listens.
    """
    trio = _trio()
    listener = trio.socket.socket(socket.AF_UNIX, socket.SOCK_SEQPACKET)
    with listener:
        path.unlink(missing_ok=True)
        await listener.bind(str(path))
        os.chmod(path, 0o600)
        listener.listen(LISTEN_BACKLOG)
        if task_status is not None:
            task_status.started()
        try:
            async with trio.open_nursery() as nursery:
                await _Server(token, handlers, nursery).accept_forever(listener)
        finally:
            path.unlink(missing_ok=True)


class _Server:
    """The accept loop and one task per admitted connection."""

    def __init__(self, token: bytes, handlers: dict[str, Handler], nursery: trio.Nursery) -> None:
        self.token = token
        self.handlers = handlers
        self.nursery = nursery
        self.owner = os.getuid()
        self.admission = Admission()
        self.warn = RateLimitedLog()
        self._ended = _trio().Event()  # set (and replaced) whenever a connection ends

    async def accept_forever(self, listener: Any) -> None:
        while True:
            try:
                sock, _ = await listener.accept()
            except OSError as exc:
                if exc.errno not in ACCEPT_ERRORS:
                    raise
                await self._accept_failed(exc)
                continue
            self._admit(sock)

    async def _accept_failed(self, exc: OSError) -> None:
        import trio

        self.warn.warning("accept", "accept failed (%s); %d connections open",
                          os.strerror(exc.errno), len(self.admission.open))
        if exc.errno == errno.ECONNABORTED:
            return  # that peer is gone; the next one may be fine
        if exc.errno in (errno.EMFILE, errno.ENFILE):
            victim = self.admission.oldest_waiting()
            if victim is not None:
                # an fd for whoever is queued (maybe the owner) beats one held by an idle peer
                self.admission.release(victim)
                victim.drop()
                return
        with trio.move_on_after(ACCEPT_BACKOFF):
            await self._ended.wait()

    def _admit(self, sock: Any) -> None:
        try:
            pid, uid = peer_cred(sock)
        except OSError:
            sock.close()
            return
        if uid != self.owner:
            sock.close()  # before reading anything: it cannot be the owner
            self.warn.warning("uid", "refused a connection from uid %d (pid %d)", uid, pid)
            return
        conn = Connection(pid, sock)
        admitted, victim = self.admission.admit(conn)
        if victim is not None:
            victim.drop()
        if not admitted:
            sock.close()
        if victim is not None or not admitted:
            self.warn.warning("full", "dropping connections that do not authenticate "
                              "(%d open; last from pid %d)", len(self.admission.open), pid)
        if admitted:
            self.nursery.start_soon(self._answer, conn)

    async def _answer(self, conn: Connection) -> None:
        import trio

        try:
            with conn.scope, conn.sock:
                await self._converse(conn)
        except (OSError, trio.ClosedResourceError):
            pass  # dropped by us, or the peer went away
        except Exception:
            log.exception("control socket: a request failed unexpectedly")
        finally:
            self.admission.release(conn)
            self._ended.set()
            self._ended = trio.Event()

    async def _converse(self, conn: Connection) -> None:
        import trio

        with trio.move_on_after(AUTH_DEADLINE) as deadline:
            # room for one fd (`run`'s): Linux closes any more a peer tries to pass us
            data, anc, flags, _ = await conn.sock.recvmsg(MAX_REQUEST, PASSED_FD_SPACE,
                                                          socket.MSG_CMSG_CLOEXEC)
        if deadline.cancelled_caught:
            return
        passed, _ = P.parse_ancillary(anc)  # ours until the handler is done with them
        fds: list[int] = []
        try:
            request = self._authenticate(data, flags)
            self.admission.authenticated(conn)
            handler = self.handlers.get(request.get("op"))
            if handler is None:
                raise ControlError(f"unknown operation {request.get('op')!r}")
            request["passed_fds"] = list(passed)  # what the peer sent, never what it says
            reply, fds = await handler(request)
            reply = {"ok": True, **reply}
        except (ControlError, P.ProtocolError, OSError, trio.TooSlowError) as exc:
            reply = {"ok": False, "error": str(exc) or type(exc).__name__}
        finally:
            P.close_fds(passed)
        try:
            with trio.move_on_after(REPLY_DEADLINE):
                await conn.sock.sendmsg([P.pack(reply)], P.fds_ancillary(fds))
        finally:
            P.close_fds(fds)

    def _authenticate(self, data: bytes, flags: int) -> dict:
        request = P.unpack(data) if data and not flags & socket.MSG_TRUNC else None
        if not isinstance(request, dict) or not isinstance(request.get("token"), str):
            raise ControlError("malformed control request")
        import hmac

        if not hmac.compare_digest(request["token"].encode(), self.token):
            raise ControlError("permission denied: bad token")
        return request


# -- the client -----------------------------------------------------------------


def request(state_dir: Path, op: str, timeout: float = 10.0, passing: int | None = None,
            **args: Any) -> tuple[dict, list[int]]:
    """Send one control request (blocking); returns (reply, fds the caller now owns).

    passing: the one fd a request may carry (`run`'s socket, `serve`'s channel), which
    stays the caller's.

    Raises:
        NotRunning: nothing listens at state_dir.
        ControlError: the supervisor refused or failed the request.
    """
    with connect(state_dir, timeout) as (sock, token):
        return exchange(sock, token, op, timeout, args, passing)


@contextlib.contextmanager
def connect(state_dir: Path, timeout: float) -> Iterator[tuple[socket.socket, str]]:
    """A connected control socket and the token to send on it.

    Raises:
        NotRunning: nothing listens at state_dir (or it has no token).
        ControlError: the token is unreadable, or the supervisor did not accept in time.
    """
    try:
        token = (state_dir / TOKEN_NAME).read_text()
    except FileNotFoundError:
        raise NotRunning(f"no system is running at {state_dir}") from None
    except PermissionError:
        raise ControlError(f"permission denied reading {state_dir / TOKEN_NAME}") from None
    with socket.socket(socket.AF_UNIX, socket.SOCK_SEQPACKET) as sock:
        # a blocking connect with SO_SNDTIMEO waits for room in a full listen backlog
        # (during a flood); with Python's own timeout it would fail at once with EAGAIN
        seconds = int(timeout)
        sock.setsockopt(socket.SOL_SOCKET, socket.SO_SNDTIMEO,
                        struct.pack("ll", seconds, int((timeout - seconds) * 1e6)))
        try:
            sock.connect(str(state_dir / SOCKET_NAME))
        except (FileNotFoundError, ConnectionRefusedError):
            raise NotRunning(f"no system is running at {state_dir}") from None
        except BlockingIOError:
            raise ControlError(f"the supervisor did not accept a connection in {timeout:.0f}s") from None
        sock.settimeout(timeout)
        yield sock, token


def exchange(sock: socket.socket, token: str, op: str, timeout: float, args: dict,
             passing: int | None = None) -> tuple[dict, list[int]]:
    """Send one request on a connected control socket and read its answer.

    Returns:
        (reply, fds the caller now owns).

    Raises:
        ControlError: no answer in time, or the supervisor refused or failed the request.
    """
    try:
        sock.sendmsg([P.pack({"token": token, "op": op, **args})],
                     P.fds_ancillary([passing] if passing is not None else []))
        data, anc, _, _ = sock.recvmsg(1 << 20, P.CMSG_FDS, socket.MSG_CMSG_CLOEXEC)
    except TimeoutError:
        raise ControlError(f"the supervisor did not answer {op!r} in {timeout:.0f}s") from None
    except (BrokenPipeError, ConnectionResetError):
        data, anc = b"", []
    fds, _ = P.parse_ancillary(anc)
    try:
        reply = P.unpack(data) if data else None
    except P.ProtocolError:
        reply = None
    if not isinstance(reply, dict):
        P.close_fds(fds)
        raise ControlError("the supervisor closed the connection without answering")
    if not reply.get("ok"):
        P.close_fds(fds)
        raise ControlError(reply.get("error", "request failed"))
    return reply, fds


def is_running(state_dir: Path) -> bool:
    """Whether a supervisor answers at state_dir."""
    try:
        request(state_dir, "ping", timeout=2)
        return True
    except ControlError:
        return False
    except OSError as exc:
        if exc.errno in (errno.ECONNREFUSED, errno.ENOENT):
            return False
        raise
