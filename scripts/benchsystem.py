"""The private system the benchmarks in this directory measure (a helper, not a benchmark)."""

from __future__ import annotations

import contextlib
import subprocess
import sys
from collections.abc import Iterator
from pathlib import Path


@contextlib.contextmanager
def private_system(root: Path, state: Path, *up_options: str) -> Iterator[list[str]]:
    """`redoxcap up --detach --root root *up_options` in state, and `down` afterwards,
    whatever happens meanwhile; yields the CLI's argv prefix (`redoxcap --state-dir state`)."""
    cli = [sys.executable, "-m", "redoxcap", "--state-dir", str(state)]
    subprocess.run([*cli, "up", "--detach", "--root", str(root), *up_options], check=True,
                   stdout=subprocess.DEVNULL)
    try:
        yield cli
    finally:
        subprocess.run([*cli, "down"], check=False, stdout=subprocess.DEVNULL)
