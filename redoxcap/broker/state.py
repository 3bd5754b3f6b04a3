"""What the broker keeps per target process: its cwd, and which of its fds are capabilities.

Linux keeps a process's cwd and fd table; under the broker the cwd is the
broker's (chdir cannot be emulated in the kernel without a lookup, so the
kernel's cwd of a target never changes and stands for nothing), and the fd
table stays Linux's: the broker installs capabilities in it with ADDFD and,
when a call names an fd, looks at what is behind that number right now
(pidfd_getfd), so dup, dup2, fork, close and close-on-exec need no tracking.
A capability is recognised by the identity of its socket (wire.linux.identity),
recorded when the broker installed it.

Threads share their process's state (Linux's CLONE_FS); a new process
starts in the cwd its parent had when it forked. Forks are the kernel's
alone (a call the broker holds may be interrupted by a signal before the
broker takes it, and fork must not fail with EINTR): a child is matched to
its parent through /proc when its first call arrives, and takes its
parent's cwd then, unless the parent changed directory since the fork:
before a process changes directory, each child of its that the broker has
not seen yet is given the cwd the parent is leaving (:meth:`Processes.leaving`).
A process that exited is dropped when its pidfd says so.
"""

from __future__ import annotations

import os
from collections import OrderedDict
from dataclasses import dataclass, field
from typing import Any

MAX_CAPABILITIES = 1 << 16  # remembered capability identities (the oldest are forgotten)
MAX_THREADS = 1 << 16
MAX_UNSEEN_CHILDREN = 1024  # children given a cwd before their first call (the oldest go)


@dataclass(eq=False)
class Directory:
    """A directory paths are relative to: a capability, or a directory of the host trees.

    Attributes:
        fd: the broker's own fd (a capability socket, or an O_PATH host directory).
        path: what getcwd answers (for a host directory, its real host path).
        host: whether it is a host-tree directory.
        refs: processes that have it as their cwd; the fd is closed at 0.
        trusted: a capability of a scheme of the system's or the run's (opened before the
            program ran, or beneath one that was), which may be asked for native lookups.
        native: its host directory for native lookups (calls/native.py), once asked for.
    """

    fd: int
    path: str
    host: bool
    refs: int = 1
    trusted: bool = False
    native: Any = None
    native_asked: bool = False

    def retain(self) -> Directory:
        self.refs += 1
        return self

    def release(self) -> None:
        self.refs -= 1
        if self.refs == 0:
            os.close(self.fd)
            self.fd = -1
            if self.native is not None:
                self.native.close()
                self.native = None


@dataclass(frozen=True)
class Mount:
    """A directory handed to the program at an absolute path of its own (`run --dir`, /tmp).

    Attributes:
        visible: the absolute path the program sees it at.
        cap: the broker's capability for its root.
        path: its real host path.
        executable: the kernel finds it at `visible` (it is its host path): programs in
            it may be executed, and a process whose cwd is in it has its kernel cwd there.
        scheme: its name in the namespace (fpath answers `/scheme/NAME/...`).
    """

    visible: str
    cap: int
    path: str
    executable: bool
    scheme: str = ""

    def holds(self, path: str) -> bool:
        """Whether an absolute path is this directory or lies beneath it."""
        return path == self.visible or path.startswith(self.visible.rstrip("/") + "/")

    def rest(self, path: str) -> str:
        """The path below the directory of a path it holds ("." for itself)."""
        return path[len(self.visible):].lstrip("/") or "."


@dataclass(eq=False)
class Process:
    """One target process (thread group).

    `kernel_cwd` is the host directory Linux has as its cwd (None: the empty
    directory it started in), which the broker's cwd matches only while the
    process changes directory to paths the kernel reaches too (see chdir).
    """

    tgid: int
    pidfd: int
    cwd: Directory
    kernel_cwd: str | None = None

    def set_cwd(self, new: Directory) -> None:
        """Make new (a reference the caller hands over) the cwd."""
        old, self.cwd = self.cwd, new
        old.release()


