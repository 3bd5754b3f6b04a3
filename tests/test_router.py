"""The kernel router alone: a real `python -m redoxcap.kernel`, with this test playing the scheme.

Every frame here is raw, so each step of the protocol is visible: what the
router forwards, what it does with good and bad replies, and how it treats a
scheme that dies.
"""

from __future__ import annotations

import contextlib
import errno
import os
import queue
import socket
import subprocess
import sys
import threading
import time

import pytest

from redoxcap.kernel import accounts
from redoxcap.wire import protocol as P
from redoxcap.wire.call import call, call_fd
from redoxcap.wire.frames import SREPLY, SchemeReply, SchemeRequest, decode_reply, encode_request
from redoxcap.wire.linux import identity

CUSTOM_OP = 100  # an operation number no table lists (below SERVING, 0x80): a scheme's own


class FakeScheme:
    """The daemon's end of a scheme channel, driven by hand.

    A thread reads the channel: it answers the router's status queries (KERNEL_STATUS
    asks every scheme) and queues every other frame for receive().
    """

    def __init__(self, fd: int) -> None:
        self.sock = socket.socket(fileno=fd)
        self._frames: queue.Queue = queue.Queue()
        self.restored: queue.Queue = queue.Queue()
        self._reader = threading.Thread(target=self._read, daemon=True)
        self._reader.start()

    def _read(self) -> None:
        while True:
            try:
                data, anc, _, _ = self.sock.recvmsg(P.MAX_FRAME, P.CMSG_FDS)
            except OSError:
                data, anc = b"", []
            fds, _ = P.parse_ancillary(anc)
            if not data:
                self._frames.put(None)
                return
            request = SchemeRequest.decode(data)
            if request.op == P.SCHEME_STATUS:
                self.answer(SchemeReply.of(request.req_id, P.OK, {"handles": 0, "requests": 0}))
                continue
            if request.op in (P.RESTORE, P.RESUME):  # what a restarted daemon is handed first
                self.restored.put((request.op, request.handle, request.args(), fds))
                continue
            self._frames.put((request.req_id, request.handle, request.pid, request.op,
                              [request.args(), list(request.refs)], fds))

    def receive(self) -> tuple[int, int, int, int, list, list[int]]:
        """The next request the router forwarded (fails after a generous timeout)."""
        frame = self._frames.get(timeout=10)
        if frame is None:
            raise EOFError("the scheme channel was shut down")
        return frame

    def answer(self, reply: SchemeReply, fds=()) -> None:
        self.send_raw(reply.encode(), fds)

    def send_raw(self, frame: bytes, fds=()) -> None:
        """A frame as it is, however malformed."""
        self.sock.sendmsg([frame], P.fds_ancillary(list(fds)))

    def die(self) -> None:
        """The daemon exits: the router sees EOF on the channel."""
        self.sock.shutdown(socket.SHUT_RDWR)
        self._reader.join()
        self.sock.close()


