"""Routed data for an unmodified program: a stream socket pumped to and from a capability.

A program that knows nothing of capabilities reads and writes its fds with
read(2) and write(2); a capability socket speaks frames. Where no host fd
stands for what was opened (`--no-passthrough`, a device scheme, a tcp
connection), the broker gives the program one end of a socketpair and pumps
the other end through the capability, one READ or WRITE request at a time,
on a thread per direction: every byte stays routed (traceable, revocable),
at the price of no seeking (ESPIPE) and no mmap (ENODEV, as for any socket).
While the program holds its end, fstat of it describes the file, not the
socket (`capability_of`: a clone of the capability kept for that). A regular
file opened read-only is read whole instead (`snapshot`, up to SNAPSHOT_MAX):
the program gets a sealed memory file of its bytes, which it can seek and map.
"""

from __future__ import annotations

import array
import errno
import fcntl
import logging
import os
import select
import socket
import termios
import threading
import time

from redoxcap.wire import linux
from redoxcap.wire import protocol as P
from redoxcap.wire.call import call_fd, call_value, forget

log = logging.getLogger("broker")
CHUNK = 64 * 1024
SETTLE_MAX = 30.0  # seconds a call waits for routed writes before it goes on regardless


class _Routed:
    """One routed open: a clone of its capability, for fstat, until its last loop ends."""

    def __init__(self, pumps: Pumps, identity: int, cap: int, loops: int) -> None:
        self.pumps, self.identity, self.cap, self.loops = pumps, identity, cap, loops
        self.lock = threading.Lock()

    def done(self) -> None:
        with self.lock:
            self.loops -= 1
            last = self.loops == 0
        if last:
            self.pumps._routed.pop(self.identity, None)
            _close(self.cap)


class _FileWrites:
    """What a write loop to a regular file took from the program and wrote into the file.

    A program's write(2) to its end returns once the bytes are queued; the broker's next
    call waits (`settle`) until what was queued then is in the file, so that what a program
    wrote and closed is what a process it starts next reads (close-to-open, as on a host).
    """

    def __init__(self, sock: socket.socket) -> None:
        self.sock = sock
        self.cond = threading.Condition()
        self.taken = 0  # bytes received from the program
        self.written = 0  # of them, in the file (or given up with the loop)
        self.ended = False

    def receive(self) -> bytes:
        """The next bytes the program wrote (b"" once it closed its end), counted as taken."""
        readable = select.poll()
        readable.register(self.sock, select.POLLIN)
        while True:
            readable.poll()  # outside the lock: settle reads the count meanwhile
            with self.cond:
                try:
                    data = self.sock.recv(CHUNK, socket.MSG_DONTWAIT)
                except BlockingIOError:
                    continue
                except ConnectionResetError:  # only after every byte it wrote was read
                    data = b""
                self.taken += len(data)
                return data

    def wrote(self, n: int) -> None:
        with self.cond:
            self.written += n
            self.cond.notify_all()

    def end(self) -> None:
        """The loop is over (its socket closes here, under the lock settle reads it with)."""
        with self.cond:
            self.ended = True
            self.sock.close()
            self.cond.notify_all()

    def settle(self, deadline: float) -> None:
        """Wait until every byte queued by now is written, the loop ended, or deadline passed
        (a scheme the program serves itself may wait for the very call that waits here)."""
        with self.cond:
            if self.ended:
                return
            unread = array.array("i", [0])
            fcntl.ioctl(self.sock.fileno(), termios.FIONREAD, unread)
            target = self.taken + unread[0]
            while not self.ended and self.written < target:
                left = deadline - time.monotonic()
                if left <= 0:
                    log.warning("broker: routed writes still on their way after %gs", SETTLE_MAX)
                    return
                self.cond.wait(left)


