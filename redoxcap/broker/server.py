"""The broker: one loop that answers every trapped syscall of a program and its children.

    notification -> open /proc/TID/mem -> ID_VALID -> the process's state
                 -> the handler (reads its arguments once, resolves, acts)
                 -> SEND (value or errno), ADDFD+SEND (an fd), or CONTINUE

One listener serves every thread and child of the program (the filter is
inherited); a notification is answered by one handler at a time, so a
multi-threaded program's calls queue here in the order the kernel hands
them out. When the broker dies the listener closes, and every trapped call
fails with ENOSYS.
"""

from __future__ import annotations

import errno
import functools
import logging
import os
import re
import select
import signal
import socket
import tempfile
import time
from collections.abc import Callable, Iterable, Sequence
from pathlib import Path
from typing import Any

from redoxcap import exits
from redoxcap.broker import hostfs
from redoxcap.broker.calls import PROCEED, Call, Install, Syscalls
from redoxcap.broker.calls.native import HostDirectory
from redoxcap.broker.launcher import EXIT_CANNOT_RUN, Starter, exec_target, give_read_paths
from redoxcap.broker.memory import Memory
from redoxcap.broker.net import SocketGrants
from redoxcap.broker.notify import Listener, Notification
from redoxcap.broker.state import Directory, Mount, Processes
from redoxcap.wire import linux
from redoxcap.wire import protocol as P
from redoxcap.wire.call import call_fd, call_value, forget, give_up_when_readable
from redoxcap.wire.protocol import ENV_CWD, ENV_CWD_PATH, ENV_NS
from redoxcap.wire.roots import NamespaceRoots

log = logging.getLogger("broker")
PUMP_GRACE = 10.0  # seconds a routed write may still take once the program has exited


class Unavailable(OSError):
    """seccomp user notification (or Landlock, or pidfd_getfd) is not available here."""


@functools.cache
def available() -> str | None:
    """None when brokered programs can run here, else why not (for the CLI to say).

    Asked once per process (a run asks twice), and once for all runs in the fork server."""
    if linux.machine() is None:
        return "seccomp user notification: unsupported architecture"
    try:
        actions = Path("/proc/sys/kernel/seccomp/actions_avail").read_text().split()
    except OSError:
        return "seccomp is not available in this kernel"
    if "user_notif" not in actions:
        return "this kernel has no seccomp user notification (SECCOMP_RET_USER_NOTIF)"
    from redoxcap.sandbox import landlock_abi

    if landlock_abi() < 1:
        return "Landlock is not available (brokered programs are confined by it too)"
    return None


# Calls that make a name: where nothing was handed, EACCES (as in a directory one may not
# write), not the ENOENT a lookup gets.
_CREATING = frozenset({"mkdir", "mkdirat", "symlink", "symlinkat", "link", "linkat", "rename",
                       "renameat", "renameat2", "creat"})


@functools.cache
def syscall_names(machine: str) -> dict[int, str]:
    """Syscall names by number (made once per process: the runners' come from the fork server)."""
    return {nr: name for name, nr in linux.SYSCALLS[machine].items()}


