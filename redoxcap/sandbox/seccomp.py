"""The seccomp-BPF filters, compiled from the allow-list in :mod:`.syscalls`.

:func:`filter_program` turns the list into a classic BPF program: a check of
the architecture (a foreign ABI, i386 or arm32, is killed; x32 calls fail
with ENOSYS), then a binary search over the syscall numbers the list names,
each ending in its action (allow, an errno, the broker, or an argument
check); a number the list does not name fails with ENOSYS. :func:`install`
puts the ``confined`` filter on the calling thread; the broker installs the
``brokered`` one with a listener (redoxcap/broker/filter.py).

Every block the compiler emits ends in a return, so blocks are placed one
after the other and only forward jumps over whole blocks are needed: short
ones as the conditional jump's own offset (8 bits), longer ones with ``JA``.
"""

from __future__ import annotations

import os
import struct
from collections.abc import Sequence

from redoxcap.sandbox import syscalls as S
from redoxcap.wire import linux

# the instructions the compiler emits (linux/bpf_common.h)
BPF_LD_W_ABS = linux.BPF_LD | linux.BPF_W | linux.BPF_ABS
BPF_ALU_AND_K = linux.BPF_ALU | linux.BPF_AND | linux.BPF_K
BPF_JA = linux.BPF_JMP | linux.BPF_JA
BPF_JEQ_K = linux.BPF_JMP | linux.BPF_JEQ | linux.BPF_K
BPF_JGE_K = linux.BPF_JMP | linux.BPF_JGE | linux.BPF_K
BPF_JSET_K = linux.BPF_JMP | linux.BPF_JSET | linux.BPF_K
BPF_RET_K = linux.BPF_RET | linux.BPF_K


def arg_offset(index: int) -> int:
    """Offset of the low word of args[index] in struct seccomp_data (little-endian)."""
    return linux.SECCOMP_DATA_ARG0 + 8 * index


MAX_JUMP = 255  # a conditional jump's offsets are 8 bits
LEAF = 4  # calls compared one by one at the bottom of the search

Instruction = tuple[int, int, int, int]  # struct sock_filter: code, jt, jf, k
Block = list[Instruction]


def stmt(code: int, k: int) -> Instruction:
    return (code, 0, 0, k)


def jump(code: int, k: int, jt: int, jf: int) -> Instruction:
    assert 0 <= jt <= MAX_JUMP and 0 <= jf <= MAX_JUMP
    return (code, jt, jf, k)


def ret(value: int) -> Block:
    return [stmt(BPF_RET_K, value)]


def ret_errno(err: int) -> Block:
    return ret(linux.SECCOMP_RET_ERRNO | (err & linux.SECCOMP_RET_DATA))


def _if(test: Block, then: Block) -> Block:
    """test (ending in a conditional jump whose jt is 0 and jf 0) falls into then when true,
    and goes past it when false."""
    *head, (code, _, _, k) = test
    if len(then) <= MAX_JUMP:
        return [*head, jump(code, k, 0, len(then)), *then]
    return [*head, jump(code, k, 1, 0), stmt(BPF_JA, len(then)), *then]


class Compiler:
    """Turns actions into blocks for one program (its own pid stands for SELF)."""

    def __init__(self, self_pid: int) -> None:
        self.self_pid = self_pid

    def action(self, action: S.Action) -> Block:
        if isinstance(action, S.Allow):
            return ret(linux.SECCOMP_RET_ALLOW)
        if isinstance(action, S.Notify):
            return ret(linux.SECCOMP_RET_USER_NOTIF)
        if isinstance(action, S.Refuse):
            return ret_errno(action.errno)
        return self.check(action)

    def check(self, check: S.Check) -> Block:
        load = stmt(BPF_LD_W_ABS, arg_offset(check.index))
        out: Block = [load]
        for test, action in check.cases:
            then = self.action(action)
            if isinstance(test, S.Equal):
                out += self._equal(test.values, then)
            elif isinstance(test, S.AnyBit):
                out += _if([jump(BPF_JSET_K, test.mask, 0, 0)], then)
            else:  # Masked: the AND changes the accumulator, so load the argument again after
                out += [stmt(BPF_ALU_AND_K, test.mask)]
                out += self._equal(test.values, then)
                out.append(load)
        return out + self.action(check.otherwise)

    def _equal(self, values: Sequence[int], then: Block) -> Block:
        """Any of values falls into then; none goes past it."""
        values = [self.self_pid if v == S.SELF else v & 0xFFFF_FFFF for v in values]
        values = list(dict.fromkeys(values))
        n = len(values)
        if n > MAX_JUMP:
            raise ValueError("too many values in one argument check")
        out = [jump(BPF_JEQ_K, v, n - i, 0) for i, v in enumerate(values)]
        return [*out, stmt(BPF_JA, len(then)), *then]

    def search(self, calls: list[tuple[int, Block]], default: Block) -> Block:
        """Find the accumulator's syscall number among calls (sorted by number)."""
        if len(calls) <= LEAF:
            out: Block = []
            for nr, block in calls:
                out += _if([jump(BPF_JEQ_K, nr, 0, 0)], block)
            return out + default
        mid = len(calls) // 2
        low = self.search(calls[:mid], default)
        high = self.search(calls[mid:], default)
        # nr >= the middle one: over the low half with JA; else fall into it
        return [jump(BPF_JGE_K, calls[mid][0], 0, 1), stmt(BPF_JA, len(low)), *low, *high]


