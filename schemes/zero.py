"""The zero scheme (`/scheme/zero`): reads give zero bytes, writes are taken and dropped."""

from __future__ import annotations

import errno

from redoxcap.schemes.device import DeviceHandle, DeviceScheme
from redoxcap.schemes.framework import Request, SchemeError, daemon_cli, takes
from redoxcap.wire import protocol as P


class ZeroScheme(DeviceScheme):
    """Every open gives a handle that reads as endless zeros and swallows writes."""

    name = "zero"
    host_device = "/dev/zero"

    @takes(DeviceHandle)
    async def read(self, req: Request, h: DeviceHandle, n: int) -> bytes:
        if n < 0:
            raise SchemeError(errno.EINVAL)
        return bytes(min(n, P.MAX_IO))

    @takes(DeviceHandle)
    async def write(self, req: Request, h: DeviceHandle, data: bytes) -> int:
        return len(data)


if __name__ == "__main__":
    daemon_cli("redoxcap.schemes.zero", lambda args: ZeroScheme())
