"""A sixth red-team pass: capabilities relayed as clones, CLOSEs owed as numbers, the
broker's placement caches, its give-up of capability calls.

Each test here fails on the code it was written against (main b6162b2) and says what it
shows, measured from outside through the real processes.
"""

from __future__ import annotations

import sys
import time

SCOPE = "rt6-shared"


def _line(proc, prefix: str) -> str:
    line = proc.stdout.readline()
    assert line.startswith(prefix), (line, proc.stderr.read() if proc.poll() is not None else "")
    return line


def _wait_for(proc, prefix: str, seconds: float) -> str:
    """The first line of proc's that starts with prefix, read for at most seconds."""
    import selectors
    end = time.monotonic() + seconds
    with selectors.DefaultSelector() as sel:
        sel.register(proc.stdout, selectors.EVENT_READ)
        while time.monotonic() < end:
            if sel.select(end - time.monotonic()):
                line = proc.stdout.readline()
                if not line or line.startswith(prefix):
                    return line
    return ""


def _stop(*procs) -> None:
    for proc in procs:
        if proc is not None and proc.poll() is None:
            proc.kill()
            proc.communicate()


# The victim: takes a capability of another client's scheme over its uds listener (an honest
# rt.sendfd's clone) and renames `a` there to `b` in a directory of its own (RENAMEAT with
# its own capability for `new`, as rt's rename passes its cwd or kept root). Then it goes on
# with its own work on that capability: argv[1] one-byte reads, 0.1 s apart, each bounded to
# 5 s, in a thread it waits argv[2] s for. It prints how many were answered within 1 s.
STEAL_VICTIM = r"""
import errno, os, sys, time, rt
from redoxcap.wire import call as C
from redoxcap.wire import protocol as P
from redoxcap.wire.call import call_value
mine = rt.open('/scheme/zero', os.O_RDONLY)
listener = rt.open('/scheme/uds/rt6-steal', os.O_CREAT | os.O_RDWR)
print('listening', flush=True)
conn = rt.dup(listener, b'accept')
theirs = rt.recvfd(conn)
try:
    with C.timeout(5):
        call_value(theirs, P.RENAMEAT, ['a', 'b'], [mine])
    print('renamed', flush=True)
except OSError as exc:
    print('renamed', errno.errorcode.get(exc.errno), flush=True)
import threading
results = []  # seconds each read took, or None where it failed (ETIMEDOUT)
def reads():
    for _ in range(int(sys.argv[1])):
        start = time.monotonic()
        try:
            with C.timeout(5):
                rt.read(mine, 1)
            results.append(time.monotonic() - start)
        except OSError as exc:
            if exc.errno != errno.ETIMEDOUT:
                raise
            results.append(None)
        time.sleep(0.1)
t = threading.Thread(target=reads, daemon=True)
t.start()
t.join(float(sys.argv[2]))
fast = sum(1 for r in results if r is not None and r < 1.0)
print('fast', fast, 'of', sys.argv[1], 'answered', len(results), 'hung', t.is_alive(), flush=True)
os._exit(0)
"""

# The attacker: a scheme of its own; the fd that rides on a RENAMEAT it is asked is kept, and
# a thread reads whatever arrives on it (the replies the router sends its holder) for ever.
STEAL_ATTACKER = r"""
import os, socket, sys, threading, rt
from redoxcap.wire import protocol as P
from redoxcap.wire.frames import SchemeReply, SchemeRequest
ch = socket.socket(fileno=rt.mkscheme('rt6evil'))
stolen = []
def drain(fd):
    s = socket.socket(fileno=fd)
    while True:
        data, anc, _, _ = s.recvmsg(P.MAX_FRAME, P.CMSG_FDS)
        if not data:
            return
        P.close_fds(P.parse_ancillary(anc)[0])
        stolen.append(len(data))
def serve():
    handles = 0
    while True:
        data, anc, _, _ = ch.recvmsg(P.MAX_FRAME, P.CMSG_FDS)
        if not data:
            return
        fds = P.parse_ancillary(anc)[0]
        req = SchemeRequest.decode(data)
        if req.op == P.CLOSE:
            P.close_fds(fds)
            continue
        if req.op == P.OPENAT:
            handles += 1
            ch.sendmsg([SchemeReply.new_handle(req.req_id, handles, 0).encode()])
            continue
        if req.op == P.RENAMEAT and fds:
            threading.Thread(target=drain, args=(fds[0],), daemon=True).start()
            fds = []
        P.close_fds(fds)
        ch.sendmsg([SchemeReply.of(req.req_id, P.OK, None).encode()])
threading.Thread(target=serve, daemon=True).start()
mine = rt.open('/scheme/rt6evil/dir', os.O_RDONLY)
conn = rt.open('/scheme/uds/rt6-steal', os.O_RDWR)
rt.sendfd(conn, mine)
print('sent', flush=True)
sys.stdin.readline()
print('stole', len(stolen), flush=True)
"""


def test_a_capability_riding_on_a_request_is_the_callers_own_socket_for_the_scheme(
        redoxcap_system):
    """A capability a scheme hands in a reply to another account is now cloned for the
    receiver (kernel/handles.py, relay_fds): the sender keeps its socket, the receiver gets
    one only it holds. A capability riding on a request is not: the router passes the
    scheme's daemon the caller's very socket (forward). RENAMEAT and LINKAT take one (the
    directory for `new`; rt's rename passes its cwd's capability or a kept root, used for
    every later call), and nothing stops a client's own scheme from being asked them: the
    daemon then holds the caller's socket and reads from it. Every reply the router sends
    to the caller on it, for as long as the caller keeps it, may be read by the daemon
    first (with whatever fds it carries: capabilities the caller opened through its
    directory), and the caller's call waits for a reply that never comes; and what the
    daemon sends on it counts against the caller's account (the bounds redteam5 saw
    escaped over uds). One RENAMEAT on another client's scheme, and of ten later one-byte
    reads on the caller's own /scheme/zero capability, each bounded to 5 s, 3 answered in
    time, 4 timed out and one hung past its bound for good (measured): rt's wait polls,
    then reads the blocking socket, and the daemon took the reply in between. Fix: the router should pass
    a scheme a clone of each capability riding on a request (minted for the scheme's
    account, charged to the caller while in flight), never the caller's own socket, as
    relay_fds does for replies."""
    victim = redoxcap_system.start("run", "--uds-scope", SCOPE, "--", sys.executable, "-c",
                                   STEAL_VICTIM, "10", "25")
    attacker = None
    try:
        _line(victim, "listening")
        attacker = redoxcap_system.start("run", "--uds-scope", SCOPE, "--", sys.executable,
                                         "-c", STEAL_ATTACKER)
        _line(attacker, "sent")
        _line(victim, "renamed")
        out = _wait_for(victim, "fast", 60)
        attacker.stdin.write("bye\n")
        attacker.stdin.flush()
        stole = _wait_for(attacker, "stole", 30)
    finally:
        _stop(victim, attacker)
    assert out.startswith("fast"), out
    fast = int(out.split()[1])
    assert fast == 10, (
        f"{out.strip()}: reads on a client's own /scheme/zero capability (each bounded to "
        f"5 s) after it passed that capability on a RENAMEAT to another client's scheme, whose "
        f"daemon read its replies ({stole.strip()})")
