"""The trace: every call the router forwards, one line each, with who asked and what came back."""

from __future__ import annotations

import json
import subprocess
import sys

from redoxcap.testing import REDOXCAP, wait_for
from redoxcap.trace import Tracer
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
