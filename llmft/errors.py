"""Errors meant for the person running a command, and the one place that turns them into a clean exit.

Anything a user can fix (a flag, a path, a record in their data) raises an `LlmftError` subclass whose message names
the flag or the record. `exit_on_user_error` prints it without a traceback and exits with status 2; every other
exception is a bug and keeps its traceback.
"""

from __future__ import annotations

import functools
import signal
import sys
from collections.abc import Callable
from typing import ParamSpec, TypeVar

EXIT_USER_ERROR = 2  # the exit status of a run stopped by a user error (argparse's, too)
# The exit status of a run that stopped on SIGTERM/SIGUSR1 after writing a checkpoint (llmft/preemption.py): resume it.
# sysexits.h's EX_TEMPFAIL ("temporary failure, the user is invited to retry"), apart from 128 + N, which a shell
# reports for a process killed by signal N, checkpoint or not.
EXIT_PREEMPTED = 75
PREEMPTION_SIGNALS = (
    signal.SIGTERM,
    signal.SIGUSR1,
)  # what schedulers send before a kill; llmft.launch.torchrun passes them on


class LlmftError(Exception):
    """A problem the user can fix; the message says what and where."""


class ConfigError(LlmftError):
    """One or more settings are invalid or contradict each other; all of them are listed at once."""

    def __init__(self, problems: list[str]) -> None:
        self.problems = list(problems)
        lines = "\n".join(f"  - {p}" for p in self.problems)
        super().__init__(f"invalid settings ({len(self.problems)}):\n{lines}")


class DataError(LlmftError):
    """A data file or one of its records cannot be used; the message names the file and the record."""


P = ParamSpec("P")
R = TypeVar("R")


def exit_on_user_error(main: Callable[P, R]) -> Callable[P, R]:
    """Decorator for a CLI entry: user errors become one `error: ...` line set on stderr and exit status 2."""

    @functools.wraps(main)
    def wrapper(*args: P.args, **kwargs: P.kwargs) -> R:
        try:
            return main(*args, **kwargs)
        except LlmftError as e:
            print(f"error: {e}", file=sys.stderr)
            sys.exit(EXIT_USER_ERROR)

    return wrapper
