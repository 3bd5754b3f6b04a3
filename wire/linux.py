"""What Python's os and socket modules lack of Linux, in one place: calls, constants, layouts.

Every ctypes call into libc in the project goes through here (raw syscall(2),
prctl(2), openat2(2), ioctl(2)), so that the syscall numbers, the errno
handling and the one libc handle live once; so do the constants and struct
layouts of Linux's headers that os and socket do not define (AT_*, RESOLVE_*,
seccomp and BPF, struct ucred), and `identity`, which tells one socket or file
from another. The sandbox, the broker, the router and the file scheme use
these; x86_64 and aarch64 are supported, elsewhere `syscall` raises ENOSYS.
"""

from __future__ import annotations

import ctypes
import errno
import os
import platform
import struct

# Syscall numbers of every call, by machine: x86_64 (asm/unistd_64.h) and aarch64
# (asm-generic/unistd.h, 64-bit), up to Linux 6.18. aarch64 has only the *at forms of the
# path calls (no open, stat, chmod ...). The seccomp filters (redoxcap/sandbox/syscalls.py)
# allow calls by these names; a name a machine lacks is skipped there.
SYSCALLS: dict[str, dict[str, int]] = {
    "x86_64": {  # asm/unistd_64.h
        "read": 0, "write": 1, "open": 2, "close": 3, "stat": 4, "fstat": 5, "lstat": 6, "poll": 7,
        "lseek": 8, "mmap": 9, "mprotect": 10, "munmap": 11, "brk": 12, "rt_sigaction": 13,
        "rt_sigprocmask": 14, "rt_sigreturn": 15, "ioctl": 16, "pread64": 17, "pwrite64": 18,
        "readv": 19, "writev": 20, "access": 21, "pipe": 22, "select": 23, "sched_yield": 24,
        "mremap": 25, "msync": 26, "mincore": 27, "madvise": 28, "shmget": 29, "shmat": 30,
        "shmctl": 31, "dup": 32, "dup2": 33, "pause": 34, "nanosleep": 35, "getitimer": 36, "alarm":
        37, "setitimer": 38, "getpid": 39, "sendfile": 40, "socket": 41, "connect": 42, "accept":
        43, "sendto": 44, "recvfrom": 45, "sendmsg": 46, "recvmsg": 47, "shutdown": 48, "bind": 49,
        "listen": 50, "getsockname": 51, "getpeername": 52, "socketpair": 53, "setsockopt": 54,
        "getsockopt": 55, "clone": 56, "fork": 57, "vfork": 58, "execve": 59, "exit": 60, "wait4":
        61, "kill": 62, "uname": 63, "semget": 64, "semop": 65, "semctl": 66, "shmdt": 67, "msgget":
        68, "msgsnd": 69, "msgrcv": 70, "msgctl": 71, "fcntl": 72, "flock": 73, "fsync": 74,
        "fdatasync": 75, "truncate": 76, "ftruncate": 77, "getdents": 78, "getcwd": 79, "chdir": 80,
        "fchdir": 81, "rename": 82, "mkdir": 83, "rmdir": 84, "creat": 85, "link": 86, "unlink": 87,
        "symlink": 88, "readlink": 89, "chmod": 90, "fchmod": 91, "chown": 92, "fchown": 93,
        "lchown": 94, "umask": 95, "gettimeofday": 96, "getrlimit": 97, "getrusage": 98, "sysinfo":
        99, "times": 100, "ptrace": 101, "getuid": 102, "syslog": 103, "getgid": 104, "setuid": 105,
        "setgid": 106, "geteuid": 107, "getegid": 108, "setpgid": 109, "getppid": 110, "getpgrp":
        111, "setsid": 112, "setreuid": 113, "setregid": 114, "getgroups": 115, "setgroups": 116,
        "setresuid": 117, "getresuid": 118, "setresgid": 119, "getresgid": 120, "getpgid": 121,
        "setfsuid": 122, "setfsgid": 123, "getsid": 124, "capget": 125, "capset": 126,
        "rt_sigpending": 127, "rt_sigtimedwait": 128, "rt_sigqueueinfo": 129, "rt_sigsuspend": 130,
        "sigaltstack": 131, "utime": 132, "mknod": 133, "uselib": 134, "personality": 135, "ustat":
        136, "statfs": 137, "fstatfs": 138, "sysfs": 139, "getpriority": 140, "setpriority": 141,
        "sched_setparam": 142, "sched_getparam": 143, "sched_setscheduler": 144,
        "sched_getscheduler": 145, "sched_get_priority_max": 146, "sched_get_priority_min": 147,
        "sched_rr_get_interval": 148, "mlock": 149, "munlock": 150, "mlockall": 151, "munlockall":
        152, "vhangup": 153, "modify_ldt": 154, "pivot_root": 155, "_sysctl": 156, "prctl": 157,
        "arch_prctl": 158, "adjtimex": 159, "setrlimit": 160, "chroot": 161, "sync": 162, "acct":
        163, "settimeofday": 164, "mount": 165, "umount2": 166, "swapon": 167, "swapoff": 168,
        "reboot": 169, "sethostname": 170, "setdomainname": 171, "iopl": 172, "ioperm": 173,
        "create_module": 174, "init_module": 175, "delete_module": 176, "get_kernel_syms": 177,
        "query_module": 178, "quotactl": 179, "nfsservctl": 180, "getpmsg": 181, "putpmsg": 182,
        "afs_syscall": 183, "tuxcall": 184, "security": 185, "gettid": 186, "readahead": 187,
        "setxattr": 188, "lsetxattr": 189, "fsetxattr": 190, "getxattr": 191, "lgetxattr": 192,
        "fgetxattr": 193, "listxattr": 194, "llistxattr": 195, "flistxattr": 196, "removexattr":
        197, "lremovexattr": 198, "fremovexattr": 199, "tkill": 200, "time": 201, "futex": 202,
        "sched_setaffinity": 203, "sched_getaffinity": 204, "set_thread_area": 205, "io_setup": 206,
        "io_destroy": 207, "io_getevents": 208, "io_submit": 209, "io_cancel": 210,
        "get_thread_area": 211, "lookup_dcookie": 212, "epoll_create": 213, "epoll_ctl_old": 214,
        "epoll_wait_old": 215, "remap_file_pages": 216, "getdents64": 217, "set_tid_address": 218,
        "restart_syscall": 219, "semtimedop": 220, "fadvise64": 221, "timer_create": 222,
        "timer_settime": 223, "timer_gettime": 224, "timer_getoverrun": 225, "timer_delete": 226,
        "clock_settime": 227, "clock_gettime": 228, "clock_getres": 229, "clock_nanosleep": 230,
        "exit_group": 231, "epoll_wait": 232, "epoll_ctl": 233, "tgkill": 234, "utimes": 235,
        "vserver": 236, "mbind": 237, "set_mempolicy": 238, "get_mempolicy": 239, "mq_open": 240,
        "mq_unlink": 241, "mq_timedsend": 242, "mq_timedreceive": 243, "mq_notify": 244,
        "mq_getsetattr": 245, "kexec_load": 246, "waitid": 247, "add_key": 248, "request_key": 249,
        "keyctl": 250, "ioprio_set": 251, "ioprio_get": 252, "inotify_init": 253,
        "inotify_add_watch": 254, "inotify_rm_watch": 255, "migrate_pages": 256, "openat": 257,
        "mkdirat": 258, "mknodat": 259, "fchownat": 260, "futimesat": 261, "newfstatat": 262,
        "unlinkat": 263, "renameat": 264, "linkat": 265, "symlinkat": 266, "readlinkat": 267,
        "fchmodat": 268, "faccessat": 269, "pselect6": 270, "ppoll": 271, "unshare": 272,
        "set_robust_list": 273, "get_robust_list": 274, "splice": 275, "tee": 276,
        "sync_file_range": 277, "vmsplice": 278, "move_pages": 279, "utimensat": 280, "epoll_pwait":
        281, "signalfd": 282, "timerfd_create": 283, "eventfd": 284, "fallocate": 285,
        "timerfd_settime": 286, "timerfd_gettime": 287, "accept4": 288, "signalfd4": 289,
        "eventfd2": 290, "epoll_create1": 291, "dup3": 292, "pipe2": 293, "inotify_init1": 294,
        "preadv": 295, "pwritev": 296, "rt_tgsigqueueinfo": 297, "perf_event_open": 298, "recvmmsg":
        299, "fanotify_init": 300, "fanotify_mark": 301, "prlimit64": 302, "name_to_handle_at": 303,
        "open_by_handle_at": 304, "clock_adjtime": 305, "syncfs": 306, "sendmmsg": 307, "setns":
        308, "getcpu": 309, "process_vm_readv": 310, "process_vm_writev": 311, "kcmp": 312,
        "finit_module": 313, "sched_setattr": 314, "sched_getattr": 315, "renameat2": 316,
        "seccomp": 317, "getrandom": 318, "memfd_create": 319, "kexec_file_load": 320, "bpf": 321,
        "execveat": 322, "userfaultfd": 323, "membarrier": 324, "mlock2": 325, "copy_file_range":
        326, "preadv2": 327, "pwritev2": 328, "pkey_mprotect": 329, "pkey_alloc": 330, "pkey_free":
        331, "statx": 332, "io_pgetevents": 333, "rseq": 334, "uretprobe": 335, "pidfd_send_signal":
        424, "io_uring_setup": 425, "io_uring_enter": 426, "io_uring_register": 427, "open_tree":
        428, "move_mount": 429, "fsopen": 430, "fsconfig": 431, "fsmount": 432, "fspick": 433,
        "pidfd_open": 434, "clone3": 435, "close_range": 436, "openat2": 437, "pidfd_getfd": 438,
        "faccessat2": 439, "process_madvise": 440, "epoll_pwait2": 441, "mount_setattr": 442,
        "quotactl_fd": 443, "landlock_create_ruleset": 444, "landlock_add_rule": 445,
        "landlock_restrict_self": 446, "memfd_secret": 447, "process_mrelease": 448, "futex_waitv":
        449, "set_mempolicy_home_node": 450, "cachestat": 451, "fchmodat2": 452, "map_shadow_stack":
        453, "futex_wake": 454, "futex_wait": 455, "futex_requeue": 456, "statmount": 457,
        "listmount": 458, "lsm_get_self_attr": 459, "lsm_set_self_attr": 460, "lsm_list_modules":
        461, "mseal": 462, "setxattrat": 463, "getxattrat": 464, "listxattrat": 465,
        "removexattrat": 466, "open_tree_attr": 467, "file_getattr": 468, "file_setattr": 469
    },
    "aarch64": {  # asm-generic/unistd.h, 64-bit
        "io_setup": 0, "io_destroy": 1, "io_submit": 2, "io_cancel": 3, "io_getevents": 4,
        "setxattr": 5, "lsetxattr": 6, "fsetxattr": 7, "getxattr": 8, "lgetxattr": 9, "fgetxattr":
        10, "listxattr": 11, "llistxattr": 12, "flistxattr": 13, "removexattr": 14, "lremovexattr":
        15, "fremovexattr": 16, "getcwd": 17, "lookup_dcookie": 18, "eventfd2": 19, "epoll_create1":
        20, "epoll_ctl": 21, "epoll_pwait": 22, "dup": 23, "dup3": 24, "fcntl": 25, "inotify_init1":
        26, "inotify_add_watch": 27, "inotify_rm_watch": 28, "ioctl": 29, "ioprio_set": 30,
        "ioprio_get": 31, "flock": 32, "mknodat": 33, "mkdirat": 34, "unlinkat": 35, "symlinkat":
        36, "linkat": 37, "renameat": 38, "umount2": 39, "mount": 40, "pivot_root": 41,
        "nfsservctl": 42, "statfs": 43, "fstatfs": 44, "truncate": 45, "ftruncate": 46, "fallocate":
        47, "faccessat": 48, "chdir": 49, "fchdir": 50, "chroot": 51, "fchmod": 52, "fchmodat": 53,
        "fchownat": 54, "fchown": 55, "openat": 56, "close": 57, "vhangup": 58, "pipe2": 59,
        "quotactl": 60, "getdents64": 61, "lseek": 62, "read": 63, "write": 64, "readv": 65,
        "writev": 66, "pread64": 67, "pwrite64": 68, "preadv": 69, "pwritev": 70, "sendfile": 71,
        "pselect6": 72, "ppoll": 73, "signalfd4": 74, "vmsplice": 75, "splice": 76, "tee": 77,
        "readlinkat": 78, "newfstatat": 79, "fstat": 80, "sync": 81, "fsync": 82, "fdatasync": 83,
        "sync_file_range": 84, "timerfd_create": 85, "timerfd_settime": 86, "timerfd_gettime": 87,
        "utimensat": 88, "acct": 89, "capget": 90, "capset": 91, "personality": 92, "exit": 93,
        "exit_group": 94, "waitid": 95, "set_tid_address": 96, "unshare": 97, "futex": 98,
        "set_robust_list": 99, "get_robust_list": 100, "nanosleep": 101, "getitimer": 102,
        "setitimer": 103, "kexec_load": 104, "init_module": 105, "delete_module": 106,
        "timer_create": 107, "timer_gettime": 108, "timer_getoverrun": 109, "timer_settime": 110,
        "timer_delete": 111, "clock_settime": 112, "clock_gettime": 113, "clock_getres": 114,
        "clock_nanosleep": 115, "syslog": 116, "ptrace": 117, "sched_setparam": 118,
        "sched_setscheduler": 119, "sched_getscheduler": 120, "sched_getparam": 121,
        "sched_setaffinity": 122, "sched_getaffinity": 123, "sched_yield": 124,
        "sched_get_priority_max": 125, "sched_get_priority_min": 126, "sched_rr_get_interval": 127,
        "restart_syscall": 128, "kill": 129, "tkill": 130, "tgkill": 131, "sigaltstack": 132,
        "rt_sigsuspend": 133, "rt_sigaction": 134, "rt_sigprocmask": 135, "rt_sigpending": 136,
        "rt_sigtimedwait": 137, "rt_sigqueueinfo": 138, "rt_sigreturn": 139, "setpriority": 140,
        "getpriority": 141, "reboot": 142, "setregid": 143, "setgid": 144, "setreuid": 145,
        "setuid": 146, "setresuid": 147, "getresuid": 148, "setresgid": 149, "getresgid": 150,
        "setfsuid": 151, "setfsgid": 152, "times": 153, "setpgid": 154, "getpgid": 155, "getsid":
        156, "setsid": 157, "getgroups": 158, "setgroups": 159, "uname": 160, "sethostname": 161,
        "setdomainname": 162, "getrlimit": 163, "setrlimit": 164, "getrusage": 165, "umask": 166,
        "prctl": 167, "getcpu": 168, "gettimeofday": 169, "settimeofday": 170, "adjtimex": 171,
        "getpid": 172, "getppid": 173, "getuid": 174, "geteuid": 175, "getgid": 176, "getegid": 177,
        "gettid": 178, "sysinfo": 179, "mq_open": 180, "mq_unlink": 181, "mq_timedsend": 182,
        "mq_timedreceive": 183, "mq_notify": 184, "mq_getsetattr": 185, "msgget": 186, "msgctl":
        187, "msgrcv": 188, "msgsnd": 189, "semget": 190, "semctl": 191, "semtimedop": 192, "semop":
        193, "shmget": 194, "shmctl": 195, "shmat": 196, "shmdt": 197, "socket": 198, "socketpair":
        199, "bind": 200, "listen": 201, "accept": 202, "connect": 203, "getsockname": 204,
        "getpeername": 205, "sendto": 206, "recvfrom": 207, "setsockopt": 208, "getsockopt": 209,
        "shutdown": 210, "sendmsg": 211, "recvmsg": 212, "readahead": 213, "brk": 214, "munmap":
        215, "mremap": 216, "add_key": 217, "request_key": 218, "keyctl": 219, "clone": 220,
        "execve": 221, "mmap": 222, "fadvise64": 223, "swapon": 224, "swapoff": 225, "mprotect":
        226, "msync": 227, "mlock": 228, "munlock": 229, "mlockall": 230, "munlockall": 231,
        "mincore": 232, "madvise": 233, "remap_file_pages": 234, "mbind": 235, "get_mempolicy": 236,
        "set_mempolicy": 237, "migrate_pages": 238, "move_pages": 239, "rt_tgsigqueueinfo": 240,
        "perf_event_open": 241, "accept4": 242, "recvmmsg": 243, "wait4": 260, "prlimit64": 261,
        "fanotify_init": 262, "fanotify_mark": 263, "name_to_handle_at": 264, "open_by_handle_at":
        265, "clock_adjtime": 266, "syncfs": 267, "setns": 268, "sendmmsg": 269, "process_vm_readv":
        270, "process_vm_writev": 271, "kcmp": 272, "finit_module": 273, "sched_setattr": 274,
        "sched_getattr": 275, "renameat2": 276, "seccomp": 277, "getrandom": 278, "memfd_create":
        279, "bpf": 280, "execveat": 281, "userfaultfd": 282, "membarrier": 283, "mlock2": 284,
        "copy_file_range": 285, "preadv2": 286, "pwritev2": 287, "pkey_mprotect": 288, "pkey_alloc":
        289, "pkey_free": 290, "statx": 291, "io_pgetevents": 292, "rseq": 293, "kexec_file_load":
        294, "pidfd_send_signal": 424, "io_uring_setup": 425, "io_uring_enter": 426,
        "io_uring_register": 427, "open_tree": 428, "move_mount": 429, "fsopen": 430, "fsconfig":
        431, "fsmount": 432, "fspick": 433, "pidfd_open": 434, "clone3": 435, "close_range": 436,
        "openat2": 437, "pidfd_getfd": 438, "faccessat2": 439, "process_madvise": 440,
        "epoll_pwait2": 441, "mount_setattr": 442, "quotactl_fd": 443, "landlock_create_ruleset":
        444, "landlock_add_rule": 445, "landlock_restrict_self": 446, "memfd_secret": 447,
        "process_mrelease": 448, "futex_waitv": 449, "set_mempolicy_home_node": 450, "cachestat":
        451, "fchmodat2": 452, "futex_wake": 454, "futex_wait": 455, "futex_requeue": 456,
        "statmount": 457, "listmount": 458, "lsm_get_self_attr": 459, "lsm_set_self_attr": 460,
        "lsm_list_modules": 461, "mseal": 462, "setxattrat": 463, "getxattrat": 464, "listxattrat":
        465, "removexattrat": 466, "open_tree_attr": 467, "file_getattr": 468, "file_setattr": 469
    },
}
_MACHINE_ALIASES = {"amd64": "x86_64", "arm64": "aarch64"}

