"""Native lookups: a file scheme hands the broker, and never a program, a host directory.

HOSTDIR answers only with the system's directfs grant passed along; the
broker asks it only of its trusted file schemes; what the broker looks up
natively answers as the scheme would (escapes, symlinks, `..`, read-only
mounts); and a program, brokered or not, gets no host directory fd.
"""

from __future__ import annotations

import errno
import json
import os
import stat
import sys
import textwrap

import pytest

import rt
from redoxcap import control
from redoxcap.testing import booted, installed
from redoxcap.wire import protocol as P
from redoxcap.wire.call import call

SANDBOX = ("--ns", "", "--cwd", "/box", "--beneath")


@pytest.fixture(scope="module")
def system(tmp_path_factory):
    """A system with the box in its file root, a secret beside it, a read-only mount `ro`
    and the same directory as `routed` (:nopassthrough)."""
    base = tmp_path_factory.mktemp("native")
    ro = base / "ro"
    ro.mkdir()
    (ro / "kept.txt").write_text("read only")
    with booted(base, "--mount", f"ro={ro}:ro", "--mount", f"routed={ro}:nopassthrough") as s:
        (s.root / "secret.txt").write_text("the secret")
        box = s.root / "box"
        (box / "sub").mkdir(parents=True)
        (box / "a.txt").write_text("alpha\n")
        (box / "sub" / "b.txt").write_text("beta\n")
        os.symlink("sub/b.txt", box / "rel_link")
        os.symlink("../secret.txt", box / "up_link")
        os.symlink("/secret.txt", box / "abs_link")
        yield s


def brokered(system, code: str, *options: str):
    return system.run(*SANDBOX, *options, "--env", "LANG=C.UTF-8", "--", sys.executable, "-c",
                      textwrap.dedent(code), check=False)


def test_hostdir_answers_only_with_the_grant_and_only_where_passthrough_is_allowed(system):
    _, fds = control.request(system.state_dir, "directfs")
    grant = fds[0]
    with installed(system):
        root = rt.open("/", os.O_RDONLY | os.O_DIRECTORY)
        sub = rt.open("/box/sub", os.O_RDONLY | os.O_DIRECTORY | P.O_RESOLVE_BENEATH)
        ro = rt.open("/scheme/ro", os.O_RDONLY | os.O_DIRECTORY)
        routed = rt.open("/scheme/routed", os.O_RDONLY | os.O_DIRECTORY)
        forged = os.memfd_create("not-the-grant")
        try:
            # what a client has to offer is never the grant: nothing, a file, a capability
            for passed in ([], [forged], [root], [rt.getns()]):
                with pytest.raises(PermissionError):
                    call(root, P.HOSTDIR, [], passed)
            value, dirs = call(root, P.HOSTDIR, [], [grant])
            try:  # the root is its own anchor, in-root; an O_PATH directory, nothing more
                assert value == {"beneath": False, "read_only": False} and len(dirs) == 1
                assert os.readlink(f"/proc/self/fd/{dirs[0]}") == str(system.root)
                assert os.get_blocking(dirs[0]) is not None and os.listdir(str(system.root))
                with pytest.raises(OSError) as info:
                    os.listdir(dirs[0])  # O_PATH: not even a listing of its own
                assert info.value.errno == errno.EBADF
            finally:
                P.close_fds(dirs)
            value, dirs = call(sub, P.HOSTDIR, [], [grant])
            try:  # opened beneath: its own anchor, with RESOLVE_BENEATH rules
                assert value == {"beneath": True, "read_only": False} and len(dirs) == 1
            finally:
                P.close_fds(dirs)
            value, dirs = call(ro, P.HOSTDIR, [], [grant])
            P.close_fds(dirs)
            assert value["read_only"] is True
            with pytest.raises(OSError) as info:  # every lookup of this mount stays routed
                call(routed, P.HOSTDIR, [], [grant])
            assert info.value.errno == errno.EOPNOTSUPP
            f = rt.open("/box/a.txt")
            with pytest.raises(NotADirectoryError):
                call(f, P.HOSTDIR, [], [grant])
            rt.close(f)
        finally:
            os.close(forged)
            os.close(grant)
            for fd in (root, sub, ro, routed):
                rt.close(fd)


