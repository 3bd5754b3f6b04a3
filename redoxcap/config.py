"""What a system runs: the built-in schemes, the file root, mounted host directories and
the user's own scheme daemons.

A config file (TOML, `redoxcap up --config FILE`) may say:

    root = "/srv/redoxcap"              # the file scheme's host directory
    schemes = ["file", "null", "tcp"]   # a subset of the built-ins (default: all)

    [mount.photos]                       # /scheme/photos/... serves this host directory
    path = "/home/me/photos"
    read_only = true
    keep = true                          # open handles survive a crash of its daemon (default)
    passthrough = true                   # O_PASSTHROUGH opens get host fds (default)

    [scheme.echo]                        # a scheme daemon of your own, registered as echo
    module = "echo_scheme"               # python -m echo_scheme --channel-fd N ARGS...
    args = ["--prefix", "echo: "]
    cwd = "examples"                     # where it starts (default: the config file's directory)
    env = { ECHO_DEBUG = "1" }           # added to the supervisor's environment

    [scheme.shout]
    command = ["python3", "echo_scheme.py", "--upper"]   # PROGRAM ARGS... --channel-fd N

Every key and type is checked: an unknown key (`readonly` for `read_only`)
or a value of the wrong type (`read_only = "false"`) is a ConfigError naming
the table and the key, never a default that quietly grants more.

Command-line options win over the file: `--root`, and `--mount NAME=HOSTDIR[:ro]`
added to the file's mounts.
"""

from __future__ import annotations

import json
import os
import re
import shutil
import tomllib
from collections.abc import Iterator, Sequence
from dataclasses import dataclass, field, replace
from pathlib import Path

from redoxcap.daemons import SchemeSpec, file_scheme
from redoxcap.wire import protocol as P

# name -> daemon module; "file" is special (it needs the root)
BUILTIN_SCHEMES = {
    "file": "redoxcap.schemes.file",
    "null": "redoxcap.schemes.null",
    "zero": "redoxcap.schemes.zero",
    "rand": "redoxcap.schemes.rand",
    "log": "redoxcap.schemes.log",
    "pipe": "redoxcap.schemes.pipe",
    "tcp": "redoxcap.schemes.tcp",
    "udp": "redoxcap.schemes.udp",
    "uds": "redoxcap.schemes.uds",
}


class ConfigError(ValueError):
    """A configuration that cannot be used; the message is fit for the user."""


@dataclass(frozen=True)
class Mount:
    """A host directory served as its own scheme NAME."""

    name: str
    path: Path
    read_only: bool = False
    keep: bool = True  # its open handles survive a crash of its daemon
    passthrough: bool = True  # O_PASSTHROUGH opens of its regular files get host fds

    def spec(self) -> SchemeSpec:
        return file_scheme(str(self.path), self.name, self.read_only, self.keep, self.passthrough)


# Names that are not the user's to give: nsmgr's own is how `restart nsmgr` finds it.
RESERVED_NAMES = frozenset({"nsmgr", "kernel"})


@dataclass(frozen=True)
class UserScheme:
    """A scheme daemon of the user's own, started and restarted like the built-ins.

    Exactly one of module (run as `python -m module --channel-fd N *args`) and
    command (run as `*command --channel-fd N`) is set.
    """

    name: str
    module: str | None = None
    command: tuple[str, ...] = ()
    args: tuple[str, ...] = ()
    env: tuple[tuple[str, str], ...] = ()  # added to the supervisor's environment
    cwd: Path = Path("/")

    def spec(self) -> SchemeSpec:
        return SchemeSpec(self.name, self.module or "", self.args, command=self.command,
                          env=self.env, cwd=str(self.cwd))

    def to_json(self) -> str:
        """The table again, every path absolute: what `up` in another process is given."""
        table: dict[str, object] = {"cwd": str(self.cwd)}
        if self.module is not None:
            table |= {"module": self.module, "args": list(self.args)}
        else:
            table["command"] = list(self.command)
        if self.env:
            table["env"] = dict(self.env)
        return json.dumps({self.name: table})


@dataclass
class Config:
    root: Path | None = None
    schemes: list[str] = field(default_factory=lambda: list(BUILTIN_SCHEMES))
    mounts: list[Mount] = field(default_factory=list)
    user_schemes: list[UserScheme] = field(default_factory=list)

    def specs(self) -> list[SchemeSpec]:
        """The daemons to start, in order; the root must be set."""
        assert self.root is not None
        specs = []
        for name in self.schemes:
            if name == "file":
                specs.append(file_scheme(str(self.root)))
            else:
                specs.append(SchemeSpec(name, BUILTIN_SCHEMES[name]))
        return specs + [m.spec() for m in self.mounts] + [u.spec() for u in self.user_schemes]


