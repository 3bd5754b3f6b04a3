"""The `redoxcap` command: boot the system, run clients in it, show it, stop it.

Click commands only: each parses its options and calls the module that does
the work (lifecycle, up, run, status, control). Every failure is raised as an
:class:`redoxcap.exits.Failure` or one of the errors
:func:`redoxcap.entry.failure_code` maps, and leaves with one of the exit
codes of :mod:`redoxcap.exits`. The console script starts at
:mod:`redoxcap.entry`, which reads a `run` command line itself when it can
(the same options, read the same way) and hands everything else to
:data:`main` here.
"""

from __future__ import annotations

import json
import sys
from pathlib import Path

import click

from redoxcap import config, control, exits, lifecycle, status
from redoxcap.entry import dispatch_run, exit_for
from redoxcap.exits import EXIT_FAILED, EXIT_USAGE, Failure
from redoxcap.wire.limits import forbid_core_dumps


class _Commands(click.Group):
    """The command group; it turns every failure into `redoxcap: MESSAGE` and its exit code
    (redoxcap.entry.exit_for: the code redoxcap.entry.failure_code says)."""

    def invoke(self, ctx: click.Context) -> object:
        try:
            return super().invoke(ctx)
        except Exception as exc:
            exit_for(exc)
            raise


_EXIT_CODES = "\n".join(f"{code:>5}  {meaning}" for code, meaning in exits.MEANINGS.items())


@click.group(cls=_Commands, context_settings={"help_option_names": ["-h", "--help"]},
             epilog=f"\b\nExit codes:\n{_EXIT_CODES}")
@click.option("--state-dir", type=click.Path(file_okay=False, path_type=Path),
              envvar="REDOXCAP_STATE_DIR", default=lifecycle.default_state_dir,
              show_default="$XDG_RUNTIME_DIR/redoxcap-UID, or in the temporary directory",
              help="Where a running system keeps its control socket.")
@click.version_option(package_name="redoxcap", prog_name="redoxcap")
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
    help="Host directory served by the file scheme; it must exist (only the default is made) "
         "[default: $XDG_DATA_HOME/redoxcap/root, or ~/.local/share/redoxcap/root].")
mount_option = click.option(
    "--mount", "mounts", multiple=True, metavar=config.MOUNT_SYNTAX,
    help="Also serve HOSTDIR as scheme NAME (read-only with :ro; with :nokeep its open "
         "handles die with its daemon instead of surviving a restart; with :nopassthrough "
         "every byte of its files goes through its daemon). Repeatable.")
config_option = click.option(
    "--config", "config_file", type=click.Path(dir_okay=False, exists=True, path_type=Path),
    default=None, help="A TOML file: root, schemes, [mount.NAME] and [scheme.NAME] tables.")


@main.command("up")
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
@click.option("--user-scheme", "user_schemes", multiple=True, hidden=True)  # from up_options
@click.pass_obj
def up_command(state_dir: Path, root: Path | None, mounts: tuple[str, ...],
               config_file: Path | None, scheme_names: str | None, trace: bool, detach: bool,
               watch_fd: int | None, ready_fd: int | None, user_schemes: tuple[str, ...]) -> None:
    """Boot the kernel, nsmgr and the schemes, and serve until `down`.

    One system per state directory: a second `up` (even a concurrent one)
    exits 4 and leaves the first one alone.
    """
    cfg = config.configure(config_file, root, mounts, scheme_names, user_schemes)
    if detach:
        pid = lifecycle.start_detached(state_dir, cfg, trace)
        click.echo(f"redoxcap is up (pid {pid}, state {state_dir}, root {cfg.root})")
        return
    from redoxcap.daemons import start_forkserver

    forbid_core_dumps()  # the supervisor holds every daemon's root and hands out namespaces
    forkserver = start_forkserver(cfg.specs())  # first: it loads while trio loads here
    from redoxcap import up  # trio and the supervisor: only the foreground `up` needs them

    up.serve(state_dir, cfg, trace=trace, watch_fd=watch_fd, ready_fd=ready_fd,
             forkserver=forkserver)


