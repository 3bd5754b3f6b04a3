"""The file scheme in process, attacked: O_RESOLVE_BENEATH and O_RESOLVE_IN_ROOT lookups,
and escapes by `..`, symlinks, absolute paths and two-path operations; each checks that
nothing outside the root was opened, created, changed or removed (test_file_scheme.py
has the host layout and the fixtures).
"""

from __future__ import annotations

import errno
import os
import stat

import pytest
from test_file_scheme import (  # noqa: F401 (fs, host and untouched are fixtures)
    BENEATH,
    CREAT,
    DIRECTORY,
    EXCL,
    IN_ROOT,
    NOFOLLOW,
    PATH,
    RDONLY,
    RDWR,
    TRUNC,
    WRONLY,
    Client,
    _never_outside,
    fs,
    host,
    raises,
    snapshot,
    untouched,
)

from redoxcap.schemes.file import FileScheme
from redoxcap.wire import protocol as P

# -- O_RESOLVE_BENEATH / O_RESOLVE_IN_ROOT ----------------------------------------------------


async def test_beneath_sticks_to_everything_opened_beneath(fs, host, untouched):
    root, _ = host
    (root / "box/sub").mkdir(parents=True)
    (root / "box/file.txt").write_text("box")
    (root / "secret.txt").write_text("outside the box")
    os.symlink("/file.txt", root / "box/abs")
    box = await fs.open("box", RDONLY | DIRECTORY | BENEATH)
    assert box.opened_fdflags & BENEATH
    sub = await fs.open("sub", RDONLY | DIRECTORY, at=box)
    assert sub.opened_fdflags & BENEATH  # inherited without asking
    assert (await fs.dup(sub)).opened_fdflags & BENEATH
    f = await fs.open("../file.txt", at=sub)  # `..` inside the box is fine
    assert f.opened_fdflags & BENEATH
    for path in ("../../secret.txt", "/file.txt", "../abs", "..//..", "/"):
        await raises(errno.EXDEV, fs.call("openat", sub, path, RDONLY, 0))
    await raises(errno.EXDEV, fs.call("mkdirat", sub, "../../escape", 0o777))
    await raises(errno.EXDEV, fs.call("unlinkat", sub, "../../secret.txt", 0))
    await raises(errno.EXDEV, fs.call("renameat", sub, "../file.txt", "../../stolen"))
    await raises(errno.EXDEV, fs.call("renameat", fs.root, "secret.txt", "../../moved", passed=[fs.ref(sub)]))
    await raises(errno.EXDEV, fs.call("symlinkat", sub, "x", "/planted"))
    await raises(errno.EXDEV, fs.call("linkat", sub, "../../secret.txt", "linked"))
    await raises(errno.EXDEV, fs.call("linkat", fs.root, "secret.txt", "../../linked", passed=[fs.ref(sub)]))
    await raises(errno.EXDEV, fs.call("readlinkat", sub, "../../box/abs"))
    assert sorted(p.name for p in root.iterdir()) == ["box", "secret.txt"]
    plain = await fs.open("box", RDONLY | DIRECTORY)
    assert not plain.opened_fdflags & (BENEATH | IN_ROOT)
    await fs.open("../secret.txt", at=plain)  # without the flag, `..` is fine inside the scheme


async def test_the_flag_on_one_openat_binds_that_lookup_and_the_new_directory(fs, host):
    root, _ = host
    (root / "a/b/c").mkdir(parents=True)
    (root / "a/x.txt").write_text("x")
    a = await fs.open("a", RDONLY | DIRECTORY)
    await raises(errno.EXDEV, fs.call("openat", a, "../a/x.txt", RDONLY | BENEATH, 0))
    b = await fs.open("b", RDONLY | DIRECTORY | BENEATH, at=a)
    await raises(errno.EXDEV, fs.call("openat", b, "../x.txt", RDONLY, 0))
    f = await fs.open("x.txt", RDONLY | BENEATH, at=a)  # a file remembers the flag too
    assert f.opened_fdflags & BENEATH and not f.opened_fdflags & IN_ROOT


