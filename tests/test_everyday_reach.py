"""What a program in a sandboxed host directory can and cannot reach, and the clear errors
of `redoxcap run --dir` (the programs themselves are in test_everyday.py).

Scripts and binaries inside run; what lies outside (a sibling, symlinks and
`..` out, exec through a symlink swapped by a racing rename, chmod and utime
through a racing symlink) stays out of reach; each directory is at its own
path with a private /tmp; mistakes get clear errors.
"""

from __future__ import annotations

import os
import shutil
import stat
import subprocess
import sys
import textwrap
from pathlib import Path

import pytest
from test_everyday import BASE_PYTHON, sandboxed

from redoxcap.broker import available
from redoxcap.testing import REDOXCAP, file_daemons, wait_for

pytestmark = pytest.mark.skipif(available() is not None, reason=str(available()))


# -- programs inside the sandbox, and what they cannot reach ----------------------------


def test_scripts_and_binaries_inside_run_and_a_symlink_out_does_not(redoxcap_module_system, tmp_path):
    project, outside = tmp_path / "proj", tmp_path / "outside"
    (project / "sub").mkdir(parents=True)
    outside.mkdir()
    marker = outside / "ran"
    (outside / "evil.sh").write_text(f"#!/bin/sh\ntouch {marker}\n")
    (outside / "evil.sh").chmod(0o755)
    (project / "run.sh").write_text('#!/bin/sh\necho "run.sh in $(pwd)"\n')
    (project / "run.sh").chmod(0o755)
    shutil.copy(project / "run.sh", project / "sub" / "run.sh")
    os.symlink(outside / "evil.sh", project / "evil")
    os.symlink("/usr/bin/true", project / "true")
    script = "./run.sh; (cd sub && ./run.sh); ./true && echo true ran; ./evil; echo evil=$?"
    got = sandboxed(redoxcap_module_system, project, ["sh", "-c", script])
    assert got.stdout.splitlines() == [f"run.sh in {project}", f"run.sh in {project}/sub",
                                       "true ran", "evil=127"], got.stderr
    assert not marker.exists()


RENAME_RACE = textwrap.dedent("""
    import os, subprocess, sys, threading
    stop = False
    def swap():
        while not stop:
            os.replace("good", "prog")
            os.symlink(sys.argv[1], "evil.tmp")
            os.replace("evil.tmp", "prog")
            with open("good", "w") as f:
                f.write("#!/bin/sh\\nexit 0\\n")
            os.chmod("good", 0o755)
    threading.Thread(target=swap, daemon=True).start()
    outcomes = {}
    for _ in range(int(sys.argv[2])):
        try:
            code = subprocess.run(["./prog"]).returncode
        except OSError as exc:
            code = exc.strerror
        outcomes[code] = outcomes.get(code, 0) + 1
    stop = True
    print(sorted(outcomes.items(), key=str))
""")


def test_a_racing_rename_never_execs_what_lies_outside(redoxcap_module_system, tmp_path):
    """The broker checks ./prog and lets the kernel exec it; a thread swaps in a symlink to a
    host script outside meanwhile. Landlock checks the file the kernel resolved: the outside
    script never runs, however the race goes."""
    project, outside = tmp_path / "race", tmp_path / "outside"
    project.mkdir()
    outside.mkdir()
    marker = outside / "ran"
    (outside / "evil.sh").write_text(f"#!/bin/sh\ntouch {marker}\n")
    (outside / "evil.sh").chmod(0o755)
    (project / "good").write_text("#!/bin/sh\nexit 0\n")
    (project / "good").chmod(0o755)
    got = sandboxed(redoxcap_module_system, project, [BASE_PYTHON, "-c", RENAME_RACE, str(outside / "evil.sh"), "150"])
    assert got.returncode == 0, got.stderr
    assert "(0," in got.stdout, got.stdout  # the good one ran, so the race was live
    assert not marker.exists()