class Broker:
    """The loop over one listener."""

    def __init__(self, listener: Listener, syscalls: Syscalls, processes: Processes,
                 trace: Callable[[dict], None] | None = None) -> None:
        self.listener = listener
        self.syscalls = syscalls
        self.processes = processes
        self.poller = select.poll()
        self.trace = trace
        self._names = syscall_names(syscalls.machine)
        # what every call asks for, looked up once (the table and the pumps are the
        # syscalls' for the broker's whole life)
        self._table = syscalls.table
        self._pumps = syscalls.pumps

    def serve(self, main_pidfd: int) -> None:
        """Answer calls until the main process exits (its pidfd becomes readable). A call
        the broker makes on a capability meanwhile gives up then (EINTR): a process the
        program left behind must not hold the run up by asking for a scheme of its own that
        never answers."""
        self.poller.register(self.listener.fd, select.POLLIN)
        self.poller.register(main_pidfd, select.POLLIN)
        give_up_when_readable(main_pidfd)
        try:
            self._serve(main_pidfd)
        finally:
            give_up_when_readable(None)  # what comes after (the pumps' last writes) must not

    def _serve(self, main_pidfd: int) -> None:
        while True:
            for fd, events in self.poller.poll():
                if fd == main_pidfd:
                    return
                if fd == self.listener.fd:
                    if events & select.POLLIN:
                        notif = self.listener.receive()
                        if notif is not None:
                            self.handle(notif)
                    elif events & (select.POLLHUP | select.POLLERR):
                        self.poller.unregister(fd)  # no target left with the filter
                else:
                    self.poller.unregister(fd)
                    self.processes.exited(fd)

    def handle(self, notif: Notification) -> None:
        """Answer one notification (never raises for the target's errors)."""
        try:
            mem = Memory(notif.tid)  # before ID_VALID: the tid may be recycled after
        except OSError:
            return  # the thread is gone, and its call with it
        try:
            if not self.listener.valid(notif.id):
                return
            answer: object
            started = time.time() if self.trace is not None else 0.0
            try:
                process, new = self.processes.of_thread(notif.tid)
                if new:
                    self.poller.register(process.pidfd, select.POLLIN)
                handler = self._table.get(notif.nr)
                if handler is None:
                    raise OSError(errno.ENOSYS, "not brokered")
                self._pumps.settle()  # what it wrote to routed files is in them first
                answer = handler(Call(notif, mem, process))
            except OSError as exc:
                err = exc.errno or errno.EIO
                if err == errno.ENODEV:  # a name the namespace lacks: nothing was handed there
                    err = errno.EACCES if self._names.get(notif.nr) in _CREATING else errno.ENOENT
                answer = OSError(err, exc.strerror)
            except Exception:
                log.exception("broker: %s failed", self._names.get(notif.nr, notif.nr))
                answer = OSError(errno.EIO, "broker error")
            if self.trace is not None:
                self._trace(notif, mem, answer, started)
        finally:
            mem.close()
        self._answer(notif.id, answer)

    def _answer(self, nid: int, answer: object) -> None:
        if isinstance(answer, OSError):
            self.listener.fail(nid, answer.errno)
        elif isinstance(answer, Install):
            try:
                self.listener.install_fd(nid, answer.fd, answer.cloexec)
            except OSError as exc:  # EMFILE in the target: the call fails, nothing leaks
                self.listener.fail(nid, exc.errno or errno.EIO)
            finally:
                forget(answer.fd)
                os.close(answer.fd)
        elif answer is PROCEED:
            self.listener.proceed(nid)
        else:
            self.listener.reply(nid, int(answer))

    def _trace(self, notif: Notification, mem: Memory, answer: object, started: float) -> None:
        """Hand the trace one record of this call (redoxcap/trace.py prints it)."""
        name = self._names.get(notif.nr, str(notif.nr))
        what = ""
        for arg in notif.args[:2]:  # the path, where the call has one among its first two
            try:
                text = mem.string(arg, 256)
                if text.startswith((b"/", b".")) or (text and text.isascii() and b"\0" not in text):
                    what = text.decode(errors="replace")
                    break
            except OSError:
                continue
        result = (errno.errorcode.get(answer.errno, f"errno {answer.errno}")
                  if isinstance(answer, OSError)
                  else "fd" if isinstance(answer, Install)
                  else "proceed" if answer is PROCEED else str(answer))
        self.trace({"t": started, "pid": notif.tid, "op": name, "about": what, "result": result,
                    "ms": round((time.time() - started) * 1000, 3)})


def host_trees_for(argv: Sequence[str], env: dict[str, str], extra: Iterable[str],
                   handed: Sequence[str] = ()) -> list[str]:
    """The host trees a run serves: the defaults, --ro-host, and what its programs need.

    For argv[0], and for the `python3` and `python` that env's PATH finds (a
    build or a script may run them): the program's own file (never its
    directory) when it lies outside the defaults; a `#!` script's
    interpreter; for a Python interpreter, its installation prefix and the
    virtual environment it belongs to (the directory above its `bin/` when
    that holds a pyvenv.cfg); for a pyenv shim, the pyenv root. Then the
    directories of redoxcap's own packages, so that a program written with rt
    imports it. Never a directory that is or holds `/`, the caller's cwd or
    $HOME.

    A program found in one of the handed directories (an in-project venv's
    `bin/` on PATH) is the run's to have written, and its symlink or `#!`
    line with it: it makes a host tree of nothing but a Python installation it
    leads to (an executable python* whose prefix holds lib/python*/os.py: the
    venv's interpreter), never of the file it names.
    """
    import shutil

    from redoxcap.sandbox.policy import project_package_locations

    trees = list(hostfs.DEFAULT_TREES) + [os.path.abspath(p) for p in extra]
    path = env.get("PATH", os.defpath)
    seen: set[str] = set()  # programs whose trees are in already (python3 and python's shims
    for name in ([argv[0]] if argv else []) + ["python3", "python"]:  # share an interpreter)
        exe = shutil.which(name, path=path)
        if exe is not None:
            exe = os.path.abspath(exe)
            trees += _program_trees(exe, seen, untrusted=any(_holds(d, exe) for d in handed))
    trees += project_package_locations()
    return trees


