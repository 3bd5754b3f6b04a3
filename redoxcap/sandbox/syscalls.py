"""The one list of the syscalls a confined program may make: with which arguments, and why.

Both seccomp filters are built from :func:`rules`: the one a program started
with rt alone runs under (``confined``), and the one the broker serves
(``brokered``), where every call that names a path is handed to the broker
instead of the kernel. Whatever the list does not name fails with ENOSYS,
as on a kernel without that call, so that libraries fall back (``clone3`` to
``clone``, ``faccessat2`` to ``faccessat``); the calls the list refuses on
purpose say so with the errno given here. An argument check compares the low
32 bits of one argument, which is all the kernel reads of an ``int`` or a
command number.

The sandbox runs at the uid of the system's daemons: every call that can
reach another process of that uid (``prlimit64``, ``setpriority``, the
``sched_set*`` calls, ``ioprio_set``) is allowed on the caller's own process
only (pid 0 or the program's pid); signals reach only the program's own
processes, which Landlock's signal scope enforces (ABI 6; without it, only
the program's own pid). ``redoxcap syscalls`` prints the list for this
machine, and docs/sandbox.md shows it.
"""

from __future__ import annotations

import errno
import functools
from collections.abc import Iterator
from dataclasses import dataclass

from redoxcap.wire import linux

CONFINED = "confined"
BROKERED = "brokered"
BROKERED_UDP = "brokered-udp"  # brokered, in a run that grants udp (--allow-udp-*)
MODES = (CONFINED, BROKERED, BROKERED_UDP)
SELF = -1  # stands for the program's own pid in an argument check, filled in when built
DEFAULT_ERRNO = errno.ENOSYS  # what a call the list does not name fails with


# -- what happens to a call -------------------------------------------------------------------

@dataclass(frozen=True)
class Allow:
    """The kernel runs the call."""

    def describe(self) -> str:
        return "allowed"


@dataclass(frozen=True)
class Refuse:
    """The call fails with errno, and the kernel never sees it."""

    errno: int

    def describe(self) -> str:
        return errno.errorcode[self.errno]


@dataclass(frozen=True)
class Notify:
    """The broker answers the call (SECCOMP_RET_USER_NOTIF)."""

    def describe(self) -> str:
        return "broker"


@dataclass(frozen=True)
class Equal:
    """The argument is one of values (SELF: the program's pid)."""

    values: tuple[int, ...]
    names: tuple[str, ...] = ()  # how the docs show the values

    def describe(self) -> str:
        shown = self.names or tuple("own pid" if v == SELF else str(v) for v in self.values)
        return " or ".join(shown) if len(shown) <= 3 else f"one of {len(shown)} listed"


@dataclass(frozen=True)
class AnyBit:
    """The argument has any bit of mask set."""

    mask: int
    name: str

    def describe(self) -> str:
        return f"has {self.name}"


@dataclass(frozen=True)
class Masked:
    """The argument, masked with mask, is one of values."""

    mask: int
    values: tuple[int, ...]
    name: str

    def describe(self) -> str:
        return self.name


Test = Equal | AnyBit | Masked


@dataclass(frozen=True)
class Check:
    """Decide on one argument: the first case whose test matches decides, else otherwise."""

    index: int
    name: str
    cases: tuple[tuple[Test, Action], ...]
    otherwise: Action

    def describe(self) -> str:
        parts = [f"{self.name} {test.describe()}: {action.describe()}" for test, action in self.cases]
        return "; ".join([*parts, f"else {self.otherwise.describe()}"])


Action = Allow | Refuse | Notify | Check

ALLOW = Allow()
NOTIFY = Notify()
EPERM = Refuse(errno.EPERM)
EACCES = Refuse(errno.EACCES)
ENOSYS = Refuse(errno.ENOSYS)
ENOTSUP = Refuse(errno.ENOTSUP)