def test_what_was_not_handed_is_absent_and_cannot_be_written(redoxcap_module_system, tmp_path):
    project, sibling = tmp_path / "proj", tmp_path / "sibling"
    project.mkdir()
    sibling.mkdir()
    (sibling / "secret.txt").write_text("the secret")
    os.symlink(sibling / "secret.txt", project / "abs-link")
    os.symlink("../sibling/secret.txt", project / "rel-link")
    attempts = {
        "cat ../sibling/secret.txt": "No such file or directory",
        f"cat {sibling}/secret.txt": "No such file or directory",
        "cat abs-link": "No such file or directory",
        "cat rel-link": "No such file or directory",
        "cat /etc/gitconfig": "No such file or directory",
        "echo x > ../escaped.txt": "Permission denied",
        # beside the handed directory nothing is there, so no directory to create in
        f"echo x > {sibling}/escaped.txt": "Directory nonexistent",
        "mkdir /etc/x": "Permission denied",
        "echo x > /usr/escaped.txt": "Read-only file system",
        "ls ..": "Permission denied",
    }
    for command, message in attempts.items():
        got = sandboxed(redoxcap_module_system, project, ["sh", "-c", command])
        assert got.returncode != 0 and message in got.stderr, (command, got.stderr)
        assert "the secret" not in got.stdout
    assert sorted(p.name for p in tmp_path.iterdir()) == ["proj", "sibling"]
    assert sorted(p.name for p in sibling.iterdir()) == ["secret.txt"]


def test_metadata_changes_stay_inside_and_never_make_set_uid_files(redoxcap_module_system, tmp_path):
    project, sibling = tmp_path / "proj", tmp_path / "sibling"
    project.mkdir()
    sibling.mkdir()
    (sibling / "secret.txt").write_text("the secret")
    (sibling / "secret.txt").chmod(0o600)
    os.symlink(sibling / "secret.txt", project / "abs-link")
    (project / "tool").write_text("x")
    script = ("chmod 4755 tool; chmod g+s tool; stat -c %a tool; chmod 666 abs-link; "
              "touch -d @1 abs-link; chown 4242 tool; echo chown=$?; chmod 644 /usr/bin/env")
    got = sandboxed(redoxcap_module_system, project, ["sh", "-c", script])
    assert got.stdout.splitlines()[0] == "755", got.stdout
    assert "chown=1" in got.stdout
    assert "Read-only file system" in got.stderr
    assert stat.S_IMODE((sibling / "secret.txt").stat().st_mode) == 0o600
    assert (sibling / "secret.txt").stat().st_mtime > 1_000_000
    assert (project / "tool").stat().st_uid == os.getuid()


def test_a_read_only_dir_answers_erofs_and_its_files_keep_their_metadata(redoxcap_module_system, tmp_path):
    project, data = tmp_path / "proj", tmp_path / "data"
    project.mkdir()
    data.mkdir()
    (data / "f").write_text("data\n")
    before = (data / "f").stat()
    script = (f"cat {data}/f; echo x > {data}/g; touch {data}/f; chmod 777 {data}/f; "
              f"rm {data}/f; ls {data}")
    got = redoxcap_module_system.run("--dir", str(project), "--dir", f"{data}:ro", "--", "sh", "-c", script,
                     check=False)
    assert got.stdout == "data\nf\n", got.stderr
    assert got.stderr.count("Read-only file system") == 4, got.stderr
    after = (data / "f").stat()
    assert (after.st_mode, after.st_mtime_ns) == (before.st_mode, before.st_mtime_ns)


def test_each_dir_is_at_its_own_path_and_tmp_is_private(redoxcap_module_system, tmp_path):
    one, two = tmp_path / "one", tmp_path / "two"
    one.mkdir()
    two.mkdir()
    (two / "f").write_text("two\n")
    script = (f"pwd; cat {two}/f; echo mine > /tmp/x; cat /tmp/x; ls /tmp; echo $TMPDIR; "
              f"cd {two} && pwd && ls")
    got = redoxcap_module_system.run("--dir", str(one), "--dir", str(two), "--", "sh", "-c", script)
    assert got.stdout.splitlines() == [str(one), "two", "mine", "x", "/tmp", str(two), "f"]
    assert not Path("/tmp/x").exists() or Path("/tmp/x").read_text() != "mine\n"


def daemons_of(system) -> list[str]:
    """The command lines of the file scheme daemons the system forked for runs (serving)."""
    return [line for _, line in file_daemons(system)]


