"""The trace: every call the router forwards, one line each, with who asked and what came back."""

from __future__ import annotations

import json
import subprocess
import sys

from redoxcap.testing import REDOXCAP, wait_for
from redoxcap.trace import Tracer, format_line, syscall_info
from redoxcap.wire import ops
from redoxcap.wire import protocol as P

NAMES = {1: "nsmgr", 2: "file"}


def call(req_id, op, args, scheme=1, pid=42, parent=None, account=7):
    return {"k": "call", "id": req_id, "parent": parent, "t": 1_700_000_000.5, "pid": pid, "uid": 0,
            "scheme": scheme, "handle": 3, "op": op, "account": account, "fds": 0,
            "args": P.pack(args)}


def reply(req_id, status, value, dur=0.001, handle=0, fds=0):
    return {"k": "reply", "id": req_id, "t": 1_700_000_000.6, "dur": dur, "scheme": 1,
            "fds": fds, "pid": 42, "status": status, "value": P.pack(value), "handle": handle}


def test_forwarded_calls_print_indented_under_the_call_they_serve():
    lines = []
    tracer = Tracer(NAMES, lines.append)
    tracer.feed(call(10, ops.OPENAT, ["/scheme/file/notes.txt", 0, 0o666]))
    tracer.feed(call(11, ops.OPENAT, ["notes.txt", 0, 0o666], scheme=2, parent=10))
    tracer.feed(reply(11, P.NEW_HANDLE, None, handle=5))
    assert lines == []  # printed once the call it serves is done
    tracer.feed(reply(10, P.OK, None, fds=1))
    assert len(lines) == 2
    assert "pid 42 nsmgr" in lines[0] and "OPENAT" in lines[0]
    assert "/scheme/file/notes.txt -> ok +1 fds" in lines[0]
    assert lines[1].startswith("  ") and "file" in lines[1] and "notes.txt -> handle 5" in lines[1]


def test_results_show_sizes_values_and_errno_names():
    lines = []
    tracer = Tracer(NAMES, lines.append)
    for req_id, (op, args, status, value) in enumerate([
        (ops.READ, [100], P.OK, b"x" * 100),
        (ops.UNLINKAT, ["gone", 0], P.ERR, 2),
        (ops.FPATH, [], P.OK, "/scheme/file/a"),
    ]):
        tracer.feed(call(req_id, op, args, scheme=2))
        tracer.feed(reply(req_id, status, value))
    assert "READ" in lines[0] and "handle 3 -> 100 bytes" in lines[0]
    assert "UNLINKAT" in lines[1] and "gone -> ENOENT" in lines[1]
    assert "FPATH" in lines[2] and "'/scheme/file/a'" in lines[2]


def test_filters_and_json():
    lines = []
    tracer = Tracer(NAMES, lines.append, json_lines=True, pid=43)
    tracer.feed(call(1, ops.FPATH, [], pid=42))
    tracer.feed(reply(1, P.OK, "/"))
    tracer.feed(call(2, ops.FPATH, [], pid=43))
    tracer.feed(reply(2, P.OK, "/"))
    assert len(lines) == 1
    record = json.loads(lines[0])
    assert (record["pid"], record["op"], record["scheme"], record["result"]) == (43, "FPATH", "nsmgr", "'/'")
    lines.clear()
    by_scheme = Tracer(NAMES, lines.append, scheme="file")
    by_scheme.feed(call(3, ops.OPENAT, ["/scheme/file/x", 0, 0]))
    by_scheme.feed(call(4, ops.OPENAT, ["x", 0, 0], scheme=2, parent=3))
    by_scheme.feed(reply(4, P.ERR, 2))
    by_scheme.feed(reply(3, P.ERR, 2))
    assert len(lines) == 2  # the nsmgr call is kept: a call to file was made for it


def test_run_trace_writes_the_commands_calls_to_a_file(redoxcap_module_system, tmp_path):
    out = tmp_path / "trace.txt"
    code = ("import rt\n"
            "rt.mkdir('/traced')\n"
            "try:\n    rt.open('/traced/missing')\nexcept FileNotFoundError:\n    pass\n")
    redoxcap_module_system.run(f"--trace={out}", "--", sys.executable, "-c", code)
    text = out.read_text()
    assert "nsmgr   NS_ROOT    file -> " in text  # rt takes file's root from the namespace once
    assert "file    MKDIRAT    traced -> ok" in text  # and sends the rest of each path on it
    assert "file    OPENAT     traced/missing -> ENOENT" in text


def test_the_trace_command_streams_json_while_clients_run(redoxcap_module_system):
    tracer = subprocess.Popen([*REDOXCAP, "--state-dir", str(redoxcap_module_system.state_dir), "trace",
                               "--json", "--scheme", "file"],
                              stdout=subprocess.PIPE, text=True)
    try:
        seen: list[dict] = []

        def traced() -> bool:
            redoxcap_module_system.python("import rt; rt.listdir('/')")
            return any(r["op"] == "GETDENTS" for r in seen)

        import threading

        def read() -> None:
            for line in tracer.stdout:
                seen.append(json.loads(line))

        reader = threading.Thread(target=read, daemon=True)
        reader.start()
        wait_for(traced, timeout=30)
        record = next(r for r in seen if r["op"] == "GETDENTS")
        assert record["scheme"] == "file" and record["result"].startswith("[")
    finally:
        tracer.terminate()
        tracer.wait(timeout=30)
        tracer.stdout.close()


