"""A tiny scheme daemon of your own, for a `[scheme.NAME]` table of the config file.

    python -m echo_scheme --channel-fd N [--prefix TEXT] [--upper]

`redoxcap up` starts it (and restarts it when it dies) with the channel of a
scheme it registers as NAME; it never runs by hand. Opening
`/scheme/NAME/TEXT` gives a handle that reads back PREFIX + TEXT and a
newline, then whatever is written to it (an echo); `--upper` shouts.
Nothing else: the root opens, handles read and write, the rest is the
framework's errno.

    [scheme.echo]
    module = "echo_scheme"
    cwd = "examples"
    args = ["--prefix", "echo: "]
"""

from __future__ import annotations

import argparse
import errno

from redoxcap.schemes.framework import (
    ROOT_STAT,
    Opened,
    Request,
    Scheme,
    SchemeError,
    daemon_cli,
    takes,
)
from redoxcap.wire import protocol as P
from redoxcap.wire.stat import Stat


class EchoRoot:
    """The scheme's root: the only handle that opens."""


class Echo:
    """An open echo: what is still to be read."""

    def __init__(self, pending: bytes) -> None:
        self.pending = pending


class EchoScheme(Scheme):
    """`/scheme/NAME/TEXT` reads back PREFIX + TEXT, then what is written to it."""

    name = "echo"
    inline_ops = frozenset(P.SCHEME_OPS)  # all in memory: nothing ever waits

    def __init__(self, prefix: str = "", upper: bool = False) -> None:
        self.prefix, self.upper = prefix, upper
        self._root = EchoRoot()

    def root(self) -> EchoRoot:
        return self._root

    def _shape(self, data: bytes) -> bytes:
        return data.upper() if self.upper else data

    @takes(EchoRoot)
    async def openat(self, req: Request, h: EchoRoot, path: str, flags: int, mode: int) -> Opened:
        text = path.strip("/")
        if not text or text == ".":
            raise SchemeError(errno.EISDIR, "open /scheme/NAME/TEXT")
        return Opened(Echo(self._shape(f"{self.prefix}{text}\n".encode())), fdflags=flags)

    @takes(Echo)
    async def read(self, req: Request, h: Echo, n: int) -> bytes:
        if n < 0:
            raise SchemeError(errno.EINVAL)
        chunk, h.pending = h.pending[:n], h.pending[n:]
        return chunk

    @takes(Echo)
    async def write(self, req: Request, h: Echo, data: bytes) -> int:
        h.pending += self._shape(data)
        return len(data)

    @takes(EchoRoot, Echo)
    async def fstat(self, req: Request, h: EchoRoot | Echo) -> Stat:
        return ROOT_STAT if isinstance(h, EchoRoot) else Stat(st_mode=0o100444, st_size=len(h.pending))

    @takes(EchoRoot)
    async def fpath(self, req: Request, h: EchoRoot) -> str:
        return f"/scheme/{self.name}"  # what nsmgr looks for to keep the root as an entry


def _options(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--prefix", default="", help="put before every TEXT read back")
    parser.add_argument("--upper", action="store_true", help="read everything back in capitals")


if __name__ == "__main__":
    daemon_cli("echo_scheme", lambda args: EchoScheme(args.prefix, args.upper), _options)