def only_own(index: int, name: str = "pid") -> Check:
    """Allowed when argument index is 0 or the program's pid (its own process), else EPERM.
    For signals alone, where 0 means the process group: the program's pid is free for
    anyone's once it exits, while what it left behind runs on."""
    return Check(index, name, ((Equal((0, SELF), ("0", "own pid")), ALLOW),), EPERM)


def only_self(index: int, name: str = "pid") -> Check:
    """Allowed when argument index is 0, the calling process itself, else EPERM. Not its pid
    by number: a number fixed in the filter is one process's (a child's own pid is not it),
    and once that process has exited, whoever takes its pid (a process it left behind forks
    until one does) would be reachable."""
    return Check(index, name, ((Equal((0,), ("0 (itself)",)), ALLOW),), EPERM)


@dataclass(frozen=True)
class Rule:
    """What the filters do with some syscalls, and why.

    Attributes:
        group: the heading the docs show it under.
        names: the syscalls (a name a machine lacks is skipped).
        confined: the action in a program started with rt alone (Landlock mediates its paths).
        brokered: the action under the broker (None: the same as confined).
        why: one line for the docs and `redoxcap syscalls`.
        udp: the action under the broker in a run that grants udp (None: as brokered).
    """

    group: str
    names: tuple[str, ...]
    confined: Action
    brokered: Action | None
    why: str
    udp: Action | None = None

    def action(self, mode: str) -> Action:
        if mode == BROKERED_UDP and self.udp is not None:
            return self.udp
        return self.confined if mode == CONFINED or self.brokered is None else self.brokered


def _names(text: str) -> tuple[str, ...]:
    return tuple(text.split())


# -- argument checks -----------------------------------------------------------------------------

# ioctl requests a terminal program and the standard library need; every other request (TIOCSTI,
# TIOCLINUX, TIOCSETD, the inode-flag and -version setters such as EXT4_IOC_SETVERSION, device
# and network requests...) is EPERM on any fd. Not TIOCSWINSZ: a new window size has the
# kernel send SIGWINCH to the terminal's foreground group, the caller's, outside the run,
# with no check Landlock's signal scope sees.
ALLOWED_IOCTLS = (
    "TCGETS", "TCSETS", "TCSETSW", "TCSETSF", "TCGETA", "TCSETA", "TCSETAW", "TCSETAF",
    "TCGETS2", "TCSETS2", "TCSETSW2", "TCSETSF2", "TCSBRK", "TCXONC", "TCFLSH", "TIOCGPGRP",
    "TIOCSPGRP", "TIOCOUTQ", "TIOCGWINSZ", "TIOCGSID", "TIOCGETD", "TIOCGPTN",
    "TIOCSPTLCK", "TIOCGPTLCK", "TIOCGPTPEER", "FIONREAD", "FIONBIO", "FIOCLEX", "FIONCLEX",
    "FIOASYNC", "FIOQSIZE", "FIGETBSZ", "FS_IOC_GETFLAGS", "FS_IOC_GETVERSION", "FS_IOC_FIEMAP",
    "FS_IOC_FSGETXATTR", "FICLONE", "FICLONERANGE", "RNDGETENTCNT",
)
# fcntl commands programs need; not F_SETLEASE (a lease makes others' opens fail and holds host
# writers), F_NOTIFY (directory watches), F_SETOWN/F_SETSIG (signals to a pid of its choosing),
# F_SET_RW_HINT (a hint stored on the inode).
ALLOWED_FCNTLS = (
    "F_DUPFD", "F_DUPFD_CLOEXEC", "F_DUPFD_QUERY", "F_GETFD", "F_SETFD", "F_GETFL", "F_SETFL",
    "F_GETLK", "F_SETLK", "F_SETLKW", "F_OFD_GETLK", "F_OFD_SETLK", "F_OFD_SETLKW", "F_GETOWN",
    "F_GETOWN_EX", "F_GETSIG", "F_GETLEASE", "F_SETPIPE_SZ", "F_GETPIPE_SZ", "F_ADD_SEALS",
    "F_GET_SEALS", "F_GET_RW_HINT", "F_GET_FILE_RW_HINT",
)
# prctl options that act on the caller only and need no privilege; not PR_SET_MM, PR_SET_PTRACER,
# PR_SCHED_CORE (which can name other processes), nor anything unlisted.
ALLOWED_PRCTLS = (
    "PR_SET_PDEATHSIG", "PR_GET_PDEATHSIG", "PR_GET_DUMPABLE", "PR_SET_DUMPABLE",
    "PR_GET_KEEPCAPS", "PR_SET_KEEPCAPS", "PR_SET_NAME", "PR_GET_NAME", "PR_GET_SECCOMP",
    "PR_SET_SECCOMP", "PR_CAPBSET_READ", "PR_CAPBSET_DROP", "PR_GET_SECUREBITS",
    "PR_SET_TIMERSLACK", "PR_GET_TIMERSLACK", "PR_SET_CHILD_SUBREAPER", "PR_GET_CHILD_SUBREAPER",
    "PR_SET_NO_NEW_PRIVS", "PR_GET_NO_NEW_PRIVS", "PR_GET_TID_ADDRESS", "PR_SET_THP_DISABLE",
    "PR_GET_THP_DISABLE", "PR_CAP_AMBIENT", "PR_GET_SPECULATION_CTRL", "PR_SET_SPECULATION_CTRL",
    "PR_SET_MDWE", "PR_GET_MDWE", "PR_SET_VMA", "PR_GET_AUXV",
)


