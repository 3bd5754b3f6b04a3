"""The console script's short way for `run` (redoxcap/entry.py) reads every command line as
click does, and leaves to click every one it is not sure of."""

from __future__ import annotations

import inspect
import os
import subprocess
import sys
from pathlib import Path

import click
import pytest
from click.testing import CliRunner

from redoxcap import cli, entry, run


def click_reading(monkeypatch, args: list[str], env: dict[str, str] | None = None) -> dict:
    """What the click command passes to redoxcap.run.main for args (a recorder stands in)."""
    seen: dict = {}

    def record(state_dir, command, **options):
        seen.update(options, state_dir=state_dir, command=list(command))
        return 0

    monkeypatch.setattr(run, "main", record)
    result = CliRunner().invoke(cli.main, args, env=env or {}, catch_exceptions=False)
    assert result.exit_code == 0, result.output
    return seen


def entry_reading(args: list[str], env: dict[str, str] | None = None) -> dict:
    """What entry passes to redoxcap.run.main for args: the options given, over run.main's
    defaults (the values click's options default to)."""
    state_dir, command, options = entry.parse_run(args, env or {})
    if state_dir is not None:
        state_dir, options = entry.with_paths(state_dir, options)
    else:
        options = entry.with_paths("", options)[1]
    defaults = {name: p.default for name, p in inspect.signature(run.main).parameters.items()
                if p.default is not inspect.Parameter.empty
                and name not in ("system_up", "prepared", "on_scratch", "note", "ended")}  # the runner's to give
    from redoxcap.lifecycle import default_state_dir

    return {**defaults, **options, "command": command,
            "state_dir": state_dir if state_dir is not None else default_state_dir().absolute()}


def normalized(reading: dict) -> dict:
    return {k: list(v) if isinstance(v, tuple) else v for k, v in reading.items()}


@pytest.fixture
def paths(tmp_path: Path) -> dict[str, str]:
    (tmp_path / "root").mkdir()
    (tmp_path / "conf.toml").write_text("")
    return {"root": str(tmp_path / "root"), "config": str(tmp_path / "conf.toml"),
            "log": str(tmp_path / "run.log"), "state": str(tmp_path / "state"),
            "file": str(tmp_path / "conf.toml")}


LINES = [
    ["run", "--", "true"],
    ["run", "true", "--ns", "x", "--", "y"],  # after COMMAND, everything is COMMAND's
    ["--state-dir", "{state}", "run", "--ns", "", "--cwd", "/jail", "--beneath", "--no-broker",
     "--", "python3", "-c", "pass"],
    ["--state-dir={state}", "run", "--dir", ".", "--dir", "/tmp:ro", "--env", "A=1", "--env", "B",
     "--inherit-env", "--uds-scope", "demo", "sh", "-c", "echo"],
    ["run", "--allow-connect", "127.0.0.1:80", "--allow-listen=0", "--allow-udp-connect",
     "[::1]:53", "--allow-udp-listen", "9", "--trace={log}", "--trace-json", "--", "x"],
    ["run", "--trace", "--no-passthrough", "--ro-host", "/opt", "--ro-host=/srv", "--pass-fd", "3",
     "--pass-fd=4", "--max-caps", "64", "--", "x"],
    ["run", "--brokered", "--confine", "--require-confine", "--passthrough", "--max-caps=16", "x"],
    ["run", "--log", "{log}", "--root", "{root}", "--mount", "a=/tmp", "--config", "{config}", "x"],
    ["run", "--no-confine", "--trace", "--", "-", "a"],
    ["run", "--env", "--ns", "--cwd=", "x"],  # a value that looks like an option is still a value
    ["run", "--max-caps", "1048576", "--no-broker", "--brokered", "x"],  # the last one wins
]


@pytest.mark.parametrize("line", LINES, ids=lambda line: " ".join(line)[:60])
def test_run_options_read_as_click_reads_them(monkeypatch, paths, line):
    args = [arg.format(**paths) for arg in line]
    assert normalized(entry_reading(args)) == normalized(click_reading(monkeypatch, args))


def test_the_state_directory_comes_from_the_environment_as_with_click(monkeypatch, paths):
    env = {"REDOXCAP_STATE_DIR": paths["state"]}
    args = ["run", "--", "true"]
    assert entry_reading(args, env)["state_dir"] == Path(paths["state"])
    assert normalized(entry_reading(args, env)) == normalized(click_reading(monkeypatch, args, env))


