"""The structs a brokered call writes into the target: stat, statx, linux_dirent64.

Layouts (wire/linux.py) from the kernel's uapi headers for x86_64
(asm/stat.h) and the generic one aarch64 uses (asm-generic/stat.h);
linux/stat.h for statx.
Values come from a host `os.stat_result` or a scheme's `wire.stat.Stat`
(fields a scheme does not know are 0).
"""

from __future__ import annotations

import os
import zlib
from typing import Any

from redoxcap.wire.linux import DIRENT64_HEAD as _DIRENT_HEAD
from redoxcap.wire.linux import STAT_GENERIC as _STAT_GENERIC
from redoxcap.wire.linux import STAT_X86_64 as _STAT_X86_64
from redoxcap.wire.linux import STATX as _STATX
from redoxcap.wire.linux import STATX_BASIC_STATS

_NS = 1_000_000_000


def _f(st: Any, name: str) -> int:
    return int(getattr(st, name, 0) or 0)


def _split_ns(ns: int) -> tuple[int, int]:
    return ns // _NS, ns % _NS


def pack_stat(machine: str, st: Any) -> bytes:
    """struct stat for machine from st (os.stat_result or wire.stat.Stat)."""
    if machine == "x86_64" and type(st) is os.stat_result:  # most: read straight off
        return _STAT_X86_64.pack(st.st_dev, st.st_ino, st.st_nlink, st.st_mode, st.st_uid,
                                 st.st_gid, 0, st.st_rdev, st.st_size, st.st_blksize or 4096,
                                 st.st_blocks, *divmod(st.st_atime_ns, _NS),
                                 *divmod(st.st_mtime_ns, _NS), *divmod(st.st_ctime_ns, _NS))
    a_s, a_n = _split_ns(_f(st, "st_atime_ns"))
    m_s, m_n = _split_ns(_f(st, "st_mtime_ns"))
    c_s, c_n = _split_ns(_f(st, "st_ctime_ns"))
    dev, ino, mode = _f(st, "st_dev"), _f(st, "st_ino"), _f(st, "st_mode")
    nlink, uid, gid, rdev = _f(st, "st_nlink"), _f(st, "st_uid"), _f(st, "st_gid"), _f(st, "st_rdev")
    size, blksize, blocks = _f(st, "st_size"), _f(st, "st_blksize") or 4096, _f(st, "st_blocks")
    if machine == "x86_64":
        return _STAT_X86_64.pack(dev, ino, nlink, mode, uid, gid, 0, rdev, size, blksize, blocks,
                                 a_s, a_n, m_s, m_n, c_s, c_n)
    return _STAT_GENERIC.pack(dev, ino, mode, nlink, uid, gid, rdev, 0, size, blksize, blocks,
                              a_s, a_n, m_s, m_n, c_s, c_n)


def pack_statx(st: Any) -> bytes:
    """struct statx with the basic fields (STATX_BASIC_STATS; no birth time)."""
    dev, rdev = _f(st, "st_dev"), _f(st, "st_rdev")
    times = []
    for name in ("st_atime_ns", None, "st_ctime_ns", "st_mtime_ns"):  # atime, btime, ctime, mtime
        sec, nsec = _split_ns(_f(st, name)) if name else (0, 0)
        times += [sec, nsec, 0]
    return _STATX.pack(
        STATX_BASIC_STATS, _f(st, "st_blksize") or 4096, 0, _f(st, "st_nlink"), _f(st, "st_uid"),
        _f(st, "st_gid"), _f(st, "st_mode") & 0xFFFF, 0, _f(st, "st_ino"), _f(st, "st_size"),
        _f(st, "st_blocks"), 0, *times, os.major(rdev), os.minor(rdev), os.major(dev), os.minor(dev),
    )


def dirent_ino(name: str) -> int:
    """A stable, non-zero d_ino for a name (the protocol lists names only)."""
    return zlib.crc32(name.encode()) | 1 << 32


def pack_dirents(entries: list[tuple[str, int]], start: int, size: int) -> tuple[bytes, int]:
    """As many linux_dirent64 records as fit in size bytes.

    Args:
        entries: (name, d_type) from directory position start on.
        start: the position of entries[0] (d_off of a record is the position after it).
        size: the target's buffer size.

    Returns:
        (the records, how many entries they hold).
    """
    out = bytearray()
    count = 0
    for name, d_type in entries:
        raw = name.encode()
        reclen = (_DIRENT_HEAD.size + len(raw) + 1 + 7) & ~7
        if len(out) + reclen > size:
            break
        count += 1
        out += _DIRENT_HEAD.pack(dirent_ino(name), start + count, reclen, d_type)
        out += raw + b"\0" * (reclen - _DIRENT_HEAD.size - len(raw))
    return bytes(out), count
