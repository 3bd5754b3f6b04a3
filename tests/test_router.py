"""The kernel router alone: a real `python -m kernel`, with this test playing the scheme.

Every frame here is raw, so each step of the protocol is visible: what the
router forwards, what it does with good and bad replies, and how it treats a
scheme that dies.
"""

from __future__ import annotations

import errno
import os
import socket
import subprocess
import sys

import pytest

from rt import protocol as P
from rt._call import call, call_fd


class FakeScheme:
    """The daemon's end of a scheme channel, driven by hand."""

    def __init__(self, fd: int) -> None:
        self.sock = socket.socket(fileno=fd)
        self.sock.settimeout(10)

    def receive(self) -> tuple[int, int, int, int, list, list[int]]:
        data, anc, _, _ = self.sock.recvmsg(P.MAX_FRAME, P.CMSG_FDS)
        fds, _ = P.parse_ancillary(anc)
        req_id, handle, pid, _uid, _gid, op, nrefs = P.SREQUEST.unpack_from(data)
        refs = [P.REF.unpack_from(data, P.SREQUEST.size + 8 * i)[0] for i in range(nrefs)]
        args = P.unpack(data[P.SREQUEST.size + 8 * nrefs :])
        return req_id, handle, pid, op, [args, refs], fds

    def reply(self, req_id: int, status: int, raw: bytes, fds=()) -> None:
        self.sock.sendmsg([P.SREPLY.pack(req_id, status) + raw], P.fds_ancillary(list(fds)))


@pytest.fixture
def kernel():
    ours, theirs = socket.socketpair(socket.AF_UNIX, socket.SOCK_SEQPACKET)
    proc = subprocess.Popen([sys.executable, "-m", "kernel", "--kernel-fd", str(theirs.fileno())],
                            pass_fds=[theirs.fileno()], stderr=subprocess.PIPE, text=True)
    theirs.close()
    try:
        yield ours.fileno()
    finally:
        ours.close()  # the router exits when its last kernel capability closes
        proc.wait(timeout=10)
        stderr = proc.stderr.read()
        proc.stderr.close()
        assert proc.returncode == 0, stderr


def create_scheme(kernel: int) -> tuple[int, FakeScheme, int]:
    scheme_id, (channel, root) = call(kernel, P.SCHEME_CREATE)
    return scheme_id, FakeScheme(channel), root


def send(fd: int, frame: bytes, fds=()) -> None:
    with socket.socket(fileno=os.dup(fd)) as s:
        s.sendmsg([frame], P.fds_ancillary(list(fds)))


def receive(fd: int) -> tuple[tuple, list[int]]:
    with socket.socket(fileno=os.dup(fd)) as s:
        s.settimeout(10)
        data, anc, _, _ = s.recvmsg(P.MAX_FRAME, P.CMSG_FDS)
    return P.decode_reply(data), P.parse_ancillary(anc)[0]


def test_a_request_reaches_the_scheme_with_handle_and_verified_pid(kernel):
    _, scheme, root = create_scheme(kernel)
    send(root, P.encode_request(P.READ, 42, [10]))
    req_id, handle, pid, op, (args, refs), _ = scheme.receive()
    assert (handle, pid, op, args, refs) == (P.ROOT_HANDLE, os.getpid(), P.READ, [10], [])
    scheme.reply(req_id, P.OK, P.pack(b"0123456789"))
    assert receive(root) == ((42, P.OK, b"0123456789"), [])


def test_a_new_handle_becomes_a_capability_and_its_last_close_reaches_the_scheme(kernel):
    _, scheme, root = create_scheme(kernel)
    send(root, P.encode_request(P.OPENAT, 1, ["x", 0, 0]))
    req_id, *_ = scheme.receive()
    scheme.reply(req_id, P.NEW_HANDLE, P.NEW_HANDLE_HDR.pack(7, os.O_RDWR) + P.pack(None))
    (tag, status, _), (cap,) = receive(root)
    assert (tag, status) == (1, P.OK)
    assert call(cap, P.GETFL)[0] == os.O_RDWR  # answered by the router itself
    clone = call_fd(cap, P.CLONE)
    os.close(cap)
    send(clone, P.encode_request(P.READ, 2, [1]))
    req_id, handle, *_ = scheme.receive()
    assert handle == 7  # the clone names the same handle
    scheme.reply(req_id, P.OK, P.pack(b"x"))
    receive(clone)
    os.close(clone)
    _, handle, _, op, _, _ = scheme.receive()
    assert (handle, op) == (7, P.CLOSE)


