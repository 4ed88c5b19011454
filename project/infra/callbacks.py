"""What keeps a training run safe and its numbers right, as Lightning callbacks and a checkpoint plugin:

- SafeCheckpointIO writes checkpoints atomically and reads them weights-only (also Lightning's own resume reads);
- RandomState puts every global random stream into each checkpoint, so a resumed run draws what an uninterrupted
  one draws (Lightning saves none of them);
- MidEpochCheckpoint writes last.ckpt every --checkpoint-every-n-steps steps, where a resume is exact;
- PreciseBatchNorm recomputes BatchNorm's statistics before each validation, so a model scores what it learned;
- FiniteLoss stops a diverging run before broken weights replace the last good checkpoint;
- GracefulStop turns SIGTERM/SIGINT during training into "finish this step, save last.ckpt, say how to resume".
"""

from __future__ import annotations

import argparse
import contextlib
import os
import random
import shlex
import signal
import sys
import threading
from pathlib import Path
from typing import Any

import lightning.pytorch as pl
import numpy as np
import torch
from lightning.fabric.plugins import TorchCheckpointIO
from lightning.pytorch.callbacks import Callback, LearningRateMonitor, ModelCheckpoint

from project.infra import checkpoints
from project.infra.console import ProgressBar
from project.infra.errors import STOP_SIGNALS, RunStopped, StopSignals, UserError


def for_run(last_checkpoint: Path, args: argparse.Namespace) -> list[Callback]:
    """The callbacks every run gets, beside the records' checkpoint callbacks."""
    found = [RandomState(), PreciseBatchNorm(), ProgressBar(), LearningRateMonitor(logging_interval="epoch")]
    if not args.only_test:
        resume = shlex.join([sys.executable, "-m", "project.run", "--resume", str(last_checkpoint.resolve())])
        found += [FiniteLoss(last_checkpoint), GracefulStop(last_checkpoint, resume)]
    if args.checkpoint_every_n_steps and not args.only_test:
        found.append(MidEpochCheckpoint(last_checkpoint, args.checkpoint_every_n_steps))
    return found


class SafeCheckpointIO(TorchCheckpointIO):
    """Lightning's checkpoint reader and writer, made safe for files a crash or a stranger may have touched.

    Lightning's own writer goes through a temporary file from the system's temp folder and `shutil.move`: atomic only
    when that folder is on the run's file system (often it is not: a local /tmp, runs on a network disk), never
    fsynced. Here the temporary file sits beside the target, is fsynced, then renamed over it: `last.ckpt` is always
    the previous checkpoint or the new one, whatever kills the process. Reads (Lightning's resume path too) go through
    `checkpoints.read`: weights_only=True, whatever the caller asked.
    """

    def __init__(self, flag: str = "--resume") -> None:
        self.flag = flag  # the option that named the file, for error messages

    def save_checkpoint(self, checkpoint: dict[str, Any], path: Any, storage_options: Any = None) -> None:
        path = Path(path)
        temporary = path.with_name(f".{path.name}.{os.getpid()}.tmp")
        try:
            path.parent.mkdir(parents=True, exist_ok=True)
            for stale in path.parent.glob(f".{path.name}.*.tmp"):  # left by a process killed mid-write
                stale.unlink(missing_ok=True)
            with open(temporary, "wb") as file:
                writer = KeepsWriteError(file)
                try:
                    torch.save(checkpoint, writer)
                except RuntimeError:  # torch reports a failed write (a full disk) as "unexpected pos"
                    if writer.error is None:
                        raise
                    raise writer.error from None
                file.flush()
                os.fsync(file.fileno())
            os.replace(temporary, path)
        except OSError as error:
            kept = f"; the previous {path.name} is intact" if path.is_file() else ""
            raise UserError(
                f"cannot write checkpoint {path}: {error.strerror or error}{kept}. "
                "Free some space (or fix the folder's permissions), then continue with --resume."
            ) from error
        finally:
            with contextlib.suppress(OSError):
                temporary.unlink(missing_ok=True)  # after a failure: no half-written file left behind
        with contextlib.suppress(OSError):  # make the rename itself survive a power loss, where folders can sync
            folder = os.open(path.parent, os.O_RDONLY)
            try:
                os.fsync(folder)
            finally:
                os.close(folder)

    def load_checkpoint(self, path: Any, map_location: Any = None, weights_only: bool | None = None) -> dict[str, Any]:
        return checkpoints.read(Path(path), self.flag)


class KeepsWriteError:
    """A file for torch.save that remembers the OSError its write raised (errno and all)."""

    def __init__(self, file: Any) -> None:
        self.file, self.error = file, None

    def write(self, data: Any) -> int:
        try:
            return self.file.write(data)
        except OSError as error:
            self.error = error
            raise

    def flush(self) -> None:
        self.file.flush()


