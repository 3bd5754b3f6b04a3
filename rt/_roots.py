"""The roots of the namespace's entries, kept so that an open through the namespace is one request.

As Redox's nsmgr does since 2026, nsmgr hands a holder of a namespace the
capability behind a name (NS_ROOT: a clone of the scheme's root, or of the
directory registered as the name), and the holder opens the rest itself:
`open("/scheme/file/a/b")` is `openat(root of file, "a/b")`, one round trip
to the file scheme, nsmgr not asked. Each kept root is a capability charged
to the process's account like any other.

A change of the namespace (register, unregister, narrow, by this process or
any other holder of it) must be seen by the next open. nsmgr counts them in
a page of shared memory this process maps read-only (NS_GENERATION,
nsmgr/generation.py); every lookup compares the count with the one the kept
roots were taken at, and drops them all when it moved. Reading it costs no
round trip.

Where the namespace serves no generation page (a namespace served by some
other scheme, an nsmgr out of memory), where the name is not a plain scheme
name, or where the account has no room for one more capability (EMFILE),
the operation is sent on the namespace as before and nsmgr forwards it.
"""

from __future__ import annotations

import errno
import fcntl
import mmap
import os
import stat
import struct
import threading

from wire.call import call, forget
from wire import protocol as P

SCHEME_PREFIX = "/scheme/"
MAX_ROOTS = 64  # roots kept per namespace; names beyond are opened through nsmgr
GENERATION = struct.Struct("<Q")
# what nsmgr seals its page with: a page that could shrink would fault when read
PAGE_SEALS = fcntl.F_SEAL_SHRINK | fcntl.F_SEAL_GROW
NO_PAGE = False


class Root:
    """One kept root: its capability fd, and how many calls are using it now."""

    __slots__ = ("fd", "retired", "users")

    def __init__(self, fd: int) -> None:
        self.fd = fd
        self.users = 0
        self.retired = False  # dropped: closed when its last user is done


class NamespaceRoots:
    """The entries' roots of one process's namespace (safe across threads; owns every fd)."""

    def __init__(self) -> None:
        self._lock = threading.Lock()
        self._ns_fd: int | None = None
        self._page: mmap.mmap | bool | None = None  # None: not asked yet; NO_PAGE: none served
        self._seen = 0  # the generation the kept roots were taken at
        self._roots: dict[str, Root] = {}

    def take(self, ns_fd: int, ns_path: str) -> tuple[int, str, Root | None]:
        """Where to send a path operation on namespace path ns_path (`/scheme/NAME/rest`).

        Returns:
            (NAME's root, rest or ".", the root: give it back with `give_back` once the
            call is answered), or (ns_fd, ns_path, None) to send it on the namespace.

        Raises:
            OSError: ENODEV for a name the namespace lacks; whatever nsmgr answered.
        """
        name, rest = _split(ns_path)
        if name is None:
            return ns_fd, ns_path, None
        with self._lock:
            if ns_fd != self._ns_fd:
                self._forget_namespace()
                self._ns_fd = ns_fd
            if self._page is None:
                self._page = _map_generation(ns_fd)
            if self._page is NO_PAGE:
                return ns_fd, ns_path, None
            generation = GENERATION.unpack_from(self._page)[0]
            if generation != self._seen:
                self._retire_roots()
                self._seen = generation
            root = self._roots.get(name)
            if root is None:
                if len(self._roots) >= MAX_ROOTS:
                    return ns_fd, ns_path, None
                fd = _fetch_root(ns_fd, name)
                if fd is None:
                    return ns_fd, ns_path, None
                root = self._roots[name] = Root(fd)
            root.users += 1
            return root.fd, rest, root

    def give_back(self, root: Root) -> None:
        """A call that took root is answered: close it if it was dropped meanwhile."""
        with self._lock:
            root.users -= 1
            if root.retired and not root.users:
                _close(root.fd)

    def clear(self) -> None:
        """Drop everything (the process's namespace is replaced, or gone)."""
        with self._lock:
            self._forget_namespace()

    def after_fork_in_child(self) -> None:
        """A forked child shares no capability socket with its parent: close our copies."""
        self._lock = threading.Lock()
        for root in self._roots.values():
            _close(root.fd)
        self._roots = {}
        self._ns_fd = None
        if isinstance(self._page, mmap.mmap):
            self._page.close()
        self._page = None

    def _forget_namespace(self) -> None:
        self._retire_roots()
        if isinstance(self._page, mmap.mmap):
            self._page.close()
        self._page, self._ns_fd, self._seen = None, None, 0

    def _retire_roots(self) -> None:
        for root in self._roots.values():
            root.retired = True
            if not root.users:
                _close(root.fd)
        self._roots = {}


def _split(ns_path: str) -> tuple[str | None, str]:
    """('NAME', 'rest' or '.') for `/scheme/NAME/rest`; (None, "") when nsmgr is to judge it."""
    if not ns_path.startswith(SCHEME_PREFIX):
        return None, ""
    name, _, rest = ns_path[len(SCHEME_PREFIX):].partition("/")
    if not P.valid_scheme_name(name):
        return None, ""
    return name, rest.lstrip("/") or "."


def _map_generation(ns_fd: int) -> mmap.mmap | bool:
    """The namespace's generation page mapped read-only, or NO_PAGE where none is served.

    A page is used only if it is a regular file of at least 8 bytes that cannot
    shrink: reading a mapped page that shrank would kill this process (SIGBUS).
    """
    try:
        _, fds = call(ns_fd, P.NS_GENERATION)
    except OSError as exc:
        if exc.errno in (errno.ENOSYS, errno.EINVAL, errno.EBADF, errno.ENOMEM, errno.EMFILE,
                         errno.ENFILE, errno.EACCES, errno.ENOENT):
            return NO_PAGE
        raise
    if len(fds) != 1:
        P.close_fds(fds)
        return NO_PAGE
    try:
        st = os.fstat(fds[0])
        if (not stat.S_ISREG(st.st_mode) or st.st_size < GENERATION.size
                or fcntl.fcntl(fds[0], fcntl.F_GET_SEALS) & PAGE_SEALS != PAGE_SEALS):
            return NO_PAGE
        return mmap.mmap(fds[0], GENERATION.size, mmap.MAP_SHARED, mmap.PROT_READ)
    except OSError:
        return NO_PAGE
    finally:
        os.close(fds[0])


def _fetch_root(ns_fd: int, name: str) -> int | None:
    """A clone of name's entry; None when the account has no room for one more capability."""
    try:
        _, fds = call(ns_fd, P.NS_ROOT, [name])
    except OSError as exc:
        if exc.errno in (errno.EMFILE, errno.ENFILE):
            return None  # an open through nsmgr needs one capability less
        raise
    if len(fds) != 1:
        P.close_fds(fds)
        raise OSError(errno.EIO, "expected one capability in the reply")
    return fds[0]


def _close(fd: int) -> None:
    forget(fd)
    os.close(fd)
