"""How a command ends: a mistake the user can fix (one line, exit 2), a run stopped on purpose (a signal or a
diverging loss: the message says what was kept and how to go on), or a signal outside training (exit 128 + signal).
Every entry point runs its work through `run_command`, so all answer SIGTERM (schedulers, `kill`) and SIGINT
(Ctrl-C, which reaches the whole process group) alike, even while blocked waiting for other processes."""

from __future__ import annotations

import contextlib
import gc
import os
import re
import select
import signal
import socket
import sys
import threading
import time
from collections.abc import Callable, Iterator
from typing import Any, NoReturn

from project.infra.redact import redact_text

STOP_SIGNALS = (signal.SIGTERM, signal.SIGINT)
# Python runs a signal handler only between bytecodes: a process blocked in C (a rendezvous, a collective waiting for
# a rank that will never come) would ignore SIGTERM and Ctrl-C for good. A signal not taken up within this many
# seconds is answered from another thread.
STUCK_AFTER_S = 10
# How torch's DataLoader reports a worker process that died (its own exceptions come as theirs, with a traceback).
WORKER_KILLED = re.compile(r"DataLoader worker \(pid.*?\) (is killed by signal|exited unexpectedly)")
# How Lightning refuses to shard a DataLoader of one's own for several processes (a batch sampler it cannot rebuild).
NOT_SHARDABLE = "Lightning can't inject a (distributed) sampler"


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
    taken = 0  # signals the handler has seen, for the watcher

    @classmethod
    def handle(cls, signum: int, frame: Any) -> None:
        cls.taken += 1
        first, cls.received = cls.received is None, signum
        if not cls.deferred or not first:
            raise Interrupted(signum)


@contextlib.contextmanager
def signals_held() -> Iterator[None]:
    """SIGTERM/SIGINT wait for the end of this block (work that, cut in half, would leave a file nothing can use);
    then the command stops as it would have."""
    held, taken, StopSignals.deferred = StopSignals.deferred, StopSignals.taken, True
    try:
        yield
    finally:
        StopSignals.deferred = held
    if StopSignals.taken > taken and not held:  # one came meanwhile
        raise Interrupted(StopSignals.received)


def run_command(action: Callable[[], Any], debug: bool = False) -> int:
    """Run a command's work; its exit status: 0, 2 for a UserError (one line; the traceback only with --debug), a
    RunStopped's own, or 128 + signal."""
    on_main_thread = threading.current_thread() is threading.main_thread()
    previous = {signum: signal.signal(signum, StopSignals.handle) for signum in STOP_SIGNALS} if on_main_thread else {}
    StopSignals.received, StopSignals.deferred, StopSignals.taken = None, False, 0
    watcher = watch_signals() if on_main_thread else None
    unraisable, sys.unraisablehook = sys.unraisablehook, redeliver(sys.unraisablehook)
    try:
        action()
        sys.stdout.flush()  # a reader that went away (`| head`) is found here, not in Python's flush at exit
        return 0
    except BrokenPipeError:
        if debug or not reader_gone():
            raise
        # The reader of our output went away (`| head`): nothing to say, and nowhere to say it; exit as a shell's own
        # commands do. Standard output is pointed at /dev/null, or Python's flush at exit would fail again.
        os.dup2(os.open(os.devnull, os.O_WRONLY), sys.stdout.fileno())
        return 128 + signal.SIGPIPE
    except UserError as error:
        if debug:  # the traceback, and the line as it would be (a URL's password, a secret path) in it
            error.args = (redact_text(str(error)),)
            raise
        print(f"error: {redact_text(str(error))}", file=sys.stderr)
        return 2
    except NothingToDo as note:
        print(note)
        return 0
    except RunStopped as error:
        if debug:
            raise
        print(redact_text(str(error)), file=sys.stderr)  # it names the run's paths and its resume command
        return error.exit_code
    except (Interrupted, KeyboardInterrupt) as stop:
        signum = stop.signum if isinstance(stop, Interrupted) else signal.SIGINT
        print(f"stopped by {signal.Signals(signum).name} outside a training step: nothing new to save", file=sys.stderr)
        return 128 + signum
    except Exception as error:
        killed = WORKER_KILLED.match(str(error))
        if debug or not (lost_peer(error) or killed or NOT_SHARDABLE in str(error) or out_of_memory(error)):
            raise
        if out_of_memory(error):  # a batch that does not fit: the host's memory, or the GPU's
            what = (str(error).strip() or type(error).__name__).splitlines()[0][:160]
            print(f"error: out of memory ({what}): a smaller --batch-size, --image-size or model needs less, in a "
                  "new run (--resume keeps the run's own)", file=sys.stderr)  # fmt: skip
            return 1
        if NOT_SHARDABLE in str(error):
            print("error: Lightning cannot split this DataLoader across the processes: its batch sampler does not "
                  "subclass torch's BatchSampler (README: Your own data and model)", file=sys.stderr)  # fmt: skip
            return 1
        if killed:  # by the OS's out-of-memory killer, most often
            print(f"error: {str(error).split('. ')[0].strip()}: out of memory? Fewer --num-workers need less (then "
                  "--resume: checkpoints are whole), as do a smaller --batch-size or --image-size in a new run",
                  file=sys.stderr)  # fmt: skip
            return 1
        reason = redact_text(str(error).split("] ", 1)[-1].split(". ")[0])
        print(f"error: another process of this run ended or cannot be reached ({reason}); this one stops too. "
              "Checkpoints are whole: continue with --resume", file=sys.stderr)  # fmt: skip
        return 1
    finally:
        sys.unraisablehook = unraisable
        for signum, handler in previous.items():
            signal.signal(signum, handler)
        StopSignals.received, StopSignals.deferred = None, False  # a next command in this process starts clean
        if watcher is not None:
            watcher()


