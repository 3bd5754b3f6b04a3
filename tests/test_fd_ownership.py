"""Every fd a daemon receives has an owner on every path (issue 8 item 4).

Fds ride on requests and on replies. A daemon that drops one without closing
it leaks it for good, and a client can repeat that until the daemon is out of
fds. Each test here attaches the read end of a pipe to requests or replies and
waits until writing to the other end says every copy of it is closed, and
compares each daemon's fd count before and after.
"""

from __future__ import annotations

import errno
import os

import pytest

import rt
from redoxcap.testing import wait_for
from redoxcap.wire import protocol as P
from redoxcap.wire.call import call
from rt import _process


def daemon_fds(system) -> dict[str, int]:
    """Each daemon's open fds, after this process's rt let go of the namespace roots it
    keeps (its own capabilities, whose other ends the router holds)."""
    _process.CURRENT.roots.clear()
    return {d["name"]: len(os.listdir(f"/proc/{d['pid']}/fd"))
            for d in system.status()["daemons"] if d.get("pid")}


def closed_everywhere(w: int) -> bool:
    """Whether every copy of the pipe's read end is closed (a write then fails)."""
    try:
        os.write(w, b"x")
        return False
    except BrokenPipeError:
        return True


def settled(system, before: dict[str, int]):
    """The daemons' fd counts are back where they were."""
    try:
        wait_for(lambda: daemon_fds(system) == before, timeout=20)
    except AssertionError:
        raise AssertionError(f"fds before {before}, after {daemon_fds(system)}") from None


# For each capability kind, every operation with arguments of the right types.
ARGS = {
    P.OPENAT: ["x", os.O_RDONLY, 0], P.READ: [10], P.WRITE: [b"x"], P.LSEEK: [0, 0],
    P.FSTAT: [], P.FTRUNCATE: [0], P.FSYNC: [], P.GETDENTS: [0], P.FPATH: [],
    P.MKDIRAT: ["d", 0o755], P.UNLINKAT: ["d", 0], P.RENAMEAT: ["a", "b"],
    P.SYMLINKAT: ["t", "l"], P.READLINKAT: ["l"], P.DUP: [b""], P.LINKAT: ["a", "b"],
    P.SHUTDOWN: [1], P.RECVFROM: [10], P.SENDTO: [b"x", "127.0.0.1", 9],
    P.NS_LIST: [], P.NS_MKNS: [None, None, None], P.NS_NARROW: [P.PERM_ALL], P.NS_REGISTER: ["x"],
    P.NS_UNREGISTER: ["nosuch"], P.NS_PERMS: [], P.NS_SCHEME_CREATE: ["bad/name"],
    P.CLONE: [], P.GETFL: [],
}
# RECVFD waits for a peer that never sends; SENDFD on a connection hands the fd on (by design).
SKIP = {P.RECVFD, P.SENDFD}


def _kinds(root) -> dict[str, int]:
    (root / "f").write_text("data")
    return {
        "namespace": rt.mkns(None),
        "directory": rt.open("/", rt.O_DIRECTORY),
        "file": rt.open("/f", rt.O_RDWR),
        "zero": rt.open("/scheme/zero"),
        **dict(zip(("pipe read end", "pipe write end"), rt.pipe())),
        "uds scope": rt.uds_scope(),
        "tcp listener": rt.open("/scheme/tcp/127.0.0.1/0", rt.O_CREAT | rt.O_RDWR),
        "log": rt.open("/scheme/log/fds", rt.O_WRONLY),
    }


def test_fds_attached_to_any_request_are_closed_by_every_daemon(redoxcap_module_client):
    system = redoxcap_module_client
    before = daemon_fds(system)
    kinds = _kinds(system.root)
    waiting = []  # requests that wait for a peer (a read, an accept): their fds go at close
    try:
        for fd in kinds.values():
            for op, args in ARGS.items():
                if op in SKIP:
                    continue
                r, w = os.pipe()
                try:
                    with rt.timeout(2):
                        _, received = call(fd, op, args, [r, r, r])
                    P.close_fds(received)
                except OSError as exc:
                    if exc.errno == errno.ETIMEDOUT:
                        waiting.append(w)
                        continue
                finally:
                    os.close(r)
                wait_for(lambda w=w: closed_everywhere(w), timeout=20)
                os.close(w)
    finally:
        for fd in kinds.values():
            rt.close(fd)
    wait_for(lambda: all(closed_everywhere(w) for w in waiting), timeout=20)
    for w in waiting:
        os.close(w)
    settled(system, before)


def test_fds_attached_to_replies_nsmgr_forwards_are_closed(redoxcap_module_client, hostile_scheme):
    """A client's own scheme attaches 253 fds to every reply; nsmgr forwards mkdir,
    unlink, symlink, readlink, rename and link to it and must close what comes back."""
    system = redoxcap_module_client
    pipes = []

    def answer(op, args):
        r, w = os.pipe()
        pipes.append(w)
        fds = [os.dup(r) for _ in range(P.MAX_FDS - 1)] + [r]
        return P.OK, P.pack("target" if op == P.READLINKAT else None), fds

    hostile_scheme("leaky", answer)
    before = daemon_fds(system)
    for _ in range(20):
        for fn, args in ((rt.mkdir, ("/scheme/leaky/d",)), (rt.unlink, ("/scheme/leaky/f",)),
                         (rt.rmdir, ("/scheme/leaky/d",)), (rt.symlink, ("t", "/scheme/leaky/l")),
                         (rt.readlink, ("/scheme/leaky/l",)), (rt.rename, ("/scheme/leaky/a", "/scheme/leaky/b")),
                         (rt.link, ("/scheme/leaky/a", "/scheme/leaky/b"))):
            try:
                fn(*args)
            except OSError:
                pass
        with pytest.raises(OSError):  # 254 fds where one capability was promised
            rt.open("/scheme/leaky/x")
    wait_for(lambda: all(closed_everywhere(w) for w in pipes), timeout=30)
    for w in pipes:
        os.close(w)
    settled(system, before)
