"""Runs the real CLI with one fault injected at an exact point, for tests/test_resume.py and test_faults.py.

    python -m tests.fault_driver FAULT [ARG ...] -- CLI ARGS

Faults (epochs and batches count from 0; N counts writes of last.ckpt from 1):
    kill-train EPOCH BATCH       SIGKILL at the start of that training step
    kill-val EPOCH               SIGKILL in the second validation batch of that epoch
    kill-after-save N            SIGKILL right after the N-th last.ckpt is in place
    kill-mid-write N             SIGKILL halfway through writing the N-th last.ckpt
    kill-test                    SIGKILL in the second test batch (after training, before any report)
    kill-plot                    SIGKILL while curves.png is drawn (the test records are written by then)
    kill-rewind                  SIGKILL as a resumed run starts to rewind metrics.csv (for --resume)
    signal-train NAME EPOCH BATCH   send SIGTERM/SIGINT to itself inside that training step
    signal-val NAME EPOCH        send it inside the second validation batch of that epoch
    enospc N                     the N-th last.ckpt write fails halfway with "No space left on device"
    skip-resume-check            --resume PATH goes to Lightning unchecked (as if swapped after our check)
    signal-report NAME           send it as the records are written, after testing
    enospc-plot                  writing curves.png fails with "No space left on device"
    none                         no fault: the CLI as is, with the setting below

Environment: FAULT_RANK=R injects the fault in global rank R only (Lightning's DDP launcher and torchrun run this
driver in every process). FAULT_SLOW_RECORDS=S makes rank 0 close its run's records S seconds later.
FAULT_CIFAR10_MD5=FILE names a JSON {file name: MD5} (the one tests/conftest.py's write_cifar10_like writes):
torchvision's CIFAR10 then takes those checksums for the official ones, by its public class attributes train_list,
test_list and meta, so tiny test files pass its checks.

A fault is injected by patching a method in this process only; project code has no test hooks.
"""

from __future__ import annotations

import errno
import io
import json
import os
import signal
import sys
import time
from pathlib import Path
from typing import Any


def _at_training_step(epoch: int, batch: int, action) -> None:
    from project.solver import Solver

    original = Solver.training_step

    def training_step(self, batch_, batch_idx):
        if self.current_epoch == epoch and batch_idx == batch:
            action()
        return original(self, batch_, batch_idx)

    Solver.training_step = training_step


def _at_validation(epoch: int, action) -> None:
    from project.solver import Solver

    original = Solver.validation_step

    def validation_step(self, batch_, batch_idx):
        if not self.trainer.sanity_checking and self.current_epoch == epoch and batch_idx == 1:
            action()
        return original(self, batch_, batch_idx)

    Solver.validation_step = validation_step


def _at_test(action) -> None:
    from project.solver import Solver

    original = Solver.test_step

    def test_step(self, batch_, batch_idx):
        if batch_idx == 1:
            action()
        return original(self, batch_, batch_idx)

    Solver.test_step = test_step


