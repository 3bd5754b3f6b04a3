"""Namespaces on a running system: forks, listing, narrowing, registering and
unregistering names, a subtree as `file`, nsmgr out of the way of I/O on the fds
it forwarded, and children spawned with clones of the namespace and cwd.

Every test has a namespace of its own, forked from the root one with its own
directory as `file`, on the module's one system (`redoxcap_isolated_client`).
"""

from __future__ import annotations

import errno
import fcntl
import mmap
import os
import select
import subprocess
import sys
from pathlib import Path

import pytest

import rt
from redoxcap.config import Config
from redoxcap.wire import ops as rt_ops
from redoxcap.wire.call import call, call_fd

BUILTIN = sorted(Config().schemes)  # what a default system registers


def test_namespace_fork_list_narrow_register_and_unregister(redoxcap_isolated_client):
    everything = rt.schemes()
    assert "file" in everything and everything == sorted(everything)
    child = rt.mkns(["file"])
    assert rt.schemes(child) == ["file"]
    with pytest.raises(OSError) as info:
        rt.mkns(["file", "nosuch"])
    assert info.value.errno == errno.ENODEV
    rt.narrow(child, rt.PERM_LIST)
    with pytest.raises(PermissionError):
        rt.mkns(None, ns=child, perms=rt.PERM_ALL)  # never more than the parent handle
    with pytest.raises(PermissionError):
        rt.narrow(child, rt.PERM_ALL)  # cannot be widened again
    d = rt.open("/", rt.O_DIRECTORY)
    with pytest.raises(PermissionError):
        rt.register(child, "again", d)  # no INSERT
    with pytest.raises(PermissionError):
        rt.unregister(child, "file")  # no DELETE
    rt.register(rt.getns(), "files2", d)
    with pytest.raises(FileExistsError):
        rt.register(rt.getns(), "files2", d)
    with pytest.raises(OSError) as info:
        rt.register(rt.getns(), "bad/name", d)
    assert info.value.errno == errno.EINVAL
    assert rt.schemes() == sorted(everything + ["files2"])
    r, w = os.pipe()
    with pytest.raises(OSError) as info:
        rt.register(rt.getns(), "notacap", r)  # any fd is not a capability
    assert info.value.errno == errno.EINVAL
    os.close(r)
    os.close(w)
    rt.unregister(rt.getns(), "files2")
    with pytest.raises(OSError) as info:
        rt.unregister(rt.getns(), "files2")
    assert info.value.errno == errno.ENODEV
    rt.close(d)
    rt.close(child)


def test_a_fork_of_many_names_holds_a_working_clone_of_each_of_its_own(redoxcap_isolated_client):
    """nsmgr asks for a fork's clones all at once: each name still comes out as the entry it
    was, and the fork's entries outlive the parent's."""
    root = redoxcap_isolated_client.root
    names = [f"box{i}" for i in range(8)]
    for i, name in enumerate(names):
        (root / name).mkdir()
        (root / name / "which").write_text(name)
        d = rt.open(f"/{name}", rt.O_DIRECTORY)
        rt.register(rt.getns(), name, d)
        rt.close(d)
    try:
        child = rt.mkns(None)
        assert rt.schemes(child) == rt.schemes()
        picked = rt.mkns(names[::-1])  # any order asked: the names, each its own entry
        assert rt.schemes(picked) == sorted(names)
        for name in names:
            rt.unregister(rt.getns(), name)  # the fork keeps its clones
        parent = rt.clone(rt.getns())
        try:
            for ns in (child, picked):
                rt.setns(ns)
                for name in names:
                    with rt.open_file(f"/scheme/{name}/which") as f:
                        assert f.read() == name
        finally:
            rt.setns(parent)
            for ns in (parent, child, picked):
                rt.close(ns)
    finally:
        for name in names:
            if name in rt.schemes():
                rt.unregister(rt.getns(), name)


def test_a_subtree_registered_as_file_is_all_a_child_namespace_sees(redoxcap_isolated_client,
                                                                    subtree_namespace):
    (redoxcap_isolated_client.root / "outside.txt").write_text("secret")
    (redoxcap_isolated_client.root / "box").mkdir()
    (redoxcap_isolated_client.root / "box/inside.txt").write_text("ok")
    with subtree_namespace("/box"):
        assert rt.listdir("/") == ["inside.txt"]
        with rt.open_file("/inside.txt") as f:
            assert f.read() == "ok"
        with pytest.raises(FileNotFoundError):
            rt.open("/outside.txt")