@dataclass
class Processes:
    """Every target process the broker has seen, by thread group and by thread."""

    initial: Directory  # the cwd of a process whose parent is unknown (the first one)
    initial_kernel_cwd: str | None = None
    by_tgid: dict[int, Process] = field(default_factory=dict)
    by_pidfd: dict[int, Process] = field(default_factory=dict)
    _tgid_of: OrderedDict[int, int] = field(default_factory=OrderedDict)
    # child pid -> (its parent's tgid, the cwd and kernel cwd it starts in), for children not
    # seen yet whose parent changed directory since it forked them
    _unseen: OrderedDict[int, tuple[int, Directory, str | None]] = \
        field(default_factory=OrderedDict)

    def leaving(self, parent: Process) -> None:
        """parent is about to change directory: each child of its not seen yet (forked before,
        so it starts where parent is now) is given parent's cwd (the first time only)."""
        for child in _children(parent.tgid):
            if child in self.by_tgid or child in self._unseen:
                continue
            self._unseen[child] = (parent.tgid, parent.cwd.retain(), parent.kernel_cwd)
            if len(self._unseen) > MAX_UNSEEN_CHILDREN:
                self._unseen.popitem(last=False)[1][1].release()

    def of_thread(self, tid: int) -> tuple[Process, bool]:
        """The process of thread tid (read from /proc for a thread not seen yet).

        Only valid while a notification of tid is pending: then tid cannot
        have been recycled.

        Returns:
            (the process, whether it is new: the caller watches its pidfd).

        Raises:
            OSError: ESRCH/ENOENT when the thread is gone.
        """
        tgid = self._tgid_of.get(tid)
        if tgid is not None and tgid in self.by_tgid:
            return self.by_tgid[tgid], False
        tgid, ppid = _ids(tid)
        self._tgid_of[tid] = tgid
        if len(self._tgid_of) > MAX_THREADS:
            self._tgid_of.popitem(last=False)
        process = self.by_tgid.get(tgid)
        if process is not None:
            return process, False
        given = self._unseen.pop(tgid, None)
        if given is not None and given[0] == ppid:
            _, cwd, kernel_cwd = given  # retained when its parent left it
        else:
            if given is not None:  # a pid used again, by a child of another parent
                given[1].release()
            parent = self.by_tgid.get(ppid)
            cwd = (parent.cwd if parent is not None else self.initial).retain()
            kernel_cwd = parent.kernel_cwd if parent is not None else self.initial_kernel_cwd
        try:
            pidfd = os.pidfd_open(tgid)
        except BaseException:
            cwd.release()
            raise
        process = self.by_tgid[tgid] = self.by_pidfd[pidfd] = Process(tgid, pidfd, cwd, kernel_cwd)
        return process, True

    def exited(self, pidfd: int) -> None:
        """Forget the process whose pidfd became readable (it exited)."""
        process = self.by_pidfd.pop(pidfd, None)
        if process is None:
            return
        self.by_tgid.pop(process.tgid, None)
        process.cwd.release()
        os.close(pidfd)

    def close(self) -> None:
        for pidfd in list(self.by_pidfd):
            self.exited(pidfd)
        while self._unseen:
            self._unseen.popitem()[1][1].release()
        self.initial.release()


def _children(tgid: int) -> list[int]:
    """The children of every thread of process tgid, from /proc (none where it cannot say)."""
    try:
        tids = os.listdir(f"/proc/{tgid}/task")
    except OSError:
        return []
    children: list[int] = []
    for tid in tids:
        try:
            with open(f"/proc/{tgid}/task/{tid}/children", "rb") as f:
                children += map(int, f.read().split())
        except (OSError, ValueError):
            continue  # a thread that went meanwhile
    return children


def _ids(tid: int) -> tuple[int, int]:
    """(Tgid, PPid) of a thread, from /proc/TID/status."""
    tgid = ppid = None
    with open(f"/proc/{tid}/status", "rb") as f:
        for line in f:
            if line.startswith(b"Tgid:"):
                tgid = int(line.split()[1])
            elif line.startswith(b"PPid:"):
                ppid = int(line.split()[1])
                break
    if tgid is None or ppid is None:
        raise OSError(3, "no such thread")
    return tgid, ppid


class BoundedSet:
    """Identities the broker remembers, the oldest forgotten past a bound."""

    def __init__(self, bound: int = MAX_CAPABILITIES) -> None:
        self._items: OrderedDict[tuple[int, int], None] = OrderedDict()
        self._bound = bound

    def add(self, identity: int) -> None:
        self._items[identity] = None
        self._items.move_to_end(identity)
        if len(self._items) > self._bound:
            self._items.popitem(last=False)

    def __contains__(self, identity: int) -> bool:
        return identity in self._items


class StatusTable:
    """The status a memory file stands for (a routed file's, by the memfd's identity),
    the oldest forgotten past a bound."""

    def __init__(self, bound: int = MAX_CAPABILITIES) -> None:
        self._items: OrderedDict[tuple[int, int], object] = OrderedDict()
        self._bound = bound

    def add(self, identity: int, status: object) -> None:
        self._items[identity] = status
        self._items.move_to_end(identity)
        if len(self._items) > self._bound:
            self._items.popitem(last=False)

    def get(self, identity: int) -> object | None:
        return self._items.get(identity)


class CapabilityTable:
    """The capabilities the broker installed in targets, by socket identity, with a directory
    position for getdents (shared by every fd of the same open socket, as Linux's offset)."""

    def __init__(self) -> None:
        self._positions: OrderedDict[int, int] = OrderedDict()

    def add(self, identity: int) -> None:
        self._positions[identity] = 0
        self._positions.move_to_end(identity)
        if len(self._positions) > MAX_CAPABILITIES:
            self._positions.popitem(last=False)

    def __contains__(self, identity: int) -> bool:
        return identity in self._positions

    def position(self, identity: int) -> int:
        return self._positions[identity]

    def advance(self, identity: int, position: int) -> None:
        self._positions[identity] = position
