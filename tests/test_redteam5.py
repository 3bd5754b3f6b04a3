"""A fifth red-team pass: today's unread-replies bound, tcp listeners, the broker's give-up,
the sandbox's pid arguments.

Each test here failed on the code it was written against (main 942e3e9) and says what it
showed, measured from outside through the real processes. Fixed since: a client's
capability relayed to another account is cloned for the receiver (kernel/handles.py,
relay_fds: the first three), and CLOSEs owed to a full channel wait as handle numbers
for one task per scheme (kernel/router.py, _owe_close: the last).
"""

from __future__ import annotations

import sys
import time

SCOPE = "rt5-shared"
FDS_PER_ANSWER = "250"  # "0" for the control: the victim makes ~1,020

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


def _stop(*procs) -> None:
    """Kill and reap whichever of procs still runs (None: never started)."""
    for proc in procs:
        if proc is not None and proc.poll() is None:
            proc.kill()
            proc.communicate()


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
        _stop(victim, attacker)
    assert "slowest" in out, (out, err)
    words = out.split()
    slowest, stuck = float(words[words.index("slowest") + 1]), int(words[words.index("stuck") + 1])
    assert stuck == 0 and slowest < 1.0, (
        f"a client's calls on its own capabilities stalled ({stuck} timed out at 5 s, "
        f"slowest {slowest} s) because another client flooded sockets it handed it")


def rss(pid: int) -> int:
    """pid's resident memory in bytes."""
    with open(f"/proc/{pid}/status") as f:
        for line in f:
            if line.startswith("VmRSS:"):
                return int(line.split()[1]) * 1024
    return 0


# What the attack programs below that serve a scheme by hand start with: `requests(ch)`
# yields the requests read on the scheme channel ch but the router's CLOSEs (any fds they
# carry closed), until the channel ends.
SERVING = r"""
import os, socket, sys, threading, rt
from redoxcap.wire import protocol as P
from redoxcap.wire.frames import SchemeReply, SchemeRequest
def requests(ch):
    while True:
        data, anc, _, _ = ch.recvmsg(P.MAX_FRAME, P.CMSG_FDS)
        if not data:
            return
        P.close_fds(P.parse_ancillary(anc)[0])
        req = SchemeRequest.decode(data)
        if req.op != P.CLOSE:
            yield req
"""

# A client with a scheme of its own (served by hand in a thread). Its capability `z` of that
# scheme is handed to nsmgr, tacked onto its scheme's answer to an OPENAT nsmgr forwards
# (asked of nsmgr itself, on the namespace fd: rt.open would use its own clone of the entry)
# (a NEW_HANDLE with one fd more than nsmgr asked for: nsmgr closes both and answers EIO;
# the client keeps z). Then it sends argv[1] READs of MAX_IO on z, reads none of their
# replies, and its scheme answers each with 128 KiB.
ESCAPE = SERVING + r"""
import errno, select, time
from redoxcap.wire import frames as F
n = int(sys.argv[1])
ch = socket.socket(fileno=rt.mkscheme('rt5evil'))
state = {'handed': None, 'reads': []}
go = threading.Event()
def serve():
    handles = 0
    for req in requests(ch):
        if req.op == P.OPENAT:
            handles += 1
            fds = [state['handed']] if state['handed'] is not None else []
            ch.sendmsg([SchemeReply.new_handle(req.req_id, handles, 0).encode()], P.fds_ancillary(fds))
            continue
        if req.op == P.READ:
            state['reads'].append(req.req_id)
            if len(state['reads']) == n:
                go.set()
            continue
        ch.sendmsg([SchemeReply.of(req.req_id, P.OK, 0).encode()])
threading.Thread(target=serve, daemon=True).start()
z = rt.open('/scheme/rt5evil/z', os.O_RDONLY)
state['handed'] = z
try:
    from rt import _process
    from redoxcap.wire.call import call
    call(_process.namespace_fd(), P.OPENAT, ['/scheme/rt5evil/other', os.O_RDONLY, 0])  # through nsmgr
    print('opened?', flush=True)
except OSError as exc:
    print('handed over', errno.errorcode.get(exc.errno), flush=True)
frame = F.encode_request(P.READ, 1, [P.MAX_IO])
s = socket.socket(fileno=os.dup(z))
s.setblocking(False)
sent = 0
deadline = time.monotonic() + 10
while sent < n and time.monotonic() < deadline:
    try:
        s.send(frame)
        sent += 1
    except BlockingIOError:
        select.select([], [s], [], 0.1)
go.wait(10)
print('in flight', sent, len(state['reads']), flush=True)
body = b'x' * P.MAX_IO
for req_id in state['reads']:
    ch.sendmsg([SchemeReply.of(req_id, P.OK, body).encode()])
print('answered', flush=True)
sys.stdin.readline()
"""


