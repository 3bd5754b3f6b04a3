"""Passthrough: the file scheme answers an open of a regular file with a host fd, and rt
serves both kinds of fd; STATAT answers a path's status in one request."""

from __future__ import annotations

import errno
import fcntl
import os
import stat

import pytest

import rt
from redoxcap.testing import booted, installed
from redoxcap.wire.protocol import O_PASSTHROUGH


@pytest.fixture(scope="module")
def ro_client(tmp_path_factory):
    """A system with a read-only mount `ro` and the same directory as `routed` (:nopassthrough)
    next to the file root, installed in this process's rt."""
    base = tmp_path_factory.mktemp("passthrough")
    ro = base / "ro"
    ro.mkdir()
    (ro / "kept.txt").write_text("read only")
    with booted(base, "--mount", f"ro={ro}:ro", "--mount", f"routed={ro}:nopassthrough") as system, \
            installed(system):
        yield system


def test_a_passthrough_open_of_a_regular_file_is_a_host_fd_with_the_access_asked_for(ro_client):
    (ro_client.root / "f.txt").write_text("hello")
    fd = rt.open("/f.txt", os.O_RDWR | os.O_APPEND | O_PASSTHROUGH)
    try:
        assert stat.S_ISREG(os.fstat(fd).st_mode)  # a host fd: os.fstat works on it
        flags = fcntl.fcntl(fd, fcntl.F_GETFL)
        assert flags & os.O_ACCMODE == os.O_RDWR and flags & os.O_APPEND
        assert not flags & os.O_NONBLOCK  # the daemon's own O_NONBLOCK is not handed on
        assert rt.read(fd, 100) == b"hello"
        assert rt.write(fd, b" world") == 6
        assert rt.lseek(fd, 0) == 0 and rt.read(fd, 100) == b"hello world"
        assert rt.fstat(fd).st_size == 11
        assert rt.getfl(fd) == flags
    finally:
        rt.close(fd)


def test_rt_open_file_gives_python_s_own_file_object_for_a_host_fd(ro_client):
    (ro_client.root / "g.txt").write_text("line 1\nline 2\n")
    with rt.open_file("/g.txt", passthrough=True) as f:
        assert type(f).__module__ == "_io" and f.readlines() == ["line 1\n", "line 2\n"]
    with rt.open_file("/g.txt", "a", passthrough=True) as f:
        f.write("line 3\n")
    with rt.open_file("/g.txt") as f:  # routed, as before
        assert f.read().endswith("line 3\n")


def test_a_read_only_mount_never_hands_out_a_writable_fd(ro_client):
    for flags in (os.O_WRONLY, os.O_RDWR, os.O_RDONLY | os.O_TRUNC, os.O_WRONLY | os.O_APPEND):
        with pytest.raises(OSError) as info:
            rt.open("/scheme/ro/kept.txt", flags | O_PASSTHROUGH)
        assert info.value.errno == errno.EROFS
    fd = rt.open("/scheme/ro/kept.txt", os.O_RDONLY | O_PASSTHROUGH)
    try:
        assert fcntl.fcntl(fd, fcntl.F_GETFL) & os.O_ACCMODE == os.O_RDONLY
        with pytest.raises(OSError) as info:
            os.write(fd, b"x")
        assert info.value.errno == errno.EBADF
    finally:
        rt.close(fd)


def test_a_mount_without_passthrough_answers_every_open_with_a_capability(ro_client):
    fd = rt.open("/scheme/routed/kept.txt", os.O_RDONLY | O_PASSTHROUGH)
    try:
        assert stat.S_ISSOCK(os.fstat(fd).st_mode)  # a capability, not the host file
        assert rt.read(fd, 100) == b"read only"
    finally:
        rt.close(fd)


