"""The log scheme in memory (escaping, tags, rate limits), and through a real system."""

from __future__ import annotations

import argparse
import errno
import io
import re

import pytest
import trio

from redoxcap.schemes.framework import Caller, Request, SchemeError, invoke
from redoxcap.schemes.log import (
    BURST,
    MAX_LINE,
    MAX_WRITERS,
    NOTICE_WAIT_MAX,
    RATE,
    SYSTEM_ACCOUNT,
    LogScheme,
    add_options,
    escape,
)
from redoxcap.testing import wait_for

CLIENT = 7  # the router account of the client the requests below are for


def req(pid: int = 4242, account: int = CLIENT) -> Request:
    return Request(Caller(pid, 0, 0), 1, 0, account=account)


def lines(out: io.StringIO) -> list[str]:
    return out.getvalue().splitlines()


async def open_log(s: LogScheme, tag: str = "app", pid: int = 4242, account: int = CLIENT):
    return (await invoke(s, req(pid, account), s.root(), "openat", tag, 0, 0)).obj


@pytest.mark.parametrize(("raw", "shown"), [
    (b"plain text: ok", "plain text: ok"),
    (b"\x1b[2J\x1b]0;title\x07", "\\x1b[2J\\x1b]0;title\\x07"),
    (b"ok\rlog[1] root: forged", "ok\\x0dlog[1] root: forged"),
    (b"tab\there\x08\x7f", "tab\\x09here\\x08\\x7f"),
    ("c1 \u0085\u009b".encode(), "c1 \\x85\\x9b"),
    ("bidi \u202egnp.exe \u2066x\u2069".encode(), "bidi \\u202egnp.exe \\u2066x\\u2069"),
    ("zero\u200bwidth \ufeff".encode(), "zero\\u200bwidth \\ufeff"),
    ("line\u2028sep".encode(), "line\\u2028sep"),
    ("private \U000f0000".encode(), "private \\U000f0000"),
    (b"not utf-8 \xff\xc3(", "not utf-8 \\xff\\xc3("),
    (b"typed \\x1b stays text", "typed \\\\x1b stays text"),
    ("printable é ✓ 日本".encode(), "printable é ✓ 日本"),
])
def test_escape_shows_every_unprintable_character_as_an_escape(raw, shown):
    assert escape(raw) == shown
    assert escape(raw).isprintable()


async def test_control_characters_written_to_the_log_arrive_escaped():
    out = io.StringIO()
    s = LogScheme(out)
    h = await open_log(s)
    await invoke(s, req(), h, "write", b"\x1b[31mred\x1b[0m\r\n\x1b]0;pwned\x07 \\e\n")
    await invoke(s, req(), h, "write", b"partial\x1b")
    await s.close(h)
    assert lines(out) == [
        "log[4242] app: \\x1b[31mred\\x1b[0m\\x0d",
        "log[4242] app: \\x1b]0;pwned\\x07 \\\\e",
        "log[4242] app: partial\\x1b",
    ]


async def test_a_tag_may_hold_a_backslash_but_not_forge_an_escape():
    out = io.StringIO()
    s = LogScheme(out)
    h = await open_log(s, "a\\x1b")
    await invoke(s, req(), h, "write", b"x\n")
    assert lines(out) == ["log[4242] a\\\\x1b: x"]
    with pytest.raises(SchemeError) as exc:
        await invoke(s, req(), s.root(), "openat", "bad\x1btag", 0, 0)
    assert exc.value.errno == errno.EINVAL


async def test_only_the_root_opens_tags():
    s = LogScheme(io.StringIO())
    h = await open_log(s, "mine")
    untagged = await open_log(s, "")
    for handle in (h, untagged):
        for path in ("other", "", ".", "../other", "/other"):
            with pytest.raises(SchemeError) as exc:
                await invoke(s, req(), handle, "openat", path, 0, 0)
            assert exc.value.errno == errno.ENOTDIR
    assert await invoke(s, req(), h, "fpath") == "/scheme/log/mine"
    assert await invoke(s, req(), untagged, "fpath") == "/scheme/log"


async def test_the_root_itself_is_not_written_to():
    s = LogScheme(io.StringIO())
    with pytest.raises(SchemeError) as exc:
        await invoke(s, req(), s.root(), "write", b"x\n")
    assert exc.value.errno == errno.EBADF
    await s.close(s.root())  # nothing to flush, no error


