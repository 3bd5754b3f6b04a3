"""A fifth red-team pass: today's unread-replies bound, tcp listeners, the broker's give-up,
the sandbox's pid arguments.

Each test here failed on the code it was written against (main 942e3e9) and says what it
showed, measured from outside through the real processes.
"""

from __future__ import annotations

import sys
import time

import pytest

SCOPE = "rt5-shared"

# The victim: a client that takes capabilities handed to it over a uds connection in its
# shared scope (what `rt.recvfd` is for) and keeps them, then goes on with its own work:
# one small read of /scheme/zero every 0.1 s, each bounded to 5 s. It prints the slowest.
VICTIM = r"""
import errno, os, sys, time, rt
from redoxcap.wire import call as C
z = rt.open('/scheme/zero', os.O_RDONLY)
listener = rt.open('/scheme/uds/rt5-victim', os.O_CREAT | os.O_RDWR)
print('listening', flush=True)
conn = rt.dup(listener, b'accept')
kept = [rt.recvfd(conn) for _ in range(int(sys.argv[1]))]
print('received', len(kept), flush=True)
sys.stdin.readline()
slowest, stuck = 0.0, 0
end = time.monotonic() + float(sys.argv[2])
while time.monotonic() < end:
    start = time.monotonic()
    try:
        with C.timeout(5):
            rt.read(z, 1)
    except OSError as exc:
        if exc.errno != errno.ETIMEDOUT:
            raise
        stuck += 1
    slowest = max(slowest, time.monotonic() - start)
    time.sleep(0.1)
print('slowest', round(slowest, 2), 'stuck', stuck, flush=True)
"""

# The attacker: hands the victim the very sockets of its own capabilities of /scheme/zero
# (SENDFD with the fd itself, not the clone rt.sendfd would make: argv[3] "own"; "clone"
# for the control, which leaves the victim served) and keeps them; once the
# victim has them, sends sixteen READs of MAX_IO on each and never reads a reply.
ATTACKER = r"""
import os, socket, sys, time, rt
from redoxcap.wire import frames as F
from redoxcap.wire import protocol as P
from redoxcap.wire.call import call_value
n = int(sys.argv[1])
conn = rt.open('/scheme/uds/rt5-victim', os.O_RDWR)
caps = [rt.open('/scheme/zero', os.O_RDONLY) for _ in range(n)]
for c in caps:
    call_value(conn, P.SENDFD, [], [c if sys.argv[3] == "own" else rt.clone(c)])  # own: ours stays the same socket
print('sent', flush=True)
sys.stdin.readline()
frame = F.encode_request(P.READ, 1, [P.MAX_IO])
sent = 0
for c in caps:
    s = socket.socket(fileno=os.dup(c))
    s.setblocking(False)
    for _ in range(16):
        try:
            s.send(frame)
            sent += 1
        except BlockingIOError:
            break
print('flooded', sent, flush=True)
time.sleep(float(sys.argv[2]))
"""


def _line(proc, prefix: str) -> str:
    line = proc.stdout.readline()
    assert line.startswith(prefix), (line, proc.stderr.read() if proc.poll() is not None else "")
    return line


def test_capabilities_handed_over_uds_charge_the_receiver_for_what_the_sender_does(
        redoxcap_system):
    """A capability handed to another client over uds (SENDFD, RECVFD) belongs from then on
    to the receiver's account, with what it has in flight, queued and now unread
    (Account.take_over). But nothing makes the sender hand over a clone: SENDFD with the
    capability's own fd leaves the sender holding the very socket the receiver got. Every
    request the sender then sends on it counts against the receiver's account, and every
    reply it leaves unread (in the socket, or queued in the outbox) counts against the
    receiver's 16 MiB bound. Twelve of /scheme/zero's capabilities handed over, sixteen
    128 KiB READs on each, never read: the receiver's account is saturated, so the router
    reads none of the receiver's own requests; its one-byte read of /scheme/zero, ~1 ms
    otherwise, times out (5 s), for as long as it keeps what it was given (and the attacker
    may exit meanwhile: the replies stay unread in the receiver's sockets). One client
    stalls any client that accepts a capability from it, beyond its own quota.
    Fix: the uds daemon (or the router, relaying a capability in a reply) should hand the
    receiver a clone of what it was passed, never the sender's own socket: what a
    receiver's account is charged for must be a socket only the receiver holds."""
    victim = redoxcap_system.start("run", "--uds-scope", SCOPE, "--", sys.executable, "-c",
                                   VICTIM, "12", "6")
    attacker = None
    try:
        _line(victim, "listening")
        attacker = redoxcap_system.start("run", "--uds-scope", SCOPE, "--", sys.executable,
                                         "-c", ATTACKER, "12", "15", "own")
        _line(attacker, "sent")
        _line(victim, "received 12")
        attacker.stdin.write("go\n")
        attacker.stdin.flush()
        _line(attacker, "flooded")
        time.sleep(0.5)
        victim.stdin.write("go\n")
        victim.stdin.flush()
        out, err = victim.communicate(timeout=120)
    finally:
        for proc in (victim, attacker):
            if proc is not None and proc.poll() is None:
                proc.kill()
                proc.communicate()
    assert "slowest" in out, (out, err)
    words = out.split()
    slowest, stuck = float(words[words.index("slowest") + 1]), int(words[words.index("stuck") + 1])
    assert stuck == 0 and slowest < 1.0, (
        f"a client's calls on its own capabilities stalled ({stuck} timed out at 5 s, "
        f"slowest {slowest} s) because another client flooded sockets it handed it")
