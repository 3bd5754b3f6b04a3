"""The log scheme (`/scheme/log[/TAG]`): lines written to it go to the supervisor's log.

Each complete line is written to this daemon's stderr (which is the
supervisor's log) as `log[PID] TAG: line`, where PID is the writer's pid as
Linux reported it to the router, not what the writer claims. A partial last
line waits for its newline and is flushed when the handle closes; lines
longer than MAX_LINE bytes are split, so a handle never holds more than
MAX_LINE bytes of a partial line.

The log is lossy by design, like syslog's rate limiting: each client has a
token bucket of BURST bytes refilled at RATE bytes per second (`--burst`,
`--rate`), charged with what each line takes in the log, prefix included. A
client is the router account the request is for (`Request.account`, which
the router fills in): all its processes, however many it runs, share one
bucket, while each line still names the process that wrote it. A line its
bucket cannot pay for is dropped, and the write still returns len(data): a
client is never blocked by the log, and what one client can log is bounded.
Once the client may log again (before its next line), and when a handle
written to closes, the log says
`log[PID]: (dropped N lines, M bytes of account A)`, PID being the process
that wrote last and M counting the bytes the client wrote; the notice is
charged too, so a client cannot use it to log more. At most MAX_WRITERS
buckets are kept: a new client takes the place of the least recently used
one once that is idle (full again), else it shares one overflow bucket with
every other such client.

The system's own processes (the supervisor, the daemons, and processes the
owner gives a namespace outside any `run`) write in the system account
(SYSTEM_ACCOUNT), which no client's request carries: a request a daemon makes
while serving a client's (`SERVING`) carries that client's account and pid,
and is the client's line. The system's writers are kept apart from the
clients': each of its processes has a bucket of its own (`log[PID]: (dropped
N lines, M bytes)`), in a table of its own with an overflow of its own, so
that no client, nor every client together, can spend what the system's own
logging needs, and no daemon what another's needs.

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
BURST = 64 * 1024  # bytes of log one client (or one system process) may write at once
RATE = 16 * 1024  # bytes of log per second one client (or one system process) may sustain
MAX_WRITERS = 1024  # token buckets kept per table; beyond, an idle one is forgotten or writers share one
SYSTEM_ACCOUNT = 0  # the router's account of the system's own processes (kernel/accounts.py)
NOTICE_WAIT_MAX = 1.0  # seconds a closing handle waits for its writer to afford the drop notice


class LogRoot:
    """The object behind the scheme root (handle 0): the only handle that opens tags."""

    def __repr__(self) -> str:
        return "LogRoot()"


@dataclass(eq=False)
class LogHandle:
    """One open `/scheme/log[/TAG]`: its tag, the partial line it holds and its last writer
    (its pid and the router account it wrote for)."""

    tag: str
    pending: bytearray = field(default_factory=bytearray)
    pid: int = 0
    account: int = SYSTEM_ACCOUNT

    def prefix(self) -> str:
        return f"log[{self.pid}] {escape_text(self.tag)}: " if self.tag else f"log[{self.pid}]: "


@dataclass(eq=False)
class Bucket:
    """What one writer may still log (a token bucket, in bytes) and what it lost.

    A writer is a client account, or a process of the system (see BucketTable);
    `key` names it there, None for the bucket shared by writers beyond MAX_WRITERS.
    """

    key: int | None
    system: bool  # key is a pid of the system's, not a client account
    tokens: float
    stamp: float  # when tokens was last brought up to date
    pid: int = 0  # the process that last drew on it
    dropped_lines: int = 0
    dropped_bytes: int = 0
    waiting: bool = False  # a closing handle waits to report the drops

    def notice(self) -> str:
        lost = f"dropped {self.dropped_lines} lines, {self.dropped_bytes} bytes"
        if self.key is None:
            beyond = "system processes" if self.system else "clients"
            return f"log ({beyond} beyond {MAX_WRITERS}): ({lost})\n"
        if self.system:
            return f"log[{self.key}]: ({lost})\n"
        return f"log[{self.pid}]: ({lost} of account {self.key})\n"


@dataclass(eq=False)
class BucketTable:
    """The buckets of one kind of writer, by key, least recently used first.

    The clients' table is keyed by router account, the system's by pid; at
    most MAX_WRITERS buckets each, and an overflow bucket of its own for
    writers beyond them (LogScheme._bucket).
    """

    system: bool
    buckets: OrderedDict[int, Bucket] = field(default_factory=OrderedDict)
    overflow: Bucket | None = None

    def current(self, key: int) -> Bucket | None:
        """The bucket key's writer draws on now, if it has one (its own, else the overflow)."""
        return self.buckets.get(key) or self.overflow


