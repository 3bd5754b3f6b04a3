"""schemes/resolve.py against Linux itself, and against renames racing it.

Linux is the oracle: openat2(2) with RESOLVE_BENEATH / RESOLVE_IN_ROOT for
open_at, and for resolve_parent the name operations (mkdir, unlink,
rename...) run in a forked child chrooted into the box (a chroot is what
in-root means). Each comparison runs on two identical trees, one for us and
one for Linux, and compares the outcome (errno, or where the opened file is
and its type) and the whole tree afterwards, outside the box included.
Every test runs twice: with openat2 as the fast path, and with the walk alone.
"""

from __future__ import annotations

import errno
import itertools
import os
import stat
from functools import partial
from pathlib import Path

import pytest

from redoxcap.schemes.resolve import (
    MAX_WALK,
    WALK_SLICE,
    Anchor,
    open_at,
    open_steps,
    parent_steps,
    resolve_parent,
)
from redoxcap.wire import beneath as fast_path
from redoxcap.wire.linux import RESOLVE_BENEATH, RESOLVE_IN_ROOT, RESOLVE_NO_MAGICLINKS, openat2

LINKS = {
    "rel_in": "sub/inner.txt",
    "rel_up_in": "sub/../file.txt",
    "rel_out": "../secret.txt",
    "rel_out_dir": "../outdir",
    "abs": "/file.txt",
    "abs_out": "/secret.txt",
    "abs_root": "/",
    "abs_dir": "/sub",
    "dangling": "nowhere",
    "dangling_abs": "/nowhere",
    "dangling_deep": "nodir/new",
    "dangling_slash": "newdir/",
    "loop_a": "loop_b",
    "loop_b": "loop_a",
    "self": "self",
    "dir_link": "sub",
    "dir_link_slash": "sub/",
    "chain": "rel_in",
    "sub/up_and_back": "../../box/file.txt",  # leaves the box and comes back by name
    "sub/parent": "..",
    "sub/grandparent": "../..",
    "file_dotdot": "file.txt/..",
    "dot": ".",
    "dotdot": "..",
}


def build(top: Path) -> Path:
    """top/{secret.txt, outdir/} outside, and top/box with links in, out, up, absolute,
    dangling, looping, and chains of exactly 40 (c0) and 41 (e0) links."""
    (top / "outdir").mkdir(parents=True)
    (top / "secret.txt").write_text("secret")
    (top / "outdir/x.txt").write_text("x")
    box = top / "box"
    (box / "sub/deeper").mkdir(parents=True)
    (box / "empty").mkdir()
    (box / "full").mkdir()
    (box / "full/f").write_text("")
    (box / "file.txt").write_text("file")
    (box / "sub/inner.txt").write_text("inner")
    (box / "sub/deeper/deep.txt").write_text("deep")
    for name, target in LINKS.items():
        os.symlink(target, box / name)
    for i in range(40):
        os.symlink(f"c{i + 1}" if i < 39 else "file.txt", box / f"c{i}")
    for i in range(41):
        os.symlink(f"e{i + 1}" if i < 40 else "file.txt", box / f"e{i}")
    return box


PATHS = [
    "file.txt", "sub/inner.txt", "sub/../file.txt", "./sub/./inner.txt", "..", "../secret.txt",
    "sub/../../secret.txt", "sub/deeper/../../..", "sub/deeper/../../sub/deeper/deep.txt",
    "/secret.txt", "/file.txt", "/", "//", "/..", "/../file.txt", "/../../secret.txt",
    ".", "./", "sub/.", "sub/..", "sub/../", "file.txt/", "file.txt/.", "file.txt/..",
    "sub/", "sub//", "sub/inner.txt/", "nope", "nope/", "nope/../file.txt", "sub/nope",
    "new.txt", "sub/new.txt", "empty/new", "new/", "../new", "/new", "sub/../../new", "",
    *LINKS, *(name + "/" for name in LINKS), *(name + "/x" for name in LINKS),
    "dir_link/inner.txt", "dir_link/../file.txt", "abs_dir/inner.txt", "abs_dir/../file.txt",
    "sub/parent/file.txt", "sub/parent/../secret.txt", "sub/grandparent/file.txt",
    "sub/grandparent/box/file.txt", "sub/parent/parent/parent", "abs_root/file.txt",
    "abs_root/..", "c0", "e0", "c1", "c0/", "loop_a/x", "x" * 255, "x" * 256, "sub/" + "y" * 256,
    "a/" * 2040 + "b", "a/" * 2048 + "b", "rel_out_dir/x.txt", "dotdot/file.txt",
    "dot/dot/file.txt",
]

