"""Attacks from a confined child on what it was not given: host metadata (chmod, chown,
utime, xattrs, ioctls on granted and scratch files) and the caller's terminal (TIOCSTI,
TIOCLINUX, its session); each compared with the same attack unconfined, which succeeds.
"""

from __future__ import annotations

import errno
import json
import os
import select
import struct
import subprocess
import sys
import textwrap

from test_confine import TIMEOUT, needs_landlock, results_of, run_confined

from redoxcap.sandbox import syscalls
from redoxcap.wire import linux

METADATA_ATTACKS = textwrap.dedent(
    """
    import ctypes, fcntl, os, struct
    libc = ctypes.CDLL(None, use_errno=True)
    libc.syscall.restype = ctypes.c_long
    L = ctypes.c_long
    AT_FDCWD = -100
    FS_IOC_GETFLAGS, FS_IOC_SETFLAGS = 0x80086601, 0x40086602

    def raw(nr, *args):
        def call():
            if libc.syscall(L(nr), *args) < 0:
                err = ctypes.get_errno()
                raise OSError(err, os.strerror(err))
        return call

    def setflags(fd):
        try:
            flags = fcntl.ioctl(fd, FS_IOC_GETFLAGS, bytes(8))
        except OSError:  # an O_PATH fd: the filter must refuse before the kernel looks
            flags = bytes(8)
        fcntl.ioctl(fd, FS_IOC_SETFLAGS, flags)

    def attacks(path, fd, nrs):
        b, uid, gid = os.fsencode(path), L(os.getuid()), L(os.getgid())
        value = ctypes.create_string_buffer(b"v")
        # struct xattr_args {u64 value; u32 size; u32 flags}; struct file_attr is 24 bytes.
        xargs = ctypes.create_string_buffer(struct.pack("=QII", ctypes.addressof(value), 1, 0))
        fattr = ctypes.create_string_buffer(24)
        args = {
            "chmod": (b, L(0o777)),
            "fchmod": (L(fd), L(0o777)),
            "fchmodat": (L(AT_FDCWD), b, L(0o777)),
            "fchmodat2": (L(AT_FDCWD), b, L(0o777), L(0)),
            "chown": (b, uid, gid),
            "fchown": (L(fd), uid, gid),
            "lchown": (b, uid, gid),
            "fchownat": (L(AT_FDCWD), b, uid, gid, L(0)),
            "utime": (b, None),
            "utimes": (b, None),
            "futimesat": (L(AT_FDCWD), b, None),
            "utimensat": (L(AT_FDCWD), b, None, L(0)),
            "setxattr": (b, b"user.new", value, L(1), L(0)),
            "lsetxattr": (b, b"user.new", value, L(1), L(0)),
            "fsetxattr": (L(fd), b"user.new", value, L(1), L(0)),
            "removexattr": (b, b"user.keep"),
            "lremovexattr": (b, b"user.keep"),
            "fremovexattr": (L(fd), b"user.keep"),
            "setxattrat": (L(AT_FDCWD), b, L(0), b"user.new", xargs, L(16)),
            "removexattrat": (L(AT_FDCWD), b, L(0), b"user.keep"),
            "file_setattr": (L(AT_FDCWD), b, fattr, L(24), L(0)),
        }
        out = {name: raw(nr, *args[name]) for name, nr in nrs.items()}
        out.update({
            "os.chmod": lambda: os.chmod(path, 0o777),
            "os.chown": lambda: os.chown(path, os.getuid(), os.getgid()),
            "os.utime": lambda: os.utime(path, (1, 1)),
            "os.setxattr": lambda: os.setxattr(path, "user.new", b"v"),
            "os.removexattr": lambda: os.removexattr(path, "user.keep"),
            "os.fchmod": lambda: os.fchmod(fd, 0o777),
            "os.utime(fd)": lambda: os.utime(fd, (1, 1)),
            "FS_IOC_SETFLAGS": lambda: setflags(fd),
        })
        return out
    """
)