async def test_in_root_makes_a_directory_a_root(fs, host, untouched):
    root, _ = host
    (root / "jail/sub").mkdir(parents=True)
    (root / "jail/x.txt").write_text("jail")
    (root / "x.txt").write_text("root")
    os.symlink("/x.txt", root / "jail/sub/abs")
    jail = await fs.open("jail", RDONLY | DIRECTORY | IN_ROOT)
    assert jail.opened_fdflags & IN_ROOT
    for path in ("../x.txt", "/x.txt", "sub/abs", "sub/../../../x.txt", "/../x.txt"):
        assert await fs.call("read", await fs.open(path, at=jail), 10) == b"jail", path
    sub = await fs.open("sub", RDONLY | DIRECTORY, at=jail)
    assert sub.opened_fdflags & IN_ROOT
    assert await fs.call("read", await fs.open("../../../x.txt", at=sub), 10) == b"jail"
    assert await fs.call("read", await fs.open("../x.txt", RDONLY | IN_ROOT, at=jail), 10) == b"jail"
    await fs.call("mkdirat", sub, "/../made", 0o777)
    assert (root / "jail/made").is_dir() and not (root / "made").exists()


# -- escapes -----------------------------------------------------------------------------


async def test_dotdot_chains_stop_at_the_root(fs, host, untouched):
    root, outside = host
    (root / "a/b").mkdir(parents=True)
    (root / "secret.txt").write_text("decoy in the root")
    rel = os.path.relpath(outside / "secret.txt", root)  # ../outside/secret.txt
    b = await fs.open("a/b", RDONLY | DIRECTORY)
    for at, path in [(fs.root, rel), (fs.root, "../" * 30 + rel), (b, "../../" + rel),
                     (b, "../" * 30 + "secret.txt"), (fs.root, "/../../" + rel), (b, "/" + rel)]:
        try:
            h = await fs.open(path, at=at)
        except OSError as exc:
            assert exc.errno == errno.ENOENT, path
        else:
            assert await fs.call("read", h, 100) == b"decoy in the root", path
    _never_outside(fs, untouched)


async def test_absolute_symlinks_resolve_inside_the_root(fs, host, untouched):
    root, outside = host
    (root / "etc").mkdir()
    (root / "etc/passwd").write_text("decoy passwd")
    await fs.call("symlinkat", fs.root, "/etc/passwd", "passwd")
    await fs.call("symlinkat", fs.root, str(outside / "secret.txt"), "host_abs")
    await fs.call("symlinkat", fs.root, str(outside), "host_dir")
    assert await fs.call("read", await fs.open("passwd"), 100) == b"decoy passwd"
    await raises(errno.ENOENT, fs.call("openat", fs.root, "host_abs", RDONLY, 0))
    await raises(errno.ENOENT, fs.call("openat", fs.root, "host_dir/secret.txt", RDONLY, 0))
    await raises(errno.ENOENT, fs.call("openat", fs.root, "host_dir/", RDONLY | DIRECTORY, 0))
    _never_outside(fs, untouched)


async def test_relative_symlinks_pointing_out_are_clamped(fs, host, untouched):
    root, outside = host
    (root / "a").mkdir()
    rel_out = os.path.relpath(outside, root / "a")  # ../../outside
    await fs.call("symlinkat", fs.root, rel_out + "/secret.txt", "a/out")
    await fs.call("symlinkat", fs.root, "../" * 20 + "etc", "a/far")
    await fs.call("symlinkat", fs.root, rel_out, "a/outdir")
    await raises(errno.ENOENT, fs.call("openat", fs.root, "a/out", RDONLY, 0))
    await raises(errno.ENOENT, fs.call("openat", fs.root, "a/far/passwd", RDONLY, 0))
    await raises(errno.ENOENT, fs.call("openat", fs.root, "a/out", WRONLY | CREAT, 0o644))
    _never_outside(fs, untouched)


