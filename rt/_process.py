"""The process's own capabilities: its namespace fd and its current directory.

A program started by `redoxcap run` (or `rt.spawn`) inherits both as fds and
finds their numbers in the environment; rt adopts them on first use (or when
the program calls `rt.adopt()`), never on import. The CWD is
an fd plus a cached path string for getcwd: relative paths are sent to
openat(cwd_fd, ...) and never become absolute strings.

The state lives in one `ProcessCapabilities` object, `CURRENT`; the module's
functions are its methods, so that `_process.cwd_fd()` reads as before.
"""

from __future__ import annotations

import errno
import os
import threading

from redoxcap.wire.protocol import ENV_CWD, ENV_CWD_PATH, ENV_NS


class ProcessCapabilities:
    """A process's namespace fd, cwd fd and cwd path (each fd owned; safe across threads)."""

    def __init__(self) -> None:
        self._lock = threading.RLock()
        self._ns_fd: int | None = None
        self._cwd_fd: int | None = None
        self._cwd_path = "/"
        self._adopted = False

    def adopt_from_environment(self) -> None:
        """Take the namespace and cwd fds the environment names (once; later calls do nothing).

        Called by the first call that needs them; `rt.setup` makes it moot.
        """
        with self._lock:
            if self._adopted:
                return
            self._adopted = True
            ns, cwd = os.environ.pop(ENV_NS, None), os.environ.pop(ENV_CWD, None)
            path = os.environ.pop(ENV_CWD_PATH, "/")
            if ns is not None and ns.isdigit():
                self._ns_fd = int(ns)
                os.set_inheritable(self._ns_fd, False)  # rt.spawn hands children clones, never these
            if cwd is not None and cwd.isdigit():
                self._cwd_fd = int(cwd)
                os.set_inheritable(self._cwd_fd, False)
                self._cwd_path = path

    def namespace_fd(self) -> int:
        """The process's namespace fd (EBADF when it has none)."""
        self.adopt_from_environment()
        if self._ns_fd is None:
            raise OSError(errno.EBADF, "this process has no namespace (start it with `redoxcap run`)")
        return self._ns_fd

    def cwd_fd(self) -> int:
        """The process's current-directory fd (EBADF when it has none)."""
        self.adopt_from_environment()
        if self._cwd_fd is None:
            raise OSError(errno.EBADF, "this process has no current directory capability")
        return self._cwd_fd

    def cwd_path(self) -> str:
        """What getcwd answers: the path the cwd fd was reached by, after symlinks."""
        self.adopt_from_environment()
        return self._cwd_path

    def replace_namespace(self, fd: int | None) -> None:
        """Make fd (owned from now on) the namespace; closes the previous one."""
        with self._lock:
            self._adopted = True  # what the environment names is not ours to take any more
            old, self._ns_fd = self._ns_fd, fd
        if old is not None and old != fd:
            os.close(old)

    def replace_cwd(self, fd: int | None, path: str) -> None:
        """Make fd (owned from now on) the current directory; closes the previous one."""
        with self._lock:
            self._adopted = True
            old, self._cwd_fd, self._cwd_path = self._cwd_fd, fd, path
        if old is not None and old != fd:
            os.close(old)


CURRENT = ProcessCapabilities()
adopt_from_environment = CURRENT.adopt_from_environment
namespace_fd = CURRENT.namespace_fd
cwd_fd = CURRENT.cwd_fd
cwd_path = CURRENT.cwd_path
replace_namespace = CURRENT.replace_namespace
replace_cwd = CURRENT.replace_cwd


def setup(ns_fd: int | None, cwd_fd: int | None, cwd_path: str = "/") -> None:
    """Install a namespace and cwd in this process (rt owns the fds from now on).

    For programs that obtain their capabilities some other way than being
    started by `redoxcap run` (the CLI itself, tests).
    """
    CURRENT.replace_namespace(ns_fd)
    CURRENT.replace_cwd(cwd_fd, cwd_path)
