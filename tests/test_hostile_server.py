"""rt against a server that lies: a capability can come from anyone.

The test registers a scheme of its own (conftest's HostileScheme) and answers
its requests by hand from a thread, with replies no honest scheme sends: fds
nobody asked for, values of the wrong type, more bytes than asked for,
listings that never end, and no answer at all. rt must close every fd it
does not hand to its caller, turn every malformed reply into EIO, bound
listings, and give up after a timeout.
"""

from __future__ import annotations

import errno
import itertools
import os
import threading

import pytest

import rt
from redoxcap.testing.waiting import wait_for
from redoxcap.wire import protocol as P


def open_fds() -> int:
    return len(os.listdir("/proc/self/fd"))


def junk_fds(n: int) -> list[int]:
    return [os.open("/dev/null", os.O_RDONLY) for _ in range(n)]


_names = itertools.count()


@pytest.fixture
def evil(redoxcap_module_client, hostile_scheme):
    """make(answer) -> an fd of a fresh hostile scheme, and its name as make.name."""

    def make(answer):
        make.name = f"evil{next(_names)}"
        hostile_scheme(make.name, lambda op, args: None if op == P.OPENAT else answer(op, args))
        return rt.open(f"/scheme/{make.name}")

    return make


def test_fds_attached_to_replies_that_promise_none_are_closed(evil):
    fd = evil(lambda op, args: (P.OK, P.pack(b"x" if op == P.READ else None), junk_fds(200)))
    before = open_fds()
    for _ in range(20):
        assert rt.read(fd, 10) == b"x"
        rt.fsync(fd)
    with pytest.raises(OSError) as info:
        rt.dup(fd)  # one capability promised, 200 fds came
    assert info.value.errno == errno.EIO
    # the server thread (this process) closes its own copies just after sending them, and
    # may still be at it: rt's would stay forever, the thread's go
    wait_for(lambda: open_fds() == before)
    rt.close(fd)


@pytest.mark.parametrize("op, call", [
    (P.READ, lambda fd: rt.read(fd, 10)),
    (P.WRITE, lambda fd: rt.write(fd, b"abc")),
    (P.LSEEK, lambda fd: rt.lseek(fd, 0)),
    (P.FSTAT, lambda fd: rt.fstat(fd)),
    (P.FPATH, lambda fd: rt.fpath(fd)),
    (P.GETDENTS, lambda fd: rt.listdir(rt.fpath(fd))),
    (P.READLINKAT, lambda fd: rt.readlink(rt.fpath(fd) + "/x")),
], ids=["read", "write", "lseek", "fstat", "fpath", "getdents", "readlink"])
@pytest.mark.parametrize("value", [12345, "text", b"bytes", [1, 2], {"a": 1}, None, -1, 10**6],
                         ids=["int", "str", "bytes", "list", "dict", "nil", "negative", "huge"])
def test_a_reply_of_the_wrong_type_or_size_is_eio(evil, op, call, value):
    valid = {P.READ: (bytes,), P.WRITE: (int,), P.LSEEK: (int,), P.FSTAT: (dict,),
             P.FPATH: (str,), P.GETDENTS: (list,), P.READLINKAT: (str,)}[op]
    fd = evil(lambda o, args: (P.OK, P.pack(f"/scheme/{evil.name}" if o == P.FPATH and o != op
                                            else value), []))
    try:
        result = call(fd)
    except OSError as exc:
        assert exc.errno == errno.EIO
    else:
        # only a value of the promised type, within what was asked, gets through
        assert isinstance(value, valid)
        if op == P.READ:
            assert result == value and len(value) <= 10
        if op == P.WRITE:
            assert 0 <= value <= 3
        if op == P.LSEEK:
            assert value >= 0
        if op == P.GETDENTS:
            assert value == [] or all(isinstance(x, str) for x in value)
    finally:
        rt.close(fd)


def test_more_bytes_than_asked_for_is_eio(evil):
    fd = evil(lambda op, args: (P.OK, P.pack(b"y" * 100), []))
    with pytest.raises(OSError) as info:
        rt.read(fd, 10)
    assert info.value.errno == errno.EIO
    rt.close(fd)


def test_a_listing_that_never_ends_is_bounded(evil):
    page = [f"name{i:05d}" for i in range(4000)]
    fd = evil(lambda op, args: (P.OK, P.pack(page), []))  # the same page, for ever
    with pytest.raises(OSError) as info:
        rt.listdir(f"/scheme/{evil.name}")
    assert info.value.errno == errno.EOVERFLOW
    rt.close(fd)


def test_a_server_that_never_answers_times_out_and_the_fd_stays_usable(evil):
    silent = threading.Event()
    fd = evil(lambda op, args: None if silent.is_set() else (P.OK, P.pack("here"), []))
    silent.set()
    with rt.timeout(0.5), pytest.raises(OSError) as info:
        rt.fpath(fd)
    assert info.value.errno == errno.ETIMEDOUT
    rt.set_default_timeout(0.5)
    try:
        with pytest.raises(OSError) as info:
            rt.read(fd, 1)
        assert info.value.errno == errno.ETIMEDOUT
    finally:
        rt.set_default_timeout(None)
    silent.clear()
    assert rt.fpath(fd) == "here"  # the late replies were recognised and dropped
    rt.close(fd)


def test_sendfd_sends_a_clone_so_the_receiver_cannot_read_our_replies(redoxcap_module_client):
    (redoxcap_module_client.root / "f.txt").write_text("ours")
    listener = rt.open("/scheme/uds/sendfd-test", rt.O_CREAT | rt.O_RDWR)
    a = rt.open("/scheme/uds/sendfd-test", rt.O_RDWR)
    b = rt.dup(listener, b"accept")
    mine = rt.open("/f.txt")
    rt.sendfd(a, mine)
    theirs = rt.recvfd(b)
    assert os.fstat(theirs).st_ino != os.fstat(mine).st_ino  # a socket of its own
    assert rt.read(theirs, 2) == b"ou"  # the same handle: the offset is shared
    assert rt.read(mine, 10) == b"rs"
    for fd in (theirs, mine, a, b, listener):
        rt.close(fd)
