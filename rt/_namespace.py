"""Namespaces: the process's own, forks of it, and the names in them (nsmgr's operations)."""

from __future__ import annotations

import errno
from collections.abc import Iterable, Mapping

from redoxcap.wire import protocol as P
from redoxcap.wire.call import call_fd, call_value
from rt import _process


def getns() -> int:
    """The process's namespace fd (owned by rt: clone it to keep a copy)."""
    return _process.namespace_fd()


def setns(fd: int) -> None:
    """Make a clone of the namespace fd the process's namespace."""
    _process.replace_namespace(call_fd(fd, P.CLONE))  # a namespace is a capability, never a host fd


def mkns(names: Iterable[str] | None, ns: int | None = None, perms: int | None = None,
         put: Mapping[str, int] | None = None) -> int:
    """Fork a namespace into one with only names (all for None) and at most perms.

    put: capabilities (which stay the caller's) to stand in the fork as these names,
    instead of the parent's entries or besides them: as `unregister` and `register` on
    the fork would, in one request (the parent needs INSERT, and DELETE for a name it
    would have given the fork).

    Raises:
        OSError: ENODEV for a name the parent lacks, EACCES for a permission it lacks,
            EINVAL or ENOTDIR for a capability in put that cannot be an entry.
    """
    ns_fd = _process.namespace_fd() if ns is None else ns
    put = dict(put or {})
    return call_fd(ns_fd, P.NS_MKNS, [None if names is None else list(names), perms, list(put) or None],
                   list(put.values()))


def narrow(ns: int, perms: int) -> None:
    """Drop permissions from a namespace handle (EACCES if perms asks for more)."""
    call_value(ns, P.NS_NARROW, [perms])


def nsperms(ns: int | None = None) -> int:
    """The permissions of a namespace handle."""
    return call_value(_process.namespace_fd() if ns is None else ns, P.NS_PERMS, kind=int)


def schemes(ns: int | None = None) -> list[str]:
    """The names in a namespace, sorted (needs LIST)."""
    names = call_value(_process.namespace_fd() if ns is None else ns, P.NS_LIST, kind=list)
    if not all(isinstance(name, str) for name in names):
        raise OSError(errno.EIO, "malformed namespace listing")
    return names


def register(ns_fd: int, name: str, cap_fd: int) -> None:
    """Register cap_fd (a scheme root or any directory capability) as name (needs INSERT)."""
    call_value(ns_fd, P.NS_REGISTER, [name], [cap_fd])


def mkscheme(name: str, ns: int | None = None) -> int:
    """Create a scheme registered as name in a namespace (needs SCHEME_CREATE).

    Returns:
        The scheme's request channel: serve it with schemes.framework.serve
        (in this process or one it hands the fd to). Until then, requests
        to the scheme wait.
    """
    return call_fd(_process.namespace_fd() if ns is None else ns, P.NS_SCHEME_CREATE, [name])


def unregister(ns_fd: int, name: str) -> None:
    """Remove name from a namespace (needs DELETE)."""
    call_value(ns_fd, P.NS_UNREGISTER, [name])
