"""The whole system end to end: real processes, the real runtime and the real CLI."""

from __future__ import annotations

import errno
import os
import signal
import socket
import subprocess
import sys
import tempfile
import threading
from pathlib import Path

import pytest

import rt
from redoxcap import control
from redoxcap.config import Config
from rt._call import call_fd
from wire import protocol as P

BUILTIN = sorted(Config().schemes)  # what a default system registers
from tests.conftest import REDOXCAP, pid_alive, wait_for

EXAMPLES = Path(__file__).resolve().parent.parent / "examples"


# -- files through rt ------------------------------------------------------------


def test_create_write_read_list_rename_delete_by_absolute_path(client):
    fd = rt.open("/notes.txt", rt.O_CREAT | rt.O_WRONLY | rt.O_EXCL, 0o644)
    assert rt.write(fd, b"hello capabilities\n") == 19
    rt.close(fd)
    assert (client.root / "notes.txt").read_bytes() == b"hello capabilities\n"

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
    assert list(client.root.iterdir()) == []


def test_relative_paths_go_to_the_cwd_and_getcwd_follows_chdir(client):
    rt.mkdir("/home")
    rt.mkdir("/home/u")
    rt.chdir("/home")
    assert rt.getcwd() == "/home"
    rt.chdir("u")
    assert rt.getcwd() == "/home/u"
    with rt.open_file("draft.txt", "w") as f:
        f.write("relative\n")
    assert (client.root / "home/u/draft.txt").read_text() == "relative\n"
    rt.rename("draft.txt", "final.txt")
    assert rt.listdir() == ["final.txt"]
    rt.chdir("..")
    assert rt.getcwd() == "/home"
    assert rt.listdir("u") == ["final.txt"]
    rt.rename("u/final.txt", "/final.txt")  # relative source, absolute destination
    assert (client.root / "final.txt").exists()
    rt.unlink("/final.txt")


def test_scheme_paths_and_legacy_paths_name_the_same_files(client):
    (client.root / "a.txt").write_text("A")
    for path in ("/a.txt", "/scheme/file/a.txt", "file:a.txt", "file:/a.txt"):
        with rt.open_file(path) as f:
            assert f.read() == "A", path
    assert rt.fpath(rt.open("/a.txt")) == "/scheme/file/a.txt"
    assert "file" in rt.listdir("/scheme")


def test_errors_are_oserrors_with_the_right_errno(client):
    (client.root / "f").write_text("x")
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


def test_fchdir_takes_a_directory_fd_and_rejects_a_file(client):
    rt.mkdir("/d")
    (client.root / "f").write_text("x")
    d = rt.open("/d", rt.O_DIRECTORY)
    f = rt.open("/f")
    with pytest.raises(NotADirectoryError):
        rt.fchdir(f)
    rt.fchdir(d)
    rt.close(d)  # rt keeps its own clone
    assert rt.getcwd() == "/d"
    rt.close(rt.open("here", rt.O_CREAT | rt.O_WRONLY))
    assert (client.root / "d/here").exists()
    rt.close(f)


def test_lseek_ftruncate_fsync_and_large_io(client):
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


def test_clone_shares_the_offset_and_dup_has_its_own(client):
    (client.root / "f").write_bytes(b"0123456789")
    fd = rt.open("/f")
    clone = rt.clone(fd)
    dup = rt.dup(fd)
    assert rt.read(fd, 3) == b"012"
    assert rt.read(clone, 3) == b"345"  # same handle, same offset
    assert rt.read(dup, 3) == b"012"  # a new handle with its own offset
    for x in (fd, clone, dup):
        rt.close(x)


def test_a_capability_made_non_blocking_still_works_through_rt(client):
    (client.root / "f").write_text("data")
    fd = rt.open("/f")
    os.set_blocking(fd, False)  # e.g. by another holder of the same socket
    assert rt.read(fd, 10) == b"data"
    rt.close(fd)


def test_created_files_and_directories_never_get_setuid_bits(client):
    fd = rt.open("/suid", rt.O_CREAT | rt.O_WRONLY, 0o6777)
    rt.close(fd)
    rt.mkdir("/sgid", 0o7777)
    assert (client.root / "suid").stat().st_mode & 0o7777 == 0o755
    assert (client.root / "sgid").stat().st_mode & 0o7777 == 0o755


def test_a_listing_larger_than_one_frame_comes_in_pages(client):
    big = client.root / "big"
    big.mkdir()
    names = [f"{i:04d}-" + "x" * 120 for i in range(1500)]  # about 190 KiB of names
    for name in names:
        (big / name).touch()
    assert rt.listdir("/big") == names