FLAGS = [
    os.O_RDONLY, os.O_NOFOLLOW, os.O_DIRECTORY, os.O_NOFOLLOW | os.O_DIRECTORY,
    os.O_PATH, os.O_PATH | os.O_NOFOLLOW, os.O_PATH | os.O_DIRECTORY,
    os.O_PATH | os.O_NOFOLLOW | os.O_DIRECTORY, os.O_PATH | os.O_RDWR,
    os.O_WRONLY, os.O_RDWR | os.O_TRUNC, os.O_CREAT | os.O_RDONLY, os.O_CREAT | os.O_WRONLY,
    os.O_CREAT | os.O_EXCL | os.O_WRONLY, os.O_CREAT | os.O_NOFOLLOW | os.O_WRONLY,
    os.O_CREAT | os.O_EXCL | os.O_NOFOLLOW | os.O_WRONLY, os.O_CREAT | os.O_DIRECTORY,
    os.O_CREAT | os.O_TRUNC | os.O_RDWR,
]
CHANGES_TREE = os.O_CREAT | os.O_TRUNC


def snapshot(top: Path) -> dict[str, tuple]:
    """Every name under top (relative, as "a/b") with its type, permissions and size (or link
    contents); links are not followed."""
    out = {}

    def walk(path: str, prefix: str) -> None:
        with os.scandir(path) as entries:
            for entry in entries:
                st = entry.stat(follow_symlinks=False)
                name = prefix + entry.name
                detail = os.readlink(entry.path) if stat.S_ISLNK(st.st_mode) else st.st_size
                out[name] = (stat.S_IFMT(st.st_mode), stat.S_IMODE(st.st_mode), detail)
                if stat.S_ISDIR(st.st_mode):
                    walk(entry.path, name + "/")

    walk(str(top), "")
    return out


def outcome(open_fn, top: Path):
    """An errno name, or ("ok", where the opened file is relative to top, its type)."""
    try:
        fd = open_fn()
    except OSError as exc:
        return errno.errorcode[exc.errno]
    try:
        where = os.readlink(f"/proc/self/fd/{fd}")
        return ("ok", os.path.relpath(where, top), stat.S_IFMT(os.fstat(fd).st_mode))
    finally:
        os.close(fd)


class Twins:
    """Two identical trees, ours and Linux's, rebuilt whenever one was changed."""

    def __init__(self, base: Path) -> None:
        self.base = base
        self.count = 0
        self.fresh()

    def fresh(self) -> None:
        self.count += 1
        self.ours, self.linux = self.base / f"ours{self.count}", self.base / f"linux{self.count}"
        build(self.ours)
        build(self.linux)
        self.pristine = snapshot(self.ours)

    def differ(self) -> bool:
        """Whether the two trees differ now; either changed means fresh ones next time."""
        ours, linux = snapshot(self.ours), snapshot(self.linux)
        if ours != self.pristine or linux != self.pristine:
            self.fresh()
        return ours != linux


def linux_openat2(dirfd: int, path: str, flags: int, mode: int, resolve: int) -> int:
    """Linux's openat2, the oracle: EAGAIN means a rename ran somewhere on the machine
    meanwhile (openat2(2): retry), not an answer about this tree."""
    for _ in range(1000):
        try:
            return openat2(dirfd, path, flags, mode, resolve)
        except BlockingIOError:
            continue
    return openat2(dirfd, path, flags, mode, resolve)


def _dirfd(path: Path) -> int:
    return os.open(path, os.O_PATH | os.O_DIRECTORY | os.O_CLOEXEC)


