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

from schemes.framework import Opened, Request, Scheme, SchemeError
from wire import protocol as P


class DeviceRoot:
    """The object behind a device scheme's root (handle 0)."""


class DeviceHandle:
    """One open device."""


class DeviceScheme(Scheme):
    """A stateless character device: override read and write (called with a DeviceHandle)."""

    inline_ops = frozenset(P.SCHEME_OPS)  # nothing here ever waits

    def __init__(self) -> None:
        self._root = DeviceRoot()

    def root(self) -> DeviceRoot:
        return self._root

    def device(self, h: object) -> DeviceHandle:
        """h as an open device; EBADF for the root."""
        if not isinstance(h, DeviceHandle):
            raise SchemeError(errno.EBADF, "the scheme's root is not a device")
        return h

    async def openat(self, req: Request, h, path: str, flags: int, mode: int) -> Opened:
        if h is not self._root:
            raise SchemeError(errno.ENOTDIR, "a device is not a directory")
        if path.strip("/") not in ("", "."):
            raise SchemeError(errno.ENOENT, f"{self.name} has no names: open /scheme/{self.name}")
        return Opened(DeviceHandle(), fdflags=flags)

    async def dup(self, req: Request, h, buf: bytes) -> Opened:
        if buf:
            raise SchemeError(errno.EINVAL, "devices know no dup buffers")
        self.device(h)
        return Opened(DeviceHandle())

    async def fstat(self, req: Request, h) -> dict:
        if h is self._root:
            return {"st_mode": stat.S_IFDIR | 0o111, "st_nlink": 2}
        return {"st_mode": stat.S_IFCHR | 0o666}

    async def fpath(self, req: Request, h) -> str:
        return f"/scheme/{self.name}"
