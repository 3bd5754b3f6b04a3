"""Attempts to get out of a sandbox, through rt and around it, each with its exact errno.

Linux's own openat2(2) is the oracle for lookups beneath and in a root.

The tests share the module's one system: those that call rt from this process
with a directory and namespace of their own (`redoxcap_isolated_client`), the rest with
names of their own in it, and confined clients that `redoxcap run` starts and
that end with the test. One changes the root namespace on purpose and has a
system of its own.
"""

from __future__ import annotations

import errno
import os
import socket
import subprocess
import sys
import textwrap

import pytest
from test_resolve import linux_openat2

import rt
from redoxcap import control
from redoxcap.testing import wait_for
from redoxcap.wire import frames as F
from redoxcap.wire import protocol as P
from redoxcap.wire.linux import RESOLVE_BENEATH, RESOLVE_IN_ROOT, RESOLVE_NO_MAGICLINKS


def build_tree(root) -> None:
    """A box with links in, out, up, absolute, dangling and looping."""
    root.mkdir(exist_ok=True)
    (root / "secret.txt").write_text("outside the box")
    box = root / "box"
    (box / "sub/deeper").mkdir(parents=True)
    (box / "file.txt").write_text("in the box")
    (box / "sub/inner.txt").write_text("inner")
    links = {
        "rel_in": "sub/inner.txt",
        "rel_up_in": "sub/../file.txt",
        "rel_out": "../secret.txt",
        "abs": "/secret.txt",
        "abs_file": "/box/file.txt",
        "dangling": "nowhere",
        "loop_a": "loop_b",
        "loop_b": "loop_a",
        "dir_link": "sub",
        "chain": "rel_in",
        "sub/up_and_back": "../../box/file.txt",
        "sub/parent": "..",
    }
    for name, target in links.items():
        os.symlink(target, box / name)


CASES = [
    ("file.txt", 0), ("sub/inner.txt", 0), ("sub/../file.txt", 0), ("./sub/./inner.txt", 0),
    ("..", 0), ("../secret.txt", 0), ("sub/../../secret.txt", 0), ("sub/deeper/../../..", 0),
    ("/secret.txt", 0), ("/box/file.txt", 0), ("/", 0),
    ("rel_in", 0), ("rel_up_in", 0), ("rel_out", 0), ("abs", 0), ("abs_file", 0),
    ("dangling", 0), ("loop_a", 0), ("chain", 0), ("dir_link/inner.txt", 0),
    ("sub/up_and_back", 0), ("sub/parent/file.txt", 0), ("sub/parent/../secret.txt", 0),
    ("file.txt/", 0), ("sub/", 0), ("file.txt/.", 0), ("rel_in", os.O_NOFOLLOW),
    ("dir_link", os.O_NOFOLLOW | os.O_PATH), ("file.txt", os.O_DIRECTORY), ("", 0),
    ("dir_link/", os.O_DIRECTORY), ("nope/../file.txt", 0),
]


def outcome(open_fn, fstat_fn, close_fn):
    """What an open gives: an errno, or the (dev, ino) of the file it opened."""
    try:
        fd = open_fn()
    except OSError as exc:
        return exc.errno
    try:
        st = fstat_fn(fd)
        return (st.st_dev, st.st_ino)
    finally:
        close_fn(fd)


def outcome_linux(dirfd: int, path: str, flags: int, resolve: int):
    return outcome(lambda: linux_openat2(dirfd, path, flags | os.O_CLOEXEC, 0,
                                         resolve | RESOLVE_NO_MAGICLINKS),
                   os.fstat, os.close)


def _beneath_dir(client, flag: int) -> int:
    build_tree(client.root)
    return rt.open("/box", rt.O_DIRECTORY | flag)


@pytest.fixture(scope="module")
def lookup_tree(redoxcap_module_system):
    """build_tree once, in /lookups of the module's shared system (the lookups change nothing)."""
    build_tree(redoxcap_module_system.root / "lookups")
    return redoxcap_module_system.root / "lookups"


