"""What a confined program is granted: the interpreter's files, its script, read or write.

The launcher grants read (and execute) beneath :func:`interpreter_read_paths`,
the program's own executable and the script a Python interpreter runs
(:func:`python_script`); write beneath the paths it is given (a private
scratch directory), never execute there. Everything else on the host is out
of reach: the program gets what it needs through its capabilities.
"""

from __future__ import annotations

import functools
import os
import re
import sys
from collections.abc import Sequence

from redoxcap.sandbox import landlock as ll

GRANT_READ = ll.ACCESS_FS_EXECUTE | ll.ACCESS_FS_READ_FILE | ll.ACCESS_FS_READ_DIR
# No EXECUTE on writable trees (W^X); no MAKE_CHAR/MAKE_BLOCK or IOCTL_DEV either.
GRANT_WRITE = (
    ll.ACCESS_FS_READ_FILE
    | ll.ACCESS_FS_READ_DIR
    | ll.ACCESS_FS_WRITE_FILE
    | ll.ACCESS_FS_TRUNCATE
    | ll.ACCESS_FS_REMOVE_DIR
    | ll.ACCESS_FS_REMOVE_FILE
    | ll.ACCESS_FS_MAKE_DIR
    | ll.ACCESS_FS_MAKE_REG
    | ll.ACCESS_FS_MAKE_SOCK
    | ll.ACCESS_FS_MAKE_FIFO
    | ll.ACCESS_FS_MAKE_SYM
    | ll.ACCESS_FS_REFER
)

# Trees that are never granted wholesale, even if they show up on sys.path.
_TOO_BROAD = frozenset({"/", "/etc", "/root", "/home", "/tmp", "/var", "/var/tmp", "/dev", "/proc"})
_SYSTEM_READ_PATHS = (
    "/usr",
    "/lib",
    "/lib64",
    "/bin",
    "/etc/ld.so.cache",
    "/etc/localtime",
    "/dev/null",
    "/dev/urandom",
)
# The files of /proc/PID a program may read of its own process (its pid is the launcher's, as
# exec keeps it): not net/ (every socket of the host), mountinfo or mounts (the host's mounts),
# task/ (each thread's net/ and mountinfo again), nor any other process.
PROC_SELF_FILES = ("fd", "fdinfo", "stat", "statm", "status", "cmdline", "comm", "environ",
                   "limits", "maps", "auxv")
# what a program written with rt may import: rt, and redoxcap with its layers (a source
# checkout has those beside redoxcap, an installed wheel inside it)
_PROJECT_PACKAGES = ("rt", "redoxcap", "redoxcap.wire", "redoxcap.kernel", "redoxcap.nsmgr",
                     "redoxcap.schemes")


def _find_spec_locations(name: str) -> list[str]:
    """Locations of a top-level package, found without importing it."""
    import importlib.util

    try:
        spec = importlib.util.find_spec(name)
    except (ImportError, ValueError):
        return []
    if spec is None:
        return []
    if spec.submodule_search_locations:
        # a package's own directories only: in a source checkout, redoxcap's __path__ also
        # holds the checkout's top (where its layers lie), which is no package and holds
        # everything else of the checkout (its .git, a venv, a developer's .env)
        return [str(p) for p in spec.submodule_search_locations
                if os.path.isfile(os.path.join(p, "__init__.py"))]
    if spec.origin and os.path.isabs(spec.origin):
        return [spec.origin]
    return []


@functools.cache
def project_package_locations() -> tuple[str, ...]:
    """The directories of redoxcap's own top-level packages (rt, wire, ...), found without
    importing them: what a program written with rt imports. Found once per process (and
    once for all runs in the fork server: a millisecond of every brokered run)."""
    return tuple(location for name in _PROJECT_PACKAGES for location in _find_spec_locations(name))


def _holds(directory: str, path: str) -> bool:
    """Whether path is directory or lies beneath it (both real paths)."""
    return path == directory or path.startswith(directory.rstrip(os.sep) + os.sep)


def _installed_roots() -> list[str]:
    """Real paths of the trees that hold the interpreter and installed packages."""
    import site

    roots = [sys.prefix, sys.base_prefix, sys.exec_prefix, sys.base_exec_prefix]
    roots += [p for p in _SYSTEM_READ_PATHS if p in ("/usr", "/lib", "/lib64", "/bin")]
    if site.ENABLE_USER_SITE:
        roots.append(site.getusersitepackages())
    return [os.path.realpath(r) for r in roots if r]


