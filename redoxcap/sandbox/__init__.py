"""The sandbox: confine a process with Landlock and seccomp before it execs a client.

What is confined, once :func:`confine` returns (and inherited across ``execve``):

* Filesystem (Landlock): every access right known to the running ABI (1..7) is
  handled, so a path can be opened, listed, executed, created, removed,
  renamed across directories, truncated or ``ioctl``-ed (devices) only if it
  lies beneath a granted path. ``read_paths`` get read, list and execute;
  ``write_paths`` get read, list and write/create/remove but not execute.
* TCP (Landlock ABI >= 4, with ``deny_network``): no ``bind`` or ``connect`` on
  TCP sockets, including sockets inherited from the parent.
* Syscalls (seccomp-BPF): an allow-list, :mod:`.syscalls`, with argument
  checks; anything it does not name fails with ENOSYS. With ``deny_network``,
  ``socket(2)`` fails with EACCES for every socket but AF_UNIX stream and
  seqpacket, which covers UDP, raw and netlink sockets that Landlock ABI 7
  cannot restrict. Metadata changes (chmod, chown, utime and the xattr
  writers in every form) fail with EPERM on every path and fd, the client's
  own scratch files included: Landlock does not mediate them; so do the calls
  that can reach another process of the uid (``prlimit64``, ``setpriority``...
  on anything but its own), message queues, System V IPC, keyrings, bpf and
  the mount API; io_uring is ENOSYS, because it sets xattrs and creates
  sockets without those syscalls. Only the listed ``ioctl`` requests and
  ``fcntl`` commands run (no TIOCSTI, no inode-flag setters, no leases).
* The terminal (the filter and the launcher): the ioctls that inject input
  or take a terminal over are not on the list, and the launcher runs COMMAND
  in a new session without a controlling terminal, so it can neither inject
  input into the caller's terminal nor regain it (CVE-2017-5226). Without the
  terminal's hangup to end it, the launcher has the kernel kill COMMAND when
  the launcher's parent dies.
* Capabilities: none. The effective, permitted, inheritable and ambient sets are
  cleared and, when running as root, the bounding set too, so ``execve`` gives
  none back; the uid stays.
* IPC scopes (Landlock ABI >= 6): no connecting to abstract Unix sockets and
  no signals to processes outside the new Landlock domain.
* ``no_new_privs`` is set, so set-uid binaries cannot regain privileges.

What is NOT confined:

* File descriptors opened before confinement (inherited or passed over a
  socket) keep the access they were opened with; this is how capabilities are
  handed to the client on purpose.
* Landlock ABI 7 cannot restrict ``connect()`` to a *named* (pathname) Unix
  socket: a confined client can connect to any listening socket whose path it
  can resolve, including the supervisor's control socket. That socket must
  therefore authenticate its peers itself instead of trusting "who can reach it".
* ``stat``, ``chdir``, ``access``, ``readlink``, ``getxattr`` and similar
  metadata *reads* are not covered by Landlock: a client learns which host
  paths exist, their size, owner, mode and times, but not their contents.
* Sockets created by the parent and inherited are not subject to the seccomp
  ``socket`` filter (only Landlock's TCP rules apply to them).
* Bytes written to a terminal on fds 0-2 reach it: escape sequences that make
  a terminal emulator answer by typing are the terminal's to refuse.

`redoxcap run --no-broker` starts its program with :func:`spawn_confined`: a
fork of `run` that takes the launcher's steps and execs the program. Or use
it as a launcher::

    python -E -P -m redoxcap.sandbox [--read PATH]... [--write PATH]... \\
        [--no-network-deny] [--require] -- COMMAND ARGS...

The modules, one concept each: :mod:`.landlock` (rulesets), :mod:`.syscalls`
(the allow-list), :mod:`.seccomp` (its compiler to BPF), :mod:`.process` (capabilities, the
session, the parent's death), :mod:`.policy` (what a client is granted) and
:mod:`.launcher` (:func:`confine` applying them, and the launcher's main).
The package imports only the standard library, :mod:`wire.linux` (its one
syscall layer) and :mod:`redoxcap.exits`, so the launcher starts fast.
"""

from redoxcap.sandbox.landlock import landlock_abi
from redoxcap.sandbox.launcher import (
    ConfinedProcess,
    ConfinementUnavailable,
    ConfineResult,
    confine,
    main,
    spawn_confined,
)
from redoxcap.sandbox.policy import interpreter_read_paths, python_script
from redoxcap.sandbox.process import close_fds_except, die_with_parent, leave_terminal

__all__ = [
    "ConfineResult",
    "ConfinedProcess",
    "ConfinementUnavailable",
    "close_fds_except",
    "confine",
    "die_with_parent",
    "interpreter_read_paths",
    "landlock_abi",
    "leave_terminal",
    "main",
    "python_script",
    "spawn_confined",
]
