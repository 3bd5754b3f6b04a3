"""The project's own fixtures; the systems come from the redoxcap pytest plugin.

`redoxcap.testing` (installed as the `pytest11` plugin `redoxcap`) boots real
systems: kernel, nsmgr and scheme daemons as processes, stopped afterwards
with `redoxcap down`, checking that every process is gone and that no daemon
logged a traceback. The short names the tests use:

- `system`, `client`: a private system for the test (`redoxcap_system`,
  `redoxcap_client`): for tests that kill, restart, stop or configure it.
- `shared_system`, `shared_client`: the module's one system, with the root
  namespace (`redoxcap_module_system`, `redoxcap_module_client`).
- `isolated_client`: a client of the module's system that sees a fresh
  directory of its own as `file` (`redoxcap_isolated_client`).
"""

from __future__ import annotations

import contextlib
import socket
import threading

import pytest

import rt
from redoxcap.testing import System, namespace_with_file
from wire import protocol as P
from wire.frames import SchemeReply, SchemeRequest


@pytest.fixture
def system(redoxcap_system: System) -> System:
    return redoxcap_system


@pytest.fixture
def client(redoxcap_client: System) -> System:
    return redoxcap_client


@pytest.fixture(scope="module")
def shared_system(redoxcap_module_system: System) -> System:
    return redoxcap_module_system


@pytest.fixture
def shared_client(redoxcap_module_client: System) -> System:
    return redoxcap_module_client


@pytest.fixture
def isolated_client(redoxcap_isolated_client: System) -> System:
    return redoxcap_isolated_client


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