def default_root() -> Path:
    """The file scheme's host directory when none is given: $XDG_DATA_HOME/redoxcap/root."""
    base = os.environ.get("XDG_DATA_HOME") or Path.home() / ".local" / "share"
    return Path(base) / "redoxcap" / "root"


def configure(config_file: Path | None, root: Path | None, mounts: Sequence[str],
              scheme_names: str | None = None, user_schemes: Sequence[str] = ()) -> Config:
    """The config file, overridden by command-line options; a root given must exist (the
    default one is made).

    Args:
        config_file: `--config`, or None for the defaults.
        root: `--root`, which wins over the file's (default: :func:`default_root`).
        mounts: `--mount NAME=HOSTDIR[:ro]` values, added to the file's mounts.
        scheme_names: `--schemes`: comma-separated built-ins, which replace the file's.
        user_schemes: `up`'s hidden `--user-scheme` values (:meth:`UserScheme.to_json`:
            how a background `up` gets the file's), added to the file's.

    Returns:
        The configuration to boot.

    Raises:
        ConfigError: the file or an option is unfit (a root or mount directory that does not
            exist), a mount name is given twice, or the default root could not be made.
    """
    cfg = load(config_file)
    cfg.mounts += [parse_mount(m) for m in mounts]
    for text in user_schemes:
        cfg.user_schemes += _user_schemes(_json_table(text), Path("/"))
    names = [m.name for m in cfg.mounts]
    if len(set(names)) != len(names):
        raise ConfigError(f"a mount name is given twice: {names}")
    _check_user_scheme_names(cfg)
    if scheme_names is not None:
        wanted = [n for n in scheme_names.split(",") if n]
        unknown = [n for n in wanted if n not in BUILTIN_SCHEMES]
        if unknown:
            raise ConfigError(f"--schemes: unknown {unknown}; built-ins are {list(BUILTIN_SCHEMES)}")
        cfg.schemes = wanted
    given = root or cfg.root
    cfg.root = (given or default_root()).expanduser().absolute()
    if given is not None:  # a directory named by the user must be there, as a mount's must
        if not cfg.root.is_dir():
            why = "is not a directory" if cfg.root.exists() else "does not exist"
            raise ConfigError(f"--root {cfg.root} {why}")
        return cfg
    try:
        cfg.root.mkdir(parents=True, exist_ok=True)
    except OSError as exc:
        raise ConfigError(f"--root {cfg.root}: cannot make that directory: {exc.strerror}") from None
    return cfg


def parse_mount(text: str) -> Mount:
    """`NAME=HOSTDIR[:ro][:nokeep][:nopassthrough]` -> Mount; the host directory must exist.

    `:ro` serves it read-only; `:nokeep` lets its open handles die with its daemon
    (the config file's `keep = false`); `:nopassthrough` routes every byte of its
    files through the daemon, even for O_PASSTHROUGH opens (`passthrough = false`).
    """
    name, eq, rest = text.partition("=")
    if not eq or not rest:
        raise ConfigError(f"--mount {text!r}: expected {MOUNT_SYNTAX}")
    suffixes = {":ro": False, ":nokeep": False, ":nopassthrough": False}
    while any(rest.endswith(s) for s in suffixes):
        suffix = next(s for s in suffixes if rest.endswith(s))
        suffixes[suffix] = True
        rest = rest[: -len(suffix)]
    return replace(make_mount(name, rest, suffixes[":ro"]), keep=not suffixes[":nokeep"],
                   passthrough=not suffixes[":nopassthrough"])


MOUNT_SYNTAX = "NAME=HOSTDIR[:ro][:nokeep][:nopassthrough]"
MOUNT_NAME = re.compile(r"[A-Za-z0-9][A-Za-z0-9._-]*")


def mount_option_text(m: Mount) -> str:
    """The --mount argument that gives m (parse_mount's inverse)."""
    return (f"{m.name}={m.path}" + (":ro" if m.read_only else "") + ("" if m.keep else ":nokeep")
            + ("" if m.passthrough else ":nopassthrough"))


def make_mount(name: str, path: str, read_only: bool) -> Mount:
    """A Mount of host directory path as scheme name; ConfigError if either is unfit."""
    # Letters, digits, '.', '_' and '-': a mount name ends up in paths, status and the log.
    if not P.valid_scheme_name(name) or not MOUNT_NAME.fullmatch(name):
        raise ConfigError(f"mount name {name!r}: use letters, digits, '.', '_' and '-' "
                          "(starting with a letter or digit)")
    if name in BUILTIN_SCHEMES:
        raise ConfigError(f"mount name {name!r} is a built-in scheme")
    host = Path(path).expanduser().absolute()
    if not host.is_dir():
        why = "is not a directory" if host.exists() else "does not exist"
        raise ConfigError(f"mount {name}: {host} {why}")
    return Mount(name, host, read_only)


