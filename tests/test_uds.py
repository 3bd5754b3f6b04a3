"""uds scopes and capability passing through the real processes (one system for the module).

A run gets a private scope of its own unless `--uds-scope` shares one, so a
sandbox can neither reach another's listeners nor squat a name the system's
services use; and no uds capability ever waits in a uds queue, so a client
cannot make the daemon hold a handle open through a reference to itself.
"""

from __future__ import annotations

import errno
import os
import subprocess
import sys

import pytest

import rt
from redoxcap.testing import System, finish, spare_prepared, wait_for


def listen_until_stdin_closes(name: str) -> str:
    return (f"import rt, sys\nlistener = rt.open('/scheme/uds/{name}', rt.O_CREAT | rt.O_RDWR)\n"
            "print('listening', flush=True)\nsys.stdin.read()\nrt.close(listener)\n")


def connect(name: str) -> str:
    return (f"import rt\ntry:\n    rt.close(rt.open('/scheme/uds/{name}', rt.O_RDWR))\n"
            "    print('connected')\nexcept OSError as e:\n    print(e.errno)\n")


def start_run(system: System, code: str, *options: str) -> subprocess.Popen:
    """A confined `redoxcap run` of Python code in the background; its stdin keeps it waiting."""
    return system.start("run", *options, "--", sys.executable, "-c", code)


def listening(proc: subprocess.Popen) -> None:
    line = proc.stdout.readline()
    assert line == "listening\n", line + proc.stderr.read()


def test_sandboxes_with_their_own_scopes_cannot_reach_each_other(redoxcap_module_system):
    first = start_run(redoxcap_module_system, listen_until_stdin_closes("meet"), "--ns", "uds")
    try:
        listening(first)
        second = redoxcap_module_system.python(connect("meet"), "--ns", "uds")
        assert second.stdout.strip() == str(errno.ECONNREFUSED)
        # nor does the name clash: the second sandbox listens on it in its own scope
        again = redoxcap_module_system.python(listen_until_stdin_closes("meet"), "--ns", "uds", input="")
        assert again.stdout == "listening\n"
    finally:
        finish(first)


def test_a_sandbox_cannot_squat_the_name_of_a_system_service(redoxcap_module_client):
    service = rt.open("/scheme/uds/svc", rt.O_CREAT | rt.O_RDWR)  # in the system scope
    squatter = start_run(redoxcap_module_client, listen_until_stdin_closes("svc"), "--ns", "uds")
    try:
        listening(squatter)  # its own scope: no EADDRINUSE, and no clients of ours
        for _ in range(2):
            client = start_run(redoxcap_module_client,
                               "import rt; c = rt.open('/scheme/uds/svc', rt.O_RDWR)\n"
                               "rt.write(c, b'secret'); print(rt.read(c, 10).decode())",
                               "--ns", "uds", "--uds-scope", "system")
            conn = rt.dup(service, b"accept")
            assert rt.read(conn, 10) == b"secret"
            rt.write(conn, b"got it")
            assert finish(client) == "got it\n"
            rt.close(conn)
    finally:
        finish(squatter)
        rt.close(service)


def test_runs_that_name_one_scope_share_it(redoxcap_module_system):
    server = start_run(redoxcap_module_system, listen_until_stdin_closes("meet"), "--ns", "uds", "--uds-scope", "team")
    try:
        listening(server)
        same = redoxcap_module_system.python(connect("meet"), "--ns", "uds", "--uds-scope", "team")
        assert same.stdout.strip() == "connected"
        other = redoxcap_module_system.python(connect("meet"), "--ns", "uds", "--uds-scope", "other")
        assert other.stdout.strip() == str(errno.ECONNREFUSED)
        system = redoxcap_module_system.python(connect("meet"), "--ns", "uds", "--uds-scope", "system")
        assert system.stdout.strip() == str(errno.ECONNREFUSED)
    finally:
        finish(server)
    bad = redoxcap_module_system.python("pass", "--uds-scope", "a/b", check=False)
    assert bad.returncode == 2 and "--uds-scope a/b" in bad.stderr