# linux/fcntl.h: the flags of the *at calls
AT_FDCWD = -100
AT_SYMLINK_NOFOLLOW = 0x100
AT_REMOVEDIR = 0x200
AT_EACCESS = 0x200  # faccessat's flag: the same bit as AT_REMOVEDIR, for another call
AT_EMPTY_PATH = 0x1000
RENAME_NOREPLACE = 1  # renameat2

# linux/openat2.h
RESOLVE_NO_XDEV = 0x01
RESOLVE_NO_MAGICLINKS = 0x02
RESOLVE_NO_SYMLINKS = 0x04
RESOLVE_BENEATH = 0x08
RESOLVE_IN_ROOT = 0x10
RESOLVE_CACHED = 0x20
OPEN_HOW = struct.Struct("QQQ")  # struct open_how: flags, mode, resolve
_HOW_SIZE = ctypes.c_ulong(OPEN_HOW.size)  # openat2's size argument, a full word
# Linux's O_LARGEFILE bit per machine (os.O_LARGEFILE is 0 on 64-bit machines; programs pass it)
O_LARGEFILE = {"x86_64": 0o100000, "aarch64": 0o400000}

# linux/limits.h and fs/namei.c
PATH_MAX = 4096  # bytes of a path, with the terminating NUL
O_TMPFILE_BIT = os.O_TMPFILE & ~os.O_DIRECTORY  # O_TMPFILE includes O_DIRECTORY
UTIME_NOW, UTIME_OMIT = (1 << 30) - 1, (1 << 30) - 2  # utimensat's timespec tv_nsec
ID_UNCHANGED = 0xFFFF_FFFF  # uid_t/gid_t -1: chown leaves it
MAXSYMLINKS = 40  # symlinks followed in one lookup

