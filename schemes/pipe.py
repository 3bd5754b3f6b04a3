"""The pipe scheme (`/scheme/pipe`): POSIX pipes between any holders of its fds.

Opening `/scheme/pipe` makes a new pipe and returns its read end;
`dup(read_end, b"write")` returns a write end of the same pipe
(`dup(end, b"read")` another reader, `dup(end, b"")` another end of the same
kind). `rt.pipe()` does both. POSIX semantics: a read waits for data and
returns b"" once every write end is closed; a write with no read end left is
EPIPE; the buffer holds PIPE_SIZE bytes, writers wait for room, and writes of
at most PIPE_BUF bytes are never interleaved with others.

Only the scheme root makes pipes: a pipe end names one pipe, not a directory,
so `openat` relative to it is ENOTDIR.
"""

from __future__ import annotations

import errno
import os
import stat
from dataclasses import dataclass, field

from redoxcap.schemes.framework import (
    ROOT_STAT,
    Changed,
    Opened,
    Request,
    Scheme,
    SchemeError,
    daemon_cli,
    takes,
)
from redoxcap.wire import protocol as P
from redoxcap.wire.stat import Stat

PIPE_SIZE = 64 * 1024
PIPE_BUF = 4096
# The root opens (makes) but cannot be listed: a directory with search permission only.


@dataclass(eq=False)
class Pipe:
    data: bytearray = field(default_factory=bytearray)
    readers: int = 0
    writers: int = 0
    changed: Changed = field(default_factory=Changed)


@dataclass(eq=False)
class PipeEnd:
    pipe: Pipe
    writer: bool


class PipeRoot:
    """The object behind the scheme root (handle 0): the only handle that makes pipes."""

    def __repr__(self) -> str:
        return "PipeRoot()"


class PipeScheme(Scheme):
    """Serves anonymous pipes."""

    name = "pipe"

    def __init__(self) -> None:
        self._root = PipeRoot()

    def root(self) -> PipeRoot:
        return self._root

    def _end(self, pipe: Pipe, writer: bool) -> Opened:
        if writer:
            pipe.writers += 1
        else:
            pipe.readers += 1
        return Opened(PipeEnd(pipe, writer), fdflags=os.O_WRONLY if writer else os.O_RDONLY)

    @takes(PipeRoot)
    async def openat(self, req: Request, h: PipeRoot, path: str, flags: int, mode: int) -> Opened:
        if path.strip("/") not in ("", "."):
            raise SchemeError(errno.ENOENT, "pipes have no names: open /scheme/pipe")
        return self._end(Pipe(), writer=False)

    @takes(PipeEnd)
    async def dup(self, req: Request, h: PipeEnd, buf: bytes) -> Opened:
        kinds = {b"": h.writer, b"read": False, b"write": True}
        if buf not in kinds:
            raise SchemeError(errno.EINVAL, 'pipe dup takes b"", b"read" or b"write"')
        return self._end(h.pipe, kinds[buf])

    @takes(PipeEnd)
    async def read(self, req: Request, h: PipeEnd, n: int) -> bytes:
        if h.writer:
            raise SchemeError(errno.EBADF, "a write end")
        if n < 0:
            raise SchemeError(errno.EINVAL)
        pipe = h.pipe
        while not pipe.data:
            if pipe.writers == 0 or n == 0:
                return b""
            await pipe.changed.wait()
        chunk = bytes(pipe.data[: min(n, P.MAX_IO)])
        del pipe.data[: len(chunk)]
        pipe.changed.notify()
        return chunk

    @takes(PipeEnd)
    async def write(self, req: Request, h: PipeEnd, data: bytes) -> int:
        if not h.writer:
            raise SchemeError(errno.EBADF, "a read end")
        pipe = h.pipe
        done = 0
        while done < len(data):
            if pipe.readers == 0:
                if done:
                    return done
                raise SchemeError(errno.EPIPE)
            room = PIPE_SIZE - len(pipe.data)
            atomic = len(data) <= PIPE_BUF
            if room >= len(data) - done or (room > 0 and not atomic):
                take = min(room, len(data) - done)
                pipe.data += data[done : done + take]
                done += take
                pipe.changed.notify()
            else:
                await pipe.changed.wait()
        return done

    @takes(PipeRoot, PipeEnd)
    async def fstat(self, req: Request, h: PipeRoot | PipeEnd) -> Stat:
        if h is self._root:
            return ROOT_STAT
        return Stat(st_mode=stat.S_IFIFO | 0o600, st_size=len(h.pipe.data))

    @takes(PipeRoot)
    async def getdents(self, req: Request, h: PipeRoot, start: int) -> list[str]:
        raise SchemeError(errno.EACCES, "pipes have no names to list")

    @takes(PipeRoot, PipeEnd)
    async def fpath(self, req: Request, h: PipeRoot | PipeEnd) -> str:
        return f"/scheme/{self.name}"

    async def close(self, h: PipeRoot | PipeEnd) -> None:
        if h is not self._root:
            if h.writer:
                h.pipe.writers -= 1
            else:
                h.pipe.readers -= 1
            h.pipe.changed.notify()


if __name__ == "__main__":
    daemon_cli("redoxcap.schemes.pipe", lambda args: PipeScheme())
