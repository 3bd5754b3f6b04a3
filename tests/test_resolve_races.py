"""schemes/resolve.py against renames racing it: however a rename (or a rename exchange)
moves a directory under a walk, no lookup, create or start leaves its anchor (the oracle
and the fixtures are test_resolve.py's).
"""

from __future__ import annotations

import errno
import os
import subprocess
import sys
import threading
import time
from pathlib import Path

import pytest
from test_resolve import _dirfd, fast  # noqa: F401 (fast is a fixture)

from redoxcap.schemes import resolve as R
from redoxcap.schemes.resolve import Anchor, open_at, resolve_parent
from redoxcap.wire import beneath as fast_path

# -- renames racing the walk -------------------------------------------------------------


@pytest.fixture
def arena(tmp_path):
    """host_secret.txt outside ROOT; in ROOT: the anchor, whose sub/dir a mover takes
    to ROOT/away/a1/a2/a3/dir and back, and root_secret.txt files outside the anchor."""
    (tmp_path / "host_secret.txt").write_text("host")
    root = tmp_path / "root"
    (root / "away/a1/a2/a3").mkdir(parents=True)
    (root / "root_secret.txt").write_text("root")
    for depth in ("away", "away/a1", "away/a1/a2", "away/a1/a2/a3"):
        (root / depth / "root_secret.txt").write_text("outside the anchor")
    anchor = root / "anchor"
    (anchor / "sub/dir/d1/d2").mkdir(parents=True)
    (anchor / "anchor_file.txt").write_text("in the anchor")
    os.symlink("../../..", anchor / "sub/dir/up3")  # from dir: ROOT, or away/a1 once moved
    os.symlink("d1/d2/../../../../../../..", anchor / "sub/dir/far")
    os.symlink("/root_secret.txt", anchor / "sub/dir/abs")
    outside = {
        (st.st_dev, st.st_ino)
        for p in [tmp_path / "host_secret.txt", *root.rglob("root_secret.txt")]
        for st in [os.stat(p)]
    }
    return tmp_path, root, anchor, outside


def _race(arena, lookups, rounds):
    """Run lookups() at least rounds times, and until the directory was moved out and back
    a few hundred times, while a thread keeps moving it.

    Returns (lookups that opened a file outside, how many opened anything).
    """
    _, root, anchor_dir, outside = arena
    inside, away = anchor_dir / "sub/dir", root / "away/a1/a2/a3/dir"
    stop = threading.Event()
    moves = 0

    def mover():
        nonlocal moves
        while not stop.is_set():
            try:
                os.rename(inside, away)
                os.rename(away, inside)
                moves += 1
            except OSError:
                pass

    escaped, opened = [], 0
    switch = sys.getswitchinterval()
    sys.setswitchinterval(1e-5)
    thread = threading.Thread(target=mover)
    thread.start()
    try:
        done = 0
        deadline = time.monotonic() + 60  # a bound on the race, not a timing assertion
        while (done < rounds or moves < 300) and time.monotonic() < deadline:
            done += 1
            for anchor, start, path in lookups():
                try:
                    fd = open_at(anchor, start, path, os.O_RDONLY)
                except OSError:
                    continue
                try:
                    st = os.fstat(fd)
                    opened += 1
                    if (st.st_dev, st.st_ino) in outside:
                        escaped.append((path, os.readlink(f"/proc/self/fd/{fd}")))
                finally:
                    os.close(fd)
    finally:
        stop.set()
        thread.join()
        sys.setswitchinterval(switch)
    assert moves >= 300
    return escaped, opened


@pytest.mark.parametrize("beneath", [True, False], ids=["beneath", "in_root"])
def test_renames_racing_lookups_never_leave_the_anchor(arena, fast, beneath):
    """The anchor is ROOT/anchor (beneath, or in-root as an O_RESOLVE_IN_ROOT handle);
    every root_secret.txt and the host file are outside it."""
    _, _, anchor_dir, _ = arena
    anchor_fd = _dirfd(anchor_dir)
    anchor = Anchor.of(anchor_fd, beneath=beneath)
    paths = ["sub/dir/d1/d2/" + "../" * k + "root_secret.txt" for k in range(3, 9)]
    paths += ["sub/dir/d1/d2/../../../../anchor_file.txt", "sub/dir/up3/anchor/anchor_file.txt",
              "sub/dir/up3/root_secret.txt", "sub/dir/far/root_secret.txt", "sub/dir/abs",
              "sub/dir/d1/../../../../../host_secret.txt", "sub/dir/up3/../host_secret.txt"]

    def lookups():
        for path in paths:
            yield anchor, anchor_fd, path

    try:
        escaped, opened = _race(arena, lookups, rounds=600)
    finally:
        os.close(anchor_fd)
    assert escaped == []
    if not beneath:
        assert opened > 0  # in-root clamps `..` at the anchor: anchor_file.txt is found


