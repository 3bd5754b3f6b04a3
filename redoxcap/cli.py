"""The `redoxcap` command: boot the system, run clients in it, show it, stop it.

Exit codes (every failure maps onto one of these):

    0  success (for `run`: the command's own exit code is passed through)
    1  a request failed (the message says why)
    2  usage error
    3  no system is running at the state directory
    4  a system is already running there
    5  the system failed to boot
"""

from __future__ import annotations

import errno
import json
import logging
import os
import posixpath
import select
import shutil
import signal
import subprocess
import sys
import tempfile
from collections.abc import Mapping, Sequence
from pathlib import Path

import click

from redoxcap import config, control

EXIT_OK = 0
EXIT_FAILED = 1
EXIT_USAGE = 2
EXIT_NOT_RUNNING = 3
EXIT_ALREADY_RUNNING = 4
EXIT_BOOT_FAILED = 5

BOOT_TIMEOUT = 30.0


def default_state_dir() -> Path:
    base = os.environ.get("XDG_RUNTIME_DIR") or tempfile.gettempdir()
    return Path(base) / f"redoxcap-{os.getuid()}"


def default_root() -> Path:
    base = os.environ.get("XDG_DATA_HOME") or Path.home() / ".local" / "share"
    return Path(base) / "redoxcap" / "root"


def fail(message: str, code: int = EXIT_FAILED) -> None:
    click.echo(f"redoxcap: {message}", err=True)
    sys.exit(code)


@click.group(context_settings={"help_option_names": ["-h", "--help"]})
@click.option("--state-dir", type=click.Path(file_okay=False, path_type=Path),
              envvar="REDOXCAP_STATE_DIR", default=default_state_dir, show_default="$XDG_RUNTIME_DIR/redoxcap-UID",
              help="Where a running system keeps its control socket.")
@click.pass_context
def main(ctx: click.Context, state_dir: Path) -> None:
    """redoxcap: Redox OS's capability architecture as Linux processes.

    A kernel router, the namespace manager (nsmgr) and one daemon per scheme
    exchange msgpack frames over SOCK_SEQPACKET sockets; capabilities are
    fds. `run` hands a program exactly the namespace and directory you give it.
    """
    ctx.obj = state_dir.absolute()


root_option = click.option(
    "--root", type=click.Path(file_okay=False, path_type=Path), default=None,
    help="Host directory served by the file scheme [default: ~/.local/share/redoxcap/root].")
mount_option = click.option(
    "--mount", "mounts", multiple=True, metavar="NAME=HOSTDIR[:ro]",
    help="Also serve HOSTDIR as scheme NAME (read-only with :ro). Repeatable.")
config_option = click.option(
    "--config", "config_file", type=click.Path(dir_okay=False, exists=True, path_type=Path),
    default=None, help="A TOML file: root, schemes, [mount.NAME] tables.")


def _configure(config_file: Path | None, root: Path | None, mounts: tuple[str, ...]) -> config.Config:
    """The config file, overridden by command-line options; exits on bad input."""
    try:
        cfg = config.load(config_file)
        cfg.mounts += [config.parse_mount(m) for m in mounts]
    except config.ConfigError as exc:
        fail(str(exc), EXIT_USAGE)
    names = [m.name for m in cfg.mounts]
    if len(set(names)) != len(names):
        fail(f"a mount name is given twice: {names}", EXIT_USAGE)
    cfg.root = (root or cfg.root or default_root()).absolute()
    cfg.root.mkdir(parents=True, exist_ok=True)
    return cfg


def _up_options(cfg: config.Config) -> list[str]:
    """The `up` options that reproduce cfg in another process."""
    argv = ["--root", str(cfg.root), "--schemes", ",".join(cfg.schemes)]
    for m in cfg.mounts:
        argv += ["--mount", f"{m.name}={m.path}" + (":ro" if m.read_only else "")]
    return argv


@main.command()
@root_option
@mount_option
@config_option
@click.option("--schemes", "scheme_names", default=None, metavar="NAMES",
              help=f"Comma-separated built-in schemes to run [default: all: {','.join(config.BUILTIN_SCHEMES)}].")