# dirent.h: d_type; linux/stat.h: the statx mask of what struct stat holds
DT_UNKNOWN, DT_DIR, DT_REG, DT_LNK = 0, 4, 8, 10
STATX_BASIC_STATS = 0x7FF
# struct stat of asm/stat.h (x86_64) and of asm-generic/stat.h (aarch64), struct statx of
# linux/stat.h, and the head of struct linux_dirent64 (d_ino, d_off, d_reclen, d_type; the name)
STAT_X86_64 = struct.Struct("=QQQIIIiQqqqqqqqqq24x")  # 144 bytes
STAT_GENERIC = struct.Struct("=QQIIIIQQqi4xqqQqQqQ8x")  # 128 bytes
STATX = struct.Struct("=IIQIIIHHQQQQ" + "qIi" * 4 + "IIII" + "112x")  # 256 bytes
DIRENT64_HEAD = struct.Struct("=QqHB")

# linux/sched.h: clone(2) flags; CLONE_NEW_NAMESPACES is every CLONE_NEW* bit (NEWNS NEWCGROUP
# NEWUTS NEWIPC NEWUSER NEWPID NEWNET NEWTIME), CLONE_THREAD makes a thread, not a process
CLONE_THREAD = 0x0001_0000
CLONE_NEW_NAMESPACES = 0x7E02_0080