@pytest.fixture(params=[True, False], ids=["fast", "walk"])
def fast(request, monkeypatch):
    """Run with Linux's openat2 as the fast path, and with the walk alone."""
    monkeypatch.setattr(fast_path, "_have_openat2", request.param)
    return request.param


@pytest.mark.parametrize("start", ["anchor", "sub"])
@pytest.mark.parametrize("beneath", [True, False], ids=["beneath", "in_root"])
@pytest.mark.parametrize("flags", FLAGS, ids=[f"flags={f:#o}" for f in FLAGS])
def test_open_at_matches_linux_openat2(tmp_path, fast, beneath, start, flags):
    """The same errno, or the same file, and the same tree afterwards, as openat2.

    From a start below the anchor, Linux's equivalent is the path prefixed
    with that directory (absolute paths do not apply there).
    """
    twins = Twins(tmp_path)
    resolve = (RESOLVE_BENEATH if beneath else RESOLVE_IN_ROOT) | RESOLVE_NO_MAGICLINKS
    mismatches = []
    for path in PATHS:
        if start == "sub" and (path.startswith("/") or len(path) > 4000):
            continue
        linux_path = "sub/" + path if start == "sub" and path else path
        anchor_fd, linux_fd = _dirfd(twins.ours / "box"), _dirfd(twins.linux / "box")
        start_fd = _dirfd(twins.ours / "box/sub") if start == "sub" else anchor_fd
        try:
            anchor = Anchor.of(anchor_fd, beneath=beneath)
            ours = outcome(partial(open_at, anchor, start_fd, path, flags, 0o640), twins.ours)
            linux = outcome(partial(linux_openat2, linux_fd, linux_path, flags | os.O_CLOEXEC, 0o640,
                                    resolve),
                            twins.linux)
        finally:
            for fd in {anchor_fd, linux_fd, start_fd}:
                os.close(fd)
        trees_differ = twins.differ() if flags & CHANGES_TREE else False
        if ours != linux or trees_differ:
            mismatches.append((path[:60], ours, linux, "trees differ" if trees_differ else ""))
    assert mismatches == []


def test_forty_links_are_followed_and_the_forty_first_is_eloop(tmp_path, fast):
    box = build(tmp_path)
    fd = _dirfd(box)
    try:
        anchor = Anchor.of(fd, beneath=True)
        os.close(open_at(anchor, fd, "c0", os.O_RDONLY))
        with pytest.raises(OSError) as info:
            open_at(anchor, fd, "e0", os.O_RDONLY)
        assert info.value.errno == errno.ELOOP
    finally:
        os.close(fd)


def test_open_at_gives_a_close_on_exec_fd_of_the_file_in_the_anchor(tmp_path, fast):
    box = build(tmp_path)
    fd = _dirfd(box)
    try:
        got = open_at(Anchor.of(fd), fd, "../../file.txt", os.O_RDONLY)
        try:
            assert os.get_inheritable(got) is False
            assert os.read(got, 10) == b"file"
        finally:
            os.close(got)
    finally:
        os.close(fd)


@pytest.mark.parametrize("path, err", [
    ("", errno.ENOENT), ("a\0b", errno.EINVAL), ("x" * 4096, errno.ENAMETOOLONG),
])
def test_bad_paths(tmp_path, path, err):
    fd = _dirfd(tmp_path)
    try:
        anchor = Anchor.of(fd)
        for call in (lambda: open_at(anchor, fd, path, 0), lambda: resolve_parent(anchor, fd, path)):
            with pytest.raises(OSError) as info:
                call()
            assert info.value.errno == err
    finally:
        os.close(fd)


def test_a_start_that_is_a_file_is_enotdir(tmp_path, fast):
    box = build(tmp_path)
    fd, file_fd = _dirfd(box), os.open(box / "file.txt", os.O_RDONLY)
    try:
        for path in ("x", ".", "..", "../file.txt"):
            with pytest.raises(NotADirectoryError):
                open_at(Anchor.of(fd, beneath=True), file_fd, path, 0)
    finally:
        os.close(fd)
        os.close(file_fd)