def test_a_subtree_entry_kept_as_a_root_keeps_every_lookup_inside_it(redoxcap_isolated_client,
                                                                   subtree_namespace):
    root = redoxcap_isolated_client.root
    (root / "outside.txt").write_text("secret")
    (root / "box/deeper").mkdir(parents=True)
    (root / "box/inside.txt").write_text("ok")
    os.symlink("/outside.txt", root / "box/abs_out")
    os.symlink("../outside.txt", root / "box/rel_out")
    os.symlink("/", root / "box/to_top")
    with subtree_namespace("/box"):
        rt.close(rt.open("/inside.txt"))  # file's root, the in-root subtree, is kept from here on
        nsmgr = redoxcap_isolated_client.daemon("nsmgr")["frames"]
        for path in ("/../outside.txt", "/scheme/file/../../outside.txt", "/deeper/../../outside.txt",
                     "/abs_out", "/rel_out", "/to_top/../outside.txt", "file:../outside.txt"):
            with pytest.raises(FileNotFoundError):
                rt.open(path)
            with pytest.raises(FileNotFoundError):
                rt.stat(path)
        with rt.open_file("/to_top/../deeper/../inside.txt") as f:  # `..` stops at the top
            assert f.read() == "ok"
        assert redoxcap_isolated_client.daemon("nsmgr")["frames"] == nsmgr  # all on the kept root


def test_a_fork_takes_the_capabilities_put_in_place_of_its_parents_entries(redoxcap_isolated_client):
    """put: what a run does for its uds scope and net grants, in the fork's one request. A
    put subtree is an in-root boundary, as when registered; the parent is untouched."""
    root = redoxcap_isolated_client.root
    (root / "outside.txt").write_text("secret")
    (root / "box").mkdir()
    (root / "box/inside.txt").write_text("ok")
    box = rt.open("/box", rt.O_DIRECTORY)
    try:
        fork = rt.mkns(None, put={"file": box, "extra": box})
    finally:
        rt.close(box)
    try:
        assert rt.schemes(fork) == sorted({*rt.schemes(), "extra"})
        for name in ("file", "extra"):
            top = call_fd(fork, rt_ops.OPENAT, [f"/scheme/{name}", os.O_RDONLY | os.O_DIRECTORY, 0])
            try:
                rt.close(rt.openat(top, "inside.txt"))
                with pytest.raises(FileNotFoundError):
                    rt.openat(top, "../outside.txt")
            finally:
                rt.close(top)
        assert "outside.txt" in rt.listdir("/") and "extra" not in rt.schemes()  # the parent's own
    finally:
        rt.close(fork)


def test_put_needs_the_rights_a_register_would_and_takes_only_capabilities(redoxcap_isolated_client):
    (redoxcap_isolated_client.root / "box").mkdir()
    box = rt.open("/box", rt.O_DIRECTORY)
    inserting = rt.mkns(None, perms=rt.PERM_LIST | rt.PERM_INSERT)  # no DELETE
    reading = rt.mkns(None, perms=rt.PERM_LIST)
    try:
        rt.close(rt.mkns(None, ns=inserting, put={"new": box}))  # a name of its own: INSERT
        with pytest.raises(PermissionError):
            rt.mkns(None, ns=inserting, put={"file": box})  # in place of one: DELETE too
        with pytest.raises(PermissionError):
            rt.mkns(None, ns=reading, put={"new": box})
        r, w = os.pipe()
        for put, fds in (({"a": box}, [box, box]), (None, [box]), ({"a/b": box}, [box])):
            with pytest.raises(OSError) as info:  # each name once, one capability each
                call(rt.getns(), rt_ops.NS_MKNS, [None, None, list(put or {}) or None], fds)
            assert info.value.errno == errno.EINVAL
        for not_one in (w, rt.getns()):  # a pipe is no capability; nsmgr's own namespace neither
            with pytest.raises(OSError) as info:
                call(rt.getns(), rt_ops.NS_MKNS, [None, None, ["a"]], [not_one])
            assert info.value.errno == errno.EINVAL
        os.close(w)
        # no copy of the pipe was kept anywhere (a kept one would leave the read waiting)
        assert select.select([r], [], [], 10)[0] and os.read(r, 1) == b""
        os.close(r)
    finally:
        for fd in (box, inserting, reading):
            rt.close(fd)


def test_nsmgr_handles_no_frame_for_io_on_a_forwarded_fd(redoxcap_isolated_client):
    fd = rt.open("/counted", rt.O_CREAT | rt.O_RDWR)
    before = redoxcap_isolated_client.daemon("nsmgr")["frames"]
    file_before = redoxcap_isolated_client.daemon("file")["frames"]
    for _ in range(20):
        rt.write(fd, b"x" * 100)
    rt.lseek(fd, 0)
    rt.read(fd, 2000)
    assert redoxcap_isolated_client.daemon("nsmgr")["frames"] == before
    assert redoxcap_isolated_client.daemon("file")["frames"] >= file_before + 22
    rt.close(fd)