ROOT_KEYS = ("root", "schemes", "mount", "scheme")
MOUNT_KEYS = ("path", "read_only", "keep", "passthrough")
USER_SCHEME_KEYS = ("module", "command", "args", "env", "cwd")


def load(path: Path | None) -> Config:
    """Read a config file (None: the defaults).

    Every key and every type is checked, so that a typo cannot weaken a grant
    (`readonly = true` would otherwise leave a mount writable).

    Args:
        path: the TOML file, or None.

    Returns:
        The configuration it describes.

    Raises:
        ConfigError: the file cannot be read or parsed, holds an unknown key or
            a value of the wrong type, or names a scheme or mount badly; the
            message names the file, the table and the key.
    """
    config = Config()
    if path is None:
        return config
    try:
        data = tomllib.loads(path.read_text())
    except (OSError, UnicodeDecodeError, tomllib.TOMLDecodeError) as exc:
        raise ConfigError(f"{path}: {exc}") from None
    try:
        _check_keys(data, ROOT_KEYS)
        if "root" in data:
            config.root = Path(_string(data["root"], "root")).expanduser()
        if "schemes" in data:
            config.schemes = _scheme_names(data["schemes"])
        config.mounts = _mounts(data.get("mount", {}))
        # relative paths in a [scheme.NAME] table are the config file's neighbours
        config.user_schemes = _user_schemes(data.get("scheme", {}), path.absolute().parent)
        _check_user_scheme_names(config)
    except ConfigError as exc:
        raise ConfigError(f"{path}: {exc}") from None
    return config


def _tables(value: object, kind: str, keys: tuple[str, ...], hint: str
            ) -> Iterator[tuple[str, dict, str]]:
    """The [KIND.NAME] tables of value, as (NAME, table, "[KIND.NAME]" for messages),
    each checked to hold only keys."""
    if not isinstance(value, dict):
        raise ConfigError(f"{kind} must be a table of [{kind}.NAME] tables, not {_toml_type(value)}")
    for name, table in value.items():
        where = f"[{kind}.{_toml_key(name)}]"
        if not isinstance(table, dict):
            raise ConfigError(f"{kind}.{_toml_key(name)} must be a table ({where} with {hint}), "
                              f"not {_toml_type(table)}")
        _check_keys(table, keys, where)
        yield name, table, where


def _mounts(value: object) -> list[Mount]:
    mounts = []
    for name, table, where in _tables(value, "mount", MOUNT_KEYS, 'path = "HOSTDIR"'):
        if "path" not in table:
            raise ConfigError(f"{where}: missing key 'path' (the host directory to serve)")
        host = _string(table["path"], "path", where)
        # "false" or 0 must not count as a grant of writes
        read_only = _boolean(table, "read_only", False, where)
        keep = _boolean(table, "keep", True, where)
        passthrough = _boolean(table, "passthrough", True, where)
        mounts.append(replace(make_mount(name, host, read_only), keep=keep, passthrough=passthrough))
    return mounts


def _boolean(table: dict, key: str, default: bool, where: str) -> bool:
    value = table.get(key, default)
    if type(value) is not bool:
        raise ConfigError(f"{where}: {key} must be a boolean (true or false), "
                          f"not {_toml_type(value)} {_shown(value)}")
    return value


def _user_schemes(value: object, base: Path) -> list[UserScheme]:
    """The [scheme.NAME] tables; relative paths (cwd, a command's program) are under base."""
    found = []
    for name, table, where in _tables(value, "scheme", USER_SCHEME_KEYS,
                                      'module = "MODULE" or command = [...]'):
        if not P.valid_scheme_name(name) or not name.isprintable():
            raise ConfigError(f"{where}: scheme names are non-empty printable ASCII without '/', "
                              "':' or NUL")
        if name in BUILTIN_SCHEMES or name in RESERVED_NAMES:
            raise ConfigError(f"{where}: {name!r} is a built-in scheme's name")
        if ("module" in table) == ("command" in table):
            raise ConfigError(f"{where}: give exactly one of module = \"MODULE\" (run as python -m "
                              "MODULE) and command = [\"PROGRAM\", ...]")
        cwd = base / _string(table.get("cwd", "."), "cwd", where)
        if not cwd.is_dir():
            raise ConfigError(f"{where}: cwd {cwd} is not a directory")
        cwd = cwd.resolve()
        env = _string_table(table.get("env", {}), "env", where)
        if "module" in table:
            module = _string(table["module"], "module", where)
            if not all(part.isidentifier() for part in module.split(".")):
                raise ConfigError(f"{where}: module must be a dotted module name "
                                  f"(my.package.daemon), not {_shown(module)}")
            args = _strings(table.get("args", []), "args", where)
            found.append(UserScheme(name, module=module, args=args, env=env, cwd=cwd))
            continue
        if "args" in table:
            raise ConfigError(f"{where}: args go with module; a command's arguments are in command")
        command = _strings(table["command"], "command", where)
        if not command or not all(command):
            raise ConfigError(f"{where}: command must be a non-empty array of non-empty strings")
        if "/" in command[0] and not command[0].startswith("/"):
            command = (str(cwd / command[0]),) + command[1:]  # not wherever `up` was started
        search = dict(env).get("PATH", os.environ.get("PATH", os.defpath))
        if shutil.which(command[0], path=search) is None:  # a one-line error, not a failed boot
            raise ConfigError(f"{where}: command: {command[0]} is not an executable program")
        found.append(UserScheme(name, command=command, env=env, cwd=cwd))
    return found


