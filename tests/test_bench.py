"""scripts/bench.py keeps working: its smoke mode runs every part with tiny counts.

No time is asserted: the numbers of a shared machine mean nothing to a test.
"""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import pytest

from redoxcap.broker import available

SCRIPT = Path(__file__).resolve().parent.parent / "scripts" / "bench.py"


@pytest.mark.skipif(available() is not None, reason=str(available()))
def test_the_benchmark_runs_every_part_in_smoke_mode():
    out = subprocess.run([sys.executable, str(SCRIPT), "--smoke", "--json"], capture_output=True,
                         text=True, timeout=110, check=False)
    assert out.returncode == 0, out.stderr
    result = json.loads(out.stdout)
    assert set(result) >= {"floors", "rt", "keep", "io", "bulk", "broker", "programs", "scaling", "memory"}
    assert set(result["keep"]) == {"open+close kept", "open+close not kept (:nokeep)"}
    assert all(value > 0 for value in result["floors"].values())
    assert set(result["programs"]) == {"cat", "ls -R", "python3 -c pass"}
    assert "getcwd (the broker alone)" in result["broker"]
