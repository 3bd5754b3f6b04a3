"""The host directories a run hands its program (`run --dir`), and the run's private /tmp.

Each is served by a file scheme daemon of the run's own (forked by the
system, or `python -E -P -m schemes.file`, killed by the kernel if `run`
dies, stopped when the program ends), registered in the program's namespace
under a name of its own (`dir`, `dir1`, ...). The private /tmp is a scheme
the supervisor makes for the run in no namespace, so that only the broker
holds it. None of these daemons is waited for (DaemonAside): a directory's
starts at once, beside the run's own setup (nearly every program looks in its
directory first thing), and /tmp's when the router first hands its scheme a
request (most programs never use /tmp, and a daemon's start costs more than
the rest of a run). What the run itself holds of them is their roots (NS_ROOT:
clones the router makes, which ask the daemon nothing): the program's cwd when
it is a directory's top, and the broker's handed directories. The program sees
each at its own absolute host path: rt maps that path to the scheme
(REDOXCAP_DIRS), the broker to its capability (redoxcap/broker/calls/locate.py).
"""

from __future__ import annotations

import errno
import os
import posixpath
import select
import signal
import threading
from collections.abc import Sequence
from dataclasses import dataclass
from typing import TYPE_CHECKING

import rt
from redoxcap import PYTHON, control
from redoxcap.exits import EXIT_USAGE, Failure
from redoxcap.wire import protocol as P
from redoxcap.wire.call import call, call_fd
from rt import _process

if TYPE_CHECKING:
    import subprocess  # loaded when a daemon starts, not with the run
    from pathlib import Path


@dataclass(frozen=True)
class HostDir:
    """A host directory a run hands its program (`--dir`), or the run's private /tmp.

    Seen by the program at `visible`.

    Attributes:
        path: its real host path.
        visible: the absolute path the program sees it at: its own host path,
            or /tmp for the private one.
        read_only: every write is EROFS (`--dir HOSTDIR:ro`).
    """

    path: str
    visible: str
    read_only: bool = False

    @property
    def executable(self) -> bool:
        """Programs in it may be executed: the kernel finds them at the path the program names."""
        return self.path == self.visible


def parse_dir(text: str) -> HostDir:
    """`HOSTDIR[:ro]` -> HostDir at its real path; `.` is the current directory.

    Raises:
        Failure: EXIT_USAGE for a path that is not an existing directory, or `/`.
    """
    path, read_only = (text[:-3], True) if text.endswith(":ro") else (text, False)
    if not path:
        raise Failure(f"--dir {text!r}: expected HOSTDIR[:ro]", EXIT_USAGE)
    real = os.path.realpath(os.path.expanduser(path))
    if not os.path.isdir(real):
        why = "does not exist" if not os.path.exists(real) else "is not a directory"
        raise Failure(f"--dir {text}: {real} {why}", EXIT_USAGE)
    if real == "/":
        raise Failure("--dir /: that hands over the whole host; name the directories the "
                      "program needs", EXIT_USAGE)
    return HostDir(real, real, read_only)


def check_dirs(dirs: Sequence[HostDir]) -> None:
    """A read-only directory must not lie in (or be) a writable one that is handed too: the
    program would write it through that one (a path relative to its cwd goes to the
    writable directory's daemon, which serves the read-only one as any subdirectory).

    Raises:
        Failure: EXIT_USAGE, saying which.
    """
    for d in dirs:
        for outer in dirs:
            if d.read_only and not outer.read_only and (
                    d.path == outer.path or d.path.startswith(outer.path.rstrip("/") + "/")):
                raise Failure(f"--dir {d.path}:ro lies in --dir {outer.path}, which is writable: "
                              "the program could write it through that one (hand that one "
                              "read-only too, or leave it out)", EXIT_USAGE)


def serve(child_ns: int, dirs: Sequence[HostDir],
          daemons: list[subprocess.Popen | SystemDaemon | DaemonAside],
          directfs_grant: int | None = None, system: Path | None = None,
          taken: set[str] | None = None) -> list[tuple[HostDir, str]]:
    """Serve each of dirs with a file scheme daemon of our own, registered in child_ns.

    The names are `dir`, `dir1`, ... (`tmp` for the private /tmp), never one the
    namespace holds already (taken, when the caller knows them). Each daemon
    starts beside the caller's own work, which does not wait for it (requests
    wait on its channel meanwhile), and is appended to daemons now (DaemonAside);
    it dies with this process (or, forked by the system at system, with its
    scheme), and :func:`stop` stops it. With directfs_grant
    (the system's, which stays the caller's) each daemon hands the broker its
    host directory for native lookups (HOSTDIR).

    Returns:
        (directory, scheme name) of each, in the order of dirs.

    Raises:
        Failure: the namespace refused a new scheme.
    """
    taken = (set(rt.schemes(child_ns)) if taken is None else set(taken)) if dirs else set()
    mounts = []
    for d in dirs:
        name = free_name("tmp" if d.visible == "/tmp" and not d.executable else "dir", taken)
        taken.add(name)
        try:
            channel = rt.mkscheme(name, child_ns)
        except OSError as exc:
            raise Failure(f"--dir {d.visible}: cannot serve it: {exc.strerror}") from None
        serve_aside(channel, d, name, daemons, directfs_grant, system)
        mounts.append((d, name))
    return mounts


