"""The pytest plugin (the `pytest11` entry point `redoxcap`): its fixtures and its one hook.

The fixtures are documented in docs/testing.md; each is built on a public
helper of redoxcap.testing (`booted`, `installed`, `isolated`, `settled`).
"""

from __future__ import annotations

import itertools
from collections.abc import Iterator
from pathlib import Path

import pytest

from redoxcap.testing.clients import holdings, installed, isolated, no_new_traceback, settled
from redoxcap.testing.system import System, booted

_FAILED = pytest.StashKey[bool]()


@pytest.hookimpl(hookwrapper=True)
def pytest_runtest_makereport(item: pytest.Item, call: pytest.CallInfo) -> Iterator[None]:
    """Note on the item whether the test itself failed (its fixtures then skip their checks)."""
    outcome = yield
    report = outcome.get_result()
    if report.when == "call" and report.failed:
        item.stash[_FAILED] = True


def _test_directory_name(request: pytest.FixtureRequest) -> str:
    """A name for the test's own directory: its name, made safe, and unique in the session."""
    safe = "".join(c if c.isalnum() or c in "-_." else "_" for c in request.node.name)[:100]
    return f"{safe}-{next(_numbers)}"


_numbers = itertools.count(1)


@pytest.fixture
def redoxcap_system(tmp_path: Path) -> Iterator[System]:
    """A private system for this test, stopped and checked afterwards (see `booted`)."""
    with booted(tmp_path) as system:
        yield system


@pytest.fixture
def redoxcap_client(redoxcap_system: System) -> Iterator[System]:
    """`redoxcap_system`, with this process's rt holding its root namespace and `/` as cwd."""
    with installed(redoxcap_system):
        yield redoxcap_system


@pytest.fixture(scope="module")
def redoxcap_module_system(tmp_path_factory: pytest.TempPathFactory) -> Iterator[System]:
    """One system for every test of the module that asks for it; for tests that leave nothing behind."""
    with booted(tmp_path_factory.mktemp("redoxcap")) as system:
        yield system


@pytest.fixture
def redoxcap_module_client(redoxcap_module_system: System,
                           request: pytest.FixtureRequest) -> Iterator[System]:
    """`redoxcap_client` on the module's shared system: its root namespace, `/` as cwd.

    Afterwards the router must hold no more capabilities and handles per
    scheme than before the test (unless the test failed anyway).
    """
    before = holdings(redoxcap_module_system)
    with no_new_traceback(redoxcap_module_system), installed(redoxcap_module_system):
        yield redoxcap_module_system
    if not request.node.stash.get(_FAILED, False):
        settled(redoxcap_module_system, before)


@pytest.fixture
def redoxcap_isolated_client(redoxcap_module_system: System,
                             request: pytest.FixtureRequest) -> Iterator[System]:
    """A client of the module's shared system that sees a fresh directory of its own as `file`.

    The yielded system's `root` is that directory on the host; `run` and
    `python` still start clients in the whole system (its root namespace).
    Afterwards the router must hold no more capabilities and handles per
    scheme than before the test (unless the test failed anyway), so the next
    test finds the system as this one did.
    """
    before = holdings(redoxcap_module_system)
    with isolated(redoxcap_module_system, _test_directory_name(request)) as view:
        yield view
    if not request.node.stash.get(_FAILED, False):
        settled(redoxcap_module_system, before)