# linux/net.h: a socket(2) type without SOCK_NONBLOCK and SOCK_CLOEXEC
SOCK_TYPE_MASK = 0xF
SOCKADDR_STORAGE_SIZE = 128  # sizeof(struct sockaddr_storage): the longest address a call names

# struct ucred: what SO_PEERCRED and SCM_CREDENTIALS carry
UCRED = struct.Struct("iII")  # pid, uid, gid

# linux/prctl.h
PR_SET_PDEATHSIG = 1
PR_SET_DUMPABLE = 4
PR_SET_SECCOMP = 22
PR_CAPBSET_DROP = 24
PR_SET_NO_NEW_PRIVS = 38
PR_CAP_AMBIENT = 47
PR_CAP_AMBIENT_CLEAR_ALL = 4

# linux/seccomp.h
SECCOMP_MODE_FILTER = 2
SECCOMP_RET_DATA = 0x0000_FFFF  # the errno (or data) part of a return value
# struct seccomp_data: int nr; __u32 arch; __u64 instruction_pointer; __u64 args[6].
# The args offsets are their low 32 bits on little-endian machines.
SECCOMP_DATA_NR, SECCOMP_DATA_ARCH, SECCOMP_DATA_ARG0, SECCOMP_DATA_ARG1 = 0, 4, 16, 24