def test_host_names_that_are_not_utf8_are_left_out_of_listings(client):
    (client.root / "ok.txt").touch()
    open(os.path.join(os.fsencode(client.root), b"bad-\xff.txt"), "wb").close()
    assert rt.listdir("/") == ["ok.txt"]
    os.symlink(b"target-\xff", os.path.join(os.fsencode(client.root), b"link"))
    with pytest.raises(OSError) as info:
        rt.readlink("/link")  # the target cannot travel as a string
    assert info.value.errno == errno.EIO


def test_symlink_and_readlink(client):
    (client.root / "target").write_text("T")
    rt.symlink("target", "/link")
    assert rt.readlink("/link") == "target"
    with rt.open_file("/link") as f:
        assert f.read() == "T"


def test_open_file_modes(client):
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
    assert (client.root / "t.txt").read_bytes().startswith(b"LINE one")
    with pytest.raises(FileExistsError):
        rt.open_file("/t.txt", "x")


def test_rt_is_safe_from_several_threads(client):
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
    lines = (client.root / "shared").read_bytes().splitlines()
    assert sorted(lines) == sorted(b"%d-%d" % (n, i) for n in range(4) for i in range(50))
    rt.close(fd)


# -- namespaces --------------------------------------------------------------------


def test_namespace_fork_list_narrow_register_and_unregister(client):
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


def test_a_subtree_registered_as_file_is_all_a_child_namespace_sees(client):
    (client.root / "outside.txt").write_text("secret")
    (client.root / "box").mkdir()
    (client.root / "box/inside.txt").write_text("ok")
    box = rt.open("/box", rt.O_DIRECTORY)
    child = rt.mkns([], perms=rt.PERM_ALL)
    rt.register(child, "file", box)
    rt.close(box)
    parent = rt.clone(rt.getns())
    rt.setns(child)
    try:
        assert rt.listdir("/") == ["inside.txt"]
        with rt.open_file("/inside.txt") as f:
            assert f.read() == "ok"
        with pytest.raises(FileNotFoundError):
            rt.open("/outside.txt")
    finally:
        rt.setns(parent)
        rt.close(parent)
        rt.close(child)


def test_nsmgr_handles_no_frame_for_io_on_a_forwarded_fd(client):
    fd = rt.open("/counted", rt.O_CREAT | rt.O_RDWR)
    before = client.daemon("nsmgr")["frames"]
    file_before = client.daemon("file")["frames"]
    for _ in range(20):
        rt.write(fd, b"x" * 100)
    rt.lseek(fd, 0)
    rt.read(fd, 2000)
    assert client.daemon("nsmgr")["frames"] == before
    assert client.daemon("file")["frames"] >= file_before + 22
    rt.close(fd)


# -- crashes -----------------------------------------------------------------------


def test_daemons_hold_no_more_fds_after_a_workload_than_before(client):
    def fd_counts() -> dict[str, int]:
        return {d["name"]: len(os.listdir(f"/proc/{d['pid']}/fd")) for d in client.status()["daemons"]
                if d["name"] in ("kernel", "nsmgr", "file", "uds", "pipe")}

    (client.root / "f").write_text("x")
    before = fd_counts()
    for _ in range(30):
        rt.close(rt.open("/f"))
        child = rt.mkns(["file", "uds"])
        rt.close(call_fd(child, P.OPENAT, ["/scheme/file/f", os.O_RDONLY, 0]))  # through the fork
        rt.close(child)
        r, w = rt.pipe()
        rt.close(r)
        rt.close(w)
        for bad in ("/missing", "/scheme/nosuch/x", "/f/", "f\0"):
            try:
                rt.open(bad)
                raise AssertionError(f"{bad!r} opened")
            except (OSError, ValueError):
                pass
        rt.close(rt.open("../../f"))  # clamped at the scheme's root, opened, closed
    try:
        wait_for(lambda: fd_counts() == before, timeout=15)
    except AssertionError:
        raise AssertionError(f"fds before {before}, after {fd_counts()}") from None


