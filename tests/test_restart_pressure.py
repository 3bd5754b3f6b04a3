"""Restarts while the system is short of fds: what is kept, what is handed back, and what never is.

The router keeps, for nsmgr and the file scheme, each handle's state across a
crash of its daemon (KEEP, RESTORE). These tests take that where the red
team took it: state too large for one message, a router with no fds to hand
it back with, a router that cannot even give a daemon a new channel, and
clients busy writing while daemons are killed and others hoard every fd their
quota allows. What must hold: a state change is acknowledged only once it is
kept; a handle never comes back with more rights than it had; a restore that
cannot complete never lets a new handle take an old one's number (its requests
fail with EIO instead); every acknowledged write is in its own file.

The first tests drive a router alone (`python -m redoxcap.kernel`), playing the scheme
by hand as tests/test_router.py does; the others run whole systems.
"""

from __future__ import annotations

import errno
import os
import random
import resource
import select
import signal
import sys
import threading
import time

import pytest
from test_router import FakeScheme, kernel_with_fd_limit, new_account, receive, send

import rt
from redoxcap import control
from redoxcap.testing import wait_for
from redoxcap.wire import protocol as P
from redoxcap.wire.call import call, call_fd
from redoxcap.wire.frames import KEPT_HDR, NEW_HANDLE_HDR, SREPLY, Keep, SchemeReply, encode_request


def router_fds(pid: int) -> int:
    return len(os.listdir(f"/proc/{pid}/fd"))


def keeping_scheme(kernel: int) -> tuple[int, FakeScheme, int]:
    """A scheme created by the supervisor's kernel capability, allowed to KEEP state."""
    scheme_id, (channel, root) = call(kernel, P.SCHEME_CREATE, [{"keeps": True}])
    return scheme_id, FakeScheme(channel), root


def open_kept(scheme: FakeScheme, cap: int, tag: int, number: int, state_fds: list[int],
              carried: bool = False) -> int:
    """OPENAT on cap, answered with handle number whose state (state_fds) is kept: in a KEEP
    frame just before the reply, or carried in the reply itself (NEW_HANDLE_KEPT)."""
    send(cap, encode_request(P.OPENAT, tag, ["x", 0, 0]))
    req_id, *_ = scheme.receive()
    reply = SchemeReply.new_handle(req_id, number, 0)
    if carried:
        scheme.answer(reply.keeping(len(state_fds), P.pack({"n": number})), state_fds)
    else:
        scheme.send_raw(Keep.of(number, len(state_fds), {"n": number}, req_id).encode(), state_fds)
        scheme.answer(reply)
    (got, status, value), fds = receive(cap)
    assert (got, status) == (tag, P.OK), value
    return fds[0]


# The plugin's fixtures, by the short names these tests use.
@pytest.fixture
def lone_router():
    """A router alone (`python -m redoxcap.kernel`) whose kernel capability this test holds, as
    the supervisor would; its fd limit is this process's."""
    with kernel_with_fd_limit(*resource.getrlimit(resource.RLIMIT_NOFILE)) as (kernel_fd, _):
        yield kernel_fd


# -- a router alone -----------------------------------------------------------------


def test_client_accounts_together_leave_the_router_its_reserve():
    """However many client accounts there are, together they get the router's fds less
    a reserve; the system (the supervisor, restarts) still gets fds when they are full."""
    limit = 1024
    with kernel_with_fd_limit(limit, limit) as (kernel_fd, proc):
        _, scheme, root = keeping_scheme(kernel_fd)
        held: list[int] = []
        refused = 0
        for _ in range(4):  # 4 x 1024 of quota, more than the router has
            try:
                _, (cap,) = new_account(kernel_fd, [root])
            except OSError as exc:  # not even one capability more for a new client
                assert exc.errno == errno.EMFILE
                refused += 1
                continue
            held.append(cap)
            while True:
                try:
                    held.append(call_fd(cap, P.CLONE))
                except OSError as exc:
                    assert exc.errno == errno.EMFILE
                    refused += 1
                    break
        assert refused == 4
        reserve = limit - router_fds(proc.pid)
        assert reserve >= 200, f"clients left the router {reserve} fds"
        # the system still gets what it needs: a capability, a new scheme, a restart
        os.close(call_fd(root, P.CLONE))
        _, (channel, other_root) = call(kernel_fd, P.SCHEME_CREATE)
        P.close_fds([channel, other_root])
        status = call(kernel_fd, P.KERNEL_STATUS)[0]["summary"]
        assert status["client_fds"] <= status["client_fd_limit"] == limit - status["reserve"]
        P.close_fds(held)
        os.close(root)
        scheme.die()


