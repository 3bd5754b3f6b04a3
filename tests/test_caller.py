"""The real caller, end to end: a scheme sees who asked, even through nsmgr.

nsmgr opens a client's `/scheme/NAME/...` by asking NAME's scheme itself; it
names the request it serves, and the router, having checked that nsmgr is
the daemon that request was sent to, passes the client's pid, uid and gid on.
No process can claim to serve a request it was not sent.
"""

from __future__ import annotations

import errno
import os
import socket
import subprocess
import sys

import rt
from redoxcap import control
from redoxcap.wire import frames as F
from redoxcap.wire import protocol as P
from redoxcap.wire.call import call
from redoxcap.wire.frames import Request


def test_a_scheme_sees_the_client_that_opened_through_the_namespace(redoxcap_module_client, hostile_scheme):
    recorder = hostile_scheme("recorder", lambda op, args: (P.OK, P.pack("/scheme/recorder"), []))
    child = rt.spawn([sys.executable, "-c",
                      ("import os, rt\n"
                      "rt.close(rt.open('/scheme/recorder/x'))\n"
                      "rt.mkdir('/scheme/recorder/d')\n"
                      "print(os.getpid())\n")],
                     stdout=subprocess.PIPE, text=True)
    out, _ = child.communicate(timeout=60)
    assert child.returncode == 0
    pid = int(out)
    assert (P.OPENAT, pid) in recorder.seen  # forwarded by nsmgr, seen as the client's
    assert (P.MKDIRAT, pid) in recorder.seen
    nsmgr = redoxcap_module_client.daemon("nsmgr")["pid"]
    assert all(seen_pid != nsmgr for _, seen_pid in recorder.seen)


def test_a_scheme_is_told_the_account_of_the_client_it_serves(redoxcap_module_client, hostile_scheme):
    """So that it can serve clients in turn: for a request nsmgr forwards, the client's."""
    recorder = hostile_scheme("accounts", lambda op, args: (P.OK, P.pack("/scheme/accounts"), []))
    reply, (ns,) = control.request(redoxcap_module_client.state_dir, "namespace", account=True)
    try:
        child = rt.spawn([sys.executable, "-c", "import rt; rt.close(rt.open('/scheme/accounts/x'))"],
                         ns=ns)
        assert child.wait(timeout=60) == 0
    finally:
        rt.close(ns)
    assert reply["account"] != 0 and recorder.accounts == {reply["account"]}


def test_no_one_can_claim_to_serve_a_request_it_was_not_sent(redoxcap_module_client):
    """A client names a request id (any: it cannot know nsmgr's) as the one it serves."""
    fd = rt.open("/", rt.O_DIRECTORY)
    try:
        for claimed in (0, 1, 2, 12345, 2**63):
            frame = Request.of(P.FPATH, 7, [], serving=claimed).encode()
            with socket.socket(fileno=os.dup(fd)) as s:
                s.send(frame)
                tag, status, value = F.decode_reply(s.recv(P.MAX_FRAME))
            assert (tag, status, value) == (7, P.ERR, errno.EPERM), claimed
        assert call(fd, P.FPATH)[0] == "/scheme/file"  # the capability still works
    finally:
        rt.close(fd)