def test_a_start_no_longer_beneath_its_anchor_cannot_climb(tmp_path, fast):
    box = build(tmp_path)
    fd, out = _dirfd(box), _dirfd(tmp_path / "outdir")
    try:
        for beneath in (True, False):
            anchor = Anchor.of(fd, beneath=beneath)
            os.close(open_at(anchor, out, "x.txt", 0))  # below the start: its own subtree
            with pytest.raises(OSError) as info:
                open_at(anchor, out, "../secret.txt", 0)
            assert info.value.errno == errno.EXDEV
    finally:
        os.close(fd)
        os.close(out)


def _deep_box(top: Path, depth: int) -> Path:
    """top/box with sub/, a tree of directories `a` depth deep ending in a file f, and
    40 links L0..L39: each of the first 39 goes down into sub and back up 20 times and
    on to the next, the last down the whole tree to f (pytest removes a tree recursively:
    keep depth below Python's recursion limit)."""
    box = top / "box"
    (box / "sub").mkdir(parents=True)
    cur = _dirfd(box)
    try:
        for _ in range(depth):  # deeper than an absolute path can name: one level at a time
            os.mkdir("a", dir_fd=cur)
            cur, parent = os.open("a", os.O_PATH | os.O_DIRECTORY, dir_fd=cur), cur
            os.close(parent)
        os.close(os.open("f", os.O_CREAT | os.O_WRONLY, 0o600, dir_fd=cur))
    finally:
        os.close(cur)
    for i in range(39):
        os.symlink("sub/../" * 20 + f"L{i + 1}", box / f"L{i}")
    os.symlink("a/" * depth + "f", box / "L39")
    return box


def test_a_deep_path_through_forty_long_links_is_walked_as_linux_looks_it_up(tmp_path, fast):
    """From below the anchor (the walk, not openat2): `..`, 40 links of 40 components
    each and a tree 800 deep, some 2,400 components: well within MAX_WALK, the file
    Linux's openat2 opens."""
    box = _deep_box(tmp_path, 800)
    fd, sub = _dirfd(box), _dirfd(box / "sub")
    try:
        expected = openat2(fd, "sub/../L0", os.O_RDONLY | os.O_CLOEXEC, 0, RESOLVE_BENEATH)
        try:
            for beneath in (True, False):
                got = open_at(Anchor.of(fd, beneath=beneath), sub, "../L0", os.O_RDONLY)
                try:
                    assert os.path.sameopenfile(got, expected)
                finally:
                    os.close(got)
                parent, last = resolve_parent(Anchor.of(fd, beneath=beneath), sub,
                                              "../" + "a/" * 800 + "f")
                try:
                    assert last == "f"
                    assert os.stat(last, dir_fd=parent).st_ino == os.fstat(expected).st_ino
                finally:
                    os.close(parent)
        finally:
            os.close(expected)
    finally:
        os.close(fd)
        os.close(sub)


def test_a_walk_of_more_than_max_walk_components_is_eloop(tmp_path, fast):
    """Links of `sub/../` x 500 (each within PATH_MAX, fewer than 40 of them): Linux walks
    them all; the scheme's walk stops at MAX_WALK components with ELOOP, the errno of a
    lookup that follows too many links, and leaves no fd open."""
    box = tmp_path / "box"
    (box / "sub").mkdir(parents=True)
    (box / "f").write_text("f")
    for i in range(20):
        os.symlink("sub/../" * 500 + f"s{i + 1}", box / f"s{i}")
    os.symlink("f", box / "s20")
    assert 20 * 1000 > MAX_WALK
    fd, sub = _dirfd(box), _dirfd(box / "sub")
    try:
        before = len(os.listdir("/proc/self/fd"))
        for call in (lambda a: open_at(a, sub, "../s0", os.O_RDONLY),
                     lambda a: resolve_parent(a, sub, "../s0/x")):
            with pytest.raises(OSError) as info:
                call(Anchor.of(fd, beneath=False))
            assert info.value.errno == errno.ELOOP
        assert len(os.listdir("/proc/self/fd")) == before
    finally:
        os.close(fd)
        os.close(sub)


