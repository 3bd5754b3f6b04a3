"""Files through rt on a running system: create, read, write, list, rename and delete,
relative paths and the cwd fd, scheme and legacy paths, errnos, handles (clone, dup,
seek, truncate), listings in pages and rt from several threads.

Every test has a directory of its own on the module's one system, registered as
`file` in a namespace of its own (`redoxcap_isolated_client`), so `/` is that directory;
the one that checks fpath uses the root namespace and a directory of its own.
"""

from __future__ import annotations

import errno
import os
import threading

import pytest

import rt
from redoxcap.wire import protocol as P


def test_create_write_read_list_rename_delete_by_absolute_path(redoxcap_isolated_client):
    fd = rt.open("/notes.txt", rt.O_CREAT | rt.O_WRONLY | rt.O_EXCL, 0o644)
    assert rt.write(fd, b"hello capabilities\n") == 19
    rt.close(fd)
    assert (redoxcap_isolated_client.root / "notes.txt").read_bytes() == b"hello capabilities\n"

    fd = rt.open("/notes.txt")
    assert rt.read(fd, 100) == b"hello capabilities\n"
    assert rt.read(fd, 100) == b""
    assert rt.fstat(fd).st_size == 19
    rt.close(fd)

    rt.mkdir("/docs")
    rt.rename("/notes.txt", "/docs/notes.txt")
    assert rt.listdir("/") == ["docs"]
    assert rt.listdir("/docs") == ["notes.txt"]
    rt.unlink("/docs/notes.txt")
    rt.rmdir("/docs")
    assert rt.listdir("/") == []
    assert list(redoxcap_isolated_client.root.iterdir()) == []


def test_relative_paths_go_to_the_cwd_and_getcwd_follows_chdir(redoxcap_isolated_client):
    rt.mkdir("/home")
    rt.mkdir("/home/u")
    rt.chdir("/home")
    assert rt.getcwd() == "/home"
    rt.chdir("u")
    assert rt.getcwd() == "/home/u"
    with rt.open_file("draft.txt", "w") as f:
        f.write("relative\n")
    assert (redoxcap_isolated_client.root / "home/u/draft.txt").read_text() == "relative\n"
    rt.rename("draft.txt", "final.txt")
    assert rt.listdir() == ["final.txt"]
    rt.chdir("..")
    assert rt.getcwd() == "/home"
    assert rt.listdir("u") == ["final.txt"]
    rt.rename("u/final.txt", "/final.txt")  # relative source, absolute destination
    assert (redoxcap_isolated_client.root / "final.txt").exists()
    rt.unlink("/final.txt")


def test_scheme_paths_and_legacy_paths_name_the_same_files(redoxcap_module_client):
    # the root namespace (fpath names a file from the scheme's root), in a directory of its own
    (redoxcap_module_client.root / "legacy").mkdir()
    (redoxcap_module_client.root / "legacy/a.txt").write_text("A")
    for path in ("/legacy/a.txt", "/scheme/file/legacy/a.txt", "file:legacy/a.txt", "file:/legacy/a.txt"):
        with rt.open_file(path) as f:
            assert f.read() == "A", path
    fd = rt.open("/legacy/a.txt")
    assert rt.fpath(fd) == "/scheme/file/legacy/a.txt"
    rt.close(fd)
    assert "file" in rt.listdir("/scheme")


def test_errors_are_oserrors_with_the_right_errno(redoxcap_isolated_client):
    (redoxcap_isolated_client.root / "f").write_text("x")
    cases = [
        (lambda: rt.open("/missing"), errno.ENOENT),
        (lambda: rt.open("/f", rt.O_CREAT | rt.O_EXCL | rt.O_WRONLY), errno.EEXIST),
        (lambda: rt.open("/f", rt.O_DIRECTORY), errno.ENOTDIR),
        (lambda: rt.open("/", rt.O_WRONLY), errno.EISDIR),
        (lambda: rt.rmdir("/f"), errno.ENOTDIR),
        (lambda: rt.open("/scheme/nosuch/x"), errno.ENODEV),
        (lambda: rt.open(""), errno.ENOENT),
        (lambda: rt.read(12345, 1), errno.EBADF),
    ]
    for fn, want in cases:
        with pytest.raises(OSError) as info:
            fn()
        assert info.value.errno == want, (fn, info.value)
    with pytest.raises(FileNotFoundError):
        rt.stat("/missing")


def test_fchdir_takes_a_directory_fd_and_rejects_a_file(redoxcap_isolated_client):
    rt.mkdir("/d")
    (redoxcap_isolated_client.root / "f").write_text("x")
    d = rt.open("/d", rt.O_DIRECTORY)
    f = rt.open("/f")
    with pytest.raises(NotADirectoryError):
        rt.fchdir(f)
    rt.fchdir(d)
    rt.close(d)  # rt keeps its own clone
    assert rt.getcwd() == "/d"
    rt.close(rt.open("here", rt.O_CREAT | rt.O_WRONLY))
    assert (redoxcap_isolated_client.root / "d/here").exists()
    rt.close(f)


def test_lseek_ftruncate_fsync_and_large_io(redoxcap_isolated_client):
    data = os.urandom(3 * P.MAX_IO + 17)  # more than one frame each way
    fd = rt.open("/big", rt.O_CREAT | rt.O_RDWR)
    assert rt.write(fd, data) == len(data)
    rt.fsync(fd)
    assert rt.lseek(fd, 0, rt.SEEK_SET) == 0
    assert rt.read(fd, len(data) + 10) == data
    rt.ftruncate(fd, 10)
    assert rt.fstat(fd).st_size == 10
    assert rt.lseek(fd, 0, rt.SEEK_END) == 10
    rt.close(fd)


