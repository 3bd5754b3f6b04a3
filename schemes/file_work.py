"""The file scheme's handles, and the work it does in worker threads.

A :class:`FileHandle` is an open host file or directory; a directory being
listed keeps a cursor (:class:`Listing`: a host directory stream and the last
page served), so that reading a large directory page by page costs a page per
request, not the whole directory. :class:`Workers` runs what can take long
(listings, fsync, ftruncate, unlink) in worker threads: one at a time per
client account and LISTING_THREADS for all, so that heavy work on one
client's behalf never holds up the requests of the others; and the lookups
the scheme must walk itself (schemes/resolve.py) in the daemon's own thread,
a slice at a time and one at a time per client account (`Workers.walk`: in
a thread, a walk, all Python, would hold the interpreter's lock from the
request loop for a switch interval at every turn), and the openat2 of a
client whose lookups have cost the loop too much (links that make the
kernel walk for milliseconds) in a worker thread (`Workers.lookup`). And the
lookups the scheme's operations share: where a lookup may not go past, the
/scheme/ path of a host fd, the directory a second path is relative to.
"""

from __future__ import annotations

import collections
import contextlib
import errno
import os
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any

import trio

from redoxcap.schemes.framework import HandleRef, Request, SchemeError
from redoxcap.schemes.resolve import Anchor, Steps, T
from redoxcap.wire import protocol as P
from redoxcap.wire.linux import DT_DIR, DT_LNK, DT_REG, DT_UNKNOWN

PAGE_ENTRIES = 256  # names in one GETDENTS or READDIR reply at most
MAX_LISTINGS = 256  # directory cursors kept open at once (the least recently used goes)
LISTING_THREADS = 8  # worker threads reading directories at once, for all clients together
# A lookup that took more CPU time than this in the request loop (s, the kernel's
# included; Linux's openat2 takes microseconds, unless links make it walk tens of
# thousands of components) is costly; COSTLY_STRIKES of them within STRIKE_WINDOW
# seconds (one may be a cold cache) send the account's lookups off the loop for
# COSTLY_FOR seconds: their openat2 in a worker thread.
COSTLY_LOOKUP = 0.00025
COSTLY_STRIKES = 4
STRIKE_WINDOW = 1.0
COSTLY_FOR = 10.0
COSTLY_KEPT = 1024  # accounts remembered before the expired ones are dropped


def _utf8(name: str) -> bool:
    """Whether a host name can travel in a frame (paths are UTF-8 strings on the wire).

    A name that is not valid UTF-8 cannot be named by any client, so listings leave it out.
    """
    try:
        name.encode()
        return True
    except UnicodeEncodeError:
        return False


def _d_type(entry: os.DirEntry) -> int:
    """Linux's d_type of a directory entry, as far as the host's listing says (no stat)."""
    try:
        if entry.is_symlink():
            return DT_LNK
        if entry.is_dir(follow_symlinks=False):
            return DT_DIR
        if entry.is_file(follow_symlinks=False):
            return DT_REG
    except OSError:
        pass
    return DT_UNKNOWN


@dataclass(eq=False)
class FileHandle:
    """An open host file or directory and the rules for lookups beneath it.

    Attributes:
        fd: the host fd (the scheme's root fd for the root handle, shared).
        is_dir: whether it is a directory.
        anchor: where lookups from it may not go past.
        anchor_owned: the anchor's fd is this handle's own dup, closed with it.
        fdflags: the client's open flags as F_GETFL shows them, plus a sticky O_RESOLVE_* bit.
        host_flags: the flags the host fd was opened with (for reopening on dup).
    """

    fd: int
    is_dir: bool
    anchor: Anchor
    anchor_owned: bool
    fdflags: int = 0
    host_flags: int = os.O_PATH | os.O_DIRECTORY
    listing: Listing | None = field(default=None, repr=False)  # its cursor, while it lists
    # held while a worker thread uses fd (a listing, an fsync), so that close waits for it
    busy: trio.Lock | None = field(default=None, repr=False)


