"""The broker's parts without a system: the host trees, the filter program, the structs,
and the listener on a real filter in a forked child."""

from __future__ import annotations

import errno
import os
import re
import resource
import socket
import struct

import pytest

from redoxcap.broker import filter as bpf
from redoxcap.broker import structs
from redoxcap.broker.hostfs import DEFAULT_TREES, HostTrees
from redoxcap.broker.launcher import own_pages
from redoxcap.broker.memory import Memory
from redoxcap.broker.notify import Listener
from redoxcap.broker.server import available
from redoxcap.wire import linux
from redoxcap.wire import protocol as P


@pytest.fixture
def trees(tmp_path):
    """Host trees: allowed/ (with links in, out, absolute and up), and a secret beside it."""
    allowed = tmp_path / "allowed"
    (allowed / "sub").mkdir(parents=True)
    (allowed / "sub" / "f").write_text("f")
    (tmp_path / "secret").write_text("secret")
    os.symlink("sub/f", allowed / "rel")
    os.symlink(str(allowed / "sub"), allowed / "abs_in")
    os.symlink(str(tmp_path / "secret"), allowed / "abs_out")
    os.symlink("../secret", allowed / "up_out")
    h = HostTrees([str(allowed), "/usr", "/lib", "/etc/localtime"])
    yield h, allowed, tmp_path
    h.close()


def test_the_host_trees_follow_links_that_stay_in_and_refuse_the_rest(trees):
    h, allowed, _ = trees
    assert h.resolve(f"{allowed}/rel") == f"{allowed}/sub/f"
    assert h.resolve(f"{allowed}/abs_in/f") == f"{allowed}/sub/f"
    assert h.resolve(f"{allowed}/sub/../sub/f") == f"{allowed}/sub/f"
    for path in (f"{allowed}/abs_out", f"{allowed}/up_out", f"{allowed}/../secret",
                 f"{allowed}/sub/../../secret"):
        with pytest.raises(OSError) as info:
            h.resolve(path)
        assert info.value.errno == errno.EACCES, path
    assert h.resolve(f"{allowed}/rel", follow=False) == f"{allowed}/rel"
    with pytest.raises(FileNotFoundError):
        h.resolve(f"{allowed}/missing")
    with pytest.raises(NotADirectoryError):
        h.resolve(f"{allowed}/sub/f/")


def test_a_walk_that_looks_ahead_finds_what_one_step_at_a_time_finds(trees):
    """resolve looks up the plain directories before a `..` or the last name in one openat2:
    every path gives what the walk one step at a time gives, result or errno."""
    h, allowed, tmp = trees
    (allowed / "sub" / "deeper" / "deepest").mkdir(parents=True)
    (allowed / "sub" / "deeper" / "g").write_text("g")
    os.symlink("deeper", allowed / "sub" / "to_deeper")
    os.symlink("loop", allowed / "loop")
    os.symlink("/usr/lib", allowed / "to_usr_lib")
    (tmp / "home" / "me" / "src").mkdir(parents=True)
    deep = allowed.joinpath(*["d"] * 70)  # deeper than one look-ahead takes at once
    deep.mkdir(parents=True)
    (deep / "h").write_text("h")
    handed = HostTrees([str(allowed), "/usr", "/lib"], [str(tmp / "home" / "me" / "src")])
    a, t = str(allowed), str(tmp)
    paths = [f"{a}/sub/deeper/g", f"{a}/sub/deeper/deepest/../g", f"{a}/sub/to_deeper/g",
             f"{a}/sub/to_deeper/deepest/../../f", f"{a}/sub/f/x", f"{a}/sub/f/../f",
             f"{a}/sub/missing/../f", f"{a}/sub/deeper/../../../secret", f"{a}/loop/x",
             f"{a}/abs_in/deeper/g", f"{a}/abs_out/x", f"{a}/up_out/x", f"{a}/to_usr_lib/..",
             f"{a}/sub/deeper/deepest/", f"{a}/sub/deeper/g/", f"{a}/rel", f"{a}/sub/./deeper/.",
             "/usr/lib/../lib/../bin/sh", "/usr/lib/gcc/../../bin/../lib/..", "/lib/../usr/bin",
             f"{t}/home/me/src/../other", f"{t}/home/me/../me/src", f"{t}/home/x/y",
             f"{a}/../home/me/../../allowed/rel",  # through directories outside: EACCES
             f"{deep}/h", f"{deep}/../h", f"{deep}/../../{'d/' * 5}missing/h", f"{deep}/h/"]
    try:
        for tree in (h, handed):
            for path in paths:
                for follow in (True, False):
                    found = []
                    for tree.batched in (True, False):
                        try:
                            found.append(tree.resolve(path, follow))
                        except OSError as exc:
                            found.append(errno.errorcode[exc.errno])
                    assert found[0] == found[1], (path, follow, found)
    finally:
        h.batched = handed.batched = True
        handed.close()


