"""pytest plugin: boot real redoxcap systems and test your own clients and schemes in them.

Installed with the package as the `pytest11` entry point `redoxcap`, so a
test file needs no import to use the fixtures:

- `redoxcap_system`: a private system (kernel, nsmgr and every scheme daemon)
  for one test, in a fresh state directory and file root under `tmp_path`.
- `redoxcap_client`: the same, with the test process's rt holding that
  system's root namespace and `/` as its cwd, so the test can call rt.
- `redoxcap_module_system`: one system shared by every test of a module.
  Cheaper (a boot takes seconds), for tests that leave nothing behind.
- `redoxcap_module_client`: `redoxcap_client` on the module's system.
- `redoxcap_isolated_client`: a client of the module's system that sees a
  fresh, empty directory of its own as the `file` scheme (a namespace forked
  from the root one), so tests sharing a system cannot see each other's files
  or names.

Every system is stopped with `redoxcap down` when its fixture ends, whatever
the test did, and the test fails if a process survived or a daemon logged a
traceback. The helpers are public too, importable from here, each in the
module of its concern:

- system.py: `System` (with `run`, `python`, `start`, `cli`, `status`,
  `daemon` and `log`), `booted()` for a system with options of its own,
  `shut_down()`, `redoxcap()` and `REDOXCAP` (the real CLI);
- clients.py: `installed()`, `isolated()` (the test process as an rt
  client), `namespace_with_file()`, `holdings()`, `settled()` and `no_new_traceback()` (what a test
  left behind), `spare_prepared()` (a baseline that counts the spare runner's share),
  `file_daemons()` (the daemons forked for runs' directories, or the spare ones);
- waiting.py: `wait_for()`, `wait_exited()`, `finish()` for a background
  client, `pid_alive()`;
- net.py: `free_port()`, `nobody_listens()`;
- plugin.py: the fixtures and the pytest hook (the entry point).

Example::

    def test_my_client_writes_its_report(redoxcap_system):
        redoxcap_system.run("--", sys.executable, "my_client.py")
        assert (redoxcap_system.root / "report.txt").read_text() == "ok\\n"
"""

from redoxcap.testing.clients import (
    file_daemons,
    holdings,
    installed,
    isolated,
    namespace_with_file,
    no_new_traceback,
    settled,
    spare_prepared,
)
from redoxcap.testing.net import free_port, nobody_listens
from redoxcap.testing.system import (
    REDOXCAP,
    StatusTimeoutWarning,
    System,
    booted,
    redoxcap,
    shut_down,
)
from redoxcap.testing.waiting import finish, pid_alive, wait_exited, wait_for

__all__ = [
    "REDOXCAP",
    "StatusTimeoutWarning",
    "System",
    "booted",
    "file_daemons",
    "finish",
    "free_port",
    "holdings",
    "installed",
    "isolated",
    "namespace_with_file",
    "no_new_traceback",
    "nobody_listens",
    "pid_alive",
    "redoxcap",
    "settled",
    "shut_down",
    "spare_prepared",
    "wait_exited",
    "wait_for",
]