def _holds(directory: str, path: str) -> bool:
    """Whether path is directory or lies beneath it."""
    directory = directory.rstrip("/")
    return path == directory or path.startswith(directory + "/")


def _guarded(directory: str) -> bool:
    """Whether directory is never a host tree: `/`, /root, /home, /tmp, /etc, or one that is
    or holds the caller's cwd or $HOME."""
    real = os.path.realpath(directory)
    guarded = {os.path.realpath(p) for p in (os.getcwd(), os.path.expanduser("~"))}
    return real in ("/", "/root", "/home", "/tmp", "/etc") or any(_holds(real, g) for g in guarded)


def _python_installation(real: str) -> str | None:
    """The installation prefix of the Python interpreter real (a resolved path), or None
    when real is no such interpreter: an executable python*, the prefix above its bin/
    holding lib/python*/os.py."""
    import glob

    if not re.fullmatch(r"python[0-9.]*", os.path.basename(real)) or not os.access(real, os.X_OK):
        return None
    prefix = os.path.dirname(os.path.dirname(real))
    return prefix if glob.glob(os.path.join(glob.escape(prefix), "lib", "python*", "os.py")) else None


def _shebang(path: str) -> str | None:
    """The interpreter a `#!` script names, or None."""
    try:
        with open(path, "rb") as f:
            head = f.read(256)
    except OSError:
        return None
    if not head.startswith(b"#!"):
        return None
    words = head[2:].split(b"\n", 1)[0].split()
    return os.fsdecode(words[0]) if words and words[0].startswith(b"/") else None


def _program_trees(exe: str, seen: set[str], depth: int = 0, untrusted: bool = False) -> list[str]:
    """The program's file, a script's interpreter, a Python's prefix and venv, a pyenv root;
    nothing for a program in seen (its trees are known), which it joins. untrusted: the
    program lies in a handed directory (host_trees_for): only a Python installation it
    leads to, checked."""
    if exe in seen:
        return []
    seen.add(exe)
    real = os.path.realpath(exe)
    if untrusted:
        interpreter = _shebang(real)
        if interpreter is not None and depth < 4:
            return _program_trees(interpreter, seen, depth + 1, untrusted=True)
        prefix = _python_installation(real)
        if prefix is None or _guarded(prefix):
            return []  # what it names is the run's to have chosen: nothing of the host
        return [real, prefix]
    trees = [exe, real]
    shims = os.path.dirname(exe)
    if os.path.basename(shims) == "shims" and os.path.isfile(
            os.path.join(os.path.dirname(shims), "libexec", "pyenv")):
        trees.append(os.path.dirname(shims))  # the shim runs pyenv, which picks a version there
    interpreter = _shebang(real)
    if interpreter is not None and depth < 4:
        trees += _program_trees(interpreter, seen, depth + 1)
    if os.path.basename(real).startswith("python"):
        for candidate in (os.path.dirname(os.path.dirname(real)), os.path.dirname(os.path.dirname(exe))):
            if _guarded(candidate):
                continue
            if candidate == os.path.dirname(os.path.dirname(exe)) and not os.path.exists(
                    os.path.join(candidate, "pyvenv.cfg")):
                continue
            trees.append(candidate)
    return trees


def run_brokered(argv: Sequence[str], ns_fd: int, cwd_fd: int, cwd_path: str, env: dict[str, str],
                 ro_host: Iterable[str] = (), passthrough: bool = True) -> int:
    """Run an unmodified program whose every path goes through the broker; its exit code.

    The calling process is the broker until the program exits; SIGINT,
    SIGTERM and SIGHUP it receives meanwhile go on to the program's process
    group (it runs in a session of its own).

    Args:
        argv: the program and its arguments (argv[0] looked up on env's PATH).
        ns_fd: the namespace capability its absolute paths resolve in (stays the caller's).
        cwd_fd: the directory capability that is its cwd (stays the caller's).
        cwd_path: what getcwd says for it.
        env: its environment (REDOXCAP_NS_FD and friends are added for rt programs).
        ro_host: host paths served read-only besides hostfs.DEFAULT_TREES.
        passthrough: hand it host fds for regular files (native reads and writes).

    Returns:
        Its exit status (128 + N when killed by signal N); 126 when it could
        not be started (the reason is printed on stderr).

    Raises:
        Unavailable: this kernel cannot broker a program.
    """
    program = start_brokered(argv, ns_fd, cwd_fd, cwd_path, env, ro_host, passthrough)
    return exits.wait_forwarding_signals(program, group=True)


