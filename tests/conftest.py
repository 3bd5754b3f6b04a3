"""The project's own fixtures; the systems come from the redoxcap pytest plugin.

`redoxcap.testing` (installed as the `pytest11` plugin `redoxcap`) boots real
systems: kernel, nsmgr and scheme daemons as processes, stopped afterwards
with `redoxcap down`, checking that every process is gone and that no daemon
logged a traceback. The tests use its fixtures by the names users use
(docs/testing.md): `redoxcap_system` and `redoxcap_client` for a test that
kills, restarts, stops or configures its system; `redoxcap_module_system`,
`redoxcap_module_client` and `redoxcap_isolated_client` on the module's one
system. Here are only fixtures of the project's own tests.
"""

from __future__ import annotations

import contextlib
import socket
import threading

import pytest

import rt
from redoxcap.testing import namespace_with_file
from redoxcap.wire import protocol as P
from redoxcap.wire.frames import SchemeReply, SchemeRequest


class HostileScheme:
    """A scheme served by hand from a thread of the test process, to play a server that lies.

    Registered in the test's namespace as name (`rt.mkscheme`); every OPENAT is
    answered with handle 1, every other request with what answer(op, args)
    returns: (status, raw msgpack body, fds to attach), or None for no answer.
    `seen` lists the (op, pid) of every request but CLOSE, `accounts` the router
    accounts they came for.
    """

    def __init__(self, name: str, answer) -> None:
        self.sock = socket.socket(fileno=rt.mkscheme(name))
        self.answer = answer
        self.seen: list[tuple[int, int]] = []
        self.accounts: set[int] = set()
        self.thread = threading.Thread(target=self._serve, daemon=True)
        self.thread.start()

    def _serve(self) -> None:
        while True:
            try:
                data, anc, _, _ = self.sock.recvmsg(P.MAX_FRAME, P.CMSG_FDS)
            except OSError:
                return
            if not data:
                return
            P.close_fds(P.parse_ancillary(anc)[0])
            request = SchemeRequest.decode(data)
            if request.op == P.CLOSE:
                continue
            self.seen.append((request.op, request.pid))
            self.accounts.add(request.account)
            reply = self.answer(request.op, request.args())
            if request.op == P.OPENAT and (reply is None or reply[0] == P.OK):
                fds = reply[2] if reply else []
                body = SchemeReply.new_handle(request.req_id, 1, 0).encode()
            elif reply is None:
                continue
            else:
                status, raw, fds = reply
                body = SchemeReply(request.req_id, status, raw).encode()
            try:
                self.sock.sendmsg([body], P.fds_ancillary(fds))
            finally:
                P.close_fds(fds)

    def close(self) -> None:
        self.sock.shutdown(socket.SHUT_RDWR)
        self.thread.join(timeout=10)
        self.sock.close()


@pytest.fixture
def subtree_namespace():
    """enter(path, flags=0): a context manager in which this process's namespace holds
    only `file`, registered from the directory capability rt.open(path, O_DIRECTORY |
    flags) opened in the namespace it had; that namespace is back afterwards."""

    @contextlib.contextmanager
    def enter(path: str, flags: int = 0):
        child = namespace_with_file(path, flags, names=[])
        parent = rt.clone(rt.getns())
        rt.setns(child)
        try:
            yield
        finally:
            rt.setns(parent)
            rt.close(parent)
            rt.close(child)

    return enter


@pytest.fixture
def hostile_scheme():
    """make(name, answer) -> a HostileScheme registered as name; all are stopped afterwards."""
    made: list[HostileScheme] = []

    def make(name: str, answer) -> HostileScheme:
        made.append(HostileScheme(name, answer))
        return made[-1]

    yield make
    for scheme in made:
        scheme.close()
