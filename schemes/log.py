"""The log scheme (`/scheme/log[/TAG]`): lines written to it go to the supervisor's log.

Each complete line is written to this daemon's stderr (which is the
supervisor's log) as `log[PID] TAG: line`, where PID is the writer's pid as
Linux reported it to the router, not what the writer claims. A partial last
line waits for its newline and is flushed when the handle closes; invalid
UTF-8 is shown with backslash escapes; lines longer than MAX_LINE are split.
"""

from __future__ import annotations

import errno
import stat
import sys
from dataclasses import dataclass, field

from schemes.framework import Opened, Request, Scheme, SchemeError, daemon_cli

MAX_LINE = 4096


@dataclass(eq=False)
class LogHandle:
    tag: str
    pending: bytearray = field(default_factory=bytearray)
    pid: int = 0


class LogScheme(Scheme):
    """Writes lines, tagged with the writer's pid, to stderr."""

    name = "log"

    def __init__(self, out=None) -> None:
        self.out = out or sys.stderr

    async def openat(self, req: Request, h, path: str, flags: int, mode: int) -> Opened:
        tag = path.strip("/")
        if tag in (".", ""):
            tag = ""
        if len(tag) > 64 or not tag.isprintable():
            raise SchemeError(errno.EINVAL, "a log tag is at most 64 printable characters")
        return Opened(LogHandle(tag, pid=req.caller.pid), fdflags=flags)

    def _emit(self, h: LogHandle, pid: int, line: bytes) -> None:
        text = line.decode("utf-8", "backslashreplace")
        prefix = f"log[{pid}] {h.tag}: " if h.tag else f"log[{pid}]: "
        self.out.write(prefix + text + "\n")

    async def write(self, req: Request, h: LogHandle, data: bytes) -> int:
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

    async def fpath(self, req: Request, h: LogHandle) -> str:
        return f"/scheme/{self.name}/{h.tag}" if h.tag else f"/scheme/{self.name}"

    async def close(self, h: LogHandle) -> None:
        if h.pending:
            self._emit(h, h.pid, bytes(h.pending))
            self.out.flush()


if __name__ == "__main__":
    daemon_cli("schemes.log", lambda args: LogScheme())
