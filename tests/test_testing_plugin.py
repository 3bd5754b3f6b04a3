"""The pytest plugin shipped with the package (redoxcap.testing): what it starts, it stops.

A system booted for a test is stopped however the test ends, background
clients included, and the example test file a user starts from runs as is
under plain pytest.
"""

from __future__ import annotations

import subprocess
import sys
from pathlib import Path

import pytest

from redoxcap.testing import booted, pid_alive

EXAMPLE = Path(__file__).resolve().parent.parent / "examples" / "test_my_client.py"


def test_a_failing_block_still_stops_the_system_and_its_background_clients(tmp_path):
    with pytest.raises(RuntimeError, match="the test failed"), booted(tmp_path) as system:
        pids = system.pids()
        client = system.start("run", "--", sys.executable, "-c", "import sys; sys.stdin.read()")
        raise RuntimeError("the test failed")  # the body's error is the one reported
    assert client.returncode is not None  # killed and reaped
    assert [pid for pid in pids if pid_alive(pid)] == []
    assert not (tmp_path / "state" / "control.sock").exists()


def test_a_background_client_whose_pipes_the_test_closed_is_stopped_with_the_system(tmp_path):
    with booted(tmp_path) as system:
        pids = system.pids()
        client = system.start("run", "--", sys.executable, "-c", "import sys; sys.stdin.read()")
        for pipe in (client.stdin, client.stdout, client.stderr):
            pipe.close()
    assert client.returncode is not None  # killed and reaped
    assert [pid for pid in pids if pid_alive(pid)] == []


def test_the_example_test_file_passes_under_plain_pytest():
    out = subprocess.run([sys.executable, "-m", "pytest", "-q", "-p", "no:cacheprovider", str(EXAMPLE)],
                         capture_output=True, text=True, timeout=110, check=False,
                         cwd=EXAMPLE.parent.parent)
    assert out.returncode == 0, out.stdout + out.stderr
    assert "5 passed" in out.stdout
