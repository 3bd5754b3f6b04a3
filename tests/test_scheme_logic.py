"""Scheme logic in memory: the methods called directly, no router, no processes."""

from __future__ import annotations

import errno
import os
import socket

import pytest
import trio

from rt import protocol as P
from schemes.framework import Caller, HandleRef, Request, SchemeError
from schemes.log import LogScheme
from schemes.pipe import PIPE_SIZE, PipeScheme
from schemes.uds import UdsScheme


def req(op: int = 0, passed=()) -> Request:
    return Request(Caller(os.getpid(), 0, 0), 0, op, list(passed))


async def test_pipe_reads_wait_for_writes_and_end_when_writers_close():
    s = PipeScheme()
    r = (await s.openat(req(), s.root(), ".", 0, 0)).obj
    w = (await s.dup(req(), r, b"write")).obj
    got = []

    async def reader():
        got.append(await s.read(req(), r, 100))
        got.append(await s.read(req(), r, 100))

    with trio.fail_after(5):
        async with trio.open_nursery() as nursery:
            nursery.start_soon(reader)
            await trio.sleep(0.01)
            assert got == []  # waiting, not spinning on b""
            await s.write(req(), w, b"hello")
            await trio.sleep(0.01)
            await s.close(w)
    assert got == [b"hello", b""]


async def test_pipe_write_without_readers_is_epipe_and_a_full_pipe_waits():
    s = PipeScheme()
    r = (await s.openat(req(), s.root(), "", 0, 0)).obj
    w = (await s.dup(req(), r, b"write")).obj
    assert await s.write(req(), w, b"x" * PIPE_SIZE) == PIPE_SIZE
    with trio.move_on_after(0.05) as scope:
        await s.write(req(), w, b"more")
    assert scope.cancelled_caught  # full: the writer waits
    await s.close(r)
    with pytest.raises(SchemeError) as info:
        await s.write(req(), w, b"x")
    assert info.value.errno == errno.EPIPE
    with pytest.raises(SchemeError) as info:
        await s.read(req(), w, 1)  # a write end cannot be read
    assert info.value.errno == errno.EBADF


async def test_uds_listen_connect_accept_and_the_errors_around_them():
    s = UdsScheme()
    with pytest.raises(SchemeError) as info:
        await s.openat(req(), None, "svc", os.O_RDWR, 0)
    assert info.value.errno == errno.ECONNREFUSED
    listener = (await s.openat(req(), None, "svc", os.O_CREAT, 0)).obj
    with pytest.raises(SchemeError) as info:
        await s.openat(req(), None, "svc", os.O_CREAT, 0)
    assert info.value.errno == errno.EADDRINUSE
    for bad in ("", "a/b", "."):
        with pytest.raises(SchemeError) as info:
            await s.openat(req(), None, bad, os.O_CREAT, 0)
        assert info.value.errno == errno.EINVAL
    client = (await s.openat(req(), None, "svc", os.O_RDWR, 0)).obj
    server = (await s.dup(req(), listener, b"accept")).obj
    await s.write(req(), client, b"ping")
    assert await s.read(req(), server, 10) == b"ping"
    await s.shutdown(req(), server, socket.SHUT_WR)
    assert await s.read(req(), client, 10) == b""
    await s.close(listener)
    await s.openat(req(), None, "svc", os.O_CREAT, 0)  # the name is free again


async def test_uds_passes_fds_and_closes_the_ones_nobody_received():
    s = UdsScheme()
    listener = (await s.openat(req(), None, "fds", os.O_CREAT, 0)).obj
    client = (await s.openat(req(), None, "fds", os.O_RDWR, 0)).obj
    server = (await s.dup(req(), listener, b"accept")).obj
    r, w = os.pipe()
    await s.sendfd(req(P.SENDFD, [os.dup(r)]), client)
    reply = await s.recvfd(req(), server)
    (received,) = reply.fds
    os.write(w, b"through the fd")
    assert os.read(received, 100) == b"through the fd"
    os.close(received)
    await s.sendfd(req(P.SENDFD, [HandleRef(9, os.dup(r))]), client)
    await s.close(server)  # one fd still queued for it: closed now
    os.close(r)
    with pytest.raises(BrokenPipeError):
        os.write(w, b"x")  # no read end is left anywhere
    os.close(w)


async def test_log_lines_carry_the_writers_pid(capsys):
    s = LogScheme()
    h = (await s.openat(req(), s.root(), "app", 0, 0)).obj
    await s.write(req(), h, b"one\ntw")
    await s.write(req(), h, b"o\n\xffpartial")
    await s.close(h)
    pid = os.getpid()
    assert capsys.readouterr().err.splitlines() == [
        f"log[{pid}] app: one", f"log[{pid}] app: two", f"log[{pid}] app: \\xffpartial"]