def _one_of(table: dict[str, int], names: tuple[str, ...]) -> Equal:
    return Equal(tuple(table[n] for n in names), names)


IOCTL_CHECK = Check(1, "request", ((_one_of(linux.IOCTLS, ALLOWED_IOCTLS), ALLOW),), EPERM)
FCNTL_CHECK = Check(1, "cmd", ((_one_of(linux.FCNTL_COMMANDS, ALLOWED_FCNTLS), ALLOW),), EPERM)
PRCTL_CHECK = Check(0, "option", ((_one_of(linux.PRCTL_OPTIONS, ALLOWED_PRCTLS), ALLOW),), EPERM)
PERSONALITY_CHECK = Check(0, "persona", (
    (Equal((linux.PERSONALITY_QUERY, linux.PER_LINUX, linux.ADDR_NO_RANDOMIZE),
           ("query", "PER_LINUX", "ADDR_NO_RANDOMIZE")), ALLOW),), EPERM)
_NEW_NAMESPACE = AnyBit(linux.CLONE_NEW_NAMESPACES, "a CLONE_NEW* flag")
# processes and threads alike, native under the broker too: a call the broker holds can be
# interrupted by a signal before it takes it (EINTR), which fork never is on Linux; a new
# process's cwd is noted when its parent changes directory (redoxcap/broker/state.py)
CLONE_CHECK = Check(0, "flags", ((_NEW_NAMESPACE, EPERM),), ALLOW)
SETPRIORITY_CHECK = Check(0, "which", ((Equal((linux.PRIO_PROCESS,), ("PRIO_PROCESS",)),
                                        only_self(1, "who")),), EPERM)
IOPRIO_SET_CHECK = Check(0, "which", ((Equal((linux.IOPRIO_WHO_PROCESS,), ("IOPRIO_WHO_PROCESS",)),
                                       only_self(1, "who")),), EPERM)


_STREAMS = Masked(linux.SOCK_TYPE_MASK, (linux.SOCK_STREAM, linux.SOCK_SEQPACKET),
                  "SOCK_STREAM or SOCK_SEQPACKET")
_UNIX = (Equal((linux.AF_UNIX,), ("AF_UNIX",)), Check(1, "type", ((_STREAMS, ALLOW),), EACCES))