@click.option("--trace", is_flag=True,
              help="Log every request and reply the router forwards (pid, scheme id, handle, op).")
@click.option("--detach", is_flag=True, help="Boot in the background and return once it is up.")
@click.option("--watch-fd", type=int, default=None, hidden=True)
@click.option("--ready-fd", type=int, default=None, hidden=True)
@click.pass_obj
def up(state_dir: Path, root: Path | None, mounts: tuple[str, ...], config_file: Path | None,
       scheme_names: str | None, trace: bool, detach: bool, watch_fd: int | None,
       ready_fd: int | None) -> None:
    """Boot the kernel, nsmgr and the schemes, and serve until `down`.

    One system per state directory: a second `up` (even a concurrent one)
    exits 4 and leaves the first one alone.
    """
    cfg = _configure(config_file, root, mounts)
    if scheme_names is not None:
        wanted = [n for n in scheme_names.split(",") if n]
        unknown = [n for n in wanted if n not in config.BUILTIN_SCHEMES]
        if unknown:
            fail(f"--schemes: unknown {unknown}; built-ins are {list(config.BUILTIN_SCHEMES)}", EXIT_USAGE)
        cfg.schemes = wanted
    if detach:
        proc = _spawn_supervisor(state_dir, _up_options(cfg) + (["--trace"] if trace else []))
        _wait_until_up(state_dir, proc)
        click.echo(f"redoxcap is up (pid {proc.pid}, state {state_dir}, root {cfg.root})")
        return
    import trio

    from redoxcap.up import AlreadyRunning, SystemFailed
    from redoxcap.up import main as up_main

    logging.basicConfig(level=logging.INFO, format="supervisor[%(process)d] %(levelname)s %(message)s")
    info = {"root": str(cfg.root),
            "mounts": {m.name: {"path": str(m.path), "read_only": m.read_only} for m in cfg.mounts}}
    try:
        trio.run(up_main, state_dir, cfg.specs(), info, watch_fd, trace, ready_fd)
    except AlreadyRunning as exc:
        fail(str(exc), EXIT_ALREADY_RUNNING)
    except OSError as exc:
        fail(f"boot failed: {exc}", EXIT_BOOT_FAILED)
    except SystemFailed as exc:
        fail(f"stopped: {exc}")


class SupervisorProcess(subprocess.Popen):
    """A supervisor started in the background, with the pipe it reports readiness on.

    Attributes:
        ready_fd: read end of the pipe; the supervisor writes `up` on it once
            its control socket answers, and it reaches EOF if the supervisor exits
            first. _wait_until_up() reads and closes it.
    """

    ready_fd: int


def _spawn_supervisor(state_dir: Path, up_options: list[str], watch_fd: int | None = None) -> SupervisorProcess:
    """Start `redoxcap up` in a new session, logging to STATE_DIR/supervisor.log."""
    state_dir.mkdir(parents=True, exist_ok=True, mode=0o700)
    ready_r, ready_w = os.pipe()
    argv = [sys.executable, "-m", "redoxcap", "--state-dir", str(state_dir), "up", *up_options,
            "--ready-fd", str(ready_w)]
    pass_fds: tuple[int, ...] = (ready_w,)
    if watch_fd is not None:
        argv += ["--watch-fd", str(watch_fd)]
        pass_fds += (watch_fd,)
    try:
        with open(state_dir / control.LOG_NAME, "ab") as log:
            proc = SupervisorProcess(argv, stdin=subprocess.DEVNULL, stdout=log, stderr=log,
                                     start_new_session=True, pass_fds=pass_fds)
    except BaseException:
        os.close(ready_r)
        raise
    finally:
        os.close(ready_w)  # the child's copy alone keeps the pipe open
    proc.ready_fd = ready_r
    return proc