# linux/bpf_common.h: the classic BPF opcodes a seccomp filter is made of
BPF_LD, BPF_ALU, BPF_JMP, BPF_RET = 0x00, 0x04, 0x05, 0x06
BPF_W, BPF_ABS, BPF_K = 0x00, 0x20, 0x00
BPF_JA, BPF_AND, BPF_JEQ, BPF_JGE, BPF_JSET = 0x00, 0x50, 0x10, 0x30, 0x40

# linux/seccomp.h: filters that hand a syscall to a supervising process (the broker)
SECCOMP_SET_MODE_FILTER = 1
SECCOMP_GET_NOTIF_SIZES = 3
SECCOMP_FILTER_FLAG_NEW_LISTENER = 1 << 3
SECCOMP_FILTER_FLAG_WAIT_KILLABLE_RECV = 1 << 5  # Linux 6.0: only a fatal signal interrupts
SECCOMP_RET_KILL_PROCESS = 0x8000_0000
SECCOMP_RET_ERRNO = 0x0005_0000
SECCOMP_RET_USER_NOTIF = 0x7FC0_0000
SECCOMP_RET_ALLOW = 0x7FFF_0000
SECCOMP_USER_NOTIF_FLAG_CONTINUE = 1
SECCOMP_ADDFD_FLAG_SETFD = 1
SECCOMP_ADDFD_FLAG_SEND = 2
SECCOMP_USER_NOTIF_FD_SYNC_WAKE_UP = 1  # Linux 6.6: wake the waiter on the broker's CPU
# _IOWR('!', 0, struct seccomp_notif) and friends (the same on x86_64 and aarch64)
SECCOMP_IOCTL_NOTIF_RECV = 0xC050_2100
SECCOMP_IOCTL_NOTIF_SEND = 0xC018_2101
SECCOMP_IOCTL_NOTIF_ID_VALID = 0x4008_2102
SECCOMP_IOCTL_NOTIF_ADDFD = 0x4018_2103
SECCOMP_IOCTL_NOTIF_SET_FLAGS = 0x4008_2104
# linux/seccomp.h's structs: seccomp_notif {id, pid, flags, data {nr, arch, ip, args[6]}},
# seccomp_notif_resp {id, val, error, flags}, seccomp_notif_addfd {id, flags, srcfd, newfd,
# newfd_flags}, and a notification id (ID_VALID) or flags word (SET_FLAGS)
SECCOMP_NOTIF = struct.Struct("=QIIiIQ6Q")  # 80 bytes
SECCOMP_NOTIF_RESP = struct.Struct("=QqiI")  # 24 bytes
SECCOMP_NOTIF_ADDFD = struct.Struct("=QIIII")  # 24 bytes
SECCOMP_NOTIF_U64 = struct.Struct("=Q")
# linux/audit.h: the arch word of struct seccomp_data
AUDIT_ARCH = {"x86_64": 0xC000_003E, "aarch64": 0xC000_00B7}
X32_SYSCALL_BIT = 0x4000_0000  # x86_64: x32 calls share AUDIT_ARCH_X86_64

