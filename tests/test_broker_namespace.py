"""An unmodified program's opens through the namespace: the broker keeps each name's root
(as rt does), sees every change of the namespace at the next open, and a subtree entry
stays a boundary.

The changes are made by another holder of the same namespace handle: rt inside the
brokered program itself (a run hands it a clone of the namespace the broker serves).
"""

from __future__ import annotations

import os
import signal
import subprocess
import sys
import textwrap
from pathlib import Path

import pytest

from redoxcap.broker import available
from redoxcap.testing import REDOXCAP, System, booted, wait_for

pytestmark = pytest.mark.skipif(available() is not None, reason=str(available()))

PROJECT = str(Path(__file__).resolve().parent.parent)
SANDBOX = ("--ns", "file,zero,null", "--cwd", "/box", "--beneath", "--brokered", "--ro-host", PROJECT)

PROBE = """\
import errno, os, sys
import rt
from redoxcap.wire import ops
from redoxcap.wire.call import call

def probe(path):
    try:
        with open(path, "rb") as f:  # the broker answers this open, not rt
            return f.read(2).hex() or "empty"
    except OSError as exc:
        return errno.errorcode[exc.errno]

ns = rt.getns()
"""


@pytest.fixture(scope="module")
def system(tmp_path_factory):
    with booted(tmp_path_factory.mktemp("brokerns")) as system:
        (system.root / "secret.txt").write_text("the secret")
        (system.root / "box" / "sub" / "deeper").mkdir(parents=True)
        (system.root / "box" / "a.txt").write_text("alpha")
        (system.root / "box" / "sub" / "b.txt").write_text("beta")
        os.symlink("/secret.txt", system.root / "box" / "sub" / "abs_secret")
        os.symlink("/", system.root / "box" / "sub" / "to_top")
        os.symlink("../a.txt", system.root / "box" / "sub" / "rel_up")
        yield system


def brokered(system: System, code: str) -> list[str]:
    got = system.run(*SANDBOX, "--", sys.executable, "-c", PROBE + textwrap.dedent(code),
                     check=False)
    assert got.returncode == 0, got.stderr
    return got.stdout.split()


def test_a_change_of_the_namespace_is_seen_by_the_brokers_next_open(system):
    out = brokered(system, """
        print(probe("/scheme/zero"))  # zero's root is kept by the broker from here on
        rt.unregister(ns, "zero")
        print(probe("/scheme/zero"))
        _, (null,) = call(ns, ops.NS_ROOT, ["null", 0])
        rt.register(ns, "zero", null)  # the name again, another scheme behind it
        rt.close(null)
        print(probe("/scheme/zero"))
        rt.narrow(ns, rt.PERM_ALL & ~rt.PERM_INSERT)
        print(probe("/scheme/zero"))
        try:
            rt.register(ns, "again", rt.open("/box", rt.O_DIRECTORY))
            print("registered")
        except PermissionError:
            print("EACCES")
        """)
    assert out == ["0000", "ENOENT", "empty", "empty", "EACCES"]


def test_the_broker_opens_through_the_kept_root_without_asking_nsmgr(system):
    def nsmgr_frames_of(opens: int) -> int:
        before = system.daemon("nsmgr")["frames"]
        out = brokered(system, f"""
            for _ in range({opens}):
                assert probe("/scheme/zero") == "0000"
            print("done")
            """)
        assert out == ["done"]
        return system.daemon("nsmgr")["frames"] - before

    one, many = nsmgr_frames_of(1), nsmgr_frames_of(201)
    assert many - one < 50  # forwarded, 200 more opens would be 200 more frames at nsmgr


def test_a_subtree_entry_keeps_the_brokers_lookups_inside_it(system):
    out = brokered(system, """
        sub = rt.open("/box/sub", rt.O_DIRECTORY)
        rt.register(ns, "jail", sub)
        rt.close(sub)
        for path in ("/scheme/jail/b.txt", "/scheme/jail/../a.txt",
                     "/scheme/jail/../../secret.txt", "/scheme/jail/deeper/../../a.txt",
                     "/scheme/jail/abs_secret", "/scheme/jail/rel_up",
                     "/scheme/jail/to_top/b.txt", "/scheme/jail/to_top/../secret.txt"):
            print(probe(path))
        """)
    assert out == ["6265", "ENOENT", "ENOENT", "ENOENT", "ENOENT", "ENOENT", "6265", "ENOENT"]


def test_a_change_after_nsmgr_restarts_is_seen_by_the_brokers_next_open(tmp_path):
    with booted(tmp_path) as system:
        (system.root / "box").mkdir()
        code = PROBE + textwrap.dedent("""
            print(probe("/scheme/zero"), flush=True)  # kept: zero's root and the page
            sys.stdin.readline()  # nsmgr is killed and back meanwhile
            print(probe("/scheme/zero"))
            for attempt in range(2):  # one EIO: a request in flight when nsmgr died
                try:
                    rt.unregister(ns, "zero")
                    break
                except OSError as exc:
                    assert exc.errno == errno.EIO, exc
            print(probe("/scheme/zero"))
            """)
        program = subprocess.Popen(
            [*REDOXCAP, "--state-dir", str(system.state_dir), "run", *SANDBOX, "--",
             sys.executable, "-c", code],
            stdin=subprocess.PIPE, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
        try:
            assert program.stdout.readline().split() == ["0000"]
            old = system.daemon("nsmgr")["pid"]
            os.kill(old, signal.SIGKILL)
            wait_for(lambda: system.daemon("nsmgr").get("pid") not in (None, old), timeout=10)
            out, err = program.communicate("go\n", timeout=60)
        finally:
            if program.poll() is None:
                program.kill()
                program.communicate()
        assert program.returncode == 0, err
        assert out.split() == ["0000", "ENOENT"]