def _metadata_syscalls() -> dict[str, int]:
    """The denied metadata syscalls this architecture has, by name."""
    machine = linux.machine()
    assert machine is not None
    nrs = linux.SYSCALLS[machine]
    return {n: nrs[n] for n in (*syscalls.METADATA, *syscalls.XATTR_WRITES) if n in nrs}


def _metadata_of(path) -> tuple:
    st = os.stat(path)
    xattrs = {name: os.getxattr(path, name) for name in os.listxattr(path)}
    return st.st_mode, st.st_uid, st.st_gid, st.st_mtime_ns, st.st_atime_ns, xattrs


def _prepare_victim(path) -> None:
    path.write_text("victim")
    os.chmod(path, 0o600)
    os.setxattr(path, "user.keep", b"kept")
    os.utime(path, ns=(1_000_000_000, 2_000_000_000))


def test_metadata_attacks_do_change_an_unconfined_file(tmp_path):
    """Control: each attack below does what its name says when nothing stops it."""
    nrs = _metadata_syscalls()
    code = METADATA_ATTACKS + textwrap.dedent(
        f"""
        import json
        results = {{}}
        for name in {sorted(nrs)!r} + ["os.chmod", "os.setxattr", "os.removexattr",
                                       "os.fchmod", "FS_IOC_SETFLAGS"]:
            path = os.path.join({str(tmp_path)!r}, name)
            with open(path, "w"):
                pass
            os.setxattr(path, "user.keep", b"kept")
            fd = os.open(path, os.O_RDWR)
            try:
                fn = attacks(path, fd, {nrs!r})[name]
                try:
                    fn()
                    results[name] = 0
                except OSError as exc:
                    results[name] = exc.errno
            finally:
                os.close(fd)
        print(json.dumps(results))
        """
    )
    proc = subprocess.run([sys.executable, "-c", code], check=False, capture_output=True,
                          text=True, timeout=TIMEOUT)
    assert proc.returncode == 0, proc.stderr
    results = json.loads(proc.stdout)
    assert results == dict.fromkeys(results, 0)
    assert os.stat(tmp_path / "chmod").st_mode & 0o777 == 0o777
    assert os.listxattr(tmp_path / "removexattrat") == []
    assert os.getxattr(tmp_path / "setxattr", "user.new") == b"v"


@needs_landlock
def test_metadata_of_host_granted_and_scratch_files_cannot_change(tmp_path):
    home = tmp_path / "home"
    granted = tmp_path / "granted"
    scratch = tmp_path / "scratch"
    for d in (home, granted, scratch):
        d.mkdir()
    host_file, granted_file = home / "token", granted / "script.py"
    for victim in (host_file, granted_file):
        _prepare_victim(victim)
    before = {str(p): _metadata_of(p) for p in (host_file, granted_file, home)}
    nrs = _metadata_syscalls()
    proc = run_confined(
        METADATA_ATTACKS + textwrap.dedent(
            f"""
            mine = os.path.join(os.environ["TMPDIR"], "mine")
            with open(mine, "w"):
                pass
            targets = {{
                # Visible only through stat: an O_PATH fd is all one gets.
                "host": ({str(host_file)!r}, os.open({str(host_file)!r}, os.O_PATH)),
                "host dir": ({str(home)!r}, os.open({str(home)!r}, os.O_PATH)),
                "granted": ({str(granted_file)!r}, os.open({str(granted_file)!r}, os.O_RDONLY)),
                "scratch": (mine, os.open(mine, os.O_RDWR)),
            }}
            for label, (path, fd) in targets.items():
                for name, fn in attacks(path, fd, {nrs!r}).items():
                    results[label + " " + name] = attempt(fn)
            results["scratch mode"] = oct(os.stat(mine).st_mode & 0o7777)
            """
        ),
        "--read",
        str(granted),
        "--write",
        str(scratch),
        cwd=tmp_path,
        env={**os.environ, "TMPDIR": str(scratch)},
    )
    res = results_of(proc)
    assert res.pop("scratch mode") == oct(0o666 & ~_umask())
    assert len(res) == 4 * (len(nrs) + 8)
    assert {k: v for k, v in res.items() if v != errno.EPERM} == {}
    assert {str(p): _metadata_of(p) for p in (host_file, granted_file, home)} == before


