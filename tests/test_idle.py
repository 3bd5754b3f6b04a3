"""IdleWait: a loop that waits in its own epoll, not through trio, while trio has nothing
else to run (the router's loop and the scheme framework's). Every other task must run as
under trio's own wait: a sleep ends on time, a thread's result comes back, a socket a task
waits on through trio wakes it, and the loop can be cancelled."""

from __future__ import annotations

import random
import select
import socket
import time

import pytest
import trio

from redoxcap.wire.channel import Channel
from redoxcap.wire.idle import IdleWait, ReadableWait


@pytest.fixture
def pair():
    ours, theirs = socket.socketpair(socket.AF_UNIX, socket.SOCK_SEQPACKET)
    ours.setblocking(False)
    yield ours, theirs
    ours.close()
    theirs.close()


class Loop:
    """A loop as the router's: waits on its epoll through IdleWait and reads what came."""

    def __init__(self, sock: socket.socket) -> None:
        self.sock = sock
        self.epoll = select.epoll()
        self.epoll.register(sock.fileno(), select.EPOLLIN)
        self.frames: list[bytes] = []
        self.idle: IdleWait | None = None
        self.task: trio.lowlevel.Task | None = None
        self.miscounted = 0

    async def run(self) -> None:
        self.task = trio.lowlevel.current_task()
        self.idle = IdleWait.of(self.epoll)
        assert self.idle is not None, "trio's internals are not the ones wire/idle.py expects"
        try:
            while True:
                ready = await self.idle.poll(self.epoll, 8)
                self.miscounted += self.idle._runnable.pending != _runnable_now(self.task)
                for fd, _ in ready:
                    if fd == self.sock.fileno():
                        try:
                            while True:
                                self.frames.append(self.sock.recv(64))
                        except BlockingIOError:
                            pass
        finally:
            self.idle.close()
            self.epoll.close()


def _runnable_now(me: trio.lowlevel.Task) -> int:
    """The tasks other than me that trio will step before it waits for I/O (what IdleWait's
    count must be whenever the loop runs)."""
    from trio._core._run import GLOBAL_RUN_CONTEXT

    return sum(1 for task in GLOBAL_RUN_CONTEXT.runner.tasks
               if task is not me and task._next_send_fn is not None)


async def test_the_loop_blocks_in_its_own_epoll_and_wakes_for_its_sockets(pair):
    ours, theirs = pair
    loop = Loop(ours)
    with trio.fail_after(10):
        async with trio.open_nursery() as nursery:
            nursery.start_soon(loop.run)
            await trio.sleep(0.05)
            theirs.send(b"one")
            while not loop.frames:  # this task's sleeps end only because the loop's wait does
                await trio.sleep(0.01)
            assert loop.frames == [b"one"]
            nursery.cancel_scope.cancel()  # the loop's checkpoints let cancellation in


async def test_other_tasks_run_while_the_loop_waits(pair):
    """A sleep ends (the deadline bounds the loop's wait), a thread's result comes back
    (run_sync_soon wakes trio's epoll, which is in the loop's), and a socket another task
    waits on through trio wakes that task. Each would otherwise hang until fail_after."""
    ours, _ = pair
    loop = Loop(ours)
    other_ours, other_theirs = socket.socketpair(socket.AF_UNIX, socket.SOCK_SEQPACKET)
    with other_ours, other_theirs, trio.fail_after(10):
        async with trio.open_nursery() as nursery:
            nursery.start_soon(loop.run)
            await trio.sleep(0.01)
            await trio.sleep(0.2)
            assert await trio.to_thread.run_sync(lambda: 42) == 42
            other_ours.setblocking(False)
            async with trio.open_nursery() as waiters:
                waiters.start_soon(trio.lowlevel.wait_readable, other_ours)
                await trio.sleep(0.05)
                other_theirs.send(b"x")
            nursery.cancel_scope.cancel()


async def test_the_count_of_runnable_tasks_stays_true_under_churn(pair):
    """Tasks that sleep, take locks, run threads, time out, wait on events and wake the loop,
    all at once: whenever the loop runs, IdleWait's count is the number of tasks trio
    will step before it waits (too low and the loop would block while work waits; too high
    and it would never block)."""
    ours, theirs = pair
    loop = Loop(ours)
    lock = trio.Lock()
    event = trio.Event()
    rng = random.Random(7)

    async def worker() -> None:
        nonlocal event
        for _ in range(40):
            r = rng.random()
            if r < 0.2:
                await trio.sleep(rng.random() * 0.002)
            elif r < 0.4:
                async with lock:
                    await trio.lowlevel.checkpoint()
            elif r < 0.5:
                await trio.to_thread.run_sync(time.sleep, 0.0005)
            elif r < 0.6:
                with trio.move_on_after(0.001):
                    await trio.sleep_forever()
            elif r < 0.7:
                event.set()
                event = trio.Event()
            elif r < 0.8:
                with trio.move_on_after(0.002):
                    await event.wait()
            else:
                theirs.send(b"x")

    with trio.fail_after(30):
        async with trio.open_nursery() as nursery:
            nursery.start_soon(loop.run)
            async with trio.open_nursery() as workers:
                for _ in range(30):
                    workers.start_soon(worker)
            await trio.sleep(0.05)
            nursery.cancel_scope.cancel()
    assert loop.frames  # it was woken by its socket meanwhile
    assert loop.miscounted == 0


async def test_readable_wait_returns_for_a_frame_and_for_eof_only(pair):
    ours, theirs = pair
    channel = Channel(ours)
    readable = ReadableWait(channel)
    try:
        async with trio.open_nursery() as nursery:
            async def ticker() -> None:  # keeps trio's epoll busy: not a frame
                for _ in range(20):
                    await trio.sleep(0.005)
            nursery.start_soon(ticker)
            with trio.fail_after(5):
                async def later() -> None:
                    await trio.sleep(0.15)
                    theirs.send(b"frame")
                nursery.start_soon(later)
                start = time.monotonic()
                await readable()
                assert time.monotonic() - start >= 0.14
                assert channel.try_recv()[0] == b"frame"
                theirs.shutdown(socket.SHUT_WR)
                await readable()
                assert channel.try_recv()[0] == b""
    finally:
        readable.close()
