"""The config file: every key and type is checked, so a typo cannot weaken a grant."""

from __future__ import annotations

from pathlib import Path

import pytest

from redoxcap import control
from redoxcap.config import BUILTIN_SCHEMES, ConfigError, Mount, load
from redoxcap.exits import EXIT_USAGE
from redoxcap.testing import redoxcap


def write(tmp_path: Path, text: str) -> Path:
    path = tmp_path / "redoxcap.toml"
    path.write_text(text)
    return path


@pytest.fixture
def photos(tmp_path: Path) -> Path:
    (tmp_path / "photos").mkdir()
    return tmp_path / "photos"


def test_a_valid_file_sets_root_schemes_and_mounts(tmp_path, photos):
    (tmp_path / "music").mkdir()
    cfg = load(write(tmp_path, f'root = "{tmp_path / "root"}"\nschemes = ["file", "log", "file"]\n'
                               f'[mount.photos]\npath = "{photos}"\nread_only = true\n'
                               f'[mount.music]\npath = "{tmp_path / "music"}"\n'))
    assert cfg.root == tmp_path / "root"
    assert cfg.schemes == ["file", "log"]
    assert cfg.mounts == [Mount("photos", photos, True), Mount("music", tmp_path / "music", False)]


def test_no_file_and_an_empty_file_mean_the_defaults(tmp_path):
    for cfg in (load(None), load(write(tmp_path, "# nothing\n"))):
        assert cfg.root is None and cfg.schemes == list(BUILTIN_SCHEMES) and cfg.mounts == []


MOUNT = '[mount.photos]\npath = "{photos}"\n'


@pytest.mark.parametrize(("text", "message"), [
    # unknown keys, in every table
    ('roots = "/srv"\n', "unknown key 'roots' (known: mount, root, scheme, schemes)"),
    (MOUNT + "readonly = true\n", "[mount.photos]: unknown key 'readonly' (known: keep, passthrough, path, read_only)"),
    (MOUNT + "read-only = true\n", "[mount.photos]: unknown key 'read-only' (known: keep, passthrough, path, read_only)"),
    (MOUNT + 'READ_ONLY = true\n', "[mount.photos]: unknown key 'READ_ONLY'"),
    (MOUNT + '"read\\u202eonly" = true\n', "[mount.photos]: unknown key 'read\\u202eonly'"),
    # read_only is a boolean, not whatever is truthy or falsy
    (MOUNT + 'read_only = "false"\n',
     "[mount.photos]: read_only must be a boolean (true or false), not a string ('false')"),
    (MOUNT + 'read_only = "true"\n', "read_only must be a boolean (true or false), not a string"),
    (MOUNT + "read_only = 0\n", "read_only must be a boolean (true or false), not an integer (0)"),
    (MOUNT + "read_only = 1.0\n", "read_only must be a boolean (true or false), not a float"),
    (MOUNT + "read_only = []\n", "read_only must be a boolean (true or false), not an array"),
    (MOUNT + "read_only = {}\n", "read_only must be a boolean (true or false), not a table"),
    (MOUNT + "read_only = 1979-05-27\n", "read_only must be a boolean (true or false), not a date"),
    # path and root are non-empty strings
    ("[mount.photos]\nread_only = true\n", "[mount.photos]: missing key 'path'"),
    ("[mount.photos]\npath = 5\n", "[mount.photos]: path must be a string, not an integer (5)"),
    ('[mount.photos]\npath = ["/a"]\n', "[mount.photos]: path must be a string, not an array"),
    ('[mount.photos]\npath = ""\n', "[mount.photos]: path must not be empty"),
    ("root = 3\n", "root must be a string, not an integer (3)"),
    ("root = true\n", "root must be a string, not a boolean (True)"),
    ('root = ""\n', "root must not be empty"),
    # schemes is a list of built-in names
    ('schemes = "file"\n', "schemes must be a list of strings, not a string ('file')"),
    ('schemes = ["file", 3]\n', "schemes[1] must be a string, not an integer (3)"),
    ('schemes = ["file", "flie"]\n', "schemes: unknown scheme 'flie' (built-ins: file, "),
    # mount is a table of tables
    ("mount = 3\n", "mount must be a table of [mount.NAME] tables, not an integer"),
    ('mount = "photos"\n', "mount must be a table of [mount.NAME] tables, not a string"),
    ('[mount]\nphotos = "/home/me/photos"\n',
     'mount.photos must be a table ([mount.photos] with path = "HOSTDIR"), not a string'),
    ('[mount]\n"a b" = 1\n', 'mount."a b" must be a table'),
    # mount names are scheme names that are not built-ins
    ('[mount."a\\nb"]\npath = "{photos}"\n', "mount name 'a\\nb': use letters, digits"),
    ('[mount."a b"]\npath = "{photos}"\n', "mount name 'a b': use letters, digits"),
    ('[mount."a:b"]\npath = "{photos}"\n', "mount name 'a:b'"),
    ('[mount.file]\npath = "{photos}"\n', "mount name 'file' is a built-in scheme"),
    ('[mount.photos]\npath = "{photos}/missing"\n', "does not exist"),
    # not TOML at all
    ("read_only = \n", "Invalid value"),
])
def test_every_unknown_key_and_wrong_type_is_an_error_naming_it(tmp_path, photos, text, message):
    path = write(tmp_path, text.replace("{photos}", str(photos)))
    with pytest.raises(ConfigError) as exc:
        load(path)
    assert str(exc.value).startswith(f"{path}: ")
    assert message in str(exc.value)
    assert "\n" not in str(exc.value)


