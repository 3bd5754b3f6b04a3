"""The wire protocol's constants and its value codec; every process imports it.

It imports nothing of the project but the operation table (wire/ops.py).
Frames (their headers and how they are built and split) are wire/frames.py;
docs/protocol.md describes both in prose.

A body is a msgpack array of arguments (requests) or one msgpack value
(replies; an errno int when status is ERR). Capabilities travel as fds in
SCM_RIGHTS ancillary data next to the frame.
"""

from __future__ import annotations

import errno
import os
import socket
import struct
from typing import Any

import msgpack

from redoxcap.wire.linux import AT_REMOVEDIR, UCRED  # noqa: F401 - AT_REMOVEDIR, re-exported (UNLINKAT's flag)
from redoxcap.wire.ops import (  # noqa: F401 - the operation numbers, re-exported for every process
    CHMODAT,
    CHOWNAT,
    DUP,
    FPATH,
    FSTAT,
    FSYNC,
    FTRUNCATE,
    GETDENTS,
    HOSTDIR,
    LINKAT,
    LSEEK,
    MAX_FDS,
    MAX_FDS_OF,
    MKDIRAT,
    NS_LIST,
    NS_MKNS,
    NS_NARROW,
    NS_PERMS,
    NS_REGISTER,
    NS_ROOT,
    NS_SCHEME_CREATE,
    NS_UNREGISTER,
    OPENAT,
    OPERATIONS,
    READ,
    READDIR,
    READLINKAT,
    RECVFD,
    RECVFROM,
    RENAMEAT,
    SENDFD,
    SENDTO,
    SHUTDOWN,
    STATAT,
    SYMLINKAT,
    UNLINKAT,
    UTIMENSAT,
    WRITE,
)

# -- frames ---------------------------------------------------------------------

NO_REF = 0xFFFF_FFFF_FFFF_FFFF  # in an SREQUEST ref slot: "not a capability at all"
FOREIGN_REF = 0xFFFF_FFFF_FFFF_FFFE  # in an SREQUEST ref slot: "a capability of another scheme"
ROOT_HANDLE = 0  # every scheme's handle 0 is its root; it survives scheme restarts

# -- reply statuses ------------------------------------------------------------

OK = 0
ERR = 1
NEW_HANDLE = 2  # scheme -> router only: mint a capability for this handle
KEEP = 3  # scheme -> router only, not a reply: keep this state of a handle across a restart
HELLO = 4  # scheme -> router only, first frame of a daemon: who serves the scheme (SO_PASSCRED)
KEEP_MORE = 5  # scheme -> router only: fds of a KEEP that needs more than one frame; KEEP ends it
NEW_HANDLE_KEPT = 6  # scheme -> router only: a NEW_HANDLE that carries the new handle's KEEP

# -- operations ----------------------------------------------------------------
# 1..15 are answered by the router itself; 16.. are forwarded to the scheme.

RESTORE_MORE = 6  # router -> scheme: fds of a RESTORE that needs more than one frame (internal)
CLONE = 1  # any capability: a new socket for the same handle (shared offset)
GETFL = 2  # any capability: the fd flags the scheme gave the handle
SCHEME_CREATE = 8  # kernel capability: a new anonymous scheme
SCHEME_RESTART = 9  # kernel capability: a new channel for a scheme whose daemon died
KERNEL_STATUS = 10  # kernel capability: counters per scheme id
TRACE = 7  # the supervisor's kernel capability: a socket the router streams a record per call on
ACCOUNT_NEW = 11  # kernel capability: clones of the passed capabilities in a fresh account
RESUME = 12  # router -> scheme, after a restart's RESTOREs: the next free handle number (internal)
RESTORE = 13  # router -> scheme, after a restart: a handle's kept state (internal, no reply)
SCHEME_STATUS = 14  # router -> scheme: how many handles are open (internal)
CLOSE = 15  # router -> scheme: the last capability for a handle is gone (no reply)

FIRST_SCHEME_OP = 16  # 1..15 are answered by the router itself

# op -> (method name, argument types): what the scheme framework checks every
# request against before calling the method (derived from wire/ops.py).
SCHEME_OPS: dict[int, tuple[str, tuple[tuple[type, ...], ...]]] = {
    op.number: (op.name, op.types) for op in OPERATIONS
}

# -- flags ---------------------------------------------------------------------
# Open flags and UNLINKAT's AT_REMOVEDIR are Linux's; these three use bits Linux leaves free.

O_RESOLVE_BENEATH = 0x1000_0000
O_RESOLVE_IN_ROOT = 0x2000_0000
# Ask for a host fd instead of a capability where the scheme can give one with the same
# semantics (the file scheme: a regular file, opened with exactly the access asked for).
O_PASSTHROUGH = 0x0800_0000

