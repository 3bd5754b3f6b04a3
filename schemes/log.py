"""The log scheme (`/scheme/log[/TAG]`): lines written to it go to the supervisor's log.

Each complete line is written to this daemon's stderr (which is the
supervisor's log) as `log[PID] TAG: line`, where PID is the writer's pid as
Linux reported it to the router, not what the writer claims. A partial last
line waits for its newline and is flushed when the handle closes; lines
longer than MAX_LINE bytes are split, so a handle never holds more than
MAX_LINE bytes of a partial line.

The log is lossy by design, like syslog's rate limiting: each writer pid has
a token bucket of BURST bytes refilled at RATE bytes per second (`--burst`,
`--rate`), charged with what each line takes in the log, prefix included. A
line its bucket cannot pay for is dropped, and the write still returns
len(data): a client is never blocked by the log, and what one process can
log is bounded. Once the writer may log again (before its next line), and
when a handle it wrote to closes, the log says
`log[PID]: (dropped N lines, M bytes)`, M counting the bytes the client
wrote; the notice is charged too, so a client cannot use it to log more.
At most MAX_WRITERS buckets are kept: a new writer takes the place of the
least recently used one once that is idle (full again), else it shares one
overflow bucket with every other such writer.

What a client writes cannot forge a log line or drive the terminal that shows
the log: every character that is not printable (`str.isprintable`: ESC, CR,
BEL, backspace, DEL, C1 controls, bidi overrides and other format characters)
is shown as `\\xNN`, `\\uNNNN` or `\\UNNNNNNNN`, a byte that is not UTF-8 as
`\\xNN`, and a backslash as `\\\\`, so that no escape can be typed as text
(wire/printable.py, which the trace shows client text with too).

Only the scheme root opens tags: `openat` relative to a tagged handle is
ENOTDIR, since a log handle names one tag, not a directory of them.
"""

from __future__ import annotations

import argparse
import errno
import stat
import sys
from collections import OrderedDict
from collections.abc import Awaitable, Callable
from dataclasses import dataclass, field
from typing import TextIO

import trio

from redoxcap.schemes.framework import (
    ROOT_STAT,
    Opened,
    Request,
    Scheme,
    SchemeError,
    daemon_cli,
    takes,
)
from redoxcap.wire.printable import escape, escape_text
from redoxcap.wire.stat import Stat

MAX_LINE = 4096  # bytes; a longer line is split, so a handle holds at most this much
BURST = 64 * 1024  # bytes of log one writer pid may write at once
RATE = 16 * 1024  # bytes of log per second one writer pid may sustain
MAX_WRITERS = 1024  # token buckets kept; beyond, an idle one is forgotten or writers share one
NOTICE_WAIT_MAX = 1.0  # seconds a closing handle waits for its writer to afford the drop notice


class LogRoot:
    """The object behind the scheme root (handle 0): the only handle that opens tags."""

    def __repr__(self) -> str:
        return "LogRoot()"


@dataclass(eq=False)
class LogHandle:
    """One open `/scheme/log[/TAG]`: its tag, the partial line it holds and its last writer."""

    tag: str
    pending: bytearray = field(default_factory=bytearray)
    pid: int = 0

    def prefix(self) -> str:
        return f"log[{self.pid}] {escape_text(self.tag)}: " if self.tag else f"log[{self.pid}]: "


@dataclass(eq=False)
class Bucket:
    """What one writer may still log (a token bucket, in bytes) and what it lost.

    `pid` is None for the bucket shared by writers beyond MAX_WRITERS.
    """

    pid: int | None
    tokens: float
    stamp: float  # when tokens was last brought up to date
    dropped_lines: int = 0
    dropped_bytes: int = 0
    waiting: bool = False  # a closing handle waits to report the drops

    def notice(self) -> str:
        who = f"log[{self.pid}]" if self.pid is not None else f"log (writers beyond {MAX_WRITERS})"
        return f"{who}: (dropped {self.dropped_lines} lines, {self.dropped_bytes} bytes)\n"


