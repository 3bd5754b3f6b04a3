"""The compiled seccomp filters do, call by call, what the one syscall list says.

A small interpreter of classic BPF runs the very bytes the kernel gets, for
every syscall number of each machine and the argument values each check
names (and their neighbours), and compares the result with the list's
action. The kernel's side of it (that it loads and applies the same bytes) is
tested by the attacks in test_allowlist.py.
"""

from __future__ import annotations

import errno
import os
import re
import struct
from pathlib import Path

import pytest
from click.testing import CliRunner

from redoxcap.broker import filter as broker_filter
from redoxcap.cli import main
from redoxcap.sandbox import seccomp
from redoxcap.sandbox import syscalls as S
from redoxcap.wire import linux

MACHINES = ("x86_64", "aarch64")
PID = 4242  # the program's own pid, as the filters are built for it here
OPTIONS = [{"deny_network": True, "signals_scoped": True},
           {"deny_network": False, "signals_scoped": True},
           {"deny_network": True, "signals_scoped": False}]
KILL = linux.SECCOMP_RET_KILL_PROCESS
ALLOWED = linux.SECCOMP_RET_ALLOW
NOTIFIED = linux.SECCOMP_RET_USER_NOTIF


def errno_of(err: int) -> int:
    return linux.SECCOMP_RET_ERRNO | err


def run_bpf(program: bytes, nr: int, arch: int, args: tuple[int, ...] = (0,) * 6) -> int:
    """What the classic BPF program returns for struct seccomp_data {nr, arch, ip, args}."""
    data = struct.pack("=iIQ6Q", nr, arch, 0, *(a & (2**64 - 1) for a in args))
    insns = [struct.unpack("=HBBI", program[i:i + 8]) for i in range(0, len(program), 8)]
    acc, pc = 0, 0
    while True:
        code, jt, jf, k = insns[pc]
        pc += 1
        if code == seccomp.BPF_LD_W_ABS:
            acc = struct.unpack_from("=I", data, k)[0]
        elif code == seccomp.BPF_ALU_AND_K:
            acc &= k
        elif code == seccomp.BPF_JA:
            pc += k
        elif code == seccomp.BPF_JEQ_K:
            pc += jt if acc == k else jf
        elif code == seccomp.BPF_JGE_K:
            pc += jt if acc >= k else jf
        elif code == seccomp.BPF_JSET_K:
            pc += jt if acc & k else jf
        elif code == seccomp.BPF_RET_K:
            return k
        else:
            raise AssertionError(f"instruction {code:#x} the compiler never emits")


def expected(action: S.Action, args: tuple[int, ...]) -> int:
    """The list's own answer, evaluated directly."""
    if isinstance(action, S.Allow):
        return ALLOWED
    if isinstance(action, S.Notify):
        return NOTIFIED
    if isinstance(action, S.Refuse):
        return errno_of(action.errno)
    value = args[action.index] & 0xFFFF_FFFF
    for test, then in action.cases:
        if isinstance(test, S.Equal):
            hit = value in {PID if v == S.SELF else v & 0xFFFF_FFFF for v in test.values}
        elif isinstance(test, S.AnyBit):
            hit = bool(value & test.mask)
        else:
            hit = value & test.mask in test.values
        if hit:
            return expected(then, args)
    return expected(action.otherwise, args)


def probes(action: S.Action) -> list[tuple[int, ...]]:
    """Argument vectors that take every branch of action's checks, and a few that take none."""
    vectors = [(0,) * 6, (PID,) * 6, (1,) * 6, (2**32 - 1,) * 6, (2**32,) * 6]
    if isinstance(action, S.Check):
        values: set[int] = set()
        for test, then in action.cases:
            if isinstance(test, S.Equal):
                values |= {PID if v == S.SELF else v for v in test.values}
            elif isinstance(test, S.AnyBit):
                values |= {test.mask, test.mask & -test.mask}
            else:
                values |= set(test.values) | {v | ~test.mask & 0xFFFF_FFF0 for v in test.values}
            for inner in probes(then):
                for v in list(values) or [0]:
                    vectors.append(tuple(v if i == action.index else inner[i] for i in range(6)))
        for v in list(values):
            for near in (v, v + 1, v - 1, v | 1 << 32):
                vectors.append(tuple(near if i == action.index else 0 for i in range(6)))
    return vectors


