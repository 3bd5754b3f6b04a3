"""The log scheme in memory (escaping, tags, rate limits), and once through a real system."""

from __future__ import annotations

import errno
import io

import pytest

from schemes.framework import Caller, Request, SchemeError
from schemes.log import LogScheme, escape
from tests.conftest import wait_for


def req(pid: int = 4242) -> Request:
    return Request(Caller(pid, 0, 0), 1, 0)


def lines(out: io.StringIO) -> list[str]:
    return out.getvalue().splitlines()


async def open_log(s: LogScheme, tag: str = "app", pid: int = 4242):
    return (await s.openat(req(pid), s.root(), tag, 0, 0)).obj


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
    await s.write(req(), h, b"\x1b[31mred\x1b[0m\r\n\x1b]0;pwned\x07 \\e\n")
    await s.write(req(), h, b"partial\x1b")
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
    await s.write(req(), h, b"x\n")
    assert lines(out) == ["log[4242] a\\\\x1b: x"]
    with pytest.raises(SchemeError) as exc:
        await s.openat(req(), s.root(), "bad\x1btag", 0, 0)
    assert exc.value.errno == errno.EINVAL


async def test_only_the_root_opens_tags():
    s = LogScheme(io.StringIO())
    h = await open_log(s, "mine")
    untagged = await open_log(s, "")
    for handle in (h, untagged):
        for path in ("other", "", ".", "../other", "/other"):
            with pytest.raises(SchemeError) as exc:
                await s.openat(req(), handle, path, 0, 0)
            assert exc.value.errno == errno.ENOTDIR
    assert await s.fpath(req(), h) == "/scheme/log/mine"
    assert await s.fpath(req(), untagged) == "/scheme/log"


async def test_the_root_itself_is_not_written_to():
    s = LogScheme(io.StringIO())
    with pytest.raises(SchemeError) as exc:
        await s.write(req(), s.root(), b"x\n")
    assert exc.value.errno == errno.EBADF
    await s.close(s.root())  # nothing to flush, no error


def test_a_client_cannot_drive_the_terminal_through_the_log(system):
    code = ("import os, rt\nfd = rt.open('/scheme/log/esc', rt.O_WRONLY)\n"
            "rt.write(fd, b'\\x1b[2J\\x1b]0;owned\\x07\\rlog[1] root: forged\\n')\n"
            "rt.write(fd, b'done\\n')\nprint(os.getpid())\n")
    pid = system.python(code).stdout.strip()
    log = wait_for(lambda: f"log[{pid}] esc: done" in system.log() and system.log())
    assert f"log[{pid}] esc: \\x1b[2J\\x1b]0;owned\\x07\\x0dlog[1] root: forged\n" in log
    assert "\x1b" not in log and "\r" not in log and "\x07" not in log