# Arguments the seccomp allow-list checks (redoxcap/sandbox/syscalls.py). The kernel reads each
# of them as a 32-bit int, so the filters compare the low word of the argument.
# sys/resource.h, linux/ioprio.h, linux/personality.h
PRIO_PROCESS = 0
IOPRIO_WHO_PROCESS = 1
PERSONALITY_QUERY = 0xFFFF_FFFF
PER_LINUX = 0
ADDR_NO_RANDOMIZE = 0x0004_0000
# fcntl(2) commands (asm-generic/fcntl.h, linux/fcntl.h)
FCNTL_COMMANDS = {
    "F_DUPFD": 0, "F_GETFD": 1, "F_SETFD": 2, "F_GETFL": 3, "F_SETFL": 4, "F_GETLK": 5,
    "F_SETLK": 6, "F_SETLKW": 7, "F_SETOWN": 8, "F_GETOWN": 9, "F_SETSIG": 10, "F_GETSIG": 11,
    "F_SETOWN_EX": 15, "F_GETOWN_EX": 16, "F_OFD_GETLK": 36, "F_OFD_SETLK": 37,
    "F_OFD_SETLKW": 38, "F_SETLEASE": 1024, "F_GETLEASE": 1025, "F_NOTIFY": 1026,
    "F_DUPFD_QUERY": 1027, "F_CANCELLK": 1029, "F_DUPFD_CLOEXEC": 1030, "F_SETPIPE_SZ": 1031,
    "F_GETPIPE_SZ": 1032, "F_ADD_SEALS": 1033, "F_GET_SEALS": 1034, "F_GET_RW_HINT": 1035,
    "F_SET_RW_HINT": 1036, "F_GET_FILE_RW_HINT": 1037, "F_SET_FILE_RW_HINT": 1038,
}
# prctl(2) options (linux/prctl.h)
PRCTL_OPTIONS = {
    "PR_SET_PDEATHSIG": 1, "PR_GET_PDEATHSIG": 2, "PR_GET_DUMPABLE": 3, "PR_SET_DUMPABLE": 4,
    "PR_GET_KEEPCAPS": 7, "PR_SET_KEEPCAPS": 8, "PR_SET_NAME": 15, "PR_GET_NAME": 16,
    "PR_GET_SECCOMP": 21, "PR_SET_SECCOMP": 22, "PR_CAPBSET_READ": 23, "PR_CAPBSET_DROP": 24,
    "PR_GET_SECUREBITS": 27, "PR_SET_SECUREBITS": 28, "PR_SET_TIMERSLACK": 29,
    "PR_GET_TIMERSLACK": 30, "PR_SET_MM": 35, "PR_SET_CHILD_SUBREAPER": 36,
    "PR_GET_CHILD_SUBREAPER": 37, "PR_SET_NO_NEW_PRIVS": 38, "PR_GET_NO_NEW_PRIVS": 39,
    "PR_GET_TID_ADDRESS": 40, "PR_SET_THP_DISABLE": 41, "PR_GET_THP_DISABLE": 42,
    "PR_CAP_AMBIENT": 47, "PR_GET_SPECULATION_CTRL": 52, "PR_SET_SPECULATION_CTRL": 53,
    "PR_SCHED_CORE": 62, "PR_SET_MDWE": 65, "PR_GET_MDWE": 66, "PR_SET_PTRACER": 0x5961_6D61,
    "PR_SET_VMA": 0x5356_4D41, "PR_GET_AUXV": 0x4155_5856,
}
# ioctl(2) requests by name (asm-generic/ioctls.h, linux/fs.h, linux/random.h; the same numbers
# on x86_64 and aarch64).
IOCTLS = {
    # terminals: read and set the line settings, the window size, the foreground group
    "TCGETS": 0x5401, "TCSETS": 0x5402, "TCSETSW": 0x5403, "TCSETSF": 0x5404, "TCGETA": 0x5405,
    "TCSETA": 0x5406, "TCSETAW": 0x5407, "TCSETAF": 0x5408, "TCSBRK": 0x5409, "TCXONC": 0x540A,
    "TCFLSH": 0x540B, "TIOCEXCL": 0x540C, "TIOCNXCL": 0x540D, "TIOCSCTTY": 0x540E,
    "TIOCGPGRP": 0x540F, "TIOCSPGRP": 0x5410, "TIOCOUTQ": 0x5411, "TIOCSTI": 0x5412,
    "TIOCGWINSZ": 0x5413, "TIOCSWINSZ": 0x5414, "TIOCMGET": 0x5415, "TIOCMSET": 0x5418,
    "FIONREAD": 0x541B, "TIOCLINUX": 0x541C, "TIOCCONS": 0x541D, "FIONBIO": 0x5421,
    "TIOCNOTTY": 0x5422, "TIOCSETD": 0x5423, "TIOCGETD": 0x5424, "TIOCSBRK": 0x5427,
    "TIOCCBRK": 0x5428, "TIOCGSID": 0x5429, "TCGETS2": 0x802C_542A, "TCSETS2": 0x402C_542B,
    "TCSETSW2": 0x402C_542C, "TCSETSF2": 0x402C_542D, "TIOCGPTN": 0x8004_5430,
    "TIOCSPTLCK": 0x4004_5431, "TIOCVHANGUP": 0x5437, "TIOCGPTLCK": 0x8004_5439,
    "TIOCGPTPEER": 0x5441, "FIONCLEX": 0x5450, "FIOCLEX": 0x5451, "FIOASYNC": 0x5452,
    "FIOQSIZE": 0x5460,
    # files: block size, extents, flags and version (reads), clones of the caller's own data;
    # and what changes a file it may only read
    "FIBMAP": 1, "FIGETBSZ": 2, "FS_IOC_GETFLAGS": 0x8008_6601, "FS_IOC_SETFLAGS": 0x4008_6602,
    "FS_IOC_GETVERSION": 0x8008_7601, "FS_IOC_SETVERSION": 0x4008_7602,
    "EXT4_IOC_SETVERSION": 0x4008_6604, "FS_IOC_FIEMAP": 0xC020_660B,
    "FS_IOC_FSGETXATTR": 0x801C_581F, "FS_IOC_FSSETXATTR": 0x401C_5820,
    "FICLONE": 0x4004_9409, "FICLONERANGE": 0x4020_940D, "FIDEDUPERANGE": 0xC018_9436,
    "RNDGETENTCNT": 0x8004_5200,
}
# sys/socket.h
AF_UNIX, AF_INET, AF_INET6 = 1, 2, 10
IPPROTO_TCP = 6
IPPROTO_UDP = 17
IPPROTO_IP, IPPROTO_IPV6 = 0, 41
IP_OPTIONS = 4  # IPv4 options on every packet; a source route sends it to its first hop
# IPv6 routing headers (sticky, or in RFC 2292 packet options) route a packet through hops
IPV6_2292RTHDR, IPV6_2292PKTOPTIONS, IPV6_RTHDR = 5, 6, 57
MSG_FASTOPEN = 0x2000_0000  # sendto/sendmsg: connect a TCP socket without connect(2)
MSG_NOSIGNAL = 0x4000  # a send on a broken stream answers EPIPE without SIGPIPE
SOCK_STREAM = 1
SOCK_DGRAM = 2
SOCK_SEQPACKET = 5
SOL_SOCKET, SCM_RIGHTS = 1, 1
UIO_MAXIOV = 1024  # the most iovecs one sendmsg takes (EMSGSIZE beyond)
# struct msghdr, struct mmsghdr, struct iovec and struct cmsghdr (LP64: x86_64 and aarch64)
MSGHDR = struct.Struct("=QI4xQQQQi4x")  # name, namelen, iov, iovlen, control, controllen, flags
MMSGHDR_SIZE = MSGHDR.size + 8  # msghdr, then unsigned int msg_len (padded)
IOVEC = struct.Struct("=QQ")  # base, len
CMSGHDR = struct.Struct("=Qii")  # len, level, type (data follows, 8-aligned)
# sys/resource.h
RLIMIT_CORE = 4