def test_a_restore_short_of_fds_fails_its_handles_and_never_reuses_their_numbers(kernel_fds_limited):
    """The red team's worst: a restore that failed for lack of fds let the new daemon
    number handles from 1 again, and one client's writes went into another's file.
    RESUME now comes first, with a floor above every number used; a handle that could
    not be given back answers EIO; a new handle is a new number."""
    kernel_fd, proc = kernel_fds_limited
    scheme_id, scheme, root = keeping_scheme(kernel_fd)
    pipes = [os.pipe() for _ in range(2)]
    caps = [open_kept(scheme, root, tag, number, [r, w], carried=number == 2)
            for tag, (number, (r, w)) in enumerate(zip((1, 2), pipes), start=1)]
    P.close_fds([fd for pair in pipes for fd in pair])
    scheme.die()
    wait_for(lambda: call(kernel_fd, P.KERNEL_STATUS)[0]["schemes"][str(scheme_id)]["alive"] is False)
    # room for the new channel, and then for one fd at a time: each state needs two (the
    # second handle's come free when the first one's state is given up)
    open_now = router_fds(proc.pid)
    hard = resource.prlimit(proc.pid, resource.RLIMIT_NOFILE)[1]
    resource.prlimit(proc.pid, resource.RLIMIT_NOFILE, (open_now + 2, hard))
    try:
        _, (channel,) = call(kernel_fd, P.SCHEME_RESTART, [scheme_id])
        reborn = FakeScheme(channel)
        op, handle, args, fds = reborn.restored.get(timeout=10)
        assert (op, handle, args) == (P.RESUME, P.ROOT_HANDLE, [3])  # first, above 1 and 2
        with pytest.raises(OSError) as info:  # given up after a few tries: EIO, never another handle
            call(caps[0], P.READ, [1])
        assert info.value.errno == errno.EIO
        op, handle, args, fds = reborn.restored.get(timeout=10)
        assert (op, handle, args, len(fds)) == (P.RESTORE, 2, {"n": 2}, 2)
        P.close_fds(fds)
    finally:
        resource.prlimit(proc.pid, resource.RLIMIT_NOFILE, (hard, hard))
    new = open_kept(reborn, root, 9, 3, [])
    for tag, (cap, number) in enumerate(((new, 3), (caps[1], 2)), start=10):
        send(cap, encode_request(P.READ, tag, [1]))
        req_id, handle, *_ = reborn.receive()
        assert handle == number
        reborn.answer(SchemeReply.of(req_id, P.OK, bytes([number])))
        assert receive(cap)[0] == (tag, P.OK, bytes([number]))
    with pytest.raises(OSError) as info:
        call(caps[0], P.READ, [1])  # still failing: not the new handle, not anyone's
    assert info.value.errno == errno.EIO
    assert reborn.restored.empty()
    P.close_fds([*caps, new, root])
    reborn.die()


@pytest.fixture
def kernel_fds_limited():
    with kernel_with_fd_limit(4096, 4096) as started:
        yield started


