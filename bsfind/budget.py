"""The wall-clock budget of one run and the progress callback, shared by every phase.

No torch here: the CLI imports this module to type its progress bar.
"""

from __future__ import annotations

import contextlib
import time
from collections.abc import Callable, Iterator
from contextvars import ContextVar
from dataclasses import dataclass

# Progress callback: (phase, fraction done in [0, 1], message). The CLI draws it.
ProgressFn = Callable[[str, float, str], None]


@dataclass(frozen=True)
class Deadline:
    """A wall-clock budget shared by the phases of one run."""

    end: float
    clock: Callable[[], float] = time.perf_counter

    @classmethod
    def after(cls, seconds: float, clock: Callable[[], float] = time.perf_counter) -> Deadline:
        return cls(clock() + seconds, clock)

    def left(self) -> float:
        return self.end - self.clock()

    def passed(self) -> bool:
        return self.left() <= 0

    def within(self, seconds: float) -> Deadline:
        """A deadline ``seconds`` from now, or this one if it comes first."""
        return Deadline(min(self.end, self.clock() + seconds), self.clock)


# When the command began (time.perf_counter), set by the CLI: a run's budget then counts
# from there, so that ``--max-seconds`` covers importing torch and the user's code too
# (6 s of a 30 s ``check`` on a loaded 2-core machine). None: from the run's own start.
_STARTED: ContextVar[float | None] = ContextVar("bsfind_started", default=None)


@contextlib.contextmanager
def counted_from(started: float | None) -> Iterator[None]:
    """Runs inside the block count their budget from ``started`` (perf_counter; None:
    each from its own start)."""
    token = _STARTED.set(started)
    try:
        yield
    finally:
        _STARTED.reset(token)


def run_deadline(seconds: float, clock: Callable[[], float] = time.perf_counter) -> Deadline:
    """A run's budget: ``seconds`` from the command's start (:func:`counted_from`), or
    from now outside one."""
    started = _STARTED.get()
    return Deadline((clock() if started is None else started) + seconds, clock)
