"""What null, zero and rand share: character devices with no names and no state.

Every open gives a fresh handle; dup gives another; fstat says S_IFCHR.
Subclasses say what read and write do. Only the root opens (a device handle
names one device, not a directory of them: openat relative to it is
ENOTDIR); the root itself is a search-only directory that cannot be read or
written.
"""

from __future__ import annotations

import errno
import stat

from schemes.framework import ROOT_STAT, Opened, Request, Scheme, SchemeError
from wire import protocol as P
from wire.stat import Stat


class DeviceRoot:
    """The object behind a device scheme's root (handle 0)."""


class DeviceHandle:
    """One open device."""


class DeviceScheme(Scheme):
    """A stateless character device: override read and write (annotate `h: DeviceHandle`:
    the framework answers EBADF on the root)."""

    inline_ops = frozenset(P.SCHEME_OPS)  # nothing here ever waits

    def __init__(self) -> None:
        self._root = DeviceRoot()

    def root(self) -> DeviceRoot:
        return self._root

    async def openat(self, req: Request, h: DeviceRoot, path: str, flags: int, mode: int) -> Opened:
        if path.strip("/") not in ("", "."):
            raise SchemeError(errno.ENOENT, f"{self.name} has no names: open /scheme/{self.name}")
        return Opened(DeviceHandle(), fdflags=flags)

    async def dup(self, req: Request, h: DeviceHandle, buf: bytes) -> Opened:
        if buf:
            raise SchemeError(errno.EINVAL, "devices know no dup buffers")
        return Opened(DeviceHandle())

    async def fstat(self, req: Request, h: DeviceRoot | DeviceHandle) -> Stat:
        if h is self._root:
            return ROOT_STAT
        return Stat(st_mode=stat.S_IFCHR | 0o666)

    async def fpath(self, req: Request, h: DeviceRoot | DeviceHandle) -> str:
        return f"/scheme/{self.name}"
