"""Every operation a capability can carry, declared once.

An `Operation` says everything the rest of the system needs to know about
one request kind: its number on the wire, its name (the method a scheme
implements), the name and type of each argument, which argument is a path,
how nsmgr forwards it through a namespace, the errno a scheme that does not
implement it answers, and what the docs' tables say of it. From this table follow:

- the argument checks the scheme framework makes before any method runs, and
  the errno of each default method of `Scheme` (schemes/_scheme.py, where
  each operation's semantics are stated, one method per operation);
- how nsmgr forwards path operations (nsmgr/namespace.py);
- the operation tables in docs/protocol.md (`python -m redoxcap.wire.ops` prints them,
  and a test fails when the page and this table disagree).

Adding an operation is one entry here, its default method on `Scheme`, plus the
methods that serve it.
Operations answered by the router itself (CLONE, GETFL, the kernel
capability's) are in wire/protocol.py: no scheme sees them.
"""

from __future__ import annotations

import enum
import errno
from dataclasses import dataclass

MAX_FDS = 253  # SCM_RIGHTS' limit: the most fds one message carries


class Forward(enum.Enum):
    """How nsmgr treats an operation sent on a namespace handle."""

    NONE = "none"  # not a path operation: nsmgr answers it itself, or it is not served there
    VALUE = "value"  # the path names an entry; the rest goes to it and its answer comes back
    OPEN = "open"  # as VALUE, and the answer's one capability is relayed to the caller
    TWO_PATHS = "two paths"  # old and new in one scheme, or new relative to a passed directory


@dataclass(frozen=True)
class Arg:
    """One argument: its name in the docs and the msgpack types it may have."""

    name: str
    types: tuple[type, ...]

    @property
    def type_names(self) -> str:
        return " or ".join("nil" if t is type(None) else t.__name__ for t in self.types)


@dataclass(frozen=True)
class Operation:
    """One operation, as the wire, the framework, nsmgr and the docs see it.

    Attributes:
        number: its number in a request frame (16 and up; the router answers 1-15).
        name: the method a scheme implements for it (`Scheme.openat`...).
        args: its arguments, in order.
        result: what an OK reply carries, for the docs.
        errnos: the usual errors, for the docs.
        default: the errno of a scheme that does not implement it.
        path: the index of the argument that is a path, if any.
        forward: how nsmgr forwards it.
        namespace: an operation of namespace handles (nsmgr's own).
        fds: what travels with the request, for the docs ("" for nothing).
        max_fds: how many fds may travel with it (the router refuses more: EINVAL).
        wrong_handle: the errno when the handle is of a kind the method does not take
            (a path relative to a file is ENOTDIR, reading a directory EBADF...).
    """

    number: int
    name: str
    args: tuple[Arg, ...]
    result: str
    errnos: str
    default: int = errno.ENOSYS
    path: int | None = None
    forward: Forward = Forward.NONE
    namespace: bool = False
    fds: str = ""
    max_fds: int = 0
    wrong_handle: int = errno.EBADF

    def __post_init__(self) -> None:
        if self.path is not None:  # a lookup relative to something that is not a directory
            object.__setattr__(self, "wrong_handle", errno.ENOTDIR)

    @property
    def constant(self) -> str:
        """Its name in wire.protocol and the docs (`OPENAT`, `NS_LIST`)."""
        return self.name.upper()

    @property
    def types(self) -> tuple[tuple[type, ...], ...]:
        """The allowed types of each argument, in order."""
        return tuple(arg.types for arg in self.args)


_INT, _STR, _BYTES = (int,), (str,), (bytes,)
_TIME = (int, type(None))


def _a(name: str, types: tuple[type, ...]) -> Arg:
    return Arg(name, types)


OPENAT = 16
READ = 17
WRITE = 18
LSEEK = 19
FSTAT = 20
FTRUNCATE = 21
FSYNC = 22
GETDENTS = 23
FPATH = 24
MKDIRAT = 25
UNLINKAT = 26
RENAMEAT = 27
SYMLINKAT = 28
READLINKAT = 29
DUP = 30
LINKAT = 31
SHUTDOWN = 32
SENDFD = 33
RECVFD = 34
RECVFROM = 35
SENDTO = 36
STATAT = 37
READDIR = 38
CHMODAT = 39
NS_LIST = 40
NS_MKNS = 41
NS_NARROW = 42
NS_REGISTER = 43
NS_UNREGISTER = 44
NS_PERMS = 45
NS_SCHEME_CREATE = 46
UTIMENSAT = 47
CHOWNAT = 48
HOSTDIR = 49
NS_ROOT = 50

