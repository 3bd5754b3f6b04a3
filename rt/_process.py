"""The process's own capabilities: its namespace fd and its current directory.

A program started by `redoxcap run` (or `rt.spawn`) inherits both as fds and
finds their numbers in the environment; rt adopts them on first use (or when
the program calls `rt.adopt()`), never on import. The CWD is
an fd plus a cached path string for getcwd: relative paths are sent to
openat(cwd_fd, ...) and never become absolute strings.
"""

from __future__ import annotations

import errno
import os
import threading

ENV_NS = "REDOXCAP_NS_FD"
ENV_CWD = "REDOXCAP_CWD_FD"
ENV_CWD_PATH = "REDOXCAP_CWD"

_lock = threading.RLock()
_ns_fd: int | None = None
_cwd_fd: int | None = None
_cwd_path: str = "/"
_adopted = False


def adopt_from_environment() -> None:
    """Take the namespace and cwd fds the environment names (once; later calls do nothing).

    Called by the first call that needs them; `rt.setup` makes it moot.
    """
    global _ns_fd, _cwd_fd, _cwd_path, _adopted
    with _lock:
        if _adopted:
            return
        _adopted = True
        ns, cwd = os.environ.pop(ENV_NS, None), os.environ.pop(ENV_CWD, None)
        path = os.environ.pop(ENV_CWD_PATH, "/")
        if ns is not None and ns.isdigit():
            _ns_fd = int(ns)
            os.set_inheritable(_ns_fd, False)  # rt.spawn hands children clones, never these
        if cwd is not None and cwd.isdigit():
            _cwd_fd = int(cwd)
            os.set_inheritable(_cwd_fd, False)
            _cwd_path = path


def namespace_fd() -> int:
    """The process's namespace fd (EBADF when it has none)."""
    adopt_from_environment()
    if _ns_fd is None:
        raise OSError(errno.EBADF, "this process has no namespace (start it with `redoxcap run`)")
    return _ns_fd


def cwd_fd() -> int:
    """The process's current-directory fd (EBADF when it has none)."""
    adopt_from_environment()
    if _cwd_fd is None:
        raise OSError(errno.EBADF, "this process has no current directory capability")
    return _cwd_fd


def cwd_path() -> str:
    adopt_from_environment()
    return _cwd_path


def replace_namespace(fd: int | None) -> None:
    """Make fd (owned from now on) the namespace; closes the previous one."""
    global _ns_fd, _adopted
    with _lock:
        _adopted = True  # what the environment names is not ours to take any more
        old, _ns_fd = _ns_fd, fd
    if old is not None and old != fd:
        os.close(old)


def replace_cwd(fd: int | None, path: str) -> None:
    """Make fd (owned from now on) the current directory; closes the previous one."""
    global _cwd_fd, _cwd_path, _adopted
    with _lock:
        _adopted = True
        old, _cwd_fd, _cwd_path = _cwd_fd, fd, path
    if old is not None and old != fd:
        os.close(old)
