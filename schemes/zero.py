"""The zero scheme (`/scheme/zero`): reads give zero bytes, writes are taken and dropped."""

from __future__ import annotations

import errno

from schemes.device import DeviceScheme
from schemes.framework import Request, SchemeError, daemon_cli
from wire import protocol as P


class ZeroScheme(DeviceScheme):
    """Every open gives a handle that reads as endless zeros and swallows writes."""

    name = "zero"

    async def read(self, req: Request, h, n: int) -> bytes:
        self.device(h)
        if n < 0:
            raise SchemeError(errno.EINVAL)
        return bytes(min(n, P.MAX_IO))

    async def write(self, req: Request, h, data: bytes) -> int:
        self.device(h)
        return len(data)


if __name__ == "__main__":
    daemon_cli("schemes.zero", lambda args: ZeroScheme())
