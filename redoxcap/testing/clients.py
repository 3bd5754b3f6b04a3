"""The test process as an rt client of a system, and checks that a test left it as it was."""

from __future__ import annotations

import contextlib
import dataclasses
from collections.abc import Iterable, Iterator

from redoxcap.testing.system import System
from redoxcap.testing.waiting import wait_for


@contextlib.contextmanager
def installed(system: System, namespace: int | None = None) -> Iterator[System]:
    """Make this process an rt client of system for the block: a namespace, and `/` as cwd.

    Args:
        system: The running system.
        namespace: A namespace fd to install, which the block then owns; by
            default the system's root namespace.

    Yields:
        system.
    """
    import rt
    from redoxcap import control

    if namespace is None:
        _, (namespace,) = control.request(system.state_dir, "namespace")
    rt.setup(namespace, None)
    try:
        rt.setup(namespace, rt.open("/", rt.O_DIRECTORY), "/")
        yield system
    finally:
        rt.setup(None, None)

def namespace_with_file(path: str, flags: int = 0, names: Iterable[str] | None = None) -> int:
    """A new namespace in which `file` is the directory at path: a capability-style bind mount.

    Nothing reached through `file` leaves the directory, whatever flags it
    was opened with.

    Args:
        path: The directory, as this process's rt opens it.
        flags: More open flags for it, e.g. `rt.O_RESOLVE_BENEATH`.
        names: The other names of this process's namespace the new one
            holds (None: all of them).

    Returns:
        The namespace fd (all permissions this process's namespace has), the caller's.
    """
    import rt

    box = rt.open(path, rt.O_DIRECTORY | flags)
    try:
        ns = rt.mkns(None if names is None else [n for n in names if n != "file"], perms=rt.PERM_ALL)
        try:
            if names is None:
                rt.unregister(ns, "file")
            rt.register(ns, "file", box)
        except BaseException:
            rt.close(ns)
            raise
    finally:
        rt.close(box)
    return ns


@contextlib.contextmanager
def isolated(system: System, name: str) -> Iterator[System]:
    """Make this process a client of system that sees only a directory of its own as `file`.

    The directory `name` is created in the system's root; the namespace is
    forked from the root one with every name, and its `file` entry replaced
    by that directory (a capability-style bind mount: nothing reached through
    it leaves the directory). Other names (zero, tcp, uds...) are shared.
    `rt.fpath` still answers from the file scheme's own root, so a file `/f`
    shows as `/scheme/file/NAME/f`.

    Args:
        system: The running system.
        name: The directory's name in the system's root; must not exist.

    Yields:
        A view of system whose `root` is the directory.
    """
    (system.root / name).mkdir()
    with installed(system):
        own = namespace_with_file(f"/{name}")
    view = dataclasses.replace(system, root=system.root / name, _background=[])
    try:
        with no_new_traceback(system), installed(view, own):
            yield view
    finally:
        view.stop_background()

def holdings(system: System) -> dict[str, tuple[int, int]]:
    """What the router holds for each scheme: (capabilities, handles), less what is charged
    to the spare runner's account (`status` names it: what the spare prepared for the next
    run, which comes and goes with the runs), so that a count that grew is a test's doing."""
    held = {}
    for d in system.status()["daemons"]:
        if d["name"] == "kernel":
            continue
        caps, handles = d.get("capabilities"), d.get("handles")
        spare_caps, spare_handles = d.get("charged", (0, 0))
        held[d["name"]] = (None if caps is None else caps - spare_caps,
                           None if handles is None else handles - spare_handles)
    return held


def spare_prepared(system: System, timeout: float = 30) -> dict:
    """Run `true` and wait until the system's next spare runner has taken a run's first
    steps (redoxcap.run.Prepared: `status` shows it as `spare`), the state the system comes
    back to after every run; what status says of the spare.

    For a test that counts what the router or the system holds (fds, schemes): counted
    from here, the spare's share is in the count before as after.
    """
    system.run("--", "true")
    return wait_for(lambda: system.status().get("spare"), timeout=timeout)


SPARE_TITLE = "(a spare)"  # what ps shows of a spare file scheme daemon (redoxcap/forkserver.py)


def file_daemons(system: System, spares: bool = False) -> list[tuple[int, str]]:
    """The file scheme daemons the system forked for runs (`--dir`, /tmp), as (pid, command
    line): those serving runs, or (spares) those waiting to."""
    found = []
    for pid in system.status().get("runners", []):
        try:
            with open(f"/proc/{pid}/cmdline", "rb") as f:
                line = " ".join(a.decode(errors="replace") for a in f.read().split(b"\0"))
        except OSError:
            continue  # it ended since status named it
        if "redoxcap.schemes.file" in line and (SPARE_TITLE in line) == spares:
            found.append((pid, line))
    return found


def settled(system: System, before: dict[str, tuple[int, int]], timeout: float = 10) -> None:
    """Wait until the router holds, for every scheme, no more than `before` (from `holdings`).

    Closes reach the router asynchronously, so this waits a moment for them;
    and "no more" rather than "as much", since closes of an earlier test may
    still have been on their way when `before` was taken.

    Raises:
        AssertionError: a scheme still has more capabilities or handles after
            timeout seconds.
    """
    def no_more() -> bool:
        now = holdings(system)
        return all(now.get(name, (0, 0))[0] <= caps and now.get(name, (0, 0))[1] <= handles
                   for name, (caps, handles) in before.items())

    try:
        wait_for(no_more, timeout=timeout)
    except AssertionError:
        raise AssertionError(f"capabilities were left open: (capabilities, handles) per scheme "
                             f"were {before}, are {holdings(system)}") from None

@contextlib.contextmanager
def no_new_traceback(system: System) -> Iterator[None]:
    """Fail if a daemon of system logs a traceback during the block.

    On a system shared by several tests this names the test that caused it;
    `shut_down` checks the whole log only when the system stops.

    Raises:
        AssertionError: a traceback was logged during the block (checked only
            when the block itself succeeded).
    """
    start = len(system.log())
    yield
    logged = system.log()[start:]
    assert "Traceback" not in logged, f"a daemon logged a traceback:\n{logged}"
