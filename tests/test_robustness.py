"""Robustness of a running system: no fd or handle outlives a workload or a killed
client, and malformed, oversized or fd-laden frames to the router, nsmgr and a
scheme get EINVAL while the capability keeps working.

The tests share the module's one system, each in a directory and namespace of its
own (`redoxcap_isolated_client`), which checks afterwards that the router holds no more
capabilities than before; the plugin fails any test whose daemons logged a
traceback.
"""

from __future__ import annotations

import errno
import os
import signal
import socket
import sys
from pathlib import Path

import pytest

import rt
from redoxcap.config import Config
from redoxcap.testing import holdings, spare_prepared, wait_for
from redoxcap.wire import frames as F
from redoxcap.wire import protocol as P
from redoxcap.wire.call import call_fd
from rt import _process

BUILTIN = sorted(Config().schemes)  # what a default system registers


def test_daemons_hold_no_more_fds_after_a_workload_than_before(redoxcap_isolated_client):
    def fd_counts() -> dict[str, int]:
        _process.CURRENT.roots.clear()  # the roots rt keeps are this process's capabilities
        return {d["name"]: len(os.listdir(f"/proc/{d['pid']}/fd")) for d in redoxcap_isolated_client.status()["daemons"]
                if d["name"] in ("kernel", "nsmgr", "file", "uds", "pipe")}

    (redoxcap_isolated_client.root / "f").write_text("x")
    before = fd_counts()
    for _ in range(30):
        rt.close(rt.open("/f"))
        child = rt.mkns(["file", "uds"])
        rt.close(call_fd(child, P.OPENAT, ["/scheme/file/f", os.O_RDONLY, 0]))  # through the fork
        rt.close(child)
        r, w = rt.pipe()
        rt.close(r)
        rt.close(w)
        for bad in ("/missing", "/scheme/nosuch/x", "/f/", "f\0"):
            try:
                rt.open(bad)
                raise AssertionError(f"{bad!r} opened")
            except (OSError, ValueError):
                pass
        rt.close(rt.open("../../f"))  # clamped at the top of `file` (the test's directory), opened, closed
    try:
        wait_for(lambda: fd_counts() == before, timeout=15)
    except AssertionError:
        raise AssertionError(f"fds before {before}, after {fd_counts()}") from None


def test_a_killed_client_leaks_no_handle(redoxcap_isolated_client):
    system = redoxcap_isolated_client
    (system.root / "f").write_text("data")
    mine = f"/{system.root.name}"  # the directory as the root namespace of a `run` names it
    baseline = wait_for(lambda: system.daemon("file")["scheme_handles"] is not None and system.daemon("file"))
    spare_prepared(system)  # from here on, what the spare holds is not counted
    baseline_caps = holdings(system)["file"][0]
    holder = system.start(
        "run", "--", sys.executable, "-c",
        ("import rt, sys\n"
         f"fds = [rt.open('{mine}/f') for _ in range(5)] + [rt.open('{mine}', rt.O_DIRECTORY)]\n"
         "print('ready', flush=True)\n"
         "sys.stdin.read()\n"))  # holds them until it is killed
    try:
        assert holder.stdout.readline() == "ready\n"
        wait_for(lambda: (system.daemon("file")["scheme_handles"] or 0) >= baseline["scheme_handles"] + 6)
    finally:
        os.killpg(holder.pid, signal.SIGKILL)
        holder.communicate()
    wait_for(lambda: system.daemon("file")["scheme_handles"] == baseline["scheme_handles"])
    # the router's count, less what the spare runner holds for the next run (its cwd, a
    # `file` capability), which it may or may not hold at either moment
    wait_for(lambda: holdings(system)["file"][0] == baseline_caps)


def _raw_exchange(fd: int, frame: bytes, fds=()) -> tuple[int, int, object]:
    with socket.socket(fileno=os.dup(fd)) as s:
        s.sendmsg([frame], P.fds_ancillary(list(fds)))
        data, _, _, _ = s.recvmsg(P.MAX_FRAME)
    tag, status = F.REPLY.unpack_from(data)
    return tag, status, P.unpack(data[F.REPLY.size :])


