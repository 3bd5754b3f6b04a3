"""POSIX paths to (capability, path) pairs.

- `/scheme/NAME/rest`      -> the namespace, as is
- `/other/absolute/path`   -> the namespace, as `/scheme/file/other/absolute/path`
- `NAME:rest` (legacy)     -> the namespace, as `/scheme/NAME/rest`
- `relative/path`          -> the directory fd (the cwd for AT_FDCWD), unchanged

A relative path is never joined onto the cwd string: it goes to
openat(cwd_fd, path) and the scheme resolves it from that directory.
"""

from __future__ import annotations

import errno
import os

from rt import _process
from wire import protocol as P
from wire.linux import AT_FDCWD

SCHEME_ROOT = "/scheme"


def fspath(path: str | bytes | os.PathLike) -> str:
    """A path argument as str; empty paths are ENOENT, NULs EINVAL, as Linux."""
    path = os.fsdecode(os.fspath(path))
    if not path:
        raise OSError(errno.ENOENT, "empty path")
    if "\0" in path:
        raise OSError(errno.EINVAL, "path contains NUL")
    if len(path) > P.MAX_PATH:
        raise OSError(errno.ENAMETOOLONG, os.strerror(errno.ENAMETOOLONG))
    return path


def to_namespace_path(path: str) -> str | None:
    """The namespace path for an absolute or legacy path; None for a relative one."""
    if path == SCHEME_ROOT or path.startswith(SCHEME_ROOT + "/"):
        return path
    if path.startswith("/"):
        return "/scheme/file" + path
    name, colon, rest = path.partition(":")
    if colon and P.valid_scheme_name(name):
        return f"/scheme/{name}/{rest.lstrip('/')}"
    return None


def locate(path: str | bytes | os.PathLike, dirfd: int = AT_FDCWD) -> tuple[int, str, bool]:
    """Where a path operation goes.

    Returns:
        (capability fd, path to send, whether the fd is the namespace).
    """
    path = fspath(path)
    ns_path = to_namespace_path(path)
    if ns_path is not None:
        return _process.namespace_fd(), ns_path, True
    if dirfd == AT_FDCWD:
        return _process.cwd_fd(), path, False
    return dirfd, path, False


def split_namespace_path(ns_path: str) -> tuple[str, str]:
    """'/scheme/NAME/rest' -> ('/scheme/NAME', 'rest' or '.')."""
    name, _, rest = ns_path[len(SCHEME_ROOT) + 1 :].partition("/")
    return f"{SCHEME_ROOT}/{name}", rest.lstrip("/") or "."