def test_spawned_children_inherit_clones_of_namespace_and_cwd(redoxcap_isolated_client):
    rt.mkdir("/kid")
    rt.chdir("/kid")
    child = rt.spawn([sys.executable, "-c",
                      ("import rt; rt.close(rt.open('made-by-child', rt.O_CREAT|rt.O_WRONLY));"
                       "print(rt.getcwd(), rt.schemes())")],
                     stdout=subprocess.PIPE, text=True)
    out, _ = child.communicate(timeout=30)
    assert out.strip() == f"/kid {BUILTIN}"
    assert (redoxcap_isolated_client.root / "kid/made-by-child").exists()
    assert rt.listdir() == ["made-by-child"]  # our own cwd is untouched


# -- opens through the namespace: the entry's root is kept, changes are seen --------------


def test_after_a_names_first_open_opens_and_stats_through_the_namespace_skip_nsmgr(
        redoxcap_isolated_client):
    rt.close(rt.open("/warm", rt.O_CREAT | rt.O_WRONLY))  # file's root is kept from here on
    nsmgr_before = redoxcap_isolated_client.daemon("nsmgr")["frames"]
    file_before = redoxcap_isolated_client.daemon("file")["frames"]
    for _ in range(20):
        rt.close(rt.open("/warm"))
        assert rt.stat("/scheme/file/warm").st_size == 0
    rt.mkdir("/made")
    rt.rename("/made", "/renamed")
    assert rt.listdir("/renamed") == []
    assert redoxcap_isolated_client.daemon("nsmgr")["frames"] == nsmgr_before
    assert redoxcap_isolated_client.daemon("file")["frames"] >= file_before + 40


def test_a_name_the_namespace_lacks_is_asked_once_until_the_namespace_changes(
        redoxcap_isolated_client):
    """Every program start looks for /etc/ld.so.preload, and with --dir its namespace has no
    `file`: a name nsmgr said is missing is not asked again while the namespace's generation
    holds, and a register of it is seen by the next open."""
    def missing():
        with pytest.raises(OSError) as info:
            rt.stat("/scheme/later/x")
        assert info.value.errno == errno.ENODEV

    missing()  # asked (and, without a kept root yet, the generation page fetched)
    nsmgr_before = redoxcap_isolated_client.daemon("nsmgr")["frames"]
    for _ in range(20):
        missing()
    assert redoxcap_isolated_client.daemon("nsmgr")["frames"] == nsmgr_before
    (redoxcap_isolated_client.root / "later").mkdir()
    (redoxcap_isolated_client.root / "later" / "x").write_text("here")
    d = rt.open("/later", rt.O_DIRECTORY)
    rt.register(rt.getns(), "later", d)
    rt.close(d)
    try:
        assert rt.stat("/scheme/later/x").st_size == 4  # the register is seen at once
        rt.unregister(rt.getns(), "later")
        missing()
    finally:
        if "later" in rt.schemes():
            rt.unregister(rt.getns(), "later")


def test_a_name_unregistered_or_replaced_is_seen_by_the_next_open(redoxcap_isolated_client):
    fd = rt.open("/scheme/zero")
    assert rt.read(fd, 3) == b"\0\0\0"
    rt.close(fd)
    rt.unregister(rt.getns(), "zero")
    with pytest.raises(OSError) as info:
        rt.open("/scheme/zero")
    assert info.value.errno == errno.ENODEV
    _, (null_root,) = call(rt.getns(), rt_ops.NS_ROOT, ["null", 0])
    rt.register(rt.getns(), "zero", null_root)
    rt.close(null_root)
    fd = rt.open("/scheme/zero")  # now the null device
    assert rt.read(fd, 3) == b""
    rt.close(fd)
    rt.narrow(rt.getns(), rt.PERM_ALL & ~rt.PERM_INSERT)  # a change that leaves every name
    d = rt.open("/", rt.O_DIRECTORY)
    with pytest.raises(PermissionError):
        rt.register(rt.getns(), "again", d)
    rt.close(d)
    fd = rt.open("/scheme/zero")
    assert rt.read(fd, 1) == b""
    rt.close(fd)


def test_a_change_made_by_another_holder_of_the_namespace_is_seen_by_the_next_open(
        redoxcap_isolated_client):
    rt.close(rt.open("/scheme/rand"))  # kept: rand's root
    child = rt.spawn([sys.executable, "-c", "import rt; rt.unregister(rt.getns(), 'rand')"],
                     share_ns=True)  # the very same namespace handle, another process
    assert child.wait(timeout=30) == 0
    with pytest.raises(OSError) as info:
        rt.open("/scheme/rand")
    assert info.value.errno == errno.ENODEV


