"""The file scheme in process: its methods called as the framework would call them.

`scheme.handles` is the framework's number -> handle table (the hook two-path
operations use to find a passed directory); here the tests fill it. The host
layout is tmp/root (what the scheme serves) beside tmp/outside (the host the
scheme must never reach): every escape test checks that nothing outside was
opened (by inode), created, changed or removed.
"""

from __future__ import annotations

import errno
import os
import stat
from pathlib import Path

import pytest

from redoxcap.schemes.file import _O_LARGEFILE, FileScheme
from redoxcap.schemes.file_work import FileHandle
from redoxcap.schemes.framework import Caller, HandleRef, Opened, Request, SchemeError, invoke
from redoxcap.wire import protocol as P

RDONLY, WRONLY, RDWR = os.O_RDONLY, os.O_WRONLY, os.O_RDWR
CREAT, EXCL, TRUNC, APPEND = os.O_CREAT, os.O_EXCL, os.O_TRUNC, os.O_APPEND
DIRECTORY, NOFOLLOW, PATH = os.O_DIRECTORY, os.O_NOFOLLOW, os.O_PATH
BENEATH, IN_ROOT = P.O_RESOLVE_BENEATH, P.O_RESOLVE_IN_ROOT


class Client:
    """Calls a FileScheme's methods, keeping the handle table as the framework would."""

    def __init__(self, scheme: FileScheme) -> None:
        self.scheme = scheme
        scheme.handles = {P.ROOT_HANDLE: scheme.root()}
        self.next = 1

    @property
    def root(self) -> FileHandle:
        return self.scheme.handles[P.ROOT_HANDLE]

    async def call(self, name: str, h: FileHandle, *args, passed=()):
        req = Request(Caller(os.getpid(), 0, 0), 0, 0, list(passed))
        return await invoke(self.scheme, req, h, name, *args)

    def adopt(self, opened: Opened) -> FileHandle:
        assert isinstance(opened, Opened)
        self.scheme.handles[self.next] = opened.obj
        opened.obj.number = self.next
        opened.obj.opened_fdflags = opened.fdflags
        self.next += 1
        return opened.obj

    async def open(self, path: str, flags: int = RDONLY, mode: int = 0o666, at: FileHandle | None = None):
        return self.adopt(await self.call("openat", at or self.root, path, flags, mode))

    async def dup(self, h: FileHandle, buf: bytes = b"") -> FileHandle:
        return self.adopt(await self.call("dup", h, buf))

    def ref(self, h: FileHandle) -> HandleRef:
        return HandleRef(h.number, -1)

    async def close_all(self) -> None:
        for number in list(self.scheme.handles):
            if number != P.ROOT_HANDLE:
                await self.scheme.close(self.scheme.handles.pop(number))

    async def read_all(self, h: FileHandle) -> bytes:
        parts = []
        while chunk := await self.call("read", h, P.MAX_IO):
            parts.append(chunk)
        return b"".join(parts)

    async def listdir(self, h: FileHandle) -> list[str]:
        names: list[str] = []
        while page := await self.call("getdents", h, len(names)):
            names += page
        return names


async def raises(err: int, call) -> None:
    """Await call and check that it fails with errno err (SchemeError or OSError)."""
    with pytest.raises((SchemeError, OSError)) as info:
        await call
    got = errno.errorcode.get(info.value.errno, info.value.errno)
    assert info.value.errno == err, f"{got} instead of {errno.errorcode[err]}"


def snapshot(top: Path) -> dict[str, tuple]:
    out = {}
    for dirpath, dirnames, filenames in os.walk(top):
        for name in dirnames + filenames:
            path = os.path.join(dirpath, name)
            st = os.lstat(path)
            detail = os.readlink(path) if stat.S_ISLNK(st.st_mode) else (st.st_size, st.st_mtime_ns)
            out[os.path.relpath(path, top)] = (stat.S_IFMT(st.st_mode), detail)
    return out


@pytest.fixture
def host(tmp_path):
    """tmp/outside (host files the scheme must not reach) and tmp/root (served)."""
    outside = tmp_path / "outside"
    (outside / "dir").mkdir(parents=True)
    (outside / "secret.txt").write_text("host secret")
    (outside / "dir/inner.txt").write_text("host inner")
    root = tmp_path / "root"
    root.mkdir()
    return root, outside


@pytest.fixture
async def fs(host):
    root, _ = host
    client = Client(FileScheme(str(root)))
    yield client
    await client.close_all()
    os.close(client.scheme.root_fd)