def test_steps_yield_only_to_walk_and_leave_no_fd_when_abandoned(tmp_path, fast):
    """Linux's answer comes without a yield; a walk yields before it begins and every
    WALK_SLICE components after; a walk closed halfway closes what it held."""
    box = _deep_box(tmp_path, 300)
    fd, sub = _dirfd(box), _dirfd(box / "sub")
    anchor = Anchor.of(fd)
    try:
        if fast:
            with pytest.raises(StopIteration) as done:
                next(open_steps(anchor, fd, "L0", os.O_RDONLY))
            os.close(done.value.value)
        before = len(os.listdir("/proc/self/fd"))
        for steps in (open_steps(anchor, sub, "../L0", os.O_RDONLY),
                      parent_steps(anchor, sub, "../" + "a/" * 300 + "f")):
            yields = 0
            while True:
                try:
                    next(steps)
                except StopIteration as done:
                    result = done.value
                    break
                yields += 1
            os.close(result if isinstance(result, int) else result[0])
            assert yields >= 300 // WALK_SLICE
        for steps in (open_steps(anchor, sub, "../L0", os.O_RDONLY),
                      parent_steps(anchor, sub, "../" + "a/" * 300 + "f")):
            for _ in range(3):
                next(steps)
            steps.close()
        assert len(os.listdir("/proc/self/fd")) == before
    finally:
        os.close(fd)
        os.close(sub)


# -- resolve_parent against the name operations of Linux in a chroot -------------------


def _name_op(op: str, parent: int | None, name: str, box: int | None = None) -> None:
    """One name operation on name relative to parent; the fixed other name of
    rename and link is relative to box (None: plain paths, for the chrooted child)."""
    kw = {} if parent is None else {"dir_fd": parent}
    if op == "mkdir":
        os.mkdir(name, 0o750, **kw)
    elif op == "rmdir":
        os.rmdir(name, **kw)
    elif op == "unlink":
        os.unlink(name, **kw)
    elif op == "symlink":
        os.symlink("target", name, **kw)
    elif op == "rename_from":
        os.rename(name, "renamed", src_dir_fd=parent, dst_dir_fd=box)
    elif op == "rename_to":
        os.rename("file.txt", name, src_dir_fd=box, dst_dir_fd=parent)
    elif op == "link_to":
        os.link("file.txt", name, src_dir_fd=box, dst_dir_fd=parent, follow_symlinks=False)
    else:
        raise AssertionError(op)


def _linux_in_root(box: Path, op: str, path: str) -> str:
    """Linux's answer for op(path) in a child chrooted into box: an errno name or "ok"."""
    pid = os.fork()
    if pid == 0:  # pragma: no cover - the child
        code = 255  # anything but an OSError
        try:
            os.chroot(box)
            os.chdir("/")
            _name_op(op, None, path)
            code = 0
        except OSError as exc:
            code = exc.errno
        finally:
            os._exit(code)
    _, status = os.waitpid(pid, 0)
    code = os.waitstatus_to_exitcode(status)
    assert code != 255
    return "ok" if code == 0 else errno.errorcode[code]


def _linux_beneath(box: Path, op: str, path: str) -> str:
    """Beneath: EXDEV wherever openat2(RESOLVE_BENEATH) refuses the parent's path
    (or the path is absolute); otherwise the same as in-root."""
    head = path.rstrip("/").rpartition("/")[0] if path.strip("/") else "/"
    if path.startswith("/"):
        return "EXDEV"
    if head:
        fd = _dirfd(box)
        try:
            os.close(linux_openat2(fd, head, os.O_PATH | os.O_DIRECTORY, 0,
                                   RESOLVE_BENEATH | RESOLVE_NO_MAGICLINKS))
        except OSError as exc:
            if exc.errno == errno.EXDEV:
                return "EXDEV"
        finally:
            os.close(fd)
    return _linux_in_root(box, op, path)


def _ours(anchor: Anchor, start: int, op: str, path: str) -> str:
    try:
        parent, name = resolve_parent(anchor, start, path)
    except OSError as exc:
        return errno.errorcode[exc.errno]
    try:
        if op == "rmdir" and path.strip("/") == "":
            return "EBUSY"  # Linux's rmdir("/"); the one case "." does not tell apart
        _name_op(op, parent, name, start)
        return "ok"
    except OSError as exc:
        return errno.errorcode[exc.errno]
    finally:
        os.close(parent)