SyscallArg = int | bytes | bytearray | ctypes.c_void_p | ctypes.c_int | None

_libc: ctypes.CDLL | None = None


def identity(st: os.stat_result) -> int:
    """What tells one socket or file from every other: its inode and its filesystem, in one int.

    Both, or a file on another filesystem with the same inode number could pose
    as it; one int, because a tuple of two costs each of the router's
    capabilities 0.1 KiB more.
    """
    return st.st_dev << 64 | st.st_ino


def machine() -> str | None:
    """The machine name SYSCALLS knows this host by (None: an unsupported architecture)."""
    name = platform.machine().lower()
    name = _MACHINE_ALIASES.get(name, name)
    return name if name in SYSCALLS else None


def libc() -> ctypes.CDLL:
    """The process's libc, with errno kept for every call."""
    global _libc
    if _libc is None:
        lib = ctypes.CDLL(None, use_errno=True)
        lib.syscall.restype = ctypes.c_long
        lib.prctl.restype = ctypes.c_int
        _libc = lib
    return _libc


def _word(arg: SyscallArg) -> object:
    """arg as syscall(2) takes it: a full machine word or a pointer."""
    if isinstance(arg, int):
        return ctypes.c_ulong(arg)
    if isinstance(arg, bytearray):
        return (ctypes.c_char * len(arg)).from_buffer(arg)
    return arg


def syscall(name: str, *args: SyscallArg) -> int:
    """Invoke the raw syscall called name (a key of SYSCALLS).

    Args:
        name: the syscall.
        args: its arguments; ints are passed as full machine words (syscall(2)
            is variadic), bytes as pointers to their contents (which the
            kernel only reads), a bytearray as a pointer to memory the kernel
            may write, None as NULL.

    Returns:
        The syscall's non-negative result.

    Raises:
        OSError: the syscall's errno; ENOSYS on an unsupported architecture.
    """
    arch = machine()
    if arch is None or name not in SYSCALLS[arch]:
        raise OSError(errno.ENOSYS, f"{name}: not available on {platform.machine()}")
    cargs = [_word(a) for a in args]
    ctypes.set_errno(0)
    ret = libc().syscall(ctypes.c_long(SYSCALLS[arch][name]), *cargs)
    if ret < 0:
        err = ctypes.get_errno()
        raise OSError(err, f"{name}: {os.strerror(err)}")
    return ret


def prctl(option: int, arg2: int = 0, arg3: int = 0, arg4: int = 0, arg5: int = 0) -> None:
    """Linux prctl(2) with integer arguments.

    Raises:
        OSError: Linux's errno.
    """
    ctypes.set_errno(0)
    args = (ctypes.c_ulong(a) for a in (arg2, arg3, arg4, arg5))
    if libc().prctl(ctypes.c_int(option), *args) != 0:
        err = ctypes.get_errno()
        raise OSError(err, f"prctl({option}): {os.strerror(err)}")


class _SockFprog(ctypes.Structure):
    """struct sock_fprog: a BPF program's length in instructions and its address."""

    _fields_ = [("len", ctypes.c_ushort), ("filter", ctypes.c_void_p)]