def test_a_keep_that_cannot_be_stored_fails_its_request(lone_router):
    """A state change is acknowledged only once kept: state over the quota of the account
    it is kept for fails the request (EMFILE); a new handle that cannot be kept is closed;
    an existing one's older state is forgotten, so a restart fails it rather than hand
    back more than it had."""
    scheme_id, scheme, root = keeping_scheme(lone_router)
    _, (mine,) = new_account(lone_router, [root], max_caps=16)
    r, w = os.pipe()
    send(mine, encode_request(P.OPENAT, 1, ["x", 0, 0]))
    req_id, *_ = scheme.receive()
    scheme.send_raw(Keep.of(5, 20, {}, req_id).encode(), [r] * 20)  # 20 fds: over its 16
    scheme.answer(SchemeReply.new_handle(req_id, 5, 0))
    assert receive(mine) == ((1, P.ERR, errno.EMFILE), [])
    _, handle, _, op, _, _ = scheme.receive()
    assert (handle, op) == (5, P.CLOSE)
    send(mine, encode_request(P.OPENAT, 4, ["x", 0, 0]))  # the same, carried in the reply
    req_id, *_ = scheme.receive()
    scheme.answer(SchemeReply.new_handle(req_id, 8, 0).keeping(20, P.pack({})), [r] * 20)
    assert receive(mine) == ((4, P.ERR, errno.EMFILE), [])
    _, handle, _, op, _, _ = scheme.receive()
    assert (handle, op) == (8, P.CLOSE)
    opened = open_kept(scheme, mine, 2, 6, [r])  # one fd: it fits
    send(opened, encode_request(P.NS_NARROW, 3, [1]))  # a change whose new state is too large
    req_id, *_ = scheme.receive()
    scheme.send_raw(Keep.of(6, 20, {"narrowed": True}, req_id).encode(), [r] * 20)
    scheme.answer(SchemeReply.of(req_id, P.OK, None))
    assert receive(opened) == ((3, P.ERR, errno.EMFILE), [])
    scheme.die()
    _, (channel,) = call(lone_router, P.SCHEME_RESTART, [scheme_id])
    reborn = FakeScheme(channel)
    assert reborn.restored.get(timeout=10)[0] == P.RESUME
    with pytest.raises(OSError) as info:
        call(opened, P.READ, [1])  # forgotten: not restored with the state before the change
    assert info.value.errno == errno.EIO
    assert reborn.restored.empty()
    os.close(w)
    assert os.read(r, 1) == b""  # every copy the router took is closed
    P.close_fds([r, opened, mine, root])
    reborn.die()


def test_a_state_carried_in_a_new_handle_reply_is_kept_and_handed_back(lone_router):
    """NEW_HANDLE_KEPT is a KEEP and a NEW_HANDLE in one frame: the first fds are the
    state's, which the router holds until the handle closes and hands to the next daemon;
    the fds after them are the reply's own, relayed to the caller after its capability."""
    scheme_id, scheme, root = keeping_scheme(lone_router)
    r, w = os.pipe()
    own_r, own_w = os.pipe()
    send(root, encode_request(P.OPENAT, 1, ["x", 0, 0]))
    req_id, *_ = scheme.receive()
    reply = SchemeReply.new_handle(req_id, 4, 0, "opened").keeping(1, P.pack({"n": 4}))
    scheme.answer(reply, [w, own_r])
    P.close_fds([w, own_r])
    (tag, status, value), (cap, passed) = receive(root)
    assert (tag, status, value) == (1, P.OK, "opened")
    os.write(own_w, b"own")
    assert os.read(passed, 3) == b"own"  # the reply's own fd reached the caller
    os.set_blocking(r, False)
    with pytest.raises(BlockingIOError):
        os.read(r, 1)  # not EOF: the router holds the state's copy of w
    scheme.die()
    _, (channel,) = call(lone_router, P.SCHEME_RESTART, [scheme_id])
    reborn = FakeScheme(channel)
    assert reborn.restored.get(timeout=10)[0] == P.RESUME
    op, handle, args, fds = reborn.restored.get(timeout=10)
    assert (op, handle, args, len(fds)) == (P.RESTORE, 4, {"n": 4}, 1)
    os.write(fds[0], b"kept")
    assert os.read(r, 4) == b"kept"  # the very pipe the state held
    os.close(fds[0])
    send(cap, encode_request(P.READ, 2, [1]))  # the handle lives on in the next daemon
    req_id, handle, *_ = reborn.receive()
    assert handle == 4
    reborn.answer(SchemeReply.of(req_id, P.OK, b"x"))
    assert receive(cap)[0] == (2, P.OK, b"x")
    os.close(cap)
    _, handle, _, op, _, _ = reborn.receive()
    assert (handle, op) == (4, P.CLOSE)
    assert select.select([r], [], [], 10)[0] and os.read(r, 1) == b""  # the router let go of its copy
    P.close_fds([r, passed, own_w, root])
    reborn.die()