HOLDS_NO_HOST_DIRECTORY = """
    import errno, json, os, socket, stat
    from redoxcap.wire import protocol as P
    from redoxcap.wire.call import call
    results = {}
    cwd = int(os.environ["REDOXCAP_CWD_FD"])
    forged = os.memfd_create("forged-grant")
    for name, passed in (("none", []), ("forged", [forged]), ("cwd", [cwd])):
        try:
            call(cwd, P.HOSTDIR, [], passed)
            results[name] = "answered"
        except OSError as exc:
            results[name] = errno.errorcode[exc.errno]
    # lookups of every kind, native and not, then every fd the program holds
    os.stat("a.txt"); os.stat("sub/b.txt"); os.readlink("rel_link")
    kept = [os.open("a.txt", os.O_RDONLY), os.open(".", os.O_RDONLY | os.O_DIRECTORY),
            os.open("sub", os.O_PATH), os.open("sub/b.txt", os.O_RDWR)]
    os.chdir("sub"); os.stat("b.txt"); os.chdir("..")
    host_dirs = []
    for fd in range(1024):
        try:
            os.fstat(fd)
        except OSError:
            continue
        try:
            socket.socket(fileno=os.dup(fd)).close()  # a capability (or a socket): not a host dir
        except OSError as exc:
            if exc.errno == errno.ENOTSOCK and stat.S_ISDIR(os.fstat(fd).st_mode):
                host_dirs.append(fd)
    results["host directories"] = host_dirs
    for name in ("../secret.txt", "up_link", "abs_link", "sub/../../secret.txt", "/secret.txt"):
        try:
            results[name] = open(name).read()
        except OSError as exc:
            results[name] = errno.errorcode[exc.errno]
    print(json.dumps(results))
"""


def test_a_brokered_program_cannot_get_or_use_a_host_directory(system):
    got = brokered(system, HOLDS_NO_HOST_DIRECTORY)
    results = json.loads(got.stdout)
    assert results["none"] == results["forged"] == results["cwd"] == "EPERM", got.stderr
    assert results["host directories"] == []
    # beneath /box as the scheme says: out is EXDEV, `/` is the namespace (empty here)
    assert results["../secret.txt"] == results["up_link"] == results["sub/../../secret.txt"] == "EXDEV"
    assert results["abs_link"] == "EXDEV" and results["/secret.txt"] == "ENOENT"


# A scheme of the program's own, which would like the broker's grant: the broker must never
# ask it for a host directory, or pass anything along to it.
LURE = """
    import json, os, stat, sys, threading, trio
    import rt
    from redoxcap.schemes.framework import Opened, Reply, Scheme, SchemeError, serve
    from redoxcap.wire import protocol as P
    from redoxcap.wire.stat import Stat

    seen = []

    class Lure(Scheme):
        inline_ops = frozenset(P.SCHEME_OPS)

        def note(self, req, op):
            seen.append([op, len(req.passed)])

        async def openat(self, req, h, path, flags, mode):
            self.note(req, "openat")
            return Opened(object())

        async def statat(self, req, h, path, flags):
            self.note(req, "statat")
            return Stat(st_mode=stat.S_IFREG | 0o644, st_size=5)

        async def fstat(self, req, h):
            self.note(req, "fstat")
            return Stat(st_mode=stat.S_IFDIR | 0o755)

        async def fpath(self, req, h):
            return "/scheme/lure"

        async def hostdir(self, req, h):
            self.note(req, "hostdir")
            raise SchemeError(95)

    channel = rt.mkscheme("lure")
    threading.Thread(target=trio.run, args=(serve, Lure(), channel), daemon=True).start()
    os.stat("a.txt")  # native, in the box
    os.chdir("/scheme/lure")
    print(os.getcwd(), os.stat("x").st_size, flush=True)
    print(json.dumps(seen))
"""


def test_the_broker_never_offers_the_grant_to_a_scheme_of_the_program_s_own(system):
    got = brokered(system, LURE)
    lines = got.stdout.splitlines()
    assert lines[0] == "/scheme/lure 5", got.stderr
    seen = json.loads(lines[1])
    assert ["statat", 0] in seen  # the stat in its directory went to it, routed
    assert not [op for op, passed in seen if op == "hostdir" or passed], seen


READ_ONLY = """
    import errno, os, sys
    path = os.path.join(sys.argv[1], "kept.txt")
    out = [open(path).read(), open("kept.txt").read()]
    for name in (path, "kept.txt"):
        for flags in (os.O_WRONLY, os.O_RDWR, os.O_RDONLY | os.O_TRUNC, os.O_WRONLY | os.O_APPEND):
            try:
                os.open(name, flags)
                out.append("opened")
            except OSError as exc:
                out.append(errno.errorcode[exc.errno])
    fd = os.open(path, os.O_RDONLY)
    try:
        os.write(fd, b"x")
    except OSError as exc:
        out.append(errno.errorcode[exc.errno])
    print(out)
"""


