"""What null, zero and rand share: character devices with no names and no state.

Every open gives a fresh handle; dup gives another; fstat says S_IFCHR.
Subclasses say what read and write do.
"""

from __future__ import annotations

import stat

from rt import protocol as P
from schemes.framework import Opened, Request, Scheme


class DeviceScheme(Scheme):
    """A stateless character device: override read and write."""

    inline_ops = frozenset(P.SCHEME_OPS)  # nothing here ever waits

    async def openat(self, req: Request, h, path: str, flags: int, mode: int) -> Opened:
        return Opened(object(), fdflags=flags)

    async def dup(self, req: Request, h, buf: bytes) -> Opened:
        return Opened(object())

    async def fstat(self, req: Request, h) -> dict:
        return {"st_mode": stat.S_IFCHR | 0o666}

    async def fpath(self, req: Request, h) -> str:
        return f"/scheme/{self.name}"