def test_a_killed_client_leaks_no_handle(system):
    (system.root / "f").write_text("data")
    baseline = wait_for(lambda: system.daemon("file")["scheme_handles"] is not None and system.daemon("file"))
    holder = subprocess.Popen(
        [*REDOXCAP, "--state-dir", str(system.state_dir), "run", "--", sys.executable, "-c",
         ("import rt, sys, time\n"
          "fds = [rt.open('/f') for _ in range(5)] + [rt.open('/', rt.O_DIRECTORY)]\n"
          "print('ready', flush=True)\n"
          "time.sleep(60)\n")],
        stdout=subprocess.PIPE, text=True, start_new_session=True)
    try:
        assert holder.stdout.readline() == "ready\n"
        wait_for(lambda: (system.daemon("file")["scheme_handles"] or 0) >= baseline["scheme_handles"] + 6)
    finally:
        os.killpg(holder.pid, signal.SIGKILL)
        holder.wait()
        holder.stdout.close()
    wait_for(lambda: system.daemon("file")["scheme_handles"] == baseline["scheme_handles"])
    assert system.daemon("file")["capabilities"] == baseline["capabilities"]


def test_a_killed_scheme_comes_back_and_old_fds_fail_cleanly(client):
    (client.root / "f").write_text("before")
    old = rt.open("/f")  # the file scheme keeps its handles across a restart (test_restart.py)
    zero = rt.open("/scheme/zero")  # zero keeps nothing
    victim = client.daemon("zero")["pid"]
    os.kill(victim, signal.SIGKILL)
    wait_for(lambda: client.daemon("zero")["restarts"] == 1 and client.daemon("zero")["pid"])
    assert client.daemon("zero")["pid"] != victim
    with pytest.raises(OSError) as info:
        rt.read(zero, 10)  # its handle died with the daemon: an errno, not a hang
    assert info.value.errno == errno.EIO
    rt.close(zero)
    assert rt.read(old, 10) == b"before"
    rt.close(old)
    with rt.open_file("/f") as f:  # the namespace's root capability still works
        assert f.read() == "before"
    result = client.python("import rt; print(rt.listdir('/'))")
    assert result.stdout.strip() == "['f']"


def test_a_killed_nsmgr_comes_back_with_every_scheme_registered(system):
    victim = system.daemon("nsmgr")["pid"]
    os.kill(victim, signal.SIGKILL)
    wait_for(lambda: system.daemon("nsmgr")["restarts"] == 1)
    result = system.python("import rt; print(rt.schemes())")
    assert result.stdout.strip() == str(BUILTIN)


def test_trace_shows_each_request_and_reply_with_the_callers_pid(tmp_path):
    from tests.conftest import boot, shut_down

    sys_ = boot(tmp_path, "--trace")
    try:
        out = sys_.python("import os, rt; rt.close(rt.open('/made', rt.O_CREAT | rt.O_WRONLY));"
                          "print(os.getpid())")
        pid = out.stdout.strip()
        lines = wait_for(lambda: [line for line in sys_.log().splitlines()
                                  if f"pid {pid} " in line and "OPENAT" in line] or None)
        # the client's open through nsmgr, and, under it, nsmgr's own open of the file
        assert any("nsmgr" in line and "/scheme/file/made -> ok +1 fds" in line for line in lines), lines
        assert any(" file " in line and " made -> handle " in line for line in lines), lines
    finally:
        shut_down(sys_)


def test_a_dead_kernel_router_stops_the_whole_system_cleanly(tmp_path):
    from tests.conftest import boot

    sys_ = boot(tmp_path)
    pids = sys_.pids()
    kernel = sys_.daemon("kernel")["pid"]
    os.kill(kernel, signal.SIGKILL)
    for pid in pids:
        wait_for(lambda pid=pid: not pid_alive(pid))
    assert sorted(p.name for p in sys_.state_dir.iterdir()) == [control.LOG_NAME]
    assert "the kernel router exited" in sys_.log()


# -- the router and nsmgr under bad input ----------------------------------------


def _raw_exchange(fd: int, frame: bytes, fds=()) -> tuple[int, int, object]:
    with socket.socket(fileno=os.dup(fd)) as s:
        s.sendmsg([frame], P.fds_ancillary(list(fds)))
        data, _, _, _ = s.recvmsg(P.MAX_FRAME)
    tag, status = P.REPLY.unpack_from(data)
    return tag, status, P.unpack(data[P.REPLY.size :])