@pytest.mark.parametrize("machine", MACHINES)
@pytest.mark.parametrize("mode", S.MODES)
@pytest.mark.parametrize("options", OPTIONS, ids=["default", "network", "no-signal-scope"])
def test_every_call_gets_what_the_list_says(machine, mode, options):
    program = seccomp.filter_program(machine, mode, self_pid=PID, **options)
    arch = linux.AUDIT_ARCH[machine]
    listed = {nr: rule for _, nr, rule in S.actions(machine, mode, **options)}
    for nr in range(max(linux.SYSCALLS[machine].values()) + 64):
        rule = listed.get(nr)
        if rule is None:
            assert run_bpf(program, nr, arch) == errno_of(S.DEFAULT_ERRNO), nr
            continue
        action = rule.action(mode)
        for args in probes(action):
            assert run_bpf(program, nr, arch, args) == expected(action, args), (nr, args)


@pytest.mark.parametrize("machine", MACHINES)
def test_a_foreign_abi_is_killed_and_x32_calls_are_refused(machine):
    program = seccomp.filter_program(machine, S.CONFINED, self_pid=PID)
    openat = linux.SYSCALLS[machine]["openat"]
    assert run_bpf(program, openat, linux.AUDIT_ARCH[machine]) == ALLOWED
    assert run_bpf(program, openat, 0x4000_0003) == KILL  # AUDIT_ARCH_I386
    assert run_bpf(program, openat, 0x4000_0028) == KILL  # AUDIT_ARCH_ARM
    if machine == "x86_64":
        assert run_bpf(program, linux.X32_SYSCALL_BIT | openat, linux.AUDIT_ARCH[machine]) \
            == errno_of(errno.ENOSYS)


def outcome(machine: str, mode: str, name: str, *args: int) -> int:
    program = seccomp.filter_program(machine, mode, self_pid=PID)
    padded = (*args, *(0,) * (6 - len(args)))
    return run_bpf(program, linux.SYSCALLS[machine][name], linux.AUDIT_ARCH[machine], padded)


@pytest.mark.parametrize("mode", S.MODES)
def test_calls_that_reach_other_processes_are_allowed_on_the_caller_itself_only(mode):
    """By 0 (itself), not by its pid: the number the filter was made with is one process's,
    and free for anyone's once it exits (test_redteam4.py)."""
    m = "x86_64"
    router = 777  # any other pid of the same uid: a daemon of the system
    for name, own, other in [
        ("prlimit64", (0,), (router,)),
        ("prlimit64", (0,), (PID,)),
        ("sched_setaffinity", (0,), (router,)),
        ("sched_setscheduler", (0,), (router,)),
        ("sched_setparam", (0,), (PID,)),
        ("sched_setattr", (0,), (router,)),
        ("setpriority", (0, 0), (0, router)),  # PRIO_PROCESS
        ("setpriority", (0, 0), (0, PID)),
        ("setpriority", (0, 0), (2, 0)),  # PRIO_USER 0: every process of the uid
        ("setpriority", (0, 0), (1, 0)),  # PRIO_PGRP
        ("ioprio_set", (1, 0), (1, router)),  # IOPRIO_WHO_PROCESS
        ("ioprio_set", (1, 0), (1, PID)),
        ("ioprio_set", (1, 0), (3, 0)),  # IOPRIO_WHO_USER
    ]:
        assert outcome(m, mode, name, *own) == ALLOWED, (name, own)
        assert outcome(m, mode, name, *other) == errno_of(errno.EPERM), (name, other)


@pytest.mark.parametrize("machine", MACHINES)
@pytest.mark.parametrize("udp", [False, True])
@pytest.mark.parametrize("scoped", [True, False])
def test_the_brokers_filter_compiled_ahead_gets_the_installing_processs_own_pid(machine, udp, scoped):
    """The broker's filter is compiled once, in the fork server, and installed by each run's
    program: compiled for the fork server's pid, every run could prlimit64 the fork server
    (test_redteam4.py). The cached program holds a placeholder, and filling in a pid gives
    exactly the program compiled for that pid (the placeholder is compared with nothing else)."""
    ahead = broker_filter.program(machine, signals_scoped=scoped, udp=udp)
    mode = S.BROKERED_UDP if udp else S.BROKERED
    assert seccomp.with_own_pid(ahead, PID) == seccomp.filter_program(
        machine, mode, self_pid=PID, signals_scoped=scoped)
    if not scoped:  # signals: its own pid only, the installing process's
        kill = linux.SYSCALLS[machine]["kill"]
        assert run_bpf(seccomp.with_own_pid(ahead, PID), kill, linux.AUDIT_ARCH[machine],
                       (PID, 9, 0, 0, 0, 0)) == ALLOWED
        assert run_bpf(ahead, kill, linux.AUDIT_ARCH[machine], (os.getpid(), 9, 0, 0, 0, 0)) \
            == errno_of(errno.EPERM)  # the compiling process is another process


