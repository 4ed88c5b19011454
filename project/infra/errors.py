"""How a command ends: a mistake the user can fix (one line, exit 2), a run stopped on purpose (a signal or a
diverging loss: the message says what was kept and how to go on), or a signal outside training (exit 128 + signal).
Every entry point runs its work through `run_command`, so all answer SIGTERM (schedulers, `kill`) and SIGINT
(Ctrl-C, which reaches the whole process group) alike."""

from __future__ import annotations

import signal
import sys
import threading
from collections.abc import Callable
from typing import Any

STOP_SIGNALS = (signal.SIGTERM, signal.SIGINT)


class UserError(Exception):
    """A mistake the user can fix (a bad path, a missing dataset, a wrong checkpoint); never a bug."""


class RunStopped(Exception):
    """Training stopped on purpose (a signal, a diverging loss); the message says what was kept and how to go on."""

    def __init__(self, message: str, exit_code: int) -> None:
        super().__init__(message)
        self.exit_code = exit_code


class NothingToDo(Exception):
    """Nothing to do (a resumed run already at --max-epochs): say so, change nothing."""


class Interrupted(BaseException):
    """SIGTERM or SIGINT outside a training step: a BaseException, so no `except Exception` swallows it, and not a
    KeyboardInterrupt, which Lightning turns into `sys.exit(1)`."""

    def __init__(self, signum: int) -> None:
        super().__init__(signal.Signals(signum).name)
        self.signum = signum


class StopSignals:
    """The process-wide SIGTERM/SIGINT handler. Outside training a signal raises Interrupted at once; while training
    (callbacks.GracefulStop sets `deferred`) it is recorded and the run stops after the step. A second never waits."""

    received: int | None = None
    deferred = False

    @classmethod
    def handle(cls, signum: int, frame: Any) -> None:
        first, cls.received = cls.received is None, signum
        if not cls.deferred or not first:
            raise Interrupted(signum)


def run_command(action: Callable[[], Any], debug: bool = False) -> int:
    """Run a command's work; its exit status: 0, 2 for a UserError (one line; the traceback only with --debug), a
    RunStopped's own, or 128 + signal."""
    on_main_thread = threading.current_thread() is threading.main_thread()
    previous = {signum: signal.signal(signum, StopSignals.handle) for signum in STOP_SIGNALS} if on_main_thread else {}
    StopSignals.received, StopSignals.deferred = None, False
    try:
        action()
        return 0
    except UserError as error:
        if debug:
            raise
        from project.infra.redact import redact_text  # a message may quote what the user typed: never a secret

        print(f"error: {redact_text(str(error))}", file=sys.stderr)
        return 2
    except NothingToDo as note:
        print(note)
        return 0
    except RunStopped as error:
        if debug:
            raise
        print(error, file=sys.stderr)
        return error.exit_code
    except (Interrupted, KeyboardInterrupt) as stop:
        signum = stop.signum if isinstance(stop, Interrupted) else signal.SIGINT
        print(f"stopped by {signal.Signals(signum).name} outside a training step: nothing new to save", file=sys.stderr)
        return 128 + signum
    finally:
        for signum, handler in previous.items():
            signal.signal(signum, handler)
