"""The tcp scheme (`/scheme/tcp/HOST/PORT`): TCP connections and listeners.

    python -m redoxcap.schemes.tcp --channel-fd N [--connect-timeout SECONDS]
                          [--allow-wildcard] [--allow-privileged-ports]

HOST is a numeric IPv4 or IPv6 address in canonical form (`127.0.0.1`,
`::1`; not `127.1`, `2130706433`, `0`, `[::1]`, `fe80::1%eth0` or a name:
nothing ever goes to a resolver); PORT is 1-65535 in ASCII decimal without
leading zeros. Anything else is EINVAL.

Opening HOST/PORT connects (ECONNREFUSED, ETIMEDOUT after --connect-timeout).
Opening with O_CREAT listens on HOST/PORT; port 0 picks one and `fpath` tells
which. A listener's backlog is short (LISTEN_BACKLOG) and a client account may
hold MAX_LISTENERS_PER_ACCOUNT of them (EMFILE past it): connections not yet
accepted are no one's capability, but hold memory. Listening on a wildcard (`0.0.0.0`, `::`), multicast or broadcast
address needs `--allow-wildcard`, on a port below 1024 `--allow-privileged-ports`
(EACCES otherwise); connecting to any port is allowed.
`dup(listener, b"accept")` waits for one connection and returns it as a new
handle. read returns what has arrived (b"" at EOF), write sends everything (waiting while
the socket's fixed buffer, SOCKET_BUFFER, is full),
`shutdown(SHUT_WR)` ends the stream for the peer. Every wait is a trio wait,
so a blocked read or accept never stalls other clients of the scheme.

`dup(root, b"grant:" + JSON)` makes a grant (schemes/netaddr.py): a root
that connects only to the peers and listens only on the endpoints it lists
(EACCES for anything else), and that can only be narrowed further. Opening
"." with O_DIRECTORY on a root or a grant is another handle on it (how
`rt.net_grant` gets the namespace's tcp). Roots and grants survive a restart
of the daemon; connections and listeners do not.

Only the scheme root or a grant opens endpoints: a connection or a listener
names one socket, not a directory, so `openat` relative to it is ENOTDIR. The
root itself cannot be read or written (EBADF).
"""

from __future__ import annotations

import argparse
import errno
import os
import socket
from dataclasses import dataclass, field
from typing import Any

import trio

from redoxcap.schemes.framework import Opened, Request, SchemeError, daemon_cli, takes
from redoxcap.schemes.netaddr import (
    DEFAULT_POLICY,
    NetGrant,
    NetPolicy,
    NetRoot,
    NetScheme,
    add_policy_options,
    address_path,
    endpoint_to_open,
    is_self_path,
    policy_from,
)
from redoxcap.wire import protocol as P

DEFAULT_CONNECT_TIMEOUT = 10.0
# bytes asked for each socket's send and receive buffer (Linux doubles it): every byte of a
# connection crosses this daemon in frames of MAX_IO anyway, so bigger buffers buy nothing
SOCKET_BUFFER = 64 * 1024
# Connections waiting in a listener's backlog are no one's capability, yet each holds what its
# peer sent, up to the buffers it inherits (SOCKET_BUFFER): a short backlog, and a bound on
# one account's listeners (EMFILE past it), keep what one account's unaccepted connections
# hold (64 x 17 x 128 KiB received, ~136 MiB at most) within what its 1,024 capabilities of
# accepted ones may (1,024 x 256 KiB). Linux's listen(128) let 8 listeners hold 60 MiB.
LISTEN_BACKLOG = 16
MAX_LISTENERS_PER_ACCOUNT = 64

@dataclass(eq=False)
class TcpSocket:
    sock: trio.socket.SocketType
    listening: bool
    account: int | None = None  # a listener's: the account it is counted against
    read_lock: trio.Lock = field(default_factory=trio.Lock)  # one recv/accept at a time
    write_lock: trio.Lock = field(default_factory=trio.Lock)