def test_devices_pass_through_where_the_host_device_means_the_same(ro_client):
    for path, flags, native in (("/scheme/zero", os.O_RDWR, True), ("/scheme/null", os.O_RDWR, True),
                                ("/scheme/rand", os.O_RDONLY, True),
                                ("/scheme/rand", os.O_WRONLY, False),  # /dev/urandom seeds on write
                                ("/scheme/zero", os.O_RDONLY, False),  # not asked for
                                ("/scheme/zero", os.O_PATH, False)):  # a path-only open
        fd = rt.open(path, flags | (O_PASSTHROUGH if native or flags != os.O_RDONLY else 0))
        try:
            mode = os.fstat(fd).st_mode
            assert (stat.S_ISCHR(mode), stat.S_ISSOCK(mode)) == (native, not native), (path, flags)
            assert rt.getfl(fd) & (os.O_ACCMODE | os.O_PATH) == flags
            if path == "/scheme/zero":
                assert rt.read(fd, 5) == bytes(5)
            elif path == "/scheme/null":
                assert rt.read(fd, 5) == b"" and rt.write(fd, b"gone") == 4
            elif flags == os.O_RDONLY:
                assert len(rt.read(fd, 16)) == 16
        finally:
            rt.close(fd)


def test_directories_and_o_path_opens_stay_capabilities(ro_client):
    (ro_client.root / "dir").mkdir(exist_ok=True)
    (ro_client.root / "h.txt").write_text("h")
    for path, flags in (("/dir", os.O_RDONLY), ("/dir", os.O_DIRECTORY), ("/h.txt", os.O_PATH)):
        fd = rt.open(path, flags | O_PASSTHROUGH)
        try:
            assert stat.S_ISSOCK(os.fstat(fd).st_mode), (path, flags)
            assert rt.fpath(fd).startswith("/scheme/file/")
        finally:
            rt.close(fd)


def test_stat_is_one_request_and_answers_as_open_and_fstat(ro_client):
    (ro_client.root / "s.txt").write_text("12345")
    os.symlink("s.txt", ro_client.root / "s_link")
    try:
        assert rt.stat("/s.txt").st_size == 5
        assert rt.stat("/s_link").st_size == 5
        assert stat.S_ISDIR(rt.stat("/").st_mode)
        assert rt.stat("/scheme/ro/kept.txt").st_size == 9
        with pytest.raises(FileNotFoundError):
            rt.stat("/nowhere")
        from redoxcap.wire import protocol as P
        from redoxcap.wire.call import call_value

        link = call_value(rt.getns(), P.STATAT, ["/scheme/file/s_link", os.O_NOFOLLOW], kind=dict)
        assert stat.S_ISLNK(link["st_mode"])
        with pytest.raises(OSError) as info:
            call_value(rt.getns(), P.STATAT, ["/scheme/file/s.txt", os.O_WRONLY], kind=dict)
        assert info.value.errno == errno.EINVAL
        assert stat.S_ISCHR(rt.stat("/scheme/null").st_mode) or rt.stat("/scheme/null")  # ENOSYS -> fallback
    finally:
        os.unlink(ro_client.root / "s_link")


def test_readdir_gives_each_entry_with_its_type(ro_client):
    from redoxcap.wire import protocol as P
    from redoxcap.wire.call import call_value

    d = ro_client.root / "typed"
    (d / "sub").mkdir(parents=True)
    (d / "file").write_text("f")
    os.symlink("file", d / "link")
    os.mkfifo(d / "fifo")
    fd = rt.open("/typed", os.O_DIRECTORY)
    try:
        entries = call_value(fd, P.READDIR, [0], kind=list)
        assert sorted(entries) == [["fifo", 0], ["file", 8], ["link", 10], ["sub", 4]]
        assert call_value(fd, P.READDIR, [3], kind=list) == entries[3:]  # the same order again
        assert call_value(fd, P.READDIR, [4], kind=list) == []
        assert sorted(name for name, _ in entries) == rt.listdir("/typed")
    finally:
        rt.close(fd)
