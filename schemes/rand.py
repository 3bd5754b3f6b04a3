"""The rand scheme (`/scheme/rand`): reads give random bytes from the host's CSPRNG.

Writes are accepted and dropped, as /dev/urandom takes them (they do not
seed anything here).
"""

from __future__ import annotations

import errno
import os
import stat

from rt import protocol as P
from schemes.framework import Opened, Request, Scheme, SchemeError, daemon_cli


class RandScheme(Scheme):
    """Every open gives a handle that reads as endless random bytes."""

    name = "rand"
    inline_ops = frozenset(P.SCHEME_OPS)

    async def openat(self, req: Request, h, path: str, flags: int, mode: int) -> Opened:
        return Opened(object(), fdflags=flags)

    async def read(self, req: Request, h, n: int) -> bytes:
        if n < 0:
            raise SchemeError(errno.EINVAL)
        return os.urandom(min(n, P.MAX_IO))

    async def write(self, req: Request, h, data: bytes) -> int:
        return len(data)

    async def fstat(self, req: Request, h) -> dict:
        return {"st_mode": stat.S_IFCHR | 0o666}

    async def fpath(self, req: Request, h) -> str:
        return f"/scheme/{self.name}"

    async def dup(self, req: Request, h, buf: bytes) -> Opened:
        return Opened(object())


if __name__ == "__main__":
    daemon_cli("schemes.rand", lambda args: RandScheme())
