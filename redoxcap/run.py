"""`redoxcap run`: start a program with exactly the namespace and directory it is given.

The command's capabilities come from the supervisor's control op `namespace`
(a clone of the root namespace, in a router account of its own, so that
whatever the command comes to hold is charged and capped there; brokered,
also the scheme of its private /tmp). This process installs that namespace
and the `--cwd` directory in its own rt (`rt.setup`), forks the namespace
down to `--ns`, puts a uds scope in it (`--uds-scope`), narrows its tcp and
udp to what the `--allow-*` options grant, and starts the command with
clones of both. Confined (the default), the command runs brokered
(redoxcap.broker: any program, every path through its capabilities, with
the `--dir` directories at their own paths and a private /tmp, see
redoxcap/hostdirs.py), or, with `--no-broker`, in a fork of this process
that confines itself as the sandbox launcher would and executes it
(redoxcap.sandbox.spawn_confined: no second interpreter), with a private
scratch directory; either way with a minimal environment. Unconfined, it is
started with the public `rt.spawn`. `run` forwards SIGINT, SIGTERM and
SIGHUP to it and exits with its exit code.

A spare runner of the system takes the first of those steps before its run
comes (:class:`Prepared`: the namespace, set up, and its fork with every name
and a private uds scope); a run of the everyday shape starts from them.

Nothing here imports click or trio: the console script reads `run`'s
options itself (redoxcap/entry.py) and calls :func:`main`.

With no system up at the state directory, a private one is booted for the
duration of the command (:func:`redoxcap.lifecycle.private_system`).
"""

from __future__ import annotations

import contextlib
import errno
import functools
import json
import os
import posixpath
import socket
import stat
import sys
import tempfile
import threading
from collections.abc import Callable, Iterator, Mapping, Sequence
from pathlib import Path
from typing import TYPE_CHECKING, Any, NamedTuple

import rt
from redoxcap import control, hostdirs
from redoxcap.exits import EXIT_NOT_FOUND, EXIT_USAGE, Failure, wait_forwarding_signals
from redoxcap.grants import NetGrant, entries_for, net_grants
from redoxcap.sandbox.policy import python_script
from redoxcap.wire import protocol as P
from redoxcap.wire.call import call_fd
from redoxcap.wire.roots import NamespaceRoots
from rt import _process
from rt._paths import ENV_DIRS

if TYPE_CHECKING:
    from redoxcap.trace import Follower

# Imported where they are needed, not here: a run with a system up and without --trace uses
# neither config and lifecycle (which bring trio) nor the trace printer.

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


def confined_launch(command: list[str], require: bool, scratch: str) -> dict:
    """spawn_confined's options for command: what the launcher grants it besides the interpreter.

    Only the script of a Python interpreter (`python3 [options] script.py`)
    is made readable; `-c`, `-m` and every other program's arguments are
    data the program must reach through its capabilities. scratch is the
    command's private writable temporary directory.
    """
    script = python_script(command)
    return {"read_paths": [] if script is None else [script], "write_paths": [scratch],
            "require": require}


def _brokered(brokered: bool | None, confine: bool) -> bool:
    """Whether the run is brokered (`--brokered`, `--no-broker`, or neither: when confined).

    Raises:
        Failure: EXIT_USAGE for --brokered with --no-confine.
    """
    if brokered and not confine:
        raise Failure("--brokered confines the program itself; it contradicts --no-confine",
                      EXIT_USAGE)
    return confine if brokered is None else brokered


def broker_options(brokered: bool | None, confine: bool, ro_host: Sequence[str], passthrough: bool
                   ) -> dict | None:
    """start_brokered's options (None for an rt-only run); says why the broker cannot run.

    Args:
        brokered: `--brokered` (True), `--no-broker` (False) or neither (None: brokered
            when confined, the default).

    Raises:
        Failure: --brokered with --no-confine (usage), or a kernel that cannot broker.
    """
    if not _brokered(brokered, confine):
        return None
    from redoxcap.broker import available

    reason = available()
    if reason is not None:
        raise Failure(f"cannot broker an unmodified program here: {reason}; a program written "
                      "with rt runs with --no-broker")
    return {"ro_host": list(ro_host), "passthrough": passthrough}