@dataclass(eq=False)
class Listing:
    """Where a directory handle's listing is: a host directory stream positioned at
    entry `position`, and the last page served (entries page_start onwards), so that
    the next page, or a page that starts within the last one (a reader whose buffer
    took only part of it), costs no more than a page.

    Only a worker thread touches the stream, with its handle's `busy` lock held.
    """

    stream: object = None  # os.scandir iterator (it owns a dup of the directory fd)
    position: int = 0
    page_start: int = 0
    page: list[tuple[str, int]] = field(default_factory=list)

    def close(self) -> None:
        if self.stream is not None:
            self.stream.close()
            self.stream = None

    def read(self, fd: int, start: int) -> list[tuple[str, int]]:
        """The entries (name, d_type) from index start on that fit in one reply.

        Runs in a worker thread. Blocking on the host (a slow disk) blocks only it.
        """
        if self.page_start <= start <= self.page_start + len(self.page):
            head = self.page[start - self.page_start :]
            resume = self.page_start + len(self.page)
        else:
            head, resume = [], start
        if self.stream is None or resume < self.position:
            self._rewind(fd)
        while self.position < resume and self._next() is not None:
            pass  # skipped: only a reader that seeks far (or was evicted) pays for it
        page, size = head[:PAGE_ENTRIES], sum(len(name) + 8 for name, _ in head)
        while len(page) < PAGE_ENTRIES and size < P.DENTS_BUDGET:
            entry = self._next()
            if entry is None:
                break
            page.append(entry)
            size += len(entry[0]) + 8
        self.page_start, self.page = start, page
        return page

    def _rewind(self, fd: int) -> None:
        self.close()
        own = os.open(".", os.O_RDONLY | os.O_DIRECTORY | os.O_CLOEXEC, dir_fd=fd)
        try:
            self.stream = os.scandir(own)  # takes a dup of its own
        finally:
            os.close(own)
        self.position = 0

    def _next(self) -> tuple[str, int] | None:
        """The next entry whose name can travel (see _utf8), or None at the end."""
        for entry in self.stream:
            if _utf8(entry.name):
                self.position += 1
                return entry.name, _d_type(entry)
        return None


RESOLVE_BITS = P.O_RESOLVE_BENEATH | P.O_RESOLVE_IN_ROOT


class Workers:
    """A file scheme's worker threads, and the directory cursors they read (see the module).

    Args:
        root_fd: the scheme's root fd, which lives as long as the daemon (work on it needs
            no lock).
    """

    def __init__(self, root_fd: int) -> None:
        self.root_fd = root_fd
        # handles with an open directory cursor, least recently used first
        self._listings: collections.OrderedDict[int, FileHandle] = collections.OrderedDict()
        self._threads = trio.CapacityLimiter(LISTING_THREADS)
        self._per_account: dict[int, trio.CapacityLimiter] = {}  # one at a time each
        self._walking: dict[int, trio.Lock] = {}  # account -> held while one of its walks runs
        self._costly: dict[int, float] = {}  # account -> until when its lookups stay off the loop
        self._strikes: dict[int, tuple[int, float]] = {}  # account -> costly lookups, since when

    async def run(self, account: int, h: FileHandle, fn: Callable[..., Any], *args: Any,
                  exclusive: bool = False) -> Any:
        """fn(*args) on h's fd in a worker thread, charged to account. Each handle but the
        root is busy meanwhile, so that closing it waits; so is any handle for exclusive
        work (its listing cursor)."""
        lock = contextlib.nullcontext()
        if exclusive or h.fd != self.root_fd:
            if h.busy is None:
                h.busy = trio.Lock()
            lock = h.busy
        limiter = self._per_account.setdefault(account, trio.CapacityLimiter(1))
        try:
            async with lock, self._threads:
                return await trio.to_thread.run_sync(fn, *args, limiter=limiter)
        finally:
            if not limiter.borrowed_tokens and not limiter.statistics().tasks_waiting:
                self._per_account.pop(account, None)

    def costly(self, account: int) -> bool:
        """Whether account's lookups stay off the request loop (see COSTLY_LOOKUP)."""
        until = self._costly.get(account)
        return until is not None and until > time.monotonic()

    def mark_costly(self, account: int) -> None:
        """One of account's lookups took the request loop too much CPU (COSTLY_LOOKUP)."""
        now = time.monotonic()
        if len(self._strikes) >= COSTLY_KEPT:
            self._strikes = {a: (n, since) for a, (n, since) in self._strikes.items()
                             if now - since <= STRIKE_WINDOW}
        strikes, since = self._strikes.get(account, (0, now))
        if now - since > STRIKE_WINDOW:
            strikes, since = 0, now
        if strikes + 1 < COSTLY_STRIKES:
            self._strikes[account] = (strikes + 1, since)
            return
        self._strikes.pop(account, None)
        if len(self._costly) >= COSTLY_KEPT:
            self._costly = {a: until for a, until in self._costly.items() if until > now}
        self._costly[account] = now + COSTLY_FOR

    async def lookup(self, account: int, h: FileHandle, steps: Steps[T]) -> T:
        """A lookup (resolve.open_steps or parent_steps on h's fds) in a request's task:
        Linux's openat2 (the first step) in a worker thread if account is costly, where
        the kernel's work holds up no one (the thread waits in the syscall without the
        interpreter's lock; h is busy meanwhile, so that closing it waits), else here;
        then its walk, if any, as `walk` does. Closes steps."""
        try:
            if self.costly(account):
                done, value = await self.run(account, h, first_step, steps)
            else:
                done, value = first_step(steps)
        except BaseException:
            steps.close()
            raise
        if done:
            return value
        return await self.walk(account, steps)

    async def walk(self, account: int, steps: Steps[T]) -> T:
        """Drive a lookup whose walk is about to begin (resolve.open_steps or parent_steps,
        after their first yield) to its end, a slice at a time with a checkpoint between
        (where a CLOSE of its handle cancels it), one walk at a time per account: one
        client's walks hold up each other client for a slice at most. Closes steps."""
        lock = self._walking.setdefault(account, trio.Lock())
        try:
            async with lock:
                while True:
                    try:
                        next(steps)
                    except StopIteration as done:
                        return done.value
                    await trio.lowlevel.checkpoint()
        finally:
            steps.close()
            if not lock.locked() and not lock.statistics().tasks_waiting:
                self._walking.pop(account, None)

    async def page(self, account: int, h: FileHandle, start: int) -> list[tuple[str, int]]:
        """The entries (name, d_type) of directory h from index start on, one reply's worth."""
        if not h.is_dir:
            raise SchemeError(errno.ENOTDIR)
        if h.fdflags & os.O_PATH:
            raise SchemeError(errno.EBADF, "an O_PATH handle cannot be read")
        if start < 0:
            raise SchemeError(errno.EINVAL)
        if h.listing is None:
            h.listing = Listing()
        listing = h.listing
        self._listings[id(h)] = h
        self._listings.move_to_end(id(h))
        while len(self._listings) > MAX_LISTINGS:  # a stream is an fd and a buffer: few at once
            _, oldest = self._listings.popitem(last=False)
            if oldest.listing is not None and not (oldest.busy and oldest.busy.locked()):
                oldest.listing.close()  # its next page starts the directory over
        return await self.run(account, h, listing.read, h.fd, start, exclusive=True)

    def forget(self, h: FileHandle) -> None:
        """Close h's cursor, if it has one (h is being closed)."""
        if h.listing is not None:
            self._listings.pop(id(h), None)
            h.listing.close()