def test_readlink_answers_as_the_walk_does(trees):
    """readlink reads a link on the fd one openat2 found it by, and answers that lookup's
    error, where no symlink is on the way: every path gives what the walk alone gives
    (resolve, then readlink of what it found), body or errno."""
    h, allowed, tmp = trees
    os.symlink("loop", allowed / "loop")
    a = str(allowed)
    paths = [f"{a}/rel", f"{a}/abs_in", f"{a}/abs_out", f"{a}/up_out", f"{a}/loop", f"{a}/sub",
             f"{a}/sub/f", f"{a}/sub/missing", f"{a}/missing/x", f"{a}/sub/f/x", f"{a}/rel/x",
             f"{a}/abs_in/f", f"{a}/sub/../rel", f"{a}/sub/./f", f"{a}/sub/", f"{a}/rel/",
             f"{a}", f"{tmp}", "/usr", "/usr/include", "/usr/lib/missing/x",
             "/lib", "/etc/localtime", "/", f"{tmp}/secret"]
    for path in paths:
        found = []
        for fast in (True, False):
            try:
                found.append(h.readlink(path) if fast else os.readlink(h.resolve(path, follow=False))
                             if not h.is_above(tuple(c for c in path.split("/") if c and c != "."))
                             else errno.errorcode[errno.EINVAL])
            except OSError as exc:
                found.append(errno.errorcode[exc.errno])
        assert found[0] == found[1], (path, found)


def test_merged_usr_and_absolute_system_links_resolve(trees):
    h, _, _ = trees
    for path in ("/lib/x86_64-linux-gnu/libc.so.6", "/etc/localtime"):
        if os.path.exists(path):
            real = h.resolve(path)
            assert real == os.path.realpath(path) and h.inside(real)


def test_the_host_trees_are_read_only_but_the_writable_devices(trees):
    h, allowed, _ = trees
    fd = h.open(f"{allowed}/rel", os.O_RDONLY)
    try:
        assert os.read(fd, 10) == b"f"
    finally:
        os.close(fd)
    for flags in (os.O_WRONLY, os.O_RDWR, os.O_RDONLY | os.O_TRUNC, os.O_WRONLY | os.O_CREAT):
        with pytest.raises(OSError) as info:
            h.open(f"{allowed}/sub/f", flags)
        assert info.value.errno == errno.EROFS
    with pytest.raises(OSError) as info:
        h.open(f"{allowed}/sub/new", os.O_WRONLY | os.O_CREAT)
    assert info.value.errno == errno.EROFS
    devices = HostTrees(DEFAULT_TREES)
    try:
        fd = devices.open("/dev/null", os.O_WRONLY | os.O_CREAT | os.O_TRUNC)
        os.close(fd)
        assert devices.claims("/usr/bin/ls") and not devices.claims("/etc/shadow")
        assert not devices.claims("/usrx") and not devices.claims("/")
    finally:
        devices.close()


def test_structs_have_the_kernels_sizes():
    st = os.stat("/")
    assert len(structs.pack_stat("x86_64", st)) == 144
    assert len(structs.pack_stat("aarch64", st)) == 128
    assert len(structs.pack_statx(st)) == 256
    data, count = structs.pack_dirents([("a", 4), ("bb", 8), ("c" * 300, 0)], 5, 64)
    assert count == 2 and len(data) == 48
    d_ino, d_off, reclen, d_type = struct.unpack_from("=QqHB", data)
    assert (d_off, reclen, d_type) == (6, 24, 4) and d_ino and data[19:21] == b"a\0"


@pytest.mark.skipif(available() is not None, reason=str(available()))
def test_a_trapped_call_is_answered_once_read_and_fails_closed_without_a_listener():
    """A forked child installs the filter and hands over its listener; the parent answers
    one openat with an errno read from its argument, then closes the listener: ENOSYS."""
    ours, theirs = socket.socketpair(socket.AF_UNIX, socket.SOCK_SEQPACKET)
    pid = os.fork()
    if pid == 0:
        code = 1
        try:
            ours.close()
            linux.libc().prctl(38, 1, 0, 0, 0)  # PR_SET_NO_NEW_PRIVS
            listener = bpf.install(linux.machine())
            theirs.sendmsg([b"L"], P.fds_ancillary([listener]))
            os.close(listener)
            results = []
            for path in ("/answer-me", "/after-the-broker"):
                try:
                    os.open(path, os.O_RDONLY)
                    results.append(0)
                except OSError as exc:
                    results.append(exc.errno)
                theirs.send(bytes(results[-1:]))
            code = 0 if results == [errno.EXDEV, errno.ENOSYS] else 2
        finally:
            os._exit(code)
    theirs.close()
    try:
        _, anc, _, _ = ours.recvmsg(1, P.CMSG_FDS)
        listener = Listener(P.parse_ancillary(anc)[0][0])
        # the kernel wakes the target on the broker's CPU (Linux 6.6+): across CPUs, each
        # call cost three times as much here, and the flag was refused while it was passed
        # by pointer
        release = re.match(r"(\d+)\.(\d+)", os.uname().release)
        assert listener.sync_wakeups() == (release is not None and
                                           (int(release[1]), int(release[2])) >= (6, 6))
        notif = listener.receive()
        assert notif is not None and notif.nr == linux.SYSCALLS[linux.machine()]["openat"]
        with Memory(notif.tid) as mem:
            assert listener.valid(notif.id)
            assert mem.string(notif.args[1]) == b"/answer-me"
        listener.fail(notif.id, errno.EXDEV)
        assert ours.recv(1) == bytes([errno.EXDEV])
        listener.close()
        assert ours.recv(1) == bytes([errno.ENOSYS])
    finally:
        ours.close()
        _, status = os.waitpid(pid, 0)
    assert os.WEXITSTATUS(status) == 0