def _wait_until_up(state_dir: Path, proc: SupervisorProcess) -> None:
    """Wait for the supervisor's readiness report; exit with its failure if it sends none."""
    try:
        poller = select.poll()
        poller.register(proc.ready_fd, select.POLLIN)
        answered = bool(poller.poll(BOOT_TIMEOUT * 1000))
        if answered and os.read(proc.ready_fd, 16).startswith(b"up"):
            return
    finally:
        os.close(proc.ready_fd)
    try:
        # EOF without `up`: the supervisor is exiting, and its exit code says why
        code = proc.wait(timeout=BOOT_TIMEOUT if answered else 0)
    except subprocess.TimeoutExpired:
        proc.kill()
        proc.wait()
        fail(f"the system did not come up within {BOOT_TIMEOUT:.0f}s", EXIT_BOOT_FAILED)
    if code == EXIT_ALREADY_RUNNING:
        fail(f"a system is already running at {state_dir}", EXIT_ALREADY_RUNNING)
    log = (state_dir / control.LOG_NAME).read_text(errors="replace")[-2000:]
    fail(f"the system failed to boot (exit {code}):\n{log}", EXIT_BOOT_FAILED)


def _shutdown(state_dir: Path, wait: float = 15.0) -> None:
    """Ask the supervisor at state_dir to stop and wait until its process has exited."""
    if not control.shutdown(state_dir, wait):
        click.echo(f"redoxcap: the supervisor did not stop within {wait:.0f}s; killed it", err=True)


@main.command()
@click.pass_obj
def down(state_dir: Path) -> None:
    """Stop the system: every daemon it started, and its sockets."""
    try:
        _shutdown(state_dir)
    except control.NotRunning as exc:
        fail(str(exc), EXIT_NOT_RUNNING)
    except control.ControlError as exc:
        fail(str(exc))
    click.echo("redoxcap is down")


@main.command()
@click.option("--json", "as_json", is_flag=True, help="Print the full status as JSON.")
@click.pass_obj
def status(state_dir: Path, as_json: bool) -> None:
    """Show schemes, processes, open capabilities, handles, frames handled and memory, per daemon."""
    try:
        reply, _ = control.request(state_dir, "status")
    except control.NotRunning as exc:
        fail(str(exc), EXIT_NOT_RUNNING)
    except control.ControlError as exc:
        fail(str(exc))
    info = reply["status"]
    if as_json:
        click.echo(json.dumps(info, indent=2, sort_keys=True))
        return
    click.echo(f"supervisor pid {info['supervisor']}, up {info['uptime']:.0f}s, state {info['state_dir']}")
    if "root" in info:
        click.echo(f"file root {info['root']}")
    header = (f"{'DAEMON':<10} {'PID':>7} {'SCHEME':>6} {'CAPS':>5} {'HANDLES':>7} {'FRAMES':>8} "
              f"{'RESTARTS':>8} {'RSS':>7}")
    click.echo(header)
    for d in info["daemons"]:
        rss = f"{d['rss_kib'] // 1024}M" if d.get("rss_kib") else "-"
        click.echo(
            f"{d['name']:<10} {d.get('pid') or '-':>7} {d.get('scheme_id', '-'):>6} "
            f"{d.get('capabilities', '-'):>5} {_handles(d):>7} {d.get('frames', 0):>8} "
            f"{d.get('restarts', '-'):>8} {rss:>7}" + _state_note(d)
        )


def _state_note(d: dict) -> str:
    """What the table adds after a daemon that is not simply running."""
    state = d.get("state", "failed" if d.get("failed") else "running")
    if state == "failed":
        return f"  FAILED (redoxcap restart {d['name']})"
    return "  restarting" if state == "restarting" else ""


@main.command()
@click.argument("name")
@click.pass_obj
def restart(state_dir: Path, name: str) -> None:
    """Restart scheme NAME's daemon, also one marked FAILED, without a full down/up.

    The scheme keeps its id, so namespaces that hold it work again; handles
    opened on the old daemon fail with EIO. Sends the control op `restart`.
    """
    try:
        reply, _ = control.request(state_dir, "restart", timeout=30, name=name)
    except control.NotRunning as exc:
        fail(str(exc), EXIT_NOT_RUNNING)
    except control.ControlError as exc:
        fail(f"restart {name}: {exc}")
    click.echo(f"{name} restarted (pid {reply['pid']})")