@pytest.fixture
def untouched(host):
    """Asserts at the end of the test that nothing outside the root changed."""
    _, outside = host
    before = snapshot(outside)
    inodes = {(st.st_dev, st.st_ino) for p in outside.rglob("*") for st in [os.lstat(p)]}
    inodes.add((os.stat(outside).st_dev, os.stat(outside).st_ino))
    yield inodes
    assert snapshot(outside) == before


def _never_outside(client: Client, inodes: set) -> None:
    for h in client.scheme.handles.values():
        st = os.fstat(h.fd)
        assert (st.st_dev, st.st_ino) not in inodes


# -- data ------------------------------------------------------------------------------


async def test_create_write_read_back_seek_truncate_stat(fs, host):
    root, _ = host
    f = await fs.open("notes.txt", RDWR | CREAT, 0o640)
    assert await fs.call("write", f, b"hello world") == 11
    assert await fs.call("lseek", f, 0, os.SEEK_SET) == 0
    assert await fs.call("read", f, 5) == b"hello"
    assert await fs.call("lseek", f, -5, os.SEEK_END) == 6
    assert await fs.call("read", f, 100) == b"world"
    assert await fs.call("read", f, 100) == b""
    await fs.call("ftruncate", f, 5)
    st = await fs.call("fstat", f)
    assert st.st_size == 5 and stat.S_ISREG(st.st_mode) and stat.S_IMODE(st.st_mode) == 0o640
    assert set(st._fields) == {"st_mode", "st_ino", "st_dev", "st_nlink", "st_uid", "st_gid", "st_size",
                       "st_atime_ns", "st_mtime_ns", "st_ctime_ns", "st_blocks", "st_blksize"}
    assert (st.st_dev, st.st_ino) == (os.stat(root / "notes.txt").st_dev, os.stat(root / "notes.txt").st_ino)
    await fs.call("fsync", f)
    assert (root / "notes.txt").read_bytes() == b"hello"


async def test_reads_are_clamped_and_bad_numbers_are_einval(fs, host):
    root, _ = host
    (root / "big").write_bytes(b"x" * (P.MAX_IO + 10))
    f = await fs.open("big")
    assert len(await fs.call("read", f, 10 * P.MAX_IO)) == P.MAX_IO
    await raises(errno.EINVAL, fs.call("read", f, -1))
    await raises(errno.EINVAL, fs.call("lseek", f, 0, 99))
    await raises(errno.EINVAL, fs.call("lseek", f, 2**64, os.SEEK_SET))
    await raises(errno.EINVAL, fs.call("lseek", f, -1, os.SEEK_SET))
    w = await fs.open("big", RDWR)
    await raises(errno.EINVAL, fs.call("ftruncate", w, -1))
    await raises(errno.EFBIG, fs.call("ftruncate", w, 2**64))
    await raises(errno.EINVAL, fs.call("openat", fs.root, "new", CREAT | WRONLY, -1))
    await raises(errno.EINVAL, fs.call("openat", fs.root, "new", CREAT | WRONLY, 0o10000))
    await raises(errno.EINVAL, fs.call("mkdirat", fs.root, "new", 2**40))


async def test_seek_data_and_hole(fs, host):
    root, _ = host
    (root / "sparse").write_bytes(b"data")
    os.truncate(root / "sparse", 1 << 20)
    h = await fs.open("sparse")
    assert await fs.call("lseek", h, 0, os.SEEK_DATA) == 0
    assert await fs.call("lseek", h, 0, os.SEEK_HOLE) >= 4


async def test_append_trunc_excl_and_the_fixed_umask(fs, host):
    root, _ = host
    (root / "log").write_bytes(b"one\n")
    a = await fs.open("log", WRONLY | APPEND)
    await fs.call("lseek", a, 0, os.SEEK_SET)
    await fs.call("write", a, b"two\n")
    assert (root / "log").read_bytes() == b"one\ntwo\n"
    await fs.open("log", WRONLY | TRUNC)
    assert (root / "log").read_bytes() == b""
    await raises(errno.EEXIST, fs.call("openat", fs.root, "log", WRONLY | CREAT | EXCL, 0o644))
    await fs.open("wide", WRONLY | CREAT, 0o777)
    await fs.open("setuid", WRONLY | CREAT, 0o6777)
    await fs.call("mkdirat", fs.root, "d", 0o1777)
    assert stat.S_IMODE(os.stat(root / "wide").st_mode) == 0o755
    assert stat.S_IMODE(os.stat(root / "setuid").st_mode) == 0o755  # never set-uid, set-gid
    assert stat.S_IMODE(os.stat(root / "d").st_mode) == 0o755  # nor sticky