# Namespace permissions (after Redox's nsmgr).
PERM_LIST = 1
PERM_INSERT = 2
PERM_DELETE = 4
PERM_SCHEME_CREATE = 8
PERM_ALL = PERM_LIST | PERM_INSERT | PERM_DELETE | PERM_SCHEME_CREATE

# -- namespace paths and inherited capabilities -----------------------------------

SCHEME_ROOT = "/scheme"  # `/scheme/NAME/rest` names rest in scheme NAME of a namespace
# The environment a started program finds its capabilities in (`redoxcap run`, rt.spawn):
# the fd numbers of its namespace and cwd, and the cwd's path for getcwd.
ENV_NS = "REDOXCAP_NS_FD"
ENV_CWD = "REDOXCAP_CWD_FD"
ENV_CWD_PATH = "REDOXCAP_CWD"


def split_namespace_path(ns_path: str) -> tuple[str, str]:
    """'/scheme/NAME/rest' -> ('/scheme/NAME', 'rest' or '.')."""
    name, _, rest = ns_path[len(SCHEME_ROOT) + 1 :].partition("/")
    return f"{SCHEME_ROOT}/{name}", rest.lstrip("/") or "."


# -- limits --------------------------------------------------------------------

MAX_IO = 128 * 1024  # largest read or write payload in one frame
MAX_FRAME = MAX_IO + 4096  # receive buffer; a larger frame is MSG_TRUNC -> EINVAL
CMSG_FDS = socket.CMSG_SPACE(4 * MAX_FDS)
CMSG_ALL = socket.CMSG_SPACE(12) + CMSG_FDS  # credentials first, then fds
# recvmsg flags that make a frame unusable; a plain int (socket.MSG_* are slow enum flags)
TRUNCATED = int(socket.MSG_CTRUNC | socket.MSG_TRUNC)
MAX_NAME = 255  # longest scheme name
MAX_PATH = 4096  # longest path in a request
DENTS_BUDGET = 64 * 1024  # characters of names in one GETDENTS reply


def page_of_names(names: list[str], start: int) -> list[str]:
    """The names from index start on that fit in one GETDENTS reply (at least one)."""
    page, size = [], 0
    for name in names[max(start, 0) :]:
        size += len(name.encode()) + 8
        if page and size > DENTS_BUDGET:
            break
        page.append(name)
    return page


class ProtocolError(Exception):
    """A frame that cannot be decoded; always answered with EINVAL."""

    errno = errno.EINVAL


def _no_ext(code: int, data: bytes) -> Any:
    raise ValueError(f"msgpack ext type {code} is not allowed")


def pack(value: Any) -> bytes:
    """Encode one body value."""
    return msgpack.packb(value, use_bin_type=True)


def unpack(data: bytes | memoryview) -> Any:
    """Decode an untrusted body; any malformation raises ProtocolError."""
    try:
        return msgpack.unpackb(
            data, raw=False, strict_map_key=True, ext_hook=_no_ext, use_list=True
        )
    except (ValueError, UnicodeDecodeError, TypeError, msgpack.UnpackException) as exc:
        raise ProtocolError(str(exc)) from None


def parse_ancillary(ancdata: list[tuple[int, int, bytes]]) -> tuple[list[int], tuple[int, int, int] | None]:
    """Extract (fds, (pid, uid, gid) or None) from recvmsg ancillary data."""
    fds: list[int] = []
    cred = None
    for level, kind, data in ancdata:
        if level != socket.SOL_SOCKET:
            continue
        if kind == socket.SCM_RIGHTS:
            usable = len(data) - len(data) % 4
            fds.extend(struct.unpack(f"{usable // 4}i", data[:usable]))
        elif kind == socket.SCM_CREDENTIALS and len(data) >= 12:
            cred = UCRED.unpack_from(data)
    return fds, cred


def close_fds(fds: list[int]) -> None:
    """Close every fd in a list, ignoring ones already gone."""
    for fd in fds:
        try:
            os.close(fd)
        except OSError:
            pass


def fds_ancillary(fds: list[int] | tuple[int, ...]) -> list[tuple[int, int, bytes]]:
    """Ancillary data carrying fds with SCM_RIGHTS (empty list for none)."""
    if not fds:
        return []
    if len(fds) > MAX_FDS:
        raise OSError(errno.EINVAL, f"at most {MAX_FDS} fds per message")
    return [(socket.SOL_SOCKET, socket.SCM_RIGHTS, struct.pack(f"{len(fds)}i", *fds))]


def raise_errno(err: Any) -> None:
    """Raise the OSError subclass for an errno received in a reply."""
    if type(err) is not int or not 0 < err < 4096:
        err = errno.EIO
    raise OSError(err, os.strerror(err))


def valid_scheme_name(name: object) -> bool:
    """Scheme names: non-empty ASCII, no NUL, '/' or ':'."""
    return (
        isinstance(name, str)
        and 0 < len(name) <= MAX_NAME
        and name.isascii()
        and not any(c in name for c in "\0/:")
    )

