"""The scheme framework: write a scheme daemon as one class, serve it on a channel.

A scheme daemon subclasses `Scheme` (schemes/_scheme.py), which states the
whole request protocol: one async method per operation of wire/ops.py, each
answering that operation's declared errno (ENOSYS for most) until a scheme
overrides it. `@takes(Kind, ...)` on a method declares which kinds of handle
object it takes. Both are checked when the class is defined: a method that
does not take the declared arguments, or a `@takes` that names no class, is
a TypeError at import.

`serve()` reads requests from the channel the kernel router gave the scheme
(the loop is schemes/_server.py), checks each request's arguments against the
declared types and its handle against `@takes` before any method runs, runs
each method in its own task (a slow request never holds up the others;
`inline_ops` run in place, a turn's worth at a time: see schemes/_server.py;
one that finds it has long work to do raises `RunInTask` and runs in a task
after all), and turns what the method returns or raises into the reply:

- a plain value            -> OK with that value (a wire.stat.Stat is sent as its map)
- `Opened(obj, fdflags)`   -> a new handle; the router mints a capability for it
- `Reply(value, fds)`      -> OK with fds passed to the caller (then closed here)
- `SchemeError`            -> ERR with its errno (an OSError too); anything else -> EIO, logged

A request on a handle of a kind the method does not take is answered with the
operation's `wrong_handle` errno (ENOTDIR for a path relative to a file,
EBADF otherwise) without calling the method.

Handles are numbered by the framework; handle 0 is the root (`Scheme.root()`),
which the router keeps across daemon restarts. When the router says CLOSE,
in-flight requests on that handle are cancelled and `close()` is called.
"""

from __future__ import annotations

import argparse
import logging
import stat
import sys
from collections.abc import Callable

import trio

from redoxcap.schemes._scheme import (
    Caller,
    HandleRef,
    Opened,
    Reply,
    Request,
    RunInTask,
    Scheme,
    SchemeError,
    takes,
    unserved,
)
from redoxcap.schemes._server import RESOLVE_FLAGS, _Server, check_handle, invoke
from redoxcap.wire.channel import Channel
from redoxcap.wire.limits import forbid_core_dumps, raise_fd_limit
from redoxcap.wire.stat import Stat

__all__ = [
    "RESOLVE_FLAGS",
    "ROOT_STAT",
    "Caller",
    "Changed",
    "HandleRef",
    "Opened",
    "Reply",
    "Request",
    "RunInTask",
    "Scheme",
    "SchemeError",
    "check_handle",
    "daemon_cli",
    "daemon_main",
    "invoke",
    "serve",
    "takes",
    "unserved",
]

# A root that opens things but lists nothing: a directory with search permission only.
ROOT_STAT = Stat(st_mode=stat.S_IFDIR | 0o111, st_nlink=2)


class Changed:
    """Wakes every task waiting for a change of some state (an Event that re-arms).

    Schemes that block (pipes, in-daemon sockets) wait on one of these in a
    loop that re-checks their condition, and notify it whenever state changes.
    """

    def __init__(self) -> None:
        self._event = trio.Event()

    def notify(self) -> None:
        self._event.set()
        self._event = trio.Event()

    async def wait(self) -> None:
        await self._event.wait()


async def serve(scheme: Scheme, channel_fd: int) -> None:
    """Serve scheme on the channel fd the router gave it, until the router goes away.

    Args:
        scheme: the scheme to serve.
        channel_fd: this daemon's end of the scheme channel (ownership passes here).
    """
    channel = Channel.from_fd(channel_fd)
    try:
        await _Server(scheme, channel).run()
    finally:
        channel.close()


def daemon_cli(
    module: str,
    make: Callable[[argparse.Namespace], Scheme],
    configure: Callable[[argparse.ArgumentParser], None] | None = None,
) -> None:
    """`python -m MODULE --channel-fd N [options]`: the shared __main__ of scheme daemons.

    Args:
        module: the daemon's module name, for --help.
        make: builds the scheme from the parsed arguments.
        configure: adds the daemon's own options to the parser.
    """
    forbid_core_dumps()
    parser = argparse.ArgumentParser(prog=f"python -m {module}", description=sys.modules["__main__"].__doc__)
    parser.add_argument("--channel-fd", type=int, required=True,
                        help="inherited scheme channel from the router's SCHEME_CREATE")
    if configure is not None:
        configure(parser)
    args = parser.parse_args()
    try:
        scheme = make(args)
    except OSError as exc:  # its root gone (a run's /tmp removed as it started): say so
        sys.exit(f"python -m {module}: cannot serve {exc.filename or 'its root'}: {exc.strerror}")
    daemon_main(scheme, args.channel_fd)


def daemon_main(scheme: Scheme, channel_fd: int) -> None:
    """Entry point shared by the scheme daemons' __main__ modules."""
    forbid_core_dumps()
    logging.basicConfig(
        level=logging.WARNING,
        format=f"{scheme.name}[%(process)d] %(levelname)s %(message)s",
    )
    raise_fd_limit()
    try:
        trio.run(serve, scheme, channel_fd)
    except KeyboardInterrupt:
        pass