async def test_directories_open_read_only_and_list_in_pages(fs, host):
    root, _ = host
    (root / "d").mkdir()
    for name in ("b", "a", "c"):
        (root / "d" / name).write_text(name)
    os.mkdir(os.path.join(os.fsencode(root / "d"), b"\xff-not-utf8"))
    d = await fs.open("d", RDONLY | DIRECTORY)
    assert sorted(await fs.listdir(d)) == ["a", "b", "c"]  # the name no client can spell is left out
    assert await fs.call("getdents", d, 3) == []
    await raises(errno.EINVAL, fs.call("getdents", d, -1))
    assert await fs.listdir(fs.root) == ["d"]
    await raises(errno.EISDIR, fs.call("openat", fs.root, "d", WRONLY, 0))
    await raises(errno.EISDIR, fs.call("openat", fs.root, "d", RDWR, 0))
    await raises(errno.EISDIR, fs.call("read", d, 10))
    f = await fs.open("d/a")
    await raises(errno.ENOTDIR, fs.call("getdents", f, 0))
    await raises(errno.ENOTDIR, fs.call("openat", fs.root, "d/a", RDONLY | DIRECTORY, 0))
    await raises(errno.ENOTDIR, fs.call("openat", fs.root, "d/a/", RDONLY, 0))
    await raises(errno.ENOTDIR, fs.call("openat", f, "x", RDONLY, 0))
    many = await fs.open("many", RDONLY | DIRECTORY) if (root / "many").mkdir() is None else None
    names = sorted(f"{i:04d}-" + "n" * 200 for i in range(600))
    for name in names:
        (root / "many" / name).touch()
    listed = await fs.listdir(many)
    assert sorted(listed) == names  # more than one page, in the host's order
    # a page from anywhere: from within the last page served, from before it, past it
    assert await fs.call("getdents", many, 590) == listed[590:]
    assert await fs.call("getdents", many, 595) == listed[595:]
    assert (await fs.call("getdents", many, 10))[:3] == listed[10:13]
    assert await fs.call("readdir", many, 599) == [[listed[599], 8]]


async def test_o_path_handles_stat_but_do_not_read(fs, host):
    root, _ = host
    (root / "f").write_text("x")
    os.symlink("f", root / "link")
    p = await fs.open("f", PATH)
    assert stat.S_ISREG((await fs.call("fstat", p)).st_mode)
    await raises(errno.EBADF, fs.call("read", p, 1))
    lp = await fs.open("link", PATH | NOFOLLOW)
    assert stat.S_ISLNK((await fs.call("fstat", lp)).st_mode)
    d = await fs.open(".", PATH | DIRECTORY)
    await raises(errno.EBADF, fs.call("getdents", d, 0))
    await raises(errno.EINVAL, fs.call("openat", fs.root, "f", PATH | RDWR, 0))


async def test_nofollow_and_symlink_errors(fs, host):
    root, _ = host
    (root / "f").write_text("x")
    os.symlink("f", root / "link")
    os.symlink("loop", root / "loop")
    os.symlink("nowhere", root / "dangling")
    await raises(errno.ELOOP, fs.call("openat", fs.root, "link", RDONLY | NOFOLLOW, 0))
    await raises(errno.ELOOP, fs.call("openat", fs.root, "loop", RDONLY, 0))
    await raises(errno.ENOENT, fs.call("openat", fs.root, "dangling", RDONLY, 0))
    await raises(errno.EEXIST, fs.call("openat", fs.root, "dangling", WRONLY | CREAT | EXCL, 0o644))
    await fs.open("dangling", WRONLY | CREAT, 0o644)  # follows, as Linux
    assert (root / "nowhere").is_file()
    await raises(errno.ENOENT, fs.call("openat", fs.root, "", RDONLY, 0))


@pytest.mark.parametrize("flag", [
    os.O_DIRECT, os.O_ASYNC, os.O_TMPFILE, 0x4000_0000, os.O_ACCMODE, BENEATH | IN_ROOT,
])
async def test_flags_the_scheme_does_not_serve_are_einval(fs, host, flag):
    root, _ = host
    (root / "f").write_text("x")
    await raises(errno.EINVAL, fs.call("openat", fs.root, "f", flag, 0))