def filter_program(machine: str, mode: str = S.CONFINED, *, deny_network: bool = True,
                   signals_scoped: bool = True, self_pid: int | None = None) -> bytes:
    """The filter of the allow-list for machine (a key of wire.linux.SYSCALLS).

    Args:
        machine: the machine the filter runs on.
        mode: ``confined`` (rt alone) or ``brokered`` (path calls go to the broker).
        deny_network: only AF_UNIX stream and seqpacket sockets.
        signals_scoped: Landlock keeps signals inside the sandbox (else: own pid only).
        self_pid: the pid the program will have (default: the caller's, which exec keeps).

    Returns:
        The program, 8 bytes per instruction.
    """
    compiler = Compiler(os.getpid() if self_pid is None else self_pid)
    calls = sorted((nr, compiler.action(rule.action(mode)))
                   for _, nr, rule in S.actions(machine, mode, deny_network=deny_network,
                                                signals_scoped=signals_scoped))
    prog: Block = [
        # A foreign syscall ABI (i386 or arm32 compat) would have other numbers: none of it runs.
        stmt(BPF_LD_W_ABS, linux.SECCOMP_DATA_ARCH),
        jump(BPF_JEQ_K, linux.AUDIT_ARCH[machine], 1, 0),
        stmt(BPF_RET_K, linux.SECCOMP_RET_KILL_PROCESS),
        stmt(BPF_LD_W_ABS, linux.SECCOMP_DATA_NR),
    ]
    if machine == "x86_64":
        # x32 syscalls share AUDIT_ARCH_X86_64 but use nr | 0x40000000: refuse them all.
        prog += [jump(BPF_JGE_K, linux.X32_SYSCALL_BIT, 0, 1), *ret_errno(S.DEFAULT_ERRNO)]
    prog += compiler.search(calls, ret_errno(S.DEFAULT_ERRNO))
    if len(prog) > 4096:  # BPF_MAXINSNS
        raise ValueError(f"the filter has {len(prog)} instructions, more than Linux takes")
    return b"".join(struct.pack("=HBBI", *insn) for insn in prog)


# Stands for "the program's own pid" in a program compiled ahead of the process that installs
# it (the broker's filter, compiled once in the fork server): above any pid Linux hands out
# (PID_MAX_LIMIT is 2**22), and compared by nothing else (with_own_pid checks).
OWN_PID_PLACEHOLDER = 0x5E1F_D1D0


def with_own_pid(program: bytes, pid: int) -> bytes:
    """program (compiled with self_pid=OWN_PID_PLACEHOLDER) with pid for its own pid (only
    the kill family compares it, where Landlock cannot scope signals)."""
    out = bytearray(program)
    for offset in range(0, len(out), 8):
        code, _jt, _jf, k = struct.unpack_from("=HBBI", out, offset)
        if code == BPF_JEQ_K and k == OWN_PID_PLACEHOLDER:
            struct.pack_into("=I", out, offset + 4, pid)
    return bytes(out)


def install(machine: str, *, deny_network: bool, signals_scoped: bool) -> None:
    """Install the ``confined`` filter on the calling thread (needs no_new_privs).

    Raises:
        OSError: Linux refused the filter.
    """
    linux.set_seccomp_filter(filter_program(machine, S.CONFINED, deny_network=deny_network,
                                            signals_scoped=signals_scoped))
