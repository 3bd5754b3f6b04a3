"""Random frames at the router, nsmgr and two schemes: every one is answered, nothing crashes.

The seed is fixed, so a failure reproduces. The tests share the module's one
system, each with a namespace and directory of its own (`redoxcap_isolated_client`),
which fails the test if any daemon logged a traceback (what an unhandled
exception in a request would do) or the router holds more than before.
"""

from __future__ import annotations

import errno
import os
import random
import socket

import msgpack

import rt
from redoxcap.wire import frames as F
from redoxcap.wire import protocol as P
from redoxcap.wire.call import call

SEED = 20261128
FRAMES_PER_TARGET = 250


def random_value(rng: random.Random, depth: int = 0):
    kinds = ["int", "bigint", "neg", "str", "bytes", "none", "bool", "float"]
    if depth < 2:
        kinds += ["list", "map"]
    kind = rng.choice(kinds)
    if kind == "int":
        return rng.randrange(0, 1 << 16)
    if kind == "bigint":
        return rng.randrange(0, 1 << 64)
    if kind == "neg":
        return -rng.randrange(1, 1 << 63)
    if kind == "str":
        return rng.choice(["", ".", "..", "/", "a/../..", "/scheme/file/x", "x" * 300, "é/ü",
                           "/scheme/tcp/127.0.0.1/1", "zero:", "a\0b"])
    if kind == "bytes":
        return rng.randbytes(rng.randrange(0, 64))
    if kind == "none":
        return None
    if kind == "bool":
        return rng.random() < 0.5
    if kind == "float":
        return rng.random() * 1e9
    if kind == "list":
        return [random_value(rng, depth + 1) for _ in range(rng.randrange(0, 4))]
    return {str(rng.randrange(10)): random_value(rng, depth + 1) for _ in range(rng.randrange(0, 3))}


def random_frame(rng: random.Random, tag: int) -> bytes:
    op = rng.choice([*P.SCHEME_OPS, P.CLONE, P.GETFL, P.SCHEME_CREATE, P.CLOSE, 0, 15, 99, 255])
    style = rng.random()
    if style < 0.2:
        body = rng.randbytes(rng.randrange(0, 40))  # not msgpack at all, mostly
    elif style < 0.6:
        body = msgpack.packb([random_value(rng) for _ in range(rng.randrange(0, 5))], use_bin_type=True)
    else:
        body = msgpack.packb(random_value(rng), use_bin_type=True)
    return F.REQUEST.pack(op, tag) + body


def exchange(fd: int, frame: bytes) -> tuple[int, int]:
    """Send one frame on fd and return (tag, status) of its reply; fds received are closed."""
    with socket.socket(fileno=os.dup(fd)) as s:
        s.settimeout(20)
        s.sendmsg([frame])
        data, anc, _, _ = s.recvmsg(P.MAX_FRAME, P.CMSG_FDS)
    for received in P.parse_ancillary(anc)[0]:
        os.close(received)
    tag, status = F.REPLY.unpack_from(data)
    return tag, status


def test_random_frames_are_all_answered_and_break_nothing(redoxcap_isolated_client):
    rng = random.Random(SEED)
    (redoxcap_isolated_client.root / "box").mkdir()
    # a fork whose `file` is the box, so fuzzed unregisters and creates stay in it
    ns = rt.mkns(["zero", "null", "tcp"])
    box = rt.open("/box", rt.O_DIRECTORY)
    rt.register(ns, "file", box)
    rt.close(box)
    targets = {
        "nsmgr": ns,
        "file dir": rt.open("/box", rt.O_DIRECTORY),
        "file": rt.open("/box/f", rt.O_CREAT | rt.O_RDWR),
        "zero": rt.open("/scheme/zero"),
    }
    for name, fd in targets.items():
        for i in range(FRAMES_PER_TARGET):
            frame = random_frame(rng, i)
            tag, status = exchange(fd, frame)
            assert status in (P.OK, P.ERR), (name, frame)
            if len(frame) >= F.REQUEST.size:
                assert tag == i, (name, frame)
    for fd in targets.values():
        rt.close(fd)
    # the system still serves, and nothing outside the box was touched
    assert "file" in rt.schemes()
    assert sorted(p.name for p in redoxcap_isolated_client.root.iterdir()) == ["box"]
    with rt.open_file("/after.txt", "w") as f:
        f.write("still fine")
    assert (redoxcap_isolated_client.root / "after.txt").read_text() == "still fine"


def test_paths_with_nul_bytes_are_einval_everywhere(redoxcap_isolated_client):
    d = rt.open("/", rt.O_DIRECTORY)
    for fd, op, args in [
        (d, P.OPENAT, ["a\0b", 0, 0]), (d, P.MKDIRAT, ["a\0b", 0o777]), (d, P.UNLINKAT, ["a\0b", 0]),
        (d, P.RENAMEAT, ["a", "b\0"]), (d, P.SYMLINKAT, ["t\0", "l"]), (d, P.READLINKAT, ["\0"]),
        (rt.getns(), P.OPENAT, ["/scheme/file/a\0b", 0, 0]), (rt.getns(), P.OPENAT, ["/scheme/fi\0le/a", 0, 0]),
    ]:
        try:
            call(fd, op, args)
            raise AssertionError(f"{op} {args} succeeded")
        except OSError as exc:
            assert exc.errno == errno.EINVAL, (op, args, exc)
    rt.close(d)


def test_overlong_paths_are_enametoolong(redoxcap_isolated_client):
    d = rt.open("/", rt.O_DIRECTORY)
    try:
        call(d, P.OPENAT, ["x" * (P.MAX_PATH + 1), 0, 0])
        raise AssertionError("an overlong path was accepted")
    except OSError as exc:
        assert exc.errno == errno.ENAMETOOLONG
    rt.close(d)
