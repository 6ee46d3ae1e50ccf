"""One error family for everything a user can cause.

Each error carries a one-line message naming the culprit, an optional hint
saying what to do, and the process exit code the CLI uses:

====  =====================================================
code  meaning
====  =====================================================
0     ok
1     ``bsfind check``: the baseline is outside the tolerance
2     bad spec or usage
3     the user's model, data, loss or optimizer failed
4     hardware: device missing, out of memory even at batch 1
5     the time budget ran out before any estimate
130   interrupted (Ctrl-C)
====  =====================================================
"""

from __future__ import annotations

EXIT_OK = 0
EXIT_CHECK_FAILED = 1
EXIT_SPEC = 2
EXIT_USER_CODE = 3
EXIT_HARDWARE = 4
EXIT_BUDGET = 5
EXIT_INTERRUPTED = 130


class BsfindError(Exception):
    """Base class: ``message`` names the culprit, ``hint`` says what to do."""

    exit_code: int = EXIT_USER_CODE

    def __init__(self, message: str, hint: str | None = None) -> None:
        super().__init__(message)
        self.message = message
        self.hint = hint

    def __str__(self) -> str:
        return self.message if not self.hint else f"{self.message} ({self.hint})"


class SpecError(BsfindError):
    """The spec is malformed; ``problems`` lists every ``path: message``."""

    exit_code = EXIT_SPEC

    def __init__(self, problems: list[str], source: str = "spec") -> None:
        self.problems = list(problems)
        self.source = source
        if len(self.problems) == 1:
            message = f"{source}: {self.problems[0]}"
        else:
            message = f"{source} has {len(self.problems)} problems: " + "; ".join(self.problems)
        super().__init__(message)


class UsageError(BsfindError):
    exit_code = EXIT_SPEC


class ResolutionError(BsfindError):
    """A factory string could not be imported, or the factory failed."""

    exit_code = EXIT_USER_CODE


class UserCodeError(BsfindError):
    """The user's model, data, loss or optimizer failed while running."""

    exit_code = EXIT_USER_CODE


class HardwareError(BsfindError):
    exit_code = EXIT_HARDWARE


class BudgetError(BsfindError):
    """The time budget ran out before any estimate existed."""

    exit_code = EXIT_BUDGET


class Interrupted(KeyboardInterrupt):
    """Ctrl-C; ``partial`` holds whatever was measured so far (may be None).

    A ``KeyboardInterrupt``, not a :class:`BsfindError`: like Ctrl-C itself it passes
    ``except Exception`` (a user's loop guarded so goes on measuring nothing otherwise),
    and code that catches ``KeyboardInterrupt`` to add what it measured lets it through
    (``except Interrupted: raise`` first), so the innermost partial result stands.
    """

    exit_code = EXIT_INTERRUPTED
    hint: str | None = None

    def __init__(self, message: str, partial: object | None = None) -> None:
        super().__init__(message)
        self.message = message
        self.partial = partial

    def __str__(self) -> str:
        return self.message