OPERATIONS: tuple[Operation, ...] = (
    Operation(OPENAT, "openat", (_a("path", _STR), _a("flags", _INT), _a("mode", _INT)),
              "new capability",
              "ENOENT EEXIST ENOTDIR EISDIR ELOOP EACCES EXDEV EINVAL (unsupported flag)",
              path=0, forward=Forward.OPEN),
    Operation(READ, "read", (_a("n", _INT),), 'bytes (b"" at EOF)', "EBADF EISDIR"),
    Operation(WRITE, "write", (_a("data", _BYTES),), "int written", "EBADF EPIPE EROFS"),
    Operation(LSEEK, "lseek", (_a("pos", _INT), _a("whence", _INT)), "new offset", "ESPIPE EINVAL",
              default=errno.ESPIPE),
    Operation(FSTAT, "fstat", (), "map of `st_*` fields", ""),
    Operation(FTRUNCATE, "ftruncate", (_a("length", _INT),), "nil", "EINVAL EROFS",
              default=errno.EINVAL),
    Operation(FSYNC, "fsync", (), "nil", "EINVAL", default=errno.EINVAL),
    Operation(GETDENTS, "getdents", (_a("start", _INT),),
              "the names from index start on, in the scheme's order, as many as fit in ~64 KiB; "
              "`[]` past the end",
              "ENOTDIR",
              default=errno.ENOTDIR, wrong_handle=errno.ENOTDIR),
    Operation(FPATH, "fpath", (), "`/scheme/NAME/...`", ""),
    Operation(MKDIRAT, "mkdirat", (_a("path", _STR), _a("mode", _INT)), "nil", "EEXIST ENOENT",
              path=0, forward=Forward.VALUE),
    Operation(UNLINKAT, "unlinkat", (_a("path", _STR), _a("flags", _INT)), "nil",
              "ENOENT EISDIR ENOTDIR ENOTEMPTY", path=0, forward=Forward.VALUE),
    Operation(RENAMEAT, "renameat", (_a("old", _STR), _a("new", _STR)), "nil",
              "EXDEV (other scheme) ENOENT", path=0, forward=Forward.TWO_PATHS,
              fds="optional: a directory capability for new", max_fds=1),
    Operation(SYMLINKAT, "symlinkat", (_a("target", _STR), _a("path", _STR)), "nil", "EEXIST",
              path=1, forward=Forward.VALUE),
    Operation(READLINKAT, "readlinkat", (_a("path", _STR),), "str", "EINVAL (not a link)",
              path=0, forward=Forward.VALUE),
    Operation(DUP, "dup", (_a("buf", _BYTES),), "new capability (a new handle)",
              "EINVAL (unknown buf)"),
    Operation(LINKAT, "linkat", (_a("old", _STR), _a("new", _STR)), "nil", "EXDEV",
              path=0, forward=Forward.TWO_PATHS,
              fds="optional: a directory capability for new", max_fds=1),
    Operation(SHUTDOWN, "shutdown", (_a("how", _INT),), "nil", "ENOTSOCK", default=errno.ENOTSOCK),
    Operation(SENDFD, "sendfd", (), "nil", "EOPNOTSUPP EPIPE EINVAL ETOOMANYREFS (uds, below)",
              default=errno.EOPNOTSUPP, fds="one capability", max_fds=1),
    Operation(RECVFD, "recvfd", (), "one capability", "EOPNOTSUPP", default=errno.EOPNOTSUPP),
    Operation(RECVFROM, "recvfrom", (_a("n", _INT),),
              "[data: bytes (one datagram, cut to n), host: str, port: int] of the sender",
              "EOPNOTSUPP EBADF", default=errno.EOPNOTSUPP),
    Operation(SENDTO, "sendto", (_a("data", _BYTES), _a("host", _STR), _a("port", _INT)),
              "int sent (one datagram)",
              "EOPNOTSUPP EISCONN (connected) EINVAL (address) EAFNOSUPPORT EMSGSIZE",
              default=errno.EOPNOTSUPP),
    Operation(STATAT, "statat", (_a("path", _STR), _a("flags", _INT)), "map of `st_*` fields",
              "ENOENT ENOTDIR ELOOP EXDEV", path=0, forward=Forward.VALUE),
    Operation(READDIR, "readdir", (_a("start", _INT),),
              "as GETDENTS, each name as [name, d_type] (Linux's DT_* value, 0 when unknown)",
              "ENOTDIR",
              wrong_handle=errno.ENOTDIR),
    Operation(CHMODAT, "chmodat", (_a("path", _STR), _a("mode", _INT), _a("flags", _INT)), "nil",
              "ENOENT EROFS EOPNOTSUPP (a symlink itself) EINVAL", path=0, forward=Forward.VALUE),
    Operation(UTIMENSAT, "utimensat",
              (_a("path", _STR), _a("atime", _TIME), _a("mtime", _TIME), _a("flags", _INT)), "nil",
              "ENOENT EROFS EINVAL",
              path=0, forward=Forward.VALUE),
    Operation(CHOWNAT, "chownat",
              (_a("path", _STR), _a("uid", _INT), _a("gid", _INT), _a("flags", _INT)), "nil",
              "ENOENT EROFS EPERM (another owner)", path=0, forward=Forward.VALUE),
    Operation(HOSTDIR, "hostdir", (),
              "`{beneath, read_only}`; fds: O_PATH host fds of the directory and of its anchor "
              "(when that is another)",
              "EPERM (no grant) EOPNOTSUPP (no passthrough) ENOTDIR",
              default=errno.EOPNOTSUPP, fds="the grant", max_fds=1, wrong_handle=errno.ENOTDIR),
    Operation(NS_LIST, "ns_list", (), "sorted names", "EACCES without LIST", namespace=True),
    Operation(NS_MKNS, "ns_mkns", (_a("names", (list, type(None))), _a("perms", (int, type(None))),
                                   _a("put", (list, type(None)))),
              "a new namespace capability: the entries names (nil: all), and each capability "
              "passed as its name in put (instead of the parent's entry, or besides them), as "
              "NS_UNREGISTER and NS_REGISTER on the fork would",
              "ENODEV (a name the parent lacks), EACCES (a permission it lacks: put needs INSERT, "
              "and DELETE for a name it replaces), EINVAL (not one capability per name in put), "
              "ENOTDIR", namespace=True, fds="a capability per name in put", max_fds=MAX_FDS),
    Operation(NS_NARROW, "ns_narrow", (_a("perms", _INT),), "nil; the handle keeps only perms",
              "EACCES (asking for more)", namespace=True),
    Operation(NS_REGISTER, "ns_register", (_a("name", _STR),), "nil",
              "EACCES without INSERT, EEXIST, EINVAL, ENOTDIR (not a directory or a root), "
              "EMFILE/ENFILE (below)",
              namespace=True, fds="one capability", max_fds=1),
    Operation(NS_UNREGISTER, "ns_unregister", (_a("name", _STR),), "nil",
              "EACCES without DELETE, ENODEV", namespace=True),
    Operation(NS_PERMS, "ns_perms", (), "the handle's permissions", "", namespace=True),
    Operation(NS_SCHEME_CREATE, "ns_scheme_create", (_a("name", _STR),),
              "fds: [the new scheme's request channel]; its root is registered as name",
              "EACCES without SCHEME_CREATE, EEXIST, EINVAL",
              namespace=True),
    Operation(NS_ROOT, "ns_root", (_a("name", _STR), _a("page", _INT)),
              "the namespace's generation; fds: [a clone of name's entry (charged to the "
              "caller), and with page a read-only memfd whose first 8 bytes, little-endian, "
              "are the generation]", "ENODEV, EINVAL", namespace=True),
)