def _handles(d: dict) -> str:
    value = d.get("scheme_handles")
    return "-" if value is None else str(value)


@main.command(context_settings={"ignore_unknown_options": True})
@click.option("--ns", "names", default=None, metavar="NAMES",
              help="Comma-separated schemes the command's namespace holds ('' for none) [default: all].")
@click.option("--cwd", default="/", show_default=True,
              help="The command's current directory (a file-scheme path or /scheme/NAME/...).")
@click.option("--beneath", is_flag=True,
              help="Open the cwd with O_RESOLVE_BENEATH: nothing the command opens through it "
                   "may leave it (a sandbox, with --ns '').")
@click.option("--confine/--no-confine", default=True, show_default=True,
              help="Confine COMMAND with Landlock and seccomp: no host files beyond what the "
                   "interpreter needs, no TCP or other network sockets, no abstract sockets, no "
                   "metadata changes, no terminal injection, no capabilities, a minimal "
                   "environment. --no-confine runs COMMAND as you, with your whole environment.")
@click.option("--require-confine", is_flag=True,
              help="Fail instead of warning when the host cannot confine COMMAND.")
@click.option("--env", "env_options", multiple=True, metavar="NAME[=VALUE]",
              help="Give COMMAND the variable NAME: your value, or VALUE. Repeatable.")
@click.option("--inherit-env", is_flag=True,
              help="Give a confined COMMAND your whole environment (secrets included).")
@click.option("--uds-scope", default="private", show_default=True, metavar="private|system|NAME",
              help="The uds names COMMAND sees: a private scope of its own (the default, for "
                   "every run), the system's, or the shared scope NAME (runs given the same NAME "
                   "reach each other's listeners).")
@root_option
@mount_option
@config_option
@click.argument("command", nargs=-1, required=True, type=click.UNPROCESSED)
@click.pass_obj
def run(state_dir: Path, names: str | None, cwd: str, beneath: bool, confine: bool,
        require_confine: bool, env_options: tuple[str, ...], inherit_env: bool, uds_scope: str,
        root: Path | None, mounts: tuple[str, ...], config_file: Path | None,
        command: tuple[str, ...]) -> None:
    """Run COMMAND with the namespace and current directory you give it.

    COMMAND inherits a namespace fd and a cwd fd (found by `import rt`) and,
    confined, can reach nothing else. It may still read the interpreter, the
    installed packages and the script it runs (`python script.py`), and write
    in an empty private temporary directory ($TMPDIR) deleted when it ends.
    It runs in a session of its own, without your terminal as its controlling
    terminal and without capabilities, and its environment holds only PATH,
    HOME, LANG, LC_*, TERM, TZ, TMPDIR, REDOXCAP_* and what --env names
    (--inherit-env: all of yours). With --no-confine it gets your whole
    environment and terminal. With no system up at the state directory, a
    private one is booted for the duration of COMMAND (--root, --config and
    --mount configure it). With a system up, --mount adds the mount to it (it
    stays until `down`).
    """
    if require_confine and not confine:
        fail("--require-confine contradicts --no-confine", EXIT_USAGE)
    try:
        env = client_environment(os.environ, confined=confine, inherit=inherit_env,
                                 options=env_options)
    except ValueError as exc:
        fail(str(exc), EXIT_USAGE)
    argv, scratch = list(command), None
    if confine:
        # Python's tempfile (which trio, ctypes and others use on import) needs a
        # writable directory: the command gets an empty private one, deleted after.
        scratch = tempfile.mkdtemp(prefix="redoxcap-scratch-")
        argv = confined_argv(argv, require_confine, scratch)
        env["TMPDIR"] = scratch
    private = None
    if not control.is_running(state_dir):
        private = _boot_private(_configure(config_file, root, mounts))
        state_dir = private[0]
    else:
        if root is not None or config_file is not None:
            fail("--root and --config only apply when run boots a private system; one is up", EXIT_USAGE)
        for text in mounts:
            try:
                m = config.parse_mount(text)
                control.request(state_dir, "mount", name=m.name, path=str(m.path), read_only=m.read_only)
            except control.ControlError as exc:
                fail(f"--mount {text}: {exc}")
            except config.ConfigError as exc:
                fail(str(exc), EXIT_USAGE)
    try:
        code = _run_command(state_dir, names, cwd, beneath, argv, env, new_session=confine,
                            uds_scope=uds_scope)
    finally:
        if private is not None:
            _stop_private(*private)
        if scratch is not None:
            shutil.rmtree(scratch, ignore_errors=True)
    sys.exit(code)