def start_brokered(argv: Sequence[str], ns_fd: int, cwd_fd: int, cwd_path: str,
                   env: dict[str, str], ro_host: Iterable[str] = (),
                   passthrough: bool = True,
                   trace: Callable[[dict], None] | None = None,
                   mounts: Sequence[tuple[Any, int] | tuple[Any, int, str]] = (),
                   net: dict | None = None,
                   pass_fds: Sequence[int] = (),
                   directfs_grant: int | None = None,
                   meanwhile: Callable[[int], None] | None = None,
                   starter: Starter | None = None,
                   clones: tuple[int, int, int | None, int | None] | None = None,
                   cwd_host: HostDirectory | None = None,
                   ns_roots: NamespaceRoots | None = None) -> BrokeredProgram:
    """Start an unmodified program under the broker; serve it by waiting on what this returns.

    The arguments are run_brokered's; ns_fd and cwd_fd stay the caller's (the
    broker works on clones of its own, so the caller may close them at once).
    trace, when given, is called with one record per brokered syscall as it is
    answered (t, pid (the thread), op, about (its path), result (an errno name
    for a refusal), ms): `run --trace` prints them (redoxcap/trace.py).
    mounts are the directories handed over at paths of their own
    (redoxcap.hostdirs.HostDir, a capability for its root, owned from the call on, whatever
    happens, as clones are, and optionally the scheme's name, which its fpath answers start
    with: asked when not given):
    absolute paths beneath one go to it, and programs in one the kernel
    reaches at that path may be executed (Landlock grants read and execute
    beneath it); when cwd_path is in one, the program's kernel cwd is there
    too. net holds the grants its TCP and UDP sockets are bound, connected and sent within.
    pass_fds are fds of the caller's the program inherits besides 0-2; it gets no other.
    directfs_grant (the system's, which stays the caller's; taken only once the program
    runs, and never given to it) lets the broker look paths up natively beneath the cwd
    and the handed directories where their file schemes allow passthrough
    (calls/native.py). meanwhile, when given, is called with the program's pid while the
    program confines itself, once what answers its calls is ready: work the caller has left
    for then (a thread to start, a note to send) keeps none of the program's calls waiting,
    as it would once the program runs (execve itself is the broker's). starter, a fork made
    ahead to become the program (launcher.Starter; the caller's to close, which does nothing
    once it is used), saves forking this process on the program's way; without one, or where
    it cannot take the request, this process forks. clones (owned from the call on, whatever
    happens), made ahead (redoxcap.run.Prepared), are the four clones this makes otherwise:
    ns_fd's for the broker and the program, then cwd_fd's for the broker and the program
    (these two None where the cwd is not the one they were made of: made here).
    cwd_host (owned from the call on, whatever happens), asked ahead with directfs_grant, is
    the host directory behind the broker's clone of cwd_fd (calls/native.py), which
    the broker asks for otherwise while the program confines itself. ns_roots (owned from
    the call on, whatever happens), taken ahead on clones' first, are the roots of the
    namespace's entries it keeps (wire/roots.py), asked as the broker's warm-up would.

    Returns:
        The running program (`wait()` is the broker's loop; Popen's conventions).

    Raises:
        Unavailable: this kernel cannot broker a program.
    """
    opened: list[int] = [*(fd for fd in clones or () if fd is not None),
                         *(root for _, root, *_ in mounts)]
    try:
        reason = available()
        if reason is not None:
            raise Unavailable(errno.ENOSYS, reason)
        machine = linux.machine()
        assert machine is not None
    except BaseException:
        for fd in opened:
            _close(fd)
        if cwd_host is not None:
            cwd_host.close()
        if ns_roots is not None:
            ns_roots.clear()
        raise
    hosts = None
    try:
        broker_ns, target_ns, broker_cwd, target_cwd = clones or (None, None, None, None)
        if broker_ns is None:
            broker_ns = call_fd(ns_fd, P.CLONE)
            opened.append(broker_ns)
        handed = []
        for directory, root, *name in mounts:
            # a name given saves asking the daemon, which may not have started yet
            scheme = name[0] if name else call_value(root, P.FPATH, kind=str).removeprefix("/scheme/")
            handed.append(Mount(directory.visible, root, directory.path, directory.executable, scheme))
        kernel_cwd = next((cwd_path for m in handed
                           if m.executable and m.holds(cwd_path)), None)
        if broker_cwd is None:
            broker_cwd = call_fd(cwd_fd, P.CLONE)
            opened.append(broker_cwd)
        if target_ns is None:
            target_ns = call_fd(ns_fd, P.CLONE)
            opened.append(target_ns)
        if target_cwd is None:
            target_cwd = call_fd(cwd_fd, P.CLONE)
            opened.append(target_cwd)
        env = dict(env, **{ENV_NS: str(target_ns), ENV_CWD: str(target_cwd), ENV_CWD_PATH: cwd_path})
        udp = SocketGrants(net).udp  # the filter lets UDP be made only where it is granted
        empty = None
        try:
            keep = [target_ns, target_cwd, *pass_fds]
            ours = None
            if starter is not None:  # (its cwd is a removed directory already)
                try:
                    pid, ours = starter.start(argv, env, kernel_cwd, keep, udp)
                except OSError:
                    pass  # it is gone, or the request is too big for it: we fork
            # the host trees are found while the starter takes the run on (waking it is
            # slow on an idle core), and sent to it for its Landlock rules
            hosts = _host_trees(argv, env, ro_host, mounts)
            read_paths = hosts.trees + [m.path for m in handed if m.executable]
            if ours is not None:
                try:
                    give_read_paths(ours, read_paths)
                except OSError as exc:  # it is gone (its status says why), or they are too
                    if exc.errno == errno.E2BIG:  # many for one message: we fork
                        ours.close()  # (it exits at our EOF)
                        os.waitpid(pid, 0)
                        ours = None
            if ours is None:
                empty = tempfile.mkdtemp(prefix="redoxcap-empty-")
                ours, theirs = socket.socketpair(socket.AF_UNIX, socket.SOCK_SEQPACKET)
                parent = os.getpid()
                pid = os.fork()
                if pid == 0:  # the child: never returns
                    ours.close()
                    exec_target(argv, env, theirs, parent, kernel_cwd or empty, read_paths, keep,
                                udp=udp)
                theirs.close()
            # what answers the program's calls is made while it confines itself (on another
            # core), not while its first call waits
            opened.remove(broker_cwd)  # _answering's now, as cwd_host is
            ahead, cwd_host = cwd_host, None
            try:
                processes, syscalls = _answering(machine, broker_ns, broker_cwd, cwd_path,
                                                 kernel_cwd, hosts, passthrough, handed, net,
                                                 directfs_grant, ahead)
            except BaseException:
                ours.close()  # the program, waiting for the broker to take its listener, ends
                raise
            if ns_roots is not None:
                syscalls.program.locator.adopt_roots(ns_roots)
                ns_roots = None
            listener = None
            try:
                with ours:
                    syscalls.program.locator.warm(processes.initial)  # meanwhile too
                    if meanwhile is not None:
                        meanwhile(pid)
                    listener = _receive_listener(ours, pid)
            except BaseException:
                # it may have said where its listener is, and wait in its exec for this broker
                os.kill(pid, signal.SIGKILL)
                os.waitpid(pid, 0)
                raise
            finally:
                if listener is None:
                    syscalls.close()
                    processes.close()
        finally:
            if empty is not None:  # the program's kernel cwd is a removed directory: no lookup
                os.rmdir(empty)    # works there
        for fd in (target_ns, target_cwd):  # the program's own copies: ours go
            opened.remove(fd)
            _close(fd)
    except BaseException:
        for fd in opened:
            _close(fd)
        if hosts is not None:
            hosts.close()
        if cwd_host is not None:
            cwd_host.close()
        if ns_roots is not None:
            ns_roots.clear()
        raise
    state = None if listener is None else (listener, processes, syscalls)
    return BrokeredProgram(pid, state, hosts, opened, trace)


