"""A bounded memo for the broker's answers that depend on a path alone.

Where an absolute path is placed (a handed directory, the host trees, the
namespace) and how a host-tree path is looked up are fixed for a run: a
build asks for the same few thousand paths over and over (gcc's realpath
of /usr/include), so each is worked out once. The program chooses the
paths, so the memo is bounded: it keeps paths of at most MAX_PATH
characters, at most MAX_PATHS of them, and forgets them all at once past
that (a MiB of paths each, whatever the program asks).
"""

from __future__ import annotations

from collections.abc import Callable
from typing import Generic, TypeVar

T = TypeVar("T")
MAX_PATH = 512
MAX_PATHS = 2048
_UNKNOWN = object()  # not worked out yet (None is an answer)


class PathMemo(Generic[T]):
    """work(path), worked out once per path (within the bounds above)."""

    __slots__ = ("_answers", "_work")

    def __init__(self, work: Callable[[str], T]) -> None:
        self._work = work
        self._answers: dict[str, T] = {}

    def __call__(self, path: str) -> T:
        answer = self._answers.get(path, _UNKNOWN)
        if answer is _UNKNOWN:
            answer = self._work(path)
            if len(path) <= MAX_PATH:
                if len(self._answers) >= MAX_PATHS:
                    self._answers.clear()
                self._answers[path] = answer
        return answer  # type: ignore[return-value]
