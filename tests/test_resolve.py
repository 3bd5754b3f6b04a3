"""schemes/resolve.py directly: the walk, and renames racing it."""

from __future__ import annotations

import errno
import os
import threading

import pytest

from schemes.resolve import Anchor, depth_below, open_at, resolve_parent


@pytest.fixture
def tree(tmp_path):
    (tmp_path / "outside.txt").write_text("outside")
    box = tmp_path / "box"
    (box / "a/b/c").mkdir(parents=True)
    (box / "a/b/c/leaf.txt").write_text("leaf")
    (box / "top.txt").write_text("top")
    os.symlink("/top.txt", box / "a/abs")
    os.symlink("../../..", box / "a/b/up3")
    fd = os.open(box, os.O_PATH | os.O_DIRECTORY)
    yield tmp_path, box, fd
    os.close(fd)


def _read(fd: int) -> str:
    try:
        return os.read(fd, 100).decode()
    finally:
        os.close(fd)


def test_in_root_absolute_symlinks_and_dotdot_stay_at_the_anchor(tree):
    _, box, fd = tree
    anchor = Anchor.of(fd, beneath=False)
    sub = os.open(box / "a/b", os.O_PATH | os.O_DIRECTORY)
    try:
        assert _read(open_at(anchor, sub, "../abs", os.O_RDONLY)) == "top"  # /top.txt is box/top.txt
        assert _read(open_at(anchor, sub, "up3/a/b/up3/top.txt", os.O_RDONLY)) == "top"
        assert _read(open_at(anchor, sub, "/../../top.txt", os.O_RDONLY)) == "top"
        with pytest.raises(FileNotFoundError):
            open_at(anchor, sub, "../../../outside.txt", os.O_RDONLY)
    finally:
        os.close(sub)


def test_beneath_refuses_what_in_root_would_clamp(tree):
    _, box, fd = tree
    anchor = Anchor.of(fd, beneath=True)
    sub = os.open(box / "a/b", os.O_PATH | os.O_DIRECTORY)
    try:
        assert _read(open_at(anchor, sub, "../../top.txt", os.O_RDONLY)) == "top"
        for path in ("../abs", "up3", "../../../outside.txt", "/top.txt", "c/../../../.."):
            with pytest.raises(OSError) as info:
                open_at(anchor, sub, path, os.O_RDONLY)
            assert info.value.errno == errno.EXDEV, path
    finally:
        os.close(sub)


def test_resolve_parent_names_the_last_component_without_following_it(tree):
    _, _, fd = tree
    anchor = Anchor.of(fd, beneath=True)
    parent, name, must_be_dir = resolve_parent(anchor, fd, "a/abs")
    try:
        assert (name, must_be_dir) == ("abs", False)
        assert os.readlink(name, dir_fd=parent) == "/top.txt"
    finally:
        os.close(parent)
    parent, name, must_be_dir = resolve_parent(anchor, fd, "a/b/")
    os.close(parent)
    assert (name, must_be_dir) == ("b", True)
    parent, name, _ = resolve_parent(anchor, fd, "a/..")
    os.close(parent)
    assert name is None


def test_depth_below_counts_and_refuses_a_directory_outside(tree):
    tmp, box, fd = tree
    anchor = Anchor.of(fd, beneath=True)
    deep = os.open(box / "a/b/c", os.O_PATH | os.O_DIRECTORY)
    out = os.open(tmp, os.O_PATH | os.O_DIRECTORY)
    try:
        assert depth_below(deep, anchor) == 3
        with pytest.raises(OSError) as info:
            depth_below(out, anchor)
        assert info.value.errno == errno.EAGAIN
    finally:
        os.close(deep)
        os.close(out)


def test_a_rename_racing_the_lookup_never_lets_it_out(tree):
    """A thread keeps moving a directory between the box and outside it while
    lookups climb out of it with `..`; every answer is beneath the box or an error."""
    tmp, box, fd = tree
    anchor = Anchor.of(fd, beneath=True)
    (tmp / "elsewhere").mkdir()
    (tmp / "elsewhere/secret.txt").write_text("secret")
    (box / "a/b/c/secret.txt").write_text("decoy")
    inside, outside = box / "a/b/c", tmp / "elsewhere/c"
    stop = threading.Event()

    def mover():
        while not stop.is_set():
            try:
                os.rename(inside, outside)
                os.rename(outside, inside)
            except OSError:
                pass

    thread = threading.Thread(target=mover)
    thread.start()
    escaped = []
    try:
        for _ in range(3000):
            start = None
            try:
                start = os.open(inside, os.O_PATH | os.O_DIRECTORY)
                got = _read(open_at(anchor, start, "../secret.txt", os.O_RDONLY))
                if got == "secret":
                    escaped.append(got)
            except OSError:
                pass
            finally:
                if start is not None:
                    os.close(start)
    finally:
        stop.set()
        thread.join()
    assert escaped == []