def _on_last_write(n: int, before_rename=None, after_rename=None) -> None:
    """Wrap SafeCheckpointIO.save_checkpoint for the n-th write of last.ckpt."""
    import torch

    from project.infra import callbacks, runs

    original_save = callbacks.SafeCheckpointIO.save_checkpoint
    count = 0

    def save_checkpoint(self, checkpoint, path, storage_options=None):
        nonlocal count
        is_last = os.path.basename(str(path)) == runs.LAST
        count += is_last
        if is_last and count == n and before_rename is not None:
            real_save = torch.save

            def half_save(obj, file):
                buffer = io.BytesIO()
                real_save(obj, buffer)
                data = buffer.getvalue()
                file.write(data[: len(data) // 2])
                file.flush()
                before_rename()

            torch.save = half_save
            try:
                return original_save(self, checkpoint, path, storage_options)
            finally:
                torch.save = real_save
        original_save(self, checkpoint, path, storage_options)
        if is_last and count == n and after_rename is not None:
            after_rename()

    callbacks.SafeCheckpointIO.save_checkpoint = save_checkpoint


CIFAR10_MD5_ENV = "FAULT_CIFAR10_MD5"


def cifar10_checksums(md5: dict[str, str]) -> dict[str, Any]:
    """torchvision.datasets.CIFAR10's checksum attributes for files with these MD5s (file name -> hex)."""
    return {
        "train_list": [[f"data_batch_{i}", md5[f"data_batch_{i}"]] for i in range(1, 6)],
        "test_list": [["test_batch", md5["test_batch"]]],
        "meta": {"filename": "batches.meta", "key": "label_names", "md5": md5["batches.meta"]},
    }


def _kill() -> None:
    os.kill(os.getpid(), signal.SIGKILL)


def _raise_enospc() -> None:
    raise OSError(errno.ENOSPC, os.strerror(errno.ENOSPC))


def main() -> int:
    split = sys.argv.index("--")
    fault, fault_args, cli_args = sys.argv[1], sys.argv[2:split], sys.argv[split + 1 :]
    numbers = [int(a) for a in fault_args if a.isdigit()]
    rank = os.environ.get("RANK") or os.environ.get("LOCAL_RANK", "0")
    if os.environ.get("FAULT_RANK", rank) != rank:
        fault = "none"
    if rank == "0" and os.environ.get("FAULT_SLOW_RECORDS"):  # rank 0 ends its records that many seconds later
        from project.infra import records

        close, seconds = records.Run.close, float(os.environ["FAULT_SLOW_RECORDS"])

        def slow_close(self, *args, **kwargs):
            time.sleep(seconds)
            return close(self, *args, **kwargs)

        records.Run.close = slow_close
    if os.environ.get(CIFAR10_MD5_ENV):
        import torchvision

        md5 = json.loads(Path(os.environ[CIFAR10_MD5_ENV]).read_text())
        for name, value in cifar10_checksums(md5).items():
            setattr(torchvision.datasets.CIFAR10, name, value)
    if fault == "none":
        pass
    elif fault == "kill-train":
        _at_training_step(*numbers, _kill)
    elif fault == "kill-val":
        _at_validation(*numbers, _kill)
    elif fault == "kill-after-save":
        _on_last_write(*numbers, after_rename=_kill)
    elif fault == "kill-mid-write":
        _on_last_write(*numbers, before_rename=_kill)
    elif fault in ("signal-train", "signal-val"):
        signum = signal.Signals[fault_args[0]]

        def send() -> None:
            os.kill(os.getpid(), signum)

        if fault == "signal-train":
            _at_training_step(*numbers, send)
        else:
            _at_validation(*numbers, send)
    elif fault == "kill-test":
        _at_test(_kill)
    elif fault == "kill-rewind":
        from project.infra import tracking

        tracking.Trackers.rewind = lambda *args: _kill()
    elif fault == "kill-plot":
        from project.infra import plots

        plots.save_curves = lambda *args, **kwargs: _kill()
    elif fault == "enospc":
        _on_last_write(*numbers, before_rename=_raise_enospc)
    elif fault == "signal-report":
        from project.infra import records

        finish, signum = records.Run.finish, signal.Signals[fault_args[0]]

        def signalled_finish(self, *args, **kwargs):
            os.kill(os.getpid(), signum)
            return finish(self, *args, **kwargs)

        records.Run.finish = signalled_finish
    elif fault == "enospc-plot":
        from project.infra import plots

        def full_disk(metrics_csv, out, *args, **kwargs):
            Path(out).write_bytes(b"half a png")
            raise OSError(errno.ENOSPC, os.strerror(errno.ENOSPC))

        plots.save_curves = full_disk
    elif fault == "skip-resume-check":
        from project.infra import checkpoints

        checkpoints.check_resumable = lambda *args: None
    else:
        raise SystemExit(f"unknown fault {fault}")

    from project.run import main as run_main

    return run_main(cli_args)


if __name__ == "__main__":
    sys.exit(main())
