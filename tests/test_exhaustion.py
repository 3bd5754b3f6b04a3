"""Confined clients that try to exhaust the system, for real, and what it costs them.

Each attack runs as an ordinary sandboxed client (`redoxcap run --ns '' --cwd
/load --beneath`, the red team's setting) against a system of the test's own,
and each test counts from outside: the router's fds (/proc/PID/fd) and
resident memory before, during and after, and what the attack costs another
client (its latency as a ratio to the same calls on the quiet system, never
an absolute time). Everything the system holds because of a client is
charged to that client's router account, so an attack ends at the client's
quota (EMFILE for it), the router keeps its reserve, and all of it is given
back when the client goes.
"""

from __future__ import annotations

import errno
import os
import resource
import statistics
import sys
import time

import pytest
from test_router import (
    account_caps,
    create_scheme,
    kernel_with_fd_limit,
    new_account,
    receive,
    send,
)

from redoxcap.testing import spare_prepared, wait_for
from redoxcap.wire import protocol as P
from redoxcap.wire.call import call
from redoxcap.wire.frames import SchemeReply, encode_request

CONFINED = ("--ns", "", "--cwd", "/load", "--beneath")
QUOTA = 1024  # the default capability quota of a client account (kernel/accounts.py)
SLACK = 64  # fds the router may hold besides a client's charges (channels, tracers, a page...)


def router_pid(system) -> int:
    return system.daemon("kernel")["pid"]


def fds_of(pid: int) -> int:
    return len(os.listdir(f"/proc/{pid}/fd"))


def rss_kib(pid: int) -> int:
    with open(f"/proc/{pid}/status") as f:
        return next(int(line.split()[1]) for line in f if line.startswith("VmRSS:"))


def summary(system) -> dict:
    return system.status()["summary"]


def confined(system, code: str, *options: str):
    """Start code as a confined client of system; it says `ready` on stdout when it
    has done its worst, and holds on to everything until its stdin closes."""
    (system.root / "load").mkdir(exist_ok=True)
    proc = system.start("run", *CONFINED, *options, "--", sys.executable, "-c", code)
    line = proc.stdout.readline()
    assert line.startswith("ready"), (line, proc.stderr.read() if proc.poll() is not None else "")
    return proc, line.split()[1:]


def until_emfile_code(make: str) -> str:
    """Python that calls `make` (an expression) until EMFILE and keeps what it made."""
    return (
        "import errno, os, sys, rt\n"
        "made = []\n"
        "try:\n"
        f"    while True: made.append({make})\n"
        "except OSError as exc:\n"
        "    assert exc.errno == errno.EMFILE, exc\n"
    )


def steady(measure, interval: float = 0.3, timeout: float = 30) -> int:
    """measure() once two readings interval seconds apart agree (what the router is
    still releasing has reached it)."""
    last = measure()
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        time.sleep(interval)
        now = measure()
        if now == last:
            return now
        last = now
    raise AssertionError(f"{measure} did not settle within {timeout}s")


# The plugin's fixtures, by the short names these tests use.
@pytest.fixture
def lone_router():
    """A router alone (`python -m redoxcap.kernel`) whose kernel capability this test holds, as
    the supervisor would; its fd limit is this process's."""
    with kernel_with_fd_limit(*resource.getrlimit(resource.RLIMIT_NOFILE)) as (kernel_fd, _):
        yield kernel_fd


def test_schemes_and_namespace_forks_a_client_makes_are_charged_to_it(redoxcap_system):
    """The red team's first attack: 240 rt.mkscheme and then rt.mkns(None) until refused.
    nsmgr holds a scheme's root and every entry of every fork for the client; it used
    to cost the system's account ~480 router fds a fork, without limit."""
    router = router_pid(redoxcap_system)
    spare_prepared(redoxcap_system)  # counted before as after
    fds_before, schemes_before = fds_of(router), summary(redoxcap_system)["schemes"]
    code = ("import errno, os, sys, rt\n"
            "channels = [rt.mkscheme(f's{i}') for i in range(240)]\n"
            "forks = []\n"
            "try:\n"
            "    while True: forks.append(rt.mkns(None))\n"
            "except OSError as exc:\n"
            "    assert exc.errno == errno.EMFILE, exc\n"
            "print('ready', len(forks), flush=True)\n"
            "sys.stdin.read()\n")
    proc, (forks,) = confined(redoxcap_system, code)
    held = fds_of(router) - fds_before
    # a fork of 240 entries costs 241 capabilities: the quota allows a few, no more
    assert 1 <= int(forks) <= QUOTA // 240
    assert held <= QUOTA + SLACK, f"the router holds {held} fds more for one client"
    status = redoxcap_system.status()
    client = next(c for c in status["clients"] if c["argv"][-1] == code)
    assert client["router_fds"] > QUOTA - 64  # charged to it, not to the system
    # everyone else goes on: a new run, with its namespace forked from the root one
    assert redoxcap_system.python("import rt; print(rt.listdir('.'))", *CONFINED).returncode == 0
    proc.communicate("", timeout=60)
    wait_for(lambda: fds_of(router) <= fds_before + 2, timeout=30)
    wait_for(lambda: summary(redoxcap_system)["schemes"] == schemes_before, timeout=30)


