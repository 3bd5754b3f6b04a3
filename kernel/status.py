"""KERNEL_STATUS: what the router holds, one page at a time, always within one frame.

However many schemes, accounts and capabilities there are, one reply
describes at most STATUS_SCHEMES schemes (with each one's own description of
its handles, bounded), STATUS_ACCOUNTS accounts and a page of holdings (what
each account holds, per scheme handle, sorted) with the cursor of the next
page. docs/protocol.md describes the reply's fields.
"""

from __future__ import annotations

from collections.abc import Awaitable, Callable, Iterable
from typing import TYPE_CHECKING

import trio

from redoxcap.kernel.schemes import StatusQuery
from redoxcap.wire import protocol as P
from redoxcap.wire.frames import SREQUEST

if TYPE_CHECKING:
    from redoxcap.kernel.accounts import Account
    from redoxcap.kernel.capabilities import Capability, SchemeHandle
    from redoxcap.kernel.schemes import Scheme

MAX_DETAIL = 16 * 1024  # bytes of a scheme's status detail passed on to `status` and `graph`
DETAIL_BUDGET = 32 * 1024  # bytes of details of all schemes in one status reply
STATUS_SCHEMES = 128  # schemes one status reply describes at most
STATUS_ACCOUNTS = 256  # accounts one status reply describes at most
HOLDINGS_PAGE = 2048  # (account, scheme, handle, count) rows in one status reply
STATUS_BUDGET = 100 * 1024  # bytes of a status reply: it must fit in one frame (MAX_FRAME)
STATUS_TIMEOUT = 3.0  # a scheme slower than this shows its handle count as unknown


async def ask(scheme: Scheme, into: dict, req_id: int,
              send: Callable[[Scheme, bytes, list[int]], Awaitable[bool]]) -> None:
    """Ask scheme's daemon SCHEME_STATUS and put its answer (a map) into into; nothing if
    the question cannot be sent (the daemon died after KERNEL_STATUS found it alive) or
    is not answered within STATUS_TIMEOUT.

    Args:
        scheme: whom to ask.
        into: where its answer goes.
        req_id: the request id to ask under (the routing loop relays the answer by it).
        send: how the routing loop sends a frame to a scheme's daemon.
    """
    answer, answered = trio.open_memory_channel(1)
    scheme.pending[req_id] = StatusQuery(answer)
    frame = SREQUEST.pack(req_id, P.ROOT_HANDLE, 0, 0, 0, 0, P.SCHEME_STATUS, 0) + P.pack([])
    with trio.move_on_after(STATUS_TIMEOUT):
        # not sent (the daemon is gone, and its next one, if any, never saw the question):
        # no answer will come, so none is waited for
        if await send(scheme, frame, []):
            try:
                status, value = await answered.receive()
            except trio.EndOfChannel:
                status, value = P.ERR, None  # the daemon died meanwhile
            if status == P.OK and isinstance(value, dict):
                into.update(value)
    scheme.pending.pop(req_id, None)


def schemes_asked(options: dict, schemes: dict[int, Scheme]) -> list[Scheme]:
    """The schemes a status page describes: those `schemes` names (ids), or the first."""
    return pick(schemes, options.get("schemes"), STATUS_SCHEMES)


def page(options: dict, schemes: list[Scheme], accounts: dict[int, Account],
         capabilities: Iterable[Capability], answers: dict[int, dict], frames: int,
         summary: dict) -> dict:
    """One page of KERNEL_STATUS.

    Args:
        options: `accounts` (ids; default: the first STATUS_ACCOUNTS), `holdings_after`
            (the last [account, scheme, handle] of the previous page; default: the first
            page), `charged_to` (an account id: each scheme then says, as `charged`, how
            many of its capabilities are charged to it and how many of its handles only
            capabilities charged to it name).
        schemes: the schemes to describe (schemes_asked()).
        accounts: every listed account, by id.
        capabilities: every capability.
        answers: scheme id -> what it answered SCHEME_STATUS (`handles`, `detail`).
        frames: requests the router has read.
        summary: the router's totals.

    Returns:
        `frames`, `summary` (totals), `schemes`, `accounts`, a page of `holdings` and
        `holdings_next` (the cursor of the next page, or nil).
    """
    after = options.get("holdings_after")
    after = tuple(after) if isinstance(after, list) and len(after) == 3 else None
    caps: dict[int, int] = {}
    holdings: dict[tuple[int, int, int], int] = {}  # (account, scheme, handle) -> capabilities
    charged_to = options.get("charged_to")
    charged_to = charged_to if type(charged_to) is int else None
    named: dict[SchemeHandle, list[int]] = {}  # handle -> [its capabilities, those charged_to's]
    for cap in capabilities:
        sid = cap.handle.scheme.id
        caps[sid] = caps.get(sid, 0) + 1
        key = (cap.account.id, sid, cap.handle.number)
        if after is None or key > after:
            holdings[key] = holdings.get(key, 0) + 1
        if charged_to is not None:
            counts = named.setdefault(cap.handle, [0, 0])
            counts[0] += 1
            counts[1] += cap.payer.id == charged_to
    charged: dict[int, list[int]] = {}  # scheme -> [capabilities, handles] of charged_to's
    for handle, (count, theirs) in named.items():
        if theirs:
            entry = charged.setdefault(handle.scheme.id, [0, 0])
            entry[0] += theirs
            entry[1] += count == theirs
    keys = sorted(holdings)
    rows, more = keys[:HOLDINGS_PAGE], len(keys) > HOLDINGS_PAGE
    budget = DETAIL_BUDGET
    described = {}
    for s in schemes:
        detail, size = _bounded(answers.get(s.id, {}).get("detail"))
        if size > budget:
            detail, size = {"too large": True}, 0
        budget -= size
        described[str(s.id)] = {
            "alive": s.alive, "restarts": max(s.attached - 1, 0), "kept": len(s.restart.kept),
            "frames": s.frames, "capabilities": caps.get(s.id, 0), "handles": len(s.handles),
            "scheme_handles": answers.get(s.id, {}).get("handles"), "detail": detail,
            **({"charged": charged.get(s.id, [0, 0])} if charged_to is not None else {}),
        }
    status = {
        "frames": frames,
        "summary": summary,
        "schemes": described,
        "accounts": {str(a.id): a.counters()
                     for a in pick(accounts, options.get("accounts"), STATUS_ACCOUNTS)},
        "holdings": [[*key, holdings[key]] for key in rows],
        "holdings_next": list(rows[-1]) if more and rows else None,
    }
    while len(P.pack(status)) > STATUS_BUDGET and len(status["holdings"]) > 1:
        # the details made it large: a shorter page of holdings (the rest comes next)
        status["holdings"] = status["holdings"][: len(status["holdings"]) // 2]
        status["holdings_next"] = status["holdings"][-1][:3]
    return status


def _bounded(detail: object) -> tuple[object, int]:
    """A scheme's description of its handles, if it is small enough to pass on (a scheme
    served by a client must not be able to make every status reply huge), and its size."""
    if detail is None:
        return None, 0
    try:
        size = len(P.pack(detail))
    except (TypeError, ValueError, OverflowError):
        return None, 0
    return (detail, size) if size <= MAX_DETAIL else ({"too large": True}, 0)


def pick(table: dict, ids: object, most: int) -> list:
    """The entries of table (keyed by id) that ids names, or the first ones by id; at
    most `most` either way."""
    if isinstance(ids, list):
        return [table[i] for i in ids[:most] if type(i) is int and i in table]
    return [table[i] for i in sorted(table)[:most]]