MALFORMED = [
    b"\x10",  # shorter than a request header
    P.REQUEST.pack(P.OPENAT, 7) + b"\xc1",  # msgpack's never-used byte
    P.REQUEST.pack(P.OPENAT, 7) + b"\x93\xa1",  # truncated array
    P.REQUEST.pack(P.OPENAT, 7) + P.pack(["x", "not an int", 0]),
    P.REQUEST.pack(P.OPENAT, 7) + P.pack(["x"]),
    P.REQUEST.pack(P.OPENAT, 7) + P.pack({"path": "x"}),
    P.REQUEST.pack(P.OPENAT, 7) + P.pack([1, 2, 3]),
    P.REQUEST.pack(P.READ, 7) + b"\xd4\x01\x00",  # an ext type
    P.REQUEST.pack(P.READ, 7) + P.pack([{1: 2}]),  # a map with a non-str key
    P.REQUEST.pack(P.SCHEME_CREATE, 7) + P.pack([]),  # a kernel op on a file capability
]


@pytest.mark.parametrize("frame", MALFORMED)
def test_malformed_frames_to_the_router_and_a_scheme_get_einval(client, frame):
    fd = rt.open("/", rt.O_DIRECTORY)
    tag, status, value = _raw_exchange(fd, frame)
    assert (status, value) == (P.ERR, errno.EINVAL)
    assert tag == (7 if len(frame) >= P.REQUEST.size else 0)
    assert rt.listdir("/") == []  # the same capability keeps working
    rt.close(fd)


@pytest.mark.parametrize("frame", MALFORMED)
def test_malformed_frames_to_nsmgr_get_einval(client, frame):
    _tag, status, value = _raw_exchange(rt.getns(), frame)
    assert (status, value) == (P.ERR, errno.EINVAL)
    assert rt.schemes() == BUILTIN


def test_an_oversized_frame_is_refused_and_the_router_survives(client):
    fd = rt.open("/", rt.O_DIRECTORY)
    with socket.socket(fileno=os.dup(fd)) as s:
        s.setsockopt(socket.SOL_SOCKET, socket.SO_SNDBUF, 1 << 20)
        s.send(P.REQUEST.pack(P.WRITE, 3) + P.pack([b"x" * (P.MAX_FRAME + 100)]))
        data = s.recv(P.MAX_FRAME)
    assert P.decode_reply(data) == (3, P.ERR, errno.EINVAL)
    assert rt.listdir("/") == []
    rt.close(fd)


def test_fds_passed_where_none_are_expected_are_closed_not_leaked(client):
    fd = rt.open("/", rt.O_DIRECTORY)
    r, w = os.pipe()
    _tag, status, _ = _raw_exchange(fd, P.encode_request(P.GETDENTS, 1, [0]), [r])
    os.close(r)
    assert status == P.OK

    def read_end_closed_everywhere() -> bool:
        try:
            os.write(w, b"x")
            return False
        except BrokenPipeError:
            return True

    wait_for(read_end_closed_everywhere)  # neither the router nor the scheme kept a copy
    os.close(w)
    rt.close(fd)


def test_kernel_knows_no_scheme_names_and_parses_no_paths():
    kernel = Path(__file__).resolve().parent.parent / "kernel"
    source = "\n".join(p.read_text() for p in kernel.glob("*.py")).lower()
    assert "router" in source
    for word in ("\"file\"", "'file'", "nsmgr", "/scheme", "tcp", "split(\"/\")", "os.path", "posixpath"):
        assert word not in source, word


# -- the CLI ------------------------------------------------------------------------


def test_status_json_reports_every_daemon(system):
    info = system.status()
    names = [d["name"] for d in info["daemons"]]
    assert names[:3] == ["kernel", "nsmgr", "file"]
    for d in info["daemons"]:
        assert pid_alive(d["pid"])
        assert 1000 < d["rss_kib"] < 500_000  # a Python process, measured
    human = system.cli("status").stdout
    assert "nsmgr" in human and "file" in human


def test_the_control_socket_only_answers_its_owner(system):
    with socket.socket(socket.AF_UNIX, socket.SOCK_SEQPACKET) as s:
        s.connect(str(system.state_dir / control.SOCKET_NAME))
        s.send(P.pack({"token": "guess", "op": "namespace"}))
        data, anc, _, _ = s.recvmsg(4096, P.CMSG_FDS)
    assert anc == []
    assert P.unpack(data) == {"ok": False, "error": "permission denied: bad token"}
    # another uid with the right token is refused too
    token = (system.state_dir / control.TOKEN_NAME).read_text()
    code = (
        "import os, socket, sys\n"
        "from wire import protocol as P\n"
        "os.setgid(65534); os.setuid(65534)\n"
        "s = socket.socket(socket.AF_UNIX, socket.SOCK_SEQPACKET)\n"
        f"s.connect({str(system.state_dir / control.SOCKET_NAME)!r})\n"
        "try:\n"  # the supervisor may have closed it already
        f"    s.send(P.pack({{'token': {token!r}, 'op': 'namespace'}}))\n"
        "except BrokenPipeError:\n"
        "    pass\n"
        "try:\n"
        "    print(repr(s.recv(4096)))\n"
        "except ConnectionResetError:\n"  # closed with our request unread
        "    print(repr(b''))\n"
    )
    # a hard link in a directory that uid can search reaches the same socket
    with tempfile.TemporaryDirectory() as public:  # same filesystem as pytest tmp_path
        os.chmod(public, 0o755)
        link = Path(public) / "control.sock"
        os.link(system.state_dir / control.SOCKET_NAME, link)
        os.chmod(link, 0o777)
        out = subprocess.run([sys.executable, "-c", code.replace(
            repr(str(system.state_dir / control.SOCKET_NAME)), repr(str(link)))],
            capture_output=True, text=True, timeout=30, check=False)
    assert out.stdout.strip() == "b''", out.stderr  # closed before anything is read