def socket_check(refusal: Action) -> Check:
    """AF_UNIX stream and seqpacket sockets only: a datagram socket's sendto can name any host
    socket, and Landlock (ABI 7) mediates neither those nor UDP."""
    stream_types = _STREAMS
    return Check(0, "domain", ((Equal((linux.AF_UNIX,), ("AF_UNIX",)),
                                Check(1, "type", ((stream_types, ALLOW),), refusal)),), refusal)


# Under the broker, TCP too: the broker binds, connects and listens on its own copy of the
# socket within the run's --allow-* grants (bind, connect and listen go to it). Not UDP (a
# datagram's sendto/sendmsg names any address, in memory the filter cannot read), not SCTP or
# MPTCP (a sendmsg may connect), not raw or netlink sockets.
SOCKET_BROKERED = Check(0, "domain", (
    _UNIX,
    (Equal((linux.AF_INET, linux.AF_INET6), ("AF_INET", "AF_INET6")),
     Check(1, "type", ((Masked(linux.SOCK_TYPE_MASK, (linux.SOCK_STREAM,), "SOCK_STREAM"),
                        Check(2, "protocol", ((Equal((0, linux.IPPROTO_TCP), ("0", "IPPROTO_TCP")),
                                               ALLOW),), EACCES)),), EACCES)),
), EACCES)
SOCKETPAIR_CHECK = Check(0, "domain", (_UNIX,), EACCES)
_TCP = (Masked(linux.SOCK_TYPE_MASK, (linux.SOCK_STREAM,), "SOCK_STREAM"),
        Check(2, "protocol", ((Equal((0, linux.IPPROTO_TCP), ("0", "IPPROTO_TCP")), ALLOW),), EACCES))
_UDP = (Masked(linux.SOCK_TYPE_MASK, (linux.SOCK_DGRAM,), "SOCK_DGRAM"),
        Check(2, "protocol", ((Equal((0, linux.IPPROTO_UDP), ("0", "IPPROTO_UDP")), ALLOW),), EACCES))
# In a run that grants udp, UDP sockets too: every send that can name a destination goes to
# the broker, which sends it on its own copy of the socket within --allow-udp-connect.
SOCKET_BROKERED_UDP = Check(0, "domain", (
    _UNIX,
    (Equal((linux.AF_INET, linux.AF_INET6), ("AF_INET", "AF_INET6")),
     Check(1, "type", (_TCP, _UDP), EACCES)),
), EACCES)


# A source route (an IPv4 option, an IPv6 routing header) sends each packet to its first hop,
# a host the broker never checked: under the broker, a socket may not carry one.
SETSOCKOPT_BROKERED = Check(1, "level", (
    (Equal((linux.IPPROTO_IP,), ("IPPROTO_IP",)),
     Check(2, "optname", ((Equal((linux.IP_OPTIONS,), ("IP_OPTIONS",)), EACCES),), ALLOW)),
    (Equal((linux.IPPROTO_IPV6,), ("IPPROTO_IPV6",)),
     Check(2, "optname", ((Equal((linux.IPV6_RTHDR, linux.IPV6_2292RTHDR,
                                  linux.IPV6_2292PKTOPTIONS),
                                 ("IPV6_RTHDR", "IPV6_2292RTHDR", "IPV6_2292PKTOPTIONS")),
                           EACCES),), ALLOW)),
), ALLOW)


def no_fastopen(index: int) -> Check:
    """A send whose flags (argument index) hold MSG_FASTOPEN connects a TCP socket without
    connect(2), so without the broker's check or Landlock's: EACCES."""
    return Check(index, "flags", ((AnyBit(linux.MSG_FASTOPEN, "MSG_FASTOPEN"), EACCES),), ALLOW)