def test_the_private_tmp_daemon_starts_when_the_program_first_uses_tmp(redoxcap_module_system):
    script = "echo ready; read go; echo mine > /tmp/f; cat /tmp/f; read done"
    run = redoxcap_module_system.start("run", "--", "sh", "-c", script)
    try:
        assert run.stdout.readline() == "ready\n"
        # the system forks a run's daemons: none of /tmp until it is asked for
        assert daemons_of(redoxcap_module_system) == []
        run.stdin.write("go\n")
        run.stdin.flush()
        assert run.stdout.readline() == "mine\n"
        served = daemons_of(redoxcap_module_system)
        assert len(served) == 1 and "--name tmp" in served[0], served
        run.stdin.write("done\n")
        run.stdin.flush()
        assert run.wait(60) == 0, run.stderr.read()
    finally:
        if run.poll() is None:
            run.kill()
            run.wait()


def test_a_dirs_daemon_starts_beside_the_run_not_before_it(redoxcap_module_system, tmp_path):
    """The run does not wait for a --dir's daemon (the program's cwd, the directory's top,
    is a root the router makes), but starts it at once: nearly every program looks in its
    directory first thing. It serves what the program asks meanwhile."""
    (tmp_path / "f").write_text("here\n")
    run = redoxcap_module_system.start("run", "--dir", str(tmp_path), "--", "sh", "-c",
                                       "echo ready; read go; cat f; pwd")
    try:
        assert run.stdout.readline() == "ready\n"
        served = wait_for(lambda: daemons_of(redoxcap_module_system), timeout=30)  # not asked yet
        assert len(served) == 1 and "--name dir" in served[0], served
        run.stdin.write("go\n")
        run.stdin.flush()
        assert run.stdout.read() == f"here\n{tmp_path}\n"
        assert run.wait(60) == 0, run.stderr.read()
    finally:
        if run.poll() is None:
            run.kill()
            run.wait()


def test_an_rt_program_sees_the_dir_at_its_path_without_the_broker(redoxcap_module_system, tmp_path):
    project = tmp_path / "rt-proj"
    project.mkdir()
    (project / "a.txt").write_text("alpha\n")
    code = ("import rt; print(rt.getcwd(), rt.listdir());"
            f"print(rt.open_file('{project}/a.txt').read(), end='');"
            "rt.chmod('a.txt', 0o600); rt.utime('a.txt', (1, 2_000_000_000));"
            "print(sorted(rt.schemes()))")
    got = redoxcap_module_system.run("--dir", str(project), "--no-broker", "--", sys.executable, "-c", code)
    lines = got.stdout.splitlines()
    assert lines[:2] == [f"{project} ['a.txt']", "alpha"]
    assert "file" not in lines[2]
    st = (project / "a.txt").stat()
    assert (stat.S_IMODE(st.st_mode), st.st_mtime_ns) == (0o600, 2_000_000_000)


def test_the_dir_daemons_go_when_the_run_ends(redoxcap_module_system, tmp_path):
    project = tmp_path / "gone"
    project.mkdir()
    redoxcap_module_system.run("--dir", str(project), "--", "true")
    ps = subprocess.run(["ps", "-eo", "args"], capture_output=True, text=True, check=True).stdout
    assert str(project) not in ps


# -- clear errors ---------------------------------------------------------------------


def test_a_missing_command_is_127_command_not_found(redoxcap_module_system, tmp_path):
    got = redoxcap_module_system.run("--dir", str(tmp_path), "--", "no-such-command-here", check=False)
    assert got.returncode == 127 and "no-such-command-here: command not found" in got.stderr


def test_options_are_checked_before_anything_runs(redoxcap_module_system, tmp_path):
    got = redoxcap_module_system.run("--dir", str(tmp_path / "missing"), "--", "true", check=False)
    assert got.returncode == 2 and "does not exist" in got.stderr
    got = redoxcap_module_system.run("--cwd", str(tmp_path), "--", "true", check=False)
    assert got.returncode != 0 and f"--dir {tmp_path}" in got.stderr
    state = tmp_path / "state"
    for args, message in [(["up", "--root", str(tmp_path / "no" / "such")], "does not exist"),
                          (["up", "--mount", f"bad name={tmp_path}"], "mount name"),
                          (["run", "--mount", f"bad name={tmp_path}", "--", "true"], "mount name")]:
        got = subprocess.run([*REDOXCAP, "--state-dir", str(state), *args], capture_output=True,
                             text=True, timeout=60, check=False)
        assert got.returncode == 2 and message in got.stderr, (args, got.stderr)
    assert not (tmp_path / "no").exists()


