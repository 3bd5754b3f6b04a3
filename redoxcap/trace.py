"""Reading the router's trace: one line per call, forwarded calls under the call that caused them.

The router streams, on a socket it hands the supervisor (kernel op TRACE), a
msgpack record when it forwards a call to a scheme and one when the reply
comes back. It never decodes what the calls carry; this module does, with
the operation table (wire/ops.py), and turns each finished call into

    12:00:01.123456 pid 4242 file    OPENAT     /notes/today.txt -> handle 7  0.21 ms
    12:00:01.123001 pid 4242 nsmgr   OPENAT     /scheme/file/notes/x -> handle 8  0.40 ms
      12:00:01.123100 pid 4242 file    OPENAT   notes/x -> handle 8  0.12 ms

(a call nsmgr made to serve another is printed, indented, after it), or into
one JSON object per line. A reader that falls behind loses records; the
lines then say how many.

What a client chose (its paths, the values its own scheme answers, a brokered
program's paths) is shown as the log shows a client's lines: whatever is not
printable escaped (`\\x0a`, `\\x1b`, `\\u202e`) and each backslash doubled,
so that it cannot forge a line of the trace or drive the operator's terminal;
JSON lines carry it as it came, in JSON's own escapes.
"""

from __future__ import annotations

import errno
import json
import time
from collections.abc import Callable, Iterator
from dataclasses import dataclass, field
from typing import Any

from redoxcap.wire import ops
from redoxcap.wire import protocol as P
from redoxcap.wire.printable import escape_text

STATUS_NAMES = {P.OK: "OK", P.ERR: "ERR", P.NEW_HANDLE: "NEW_HANDLE"}


@dataclass
class Call:
    """One call: its request record, then its reply record, and the calls made for it."""

    start: dict
    reply: dict | None = None
    children: list[Call] = field(default_factory=list)


def _decode(raw: Any) -> Any:
    try:
        return P.unpack(raw) if isinstance(raw, bytes) else None
    except P.ProtocolError:
        return None  # cut short at TRACE_BODY bytes, or not msgpack at all


def describe_call(record: dict) -> tuple[str, str]:
    """(operation name, what it was about: the path for a path operation, the name for a
    namespace operation on one (NS_ROOT...), else the handle)."""
    op = ops.BY_NUMBER.get(record.get("op"))
    name = op.constant if op else f"op{record.get('op')}"
    args = _decode(record.get("args"))
    about = op.path if op is not None else None
    if op is not None and about is None and op.args and op.args[0].name == "name":
        about = 0
    if about is not None and isinstance(args, list) and len(args) > about:
        return name, str(args[about])
    return name, f"handle {record.get('handle')}"


def describe_result(reply: dict | None) -> str:
    """An fd (a new handle), a size, a value, or an errno name."""
    if reply is None:
        return "(no reply)"
    value = _decode(reply.get("value"))
    status = reply.get("status")
    fds = f" +{reply['fds']} fds" if reply.get("fds") else ""
    if status == P.ERR:
        return errno.errorcode.get(value, f"errno {value}") if isinstance(value, int) else "ERR"
    if status == P.NEW_HANDLE:
        return f"handle {reply.get('handle')}"
    if isinstance(value, bytes):
        return f"{len(value)} bytes{fds}"
    if value is None:
        return f"ok{fds}"
    if isinstance(value, dict) and _is_int(value.get("st_mode")) and _is_int(value.get("st_size", 0)):
        return f"mode {value['st_mode']:o} size {value.get('st_size', 0)}"  # a Stat
    text = repr(value)
    return (text if len(text) <= 60 else text[:57] + "...") + fds


def _is_int(value: Any) -> bool:
    return type(value) is int  # what a client's own scheme answers may be anything


def as_json(call: Call, names: dict[int, str]) -> dict:
    """One finished call as a JSON-ready map."""
    op, about = describe_call(call.start)
    reply = call.reply or {}
    return {"time": call.start.get("t"), "id": call.start.get("id"), "parent": call.start.get("parent"),
            "pid": call.start.get("pid"), "uid": call.start.get("uid"),
            "scheme": names.get(call.start.get("scheme"), f"scheme {call.start.get('scheme')}"),
            "op": op, "about": about, "result": describe_result(call.reply),
            "ms": round(reply.get("dur", 0.0) * 1000, 3), "account": call.start.get("account")}