def send_brokered(flags: int, addrlen: int | None = None) -> Check:
    """A send in a run that grants udp: MSG_FASTOPEN is EACCES; one that can name a destination
    goes to the broker. sendto's addrlen (argument addrlen, an int) of 0 names none: UDP answers
    EINVAL to a non-NULL address of length 0, TCP and Unix streams ignore it. A msghdr is in
    memory the filter cannot read, so every sendmsg and sendmmsg goes to the broker."""
    named: Action = NOTIFY
    if addrlen is not None:
        named = Check(addrlen, "addrlen", ((Equal((0,), ("0",)), ALLOW),), NOTIFY)
    return Check(flags, "flags", ((AnyBit(linux.MSG_FASTOPEN, "MSG_FASTOPEN"), EACCES),), named)


# -- the list --------------------------------------------------------------------------------------

PATHS = _names("""open openat openat2 creat stat lstat newfstatat statx access faccessat faccessat2
    readlink readlinkat mkdir mkdirat unlink unlinkat rmdir rename renameat renameat2 link linkat
    symlink symlinkat truncate chdir fchdir getcwd""")
METADATA = _names("""chmod fchmod fchmodat fchmodat2 chown fchown lchown fchownat utime utimes
    futimesat utimensat""")
XATTR_WRITES = _names("""setxattr lsetxattr fsetxattr removexattr lremovexattr fremovexattr
    setxattrat removexattrat file_setattr""")


