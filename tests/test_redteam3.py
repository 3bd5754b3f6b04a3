"""Red team 3: accounting in the router's fd holds for requests held across a restart (each test failed before its fix)."""

from __future__ import annotations

import os
import time

from test_router import (  # noqa: F401
    CUSTOM_OP,
    FakeScheme,
    create_scheme,
    kernel,
    new_account,
    receive,
    send,
    status,
    wait_until,
)

from redoxcap.wire import protocol as P
from redoxcap.wire.call import call
from redoxcap.wire.frames import SchemeReply, encode_request


def held(kernel_fd: int, account: int) -> int:
    return status(kernel_fd)["accounts"].get(str(account), {}).get("held_fds", 0)


def test_fds_of_a_request_held_for_a_restart_stay_with_the_account_that_sent_them(kernel):
    """A request held while its scheme restarts has its fds charged to its capability's
    account (recovery.hold: cap.account); if the capability moves to another account
    meanwhile (relayed in another scheme's reply), the re-forward gives them back to the
    new account: the sender's held_fds never return to 0, and the new account's go
    negative (quota it never had)."""
    scheme_id, scheme, root = create_scheme(kernel)
    _, other, other_root = create_scheme(kernel)
    a, (cap_a,) = new_account(kernel, [root], max_caps=16)
    b, (cap_b,) = new_account(kernel, [other_root], max_caps=16)
    scheme.die()
    r, w = os.pipe()
    send(cap_a, encode_request(CUSTOM_OP, 1, []), [w] * 3)  # held for the next daemon
    wait_until(lambda: held(kernel, a) == 3)
    # cap_a moves to account b: another scheme relays it in a reply to b
    send(cap_b, encode_request(P.RECVFD, 2, []))
    req_id, *_ = other.receive()
    other.answer(SchemeReply.of(req_id, P.OK, None), [cap_a])
    (_, st, _), (moved,) = receive(cap_b)
    assert st == P.OK
    _, (channel,) = call(kernel, P.SCHEME_RESTART, [scheme_id])
    reborn = FakeScheme(channel)
    req_id, *_, fds = reborn.receive()
    P.close_fds(fds)
    reborn.answer(SchemeReply.of(req_id, P.OK, None))
    assert receive(cap_a) == ((1, P.OK, None), [])
    os.close(w)
    os.close(r)
    # the reply is relayed after the router settled the request: its counts are final now
    assert (held(kernel, a), held(kernel, b)) == (0, 0)
    for fd in (moved, cap_a, cap_b):
        os.close(fd)


def test_fds_riding_on_requests_held_for_a_restart_are_bounded_by_the_quota(kernel):
    """While a scheme's daemon is down, requests wait for the next one (recovery.hold),
    their fds held by the router and charged to the account: with no check of its quota.
    The same request forwarded to a live daemon is EMFILE past it (Router.forward); held,
    an account with a quota of 8 makes the router hold 4 x 200 fds (up to max_inflight x
    MAX_FDS, some 16,000 per client, past every quota and into the fds all clients share)."""
    _, scheme, root = create_scheme(kernel)
    account, (cap,) = new_account(kernel, [root], max_caps=8)
    scheme.die()
    r, w = os.pipe()
    for tag in range(4):
        send(cap, encode_request(CUSTOM_OP, tag, []), [w] * 200)
    os.close(w)
    os.close(r)
    most, end = 0, time.monotonic() + 1  # the router reads the four requests in its time
    while time.monotonic() < end and most <= 8:
        most = max(most, held(kernel, account))
        time.sleep(0.01)
    try:
        assert most <= 8, f"the router holds {most} fds for an account whose quota is 8"
    finally:
        os.close(cap)
