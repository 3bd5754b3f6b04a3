"""The rand scheme (`/scheme/rand`): reads give random bytes from the host's CSPRNG.

Writes are accepted and dropped, as /dev/urandom takes them (they do not
seed anything here).
"""

from __future__ import annotations

import errno
import os

from redoxcap.schemes.device import DeviceHandle, DeviceScheme
from redoxcap.schemes.framework import Request, SchemeError, daemon_cli, takes
from redoxcap.wire import protocol as P


class RandScheme(DeviceScheme):
    """Every open gives a handle that reads as endless random bytes."""

    name = "rand"
    host_device = "/dev/urandom"
    passthrough_modes = frozenset({os.O_RDONLY})  # the host's takes writes as seed input

    @takes(DeviceHandle)
    async def read(self, req: Request, h: DeviceHandle, n: int) -> bytes:
        if n < 0:
            raise SchemeError(errno.EINVAL)
        return os.urandom(min(n, P.MAX_IO))

    @takes(DeviceHandle)
    async def write(self, req: Request, h: DeviceHandle, data: bytes) -> int:
        return len(data)


if __name__ == "__main__":
    daemon_cli("redoxcap.schemes.rand", lambda args: RandScheme())