def rules(*, deny_network: bool = True, signals_scoped: bool = True) -> tuple[Rule, ...]:
    """The allow-list, for a program confined with or without network and Landlock's signal scope.

    Args:
        deny_network: only AF_UNIX stream and seqpacket sockets (else every socket(2)).
        signals_scoped: Landlock (ABI >= 6) keeps signals inside the sandbox; without it, the
            kill family is allowed on the program's own pid only.
    """
    if signals_scoped:
        kill: Action = ALLOW
        tgkill: Action = ALLOW
        pidfd_send_signal: Action = ALLOW
        signals_why = "Landlock's signal scope keeps them inside the sandbox"
    else:
        kill, tgkill, pidfd_send_signal = only_own(0), only_own(0, "tgid"), EPERM
        signals_why = "no Landlock signal scope here: its own pid only"
    sockets = socket_check(EACCES) if deny_network else ALLOW
    return (
        Rule("memory", _names("""brk mmap munmap mprotect mremap msync mincore madvise mlock munlock
             mlock2 mlockall munlockall membarrier pkey_mprotect pkey_alloc pkey_free
             mbind set_mempolicy get_mempolicy set_mempolicy_home_node mseal map_shadow_stack"""),
             ALLOW, None, "the program's own memory"),
        Rule("memory", ("memfd_create",), ALLOW, NOTIFY,
             "its own memory files; brokered: made by the broker, never executable"),
        Rule("fds", _names("""read write pread64 pwrite64 readv writev preadv pwritev preadv2
             pwritev2 close close_range lseek dup dup2 dup3 pipe pipe2 fsync fdatasync syncfs sync
             sync_file_range ftruncate fallocate fadvise64 readahead sendfile splice tee vmsplice
             copy_file_range flock fstatfs fgetxattr flistxattr"""),
             ALLOW, None, "fds it holds, with the access they were opened with"),
        Rule("fds", ("fstat", "getdents64"), ALLOW, NOTIFY,
             "on a capability the broker answers (glibc's fstat is newfstatat)"),
        Rule("fds", ("fcntl",), FCNTL_CHECK, None, "commands on its own fds; no leases or watches"),
        Rule("fds", ("ioctl",), IOCTL_CHECK, None,
             "terminal settings and file reads; nothing that injects input or sets inode fields"),
        Rule("events and time", _names("""poll ppoll select pselect6 epoll_create epoll_create1
             epoll_ctl epoll_wait epoll_pwait epoll_pwait2 eventfd eventfd2 signalfd signalfd4
             timerfd_create timerfd_settime timerfd_gettime nanosleep clock_nanosleep clock_gettime
             clock_getres gettimeofday time alarm pause getitimer setitimer timer_create
             timer_settime timer_gettime timer_getoverrun timer_delete sched_yield futex futex_waitv
             futex_wake futex_wait futex_requeue"""), ALLOW, None, "waiting, clocks and timers"),
        Rule("signals", _names("""rt_sigaction rt_sigprocmask rt_sigreturn rt_sigpending
             rt_sigtimedwait rt_sigsuspend sigaltstack restart_syscall"""),
             ALLOW, None, "its own signal handling"),
        Rule("signals", ("kill", "tkill", "rt_sigqueueinfo"), kill, None, signals_why),
        Rule("signals", ("tgkill", "rt_tgsigqueueinfo"), tgkill, None, signals_why),
        Rule("signals", ("pidfd_send_signal",), pidfd_send_signal, None, signals_why),
        Rule("processes", _names("""exit exit_group wait4 waitid getpid gettid getppid getpgrp
             getpgid setpgid getsid setsid set_tid_address set_robust_list rseq arch_prctl uname
             sysinfo times getrusage getrlimit setrlimit umask getcpu getrandom capget capset
             getuid getgid geteuid getegid getresuid getresgid getgroups setuid setgid setreuid
             setregid setresuid setresgid setfsuid setfsgid setgroups getpriority
             sched_getaffinity sched_getparam sched_getscheduler sched_getattr
             sched_get_priority_max sched_get_priority_min sched_rr_get_interval ioprio_get
             pidfd_open seccomp landlock_create_ruleset landlock_add_rule landlock_restrict_self"""),
             ALLOW, None, "its own process; ids change only within what it holds (no capabilities)"),
        Rule("processes", ("prlimit64",), only_self(0), None,
             "another process's limits (a daemon's RLIMIT_CPU or RLIMIT_NOFILE) are out of reach"),
        Rule("processes", ("setpriority",), SETPRIORITY_CHECK, None,
             "its own priority; not a process group's or the whole uid's"),
        Rule("processes", _names("sched_setaffinity sched_setparam sched_setscheduler sched_setattr"),
             only_self(0), None, "its own scheduling"),
        Rule("processes", ("ioprio_set",), IOPRIO_SET_CHECK, None, "its own I/O priority"),
        Rule("processes", ("prctl",), PRCTL_CHECK, None, "options that act on the caller alone"),
        Rule("processes", ("personality",), PERSONALITY_CHECK, None, "query, or plain Linux"),
        Rule("processes", ("clone",), CLONE_CHECK, CLONE_CHECK,
             "threads and processes, never in new namespaces"),
        Rule("processes", ("fork", "vfork"), ALLOW, ALLOW, "processes"),
        Rule("processes", ("execve", "execveat"), ALLOW, NOTIFY,
             "the broker checks what is executed"),
        Rule("paths", PATHS, ALLOW, NOTIFY,
             "confined: Landlock decides what a path reaches; brokered: the broker resolves it"),
        Rule("paths", ("mknod", "mknodat"), ALLOW, EPERM,
             "fifos and sockets where Landlock lets it write (devices need CAP_MKNOD)"),
        Rule("paths", ("statfs",), ALLOW, ENOSYS, "filesystem sizes (brokered: fstatfs instead)"),
        Rule("paths", _names("""getxattr lgetxattr listxattr llistxattr getxattrat listxattrat
             file_getattr"""),
             ALLOW, ENOTSUP, "attribute reads (the capability protocol has no xattrs)"),
        Rule("paths", METADATA, EPERM, NOTIFY,
             "confined: not the program's to change; brokered: modes (permission bits) and times "
             "of its own files, through the capability (CHMODAT, UTIMENSAT, CHOWNAT)"),
        Rule("sockets", ("socket",), sockets, SOCKET_BROKERED,
             "AF_UNIX stream and seqpacket only" + ("" if deny_network else " (or any, confined)")
             + "; brokered: TCP too, bound and connected by the broker; UDP where the run grants "
             "udp", udp=SOCKET_BROKERED_UDP),
        Rule("sockets", ("socketpair",), SOCKETPAIR_CHECK, None, "AF_UNIX stream and seqpacket"),
        Rule("sockets", ("connect", "bind", "listen"), ALLOW, NOTIFY,
             "confined: on its own sockets (Landlock refuses TCP); brokered: the broker checks "
             "the address against the grants and acts on its own copy of the socket"),
        Rule("sockets", ("sendto",), no_fastopen(3), None,
             "no MSG_FASTOPEN; with a udp grant, a send naming an address goes to the broker",
             udp=send_brokered(3, addrlen=5)),
        Rule("sockets", ("sendmsg",), no_fastopen(2), None,
             "no MSG_FASTOPEN; with a udp grant, the broker sends (its msghdr may name an address)",
             udp=send_brokered(2)),
        Rule("sockets", ("sendmmsg",), no_fastopen(3), None,
             "no MSG_FASTOPEN; with a udp grant, the broker sends (its msghdrs may name addresses)",
             udp=send_brokered(3)),
        Rule("sockets", _names("""accept accept4 shutdown getsockname getpeername getsockopt
             recvfrom recvmsg recvmmsg"""), ALLOW, None, "on sockets it holds"),
        Rule("sockets", ("setsockopt",), ALLOW, SETSOCKOPT_BROKERED,
             "on sockets it holds; brokered: no source routes (their first hop is not granted)"),
        # refused on purpose, with the errno that says why
        Rule("refused", XATTR_WRITES, EPERM, ENOTSUP,
             "extended attributes and inode flags (brokered: not supported, so cp -a and tar "
             "fall back to chmod)"),
        Rule("refused", _names("""mount umount2 pivot_root chroot open_tree open_tree_attr
             move_mount fsopen fsconfig fsmount fspick mount_setattr listmount statmount
             unshare setns"""), EPERM, None, "mounts and namespaces (statmount shows the host's)"),
        Rule("refused", _names("""ptrace process_vm_readv process_vm_writev pidfd_getfd kcmp
             process_madvise process_mrelease get_robust_list migrate_pages move_pages"""),
             EPERM, None, "another process's memory, fds or pages"),
        Rule("refused", ("name_to_handle_at", "open_by_handle_at"), EPERM, None,
             "file handles go around every path check"),
        Rule("refused", _names("""mq_open mq_unlink mq_timedsend mq_timedreceive mq_notify
             mq_getsetattr shmget shmat shmdt shmctl semget semop semctl semtimedop msgget msgsnd
             msgrcv msgctl add_key request_key keyctl"""), EPERM, None,
             "host kernel objects of the uid: message queues, System V IPC, keyrings"),
        Rule("refused", _names("""bpf perf_event_open userfaultfd syslog reboot kexec_load
             kexec_file_load init_module finit_module delete_module swapon swapoff acct quotactl
             quotactl_fd sethostname setdomainname settimeofday clock_settime adjtimex
             clock_adjtime iopl ioperm modify_ldt vhangup uselib ustat sysfs lookup_dcookie
             nfsservctl"""), EPERM, None, "the kernel and the machine"),
        Rule("refused", _names("""io_uring_setup io_uring_enter io_uring_register io_setup
             io_destroy io_getevents io_submit io_cancel io_pgetevents"""), ENOSYS, None,
             "asynchronous I/O would run calls the filter never sees; libraries fall back"),
        Rule("refused", _names("""inotify_init inotify_init1 inotify_add_watch inotify_rm_watch
             fanotify_init fanotify_mark"""), ENOSYS, None,
             "watches report names in directories it cannot list; programs fall back to polling"),
        Rule("refused", ("clone3", "getdents"), ENOSYS, None,
             "glibc falls back to clone and getdents64, which the list checks"),
    )