def _host_trees(argv: Sequence[str], env: dict[str, str], ro_host: Iterable[str],
                mounts: Sequence[tuple[Any, ...]]) -> hostfs.HostTrees:
    """The host trees of the run (host_trees_for), but those inside a handed directory (a venv
    in the project), which that directory serves."""
    handed = [d.path for d, *_ in mounts]
    executable = [d.path for d, *_ in mounts if d.executable]
    return hostfs.HostTrees((t for t in host_trees_for(argv, env, ro_host, handed)
                             if not any(_holds(d, os.path.abspath(t)) for d in executable)),
                            [d.visible for d, *_ in mounts])


def _answering(machine: str, broker_ns: int, broker_cwd: int, cwd_path: str,
               kernel_cwd: str | None, hosts: hostfs.HostTrees, passthrough: bool,
               handed: list[Mount], net: dict | None, directfs_grant: int | None,
               cwd_host: HostDirectory | None) -> tuple[Processes, Syscalls]:
    """The program's processes (owning broker_cwd and cwd_host, its host directory if asked
    ahead, closed here if this fails; `run` opened it before the program ran, so its scheme
    may be asked for native lookups) and the handler table."""
    try:
        cwd = Directory(broker_cwd, cwd_path, False, trusted=True)
        if cwd_host is not None and passthrough:
            cwd.native, cwd.native_asked, cwd_host = cwd_host, True, None
        processes = Processes(cwd, kernel_cwd)
    except BaseException:
        _close(broker_cwd)
        if cwd_host is not None:
            cwd_host.close()
        raise
    if cwd_host is not None:  # no native lookups (the grant is let go with it too)
        cwd_host.close()
    try:
        grant = os.dup(directfs_grant) if directfs_grant is not None else None
        return processes, Syscalls(machine, broker_ns, hosts, processes, passthrough, handed, net,
                                   directfs_grant=grant)
    except BaseException:
        processes.close()
        raise