@pytest.mark.parametrize("path, flags", CASES)
def test_lookups_beneath_match_linux_openat2(redoxcap_module_client, lookup_tree, path, flags):
    box = rt.open("/lookups/box", rt.O_DIRECTORY | rt.O_RESOLVE_BENEATH)
    host = os.open(lookup_tree / "box", os.O_PATH | os.O_DIRECTORY)
    try:
        want = outcome_linux(host, path, flags, RESOLVE_BENEATH)
        assert _raw_openat(box, path, flags) == want, (path, flags)  # the sticky flag, in the scheme
        assert _rt_openat(box, path, flags | rt.O_RESOLVE_BENEATH) == want, (path, flags)
    finally:
        os.close(host)
        rt.close(box)


@pytest.mark.parametrize("path, flags", CASES)
def test_lookups_in_root_match_linux_openat2(redoxcap_module_client, lookup_tree, path, flags):
    box = rt.open("/lookups/box", rt.O_DIRECTORY)
    host = os.open(lookup_tree / "box", os.O_PATH | os.O_DIRECTORY)
    try:
        want = outcome_linux(host, path, flags, RESOLVE_IN_ROOT)
        assert _rt_openat(box, path, flags | rt.O_RESOLVE_IN_ROOT) == want, (path, flags)
    finally:
        os.close(host)
        rt.close(box)


def _raw_openat(dirfd: int, path: str, flags: int):
    """OPENAT on dirfd with the path as is (rt would route an absolute one to the namespace)."""
    from redoxcap.wire.call import call_fd

    return outcome(lambda: call_fd(dirfd, P.OPENAT, [path, flags, 0o666]), rt.fstat, rt.close)


def _rt_openat(dirfd: int, path: str, flags: int):
    return outcome(lambda: rt.openat(dirfd, path, flags), rt.fstat, rt.close)


def test_beneath_is_sticky_and_shows_in_getfl(redoxcap_isolated_client):
    box = _beneath_dir(redoxcap_isolated_client, rt.O_RESOLVE_BENEATH)
    sub = rt.openat(box, "sub", rt.O_DIRECTORY)  # no flag asked for: inherited
    assert rt.getfl(sub) & rt.O_RESOLVE_BENEATH
    cloned = rt.clone(sub)
    assert rt.getfl(cloned) & rt.O_RESOLVE_BENEATH
    rt.close(rt.openat(sub, "../file.txt"))  # still beneath box, the directory with the flag
    with pytest.raises(OSError) as info:
        rt.openat(sub, "../../secret.txt")
    assert info.value.errno == errno.EXDEV
    plain = rt.open("/box", rt.O_DIRECTORY)
    assert not rt.getfl(plain) & rt.O_RESOLVE_BENEATH
    rt.close(rt.openat(plain, "../secret.txt"))  # without the flag, .. is allowed inside the scheme
    for fd in (box, sub, cloned, plain):
        rt.close(fd)


def test_openat_with_a_resolve_flag_never_consults_the_namespace(redoxcap_module_client):
    """As openat2: beneath, an absolute path is EXDEV; in-root, `/` is the dirfd.

    In the root namespace, whose `/secret.txt` is the tree's (the only test here to build
    it at the root), and whose fpath answers from the scheme's root."""
    box = _beneath_dir(redoxcap_module_client, 0)
    outside = (redoxcap_module_client.root / "secret.txt").stat()
    cwd = rt.open(".", rt.O_DIRECTORY)
    for path in ("/secret.txt", "/box/file.txt", "/scheme/file/secret.txt", "/"):
        with pytest.raises(OSError) as info:
            rt.openat(box, path, rt.O_RESOLVE_BENEATH)
        assert info.value.errno == errno.EXDEV, path
        with pytest.raises(OSError) as info:
            rt.openat(cwd, path, rt.O_RESOLVE_BENEATH)
        assert info.value.errno == errno.EXDEV, path
    rt.close(cwd)
    with pytest.raises(FileNotFoundError):
        rt.openat(box, "/secret.txt", rt.O_RESOLVE_IN_ROOT)  # would be the namespace's /secret.txt
    fd = rt.openat(box, "/file.txt", rt.O_RESOLVE_IN_ROOT)
    assert rt.fpath(fd) == "/scheme/file/box/file.txt"
    rt.close(fd)
    fd = rt.openat(box, "/../../sub/inner.txt", rt.O_RESOLVE_IN_ROOT)
    assert rt.read(fd, 100) == b"inner"
    rt.close(fd)
    with pytest.raises(FileNotFoundError):  # `NAME:rest` is a file name here, not a scheme
        rt.openat(box, "file:secret.txt", rt.O_RESOLVE_BENEATH)
    with pytest.raises(FileNotFoundError):
        rt.openat(box, "/scheme/file/secret.txt", rt.O_RESOLVE_IN_ROOT)
    assert (redoxcap_module_client.root / "secret.txt").stat() == outside
    rt.close(box)


