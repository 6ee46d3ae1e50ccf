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

# The clock budgets are counted on; a test runs a whole run on a fake one (:func:`clocked`).
_CLOCK: ContextVar[Callable[[], float]] = ContextVar("bsfind_clock", default=time.perf_counter)


def now() -> float:
    """Seconds on the budget's clock: ``time.perf_counter``, or the clock of the enclosing
    :func:`clocked` block. Budgets, and the seconds a report gives, read it; step times
    and the machine's load are measurements and read their own clocks."""
    return _CLOCK.get()()


@contextlib.contextmanager
def clocked(clock: Callable[[], float]) -> Iterator[None]:
    """Count every budget inside the block on ``clock`` (tests: a deterministic fake)."""
    token = _CLOCK.set(clock)
    try:
        yield
    finally:
        _CLOCK.reset(token)


@dataclass(frozen=True)
class Deadline:
    """A wall-clock budget shared by the phases of one run."""

    end: float
    clock: Callable[[], float] = now

    @classmethod
    def after(cls, seconds: float, clock: Callable[[], float] = now) -> Deadline:
        return cls(clock() + seconds, clock)

    def left(self) -> float:
        return self.end - self.clock()

    def passed(self) -> bool:
        return self.left() <= 0

    def within(self, seconds: float) -> Deadline:
        """A deadline ``seconds`` from now, or this one if it comes first."""
        return Deadline(min(self.end, self.clock() + seconds), self.clock)


# When the command began (:func:`now`), set by the CLI: a run's budget then counts
# from there, so that ``--max-seconds`` covers importing torch and the user's code too
# (6 s of a 30 s ``check`` on a loaded 2-core machine). None: from the run's own start.
_STARTED: ContextVar[float | None] = ContextVar("bsfind_started", default=None)


@contextlib.contextmanager
def counted_from(started: float | None) -> Iterator[None]:
    """Runs inside the block count their budget from ``started`` (:func:`now`; None:
    each from its own start)."""
    token = _STARTED.set(started)
    try:
        yield
    finally:
        _STARTED.reset(token)


def counts_from_command() -> bool:
    """Whether budgets count from the command's start (the CLI), not the run's own."""
    return _STARTED.get() is not None


def run_deadline(seconds: float, clock: Callable[[], float] = now) -> Deadline:
    """A run's budget: ``seconds`` from the command's start (:func:`counted_from`), or
    from now outside one."""
    started = _STARTED.get()
    return Deadline((clock() if started is None else started) + seconds, clock)