def as_line(call: Call, names: dict[int, str], depth: int = 0) -> str:
    return format_line(as_json(call, names), depth)


def format_line(info: dict, depth: int = 0) -> str:
    """One call as a line: time, pid, scheme (or `syscall`), op, what about, result, duration.

    Every field is shown escaped where it is not printable (wire/printable.py, as the log
    shows a client's lines): a path, a value or a name a client chose cannot end the line,
    forge another, or send its terminal an escape sequence.
    """
    stamp = time.strftime("%H:%M:%S", time.localtime(info["time"] or 0))
    stamp += f".{int(((info['time'] or 0) % 1) * 1e6):06d}"
    pid, scheme, op, about = (escape_text(str(info[key])) for key in ("pid", "scheme", "op", "about"))
    # describe_result shows a value as repr does, printable with each backslash doubled
    # already; a result that is not printable (not one of its) is escaped here
    result = str(info["result"])
    result = result if result.isprintable() else escape_text(result)
    return (f"{'  ' * depth}{stamp} pid {pid} {scheme:<7} {op:<10} "
            f"{about} -> {result}  {info['ms']:.2f} ms")


def syscall_info(record: dict) -> dict:
    """A brokered program's syscall (a record from redoxcap/broker) in as_json's shape.

    Its scheme is `syscall`; its pid is the program's thread; a result that
    is an errno name is the broker's answer, a refusal among them.
    """
    return {"time": record.get("t"), "pid": record.get("pid"), "scheme": "syscall",
            "op": record.get("op"), "about": record.get("about") or "(no path)",
            "result": record.get("result"), "ms": record.get("ms", 0.0)}


class Tracer:
    """Pairs records into calls, nests forwarded calls under their cause, filters, prints.

    Args:
        names: scheme id -> name (the supervisor knows them; the router does not).
        emit: called with each line (or JSON text) to print.
        json_lines: print JSON objects instead of lines.
        pid: only calls this client pid made (or that were made for it).
        scheme: only calls to this scheme (and the calls made for them).
        account: only calls of this router account (a `redoxcap run`'s).
    """

    def __init__(self, names: dict[int, str], emit: Callable[[str], None], json_lines: bool = False,
                 pid: int | None = None, scheme: str | None = None, account: int | None = None) -> None:
        self.names = names
        self.emit = emit
        self.json_lines = json_lines
        self.pid, self.scheme, self.account = pid, scheme, account
        self.calls: dict[int, Call] = {}
        self.roots: dict[int, Call] = {}  # calls nobody made for another, by id

    def feed(self, record: dict) -> None:
        """Take one record of the router's trace, printing the calls it completes. Never
        raises: what a client chose (its arguments, what its own scheme answers) may be
        anything, and `up --trace` reads the trace in the supervisor itself; a record that
        cannot be shown is said so, and the trace goes on."""
        try:
            self._feed(record)
        except Exception as exc:  # noqa: BLE001 - see above
            self.emit(f"(a trace record that cannot be shown: {type(exc).__name__})")

    def _feed(self, record: dict) -> None:
        if record.get("dropped"):
            self.emit(f"(the trace lost {record['dropped']} records: it was read too slowly)")
        if record.get("k") == "call":
            call = Call(record)
            self.calls[record.get("id")] = call
            parent = self.calls.get(record.get("parent"))
            if parent is not None:
                parent.children.append(call)
            else:
                self.roots[record.get("id")] = call
        elif record.get("k") == "reply":
            call = self.calls.get(record.get("id"))
            if call is not None:
                call.reply = record
                if record.get("id") in self.roots and self._done(call):
                    self._print(self.roots.pop(record["id"]))

    def _done(self, call: Call) -> bool:
        return call.reply is not None and all(self._done(c) for c in call.children)

    def _wanted(self, call: Call) -> bool:
        start = call.start
        if self.pid is not None and start.get("pid") != self.pid:
            return False
        if self.account is not None and start.get("account") != self.account:
            return False
        if self.scheme is not None:
            return self.names.get(start.get("scheme")) == self.scheme or any(
                self._wanted(c) for c in call.children)
        return True

    def _print(self, call: Call, depth: int = 0) -> None:
        if depth == 0 and not self._wanted(call):
            self._forget(call)
            return
        if self.json_lines:
            self.emit(json.dumps(as_json(call, self.names)))
        else:
            self.emit(as_line(call, self.names, depth))
        for child in call.children:
            self._print(child, depth + 1)
        self.calls.pop(call.start.get("id"), None)

    def _forget(self, call: Call) -> None:
        self.calls.pop(call.start.get("id"), None)
        for child in call.children:
            self._forget(child)


