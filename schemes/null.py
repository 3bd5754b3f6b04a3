"""The null scheme (`/scheme/null`): reads are end of file, writes are taken and dropped."""

from __future__ import annotations

from redoxcap.schemes.device import DeviceHandle, DeviceScheme
from redoxcap.schemes.framework import Request, daemon_cli, takes


class NullScheme(DeviceScheme):
    """Every open gives a handle like /dev/null."""

    name = "null"
    host_device = "/dev/null"

    @takes(DeviceHandle)
    async def read(self, req: Request, h: DeviceHandle, n: int) -> bytes:
        return b""

    @takes(DeviceHandle)
    async def write(self, req: Request, h: DeviceHandle, data: bytes) -> int:
        return len(data)


if __name__ == "__main__":
    daemon_cli("redoxcap.schemes.null", lambda args: NullScheme())