@main.command("down")
@click.pass_obj
def down_command(state_dir: Path) -> None:
    """Stop the system: every daemon it started, and its sockets."""
    if not lifecycle.stop(state_dir):
        click.echo(f"redoxcap: the supervisor did not stop within {lifecycle.STOP_TIMEOUT:.0f}s; "
                   "killed it", err=True)
    click.echo("redoxcap is down")


@main.command("status")
@click.option("--json", "as_json", is_flag=True, help="Print the full status as JSON.")
@click.pass_obj
def status_command(state_dir: Path, as_json: bool) -> None:
    """Show schemes, processes, open capabilities, handles, frames handled and memory, per daemon."""
    info = status.fetch(state_dir)
    if as_json:
        click.echo(json.dumps(info, indent=2, sort_keys=True))
        return
    for line in status.render(info):
        click.echo(line)


@main.command("restart")
@click.argument("name")
@click.pass_obj
def restart_command(state_dir: Path, name: str) -> None:
    """Restart scheme NAME's daemon, also one marked FAILED, without a full down/up.

    The scheme keeps its id, so namespaces that hold it work again; handles
    opened on the old daemon fail with EIO. Sends the control op `restart`.
    """
    try:
        reply, _ = control.request(state_dir, "restart", timeout=30, name=name)
    except control.NotRunning:
        raise  # exit 3, as for every command
    except control.ControlError as exc:
        raise Failure(f"restart {name}: {exc}") from None
    click.echo(f"{name} restarted (pid {reply['pid']})")


@main.command("run", context_settings={"allow_interspersed_args": False})
@click.option("--ns", "names", default=None, metavar="NAMES",
              help="Comma-separated schemes the command's namespace holds ('' for none) [default: all].")
@click.option("--dir", "dirs", multiple=True, metavar="HOSTDIR[:ro]",
              help="Hand COMMAND this host directory (`.` for the current one; read-only with "
                   ":ro, never inside a writable one), seen at its own path; the first is its "
                   "cwd. Repeatable. Its namespace then holds no `file` root unless --ns names it.")
@click.option("--cwd", default=None, metavar="PATH",
              help="The command's current directory: a file-scheme path or /scheme/NAME/... "
                   "[default: /]; with --dir, a host path in one of the directories "
                   "[default: the first].")
@click.option("--beneath", is_flag=True,
              help="Open the cwd with O_RESOLVE_BENEATH: nothing the command opens through it "
                   "may leave it (a sandbox, with --ns '').")
@click.option("--confine/--no-confine", default=True, show_default=True,
              help="Confine COMMAND with Landlock and seccomp: no host files beyond the system's "
                   "programs and what it was handed, no network beyond --allow-* (TCP only, "
                   "brokered), no abstract sockets, no metadata changes but to its own files "
                   "(brokered), no terminal injection, no capabilities, a minimal environment. "
                   "--no-confine runs COMMAND as you, with your whole environment.")
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
@click.option("--allow-connect", "tcp_connect", multiple=True, metavar="HOST:PORT",
              help="Let COMMAND's tcp connect only to HOST:PORT ([ADDR]:PORT for IPv6; numeric "
                   "addresses only). Repeatable. Any --allow-* option narrows both tcp and udp: "
                   "whatever no option grants is EACCES.")
@click.option("--allow-listen", "tcp_listen", multiple=True, metavar="[HOST:]PORT",
              help="Let COMMAND's tcp listen on PORT (on 127.0.0.1 and ::1 unless HOST is given; "
                   "0: a free port). Repeatable.")
@click.option("--allow-udp-connect", "udp_connect", multiple=True, metavar="HOST:PORT",
              help="Let COMMAND's udp reach HOST:PORT (connect, or sendto from a bound socket). "
                   "Repeatable.")
@click.option("--allow-udp-listen", "udp_listen", multiple=True, metavar="[HOST:]PORT",
              help="Let COMMAND's udp bind to PORT (as --allow-listen). Repeatable.")
@click.option("--trace", "trace", is_flag=False, flag_value="-", default=None, metavar="[FILE]",
              help="Print every call COMMAND makes (scheme, operation, path, result, time; the "
                   "calls nsmgr makes for it indented under them) to stderr, or append to FILE "
                   "with --trace=FILE.")
