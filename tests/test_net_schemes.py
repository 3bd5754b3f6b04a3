"""The tcp, udp and pipe schemes in memory: the scheme objects driven directly, no router.

A capability grants what it names: only a scheme's root opens endpoints, and
addresses are canonical numeric literals checked before any socket is made.
Sockets are real (loopback), so these tests see what the daemon would do.
"""

from __future__ import annotations

import errno
import os

import pytest

from schemes.framework import Caller, Request, SchemeError
from schemes.pipe import PipeScheme


def req(op: int = 0) -> Request:
    return Request(Caller(os.getpid(), 0, 0), 0, op, [])


async def fails_with(err: int, coro) -> None:
    """Await coro and check that it raised the scheme error err."""
    with pytest.raises(SchemeError) as info:
        await coro
    assert info.value.errno == err, f"{errno.errorcode.get(info.value.errno)} != {errno.errorcode[err]}"


# -- only the root opens ---------------------------------------------------------


async def test_a_pipe_end_opens_nothing_and_the_pipe_root_behaves():
    s = PipeScheme()
    root = s.root()
    r = (await s.openat(req(), root, "", os.O_RDONLY, 0)).obj
    w = (await s.dup(req(), r, b"write")).obj
    for end in (r, w):
        for path in ("", ".", "x"):
            await fails_with(errno.ENOTDIR, s.openat(req(), end, path, os.O_RDONLY, 0))
    assert await s.fpath(req(), root) == "/scheme/pipe"
    assert (await s.fstat(req(), root))["st_mode"] & 0o170000 == 0o040000
    await fails_with(errno.EBADF, s.read(req(), root, 1))
    await fails_with(errno.EBADF, s.write(req(), root, b"x"))
    await fails_with(errno.EBADF, s.dup(req(), root, b"write"))
    await fails_with(errno.EACCES, s.getdents(req(), root, 0))
    await fails_with(errno.ENOTDIR, s.getdents(req(), r, 0))
    await s.close(root)  # the router never does, but it must not crash
    assert (await s.fstat(req(), r))["st_mode"] & 0o170000 == 0o010000