def first_step(steps: Steps[T]) -> tuple[bool, T | None]:
    """A lookup's first step, Linux's openat2: (True, what steps return) if they end
    without a yield, else (False, None): the walk is to begin."""
    try:
        next(steps)
    except StopIteration as done:
        return True, done.value
    return False, None


def lookup_anchor(h: FileHandle, path: str, flags: int) -> Anchor:
    """Where this lookup may not go past: h itself with an O_RESOLVE_* flag, else h's anchor."""
    if not flags & RESOLVE_BITS:
        return h.anchor
    if not h.is_dir:
        raise SchemeError(errno.ENOENT if not path else errno.ENOTDIR)
    return Anchor.of(h.fd, beneath=bool(flags & P.O_RESOLVE_BENEATH))


def scheme_path(name: str, root_fd: int, fd: int) -> str:
    """The /scheme/NAME/... path of host fd fd, beneath the scheme's root_fd (FPATH, status)."""
    root = os.readlink(f"/proc/self/fd/{root_fd}")
    real = os.readlink(f"/proc/self/fd/{fd}")
    if real == root:
        return f"/scheme/{name}"
    prefix = root.rstrip("/") + "/"
    if real.startswith(prefix) and not real.endswith(" (deleted)"):
        return f"/scheme/{name}/" + real[len(prefix):]
    raise SchemeError(errno.ENOENT, "the file is no longer beneath the scheme's root")


def passed_directory(req: Request, handles: dict, h: FileHandle) -> FileHandle:
    """The directory a second path is relative to: a passed directory of ours, or h."""
    if not req.passed:
        return h
    if len(req.passed) > 1:
        raise SchemeError(errno.EINVAL, "one directory capability at most")
    ref = req.passed[0]
    if ref is None:
        raise SchemeError(errno.EINVAL, "expected a directory capability")
    if not isinstance(ref, HandleRef):
        raise SchemeError(errno.EXDEV, "the second directory is not in this scheme")
    target = handles.get(ref.number)
    if target is None:
        raise SchemeError(errno.EBADF)
    if not target.is_dir:
        raise SchemeError(errno.ENOTDIR)
    return target
