"""A target thread's memory, read once and written through /proc/TID/mem.

The file is opened before the notification's id is checked (a thread id can
be recycled; once the id is known still valid, the open file is known to be
that thread's address space), and every argument is read exactly once: the
broker decides on its copy and never lets the kernel read the original again.
"""

from __future__ import annotations

import errno
import os
from typing import Self

from redoxcap.wire.linux import PATH_MAX

PAGE = os.sysconf("SC_PAGE_SIZE")


class Memory:
    """An open /proc/TID/mem (owned; use as a context manager)."""

    def __init__(self, tid: int) -> None:
        """Open tid's memory.

        Raises:
            OSError: ESRCH/ENOENT when the thread is gone.
        """
        self.fd = os.open(f"/proc/{tid}/mem", os.O_RDWR | os.O_CLOEXEC)

    def __enter__(self) -> Self:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()

    def close(self) -> None:
        if self.fd >= 0:
            os.close(self.fd)
            self.fd = -1

    def read(self, addr: int, size: int) -> bytes:
        """Exactly size bytes at addr (EFAULT when they are not all mapped)."""
        try:
            data = os.pread(self.fd, size, addr)
        except OSError:
            raise OSError(errno.EFAULT, "bad address") from None
        if len(data) != size:
            raise OSError(errno.EFAULT, "bad address")
        return data

    def string(self, addr: int, limit: int = PATH_MAX) -> bytes:
        """The NUL-terminated string at addr, without its NUL.

        Raises:
            OSError: EFAULT for an unmapped address, ENAMETOOLONG when no NUL comes
                within limit bytes (as Linux for a path).
        """
        if addr == 0:
            raise OSError(errno.EFAULT, "NULL path")
        try:  # most paths end within the page they start in: one read
            first = os.pread(self.fd, min(PAGE - addr % PAGE, limit), addr)
        except OSError:
            first = b""
        nul = first.find(b"\0")
        if nul >= 0:
            return first[:nul]
        if not first:
            raise OSError(errno.EFAULT, "bad address")
        out = first
        while len(out) < limit:
            # to the end of the page: the next one may not be mapped
            want = min(PAGE - (addr + len(out)) % PAGE, limit - len(out))
            try:
                chunk = os.pread(self.fd, want, addr + len(out))
            except OSError:
                chunk = b""
            if not chunk:
                raise OSError(errno.EFAULT, "bad address")
            nul = chunk.find(b"\0")
            if nul >= 0:
                return out + chunk[:nul]
            out += chunk
        raise OSError(errno.ENAMETOOLONG, os.strerror(errno.ENAMETOOLONG))

    def write(self, addr: int, data: bytes) -> None:
        """Write data at addr in the target (EFAULT when it is not writable there)."""
        try:
            n = os.pwrite(self.fd, data, addr)
        except OSError:
            raise OSError(errno.EFAULT, "bad address") from None
        if n != len(data):
            raise OSError(errno.EFAULT, "bad address")