def _boot_private(cfg: config.Config) -> tuple[Path, subprocess.Popen, int]:
    state_dir = Path(tempfile.mkdtemp(prefix="redoxcap-run-"))
    watch_r, watch_w = os.pipe()
    try:
        proc = _spawn_supervisor(state_dir, _up_options(cfg), watch_r)
    finally:
        os.close(watch_r)
    _wait_until_up(state_dir, proc)
    return state_dir, proc, watch_w


def _stop_private(state_dir: Path, proc: subprocess.Popen, watch_w: int) -> None:
    os.close(watch_w)  # the supervisor stops when this pipe reaches EOF
    try:
        proc.wait(timeout=15)
    except subprocess.TimeoutExpired:
        proc.kill()
        proc.wait()
    shutil.rmtree(state_dir, ignore_errors=True)


# All of the caller's environment a confined command gets without --env or --inherit-env.
CONFINED_ENV_NAMES = frozenset({"PATH", "HOME", "LANG", "TERM", "TZ"})
CONFINED_ENV_PREFIXES = ("LC_", "REDOXCAP_")


def client_environment(environ: Mapping[str, str], *, confined: bool, inherit: bool,
                       options: Sequence[str]) -> dict[str, str]:
    """The environment `run` gives COMMAND, before the variables it sets itself.

    Args:
        environ: the caller's environment.
        confined: COMMAND is confined; then only CONFINED_ENV_NAMES and names
            with a CONFINED_ENV_PREFIXES prefix pass, unless inherit.
        inherit: pass the whole of environ (always so when not confined).
        options: `--env` values: NAME passes the caller's NAME (if set),
            NAME=VALUE sets it; later ones win.

    Returns:
        A new dict.

    Raises:
        ValueError: an option has no NAME.
    """
    if inherit or not confined:
        env = dict(environ)
    else:
        # Credentials and tokens live in the environment: pass only what is harmless.
        env = {k: v for k, v in environ.items()
               if k in CONFINED_ENV_NAMES or k.startswith(CONFINED_ENV_PREFIXES)}
    for option in options:
        name, has_value, value = option.partition("=")
        if not name:
            raise ValueError(f"--env {option!r}: expected NAME or NAME=VALUE")
        if has_value:
            env[name] = value
        elif name in environ:
            env[name] = environ[name]
    return env


def confined_argv(command: list[str], require: bool, scratch: str) -> list[str]:
    """Wrap command in the confinement launcher; a Python script it runs stays readable.

    Only the script of a Python interpreter (`python3 [options] script.py`)
    is made readable; `-c`, `-m` and every other program's arguments are
    data the program must reach through its capabilities. scratch is the
    command's private writable temporary directory.
    """
    from redoxcap.sandbox import python_script

    # -P: a `redoxcap` package a client wrote into the cwd must not run as the launcher.
    launcher = [sys.executable, "-P", "-m", "redoxcap.sandbox", "--write", scratch]
    launcher += ["--require"] if require else []
    script = python_script(command)
    if script is not None:
        launcher += ["--read", script]
    return [*launcher, "--", *command]


