"""Routed data for an unmodified program: a stream socket pumped to and from a capability.

A program that knows nothing of capabilities reads and writes its fds with
read(2) and write(2); a capability socket speaks frames. Where no host fd
stands for what was opened (`--no-passthrough`, a device scheme, a tcp
connection), the broker gives the program one end of a socketpair and pumps
the other end through the capability, one READ or WRITE request at a time,
on a thread per direction: every byte stays routed (traceable, revocable),
at the price of no seeking (ESPIPE) and no mmap.
"""

from __future__ import annotations

import errno
import logging
import os
import socket
import threading

from rt._call import call_fd, call_value, forget
from wire import protocol as P

log = logging.getLogger("broker")
CHUNK = 64 * 1024


class Pumps:
    """Every pump thread of one broker, so that `join` can let writes finish before it exits."""

    def __init__(self) -> None:
        self._threads: list[threading.Thread] = []

    def start(self, cap: int, flags: int) -> int:
        """Pump cap for a program that opened it with flags (cap is owned here once this returns).

        Returns:
            The program's end (the caller installs it and closes its own copy).

        Raises:
            OSError: the pump could not be made; cap is still the caller's.
        """
        mode = flags & os.O_ACCMODE
        reading, writing = mode in (os.O_RDONLY, os.O_RDWR), mode in (os.O_WRONLY, os.O_RDWR)
        ours, theirs = socket.socketpair(socket.AF_UNIX, socket.SOCK_STREAM)
        try:
            # a read-only capability reads, and a write-only one writes, on a handle of its own
            write_cap = call_fd(cap, P.CLONE) if reading and writing else cap
        except BaseException:
            ours.close()
            theirs.close()
            raise
        ours_write = ours.dup() if reading and writing else ours
        if not reading:
            ours.shutdown(socket.SHUT_WR)  # the program reads EOF at once
        if reading:
            self._spawn(self._read_loop, cap, ours)
        if writing:
            self._spawn(self._write_loop, write_cap, ours_write)
        return theirs.detach()

    def _spawn(self, loop, cap: int, sock: socket.socket) -> None:
        thread = threading.Thread(target=loop, args=(cap, sock), daemon=True, name="pump")
        self._threads = [t for t in self._threads if t.is_alive()]
        self._threads.append(thread)
        thread.start()

    @staticmethod
    def _read_loop(cap: int, sock: socket.socket) -> None:
        try:
            while data := call_value(cap, P.READ, [CHUNK], kind=bytes):
                sock.sendall(data)
            sock.shutdown(socket.SHUT_WR)
        except OSError as exc:
            if exc.errno not in (errno.EPIPE, errno.ECONNRESET, errno.ENOTCONN):  # the program closed it
                log.warning("broker: routed read stopped: %s", exc)
        finally:
            sock.close()
            _close(cap)

    @staticmethod
    def _write_loop(cap: int, sock: socket.socket) -> None:
        try:
            while data := sock.recv(CHUNK):
                while data:
                    n = call_value(cap, P.WRITE, [data], kind=int)
                    if not 0 < n <= len(data):
                        raise OSError(errno.EIO, "the scheme took no bytes")
                    data = data[n:]
        except OSError as exc:
            log.warning("broker: routed write stopped: %s", exc)
        finally:
            sock.close()
            _close(cap)

    def join(self, timeout: float) -> None:
        """Wait (at most timeout seconds in all) for the pumps whose program end is closed."""
        import time

        deadline = time.monotonic() + timeout
        for thread in self._threads:
            thread.join(max(0.0, deadline - time.monotonic()))


def _close(fd: int) -> None:
    forget(fd)
    os.close(fd)