@pytest.mark.parametrize("mode", S.MODES)
def test_ioctl_fcntl_and_prctl_take_only_listed_commands(mode):
    m = "x86_64"
    for name in ("TCGETS", "TIOCGWINSZ", "FIONREAD", "FIOCLEX", "FICLONE"):
        assert outcome(m, mode, "ioctl", 1, linux.IOCTLS[name]) == ALLOWED, name
    for name in ("TIOCSTI", "TIOCLINUX", "TIOCSETD", "TIOCCONS", "TIOCSCTTY", "TIOCEXCL",
                 "FS_IOC_SETFLAGS", "FS_IOC_SETVERSION", "EXT4_IOC_SETVERSION",
                 "FS_IOC_FSSETXATTR", "FIBMAP", "FIDEDUPERANGE"):
        assert outcome(m, mode, "ioctl", 1, linux.IOCTLS[name]) == errno_of(errno.EPERM), name
    # the kernel reads the request as an unsigned int: high bits change nothing
    assert outcome(m, mode, "ioctl", 1, 1 << 32 | linux.IOCTLS["TIOCSTI"]) == errno_of(errno.EPERM)
    for name in ("F_GETFL", "F_SETFL", "F_SETLK", "F_DUPFD_CLOEXEC", "F_OFD_SETLKW"):
        assert outcome(m, mode, "fcntl", 3, linux.FCNTL_COMMANDS[name]) == ALLOWED, name
    for name in ("F_SETLEASE", "F_NOTIFY", "F_SETOWN", "F_SETOWN_EX", "F_SETSIG",
                 "F_SET_RW_HINT"):
        assert outcome(m, mode, "fcntl", 3, linux.FCNTL_COMMANDS[name]) == errno_of(errno.EPERM)
    assert outcome(m, mode, "prctl", linux.PRCTL_OPTIONS["PR_SET_NAME"]) == ALLOWED
    for name in ("PR_SET_MM", "PR_SET_PTRACER", "PR_SCHED_CORE", "PR_SET_SECUREBITS"):
        assert outcome(m, mode, "prctl", linux.PRCTL_OPTIONS[name]) == errno_of(errno.EPERM)


def test_path_calls_go_to_the_broker_and_threads_and_forks_run_natively():
    m = "x86_64"
    for name in ("openat", "newfstatat", "statx", "execve", "getdents64", "chdir", "getcwd"):
        assert outcome(m, S.BROKERED, name) == NOTIFIED, name
        assert outcome(m, S.CONFINED, name) == ALLOWED, name
    clone_thread = 0x3D0F00  # glibc's pthread_create flags
    assert outcome(m, S.BROKERED, "clone", clone_thread) == ALLOWED
    # fork() (a call the broker holds could be interrupted before it takes it: EINTR)
    assert outcome(m, S.BROKERED, "clone", 0x1200011) == ALLOWED
    assert outcome(m, S.BROKERED, "fork") == outcome(m, S.BROKERED, "vfork") == ALLOWED
    assert outcome(m, S.BROKERED, "clone", 0x1200011 | 0x1000_0000) == errno_of(errno.EPERM)
    assert outcome(m, S.CONFINED, "clone", 0x2_0000) == errno_of(errno.EPERM)  # CLONE_NEWNS
    assert broker_filter.BROKERED == S.brokered_names()


@pytest.mark.parametrize("mode", S.MODES)
def test_each_refused_class_is_refused_with_its_errno(mode):
    m = "x86_64"
    refused = {
        errno.EPERM: ("mq_open", "mq_unlink", "shmget", "msgget", "semget", "keyctl", "add_key",
                      "bpf", "perf_event_open", "userfaultfd", "name_to_handle_at",
                      "open_by_handle_at", "fsopen", "open_tree", "move_mount", "mount",
                      "unshare", "setns", "ptrace", "process_vm_readv", "pidfd_getfd", "kcmp",
                      "listmount", "statmount", "syslog"),
        errno.ENOSYS: ("io_uring_setup", "io_uring_enter", "io_setup", "inotify_init1",
                       "inotify_add_watch", "fanotify_init", "fanotify_mark", "clone3",
                       "memfd_secret", "remap_file_pages"),
    }
    for err, names in refused.items():
        for name in names:
            assert outcome(m, mode, name, 0, 0) == errno_of(err), name