def test_run_hands_the_command_its_namespace_and_cwd(system):
    (system.root / "work").mkdir()
    result = system.python(
        "import rt; print(rt.getcwd()); print(rt.schemes()); print(rt.listdir())",
        "--cwd", "/work", "--ns", "file,zero",
    )
    assert result.stdout.split("\n")[:3] == ["/work", "['file', 'zero']", "[]"]


def test_run_with_an_empty_namespace_cannot_open_absolute_paths(system):
    result = system.python(
        "import rt\n"
        "try:\n    rt.open('/x')\nexcept OSError as e:\n    print(e.errno)\n",
        "--ns", "",
    )
    assert result.stdout.strip() == str(errno.ENODEV)


def test_run_passes_the_exit_code_and_reports_bad_options(system):
    assert system.python("raise SystemExit(7)", check=False).returncode == 7
    bad = system.python("pass", "--ns", "file,nosuch", check=False)
    assert bad.returncode == 2 and "no scheme named 'nosuch'" in bad.stderr
    bad = system.run("--bogus", "--", sys.executable, "-c", "pass", check=False)
    assert bad.returncode == 2 and "No such option" in bad.stderr  # not a command to run
    bad = system.python("pass", "--cwd", "/nonexistent", check=False)
    assert bad.returncode == 1 and "--cwd" in bad.stderr


def test_spawned_children_inherit_clones_of_namespace_and_cwd(client):
    rt.mkdir("/kid")
    rt.chdir("/kid")
    child = rt.spawn([sys.executable, "-c",
                      ("import rt; rt.close(rt.open('made-by-child', rt.O_CREAT|rt.O_WRONLY));"
                       "print(rt.getcwd(), rt.schemes())")],
                     stdout=subprocess.PIPE, text=True)
    out, _ = child.communicate(timeout=30)
    assert out.strip() == f"/kid {BUILTIN}"
    assert (client.root / "kid/made-by-child").exists()
    assert rt.listdir() == ["made-by-child"]  # our own cwd is untouched


def test_the_example_client_runs(system):
    result = system.run("--", sys.executable, str(EXAMPLES / "hello.py"))
    assert "hello.txt" in result.stdout


def test_run_without_a_system_boots_a_private_one_and_stops_it(tmp_path):
    state = tmp_path / "none"
    root = tmp_path / "root"
    out = subprocess.run(
        [*REDOXCAP, "--state-dir", str(state), "run", "--root", str(root), "--",
         sys.executable, "-c", ("import rt, os; rt.close(rt.open('/made', rt.O_CREAT|rt.O_WRONLY));"
                                "print(os.getppid())")],
        capture_output=True, text=True, timeout=60, check=False)
    assert out.returncode == 0, out.stderr
    assert (root / "made").exists()
    assert not state.exists()
    leftovers = subprocess.run(["pgrep", "-f", f"--root {root}"], capture_output=True, text=True,
                               check=False)
    assert leftovers.stdout == ""


def test_down_stops_everything_and_up_refuses_twice(tmp_path):
    from tests.conftest import boot

    sys_ = boot(tmp_path)
    pids = sys_.pids()
    again = sys_.cli("up", "--detach", "--root", str(sys_.root), check=False)
    assert again.returncode == 4
    sys_.cli("down")
    for pid in pids:
        wait_for(lambda pid=pid: not pid_alive(pid))
    assert sorted(p.name for p in sys_.state_dir.iterdir()) == [control.LOG_NAME]
    gone = sys_.cli("status", check=False)
    assert gone.returncode == 3 and "no system is running" in gone.stderr
