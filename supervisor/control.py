"""The supervisor's control socket: how `redoxcap` commands talk to a running system.

One SOCK_SEQPACKET Unix socket, `STATE_DIR/control.sock`. A request is one
msgpack map `{"token": ..., "op": ...}`; the answer is one map
`{"ok": true, ...}` or `{"ok": false, "error": "..."}`, with fds attached
where an op hands out capabilities.

It only answers its owner: the peer's uid (SO_PEERCRED, from Linux) must be
the supervisor's, and the request must carry the secret from
`STATE_DIR/token` (mode 0600). Landlock cannot stop a confined client from
connect()ing to a named socket, but it can stop it from reading the token.

Operations:
    namespace  -> a clone of the root namespace capability (fds[0])
    status     -> {"status": {...}} as `redoxcap status --json` prints it
    shutdown   -> stops the system after answering
"""

from __future__ import annotations

import errno
import hmac
import os
import secrets
import socket
import struct
from pathlib import Path
from typing import Any

import trio

from rt import protocol as P

SOCKET_NAME = "control.sock"
TOKEN_NAME = "token"
PID_NAME = "supervisor.pid"
LOG_NAME = "supervisor.log"
MAX_REQUEST = 4096


class ControlError(Exception):
    """A control request failed; the message is fit for the user."""


class NotRunning(ControlError):
    """No system answers at this state directory."""


def write_token(state_dir: Path) -> bytes:
    """Create a fresh secret readable only by its owner; returns it."""
    token = secrets.token_hex(32).encode()
    path = state_dir / TOKEN_NAME
    fd = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_TRUNC | os.O_NOFOLLOW, 0o600)
    try:
        os.fchmod(fd, 0o600)
        os.write(fd, token)
    finally:
        os.close(fd)
    return token


def peer_uid(sock) -> int:
    """The uid of the process at the other end of a Unix socket (SO_PEERCRED)."""
    cred = sock.getsockopt(socket.SOL_SOCKET, socket.SO_PEERCRED, struct.calcsize("iII"))
    return struct.unpack("iII", cred)[1]


async def serve(path: Path, token: bytes, handlers: dict, task_status=trio.TASK_STATUS_IGNORED) -> None:
    """Answer control requests on path until cancelled.

    Args:
        path: where to bind the socket (removed first if stale).
        token: the secret every request must carry.
        handlers: op name -> async function returning (reply dict, fds to pass).
    """
    listener = trio.socket.socket(socket.AF_UNIX, socket.SOCK_SEQPACKET)
    with listener:
        path.unlink(missing_ok=True)
        await listener.bind(str(path))
        os.chmod(path, 0o600)
        listener.listen(16)
        task_status.started()
        try:
            async with trio.open_nursery() as nursery:
                while True:
                    conn, _ = await listener.accept()
                    nursery.start_soon(_answer, conn, token, handlers)
        finally:
            path.unlink(missing_ok=True)


async def _answer(conn, token: bytes, handlers: dict) -> None:
    with conn:
        fds: list[int] = []
        try:
            with trio.fail_after(5):
                data, anc, flags, _ = await conn.recvmsg(MAX_REQUEST, P.CMSG_FDS)
            P.close_fds(P.parse_ancillary(anc)[0])  # nobody passes fds to us
            if peer_uid(conn) != os.getuid():
                raise ControlError("permission denied: not the owner of this system")
            request = P.unpack(data) if data and not flags & socket.MSG_TRUNC else None
            if not isinstance(request, dict) or not isinstance(request.get("token"), str):
                raise ControlError("malformed control request")
            if not hmac.compare_digest(request["token"].encode(), token):
                raise ControlError("permission denied: bad token")
            handler = handlers.get(request.get("op"))
            if handler is None:
                raise ControlError(f"unknown operation {request.get('op')!r}")
            reply, fds = await handler(request)
            reply = {"ok": True, **reply}
        except (ControlError, P.ProtocolError, OSError, trio.TooSlowError) as exc:
            reply = {"ok": False, "error": str(exc) or type(exc).__name__}
        try:
            await conn.sendmsg([P.pack(reply)], P.fds_ancillary(fds))
        except OSError:
            pass
        finally:
            P.close_fds(fds)


def request(state_dir: Path, op: str, timeout: float = 10.0, **args: Any) -> tuple[dict, list[int]]:
    """Send one control request (blocking); returns (reply, fds the caller now owns).

    Raises:
        NotRunning: nothing listens at state_dir.
        ControlError: the supervisor refused or failed the request.
    """
    try:
        token = (state_dir / TOKEN_NAME).read_text()
    except FileNotFoundError:
        raise NotRunning(f"no system is running at {state_dir}") from None
    except PermissionError:
        raise ControlError(f"permission denied reading {state_dir / TOKEN_NAME}") from None
    with socket.socket(socket.AF_UNIX, socket.SOCK_SEQPACKET) as sock:
        sock.settimeout(timeout)
        try:
            sock.connect(str(state_dir / SOCKET_NAME))
        except (FileNotFoundError, ConnectionRefusedError):
            raise NotRunning(f"no system is running at {state_dir}") from None
        sock.sendmsg([P.pack({"token": token, "op": op, **args})])
        try:
            data, anc, _, _ = sock.recvmsg(1 << 20, P.CMSG_FDS, socket.MSG_CMSG_CLOEXEC)
        except TimeoutError:
            raise ControlError(f"the supervisor did not answer {op!r} in {timeout:.0f}s") from None
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