async def test_a_symlink_to_the_host_renamed_over_a_directory_leads_nowhere(fs, host, untouched):
    """The attacker holds a handle on ROOT/box, moves box away and renames a symlink
    to a host directory into its place. The handle still means the real box, and
    the name now means the symlink, which resolves inside the root."""
    root, outside = host
    (root / "box").mkdir()
    (root / "box/in.txt").write_text("in the box")
    box = await fs.open("box", RDONLY | DIRECTORY)
    await fs.call("symlinkat", fs.root, str(outside), "evil")
    await fs.call("renameat", fs.root, "box", "box_old")
    await fs.call("renameat", fs.root, "evil", "box")
    assert await fs.call("read", await fs.open("in.txt", at=box), 100) == b"in the box"
    for path in ("box/secret.txt", "box/dir/inner.txt", "box/../outside/secret.txt"):
        await raises(errno.ENOENT, fs.call("openat", fs.root, path, RDONLY, 0))
    await raises(errno.ENOENT, fs.call("openat", fs.root, "box/new.txt", WRONLY | CREAT, 0o644))
    await raises(errno.ENOENT, fs.call("mkdirat", fs.root, "box/newdir", 0o777))
    await raises(errno.ENOENT, fs.call("unlinkat", fs.root, "box/secret.txt", 0))
    await raises(errno.ENOENT, fs.call("unlinkat", fs.root, "box/dir", P.AT_REMOVEDIR))
    await raises(errno.ENOENT, fs.call("renameat", fs.root, "box/secret.txt", "stolen"))
    await raises(errno.ENOENT, fs.call("renameat", fs.root, "box_old/in.txt", "box/planted"))
    await raises(errno.ENOENT, fs.call("symlinkat", fs.root, "x", "box/planted"))
    await raises(errno.ENOENT, fs.call("linkat", fs.root, "box/secret.txt", "linked"))
    await raises(errno.ENOENT, fs.call("readlinkat", fs.root, "box/dir"))
    await fs.call("unlinkat", fs.root, "box", 0)  # removes the symlink, not the host directory
    assert outside.is_dir()
    _never_outside(fs, untouched)


@pytest.mark.parametrize("op, args", [
    ("mkdirat", ["../escape", 0o777]),
    ("mkdirat", ["/../../escape", 0o777]),
    ("mkdirat", ["up/escape", 0o777]),
    ("symlinkat", ["x", "../planted"]),
    ("symlinkat", ["x", "up/planted"]),
    ("renameat", ["f", "../stolen"]),
    ("renameat", ["f", "up/stolen"]),
    ("linkat", ["f", "../linked"]),
    ("linkat", ["f", "up/linked"]),
])
async def test_creating_through_dotdot_and_symlinks_stays_inside(fs, host, untouched, op, args):
    """`..` above the root is the root, and `up` (a symlink to ../..) is the root too:
    what is made lands in the root, never beside it."""
    root, _ = host
    (root / "f").write_text("x")
    os.symlink("../..", root / "up")
    await fs.call(op, fs.root, *args)
    made = args[1] if op != "mkdirat" else args[0]
    assert (root / os.path.basename(made)).exists() or (root / os.path.basename(made)).is_symlink()
    assert sorted(p.name for p in root.parent.iterdir()) == ["outside", "root"]


@pytest.mark.parametrize("op, args", [
    ("unlinkat", ["../outside/secret.txt", 0]),
    ("unlinkat", ["up/outside/secret.txt", 0]),
    ("unlinkat", ["../outside/dir", P.AT_REMOVEDIR]),
    ("renameat", ["../outside/secret.txt", "stolen"]),
    ("renameat", ["up/outside/secret.txt", "stolen"]),
    ("linkat", ["../outside/secret.txt", "linked"]),
    ("readlinkat", ["up/outside/secret.txt"]),
    ("openat", ["up/outside/secret.txt", os.O_RDONLY, 0]),
    ("openat", ["../outside/secret.txt", os.O_WRONLY | os.O_TRUNC, 0]),
])
async def test_nothing_outside_is_removed_moved_or_read(fs, host, untouched, op, args):
    root, _ = host
    os.symlink("../..", root / "up")
    await raises(errno.ENOENT, fs.call(op, fs.root, *args))


