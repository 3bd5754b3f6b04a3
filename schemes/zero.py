"""The zero scheme (`/scheme/zero`): reads give zero bytes, writes are taken and dropped."""

from __future__ import annotations

import stat

from rt import protocol as P
from schemes.framework import Opened, Request, Scheme, daemon_cli


class ZeroScheme(Scheme):
    """Every open gives a handle that reads as endless zeros and swallows writes."""

    name = "zero"
    inline_ops = frozenset(P.SCHEME_OPS)

    async def openat(self, req: Request, h, path: str, flags: int, mode: int) -> Opened:
        return Opened(object(), fdflags=flags)

    async def read(self, req: Request, h, n: int) -> bytes:
        return bytes(min(max(n, 0), P.MAX_IO))

    async def write(self, req: Request, h, data: bytes) -> int:
        return len(data)

    async def fstat(self, req: Request, h) -> dict:
        return {"st_mode": stat.S_IFCHR | 0o666}

    async def fpath(self, req: Request, h) -> str:
        return f"/scheme/{self.name}"

    async def dup(self, req: Request, h, buf: bytes) -> Opened:
        return Opened(object())


if __name__ == "__main__":
    daemon_cli("schemes.zero", lambda args: ZeroScheme())