def test_a_scheme_is_freed_with_its_last_capability(redoxcap_system):
    """os.close(rt.mkscheme(...)) in a loop: each scheme is gone once its name is gone
    from the namespace (its last capability), so the router does not grow; without the
    unregister, the client's quota stops it, and its end frees them all."""
    router = router_pid(redoxcap_system)
    spare_prepared(redoxcap_system)  # counted before as after
    schemes_before = summary(redoxcap_system)["schemes"]
    churn = ("import errno, os, sys, rt\n"
             "def churn(n):\n"
             "    for _ in range(n):\n"
             "        os.close(rt.mkscheme('s'))\n"
             "        rt.unregister(rt.getns(), 's')\n"
             "churn(1000)\n"  # what the router needs for it once (pages of memory, tasks)
             "print('ready', flush=True)\n"
             "sys.stdin.readline()\n"
             "churn(3000)\n"
             "print('done', flush=True)\n"
             "sys.stdin.read()\n")
    proc, _ = confined(redoxcap_system, churn)
    schemes = steady(lambda: summary(redoxcap_system)["schemes"])  # the last drops reach the router
    assert schemes < schemes_before + 8, (schemes_before, schemes)  # not 1,000 more
    fds, rss = fds_of(router), rss_kib(router)
    proc.stdin.write("go\n")
    proc.stdin.flush()
    assert proc.stdout.readline() == "done\n", proc.stderr.read()
    wait_for(lambda: summary(redoxcap_system)["schemes"] <= schemes, timeout=30)
    assert fds_of(router) <= fds + 2
    growth = rss_kib(router) - rss
    assert growth < 2 * 1024, f"the router grew by {growth} KiB over 3,000 schemes made and dropped"
    proc.communicate("", timeout=60)

    kept = until_emfile_code("os.close(rt.mkscheme(f's{len(made)}')) or 0") + (
        "print('ready', len(made), flush=True)\n"
        "sys.stdin.read()\n")
    schemes = summary(redoxcap_system)["schemes"]
    proc, (made,) = confined(redoxcap_system, kept)
    assert QUOTA // 4 <= int(made) <= QUOTA  # a dead scheme's name still costs its root
    assert summary(redoxcap_system)["schemes"] >= schemes + int(made)  # named: not freed yet
    proc.communicate("", timeout=60)
    wait_for(lambda: summary(redoxcap_system)["schemes"] <= schemes_before, timeout=30)


def test_status_and_graph_answer_whatever_the_number_of_schemes(redoxcap_system):
    """3,000 schemes (and their roots in the client's namespace) once made every status
    reply larger than a message: EMSGSIZE, for good. Replies now come in pages."""
    code = ("import sys, rt\n"
            "channels = [rt.mkscheme(f's{i}') for i in range(3000)]\n"
            "print('ready', flush=True)\n"
            "sys.stdin.read()\n")
    proc, _ = confined(redoxcap_system, code, "--max-caps", "8000")
    try:
        status = redoxcap_system.status()
        assert status["summary"]["schemes"] >= 3000
        out = redoxcap_system.cli("status").stdout
        assert "nsmgr" in out and "file" in out
        router = next(line for line in out.splitlines() if line.startswith("router: "))
        assert int(router.split()[1]) >= 3000, router
        dot = redoxcap_system.cli("graph").stdout
        assert dot.startswith("digraph") and dot.count("->") >= 3000  # nsmgr holds every root
        assert len(redoxcap_system.cli("status", "--json").stdout) > 0
    finally:
        proc.communicate("", timeout=60)


