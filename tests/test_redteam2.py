"""Holes found by the second red-team pass of `redoxcap run --dir D` (each test fails while
the hole is open).

The attacker is the confined program; what it must not reach is anything outside D, its
private /tmp and the read-only host trees the docs list (docs/sandbox.md), nor any process
outside the run.
"""

from __future__ import annotations

import os
import pty
import shutil
import subprocess
import sys
import time

import pytest
from test_everyday import sandboxed

from redoxcap.broker import available

pytestmark = pytest.mark.skipif(available() is not None, reason=str(available()))


def test_a_read_only_dir_inside_a_handed_one_is_not_written_through_it(redoxcap_module_system,
                                                                        tmp_path):
    """docs/sandbox.md: "`:ro` answers every write with EROFS". With `--dir P --dir P/ro:ro`,
    an absolute path into P/ro was EROFS (the deepest handed directory wins), but the same
    file named relative to the cwd (P, the first --dir) went to P's writable capability,
    which serves P/ro like any subdirectory: the program appended to, truncated, removed
    and chmodded files of the directory handed read-only. Such a run is refused now,
    saying why, before anything runs."""
    project = tmp_path / "proj"
    ro = project / "ro"
    ro.mkdir(parents=True)
    (ro / "f").write_text("orig\n")
    (ro / "f").chmod(0o644)
    (ro / "g").write_text("keep\n")
    got = sandboxed(redoxcap_module_system, project,
                    ["sh", "-c", ('echo abs >> "$PWD/ro/f"; echo rel >> ro/f; chmod 600 ro/f; '
                                 'rm -f ro/g; true')],
                    "--dir", f"{ro}:ro")
    assert got.returncode == 2 and "lies in --dir" in got.stderr and "writable" in got.stderr, got.stderr
    assert (ro / "f").read_text() == "orig\n", got.stderr
    assert (ro / "f").stat().st_mode & 0o777 == 0o644
    assert (ro / "g").exists()


WINSZ = r"""
#include <sys/ioctl.h>
#include <stdio.h>
int main(void) {
  struct winsize w = {.ws_row = 11, .ws_col = 22};
  printf("TIOCSWINSZ %d\n", ioctl(0, TIOCSWINSZ, &w));
  return 0;
}
"""


@pytest.mark.skipif(shutil.which("cc") is None, reason="needs a C compiler")
def test_the_terminal_ioctls_signal_no_process_outside_the_run(redoxcap_module_system, tmp_path):
    """docs/sandbox.md: "signals stay inside the sandbox (Landlock)", "no signals outside
    the sandbox (Landlock scopes)", and "signalling a process outside the run" is out of its
    reach. But TIOCSWINSZ is on the ioctl allow-list, and the kernel answers a window size
    change of a terminal with SIGWINCH to that terminal's foreground process group: a
    program given a terminal as fd 0 (`run` in an interactive shell) has the kernel signal
    the processes outside the run that own it, which Landlock's scope does not see (it
    checks only the signals a process sends itself). Here the foreground process outside
    the run counts its SIGWINCHes."""
    project = tmp_path / "proj"
    project.mkdir()
    (project / "winsz.c").write_text(WINSZ)
    subprocess.run(["cc", "-o", str(project / "winsz"), str(project / "winsz.c")], check=True)
    flag = tmp_path / "winched"
    master, slave = pty.openpty()
    victim = subprocess.Popen([sys.executable, "-c", f"""
import os, signal, time
os.setsid()
fd = os.open({os.ttyname(slave)!r}, os.O_RDWR)  # its controlling terminal, it in the foreground
signal.signal(signal.SIGWINCH, lambda *a: open({str(flag)!r}, 'a').write('WINCH\\n'))
print('ready', flush=True)
time.sleep(30)
"""], stdout=subprocess.PIPE, text=True)
    try:
        assert victim.stdout.readline().strip() == "ready"
        got = sandboxed(redoxcap_module_system, project, ["./winsz"], stdin=slave)
        time.sleep(0.5)
        assert not flag.exists(), f"a process outside the run got SIGWINCH ({got.stdout!r})"
    finally:
        victim.kill()
        victim.wait()
        os.close(master)
        os.close(slave)


