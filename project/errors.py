"""Exceptions that end a run with one clear message instead of a traceback (run.main prints them)."""


class UserError(Exception):
    """A mistake the user can fix (a bad path, a missing dataset, a wrong checkpoint); never a bug. Exit 2."""


class RunStopped(Exception):
    """Training stopped before its end on purpose (a signal, a diverging loss); the message says what was
    kept and how to go on."""

    def __init__(self, message: str, exit_code: int) -> None:
        super().__init__(message)
        self.exit_code = exit_code