NAME_PATHS = [
    "newname", "newname/", "file.txt", "file.txt/", "sub", "sub/", "empty", "empty/", "full",
    ".", "..", "./", "/", "//", "sub/.", "sub/..", "empty/.", "empty/..", "dir_link", "dir_link/",
    "dangling", "dangling/", "sub/inner.txt", "rel_in", "nope/x", "file.txt/x", "dir_link/inner.txt",
    "dir_link/new", "../x", "../../file.txt", "/newabs", "/../../newabs", "abs_dir/new",
    "abs_dir/inner.txt", "rel_out_dir/x", "rel_out_dir/x.txt", "loop_a/x", "sub/parent/file.txt",
    "sub/grandparent/file.txt", "sub/grandparent/new", "x" * 256, "sub/deeper/../../newfile",
    "abs_root/file.txt", "self/x", "", "sub/up_and_back/x", "c0/x", "e0/x",
]
NAME_OPS = ["mkdir", "rmdir", "unlink", "symlink", "rename_from", "rename_to", "link_to"]


@pytest.mark.skipif(os.geteuid() != 0, reason="the oracle needs chroot (root)")
@pytest.mark.parametrize("beneath", [True, False], ids=["beneath", "in_root"])
@pytest.mark.parametrize("op", NAME_OPS)
def test_resolve_parent_gives_linux_results_for_name_operations(tmp_path, fast, beneath, op):
    twins = Twins(tmp_path)
    mismatches = []
    for path in NAME_PATHS:
        box = twins.linux / "box"
        if not path:
            linux = "ENOENT"
        else:
            linux = _linux_beneath(box, op, path) if beneath else _linux_in_root(box, op, path)
        fd = _dirfd(twins.ours / "box")
        try:
            ours = _ours(Anchor.of(fd, beneath=beneath), fd, op, path)
        finally:
            os.close(fd)
        trees_differ = twins.differ()
        if ours != linux or trees_differ:
            mismatches.append((path[:60], ours, linux, "trees differ" if trees_differ else ""))
    assert mismatches == []


def test_resolve_parent_returns_the_last_name_as_the_path_wrote_it(tmp_path, fast):
    box = build(tmp_path)
    fd = _dirfd(box)
    try:
        anchor = Anchor.of(fd, beneath=False)
        for path, want_dir, want_name in [
            ("sub/../abs", "box", "abs"), ("sub//x//", "box/sub", "x/"), ("sub/..", "box/sub", ".."),
            ("/", "box", "."), ("dir_link/./", "box/sub", "."), ("abs_dir/y", "box/sub", "y"),
            ("../../../x", "box", "x"), ("sub/grandparent/z", "box", "z"), ("q", "box", "q"),
        ]:
            parent, name = resolve_parent(anchor, fd, path)
            try:
                assert os.path.relpath(os.readlink(f"/proc/self/fd/{parent}"), tmp_path) == want_dir, path
                assert name == want_name, path
            finally:
                os.close(parent)
    finally:
        os.close(fd)


def test_no_fd_is_left_open(tmp_path, fast):
    box = build(tmp_path)
    fd, sub = _dirfd(box), _dirfd(box / "sub/deeper")
    try:
        before = len(os.listdir("/proc/self/fd"))
        for beneath, path, flags in itertools.product(
            (True, False), PATHS[:60] + ["../../../../x", "../../file.txt"],
            (os.O_RDONLY, os.O_PATH, os.O_CREAT | os.O_EXCL | os.O_WRONLY),
        ):
            anchor = Anchor.of(fd, beneath=beneath)
            for start in (fd, sub):
                try:
                    os.close(open_at(anchor, start, path, flags))
                except OSError:
                    pass
                try:
                    os.close(resolve_parent(anchor, start, path)[0])
                except OSError:
                    pass
        assert len(os.listdir("/proc/self/fd")) == before
    finally:
        os.close(fd)
        os.close(sub)
