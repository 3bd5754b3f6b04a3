"""Scheme logic in memory: the methods called directly, no router, no processes."""

from __future__ import annotations

import collections
import errno
import os
import socket
import stat
import time
import typing

import pytest
import trio
import trio.testing

from redoxcap.schemes._server import _Server
from redoxcap.schemes.framework import (
    Caller,
    HandleRef,
    Request,
    RunInTask,
    Scheme,
    SchemeError,
    invoke,
    serve,
    takes,
)
from redoxcap.schemes.log import LogScheme
from redoxcap.schemes.null import NullScheme
from redoxcap.schemes.pipe import PIPE_SIZE, PipeRoot, PipeScheme
from redoxcap.schemes.rand import RandScheme
from redoxcap.schemes.uds import MAX_QUEUED_FDS, UdsScheme
from redoxcap.schemes.zero import ZeroScheme
from redoxcap.wire import ops
from redoxcap.wire import protocol as P
from redoxcap.wire.channel import Channel
from redoxcap.wire.frames import SchemeReply, SchemeRequest


def req(op: int = 0, passed=()) -> Request:
    return Request(Caller(os.getpid(), 0, 0), 0, op, list(passed))


async def test_pipe_reads_wait_for_writes_and_end_when_writers_close():
    s = PipeScheme()
    r = (await invoke(s, req(), s.root(), "openat", ".", 0, 0)).obj
    w = (await invoke(s, req(), r, "dup", b"write")).obj
    got = []

    async def reader():
        got.append(await invoke(s, req(), r, "read", 100))
        got.append(await invoke(s, req(), r, "read", 100))

    with trio.fail_after(5):
        async with trio.open_nursery() as nursery:
            nursery.start_soon(reader)
            await trio.testing.wait_all_tasks_blocked()
            assert got == []  # waiting, not spinning on b""
            await invoke(s, req(), w, "write", b"hello")
            await trio.testing.wait_all_tasks_blocked()  # the reader has it and waits again
            assert got == [b"hello"]
            await s.close(w)
    assert got == [b"hello", b""]


async def test_pipe_write_without_readers_is_epipe_and_a_full_pipe_waits():
    s = PipeScheme()
    r = (await invoke(s, req(), s.root(), "openat", "", 0, 0)).obj
    w = (await invoke(s, req(), r, "dup", b"write")).obj
    assert await invoke(s, req(), w, "write", b"x" * PIPE_SIZE) == PIPE_SIZE
    wrote = []

    async def writer():
        wrote.append(await invoke(s, req(), w, "write", b"more"))

    with trio.fail_after(5):
        async with trio.open_nursery() as nursery:
            nursery.start_soon(writer)
            await trio.testing.wait_all_tasks_blocked()
            assert wrote == []  # full: the writer waits
            nursery.cancel_scope.cancel()
    await s.close(r)
    with pytest.raises(SchemeError) as info:
        await invoke(s, req(), w, "write", b"x")
    assert info.value.errno == errno.EPIPE
    with pytest.raises(SchemeError) as info:
        await invoke(s, req(), w, "read", 1)  # a write end cannot be read
    assert info.value.errno == errno.EBADF


async def test_uds_listen_connect_accept_and_the_errors_around_them():
    s = UdsScheme()
    root = s.root()
    with pytest.raises(SchemeError) as info:
        await invoke(s, req(), root, "openat", "svc", os.O_RDWR, 0)
    assert info.value.errno == errno.ECONNREFUSED
    listener = (await invoke(s, req(), root, "openat", "svc", os.O_CREAT, 0)).obj
    with pytest.raises(SchemeError) as info:
        await invoke(s, req(), root, "openat", "svc", os.O_CREAT, 0)
    assert info.value.errno == errno.EADDRINUSE
    for bad in ("", "a/b", ".", ".."):
        with pytest.raises(SchemeError) as info:
            await invoke(s, req(), root, "openat", bad, os.O_CREAT, 0)
        assert info.value.errno == errno.EINVAL
    client = (await invoke(s, req(), root, "openat", "svc", os.O_RDWR, 0)).obj
    server = (await invoke(s, req(), listener, "dup", b"accept")).obj
    await invoke(s, req(), client, "write", b"ping")
    assert await invoke(s, req(), server, "read", 10) == b"ping"
    await invoke(s, req(), server, "shutdown", socket.SHUT_WR)
    assert await invoke(s, req(), client, "read", 10) == b""
    await s.close(listener)
    await invoke(s, req(), root, "openat", "svc", os.O_CREAT, 0)  # the name is free again


