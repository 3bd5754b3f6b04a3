"""The `redoxcap` command's entry point: `run` the short way, every other command through click.

`redoxcap run -- CMD` is the command people wait on, and most of its cost
used to be the interpreter loading what the run does not use: click, the
other commands, trio. :func:`main` reads `run`'s options itself, with a
table of them (:data:`RUN_OPTIONS`), and calls :func:`redoxcap.run.main`
with exactly the values the click command would pass. Whatever the table
does not cover for certain (`--help`, another command, an unknown or
malformed option, a value click would refuse or convert, `--trace FILE`
spelled without `=`) goes to the click group in :mod:`redoxcap.cli`, which
parses it as it always did; tests/test_entry.py checks that both read every
option the same way.
"""

import os
import stat
import sys

# No `from __future__ import annotations` (loading __future__ costs a run 0.2 ms): the
# annotations that name what only a type checker imports are strings.
TYPE_CHECKING = False  # typing.TYPE_CHECKING without importing typing (a few ms per run here)
if TYPE_CHECKING:
    from collections.abc import Mapping, Sequence
    from pathlib import Path
    from typing import Any

# Nothing here loads more than the interpreter has at start: a run with a system up is handed
# to it (redoxcap/launch.py) from here, and pathlib, typing and the rest would only slow it.

# `run`'s options: option -> (the parameter of redoxcap.run.main, how its value is read). Kinds:
#   text / texts      a value / a repeatable value
#   on / off          a flag that sets the parameter True / False
#   fd                a repeatable integer >= 3 (--pass-fd)
#   caps              an integer 16 .. 2**20 (--max-caps)
#   dir / file / config   a path: not a regular file / not a directory / an existing readable
#                     non-directory (click.Path's checks; anything else: click says why)
#   trace             --trace: `-` alone, FILE with `--trace=FILE`
RUN_OPTIONS: dict[str, tuple[str, str]] = {
    "--ns": ("names", "text"),
    "--dir": ("dirs", "texts"),
    "--cwd": ("cwd", "text"),
    "--beneath": ("beneath", "on"),
    "--confine": ("confine", "on"),
    "--no-confine": ("confine", "off"),
    "--require-confine": ("require_confine", "on"),
    "--env": ("env_options", "texts"),
    "--inherit-env": ("inherit_env", "on"),
    "--uds-scope": ("uds_scope", "text"),
    "--allow-connect": ("tcp_connect", "texts"),
    "--allow-listen": ("tcp_listen", "texts"),
    "--allow-udp-connect": ("udp_connect", "texts"),
    "--allow-udp-listen": ("udp_listen", "texts"),
    "--trace": ("trace", "trace"),
    "--trace-json": ("trace_json", "on"),
    "--brokered": ("brokered", "on"),
    "--no-broker": ("brokered", "off"),
    "--ro-host": ("ro_host", "texts"),
    "--passthrough": ("passthrough", "on"),
    "--in-process": ("in_process", "on"),
    "--no-passthrough": ("passthrough", "off"),
    "--pass-fd": ("pass_fds", "fd"),
    "--max-caps": ("max_caps", "caps"),
    "--log": ("log_file", "file"),
    "--root": ("root", "dir"),
    "--mount": ("mounts", "texts"),
    "--config": ("config_file", "config"),
}
PATH_OPTIONS = frozenset(dest for dest, kind in RUN_OPTIONS.values()
                         if kind in ("dir", "file", "config"))
MAX_CAPS_RANGE = (16, 1 << 20)
MIN_PASS_FD = 3


class _ClickDecides(Exception):
    """Not certain: let click parse the whole command line."""


