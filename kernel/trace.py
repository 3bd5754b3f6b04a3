"""The trace: a record of every call the router forwards and of its reply, for whoever asked.

TRACE hands the supervisor a socket; the router sends one msgpack map per call
and per reply on it, with the raw arguments and values (at most TRACE_BODY
bytes): it never decodes them, the reader does (redoxcap/trace.py). The router
never waits for a tracer: one that does not keep up loses records, and the next
one it gets says how many (`dropped`). With no tracer, nothing is built.
"""

from __future__ import annotations

import errno
import socket
import time
from dataclasses import dataclass

from redoxcap.wire import protocol as P

MAX_TRACERS = 8
TRACE_BODY = 4096  # bytes of a request's arguments or a reply's value a trace record carries
EIO_VALUE = P.pack(errno.EIO)


@dataclass(eq=False, slots=True)
class Tracer:
    """The router's end of a trace socket, and how many records its reader missed."""

    sock: socket.socket
    dropped: int = 0


class Trace:
    """The tracers the router sends its records to; false while there is none."""

    __slots__ = ("_tracers",)

    def __init__(self) -> None:
        self._tracers: list[Tracer] = []

    def __bool__(self) -> bool:
        return bool(self._tracers)

    @property
    def full(self) -> bool:
        """Whether MAX_TRACERS already listen."""
        return len(self._tracers) >= MAX_TRACERS

    def add(self, sock: socket.socket) -> None:
        """Send records on sock (the router's end of a trace socket) from now on; it is
        the trace's to close."""
        sock.setblocking(False)
        self._tracers.append(Tracer(sock))

    def call(self, req_id: int, parent: int | None, pid: int, uid: int, scheme: int, handle: int,
             op: int, account: int, nfds: int, body: bytes | memoryview) -> None:
        """A request forwarded to a scheme (parent: the request it serves, if any)."""
        self._send({"k": "call", "id": req_id, "parent": parent, "t": time.time(), "pid": pid,
                    "uid": uid, "scheme": scheme, "handle": handle, "op": op, "account": account,
                    "fds": nfds, "args": bytes(body[:TRACE_BODY])})

    def reply(self, req_id: int, started: float, scheme: int, pid: int, nfds: int,
              status: int | None, body: bytes | memoryview = b"", handle: int = 0) -> None:
        """A scheme's reply to req_id, forwarded at time.monotonic() started (status None:
        the reply was malformed, and the caller gets EIO)."""
        record = {"k": "reply", "id": req_id, "t": time.time(), "dur": time.monotonic() - started,
                  "scheme": scheme, "fds": nfds, "pid": pid}
        if status is None:
            record.update(status=P.ERR, value=EIO_VALUE)
        else:
            record.update(status=status, value=bytes(body[:TRACE_BODY]), handle=handle)
        self._send(record)

    def _send(self, record: dict) -> None:
        """Send a record to every tracer that has room; never waits."""
        frame = None
        for tracer in list(self._tracers):
            if tracer.dropped:
                record["dropped"] = tracer.dropped
                frame = None
            frame = frame or P.pack(record)
            try:
                tracer.sock.send(frame, socket.MSG_DONTWAIT)
                tracer.dropped = 0
            except BlockingIOError:
                tracer.dropped += 1  # it reads too slowly: it loses records, we do not wait
            except OSError:
                self._tracers.remove(tracer)
                tracer.sock.close()
            record.pop("dropped", None)

    def close(self) -> None:
        for tracer in self._tracers:
            tracer.sock.close()
        self._tracers.clear()