async def test_uds_passes_fds_and_closes_the_ones_nobody_received():
    s = UdsScheme()
    listener = (await invoke(s, req(), s.root(), "openat", "fds", os.O_CREAT, 0)).obj
    client = (await invoke(s, req(), s.root(), "openat", "fds", os.O_RDWR, 0)).obj
    server = (await invoke(s, req(), listener, "dup", b"accept")).obj
    r, w = os.pipe()
    await invoke(s, req(P.SENDFD, [os.dup(r)]), client, "sendfd")
    reply = await invoke(s, req(), server, "recvfd")
    (received,) = reply.fds
    os.write(w, b"through the fd")
    assert os.read(received, 100) == b"through the fd"
    os.close(received)
    await invoke(s, req(P.SENDFD, [os.dup(r)]), client, "sendfd")
    await s.close(server)  # one fd still queued for it: closed now
    os.close(r)
    with pytest.raises(BrokenPipeError):
        os.write(w, b"x")  # no read end is left anywhere
    os.close(w)


async def uds_pair(s: UdsScheme, scope, name: str = "pair"):
    """(listener, connecting end, accepted end) on name in scope."""
    listener = (await invoke(s, req(), scope, "openat", name, os.O_CREAT | os.O_RDWR, 0)).obj
    ours = (await invoke(s, req(), scope, "openat", name, os.O_RDWR, 0)).obj
    theirs = (await invoke(s, req(), listener, "dup", b"accept")).obj
    return listener, ours, theirs


async def uds_errno(call) -> int:
    with pytest.raises(SchemeError) as info:
        await call
    return info.value.errno


async def test_uds_only_a_scope_opens_names():
    s = UdsScheme()
    listener, ours, theirs = await uds_pair(s, s.root())
    for h in (listener, ours, theirs):
        for path, flags in (("other", os.O_CREAT), ("pair", os.O_RDWR), (".", os.O_DIRECTORY), ("", 0)):
            assert await uds_errno(invoke(s, req(), h, "openat", path, flags, 0)) == errno.ENOTDIR
    assert await uds_errno(invoke(s, req(), s.root(), "openat", "pair", os.O_DIRECTORY, 0)) == errno.ENOTDIR
    here = (await invoke(s, req(), s.root(), "openat", ".", os.O_DIRECTORY, 0)).obj
    assert here is s.root() and (await invoke(s, req(), s.root(), "openat", "", 0, 0)).obj is here
    for call in (invoke(s, req(), here, "read", 1), invoke(s, req(), here, "write", b"x"),
                 invoke(s, req(), here, "shutdown", socket.SHUT_WR), invoke(s, req(), here, "recvfd")):
        assert await uds_errno(call) == errno.EBADF
    r, w = os.pipe()
    try:
        assert await uds_errno(invoke(s, req(P.SENDFD, [r]), here, "sendfd")) == errno.EBADF
        assert await uds_errno(invoke(s, req(), listener, "read", 1)) == errno.ENOTCONN
        assert await uds_errno(invoke(s, req(), ours, "dup", b"scope")) == errno.EINVAL
        assert await uds_errno(invoke(s, req(), here, "dup", b"accept")) == errno.EINVAL
        # fstat, fpath and getdents answer (or refuse with an errno) for every kind
        assert stat.S_ISDIR((await invoke(s, req(), here, "fstat")).st_mode)
        assert (await invoke(s, req(), here, "fstat")).st_size == 1
        assert await invoke(s, req(), here, "fpath") == "/scheme/uds"
        assert await invoke(s, req(), here, "getdents", 0) == ["pair"]
        for h in (listener, ours, theirs):
            assert stat.S_ISSOCK((await invoke(s, req(), h, "fstat")).st_mode)
            assert await invoke(s, req(), h, "fpath") == "/scheme/uds/pair"
            assert await uds_errno(invoke(s, req(), h, "getdents", 0)) == errno.ENOTDIR
    finally:
        os.close(r)  # refused before it was taken: still ours
        os.close(w)