def test_renames_racing_lookups_from_a_moving_start_never_leave(arena, fast):
    """Start from the moving directory itself, in-root at ROOT and beneath the anchor."""
    _, root, anchor_dir, _ = arena
    root_fd, anchor_fd = _dirfd(root), _dirfd(anchor_dir)
    in_root, beneath = Anchor.of(root_fd), Anchor.of(anchor_fd, beneath=True)
    starts: list[int] = []

    def lookups():
        while starts:
            os.close(starts.pop())
        for place in (anchor_dir / "sub/dir", root / "away/a1/a2/a3/dir"):
            try:
                starts.append(_dirfd(place))
            except OSError:
                pass
        for start in starts:
            yield in_root, start, "../../../../../../../../host_secret.txt"
            yield in_root, start, "d1/d2/../../../../../../../../host_secret.txt"
            yield beneath, start, "../../../root_secret.txt"
            yield beneath, start, "../../../../root_secret.txt"
            yield beneath, start, "up3/root_secret.txt"

    try:
        escaped, _ = _race(arena, lookups, rounds=1500)
    finally:
        for fd in [root_fd, anchor_fd, *starts]:
            os.close(fd)
    assert escaped == []


def test_a_rename_between_two_steps_never_leads_out(arena, monkeypatch):
    """Deterministically: the directory moves out just before the walk climbs out of
    it. Climbing by real parents would reach away/a1; popping the chain of directories
    descended goes back to the anchor instead."""
    _, root, anchor_dir, _ = arena
    monkeypatch.setattr(fast_path, "_have_openat2", False)
    inside, away = anchor_dir / "sub/dir", root / "away/a1/a2/a3/dir"
    real_up = R._Walk.up
    moved = []

    def up(walk):
        if not moved:
            os.rename(inside, away)
            moved.append(True)
        return real_up(walk)

    monkeypatch.setattr(R._Walk, "up", up)
    fd = _dirfd(anchor_dir)
    try:
        for beneath in (True, False):
            anchor = Anchor.of(fd, beneath=beneath)
            for path, flags in (("sub/dir/../../../root_secret.txt", os.O_RDONLY),
                                ("sub/dir/../../../made.txt", os.O_CREAT | os.O_WRONLY)):
                moved.clear()
                if away.exists():
                    os.rename(away, inside)
                try:
                    os.close(open_at(anchor, fd, path, flags))
                except OSError as exc:
                    # beneath: the third `..` is at the anchor; in-root: no secret there
                    assert exc.errno == (errno.EXDEV if beneath else errno.ENOENT)
                else:
                    assert not beneath and flags & os.O_CREAT
    finally:
        os.close(fd)
    assert [p.relative_to(root) for p in root.rglob("made.txt")] == [Path("anchor/made.txt")]


def _create(anchor: Anchor, start: int, path: str) -> None:
    try:
        os.close(open_at(anchor, start, path, os.O_CREAT | os.O_WRONLY))
    except OSError:
        pass


def _mkdir(anchor: Anchor, start: int, path: str) -> None:
    try:
        parent, name = resolve_parent(anchor, start, path)
    except OSError:
        return
    try:
        os.mkdir(name, dir_fd=parent)
    except OSError:
        pass
    finally:
        os.close(parent)


SWAPPER = """
import ctypes, os, sys
libc = ctypes.CDLL(None, use_errno=True)
a, b = os.fsencode(sys.argv[1]), os.fsencode(sys.argv[2])
print("swapping", flush=True)
while True:
    libc.renameat2(-100, a, -100, b, 2)  # RENAME_EXCHANGE
"""


@pytest.mark.parametrize("beneath", [True, False], ids=["beneath", "in_root"])
def test_creates_racing_a_rename_exchange_never_land_outside(tmp_path, fast, beneath):
    """The attack from issue 7: while another process swaps `a/c` with `out/d` by
    RENAME_EXCHANGE, create `c/../c/NAME` beneath `a`. A lookup that took the host's
    `..` after `c` moved would go on in `out` and create in the decoy `out/c`, which
    never was beneath `a` (the resolver before this one did, a few times a second).
    Files may land only in the two directories that swap."""
    a, out = tmp_path / "a", tmp_path / "out"
    (a / "c").mkdir(parents=True)
    (out / "d").mkdir(parents=True)
    (out / "c").mkdir()  # the decoy
    anchor_fd = _dirfd(a)
    anchor = Anchor.of(anchor_fd, beneath=beneath)
    swapper = subprocess.Popen([sys.executable, "-c", SWAPPER, str(a / "c"), str(out / "d")],
                               stdout=subprocess.PIPE, text=True)
    try:
        assert swapper.stdout.readline() == "swapping\n"
        deadline = time.monotonic() + 3  # a race, not a timing assertion
        i = 0
        while time.monotonic() < deadline:
            i += 1
            _create(anchor, anchor_fd, f"c/../c/n{i}")
            _create(anchor, anchor_fd, f"c/./../c/../c/m{i}")
            if i % 8 == 0:
                _mkdir(anchor, anchor_fd, f"c/../c/d{i}")
    finally:
        swapper.kill()
        swapper.wait()
        swapper.stdout.close()
        os.close(anchor_fd)
    assert i > 1000
    strays = {place.name: sorted(p.name for p in place.iterdir() if p.name not in ("a", "out", "c", "d"))
              for place in (out / "c", out, tmp_path)}
    assert strays == {"c": [], "out": [], tmp_path.name: []}, "created outside the anchor"
