"""Callbacks that keep a run safe: exact resume, a loss that stops being finite, preemption signals.

- MidEpochCheckpoint writes last.ckpt every --checkpoint-every-n-steps steps, where a resume is exact.
- RandomState puts every global random stream into each checkpoint, so a resumed run draws the same
  augmentations as an uninterrupted one (Lightning saves none of them).
- FiniteLoss stops a diverging run before a checkpoint of broken weights replaces the last good one,
  without making the host wait for the device every step.
- GracefulStop turns SIGTERM/SIGINT (preemption, Ctrl-C) into "finish this step, save last.ckpt, say
  how to resume, exit 128 + signal number".

Checkpoints are written atomically and read with weights_only=True by checkpoints.SafeCheckpointIO.
"""

from __future__ import annotations

import random
import signal
import threading
from pathlib import Path
from typing import Any

import lightning.pytorch as pl
import numpy as np
import torch
from lightning.pytorch.callbacks import Callback, ModelCheckpoint

from project.errors import RunStopped


class RandomState(Callback):
    """Saves and restores the python, numpy, torch and CUDA random states through the checkpoint.

    Lightning restores callback states before it creates the first training iterator, and that is the
    only place early enough: restoring in `on_train_epoch_start` would come after the first batches of
    a mid-epoch resume were drawn. Batch order itself does not come from these streams (data.py seeds
    it from --seed and the epoch), but augmentation, dropout and anything a user adds does.
    """

    def state_dict(self) -> dict[str, Any]:
        numpy_state = np.random.get_state(legacy=False)
        # The Mersenne Twister key as a tensor: checkpoints load with weights_only=True, which refuses numpy arrays.
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

    Not after the last step of an epoch: Lightning resumes a checkpoint saved there as if the epoch had
    ended, skipping its validation and so its best checkpoint. The epoch-end last.ckpt, written right
    after that validation, stands in for it.
    """

    def __init__(self, last_checkpoint: Path, every_n_steps: int) -> None:
        super().__init__(
            dirpath=last_checkpoint.parent,
            filename=last_checkpoint.stem,
            every_n_train_steps=every_n_steps,
            enable_version_counter=False,
        )

    def on_train_batch_end(self, trainer: pl.Trainer, pl_module: pl.LightningModule, *args: Any, **kwargs: Any) -> None:
        if not trainer.fit_loop.epoch_loop.batch_progress.is_last_batch:
            super().on_train_batch_end(trainer, pl_module, *args, **kwargs)


class FiniteLoss(Callback):
    """Stops training when the loss is NaN or infinite, keeping the last checkpoint of finite weights.

    Each step only ORs a flag on the device (no `.item()`, which would make the host wait for the GPU
    every step). The host looks at the flag when it must: before any checkpoint is written (raising in
    `on_save_checkpoint` aborts the save, so the previous last.ckpt stays) and at the end of each epoch.
    The weights are checked too before a save: a finite loss can still be followed by an infinite update.
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
        self._check(trainer, pl_module, weights=False)

    def on_save_checkpoint(self, trainer: pl.Trainer, pl_module: pl.LightningModule, checkpoint: dict) -> None:
        self._check(trainer, pl_module, weights=True)

    def _check(self, trainer: pl.Trainer, pl_module: pl.LightningModule, weights: bool) -> None:
        loss_step = -1 if self.first_bad_step is None else int(self.first_bad_step)  # the one host sync
        if loss_step >= 0:
            what, step = "the loss", loss_step
        elif weights and not bool(torch.stack([torch.isfinite(p).all() for p in pl_module.parameters()]).all()):
            what, step = "the weights", trainer.global_step
        else:
            return
        kept = (
            f"the last good checkpoint is kept: {self.last_checkpoint}"
            if self.last_checkpoint.is_file()
            else "no checkpoint was written before it"
        )
        raise RunStopped(
            f"training diverged: {what} became NaN or infinite at step {step} (epoch {trainer.current_epoch}); "
            f"stopped without saving the broken weights, {kept}. Try a lower --learning-rate.",
            exit_code=1,
        )


