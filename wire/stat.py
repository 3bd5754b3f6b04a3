"""What FSTAT answers: one type for the schemes that fill it in and for rt that reads it."""

from __future__ import annotations

import os
from typing import Any, NamedTuple

_INT64 = range(-(2**63), 2**64)


class Stat(NamedTuple):
    """A file's status, with the field names of os.stat_result; 0 for what a scheme
    does not know. On the wire it is a map of the fields that are not 0.

    A named tuple, not a dataclass: FSTAT makes one on each side of every call, and a
    frozen dataclass's __init__ was most of the call's own time."""

    st_mode: int = 0
    st_ino: int = 0
    st_dev: int = 0
    st_nlink: int = 0
    st_uid: int = 0
    st_gid: int = 0
    st_size: int = 0
    st_atime_ns: int = 0
    st_mtime_ns: int = 0
    st_ctime_ns: int = 0
    st_blocks: int = 0
    st_blksize: int = 0

    @property
    def st_mtime(self) -> float:
        return self.st_mtime_ns / 1e9

    @classmethod
    def of(cls, st: os.stat_result) -> Stat:
        """The status of a host file, as os.stat or os.fstat gave it."""
        return cls(*map(st.__getattribute__, FIELDS))

    @classmethod
    def from_wire(cls, value: Any) -> Stat:
        """A Stat from an FSTAT reply: unknown keys and values that are not ints are left out.

        Raises:
            TypeError: value is not a map.
        """
        if not isinstance(value, dict):
            raise TypeError("a stat is a map")
        return cls(**{k: v for k, v in value.items() if k in KNOWN and type(v) is int and v in _INT64})

    def to_wire(self) -> dict[str, int]:
        # field by field (asdict copies deeply, and is most of an FSTAT's own time)
        return {name: value for name in FIELDS if (value := getattr(self, name))}


# The fields in their order (FSTAT is on the hot path: computed once, not per call).
FIELDS = Stat._fields
KNOWN = frozenset(FIELDS)
