"""scripts/bench.py keeps working: its smoke mode runs every part with tiny counts.

No time is asserted: the numbers of a shared machine mean nothing to a test.
What is asserted is that every row of issue 21's target table is measured,
as a ratio to the baseline it names, and judged against its target.
"""

from __future__ import annotations

import json
import shutil
import subprocess
import sys
from pathlib import Path

import pytest

from redoxcap.broker import available

SCRIPTS = Path(__file__).resolve().parent.parent / "scripts"
SCRIPT = SCRIPTS / "bench.py"

TARGET_ROWS = [
    "routed read 1 B of /scheme/zero through rt",
    "routed fstat through rt",
    "open+close via the namespace",
    "stat via the namespace",
    "brokered os.stat of a cwd file",
    "brokered open+read 4 KiB+close of a cwd file",
    "`redoxcap run -- /bin/true`",
    "`redoxcap run -- python3 -c pass`",
    "a private run --dir D -- /bin/true, no system up",
    "bulk passthrough read 64 MiB",
    "bulk passthrough write 64 MiB",
    "clients vs 4",
]


MAKE_ROW = "--dir D make (8 C files)"  # scripts/benchlaunch.py MAKE, where make and cc are


def bubblewrap_here() -> bool:
    sys.path.insert(0, str(SCRIPTS))
    try:
        from benchlaunch import bubblewrap
    finally:
        sys.path.remove(str(SCRIPTS))
    return bubblewrap()[0] is not None


def smoke(*options: str) -> subprocess.CompletedProcess:
    out = subprocess.run([sys.executable, str(SCRIPT), "--smoke", *options], capture_output=True,
                         text=True, timeout=150, check=False)
    assert out.returncode == 0, out.stderr
    return out


needs_broker = pytest.mark.skipif(available() is not None, reason=str(available()))


@pytest.fixture(scope="module")
def result() -> dict:
    """One smoke run's JSON, for the tests that read it."""
    return json.loads(smoke("--json").stdout)


@needs_broker
def test_the_benchmark_runs_every_part_in_smoke_mode(result):
    assert set(result) >= {"floors", "rt", "keep", "io", "bulk", "broker", "programs", "launch",
                           "scaling", "memory", "targets"}
    assert set(result["keep"]) == {"open+close kept", "open+close not kept (:nokeep)"}
    assert all(value > 0 for value in result["floors"].values())
    assert set(result["programs"]) == {"cat", "ls -R", "python3 -c pass"}
    assert "getcwd (the broker alone)" in result["broker"]
    # every latency of the target table is a ratio to R measured beside it
    for part, row in [("rt", "read 1 B of /scheme/zero"), ("rt", "fstat"),
                      ("rt", "open+close via the namespace"), ("rt", "stat via the namespace"),
                      ("broker", "stat via the cwd"), ("broker", "open+read 4 KiB+close via the cwd")]:
        assert result[part][row]["/R"] > 0 and result[part][row]["R µs"] > 0, (part, row)
    assert set(result["bulk"]) == {f"{op} {kind}" for op in ("read", "write")
                                   for kind in ("routed", "passthrough", "native")}
    assert result["scaling"]["most vs 4"]["ratio"] > 0


@needs_broker
def test_launches_are_timed_through_the_cli_beside_bubblewrap_where_it_is_installed(result):
    launch = result["launch"]
    default = f"redoxcap run ({launch['modes'][0]})"
    assert len(launch["modes"]) == 2 and "default" in launch["modes"][0]
    builds = {MAKE_ROW} if shutil.which("make") and shutil.which("cc") else set()
    assert set(launch["commands"]) == {"/bin/true", "python3 -c pass", "--dir D /bin/true", *builds}
    for name in builds:  # a compiler runs brokered only
        assert [who for who in launch["commands"][name]["ms"] if who.startswith("redoxcap")] \
            == [f"redoxcap run ({launch['modes'][0]})"]
    assert set(launch["private"]) == {"run --dir D -- /bin/true, none up ms", "up --detach ms"}
    assert all(ms > 0 for ms in launch["private"].values())
    for command in launch["commands"].values():
        assert command["ms"]["native"] > 0 and command["ms"][default] > 0
        assert command["ratios"][f"{default} / native"] > 0
    rows = {row["what"]: row for row in result["targets"]}
    assert [what for what in TARGET_ROWS if not any(what in row for row in rows)] == []
    launch_rows = [row for what, row in rows.items() if what.startswith("`redoxcap run")]
    assert all(row["target"].endswith("x bubblewrap") for row in launch_rows)
    if bubblewrap_here():
        assert all(row["met"] in (True, False) and row["measured"] > 0 for row in launch_rows)
        assert all(c["ratios"][f"{default} / bubblewrap"] > 0 for c in launch["commands"].values())
    else:
        assert launch["bubblewrap"].startswith("not installed")
        assert all(row["met"] is None for row in launch_rows)
    other = [row for what, row in rows.items() if not what.startswith("`redoxcap run")]
    assert all(row["met"] in (True, False) for row in other)


@needs_broker
def test_without_bubblewrap_the_report_says_so_and_shows_times_against_native():
    out = smoke("--without-bubblewrap").stdout
    assert "bubblewrap: not measured" in out
    native_rows = [line for line in out.splitlines() if line.strip().startswith("redoxcap run (")]
    builds = 1 if shutil.which("make") and shutil.which("cc") else 0  # the default mode only
    assert len(native_rows) == 6 + builds  # two modes, three commands: ms and x native each
    assert all(len(line.split(")")[-1].split()) == 2 for line in native_rows)
    verdicts = [line for line in out.splitlines() if line.startswith("`redoxcap run --")]
    assert len(verdicts) == 2 and all(line.endswith("open") for line in verdicts)
    assert "issue 21 target" in out and ("met" in out or "MISSED" in out)