def test_metadata_changes_are_refused_confined_and_served_by_the_broker():
    m = "x86_64"
    for name in ("chmod", "fchmodat2", "fchown", "utimensat", "futimesat"):
        assert outcome(m, S.CONFINED, name) == errno_of(errno.EPERM), name
        assert outcome(m, S.BROKERED, name) == NOTIFIED, name
    for name in ("setxattr", "fremovexattr", "file_setattr"):
        assert outcome(m, S.CONFINED, name) == errno_of(errno.EPERM), name
        assert outcome(m, S.BROKERED, name) == errno_of(errno.ENOTSUP), name  # cp -a goes on


def test_sockets_are_unix_streams_and_under_the_broker_tcp_it_binds_and_connects():
    m, unix, inet, inet6 = "x86_64", 1, 2, 10
    stream, dgram, seqpacket, raw = 1, 2, 5, 3
    nonblock_cloexec = 0o4000 | 0o2000000
    for mode in S.MODES:
        assert outcome(m, mode, "socket", unix, stream | nonblock_cloexec) == ALLOWED
        assert outcome(m, mode, "socket", unix, seqpacket) == ALLOWED
        assert outcome(m, mode, "socket", unix, dgram) == errno_of(errno.EACCES)
        assert outcome(m, mode, "socketpair", unix, stream) == ALLOWED
        assert outcome(m, mode, "socketpair", unix, dgram) == errno_of(errno.EACCES)
        assert outcome(m, mode, "socketpair", inet, stream) == errno_of(errno.EACCES)
        assert outcome(m, mode, "sendto", 3, 0, 0, 0x2000_0000) == errno_of(errno.EACCES)
        assert outcome(m, mode, "sendmsg", 3, 0, 0x2000_0000) == errno_of(errno.EACCES)
    for mode in (S.CONFINED, S.BROKERED):
        assert outcome(m, mode, "sendmsg", 3, 0, 0x40) == ALLOWED  # MSG_DONTWAIT
        assert outcome(m, mode, "sendto", 3, 0, 0, 0, 0x7000, 16) == ALLOWED
    assert outcome(m, S.CONFINED, "socket", inet, stream) == errno_of(errno.EACCES)
    for family in (inet, inet6):
        assert outcome(m, S.BROKERED, "socket", family, stream | nonblock_cloexec) == ALLOWED
        assert outcome(m, S.BROKERED, "socket", family, stream, 6) == ALLOWED  # IPPROTO_TCP
        assert outcome(m, S.BROKERED, "socket", family, stream, 262) == errno_of(errno.EACCES)  # MPTCP
        assert outcome(m, S.BROKERED, "socket", family, stream, 132) == errno_of(errno.EACCES)  # SCTP
        assert outcome(m, S.BROKERED, "socket", family, dgram) == errno_of(errno.EACCES)  # UDP
        assert outcome(m, S.BROKERED, "socket", family, raw) == errno_of(errno.EACCES)
    assert outcome(m, S.BROKERED, "socket", 16, 3) == errno_of(errno.EACCES)  # netlink
    for name in ("bind", "connect", "listen"):
        assert outcome(m, S.BROKERED, name) == NOTIFIED
        assert outcome(m, S.CONFINED, name) == ALLOWED


def test_each_call_is_decided_once_and_every_allowed_name_exists_somewhere():
    known = set(linux.SYSCALLS["x86_64"]) | set(linux.SYSCALLS["aarch64"])
    names = [n for rule in S.rules() for n in rule.names]
    assert len(names) == len(set(names))
    assert set(names) <= known, set(names) - known
    for machine in MACHINES:
        list(S.actions(machine, S.CONFINED))  # raises on a name given twice


def test_docs_show_the_list_as_the_code_has_it():
    """docs/sandbox.md holds the table `redoxcap syscalls --markdown` prints, word for word."""
    result = CliRunner().invoke(main, ["syscalls", "--markdown"])
    assert result.exit_code == 0, result.output
    doc = (Path(__file__).parent.parent / "docs" / "sandbox.md").read_text()
    section = re.search(r"<!-- syscalls: begin -->\n(.*)<!-- syscalls: end -->", doc, re.DOTALL)
    assert section is not None, "docs/sandbox.md lost its syscall table markers"
    assert section.group(1) == result.output