def main(state_dir: Path, command: Sequence[str], *, names: str | None = None,
         dirs: Sequence[str] = (), cwd: str | None = None, beneath: bool = False,
         confine: bool = True, require_confine: bool = False, env_options: Sequence[str] = (),
         inherit_env: bool = False, uds_scope: str = "private", tcp_connect: Sequence[str] = (),
         tcp_listen: Sequence[str] = (), udp_connect: Sequence[str] = (),
         udp_listen: Sequence[str] = (), trace: str | None = None, trace_json: bool = False,
         brokered: bool | None = None, ro_host: Sequence[str] = (), passthrough: bool = True,
         in_process: bool = False, system_up: bool = False, pass_fds: Sequence[int] = (), max_caps: int | None = None, log_file: Path | None = None,
         root: Path | None = None, mounts: Sequence[str] = (), config_file: Path | None = None,
         prepared: Prepared | None = None, on_scratch: Callable[[str], None] | None = None,
         note: Callable[[dict], None] | None = None,
         ended: Callable[[int], None] | None = None) -> int:
    """`redoxcap run` once its options are parsed (by click, or by redoxcap.entry's short way).

    The keyword arguments are the options of `run` (see `redoxcap run --help`),
    by the names the click command gives them, with its defaults. in_process
    (`--in-process`) is what this is anyway: the run in the calling process
    (redoxcap.entry.dispatch_run decides where a run is done). system_up says
    that a system is up at state_dir without asking it (the runner it forked
    knows); prepared, the run's first steps, taken by that runner before the run
    came (:class:`Prepared`; owned from now on); on_scratch, told by :func:`run`
    of each directory it makes for the program (the runner's reaper removes them
    should the run be killed before it does); note, what sends :func:`run`'s note of the
    program it started to the supervisor (the runner's reaper does); ended, :func:`run`'s.

    Returns:
        COMMAND's exit code.

    Raises:
        Failure: a usage error, or a run that could not be set up (its exit code says which).
    """
    from redoxcap.wire.limits import forbid_core_dumps

    forbid_core_dumps()  # run holds the program's capabilities, and is its broker
    if require_confine and not confine:
        raise Failure("--require-confine contradicts --no-confine", EXIT_USAGE)
    try:
        env = client_environment(os.environ, confined=confine, inherit=inherit_env,
                                 options=env_options)
    except ValueError as exc:
        raise Failure(str(exc), EXIT_USAGE) from None
    for fd in pass_fds:
        try:
            os.fstat(fd)
        except OSError as exc:
            raise Failure(f"--pass-fd {fd}: {exc.strerror}", EXIT_USAGE) from None
    net = net_grants(tcp_connect, tcp_listen, udp_connect, udp_listen)
    host_dirs = [hostdirs.parse_dir(text) for text in dirs]
    hostdirs.check_dirs(host_dirs)
    # the broker's code loads while a private system boots; what cannot broker says so then
    load_broker = _load_broker if _brokered(brokered, confine) else None
    with system_for_run(state_dir, root=root, config_file=config_file, mounts=mounts,
                        log=log_file, dirs=host_dirs, meanwhile=load_broker,
                        up=system_up) as (system, served):
        broker = broker_options(brokered, confine, ro_host, passthrough)
        return run(system, command, env, names=names, cwd=cwd, beneath=beneath, confine=confine,
                   require_confine=require_confine, uds_scope=uds_scope, trace=trace,
                   trace_json=trace_json, net=net, broker=broker, max_caps=max_caps,
                   dirs=host_dirs, pass_fds=pass_fds, served=served, prepared=prepared,
                   on_scratch=on_scratch, note=note, ended=ended)


def _load_broker() -> None:
    import redoxcap.broker  # noqa: F401 - loaded now, used by broker_options and _spawn


@contextlib.contextmanager
def system_for_run(state_dir: Path, *, root: Path | None, config_file: Path | None,
                   mounts: Sequence[str], log: Path | None = None,
                   dirs: Sequence[hostdirs.HostDir] = (),
                   meanwhile: Callable[[], object] | None = None, up: bool = False
                   ) -> Iterator[tuple[Path, list[tuple[hostdirs.HostDir, str]]]]:
    """The system a run uses: the one up at state_dir, or a private one for the block.

    With a system up, --mount adds each mount to it (it stays until `down`)
    and --root or --config is a usage error; without one, they configure the
    private system (whose log is kept: appended to log, or its news to stderr),
    which also serves dirs, the run's --dir directories: each as a mount of
    its own (`dir`, `dir1`, ...; its handles die with its daemon, as those of
    a run's own daemon do), started with the rest of the boot. meanwhile is
    called while a private system boots. up: the caller knows a system is up
    (no need to ask).

    Yields:
        The state directory of the system to run in, and the directories it
        serves already (with their names in its root namespace).

    Raises:
        Failure: a usage error, a mount the running system refused, or a
            private system that did not boot.
    """
    if not up and not control.is_running(state_dir):
        from redoxcap import config, lifecycle  # (and trio): only a private system needs them

        try:
            cfg = config.configure(config_file, root, mounts)
        except config.ConfigError as exc:
            raise Failure(str(exc), EXIT_USAGE) from None
        served = _serve_with_the_system(cfg, dirs)
        with lifecycle.private_system(cfg, log, meanwhile) as private:
            yield private, served
        return
    if root is not None or config_file is not None:
        raise Failure("--root and --config only apply when run boots a private system; one is up",
                      EXIT_USAGE)
    if mounts:
        from redoxcap import config
    for text in mounts:
        try:
            m = config.parse_mount(text)
            control.request(state_dir, "mount", name=m.name, path=str(m.path), read_only=m.read_only)
        except control.ControlError as exc:
            raise Failure(f"--mount {text}: {exc}") from None
        except config.ConfigError as exc:
            raise Failure(str(exc), EXIT_USAGE) from None
    if meanwhile is not None:
        meanwhile()
    yield state_dir, []


def _serve_with_the_system(cfg: Any, dirs: Sequence[hostdirs.HostDir]
                           ) -> list[tuple[hostdirs.HostDir, str]]:
    """Add dirs to cfg (a private system's config.Config) as mounts; their (directory, name)."""
    from redoxcap import config

    taken = {*cfg.schemes, *(m.name for m in cfg.mounts), *(u.name for u in cfg.user_schemes),
             *config.RESERVED_NAMES}
    served = []
    for d in dirs:
        name = next(n for n in ["dir", *(f"dir{i}" for i in range(1, len(dirs) + len(taken) + 2))]
                    if n not in taken)
        taken.add(name)
        cfg.mounts.append(config.Mount(name, Path(d.path), d.read_only, keep=False))
        served.append((d, name))
    return served