@pytest.mark.parametrize("flag", [0, rt.O_RESOLVE_BENEATH, rt.O_PATH], ids=["plain", "beneath", "o_path"])
def test_a_subtree_registered_as_a_namespace_entry_is_a_boundary(redoxcap_isolated_client, subtree_namespace,
                                                                 flag):
    """Issue 7 item 4: a directory capability registered as `file` confines everything
    that goes through that name to it, whatever flags it was opened with."""
    (redoxcap_isolated_client.root / "secret.txt").write_text("outside the box")
    (redoxcap_isolated_client.root / "box/sub").mkdir(parents=True)
    (redoxcap_isolated_client.root / "box/in.txt").write_text("in the box")
    with subtree_namespace("/box", flag):
        for path in ("/../secret.txt", "file:../secret.txt", "/scheme/file/../secret.txt",
                     "/sub/../../secret.txt", "/scheme/file/sub/../../../secret.txt"):
            with pytest.raises(FileNotFoundError):
                rt.open(path)
        with rt.open_file("/../../in.txt") as f:  # `..` at the entry's top stays there
            assert f.read() == "in the box"
        rt.symlink("/secret.txt", "/abs")  # an absolute symlink means the entry
        rt.symlink("../../secret.txt", "/sub/rel")
        rt.symlink("/", "/sub/top")
        for path in ("/abs", "/sub/rel", "/sub/top/../secret.txt", "file:abs"):
            with pytest.raises(FileNotFoundError):
                rt.open(path)
        sub = rt.open("/sub", rt.O_DIRECTORY)  # fds opened through the entry stay inside too
        assert rt.getfl(sub) & rt.O_RESOLVE_IN_ROOT
        with pytest.raises(FileNotFoundError):
            rt.openat(sub, "../../secret.txt")
        rt.close(rt.openat(sub, "../../in.txt"))
        rt.close(sub)
        rt.mkdir("/../made")
        rt.close(rt.open("/../../created.txt", rt.O_CREAT | rt.O_WRONLY))
        rt.rename("/in.txt", "/../moved.txt")
        rt.link("/moved.txt", "/scheme/file/../linked.txt")
        with pytest.raises(FileNotFoundError):
            rt.unlink("/../secret.txt")
        assert rt.readlink("/../abs") == "/secret.txt"
    assert sorted(p.name for p in redoxcap_isolated_client.root.iterdir()) == ["box", "secret.txt"]
    assert (redoxcap_isolated_client.root / "secret.txt").read_text() == "outside the box"
    assert sorted(p.name for p in (redoxcap_isolated_client.root / "box").iterdir()) == [
        "abs", "created.txt", "linked.txt", "made", "moved.txt", "sub"]


def test_a_namespace_cannot_be_registered_in_a_namespace(redoxcap_isolated_client):
    """nsmgr would hold the last reference to itself, and the handle would never close."""
    child = rt.mkns(["file"], perms=rt.PERM_ALL)
    for ns in (child, rt.getns()):
        with pytest.raises(OSError) as info:
            rt.register(child, "loop", ns)
        assert info.value.errno == errno.EINVAL
    assert rt.schemes(child) == ["file"]
    rt.close(child)