def _umask() -> int:
    mask = os.umask(0)
    os.umask(mask)
    return mask


# Terminal ioctls with an argument that would act if the filter let them through.
TERMINAL_ATTACKS = textwrap.dedent(
    """
    import ctypes, fcntl, struct
    TIOCSTI, TIOCLINUX, TIOCCONS, TIOCSETD, TIOCSCTTY, TIOCVHANGUP = (
        0x5412, 0x541C, 0x541D, 0x5423, 0x540E, 0x5437)
    terminal_attacks = {
        "TIOCSTI": lambda fd: [fcntl.ioctl(fd, TIOCSTI, bytes([c])) for c in b"touch /tmp/pwned\\n"],
        "TIOCLINUX": lambda fd: fcntl.ioctl(fd, TIOCLINUX, bytes([2]) + bytes(12)),
        "TIOCCONS": lambda fd: fcntl.ioctl(fd, TIOCCONS),
        "TIOCSETD": lambda fd: fcntl.ioctl(fd, TIOCSETD, struct.pack("i", 0)),
        "TIOCSCTTY": lambda fd: fcntl.ioctl(fd, TIOCSCTTY, 1),
        "TIOCVHANGUP": lambda fd: fcntl.ioctl(fd, TIOCVHANGUP),
    }

    def process_facts():
        with open("/proc/self/stat") as f:
            fields = f.read().rpartition(")")[2].split()
        caps = {line.split(":")[0]: int(line.split()[1], 16)
                for line in open("/proc/self/status") if line.startswith("Cap")}
        return {"session leader": int(fields[3]) == os.getpid(), "tty_nr": int(fields[4]),
                "caps": caps, "uid": os.getuid()}
    """
)


def _pending_input(fd: int) -> int:
    import fcntl
    import termios

    return struct.unpack("i", fcntl.ioctl(fd, termios.FIONREAD, bytes(4)))[0]


@needs_landlock
def test_a_client_cannot_inject_into_or_take_the_terminal_and_has_no_capabilities(tmp_path):
    import tty

    master, slave = os.openpty()
    try:
        tty.setraw(slave)  # FIONREAD then counts every pending byte, not only whole lines
        os.write(master, b"x")
        assert select.select([slave], [], [], TIMEOUT)[0]  # typed input reaches the queue later
        assert _pending_input(slave) == 1  # the probe sees pending input (TIOCSTI's is at once)
        os.read(slave, 1)
        proc = run_confined(
            TERMINAL_ATTACKS + textwrap.dedent(
                """
                for name, fn in terminal_attacks.items():
                    for fd in (0, 1, 2):
                        results[f"{name} fd{fd}"] = attempt(lambda: fn(fd))
                results.update(process_facts())
                """
            ),
            cwd=tmp_path,
            stdin=slave,
        )
        res = results_of(proc)
        assert _pending_input(slave) == 0
    finally:
        os.close(master)
        os.close(slave)
    facts = {k: res.pop(k) for k in ("session leader", "tty_nr", "caps", "uid")}
    assert res == dict.fromkeys(res, errno.EPERM) and len(res) == 18
    assert facts["session leader"] and facts["tty_nr"] == 0
    assert facts["uid"] == os.getuid()
    if os.geteuid() == 0:
        assert facts["caps"] == dict.fromkeys(facts["caps"], 0)
    else:
        assert {k: v for k, v in facts["caps"].items() if k != "CapBnd"} == {
            "CapInh": 0, "CapPrm": 0, "CapEff": 0, "CapAmb": 0}