@pytest.mark.parametrize("flag", [
    os.O_CLOEXEC, os.O_NONBLOCK, os.O_NOCTTY, os.O_SYNC, os.O_DSYNC, os.O_NOATIME, _O_LARGEFILE,
])
async def test_harmless_linux_flags_are_accepted(fs, host, flag):
    root, _ = host
    (root / "f").write_text("x")
    f = await fs.open("f", RDWR | flag)
    assert await fs.call("read", f, 10) == b"x"


async def test_fdflags_show_the_open_flags_as_f_getfl_does(fs, host):
    f = await fs.open("f", RDWR | CREAT | EXCL | APPEND | os.O_CLOEXEC, 0o644)
    assert f.opened_fdflags == RDWR | APPEND
    d = await fs.open(".", RDONLY | DIRECTORY)
    assert d.opened_fdflags == DIRECTORY and not d.opened_fdflags & (BENEATH | IN_ROOT)


async def test_a_fifo_does_not_block_the_daemon(fs, host):
    root, _ = host
    os.mkfifo(root / "fifo")
    await raises(errno.ENXIO, fs.call("openat", fs.root, "fifo", WRONLY, 0))  # no reader: not a hang
    r = await fs.open("fifo", RDONLY)
    w = await fs.open("fifo", WRONLY)
    await raises(errno.EAGAIN, fs.call("read", r, 10))
    await fs.call("write", w, b"hi")
    assert await fs.call("read", r, 10) == b"hi"


# -- fpath and dup -----------------------------------------------------------------------


async def test_fpath_follows_renames_and_refuses_removed_files(fs, host):
    root, _ = host
    (root / "a/b").mkdir(parents=True)
    (root / "a/b/f").write_text("x")
    assert await fs.call("fpath", fs.root) == "/scheme/file"
    f = await fs.open("a/b/f")
    b = await fs.open("a/b", RDONLY | DIRECTORY)
    assert await fs.call("fpath", f) == "/scheme/file/a/b/f"
    await fs.call("renameat", fs.root, "a", "z")
    assert await fs.call("fpath", f) == "/scheme/file/z/b/f"
    assert await fs.call("fpath", b) == "/scheme/file/z/b"
    await fs.call("unlinkat", fs.root, "z/b/f", 0)
    await raises(errno.ENOENT, fs.call("fpath", f))
    named = Client(FileScheme(str(root), name="home"))
    try:
        assert await named.call("fpath", await named.open("z")) == "/scheme/home/z"
    finally:
        await named.close_all()
        os.close(named.scheme.root_fd)


async def test_dup_gives_a_new_offset_on_the_same_file(fs, host):
    root, _ = host
    (root / "f").write_bytes(b"0123456789")
    f = await fs.open("f", RDWR | NOFOLLOW)
    assert await fs.call("read", f, 4) == b"0123"
    g = await fs.dup(f)
    assert await fs.call("read", g, 2) == b"01"  # its own offset
    assert await fs.call("read", f, 2) == b"45"
    await fs.call("renameat", fs.root, "f", "moved")
    h = await fs.dup(f)  # the same inode after a rename
    assert os.fstat(h.fd).st_ino == os.stat(root / "moved").st_ino
    assert h.opened_fdflags == f.opened_fdflags
    await fs.call("write", h, b"AB")
    assert (root / "moved").read_bytes() == b"AB23456789"
    d = await fs.dup(fs.root)
    assert await fs.listdir(d) == ["moved"]
    os.symlink("moved", root / "link")
    lp = await fs.open("link", PATH | NOFOLLOW)
    assert stat.S_ISLNK((await fs.call("fstat", await fs.dup(lp))).st_mode)
    await raises(errno.EINVAL, fs.call("dup", f, b"x"))


async def test_closing_handles_closes_their_fds(host):
    root, _ = host
    (root / "d/e").mkdir(parents=True)
    client = Client(FileScheme(str(root)))
    before = len(os.listdir("/proc/self/fd"))
    d = await client.open("d", RDONLY | DIRECTORY | BENEATH)
    e = await client.open("e", RDONLY | DIRECTORY, at=d)
    await client.dup(e)
    await client.open("x", WRONLY | CREAT | IN_ROOT, 0o644, at=e)
    await client.close_all()
    assert len(os.listdir("/proc/self/fd")) == before
    os.close(client.scheme.root_fd)