class Pumps:
    """Every pump thread of one broker, so that `join` can let writes finish before it exits."""

    def __init__(self) -> None:
        self._threads: list[threading.Thread] = []
        self._routed: dict[tuple[int, int], _Routed] = {}
        self._file_writes: set[_FileWrites] = set()

    def settle(self) -> None:
        """Wait until what the program wrote to routed files so far is in them (the broker's
        every call does, first: a file written and closed reads whole at its next open)."""
        if not self._file_writes:
            return
        deadline = time.monotonic() + SETTLE_MAX
        for writes in list(self._file_writes):
            writes.settle(deadline)

    def capability_of(self, identity: int) -> int | None:
        """The capability behind a program's end of a pump (by its socket identity), or None."""
        routed = self._routed.get(identity)
        return routed.cap if routed is not None else None

    def start(self, cap: int, flags: int, regular_file: bool = False) -> int:
        """Pump cap for a program that opened it with flags (cap is owned here once this returns).

        regular_file: its writes are settled before each of the broker's calls (`settle`);
        a connection's or a pipe's are not (its peer may take its time).

        Returns:
            The program's end (the caller installs it and closes its own copy).

        Raises:
            OSError: the pump could not be made; cap is still the caller's.
        """
        mode = flags & os.O_ACCMODE
        reading, writing = mode in (os.O_RDONLY, os.O_RDWR), mode in (os.O_WRONLY, os.O_RDWR)
        ours, theirs = socket.socketpair(socket.AF_UNIX, socket.SOCK_STREAM)
        opened: list[int] = []
        try:
            # a read-only capability reads, and a write-only one writes, on a handle of its own
            write_cap = call_fd(cap, P.CLONE) if reading and writing else cap
            if write_cap != cap:
                opened.append(write_cap)
            status_cap = call_fd(cap, P.CLONE)
        except BaseException:
            for fd in opened:
                _close(fd)
            ours.close()
            theirs.close()
            raise
        st = os.fstat(theirs.fileno())
        routed = _Routed(self, linux.identity(st), status_cap, int(reading) + int(writing))
        self._routed[routed.identity] = routed
        ours_write = ours.dup() if reading and writing else ours
        if not reading:
            ours.shutdown(socket.SHUT_WR)  # the program reads EOF at once
        if reading:
            self._spawn(self._read_loop, cap, ours, routed)
        if writing:
            writes = _FileWrites(ours_write) if regular_file else None
            if writes is not None:
                self._file_writes.add(writes)
            self._spawn(self._write_loop, write_cap, ours_write, routed, writes)
        return theirs.detach()

    def _spawn(self, loop, cap: int, sock: socket.socket, routed: _Routed, *more) -> None:
        thread = threading.Thread(target=loop, args=(cap, sock, routed, *more), daemon=True,
                                  name="pump")
        self._threads = [t for t in self._threads if t.is_alive()]
        self._threads.append(thread)
        thread.start()

    @staticmethod
    def _read_loop(cap: int, sock: socket.socket, routed: _Routed) -> None:
        try:
            while data := call_value(cap, P.READ, [CHUNK], kind=bytes):
                sock.sendall(data)
            sock.shutdown(socket.SHUT_WR)
            _close(cap)
            cap = -1
            if routed.loops == 1:  # read-only: the file stays described until the program closes it
                while sock.recv(CHUNK):
                    pass
        except OSError as exc:
            if exc.errno not in (errno.EPIPE, errno.ECONNRESET, errno.ENOTCONN):  # the program closed it
                log.warning("broker: routed read stopped: %s", exc)
        finally:
            sock.close()
            if cap >= 0:
                _close(cap)
            routed.done()

    def _write_loop(self, cap: int, sock: socket.socket, routed: _Routed,
                    writes: _FileWrites | None) -> None:
        try:
            while data := (writes.receive() if writes is not None else _written(sock)):
                while data:
                    n = call_value(cap, P.WRITE, [data], kind=int)
                    if not 0 < n <= len(data):
                        raise OSError(errno.EIO, "the scheme took no bytes")
                    data = data[n:]
                    if writes is not None:
                        writes.wrote(n)
        except OSError as exc:
            log.warning("broker: routed write stopped: %s", exc)
        finally:
            if writes is not None:
                writes.end()
                self._file_writes.discard(writes)
            else:
                sock.close()
            _close(cap)
            routed.done()

    def join(self, timeout: float) -> None:
        """Wait (at most timeout seconds in all) for the pumps whose program end is closed."""
        deadline = time.monotonic() + timeout
        for thread in self._threads:
            thread.join(max(0.0, deadline - time.monotonic()))


SNAPSHOT_MAX = 16 << 20  # bytes of a routed read-only file copied whole (larger ones are pumped)
_SEALS = fcntl.F_SEAL_SEAL | fcntl.F_SEAL_SHRINK | fcntl.F_SEAL_GROW | fcntl.F_SEAL_WRITE


def snapshot(cap: int, size: int) -> int | None:
    """A routed regular file opened read-only, as a sealed memory file of its bytes.

    Every byte is read through READ on cap (routed, traced, as a pump would), once, at the
    open; the program gets a read-only fd of a memfd holding them, so that it can seek,
    pread and mmap it as the file it opened (it sees the file as it was then). cap stays the
    caller's.

    Returns:
        The fd for the program, or None for a file larger than SNAPSHOT_MAX (cap is back at
        offset 0 then: pump it).
    """
    if size > SNAPSHOT_MAX:
        return None
    # never executable, as the program's own memfds (calls/processes.py)
    memfd = linux.memfd_noexec("redoxcap-routed", os.MFD_CLOEXEC | os.MFD_ALLOW_SEALING)
    try:
        total = 0
        while data := call_value(cap, P.READ, [CHUNK], kind=bytes):
            total += len(data)
            if total > SNAPSHOT_MAX:  # it grew since its fstat
                call_value(cap, P.LSEEK, [0, os.SEEK_SET], kind=int)
                return None
            view = memoryview(data)
            while view:
                view = view[os.write(memfd, view):]
        fcntl.fcntl(memfd, fcntl.F_ADD_SEALS, _SEALS)
        return os.open(f"/proc/self/fd/{memfd}", os.O_RDONLY | os.O_CLOEXEC)
    finally:
        os.close(memfd)


def _written(sock: socket.socket) -> bytes:
    """The next bytes the program wrote, b"" once it closed its end.

    ECONNRESET comes only after every byte it wrote was read (it closed with bytes of ours
    unread: a file it read only in part), so it ends the stream as EOF does.
    """
    try:
        return sock.recv(CHUNK)
    except ConnectionResetError:
        return b""


def _close(fd: int) -> None:
    forget(fd)
    os.close(fd)
