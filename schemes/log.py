"""The log scheme (`/scheme/log[/TAG]`): lines written to it go to the supervisor's log.

Each complete line is written to this daemon's stderr (which is the
supervisor's log) as `log[PID] TAG: line`, where PID is the writer's pid as
Linux reported it to the router, not what the writer claims. A partial last
line waits for its newline and is flushed when the handle closes; lines
longer than MAX_LINE are split.

What a client writes cannot forge a log line or drive the terminal that shows
the log: every character that is not printable (`str.isprintable`: ESC, CR,
BEL, backspace, DEL, C1 controls, bidi overrides and other format characters)
is shown as `\\xNN`, `\\uNNNN` or `\\UNNNNNNNN`, a byte that is not UTF-8 as
`\\xNN`, and a backslash as `\\\\`, so that no escape can be typed as text.

Only the scheme root opens tags: `openat` relative to a tagged handle is
ENOTDIR, since a log handle names one tag, not a directory of them.
"""

from __future__ import annotations

import errno
import stat
import sys
from dataclasses import dataclass, field
from typing import TextIO

from schemes.framework import Opened, Request, Scheme, SchemeError, daemon_cli

MAX_LINE = 4096


def escape(raw: bytes) -> str:
    """A line as the log shows it: printable text as is, anything else escaped.

    Args:
        raw: what the client wrote, without its newline.

    Returns:
        The text, with non-printable characters and bytes that are not UTF-8
        as backslash escapes and each backslash doubled.
    """
    return escape_text(raw.decode("utf-8", "surrogateescape"))


def escape_text(text: str) -> str:
    """text with non-printable characters as backslash escapes and each backslash doubled."""
    if text.isprintable() and "\\" not in text:
        return text  # the common case: no per-character work
    return "".join(map(_escape_char, text))


def _escape_char(c: str) -> str:
    if c == "\\":
        return "\\\\"
    if c.isprintable():
        return c
    code = ord(c)
    if 0xDC80 <= code <= 0xDCFF:  # surrogateescape's stand-in for a byte that is not UTF-8
        return f"\\x{code - 0xDC00:02x}"
    if code < 0x100:
        return f"\\x{code:02x}"
    if code < 0x10000:
        return f"\\u{code:04x}"
    return f"\\U{code:08x}"


class LogRoot:
    """The object behind the scheme root (handle 0): the only handle that opens tags."""

    def __repr__(self) -> str:
        return "LogRoot()"


@dataclass(eq=False)
class LogHandle:
    tag: str
    pending: bytearray = field(default_factory=bytearray)
    pid: int = 0


class LogScheme(Scheme):
    """Writes lines, tagged with the writer's pid, to stderr."""

    name = "log"

    def __init__(self, out: TextIO | None = None) -> None:
        self.out = out or sys.stderr
        self._root = LogRoot()

    def root(self) -> LogRoot:
        return self._root

    async def openat(self, req: Request, h: LogRoot | LogHandle, path: str, flags: int,
                     mode: int) -> Opened:
        if h is not self._root:
            raise SchemeError(errno.ENOTDIR, "a tagged log handle is not a directory")
        tag = path.strip("/")
        if tag in (".", ""):
            tag = ""
        if len(tag) > 64 or not tag.isprintable():
            raise SchemeError(errno.EINVAL, "a log tag is at most 64 printable characters")
        return Opened(LogHandle(tag, pid=req.caller.pid), fdflags=flags)

    def _emit(self, h: LogHandle, pid: int, line: bytes) -> None:
        text = escape(line)
        prefix = f"log[{pid}] {escape_text(h.tag)}: " if h.tag else f"log[{pid}]: "
        self.out.write(prefix + text + "\n")

    async def write(self, req: Request, h: LogRoot | LogHandle, data: bytes) -> int:
        if not isinstance(h, LogHandle):
            raise SchemeError(errno.EBADF, "the log root is not open for writing")
        h.pid = req.caller.pid
        h.pending += data
        while True:
            end = h.pending.find(b"\n")
            if end < 0 and len(h.pending) < MAX_LINE:
                break
            cut = end if 0 <= end < MAX_LINE else MAX_LINE
            self._emit(h, h.pid, bytes(h.pending[:cut]))
            del h.pending[: cut + (1 if cut == end else 0)]
        self.out.flush()
        return len(data)

    async def read(self, req: Request, h: LogHandle, n: int) -> bytes:
        raise SchemeError(errno.EBADF, "the log is write-only")

    async def fsync(self, req: Request, h: LogHandle) -> None:
        self.out.flush()

    async def fstat(self, req: Request, h) -> dict:
        return {"st_mode": stat.S_IFCHR | 0o222}

    async def fpath(self, req: Request, h: LogRoot | LogHandle) -> str:
        tag = h.tag if isinstance(h, LogHandle) else ""
        return f"/scheme/{self.name}/{tag}" if tag else f"/scheme/{self.name}"

    async def close(self, h: LogRoot | LogHandle) -> None:
        if isinstance(h, LogHandle) and h.pending:
            self._emit(h, h.pid, bytes(h.pending))
            self.out.flush()


if __name__ == "__main__":
    daemon_cli("schemes.log", lambda args: LogScheme())
