"""The one exception type that means "the user's input is wrong", and how every command reports it."""

import sys
from collections.abc import Callable
from typing import Any


class UserError(Exception):
    """A mistake the user can fix (a bad path, a missing dataset, a wrong checkpoint); never a bug."""


def exit_code(action: Callable[[], Any], debug: bool = False) -> int:
    """Run a command's work: 0 when it succeeds; a UserError is one line on stderr and exit code 2
    (the traceback only with --debug)."""
    try:
        action()
    except UserError as error:
        if debug:
            raise
        print(f"error: {error}", file=sys.stderr)
        return 2
    return 0


class RunStopped(Exception):
    """Training stopped before its end on purpose (a signal, a diverging loss); the message says what was
    kept and how to go on."""

    def __init__(self, message: str, exit_code: int) -> None:
        super().__init__(message)
        self.exit_code = exit_code