def test_a_passed_capability_of_the_same_scheme_is_named_by_its_handle(kernel):
    _, scheme, root = create_scheme(kernel)
    _, other, other_root = create_scheme(kernel)  # alive while this test runs
    send(root, P.encode_request(P.RENAMEAT, 3, ["a", "b"]), [root, other_root])
    req_id, _, _, op, (args, refs), fds = scheme.receive()
    assert (op, args) == (P.RENAMEAT, ["a", "b"])
    assert refs == [P.ROOT_HANDLE, P.NO_REF] and len(fds) == 2
    assert other.sock.fileno() >= 0
    for fd in fds:
        os.close(fd)
    scheme.reply(req_id, P.OK, P.pack(None))
    receive(root)


def test_malformed_replies_from_a_scheme_fail_the_request_not_the_router(kernel):
    _, scheme, root = create_scheme(kernel)
    send(root, P.encode_request(P.OPENAT, 5, ["x", 0, 0]))
    req_id, *_ = scheme.receive()
    scheme.reply(req_id, P.NEW_HANDLE, b"\x01")  # no room for a handle number
    assert receive(root) == ((5, P.ERR, errno.EIO), [])
    scheme.reply(999, P.OK, P.pack("nobody asked"))  # dropped
    scheme.sock.send(b"\x00")  # shorter than a header: dropped
    send(root, P.encode_request(P.READ, 6, [1]))
    req_id, *_ = scheme.receive()
    scheme.reply(req_id, P.OK, P.pack(b"still here"))
    assert receive(root) == ((6, P.OK, b"still here"), [])


def test_when_a_scheme_dies_requests_fail_and_a_restart_keeps_the_root(kernel):
    scheme_id, scheme, root = create_scheme(kernel)
    send(root, P.encode_request(P.OPENAT, 1, ["x", 0, 0]))
    req_id, *_ = scheme.receive()
    scheme.reply(req_id, P.NEW_HANDLE, P.NEW_HANDLE_HDR.pack(3, 0) + P.pack(None))
    _, (cap,) = receive(root)
    with pytest.raises(OSError) as info:
        call(kernel, P.SCHEME_RESTART, [scheme_id])
    assert info.value.errno == errno.EBUSY  # it is alive
    send(cap, P.encode_request(P.READ, 9, [1]))
    scheme.receive()
    scheme.sock.close()  # the daemon dies with a request pending
    assert receive(cap) == ((9, P.ERR, errno.EIO), [])
    _, (channel,) = call(kernel, P.SCHEME_RESTART, [scheme_id])
    reborn = FakeScheme(channel)
    with pytest.raises(OSError) as info:
        call(cap, P.READ, [1])  # a handle of the dead daemon
    assert info.value.errno == errno.EIO
    send(root, P.encode_request(P.READ, 10, [1]))  # the root survives
    req_id, handle, *_ = reborn.receive()
    assert handle == P.ROOT_HANDLE
    reborn.reply(req_id, P.OK, P.pack(b"r"))
    assert receive(root) == ((10, P.OK, b"r"), [])
    os.close(cap)


def test_kernel_operations_need_the_kernel_capability(kernel):
    _, _, root = create_scheme(kernel)
    for op in (P.SCHEME_CREATE, P.KERNEL_STATUS):
        with pytest.raises(OSError) as info:
            call(root, op)
        assert info.value.errno == errno.EINVAL
    with pytest.raises(OSError) as info:
        call(kernel, P.READ, [1])  # the kernel capability is not a scheme's
    assert info.value.errno == errno.EBADF
    status = call(kernel, P.KERNEL_STATUS)[0]
    assert list(status["schemes"]) == ["1"]


def test_a_file_with_a_capabilitys_inode_number_cannot_pose_as_it(tmp_path):
    """Capabilities are recognised by (device, inode): a file elsewhere that happens to
    share a socket's inode number must not be taken for it (that would forge a handle)."""
    from types import SimpleNamespace

    from kernel.router import Router, Scheme, SchemeHandle

    a, b = socket.socketpair(socket.AF_UNIX, socket.SOCK_SEQPACKET)
    impostor = tmp_path / "impostor"
    impostor.write_text("")
    fd = os.open(impostor, os.O_RDONLY)
    try:
        scheme = Scheme(1, alive=True, generation=1)
        cap = SimpleNamespace(handle=SchemeHandle(scheme, 42, 1))
        sock_dev = os.fstat(b.fileno()).st_dev
        router = SimpleNamespace(_by_identity={
            (sock_dev, os.fstat(fd).st_ino): cap,  # same inode number as the file, sockfs device
            (sock_dev, os.fstat(b.fileno()).st_ino): cap,
        })
        refs = Router._identify(router, scheme, [fd, b.fileno()])
        assert [P.REF.unpack(r)[0] for r in refs] == [P.NO_REF, 42]
    finally:
        os.close(fd)
        a.close()
        b.close()
