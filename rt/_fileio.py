"""`rt.open_file`: a normal Python file object over a capability fd."""

from __future__ import annotations

import io
import os

from redoxcap.wire.call import is_host_fd
from redoxcap.wire.protocol import O_PASSTHROUGH
from rt import _posix


class CapabilityIO(io.RawIOBase):
    """Unbuffered binary I/O on a capability fd (owned unless closefd=False)."""

    def __init__(self, fd: int, readable: bool, writable: bool, closefd: bool = True) -> None:
        super().__init__()
        self._fd = fd
        self._readable = readable
        self._writable = writable
        self._closefd = closefd
        self._seekable: bool | None = None

    def fileno(self) -> int:
        return self._fd

    def readable(self) -> bool:
        return self._readable

    def writable(self) -> bool:
        return self._writable

    def seekable(self) -> bool:
        if self._seekable is None:
            try:
                _posix.lseek(self._fd, 0, os.SEEK_CUR)
                self._seekable = True
            except OSError:
                self._seekable = False
        return self._seekable

    def readinto(self, buffer) -> int:
        data = _posix.read(self._fd, len(buffer))
        buffer[: len(data)] = data
        return len(data)

    def readall(self) -> bytes:
        parts = []
        while chunk := _posix.read(self._fd, 1 << 17):
            parts.append(chunk)
        return b"".join(parts)

    def write(self, data) -> int:
        return _posix.write(self._fd, data)

    def seek(self, pos: int, whence: int = os.SEEK_SET) -> int:
        return _posix.lseek(self._fd, pos, whence)

    def tell(self) -> int:
        return _posix.lseek(self._fd, 0, os.SEEK_CUR)

    def truncate(self, size: int | None = None) -> int:
        if size is None:
            size = self.tell()
        _posix.ftruncate(self._fd, size)
        return size

    def close(self) -> None:
        if not self.closed and self._closefd:
            _posix.close(self._fd)
        super().close()


def _flags_for(mode: str) -> tuple[int, bool, bool, bool]:
    """Python open() mode -> (os flags, readable, writable, binary)."""
    modes = set(mode)
    if not modes <= set("rwaxbt+") or len(mode) != len(modes):
        raise ValueError(f"invalid mode: {mode!r}")
    kinds = modes & set("rwax")
    if len(kinds) != 1 or {"b", "t"} <= modes:
        raise ValueError(f"invalid mode: {mode!r}")
    kind = kinds.pop()
    plus = "+" in modes
    readable = kind == "r" or plus
    writable = kind != "r" or plus
    flags = os.O_RDWR if readable and writable else os.O_WRONLY if writable else os.O_RDONLY
    flags |= {"r": 0, "w": os.O_CREAT | os.O_TRUNC, "a": os.O_CREAT | os.O_APPEND,
              "x": os.O_CREAT | os.O_EXCL}[kind]
    return flags, readable, writable, "b" in modes


def open_file(
    path: str | os.PathLike | int,
    mode: str = "r",
    buffering: int = -1,
    encoding: str | None = None,
    errors: str | None = None,
    newline: str | None = None,
    closefd: bool = True,
    passthrough: bool = False,
):
    """Like builtins.open, through rt: text or binary, buffered, usable with `with`.

    path may also be a capability fd or a host fd (then closefd says whether
    closing the file object closes it). With passthrough, a scheme that can
    answers with a host fd (O_PASSTHROUGH): the file object is then Python's
    own, and its reads and writes are native.
    """
    flags, readable, writable, binary = _flags_for(mode)
    if isinstance(path, int):
        fd = path
    else:
        fd = _posix.open(path, flags | (O_PASSTHROUGH if passthrough else 0), 0o666)
        closefd = True
    if is_host_fd(fd, remember=False):  # Python's own file object (it closes the fd itself)
        return open(fd, mode, buffering, encoding, errors, newline, closefd=closefd)
    try:
        raw = CapabilityIO(fd, readable, writable, closefd)
    except BaseException:
        if closefd:
            _posix.close(fd)
        raise
    if "a" in mode:
        raw.seek(0, os.SEEK_END)
    if buffering == 0:
        if not binary:
            raw.close()
            raise ValueError("can't have unbuffered text I/O")
        return raw
    size = io.DEFAULT_BUFFER_SIZE if buffering in (-1, 1) else buffering
    if readable and writable:
        buffered = io.BufferedRandom(raw, size) if raw.seekable() else io.BufferedRWPair(raw, raw, size)
    elif writable:
        buffered = io.BufferedWriter(raw, size)
    else:
        buffered = io.BufferedReader(raw, size)
    if binary:
        return buffered
    return io.TextIOWrapper(buffered, encoding, errors, newline, line_buffering=buffering == 1)