def test_every_brokered_syscall_has_exactly_one_handler_and_no_handler_is_left_over():
    from redoxcap.broker import calls
    from redoxcap.broker.calls.base import Family, syscall
    from redoxcap.sandbox.syscalls import brokered_names

    brokered = brokered_names()
    calls.check_families(calls.FAMILIES, brokered)  # the real table agrees with the filter
    assert {"openat", "newfstatat", "getdents64", "execve", "connect"} <= brokered

    without_status = [f for f in calls.FAMILIES if f is not calls.Status]
    with pytest.raises(calls.HandlerTableError, match="brokered but not handled: .*newfstatat"):
        calls.check_families(without_status, brokered)

    class Extra(Family):
        @syscall()
        def ptrace(self, call):  # never handed to the broker: a handler for it is a mistake
            return 0

    with pytest.raises(calls.HandlerTableError, match="handled but never brokered: ptrace"):
        calls.check_families([*calls.FAMILIES, Extra], brokered)

    class Again(Family):
        @syscall()
        def openat(self, call):
            return 0

    with pytest.raises(calls.HandlerTableError, match="handled twice: openat"):
        calls.check_families([*calls.FAMILIES, Again], brokered)
    # the broker is never built on a table that disagrees with the filter
    with pytest.raises(calls.HandlerTableError):
        calls.Syscalls("x86_64", -1, None, None, True, families=without_status)


def test_a_target_string_is_read_to_its_nul_across_pages_and_no_further_than_is_mapped():
    # Memory.string reads a path argument once: within its first page, across pages, up to
    # an unmapped page (EFAULT) or past its limit (ENAMETOOLONG), as Linux reads a path
    import ctypes
    import mmap

    libc = ctypes.CDLL(None, use_errno=True)
    libc.mmap.restype = ctypes.c_void_p
    libc.mmap.argtypes = [ctypes.c_void_p, ctypes.c_size_t, ctypes.c_int, ctypes.c_int,
                          ctypes.c_int, ctypes.c_long]
    libc.munmap.argtypes = [ctypes.c_void_p, ctypes.c_size_t]
    page = mmap.PAGESIZE
    base = libc.mmap(None, 3 * page, mmap.PROT_READ | mmap.PROT_WRITE,
                     mmap.MAP_PRIVATE | mmap.MAP_ANONYMOUS, -1, 0)
    assert base not in (None, ctypes.c_void_p(-1).value)
    try:
        assert libc.munmap(base + 2 * page, page) == 0  # the third page: not mapped
        ctypes.memmove(base + page - 3, b"abc/de\0", 7)  # across the first two pages
        ctypes.memmove(base + 10, b"xyz\0", 4)
        ctypes.memmove(base + 2 * page - 4, b"tail", 4)  # no NUL before the unmapped page
        with Memory(os.getpid()) as mem:
            assert mem.string(base + 10) == b"xyz"
            assert mem.string(base + page - 3) == b"abc/de"
            with pytest.raises(OSError) as too_long:
                mem.string(base + page - 3, limit=5)
            assert too_long.value.errno == errno.ENAMETOOLONG
            with pytest.raises(OSError) as unmapped:
                mem.string(base + 2 * page - 4)
            assert unmapped.value.errno == errno.EFAULT
            with pytest.raises(OSError) as null:
                mem.string(0)
            assert null.value.errno == errno.EFAULT
    finally:
        libc.munmap(base, 2 * page)


def test_a_fork_that_owns_its_pages_touches_its_objects_without_copy_on_write_faults():
    """A spare and its Starter's child own their pages while they wait (own_pages): touching
    the objects they share with their parent then takes no fault."""
    shared = [{"n": i, "items": [str(i)]} for i in range(20000)]

    def faults_touching(owned: bool) -> int:
        r, w = os.pipe()
        pid = os.fork()
        if pid == 0:  # pragma: no cover - the child
            try:
                if owned:
                    own_pages()
                before = resource.getrusage(resource.RUSAGE_SELF).ru_minflt
                touched = [d["items"] for d in shared]  # a refcount written on each
                faults = resource.getrusage(resource.RUSAGE_SELF).ru_minflt - before
                os.write(w, str(faults + 0 * len(touched)).encode())
            finally:
                os._exit(0)
        os.close(w)
        try:
            os.waitpid(pid, 0)
            return int(os.read(r, 32))
        finally:
            os.close(r)

    assert faults_touching(True) * 4 < faults_touching(False)  # 6 and 1,064 here
