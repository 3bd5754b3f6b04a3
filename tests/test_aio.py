"""AsyncCapability: many tasks of one process share one capability socket."""

from __future__ import annotations

import os
import socket
import threading

import trio
import trio.testing

from redoxcap.wire import frames as F
from redoxcap.wire import protocol as P
from redoxcap.wire.aio import AsyncCapability


def _echo_server(sock: socket.socket) -> None:
    """Answers each request with its first argument, as a router would: out of order (the
    requests it has read, newest first), and reading no more requests while a reply cannot
    be sent (the client's buffer is full)."""
    while True:
        batch = []
        sock.setblocking(True)
        try:
            data = sock.recv(P.MAX_FRAME)
            sock.setblocking(False)
            while data:
                batch.append(data)
                data = sock.recv(P.MAX_FRAME)
        except BlockingIOError:
            pass
        except OSError:
            return
        if not batch:
            return
        sock.setblocking(True)
        for data in reversed(batch):
            _op, tag = F.REQUEST.unpack_from(data)
            (value,) = P.unpack(data[F.REQUEST.size :])
            try:
                sock.send(F.encode_reply(tag, P.OK, value))
            except OSError:
                return


async def test_many_tasks_share_one_capability_even_when_the_server_pushes_back():
    ours, theirs = socket.socketpair(socket.AF_UNIX, socket.SOCK_SEQPACKET)
    for s in (ours, theirs):  # small buffers: sends block and the server stops reading
        s.setsockopt(socket.SOL_SOCKET, socket.SO_SNDBUF, 4096)
        s.setsockopt(socket.SOL_SOCKET, socket.SO_RCVBUF, 4096)
    server = threading.Thread(target=_echo_server, args=(theirs,), daemon=True)
    server.start()
    cap = AsyncCapability(ours.detach())
    got = {}

    async def one(i: int) -> None:
        value, fds = await cap.call(P.READ, [b"x" * 300 + str(i).encode()])
        assert fds == []
        got[i] = value

    try:
        with trio.fail_after(30):
            async with trio.open_nursery() as nursery:
                for i in range(500):
                    nursery.start_soon(one, i)
    finally:
        cap.close()
        theirs.close()
        server.join(timeout=10)
    assert got == {i: b"x" * 300 + str(i).encode() for i in range(500)}


async def test_a_channel_closed_under_a_waiting_task_wakes_it_and_frees_its_fd():
    """Closing a Channel tells trio only if a task may wait on it (the router closes one per
    capability, most never waited on), yet a task waiting to read or to write is woken
    with ClosedResourceError, and the socket's fd is closed either way."""
    from redoxcap.wire.channel import Channel

    pairs = [socket.socketpair(socket.AF_UNIX, socket.SOCK_SEQPACKET) for _ in range(3)]
    reading, writing, idle = (Channel(ours) for ours, _ in pairs)
    while writing.try_send(b"x" * 4096):
        pass  # the peer reads nothing: the next send waits
    woken = []

    async def wait(what) -> None:
        try:
            await what()
        except trio.ClosedResourceError:
            woken.append(what)

    fds = [channel.fileno() for channel in (reading, writing, idle)]
    with trio.fail_after(10):  # a waiter never told would hang here
        async with trio.open_nursery() as nursery:
            nursery.start_soon(wait, reading.recv)
            nursery.start_soon(wait, lambda: writing.send(b"y"))
            await trio.testing.wait_all_tasks_blocked()
            for channel in (reading, writing, idle):
                channel.close()
    assert len(woken) == 2
    for fd in fds:
        try:
            os.fstat(fd)
        except OSError:
            continue
        raise AssertionError(f"fd {fd} still open")  # a number reused meanwhile would show here
    for _, theirs in pairs:
        theirs.close()
