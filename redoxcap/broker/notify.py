"""The seccomp user-notification listener: receive a trapped syscall, answer it.

A thin layer over the ioctls of wire/linux.py and the kernel's structs
(linux/seccomp.h), with no policy in it:

    struct seccomp_notif      { u64 id; u32 pid; u32 flags; struct seccomp_data data; }
    struct seccomp_data       { s32 nr; u32 arch; u64 instruction_pointer; u64 args[6]; }
    struct seccomp_notif_resp { u64 id; s64 val; s32 error; u32 flags; }
    struct seccomp_notif_addfd{ u64 id; u32 flags; u32 srcfd; u32 newfd; u32 newfd_flags; }

`pid` is a thread id, valid only while the notification is (see `Listener.valid`).

Signals. The broker runs in a process that takes signals (`redoxcap run` forwards
SIGINT, SIGTERM and SIGHUP through handlers of its own), and a signal may come in
the middle of any of these ioctls. SEND and ID_VALID refuse with EINTR only before
they changed anything, so they are tried again. ADDFD with SECCOMP_ADDFD_FLAG_SEND
is not: interrupted before the target took the fd, it has already marked the call
answered, and Linux lets the target's syscall return 0 with no fd installed (an
open that "returns" fd 0). So it runs with every signal held (blocked until it is
done). A stop (SIGSTOP, a debugger attaching) cannot be held and can still do
that: do not stop a broker while its program runs. ADDFD and then SEND apart would
be safe from stops too, but they wake the target twice (an open brokered through
the cwd took twice as long).
"""

from __future__ import annotations

import errno
import fcntl
import os
from typing import NamedTuple

from redoxcap.wire import linux
from redoxcap.wire.linux import SECCOMP_NOTIF as _NOTIF
from redoxcap.wire.linux import SECCOMP_NOTIF_ADDFD as _ADDFD
from redoxcap.wire.linux import SECCOMP_NOTIF_RESP as _RESP
from redoxcap.wire.linux import SECCOMP_NOTIF_U64 as _ID

_ZEROED = bytes(_NOTIF.size)  # RECV's struct: the kernel insists that it be zeroed


class Notification(NamedTuple):
    """One trapped syscall: its id, the calling thread, the syscall number and raw arguments."""

    id: int
    tid: int
    nr: int
    arch: int
    args: tuple[int, int, int, int, int, int]


class Listener:
    """The broker's end of a filter's notification fd (owned: `close` closes it)."""

    def __init__(self, fd: int) -> None:
        self.fd = fd

    def fileno(self) -> int:
        return self.fd

    def close(self) -> None:
        if self.fd >= 0:
            os.close(self.fd)
            self.fd = -1

    def sync_wakeups(self) -> bool:
        """Ask the kernel to run the woken target on this CPU (Linux 6.6+); False if it cannot."""
        try:  # the flags are the argument itself, not a pointer to them
            linux.ioctl(self.fd, linux.SECCOMP_IOCTL_NOTIF_SET_FLAGS,
                        linux.SECCOMP_USER_NOTIF_FD_SYNC_WAKE_UP)
            return True
        except OSError:
            return False

    def receive(self) -> Notification | None:
        """The next notification; blocks. None when it vanished before it could be read
        (the thread was interrupted: ENOENT) or the call was interrupted (EINTR).

        Raises:
            OSError: any other error (EBADF/ENOTTY for a closed listener...).
        """
        try:  # (fcntl's ioctl: given bytes, it answers the struct as the kernel left it)
            raw = fcntl.ioctl(self.fd, linux.SECCOMP_IOCTL_NOTIF_RECV, _ZEROED)
        except OSError as exc:
            if exc.errno in (errno.ENOENT, errno.EINTR):
                return None
            raise
        nid, tid, _flags, nr, arch, _ip, *args = _NOTIF.unpack(raw)
        return Notification(nid, tid, nr, arch, tuple(args))

    def _ioctl(self, request: int, arg: bytes) -> None:
        """An ioctl on the listener with a struct it only reads, tried again when a signal
        interrupted it (see above)."""
        while True:
            try:
                fcntl.ioctl(self.fd, request, arg)
                return
            except InterruptedError:
                continue

    def valid(self, nid: int) -> bool:
        """Whether the notification is still pending (its thread still waits in the syscall)."""
        try:
            self._ioctl(linux.SECCOMP_IOCTL_NOTIF_ID_VALID, _ID.pack(nid))
            return True
        except OSError:
            return False

    def _respond(self, nid: int, val: int, error: int, flags: int) -> bool:
        """Answer the call; False when its thread gave up on it (a signal): nobody to tell."""
        try:
            self._ioctl(linux.SECCOMP_IOCTL_NOTIF_SEND, _RESP.pack(nid, val, error, flags))
            return True
        except OSError as exc:
            if exc.errno != errno.ENOENT:
                raise
            return False

    def reply(self, nid: int, value: int) -> None:
        """The syscall returns value."""
        self._respond(nid, value, 0, 0)

    def fail(self, nid: int, err: int) -> None:
        """The syscall fails with errno err."""
        self._respond(nid, 0, -err, 0)

    def proceed(self, nid: int) -> None:
        """Let the kernel run the syscall itself, re-reading its arguments.

        Only for calls whose arguments the broker made no decision on, or whose
        outcome is bounded by something a racing thread cannot change (see
        docs/sandbox.md).
        """
        self._respond(nid, 0, 0, linux.SECCOMP_USER_NOTIF_FLAG_CONTINUE)

    def install_fd(self, nid: int, fd: int, cloexec: bool) -> int | None:
        """Install a copy of fd in the target as the syscall's return value (ADDFD + SEND,
        with every signal held: see above).

        Returns:
            The fd number in the target, or None when the thread gave up first.

        Raises:
            OSError: EMFILE (its fd table is full) and the like; the syscall is not answered.
        """
        flags = linux.SECCOMP_ADDFD_FLAG_SEND
        # a bytearray, so that fcntl's ioctl answers the ioctl's value (the fd's number)
        addfd = bytearray(_ADDFD.pack(nid, flags, fd, 0, os.O_CLOEXEC if cloexec else 0))
        held = linux.hold_signals()
        try:
            return fcntl.ioctl(self.fd, linux.SECCOMP_IOCTL_NOTIF_ADDFD, addfd, True)
        except OSError as exc:
            if exc.errno == errno.ENOENT:
                return None
            raise
        finally:
            linux.release_signals(held)