def run(state_dir: Path, command: Sequence[str], env: dict[str, str], *, names: str | None,
        cwd: str | None, beneath: bool, confine: bool, require_confine: bool, uds_scope: str,
        trace: str | None = None, trace_json: bool = False,
        net: dict[str, NetGrant] | None = None, broker: dict | None = None,
        max_caps: int | None = None, dirs: Sequence[hostdirs.HostDir] = (),
        pass_fds: Sequence[int] = (), served: Sequence[tuple[hostdirs.HostDir, str]] = (),
        prepared: Prepared | None = None, on_scratch: Callable[[str], None] | None = None,
        note: Callable[[dict], None] | None = None,
        ended: Callable[[int], None] | None = None) -> int:
    """Run command in the system at state_dir until it exits; return its exit code.

    Args:
        state_dir: a running system's state directory.
        command: the program and its arguments.
        env: its environment (see :func:`client_environment`), without the
            variables rt.spawn sets for its namespace and cwd.
        names: `--ns`: comma-separated names its namespace keeps (None: all,
            but `file` when dirs are given).
        cwd: `--cwd`: its current directory, a file-scheme or /scheme/NAME path (None: `/`);
            with dirs, a host path in one of them (None: the first).
        beneath: open the cwd with O_RESOLVE_BENEATH.
        confine: confine it (the sandbox launcher's steps, in a fork of this process),
            in a session of its own, with a private scratch directory as $TMPDIR
            (removed afterwards).
        require_confine: have the launcher refuse to run it unconfined.
        uds_scope: `--uds-scope`: private, system or a shared scope's NAME.
        trace: `--trace`: print every call of the command (and of run's own setup
            of its capabilities) to stderr ("-") or to this file.
        trace_json: print JSON objects, one per line, instead.
        net: what its tcp and udp reach (:func:`net_grants`); None: all of them.
        broker: start_brokered's options (:func:`broker_options`): an unmodified
            program, every path through the broker, which confines it itself; it
            also gets a private /tmp (removed afterwards).
        max_caps: `--max-caps`: the capability quota of its router account (None:
            the router's default for clients).
        dirs: `--dir`: host directories it gets, each served by a file scheme daemon
            of this run's own (stopped afterwards) and seen at its own path.
        pass_fds: `--pass-fd`: fds of ours it inherits besides 0-2 (and its capabilities).
        served: dirs with the name the system serves each under already (a private
            system's mounts, :func:`system_for_run`); empty: the run serves them itself.
        prepared: the run's first steps, taken ahead (:class:`Prepared`; owned from now on).
        on_scratch: called with each directory made for the program (its scratch
            directory, its private /tmp) once it is made, before anything is in it.
        note: sends the supervisor the note of the program started (control op `client`'s
            arguments: for `status` and `graph`); None: a thread of this process does.
        ended: told the command's exit code as soon as it is known, its trace printed (the
            runner says it to its caller then: what is left of the run, stopping its daemons
            and removing its directories, keeps no one waiting).

    Returns:
        The command's exit code (128+N when signal N ended it).

    Raises:
        Failure: its capabilities could not be set up, or it could not be started.
        control.ControlError: the supervisor did not hand out a namespace.
    """
    argv, env, scratch, private_tmp, launcher = list(command), dict(env), None, None, None
    if confine and broker is None:
        # Python's tempfile (which trio, ctypes and others use on import) needs a
        # writable directory: the command gets an empty private one, deleted after.
        scratch = _private_directory("redoxcap-scratch-", prepared, on_scratch)
        launcher = confined_launch(argv, require_confine, scratch)
        env["TMPDIR"] = scratch
    if broker is not None:
        private_tmp = _private_directory("redoxcap-tmp-", prepared, on_scratch)
        env["TMPDIR"] = "/tmp"
    follower = _follow_trace(state_dir, trace, trace_json) if trace else None
    daemons: list = []
    try:

        def started(pid: int, account: int | None, where: str) -> None:
            # for `status` and `graph`, not waited for: the program waits for its broker (this
            # thread, in wait) from its first call on, and the run goes on without the note
            client = {"pid": pid, "argv": _shown(command), "names": names, "cwd": where,
                      "account": account}
            if note is not None:
                note(client)
            else:
                threading.Thread(target=note_the_client, daemon=True, args=(state_dir, client),
                                 name="redoxcap client note").start()

        proc = _spawn(
            state_dir, argv, env, names, cwd, beneath, new_session=confine, uds_scope=uds_scope,
            net=net, follower=follower, broker=broker, launcher=launcher, max_caps=max_caps,
            dirs=dirs, private_tmp=private_tmp, daemons=daemons, pass_fds=pass_fds,
            served=served, prepared=prepared, started=started)
        code = wait_forwarding_signals(proc, group=confine)
        if ended is not None:
            if follower is not None:  # its last lines before the caller has the code
                _stop_following(follower)
                follower = None
            ended(code)
        return code
    finally:
        if prepared is not None:
            prepared.close()  # not taken (it is _spawn's from its call on: then this is nothing)
        if follower is not None:
            _stop_following(follower)
        hostdirs.stop(daemons)
        for directory in (scratch, private_tmp):
            if directory is not None:
                _remove(directory)


def note_the_client(state_dir: Path, note: dict) -> None:
    """Tell the supervisor of the program a run started (control op `client`), if it listens."""
    try:
        control.request(state_dir, "client", **note)
    except (control.ControlError, OSError):
        pass


