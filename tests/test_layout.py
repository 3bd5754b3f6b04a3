"""The shape of the code: who may import whom, and docs that say what the code declares.

The import rules are read from the code's syntax tree, so a rule broken in a
function body or behind a condition is found too:

- the wire layer imports nothing of the project but itself;
- the kernel imports only the wire layer;
- rt's client modules import nothing from kernel, nsmgr, schemes or redoxcap;
- a scheme daemon imports the wire layer, the scheme framework's shared
  helpers and its own parts (file_work.py of file.py), never another scheme daemon;
- nsmgr is a scheme: the wire layer, the framework, itself.
"""

from __future__ import annotations

import ast
import re
from pathlib import Path

import pytest

from redoxcap.wire.ops import markdown_table

ROOT = Path(__file__).resolve().parent.parent
TOP_LEVEL = {"rt", "redoxcap"}  # the only packages the distribution installs
LAYERS = {"wire", "kernel", "nsmgr", "schemes"}  # redoxcap.LAYER, each with rules of its own
SCHEME_HELPERS = {"redoxcap.schemes", "redoxcap.schemes.framework", "redoxcap.schemes._scheme",
                  "redoxcap.schemes._server", "redoxcap.schemes.resolve", "redoxcap.schemes.device",
                  "redoxcap.schemes.netaddr"}


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
        found |= {n for n in names if n.split(".")[0] in TOP_LEVEL}
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
    """The part of the project a module belongs to: a layer (`redoxcap.wire...` is "wire"),
    "rt", or "redoxcap" for the rest of the command's package."""
    parts = name.split(".")
    if parts[0] == "redoxcap" and len(parts) > 1 and parts[1] in LAYERS:
        return parts[1]
    return parts[0]


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
        module = name if name in SCHEME_HELPERS else ".".join(name.split(".")[:3])
        own = f"redoxcap.schemes.{path.stem}"  # and its parts: file.py's file_work.py
        return module in SCHEME_HELPERS or module == own or module.startswith(f"{own}_")

    assert offenders("schemes", allowed) == {}


def test_nsmgr_is_a_scheme_and_imports_like_one():
    allowed_tops = {"wire", "nsmgr"}
    assert offenders("nsmgr", lambda path, name: top(name) in allowed_tops
                     or name in SCHEME_HELPERS or name.startswith("redoxcap.schemes.framework")) == {}


def test_importing_rt_or_the_wire_layer_has_no_side_effects():
    """rt adopts inherited capabilities on first use, not on import."""
    import subprocess
    import sys

    code = ("import os; os.environ['REDOXCAP_NS_FD'] = '0'\n"
            "import rt, redoxcap.wire.protocol, redoxcap.wire.frames, redoxcap.wire.ops\n"
            "print(os.environ.get('REDOXCAP_NS_FD'), os.get_inheritable(0))\n")
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True,
                         stdin=subprocess.DEVNULL)
    assert out.stdout.split() == ["0", "True"]


def test_only_rt_and_redoxcap_are_installed_as_top_level_packages():
    """Generic names (wire, kernel, schemes) would collide with other distributions: the
    repository's layer folders are installed inside redoxcap, and every package is."""
    import tomllib

    setuptools = tomllib.loads((ROOT / "pyproject.toml").read_text())["tool"]["setuptools"]
    installed = set(setuptools["packages"])
    assert {name.split(".")[0] for name in installed} == TOP_LEVEL
    assert setuptools["package-dir"] == {f"redoxcap.{layer}": layer for layer in LAYERS}
    folders = {".".join(p.parent.relative_to(ROOT).parts) for p in ROOT.glob("**/__init__.py")
               if not {".venv", "build", "tests", "examples", "scripts"} & set(p.parts)}
    as_installed = {f"redoxcap.{name}" if name.split(".")[0] in LAYERS else name
                    for name in folders}
    assert as_installed == installed, "pyproject.toml's packages miss or name another package"


@pytest.mark.parametrize("namespace", [False, True], ids=["scheme operations", "namespace operations"])
def test_the_protocol_page_shows_the_declared_operations(namespace):
    page = (ROOT / "docs/protocol.md").read_text()
    assert markdown_table(namespace) in page, "docs/protocol.md: paste `python -m redoxcap.wire.ops` in"


def test_every_operation_number_in_the_docs_is_declared():
    from redoxcap.wire import ops

    page = (ROOT / "docs/protocol.md").read_text()
    for name, number in re.findall(r"`([A-Z_]+)` \((\d+)\)", page):
        declared = ops.BY_NUMBER.get(int(number))
        if declared is not None:
            assert declared.constant == name, (name, number)