MALFORMED = [
    b"\x10",  # shorter than a request header
    F.REQUEST.pack(P.OPENAT, 7) + b"\xc1",  # msgpack's never-used byte
    F.REQUEST.pack(P.OPENAT, 7) + b"\x93\xa1",  # truncated array
    F.REQUEST.pack(P.OPENAT, 7) + P.pack(["x", "not an int", 0]),
    F.REQUEST.pack(P.OPENAT, 7) + P.pack(["x"]),
    F.REQUEST.pack(P.OPENAT, 7) + P.pack({"path": "x"}),
    F.REQUEST.pack(P.OPENAT, 7) + P.pack([1, 2, 3]),
    F.REQUEST.pack(P.READ, 7) + b"\xd4\x01\x00",  # an ext type
    F.REQUEST.pack(P.READ, 7) + P.pack([{1: 2}]),  # a map with a non-str key
    F.REQUEST.pack(P.SCHEME_CREATE, 7) + P.pack([]),  # a kernel op on a file capability
]


@pytest.mark.parametrize("frame", MALFORMED)
def test_malformed_frames_to_the_router_and_a_scheme_get_einval(redoxcap_isolated_client, frame):
    fd = rt.open("/", rt.O_DIRECTORY)
    tag, status, value = _raw_exchange(fd, frame)
    assert (status, value) == (P.ERR, errno.EINVAL)
    assert tag == (7 if len(frame) >= F.REQUEST.size else 0)
    assert rt.listdir("/") == []  # the same capability keeps working
    rt.close(fd)


@pytest.mark.parametrize("frame", MALFORMED)
def test_malformed_frames_to_nsmgr_get_einval(redoxcap_isolated_client, frame):
    _tag, status, value = _raw_exchange(rt.getns(), frame)
    assert (status, value) == (P.ERR, errno.EINVAL)
    assert rt.schemes() == BUILTIN


def test_an_oversized_frame_is_refused_and_the_router_survives(redoxcap_isolated_client):
    fd = rt.open("/", rt.O_DIRECTORY)
    with socket.socket(fileno=os.dup(fd)) as s:
        s.setsockopt(socket.SOL_SOCKET, socket.SO_SNDBUF, 1 << 20)
        s.send(F.REQUEST.pack(P.WRITE, 3) + P.pack([b"x" * (P.MAX_FRAME + 100)]))
        data = s.recv(P.MAX_FRAME)
    assert F.decode_reply(data) == (3, P.ERR, errno.EINVAL)
    assert rt.listdir("/") == []
    rt.close(fd)


def test_fds_passed_where_none_are_expected_are_closed_not_leaked(redoxcap_isolated_client):
    """GETDENTS takes no fd: the router refuses one that comes with it (EINVAL), and neither
    it nor the scheme keeps a copy."""
    fd = rt.open("/", rt.O_DIRECTORY)
    r, w = os.pipe()
    _tag, status, value = _raw_exchange(fd, F.encode_request(P.GETDENTS, 1, [0]), [r])
    os.close(r)
    assert (status, value) == (P.ERR, errno.EINVAL)

    def read_end_closed_everywhere() -> bool:
        try:
            os.write(w, b"x")
            return False
        except BrokenPipeError:
            return True

    wait_for(read_end_closed_everywhere)  # neither the router nor the scheme kept a copy
    os.close(w)
    rt.close(fd)


def test_kernel_knows_no_scheme_names_and_parses_no_paths():
    kernel = Path(__file__).resolve().parent.parent / "kernel"
    source = "\n".join(p.read_text() for p in kernel.glob("*.py")).lower()
    assert "router" in source
    for word in ("\"file\"", "'file'", "nsmgr", "/scheme", "tcp", "split(\"/\")", "os.path", "posixpath"):
        assert word not in source, word
