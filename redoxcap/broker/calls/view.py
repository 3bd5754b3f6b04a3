"""Symlinks and `..` in a handed directory, resolved as the program sees its files.

A directory handed over at a path of its own (`run --dir`) is served by a
file scheme that resolves in-root: the directory is `/` to it. The program
sees it at its own absolute path, so an absolute symlink in it (a venv's
`bin/python` -> the interpreter) points into the program's view, and `..`
above it leaves it. Such a lookup fails in the scheme (ENOENT, ENOTDIR,
ELOOP); then the broker walks the path itself, one component at a time with
a STATAT each (O_NOFOLLOW, O_RESOLVE_BENEATH), and acts on where it leads.
Every step is one the program could take by naming the result directly.
"""

from __future__ import annotations

import errno
import posixpath
import stat
from collections.abc import Callable
from dataclasses import replace
from typing import Any

from redoxcap.broker.calls.base import error
from redoxcap.broker.calls.locate import Location, Locator
from redoxcap.wire import protocol as P

MAX_PLAIN_DIRS = 1 << 16


class View:
    """The view walk over one Locator's handed directories."""

    def __init__(self, locator: Locator) -> None:
        self.locator = locator
        # directories of handed ones the walk found to be directories, not links: it skips
        # their STATAT until the program renames, removes or links anything
        self._plain_dirs: set[tuple[int, str]] = set()

    def names_changed(self) -> None:
        """A directory may have gone, or a link taken its name: forget what the walk knew."""
        self._plain_dirs.clear()

    def in_view(self, loc: Location, follow: bool, act: Callable[[Location], Any]) -> Any:
        """act(loc), or act at where the view walk leads when the scheme's own lookup fails
        for a path in a handed directory (or first, when its `..` leave the directory)."""
        if loc.walk_first and loc.view is not None:
            other = self.resolve(loc.view, follow)
            if other is not None:
                try:
                    return act(other)
                finally:
                    other.close()
        try:
            return act(loc)
        except OSError as exc:
            if exc.errno not in (errno.ENOENT, errno.ENOTDIR, errno.ELOOP) or loc.view is None:
                raise
            other = self.resolve(loc.view, follow)
            if other is None:
                raise
        try:
            return act(other)
        finally:
            other.close()

    def resolve(self, path: str, follow: bool, links: list[int] | None = None) -> Location | None:
        """Walk an absolute path in a handed directory one component at a time (a STATAT
        each, beneath its root): a relative symlink is spliced in, an absolute one and a `..`
        above the directory go on from there as the program's own absolute path.

        Returns:
            Where the path leads, or None when the walk met neither (the scheme's answer stands).

        Raises:
            OSError: ELOOP past 40 links, ENOTDIR, ENOENT for a missing directory on the way.
        """
        links = [0] if links is None else links
        placed = self.locator.placed(path)
        mounted = self.locator.mount_of(path)
        if placed is None or placed.view is None or mounted is None:
            return self._restart(path, follow, links)
        mount, rest = mounted
        parts = [c for c in rest.split("/") if c and c != "."]
        trailing = "/" if path.endswith("/") else ""
        stack: list[str] = []
        moved = False
        i = 0
        while i < len(parts):
            name, last = parts[i], i == len(parts) - 1
            if name == "..":
                moved = True
                if stack:
                    stack.pop()
                    i += 1
                    continue
                up = posixpath.dirname(mount.visible.rstrip("/")) or "/"
                return self._restart(posixpath.join(up, *parts[i + 1:]) + trailing, follow, links)
            where = "/".join([*stack, name])
            if not last and (mount.cap, where) in self._plain_dirs:
                stack.append(name)  # a directory, not a link, when the walk last looked
                i += 1
                continue
            step = Location(mount.cap, where, False, P.O_RESOLVE_BENEATH, origin=mount)
            try:
                st = self.locator.status_at(step, follow=False)
            except FileNotFoundError:
                if not last:
                    raise
                stack.append(name)
                break
            if stat.S_ISLNK(st.st_mode) and (not last or follow or trailing):
                links[0] += 1
                if links[0] > 40:
                    raise error(errno.ELOOP)
                body = self.locator.readlink_at(replace(step, resolve=0))
                moved = True
                if body.startswith("/"):
                    tail = "/".join(parts[i + 1:])
                    return self._restart(body.rstrip("/") + ("/" + tail if tail else "") + trailing
                                         if body != "/" else "/" + tail + trailing, follow, links)
                parts[i:i + 1] = [c for c in body.split("/") if c and c != "."]
                continue
            if not last and not stat.S_ISDIR(st.st_mode):
                raise error(errno.ENOTDIR)
            if stat.S_ISDIR(st.st_mode):
                if len(self._plain_dirs) >= MAX_PLAIN_DIRS:
                    self._plain_dirs.clear()
                self._plain_dirs.add((mount.cap, where))
            stack.append(name)
            i += 1
        if not moved:
            return None
        return Location(mount.cap, ("/".join(stack) + trailing if stack else "."), False)

    def _restart(self, path: str, follow: bool, links: list[int]) -> Location:
        """The location of a program path a walk arrived at."""
        placed = self.locator.placed(path)
        if placed is not None and placed.view is not None:
            walked = self.resolve(path, follow, links)
            return walked if walked is not None else replace(placed, view=None, walk_first=False)
        if placed is not None:
            return placed
        return self.locator.in_namespace(path)
