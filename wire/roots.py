"""The roots of a namespace's entries, kept so that an open through the namespace is one request.

As Redox's nsmgr does since 2026, nsmgr hands a holder of a namespace the
capability behind a name (NS_ROOT: a clone of the scheme's root, or of the
in-root directory registered as the name), and the holder opens the rest
itself: `open("/scheme/file/a/b")` is `openat(root of file, "a/b")`, one
round trip to the file scheme, nsmgr not asked. rt (rt/_process.py) and the
broker (redoxcap/broker/calls/locate.py) keep one `NamespaceRoots` each.
A kept root is what an explicit open of `/scheme/NAME` would give the
holder, and is charged to its account like any other capability.

A change of the namespace (register, unregister, narrow, a scheme created in
it, a restart of nsmgr; by this holder or any other of the same handle) is
seen by the next open: nsmgr counts them in a page of shared memory
(nsmgr/generation.py) that the first NS_ROOT hands over and this module maps
read-only. Every lookup compares the count with the one the kept roots were
taken at, and whether nsmgr retired the page (a restart: an added seal),
and drops them all when either moved. That costs a memory read and one
fcntl, not a round trip.

Where the namespace serves no page (a namespace served by some other
scheme), where the name is not a plain scheme name, or where the account
has no room for one more capability (EMFILE), the operation is sent on the
namespace as before and nsmgr forwards it (and answers its errno). A name
nsmgr says the namespace lacks (ENODEV) is remembered while the page's
generation holds, and answered ENODEV here without asking again.
"""

from __future__ import annotations

import errno
import fcntl
import mmap
import os
import stat
import struct
import threading

from redoxcap.wire import protocol as P
from redoxcap.wire.call import call, forget

SCHEME_PREFIX = "/scheme/"
MAX_ROOTS = 64  # roots kept per namespace; names beyond are opened through nsmgr
GENERATION = struct.Struct("<Q")
F_SEAL_FUTURE_WRITE = 0x0010  # Linux 5.1; not in Python 3.11's fcntl
# the seals of a live page (nsmgr/generation.py): any other seal means nsmgr retired it
LIVE_SEALS = fcntl.F_SEAL_SHRINK | fcntl.F_SEAL_GROW | F_SEAL_FUTURE_WRITE
# errnos of a namespace that cannot hand out roots: its opens are forwarded, as before
_NO_ROOTS = frozenset({errno.ENOSYS, errno.EINVAL, errno.EBADF, errno.ENOMEM, errno.EMFILE,
                       errno.ENFILE, errno.EACCES, errno.ENOENT, errno.ENODEV, errno.EOPNOTSUPP})


class Root:
    """One kept root: its capability fd, and how many calls are using it now."""

    __slots__ = ("fd", "retired", "users")

    def __init__(self, fd: int) -> None:
        self.fd = fd
        self.users = 0
        self.retired = False  # dropped: closed when its last user is done


class _Page:
    """A generation page mapped read-only (owns its fd and mapping)."""

    __slots__ = ("fd", "map")

    def __init__(self, fd: int) -> None:
        """Take fd (closed on error) if it is a live page: a regular file of at least 8 bytes
        that cannot shrink (a mapped page that shrank would kill this process with SIGBUS).

        Raises:
            OSError: EINVAL when it is not.
        """
        try:
            st = os.fstat(fd)
            if (not stat.S_ISREG(st.st_mode) or st.st_size < GENERATION.size
                    or fcntl.fcntl(fd, fcntl.F_GET_SEALS) != LIVE_SEALS):
                raise OSError(errno.EINVAL, "not a generation page")
            self.map = mmap.mmap(fd, GENERATION.size, mmap.MAP_SHARED, mmap.PROT_READ)
        except BaseException:
            os.close(fd)
            raise
        self.fd = fd

    def generation(self) -> int | None:
        """The namespace's generation; None once nsmgr retired the page (it restarted)."""
        if fcntl.fcntl(self.fd, fcntl.F_GET_SEALS) != LIVE_SEALS:
            return None
        return GENERATION.unpack_from(self.map)[0]

    def close(self) -> None:
        self.map.close()
        os.close(self.fd)