@pytest.fixture
def kernel():
    ours, theirs = socket.socketpair(socket.AF_UNIX, socket.SOCK_SEQPACKET)
    proc = subprocess.Popen([sys.executable, "-m", "redoxcap.kernel", "--kernel-fd", str(theirs.fileno())],
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
    return decode_reply(data), P.parse_ancillary(anc)[0]


def test_a_request_reaches_the_scheme_with_handle_and_verified_pid(kernel):
    _, scheme, root = create_scheme(kernel)
    send(root, encode_request(P.READ, 42, [10]))
    req_id, handle, pid, op, (args, refs), _ = scheme.receive()
    assert (handle, pid, op, args, refs) == (P.ROOT_HANDLE, os.getpid(), P.READ, [10], [])
    scheme.answer(SchemeReply.of(req_id, P.OK, b"0123456789"))
    assert receive(root) == ((42, P.OK, b"0123456789"), [])


def test_a_new_handle_becomes_a_capability_and_its_last_close_reaches_the_scheme(kernel):
    _, scheme, root = create_scheme(kernel)
    send(root, encode_request(P.OPENAT, 1, ["x", 0, 0]))
    req_id, *_ = scheme.receive()
    scheme.answer(SchemeReply.new_handle(req_id, 7, os.O_RDWR))
    (tag, status, _), (cap,) = receive(root)
    assert (tag, status) == (1, P.OK)
    assert call(cap, P.GETFL)[0] == os.O_RDWR  # answered by the router itself
    clone = call_fd(cap, P.CLONE)
    os.close(cap)
    send(clone, encode_request(P.READ, 2, [1]))
    req_id, handle, *_ = scheme.receive()
    assert handle == 7  # the clone names the same handle
    scheme.answer(SchemeReply.of(req_id, P.OK, b"x"))
    receive(clone)
    os.close(clone)
    _, handle, _, op, _, _ = scheme.receive()
    assert (handle, op) == (7, P.CLOSE)


def test_a_passed_capability_of_the_same_scheme_is_named_by_its_handle(kernel):
    """...and one of another scheme is marked as a capability, anything else as none
    (nsmgr registers only capabilities: it never talks to a client's own socket)."""
    _, scheme, root = create_scheme(kernel)
    _, other, other_root = create_scheme(kernel)  # alive while this test runs
    mine, _theirs = socket.socketpair(socket.AF_UNIX, socket.SOCK_SEQPACKET)
    # an operation of the scheme's own (no table lists it) may carry any fds
    send(root, encode_request(CUSTOM_OP, 3, ["a", "b"]), [root, other_root, mine.fileno()])
    mine.close()
    _theirs.close()
    req_id, _, _, op, (args, refs), fds = scheme.receive()
    assert (op, args) == (CUSTOM_OP, ["a", "b"])
    assert refs == [P.ROOT_HANDLE, P.FOREIGN_REF, P.NO_REF] and len(fds) == 3
    assert other.sock.fileno() >= 0
    for fd in fds:
        os.close(fd)
    scheme.answer(SchemeReply.of(req_id, P.OK, None))
    receive(root)


def test_fds_an_operation_does_not_take_are_refused_and_closed(kernel):
    """A READ takes no fd, a RENAMEAT one: more are EINVAL, never relayed (a daemon would
    hold them for as long as the request waits), and every one of them is closed."""
    _, scheme, root = create_scheme(kernel)
    for op, args, count in ((P.READ, [1], 1), (P.RENAMEAT, ["a", "b"], 2), (P.SENDFD, [], 2)):
        mine, theirs = socket.socketpair(socket.AF_UNIX, socket.SOCK_SEQPACKET)
        send(root, encode_request(op, 7, args), [mine.fileno()] * count)
        mine.close()
        assert receive(root) == ((7, P.ERR, errno.EINVAL), [])
        assert theirs.recv(1) == b""  # the router kept no copy of it: EOF
        theirs.close()
    send(root, encode_request(P.RENAMEAT, 8, ["a", "b"]), [root])  # the one it takes
    req_id, _, _, op, (args, refs), fds = scheme.receive()
    assert (op, refs, len(fds)) == (P.RENAMEAT, [P.ROOT_HANDLE], 1)
    os.close(fds[0])
    scheme.answer(SchemeReply.of(req_id, P.OK, None))
    assert receive(root) == ((8, P.OK, None), [])


def test_malformed_replies_from_a_scheme_fail_the_request_not_the_router(kernel):
    _, scheme, root = create_scheme(kernel)
    send(root, encode_request(P.OPENAT, 5, ["x", 0, 0]))
    req_id, *_ = scheme.receive()
    scheme.send_raw(SREPLY.pack(req_id, P.NEW_HANDLE) + b"\x01")  # no room for a handle number
    assert receive(root) == ((5, P.ERR, errno.EIO), [])
    scheme.answer(SchemeReply.of(999, P.OK, "nobody asked"))  # dropped
    scheme.sock.send(b"\x00")  # shorter than a header: dropped
    send(root, encode_request(P.READ, 6, [1]))
    req_id, *_ = scheme.receive()
    scheme.answer(SchemeReply.of(req_id, P.OK, b"still here"))
    assert receive(root) == ((6, P.OK, b"still here"), [])


def test_when_a_scheme_dies_requests_fail_and_a_restart_keeps_the_root(kernel):
    scheme_id, scheme, root = create_scheme(kernel)
    send(root, encode_request(P.OPENAT, 1, ["x", 0, 0]))
    req_id, *_ = scheme.receive()
    scheme.answer(SchemeReply.new_handle(req_id, 3, 0))
    _, (cap,) = receive(root)
    with pytest.raises(OSError) as info:
        call(kernel, P.SCHEME_RESTART, [scheme_id])
    assert info.value.errno == errno.EBUSY  # it is alive
    send(cap, encode_request(P.READ, 9, [1]))
    scheme.receive()
    scheme.die()  # the daemon dies with a request pending
    assert receive(cap) == ((9, P.ERR, errno.EIO), [])
    _, (channel,) = call(kernel, P.SCHEME_RESTART, [scheme_id])
    reborn = FakeScheme(channel)
    with pytest.raises(OSError) as info:
        call(cap, P.READ, [1])  # a handle of the dead daemon
    assert info.value.errno == errno.EIO
    send(root, encode_request(P.READ, 10, [1]))  # the root survives
    req_id, handle, *_ = reborn.receive()
    assert handle == P.ROOT_HANDLE
    reborn.answer(SchemeReply.of(req_id, P.OK, b"r"))
    assert receive(root) == ((10, P.OK, b"r"), [])
    os.close(cap)


async def test_a_status_question_that_could_not_be_sent_waits_for_no_answer():
    """KERNEL_STATUS asks each scheme that is alive, in a task of its own; when that task
    runs after the daemon died (its channel gone, its next daemon not yet there), the
    question is never sent, and nothing may wait STATUS_TIMEOUT (3 s) for its answer:
    `redoxcap status` during a restart did, and so did every test that waits for one."""
    import trio

    from redoxcap.kernel import status
    from redoxcap.kernel.schemes import Scheme

    scheme = Scheme(4, alive=True, generation=3)
    sent: list[bytes] = []

    async def send(to: Scheme, frame: bytes, fds: list[int]) -> bool:
        sent.append(frame)
        return to.channel is not None  # no channel (its daemon is gone): not sent

    into: dict = {}
    with trio.fail_after(status.STATUS_TIMEOUT / 3):
        await status.ask(scheme, into, 55, send)
    assert sent and into == {}
    assert scheme.pending == {}  # nothing left waiting for an answer


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

    from redoxcap.kernel.capabilities import CapabilityTable, SchemeHandle
    from redoxcap.kernel.schemes import Scheme

    a, b = socket.socketpair(socket.AF_UNIX, socket.SOCK_SEQPACKET)
    impostor = tmp_path / "impostor"
    impostor.write_text("")
    fd = os.open(impostor, os.O_RDONLY)
    try:
        scheme = Scheme(1, alive=True, generation=1)
        cap = SimpleNamespace(handle=SchemeHandle(scheme, 42, 1))
        sock_dev = os.fstat(b.fileno()).st_dev
        table = CapabilityTable()
        for held in (sock_dev << 64 | os.fstat(fd).st_ino,  # the file's inode number, sockfs device
                     identity(os.fstat(b.fileno()))):
            table.add(SimpleNamespace(identity=held, handle=cap.handle))
        refs = table.refs_for(scheme, [fd, b.fileno()])
        assert refs == (P.NO_REF, 42)
    finally:
        os.close(fd)
        a.close()
        b.close()


# -- backpressure, accounts and running out of fds ---------------------------------


def status(kernel: int) -> dict:
    return call(kernel, P.KERNEL_STATUS)[0]


def account_caps(kernel: int, account: int) -> int:
    return status(kernel)["accounts"].get(str(account), {}).get("caps", 0)


def wait_until(predicate, timeout: float = 10.0) -> None:
    """Ask the router again until predicate holds (it acts on EOFs asynchronously)."""
    deadline = time.monotonic() + timeout
    while not predicate():
        assert time.monotonic() < deadline, "the router did not get there in time"
        time.sleep(0.01)


def answer_everything(scheme: FakeScheme) -> threading.Thread:
    """Answer every READ [n] with n bytes from a thread, until the channel is shut down."""
    def serve() -> None:
        while True:
            try:
                req_id, _, _, op, (args, _), fds = scheme.receive()
            except EOFError:
                return
            P.close_fds(fds)
            if op != P.CLOSE:
                scheme.answer(SchemeReply.of(req_id, P.OK, b"x" * args[0]))

    thread = threading.Thread(target=serve, daemon=True)
    thread.start()
    return thread


def test_a_client_that_never_reads_its_replies_does_not_delay_another(kernel):
    _, scheme, root = create_scheme(kernel)
    account, (flooder,) = new_account(kernel, [root])
    victim = call_fd(root, P.CLONE)
    server = answer_everything(scheme)
    flood = 2000  # far more than its socket holds once the router stops reading it

    def send_flood() -> None:  # a client that sends and never reads (until told to)
        with socket.socket(fileno=os.dup(flooder)) as s:
            s.settimeout(60)  # blocks while the router does not read it
            for tag in range(flood):
                s.send(encode_request(P.READ, tag, [60_000 if tag < 8 else 1]))

    flooding = threading.Thread(target=send_flood, daemon=True)
    flooding.start()
    # its big replies fill its socket: the router queues the rest and reads no more from it
    wait_until(lambda: status(kernel)["accounts"][str(account)]["queued_bytes"] > 0)
    for tag in range(20):
        send(victim, encode_request(P.READ, tag, [60_000]))
        (got_tag, status_, value), _ = receive(victim)  # within receive's timeout
        assert (got_tag, status_, len(value)) == (tag, P.OK, 60_000)
    assert flooding.is_alive()  # its own sends block: it slows only itself
    assert status(kernel)["accounts"][str(account)]["queued_bytes"] > 0
    for tag in range(flood):  # once it reads, everything arrives, in order
        (got_tag, status_, value), _ = receive(flooder)
        assert (got_tag, status_, len(value)) == (tag, P.OK, 60_000 if tag < 8 else 1)
    flooding.join()
    scheme.die()
    server.join()
    for fd in (flooder, victim):
        os.close(fd)


def test_replies_queued_for_a_slow_reader_keep_their_order(kernel):
    _, scheme, root = create_scheme(kernel)
    forwarded = []
    for tag in range(12):  # all at the scheme before any reply (a queued one stops the reading)
        send(root, encode_request(P.READ, tag, [100_000]))
        forwarded.append(scheme.receive()[0])
    for req_id in forwarded:  # all answered before the client reads any: most of them queue
        scheme.answer(SchemeReply.of(req_id, P.OK, b"y" * 100_000))
    assert [receive(root)[0][0] for _ in range(12)] == list(range(12))


def new_account(kernel: int, caps: list[int], **limits) -> tuple[int, list[int]]:
    return call(kernel, P.ACCOUNT_NEW, [limits or None], caps)


def test_a_capability_has_at_most_its_bound_of_requests_in_flight(kernel):
    _, scheme, root = create_scheme(kernel)
    _, (flooder,) = new_account(kernel, [root])
    bound = accounts.MAX_INFLIGHT_PER_CAP
    for tag in range(bound + 40):
        send(flooder, encode_request(P.READ, tag, [1]))
    waiting = [scheme.receive() for _ in range(bound)]
    assert {req[4][0][0] for req in waiting} == {1}
    send(root, encode_request(P.READ, 999, [2]))  # another capability is still served
    req_id, _, _, _, (args, _), _ = scheme.receive()
    assert args == [2]  # the flooder's next request was not forwarded: it is at its bound
    scheme.answer(SchemeReply.of(req_id, P.OK, b"r"))
    assert receive(root)[0] == (999, P.OK, b"r")
    answered = 0
    while waiting:  # one answer lets exactly one more request through
        req_id, *_ = waiting.pop(0)
        scheme.answer(SchemeReply.of(req_id, P.OK, b"f"))
        answered += 1
        if answered <= 40:
            waiting.append(scheme.receive())
        assert len(waiting) <= bound
    assert sorted(receive(flooder)[0][0] for _ in range(bound + 40)) == list(range(bound + 40))
    os.close(flooder)


def test_an_account_has_at_most_its_bound_of_requests_in_flight(kernel):
    _, scheme, root = create_scheme(kernel)
    _, (a, b) = new_account(kernel, [root, root], max_inflight=5)
    for fd in (a, b):
        for tag in range(4):
            send(fd, encode_request(P.READ, tag, [1]))
    waiting = [scheme.receive() for _ in range(5)]
    send(root, encode_request(P.READ, 9, [2]))
    req_id, _, _, _, (args, _), _ = scheme.receive()
    assert args == [2]  # no sixth request of the account got through
    scheme.answer(SchemeReply.of(req_id, P.OK, None))
    receive(root)
    for req_id, *_ in waiting:
        scheme.answer(SchemeReply.of(req_id, P.OK, None))
    for req_id, *_ in [scheme.receive() for _ in range(3)]:
        scheme.answer(SchemeReply.of(req_id, P.OK, None))
    assert len([receive(a) for _ in range(4)] + [receive(b) for _ in range(4)]) == 8
    os.close(a)
    os.close(b)


def test_a_parked_capability_whose_holder_leaves_is_closed_at_the_scheme(kernel):
    _, scheme, root = create_scheme(kernel)
    send(root, encode_request(P.OPENAT, 1, ["x", 0, 0]))
    req_id, *_ = scheme.receive()
    scheme.answer(SchemeReply.new_handle(req_id, 5, 0))
    _, (opened,) = receive(root)
    account, (cap,) = new_account(kernel, [opened], max_inflight_per_cap=2)
    os.close(opened)
    for tag in range(5):
        send(cap, encode_request(P.READ, tag, [1]))
    waiting = [scheme.receive() for _ in range(2)]
    os.close(cap)  # the router is not reading it (at its bound), yet it notices
    _, handle, _, op, _, _ = scheme.receive()
    assert (handle, op) == (5, P.CLOSE)
    for req_id, *_ in waiting:
        scheme.answer(SchemeReply.of(req_id, P.ERR, errno.EBADF))
    wait_until(lambda: str(account) not in status(kernel)["accounts"])


def test_account_new_clones_into_a_fresh_account_with_a_quota(kernel):
    _, scheme, root = create_scheme(kernel)
    account, (cap,) = new_account(kernel, [root], max_caps=3)
    assert account != 0
    clones = [call_fd(cap, P.CLONE), call_fd(cap, P.CLONE)]  # 3 capabilities: the quota
    assert status(kernel)["accounts"][str(account)] == {
        "caps": 3, "inflight": 0, "queued_bytes": 0, "unread_bytes": 0, "held_fds": 0,
        "max_caps": 3}
    with pytest.raises(OSError) as info:
        call(cap, P.CLONE)
    assert info.value.errno == errno.EMFILE
    call_fd(root, P.CLONE).__index__()  # the system account has no quota
    # a capability a scheme opens for the account counts: it is EMFILE, and the scheme
    # is told to close the handle nobody got
    send(cap, encode_request(P.OPENAT, 7, ["x", 0, 0]))
    req_id, *_ = scheme.receive()
    scheme.answer(SchemeReply.new_handle(req_id, 11, 0))
    assert receive(cap) == ((7, P.ERR, errno.EMFILE), [])
    _, handle, _, op, _, _ = scheme.receive()
    assert (handle, op) == (11, P.CLOSE)
    # so does one relayed in a reply; the fds of a refused reply are closed
    r, w = os.pipe()
    system_cap = call_fd(root, P.CLONE)
    send(cap, encode_request(P.RECVFD, 8, []))
    req_id, *_ = scheme.receive()
    scheme.answer(SchemeReply.of(req_id, P.OK, None), [system_cap, w])
    os.close(w)
    assert receive(cap) == ((8, P.ERR, errno.EMFILE), [])
    assert os.read(r, 1) == b""  # the router closed the write end it was handed
    os.close(r)
    os.close(clones.pop())  # closing one frees quota
    wait_until(lambda: account_caps(kernel, account) == 2)
    send(cap, encode_request(P.RECVFD, 9, []))
    req_id, *_ = scheme.receive()
    scheme.answer(SchemeReply.of(req_id, P.OK, None), [system_cap])
    (_, status_, _), (moved,) = receive(cap)
    assert status_ == P.OK and account_caps(kernel, account) == 3  # it moved to the account
    os.close(system_cap)
    with pytest.raises(OSError) as info:
        call(cap, P.CLONE)
    assert info.value.errno == errno.EMFILE
    for fd in (moved, *clones, cap):
        os.close(fd)
    wait_until(lambda: str(account) not in status(kernel)["accounts"])


def test_fds_riding_on_requests_a_daemon_holds_count_against_the_quota_until_it_answers(kernel):
    """A daemon holds the fds that came with a request until it answers: they are the
    client's to pay for, within its quota, till then (and its daemon's end gives them back)."""
    _, scheme, root = create_scheme(kernel)
    account, (cap,) = new_account(kernel, [root], max_caps=8)
    r, w = os.pipe()
    send(cap, encode_request(CUSTOM_OP, 1, []), [w] * 5)  # 1 capability + 5 fds: fits
    req_id, *_, fds = scheme.receive()
    wait_until(lambda: status(kernel)["accounts"][str(account)]["held_fds"] == 5)
    send(cap, encode_request(CUSTOM_OP, 2, []), [w] * 3)  # would be 9: refused
    assert receive(cap) == ((2, P.ERR, errno.EMFILE), [])
    P.close_fds(fds)
    scheme.answer(SchemeReply.of(req_id, P.OK, None))
    assert receive(cap) == ((1, P.OK, None), [])
    assert status(kernel)["accounts"][str(account)]["held_fds"] == 0
    send(cap, encode_request(CUSTOM_OP, 3, []), [w] * 4)
    req_id, *_, fds = scheme.receive()
    P.close_fds(fds)
    wait_until(lambda: status(kernel)["accounts"][str(account)]["held_fds"] == 4)
    scheme.die()  # its daemon's end: the request fails, and what rode on it is given back
    assert receive(cap) == ((3, P.ERR, errno.EIO), [])
    assert status(kernel)["accounts"][str(account)]["held_fds"] == 0
    os.close(w)
    assert os.read(r, 1) == b""  # every copy of the write end is closed
    os.close(r)
    os.close(cap)


def test_fds_queued_for_a_client_that_does_not_read_count_against_its_quota(kernel):
    """A scheme (perhaps the client's own) cannot make the router hold fds without bound for a
    client that never reads: fds waiting in its outbox count against its quota."""
    _, scheme, root = create_scheme(kernel)
    account, (cap,) = new_account(kernel, [root], max_caps=4)
    for tag in range(6):
        send(cap, encode_request(P.READ, tag, [1]))
    requests = [scheme.receive()[0] for _ in range(6)]
    for req_id in requests[:4]:  # more than its socket holds: the rest waits in the outbox
        scheme.answer(SchemeReply.of(req_id, P.OK, b"z" * 100_000))
    r, w = os.pipe()
    scheme.answer(SchemeReply.of(requests[4], P.OK, None), [w, w, w])  # 1 cap + 3 fds: fits
    scheme.answer(SchemeReply.of(requests[5], P.OK, None), [w, w, w, w])  # would be 8: refused
    os.close(w)
    wait_until(lambda: status(kernel)["accounts"][str(account)]["held_fds"] == 3)
    for tag in range(4):
        assert receive(cap)[0][:2] == (tag, P.OK)
    (tag, status_, _), fds = receive(cap)
    assert (tag, status_, len(fds)) == (4, P.OK, 3)
    assert receive(cap) == ((5, P.ERR, errno.EMFILE), [])
    P.close_fds(fds)
    assert os.read(r, 1) == b""  # every copy of the write end is closed again
    os.close(r)
    os.close(cap)


def test_account_new_refuses_what_is_not_a_capability_or_not_a_limit(kernel):
    _, _, root = create_scheme(kernel)
    r, w = os.pipe()
    for args, fds, err in [
        ([None], [r], errno.EBADF),  # not a capability
        ([None], [], errno.EINVAL),
        ([{"max_caps": 0}], [root], errno.EINVAL),
        ([{"max_files": 3}], [root], errno.EINVAL),
        ([[1]], [root], errno.EINVAL),
    ]:
        with pytest.raises(OSError) as info:
            call(kernel, P.ACCOUNT_NEW, args, fds)
        assert info.value.errno == err, args
    with pytest.raises(OSError) as info:
        call(root, P.ACCOUNT_NEW, [None], [root])  # only on the kernel capability
    assert info.value.errno == errno.EINVAL
    os.close(r)
    os.close(w)


FD_LIMIT = 48


@contextlib.contextmanager
def kernel_with_fd_limit(soft: int, hard: int):
    """A router started with RLIMIT_NOFILE (soft, hard); yields (kernel fd, process)."""
    limited = ("import resource, runpy\n"
               f"resource.setrlimit(resource.RLIMIT_NOFILE, ({soft}, {hard}))\n"
               "runpy.run_module('redoxcap.kernel', run_name='__main__')\n")
    ours, theirs = socket.socketpair(socket.AF_UNIX, socket.SOCK_SEQPACKET)
    proc = subprocess.Popen([sys.executable, "-c", limited, "--kernel-fd", str(theirs.fileno())],
                            pass_fds=[theirs.fileno()], stderr=subprocess.PIPE, text=True)
    theirs.close()
    try:
        yield ours.fileno(), proc
    finally:
        ours.close()
        proc.wait(timeout=10)
        stderr = proc.stderr.read()
        proc.stderr.close()
        assert proc.returncode == 0, stderr
        assert "Traceback" not in stderr, stderr


@pytest.fixture
def starved_kernel():
    """A router with only FD_LIMIT fds (soft and hard, so it cannot raise its own)."""
    with kernel_with_fd_limit(FD_LIMIT, FD_LIMIT) as started:
        yield started


def test_the_router_raises_its_soft_fd_limit_to_the_hard_one():
    with kernel_with_fd_limit(64, 256) as (kernel, proc):
        status(kernel)  # it is serving, so past its start
        with open(f"/proc/{proc.pid}/limits") as f:
            line = next(line for line in f if line.startswith("Max open files"))
        assert line.split()[3:5] == ["256", "256"]


def test_a_router_out_of_fds_answers_emfile_and_recovers(starved_kernel):
    kernel, proc = starved_kernel
    _, scheme, root = create_scheme(kernel)
    clones = []
    while True:
        try:
            clones.append(call_fd(root, P.CLONE))
        except OSError as exc:
            assert exc.errno == errno.EMFILE
            break
        assert len(clones) < FD_LIMIT
    with pytest.raises(OSError) as info:
        call(root, P.CLONE)
    assert info.value.errno == errno.EMFILE
    # a new handle that cannot become a capability: EMFILE for the client, CLOSE for the scheme
    send(root, encode_request(P.OPENAT, 3, ["x", 0, 0]))
    req_id, *_ = scheme.receive()
    scheme.answer(SchemeReply.new_handle(req_id, 4, 0))
    assert receive(root) == ((3, P.ERR, errno.EMFILE), [])
    _, handle, _, op, _, _ = scheme.receive()
    assert (handle, op) == (4, P.CLOSE)
    # fds the router cannot take, on a request and on a reply: EMFILE, the rest closed
    r, w = os.pipe()
    send(root, encode_request(P.SENDFD, 5, []), [w, w, w])
    assert receive(root) == ((5, P.ERR, errno.EMFILE), [])
    send(root, encode_request(P.RECVFD, 6, []))
    req_id, *_ = scheme.receive()
    scheme.answer(SchemeReply.of(req_id, P.OK, None), [w, w, w])
    assert receive(root) == ((6, P.ERR, errno.EMFILE), [])
    os.close(w)
    assert os.read(r, 1) == b""  # no copy of the write end is left in the router
    os.close(r)
    assert proc.poll() is None
    for fd in clones[:4]:
        os.close(fd)
    wait_until(lambda: status(kernel)["schemes"]["1"]["capabilities"] == len(clones) - 3)
    clones = clones[4:] + [call_fd(root, P.CLONE)]
    send(root, encode_request(P.OPENAT, 7, ["x", 0, 0]))
    req_id, *_ = scheme.receive()
    scheme.answer(SchemeReply.new_handle(req_id, 8, 0))
    (tag, status_, _), (opened,) = receive(root)
    assert (tag, status_) == (7, P.OK)
    P.close_fds([opened, *clones])
    _, handle, _, op, _, _ = scheme.receive()
    assert (handle, op) == (8, P.CLOSE)


def test_a_scheme_that_never_reads_holds_up_only_the_capability_waiting_for_it(kernel):
    """A client's capabilities take turns, but a send the router must wait for (a scheme
    that does not read its channel, say a hostile client's own) does not keep the turn."""
    _, (silent_channel, silent_root) = call(kernel, P.SCHEME_CREATE)  # nobody reads it
    _, scheme, root = create_scheme(kernel)
    _, (stuck, served) = new_account(kernel, [silent_root, root])
    try:
        with socket.socket(fileno=os.dup(stuck)) as s:
            s.settimeout(1.0)
            with pytest.raises(TimeoutError):  # the router stops reading it: its send waits
                for tag in range(accounts.MAX_INFLIGHT_PER_CAP * 4):  # more than the channel holds
                    s.send(encode_request(P.WRITE, tag, [b"x" * 60_000]))
        send(served, encode_request(P.READ, 1, [5]))
        req_id, _, _, _, (args, _), _ = scheme.receive()
        assert args == [5]
        scheme.answer(SchemeReply.of(req_id, P.OK, b"ready"))
        assert receive(served)[0] == (1, P.OK, b"ready")
    finally:
        os.close(silent_channel)  # the silent scheme dies: its requests fail with EIO
        assert receive(stuck)[0][1:] == (P.ERR, errno.EIO)
        for fd in (stuck, served, silent_root):
            os.close(fd)


def test_a_clients_schemes_share_a_few_frames_a_pass_and_every_reply_still_comes(kernel):
    """The schemes a client pays for get CLIENT_REPLIES_PER_PASS frames a pass among them
    (their channels wait, unwatched, for their turn): replies past it are late, never
    lost, and a system scheme's replies meanwhile come as they are answered."""
    (kernel_clone,) = call(kernel, P.CLONE)[1]
    _, (client_kernel,) = new_account(kernel, [kernel_clone])
    os.close(kernel_clone)
    theirs = []
    for _ in range(3):  # three schemes of the client's, each answering 12 requests at once (16 in flight per capability)
        _, (channel, root) = call(client_kernel, P.SCHEME_CREATE)
        theirs.append((FakeScheme(channel), root))
    _, system_scheme, system_root = create_scheme(kernel)
    for scheme, root in theirs:
        for tag in range(12):
            send(root, encode_request(P.READ, tag, [1]))
    for scheme, root in theirs:
        answers = [scheme.receive()[0] for _ in range(12)]
        for req_id in answers:
            scheme.answer(SchemeReply.of(req_id, P.OK, b"c"))
    send(system_root, encode_request(P.READ, 7, [1]))
    req_id, *_ = system_scheme.receive()
    system_scheme.answer(SchemeReply.of(req_id, P.OK, b"s"))
    assert receive(system_root)[0] == (7, P.OK, b"s")
    for scheme, root in theirs:
        assert [receive(root)[0] for _ in range(12)] == [(tag, P.OK, b"c") for tag in range(12)]
        os.close(root)
    os.close(client_kernel)
