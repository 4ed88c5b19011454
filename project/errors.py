"""The one exception type that means "the user's input is wrong": run.py prints it as one line, exit 2."""


class UserError(Exception):
    """A mistake the user can fix (a bad path, a missing dataset, a wrong checkpoint); never a bug."""