class NamespaceRoots:
    """The entries' roots of one namespace fd (safe across threads; owns every fd it keeps)."""

    def __init__(self) -> None:
        self._lock = threading.Lock()
        self._ns_fd: int | None = None
        self._page: _Page | None = None
        self._no_page = False  # the namespace hands out no roots: forward everything
        self._seen = 0  # the generation the kept roots were taken at
        self._roots: dict[str, Root] = {}
        # names the namespace lacked at that generation (nsmgr said ENODEV): asked no more
        # until it moves (every program start asks for /etc/ld.so.preload; with --dir,
        # `file` is such a name, and each miss was two round trips to nsmgr)
        self._absent: set[str] = set()
        self._noting = False  # fetching the page to note an absent name (see _note_absent)
        self._page_refused = False  # that fetch got no page: not tried again (_note_absent)

    def take(self, ns_fd: int, ns_path: str) -> tuple[int, str, Root | None]:
        """Where to send a path operation on namespace path ns_path (`/scheme/NAME/rest`).

        Returns:
            (NAME's root, rest or ".", the root: give it back with `give_back` once the
            call is answered), or (ns_fd, ns_path, None) to send it on the namespace.

        Raises:
            OSError: what nsmgr answered other than the errnos of a namespace that hands
                out no roots (EIO for a malformed reply).
        """
        name, rest = _split(ns_path)
        if name is None:
            return ns_fd, ns_path, None
        with self._lock:
            if ns_fd != self._ns_fd:
                self._forget_namespace()
                self._ns_fd = ns_fd
            if self._no_page:
                return ns_fd, ns_path, None
            if self._page is not None:
                generation = self._page.generation()
                if generation is None:  # nsmgr restarted: a new page comes with the next root
                    self._drop_page()
                elif generation != self._seen:
                    self._retire_roots()
                    self._seen = generation
            root = self._roots.get(name)
            if root is None:
                if name in self._absent:
                    raise OSError(errno.ENODEV, f"no scheme {name!r} in this namespace")
                if len(self._roots) >= MAX_ROOTS:
                    return ns_fd, ns_path, None
                fd = self._fetch(ns_fd, name)
                if fd is None:
                    return ns_fd, ns_path, None
                root = self._roots[name] = Root(fd)
            root.users += 1
            return root.fd, rest, root

    def generation(self) -> int | None:
        """The namespace's generation now, as its page says (None: no page was handed over
        yet, or nsmgr retired it): what tells a holder that the namespace changed."""
        with self._lock:
            return self._page.generation() if self._page is not None else None

    def give_back(self, root: Root) -> None:
        """A call that took root is answered: close it if it was dropped meanwhile."""
        with self._lock:
            root.users -= 1
            if root.retired and not root.users:
                _close(root.fd)

    def clear(self) -> None:
        """Drop everything (the namespace fd is replaced, or gone)."""
        with self._lock:
            self._forget_namespace()

    def after_fork_in_child(self) -> None:
        """A forked child shares no capability socket with its parent: close our copies."""
        self._lock = threading.Lock()
        for root in self._roots.values():
            _close(root.fd)
        self._roots = {}
        self._absent = set()
        self._drop_page()
        self._ns_fd, self._no_page, self._page_refused = None, False, False

    def _fetch(self, ns_fd: int, name: str) -> int | None:
        """A clone of name's entry (with the page, the first time); None: forward this one."""
        want_page = self._page is None
        try:
            generation, fds = call(ns_fd, P.NS_ROOT, [name, int(want_page)])
        except OSError as exc:
            if exc.errno in _NO_ROOTS:
                if exc.errno in (errno.ENOSYS, errno.EOPNOTSUPP):
                    self._no_page = True  # not nsmgr: never ask again
                elif exc.errno == errno.ENODEV:
                    self._note_absent(ns_fd, name)
                return None
            raise
        if len(fds) != 1 + want_page or type(generation) is not int:
            P.close_fds(fds)
            raise OSError(errno.EIO, "malformed NS_ROOT reply")
        if want_page:
            try:
                self._page = _Page(fds.pop())
            except OSError:  # not a page one can rely on: forward everything, to be sure
                _close(fds[0])
                self._no_page = True
                return None
            self._retire_roots()  # taken under an older page, if any
            self._seen = generation  # the root is at least as new as this
        return fds[0]

    def _note_absent(self, ns_fd: int, name: str) -> None:
        """nsmgr said name is not in the namespace: remember it while the generation holds.
        Without the page yet (an error brings none), take it with the root of a name the
        namespace has, and ask about name once more under it; anything refused on the
        way (a namespace that may not be listed) leaves name to be asked each time."""
        if len(self._absent) >= MAX_ROOTS:
            return
        if self._page is not None:
            self._absent.add(name)
            return
        if self._noting or self._page_refused:
            return  # asking for the page already (the other name went too), or refused before
        self._noting = True
        try:
            names = call(ns_fd, P.NS_LIST)[0]
            other = next((n for n in names if isinstance(n, str) and n != name
                          and P.valid_scheme_name(n)), None) if isinstance(names, list) else None
            if other is None or other in self._roots or len(self._roots) >= MAX_ROOTS:
                return
            fd = self._fetch(ns_fd, other)
            if fd is None:
                return
            self._roots[other] = Root(fd)
            if self._page is not None:  # name once more, under the page: absent is noted
                fd = self._fetch(ns_fd, name)
                if fd is not None:  # registered meanwhile: kept as any root
                    if name in self._roots or len(self._roots) >= MAX_ROOTS:
                        _close(fd)
                    else:
                        self._roots[name] = Root(fd)
        except OSError:
            return
        finally:
            self._noting = False
            # not asked again for every miss (a namespace that may not be listed): misses
            # are forwarded, as before, until the namespace fd changes
            self._page_refused = self._page is None

    def _forget_namespace(self) -> None:
        self._retire_roots()
        self._drop_page()
        self._ns_fd, self._seen, self._no_page, self._page_refused = None, 0, False, False

    def _drop_page(self) -> None:
        self._retire_roots()
        if self._page is not None:
            self._page.close()
            self._page = None

    def _retire_roots(self) -> None:
        for root in self._roots.values():
            root.retired = True
            if not root.users:
                _close(root.fd)
        self._roots = {}
        self._absent = set()


def _split(ns_path: str) -> tuple[str | None, str]:
    """('NAME', 'rest' or '.') for `/scheme/NAME/rest`; (None, "") when nsmgr is to judge it."""
    if not ns_path.startswith(SCHEME_PREFIX):
        return None, ""
    name, _, rest = ns_path[len(SCHEME_PREFIX):].partition("/")
    if not P.valid_scheme_name(name):
        return None, ""
    return name, rest.lstrip("/") or "."


def _close(fd: int) -> None:
    forget(fd)
    os.close(fd)