def test_clone_shares_the_offset_and_dup_has_its_own(redoxcap_isolated_client):
    (redoxcap_isolated_client.root / "f").write_bytes(b"0123456789")
    fd = rt.open("/f")
    clone = rt.clone(fd)
    dup = rt.dup(fd)
    assert rt.read(fd, 3) == b"012"
    assert rt.read(clone, 3) == b"345"  # same handle, same offset
    assert rt.read(dup, 3) == b"012"  # a new handle with its own offset
    for x in (fd, clone, dup):
        rt.close(x)


def test_a_capability_made_non_blocking_still_works_through_rt(redoxcap_isolated_client):
    (redoxcap_isolated_client.root / "f").write_text("data")
    fd = rt.open("/f")
    os.set_blocking(fd, False)  # e.g. by another holder of the same socket
    assert rt.read(fd, 10) == b"data"
    rt.close(fd)


def test_created_files_and_directories_never_get_setuid_bits(redoxcap_isolated_client):
    fd = rt.open("/suid", rt.O_CREAT | rt.O_WRONLY, 0o6777)
    rt.close(fd)
    rt.mkdir("/sgid", 0o7777)
    assert (redoxcap_isolated_client.root / "suid").stat().st_mode & 0o7777 == 0o755
    assert (redoxcap_isolated_client.root / "sgid").stat().st_mode & 0o7777 == 0o755


def test_a_listing_larger_than_one_frame_comes_in_pages(redoxcap_isolated_client):
    big = redoxcap_isolated_client.root / "big"
    big.mkdir()
    names = [f"{i:04d}-" + "x" * 120 for i in range(1500)]  # about 190 KiB of names
    for name in names:
        (big / name).touch()
    assert rt.listdir("/big") == names


def test_host_names_that_are_not_utf8_are_left_out_of_listings(redoxcap_isolated_client):
    (redoxcap_isolated_client.root / "ok.txt").touch()
    open(os.path.join(os.fsencode(redoxcap_isolated_client.root), b"bad-\xff.txt"), "wb").close()
    assert rt.listdir("/") == ["ok.txt"]
    os.symlink(b"target-\xff", os.path.join(os.fsencode(redoxcap_isolated_client.root), b"link"))
    with pytest.raises(OSError) as info:
        rt.readlink("/link")  # the target cannot travel as a string
    assert info.value.errno == errno.EIO


def test_symlink_and_readlink(redoxcap_isolated_client):
    (redoxcap_isolated_client.root / "target").write_text("T")
    rt.symlink("target", "/link")
    assert rt.readlink("/link") == "target"
    with rt.open_file("/link") as f:
        assert f.read() == "T"


def test_open_file_modes(redoxcap_isolated_client):
    with rt.open_file("/t.txt", "w", encoding="utf-8") as f:
        f.write("line one\nline two\n")
    with rt.open_file("/t.txt", "a") as f:
        f.write("line three\n")
    with rt.open_file("/t.txt") as f:
        assert f.readlines() == ["line one\n", "line two\n", "line three\n"]
    with rt.open_file("/t.txt", "rb") as f:
        f.seek(5)
        assert f.read(3) == b"one"
    with rt.open_file("/t.txt", "r+b") as f:
        f.write(b"LINE")
    assert (redoxcap_isolated_client.root / "t.txt").read_bytes().startswith(b"LINE one")
    with pytest.raises(FileExistsError):
        rt.open_file("/t.txt", "x")


def test_rt_is_safe_from_several_threads(redoxcap_isolated_client):
    fd = rt.open("/shared", rt.O_CREAT | rt.O_RDWR)
    errors = []

    def worker(n: int) -> None:
        try:
            for i in range(50):
                rt.write(fd, b"%d-%d\n" % (n, i))
                rt.fstat(fd)
        except Exception as exc:  # noqa: BLE001 - reported below
            errors.append(exc)

    threads = [threading.Thread(target=worker, args=(n,)) for n in range(4)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    assert errors == []
    lines = (redoxcap_isolated_client.root / "shared").read_bytes().splitlines()
    assert sorted(lines) == sorted(b"%d-%d" % (n, i) for n in range(4) for i in range(50))
    rt.close(fd)


def test_a_write_sent_just_before_a_close_lands(redoxcap_isolated_client):
    """A client may send a write and close its fd without waiting for the reply. The router
    reads the write before it sees the EOF, and the scheme, which gets the write and then
    the CLOSE (often in one batch), serves the write first: it closes a handle in its loop
    only after the batch's requests. (Requests the router had not read when the client
    went are dropped, and one in flight in a task of its own is cancelled, as
    docs/protocol.md says: no one is left to answer.)"""
    import socket

    from redoxcap.wire import frames as F

    for attempt in range(20):
        name = f"/sent{attempt}"
        fd = rt.open(name, rt.O_CREAT | rt.O_WRONLY | rt.O_EXCL, 0o644)
        data = bytes([0x41 + attempt]) * (1000 + attempt)
        with socket.socket(fileno=os.dup(fd)) as sock:
            sock.send(F.encode_request(P.WRITE, 1, [data]))
        rt.close(fd)  # the last holder: the router reads the write, then sends CLOSE
        path = redoxcap_isolated_client.root / name.lstrip("/")
        for _ in range(500):
            if path.stat().st_size == len(data):
                break
            threading.Event().wait(0.01)
        assert path.read_bytes() == data