def test_rt_uds_scope_and_what_each_handle_answers(redoxcap_module_client):
    private = rt.uds_scope()
    team = rt.uds_scope("team-rt")
    system_scope = rt.open("/scheme/uds", rt.O_DIRECTORY)
    also_team = rt.uds_scope("team-rt", base=system_scope)
    listener = rt.openat(team, "svc", rt.O_CREAT | rt.O_RDWR)
    conn = rt.openat(also_team, "svc", rt.O_RDWR)  # the same named scope
    with pytest.raises(ConnectionRefusedError):
        rt.openat(private, "svc", rt.O_RDWR)
    with pytest.raises(PermissionError):
        rt.uds_scope("team-rt", base=private)  # a private scope reaches no named one
    for fd in (listener, conn):
        with pytest.raises(NotADirectoryError):
            rt.openat(fd, "other", rt.O_CREAT | rt.O_RDWR)
        assert rt.fpath(fd) == "/scheme/uds/svc"
        assert rt.fstat(fd).st_mode & 0o170000 == 0o140000  # a socket
    with pytest.raises(OSError) as info:
        rt.read(team, 1)
    assert info.value.errno == errno.EBADF
    assert rt.fpath(team) == "/scheme/uds" and rt.fstat(team).st_mode & 0o040000
    same = rt.openat(team, ".", rt.O_DIRECTORY)
    rt.close(rt.openat(same, "svc", rt.O_RDWR))
    for fd in (same, conn, listener, also_team, team, private, system_scope):
        rt.close(fd)


def test_uds_capabilities_sent_into_their_own_queues_leak_nothing(redoxcap_module_system):
    def counts() -> dict[str, tuple[int, int | None]]:
        """Open fds of the kernel and uds daemons, and uds's count of its handles."""
        return {d["name"]: (len(os.listdir(f"/proc/{d['pid']}/fd")), d.get("scheme_handles"))
                for d in redoxcap_module_system.status()["daemons"] if d["name"] in ("kernel", "uds")}

    spare_prepared(redoxcap_module_system)  # what it holds counted before as after
    before = wait_for(lambda: counts()["uds"][1] is not None and counts())
    result = redoxcap_module_system.python(
        "import errno, rt\n"
        "refused = 0\n"
        "for i in range(200):  # a name per pair: a close reaches the scheme a moment later\n"
        "    scope = rt.open('/scheme/uds', rt.O_DIRECTORY)\n"
        "    listener = rt.open(f'/scheme/uds/loop{i}', rt.O_CREAT | rt.O_RDWR)\n"
        "    a = rt.open(f'/scheme/uds/loop{i}', rt.O_RDWR)\n"
        "    b = rt.dup(listener, b'accept')\n"
        "    for cap in (b, a, listener, scope):  # b into its own queue first\n"
        "        try:\n"
        "            rt.sendfd(a, cap)\n"
        "        except OSError as e:\n"
        "            refused += e.errno == errno.EINVAL\n"
        "    for fd in (a, b, listener, scope):\n"
        "        rt.close(fd)\n"
        "print(refused)\n",
        "--ns", "uds")
    assert result.stdout.strip() == str(200 * 4)
    try:
        wait_for(lambda: counts() == before, timeout=15)
    except AssertionError:
        raise AssertionError(f"before {before}, after {counts()}") from None


def test_only_directories_and_scheme_roots_become_namespace_entries(redoxcap_module_client):
    """A connection in a namespace could hold the very namespace its queue holds (a
    cycle across uds and nsmgr that neither daemon could ever close): nsmgr refuses it."""
    (redoxcap_module_client.root / "plain.txt").write_text("x")
    listener = rt.open("/scheme/uds/entries", rt.O_CREAT | rt.O_RDWR)
    conn = rt.open("/scheme/uds/entries", rt.O_RDWR)
    accepted = rt.dup(listener, b"accept")
    plain = rt.open("/plain.txt")
    directory = rt.open("/", rt.O_DIRECTORY)
    scope = rt.uds_scope()
    ns = rt.mkns([], perms=rt.PERM_ALL)
    try:
        for fd in (conn, accepted, listener, plain):
            with pytest.raises(NotADirectoryError):
                rt.register(ns, "x", fd)
        rt.register(ns, "dir", directory)
        rt.register(ns, "scope", scope)
        assert rt.schemes(ns) == ["dir", "scope"]
    finally:
        for fd in (ns, conn, accepted, listener, plain, directory, scope):
            rt.close(fd)