@pytest.mark.parametrize("tail, keeps", [
    (b"\x01", True),  # cut short in the state's header
    (KEPT_HDR.pack(1, 1000) + b"state", True),  # a state longer than the frame
    (KEPT_HDR.pack(3, 0), True),  # more state fds than the frame carries
    (KEPT_HDR.pack(1, 1) + P.pack(None), False),  # well formed, from a scheme that may not keep
], ids=["short", "state past the end", "fds it lacks", "not allowed to keep"])
def test_a_malformed_state_in_a_new_handle_reply_fails_the_open_not_the_router(lone_router, tail, keeps):
    """What a scheme sends is not trusted: the open fails (EIO), the handle is closed in the
    scheme, every fd the frame carried is closed, and the router serves on."""
    _, (channel, root) = call(lone_router, P.SCHEME_CREATE, [{"keeps": keeps}])
    scheme = FakeScheme(channel)
    r, w = os.pipe()
    send(root, encode_request(P.OPENAT, 1, ["x", 0, 0]))
    req_id, *_ = scheme.receive()
    scheme.send_raw(SREPLY.pack(req_id, P.NEW_HANDLE_KEPT) + NEW_HANDLE_HDR.pack(7, 0) + tail, [w])
    os.close(w)
    assert receive(root) == ((1, P.ERR, errno.EIO), [])
    _, handle, _, op, _, _ = scheme.receive()
    assert (handle, op) == (7, P.CLOSE)
    assert select.select([r], [], [], 10)[0] and os.read(r, 1) == b""  # the router kept no copy
    send(root, encode_request(P.READ, 2, [1]))
    req_id, *_ = scheme.receive()
    scheme.answer(SchemeReply.of(req_id, P.OK, b"on"))
    assert receive(root) == ((2, P.OK, b"on"), [])
    P.close_fds([r, root])
    scheme.die()


# -- whole systems ----------------------------------------------------------------


def kill(system, name: str) -> int:
    pid = system.daemon(name)["pid"]
    os.kill(pid, signal.SIGKILL)
    return pid


def test_a_namespace_of_1000_entries_comes_back_narrowed_after_nsmgr_restarts(redoxcap_client):
    """A namespace with more entries than one message carries fds (253), and names longer
    than one frame holds, is kept in several frames; narrowing and unregistering, once
    acknowledged, survive the restart. So does a fork of it: a new handle whose state is
    too large to come with its NEW_HANDLE reply comes in KEEP frames before it."""
    (redoxcap_client.root / "box").mkdir()
    (redoxcap_client.root / "box/in.txt").write_text("inside")
    fork = rt.mkns([], perms=rt.PERM_ALL)
    box = rt.open("/box", rt.O_DIRECTORY)
    names = [f"e{i:04d}-" + "x" * 140 for i in range(1000)]  # 146 KiB of names: > a frame
    for name in names:
        rt.register(fork, name, box)
    rt.close(box)
    rt.unregister(fork, names[5])
    copy = rt.mkns(None, fork, perms=rt.PERM_LIST)
    rt.narrow(fork, rt.PERM_LIST)
    pid = kill(redoxcap_client, "nsmgr")
    wait_for(lambda: redoxcap_client.daemon("nsmgr").get("pid") not in (None, pid), timeout=30)

    def listing(ns: int) -> list[str]:  # in pages: the names no longer fit in one reply
        listed: list[str] = []
        while page := call(ns, P.GETDENTS, [len(listed)])[0]:
            listed += page
        return listed

    try:
        listed = listing(fork)
    except OSError as exc:  # the one request in flight at the kill
        assert exc.errno == errno.EIO
        listed = listing(fork)
    assert listed == sorted(set(names) - {names[5]})
    assert listing(copy) == listed
    rt.close(copy)
    assert rt.nsperms(fork) == rt.PERM_LIST
    with pytest.raises(PermissionError):
        rt.unregister(fork, names[6])  # no DELETE: narrowed for good
    fd = call_fd(fork, P.OPENAT, [f"/scheme/{names[999]}/in.txt", os.O_RDONLY, 0])
    assert rt.read(fd, 100) == b"inside"
    rt.close(fd)
    rt.close(fork)


