"""The shape of the code: who may import whom, and docs that say what the code declares.

The import rules are read from the code's syntax tree, so a rule broken in a
function body or behind a condition is found too:

- the wire layer imports nothing of the project but itself;
- the kernel imports only the wire layer;
- rt's client modules import nothing from kernel, nsmgr, schemes or redoxcap;
- a scheme daemon imports the wire layer and the scheme framework's shared
  helpers, never another scheme daemon;
- nsmgr is a scheme: the wire layer, the framework, itself.
"""

from __future__ import annotations

import ast
import re
from pathlib import Path

import pytest

from wire.ops import markdown_table

ROOT = Path(__file__).resolve().parent.parent
PROJECT = {"wire", "kernel", "nsmgr", "schemes", "rt", "redoxcap"}
SCHEME_HELPERS = {"schemes", "schemes.framework", "schemes._scheme", "schemes._server", "schemes.resolve",
                  "schemes.device", "schemes.netaddr"}


def imports(path: Path) -> set[str]:
    """The project modules a file imports, anywhere in it."""
    found = set()
    for node in ast.walk(ast.parse(path.read_text(), str(path))):
        if isinstance(node, ast.Import):
            names = [alias.name for alias in node.names]
        elif isinstance(node, ast.ImportFrom) and node.level == 0 and node.module:
            names = [node.module] + [f"{node.module}.{alias.name}" for alias in node.names]
        else:
            continue
        found |= {n for n in names if n.split(".")[0] in PROJECT}
    return found


def modules(package: str) -> list[Path]:
    return sorted((ROOT / package).rglob("*.py"))


def offenders(package: str, allowed) -> dict[str, list[str]]:
    bad = {}
    for path in modules(package):
        wrong = sorted(name for name in imports(path) if not allowed(path, name))
        if wrong:
            bad[str(path.relative_to(ROOT))] = wrong
    return bad


def top(name: str) -> str:
    return name.split(".")[0]


def test_the_wire_layer_imports_only_itself():
    assert offenders("wire", lambda path, name: top(name) == "wire") == {}


def test_the_kernel_imports_only_the_wire_layer():
    assert offenders("kernel", lambda path, name: top(name) in ("wire", "kernel")) == {}


def test_rt_imports_no_daemon_and_no_cli():
    assert offenders("rt", lambda path, name: top(name) in ("wire", "rt")) == {}


def test_scheme_daemons_import_no_other_scheme():
    def allowed(path: Path, name: str) -> bool:
        if top(name) == "wire":
            return True
        module = name if name in SCHEME_HELPERS else ".".join(name.split(".")[:2])
        return module in SCHEME_HELPERS or module == f"schemes.{path.stem}"

    assert offenders("schemes", allowed) == {}


def test_nsmgr_is_a_scheme_and_imports_like_one():
    allowed_tops = {"wire", "nsmgr"}
    assert offenders("nsmgr", lambda path, name: top(name) in allowed_tops
                     or name in SCHEME_HELPERS or name.startswith("schemes.framework")) == {}


def test_importing_rt_or_the_wire_layer_has_no_side_effects():
    """rt adopts inherited capabilities on first use, not on import."""
    import subprocess
    import sys

    code = ("import os; os.environ['REDOXCAP_NS_FD'] = '0'\n"
            "import rt, wire.protocol, wire.frames, wire.ops\n"
            "print(os.environ.get('REDOXCAP_NS_FD'), os.get_inheritable(0))\n")
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True,
                         stdin=subprocess.DEVNULL)
    assert out.stdout.split() == ["0", "True"]


@pytest.mark.parametrize("namespace", [False, True], ids=["scheme operations", "namespace operations"])
def test_the_protocol_page_shows_the_declared_operations(namespace):
    page = (ROOT / "docs/protocol.md").read_text()
    assert markdown_table(namespace) in page, "docs/protocol.md: paste `python -m wire.ops` in"


def test_every_operation_number_in_the_docs_is_declared():
    from wire import ops

    page = (ROOT / "docs/protocol.md").read_text()
    for name, number in re.findall(r"`([A-Z_]+)` \((\d+)\)", page):
        declared = ops.BY_NUMBER.get(int(number))
        if declared is not None:
            assert declared.constant == name, (name, number)
