"""Landlock: the filesystem paths, TCP ports and IPC scopes a confined thread keeps.

A ruleset handles every access right the running ABI (1..7) knows; rules
grant rights beneath paths; restricting the calling thread applies it (and
is inherited across ``execve``). What each path is granted is the policy's
(:mod:`redoxcap.sandbox.policy`); this module only speaks Landlock.
"""

from __future__ import annotations

import errno
import os
import stat
import struct
from typing import Self

from redoxcap.wire import linux

# linux/landlock.h
LANDLOCK_CREATE_RULESET_VERSION = 1 << 0
LANDLOCK_RULE_PATH_BENEATH = 1

ACCESS_FS_EXECUTE = 1 << 0
ACCESS_FS_WRITE_FILE = 1 << 1
ACCESS_FS_READ_FILE = 1 << 2
ACCESS_FS_READ_DIR = 1 << 3
ACCESS_FS_REMOVE_DIR = 1 << 4
ACCESS_FS_REMOVE_FILE = 1 << 5
ACCESS_FS_MAKE_CHAR = 1 << 6
ACCESS_FS_MAKE_DIR = 1 << 7
ACCESS_FS_MAKE_REG = 1 << 8
ACCESS_FS_MAKE_SOCK = 1 << 9
ACCESS_FS_MAKE_FIFO = 1 << 10
ACCESS_FS_MAKE_BLOCK = 1 << 11
ACCESS_FS_MAKE_SYM = 1 << 12
ACCESS_FS_REFER = 1 << 13  # ABI 2
ACCESS_FS_TRUNCATE = 1 << 14  # ABI 3
ACCESS_FS_IOCTL_DEV = 1 << 15  # ABI 5

ACCESS_NET_BIND_TCP = 1 << 0  # ABI 4
ACCESS_NET_CONNECT_TCP = 1 << 1  # ABI 4

SCOPE_ABSTRACT_UNIX_SOCKET = 1 << 0  # ABI 6
SCOPE_SIGNAL = 1 << 1  # ABI 6

_ACCESS_FS_V1 = (1 << 13) - 1  # EXECUTE .. MAKE_SYM
# Only these rights may be granted on a non-directory, or add_rule fails with EINVAL.
ACCESS_FILE = (
    ACCESS_FS_EXECUTE
    | ACCESS_FS_WRITE_FILE
    | ACCESS_FS_READ_FILE
    | ACCESS_FS_TRUNCATE
    | ACCESS_FS_IOCTL_DEV
)


def landlock_abi() -> int:
    """Return the Landlock ABI version of the running kernel.

    Returns:
        The ABI version (1 or more), or 0 when Landlock is not supported: kernel
        without Landlock, Landlock disabled at boot, or an architecture
        :mod:`wire.linux` has no syscall numbers for.

    Raises:
        OSError: the version query failed for another reason.
    """
    arch = linux.machine()
    if arch is None:
        return 0
    abi = _ABI.get(arch)
    if abi is None:  # asked once per process (and before the fork server forks runs)
        try:
            abi = linux.syscall("landlock_create_ruleset", None, 0, LANDLOCK_CREATE_RULESET_VERSION)
        except OSError as exc:
            # ENOSYS: not built in; EOPNOTSUPP: built in but not enabled at boot.
            if exc.errno not in (errno.ENOSYS, errno.EOPNOTSUPP):
                raise
            abi = 0
        _ABI[arch] = abi
    return abi


_ABI: dict[str, int] = {}  # the kernel's answer, which does not change while it runs


def handled_fs(abi: int) -> int:
    """Every filesystem access right ABI abi knows: all of them are handled (denied by default)."""
    handled = _ACCESS_FS_V1
    if abi >= 2:
        handled |= ACCESS_FS_REFER
    if abi >= 3:
        handled |= ACCESS_FS_TRUNCATE
    if abi >= 5:
        handled |= ACCESS_FS_IOCTL_DEV
    return handled


def handled_net(abi: int, deny_network: bool) -> int:
    """The TCP rights to handle: bind and connect, with deny_network from ABI 4 on."""
    return ACCESS_NET_BIND_TCP | ACCESS_NET_CONNECT_TCP if deny_network and abi >= 4 else 0


def scopes(abi: int) -> int:
    """The IPC scopes to restrict: abstract Unix sockets and signals, from ABI 6 on."""
    return SCOPE_ABSTRACT_UNIX_SOCKET | SCOPE_SIGNAL if abi >= 6 else 0


class Ruleset:
    """A Landlock ruleset being built; owns its fd until closed (use it in a `with`)."""

    def __init__(self, abi: int, fs: int, net: int = 0, scoped: int = 0) -> None:
        """Create a ruleset that handles fs, net and scoped.

        Args:
            abi: the running ABI (it decides which fields the kernel accepts).
            fs: handled filesystem rights.
            net: handled TCP rights (ABI >= 4).
            scoped: restricted IPC scopes (ABI >= 6).

        Raises:
            OSError: landlock_create_ruleset failed.
        """
        # Pass only the struct fields this ABI knows so older kernels accept the size.
        size = 8 if abi < 4 else 16 if abi < 6 else 24
        attr = struct.pack("=QQQ", fs, net, scoped)[:size]
        self.fs = fs
        self.fd = linux.syscall("landlock_create_ruleset", attr, size, 0)

    def __enter__(self) -> Self:
        return self

    def __exit__(self, *exc_info: object) -> None:
        self.close()

    def close(self) -> None:
        """Close the ruleset fd (a restricted thread keeps its domain)."""
        if self.fd >= 0:
            os.close(self.fd)
            self.fd = -1

    def allow_beneath(self, path: str, access: int) -> bool:
        """Grant access beneath path (only the file rights on a non-directory).

        Returns:
            False if the path does not exist (nothing was granted), else True.

        Raises:
            OSError: landlock_add_rule failed; the message names the path.
        """
        try:
            fd = os.open(path, os.O_PATH | os.O_CLOEXEC)
        except (FileNotFoundError, NotADirectoryError):
            return False
        try:
            if not stat.S_ISDIR(os.fstat(fd).st_mode):
                access &= ACCESS_FILE
            if not access:
                return True
            # struct landlock_path_beneath_attr is packed: __u64 allowed_access; __s32 parent_fd.
            attr = struct.pack("=Qi", access, fd)
            linux.syscall("landlock_add_rule", self.fd, LANDLOCK_RULE_PATH_BENEATH, attr, 0)
        except OSError as exc:
            raise OSError(exc.errno, f"landlock_add_rule({path!r}): {os.strerror(exc.errno)}") from exc
        finally:
            os.close(fd)
        return True

    def restrict_self(self) -> None:
        """Apply the ruleset to the calling thread, for good (needs no_new_privs or CAP_SYS_ADMIN).

        Raises:
            OSError: landlock_restrict_self failed.
        """
        linux.syscall("landlock_restrict_self", self.fd, 0)
