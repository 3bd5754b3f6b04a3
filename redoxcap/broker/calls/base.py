"""What every family of brokered syscalls shares: the call, its answers, and `@syscall`.

A handler gets a `Call` (the notification, the thread's memory opened before
the id was checked, and its process) and returns the syscall's answer: an
int (its return value), an `Install` (an fd to put in the target's table as
the return value, ADDFD + SEND), or `PROCEED` (let the kernel run it: only
for calls whose effect the broker has bounded, see docs/sandbox.md); or
raises OSError for an errno. Path arguments are read once into the broker
and only that copy is acted on.
"""

from __future__ import annotations

import os
from collections.abc import Callable
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any, ClassVar

from redoxcap.broker.memory import Memory
from redoxcap.broker.notify import Notification
from redoxcap.broker.state import Process
from redoxcap.wire.call import forget

if TYPE_CHECKING:
    from redoxcap.broker.calls.program import Program


DEFAULT_UMASK = 0o022  # where a thread's own cannot be read (it is exiting)


class Proceed:
    """The type of PROCEED."""

    def __repr__(self) -> str:
        return "PROCEED"


PROCEED = Proceed()


@dataclass(frozen=True, slots=True)
class Install:
    """Answer with a new fd in the target: a copy of fd (the broker closes its own)."""

    fd: int
    cloexec: bool


@dataclass
class Call:
    """One notification being answered."""

    notif: Notification
    mem: Memory
    process: Process

    @property
    def args(self) -> tuple[int, ...]:
        return self.notif.args

    def created_mode(self, mode: int) -> int:
        """mode as a call that creates a file or directory makes it: less the calling thread's
        umask (which the kernel would have applied, and the scheme that creates it cannot
        know; /proc/TID/status says it, as the program last set it), permission bits only."""
        try:
            with open(f"/proc/{self.notif.tid}/status", "rb") as f:
                umask = next(int(line.split()[1], 8) for line in f if line.startswith(b"Umask:"))
        except (OSError, StopIteration, ValueError, IndexError):
            umask = DEFAULT_UMASK
        return mode & 0o7777 & ~umask


Handler = Callable[[Call], Any]


def syscall(*names: str) -> Callable[[Callable], Callable]:
    """Mark a Family method as the handler of the syscalls names (default: its own name)."""
    def mark(method: Callable) -> Callable:
        method.syscalls = names or (method.__name__,)  # type: ignore[attr-defined]
        return method
    return mark


class Family:
    """A family of syscalls (opening, status, metadata...): one method per syscall, marked
    with @syscall, over the state of the program they are answered for."""

    handles: ClassVar[dict[str, str]] = {}  # syscall name -> method name, from the marks

    def __init_subclass__(cls, **kwargs: Any) -> None:
        super().__init_subclass__(**kwargs)
        cls.handles = {}
        for attr, value in vars(cls).items():
            for name in getattr(value, "syscalls", ()):
                if name in cls.handles:
                    raise TypeError(f"{cls.__name__}: {name} is handled twice")
                cls.handles[name] = attr

    def __init__(self, program: Program) -> None:
        self.program = program

    def handlers(self) -> dict[str, Handler]:
        """This family's handlers by syscall name."""
        return {name: getattr(self, attr) for name, attr in self.handles.items()}


def error(err: int) -> OSError:
    """An OSError whose errno is err (OSError(err) alone leaves errno None: EIO to the program)."""
    return OSError(err, os.strerror(err))


def c_int(value: int) -> int:
    """A C int argument (the low 32 bits, signed)."""
    value &= 0xFFFF_FFFF
    return value - (1 << 32) if value & 0x8000_0000 else value


def close(fd: int) -> None:
    """Close a broker fd and drop what the capability layer knew of its number."""
    forget(fd)
    os.close(fd)
