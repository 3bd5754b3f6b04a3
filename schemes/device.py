"""What null, zero and rand share: character devices with no names and no state.

Every open gives a fresh handle; dup gives another; fstat says S_IFCHR.
Subclasses say what read and write do. Only the root opens (a device handle
names one device, not a directory of them: openat relative to it is
ENOTDIR); the root itself is a search-only directory that cannot be read or
written.

Passthrough: an open with O_PASSTHROUGH, for an access the host's own device
gives the same way (`passthrough_modes`), is answered with a host fd of that
device (`host_device`), so reads and writes are native; any other open gets a
handle.
"""

from __future__ import annotations

import errno
import os
import stat

from redoxcap.schemes.framework import ROOT_STAT, Opened, Reply, Request, Scheme, SchemeError, takes
from redoxcap.wire import protocol as P
from redoxcap.wire.stat import Stat


class DeviceRoot:
    """The object behind a device scheme's root (handle 0)."""


class DeviceHandle:
    """One open device."""


class DeviceScheme(Scheme):
    """A stateless character device: override read and write (with `@takes(DeviceHandle)`:
    the framework answers EBADF on the root)."""

    inline_ops = frozenset(P.SCHEME_OPS)  # nothing here ever waits
    host_device = ""  # the host's device that behaves the same (for O_PASSTHROUGH)
    passthrough_modes = frozenset({os.O_RDONLY, os.O_WRONLY, os.O_RDWR})  # ...for these

    def __init__(self) -> None:
        self._root = DeviceRoot()

    def root(self) -> DeviceRoot:
        return self._root

    @takes(DeviceRoot)
    async def openat(self, req: Request, h: DeviceRoot, path: str, flags: int, mode: int) -> Opened:
        if path.strip("/") not in ("", "."):
            raise SchemeError(errno.ENOENT, f"{self.name} has no names: open /scheme/{self.name}")
        access = flags & os.O_ACCMODE
        if (flags & P.O_PASSTHROUGH and self.host_device and access in self.passthrough_modes
                and not flags & (os.O_PATH | os.O_DIRECTORY)):
            fd = os.open(self.host_device, access | os.O_CLOEXEC | os.O_NOCTTY
                         | (flags & os.O_NONBLOCK))
            return Reply(None, [fd])  # the framework closes our copy once it is sent
        return Opened(DeviceHandle(), fdflags=flags & ~P.O_PASSTHROUGH)

    @takes(DeviceHandle)
    async def dup(self, req: Request, h: DeviceHandle, buf: bytes) -> Opened:
        if buf:
            raise SchemeError(errno.EINVAL, "devices know no dup buffers")
        return Opened(DeviceHandle())

    @takes(DeviceRoot, DeviceHandle)
    async def fstat(self, req: Request, h: DeviceRoot | DeviceHandle) -> Stat:
        if h is self._root:
            return ROOT_STAT
        return Stat(st_mode=stat.S_IFCHR | 0o666)

    @takes(DeviceRoot, DeviceHandle)
    async def fpath(self, req: Request, h: DeviceRoot | DeviceHandle) -> str:
        return f"/scheme/{self.name}"