def test_nsmgr_killed_while_the_router_has_no_fds_comes_back_when_it_has(redoxcap_system):
    """A restart that fails (the router cannot make the new daemon a channel) is tried
    again with backoff; nsmgr is not FAILED for it, and comes back once fds are free."""
    router = redoxcap_system.daemon("kernel")["pid"]
    hard = resource.prlimit(router, resource.RLIMIT_NOFILE)[1]
    # Linux hands out the lowest free fd number below the limit: with 3, none is left
    resource.prlimit(router, resource.RLIMIT_NOFILE, (3, hard))
    try:
        old = kill(redoxcap_system, "nsmgr")
        wait_for(lambda: "could not restart nsmgr" in redoxcap_system.log(), timeout=30)
        time.sleep(1)  # a few tries more
        assert redoxcap_system.daemon("nsmgr")["state"] == "restarting"  # not FAILED
    finally:
        resource.prlimit(router, resource.RLIMIT_NOFILE, (hard, hard))
    wait_for(lambda: redoxcap_system.daemon("nsmgr").get("pid") not in (None, old), timeout=30)
    assert redoxcap_system.daemon("nsmgr")["state"] == "running"
    assert redoxcap_system.python("import rt; print(rt.listdir('/'))").returncode == 0


def test_a_runs_namespace_asked_while_the_router_has_no_fds_fails_with_its_errno(redoxcap_system):
    """The supervisor asks for the clone and the /tmp scheme at once: either one failing is
    the request's error as Linux said it (not a dropped connection), and nothing is kept."""
    router = redoxcap_system.daemon("kernel")["pid"]
    hard = resource.prlimit(router, resource.RLIMIT_NOFILE)[1]
    before = router_fds(router)
    resource.prlimit(router, resource.RLIMIT_NOFILE, (3, hard))  # no fd left to mint one
    try:
        with pytest.raises(control.ControlError) as info:
            control.request(redoxcap_system.state_dir, "namespace", account=True, scheme=True)
        assert os.strerror(errno.EMFILE) in str(info.value)
    finally:
        resource.prlimit(router, resource.RLIMIT_NOFILE, (hard, hard))
    _, fds = control.request(redoxcap_system.state_dir, "namespace", account=True, scheme=True)
    assert len(fds) == 3  # the namespace, the scheme's root and its channel: serving on
    P.close_fds(fds)
    wait_for(lambda: router_fds(router) <= before, timeout=30)  # nothing of the failed one held


WRITER = r"""
import errno, os, sys, threading, rt
me = sys.argv[1]
mine = {k: rt.open(f"{me}-{k}", rt.O_CREAT | rt.O_WRONLY | rt.O_APPEND) for k in range(8)}
acknowledged = []
stop = threading.Event()
threading.Thread(target=lambda: (sys.stdin.read(), stop.set()), daemon=True).start()
print("ready", flush=True)
seq = 0
while not stop.is_set():
    seq += 1
    for k, fd in mine.items():
        line = f"{me} {k} {seq}\n"
        try:
            rt.write(fd, line.encode())
            acknowledged.append(line)
        except OSError as exc:
            if exc.errno not in (errno.EIO, errno.EMFILE):
                raise
    try:  # new handles too, numbered by whichever daemon runs now
        fd = rt.open(f"{me}-new", rt.O_CREAT | rt.O_WRONLY | rt.O_APPEND)
        try:
            line = f"{me} new {seq}\n"
            rt.write(fd, line.encode())
            acknowledged.append(line)
        finally:
            rt.close(fd)
    except OSError as exc:
        if exc.errno not in (errno.EIO, errno.EMFILE):
            raise
sys.stdout.write("".join(acknowledged))
"""