def test_a_private_system_boots_for_a_dir_run_and_leaves_nothing(tmp_path):
    project = tmp_path / "p"
    project.mkdir()
    state = tmp_path / "state"
    env = dict(os.environ, XDG_DATA_HOME=str(tmp_path / "data"))
    got = subprocess.run([*REDOXCAP, "--state-dir", str(state), "run", "--dir", str(project), "--",
                          "sh", "-c", "echo made > out.txt && pwd"], capture_output=True, text=True,
                         timeout=120, check=False, env=env)
    assert (got.returncode, got.stdout) == (0, f"{project}\n"), got.stderr
    assert (project / "out.txt").read_text() == "made\n"
    assert not (state / "control.sock").exists()


def test_dev_tty_is_the_terminal_the_program_was_given(redoxcap_module_system, tmp_path):
    master, slave = os.openpty()
    try:
        got = redoxcap_module_system.run("--dir", str(tmp_path), "--", "sh", "-c", "echo to-the-tty > /dev/tty",
                         stdin=slave, check=False)
        assert got.returncode == 0, got.stderr
        assert b"to-the-tty" in os.read(master, 1024)
    finally:
        os.close(master)
        os.close(slave)
    got = redoxcap_module_system.run("--dir", str(tmp_path), "--", "sh", "-c", "echo x > /dev/tty",
                     stdin=subprocess.DEVNULL, check=False)
    assert got.returncode != 0 and "No such device or address" in got.stderr


CHMOD_RACE = textwrap.dedent("""
    import os, sys, threading
    outside, rounds = sys.argv[1], int(sys.argv[2])
    stop = False
    def swap():
        while not stop:
            os.symlink(outside, "flip.tmp")
            os.replace("flip.tmp", "flip")
            with open("flip.tmp", "w") as f:
                f.write("mine")
            os.replace("flip.tmp", "flip")
    open("flip", "w").close()
    threading.Thread(target=swap, daemon=True).start()
    changed = 0
    for _ in range(rounds):
        for call in (lambda: os.chmod("flip", 0o777), lambda: os.utime("flip", (1, 1))):
            try:
                call()
                changed += 1
            except OSError:
                pass
    stop = True
    print(changed)
""")


def test_a_racing_symlink_never_lets_chmod_or_utime_reach_outside(redoxcap_module_system, tmp_path):
    project, outside = tmp_path / "proj", tmp_path / "outside"
    project.mkdir()
    outside.mkdir()
    secret = outside / "secret.txt"
    secret.write_text("the secret")
    secret.chmod(0o600)
    before = secret.stat()
    got = sandboxed(redoxcap_module_system, project, [BASE_PYTHON, "-c", CHMOD_RACE, str(secret), "300"])
    assert got.returncode == 0 and int(got.stdout) > 0, got.stderr  # its own file did change
    after = secret.stat()
    assert (after.st_mode, after.st_mtime_ns) == (before.st_mode, before.st_mtime_ns)


def test_files_a_program_makes_have_the_modes_its_umask_says(redoxcap_module_system, tmp_path):
    """As on the host: the program's umask (as it last set it) takes bits off what it creates;
    the file scheme never grants group or other write."""
    out = redoxcap_module_system.run(
        "--dir", str(tmp_path), "--", "sh", "-c",
        "umask 077; touch private; mkdir privdir; umask 022; touch shared; "
        "umask 0; touch open; python3 -c 'import os; os.open(\"byopen\", os.O_CREAT | os.O_WRONLY, 0o640)'")
    assert out.returncode == 0, out.stderr
    modes = {p.name: p.stat().st_mode & 0o777 for p in tmp_path.iterdir()}
    assert modes == {"private": 0o600, "privdir": 0o700, "shared": 0o644, "open": 0o644,
                     "byopen": 0o640}