BY_NUMBER: dict[int, Operation] = {op.number: op for op in OPERATIONS}
# The fds a request of each operation may carry (the router refuses more, closing them: an
# fd riding on a request that takes none would be held by the daemon for as long as the
# request waits, a read of a pipe for ever). Operations this table lacks (a client's own
# scheme's) may carry as many as a message does.
MAX_FDS_OF: dict[int, int] = {op.number: op.max_fds for op in OPERATIONS}
SCHEME_OPERATIONS = tuple(op for op in OPERATIONS if not op.namespace)
NAMESPACE_OPERATIONS = tuple(op for op in OPERATIONS if op.namespace)


def _row(op: Operation) -> str:
    args = ", ".join(f"{a.name}: {a.type_names}" for a in op.args) or "–"
    if op.fds:
        args += f" (+ {op.fds})"
    return f"| `{op.constant}` ({op.number}) | {args} | {op.result} | {op.errnos} |"


def markdown_table(namespace: bool) -> str:
    """The docs' table of scheme operations (namespace=False) or nsmgr's own ones."""
    lines = ["| op | args | result | typical errnos |", "| --- | --- | --- | --- |"]
    lines += [_row(op) for op in OPERATIONS if op.namespace == namespace]
    return "\n".join(lines) + "\n"


if __name__ == "__main__":
    print(markdown_table(namespace=False))
    print(markdown_table(namespace=True))
