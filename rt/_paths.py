"""POSIX paths to (capability, path) pairs.

- `/scheme/NAME/rest`      -> the namespace, as is
- `/other/absolute/path`   -> the namespace, as `/scheme/file/other/absolute/path`,
                              or `/scheme/NAME/rest` beneath a directory `redoxcap run
                              --dir` handed over as NAME (REDOXCAP_DIRS)
- `NAME:rest` (legacy)     -> the namespace, as `/scheme/NAME/rest`
- `relative/path`          -> the directory fd (the cwd for AT_FDCWD), unchanged

A relative path is never joined onto the cwd string: it goes to
openat(cwd_fd, path) and the scheme resolves it from that directory.
"""

from __future__ import annotations

import errno
import functools
import json
import os

from redoxcap.wire import protocol as P
from redoxcap.wire.linux import AT_FDCWD
from redoxcap.wire.protocol import SCHEME_ROOT, split_namespace_path  # noqa: F401 - rt's own, re-exported
from rt import _process

# JSON [[visible path, scheme name], ...]: the host directories `redoxcap run --dir` handed
# over, each seen at its own absolute path and served as a scheme of the namespace.
ENV_DIRS = "REDOXCAP_DIRS"


@functools.cache
def handed_dirs() -> tuple[tuple[str, str], ...]:
    """(visible path, scheme name) of each directory in REDOXCAP_DIRS, longest path first."""
    try:
        entries = json.loads(os.environ.get(ENV_DIRS, "[]"))
        dirs = [(str(v).rstrip("/") or "/", str(n)) for v, n in entries
                if str(v).startswith("/") and P.valid_scheme_name(n)]
    except (ValueError, TypeError):
        return ()
    return tuple(sorted(dirs, key=lambda d: -len(d[0])))


def handed_dir_path(path: str) -> str | None:
    """`/scheme/NAME/rest` for an absolute path beneath a handed directory, else None."""
    for visible, name in handed_dirs():
        if path == visible or path.startswith(visible + "/"):
            return f"{SCHEME_ROOT}/{name}/" + path[len(visible):].lstrip("/")
    return None


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
        return handed_dir_path(path) or "/scheme/file" + path
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