def test_a_spawned_child_cannot_change_its_parents_namespace(redoxcap_client):
    """Issue 7 item 7: by default a child gets a fork; sharing the handle is explicit."""
    code = ("import rt\n"
            "rt.unregister(rt.getns(), 'rand')\n"
            "rt.register(rt.getns(), 'rand', rt.open('/', rt.O_DIRECTORY))\n"
            "print(rt.nsperms() == rt.PERM_ALL, rt.fpath(rt.open('/scheme/rand/')))\n")
    before = rt.schemes()
    child = rt.spawn([sys.executable, "-c", code], stdout=subprocess.PIPE, text=True)
    out, _ = child.communicate(timeout=60)
    assert child.returncode == 0 and out.split() == ["True", "/scheme/file"]
    assert rt.schemes() == before
    fd = rt.open("/scheme/rand")
    assert rt.fpath(fd) == "/scheme/rand" and len(rt.read(fd, 16)) == 16
    rt.close(fd)
    narrowed = rt.mkns(None, perms=rt.PERM_LIST)
    child = rt.spawn([sys.executable, "-c", "import rt; print(rt.nsperms())"], ns=narrowed,
                     stdout=subprocess.PIPE, text=True)
    assert child.communicate(timeout=60)[0].strip() == str(rt.PERM_LIST)  # never more
    rt.close(narrowed)
    child = rt.spawn([sys.executable, "-c", "import rt; rt.unregister(rt.getns(), 'null')"],
                     share_ns=True)
    assert child.wait(timeout=60) == 0
    assert "null" not in rt.schemes()  # shared on purpose: the change is ours too


def test_two_path_operations_are_bound_beneath_on_both_sides(redoxcap_isolated_client):
    box = _beneath_dir(redoxcap_isolated_client, rt.O_RESOLVE_BENEATH)
    sub = rt.openat(box, "sub", rt.O_DIRECTORY)
    from redoxcap.wire.call import call

    attempts = [
        (P.MKDIRAT, ["../../escape", 0o777]),
        (P.MKDIRAT, ["/escape", 0o777]),
        (P.UNLINKAT, ["../../secret.txt", 0]),
        (P.UNLINKAT, ["../rel_out/../secret.txt", 0]),
        (P.RENAMEAT, ["inner.txt", "../../stolen.txt"]),
        (P.RENAMEAT, ["../../secret.txt", "moved.txt"]),
        (P.SYMLINKAT, ["x", "../../planted"]),
        (P.LINKAT, ["inner.txt", "../../linked"]),
        (P.LINKAT, ["../../secret.txt", "linked"]),
        (P.READLINKAT, ["../../box/abs"]),
    ]
    for op, args in attempts:
        with pytest.raises(OSError) as info:
            call(sub, op, args)
        assert info.value.errno == errno.EXDEV, (op, args)
    assert sorted(p.name for p in redoxcap_isolated_client.root.iterdir()) == ["box", "secret.txt"]
    assert (redoxcap_isolated_client.root / "box/file.txt").exists()
    rt.close(sub)
    rt.close(box)


def test_a_file_scheme_never_reaches_the_host_outside_its_root(redoxcap_module_client):
    """Without any flag, `..` and absolute symlinks stop at the scheme's root (the real one:
    the root namespace's `file`, so the names below are unique in the module's system)."""
    (redoxcap_module_client.root / "ok").write_text("root file")
    os.symlink("/etc", redoxcap_module_client.root / "etc_link")
    os.symlink("../../../../../../etc/passwd", redoxcap_module_client.root / "deep_out")
    for path in ("/../../../etc/passwd", "/etc_link/passwd", "/deep_out", "/../" * 20 + "etc/hostname"):
        with pytest.raises(FileNotFoundError):
            rt.open(path)
    with rt.open_file("/../../../ok") as f:
        assert f.read() == "root file"