def free_name(base: str, taken: set[str]) -> str:
    """base, or base1, base2...: the first a namespace holding taken does not hold."""
    return next(n for n in [base, *(f"{base}{i}" for i in range(1, len(taken) + 2))]
                if n not in taken)


def serve_aside(channel: int, d: HostDir, name: str,
                daemons: list[subprocess.Popen | SystemDaemon | DaemonAside],
                directfs_grant: int | None = None, system: Path | None = None) -> None:
    """Start the daemon serving d on channel (owned from now on, whatever happens) beside
    the caller's work (DaemonAside, at once), appended to daemons."""
    grant = None
    try:
        grant = os.dup(directfs_grant) if directfs_grant is not None else None
        daemons.append(DaemonAside(channel, d, name, grant, system, at_once=True))
    except BaseException:
        for fd in (channel, grant):
            if fd is not None:
                os.close(fd)
        raise


def open_root(ns: int, name: str) -> int:
    """A capability for the root of scheme name in namespace ns: a clone of its entry
    (NS_ROOT), made by the router, so that its daemon is asked nothing (one that starts
    on its first request stays unstarted).

    Raises:
        OSError: what nsmgr answers (ENODEV: no such name).
    """
    _, fds = call(ns, P.NS_ROOT, [name, 0])
    if len(fds) != 1:
        P.close_fds(fds)
        raise OSError(errno.EIO, "NS_ROOT answered without a root")
    return fds[0]


def _start_daemon(channel: int, d: HostDir, name: str, grant: int | None,
                  system: Path | None) -> subprocess.Popen | SystemDaemon:
    """A file scheme daemon serving d on channel (which stays ours): forked by the system at
    system (control op `serve`: a warm fork, ended with its scheme), or, where there is
    none to ask or it cannot, `python -E -P -m redoxcap.schemes.file`, in a session of its
    own (Ctrl-C goes to the program, not to the daemons it needs until it exits), killed
    when we die."""
    import subprocess

    if system is not None:
        try:
            reply, fds = control.request(system, "serve", passing=channel, path=d.path, name=name,
                                         read_only=d.read_only, directfs=grant is not None)
            P.close_fds(fds)
            return SystemDaemon(int(reply["pid"]))
        except (control.ControlError, OSError, KeyError, TypeError, ValueError):
            pass  # an interpreter of its own, then

    argv = [*PYTHON, "-c", _DAEMON_WITH_PARENT, str(os.getpid()),
            "--channel-fd", str(channel), "--root", d.path, "--name", name, "--no-keep",
            *(["--read-only"] if d.read_only else []),
            *(["--directfs-grant-fd", str(grant)] if grant is not None else [])]
    return subprocess.Popen(argv, pass_fds=[channel] + ([grant] if grant is not None else []),
                            stdin=subprocess.DEVNULL, start_new_session=True)


# `python -E -P -c THIS PARENT ARGS...`: schemes.file's main, killed by the kernel when PARENT dies.
_DAEMON_WITH_PARENT = (
    "import runpy, sys\n"
    "from redoxcap.sandbox.process import die_with_parent\n"
    "die_with_parent(int(sys.argv.pop(1)))\n"
    "sys.argv[0] = 'redoxcap.schemes.file'\n"
    "runpy.run_module('redoxcap.schemes.file', run_name='__main__', alter_sys=True)\n"
)


class SystemDaemon:
    """A daemon the system forked for this run (control op `serve`): the supervisor's child,
    signalled and waited for through a pidfd, as :func:`stop` does a Popen. Its exit
    status is its parent's to reap: returncode is 0 once it has exited."""

    def __init__(self, pid: int) -> None:
        self.pid = pid
        self.returncode: int | None = None
        # it ends with its scheme, which our namespace holds: its pid is not free for reuse yet
        self._pidfd = os.pidfd_open(pid)

    def poll(self) -> int | None:
        if self.returncode is None and select.select([self._pidfd], [], [], 0)[0]:
            self._ended()
        return self.returncode

    def wait(self, timeout: float | None = None) -> int:
        if self.returncode is None:
            if not select.select([self._pidfd], [], [], timeout)[0]:
                import subprocess

                raise subprocess.TimeoutExpired(f"file scheme daemon {self.pid}", timeout or 0)
            self._ended()
        assert self.returncode is not None
        return self.returncode

    def terminate(self) -> None:
        self._signal(signal.SIGTERM)

    def kill(self) -> None:
        self._signal(signal.SIGKILL)

    def _signal(self, signum: int) -> None:
        if self.returncode is None:
            try:
                signal.pidfd_send_signal(self._pidfd, signum)
            except ProcessLookupError:
                pass  # exited, not yet reaped by its parent

    def _ended(self) -> None:
        self.returncode = 0
        os.close(self._pidfd)