def test_an_rt_program_under_the_broker_tells_capabilities_from_host_fds_without_it(
        redoxcap_module_system, tmp_path):
    # rt asks, once per fd, whether it is a capability; with fstat that was a call the
    # broker answered for every fd opened: it is the kernel's getsockopt now
    def brokered_fstats(opens: int) -> int:
        out = tmp_path / f"trace{opens}.txt"
        code = ("import os, rt\n"
                "fd = rt.open('/fstat-count', os.O_CREAT | os.O_WRONLY | os.O_TRUNC)\n"
                "rt.write(fd, b'x')\n"
                "rt.close(fd)\n"
                f"for _ in range({opens}):\n"
                "    fd = rt.open('/fstat-count')\n"
                "    assert rt.read(fd, 1) == b'x'\n"
                "    rt.close(fd)\n")
        redoxcap_module_system.run(f"--trace={out}", "--no-passthrough", "--", sys.executable,
                                   "-c", code)
        lines = out.read_text().splitlines()
        assert sum("file    OPENAT     fstat-count" in line for line in lines) == opens + 1
        return sum(" syscall newfstatat (no path)" in line or " syscall fstat " in line
                   for line in lines)

    assert brokered_fstats(20) == brokered_fstats(0)


FORGED = ("x\n12:00:00.000000 pid 1 file    OPENAT     innocent.txt -> handle 9  0.01 ms"
          "\x1b]0;owned\x07\x1b[2J\u202e")


def test_a_clients_path_cannot_forge_trace_lines_or_drive_the_operators_terminal():
    """A path with a newline and a copy of a trace line in it would add a line of the
    client's choosing to the operator's trace, and ESC and BEL sequences would drive the
    operator's terminal: the trace shows them escaped, as the log does (wire/printable.py)."""
    lines = []
    tracer = Tracer(NAMES, lines.append)
    tracer.feed(call(1, ops.OPENAT, [FORGED, 0, 0], scheme=2))
    tracer.feed(reply(1, P.NEW_HANDLE, None, handle=3, fds=1))
    [line] = lines
    assert line.isprintable(), repr(line)
    assert ("file    OPENAT     x\\x0a12:00:00.000000 pid 1 file    OPENAT     innocent.txt"
            " -> handle 9  0.01 ms\\x1b]0;owned\\x07\\x1b[2J\\u202e -> handle 3") in line
    lines.clear()
    tracer.feed(call(2, ops.UNLINKAT, ["typed \\x1b stays text", 0], scheme=2))
    tracer.feed(reply(2, P.ERR, 2))
    assert "UNLINKAT   typed \\\\x1b stays text -> ENOENT" in lines[0]


def test_values_a_clients_own_scheme_answers_cannot_forge_trace_lines():
    lines = []
    tracer = Tracer({**NAMES, 3: "mine"}, lines.append)
    tracer.feed(call(1, ops.FPATH, [], scheme=3))
    tracer.feed(reply(1, P.OK, FORGED))
    tracer.feed(call(2, ops.READLINKAT, ["l"], scheme=3))
    tracer.feed(reply(2, P.OK, ["a\nb", {"\x1b": "\x07"}]))
    assert len(lines) == 2 and all(line.isprintable() for line in lines), lines


def test_brokered_syscalls_show_the_programs_paths_escaped():
    line = format_line(syscall_info({"t": 1_700_000_000.5, "pid": 42, "op": "openat",
                                     "about": FORGED, "result": "ENOENT\n\x1b[2J", "ms": 0.5}))
    assert line.isprintable(), repr(line)
    assert "syscall openat     x\\x0a12:00:00" in line and "-> ENOENT\\x0a\\x1b[2J" in line


def test_json_lines_keep_what_the_client_sent_in_json_escapes():
    lines = []
    tracer = Tracer(NAMES, lines.append, json_lines=True)
    tracer.feed(call(1, ops.OPENAT, [FORGED, 0, 0], scheme=2))
    tracer.feed(reply(1, P.ERR, 2))
    [line] = lines
    assert line.isprintable() and json.loads(line)["about"] == FORGED
    info = syscall_info({"t": 0.0, "pid": 42, "op": "openat", "about": FORGED, "result": "ENOENT",
                         "ms": 0.5})
    assert json.dumps(info).isprintable()


def test_a_stat_a_clients_own_scheme_makes_up_does_not_stop_the_trace():
    lines = []
    tracer = Tracer({**NAMES, 3: "mine"}, lines.append)
    for req_id, value in enumerate([{"st_mode": "x"}, {"st_mode": 1.5}, {"st_mode": 0o644, "st_size": "\n"},
                                    {"st_mode": 0o100644, "st_size": 3}]):
        tracer.feed(call(req_id, ops.FSTAT, [], scheme=3))
        tracer.feed(reply(req_id, P.OK, value))
    assert len(lines) == 4 and all(line.isprintable() for line in lines), lines
    assert "FSTAT      handle 3 -> mode 100644 size 3 " in lines[3]


def test_a_record_the_trace_cannot_show_is_said_so_and_the_trace_goes_on():
    """Whatever a record holds (the router's, with what a client chose in it), feeding it
    never raises: `up --trace` reads the trace in the supervisor itself."""
    lines = []
    tracer = Tracer(NAMES, lines.append)
    tracer.feed(call(1, ops.OPENAT, ["a", 0, 0]))
    tracer.feed({**reply(1, P.OK, None), "dur": "long"})  # a duration that is no number
    tracer.feed({"k": "call", "id": [2]})  # an id that cannot be a key
    tracer.feed(call(3, ops.OPENAT, ["b", 0, 0]))
    tracer.feed(reply(3, P.ERR, 2))
    assert [line.startswith("(a trace record that cannot be shown") for line in lines] == [True, True, False]
    assert "OPENAT     b -> ENOENT" in lines[2]