def test_a_capability_slipped_into_a_reply_to_nsmgr_escapes_its_accounts_bounds(
        redoxcap_system):
    """Every capability in a reply belongs from then on to the account of the capability
    the reply is delivered on. A client's own scheme answers the OPENATs nsmgr forwards on
    the client's behalf, on nsmgr's entry for it, which is in the system account: so a
    capability of the client's tacked onto such an answer moves to the system account
    (holder; the client stays its payer), and nsmgr, which asked for one fd, closes its
    copies, while the client keeps its own fd to the very same socket. From then on that
    capability has the system's bounds: 4,096 requests in flight instead of 64 for the
    whole account, no 16 MiB bound on replies queued or left unread. One client, 1,000
    128 KiB READs on it and not one reply read: the router holds ~130 MiB for it (8x the
    client's bound; 4,096 READs a capability, any number of capabilities: the router's
    memory, every client's service). Fix: a capability relayed in a reply should stay
    counted against a client account (its payer's, when the receiving capability is the
    system's), or nsmgr's forwarded replies should carry exactly the fds asked for
    (the router could refuse extra fds on a reply to a daemon's request)."""
    router = redoxcap_system.daemon("kernel")["pid"]
    before = rss(router)
    proc = redoxcap_system.start("run", "--", sys.executable, "-c", ESCAPE, "1000")
    try:
        _line(proc, "handed over")
        line = _line(proc, "in flight")
        _line(proc, "answered")
        grown = 0
        end = time.monotonic() + 10
        while time.monotonic() < end:
            grown = max(grown, rss(router) - before)
            time.sleep(0.2)
        proc.communicate("bye\n", timeout=60)
    finally:
        _stop(proc)
    assert grown < 48 * 1024 * 1024, (
        f"{line.strip()}: the router grew by {grown / 1024 / 1024:.0f} MiB of replies one "
        f"client never reads; a client's bound is 16 MiB")


# The victim: takes one capability over its uds listener (an honest rt.sendfd's clone), reads
# one byte from it argv[1] times (each bounded to 5 s), then clones /scheme/zero for as
# long as its quota lets it and prints how many it got.
QUOTA_VICTIM = r"""
import errno, os, sys, rt
from redoxcap.wire import call as C
z = rt.open('/scheme/zero', os.O_RDONLY)
listener = rt.open('/scheme/uds/rt5-quota', os.O_CREAT | os.O_RDWR)
print('listening', flush=True)
conn = rt.dup(listener, b'accept')
given = rt.recvfd(conn)
for _ in range(int(sys.argv[1])):
    with C.timeout(5):
        rt.read(given, 1)
caps = []
try:
    while len(caps) < 1100:
        caps.append(rt.clone(z))
except OSError as exc:
    print('stopped by', errno.errorcode.get(exc.errno), flush=True)
print('cloned', len(caps), flush=True)
"""

# The attacker: a scheme of its own whose every READ it answers with one byte and 250
# capabilities of /scheme/zero it made for that answer and keeps (its own sockets).
QUOTA_ATTACKER = SERVING + r"""
ch = socket.socket(fileno=rt.mkscheme('rt5evil2'))
z = rt.open('/scheme/zero', os.O_RDONLY)
kept = []
def serve():
    handles = 0
    for req in requests(ch):
        if req.op == P.OPENAT:
            handles += 1
            ch.sendmsg([SchemeReply.new_handle(req.req_id, handles, 0).encode()])
        elif req.op == P.READ:
            fds = [rt.clone(z) for _ in range(int(sys.argv[1]))]
            kept.extend(fds)  # ours: they stay open
            ch.sendmsg([SchemeReply.of(req.req_id, P.OK, b'x').encode()], P.fds_ancillary(fds))
        else:
            ch.sendmsg([SchemeReply.of(req.req_id, P.OK, 0).encode()])
threading.Thread(target=serve, daemon=True).start()
mine = rt.open('/scheme/rt5evil2/x', os.O_RDONLY)
conn = rt.open('/scheme/uds/rt5-quota', os.O_RDWR)
rt.sendfd(conn, mine)
print('sent', flush=True)
sys.stdin.readline()
"""