# -- names -------------------------------------------------------------------------------


async def test_mkdir_unlink_rmdir_and_their_errors(fs, host):
    root, _ = host
    await fs.call("mkdirat", fs.root, "d", 0o777)
    await fs.call("mkdirat", fs.root, "d/e/", 0o777)
    (root / "f").write_text("x")
    await raises(errno.EEXIST, fs.call("mkdirat", fs.root, "d", 0o777))
    await raises(errno.EEXIST, fs.call("mkdirat", fs.root, "d/..", 0o777))
    await raises(errno.ENOENT, fs.call("mkdirat", fs.root, "nope/x", 0o777))
    await raises(errno.ENOTDIR, fs.call("mkdirat", fs.root, "f/x", 0o777))
    await raises(errno.ENOTEMPTY, fs.call("unlinkat", fs.root, "d", P.AT_REMOVEDIR))
    await raises(errno.EISDIR, fs.call("unlinkat", fs.root, "d", 0))
    await raises(errno.ENOTDIR, fs.call("unlinkat", fs.root, "f", P.AT_REMOVEDIR))
    await raises(errno.ENOTDIR, fs.call("unlinkat", fs.root, "f/", 0))
    await raises(errno.EINVAL, fs.call("unlinkat", fs.root, "d/e/.", P.AT_REMOVEDIR))
    await raises(errno.ENOTEMPTY, fs.call("unlinkat", fs.root, "d/e/..", P.AT_REMOVEDIR))
    await raises(errno.EBUSY, fs.call("unlinkat", fs.root, "/", P.AT_REMOVEDIR))
    await raises(errno.ENOENT, fs.call("unlinkat", fs.root, "nope", 0))
    await raises(errno.ENOENT, fs.call("unlinkat", fs.root, "", 0))
    await raises(errno.EINVAL, fs.call("unlinkat", fs.root, "f", 0x100))
    await fs.call("unlinkat", fs.root, "d/e/", P.AT_REMOVEDIR)
    await fs.call("unlinkat", fs.root, "d", P.AT_REMOVEDIR)
    await fs.call("unlinkat", fs.root, "f", 0)
    assert list(root.iterdir()) == []


async def test_rename_within_a_handle_and_to_a_passed_directory(fs, host):
    root, _ = host
    (root / "a").mkdir()
    (root / "b").mkdir()
    (root / "a/f").write_text("x")
    a = await fs.open("a", RDONLY | DIRECTORY)
    b = await fs.open("b", RDONLY | DIRECTORY)
    await fs.call("renameat", a, "f", "g")
    await fs.call("renameat", a, "g", "h", passed=[fs.ref(b)])
    assert (root / "b/h").read_text() == "x"
    f = await fs.open("b/h")
    await raises(errno.ENOTDIR, fs.call("renameat", b, "h", "i", passed=[fs.ref(f)]))
    await raises(errno.EXDEV, fs.call("renameat", b, "h", "i", passed=[os.open("/", os.O_PATH)]))
    await raises(errno.EBADF, fs.call("renameat", b, "h", "i", passed=[HandleRef(999, -1)]))
    await raises(errno.EINVAL, fs.call("renameat", fs.root, "a", "a/inside", passed=[]))
    await raises(errno.ENOENT, fs.call("renameat", fs.root, "nope", "x"))
    await raises(errno.ENOTDIR, fs.call("renameat", fs.root, "b/h/", "x"))
    await raises(errno.EBUSY, fs.call("renameat", fs.root, ".", "x"))
    await raises(errno.EISDIR, fs.call("renameat", fs.root, "b/h", "a"))


async def test_symlinks_are_stored_verbatim_and_read_back(fs, host):
    root, _ = host
    await fs.call("symlinkat", fs.root, "/etc/passwd", "abs")
    await fs.call("symlinkat", fs.root, "../../../../nowhere", "rel")
    assert os.readlink(root / "abs") == "/etc/passwd"
    assert await fs.call("readlinkat", fs.root, "abs") == "/etc/passwd"
    assert await fs.call("readlinkat", fs.root, "/rel") == "../../../../nowhere"
    (root / "f").write_text("x")
    await raises(errno.EINVAL, fs.call("readlinkat", fs.root, "f"))
    await raises(errno.ENOENT, fs.call("readlinkat", fs.root, "nope"))
    await raises(errno.ENOENT, fs.call("symlinkat", fs.root, "", "empty"))
    await raises(errno.EEXIST, fs.call("symlinkat", fs.root, "x", "f"))
    await raises(errno.ENOENT, fs.call("symlinkat", fs.root, "x", "new/"))  # as Linux
    await raises(errno.ELOOP, fs.call("openat", fs.root, "abs", RDONLY | NOFOLLOW, 0))


