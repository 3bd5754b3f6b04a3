"""bind, connect, listen and (in a run that grants udp) sends: sockets within the run's grants.

The checks are net.py's. The broker reads the address once, checks it, and
acts on its own copy of the program's socket (pidfd_getfd): the kernel never
reads it again. A send comes here only in a run that grants udp, when it can
name a destination (sendto with an address, every sendmsg and sendmmsg): the
broker reads the whole message once (address, bytes, SCM_RIGHTS fds) and
sends it itself.
"""

from __future__ import annotations

import errno
import os
import signal
import socket
import stat

from redoxcap.broker import net
from redoxcap.broker.calls.base import Call, Family, c_int, close, error, syscall
from redoxcap.wire import linux
from redoxcap.wire.call import forget

CONTROL_MAX = 64 * 1024  # the most control data one send takes (ENOBUFS beyond, as optmem_max)
SCM_MAX_FD = 253


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

    @syscall()
    def sendto(self, call: Call) -> int:
        fd, buf, size, flags, addr, addrlen = call.args
        with net.owned_socket(self._socket_copy(call, c_int(fd))) as sock:
            # the kernel names a destination only for a non-NULL address
            name = _sockaddr(call, addr, addrlen) if addr else None
            data = _read_data(call, [(buf, size)], _whole(sock))
            return self._send(call, sock, data, name, [], flags & 0xFFFF_FFFF)

    @syscall()
    def sendmsg(self, call: Call) -> int:
        fd, msg, flags = call.args[:3]
        with net.owned_socket(self._socket_copy(call, c_int(fd))) as sock:
            return self._send_msghdr(call, sock, msg, flags & 0xFFFF_FFFF)

    @syscall()
    def sendmmsg(self, call: Call) -> int:
        fd, vec, vlen, flags = call.args[:4]
        vlen = min(vlen & 0xFFFF_FFFF, linux.UIO_MAXIOV)
        with net.owned_socket(self._socket_copy(call, c_int(fd))) as sock:
            sent = 0
            while sent < vlen:
                at = vec + sent * linux.MMSGHDR_SIZE
                try:
                    n = self._send_msghdr(call, sock, at, flags & 0xFFFF_FFFF)
                except OSError:
                    if sent == 0:
                        raise
                    break  # as the kernel: the count of those sent, the error for the next call
                call.mem.write(at + linux.MSGHDR.size, (n & 0xFFFF_FFFF).to_bytes(4, "little"))
                sent += 1
            return sent

    def _send_msghdr(self, call: Call, sock: socket.socket, at: int, flags: int) -> int:
        """Send the message whose struct msghdr is at `at`, read once."""
        name_at, namelen, iov_at, iovlen, control_at, controllen, _ = \
            linux.MSGHDR.unpack(call.mem.read(at, linux.MSGHDR.size))
        namelen = c_int(namelen)
        if namelen < 0:
            raise error(errno.EINVAL)
        name = None
        if name_at and namelen:  # as the kernel: a longer name is cut to a sockaddr_storage
            name = _sockaddr(call, name_at, min(namelen, net.MAX_SOCKADDR))
        if iovlen > linux.UIO_MAXIOV:
            raise error(errno.EMSGSIZE)
        iovs = list(linux.IOVEC.iter_unpack(call.mem.read(iov_at, iovlen * linux.IOVEC.size))
                    if iovlen else [])
        control = b""
        if control_at and controllen:
            if controllen > CONTROL_MAX:
                raise error(errno.ENOBUFS)
            control = call.mem.read(control_at, controllen)
        data = _read_data(call, iovs, _whole(sock))
        fds = self._passed_fds(call, sock, control)
        try:
            return self._send(call, sock, data, name, fds, flags)
        finally:
            for dup in fds:
                close(dup)

    def _passed_fds(self, call: Call, sock: socket.socket, control: bytes) -> list[int]:
        """The broker's copies of the fds an SCM_RIGHTS message passes (owned by the caller).

        Raises:
            OSError: EACCES for any other control message (an IP option could route a
                datagram elsewhere; credentials name the sender, which would be the broker),
                EINVAL for malformed ones, EBADF for an fd the program does not hold.
        """
        wanted: list[int] = []
        at = 0
        while at + linux.CMSGHDR.size <= len(control):
            length, level, kind = linux.CMSGHDR.unpack_from(control, at)
            if length < linux.CMSGHDR.size or at + length > len(control):
                raise error(errno.EINVAL)
            if (level, kind) != (linux.SOL_SOCKET, linux.SCM_RIGHTS) or sock.family != socket.AF_UNIX:
                raise OSError(errno.EACCES, "only SCM_RIGHTS control messages are served")
            body = control[at + linux.CMSGHDR.size:at + length]
            wanted += [int.from_bytes(body[i:i + 4], "little", signed=True)
                       for i in range(0, len(body) - 3, 4)]
            at += (length + 7) & ~7
        if len(wanted) > SCM_MAX_FD:
            raise error(errno.EINVAL)
        fds: list[int] = []
        try:
            for fd in wanted:
                fds.append(self.program.locator.target_fd(call, fd))
        except BaseException:
            for dup in fds:
                close(dup)
            raise
        return fds

    def _send(self, call: Call, sock: socket.socket, data: list[bytes], name: bytes | None,
              fds: list[int], flags: int) -> int:
        try:
            return net.send(self.program.sockets, sock, data, name, fds, flags)
        except BrokenPipeError:
            if not flags & linux.MSG_NOSIGNAL:  # as the kernel: SIGPIPE for the program, not us
                signal.pidfd_send_signal(call.process.pidfd, signal.SIGPIPE)
            raise

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


def _whole(sock: socket.socket) -> bool:
    """Whether a message must go whole (a datagram or a seqpacket record), or may go short."""
    return sock.type != socket.SOCK_STREAM


def _read_data(call: Call, iovs: list[tuple[int, int]], whole: bool) -> list[bytes]:
    """The bytes of iovs, read once: up to net.SEND_MAX (a stream's send is then short; a
    message that must go whole and is longer is EMSGSIZE)."""
    total = sum(size for _, size in iovs)
    if whole and total > net.SEND_MAX:
        raise error(errno.EMSGSIZE)
    out, left = [], net.SEND_MAX
    for base, size in iovs:
        take = min(size, left)
        if take:
            out.append(call.mem.read(base, take))
            left -= take
        if not left:
            break
    return out