def _shown(command: Sequence[str], room: int = 1024) -> list[str]:
    """command as a client note shows it: whole where it fits in room characters (a control
    request is at most control.MAX_REQUEST bytes), else cut there, with a last `...`."""
    shown: list[str] = []
    for word in command:
        if len(word) >= room:
            shown.append(word[:room] + "...")
            break
        shown.append(word)
        room -= len(word) + 1
    return shown


def _temporary_base() -> str:
    """Where a run makes its directories: the first of $TMPDIR, $TEMP, $TMP and /tmp (as
    tempfile's first choice is), made absolute."""
    return os.path.abspath(next((os.environ[name] for name in ("TMPDIR", "TEMP", "TMP")
                                 if os.environ.get(name)), "/tmp"))


def _temporary_directory(prefix: str) -> str:
    """tempfile.mkdtemp(prefix=prefix) in :func:`_temporary_base`, and only where making it
    there fails in the place tempfile finds: tempfile's first call in a process creates and
    removes a file in each place it tries (0.3-0.6 ms of a run)."""
    try:
        return tempfile.mkdtemp(prefix=prefix, dir=_temporary_base())
    except OSError:
        return tempfile.mkdtemp(prefix=prefix)


def _private_directory(prefix: str, prepared: Prepared | None,
                       on_scratch: Callable[[str], None] | None) -> str:
    """An empty directory for the program alone (its $TMPDIR or its /tmp), removed when the
    run ends: the one prepared made ahead where it is what this run would make, else one
    made now (and told to on_scratch; the prepared one was told when it was made)."""
    directory = prepared.directory() if prepared is not None else None
    if directory is None:
        directory = _temporary_directory(prefix)
        if on_scratch is not None:
            on_scratch(directory)
    return directory


def _umask() -> int:
    mask = os.umask(0o077)
    os.umask(mask)
    return mask


def _remove(directory: str) -> None:
    """Remove a scratch directory of the run's, and what the program left in it."""
    try:
        os.rmdir(directory)  # most programs leave it empty: no need to load shutil
    except OSError:
        import shutil

        shutil.rmtree(directory, ignore_errors=True)


def _stop_following(follower: Follower) -> None:
    """Print what is left of the trace and let it go."""
    follower.stop()
    if follower.out is not sys.stderr:
        follower.out.close()


def _follow_trace(state_dir: Path, where: str, json_lines: bool) -> Follower:
    """Subscribe to the system's trace before anything of the run happens."""
    from redoxcap.trace import Follower

    reply, fds = control.request(state_dir, "trace")
    names = {int(k): v for k, v in reply.get("schemes", {}).items()}
    out = sys.stderr if where == "-" else open(where, "a", encoding="utf-8")  # noqa: SIM115
    return Follower(socket.socket(fileno=fds[0]), names, out, json_lines)