class BrokeredProgram:
    """A program started under the broker, shaped like subprocess.Popen for who waits on it.

    `wait()` is where the broker serves it: it answers its calls (and its
    children's) until it exits, then reaps it and releases everything.
    """

    def __init__(self, pid: int, state: tuple[Listener, Processes, Syscalls] | None,
                 hosts: hostfs.HostTrees, opened: list[int], trace: Callable[[dict], None] | None) -> None:
        self.pid = pid
        self.returncode: int | None = None
        self._state = state  # None: the child failed before it handed over its listener
        self._hosts = hosts
        self._opened = opened  # the broker's namespace clone
        self._trace = trace

    def poll(self) -> int | None:
        return self.returncode

    def send_signal(self, signum: int) -> None:
        if self.returncode is None:
            os.kill(self.pid, signum)

    def kill(self) -> None:
        self.send_signal(signal.SIGKILL)

    def wait(self) -> int:
        """Serve the program until it exits; its status as Popen.returncode (-N: signal N)."""
        if self.returncode is not None:
            return self.returncode
        pidfd = os.pidfd_open(self.pid)
        try:
            if self._state is not None:
                listener, processes, syscalls = self._state
                listener.sync_wakeups()
                try:
                    Broker(listener, syscalls, processes, self._trace).serve(pidfd)
                finally:
                    listener.close()  # from here on, a call of a process left behind is ENOSYS
                    processes.close()
                    syscalls.close()
                    syscalls.pumps.join(PUMP_GRACE)  # routed writes reach their file
            _, status = os.waitpid(self.pid, 0)
        except BaseException:
            os.kill(self.pid, signal.SIGKILL)
            os.waitpid(self.pid, 0)
            self.returncode = -signal.SIGKILL
            raise
        finally:
            os.close(pidfd)
            self._release()
        if os.WIFSIGNALED(status):
            self.returncode = -os.WTERMSIG(status)
        else:
            code = os.WEXITSTATUS(status)
            self.returncode = code if self._state is not None or code else EXIT_CANNOT_RUN
        return self.returncode

    def _release(self) -> None:
        for fd in self._opened:
            _close(fd)
        self._opened = []
        self._hosts.close()


def _close(fd: int) -> None:
    forget(fd)
    os.close(fd)


def _receive_listener(sock: socket.socket, pid: int) -> Listener | None:
    """The listener of the child pid, taken from it (pidfd_getfd) when it says which fd it is
    (it goes on to exec the program, a call that waits for this broker), or None when it
    exited first (its status says why)."""
    data = sock.recv(16)
    if len(data) != 5 or data[:1] != b"L":
        return None
    pidfd = os.pidfd_open(pid)
    try:
        return Listener(linux.pidfd_getfd(pidfd, int.from_bytes(data[1:], "little")))
    finally:
        os.close(pidfd)