@click.option("--trace-json", is_flag=True, help="With --trace: one JSON object per call.")
@click.option("--brokered/--no-broker", default=None,
              help="Brokered (the default when confined): any program, not only one written with "
                   "rt, runs with every path it uses through its capabilities (seccomp user "
                   "notification; docs/sandbox.md). --no-broker runs a program written with rt "
                   "under Landlock and seccomp alone.")
@click.option("--ro-host", "ro_host", multiple=True, metavar="PATH",
              help="Brokered: also serve this host path read-only (repeatable).")
@click.option("--passthrough/--no-passthrough", default=True, show_default=True,
              help="Brokered: regular files come as host fds (native reads and writes).")
@click.option("--in-process", "in_process", is_flag=True,
              help="Start COMMAND from this process, as its child, even with a system up (which "
                   "otherwise starts a confined COMMAND itself, from its warm fork server: "
                   "faster); for strace -f, a debugger, or a parent that must be this process.")
@click.option("--pass-fd", "pass_fds", multiple=True, type=click.IntRange(3, None), metavar="N",
              help="Hand the command this fd of yours too (repeatable); by default it gets only "
                   "0, 1 and 2, besides its capabilities.")
@click.option("--max-caps", type=click.IntRange(16, 1 << 20), default=None, metavar="N",
              help="At most N (16 or more) capabilities held at once by COMMAND and its "
                   "children, its namespace, cwd and grants included; past it, an open fails "
                   "with EMFILE. [default: the router's client quota, 1024]")
@click.option("--log", "log_file", type=click.Path(dir_okay=False, path_type=Path), default=None,
              help="With no system up: append the private system's log to FILE (by default, "
                   "what it logs besides routine notes, e.g. lines written to /scheme/log, "
                   "goes to stderr when COMMAND ends).")
@root_option
@mount_option
@config_option
@click.argument("command", nargs=-1, required=True, type=click.UNPROCESSED)
@click.pass_obj
def run_command(state_dir: Path, names: str | None, dirs: tuple[str, ...], cwd: str | None,
                beneath: bool, confine: bool,
                require_confine: bool, env_options: tuple[str, ...], inherit_env: bool,
                uds_scope: str, tcp_connect: tuple[str, ...], tcp_listen: tuple[str, ...],
                udp_connect: tuple[str, ...], udp_listen: tuple[str, ...],
                trace: str | None, trace_json: bool, brokered: bool | None,
                ro_host: tuple[str, ...], passthrough: bool, in_process: bool,
                pass_fds: tuple[int, ...],
                max_caps: int | None, log_file: Path | None, root: Path | None,
                mounts: tuple[str, ...], config_file: Path | None, command: tuple[str, ...]) -> None:
    """Run COMMAND with the namespace and current directory you give it.

    `redoxcap run --dir . -- make` runs make in the current directory and
    nothing else of your files: every path it uses goes through its
    capabilities (the broker), the system's programs and libraries are
    read-only, and it gets a private /tmp, deleted when it ends. Any program
    runs so, not only one written with rt (which finds its namespace and cwd
    fds with `import rt`). It runs in a session of its own, without your
    terminal as its controlling terminal and without capabilities, and its
    environment holds only PATH, HOME, LANG, LC_*, TERM, TZ, TMPDIR,
    REDOXCAP_* and what --env names (--inherit-env: all of yours).
    --no-broker runs a program written with rt under Landlock and seccomp
    alone (it may read the interpreter, the installed packages and the script
    it runs, and write in a private $TMPDIR). With --no-confine it gets your
    whole environment, terminal and files. With no system up at the state
    directory, a private one is booted for the duration of COMMAND (--root,
    --config and --mount configure it). With a system up, --mount adds the
    mount to it (it stays until `down`); --dir directories are served by
    daemons of the run's own, gone when it ends. With a system up, a
    confined COMMAND is started by the system (a warm fork of its, given
    your fds 0-2 and --pass-fd fds, cwd, umask, limits, nice value and
    environment, in the system's cgroup): faster, and whatever COMMAND
    leaves running is killed when it exits; --in-process starts it from
    this process instead. `run` exits with
    COMMAND's exit code (127: not found).
    """
    options = {
        "names": names, "dirs": dirs, "cwd": cwd, "beneath": beneath, "confine": confine,
        "require_confine": require_confine, "env_options": env_options,
        "inherit_env": inherit_env, "uds_scope": uds_scope, "tcp_connect": tcp_connect,
        "tcp_listen": tcp_listen, "udp_connect": udp_connect, "udp_listen": udp_listen,
        "trace": trace, "trace_json": trace_json, "brokered": brokered, "ro_host": ro_host,
        "passthrough": passthrough, "in_process": in_process, "pass_fds": pass_fds,
        "max_caps": max_caps, "log_file": log_file, "root": root, "mounts": mounts,
        "config_file": config_file}
    # as the console script's short way does it (redoxcap/entry.py), paths as it reads them
    sys.exit(dispatch_run(str(state_dir), list(command),
                          {k: str(v) if isinstance(v, Path) else v for k, v in options.items()}))