def _check_user_scheme_names(config: Config) -> None:
    mounts = {m.name for m in config.mounts}
    for user in config.user_schemes:
        if user.name in mounts:
            raise ConfigError(f"[scheme.{_toml_key(user.name)}]: {user.name!r} is also a mount")
    names = [u.name for u in config.user_schemes]
    if len(set(names)) != len(names):
        raise ConfigError(f"a scheme name is given twice: {names}")


def _json_table(text: str) -> dict:
    """A --user-scheme value: {NAME: table}, as UserScheme.to_json wrote it."""
    try:
        value = json.loads(text)
    except ValueError:
        raise ConfigError(f"--user-scheme {_shown(text)}: not JSON") from None
    if not isinstance(value, dict):
        raise ConfigError(f"--user-scheme {_shown(text)}: not a JSON object")
    return value


def _strings(value: object, key: str, where: str) -> tuple[str, ...]:
    if not isinstance(value, list):
        raise ConfigError(f"{where}: {key} must be an array of strings, not {_toml_type(value)} "
                          f"{_shown(value)}")
    for i, item in enumerate(value):
        if not isinstance(item, str) or "\0" in item:
            raise ConfigError(f"{where}: {key}[{i}] must be a string without NUL, not "
                              f"{_toml_type(item)} {_shown(item)}")
    return tuple(value)


def _string_table(value: object, key: str, where: str) -> tuple[tuple[str, str], ...]:
    if not isinstance(value, dict):
        raise ConfigError(f"{where}: {key} must be a table of strings ({key} = {{ NAME = "
                          f"\"VALUE\" }}), not {_toml_type(value)} {_shown(value)}")
    for name, item in value.items():
        if not name or "=" in name or "\0" in name:
            raise ConfigError(f"{where}: {key}: {_shown(name)} is not a variable name")
        if not isinstance(item, str) or "\0" in item:
            raise ConfigError(f"{where}: {key}.{_toml_key(name)} must be a string, "
                              f"not {_toml_type(item)} {_shown(item)}")
    return tuple(sorted(value.items()))


def _scheme_names(value: object) -> list[str]:
    if not isinstance(value, list):
        raise ConfigError(f"schemes must be a list of strings, not {_toml_type(value)} {_shown(value)}")
    for i, name in enumerate(value):
        if not isinstance(name, str):
            raise ConfigError(f"schemes[{i}] must be a string, not {_toml_type(name)} {_shown(name)}")
    unknown = [n for n in value if n not in BUILTIN_SCHEMES]
    if unknown:
        raise ConfigError(f"schemes: unknown scheme {unknown[0]!r} (built-ins: {', '.join(BUILTIN_SCHEMES)})")
    return list(dict.fromkeys(value))


def _check_keys(table: dict, known: tuple[str, ...], where: str = "") -> None:
    prefix = f"{where}: " if where else ""
    for key in table:
        if key not in known:
            raise ConfigError(f"{prefix}unknown key {key!r} (known: {', '.join(sorted(known))})")


def _string(value: object, key: str, where: str = "") -> str:
    prefix = f"{where}: " if where else ""
    if not isinstance(value, str):
        raise ConfigError(f"{prefix}{key} must be a string, not {_toml_type(value)} {_shown(value)}")
    if not value:
        raise ConfigError(f"{prefix}{key} must not be empty")
    return value


_TOML_TYPES = {bool: "a boolean", int: "an integer", float: "a float", str: "a string",
               list: "an array", dict: "a table"}


def _toml_type(value: object) -> str:
    """What TOML calls the type of a parsed value."""
    return _TOML_TYPES.get(type(value), "a date or time")


def _shown(value: object) -> str:
    """A short, single-line rendering of a value for an error message."""
    text = repr(value)
    return f"({text[:40]}...)" if len(text) > 40 else f"({text})"


def _toml_key(name: str) -> str:
    """name as it would be written in a TOML file: bare if it can be, else quoted."""
    if name and all(c.isascii() and (c.isalnum() or c in "-_") for c in name):
        return name
    return json.dumps(name)  # a TOML basic string: quotes and escapes, one line