SANDBOX_CLIENT = textwrap.dedent("""
    import errno, os, socket, sys
    import rt

    def code(fn):
        try:
            fn()
            return "ok"
        except OSError as exc:
            return errno.errorcode[exc.errno]

    results = {
        "getcwd": rt.getcwd(),
        "read inside": rt.open_file("inside.txt").read(),
        "chdir sub": code(lambda: rt.chdir("sub")),
        "getcwd in sub": rt.getcwd(),
        "chdir back": code(lambda: rt.chdir("..")),
        "chdir above": code(lambda: rt.chdir("..")),
        "getcwd after": rt.getcwd(),
        "dotdot": code(lambda: rt.open("../outside.txt")),
        "absolute": code(lambda: rt.open("/outside.txt")),
        "scheme path": code(lambda: rt.open("/scheme/file/outside.txt")),
        "symlink out": code(lambda: rt.open("link_out")),
        "host file": code(lambda: open(sys.argv[1]).read()),
        "host write": code(lambda: open(sys.argv[2], "w")),
        "tcp": code(lambda: socket.create_connection(("127.0.0.1", int(sys.argv[3])), timeout=2)),
        "udp": code(lambda: socket.socket(socket.AF_INET, socket.SOCK_DGRAM)),
        "token": code(lambda: open(sys.argv[4]).read()),
        "abstract": code(lambda: socket.socket(socket.AF_UNIX, socket.SOCK_STREAM).connect("\\0" + sys.argv[5])),
        "schemes": code(lambda: rt.schemes()),
    }
    for key, value in results.items():
        print(f"{key}={value}")
""")


def test_a_confined_beneath_client_reaches_exactly_its_directory(redoxcap_module_system, tmp_path):
    (redoxcap_module_system.root / "outside.txt").write_text("no")
    (redoxcap_module_system.root / "jail/sub").mkdir(parents=True)
    (redoxcap_module_system.root / "jail/inside.txt").write_text("yes")
    os.symlink("../outside.txt", redoxcap_module_system.root / "jail/link_out")
    host_file = tmp_path / "host.txt"
    host_file.write_text("host")
    with socket.socket() as listener, socket.socket(socket.AF_UNIX, socket.SOCK_STREAM) as abstract:
        listener.bind(("127.0.0.1", 0))
        listener.listen()
        abstract.bind("\0redoxcap-test-abstract")
        abstract.listen()
        script = tmp_path / "client.py"
        script.write_text(SANDBOX_CLIENT)
        result = redoxcap_module_system.run(  # a program written with rt, under Landlock and seccomp alone
            "--ns", "", "--cwd", "/jail", "--beneath", "--require-confine", "--no-broker", "--",
            sys.executable, str(script), str(host_file), str(tmp_path / "new.txt"),
            str(listener.getsockname()[1]), str(redoxcap_module_system.state_dir / control.TOKEN_NAME),
            "redoxcap-test-abstract",
        )
    got = dict(line.split("=", 1) for line in result.stdout.splitlines())
    assert got == {
        "getcwd": "/jail",
        "read inside": "yes",
        "chdir sub": "ok",
        "getcwd in sub": "/jail/sub",
        "chdir back": "ok",
        "chdir above": "EXDEV",
        "getcwd after": "/jail",
        "dotdot": "EXDEV",
        "absolute": "ENODEV",
        "scheme path": "ENODEV",
        "symlink out": "EXDEV",
        "host file": "EACCES",
        "host write": "EACCES",
        "tcp": "EACCES",
        "udp": "EACCES",
        "token": "EACCES",
        "abstract": "EPERM",
        "schemes": "ok",
    }
    assert not (tmp_path / "new.txt").exists()