class DaemonAside:
    """A file scheme daemon serving d, started from a thread of its own: at once (at_once),
    or once its scheme's channel has a request. Nobody waits for it: requests wait on the
    channel until it serves them.

    Until then this object holds the channel and the directfs grant, if
    any (both owned from now on: see :func:`serve`); :meth:`close` stops
    waiting. A daemon started meanwhile is :attr:`process`, to stop with the
    others (:func:`stop`).

    Attributes:
        process: the daemon, once started (None before, and if it never was).
    """

    def __init__(self, channel: int, d: HostDir, name: str, directfs_grant: int | None = None,
                 system: Path | None = None, at_once: bool = False) -> None:
        self.process: subprocess.Popen | SystemDaemon | None = None
        self._system = system
        self._channel: int | None = channel
        self._grant = directfs_grant
        self._at_once = at_once
        self._wake_r, self._wake_w = os.pipe()
        self._thread = threading.Thread(target=self._wait, args=(d, name), daemon=True,
                                        name=f"redoxcap {name} daemon aside")
        self._thread.start()

    def _wait(self, d: HostDir, name: str) -> None:
        poller = select.poll()
        poller.register(self._wake_r, select.POLLIN)
        if not self._at_once:
            poller.register(self._channel, select.POLLIN)
        events = dict(poller.poll(0 if self._at_once else None))
        if self._wake_r in events:
            return
        if events.get(self._channel, 0) & (select.POLLHUP | select.POLLERR | select.POLLNVAL):
            # the router let go of the scheme (the system is going down): nothing to serve,
            # and no daemon to start that the run would not stop
            self._close_channel()
            return
        try:
            self.process = _start_daemon(self._channel, d, name, self._grant, self._system)
        except OSError as exc:  # say why; its channel closes below, so its requests fail (EIO)
            os.write(2, f"redoxcap: cannot start the daemon of {d.visible}: {exc.strerror}\n".encode())
        # the daemon's alone now: its death is the channel's end, as the router should see
        # (and with none started, this is the end: the requests fail rather than wait)
        self._close_channel()

    def _close_channel(self) -> None:
        for fd in (self._channel, self._grant):
            if fd is not None:
                os.close(fd)
        self._channel = self._grant = None

    def close(self) -> None:
        """Stop waiting for a first request, and let go of the channel."""
        os.write(self._wake_w, b"x")
        self._thread.join()
        for fd in (self._wake_r, self._wake_w, self._channel, self._grant):
            if fd is not None:
                os.close(fd)
        self._channel = self._grant = None


def stop(daemons: list[subprocess.Popen | SystemDaemon | DaemonAside]) -> None:
    """Stop the run's own daemons (SIGTERM, then SIGKILL after a grace) and reap them."""
    import subprocess

    for i, proc in enumerate(daemons):
        if isinstance(proc, DaemonAside):
            proc.close()
            daemons[i] = proc.process
    daemons[:] = [proc for proc in daemons if proc is not None]
    for proc in daemons:
        if proc.poll() is None:
            proc.terminate()
    for proc in daemons:
        try:
            proc.wait(5)
        except subprocess.TimeoutExpired:
            proc.kill()
            proc.wait()
    daemons.clear()


def enter(child_ns: int, mounts: list[tuple[HostDir, str]], cwd: str | None,
               beneath: bool) -> None:
    """Make the first --dir (or cwd, a host path inside one) rt's current directory.

    Raises:
        Failure: EXIT_USAGE for a cwd in none of the directories; the open's error otherwise.
    """
    first = mounts[0][0]
    target = posixpath.normpath(posixpath.join(first.visible, cwd or "."))
    inside = [(d, name) for d, name in mounts
              if target == d.visible or target.startswith(d.visible.rstrip("/") + "/")]
    if not inside:
        raise Failure(f"--cwd {cwd}: with --dir, the cwd is a host path inside one of the "
                      f"directories (relative to {first.visible})", EXIT_USAGE)
    d, name = max(inside, key=lambda m: len(m[0].visible))
    rest = target[len(d.visible):].lstrip("/") or "."
    try:
        if rest == "." and not beneath:  # the directory itself: its root, its daemon not asked
            fd = open_root(child_ns, name)
        else:
            fd = call_fd(child_ns, P.OPENAT, [f"/scheme/{name}/{rest}",
                                              os.O_RDONLY | os.O_DIRECTORY
                                              | (P.O_RESOLVE_BENEATH if beneath else 0), 0])
    except OSError as exc:
        raise Failure(f"--cwd {target}: {exc.strerror}") from None
    _process.replace_cwd(fd, target)