def _spawn(state_dir: Path, argv: list[str], env: dict[str, str], names: str | None,
           cwd: str | None, beneath: bool, *, new_session: bool, uds_scope: str,
           net: dict[str, NetGrant] | None = None, follower: Follower | None = None,
           broker: dict | None = None, launcher: dict | None = None, max_caps: int | None = None,
           dirs: Sequence[hostdirs.HostDir] = (), private_tmp: str | None = None,
           daemons: list | None = None, pass_fds: Sequence[int] = (),
           served: Sequence[tuple[hostdirs.HostDir, str]] = (),
           prepared: Prepared | None = None,
           started: Callable[[int, int | None, str], None] | None = None) -> Any:
    """Start argv with the namespace and cwd asked for: confined in a fork of this process
    (launcher: :func:`confined_launch`), under the broker, or with rt.spawn (unconfined).
    Its first steps are prepared's where they fit the run (:class:`Prepared`, owned from now
    on: closed where they do not).

    With new_session, argv leads a new session without a controlling
    terminal (so it cannot push input into ours). The daemons serving dirs
    (registered in the program's namespace) and private_tmp (the broker's
    /tmp, in no namespace: a scheme the supervisor makes for the run, whose
    daemon starts when the program first uses it) are appended to daemons.
    started, when given, is called once the program is started, with its pid, the router
    account its capabilities are charged to and its cwd; for a brokered program, while it
    confines itself (before its first call, which waits for the broker).

    Returns:
        The process (Popen-like).
    """
    private_scheme = broker is not None and private_tmp is not None
    directfs = broker is not None and broker["passthrough"]  # native lookups: run's broker alone
    if prepared is not None and not (
            prepared.current() and names is None and not served and uds_scope == "private"
            and net is None and max_caps is None and follower is None):
        prepared.close()  # made for a run of another shape, or the namespace changed since
        prepared = None
    if prepared is not None:  # rt holds its root namespace already
        # without the broker, the /tmp scheme is not used: closed with the rest, below
        account, tmp_root, tmp_channel, grant, root_names, child_ns, file_root, starter, \
            clones, cwd_host, for_dir = prepared.take()
        if not directfs and grant is not None:  # --no-passthrough, --no-broker: no native
            os.close(grant)                      # lookups, for the broker nor a --dir daemon
            grant = None
        if grant is None and cwd_host is not None:  # nor one asked ahead
            cwd_host.close()
            cwd_host = None
    else:
        account, ns, tmp_root, tmp_channel, grant = _namespace(state_dir, max_caps, private_scheme,
                                                               directfs)
        file_root = starter = clones = cwd_host = for_dir = None
        if follower is not None:
            follower.start(account)  # the run's calls, from its first
        rt.setup(ns, None)  # rt owns the root namespace until the end
        child_ns = None
    ahead_roots: dict[str, int] = {}  # roots of the handed directories taken ahead, by name
    unused: list[Callable[[], None]] = []  # steps taken ahead this run does not use: let go
    #                                        once the program runs (their closes cost the run
    #                                        the router's and nsmgr's time before)
    dir_channel: tuple[int, str] | None = None  # the channel of the --dir scheme made ahead
    ns_roots: NamespaceRoots | None = None  # and the broker's namespace roots, warmed
    try:
        daemons = daemons if daemons is not None else []
        mounts: list[tuple[hostdirs.HostDir, str]] = []
        in_root = False  # whether the cwd is the root taken ahead that the clones are of
        if for_dir is not None and not (broker is not None and len(dirs) == 1 and not served
                                        and cwd in (None, ".") and not beneath):
            unused.append(for_dir.close)  # a run of another shape
            for_dir = None
        if for_dir is not None:  # one --dir, its cwd: its namespace, scheme and roots ahead
            unused.append(functools.partial(_let_go, child_ns, clones, cwd_host))  # `file`'s
            cwd_host = None
            steps, for_dir = for_dir, None  # each part goes where it is closed from now on
            child_ns, clones, ahead_roots[steps.name] = steps.ns, steps.clones, steps.handed
            _process.replace_cwd(steps.root, posixpath.normpath(dirs[0].visible))  # as enter does
            # its daemon (the spare, told the directory) starts while the program confines
            # itself (meanwhile): its start and the run's calls would take turns on two cores
            dir_channel, ns_roots = (steps.channel, steps.name), steps.roots
            mounts, in_root = [(dirs[0], steps.name)], True
        elif child_ns is None:
            root_names = rt.schemes()
            child_ns, child_names = _fork_namespace(root_names, names, bool(dirs), served, uds_scope,
                                                    net)
        else:
            child_names = set(root_names)
            if dirs and "file" in child_names:  # as _fork_namespace leaves it out
                rt.unregister(child_ns, "file")
                child_names.discard("file")
        if not mounts:
            mounts = list(served) if served else hostdirs.serve(child_ns, dirs, daemons, grant,
                                                                state_dir, child_names)
        if mounts:
            env[ENV_DIRS] = json.dumps([[d.visible, name] for d, name in mounts])
        if dirs and not in_root:
            hostdirs.enter(child_ns, mounts, cwd, beneath)
        elif not dirs:
            root, file_root = file_root, None  # _enter_cwd's
            in_root = _enter_cwd(cwd or "/", beneath, root)
        if not in_root and clones is not None:  # the namespace's clones are its handle's
            _close_all(clones[2:])               # still, whatever it now holds
            clones = (clones[0], clones[1], None, None)
            if cwd_host is not None:
                cwd_host.close()
                cwd_host = None
        where = rt.getcwd()
        if broker is not None:  # an unmodified program: every path it uses through the broker
            from redoxcap.broker import start_brokered

            if not dirs:  # as without the broker, the script a Python interpreter runs is readable
                argv, extra = _script_made_absolute(argv)
                broker = dict(broker, ro_host=[*broker["ro_host"], *extra])

            def meanwhile(pid: int) -> None:  # while the program confines itself
                nonlocal tmp_channel, dir_channel
                if dir_channel is not None:
                    (channel, name), dir_channel = dir_channel, None  # serve_aside's now
                    hostdirs.serve_aside(channel, dirs[0], name, daemons, grant, state_dir)
                if tmp_channel is not None:
                    daemons.append(hostdirs.DaemonAside(
                        tmp_channel, hostdirs.HostDir(private_tmp, "/tmp"), "tmp",
                        os.dup(grant) if grant is not None else None, state_dir))
                    tmp_channel = None  # the daemon's now
                if started is not None:
                    started(pid, account, where)

            handed: list = []
            try:
                for d, name in mounts:
                    root = ahead_roots.pop(name, None)
                    handed.append((d, hostdirs.open_root(child_ns, name) if root is None else root,
                                   name))
                if tmp_root is not None:
                    handed.append((hostdirs.HostDir(private_tmp, "/tmp"), tmp_root, "tmp"))
                    tmp_root = None  # closed with the rest of handed
                cwd_fd = _process.cwd_fd()
                trace = follower.syscall if follower is not None else None
                ahead, clones = clones, None  # start_brokered's
                ahead_host, cwd_host = cwd_host, None
                warmed, ns_roots = ns_roots, None
                mine, handed = handed, []  # and so are the roots
                return start_brokered(argv, child_ns, cwd_fd, where, env, **broker,
                                      mounts=mine, net=net, trace=trace, pass_fds=pass_fds,
                                      directfs_grant=grant, meanwhile=meanwhile, starter=starter,
                                      clones=ahead, cwd_host=ahead_host,
                                      ns_roots=warmed)
            finally:
                for _, cap, _ in handed:
                    rt.close(cap)
        if launcher is not None:
            proc = _spawn_confined(argv, env, child_ns, launcher, pass_fds)
        else:
            try:
                proc = rt.spawn(argv, ns=child_ns, share_ns=True, env=env, pass_fds=pass_fds,
                                start_new_session=new_session)
            except OSError as exc:
                raise Failure(f"{argv[0]}: {exc.strerror}", EXIT_NOT_FOUND) from None
        if started is not None:
            started(proc.pid, account, where)
        return proc
    finally:
        for let_go in unused:
            let_go()
        for fd in (tmp_root, tmp_channel, dir_channel[0] if dir_channel is not None else None):
            if fd is not None:
                os.close(fd)
        if file_root is not None:
            rt.close(file_root)
        if starter is not None:
            starter.close()  # unused (once used, this does nothing)
        _close_all([fd for fd in clones or () if fd is not None])  # unused
        _close_all(list(ahead_roots.values()))
        if cwd_host is not None:
            cwd_host.close()
        if for_dir is not None:
            for_dir.close()
        if ns_roots is not None:
            ns_roots.clear()
        if child_ns is not None:
            rt.close(child_ns)
        if grant is not None:
            os.close(grant)
        rt.setup(None, None)