def parse_run(args: "Sequence[str]", environ: "Mapping[str, str]"
              ) -> "tuple[str | None, list[str], dict[str, Any]]":
    """Read `[--state-dir DIR] run [OPTIONS] [--] COMMAND...` as the click group would.

    Args:
        args: the command line without the program name.
        environ: the environment (REDOXCAP_STATE_DIR).

    Returns:
        (--state-dir as given, made absolute, or None when neither it nor
        REDOXCAP_STATE_DIR says: the default; COMMAND; the other keyword
        arguments of redoxcap.run.main, only those given, with paths as
        strings: :func:`run_command` makes them Paths).

    Raises:
        _ClickDecides: anything else, or anything this table is not sure of.
    """
    rest = list(args)
    state_dir = environ.get("REDOXCAP_STATE_DIR") or None
    while rest and rest[0] != "run":
        arg = rest.pop(0)
        if arg == "--state-dir" and rest:
            state_dir = rest.pop(0)
        elif arg.startswith("--state-dir="):
            state_dir = arg.partition("=")[2]
        else:
            raise _ClickDecides(arg)
    if not rest:
        raise _ClickDecides("no run")
    rest.pop(0)
    options: dict[str, Any] = {}
    while rest:
        arg = rest.pop(0)
        if arg == "--":
            break
        if not arg.startswith("-") or arg == "-":
            rest.insert(0, arg)  # COMMAND: `run` takes no options after it
            break
        name, has_value, value = arg.partition("=")
        if name not in RUN_OPTIONS:
            raise _ClickDecides(arg)
        dest, kind = RUN_OPTIONS[name]
        if kind in ("on", "off"):
            if has_value:
                raise _ClickDecides(arg)
            options[dest] = kind == "on"
            continue
        if kind == "trace":
            if not has_value and not (rest and rest[0].startswith("-") and len(rest[0]) > 1):
                raise _ClickDecides(arg)  # `--trace FILE`, `--trace` last: click's rules
            options[dest] = value if has_value else "-"
            continue
        if not has_value:
            if not rest:
                raise _ClickDecides(arg)
            value = rest.pop(0)
        _read_value(options, dest, kind, value)
    if not rest:
        raise _ClickDecides("no COMMAND")
    if state_dir is not None:
        if not state_dir or not _path_ok(state_dir, file_ok=False):
            raise _ClickDecides(state_dir)
        state_dir = os.path.join(os.getcwd(), state_dir)  # as Path.absolute(): no normalizing
    return state_dir, rest, options


def _read_value(options: "dict[str, Any]", dest: str, kind: str, value: str) -> None:
    if kind == "text":
        options[dest] = value
    elif kind == "texts":
        options[dest] = (*options.get(dest, ()), value)
    elif kind in ("fd", "caps"):
        low, high = (MIN_PASS_FD, None) if kind == "fd" else MAX_CAPS_RANGE
        if not (value.isascii() and value.isdigit()) or int(value) < low or (
                high is not None and int(value) > high):
            raise _ClickDecides(value)
        if kind == "fd":
            options[dest] = (*options.get(dest, ()), int(value))
        else:
            options[dest] = int(value)
    elif kind in ("dir", "file", "config"):
        if not value or not _path_ok(value, file_ok=kind != "dir", dir_ok=kind == "dir",
                                     must_exist=kind == "config"):
            raise _ClickDecides(value)
        options[dest] = value
    else:  # pragma: no cover - a kind the table above does not use
        raise _ClickDecides(kind)


def _path_ok(path: str, *, file_ok: bool = True, dir_ok: bool = True, must_exist: bool = False) -> bool:
    """What click.Path(file_okay, dir_okay, exists) accepts, readable as it checks."""
    try:
        st = os.stat(path)
    except OSError:
        return not must_exist
    if (not file_ok and stat.S_ISREG(st.st_mode)) or (not dir_ok and stat.S_ISDIR(st.st_mode)):
        return False
    return os.access(path, os.R_OK)


