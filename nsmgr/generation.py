"""A namespace's generation: a counter of its changes that its holders read without asking.

A client that keeps the roots of a namespace's entries (rt, the broker) opens
through them without asking nsmgr, and must still see the next change of the
namespace at its next open. nsmgr counts the changes of each namespace
(register, unregister, narrow, a scheme created in it, a restore) and, for a
namespace whose holder asks (NS_GENERATION), keeps the count in a page of
shared memory: a memfd sealed against shrinking and growing (a holder cannot
truncate it under nsmgr, which would fault on its next write) and against
further seals, mapped here read-write, and handed out as a read-only file
description. A holder maps it and compares the count before each open: a
changed count means its kept roots are stale.

The page is advisory: a capability a holder kept stays its own whatever the
count says, so nothing depends on the page for security. The router keeps the
page's fd with the namespace across a restart of nsmgr, and the next nsmgr
counts on from the value in it.
"""

from __future__ import annotations

import errno
import fcntl
import mmap
import os
import stat
import struct

SIZE = 4096
COUNT = struct.Struct("<Q")  # the generation, at offset 0, little-endian
SEALS = fcntl.F_SEAL_SHRINK | fcntl.F_SEAL_GROW | fcntl.F_SEAL_SEAL


class GenerationPage:
    """The shared page holding one namespace's generation (owns its memfd and mapping).

    Args:
        fd: a memfd of SIZE bytes sealed with SEALS (ownership passes here).

    Raises:
        OSError: EINVAL when fd is not such a memfd (it is closed then).
    """

    def __init__(self, fd: int) -> None:
        try:
            st = os.fstat(fd)
            if not stat.S_ISREG(st.st_mode) or st.st_size != SIZE:
                raise OSError(errno.EINVAL, "not a generation page")
            if fcntl.fcntl(fd, fcntl.F_GET_SEALS) & SEALS != SEALS:
                raise OSError(errno.EINVAL, "a generation page that is not sealed")
            self._map = mmap.mmap(fd, SIZE, mmap.MAP_SHARED, mmap.PROT_READ | mmap.PROT_WRITE)
        except BaseException:
            os.close(fd)
            raise
        self.fd = fd

    @classmethod
    def create(cls, value: int) -> GenerationPage:
        """A new page holding value."""
        fd = os.memfd_create("redoxcap-namespace-generation", os.MFD_CLOEXEC | os.MFD_ALLOW_SEALING)
        try:
            os.ftruncate(fd, SIZE)
            fcntl.fcntl(fd, fcntl.F_ADD_SEALS, SEALS)
        except BaseException:
            os.close(fd)
            raise
        page = cls(fd)
        page.value = value
        return page

    @property
    def value(self) -> int:
        return COUNT.unpack_from(self._map)[0]

    @value.setter
    def value(self, value: int) -> None:
        COUNT.pack_into(self._map, 0, value)

    def reader(self) -> int:
        """A new read-only file description of the page, for a holder (owned by the caller)."""
        return os.open(f"/proc/self/fd/{self.fd}", os.O_RDONLY | os.O_CLOEXEC)

    def close(self) -> None:
        self._map.close()
        os.close(self.fd)
