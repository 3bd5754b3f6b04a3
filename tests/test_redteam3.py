"""Red team 3: accounting drift in the router's new fd holds (found attacking them)."""

from __future__ import annotations

import os

from redoxcap.wire import protocol as P
from redoxcap.wire.call import call
from redoxcap.wire.frames import SchemeReply, encode_request

from test_router import (CUSTOM_OP, FakeScheme, create_scheme, kernel, new_account,  # noqa: F401
                               receive, send, status, wait_until)


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