async def test_uds_scopes_isolate_names():
    s = UdsScheme()
    one = (await invoke(s, req(), s.root(), "dup", b"scope")).obj
    two = (await invoke(s, req(), one, "dup", b"scope")).obj  # any scope makes private ones
    assert len({id(s.root()), id(one), id(two)}) == 3
    system_listener = (await invoke(s, req(), s.root(), "openat", "svc", os.O_CREAT, 0)).obj
    assert await uds_errno(invoke(s, req(), one, "openat", "svc", os.O_RDWR, 0)) == errno.ECONNREFUSED
    squatter = (await invoke(s, req(), one, "openat", "svc", os.O_CREAT, 0)).obj  # its own table: no EADDRINUSE
    # clients in each scope reach the listener of that scope only
    await invoke(s, req(), s.root(), "openat", "svc", os.O_RDWR, 0)
    assert len(system_listener.pending) == 1 and not squatter.pending
    await invoke(s, req(), one, "openat", "svc", os.O_RDWR, 0)
    assert len(system_listener.pending) == 1 and len(squatter.pending) == 1
    assert await uds_errno(invoke(s, req(), two, "openat", "svc", os.O_RDWR, 0)) == errno.ECONNREFUSED
    # a private scope cannot reach a named one (nor the system's)
    for scope in (one, two):
        assert await uds_errno(invoke(s, req(), scope, "dup", b"scope:team")) == errno.EACCES
    assert s.named == {}


async def test_uds_a_named_scope_is_shared_while_a_handle_or_listener_lives():
    s = UdsScheme()
    for bad in (b"scope:", b"scope:a/b", b"scope:.", b"scope:/a", b"scope:\xff", b"scopes", b"write"):
        assert await uds_errno(invoke(s, req(), s.root(), "dup", bad)) == errno.EINVAL, bad
    first = (await invoke(s, req(), s.root(), "dup", b"scope:team")).obj
    second = (await invoke(s, req(), s.root(), "dup", b"scope:team")).obj
    other = (await invoke(s, req(), s.root(), "dup", b"scope:other")).obj
    assert first is second and first is not other and first is not s.root()
    listener = (await invoke(s, req(), first, "openat", "svc", os.O_CREAT, 0)).obj
    await invoke(s, req(), second, "openat", "svc", os.O_RDWR, 0)
    assert len(listener.pending) == 1
    assert await uds_errno(invoke(s, req(), other, "openat", "svc", os.O_RDWR, 0)) == errno.ECONNREFUSED
    for h in (first, second, other):
        await s.close(h)
    assert list(s.named) == ["team"]  # the listener keeps it alive
    again = (await invoke(s, req(), s.root(), "dup", b"scope:team")).obj
    assert again is first
    await s.close(listener)
    await s.close(again)
    assert s.named == {}  # nothing left in it: forgotten
    fresh = (await invoke(s, req(), s.root(), "dup", b"scope:team")).obj
    assert fresh is not first
    assert await uds_errno(invoke(s, req(), fresh, "openat", "svc", os.O_RDWR, 0)) == errno.ECONNREFUSED
    await s.close(fresh)
    assert s.named == {}