@main.command("trace")
@click.option("--pid", type=int, default=None, help="Only the calls of this client pid.")
@click.option("--scheme", "scheme_name", default=None, metavar="NAME",
              help="Only calls to this scheme (and the calls made for them).")
@click.option("--json", "as_json", is_flag=True, help="One JSON object per call.")
@click.pass_obj
def trace_command(state_dir: Path, pid: int | None, scheme_name: str | None, as_json: bool) -> None:
    """Print every call the router forwards, as it happens, until Ctrl-C.

    One line per call: time, client pid, scheme, operation, the path (for a
    path operation) or the handle, the result (a handle, a size, a value or
    an errno name) and how long the scheme took; the calls nsmgr makes to
    serve one come indented under it. Costs the system nothing when nobody
    traces. (Message: control op `trace`, answered with a socket the router
    streams records on.)
    """
    import socket

    from redoxcap.trace import Tracer, records

    reply, fds = control.request(state_dir, "trace")
    names = {int(k): v for k, v in reply.get("schemes", {}).items()}
    tracer = Tracer(names, lambda line: click.echo(line), json_lines=as_json, pid=pid,
                    scheme=scheme_name)
    with socket.socket(fileno=fds[0]) as sock:
        try:
            for record in records(sock):
                tracer.feed(record)
        except KeyboardInterrupt:
            pass


@main.command("graph")
@click.option("--output", type=click.Path(dir_okay=False, path_type=Path), default=None,
              help="Write FILE.svg or FILE.png (needs Graphviz's dot) or FILE.dot instead of "
                   "printing DOT.")
@click.pass_obj
def graph_command(state_dir: Path, output: Path | None) -> None:
    """Draw the capability graph: clients (and the spare runner, with what it made
    ahead for the next run), the capabilities they hold, the scheme handles behind
    them and the daemons serving those, and the names in each namespace. DOT on
    stdout; `dot -Tsvg` or --output renders it.
    (Message: control op `status`.)"""
    from redoxcap import graph

    text = graph.dot(status.fetch(state_dir))
    if output is None:
        click.echo(text, nl=False)
        return
    try:
        graph.render(text, output)
    except ValueError as exc:
        raise Failure(str(exc), EXIT_USAGE) from None
    except FileNotFoundError as exc:
        raise Failure(str(exc)) from None
    click.echo(f"wrote {output}")


@main.command("syscalls")
@click.option("--markdown", is_flag=True,
              help="Print the list as docs/sandbox.md shows it (every machine's names).")
def syscalls_command(markdown: bool) -> None:
    """Show the syscalls a sandboxed program may make, on this machine, and why.

    One list decides both filters: `confined` (a program run with --no-broker,
    whose paths Landlock mediates) and `brokered` (the broker answers every call
    that names a path). A call the list does not name fails with ENOSYS.
    """
    from redoxcap.sandbox import syscalls
    from redoxcap.wire import linux

    if markdown:
        click.echo(syscalls.describe_markdown(), nl=False)
        return
    machine = linux.machine()
    if machine is None:
        raise Failure("this machine has no syscall list (only x86_64 and aarch64)", EXIT_FAILED)
    click.echo(syscalls.describe_text(machine), nl=False)