def actions(machine: str, mode: str, **options: bool) -> Iterator[tuple[str, int, Rule]]:
    """(name, number, rule) of every call the list names that machine has, in the list's order.

    Raises:
        ValueError: a call is named twice (the list must decide each call once).
    """
    nrs = linux.SYSCALLS[machine]
    seen: set[str] = set()
    for rule in rules(**options):
        for name in rule.names:
            if name in seen:
                raise ValueError(f"{name} is in the syscall list twice")
            seen.add(name)
            if name in nrs:
                yield name, nrs[name], rule


@functools.cache
def brokered_names() -> frozenset[str]:
    """The calls the broker answers (whatever the machine: a name it lacks never arrives);
    worked out once per process (every broker asks)."""
    out = set()
    for rule in rules():
        if _notifies(rule.action(BROKERED)) or _notifies(rule.action(BROKERED_UDP)):
            out.update(rule.names)
    return frozenset(out)


def _notifies(action: Action) -> bool:
    if isinstance(action, Notify):
        return True
    if isinstance(action, Check):
        return any(_notifies(a) for _, a in action.cases) or _notifies(action.otherwise)
    return False


# -- showing the list ------------------------------------------------------------------------------

def describe_text(machine: str) -> str:
    """The list for `redoxcap syscalls`: each call of machine, its number and both actions."""
    rows = [("call", "nr", "confined", "brokered", "why")]
    checks: dict[str, list[str]] = {}  # the checks of a row, shown under it
    for name, nr, rule in sorted(actions(machine, CONFINED), key=lambda row: row[1]):
        confined, brokered = rule.action(CONFINED), rule.action(BROKERED)
        rows.append((name, str(nr), _short(confined), _short(brokered), rule.why))
        shown = [f"{mode}: {action.describe()}" for mode, action in
                 ((CONFINED, confined), (BROKERED, brokered)) if isinstance(action, Check)]
        if len(shown) == 2 and confined == brokered:
            shown = [f"both: {confined.describe()}"]
        if rule.udp is not None:
            shown.append(f"{BROKERED}, with a udp grant: {rule.udp.describe()}")
        checks[name] = shown
    widths = [max(len(row[i]) for row in rows) for i in range(4)]
    lines = []
    for row in rows:
        lines.append("  ".join(cell.ljust(w) for cell, w in zip(row, widths, strict=False))
                     + "  " + row[4])
        lines += [f"    {check}" for check in checks.get(row[0], [])]
    lines.append(f"(any other call: {errno.errorcode[DEFAULT_ERRNO]})")
    lines += ["", *_argument_lists()]
    return "\n".join(lines) + "\n"