async def test_uds_refuses_its_own_capabilities_so_nothing_holds_itself_open():
    s = UdsScheme()
    _, ours, _ = await uds_pair(s, s.root())
    r, w = os.pipe()
    try:
        request = req(P.SENDFD, [HandleRef(2, r)])
        assert await uds_errno(s.sendfd(request, ours)) == errno.EINVAL
        assert request.passed_fds() == [r]  # not taken: the framework closes it with the request
    finally:
        os.close(r)
        os.close(w)


async def test_uds_bounds_the_fds_queued_per_connection():
    s = UdsScheme()
    _, ours, theirs = await uds_pair(s, s.root())
    r, w = os.pipe()
    for _ in range(MAX_QUEUED_FDS):
        await invoke(s, req(P.SENDFD, [os.dup(r)]), ours, "sendfd")
    extra = req(P.SENDFD, [os.dup(r)])
    assert await uds_errno(s.sendfd(extra, ours)) == errno.ETOOMANYREFS
    os.close(*extra.passed_fds())
    (received,) = (await invoke(s, req(), theirs, "recvfd")).fds  # room again
    os.close(received)
    await invoke(s, req(P.SENDFD, [os.dup(r)]), ours, "sendfd")
    assert len(theirs.fds) == MAX_QUEUED_FDS
    await s.close(theirs)
    os.close(r)
    with pytest.raises(BrokenPipeError):
        os.write(w, b"x")  # every queued read end was closed with the receiver
    os.close(w)


async def test_uds_fds_queued_for_a_connection_never_accepted_close_with_the_listener():
    s = UdsScheme()
    listener = (await invoke(s, req(), s.root(), "openat", "q", os.O_CREAT, 0)).obj
    ours = (await invoke(s, req(), s.root(), "openat", "q", os.O_RDWR, 0)).obj
    r, w = os.pipe()
    await invoke(s, req(P.SENDFD, [os.dup(r)]), ours, "sendfd")
    await s.close(ours)
    await s.close(listener)
    os.close(r)
    with pytest.raises(BrokenPipeError):
        os.write(w, b"x")
    os.close(w)


async def test_log_lines_carry_the_writers_pid(capsys):
    s = LogScheme()
    h = (await invoke(s, req(), s.root(), "openat", "app", 0, 0)).obj
    await invoke(s, req(), h, "write", b"one\ntw")
    await invoke(s, req(), h, "write", b"o\n\xffpartial")
    await s.close(h)
    pid = os.getpid()
    assert capsys.readouterr().err.splitlines() == [
        f"log[{pid}] app: one", f"log[{pid}] app: two", f"log[{pid}] app: \\xffpartial"]


@pytest.mark.parametrize("scheme", [NullScheme, ZeroScheme, RandScheme], ids=["null", "zero", "rand"])
async def test_only_a_device_root_opens_and_the_root_is_no_device(scheme):
    s = scheme()
    dev = (await invoke(s, req(), s.root(), "openat", ".", os.O_RDWR, 0)).obj
    assert await invoke(s, req(), dev, "write", b"abc") == 3
    for path in (".", "", "x"):
        with pytest.raises(SchemeError) as info:
            await invoke(s, req(), dev, "openat", path, os.O_RDONLY, 0)  # a device names one device
        assert info.value.errno == errno.ENOTDIR
    with pytest.raises(SchemeError) as info:
        await invoke(s, req(), s.root(), "openat", "other", os.O_RDONLY, 0)
    assert info.value.errno == errno.ENOENT
    for call in (invoke(s, req(), s.root(), "read", 4), invoke(s, req(), s.root(), "write", b"x"), invoke(s, req(), s.root(), "dup", b"")):
        with pytest.raises(SchemeError) as info:
            await call
        assert info.value.errno == errno.EBADF
    assert stat.S_ISDIR((await invoke(s, req(), s.root(), "fstat")).st_mode)
    assert stat.S_ISCHR((await invoke(s, req(), dev, "fstat")).st_mode)
    assert await invoke(s, req(), s.root(), "fpath") == await invoke(s, req(), dev, "fpath") == f"/scheme/{s.name}"