def _run_command(state_dir: Path, names: str | None, cwd: str, beneath: bool, command: list[str],
                 base_env: dict[str, str], *, new_session: bool, uds_scope: str = "private") -> int:
    """Start command with the namespace and cwd asked for; return its exit code.

    command gets base_env plus the variables that name its namespace and cwd.

    With new_session, command leads a new session without a controlling
    terminal (so it cannot push input into ours), and the signals `run`
    receives are forwarded to its whole process group.
    """
    import rt
    from rt._paths import to_namespace_path
    from rt._posix import physical_path
    from rt._process import ENV_CWD, ENV_CWD_PATH, ENV_NS

    try:
        # an account of its own: whatever the command comes to hold is charged (and capped) there
        _, fds = control.request(state_dir, "namespace", account=True)
    except control.ControlError as exc:
        fail(str(exc), EXIT_NOT_RUNNING if isinstance(exc, control.NotRunning) else EXIT_FAILED)
    root_ns = fds[0]
    child_ns = cwd_fd = None
    try:
        wanted = None if names is None else [n for n in names.split(",") if n]
        try:
            child_ns = rt.mkns(wanted, ns=root_ns)
        except OSError as exc:
            fail(f"--ns {names!r}: {exc.strerror}")
        cwd_path = posixpath.normpath(cwd if cwd.startswith("/") else "/" + cwd)
        try:
            rt.setup(root_ns, None)
            root_ns = None  # owned by rt now
            cwd_fd = rt.open(cwd_path, rt.O_DIRECTORY | (rt.O_RESOLVE_BENEATH if beneath else 0))
            cwd_path = physical_path(cwd_fd, to_namespace_path(cwd_path))
        except OSError as exc:
            fail(f"--cwd {cwd}: {exc.strerror}")
        _give_uds_scope(child_ns, uds_scope)
        env = dict(base_env,
                   **{ENV_NS: str(child_ns), ENV_CWD: str(cwd_fd), ENV_CWD_PATH: cwd_path})
        try:
            proc = subprocess.Popen(command, pass_fds=(child_ns, cwd_fd), env=env,
                                    start_new_session=new_session)
        except OSError as exc:
            fail(f"{command[0]}: {exc.strerror}", 127)
    finally:
        for fd in (root_ns, child_ns, cwd_fd):
            if fd is not None:
                os.close(fd)
        rt.setup(None, None)
    return _wait_forwarding_signals(proc, group=new_session)


def _give_uds_scope(child_ns: int, choice: str) -> None:
    """Make `uds` in child_ns the scope --uds-scope chose (rt holds the root namespace).

    The fork's entry is the system scope; "private" puts a new empty scope in
    its place, NAME the shared scope NAME. A namespace without uds is left so.
    """
    import rt

    if choice == "system":
        return
    try:
        if "uds" not in rt.schemes(child_ns):
            return
        scope = rt.uds_scope(None if choice == "private" else choice)
    except OSError as exc:
        usage = exc.errno == errno.EINVAL  # a bad NAME
        fail(f"--uds-scope {choice}: {exc.strerror}", EXIT_USAGE if usage else EXIT_FAILED)
    try:
        rt.unregister(child_ns, "uds")
        rt.register(child_ns, "uds", scope)
    except OSError as exc:
        fail(f"--uds-scope {choice}: {exc.strerror}")
    finally:
        rt.close(scope)


def _wait_forwarding_signals(proc: subprocess.Popen, *, group: bool = False) -> int:
    """Wait for proc, passing on SIGINT, SIGTERM and SIGHUP; return its exit code.

    With group, proc leads its own process group (a new session), which the
    terminal no longer signals: Ctrl-C reaches only `run`, and goes on to the
    whole group as it would have from the terminal.
    """
    def forward(signum, _frame):
        if proc.returncode is not None:
            return
        if not group:
            proc.send_signal(signum)
            return
        try:
            # Not yet reaped, so the group id cannot have been reused.
            os.killpg(proc.pid, signum)
        except ProcessLookupError:
            pass

    old = {s: signal.signal(s, forward) for s in (signal.SIGINT, signal.SIGTERM, signal.SIGHUP)}
    try:
        code = proc.wait()
    finally:
        for s, handler in old.items():
            signal.signal(s, handler)
    return 128 - code if code < 0 else code
