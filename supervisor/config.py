"""What a system runs: the built-in schemes, the file root and mounted host directories.

A config file (TOML, `redoxcap up --config FILE`) may say:

    root = "/srv/redoxcap"              # the file scheme's host directory
    schemes = ["file", "null", "tcp"]   # a subset of the built-ins (default: all)

    [mount.photos]                       # /scheme/photos/... serves this host directory
    path = "/home/me/photos"
    read_only = true

Command-line options win over the file: `--root`, and `--mount NAME=HOSTDIR[:ro]`
added to the file's mounts.
"""

from __future__ import annotations

import tomllib
from dataclasses import dataclass, field
from pathlib import Path

from rt import protocol as P
from supervisor.system import SchemeSpec, file_scheme

# name -> daemon module; "file" is special (it needs the root)
BUILTIN_SCHEMES = {
    "file": "schemes.file",
    "null": "schemes.null",
    "zero": "schemes.zero",
    "rand": "schemes.rand",
    "log": "schemes.log",
    "pipe": "schemes.pipe",
    "tcp": "schemes.tcp",
    "udp": "schemes.udp",
    "uds": "schemes.uds",
}


class ConfigError(ValueError):
    """A configuration that cannot be used; the message is fit for the user."""


@dataclass(frozen=True)
class Mount:
    """A host directory served as its own scheme NAME."""

    name: str
    path: Path
    read_only: bool = False

    def spec(self) -> SchemeSpec:
        return file_scheme(str(self.path), self.name, self.read_only)


@dataclass
class Config:
    root: Path | None = None
    schemes: list[str] = field(default_factory=lambda: list(BUILTIN_SCHEMES))
    mounts: list[Mount] = field(default_factory=list)

    def specs(self) -> list[SchemeSpec]:
        """The daemons to start, in order; the root must be set."""
        assert self.root is not None
        specs = []
        for name in self.schemes:
            if name == "file":
                specs.append(file_scheme(str(self.root)))
            else:
                specs.append(SchemeSpec(name, BUILTIN_SCHEMES[name]))
        return specs + [m.spec() for m in self.mounts]


def parse_mount(text: str) -> Mount:
    """`NAME=HOSTDIR[:ro]` -> Mount; the host directory must exist."""
    name, eq, rest = text.partition("=")
    if not eq or not rest:
        raise ConfigError(f"--mount {text!r}: expected NAME=HOSTDIR[:ro]")
    read_only = rest.endswith(":ro")
    if read_only:
        rest = rest[: -len(":ro")]
    return make_mount(name, rest, read_only)


def make_mount(name: str, path: str, read_only: bool) -> Mount:
    if not P.valid_scheme_name(name):
        raise ConfigError(f"mount name {name!r}: scheme names are non-empty ASCII without '/', ':' or NUL")
    if name in BUILTIN_SCHEMES:
        raise ConfigError(f"mount name {name!r} is a built-in scheme")
    host = Path(path).expanduser().absolute()
    if not host.is_dir():
        raise ConfigError(f"mount {name}: {host} is not a directory")
    return Mount(name, host, read_only)


def load(path: Path | None) -> Config:
    """Read a config file (None: the defaults)."""
    config = Config()
    if path is None:
        return config
    try:
        data = tomllib.loads(path.read_text())
    except (OSError, tomllib.TOMLDecodeError) as exc:
        raise ConfigError(f"{path}: {exc}") from None
    unknown = set(data) - {"root", "schemes", "mount"}
    if unknown:
        raise ConfigError(f"{path}: unknown settings {sorted(unknown)}")
    if "root" in data:
        if not isinstance(data["root"], str):
            raise ConfigError(f"{path}: root must be a string")
        config.root = Path(data["root"]).expanduser()
    if "schemes" in data:
        names = data["schemes"]
        if not isinstance(names, list) or not all(n in BUILTIN_SCHEMES for n in names):
            raise ConfigError(f"{path}: schemes must be a list of {sorted(BUILTIN_SCHEMES)}")
        config.schemes = list(dict.fromkeys(names))
    for name, table in data.get("mount", {}).items():
        if not isinstance(table, dict) or not isinstance(table.get("path"), str):
            raise ConfigError(f"{path}: [mount.{name}] needs path = \"HOSTDIR\"")
        config.mounts.append(make_mount(name, table["path"], bool(table.get("read_only", False))))
    return config
