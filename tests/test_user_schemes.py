"""User schemes in the config: `[scheme.NAME]` tables start a daemon of the user's own.

Every key and type is checked like the rest of the config; a booted system
runs the daemon, registers it as NAME, lists it in `status` and restarts it
after a SIGKILL under the same name, so clients reach it again.
"""

from __future__ import annotations

import os
import signal
import sys
from pathlib import Path

import pytest

from redoxcap.config import ConfigError, UserScheme, configure, load
from redoxcap.exits import EXIT_BOOT_FAILED
from redoxcap.testing import booted, redoxcap

EXAMPLES = Path(__file__).resolve().parent.parent / "examples"


def write(tmp_path: Path, text: str) -> Path:
    path = tmp_path / "redoxcap.toml"
    path.write_text(text)
    return path


def test_a_module_and_a_command_become_daemon_specs(tmp_path):
    (tmp_path / "daemons").mkdir()
    cfg = load(write(tmp_path, f'''
[scheme.echo]
module = "echo_scheme"
args = ["--prefix", "echo: "]
cwd = "{EXAMPLES}"
env = {{ ECHO_DEBUG = "1", LANG = "C" }}

[scheme.shout]
command = ["{sys.executable}", "echo_scheme.py", "--upper"]
cwd = "{EXAMPLES}"

[scheme.here]
module = "my.package.daemon"
cwd = "daemons"
'''))
    echo, shout, here = cfg.user_schemes
    assert echo == UserScheme("echo", module="echo_scheme", args=("--prefix", "echo: "),
                              env=(("ECHO_DEBUG", "1"), ("LANG", "C")), cwd=EXAMPLES)
    # -E -P: the system's own modules never come from the user's cwd or PYTHONPATH; the user's
    # module comes from the directory the config names, after everything installed
    argv = echo.spec().argv(7)
    assert argv[:3] == [sys.executable, "-E", "-P"] and argv[3] == "-c"
    assert argv[5:] == [str(EXAMPLES), "echo_scheme", "--channel-fd", "7", "--prefix", "echo: "]
    assert shout.spec().argv(7) == [sys.executable, "echo_scheme.py", "--upper", "--channel-fd", "7"]
    assert shout.spec().cwd == str(EXAMPLES)
    assert here.cwd == tmp_path / "daemons"  # relative to the config file, not to us
    cfg.root = tmp_path  # what configure() sets
    assert [s.name for s in cfg.specs()[-3:]] == ["echo", "shout", "here"]
    # what a background `up` is handed comes back the same
    (tmp_path / "root").mkdir()
    again = configure(None, tmp_path / "root", [], None, [u.to_json() for u in cfg.user_schemes])
    assert again.user_schemes == cfg.user_schemes


def test_a_relative_program_is_found_next_to_the_config(tmp_path):
    (tmp_path / "bin").mkdir()
    prog = tmp_path / "bin" / "daemon"
    prog.write_text("#!/bin/sh\n")
    prog.chmod(0o755)
    cfg = load(write(tmp_path, '[scheme.mine]\ncommand = ["bin/daemon", "-v"]\n'))
    assert cfg.user_schemes[0].command == (str(prog), "-v")


ECHO = '[scheme.echo]\nmodule = "echo_scheme"\n'


@pytest.mark.parametrize(("text", "message"), [
    (ECHO + "modul = 'x'\n", "[scheme.echo]: unknown key 'modul' (known: args, command, cwd, env, module)"),
    (ECHO + "keep = true\n", "[scheme.echo]: unknown key 'keep'"),
    ("[scheme.echo]\n", "[scheme.echo]: give exactly one of module"),
    (ECHO + 'command = ["true"]\n', "[scheme.echo]: give exactly one of module"),
    ("[scheme.echo]\nmodule = 3\n", "[scheme.echo]: module must be a string, not an integer (3)"),
    ("[scheme.echo]\nmodule = ''\n", "[scheme.echo]: module must not be empty"),
    ("[scheme.echo]\nmodule = 'examples/echo_scheme.py'\n", "module must be a dotted module name"),
    ("[scheme.echo]\nmodule = '-c'\n", "module must be a dotted module name"),
    ("[scheme.echo]\ncommand = 'true'\n", "[scheme.echo]: command must be an array of strings, not a string"),
    ("[scheme.echo]\ncommand = []\n", "command must be a non-empty array of non-empty strings"),
    ("[scheme.echo]\ncommand = ['']\n", "command must be a non-empty array of non-empty strings"),
    ("[scheme.echo]\ncommand = ['true', 1]\n", "[scheme.echo]: command[1] must be a string"),
    ("[scheme.echo]\ncommand = ['no-such-program-here']\n", "no-such-program-here is not an executable"),
    ("[scheme.echo]\ncommand = ['true']\nargs = ['-x']\n", "args go with module"),
    (ECHO + "args = '--upper'\n", "[scheme.echo]: args must be an array of strings, not a string"),
    (ECHO + "args = [true]\n", "[scheme.echo]: args[0] must be a string"),
    (ECHO + "env = ['A=1']\n", "[scheme.echo]: env must be a table of strings"),
    (ECHO + "env = { A = 1 }\n", "[scheme.echo]: env.A must be a string, not an integer (1)"),
    (ECHO + 'env = { "A=B" = "1" }\n', "is not a variable name"),
    (ECHO + "cwd = 7\n", "[scheme.echo]: cwd must be a string, not an integer"),
    (ECHO + "cwd = '/no/such/dir'\n", "[scheme.echo]: cwd /no/such/dir is not a directory"),
    ("[scheme.tcp]\nmodule = 'x'\n", "[scheme.tcp]: 'tcp' is a built-in scheme's name"),
    ("[scheme.file]\nmodule = 'x'\n", "'file' is a built-in scheme's name"),
    ("[scheme.nsmgr]\nmodule = 'x'\n", "'nsmgr' is a built-in scheme's name"),
    ('[scheme."a:b"]\nmodule = "x"\n', 'scheme names are non-empty printable ASCII'),
    ('[scheme."a/b"]\nmodule = "x"\n', 'scheme names are non-empty printable ASCII'),
    ('[scheme.""]\nmodule = "x"\n', 'scheme names are non-empty printable ASCII'),
    ("scheme = 3\n", "scheme must be a table of [scheme.NAME] tables, not an integer"),
    ("[scheme]\necho = 'echo_scheme'\n", "scheme.echo must be a table"),
])
def test_a_bad_scheme_table_is_an_error_naming_it(tmp_path, text, message):
    with pytest.raises(ConfigError) as info:
        load(write(tmp_path, text))
    assert message in str(info.value) and str(info.value).startswith(str(tmp_path))