class LogScheme(Scheme):
    """Writes lines, tagged with the writer's pid, to stderr, within each writer's budget.

    Args:
        out: where lines go (default: stderr, the supervisor's log).
        rate: bytes of log per second each writer pid may sustain.
        burst: bytes of log each writer pid may write at once.
        clock: seconds on a monotonic clock (default: trio's).
        sleep: waits that many seconds on the same clock (default: trio's).
    """

    name = "log"

    def __init__(self, out: TextIO | None = None, *, rate: float = RATE, burst: int = BURST,
                 clock: Callable[[], float] = trio.current_time,
                 sleep: Callable[[float], Awaitable[None]] = trio.sleep) -> None:
        if rate <= 0 or burst <= 0:
            raise ValueError("the log's rate and burst must be positive")
        self.out = out or sys.stderr
        self.rate = rate
        self.burst = burst
        self.clock = clock
        self.sleep = sleep
        self._root = LogRoot()
        self.buckets: OrderedDict[int, Bucket] = OrderedDict()  # least recently used first
        self.overflow: Bucket | None = None

    def root(self) -> LogRoot:
        return self._root

    @takes(LogRoot)
    async def openat(self, req: Request, h: LogRoot, path: str, flags: int, mode: int) -> Opened:
        tag = path.strip("/")
        if tag in (".", ""):
            tag = ""
        if len(tag) > 64 or not tag.isprintable():
            raise SchemeError(errno.EINVAL, "a log tag is at most 64 printable characters")
        return Opened(LogHandle(tag, pid=req.caller.pid), fdflags=flags)

    @takes(LogRoot, LogHandle)
    async def write(self, req: Request, h: LogRoot | LogHandle, data: bytes) -> int:
        if not isinstance(h, LogHandle):
            raise SchemeError(errno.EBADF, "the log root is not open for writing")
        h.pid = req.caller.pid
        bucket = self._bucket(h.pid)
        start = 0
        while start < len(data):
            room = MAX_LINE - len(h.pending)
            end = data.find(b"\n", start, start + room + 1)
            if end >= 0:
                self._line(bucket, h, bytes(h.pending) + data[start:end], ended=True)
                start = end + 1
            elif len(data) - start > room:  # longer than MAX_LINE: split it
                self._line(bucket, h, bytes(h.pending) + data[start:start + room], ended=False)
                start += room
            else:
                h.pending += data[start:]
                break
            h.pending.clear()
        self.out.flush()
        return len(data)  # dropped or not: the log is lossy by design

    def _bucket(self, pid: int) -> Bucket:
        """pid's bucket, brought up to date; the least recently used one makes room if idle."""
        now = self.clock()
        bucket = self.buckets.get(pid)
        if bucket is not None:
            self.buckets.move_to_end(pid)
        elif len(self.buckets) < MAX_WRITERS:
            bucket = self.buckets[pid] = Bucket(pid, float(self.burst), now)
        else:
            oldest = next(iter(self.buckets.values()))
            self._refill(oldest, now)
            if oldest.tokens < self.burst or oldest.waiting:
                # No idle bucket to forget: a writer beyond MAX_WRITERS shares one budget,
                # so many processes cannot each get a fresh burst again and again.
                if self.overflow is None:
                    self.overflow = Bucket(None, float(self.burst), now)
                bucket = self.overflow
            else:
                if oldest.dropped_lines:
                    self.out.write(oldest.notice())
                del self.buckets[oldest.pid]
                bucket = self.buckets[pid] = Bucket(pid, float(self.burst), now)
        self._refill(bucket, now)
        return bucket

    def _refill(self, bucket: Bucket, now: float) -> None:
        bucket.tokens = min(self.burst, bucket.tokens + max(0.0, now - bucket.stamp) * self.rate)
        bucket.stamp = now

    def _line(self, bucket: Bucket, h: LogHandle, raw: bytes, ended: bool) -> None:
        """Write one line if the bucket pays for it (and first for the notice it owes)."""
        owed = bucket.notice() if bucket.dropped_lines else ""
        prefix = h.prefix()
        # Escaping never makes a line shorter, so this bounds the cost from below
        # without escaping a line that is going to be dropped anyway.
        if bucket.tokens >= len(owed) + min(len(prefix) + len(raw) + 1, self.burst):
            text = prefix + escape(raw) + "\n"
            cost = len(text.encode("utf-8"))  # what it takes on disk, prefix included
            if bucket.tokens >= len(owed) + min(cost, self.burst):
                if owed:
                    self._report(bucket)
                self.out.write(text)
                bucket.tokens -= cost
                return
        bucket.dropped_lines += 1
        bucket.dropped_bytes += len(raw) + ended

    def _report(self, bucket: Bucket) -> None:
        """Write the bucket's drop notice and charge it for it."""
        text = bucket.notice()
        self.out.write(text)
        bucket.tokens -= len(text)
        bucket.dropped_lines = bucket.dropped_bytes = 0

    async def _report_when_allowed(self, bucket: Bucket) -> None:
        """Report the bucket's drops once it pays for the notice (or after NOTICE_WAIT_MAX)."""
        if bucket.waiting:
            return  # another closing handle of this writer reports them
        bucket.waiting = True
        try:
            self._refill(bucket, self.clock())
            shortfall = len(bucket.notice()) - bucket.tokens
            if shortfall > 0:
                await self.sleep(min(shortfall / self.rate, NOTICE_WAIT_MAX))
                self._refill(bucket, self.clock())
            if bucket.dropped_lines:  # a line of the writer may have reported them meanwhile
                self._report(bucket)
                self.out.flush()
        finally:
            bucket.waiting = False

    @takes(LogHandle)
    async def read(self, req: Request, h: LogHandle, n: int) -> bytes:
        raise SchemeError(errno.EBADF, "the log is write-only")

    @takes(LogHandle)
    async def fsync(self, req: Request, h: LogHandle) -> None:
        self.out.flush()

    @takes(LogRoot, LogHandle)
    async def fstat(self, req: Request, h: LogRoot | LogHandle) -> Stat:
        return ROOT_STAT if h is self._root else Stat(st_mode=stat.S_IFCHR | 0o222)

    @takes(LogRoot, LogHandle)
    async def fpath(self, req: Request, h: LogRoot | LogHandle) -> str:
        tag = h.tag if isinstance(h, LogHandle) else ""
        return f"/scheme/{self.name}/{tag}" if tag else f"/scheme/{self.name}"

    async def close(self, h: LogRoot | LogHandle) -> None:
        if not isinstance(h, LogHandle):
            return
        if h.pending:
            self._line(self._bucket(h.pid), h, bytes(h.pending), ended=False)
            h.pending.clear()
            self.out.flush()
        bucket = self.buckets.get(h.pid) or self.overflow
        if bucket is not None and bucket.dropped_lines:
            await self._report_when_allowed(bucket)


def _positive(text: str) -> int:
    value = int(text)
    if value <= 0:
        raise argparse.ArgumentTypeError(f"{text}: expected a positive number of bytes")
    return value


def add_options(parser: argparse.ArgumentParser) -> None:
    """The daemon's own options: --rate and --burst of each writer's token bucket."""
    parser.add_argument("--rate", type=_positive, default=RATE, metavar="BYTES",
                        help=f"bytes per second each writer pid may log, sustained (default {RATE})")
    parser.add_argument("--burst", type=_positive, default=BURST, metavar="BYTES",
                        help=f"bytes each writer pid may log at once (default {BURST})")


def make_scheme(args: argparse.Namespace) -> LogScheme:
    """The scheme the daemon serves, from its parsed options."""
    # The supervisor's log is a byte file: write it as UTF-8 whatever the locale says.
    sys.stderr.reconfigure(encoding="utf-8", errors="backslashreplace")
    return LogScheme(rate=args.rate, burst=args.burst)


if __name__ == "__main__":
    daemon_cli("redoxcap.schemes.log", make_scheme, add_options)