async def test_a_scheme_serves_the_requests_waiting_for_it_one_account_at_a_time():
    """A client with many requests in flight does not put them all before another's one."""
    ours, theirs = socket.socketpair(socket.AF_UNIX, socket.SOCK_SEQPACKET)
    waiting = [(n, 7) for n in range(1, 9)] + [(100, 8), (101, 8), (200, 9)]  # (req_id, account)
    for req_id, account in waiting:  # all there before the daemon reads any
        ours.send(SchemeRequest(req_id, P.ROOT_HANDLE, 1, 0, 0, P.FPATH, (), P.pack([]),
                                account).encode())
    router = trio.socket.from_stdlib_socket(ours)
    async with trio.open_nursery() as nursery:
        nursery.start_soon(serve, ZeroScheme(), theirs.detach())
        replies = [SchemeReply.decode(await router.recv(P.MAX_FRAME)) for _ in range(1 + len(waiting))]
        router.close()  # the daemon sees the router go and returns
    assert replies[0].status == P.HELLO
    assert [r.req_id for r in replies[1:]] == [1, 100, 200, 2, 101, 3, 4, 5, 6, 7, 8]
    assert all(r.value() == "/scheme/zero" for r in replies[1:])


class _Costly(Scheme):
    """READ costs 5 ms of the loop (in place, as a costly inline request would); FPATH
    is cheap; FSTAT asks for a task, where it waits."""

    name = "costly"
    inline_ops = frozenset({P.READ, P.FPATH, P.FSTAT})

    def root(self) -> object:
        return object()

    async def read(self, req, h, n):
        time.sleep(0.005)  # noqa: ASYNC251 - the point: work that holds the loop
        return b"x"

    async def fpath(self, req, h):
        return "/scheme/costly"

    async def fstat(self, req, h):
        if req.inline:
            raise RunInTask
        await trio.sleep(0.01)  # what only a task may do
        return {"st_mode": 0}


def _frame(req_id: int, op: int, account: int) -> bytes:
    return SchemeRequest(req_id, P.ROOT_HANDLE, 1, 0, 0, op, (), P.pack([1] if op == P.READ else []),
                         account).encode()


async def test_a_client_whose_requests_cost_the_loop_holds_up_another_for_a_turn_not_a_batch():
    """32 costly requests of one account waiting, and another account's cheap one sent
    once the first is answered: it is answered after a turn or two of them (TURN), not
    after the 31 left."""
    ours, theirs = socket.socketpair(socket.AF_UNIX, socket.SOCK_SEQPACKET)
    for n in range(1, 33):
        ours.send(_frame(n, P.READ, 7))
    router = trio.socket.from_stdlib_socket(ours)
    async with trio.open_nursery() as nursery:
        nursery.start_soon(serve, _Costly(), theirs.detach())
        assert SchemeReply.decode(await router.recv(P.MAX_FRAME)).status == P.HELLO
        replies = [SchemeReply.decode(await router.recv(P.MAX_FRAME)).req_id]
        await router.send(_frame(100, P.FPATH, 8))
        while len(replies) < 33:
            replies.append(SchemeReply.decode(await router.recv(P.MAX_FRAME)).req_id)
        router.close()
    assert replies.index(100) <= 4, replies


