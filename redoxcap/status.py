"""`redoxcap status` as a table: one line per daemon, from the control op `status`.

The reply (`redoxcap status --json` prints it whole) holds the supervisor's
pid, uptime and state directory, the file root and the mounts, per daemon its
name, pid, scheme id, the router's counters (capabilities, handles, frames),
restarts, state and resident memory, and per running client (a program
`redoxcap run` started) its pid, command, namespace names, cwd and the
capabilities it holds (its router account's).

However many clients and capabilities there are, each reply is one page that
fits in a message: `fetch` asks for the pages that follow (`clients_next`,
`holdings_next`) and joins them.
"""

from __future__ import annotations

from collections.abc import Iterator
from pathlib import Path
from typing import Any

MAX_PAGES = 10_000  # a guard against a cursor that does not move on


def fetch(state_dir: Path, timeout: float = 10.0, request: Any = None) -> dict:
    """The whole status of the system at state_dir, from as many pages as it takes.

    Args:
        state_dir: the system's state directory.
        timeout: seconds each page may take.
        request: the control client's request function (control.request by default).

    Raises:
        control.ControlError: the system is not running or refused.
    """
    if request is None:
        from redoxcap.control import request
    reply, _ = request(state_dir, "status", timeout)
    info = reply["status"]
    for _ in range(MAX_PAGES):
        clients_after = info.pop("clients_next", None)
        holdings_after = info.pop("holdings_next", None)
        if clients_after is None and holdings_after is None:
            break
        # the rest of the lists; the daemons were described by the first page
        args: dict[str, Any] = {"detail": False}
        if clients_after is not None:
            args["clients_after"] = clients_after
        if holdings_after is not None:
            args["holdings_after"] = holdings_after
        page = request(state_dir, "status", timeout, **args)[0]["status"]
        if clients_after is not None:
            info["clients"] += page["clients"]
            info["clients_next"] = page.get("clients_next")
        if holdings_after is not None:
            info["holdings"] += page["holdings"]
            info["holdings_next"] = page.get("holdings_next")
    info.pop("clients_next", None)
    info.pop("holdings_next", None)
    return info

HEADER = (f"{'DAEMON':<10} {'PID':>7} {'SCHEME':>6} {'CAPS':>5} {'HANDLES':>7} {'FRAMES':>8} "
          f"{'RESTARTS':>8} {'RSS':>7}")


def render(info: dict) -> Iterator[str]:
    """The lines `redoxcap status` prints for a status reply.

    Args:
        info: the `status` field of the control op's reply.

    Yields:
        A summary line, the file root and the mounts, what the router holds (its
        schemes, capabilities and the fds clients hold of what they may), the runners'
        pids, the table's header and one row per daemon, then one row per running client.
    """
    yield f"supervisor pid {info['supervisor']}, up {info['uptime']:.0f}s, state {info['state_dir']}"
    if "root" in info:
        yield f"file root {info['root']}"
    for name, mount in sorted(info.get("mounts", {}).items()):
        yield f"mount {name}: {mount['path']}" + (" (read-only)" if mount.get("read_only") else "")
    summary = info.get("summary")
    if summary:
        yield (f"router: {summary['schemes']} schemes, {summary['capabilities']} capabilities; "
               f"clients hold {summary['client_fds']} of {summary['client_fd_limit']} fds "
               f"(reserve {summary['reserve']} of {summary['fd_limit']})")
    runners = info.get("runners")
    if runners:
        yield f"runners (runs under way, their daemons, spares): {' '.join(map(str, runners))}"
    spare = info.get("spare")
    if spare:
        yield (f"the spare holds {spare.get('capabilities', 0)} capabilities for the next run "
               f"(account {spare.get('account')}; the schemes' share: `status --json`, charged)")
    yield HEADER
    for d in info["daemons"]:
        rss = f"{d['rss_kib'] // 1024}M" if d.get("rss_kib") else "-"
        yield (
            f"{d['name']:<10} {d.get('pid') or '-':>7} {d.get('scheme_id', '-'):>6} "
            f"{d.get('capabilities', '-'):>5} {_handles(d):>7} {d.get('frames', 0):>8} "
            f"{d.get('restarts', '-'):>8} {rss:>7}" + _state_note(d)
        )
    clients = info.get("clients", [])
    if clients:
        yield ""
        yield f"{'CLIENT':>7} {'CAPS':>5}  {'NAMESPACE':<24} {'CWD':<16} COMMAND"
        for c in clients:
            names = "all" if c.get("names") is None else (c["names"] or "(empty)")
            yield (f"{c['pid']:>7} {c.get('capabilities', 0):>5}  {names:<24.24} "
                   f"{c.get('cwd') or '/':<16.16} {' '.join(c.get('argv') or [])}")


def _handles(d: dict) -> str:
    """The scheme's own count of open handles ('-' where it reports none)."""
    value = d.get("scheme_handles")
    return "-" if value is None else str(value)


def _state_note(d: dict) -> str:
    """What the table adds after a daemon that is not simply running."""
    state = d.get("state", "failed" if d.get("failed") else "running")
    if state == "failed":
        return f"  FAILED (redoxcap restart {d['name']})"
    return "  restarting" if state == "restarting" else ""