def test_a_confined_client_gets_a_private_scratch_directory_that_is_removed(redoxcap_module_system):
    code = ("import os, tempfile\n"
            "with tempfile.NamedTemporaryFile(delete=False) as f:\n    f.write(b'x')\n"
            "print(os.environ['TMPDIR']); print(os.listdir(os.environ['TMPDIR']) != [])\n")
    scratch, wrote = redoxcap_module_system.python(code, "--no-broker").stdout.split()
    assert wrote == "True"
    # the caller has the code as soon as the program has ended; the run's end comes after
    wait_for(lambda: not os.path.exists(scratch))


def test_getcwd_does_not_lie_after_a_symlinked_chdir(redoxcap_isolated_client):
    (redoxcap_isolated_client.root / "real/inner").mkdir(parents=True)
    os.symlink("real/inner", redoxcap_isolated_client.root / "shortcut")
    rt.chdir("/shortcut")
    assert rt.getcwd() == "/real/inner"
    rt.chdir("..")
    assert rt.getcwd() == "/real"
    assert rt.listdir() == ["inner"]


def test_a_namespace_of_file_and_uds_reaches_no_other_scheme(redoxcap_module_system):
    result = redoxcap_module_system.python(
        "import rt\n"
        "for path in ('/scheme/tcp/127.0.0.1/9', '/scheme/null', '/scheme/zero', 'rand:', '/scheme/nsmgr'):\n"
        "    try:\n        rt.open(path)\n        print('reached', path)\n"
        "    except OSError as e:\n        print(e.errno)\n"
        "print(rt.schemes())\n",
        "--ns", "file,uds",
    )
    lines = result.stdout.splitlines()
    assert lines[:-1] == [str(errno.ENODEV)] * 5
    assert lines[-1] == "['file', 'uds']"


def test_forged_frames_cannot_name_handles_they_were_not_given(redoxcap_isolated_client):
    """A frame's body can claim anything; the router routes by socket, not by content."""
    (redoxcap_isolated_client.root / "mine.txt").write_text("mine")
    (redoxcap_isolated_client.root / "theirs.txt").write_text("theirs")
    theirs = rt.open("/theirs.txt")
    mine = rt.open("/mine.txt")
    with socket.socket(fileno=os.dup(mine)) as s:
        # a scheme-side header smuggled into an isolated client's request
        forged = F.SREQUEST.pack(1, 1, 0, 0, 0, 0, P.READ, 0) + P.pack([100])
        s.send(F.REQUEST.pack(P.READ, 5) + forged)
        tag, status, value = F.decode_reply(s.recv(P.MAX_FRAME))
        assert (tag, status, value) == (5, P.ERR, errno.EINVAL)
        # router-internal operations are refused on an ordinary capability
        for op in (P.SCHEME_CREATE, P.SCHEME_RESTART, P.KERNEL_STATUS, P.SCHEME_STATUS, P.CLOSE, 0, 7):
            s.send(F.encode_request(op, 6, []))
            assert F.decode_reply(s.recv(P.MAX_FRAME)) == (6, P.ERR, errno.EINVAL)
        s.send(F.encode_request(P.READ, 7, [100]))
        assert F.decode_reply(s.recv(P.MAX_FRAME)) == (7, P.OK, b"mine")
    rt.close(theirs)
    rt.close(mine)


def test_namespace_forks_never_gain_names_or_permissions(redoxcap_isolated_client):
    child = rt.mkns(["file"], perms=rt.PERM_LIST)
    for names, perms, err in [
        (["file", "tcp"], None, errno.ENODEV),
        (["nsmgr"], None, errno.ENODEV),
        (None, rt.PERM_INSERT, errno.EACCES),
        (None, rt.PERM_ALL, errno.EACCES),
        (["bad/name"], None, errno.EINVAL),
    ]:
        with pytest.raises(OSError) as info:
            rt.mkns(names, ns=child, perms=perms)
        assert info.value.errno == err, (names, perms)
    grandchild = rt.mkns(None, ns=child)
    assert rt.nsperms(grandchild) == rt.PERM_LIST
    assert rt.schemes(grandchild) == ["file"]
    rt.close(grandchild)
    rt.close(child)