def _namespace(state_dir: Path, max_caps: int | None, private_scheme: bool, directfs: bool
               ) -> tuple[int | None, int, int | None, int | None, int | None]:
    """The supervisor's `namespace` op for a run: a clone of the root namespace in a router
    account of its own (whatever the command comes to hold is charged and capped there),
    with private_scheme a scheme for its /tmp, with directfs the grant for native lookups.

    Returns:
        (the account, the namespace, the /tmp scheme's root and channel, the grant), each fd
        the caller's; None for what was not asked for (or, the grant, not given).

    Raises:
        control.ControlError: the supervisor refused.
        Failure: it made no scheme for /tmp when asked to.
    """
    quota = {} if max_caps is None else {"max_caps": max_caps}
    reply, fds = control.request(state_dir, "namespace", account=True, **quota,
                                 **({"scheme": True} if private_scheme else {}),
                                 **({"directfs": True} if directfs else {}))
    tmp_root = tmp_channel = grant = None
    # the grant comes last; a supervisor without one to give leaves it out (routed lookups)
    if directfs and len(fds) == 2 + 2 * private_scheme:
        grant = fds.pop()
    if private_scheme:
        if len(fds) != 3:  # a supervisor that did not make the scheme: not ours to guess
            for fd in [*fds, *([grant] if grant is not None else [])]:
                os.close(fd)
            raise Failure("the supervisor did not hand out a scheme for /tmp")
        tmp_root, tmp_channel = fds[1], fds[2]
    return reply.get("account"), fds[0], tmp_root, tmp_channel, grant


def _fork_namespace(root_names: list[str], names: str | None, with_dirs: bool,
                    served: Sequence[tuple[hostdirs.HostDir, str]], uds_scope: str,
                    net: dict[str, NetGrant] | None) -> tuple[int, set[str]]:
    """The program's namespace, forked from rt's (whose names are root_names): `--ns` names
    (None: all, but `file` with_dirs), with the directories the system serves for the run,
    its uds scope and its net grants in place of the system's entries; and the names it holds.

    Raises:
        Failure: a name the system lacks (EXIT_USAGE), or a fork nsmgr refused.
    """
    wanted = None if names is None else [n for n in names.split(",") if n]
    unknown = sorted(set(wanted or ()) - set(root_names))
    if unknown:
        raise Failure(f"--ns: no scheme named {', '.join(map(repr, unknown))} in this system "
                      f"(it has {', '.join(root_names)})", EXIT_USAGE)
    if wanted is None and with_dirs:  # the program's files are its directories, not the root
        wanted = [n for n in root_names if n != "file"]
    elif wanted is not None:  # the directories the system serves for the run are its own
        wanted += [name for _, name in served if name not in wanted]
    child_names = set(root_names if wanted is None else wanted)
    # the run's uds scope and net grants stand in the fork in place of the system's
    # entries: made first, and put there by the fork itself (one request, not three each)
    put = entries_for(uds_scope, net, child_names)
    try:
        return rt.mkns(wanted, put=put), child_names
    except OSError as exc:
        what = f"--ns {names!r}" if names is not None else "the program's namespace"
        raise Failure(f"{what}: {exc.strerror}") from None
    finally:
        for cap in put.values():
            rt.close(cap)


class Steps(NamedTuple):
    """What :class:`Prepared` took ahead (None: not given, or not in the namespace)."""
    account: int | None  # the router account of the run
    tmp_root: int | None  # the /tmp scheme's root
    tmp_channel: int | None  # and its channel, for the daemon that will serve it
    grant: int | None  # the directfs grant
    root_names: list[str]  # the root namespace's names
    child_ns: int  # the program's namespace
    file_root: int | None  # the root namespace's `file` root, the default cwd
    starter: Any  # a fork to become a brokered program (redoxcap.broker.launcher.Starter)
    clones: tuple[int, int, int, int] | None  # for the broker: start_brokered's `clones`
    cwd_host: Any  # and its `cwd_host`, the host directory behind the cwd's clone
    for_dir: DirSteps | None  # the same steps for a brokered run handed one directory


class DirSteps(NamedTuple):
    """What :class:`Prepared` took ahead for a brokered run handed one directory (`--dir D`,
    D its cwd): the program's namespace forked without `file`, a scheme registered in it
    for D (its channel, for the daemon told D once the run comes), the scheme's root (rt's
    cwd) and a clone of it (the broker's for D), and start_brokered's clones."""
    name: str  # the scheme's name: `dir`, or `dir1`... where the system has a `dir`
    ns: int
    channel: int
    root: int
    handed: int
    clones: tuple[int, int, int, int]
    roots: NamespaceRoots  # the broker's, on clones[0], warmed: it knows `file` absent

    def close(self) -> None:
        os.close(self.channel)
        _close_all([self.ns, self.root, self.handed, *self.clones])
        self.roots.clear()