def test_a_turn_cut_after_an_accounts_last_request_leaves_no_empty_queue():
    """A turn that ends right after an account's last request, then requests of others:
    the next turn takes them in order (an empty queue left behind crashed the daemon)."""
    ours, theirs = socket.socketpair(socket.AF_UNIX, socket.SOCK_SEQPACKET)
    with ours, theirs:
        server = _Server(ZeroScheme(), Channel(theirs))
        for account, req_ids in ((7, [1, 2]), (7, [3]), (8, [4, 5])):
            server._waiting.setdefault(account, collections.deque()).extend(
                (SchemeRequest(n, 0, 1, 0, 0, P.FPATH, (), b"", account), []) for n in req_ids)
            turn = server._in_turn()
            taken = [next(turn)[0].req_id for _ in req_ids]
            turn.close()
            assert taken == req_ids
        assert server._waiting == {}
        for account, n in ((7, 6), (8, 7), (7, 8), (9, 9)):
            server._waiting.setdefault(account, collections.deque()).append(
                (SchemeRequest(n, 0, 1, 0, 0, P.FPATH, (), b"", account), []))
        turn = server._in_turn()
        assert [next(turn)[0].req_id for _ in range(2)] == [6, 7]
        turn.close()  # cut in the middle of a round: 7 and 8 go behind 9
        assert [r.req_id for r, _ in server._in_turn()] == [9, 8]
        assert server._waiting == {}


async def test_a_method_called_in_place_that_asks_for_a_task_is_served_in_one():
    """RunInTask: the request is served again in a task (req.inline False) where it may
    wait, while the loop answers the requests behind it."""
    ours, theirs = socket.socketpair(socket.AF_UNIX, socket.SOCK_SEQPACKET)
    ours.send(_frame(1, P.FSTAT, 7))
    ours.send(_frame(2, P.FPATH, 8))
    router = trio.socket.from_stdlib_socket(ours)
    async with trio.open_nursery() as nursery:
        nursery.start_soon(serve, _Costly(), theirs.detach())
        assert SchemeReply.decode(await router.recv(P.MAX_FRAME)).status == P.HELLO
        replies = [SchemeReply.decode(await router.recv(P.MAX_FRAME)) for _ in range(2)]
        router.close()
    assert [(r.req_id, r.status) for r in replies] == [(2, P.OK), (1, P.OK)]
    assert replies[1].value() == {"st_mode": 0}


# -- the protocol is declared: defaults and handle checks that cannot go missing --------


async def test_every_declared_operation_answers_its_errno_until_a_scheme_serves_it():
    class Bare(Scheme):
        pass

    s = Bare()
    for op in ops.SCHEME_OPERATIONS:
        args = [arg.types[0]() for arg in op.args]
        with pytest.raises(SchemeError) as info:
            await invoke(s, req(op.number), s.root(), op.name, *args)
        assert info.value.errno == op.default, op.name


@pytest.mark.parametrize("kind", ["PipeEnd", typing.Any, object, int | str, None])
def test_a_handle_check_that_names_no_class_fails_at_import(kind):
    with pytest.raises(TypeError, match="@takes"):
        takes(kind)


def test_a_method_that_does_not_take_the_declared_arguments_fails_at_import():
    with pytest.raises(TypeError, match=r"read must take \(self, req, h, n\)"):
        class Wrong(Scheme):
            async def read(self, req, h, n, offset):
                return b""

    with pytest.raises(TypeError, match="no async method write"):
        class Blocking(Scheme):
            def write(self, req, h, data):
                return len(data)


def test_a_handle_check_on_something_that_is_no_operation_fails_at_import():
    with pytest.raises(TypeError, match="not an operation"):
        class Typo(Scheme):
            @takes(PipeRoot)
            async def opneat(self, req, h, path, flags, mode):
                raise SchemeError(errno.ENOENT)


async def test_a_request_on_a_handle_the_method_does_not_take_never_reaches_it():
    called = []

    class Strict(Scheme):
        @takes(PipeRoot)
        async def openat(self, req, h, path, flags, mode):
            called.append(path)

        @takes(PipeRoot)
        async def fstat(self, req, h):
            called.append("fstat")

    s = Strict()
    for op_name, args, err in (("openat", ("x", 0, 0), errno.ENOTDIR), ("fstat", (), errno.EBADF)):
        with pytest.raises(SchemeError) as info:
            await invoke(s, req(), object(), op_name, *args)
        assert info.value.errno == err
    assert called == []
    assert Strict.handle_kinds == {ops.OPENAT: (PipeRoot,), ops.FSTAT: (PipeRoot,)}
