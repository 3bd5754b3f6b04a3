"""Holes found by red-teaming `redoxcap run --dir D` (each test fails while the hole is open).

The attacker is the confined program; what it must not reach is anything outside D, its
private /tmp and the read-only host trees the docs list (docs/sandbox.md).
"""

from __future__ import annotations

import os
from pathlib import Path

import pytest
from test_everyday import sandboxed

import redoxcap
from redoxcap.broker import available

pytestmark = pytest.mark.skipif(available() is not None, reason=str(available()))

CHECKOUT = Path(redoxcap.__file__).resolve().parents[1]


@pytest.mark.skipif(not (CHECKOUT / "pyproject.toml").is_file(), reason="not a source checkout")
def test_the_source_checkout_is_not_granted_as_a_whole(redoxcap_module_system, tmp_path):
    """docs/sandbox.md: "A directory that is or contains ... a source checkout on sys.path ...
    is never granted as a whole"; only redoxcap's own package directories are. But in a
    source checkout `redoxcap/__init__.py` appends the checkout's top to `redoxcap.__path__`,
    and policy.project_package_locations() takes every entry of it, so every brokered run
    may read (and Landlock lets it open and exec) the whole checkout: pyproject.toml, docs,
    tests, its `.git`, a venv or an `.env` kept there, anything a developer puts beside the
    packages."""
    project = tmp_path / "proj"
    project.mkdir()
    secret = CHECKOUT / "pyproject.toml"  # no package's file: beside them, at the top
    got = sandboxed(redoxcap_module_system, project,
                    ["sh", "-c", f'cat {secret} >/dev/null && echo READ; ls {CHECKOUT} >/dev/null && echo LISTED'])
    assert "READ" not in got.stdout and "LISTED" not in got.stdout, got.stdout