class GracefulStop(Callback):
    """SIGTERM or SIGINT while training: finish the current step, save last.ckpt, print how to resume,
    exit 128 + the signal number (143 for SIGTERM, 130 for Ctrl-C), as schedulers expect.

    Lightning's own SIGTERM handling saves nothing itself, stops in the middle of validation (whose
    partial metrics a checkpoint cannot hold) and exits with code 0, which tells a scheduler the job
    succeeded. So while training runs, our handler replaces it: it only records the signal, and the
    loop acts at a safe point: after a training step (save, stop), or, if the signal came during the
    epoch-end validation, after that validation and the regular epoch-end checkpoint. A second signal
    stops the process at once; checkpoints are written atomically, so even that corrupts nothing.
    """

    SIGNALS = (signal.SIGTERM, signal.SIGINT)

    def __init__(self, last_checkpoint: Path, resume_command: str) -> None:
        self.last_checkpoint = last_checkpoint
        self.resume_command = resume_command
        self.received: int | None = None
        self._previous: dict[int, Any] = {}

    def on_train_start(self, trainer: pl.Trainer, pl_module: pl.LightningModule) -> None:
        # Installed here, after the Trainer registered its own SIGTERM handler at the start of fit().
        if threading.current_thread() is not threading.main_thread():
            return  # Python delivers signals to the main thread only
        for signum in self.SIGNALS:
            self._previous[signum] = signal.signal(signum, self._record)

    def _record(self, signum: int, frame: Any) -> None:
        # Only record: a signal handler runs between any two bytecodes, possibly inside optimizer.step().
        self.received = signum
        signal.signal(signum, signal.SIG_DFL)  # a second one stops the process at once

    def on_train_batch_end(self, trainer: pl.Trainer, pl_module: pl.LightningModule, *_: Any) -> None:
        # With several processes all must stop at the same step (saving is collective); on one device
        # this is just `self.received is not None`, with no communication.
        if not trainer.strategy.reduce_boolean_decision(self.received is not None, all=False):
            return
        self.received = self.received or signal.SIGTERM  # a process that did not get the signal itself
        if trainer.fit_loop.epoch_loop.batch_progress.is_last_batch:
            return  # validation and the epoch-end checkpoint come next (see MidEpochCheckpoint)
        # Where MidEpochCheckpoint saves too, so Lightning resumes with the next step.
        trainer.save_checkpoint(self.last_checkpoint)
        raise self._stopped(f"saved {self.last_checkpoint} after step {trainer.global_step}")

    def on_train_epoch_end(self, trainer: pl.Trainer, pl_module: pl.LightningModule) -> None:
        if self.received is not None:
            trainer.should_stop = True  # let the epoch-end last.ckpt be written, then stop in on_train_end

    def on_train_end(self, trainer: pl.Trainer, pl_module: pl.LightningModule) -> None:
        if self.received is not None:
            raise self._stopped(
                f"saved {self.last_checkpoint} at the end of the epoch, after step {trainer.global_step}"
            )

    def on_exception(self, trainer: pl.Trainer, pl_module: pl.LightningModule, exception: BaseException) -> None:
        self._restore_handlers()
        if trainer.progress_bar_callback is not None:
            print(flush=True)  # end the progress bar's line (on stdout) so that our message starts on its own

    def teardown(self, trainer: pl.Trainer, pl_module: pl.LightningModule, stage: str) -> None:
        self._restore_handlers()

    def _restore_handlers(self) -> None:
        for signum, handler in self._previous.items():
            signal.signal(signum, handler)
        self._previous = {}

    def _stopped(self, saved: str) -> RunStopped:
        assert self.received is not None
        name = signal.Signals(self.received).name
        return RunStopped(f"stopped by {name}: {saved}\nresume with: {self.resume_command}", 128 + self.received)


def safety_callbacks(last_checkpoint: Path, resume_command: str, every_n_steps: int | None) -> list[Callback]:
    """The callbacks every training run gets, whatever its trackers (which write the epoch-end last.ckpt)."""
    callbacks = [RandomState(), FiniteLoss(last_checkpoint), GracefulStop(last_checkpoint, resume_command)]
    if every_n_steps:
        callbacks.append(MidEpochCheckpoint(last_checkpoint, every_n_steps))
    return callbacks
