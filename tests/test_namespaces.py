"""Namespaces on a running system: forks, listing, narrowing, registering and
unregistering names, a subtree as `file`, nsmgr out of the way of I/O on the fds
it forwarded, and children spawned with clones of the namespace and cwd.

Every test has a namespace of its own, forked from the root one with its own
directory as `file`, on the module's one system (`redoxcap_isolated_client`).
"""

from __future__ import annotations

import errno
import os
import subprocess
import sys

import pytest

import rt
from redoxcap.config import Config

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