def interpreter_read_paths() -> list[str]:
    """Paths this Python interpreter needs to start and import installed packages.

    Includes the executable, the prefixes, the standard library, the ``sys.path``
    entries that lie beneath a prefix, the user site-packages or a system
    directory, a few system paths (``/usr``, ``/lib``, ``/lib64``, ``/bin``, the
    loader cache, the local time zone, ``/dev/null``, ``/dev/urandom``) and the directories of the project's top-level packages.
    Never included: broad trees such as ``/``, ``/etc``, ``/root``, ``/home`` and
    ``/tmp``; any directory that is or contains the current directory or
    ``$HOME``; ``sys.path`` entries elsewhere (a source checkout, ``PYTHONPATH``
    directories), of which only the project's packages are granted. Of ``/proc``,
    only the :data:`PROC_SELF_FILES` of this process (the program's, after exec).

    Returns:
        A list of absolute paths without duplicates; some may not exist
        (:func:`redoxcap.sandbox.confine` skips those).
    """
    import sysconfig

    guarded: list[str] = []  # what must stay out of reach, with everything beneath
    try:
        guarded.append(os.path.realpath(os.getcwd()))
    except OSError:
        pass
    home = os.path.expanduser("~")
    if home and home != "~":
        guarded.append(os.path.realpath(home))
    roots = _installed_roots()

    out: list[str] = []
    seen: set[str] = set()

    def add(path: str | None, *, check: bool = True) -> None:
        if not path or not os.path.isabs(path):
            return
        path = os.path.normpath(path)
        real = os.path.realpath(path)
        if check and (
            path in _TOO_BROAD or real in _TOO_BROAD or any(_holds(real, g) for g in guarded)
        ):
            return
        if path not in seen:
            seen.add(path)
            out.append(path)

    if sys.executable:
        add(sys.executable)
        add(os.path.realpath(sys.executable))
    for prefix in (sys.prefix, sys.base_prefix, sys.exec_prefix, sys.base_exec_prefix):
        add(prefix)
    for key in ("stdlib", "platstdlib", "purelib", "platlib"):
        add(sysconfig.get_path(key))
    add(os.path.dirname(os.__file__))
    for entry in sys.path:
        # "" is the current directory; a checkout or PYTHONPATH entry may hold anything.
        if entry and os.path.exists(entry):
            real = os.path.realpath(entry)
            if any(_holds(root, real) for root in roots):
                add(os.path.abspath(entry))
    for name in _PROJECT_PACKAGES:
        for location in _find_spec_locations(name):
            add(location)
    for path in _SYSTEM_READ_PATHS:
        add(path, check=False)
    for name in PROC_SELF_FILES:
        add(f"/proc/{os.getpid()}/{name}", check=False)
    return out


_PYTHON_NAME = re.compile(r"python(3(\.[0-9]+)?)?")
_PYTHON_FLAGS = frozenset("bBdEhiIOPqRsSuvVx?")  # interpreter options without a value


def python_script(command: Sequence[str]) -> str | None:
    """The script file a Python interpreter command runs, or None.

    ``python [options] script.py args`` runs ``script.py``; ``-c``, ``-m``, ``-``
    (stdin) and other programs run no script file, and their arguments are
    data that the program must reach through its capabilities.

    Args:
        command: an argv whose first element names the program.

    Returns:
        The absolute path of the script when ``command[0]`` is named ``python``,
        ``python3`` or ``python3.X`` and its first argument after the
        interpreter's options is an existing regular file; otherwise None.
    """
    if not command or not _PYTHON_NAME.fullmatch(os.path.basename(command[0])):
        return None
    args = iter(command[1:])
    script = None
    for arg in args:
        if arg == "--":
            script = next(args, None)
            break
        if arg == "--check-hash-based-pycs":
            next(args, None)
            continue
        if arg.startswith("--check-hash-based-pycs="):
            continue
        if arg.startswith("--") or arg == "-":
            return None  # --help, --version ... or a script read from stdin
        if not arg.startswith("-"):
            script = arg
            break
        for i, flag in enumerate(arg[1:], 1):
            if flag in "WX":  # the value is the rest of the argument, or the next one
                if i == len(arg) - 1:
                    next(args, None)
                break
            if flag not in _PYTHON_FLAGS:  # -c, -m or an option Python refuses
                return None
    if script is None or not os.path.isfile(script):
        return None
    return os.path.abspath(script)
