"""`redoxcap graph`: the capability graph of a running system, in Graphviz's DOT.

Who holds what: each client `redoxcap run` started (and the system itself:
the supervisor and the daemons, one router account) points at the scheme
handles its capabilities name (with how many capabilities), each handle at
the daemon that serves it, and each namespace handle lists its names. All of
it comes from one `status` reply: the router's holdings per account, the
schemes' own description of their handles, and the supervisor's clients.
"""

from __future__ import annotations

import shutil
import subprocess
from pathlib import Path

from redoxcap.wire.printable import escape_text

SYSTEM_ACCOUNT = 0


def _quote(text: str) -> str:
    """A DOT string: each line shown printable (wire/printable.py: a file name a client
    chose cannot drive the terminal the graph is printed on), quotes and backslashes
    escaped, newlines as DOT's line breaks."""
    lines = (escape_text(line).replace("\\", "\\\\").replace('"', '\\"') for line in text.split("\n"))
    return '"' + "\\n".join(lines) + '"'


def _handle_label(scheme: str, number: int, detail: dict | None) -> str:
    if scheme == "scheme 0":
        return "kernel capability"
    label = f"{scheme} #{number}" if number else f"{scheme} root"
    if detail:
        namespaces = detail.get("namespaces", {})
        if str(number) in namespaces:
            names = namespaces[str(number)]["names"]
            label += "\nnamespace: " + (", ".join(names) if names else "(empty)")
        paths = detail.get("paths", {})
        if str(number) in paths:
            label += "\n" + paths[str(number)]
    return label


def dot(info: dict) -> str:
    """The DOT text of a status reply's capability graph."""
    daemons = [d for d in info.get("daemons", []) if d.get("scheme_id")]
    by_scheme = {d["scheme_id"]: d for d in daemons}
    holders = {SYSTEM_ACCOUNT: "system"}
    lines = ["digraph capabilities {", "  rankdir=LR;", "  node [fontname=Helvetica, fontsize=10];",
             '  system [shape=box, style=rounded, label="supervisor and daemons\\n(system account)"];']
    for client in info.get("clients", []):
        node = f"client{client['pid']}"
        holders[client.get("account")] = node
        names = "all" if client.get("names") is None else (client["names"] or "(empty)")
        label = (f"pid {client['pid']}\n{' '.join(client.get('argv') or [])[:40]}"
                 f"\nnamespace: {names}\ncwd: {client.get('cwd') or '/'}")
        lines.append(f"  {node} [shape=box, style=\"rounded,filled\", fillcolor=lightyellow, "
                     f"label={_quote(label)}];")
    spare = (info.get("spare") or {}).get("account")
    if spare is not None:  # what the spare runner holds for the next run (redoxcap.run.Prepared)
        holders[spare] = "spare"
        lines.append('  spare [shape=box, style="rounded,dashed", '
                     'label="spare runner\\n(the next run\'s namespace, made ahead)"];')
    for d in daemons:
        label = f"{d['name']} daemon\npid {d.get('pid') or '-'}"
        lines.append(f"  scheme{d['scheme_id']} [shape=component, label={_quote(label)}];")
    handles = set()
    for account, scheme_id, number, count in info.get("holdings", []):
        holder = holders.get(account)
        if holder is None:
            holder = holders[account] = f"account{account}"
            lines.append(f"  {holder} [shape=box, label={_quote(f'account {account}')}];")
        daemon = by_scheme.get(scheme_id)
        scheme = daemon["name"] if daemon else f"scheme {scheme_id}"
        node = f"h{scheme_id}_{number}"
        if node not in handles:
            handles.add(node)
            label = _handle_label(scheme, number, daemon.get("detail") if daemon else None)
            lines.append(f"  {node} [shape=ellipse, label={_quote(label)}];")
            if daemon:
                lines.append(f"  {node} -> scheme{scheme_id} [style=dashed, arrowhead=none];")
        suffix = f" x{count}" if count > 1 else ""
        lines.append(f"  {holder} -> {node} [label={_quote(suffix.strip())}];")
    lines.append("}")
    return "\n".join(lines) + "\n"


def render(text: str, output: Path) -> None:
    """Write text (DOT) to output as SVG or PNG (by its suffix) with Graphviz's dot.

    Raises:
        ValueError: the suffix is neither .svg, .png nor .dot.
        FileNotFoundError: Graphviz is not installed.
        subprocess.CalledProcessError: dot failed.
    """
    kind = output.suffix.lstrip(".").lower()
    if kind == "dot":
        output.write_text(text)
        return
    if kind not in ("svg", "png"):
        raise ValueError(f"{output}: the output is .svg, .png or .dot")
    dot_program = shutil.which("dot")
    if dot_program is None:
        raise FileNotFoundError("Graphviz's `dot` is not installed (Debian: apt-get install graphviz)")
    subprocess.run([dot_program, f"-T{kind}", "-o", str(output)], input=text, text=True,
                   check=True, capture_output=True)