def test_a_read_only_directory_looked_up_natively_stays_read_only(system, tmp_path):
    ro = system.root.parent / "ro"
    trace = tmp_path / "trace.jsonl"
    got = system.run("--dir", f"{ro}:ro", f"--trace={trace}", "--trace-json", "--",
                     sys.executable, "-c", textwrap.dedent(READ_ONLY), str(ro), check=False)
    assert got.stdout.strip() == str(["read only"] * 2 + ["EROFS"] * 8 + ["EBADF"]), got.stderr
    assert (ro / "kept.txt").read_text() == "read only"
    records = [json.loads(line) for line in trace.read_text().splitlines()]
    # the reads were native (the directory's scheme handed over its host directory) ...
    assert any(r["op"] == "HOSTDIR" and "'read_only': True" in r["result"] for r in records), records
    assert not any(r["op"] == "OPENAT" and r["about"] == "kept.txt" and r["result"].startswith("handle")
                   for r in records)
    # ... and every write went to the scheme, which refused it
    assert [r for r in records if r["op"] == "OPENAT" and r["result"] == "EROFS"]


def test_a_run_with_a_directory_knows_before_its_program_starts_that_it_has_no_file(system,
                                                                                     tmp_path):
    """`run --dir`: the namespace holds no `file`, and the broker learns so (and keeps it)
    while the program confines itself, so that the program's first lookup outside its
    directory (a dynamically linked program's is /etc/ld.so.preload) asks nsmgr nothing."""
    work = tmp_path / "work"
    work.mkdir()
    trace = tmp_path / "trace.jsonl"
    got = system.run("--dir", str(work), f"--trace={trace}", "--trace-json", "--", sys.executable,
                     "-S", "-c", "import os; print(os.path.exists('/no/such/file'))", check=False)
    assert got.stdout.split() == ["False"], got.stderr
    records = [json.loads(line) for line in trace.read_text().splitlines()]
    started = min(r["time"] for r in records if r["op"] == "execve")
    asked = [r for r in records if r["op"] in ("NS_ROOT", "NS_LIST") or
             r["about"].startswith("/scheme/file")]
    assert [r["result"] for r in asked if r["about"] == "file"] == ["ENODEV", "ENODEV"], records
    assert all(r["time"] < started for r in asked), records
    assert any(r["op"] == "access" and r["result"] == "ENOENT" for r in records), records


def test_native_and_routed_lookups_answer_alike(system, tmp_path):
    code = """
        import errno, json, os
        out = {}
        for name in ("a.txt", "sub/b.txt", "rel_link", "sub/../a.txt", "sub/", "a.txt/", "nope",
                     "sub/nope/x", "up_link", "abs_link", ".", "sub/.."):
            for follow in (True, False):
                try:
                    st = os.stat(name, follow_symlinks=follow)
                    out[f"{name} {follow}"] = [st.st_mode, st.st_size, st.st_ino]
                except OSError as exc:
                    out[f"{name} {follow}"] = errno.errorcode[exc.errno]
            try:
                with open(name) as f:
                    out[f"{name} read"] = f.read()
            except OSError as exc:
                out[f"{name} read"] = errno.errorcode[exc.errno]
            try:
                out[f"{name} link"] = os.readlink(name)
            except OSError as exc:
                out[f"{name} link"] = errno.errorcode[exc.errno]
        print(json.dumps(out))
    """
    native_run = brokered(system, code)
    routed_run = brokered(system, code, "--no-passthrough")
    native, routed = json.loads(native_run.stdout), json.loads(routed_run.stdout)
    assert native == routed
    assert native["rel_link read"] == "beta\n" and native["up_link True"] == "EXDEV"
    assert native["a.txt/ True"] == "ENOTDIR" and native["nope True"] == "ENOENT"
    assert stat.S_ISLNK(native["rel_link False"][0])


RENAME_RACE = """
    import os, threading
    os.makedirs("race/a/b", exist_ok=True)
    stop = threading.Event()

    def rename_forever():
        # directories moved about and a symlink swapped between in and out, under the lookups
        while not stop.is_set():
            try:
                os.rename("race/a", "race/c")
                os.rename("race/c", "race/a")
                os.rename("race/a/b", "race/b")
                os.rename("race/b", "race/a/b")
                os.symlink("../secret.txt", "race/tmp_link")
                os.rename("race/tmp_link", "race/link")
                os.symlink("a", "race/tmp_link")
                os.rename("race/tmp_link", "race/link")
            except OSError:
                pass

    thread = threading.Thread(target=rename_forever)
    thread.start()
    leaked = 0
    names = ("race/a/b/../../../../secret.txt", "race/a/../../secret.txt", "race/link",
             "race/link/../../secret.txt", "race/a/b/../../link")
    for i in range(2000):
        name = names[i % len(names)]
        try:
            with open(name) as f:
                leaked += "the secret" in f.read()
        except OSError:
            pass
        try:
            leaked += os.stat(name).st_size == len("the secret")
        except OSError:
            pass
    stop.set()
    thread.join()
    print("leaked", leaked)
"""


@pytest.mark.parametrize("mode", [(), ("--no-passthrough",)], ids=["native", "routed"])
def test_a_racing_rename_never_leads_a_lookup_out(system, mode):
    got = brokered(system, RENAME_RACE, *mode)
    assert got.stdout.split() == ["leaked", "0"], got.stderr