async def test_chmod_sets_permission_bits_only_and_never_follows_out(fs, host):
    root, outside = host
    (root / "f").write_text("x")
    os.symlink("f", root / "lnk")
    os.symlink("../outside/secret.txt", root / "out")
    before = os.stat(outside / "secret.txt").st_mode
    await fs.call("chmodat", fs.root, "f", 0o6751, 0)
    assert stat.S_IMODE(os.stat(root / "f").st_mode) == 0o751  # no set-uid, set-gid
    await fs.call("chmodat", fs.root, "lnk", 0o600, 0)  # follows a link inside
    assert stat.S_IMODE(os.stat(root / "f").st_mode) == 0o600
    await raises(errno.EOPNOTSUPP, fs.call("chmodat", fs.root, "lnk", 0o600, NOFOLLOW))
    await raises(errno.ENOENT, fs.call("chmodat", fs.root, "out", 0o777, 0))
    await raises(errno.EINVAL, fs.call("chmodat", fs.root, "f", 0o10000, 0))
    h = await fs.open("f", RDONLY)
    await fs.call("chmodat", h, "", 0o640, 0)  # the handle's own file
    assert stat.S_IMODE(os.stat(root / "f").st_mode) == 0o640
    assert os.stat(outside / "secret.txt").st_mode == before


async def test_utimens_sets_times_keeps_omitted_ones_and_touches_links_themselves(fs, host):
    root, outside = host
    (root / "f").write_text("x")
    os.symlink("f", root / "lnk")
    os.symlink("../outside/secret.txt", root / "out")
    mtime_outside = os.stat(outside / "secret.txt").st_mtime_ns
    await fs.call("utimensat", fs.root, "f", 1_000_000_000, 2_000_000_000, 0)
    st = os.stat(root / "f")
    assert (st.st_atime_ns, st.st_mtime_ns) == (1_000_000_000, 2_000_000_000)
    await fs.call("utimensat", fs.root, "f", None, 3_000_000_000, 0)
    st = os.stat(root / "f")
    assert (st.st_atime_ns, st.st_mtime_ns) == (1_000_000_000, 3_000_000_000)
    await fs.call("utimensat", fs.root, "lnk", 5_000_000_000, 5_000_000_000, NOFOLLOW)
    assert os.lstat(root / "lnk").st_mtime_ns == 5_000_000_000
    assert os.stat(root / "f").st_mtime_ns == 3_000_000_000
    await raises(errno.ENOENT, fs.call("utimensat", fs.root, "out", 0, 0, 0))
    await fs.call("utimensat", fs.root, "out", 7_000_000_000, 7_000_000_000, NOFOLLOW)  # the link
    assert os.stat(outside / "secret.txt").st_mtime_ns == mtime_outside


async def test_chown_changes_nothing_and_refuses_another_owner(fs, host):
    root, _ = host
    (root / "f").write_text("x")
    st = os.stat(root / "f")
    await fs.call("chownat", fs.root, "f", -1, -1, 0)
    await fs.call("chownat", fs.root, "f", st.st_uid, st.st_gid, 0)
    await raises(errno.EPERM, fs.call("chownat", fs.root, "f", st.st_uid + 4242, -1, 0))
    await raises(errno.EPERM, fs.call("chownat", fs.root, "f", -1, st.st_gid + 4242, 0))
    assert (os.stat(root / "f").st_uid, os.stat(root / "f").st_gid) == (st.st_uid, st.st_gid)


async def test_metadata_on_a_read_only_scheme_is_erofs(host):
    root, _ = host
    (root / "f").write_text("x")
    client = Client(FileScheme(str(root), read_only=True))
    await raises(errno.EROFS, client.call("chmodat", client.root, "f", 0o600, 0))
    await raises(errno.EROFS, client.call("utimensat", client.root, "f", 0, 0, 0))
    await raises(errno.EROFS, client.call("chownat", client.root, "f", -1, -1, 0))
    os.close(client.scheme.root_fd)
