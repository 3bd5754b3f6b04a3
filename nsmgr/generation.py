"""A namespace's generation: a counter of its changes that its holders read without asking.

A holder that keeps the roots of a namespace's entries (rt, the broker;
wire/roots.py) opens through them without asking nsmgr, and must still see
the next change of the namespace at its next open. nsmgr counts the changes
of each namespace (register, unregister, narrow, a scheme created in it, a
restore) and, once a holder asks (NS_ROOT with the page), keeps the count in
a page of shared memory: a memfd mapped here read-write, then sealed against
shrinking and growing (a holder cannot truncate it under nsmgr, which would
fault on its next write) and against any write or writable mapping made from
now on (F_SEAL_FUTURE_WRITE: only the mapping nsmgr made before can write,
whichever way a holder reopens it). Holders map it read-only and compare the
count before each open: a changed count means their kept roots are stale.

A page outlives the nsmgr that wrote it (the router keeps its fd with the
namespace) but nobody can write it any more: the next nsmgr retires it by
adding F_SEAL_WRITE (which needs no writable mapping to exist, as after a
crash), and serves a new page counting on. A holder that sees any seal
besides the live ones drops its roots and its page and asks again; so does
one whose page a hostile holder sealed further, and nsmgr then replaces that
page too. Nothing depends on the page for security: a root a holder kept is
its own whatever the count says.
"""

from __future__ import annotations

import fcntl
import mmap
import os
import stat
import struct

SIZE = 4096
COUNT = struct.Struct("<Q")  # the generation, at offset 0, little-endian
F_SEAL_FUTURE_WRITE = 0x0010  # Linux 5.1; not in Python 3.11's fcntl
# no F_SEAL_SEAL: the next nsmgr must be able to add F_SEAL_WRITE to retire the page
SEALS = fcntl.F_SEAL_SHRINK | fcntl.F_SEAL_GROW | F_SEAL_FUTURE_WRITE


class GenerationPage:
    """The shared page holding one namespace's generation (owns its memfd and mapping)."""

    def __init__(self, fd: int, mapping: mmap.mmap) -> None:
        self.fd = fd
        self._map = mapping

    @classmethod
    def create(cls, value: int) -> GenerationPage:
        """A new page holding value, sealed (see the module's docstring).

        Raises:
            OSError: ENOMEM, EMFILE...: no page (nothing is left open).
        """
        fd = os.memfd_create("redoxcap-namespace-generation", os.MFD_CLOEXEC | os.MFD_ALLOW_SEALING)
        try:
            os.ftruncate(fd, SIZE)
            mapping = mmap.mmap(fd, SIZE, mmap.MAP_SHARED, mmap.PROT_READ | mmap.PROT_WRITE)
        except BaseException:
            os.close(fd)
            raise
        try:
            COUNT.pack_into(mapping, 0, value)
            fcntl.fcntl(fd, fcntl.F_ADD_SEALS, SEALS)
        except BaseException:
            mapping.close()
            os.close(fd)
            raise
        return cls(fd, mapping)

    @property
    def value(self) -> int:
        return COUNT.unpack_from(self._map)[0]

    @value.setter
    def value(self, value: int) -> None:
        COUNT.pack_into(self._map, 0, value)

    def live(self) -> bool:
        """Whether holders trust it: sealed with exactly SEALS (nobody sealed it further)."""
        return fcntl.fcntl(self.fd, fcntl.F_GET_SEALS) == SEALS

    def reader(self) -> int:
        """A new read-only file description of the page, for a holder (owned by the caller)."""
        return os.open(f"/proc/self/fd/{self.fd}", os.O_RDONLY | os.O_CLOEXEC)

    def close(self) -> None:
        self._map.close()
        os.close(self.fd)


def retire(fd: int) -> int:
    """Retire the page a previous nsmgr kept (fd, consumed) and return the count it held
    (0 for something that is not a page).

    Its holders see the added seal at their next open and ask for the new page.
    """
    try:
        st = os.fstat(fd)
        if not stat.S_ISREG(st.st_mode) or st.st_size < COUNT.size:
            return 0
        value = COUNT.unpack(os.pread(fd, COUNT.size, 0))[0]
        try:
            fcntl.fcntl(fd, fcntl.F_ADD_SEALS, fcntl.F_SEAL_WRITE)
        except OSError:
            pass  # sealed further already (F_SEAL_SEAL): holders see it as retired anyway
        return value
    except OSError:
        return 0
    finally:
        os.close(fd)
