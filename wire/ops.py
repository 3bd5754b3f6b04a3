"""Every operation a capability can carry, declared once.

An `Operation` says everything the rest of the system needs to know about
one request kind: its number on the wire, its name (the method a scheme
implements), the name and type of each argument, which argument is a path,
how nsmgr forwards it through a namespace, the errno a scheme that does not
implement it answers, and the prose for the docs. From this table follow:

- the argument checks the scheme framework makes before any method runs, and
  its default methods (schemes/framework.py);
- nsmgr's forwarders for path operations (nsmgr/namespace.py);
- the operation tables in docs/protocol.md (`python -m wire.ops` prints them,
  and a test fails when the page and this table disagree).

Adding an operation is one entry here plus the methods that serve it.
Operations answered by the router itself (CLONE, GETFL, the kernel
capability's) are in wire/protocol.py: no scheme sees them.
"""

from __future__ import annotations

import enum
import errno
from dataclasses import dataclass


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
        doc: what it does, for the docs and the framework's default method.
        default: the errno of a scheme that does not implement it.
        path: the index of the argument that is a path, if any.
        forward: how nsmgr forwards it.
        namespace: an operation of namespace handles (nsmgr's own).
        fds: what travels with the request, for the docs ("" for nothing).
        wrong_handle: the errno when the handle is of a kind the method does not take
            (a path relative to a file is ENOTDIR, reading a directory EBADF...).
    """

    number: int
    name: str
    args: tuple[Arg, ...]
    result: str
    errnos: str
    doc: str
    default: int = errno.ENOSYS
    path: int | None = None
    forward: Forward = Forward.NONE
    namespace: bool = False
    fds: str = ""
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

OPERATIONS: tuple[Operation, ...] = (
    Operation(OPENAT, "openat", (_a("path", _STR), _a("flags", _INT), _a("mode", _INT)),
              "new capability",
              "ENOENT EEXIST ENOTDIR EISDIR ELOOP EACCES EXDEV EINVAL (unsupported flag)",
              "Open path relative to the handle (a directory, a scheme's root or a scope).",
              path=0, forward=Forward.OPEN),
    Operation(READ, "read", (_a("n", _INT),), 'bytes (b"" at EOF)', "EBADF EISDIR",
              "Read up to n bytes at the handle's offset; b\"\" at end of file."),
    Operation(WRITE, "write", (_a("data", _BYTES),), "int written", "EBADF EPIPE EROFS",
              "Write data; answer how many bytes were taken."),
    Operation(LSEEK, "lseek", (_a("pos", _INT), _a("whence", _INT)), "new offset", "ESPIPE EINVAL",
              "Move the handle's offset; answer the new offset.", default=errno.ESPIPE),
    Operation(FSTAT, "fstat", (), "map of `st_*` fields", "",
              "Status of the handle's file (wire.stat.Stat)."),
    Operation(FTRUNCATE, "ftruncate", (_a("length", _INT),), "nil", "EINVAL EROFS",
              "Set the size of the handle's file.", default=errno.EINVAL),
    Operation(FSYNC, "fsync", (), "nil", "EINVAL",
              "Flush the handle's data to stable storage.", default=errno.EINVAL),
    Operation(GETDENTS, "getdents", (_a("start", _INT),),
              "the names from index start on, in the scheme's order, as many as fit in ~64 KiB; "
              "`[]` past the end",
              "ENOTDIR",
              "The names in a directory handle, without . and .., from index start on, in an "
              "order that stays the same while the handle lists (the file scheme: the host "
              "directory's; others: sorted), as many as fit in one reply.",
              default=errno.ENOTDIR, wrong_handle=errno.ENOTDIR),
    Operation(FPATH, "fpath", (), "`/scheme/NAME/...`", "", "The handle's path as /scheme/NAME/..."),
    Operation(MKDIRAT, "mkdirat", (_a("path", _STR), _a("mode", _INT)), "nil", "EEXIST ENOENT",
              "Create a directory at path relative to the handle.", path=0, forward=Forward.VALUE),
    Operation(UNLINKAT, "unlinkat", (_a("path", _STR), _a("flags", _INT)), "nil",
              "ENOENT EISDIR ENOTDIR ENOTEMPTY",
              "Remove a name (a directory with flags AT_REMOVEDIR).", path=0, forward=Forward.VALUE),
    Operation(RENAMEAT, "renameat", (_a("old", _STR), _a("new", _STR)), "nil",
              "EXDEV (other scheme) ENOENT",
              "Rename old (relative to the handle) to new (relative to the passed directory "
              "capability, or the handle).", path=0, forward=Forward.TWO_PATHS,
              fds="optional: a directory capability for new"),
    Operation(SYMLINKAT, "symlinkat", (_a("target", _STR), _a("path", _STR)), "nil", "EEXIST",
              "Create a symlink at path whose contents are target.", path=1, forward=Forward.VALUE),
    Operation(READLINKAT, "readlinkat", (_a("path", _STR),), "str", "EINVAL (not a link)",
              "The contents of the symlink at path.", path=0, forward=Forward.VALUE),
    Operation(DUP, "dup", (_a("buf", _BYTES),), "new capability (a new handle)", "EINVAL (unknown buf)",
              "A new handle derived from the handle; buf says how (b\"\" is a plain copy)."),
    Operation(LINKAT, "linkat", (_a("old", _STR), _a("new", _STR)), "nil", "EXDEV",
              "Create a hard link new (relative to the passed directory capability, or the "
              "handle) to old.", path=0, forward=Forward.TWO_PATHS,
              fds="optional: a directory capability for new"),
    Operation(SHUTDOWN, "shutdown", (_a("how", _INT),), "nil", "ENOTSOCK",
              "Shut down one or both directions of a connection.", default=errno.ENOTSOCK),
    Operation(SENDFD, "sendfd", (), "nil", "EOPNOTSUPP EPIPE EINVAL ETOOMANYREFS (uds, below)",
              "Queue the capability passed with the request for the peer of the handle.",
              default=errno.EOPNOTSUPP, fds="one capability"),
    Operation(RECVFD, "recvfd", (), "one capability", "EOPNOTSUPP",
              "Receive the next capability sent by the peer.", default=errno.EOPNOTSUPP),
    Operation(RECVFROM, "recvfrom", (_a("n", _INT),),
              "[data: bytes (one datagram, cut to n), host: str, port: int] of the sender",
              "EOPNOTSUPP EBADF",
              "Receive one datagram and who sent it.", default=errno.EOPNOTSUPP),
    Operation(SENDTO, "sendto", (_a("data", _BYTES), _a("host", _STR), _a("port", _INT)),
              "int sent (one datagram)",
              "EOPNOTSUPP EISCONN (connected) EINVAL (address) EAFNOSUPPORT EMSGSIZE",
              "Send data as one datagram to host and port.", default=errno.EOPNOTSUPP),
    Operation(STATAT, "statat", (_a("path", _STR), _a("flags", _INT)), "map of `st_*` fields",
              "ENOENT ENOTDIR ELOOP EXDEV",
              "Status of the file at path relative to the handle, in one round trip (flags: "
              "O_NOFOLLOW for the link itself, O_RESOLVE_*; what openat with O_PATH and fstat "
              "answer).", path=0, forward=Forward.VALUE),
    Operation(READDIR, "readdir", (_a("start", _INT),),
              "as GETDENTS, each name as [name, d_type] (Linux's DT_* value, 0 when unknown)",
              "ENOTDIR",
              "GETDENTS with each entry's type, so that a listing needs no status of each entry.",
              wrong_handle=errno.ENOTDIR),
    Operation(CHMODAT, "chmodat", (_a("path", _STR), _a("mode", _INT), _a("flags", _INT)), "nil",
              "ENOENT EROFS EOPNOTSUPP (a symlink itself) EINVAL",
              "Set the permission bits (mode & 0o777; set-uid, set-gid and sticky bits are dropped) "
              "of the file at path relative to the handle, or of the handle's own file for an "
              "empty path (flags: O_NOFOLLOW, O_RESOLVE_*).", path=0, forward=Forward.VALUE),
    Operation(UTIMENSAT, "utimensat",
              (_a("path", _STR), _a("atime", _TIME), _a("mtime", _TIME), _a("flags", _INT)), "nil",
              "ENOENT EROFS EINVAL",
              "Set the access and modification times (nanoseconds since the epoch; nil leaves one "
              "as it is) of the file at path relative to the handle, or of the handle's own file "
              "for an empty path (flags: O_NOFOLLOW for a symlink itself, O_RESOLVE_*).",
              path=0, forward=Forward.VALUE),
    Operation(CHOWNAT, "chownat",
              (_a("path", _STR), _a("uid", _INT), _a("gid", _INT), _a("flags", _INT)), "nil",
              "ENOENT EROFS EPERM (another owner)",
              "Accept a change of owner that changes nothing: each id -1, the caller's own or the "
              "file's; anything else is EPERM (a file is never given to another user). Path and "
              "flags as CHMODAT.", path=0, forward=Forward.VALUE),
    Operation(HOSTDIR, "hostdir", (),
              "`{beneath, read_only}`; fds: O_PATH host fds of the directory and of its anchor "
              "(when that is another)",
              "EPERM (no grant) EOPNOTSUPP (no passthrough) ENOTDIR",
              "The host directory behind a directory handle, for the broker's native lookups "
              "(docs/sandbox.md): answered only with the scheme's directfs grant passed along "
              "(an fd of the supervisor's that no client is given), by a scheme that allows "
              "passthrough.", default=errno.EOPNOTSUPP, fds="the grant",
              wrong_handle=errno.ENOTDIR),
    Operation(NS_LIST, "ns_list", (), "sorted names", "EACCES without LIST",
              "The names in the namespace.", namespace=True),
    Operation(NS_MKNS, "ns_mkns", (_a("names", (list, type(None))), _a("perms", (int, type(None)))),
              "a new namespace capability",
              "ENODEV (a name the parent lacks), EACCES (a permission it lacks), EINVAL",
              "A fork holding names (nil: all the live ones) with perms (nil: the same), "
              "never more than the handle has.", namespace=True),
    Operation(NS_NARROW, "ns_narrow", (_a("perms", _INT),), "nil; the handle keeps only perms",
              "EACCES (asking for more)", "Keep only perms on this handle.", namespace=True),
    Operation(NS_REGISTER, "ns_register", (_a("name", _STR),), "nil",
              "EACCES without INSERT, EEXIST, EINVAL, ENOTDIR (not a directory or a root)",
              "Register the passed capability as name.", namespace=True, fds="one capability"),
    Operation(NS_UNREGISTER, "ns_unregister", (_a("name", _STR),), "nil",
              "EACCES without DELETE, ENODEV", "Remove name.", namespace=True),
    Operation(NS_PERMS, "ns_perms", (), "the handle's permissions", "",
              "This handle's permissions.", namespace=True),
    Operation(NS_SCHEME_CREATE, "ns_scheme_create", (_a("name", _STR),),
              "fds: [the new scheme's request channel]; its root is registered as name",
              "EACCES without SCHEME_CREATE, EEXIST, EINVAL",
              "A new scheme registered as name; the caller serves it on the channel.",
              namespace=True),
)

BY_NUMBER: dict[int, Operation] = {op.number: op for op in OPERATIONS}
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