def test_a_client_cannot_drive_the_terminal_through_the_log(redoxcap_system):
    code = ("import os, rt\nfd = rt.open('/scheme/log/esc', rt.O_WRONLY)\n"
            "rt.write(fd, b'\\x1b[2J\\x1b]0;owned\\x07\\rlog[1] root: forged\\n')\n"
            "rt.write(fd, b'done\\n')\nprint(os.getpid())\n")
    pid = redoxcap_system.python(code).stdout.strip()
    log = wait_for(lambda: f"log[{pid}] esc: done" in redoxcap_system.log() and redoxcap_system.log())
    assert f"log[{pid}] esc: \\x1b[2J\\x1b]0;owned\\x07\\x0dlog[1] root: forged\n" in log
    assert "\x1b" not in log and "\r" not in log and "\x07" not in log


class FakeClock:
    """A clock that moves only when told to, or by what the scheme sleeps."""

    def __init__(self) -> None:
        self.now = 0.0
        self.slept: list[float] = []

    def __call__(self) -> float:
        return self.now

    async def sleep(self, seconds: float) -> None:
        self.slept.append(seconds)
        await trio.lowlevel.checkpoint()  # others run meanwhile, as in a real sleep
        self.now += seconds


def limited(**kw) -> tuple[LogScheme, io.StringIO, FakeClock]:
    out, clock = io.StringIO(), FakeClock()
    return LogScheme(out, clock=clock, sleep=clock.sleep, **kw), out, clock


def notices(out: io.StringIO) -> list[tuple[int, int]]:
    """(lines, bytes) of each drop notice in out (a client's, or a system process's)."""
    found = re.findall(r"^log\[\d+\]: \(dropped (\d+) lines, (\d+) bytes(?: of account \d+)?\)$",
                       out.getvalue(), re.MULTILINE)
    return [(int(n), int(m)) for n, m in found]


