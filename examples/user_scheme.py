"""A client that provides a scheme of its own, as Redox programs can.

    redoxcap run -- python examples/user_scheme.py

It forks its namespace, creates a scheme called `greeting` in the fork
(nsmgr asks the router for an anonymous scheme and registers it; this
program gets the request channel), spawns a child in that namespace, and
serves the child's requests with the same framework the system's daemons use.
"""

import sys

import trio

import rt
from redoxcap.schemes.framework import Opened, Request, Scheme, serve, takes
from redoxcap.wire import protocol as P


class Greeting:
    def __init__(self, text: bytes) -> None:
        self.text, self.offset = text, 0


class GreetingScheme(Scheme):
    """`/scheme/greeting/NAME` reads as a greeting for NAME."""

    name = "greeting"
    inline_ops = frozenset(P.SCHEME_OPS)

    async def openat(self, req: Request, h, path: str, flags: int, mode: int) -> Opened:
        return Opened(Greeting(f"hello, {path} (asked by pid {req.caller.pid})\n".encode()))

    @takes(Greeting)  # the root is not readable: the framework answers EBADF there
    async def read(self, req: Request, h: Greeting, n: int) -> bytes:
        chunk = h.text[h.offset : h.offset + max(n, 0)]
        h.offset += len(chunk)
        return chunk


ns = rt.mkns(None)  # our own fork of the namespace: adding to it touches nobody else
channel = rt.mkscheme("greeting", ns)
child = rt.spawn([sys.executable, "-c",
                  "import rt; print('child read:', rt.open_file('/scheme/greeting/world').read(), end='')"],
                 ns=ns)


async def main() -> None:
    async with trio.open_nursery() as nursery:
        nursery.start_soon(serve, GreetingScheme(), channel)
        await trio.to_thread.run_sync(child.wait)
        nursery.cancel_scope.cancel()


trio.run(main)
print("child exited with", child.returncode)