def set_seccomp_filter(program: bytes) -> None:
    """Install a seccomp-BPF filter on the calling thread (prctl PR_SET_SECCOMP).

    Args:
        program: an array of struct sock_filter (8 bytes each).

    Raises:
        OSError: Linux's errno (EACCES without no_new_privs, EINVAL for a bad program).
    """
    buf = ctypes.create_string_buffer(program, len(program))
    fprog = _SockFprog(len(program) // 8, ctypes.addressof(buf))
    prctl(PR_SET_SECCOMP, SECCOMP_MODE_FILTER, ctypes.addressof(fprog))


def openat2(dirfd: int, path: str, flags: int, mode: int, resolve: int) -> int:
    """Linux openat2(2).

    Args:
        dirfd: the directory path is relative to.
        path: the path (no NUL).
        flags: Linux open flags, passed as they are.
        mode: permission bits; only sent with O_CREAT (openat2 refuses it otherwise).
        resolve: RESOLVE_* bits.

    Returns:
        The new fd.

    Raises:
        OSError: Linux's errno; ENOSYS where this machine has no openat2.
    """
    # syscall() without its general argument handling: the broker makes this call for most
    # lookups a program asks of it (a Python int goes as a C int, as dirfd must; the struct's
    # size is a full word, made once: a third of the call's cost was making its arguments)
    ret = libc().syscall(_number("openat2"), dirfd, os.fsencode(path),
                         OPEN_HOW.pack(flags, mode if flags & os.O_CREAT else 0, resolve), _HOW_SIZE)
    if ret < 0:
        err = ctypes.get_errno()
        raise OSError(err, os.strerror(err))
    return ret


def ioctl(fd: int, request: int, buf: ctypes.Array | int | None) -> int:
    """ioctl(2) with a pointer argument (a ctypes buffer the kernel reads or fills in place),
    or with a value (an int: the few ioctls whose argument is the value itself).

    Raises:
        OSError: the ioctl's errno.
    """
    lib = libc()
    ctypes.set_errno(0)
    arg = ctypes.c_ulong(buf) if isinstance(buf, int) else buf
    ret = lib.ioctl(ctypes.c_int(fd), ctypes.c_ulong(request), arg)
    if ret < 0:
        err = ctypes.get_errno()
        raise OSError(err, os.strerror(err))
    return ret


SIGSET_BYTES = 128  # glibc's sigset_t
SIG_BLOCK, SIG_SETMASK = 0, 2  # pthread_sigmask's how (not the signal module's: it loads enum)
_EVERY_SIGNAL = ctypes.create_string_buffer(b"\xff" * SIGSET_BYTES, SIGSET_BYTES)


def hold_signals() -> ctypes.Array:
    """Block every signal the calling thread can block (pthread_sigmask: not SIGKILL or
    SIGSTOP); returns the mask before, for :func:`release_signals`. A signal that comes
    meanwhile waits, and its handler runs once they are released.

    Raises:
        OSError: pthread_sigmask's error.
    """
    old = ctypes.create_string_buffer(SIGSET_BYTES)
    err = libc().pthread_sigmask(SIG_BLOCK, _EVERY_SIGNAL, old)
    if err:
        raise OSError(err, os.strerror(err))
    return old


def release_signals(old: ctypes.Array) -> None:
    """Put back the signal mask hold_signals returned."""
    libc().pthread_sigmask(SIG_SETMASK, old, None)


MFD_CLOEXEC, MFD_ALLOW_SEALING = 0x1, 0x2
MFD_NOEXEC_SEAL, MFD_EXEC = 0x8, 0x10  # Linux 6.3; Python 3.11's os names neither
MFD_NAME_MAX = 249  # bytes of a memfd's name (NAME_MAX less the "memfd:" Linux puts before it)


def memfd_noexec(name: bytes | str, flags: int) -> int:
    """A memory file that can never be executed: memfd_create(name, flags) with
    MFD_NOEXEC_SEAL (mode 0666, F_SEAL_EXEC set); on a kernel without it (before 6.3), mode
    0666 alone. MFD_EXEC is EACCES, as where vm.memfd_noexec is 2.

    Raises:
        OSError: memfd_create's errno (EINVAL for flags it does not know).
    """
    if flags & MFD_EXEC:
        raise OSError(errno.EACCES, "no memory file may be executed here")
    try:
        return os.memfd_create(name, flags | MFD_NOEXEC_SEAL)
    except OSError as exc:
        if exc.errno != errno.EINVAL:
            raise
    fd = os.memfd_create(name, flags)  # EINVAL again: flags the kernel refuses
    try:
        os.fchmod(fd, 0o666)
    except BaseException:
        os.close(fd)
        raise
    return fd


def pidfd_getfd(pidfd: int, targetfd: int) -> int:
    """A duplicate, in this process, of another process's fd targetfd (close-on-exec).

    Raises:
        OSError: EBADF (no such fd), EPERM (not allowed to ptrace it), ESRCH (it exited).
    """
    # syscall() without its general argument handling: the broker asks this for most fds
    # a program names
    ret = libc().syscall(_number("pidfd_getfd"), ctypes.c_int(pidfd), ctypes.c_int(targetfd),
                         ctypes.c_ulong(0))
    if ret < 0:
        err = ctypes.get_errno()
        raise OSError(err, f"pidfd_getfd: {os.strerror(err)}")
    return ret


_numbers: dict[str, ctypes.c_long] = {}


def _number(name: str) -> ctypes.c_long:
    """The number of a syscall the broker makes for most calls it answers, looked up once.

    Raises:
        OSError: ENOSYS where this machine has no such call.
    """
    number = _numbers.get(name)
    if number is None:
        value = SYSCALLS.get(machine() or "", {}).get(name)
        if value is None:
            raise OSError(errno.ENOSYS, os.strerror(errno.ENOSYS))
        number = _numbers[name] = ctypes.c_long(value)
    return number