def failure_code(exc: BaseException) -> int | None:
    """The exit code a command leaves with for exc (None: not a failure the commands report).

    First match: a Failure says its own, a config error is a usage error (2), no
    system is 3, a refused control request and any other OSError 1.
    """
    from redoxcap import control
    from redoxcap.exits import EXIT_FAILED, EXIT_NOT_RUNNING, EXIT_USAGE, Failure

    if isinstance(exc, Failure):
        return exc.code
    config = sys.modules.get("redoxcap.config")  # not imported: none of its errors was raised
    if config is not None and isinstance(exc, config.ConfigError):
        return EXIT_USAGE
    if isinstance(exc, control.NotRunning):
        return EXIT_NOT_RUNNING
    if isinstance(exc, (control.ControlError, OSError)):
        return EXIT_FAILED
    return None


def main() -> None:
    """The console script: `redoxcap ARGS...` (also `python -m redoxcap`).

    A confined `run` with a system up is the system's to do (redoxcap/launch.py:
    a fork of its warm interpreter); any other, or one it does not take, is done
    here (:func:`run_command`).
    """
    try:
        state_dir, command, options = parse_run(sys.argv[1:], os.environ)
    except _ClickDecides:
        from redoxcap.cli import main as commands

        commands(prog_name="redoxcap")
        return
    if state_dir is None:
        from redoxcap.launch import default_state_dir

        state_dir = default_state_dir()
    sys.exit(dispatch_run(state_dir, command, options, leave=True))


def dispatch_run(state_dir: str, command: list[str], options: "dict[str, Any]",
                 leave: bool = False) -> int:
    """`redoxcap run` as parse_run read it: by the system up at state_dir when it is
    confined (redoxcap/launch.py), else, or when the system does not take it, here
    (:func:`run_command`); the exit code. With leave, a run the system did ends this
    process at once with that code: it holds nothing the interpreter's teardown (some
    milliseconds) would have to release."""
    # an unconfined program keeps our session and terminal: it must be our child
    if options.get("confine", True) and not options.get("in_process"):
        from redoxcap.launch import run_in_system

        try:
            code = run_in_system(state_dir, command, options)
        except KeyboardInterrupt:  # Ctrl-C before the system took the run: as click says it
            print("Aborted!", file=sys.stderr)
            return 1
        if code is not None:
            if leave:
                for stream in (sys.stdout, sys.stderr):
                    stream.flush()
                os._exit(code)
            return code
    return run_command(state_dir, command, options)


def with_paths(state_dir: str, options: "dict[str, Any]") -> "tuple[Path, dict[str, Any]]":
    """parse_run's state_dir and options, their paths made Paths (as click gives them)."""
    from pathlib import Path

    return Path(state_dir), {k: Path(v) if k in PATH_OPTIONS and v is not None else v
                             for k, v in options.items()}


def run_command(state_dir: str, command: "Sequence[str]", options: "dict[str, Any]") -> int:
    """`redoxcap run` in this process, as parse_run read it; the exit code (a failure's
    message is printed first, as `redoxcap: MESSAGE`)."""
    from redoxcap import run

    path, options = with_paths(state_dir, options)
    try:
        return run.main(path, command, **options)
    except KeyboardInterrupt:  # Ctrl-C before the program runs: as click says it
        print("Aborted!", file=sys.stderr)
        return 1
    except Exception as exc:
        code = failure_code(exc)
        if code is None:
            raise
        print(f"redoxcap: {exc}", file=sys.stderr)
        return code


def exit_for(exc: Exception) -> None:
    """Leave with `redoxcap: MESSAGE` and exc's exit code if it is a failure the commands
    report (:func:`failure_code`); return otherwise, for the caller to raise it."""
    code = failure_code(exc)
    if isinstance(exc, BrokenPipeError):  # what reads our output went (`status | head`): as
        # a tool SIGPIPE ends, say nothing (and have the last flush go nowhere)
        os.dup2(os.open(os.devnull, os.O_WRONLY), sys.stdout.fileno())
        sys.exit(code)
    if code is not None:
        print(f"redoxcap: {exc}", file=sys.stderr)
        sys.exit(code)