def test_a_clients_scheme_parks_its_own_capabilities_on_the_quota_of_whoever_calls_it(
        redoxcap_system):
    """Every capability in a scheme's reply is charged from then on to the account that
    receives the reply, which is how a daemon hands a client what it opened. A client's
    own scheme may do the same, with capabilities of its own that it keeps: a client that
    made one call on a capability of that scheme (handed to it honestly over uds: a clone)
    and got 250 fds it never asked for (rt closes them) now pays for 250 capabilities it
    does not hold, for as long as the scheme's client keeps them, while the attacker's own
    quota is freed to make 250 more for the next answer. Four one-byte READs, and the victim,
    which held 4 capabilities, can make 2 more (measured) instead of ~1,020 (EMFILE); and the
    attacker, never over its own 1,024, parks any number of capabilities (router fds) on
    others, up to the bound of all client accounts together. Fix: capabilities relayed in
    a client scheme's reply to another account should be clones minted for the receiver,
    or be refused (EPERM/EIO) unless the receiving account already pays for them."""
    victim = redoxcap_system.start("run", "--uds-scope", SCOPE, "--", sys.executable, "-c",
                                   QUOTA_VICTIM, "4")
    attacker = None
    try:
        _line(victim, "listening")
        attacker = redoxcap_system.start("run", "--uds-scope", SCOPE, "--", sys.executable,
                                         "-c", QUOTA_ATTACKER, FDS_PER_ANSWER)
        _line(attacker, "sent")
        out, err = victim.communicate(timeout=120)
    finally:
        _stop(victim, attacker)
    assert "cloned" in out, (out, err)
    cloned = int(out.split()[out.split().index("cloned") + 1])
    assert cloned >= 900, (
        f"a client could make only {cloned} capabilities of its 1,024 after four calls on "
        f"another client's scheme: {out.strip()}")



# Makes argv[1] schemes of its own, one after the other; each answers argv[2] OPENATs (a
# handle each), then reads its channel no more, and the client closes those handles'
# capabilities: the router owes the silent scheme a CLOSE for each. The schemes stay up.
CLOSES = r"""
import os, socket, sys, threading, rt
from redoxcap.wire import protocol as P
from redoxcap.wire.frames import SchemeReply, SchemeRequest
rounds, per = int(sys.argv[1]), int(sys.argv[2])
channels = []
for r in range(rounds):
    ch = socket.socket(fileno=rt.mkscheme(f'rt5quiet{r}'))
    channels.append(ch)
    def serve(ch=ch):
        for number in range(1, per + 1):
            while True:
                data, anc, _, _ = ch.recvmsg(P.MAX_FRAME, P.CMSG_FDS)
                P.close_fds(P.parse_ancillary(anc)[0])
                req = SchemeRequest.decode(data)
                if req.op == P.OPENAT:
                    break
            ch.sendmsg([SchemeReply.new_handle(req.req_id, number, 0).encode()])
        # and from now on it reads nothing
    t = threading.Thread(target=serve, daemon=True)
    t.start()
    try:
        caps = [rt.open(f'/scheme/rt5quiet{r}/h', os.O_RDONLY) for _ in range(per)]
    except OSError as exc:
        print('round', r, exc, file=sys.stderr, flush=True)
        raise
    t.join()
    for c in caps:
        rt.close(c)
print('closed', rounds * per, flush=True)
sys.stdin.readline()
"""


def test_closes_owed_to_a_clients_silent_scheme_pile_up_in_the_router(redoxcap_system):
    """When the last capability naming a handle goes, the router sends its scheme CLOSE;
    if the scheme's channel is full, a task of the router's own waits to send it (Router.
    tidy: send_to_scheme), one task and frame per handle, charged to no account. A client's
    own scheme decides whether its channel is ever read: one that answers 600 opens, then
    reads nothing more while the client closes those capabilities, leaves ~330 such tasks
    in the router (the channel holds the first ~270); a scheme costs the client 2
    capabilities, so it can do this again with scheme after scheme while staying within its
    quota. 160 schemes: the router grew by 211 MB (measured; 103 MB for 40 schemes of 900),
    ~50,000 waiting tasks in its nursery, that no bound covers (16 MiB is a client's bound on
    what it makes the router queue for it); its quota allows ~500 such schemes (2
    capabilities each, the handles' given back at each close). Fix: the router
    should coalesce what it owes a scheme (a list of handle numbers to CLOSE per scheme,
    sent by one task as room comes) rather than a task per frame, or charge them to the
    scheme's payer."""
    router = redoxcap_system.daemon("kernel")["pid"]
    before = rss(router)
    proc = redoxcap_system.start("run", "--", sys.executable, "-c", CLOSES, "160", "600")
    try:
        _line(proc, "closed")
        time.sleep(1)
        grown = rss(router) - before
        proc.communicate("bye\n", timeout=60)
    finally:
        _stop(proc)
    assert grown < 16 * 1024 * 1024, (
        f"the router grew by {grown / 1024 / 1024:.0f} MiB of CLOSEs owed to one client's "
        f"schemes that read nothing")