def out_of_memory(error: BaseException) -> bool:
    """torch's allocators' errors (CPU: a RuntimeError; CUDA: torch.OutOfMemoryError), or Python's MemoryError."""
    return type(error).__name__ in ("OutOfMemoryError", "MemoryError") or "can't allocate memory" in str(error)


def redeliver(hook: Callable[[Any], Any]) -> Callable[[Any], Any]:
    """Python's hook for an exception that cannot propagate, sending a signal's Interrupted on: the handler raises it
    in whatever code runs when the signal comes, a garbage collector's callback or a finalizer among them, where
    Python would print it as "Exception ignored" with a traceback and drop the signal. Sent again a moment later
    (from another thread: sent now, it would be raised in this hook), it stops the command where it can."""

    def handle(unraisable: Any) -> None:
        if isinstance(unraisable.exc_value, Interrupted):
            threading.Timer(0.05, send, (unraisable.exc_value.signum,)).start()
        else:
            hook(unraisable)

    def send(signum: int) -> None:
        if sys.unraisablehook is handle:  # the command is still running (its end puts the previous hook back)
            os.kill(os.getpid(), signum)

    return handle


def exit_process(code: int) -> NoReturn:
    """The end of a command's process. Python's last garbage collection, after the atexit handlers (trackers flush
    there), walks every object the libraries made: 1.1 s after a csv run, 1.8 s more with MLflow loaded, measured on
    the default job. The objects alive now are left out of it (gc.freeze): the OS takes back the memory anyway."""
    gc.freeze()
    sys.exit(code)


def reader_gone() -> bool:
    """Whether standard output is a pipe whose reader has closed it (poll reports an error on its end)."""
    try:
        poller = select.poll()
        poller.register(sys.stdout.fileno(), select.POLLOUT)
        return any(events & select.POLLERR for _, events in poller.poll(0))
    except (OSError, ValueError, AttributeError):  # no descriptor (a test's captured output), no poll (Windows)
        return False


def lost_peer(error: BaseException) -> bool:
    """Whether `error` is a collective that failed because another rank died or vanished (gloo raises a RuntimeError
    naming its transport, NCCL a DistError)."""
    dist = sys.modules.get("torch.distributed")
    if dist is None or not dist.is_available() or not dist.is_initialized():
        return False
    return isinstance(error, dist.DistError) or "gloo" in str(error)


def watch_signals() -> Callable[[], None]:
    """Start a thread that ends the process, with one line, when a stop signal is not taken up by the main thread
    within STUCK_AFTER_S (it is blocked in C). Python writes each signal's number to the wakeup socket. Returns the
    function that ends the watch (on the main thread)."""
    reader, writer = socket.socketpair()
    writer.setblocking(False)
    previous = signal.set_wakeup_fd(writer.fileno(), warn_on_full_buffer=False)
    ended = threading.Event()  # the command ended: a next one in this process counts its signals anew

    def watch() -> None:
        arrived = 0
        with reader:
            while numbers := reader.recv(64):
                stops = [n for n in numbers if n in STOP_SIGNALS]
                arrived += len(stops)
                deadline = time.monotonic() + STUCK_AFTER_S
                while stops and StopSignals.taken < arrived and time.monotonic() < deadline and not ended.is_set():
                    time.sleep(0.1)
                if stops and StopSignals.taken < arrived and not ended.is_set():
                    name = signal.Signals(stops[-1]).name
                    os.write(2, f"stopped by {name} while waiting for the other processes of the run: any checkpoint "
                             "written is whole, continue with --resume\n".encode())  # fmt: skip
                    os._exit(128 + stops[-1])

    def stop() -> None:
        ended.set()
        signal.set_wakeup_fd(previous)
        writer.close()  # the reader sees the end and the thread ends

    threading.Thread(target=watch, name="stop-signal-watch", daemon=True).start()
    return stop


if hasattr(os, "register_at_fork"):  # a forked child (a DataLoader worker) inherits the wakeup socket: not its own
    os.register_at_fork(after_in_child=lambda: signal.set_wakeup_fd(-1))