class TcpScheme(NetScheme):
    """Serves TCP sockets."""

    name = "tcp"

    def __init__(self, connect_timeout: float = DEFAULT_CONNECT_TIMEOUT,
                 policy: NetPolicy = DEFAULT_POLICY) -> None:
        super().__init__(policy)
        self.connect_timeout = connect_timeout
        self.listeners: dict[int, int] = {}  # open listeners by the account that opened them

    @takes(NetRoot, NetGrant)
    async def openat(self, req: Request, h: NetRoot | NetGrant, path: str, flags: int,
                     mode: int) -> Opened:
        if is_self_path(path, flags):
            return Opened(h, fdflags=os.O_RDONLY | os.O_DIRECTORY)
        ep, listen = endpoint_to_open(h, path, flags, self.policy)
        if listen and self.listeners.get(req.account, 0) >= MAX_LISTENERS_PER_ACCOUNT:
            raise SchemeError(errno.EMFILE, f"at most {MAX_LISTENERS_PER_ACCOUNT} listeners a client")
        sock = trio.socket.socket(ep.family, socket.SOCK_STREAM)
        try:
            # fixed buffers (a listener's connections inherit them): what a client's unread
            # connections hold in the kernel is bounded per capability, not by the host's
            # tcp_mem (autotuning grew each to megabytes), and a write past them waits
            for option in (socket.SO_SNDBUF, socket.SO_RCVBUF):
                sock.setsockopt(socket.SOL_SOCKET, option, SOCKET_BUFFER)
            if listen:
                sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
                await sock.bind(ep.sockaddr)
                sock.listen(LISTEN_BACKLOG)
                self.listeners[req.account] = self.listeners.get(req.account, 0) + 1
                return Opened(TcpSocket(sock, listening=True, account=req.account), fdflags=flags)
            with trio.move_on_after(self.connect_timeout) as scope:
                await sock.connect(ep.sockaddr)
            if scope.cancelled_caught:
                raise SchemeError(errno.ETIMEDOUT)
            return Opened(TcpSocket(sock, listening=False), fdflags=flags & os.O_ACCMODE)
        except BaseException:
            sock.close()
            raise

    @takes(NetRoot, NetGrant, TcpSocket)
    async def dup(self, req: Request, h: NetRoot | NetGrant | TcpSocket, buf: bytes) -> Opened:
        if not isinstance(h, TcpSocket):
            return self.narrowed(h, buf)
        if buf != b"accept" or not h.listening:
            raise SchemeError(errno.EINVAL, 'tcp dup takes b"accept" on a listener')
        async with h.read_lock:
            conn, _ = await h.sock.accept()
        return Opened(TcpSocket(conn, listening=False), fdflags=os.O_RDWR)

    def _stream(self, h: TcpSocket) -> TcpSocket:
        if h.listening:
            raise SchemeError(errno.ENOTCONN)
        return h

    @takes(TcpSocket)
    async def read(self, req: Request, h: TcpSocket, n: int) -> bytes:
        s = self._stream(h)
        if n < 0:
            raise SchemeError(errno.EINVAL)
        async with s.read_lock:
            return await s.sock.recv(min(n, P.MAX_IO))

    @takes(TcpSocket)
    async def write(self, req: Request, h: TcpSocket, data: bytes) -> int:
        s = self._stream(h)
        view = memoryview(data)
        async with s.write_lock:
            while view:
                sent = await s.sock.send(view)
                view = view[sent:]
        return len(data)

    @takes(TcpSocket)
    async def shutdown(self, req: Request, h: TcpSocket, how: int) -> None:
        s = self._stream(h)
        if how not in (socket.SHUT_RD, socket.SHUT_WR, socket.SHUT_RDWR):
            raise SchemeError(errno.EINVAL)
        s.sock.shutdown(how)

    async def close(self, h: Any) -> None:
        if isinstance(h, TcpSocket) and h.account is not None:
            left = self.listeners[h.account] - 1
            if left:
                self.listeners[h.account] = left
            else:
                del self.listeners[h.account]
            h.account = None
        await super().close(h)

    def socket_path(self, h: TcpSocket) -> str:
        return address_path(self.name, h.sock.getsockname() if h.listening else h.sock.getpeername())


def _options(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--connect-timeout", type=float, default=DEFAULT_CONNECT_TIMEOUT,
                        help="seconds before a connect fails with ETIMEDOUT")
    add_policy_options(parser)


if __name__ == "__main__":
    daemon_cli("redoxcap.schemes.tcp", lambda a: TcpScheme(a.connect_timeout, policy_from(a)), _options)
