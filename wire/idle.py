"""Wait for a loop's own epoll in the kernel, not through trio, while trio has nothing else to run.

The router and the scheme daemons read their sockets through an epoll of
their own (the router's holds every capability; a scheme's, its one channel).
Waiting for it through trio costs, per wake-up, trio's re-arm of its
one-shot registration (epoll_ctl), trio's own epoll_wait and a turn of trio's
scheduler; every frame crosses the router, so it pays that for every frame.

`IdleWait.poll` blocks in the loop's own epoll_wait instead whenever trio
could run nothing else meanwhile:

- no other task is runnable: an instrument counts the tasks trio has
  scheduled and not yet stepped (its run queue alone would miss the rest of
  the batch the loop is running in);
- the wait ends at trio's next deadline (a timeout, a sleep, a cancel scope);
- trio's own epoll is one of the fds waited on, so that whatever a task waits
  for (a socket, a thread's run_sync_soon, a signal's wake-up fd) ends the
  wait too, and trio then has a checkpoint to take it.

Otherwise it makes a checkpoint first and polls without blocking. So every
other task runs as it would under trio's own wait, and cancellation reaches
the loop at its checkpoints.

It reads three things of trio's that are not public (its clock and deadlines,
its epoll, and once which tasks are runnable); where they are not what this
module expects, `IdleWait.of` returns None and the loop waits through trio.
"""

from __future__ import annotations

import math
import select
from typing import Any

import trio

from redoxcap.wire.channel import Channel


class _Runnable(trio.abc.Instrument):
    """Counts the tasks trio has scheduled and not yet begun to step."""

    def __init__(self, pending: int) -> None:
        self.pending = pending

    def task_scheduled(self, task: trio.lowlevel.Task) -> None:
        self.pending += 1

    def before_task_step(self, task: trio.lowlevel.Task) -> None:
        self.pending -= 1


class IdleWait:
    """Waits on an epoll of the caller's, with trio's epoll in it. That epoll must never be
    handed to trio's wait_readable: each epoll in the other would be a loop, which Linux
    refuses."""

    __slots__ = ("_clock", "_deadlines", "_runnable", "trio_fd")

    def __init__(self, runner: Any, runnable: _Runnable, trio_fd: int) -> None:
        self._clock = runner.clock
        self._deadlines = runner.deadlines
        self._runnable = runnable
        self.trio_fd = trio_fd

    @classmethod
    def of(cls, epoll: select.epoll) -> IdleWait | None:
        """An IdleWait on epoll in the current trio run (adds trio's epoll to it); None where
        trio's internals are not the expected ones."""
        try:
            from trio._core._run import GLOBAL_RUN_CONTEXT

            runner = GLOBAL_RUN_CONTEXT.runner
            trio_fd = runner.io_manager._epoll.fileno()
            runner.deadlines.next_deadline  # noqa: B018 (there, or AttributeError)
            runner.clock.deadline_to_sleep_time  # noqa: B018
            me = trio.lowlevel.current_task()
            # the tasks runnable now (the rest of this batch, and the next); counted from here on
            runnable = _Runnable(sum(1 for task in runner.tasks
                                     if task is not me and task._next_send_fn is not None))
        except (ImportError, AttributeError):
            return None
        epoll.register(trio_fd, select.EPOLLIN)
        trio.lowlevel.add_instrument(runnable)
        return cls(runner, runnable, trio_fd)

    def close(self) -> None:
        """Stop counting trio's tasks (the caller's epoll is its own to close)."""
        try:
            trio.lowlevel.remove_instrument(self._runnable)
        except (KeyError, RuntimeError):
            pass  # trio dropped it already, or its run is over

    async def poll(self, epoll: select.epoll, most: int) -> list[tuple[int, int]]:
        """Up to most ready (fd, events) of epoll's, once at least one is. trio's own epoll
        may be among them (the caller skips it): trio has then had a checkpoint to take
        its events."""
        while True:
            if self._runnable.pending > 0:
                await trio.lowlevel.checkpoint()
                timeout = 0.0
            else:
                timeout = self._clock.deadline_to_sleep_time(self._deadlines.next_deadline())
                if timeout <= 0:
                    await trio.lowlevel.checkpoint()
                    timeout = 0.0
            ready = epoll.poll(None if timeout == math.inf else timeout, most)
            if ready:
                for fd, _ in ready:
                    if fd == self.trio_fd:
                        await trio.lowlevel.checkpoint()
                        break
                return ready


class ReadableWait:
    """Waits until one channel is readable: in the kernel while trio has nothing else to
    run (IdleWait), else through trio. Owns an epoll (close() it)."""

    __slots__ = ("_channel", "_epoll", "_idle")

    def __init__(self, channel: Channel) -> None:
        self._channel = channel
        self._epoll = select.epoll()
        try:
            self._epoll.register(channel.fileno(), select.EPOLLIN)
            self._idle = IdleWait.of(self._epoll)
        except BaseException:
            self._epoll.close()
            raise

    async def __call__(self) -> None:
        """Return once a frame (or EOF) is waiting on the channel."""
        if self._idle is None:
            await self._channel.wait_readable()
            return
        while True:
            for fd, _ in await self._idle.poll(self._epoll, 2):
                if fd != self._idle.trio_fd:
                    return

    def close(self) -> None:
        if self._idle is not None:
            self._idle.close()
        self._epoll.close()