async def test_hard_links(fs, host):
    root, _ = host
    (root / "d").mkdir()
    (root / "f").write_text("x")
    os.symlink("f", root / "link")
    d = await fs.open("d", RDONLY | DIRECTORY)
    await fs.call("linkat", fs.root, "f", "g")
    await fs.call("linkat", fs.root, "f", "h", passed=[fs.ref(d)])
    assert os.stat(root / "g").st_ino == os.stat(root / "f").st_ino == os.stat(root / "d/h").st_ino
    await fs.call("linkat", fs.root, "link", "link2")  # the link itself, not followed
    assert os.readlink(root / "link2") == "f"
    await raises(errno.EPERM, fs.call("linkat", fs.root, "d", "d2"))
    await raises(errno.EEXIST, fs.call("linkat", fs.root, "d", "f"))
    await raises(errno.ENOTDIR, fs.call("linkat", fs.root, "f/", "x"))
    await raises(errno.EEXIST, fs.call("linkat", fs.root, "f", "g"))
    await raises(errno.ENOENT, fs.call("linkat", fs.root, "nope", "x"))


async def test_read_only_refuses_every_write(host):
    root, _ = host
    (root / "d").mkdir()
    (root / "f").write_text("x")
    client = Client(FileScheme(str(root), read_only=True))
    try:
        f = await client.open("f")
        assert await client.call("read", f, 10) == b"x"
        await client.open("f", PATH)
        for flags in (WRONLY, RDWR, RDONLY | CREAT, RDONLY | TRUNC):
            await raises(errno.EROFS, client.call("openat", client.root, "f", flags, 0o644))
        await raises(errno.EROFS, client.call("write", f, b"y"))
        await raises(errno.EROFS, client.call("ftruncate", f, 0))
        await raises(errno.EROFS, client.call("mkdirat", client.root, "e", 0o777))
        await raises(errno.EROFS, client.call("unlinkat", client.root, "f", 0))
        await raises(errno.EROFS, client.call("unlinkat", client.root, "d", P.AT_REMOVEDIR))
        await raises(errno.EROFS, client.call("renameat", client.root, "f", "g"))
        await raises(errno.EROFS, client.call("symlinkat", client.root, "f", "s"))
        await raises(errno.EROFS, client.call("linkat", client.root, "f", "l"))
        assert sorted(p.name for p in root.iterdir()) == ["d", "f"]
        assert (root / "f").read_text() == "x"
    finally:
        await client.close_all()
        os.close(client.scheme.root_fd)


def test_a_daemon_whose_root_is_gone_says_so_in_one_line(tmp_path):
    # a run's private /tmp can be removed as its daemon starts (the run ending): the daemon
    # exits 1 with a line that names the root, not a traceback
    import socket
    import subprocess
    import sys

    ours, theirs = socket.socketpair(socket.AF_UNIX, socket.SOCK_SEQPACKET)
    with ours, theirs:
        gone = tmp_path / "gone"
        proc = subprocess.run([sys.executable, "-m", "redoxcap.schemes.file", "--channel-fd",
                               str(theirs.fileno()), "--root", str(gone), "--name", "tmp"],
                              pass_fds=[theirs.fileno()], capture_output=True, text=True, check=False,
                              timeout=60)
    assert proc.returncode == 1
    assert "Traceback" not in proc.stderr
    assert f"cannot serve {gone}: No such file or directory" in proc.stderr


def test_a_run_daemon_is_not_started_for_a_scheme_the_router_let_go(tmp_path):
    # DaemonAside starts a run's /tmp daemon on the first request; a channel hung up (the
    # system going down) is no request: no daemon is started that the run would not stop
    import socket

    from redoxcap import hostdirs

    router_end, channel = socket.socketpair(socket.AF_UNIX, socket.SOCK_SEQPACKET)
    router_end.close()
    aside = hostdirs.DaemonAside(channel.detach(), hostdirs.HostDir(str(tmp_path), "/tmp"), "tmp")
    aside._thread.join(timeout=30)
    assert not aside._thread.is_alive()
    assert aside.process is None
    aside.close()