def test_a_root_held_after_its_name_is_unregistered_stays_held(redoxcap_isolated_client):
    """What a holder keeps is a capability like any other: unregistering the name takes
    it from the namespace, not from whoever holds it."""
    rt.close(rt.open("/kept.txt", rt.O_CREAT | rt.O_WRONLY))
    generation, (root,) = call(rt.getns(), rt_ops.NS_ROOT, ["file", 0])
    assert isinstance(generation, int)
    rt.unregister(rt.getns(), "file")
    with pytest.raises(OSError) as info:
        rt.open("/kept.txt")
    assert info.value.errno == errno.ENODEV
    fd = rt.openat(root, "kept.txt")
    assert rt.fpath(fd).endswith("/kept.txt")
    rt.close(fd)
    rt.close(root)
    with pytest.raises(OSError) as info:
        call(rt.getns(), rt_ops.NS_ROOT, ["nosuch", 0])
    assert info.value.errno == errno.ENODEV


def _generation_pages(pid: int) -> int:
    """How many generation pages process pid holds open."""
    fds = Path(f"/proc/{pid}/fd")
    return sum("redoxcap-namespace-generation" in os.readlink(fd) for fd in fds.iterdir())


def test_the_generation_page_cannot_be_written_shrunk_or_multiplied_by_a_holder(
        redoxcap_isolated_client):
    nsmgr = redoxcap_isolated_client.daemon("nsmgr")["pid"]
    _, (root, page) = call(rt.getns(), rt_ops.NS_ROOT, ["zero", 1])
    rt.close(root)
    try:
        with pytest.raises(OSError):
            os.write(page, b"\xff" * 8)
        with pytest.raises(OSError):
            os.ftruncate(page, 0)
        with pytest.raises(PermissionError):
            mmap.mmap(page, 8, mmap.MAP_SHARED, mmap.PROT_READ | mmap.PROT_WRITE)
        writable = os.open(f"/proc/self/fd/{page}", os.O_RDWR)  # a new description of it
        try:
            with pytest.raises(PermissionError):  # sealed against every write from now on
                os.pwrite(writable, b"\xff" * 8, 0)
            with pytest.raises(OSError):  # shrinking it would make nsmgr's writes fault
                os.ftruncate(writable, 0)
            with pytest.raises(PermissionError):
                mmap.mmap(writable, 8, mmap.MAP_SHARED, mmap.PROT_READ | mmap.PROT_WRITE)
        finally:
            os.close(writable)
        view = mmap.mmap(page, 8, mmap.MAP_SHARED, mmap.PROT_READ)
        before = int.from_bytes(view[:8], "little")
        rt.narrow(rt.getns(), rt.PERM_ALL & ~rt.PERM_SCHEME_CREATE)
        assert int.from_bytes(view[:8], "little") > before
        view.close()
        pages = set()
        for _ in range(50):  # one page per namespace, however often it is asked for
            _, fds = call(rt.getns(), rt_ops.NS_ROOT, ["zero", 1])
            pages.add(os.fstat(fds[1]).st_ino)
            for fd in fds:
                rt.close(fd)
        assert pages == {os.fstat(page).st_ino}
        assert _generation_pages(nsmgr) >= 1
    finally:
        os.close(page)


def test_a_page_sealed_further_by_a_holder_is_replaced_and_changes_are_still_seen(
        redoxcap_isolated_client):
    rt.close(rt.open("/scheme/zero"))  # rt keeps zero's root and the page
    _, (root, page) = call(rt.getns(), rt_ops.NS_ROOT, ["zero", 1])
    rt.close(root)
    writable = os.open(f"/proc/self/fd/{page}", os.O_RDWR)  # seals need a writable description
    os.close(page)
    fcntl.fcntl(writable, fcntl.F_ADD_SEALS, fcntl.F_SEAL_SEAL)  # nsmgr could not retire it now
    os.close(writable)
    fd = rt.open("/scheme/zero")  # rt sees a page it cannot trust, and asks for a new one
    assert rt.read(fd, 2) == b"\0\0"
    rt.close(fd)
    _, (root, page) = call(rt.getns(), rt_ops.NS_ROOT, ["zero", 1])
    rt.close(root)
    try:  # nsmgr replaced it with a page holders trust
        assert not fcntl.fcntl(page, fcntl.F_GET_SEALS) & fcntl.F_SEAL_SEAL
    finally:
        os.close(page)
    rt.unregister(rt.getns(), "zero")
    with pytest.raises(OSError) as info:
        rt.open("/scheme/zero")
    assert info.value.errno == errno.ENODEV
