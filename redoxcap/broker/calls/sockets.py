"""bind, connect, listen: TCP sockets within the run's grants (the checks are net.py's).

The broker reads the address once, checks it, and acts on its own copy of
the program's socket (pidfd_getfd): the kernel never reads it again.
"""

from __future__ import annotations

import errno
import os
import stat

from redoxcap.broker import net
from redoxcap.broker.calls.base import Call, Family, c_int, close, error, syscall
from redoxcap.wire.call import forget


class Sockets(Family):
    """The socket calls that name an address."""

    @syscall()
    def bind(self, call: Call) -> int:
        a = call.args
        raw = _sockaddr(call, a[1], a[2])
        net.bind(self.program.sockets, self._socket_copy(call, c_int(a[0])), raw)
        return 0

    @syscall()
    def connect(self, call: Call) -> int:
        a = call.args
        raw = _sockaddr(call, a[1], a[2])
        net.connect(self.program.sockets, self._socket_copy(call, c_int(a[0])), raw)
        return 0

    @syscall()
    def listen(self, call: Call) -> int:
        net.listen(self._socket_copy(call, c_int(call.args[0])), max(0, c_int(call.args[1])))
        return 0

    def _socket_copy(self, call: Call, fd: int) -> int:
        """The broker's copy of the target's socket fd (ENOTSOCK for anything else); net.py
        owns it from here."""
        dup = self.program.locator.target_fd(call, fd)
        if not stat.S_ISSOCK(os.fstat(dup).st_mode):
            close(dup)
            raise error(errno.ENOTSOCK)
        forget(dup)
        return dup


def _sockaddr(call: Call, addr: int, size: int) -> bytes:
    size = c_int(size)
    if not 0 < size <= net.MAX_SOCKADDR:
        raise error(errno.EINVAL)
    return call.mem.read(addr, size)
