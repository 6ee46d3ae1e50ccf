"""The wall-clock budget of one run and the progress callback, shared by every phase.

No torch here: the CLI imports this module to type its progress bar.
"""

from __future__ import annotations

import time
from collections.abc import Callable
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