def test_redoxcap_syscalls_shows_what_a_call_gets_here():
    result = CliRunner().invoke(main, ["syscalls"])
    assert result.exit_code == 0, result.output
    lines = result.output.splitlines()
    row = next(i for i, ln in enumerate(lines) if ln.split()[:1] == ["prlimit64"])
    assert "checked" in lines[row] and lines[row + 1].split() == [
        "both:", "pid", "0", "(itself):", "allowed;", "else", "EPERM"]
    assert re.search(r"^openat\s+\d+\s+allowed\s+broker", result.output, re.MULTILINE)
    assert "ENOSYS" in result.output  # what the list does not name


def test_udp_only_where_the_run_grants_it_and_every_send_naming_an_address_goes_to_the_broker():
    m, inet, inet6, stream, dgram = "x86_64", 2, 10, 1, 2
    nonblock_cloexec = 0o4000 | 0o2000000
    for family in (inet, inet6):
        for protocol in (0, 17):  # IPPROTO_UDP
            assert outcome(m, S.BROKERED_UDP, "socket", family, dgram | nonblock_cloexec,
                           protocol) == ALLOWED
            assert outcome(m, S.BROKERED, "socket", family, dgram, protocol) == errno_of(errno.EACCES)
        for protocol in (1, 136):  # ICMP (ping sockets), UDP-Lite
            assert outcome(m, S.BROKERED_UDP, "socket", family, dgram, protocol) == \
                errno_of(errno.EACCES)
        assert outcome(m, S.BROKERED_UDP, "socket", family, stream, 6) == ALLOWED
        assert outcome(m, S.BROKERED_UDP, "socket", family, stream, 262) == errno_of(errno.EACCES)
        assert outcome(m, S.BROKERED_UDP, "socket", family, 3) == errno_of(errno.EACCES)  # raw
    assert outcome(m, S.BROKERED_UDP, "socket", 1, dgram) == errno_of(errno.EACCES)  # unix dgram
    # sendto(fd, buf, len, flags, addr, addrlen): addrlen 0 names nothing and stays native
    assert outcome(m, S.BROKERED_UDP, "sendto", 3, 0x1000, 5, 0, 0, 0) == ALLOWED
    assert outcome(m, S.BROKERED_UDP, "sendto", 3, 0x1000, 5, 0x40, 0x7000, 0) == ALLOWED
    assert outcome(m, S.BROKERED_UDP, "sendto", 3, 0x1000, 5, 0, 0x7000, 16) == NOTIFIED
    assert outcome(m, S.BROKERED_UDP, "sendto", 3, 0x1000, 5, 0, 0, 1 << 32 | 16) == NOTIFIED
    assert outcome(m, S.BROKERED_UDP, "sendto", 3, 0, 0, 0x2000_0000, 0x7000, 16) == \
        errno_of(errno.EACCES)  # MSG_FASTOPEN
    for name, flags_index in (("sendmsg", 2), ("sendmmsg", 3)):
        args = [3, 0x1000, 1, 0]
        assert outcome(m, S.BROKERED_UDP, name, *args) == NOTIFIED
        args[flags_index] = 0x2000_0000
        assert outcome(m, S.BROKERED_UDP, name, *args) == errno_of(errno.EACCES)
    for name in ("write", "writev", "recvfrom", "recvmsg", "sendfile"):
        assert outcome(m, S.BROKERED_UDP, name) == ALLOWED, name


@pytest.mark.parametrize("mode", [S.BROKERED, S.BROKERED_UDP])
def test_a_brokered_socket_never_carries_a_source_route(mode):
    """An IPv4 source route or an IPv6 routing header sends each packet to its first hop,
    which no grant names."""
    m = "x86_64"
    for level, optname in ((0, 4), (41, 57), (41, 5), (41, 6)):  # IP_OPTIONS, IPV6_RTHDR, 2292
        assert outcome(m, mode, "setsockopt", 3, level, optname) == errno_of(errno.EACCES)
    for level, optname in ((1, 2), (6, 1), (0, 1), (41, 26), (1, 4)):  # SO_REUSEADDR, TCP_NODELAY,
        assert outcome(m, mode, "setsockopt", 3, level, optname) == ALLOWED  # IP_TOS, V6ONLY...
    assert outcome(m, S.CONFINED, "setsockopt", 3, 0, 4) == ALLOWED  # no TCP or UDP at all there