def test_kept_file_handles_end_at_each_clients_quota_and_leave_the_router_a_reserve(redoxcap_system):
    """Open files are kept by the router across restarts (their host fds), so each costs
    the router more than its capability: 8 clients holding all they could once filled it.
    Each now stops at its quota, kept fds included, and another client is still served."""
    router = router_pid(redoxcap_system)
    (redoxcap_system.root / "load").mkdir()
    (redoxcap_system.root / "load/f").write_text("data")
    spare_prepared(redoxcap_system)  # counted before as after
    fds_before = fds_of(router)
    victim_code = ("import sys, time, rt\n"
                   "fd = rt.open('f')\n"
                   "for line in sys.stdin:\n"
                   "    t = time.perf_counter()\n"
                   "    for _ in range(20):\n"
                   "        rt.lseek(fd, 0); assert rt.read(fd, 4) == b'data'\n"
                   "        rt.close(rt.open('f'))\n"
                   "    print(time.perf_counter() - t, flush=True)\n")
    victim = redoxcap_system.start("run", *CONFINED, "--", sys.executable, "-c", victim_code)

    def victim_round() -> float:
        victim.stdin.write("go\n")
        victim.stdin.flush()
        return float(victim.stdout.readline())

    quiet = statistics.median(victim_round() for _ in range(5))
    hoarders = [confined(redoxcap_system, until_emfile_code("rt.open('f')")
                         + "print('ready', len(made), flush=True)\nsys.stdin.read()\n")
                for _ in range(8)]
    try:
        counts = [int(made) for _, (made,) in hoarders]
        held = fds_of(router) - fds_before
        assert all(QUOTA // 4 <= n < QUOTA // 2 for n in counts), counts  # a handle costs 2 or 3
        assert held <= 8 * QUOTA + 9 * SLACK, f"the router holds {held} fds more"
        loaded = statistics.median(victim_round() for _ in range(5))
    finally:
        for proc, _ in hoarders:
            proc.communicate("", timeout=60)
    victim.communicate("", timeout=60)
    ratio = loaded / quiet
    print(f"\nhoarders held {counts} files; another client's open+read at {ratio:.2f}x its quiet time")
    assert ratio < 10
    wait_for(lambda: fds_of(router) <= fds_before + 2, timeout=30)


def victim(system, setup: str, call: str, options: tuple[str, ...] = CONFINED):
    """A client (confined by default) timing 20 calls each time it reads a line; returns
    its process and a function that asks it for one round and answers its time."""
    code = ("import sys, time, rt\n" + setup +
            "for line in sys.stdin:\n"
            "    t = time.perf_counter()\n"
            "    for _ in range(20):\n"
            f"        {call}\n"
            "    print(time.perf_counter() - t, flush=True)\n")
    proc = system.start("run", *options, "--", sys.executable, "-c", code)

    def round_time() -> float:
        proc.stdin.write("go\n")
        proc.stdin.flush()
        line = proc.stdout.readline()
        assert line, proc.stderr.read()
        return float(line)

    return proc, round_time


def test_listing_a_huge_directory_from_64_threads_holds_up_no_one_else(redoxcap_system):
    """The red team listed a 60,000-entry directory from 64 threads of one client: each
    page listed and sorted the whole directory inline, and others' fstat took 5-7 s.
    A page now costs a page, read in a worker thread, one at a time per client."""
    big = redoxcap_system.root / "load" / "big"
    big.mkdir(parents=True)
    for i in range(60_000):
        os.close(os.open(big / f"entry-{i:05d}", os.O_CREAT | os.O_WRONLY, 0o644))
    (redoxcap_system.root / "load/f").write_text("data")
    proc, round_time = victim(redoxcap_system, "fd = rt.open('f')\n", "rt.fstat(fd)")
    quiet = statistics.median(round_time() for _ in range(7))
    lister = ("import sys, threading, rt\n"
              "stop = threading.Event()\n"
              "counts = []\n"
              "def list_forever():\n"
              "    while not stop.is_set():\n"
              "        counts.append(len(rt.listdir('big')))\n"
              "threads = [threading.Thread(target=list_forever) for _ in range(64)]\n"
              "for t in threads: t.start()\n"
              "print('ready', flush=True)\n"
              "sys.stdin.read()\n"
              "stop.set()\n"
              "for t in threads: t.join()\n"
              "print(len(counts), set(counts), flush=True)\n")
    attacker, _ = confined(redoxcap_system, lister)
    try:
        time.sleep(1)  # every thread is listing
        loaded = statistics.median(round_time() for _ in range(7))
    finally:
        out, _ = attacker.communicate("", timeout=300)
    proc.communicate("", timeout=60)
    listings, sizes = out.split(" ", 1)
    assert sizes.strip() in ("set()", "{60000}"), sizes  # every listing it finished was whole
    ratio = loaded / quiet
    print(f"\nanother client's fstat at {ratio:.2f}x its quiet time while 64 threads listed "
          f"60,000 entries ({listings} listings done)")
    assert ratio < 10


def test_a_client_cannot_register_a_socket_of_its_own(redoxcap_system):
    """nsmgr once talked to a socket a client registered as a namespace entry directly,
    outside the router: 219,000 junk replies of 253 fds in 25 s, charged to no one. Only
    capabilities (which the router serves, bounds and charges) are entries now."""
    nsmgr = redoxcap_system.daemon("nsmgr")["pid"]
    before = fds_of(nsmgr)
    code = ("import errno, socket, rt\n"
            "a, b = socket.socketpair(socket.AF_UNIX, socket.SOCK_SEQPACKET)\n"
            "for _ in range(100):\n"
            "    try:\n"
            "        rt.register(rt.getns(), 'mine', a.fileno())\n"
            "    except OSError as exc:\n"
            "        assert exc.errno == errno.EINVAL, exc\n"
            "    else:\n"
            "        raise AssertionError('registered a socket that is not a capability')\n"
            "print('refused')\n")
    (redoxcap_system.root / "load").mkdir()
    assert redoxcap_system.python(code, *CONFINED).stdout == "refused\n"
    wait_for(lambda: fds_of(nsmgr) <= before, timeout=10)


JUNK_SCHEME = r"""
import os, socket, sys, threading, rt
from redoxcap.wire import protocol as P
from redoxcap.wire.frames import SchemeReply, SchemeRequest

channel = socket.socket(fileno=rt.mkscheme("junk"))
r, w = os.pipe()

def serve():  # every request answered with 253 fds nobody asked for
    while True:
        data, anc, _, _ = channel.recvmsg(P.MAX_FRAME, P.CMSG_FDS)
        if not data:
            return
        P.close_fds(P.parse_ancillary(anc)[0])
        request = SchemeRequest.decode(data)
        if request.op != P.CLOSE:
            channel.sendmsg([SchemeReply.of(request.req_id, P.OK, None).encode()],
                           P.fds_ancillary([r] * P.MAX_FDS))

def hammer():
    while True:
        try:
            rt.mkdir("/scheme/junk/x")
        except OSError:
            pass

threading.Thread(target=serve, daemon=True).start()
for _ in range(16):
    threading.Thread(target=hammer, daemon=True).start()
print("ready", flush=True)
sys.stdin.read()
"""


def test_junk_replies_of_a_clients_own_scheme_cost_it_and_are_bounded(redoxcap_system):
    """What nsmgr does on a client's behalf is bounded and charged: a client's scheme that
    answers every request nsmgr forwards to it with 253 fds makes the router and nsmgr
    hold at most what the client's quota allows, and others' opens through nsmgr go on."""
    router, nsmgr = router_pid(redoxcap_system), redoxcap_system.daemon("nsmgr")["pid"]
    (redoxcap_system.root / "load").mkdir()
    (redoxcap_system.root / "load/f").write_text("data")
    spare_prepared(redoxcap_system)  # counted before as after
    before = {router: fds_of(router), nsmgr: fds_of(nsmgr)}
    # the victim has the default namespace: its opens go through nsmgr
    proc, round_time = victim(redoxcap_system, "", "rt.close(rt.open('/load/f'))", options=())
    quiet = statistics.median(round_time() for _ in range(5))
    attacker, _ = confined(redoxcap_system, JUNK_SCHEME)
    peaks = {router: 0, nsmgr: 0}
    try:
        deadline = time.monotonic() + 3
        while time.monotonic() < deadline:
            for pid, peak in peaks.items():
                peaks[pid] = max(peak, fds_of(pid) - before[pid])
            time.sleep(0.01)
        loaded = statistics.median(round_time() for _ in range(5))
        frames = redoxcap_system.status()["daemons"]
        assert sum(d.get("frames", 0) for d in frames if d["name"] == "nsmgr") > 0
    finally:
        attacker.communicate("", timeout=60)
    proc.communicate("", timeout=60)
    ratio = loaded / quiet
    print(f"\npeak fds held: router +{peaks[router]}, nsmgr +{peaks[nsmgr]}; another client's "
          f"open through nsmgr at {ratio:.2f}x its quiet time")
    assert peaks[router] <= QUOTA + 2 * P.MAX_FDS + SLACK
    assert peaks[nsmgr] <= 16 * P.MAX_FDS + SLACK
    assert ratio < 10
    wait_for(lambda: fds_of(router) <= before[router] + 2 and fds_of(nsmgr) <= before[nsmgr],
             timeout=30)




def clone_serving(cap: int, serving: int) -> int:
    """CLONE on cap, claiming to serve request `serving` (the router checks the claim)."""
    send(cap, encode_request(P.CLONE, 7, [], serving=serving))
    (tag, status, value), fds = receive(cap)
    assert (tag, status) == (7, P.OK), value
    return fds[0]


def test_only_a_system_daemon_charges_what_it_holds_to_the_client_it_serves(lone_router):
    """A daemon that clones a capability while serving a client's request holds the
    clone on that client's account, not its own (nsmgr forking a client's namespace).
    A client's own daemon serving another client cannot do that: it pays itself."""
    _, scheme, root = create_scheme(lone_router)
    scheme.answer(SchemeReply.of(0, P.HELLO, None))  # who serves it, as a daemon says first
    served, (theirs,) = new_account(lone_router, [root])
    daemon, (own,) = new_account(lone_router, [root])  # a client that serves the scheme itself
    send(theirs, encode_request(P.OPENAT, 1, ["x", 0, 0]))
    req_id, *_ = scheme.receive()  # in flight at the scheme, whose daemon is this process
    before = account_caps(lone_router, served), account_caps(lone_router, daemon)
    clones = [clone_serving(cap, req_id) for cap in (root, own)]
    assert account_caps(lone_router, served) == before[0] + 1  # the system daemon's clone
    assert account_caps(lone_router, daemon) == before[1] + 1  # the client daemon's own
    scheme.answer(SchemeReply.of(req_id, P.OK, None))
    assert receive(theirs)[0][:2] == (1, P.OK)
    for fd in (*clones, theirs, own, root):
        os.close(fd)
    scheme.die()


def test_replies_queued_for_a_daemon_held_capability_cost_the_client_it_is_held_for(lone_router):
    """Replies with fds that wait for a daemon to read them (its socket full) are router
    fds too: for a capability a daemon holds for a client, the client's quota bounds them,
    not the system's none; past it, such a reply becomes EMFILE."""
    _, scheme, root = create_scheme(lone_router)
    scheme.answer(SchemeReply.of(0, P.HELLO, None))  # who serves it, as a daemon says first
    served, (theirs,) = new_account(lone_router, [root], max_caps=32)
    send(theirs, encode_request(P.OPENAT, 1, ["x", 0, 0]))
    req_id, *_ = scheme.receive()
    held = clone_serving(root, req_id)  # held by this "daemon", paid for by `served`
    scheme.answer(SchemeReply.of(req_id, P.OK, None))
    receive(theirs)
    r, w = os.pipe()
    for tag in range(40):
        send(held, encode_request(P.READ, tag, [1]))
    forwarded = [scheme.receive()[0] for _ in range(40)]
    for req in forwarded:  # nobody reads `held`: its socket fills, then its outbox
        scheme.answer(SchemeReply.of(req, P.OK, b"y" * 60_000), [r] * 4)
    wait_for(lambda: call(lone_router, P.KERNEL_STATUS)[0]["accounts"][str(served)]["held_fds"] > 0)
    counters = call(lone_router, P.KERNEL_STATUS)[0]["accounts"][str(served)]
    assert counters["caps"] + counters["held_fds"] <= 32, counters
    outcomes = []
    for _ in range(40):
        (tag, status, value), fds = receive(held)
        outcomes.append(status if status == P.OK else value)
        P.close_fds(fds)
    assert P.OK in outcomes and errno.EMFILE in outcomes, outcomes
    os.close(r)
    P.close_fds([held, theirs, root])
    with pytest.raises(BrokenPipeError):  # no copy of the read end is left anywhere
        wait_for(lambda: os.write(w, b"x") and False, timeout=10)
    os.close(w)
    scheme.die()