def test_a_user_scheme_cannot_take_a_mount_name(tmp_path):
    (tmp_path / "photos").mkdir()
    with pytest.raises(ConfigError, match="'photos' is also a mount"):
        load(write(tmp_path, f'[mount.photos]\npath = "{tmp_path / "photos"}"\n'
                             '[scheme.photos]\nmodule = "x"\n'))
    path = write(tmp_path, '[scheme.photos]\nmodule = "x"\n')
    with pytest.raises(ConfigError, match="'photos' is also a mount"):
        configure(path, tmp_path / "root", [f"photos={tmp_path / 'photos'}"])


# A client that writes to an echo of each scheme and reads it all back.
CLIENT = """
import rt
for name in ("echo", "shout"):
    fd = rt.open(f"/scheme/{name}/hi", rt.O_RDWR)
    rt.write(fd, b"and more")
    print(name, repr(rt.read(fd, 100)))
    rt.close(fd)
"""
EXPECTED = "echo b'echo: hi\\nand more'\nshout b'HI\\nAND MORE'\n"


def test_user_scheme_daemons_serve_clients_and_come_back_after_sigkill(tmp_path):
    config = write(tmp_path, f'''
[scheme.echo]
module = "echo_scheme"
args = ["--prefix", "echo: "]
cwd = "{EXAMPLES}"

[scheme.shout]
command = ["{sys.executable}", "echo_scheme.py", "--upper"]
cwd = "{EXAMPLES}"
''')
    with booted(tmp_path, "--config", str(config)) as system:
        assert system.python(CLIENT).stdout == EXPECTED
        before = {d["name"]: d for d in system.status()["daemons"]}
        assert before["echo"]["pid"] and before["shout"]["pid"]
        assert before["shout"]["command"] == [sys.executable, "echo_scheme.py", "--upper"]
        table = system.cli("status").stdout
        assert any(line.split()[:1] == ["echo"] for line in table.splitlines()), table
        os.kill(before["echo"]["pid"], signal.SIGKILL)
        # the router keeps the root for the next daemon: requests wait for it, nothing to poll
        assert system.python(CLIENT).stdout == EXPECTED
        echo = system.daemon("echo")
        assert echo["pid"] not in (None, before["echo"]["pid"]) and echo["restarts"] == 1
        assert system.daemon("shout")["restarts"] == 0


@pytest.mark.parametrize("table, error", [
    ('module = "no_such_daemon_module"', "No module named no_such_daemon_module"),
    ('command = ["sh", "-c", "echo no device here >&2; exit 3"]', "no device here"),
], ids=["module", "command"])
@pytest.mark.parametrize("boot", [("up", "--detach"), ("run",)], ids=["up", "run"])
def test_a_daemon_that_cannot_start_ends_the_boot_in_a_few_lines_naming_it(tmp_path, table, error,
                                                                           boot):
    config = write(tmp_path, f"[scheme.broken]\n{table}\n")
    (tmp_path / "root").mkdir()
    command = ("--", sys.executable, "-c", "print('ran')") if boot == ("run",) else ()
    proc = redoxcap(tmp_path / "state", *boot, "--config", str(config), "--root",
                    str(tmp_path / "root"), *command, check=False)
    assert proc.returncode == EXIT_BOOT_FAILED, proc.stderr
    assert "scheme broken" in proc.stderr and error in proc.stderr, proc.stderr
    assert "Traceback" not in proc.stderr and "restarting" not in proc.stderr, proc.stderr
    assert len(proc.stderr.splitlines()) <= 8, proc.stderr
    assert proc.stdout == ""
    state = tmp_path / "state"  # `run` booted a private system elsewhere
    assert not state.exists() or [p.name for p in state.iterdir()] == ["supervisor.log"]


def test_the_readme_example_config_loads():
    echo, shout = load(EXAMPLES / "echo.toml").user_schemes
    assert (echo.module, echo.cwd, shout.cwd) == ("echo_scheme", EXAMPLES, EXAMPLES)