async def test_a_flood_is_cut_to_the_burst_and_counted_once_the_writer_may_log_again():
    s, out, clock = limited()
    h = await open_log(s)
    line = b"x" * 99 + b"\n"
    chunk = line * (128 * 1024 // len(line))
    total = 0
    while total < 10 * 1024 * 1024:
        assert await invoke(s, req(), h, "write", chunk) == len(chunk)  # lossy, never an error
        total += len(chunk)
    assert BURST - 200 < len(out.getvalue()) <= BURST
    assert notices(out) == []
    clock.now += 1.0
    await invoke(s, req(), h, "write", b"after\n")
    shown = lines(out)
    assert shown[-1] == "log[4242] app: after"
    [(n, m)] = notices(out)
    logged = sum(1 for x in shown if x.startswith("log[4242] app: x"))
    assert n + logged == total // len(line) and m + logged * len(line) == total


async def test_a_writer_sustains_the_rate_and_no_more():
    s, out, clock = limited(rate=1000, burst=4000)
    h = await open_log(s)
    for _ in range(600):  # 60 s at 10 lines of 500 bytes per 0.1 s: far beyond the rate
        await invoke(s, req(), h, "write", (b"y" * 499 + b"\n") * 10)
        clock.now += 0.1
    assert len(out.getvalue()) <= 4000 + 1000 * 60
    assert len(out.getvalue()) > 1000 * 60 * 0.9  # and it gets about what it may
    await s.close(h)
    assert notices(out)


async def test_empty_lines_are_charged_for_the_prefix_they_cost():
    s, out, _ = limited()
    h = await open_log(s, "t" * 64)
    await invoke(s, req(), h, "write", b"\n" * 100_000)
    assert len(out.getvalue()) <= BURST


async def test_escapes_are_charged_as_written():
    s, out, _ = limited()
    h = await open_log(s)
    await invoke(s, req(), h, "write", (b"\x1b" * 1000 + b"\n") * 100)  # each byte becomes four
    assert len(out.getvalue()) <= BURST


async def test_a_closing_handle_reports_what_its_writer_lost():
    s, out, clock = limited(rate=100, burst=1000)
    h = await open_log(s)
    line = b"z" * (1000 - len("log[4242] app: \n")) + b"\n"  # costs the whole burst
    await invoke(s, req(), h, "write", line * 3 + b"partial")
    assert len(lines(out)) == 1
    await s.close(h)
    notice = f"log[4242]: (dropped 3 lines, 1977 bytes of account {CLIENT})"
    assert lines(out)[1:] == [notice]
    assert clock.slept == [pytest.approx((len(notice) + 1) / 100)]  # until it could pay for it


async def test_reopening_to_get_notices_logs_no_more_than_the_rate():
    s, out, clock = limited()
    h = await open_log(s)
    await invoke(s, req(), h, "write", b"w" * 100 + b"\n" * 2000)  # spend the whole burst
    for _ in range(2000):
        h = await open_log(s)
        await invoke(s, req(), h, "write", b"x\n")
        await s.close(h)
    assert len(out.getvalue()) <= BURST + RATE * clock.now + 100


async def test_the_notice_waits_only_so_long_when_the_rate_is_tiny():
    s, out, clock = limited(rate=1, burst=100)
    h = await open_log(s)
    await invoke(s, req(), h, "write", b"a" * 200 + b"\n")  # longer than the burst: it may go into debt
    await invoke(s, req(), h, "write", b"a" * 200 + b"\n")
    await s.close(h)
    assert clock.slept == [NOTICE_WAIT_MAX] and notices(out) == [(1, 201)]


async def test_two_handles_closing_at_once_report_the_drops_once():
    s, out, _ = limited(rate=10, burst=100)
    a, b = await open_log(s), await open_log(s)
    await invoke(s, req(), a, "write", b"a" * 100 + b"\n")  # spends the whole burst
    await invoke(s, req(), a, "write", b"a" * 200 + b"\n")
    await invoke(s, req(), b, "write", b"b" * 200 + b"\n")
    async with trio.open_nursery() as nursery:
        nursery.start_soon(s.close, a)
        nursery.start_soon(s.close, b)
    assert notices(out) == [(2, 402)]


async def test_a_clients_processes_share_one_budget_and_each_line_names_its_writer():
    s, out, clock = limited()
    handles = [await open_log(s, pid=pid) for pid in range(1, 201)]
    for _ in range(50):  # 200 processes of one client, 5 s at 10 lines of 1,000 bytes each
        for pid, h in enumerate(handles, start=1):
            await invoke(s, req(pid), h, "write", (b"y" * 999 + b"\n") * 10)
        clock.now += 0.1
    assert len(out.getvalue()) <= BURST + RATE * clock.now
    writers = {int(x.split("]")[0].removeprefix("log[")) for x in lines(out)}
    assert len(writers) > 1 and writers <= set(range(1, 201))
    for h in handles:
        await s.close(h)
    shown = [x for x in lines(out) if "dropped" in x]
    assert shown and all(x.endswith(f" bytes of account {CLIENT})") for x in shown)


async def test_each_client_account_has_its_own_budget():
    s, out, _ = limited()
    h = await open_log(s)
    await invoke(s, req(1, account=1), h, "write", b"\n" * 10_000)  # spends the burst
    await invoke(s, req(2, account=1), h, "write", b"same client\n")
    await invoke(s, req(3, account=2), h, "write", b"another client\n")
    assert "log[2] app: same client" not in lines(out)
    assert "log[3] app: another client" in lines(out)


async def test_no_client_can_spend_what_the_systems_own_processes_may_log():
    s, out, clock = limited()
    h = await open_log(s)
    # More busy clients than the table keeps: the last ones share its overflow bucket.
    for account in range(1, MAX_WRITERS + 100):
        await invoke(s, req(account, account), h, "write", b"x" * 1000 + b"\n" * 1000)
    assert s.clients.overflow is not None and s.system.overflow is None
    for pid in (10, 11):  # two daemons: each has a budget of its own
        await invoke(s, req(pid, SYSTEM_ACCOUNT), h, "write", (b"d" * 999 + b"\n") * 60)
        assert lines(out)[-60:] == [f"log[{pid}] app: " + "d" * 999] * 60
    await invoke(s, req(10, SYSTEM_ACCOUNT), h, "write", b"\n" * 1000)  # beyond its burst
    clock.now += 1.0
    await invoke(s, req(10, SYSTEM_ACCOUNT), h, "write", b"again\n")
    assert re.fullmatch(r"log\[10\]: \(dropped \d+ lines, \d+ bytes\)", lines(out)[-2])
    assert lines(out)[-1] == "log[10] app: again"


async def test_partial_lines_stay_bounded_per_handle():
    s, out, _ = limited(burst=10**9)
    h = await open_log(s)
    for _ in range(100):
        await invoke(s, req(), h, "write", b"p" * 1000)
        assert len(h.pending) <= MAX_LINE
    # A line of exactly MAX_LINE bytes is one line, not a split and an empty one.
    await invoke(s, req(), h, "write", b"q" * (MAX_LINE - len(h.pending)) + b"\nnext\n")
    shown = [x.removeprefix("log[4242] app: ") for x in lines(out)]
    assert shown[-1] == "next"
    assert [len(x) for x in shown[:-1]] == [MAX_LINE] * (100_000 // MAX_LINE + 1)
    assert "".join(shown[:-1]).rstrip("q") == "p" * 100_000


@pytest.mark.parametrize("system", [False, True], ids=["client accounts", "system processes"])
async def test_the_buckets_kept_are_bounded_and_idle_ones_are_forgotten(system):
    s, out, clock = limited()
    h = await open_log(s)
    table = s.system if system else s.clients

    def writer(n: int) -> Request:  # client n's process n, or the system's process n
        return req(n, SYSTEM_ACCOUNT if system else n)

    for n in range(1, MAX_WRITERS + 1):
        await invoke(s, writer(n), h, "write", b"hello\n")
    assert len(table.buckets) == MAX_WRITERS
    # Every bucket spent a little and none is idle yet: newcomers share one.
    for n in range(MAX_WRITERS + 1, MAX_WRITERS + 200):
        await invoke(s, writer(n), h, "write", b"x" * 1000 + b"\n" * 1000)
    assert len(table.buckets) == MAX_WRITERS and table.overflow is not None
    overflow = [x for x in lines(out) if x.startswith(f"log[{MAX_WRITERS + 1}")]
    assert len(out.getvalue()) <= MAX_WRITERS * 50 + BURST
    assert overflow
    clock.now += 10.0  # every bucket is full again
    await invoke(s, writer(99999), h, "write", b"newcomer\n")
    assert len(table.buckets) == MAX_WRITERS and 1 not in table.buckets and 99999 in table.buckets
    assert lines(out)[-1] == "log[99999] app: newcomer"


def test_the_daemon_takes_rate_and_burst_options():
    parser = argparse.ArgumentParser()
    add_options(parser)
    args = parser.parse_args([])
    assert (args.rate, args.burst) == (RATE, BURST)
    args = parser.parse_args(["--rate", "100", "--burst", "1000"])
    assert (args.rate, args.burst) == (100, 1000)
    for bad in (["--rate", "0"], ["--burst", "-1"], ["--rate", "fast"]):
        with pytest.raises(SystemExit):
            parser.parse_args(bad)


# 200 log handles, one per forked process, each writing 30 lines of 4,000 bytes per call
# for 5 s: one client, many processes.
LOG_FLOODER = r"""
import os, time, rt
from redoxcap.wire.call import call
from redoxcap.wire import protocol as P
handles = [rt.open("/scheme/log/t") for _ in range(200)]
lines = (b"y" * 4000 + b"\n") * 30
end = time.monotonic() + 5
children = []
for h in handles:
    pid = os.fork()
    if pid == 0:
        while time.monotonic() < end:
            call(h, P.WRITE, [lines])
        os._exit(0)
    children.append(pid)
for pid in children:
    os.waitpid(pid, 0)
"""


def test_what_one_client_logs_is_bounded_however_many_processes_it_runs(redoxcap_system):
    """A client's processes share one budget (BURST at once, RATE a second: some 144 KiB
    in 5 s); with a budget per pid, 200 processes logged 26 MiB in 5 s (found by a
    red-team pass)."""
    log = redoxcap_system.state_dir / "supervisor.log"
    before = log.stat().st_size
    redoxcap_system.python(LOG_FLOODER, timeout=120)
    grown = log.stat().st_size - before
    assert grown < 4 * 1024 * 1024, f"one client logged {grown // (1024 * 1024)} MiB in 5 s"
    written = wait_for(lambda: " bytes of account " in redoxcap_system.log()
                       and redoxcap_system.log())
    writers = set(re.findall(r"log\[(\d+)\] t: y", written))
    assert len(writers) > 1  # each line names the process that wrote it