class Prepared:
    """The first steps of a run, taken before its caller comes (a spare runner takes them
    while it waits: redoxcap/runner.py): the `namespace` op, its namespace set up in rt, and
    the program's namespace forked from it with every name and a private uds scope, and the
    `file` scheme's root, the cwd of a run without --cwd or --dir; before all that, where
    programs can be brokered here, a fork of this process to become the program
    (redoxcap.broker.launcher.Starter), which holds none of them, and after it the clones of
    the program's namespace and of that root that the broker would make for such a run, and
    the host directory behind the broker's (its native lookups': HOSTDIR, a round trip
    through two daemons that took 0.8 ms here while the program confined itself), and the
    same steps for a run handed one directory (:class:`DirSteps`); last, the program's
    private directory (its /tmp, or $TMPDIR without the broker: making a directory in /tmp
    took 0.1-0.5 ms here), told to on_scratch as a run tells its own, which any run takes
    where it would make its own in the same place with the same umask (:meth:`directory`),
    whatever its shape. A run with no --ns, --uds-scope other than private, --allow-*,
    --max-caps or --trace starts from them (a brokered run with one --dir, its cwd, from
    its DirSteps; with other --dir, `file` taken out of the fork, as `_fork_namespace` would
    leave it out; without the broker or passthrough, the /tmp scheme or the grant let go;
    with --cwd or --dir, the root and its clones let go, the namespace's kept; what it does
    not use, let go once its program runs), provided the root namespace has not changed
    since (its generation, wire/roots.py); any other run closes them and starts afresh.

    Owns its fds, the Starter and rt's setup, until `take` or `close`, and its directory
    until `directory` or `close` (which removes it).

    Raises:
        control.ControlError, Failure, OSError: it could not be prepared (nothing is held).
    """

    def __init__(self, state_dir: Path, on_scratch: Callable[[str], None] | None = None) -> None:
        from redoxcap.broker import available
        from redoxcap.broker.launcher import Starter

        self._starter = Starter() if available() is None else None
        self._fds: list[int] = []
        self._cwd_host: Any = None
        self._ns_roots: NamespaceRoots | None = None  # the DirSteps', not in _fds
        self._held, self._generation = True, None
        self._directory: str | None = None
        try:
            account, ns, tmp_root, tmp_channel, grant = _namespace(state_dir, None, True, True)
        except BaseException:
            self.close()
            raise
        rt.setup(ns, None)
        self._fds += [fd for fd in (tmp_root, tmp_channel, grant) if fd is not None]
        try:
            root_names = rt.schemes()
            self._generation = _root_generation(root_names)  # before the fork: what it forks
            child_ns, _ = _fork_namespace(root_names, None, False, (), "private", None)
            self._fds.append(child_ns)
            file_root = hostdirs.open_root(_process.namespace_fd(), "file") \
                if "file" in root_names else None
            if file_root is not None:
                self._fds.append(file_root)
            clones = for_dir = None
            if self._starter is not None and file_root is not None:  # a brokered run's, in `/`
                clones = self._clones(child_ns, file_root)
                if grant is not None:
                    from redoxcap.broker.calls.native import HostDirectory
                    self._cwd_host = HostDirectory.ask(clones[2], grant)
                for_dir = self._for_dir(root_names)
        except BaseException:
            self.close()
            raise
        self._taken = Steps(account, tmp_root, tmp_channel, grant, root_names, child_ns, file_root,
                            self._starter, clones, self._cwd_host, for_dir)
        self.account = account
        self._umask = _umask()
        try:
            self._directory = tempfile.mkdtemp(prefix="redoxcap-tmp-", dir=_temporary_base())
        except OSError:
            return  # the run makes its own, and says why it cannot
        if on_scratch is not None:
            on_scratch(self._directory)

    def _clones(self, ns: int, cwd: int) -> tuple[int, int, int, int]:
        """start_brokered's clones (ns's for the broker and the program, then cwd's), each
        closed with the rest if one fails."""
        for fd in (ns, ns, cwd, cwd):
            self._fds.append(call_fd(fd, P.CLONE))
        return tuple(self._fds[-4:])  # type: ignore[return-value]

    def _for_dir(self, root_names: list[str]) -> DirSteps:
        """The steps of a brokered run handed one directory, taken as that run takes them
        (hostdirs.serve and enter): routed calls that took such a run 1-2 ms each while the
        directory's daemon started beside it."""
        name = hostdirs.free_name("dir", {n for n in root_names if n != "file"})
        ns, _ = _fork_namespace(root_names, None, True, (), "private", None)
        self._fds.append(ns)
        self._fds.append(rt.mkscheme(name, ns))
        self._fds.append(hostdirs.open_root(ns, name))
        self._fds.append(call_fd(self._fds[-1], P.CLONE))
        ns, channel, root, handed = self._fds[-4:]
        clones = self._clones(ns, root)
        # the broker's kept roots, warmed as its warm-up would be (Locator.warm): they know
        # the namespace has no `file` (every program start asks for /etc/ld.so.preload)
        self._ns_roots = NamespaceRoots()
        self._ns_roots.take(clones[0], "/scheme/file/")
        return DirSteps(name, ns, channel, root, handed, clones, self._ns_roots)

    def directory(self) -> str | None:
        """The private directory made ahead (the caller's from now on), where it is still
        there and a run now would make its own beside it with the same umask; else None."""
        directory = self._directory
        if directory is None or os.path.dirname(directory) != _temporary_base() or \
                _umask() != self._umask or not _is_directory(directory):
            return None
        self._directory = None
        return directory

    def current(self) -> bool:
        """Whether the root namespace is as it was when the program's was forked from it."""
        return self._held and self._generation is not None and \
            _process.CURRENT.roots.generation() == self._generation

    def take(self) -> Steps:
        """The steps taken, each fd the caller's from now on, as is rt's setup."""
        assert self._held
        self._held = False
        return self._taken

    def close(self) -> None:
        """Let go of everything not taken (the directory is removed)."""
        if self._directory is not None:
            _remove(self._directory)
            self._directory = None
        if self._held:
            for fd in self._fds:
                os.close(fd)
            self._fds = []
            if self._cwd_host is not None:
                self._cwd_host.close()
                self._cwd_host = None
            if self._ns_roots is not None:
                self._ns_roots.clear()
                self._ns_roots = None
            self._held = False
            if self._starter is not None:
                self._starter.close()
            rt.setup(None, None)