def test_acknowledged_writes_land_in_their_own_files_across_restarts_under_pressure(redoxcap_system):
    """Writers append to files of their own while 8 hoarders hold all the file handles
    their quotas allow (what once filled the router, so that restores failed and new
    handles took old numbers) and the file daemon and nsmgr are killed at random
    moments. Every acknowledged line is found in its own file, and no line in anyone
    else's."""
    (redoxcap_system.root / "load").mkdir()
    (redoxcap_system.root / "load/f").write_text("x")
    hoarder = ("import errno, sys, rt\n"
               "held = []\n"
               "try:\n"
               "    while True: held.append(rt.open('f'))\n"
               "except OSError as exc:\n"
               "    assert exc.errno == errno.EMFILE\n"
               "print('ready', flush=True)\n"
               "sys.stdin.read()\n")
    hoarders = [redoxcap_system.start("run", "--ns", "", "--cwd", "/load", "--beneath", "--",
                             sys.executable, "-c", hoarder) for _ in range(8)]
    for proc in hoarders:
        assert proc.stdout.readline() == "ready\n", proc.stderr.read()
    writers = [redoxcap_system.start("run", "--ns", "", "--cwd", "/load", "--beneath", "--",
                            sys.executable, "-c", WRITER, f"w{i}") for i in range(4)]
    for proc in writers:
        assert proc.stdout.readline() == "ready\n", proc.stderr.read()
    rng = random.Random(18)
    try:
        for name in ("file", "nsmgr", "file", "file"):
            time.sleep(rng.uniform(0.2, 1.0))
            old = kill(redoxcap_system, name)
            wait_for(lambda name=name, old=old: redoxcap_system.daemon(name).get("pid") not in (None, old),
                     timeout=30)
        time.sleep(0.5)
        outputs = [proc.communicate("", timeout=120)[0] for proc in writers]
        assert all(proc.returncode == 0 for proc in writers), [p.stderr.read() for p in writers]
    finally:
        for proc in hoarders:
            proc.communicate("", timeout=60)
    files = {path.name: path.read_text() for path in (redoxcap_system.root / "load").iterdir()
             if path.name != "f"}
    lines_of = {name: text.splitlines(keepends=True) for name, text in files.items()}
    total = 0
    for out in outputs:
        for line in out.splitlines(keepends=True):
            writer, k, _ = line.split()
            assert line in lines_of[f"{writer}-{k}"], f"acknowledged {line!r} is not in its file"
            total += 1
    for name, lines in lines_of.items():  # and nothing of anyone else's
        writer, k = name.split("-")
        assert all(line.split()[:2] == [writer, k] for line in lines), name
    assert total > 4 * 9 * 20, total  # they kept writing across the restarts
    assert "could not be restored" not in redoxcap_system.log()  # the reserve was there for it


def test_a_restart_asked_for_while_the_router_has_no_fds_is_tried_again_until_it_works(redoxcap_system):
    """`redoxcap restart NAME` that fails for lack of fds says so, and the supervisor
    goes on trying: the scheme is not left FAILED, and is back once fds are free."""
    router = redoxcap_system.daemon("kernel")["pid"]
    old = redoxcap_system.daemon("zero")["pid"]
    hard = resource.prlimit(router, resource.RLIMIT_NOFILE)[1]
    resource.prlimit(router, resource.RLIMIT_NOFILE, (3, hard))
    try:
        refused = redoxcap_system.cli("restart", "zero", check=False)
        assert refused.returncode != 0 and "Too many open files" in refused.stderr, refused.stderr
        assert redoxcap_system.daemon("zero")["state"] != "failed"
    finally:
        resource.prlimit(router, resource.RLIMIT_NOFILE, (hard, hard))
    wait_for(lambda: redoxcap_system.daemon("zero").get("pid") not in (None, old), timeout=30)
    assert redoxcap_system.daemon("zero")["state"] == "running"
    out = redoxcap_system.python("import rt; fd = rt.open('/scheme/zero'); print(rt.read(fd, 2))").stdout
    assert out == "b'\\x00\\x00'\n"


def test_concurrent_changes_of_one_namespace_are_all_kept(redoxcap_client):
    """Threads registering names in one namespace at once: each change's state is taken
    and handed to the router in order (and in several frames, past 253 entries), so after
    nsmgr restarts every acknowledged name is there."""
    (redoxcap_client.root / "box").mkdir()
    fork = rt.mkns([], perms=rt.PERM_ALL)
    box = rt.open("/box", rt.O_DIRECTORY)
    acknowledged: list[str] = []

    def register_many(k: int) -> None:
        # capabilities of its own: nsmgr asks the directory passed to it about itself, and
        # one socket must not have two askers at once
        ns, mine = rt.clone(fork), rt.clone(box)
        try:
            for i in range(40):
                rt.register(ns, f"t{k}-{i}", mine)
                acknowledged.append(f"t{k}-{i}")
        finally:
            rt.close(ns)
            rt.close(mine)

    threads = [threading.Thread(target=register_many, args=(k,)) for k in range(8)]
    for t in threads:
        t.start()
    for t in threads:
        t.join(timeout=120)
    rt.close(box)
    assert len(acknowledged) == 320
    pid = kill(redoxcap_client, "nsmgr")
    wait_for(lambda: redoxcap_client.daemon("nsmgr").get("pid") not in (None, pid), timeout=30)
    try:
        listed = rt.schemes(fork)
    except OSError as exc:  # the one request in flight at the kill
        assert exc.errno == errno.EIO
        listed = rt.schemes(fork)
    assert listed == sorted(acknowledged)
    rt.close(fork)