UNSURE = [
    [], ["--help"], ["--version"], ["-h"], ["status"], ["up", "--detach"], ["--", "run", "x"],
    ["run"], ["run", "--"], ["run", "--help"], ["run", "-h", "x"], ["run", "--bogus", "x"],
    ["run", "--ns"], ["run", "--beneath=yes", "x"], ["run", "--trace", "file", "x"],
    ["run", "--trace"],
    ["run", "--max-caps", "8", "x"], ["run", "--max-caps", "+64", "x"],
    ["run", "--max-caps", "2000000", "x"], ["run", "--pass-fd", "2", "x"],
    ["run", "--pass-fd", "three", "x"], ["run", "--config", "/nonexistent/c.toml", "x"],
    ["run", "--config", "{root}", "x"], ["run", "--root", "{file}", "x"],
    ["run", "--log", "{root}", "x"], ["--state-dir", "{file}", "run", "x"],
    ["--state-dir", "", "run", "x"], ["run", "--no-broker=1", "x"],
]


@pytest.mark.parametrize("line", UNSURE, ids=lambda line: " ".join(line)[:60] or "(nothing)")
def test_what_the_short_way_is_not_sure_of_goes_to_click(paths, line):
    args = [arg.format(**paths) for arg in line]
    with pytest.raises(entry._ClickDecides):
        entry.parse_run(args, {})


def test_every_option_of_run_is_in_the_table_under_the_name_click_gives_it():
    """An option added to the click command and not to the table would only be slower (click
    reads it); one whose name or flag sense differs would be read wrong: neither may happen."""
    options = {}
    for param in cli.main.commands["run"].params:
        if isinstance(param, click.Option):
            options.update({opt: (param.name, "on" if param.is_flag else None) for opt in param.opts})
            options.update({opt: (param.name, "off") for opt in param.secondary_opts})
    assert set(options) == set(entry.RUN_OPTIONS)
    for opt, (dest, kind) in entry.RUN_OPTIONS.items():
        flag_sense = options[opt][1]
        assert options[opt][0] == dest, opt
        assert (flag_sense is not None) == (kind in ("on", "off")), opt
        if flag_sense is not None:
            assert flag_sense == kind, opt


def test_a_command_line_click_refuses_still_gets_clicks_message_and_exit_code(tmp_path):
    out = subprocess.run([sys.executable, "-m", "redoxcap", "--state-dir", str(tmp_path), "run",
                          "--max-caps", "8", "--", "true"], capture_output=True, text=True,
                         timeout=60, check=False)
    assert out.returncode == 2, out.stderr
    assert "--max-caps" in out.stderr and "16" in out.stderr


def test_a_run_loads_neither_click_nor_trio():
    """What a run with a system up imports (its parse, run, the broker, the sandbox), in a
    process of its own: none of the modules only other commands and the supervisor need."""
    code = ("import sys; from redoxcap import entry, run; "
            "entry.parse_run(['run', '--', 'true'], {}); "
            "import redoxcap.broker, redoxcap.sandbox; "
            "print(sorted(m for m in ('click', 'trio', 'redoxcap.config', 'redoxcap.cli') "
            "if m in sys.modules))")
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=60,
                         check=True, env={**os.environ, "PYTHONPATH": ""})
    assert out.stdout.strip() == "[]", out.stderr


# What the `redoxcap` command's way to a runner may load besides what the interpreter has at
# start: its own two modules, the package, and a few small built-in ones (not __future__ nor
# resource: 0.2 ms each).
HANDOVER_MODULES = {"redoxcap", "redoxcap.entry", "redoxcap.launch", "_signal", "_socket",
                    "marshal", "time"}


def test_the_command_hands_a_run_over_loading_next_to_nothing():
    """No typing, re, pathlib or socket on the way to a runner: each is milliseconds of every
    `redoxcap run` (typing and re alone were a fifth of `run -- /bin/true`)."""
    code = ("import sys; before = set(sys.modules); import redoxcap.entry, redoxcap.launch; "
            "print(' '.join(sorted(set(sys.modules) - before)))")
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=60,
                         check=True, env={**os.environ, "PYTHONPATH": ""})
    assert set(out.stdout.split()) <= HANDOVER_MODULES, out.stdout


def test_the_installed_command_is_the_lean_script():
    """pip's wrapper for an entry point imports re; the installed `redoxcap` is bin/redoxcap,
    whose only imports are sys and the entry point."""
    script = Path(sys.executable).parent / "redoxcap"
    if not script.exists():
        pytest.skip("redoxcap is not installed beside this interpreter")
    imports = [line for line in script.read_text().splitlines()
               if line.startswith(("import ", "from "))]
    assert imports == ["import sys", "from redoxcap.entry import main"], imports
    out = subprocess.run([str(script), "--version"], capture_output=True, text=True, timeout=60,
                         check=False)
    assert out.returncode == 0 and "redoxcap" in out.stdout, out