class RandomState(Callback):
    """Saves and restores the python, numpy, torch and CUDA random states through the checkpoint.

    Lightning restores callback states before it creates the first training iterator, the only place early enough:
    restoring in `on_train_epoch_start` would come after a mid-epoch resume drew its first batches. Batch order does
    not come from these streams (batches.py seeds it from --seed and the epoch), but augmentation and dropout do.
    """

    def state_dict(self) -> dict[str, Any]:
        numpy_state = np.random.get_state(legacy=False)
        # As a tensor: checkpoints load with weights_only=True, which refuses numpy arrays.
        numpy_state["state"]["key"] = torch.from_numpy(numpy_state["state"]["key"].copy())
        return {
            "python": random.getstate(),
            "numpy": numpy_state,
            "torch": torch.get_rng_state(),
            "cuda": torch.cuda.get_rng_state_all() if torch.cuda.is_available() else [],
        }

    def load_state_dict(self, state_dict: dict[str, Any]) -> None:
        random.setstate(state_dict["python"])
        numpy_state = {**state_dict["numpy"], "state": dict(state_dict["numpy"]["state"])}
        numpy_state["state"]["key"] = numpy_state["state"]["key"].numpy()
        np.random.set_state(numpy_state)
        torch.set_rng_state(state_dict["torch"])
        if state_dict["cuda"] and torch.cuda.is_available():
            torch.cuda.set_rng_state_all(state_dict["cuda"])


class MidEpochCheckpoint(ModelCheckpoint):
    """last.ckpt every N training steps (--checkpoint-every-n-steps), besides the one at each epoch end.

    Not after the last step of an epoch: Lightning resumes a checkpoint saved there as if the epoch had ended,
    skipping its validation and so its best checkpoint. The epoch-end last.ckpt, written right after that
    validation, stands in for it.
    """

    def __init__(self, last_checkpoint: Path, every_n_steps: int) -> None:
        super().__init__(dirpath=last_checkpoint.parent, filename=last_checkpoint.stem,
                         every_n_train_steps=every_n_steps, enable_version_counter=False)  # fmt: skip

    def on_train_batch_end(self, trainer: pl.Trainer, pl_module: pl.LightningModule, *args: Any, **kwargs: Any) -> None:
        if not trainer.fit_loop.epoch_loop.batch_progress.is_last_batch:
            super().on_train_batch_end(trainer, pl_module, *args, **kwargs)


class PreciseBatchNorm(Callback):
    """Recomputes BatchNorm's running statistics from training images with the current weights before every
    validation ("precise BN": Wu & Johnson, Rethinking "Batch" in BatchNorm, 2021).

    Running averages at momentum 0.1 lag ~10 steps behind the weights: after a 12-step digits epoch they were so far
    off that the model scored 0.10 in evaluation and 0.98 with batch statistics. Validation comes before every saved
    best and epoch-end checkpoint, so those carry the recomputed statistics. Cost: forward passes over at most
    SAMPLES training images per validation. Random streams are left as they were, so exact resume still holds.
    """

    SAMPLES = 4096
    NORMS = (torch.nn.BatchNorm1d, torch.nn.BatchNorm2d, torch.nn.BatchNorm3d, torch.nn.SyncBatchNorm)

    def on_validation_start(self, trainer: pl.Trainer, pl_module: pl.LightningModule) -> None:
        norms = [m for m in pl_module.modules() if isinstance(m, self.NORMS) and m.track_running_stats]
        if not norms or trainer.sanity_checking or trainer.datamodule is None:
            return
        momenta = [m.momentum for m in norms]
        device = pl_module.device
        with torch.random.fork_rng(devices=[device] if device.type == "cuda" else []), torch.no_grad():
            pl_module.train()
            for m in norms:
                m.reset_running_stats()
                m.momentum = None  # a plain average over the batches below
            with torch.compiler.set_stance("force_eager"), trainer.precision_plugin.forward_context():
                for images in trainer.datamodule.statistics_batches(self.SAMPLES):
                    pl_module(images)
            pl_module.eval()
        for m, momentum in zip(norms, momenta, strict=True):
            m.momentum = momentum
            if trainer.world_size > 1:  # every process saw its own shard: average, so all evaluate alike
                for buffer in (m.running_mean, m.running_var):
                    buffer.copy_(trainer.strategy.reduce(buffer, reduce_op="mean"))


