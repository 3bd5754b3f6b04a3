"""Starting programs that inherit a namespace and a cwd of their own."""

from __future__ import annotations

import os
from collections.abc import Sequence
from typing import TYPE_CHECKING

from rt import _process
from rt._namespace import mkns
from rt._posix import clone, close

if TYPE_CHECKING:
    import subprocess


def spawn(
    argv: Sequence[str],
    ns: int | None = None,
    pass_fds: Sequence[int] = (),
    env: dict[str, str] | None = None,
    share_ns: bool = False,
    **popen_kwargs,
) -> subprocess.Popen:
    """Start a program with a namespace of its own and a clone of the cwd.

    By default the child gets a fork of the namespace (or of ns): the same
    names and at most the same permissions, in a namespace of its own, so it
    cannot register or remove names in the parent's. With share_ns=True it
    gets a clone of the very handle instead (changes it makes are the
    parent's too). The child's `import rt` adopts both. Extra capability fds
    in pass_fds are inherited as they are: clone one first if this process
    keeps using it.
    """
    parent_ns = _process.namespace_fd() if ns is None else ns
    ns_child = clone(parent_ns) if share_ns else mkns(None, parent_ns)
    cwd_clone = None
    try:
        cwd_clone = clone(_process.cwd_fd())
        env = dict(os.environ if env is None else env)
        env[_process.ENV_NS] = str(ns_child)
        env[_process.ENV_CWD] = str(cwd_clone)
        env[_process.ENV_CWD_PATH] = _process.cwd_path()
        import subprocess  # here: importing rt does not load it

        return subprocess.Popen(
            list(argv), pass_fds=(ns_child, cwd_clone, *pass_fds), env=env, **popen_kwargs
        )
    finally:
        close(ns_child)
        if cwd_clone is not None:
            close(cwd_clone)