def test_a_file_that_is_not_utf8_is_an_error(tmp_path):
    path = tmp_path / "bad.toml"
    path.write_bytes(b'root = "\xff"\n')
    with pytest.raises(ConfigError):
        load(path)


@pytest.mark.parametrize("command", [["up"], ["run", "--no-confine", "--", "true"]])
def test_the_cli_refuses_a_config_typo_in_one_line(tmp_path, photos, command):
    bad = write(tmp_path, f'[mount.photos]\npath = "{photos}"\nreadonly = true\n')
    proc = redoxcap(tmp_path / "state", *command[:1], "--config", str(bad), "--root", str(tmp_path / "root"),
                    *command[1:], check=False, timeout=30)
    assert proc.returncode == EXIT_USAGE
    assert proc.stderr == (f"redoxcap: {bad}: [mount.photos]: unknown key 'readonly' "
                           "(known: keep, passthrough, path, read_only)\n")
    assert not control.is_running(tmp_path / "state")


def test_a_mount_that_keeps_nothing_says_so_to_a_system_booted_elsewhere(tmp_path):
    """keep = false and passthrough = false must reach a background up or a private run,
    which get their config as options."""
    from redoxcap import config, lifecycle

    (tmp_path / "m").mkdir()
    mount = config.parse_mount(f"m={tmp_path / 'm'}:ro:nokeep:nopassthrough")
    assert (mount.read_only, mount.keep, mount.passthrough) == (True, False, False)
    plain = config.parse_mount(f"m={tmp_path / 'm'}")
    assert plain.keep and plain.passthrough
    cfg = config.Config(root=tmp_path, mounts=[mount])
    options = lifecycle.up_options(cfg)
    again = config.parse_mount(options[options.index("--mount") + 1])
    assert (again.read_only, again.keep, again.passthrough) == (True, False, False)
    assert {"--no-keep", "--no-passthrough"} <= set(again.spec().args)
    from_file = load(write(tmp_path, f'[mount.m]\npath = "{tmp_path / "m"}"\npassthrough = false\n'))
    assert from_file.mounts[0].passthrough is False and from_file.mounts[0].keep is True
    with pytest.raises(ConfigError, match="passthrough must be a boolean"):
        load(write(tmp_path, f'[mount.m]\npath = "{tmp_path / "m"}"\npassthrough = "no"\n'))