def records(sock) -> Iterator[dict]:
    """The records arriving on a trace socket, until it closes."""
    while True:
        data = sock.recv(P.MAX_FRAME)
        if not data:
            return
        try:
            record = P.unpack(data)
        except P.ProtocolError:
            continue
        if isinstance(record, dict):
            yield record


class Follower:
    """`run --trace`: a thread that prints one run's calls while it runs (sync code).

    Args:
        sock: the trace socket (owned from now on).
        names: scheme id -> name.
        out: where lines go (stderr, or a file the caller opened).
        json_lines: print JSON objects instead of lines.
    """

    def __init__(self, sock, names: dict[int, str], out, json_lines: bool = False) -> None:
        import threading

        self.sock = sock
        self.out = out
        self.tracer = Tracer(names, self._emit, json_lines=json_lines)
        self.thread = threading.Thread(target=self._follow, daemon=True)
        self.lock = threading.Lock()
        self.stopping = threading.Event()

    def _emit(self, line: str) -> None:
        with self.lock:  # the follower's thread and a broker (syscall) both print
            self.out.write(line + "\n")
            self.out.flush()

    def syscall(self, record: dict) -> None:
        """Print a brokered program's syscall as it is answered (`run --trace --brokered`).

        The scheme calls the broker made for it carry the broker's pid (the
        `redoxcap run` process) and come on their own lines, in the order the
        router's records arrive.
        """
        info = syscall_info(record)
        self._emit(json.dumps(info) if self.tracer.json_lines else format_line(info))

    def start(self, account: int | None) -> None:
        """Print the calls of this router account (the run's) from now on."""
        self.tracer.account = account
        self.thread.start()

    def _follow(self) -> None:
        self.sock.settimeout(0.2)  # to see `stop`; records that arrive meanwhile wait in the socket
        while not self.stopping.is_set():
            try:
                data = self.sock.recv(P.MAX_FRAME)
            except TimeoutError:
                continue
            except OSError:
                return
            if not data:
                return
            self._feed(data)

    def _feed(self, data: bytes) -> None:
        try:
            record = P.unpack(data)
        except P.ProtocolError:
            return
        if isinstance(record, dict):
            self.tracer.feed(record)

    def stop(self) -> None:
        """Print what has come so far and let go of the socket."""
        self.stopping.set()
        if self.thread.is_alive():
            self.thread.join()
        self.sock.setblocking(False)
        try:
            while data := self.sock.recv(P.MAX_FRAME):
                self._feed(data)
        except OSError:
            pass
        self.sock.close()


async def trace_into(trace_fd: int, scheme_names: Callable[[], dict[str, str]],
                     write: Callable[[str], None]) -> None:
    """Write a line with write for every call on the router's trace socket trace_fd (owned),
    until the router closes it; scheme_names() says the names of the moment, by id."""
    import socket

    import trio

    tracer = Tracer({int(k): v for k, v in scheme_names().items()}, write)
    with trio.socket.from_stdlib_socket(socket.socket(fileno=trace_fd)) as sock:
        while data := await sock.recv(P.MAX_FRAME):
            try:
                record = P.unpack(data)
            except P.ProtocolError:
                continue
            if isinstance(record, dict):
                tracer.names = {int(k): v for k, v in scheme_names().items()}
                tracer.feed(record)