def describe_markdown() -> str:
    """The list as docs/sandbox.md shows it (names of both machines, actions, why)."""
    lines = ["| group | calls | confined (rt) | brokered | why |", "| --- | --- | --- | --- | --- |"]
    for rule in rules():
        calls = ", ".join(f"`{n}`" for n in rule.names)
        confined, brokered = rule.action(CONFINED).describe(), rule.action(BROKERED).describe()
        if rule.udp is not None:
            brokered += f"; with a udp grant: {rule.udp.describe()}"
        lines.append(f"| {rule.group} | {calls} | {confined} | {brokered} | {rule.why} |")
    lines += ["", f"Any call the list does not name: {errno.errorcode[DEFAULT_ERRNO]}.", ""]
    lines += [f"- {line}" for line in _argument_lists()]
    return "\n".join(lines) + "\n"


def _short(action: Action) -> str:
    return "checked" if isinstance(action, Check) else action.describe()


def _argument_lists() -> list[str]:
    return [
        f"ioctl requests allowed (any other: EPERM): {', '.join(ALLOWED_IOCTLS)}",
        f"fcntl commands allowed (any other: EPERM): {', '.join(ALLOWED_FCNTLS)}",
        f"prctl options allowed (any other: EPERM): {', '.join(ALLOWED_PRCTLS)}",
    ]