class LogScheme(Scheme):
    """Writes lines, tagged with the writer's pid, to stderr, within each client's budget.

    Args:
        out: where lines go (default: stderr, the supervisor's log).
        rate: bytes of log per second each client (router account), and each process
            of the system, may sustain.
        burst: bytes of log each client, and each process of the system, may write at once.
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
        self.clients = BucketTable(system=False)  # by router account
        self.system = BucketTable(system=True)  # by pid: the system account's own processes

    def root(self) -> LogRoot:
        return self._root

    @takes(LogRoot)
    async def openat(self, req: Request, h: LogRoot, path: str, flags: int, mode: int) -> Opened:
        tag = path.strip("/")
        if tag in (".", ""):
            tag = ""
        if len(tag) > 64 or not tag.isprintable():
            raise SchemeError(errno.EINVAL, "a log tag is at most 64 printable characters")
        return Opened(LogHandle(tag, pid=req.caller.pid, account=req.account), fdflags=flags)

    @takes(LogRoot, LogHandle)
    async def write(self, req: Request, h: LogRoot | LogHandle, data: bytes) -> int:
        if not isinstance(h, LogHandle):
            raise SchemeError(errno.EBADF, "the log root is not open for writing")
        h.pid, h.account = req.caller.pid, req.account
        bucket = self._bucket(h)
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

    def _table(self, h: LogHandle) -> tuple[BucketTable, int]:
        """Where the budget of h's last writer is kept, and its key there."""
        if h.account == SYSTEM_ACCOUNT:
            return self.system, h.pid
        return self.clients, h.account

    def _bucket(self, h: LogHandle) -> Bucket:
        """The bucket of h's last writer, brought up to date; the least recently used one
        of its table makes room if idle."""
        table, key = self._table(h)
        buckets, now = table.buckets, self.clock()
        bucket = buckets.get(key)
        if bucket is not None:
            buckets.move_to_end(key)
        elif len(buckets) < MAX_WRITERS:
            bucket = buckets[key] = Bucket(key, table.system, float(self.burst), now)
        else:
            oldest = next(iter(buckets.values()))
            self._refill(oldest, now)
            if oldest.tokens < self.burst or oldest.waiting:
                # No idle bucket to forget: a writer beyond MAX_WRITERS shares one budget,
                # so many writers cannot each get a fresh burst again and again.
                if table.overflow is None:
                    table.overflow = Bucket(None, table.system, float(self.burst), now)
                bucket = table.overflow
            else:
                if oldest.dropped_lines:
                    self.out.write(oldest.notice())
                del buckets[oldest.key]
                bucket = buckets[key] = Bucket(key, table.system, float(self.burst), now)
        bucket.pid = h.pid
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
            self._line(self._bucket(h), h, bytes(h.pending), ended=False)
            h.pending.clear()
            self.out.flush()
        table, key = self._table(h)
        bucket = table.current(key)
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
                        help=("bytes per second each client (router account; all its processes "
                              f"together) and each system process may log, sustained (default {RATE})"))
    parser.add_argument("--burst", type=_positive, default=BURST, metavar="BYTES",
                        help=("bytes each client (all its processes together) and each system "
                              f"process may log at once (default {BURST})"))


def make_scheme(args: argparse.Namespace) -> LogScheme:
    """The scheme the daemon serves, from its parsed options."""
    # The supervisor's log is a byte file: write it as UTF-8 whatever the locale says.
    sys.stderr.reconfigure(encoding="utf-8", errors="backslashreplace")
    return LogScheme(rate=args.rate, burst=args.burst)


if __name__ == "__main__":
    daemon_cli("redoxcap.schemes.log", make_scheme, add_options)