def _let_go(ns: int, clones: Sequence[int] | None, host: Any) -> None:
    """Close a namespace, its clones and a host directory (calls/native.py) taken ahead."""
    rt.close(ns)
    _close_all(clones or ())
    if host is not None:
        host.close()


def _is_directory(path: str) -> bool:
    try:
        return stat.S_ISDIR(os.lstat(path).st_mode)
    except OSError:
        return False


def _close_all(capabilities: Sequence[int]) -> None:
    for fd in capabilities:
        rt.close(fd)


def _root_generation(names: list[str]) -> int | None:
    """The generation of rt's namespace now (wire/roots.py), its page taken with the root of
    one of its names, uds where it has one (the next the run's fork asks for: kept, no round
    trip more); None where it hands out no page."""
    roots = _process.CURRENT.roots
    if roots.generation() is None and names:
        try:
            _, _, root = roots.take(_process.namespace_fd(),
                                    f"/scheme/{'uds' if 'uds' in names else names[0]}/")
        except OSError:
            return None
        if root is not None:
            roots.give_back(root)
    return roots.generation()


def _spawn_confined(argv: list[str], env: dict[str, str], child_ns: int, launcher: dict,
                    pass_fds: Sequence[int]) -> Any:
    """Start argv confined (:func:`redoxcap.sandbox.spawn_confined`) with clones of child_ns
    and of rt's cwd, as rt.spawn(share_ns=True) would hand them."""
    from redoxcap.sandbox import spawn_confined

    ns, cwd_clone = rt.clone(child_ns), None
    try:
        cwd_clone = rt.clone(_process.cwd_fd())
        env = dict(env, **{_process.ENV_NS: str(ns), _process.ENV_CWD: str(cwd_clone),
                           _process.ENV_CWD_PATH: _process.cwd_path()})
        return spawn_confined(argv, env, keep_fds=[ns, cwd_clone, *pass_fds], **launcher)
    finally:
        rt.close(ns)
        if cwd_clone is not None:
            rt.close(cwd_clone)


def _script_made_absolute(argv: list[str]) -> tuple[list[str], list[str]]:
    """argv with the script a Python interpreter runs (`python3 x.py`) named by its absolute
    path, and that file as the one host path to serve for it (none for other programs)."""
    script = python_script(argv)
    if script is None:
        return argv, []
    for i, arg in enumerate(argv[1:], 1):
        if not arg.startswith("-") and os.path.abspath(arg) == script:
            return [*argv[:i], script, *argv[i + 1:]], [script]
    return argv, [script]


def _enter_cwd(cwd: str, beneath: bool, file_root: int | None = None) -> bool:
    """Make cwd (with O_RESOLVE_BENEATH if beneath) rt's current directory in this process;
    whether it is file_root.

    getcwd's string comes from where the scheme says the directory is, after
    symlinks, not from cwd as typed. file_root (owned: used or closed) is the `file`
    scheme's root, taken ahead (:class:`Prepared`), for a cwd of `/`.
    """
    path = posixpath.normpath(cwd if cwd.startswith("/") else "/" + cwd)
    if file_root is not None and (path != "/" or beneath):
        rt.close(file_root)
        file_root = None
    try:
        if path == "/" and not beneath:
            # every run's default: the file scheme's root itself, as a root is called /
            # (NS_ROOT: a clone the router makes; no open, status or FPATH of the scheme's)
            _process.replace_cwd(file_root if file_root is not None
                                 else hostdirs.open_root(_process.namespace_fd(), "file"), "/")
            return file_root is not None
        fd = rt.open(path, rt.O_DIRECTORY | (rt.O_RESOLVE_BENEATH if beneath else 0))
        try:
            rt.fchdir(fd)
        finally:
            rt.close(fd)
        return False
    except OSError as exc:
        hint = ""
        if os.path.isabs(cwd) and os.path.isdir(cwd) and not path.startswith("/scheme/"):
            hint = (f" (--cwd is a path in the system's file scheme; to run in the host "
                    f"directory {cwd}, hand it over with --dir {cwd})")
        elif exc.errno == errno.ENOENT and not path.startswith("/scheme/"):
            from redoxcap import config

            hint = (f" (a path in the system's file scheme: make the directory {path.lstrip('/')} "
                    f"below its --root, by default {config.default_root()}; or, for a host "
                    f"directory, use --dir HOSTDIR)")
        raise Failure(f"--cwd {cwd}: {exc.strerror}{hint}") from None