def test_a_symlink_in_the_handed_directory_grants_no_host_file(redoxcap_module_system, tmp_path):
    """docs/sandbox.md: the host trees are the defaults, the program's interpreters and what
    they need; "A tree inside a --dir directory (a venv in the project) is left to that
    directory". But host_trees_for takes, for argv[0] and for the `python3` and `python`
    the run's PATH finds, the *realpath* of each: a `python` inside the handed directory
    (an in-project venv's bin/ on PATH, as after `source .venv/bin/activate`) that is a
    symlink to any executable host file makes that file a host tree of the run, readable
    (and Landlock-granted). The directory is the program's to write, so one run plants the
    symlink and every later run in that directory reads the file (a script with a token,
    here beside the project)."""
    project = tmp_path / "proj"
    vbin = project / ".venv" / "bin"
    vbin.mkdir(parents=True)
    outside = tmp_path / "outside"
    outside.mkdir()
    secret = outside / "deploy.sh"
    secret.write_text("#!/bin/sh\nAPI_TOKEN=r2-deploy-token\n")
    secret.chmod(0o700)
    # what an earlier run in the directory may leave (it is the program's to write)
    (vbin / "python").symlink_to(secret)
    env = dict(os.environ, PATH=f"{vbin}:{os.environ.get('PATH', os.defpath)}")
    got = sandboxed(redoxcap_module_system, project, ["sh", "-c", f"cat {secret}"], env=env)
    assert "r2-deploy-token" not in got.stdout, got.stdout


def test_a_python_symlink_in_the_handed_directory_grants_no_host_directory(
        redoxcap_module_system, tmp_path):
    """As above, and worse: for a `python*` file, host_trees_for also grants its
    installation prefix, the directory two levels above the symlink's *target*. A `python`
    on PATH inside the handed directory that points at any executable named python* at
    DIR/x/python* (a wrapper in someone's ~/bin, an app's bundled interpreter) makes all of
    DIR readable to the run, its non-executable files included: here a notes file beside
    the interpreter's bin/. (Only /, /root, /home, /tmp, /etc and the directories holding
    the caller's cwd or $HOME are refused as prefixes: another user's home is not.)"""
    project = tmp_path / "proj"
    vbin = project / ".venv" / "bin"
    vbin.mkdir(parents=True)
    app = tmp_path / "outside" / "app"
    (app / "bin").mkdir(parents=True)
    tool = app / "bin" / "python-tool"
    tool.write_text("#!/bin/sh\n")
    tool.chmod(0o755)
    (app / "notes.txt").write_text("r2-private-notes\n")
    (vbin / "python").symlink_to(tool)
    env = dict(os.environ, PATH=f"{vbin}:{os.environ.get('PATH', os.defpath)}")
    got = sandboxed(redoxcap_module_system, project, ["sh", "-c", f"cat {app}/notes.txt"], env=env)
    assert "r2-private-notes" not in got.stdout, got.stdout


def test_an_o_path_open_of_a_host_tree_file_works(redoxcap_module_system, tmp_path):
    """Not a hole, a contradiction of docs/sandbox.md: the host trees are "the host file,
    read-only, served by the broker", and hostfs passed O_PATH on (_PASSED_FLAGS); but the
    broker installs the fd with SECCOMP_IOCTL_NOTIF_ADDFD, whose fget() refuses O_PATH
    files, so every `open(path, O_PATH)` of a host-tree path failed with EBADF (the same
    open in the handed directory works). A read-only fd stands in for it now."""
    project = tmp_path / "proj"
    project.mkdir()
    code = ("import os\n"
            "for p in ('/usr/bin', '/etc/passwd', '.'):\n"
            "    try:\n"
            "        os.fstat(os.open(p, os.O_PATH)); print(p, 'ok')\n"
            "    except OSError as e: print(p, e.errno)\n")
    got = sandboxed(redoxcap_module_system, project, [sys.executable, "-c", code])
    assert got.stdout.split("\n")[:3] == ["/usr/bin ok", "/etc/passwd ok", ". ok"], got.stdout
