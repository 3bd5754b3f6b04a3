"""Testing client programs of your own against a real redoxcap system, with plain pytest.

Installing redoxcap installs its pytest plugin, so these fixtures need no
import and no conftest.py: `pytest examples/test_my_client.py`. Each system
is stopped when its fixture ends, and the test fails if a process survived
or a daemon logged a traceback. See docs/testing.md.
"""

import sys
from pathlib import Path

import rt
from redoxcap.testing import booted

EXAMPLES = Path(__file__).resolve().parent


def test_hello_writes_and_reads_back_its_file(redoxcap_system):
    """A system of the test's own: its file root is a fresh directory on the host."""
    result = redoxcap_system.run("--", sys.executable, str(EXAMPLES / "hello.py"))
    assert "read back: Hello from a capability!" in result.stdout
    assert (redoxcap_system.root / "hello/hello.txt").read_text() == "Hello from a capability!\n"


def test_a_client_sees_only_the_schemes_it_was_given(redoxcap_module_system):
    """One system for the whole module: cheaper, for tests that change nothing in it."""
    result = redoxcap_module_system.python("import rt; print(rt.schemes())", "--ns", "file,zero")
    assert result.stdout.strip() == "['file', 'zero']"


def test_a_tcp_server_and_its_client(redoxcap_module_system):
    """A client in the background: `start` returns a Popen that the fixture kills if need be."""
    server = redoxcap_module_system.start("run", "--", sys.executable, str(EXAMPLES / "tcp_echo.py"),
                                          "server")
    port = server.stdout.readline().split()[-1]  # "listening on PORT"
    result = redoxcap_module_system.run("--", sys.executable, str(EXAMPLES / "tcp_echo.py"), "client",
                                        port, "ping")
    assert result.stdout.strip() == "echoed: ping"
    server.communicate(timeout=30)


def test_calling_rt_from_the_test_itself(redoxcap_isolated_client):
    """The test process is the client: `/` is a fresh directory of its own on the module's system."""
    with rt.open_file("/notes.txt", "w") as f:
        f.write("written through the file scheme\n")
    assert rt.listdir("/") == ["notes.txt"]
    assert (redoxcap_isolated_client.root / "notes.txt").read_text() == "written through the file scheme\n"


def test_a_system_with_options_of_its_own(tmp_path):
    """`booted` takes `redoxcap up` options, and stops the system however the block ends."""
    docs = tmp_path / "docs"
    docs.mkdir()
    (docs / "readme.txt").write_text("read me")
    with booted(tmp_path, "--mount", f"docs={docs}:ro") as system:
        result = system.python("import rt; print(rt.open_file('/scheme/docs/readme.txt').read())")
        assert result.stdout.strip() == "read me"
        assert system.daemon("docs")["state"] == "running"