class FiniteLoss(Callback):
    """Stops training when the loss is NaN or infinite, keeping the last checkpoint of finite weights.

    Each step only ORs a flag on the device (no `.item()`, which would make the host wait for the GPU every step).
    The host reads the flag when it must: before any checkpoint is written (raising in `on_save_checkpoint` aborts the
    save, so the previous last.ckpt stays) and at the end of each epoch. The weights are checked too before a save.
    """

    def __init__(self, last_checkpoint: Path) -> None:
        self.last_checkpoint = last_checkpoint
        self.first_bad_step: torch.Tensor | None = None  # -1 while every loss has been finite

    def on_train_batch_end(self, trainer: pl.Trainer, pl_module: pl.LightningModule, outputs: Any, *_: Any) -> None:
        loss = outputs.get("loss") if isinstance(outputs, dict) else outputs
        if not isinstance(loss, torch.Tensor):
            return
        if self.first_bad_step is None:
            self.first_bad_step = torch.full((), -1, dtype=torch.long, device=loss.device)
        first_time_bad = ~torch.isfinite(loss.detach()) & (self.first_bad_step < 0)
        self.first_bad_step = torch.where(first_time_bad, trainer.global_step, self.first_bad_step)

    def on_train_epoch_end(self, trainer: pl.Trainer, pl_module: pl.LightningModule) -> None:
        self.check(trainer, pl_module, weights=False)

    def on_save_checkpoint(self, trainer: pl.Trainer, pl_module: pl.LightningModule, checkpoint: dict) -> None:
        self.check(trainer, pl_module, weights=True)

    def check(self, trainer: pl.Trainer, pl_module: pl.LightningModule, weights: bool) -> None:
        loss_step = -1 if self.first_bad_step is None else int(self.first_bad_step)  # the one host sync
        if loss_step >= 0:
            what, step = "the loss", loss_step
        elif weights and not bool(torch.stack([torch.isfinite(p).all() for p in pl_module.parameters()]).all()):
            what, step = "the weights", trainer.global_step
        else:
            return
        kept = (f"the last good checkpoint is kept: {self.last_checkpoint}" if self.last_checkpoint.is_file()
                else "no checkpoint was written before it")  # fmt: skip
        raise RunStopped(
            f"training diverged: {what} became NaN or infinite at step {step} (epoch {trainer.current_epoch}); "
            f"stopped without saving the broken weights, {kept}. Try a lower --learning-rate.",
            exit_code=1,
        )


class GracefulStop(Callback):
    """SIGTERM or SIGINT while training: finish the current step, save last.ckpt, print how to resume, exit 128 + the
    signal number (143 for SIGTERM, 130 for Ctrl-C), as schedulers expect.

    Lightning's own SIGTERM handling saves nothing, stops in the middle of validation (whose partial metrics a
    checkpoint cannot hold) and exits 0, which tells a scheduler the job succeeded. While training runs, the
    process-wide handler (errors.StopSignals) replaces it and only records the signal; the loop acts at a safe point:
    after a training step (save, stop), or, if the signal came during the epoch-end validation, after that validation
    and the regular epoch-end checkpoint. A second signal stops at once; checkpoints are atomic, so nothing breaks.
    """

    def __init__(self, last_checkpoint: Path, resume_command: str) -> None:
        self.last_checkpoint, self.resume_command = last_checkpoint, resume_command
        self.lightning_handlers: dict[int, Any] = {}

    def on_train_start(self, trainer: pl.Trainer, pl_module: pl.LightningModule) -> None:
        if threading.current_thread() is threading.main_thread():  # Python delivers signals to the main thread only
            self.lightning_handlers = {s: signal.signal(s, StopSignals.handle) for s in STOP_SIGNALS}
        StopSignals.deferred = True

    def on_train_batch_end(self, trainer: pl.Trainer, pl_module: pl.LightningModule, *_: Any) -> None:
        # With several processes all must stop at the same step (saving is collective); on one device this is just
        # a Python check, with no communication.
        if not trainer.strategy.reduce_boolean_decision(StopSignals.received is not None, all=False):
            return
        if trainer.fit_loop.epoch_loop.batch_progress.is_last_batch:
            return  # validation and the epoch-end checkpoint come next (see MidEpochCheckpoint)
        trainer.save_checkpoint(self.last_checkpoint)  # where MidEpochCheckpoint saves: resumes with the next step
        raise self.stopped(f"saved {self.last_checkpoint} after step {trainer.global_step}")

    def on_train_epoch_end(self, trainer: pl.Trainer, pl_module: pl.LightningModule) -> None:
        if StopSignals.received is not None:
            trainer.should_stop = True  # let the epoch-end last.ckpt be written, then stop in on_train_end

    def on_train_end(self, trainer: pl.Trainer, pl_module: pl.LightningModule) -> None:
        self.restore()
        if StopSignals.received is not None:
            raise self.stopped(
                f"saved {self.last_checkpoint} at the end of the epoch, after step {trainer.global_step}"
            )

    def on_exception(self, trainer: pl.Trainer, pl_module: pl.LightningModule, exception: BaseException) -> None:
        self.restore()
        if trainer.progress_bar_callback is not None:
            print(flush=True)  # end the progress bar's line (on stdout), so that our message starts on its own

    def restore(self) -> None:
        StopSignals.deferred = False
        for signum, handler in self.lightning_handlers.items():
            signal.signal(signum, handler)
        self.lightning_handlers = {}

    def stopped(self, saved: str) -> RunStopped:
        signum = StopSignals.received or signal.SIGTERM  # a process that did not get the signal itself
        return RunStopped(f"stopped by {signal.Signals(signum).name}: {saved}\nresume with: {self.resume_command}",
                          128 + signum)  # fmt: skip
