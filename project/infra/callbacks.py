"""What keeps a training run safe and its numbers right: a checkpoint plugin and Lightning callbacks for what
neither Lightning nor another library does (the README's "What we wrote ourselves" says why each is ours)."""

from __future__ import annotations

import argparse
import contextlib
import io
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
from torch.optim.swa_utils import update_bn
from torchmetrics import Metric

from project.infra import checkpoints
from project.infra.console import ProgressBar
from project.infra.errors import STOP_SIGNALS, RunStopped, StopSignals, UserError
from project.infra.redact import redact_path


def for_run(last_checkpoint: Path, args: argparse.Namespace) -> list[Callback]:
    """The callbacks every run gets, beside the records' checkpoint callbacks."""
    found = [
        RandomState(),
        MetricStates(),
        PreciseBatchNorm(),
        ProgressBar(),
        LearningRateMonitor(logging_interval="epoch"),
    ]
    if not args.only_test:
        resume = shlex.join([sys.executable, "-m", "project.run", "--resume", str(last_checkpoint.resolve())])
        found += [FiniteLoss(last_checkpoint), GracefulStop(last_checkpoint, resume)]
        if args.checkpoint_every_n_steps:
            found.append(MidEpochCheckpoint(last_checkpoint, args.checkpoint_every_n_steps))
    return found


class SafeCheckpointIO(TorchCheckpointIO):
    """Lightning's checkpoint IO, writing atomically and reading weights-only (Lightning's resume reads too).

    Lightning writes through a temporary file in the system's temp folder and `shutil.move`: not atomic when that is
    another file system, never fsynced. Here the temporary file sits beside the target, is fsynced and renamed over
    it, so `last.ckpt` is always the previous checkpoint or the new one, whatever kills the process.
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
                buffer = io.BytesIO()  # torch.save reports a failed file write without its errno: write it ourselves
                torch.save(checkpoint, buffer)
                file.write(buffer.getbuffer())
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
        # The rename itself survives a power loss once the folder is synced (where a file system can).
        with contextlib.suppress(OSError):
            folder = os.open(path.parent, os.O_RDONLY)
            try:
                os.fsync(folder)
            finally:
                os.close(folder)

    def load_checkpoint(self, path: Any, map_location: Any = None, weights_only: bool | None = None) -> dict[str, Any]:
        return checkpoints.read(Path(path), self.flag)  # weights_only=True, whatever the caller asked


class RandomState(Callback):
    """The python, numpy, torch and CUDA random streams in every checkpoint (Lightning saves none), so augmentation
    and dropout draw after a resume what they would have drawn. Lightning restores callback states before the first
    training batch is drawn: early enough even for a mid-epoch resume."""

    def state_dict(self) -> dict[str, Any]:
        numpy_state = np.random.get_state(legacy=False)
        numpy_state["state"]["key"] = torch.from_numpy(numpy_state["state"]["key"].copy())  # weights_only: no arrays
        cuda = torch.cuda.get_rng_state_all() if torch.cuda.is_available() else []
        return {"python": random.getstate(), "numpy": numpy_state, "torch": torch.get_rng_state(), "cuda": cuda}

    def load_state_dict(self, state_dict: dict[str, Any]) -> None:
        random.setstate(state_dict["python"])
        numpy_state = dict(state_dict["numpy"])
        numpy_state["state"] = {**numpy_state["state"], "key": numpy_state["state"]["key"].numpy()}
        np.random.set_state(numpy_state)
        torch.set_rng_state(state_dict["torch"])
        if state_dict["cuda"] and torch.cuda.is_available():
            torch.cuda.set_rng_state_all(state_dict["cuda"])


class MetricStates(Callback):
    """The metrics' partial states in every checkpoint (Lightning saves none), each process's own (a checkpoint is saved
    by all of them together), so that an epoch resumed mid-way reports train/* over all of its batches. A run resumed
    mid-epoch has as many processes (run.py): each takes its own back, whatever its metrics' reductions."""

    def on_save_checkpoint(self, trainer: pl.Trainer, pl_module: pl.LightningModule, checkpoint: dict) -> None:
        own = {name: {key: state_on(value, "cpu") for key, value in metric.metric_state.items()}
               for name, metric in pl_module.named_modules() if isinstance(metric, Metric)}  # fmt: skip
        every = [own]
        if trainer.world_size > 1:
            every = [None] * trainer.world_size
            torch.distributed.all_gather_object(every, own)
        checkpoint["metric_states"] = every

    def on_load_checkpoint(self, trainer: pl.Trainer, pl_module: pl.LightningModule, checkpoint: dict) -> None:
        every = checkpoint.get("metric_states")
        if not isinstance(every, list) or len(every) != trainer.world_size:  # at an epoch's end they are empty anyway
            return
        metrics = dict(pl_module.named_modules())
        for name, states in every[trainer.global_rank].items():
            for key, value in states.items() if isinstance(metrics.get(name), Metric) else []:
                setattr(metrics[name], key, state_on(value, pl_module.device))


def state_on(state: torch.Tensor | list[torch.Tensor], device: torch.device | str) -> torch.Tensor | list[torch.Tensor]:
    """A metric's state (a tensor, or a list of them) on `device`, detached."""
    return state.detach().to(device) if isinstance(state, torch.Tensor) else [v.detach().to(device) for v in state]


class MidEpochCheckpoint(ModelCheckpoint):
    """last.ckpt every --checkpoint-every-n-steps steps, but not after an epoch's last step: Lightning resumes one
    saved there as if the epoch had ended, skipping its validation (the epoch-end last.ckpt stands in for it)."""

    def __init__(self, last_checkpoint: Path, every_n_steps: int) -> None:
        super().__init__(dirpath=last_checkpoint.parent, filename=last_checkpoint.stem,
                         every_n_train_steps=every_n_steps, enable_version_counter=False)  # fmt: skip

    def on_train_batch_end(self, trainer: pl.Trainer, pl_module: pl.LightningModule, *args: Any, **kwargs: Any) -> None:
        if not trainer.fit_loop.epoch_loop.batch_progress.is_last_batch:
            super().on_train_batch_end(trainer, pl_module, *args, **kwargs)


class PreciseBatchNorm(Callback):
    """BatchNorm's statistics recomputed with the current weights before every validation ("precise BN", Wu & Johnson
    2021; torch's `update_bn`): running averages lag the weights, and after a 12-step digits epoch a model scored 0.10
    instead of 0.98. Checkpoints are saved after validation, so they carry these statistics. At most SAMPLES training
    samples are read, and the random streams are left as they were (exact resume)."""

    SAMPLES = 4096
    NORMS = (torch.nn.BatchNorm1d, torch.nn.BatchNorm2d, torch.nn.BatchNorm3d, torch.nn.SyncBatchNorm)

    def on_validation_start(self, trainer: pl.Trainer, pl_module: pl.LightningModule) -> None:
        # A plain LightningDataModule (no statistics_batches) keeps BatchNorm's running averages.
        samples = getattr(trainer.datamodule, "statistics_batches", None)
        norms = any(isinstance(m, self.NORMS) for m in pl_module.modules())
        if trainer.sanity_checking or samples is None or not norms:
            return
        devices = [pl_module.device] if pl_module.device.type == "cuda" else []  # whose random streams fork_rng keeps
        precision = trainer.precision_plugin.forward_context()
        with torch.random.fork_rng(devices), torch.compiler.set_stance("force_eager"), precision:
            update_bn(samples(self.SAMPLES), pl_module)  # back in eval mode after
        if trainer.world_size > 1:  # each process saw its own shard: average, so all evaluate alike
            for m in pl_module.modules():
                if isinstance(m, self.NORMS) and m.track_running_stats:
                    m.running_mean.copy_(trainer.strategy.reduce(m.running_mean, reduce_op="mean"))
                    m.running_var.copy_(trainer.strategy.reduce(m.running_var, reduce_op="mean"))


class FiniteLoss(Callback):
    """A NaN or infinite loss stops training; last.ckpt keeps the last finite weights. Each step only marks the first
    bad step on the device (no wait for the GPU); the host reads the mark before each checkpoint (raising in
    `on_save_checkpoint` aborts the save; the weights are checked there too) and at each epoch's end."""

    def __init__(self, last_checkpoint: Path) -> None:
        self.last_checkpoint, self.bad_step = last_checkpoint, -1  # the first step whose loss was not finite

    def on_train_batch_end(self, trainer: pl.Trainer, pl_module: pl.LightningModule, outputs: Any, *_: Any) -> None:
        loss = outputs.get("loss") if isinstance(outputs, dict) else outputs
        if isinstance(loss, torch.Tensor):
            first = ~torch.isfinite(loss.detach()) & (self.bad_step < 0)
            self.bad_step = torch.where(first, trainer.global_step, self.bad_step)

    def on_train_epoch_end(self, trainer: pl.Trainer, pl_module: pl.LightningModule) -> None:
        self.check(trainer, pl_module, weights=False)

    def on_save_checkpoint(self, trainer: pl.Trainer, pl_module: pl.LightningModule, checkpoint: dict) -> None:
        self.check(trainer, pl_module, weights=True)

    def check(self, trainer: pl.Trainer, pl_module: pl.LightningModule, weights: bool) -> None:
        what, step = "the loss", int(self.bad_step)  # the one wait for the GPU
        if step < 0:
            finite = not weights or bool(torch.stack([torch.isfinite(p).all() for p in pl_module.parameters()]).all())
            if finite:
                return
            what, step = "the weights", trainer.global_step
        kept = "no checkpoint was written before it"
        if self.last_checkpoint.is_file():
            kept = f"the last good checkpoint is kept: {redact_path(self.last_checkpoint)}"
        raise RunStopped(
            f"training diverged: {what} became NaN or infinite at step {step} (epoch {trainer.current_epoch}); "
            f"stopped without saving the broken weights, {kept}. Try a lower --learning-rate.",
            exit_code=1,
        )


class GracefulStop(Callback):
    """SIGTERM/SIGINT while training: finish the step, save last.ckpt, print how to resume, exit 128 + signal.
    Lightning's own handling saves nothing, stops mid-validation and exits 0 (a scheduler reads success). While
    training, errors.StopSignals only records the signal; in an epoch's last step or its validation, the run stops
    after the epoch-end validation and checkpoint. Lightning restores its handlers when `fit` ends."""

    def __init__(self, last_checkpoint: Path, resume_command: str) -> None:
        self.last_checkpoint, self.resume_command = last_checkpoint, resume_command

    def on_train_start(self, trainer: pl.Trainer, pl_module: pl.LightningModule) -> None:
        if threading.current_thread() is threading.main_thread():  # Python delivers signals to the main thread only
            for signum in STOP_SIGNALS:
                signal.signal(signum, StopSignals.handle)
        StopSignals.deferred = True

    def on_train_batch_end(self, trainer: pl.Trainer, pl_module: pl.LightningModule, *_: Any) -> None:
        # All processes stop at the same step (saving is collective); on one device this is a Python check.
        if not trainer.strategy.reduce_boolean_decision(StopSignals.received is not None, all=False):
            return
        if trainer.fit_loop.epoch_loop.batch_progress.is_last_batch:
            return  # validation and the epoch-end checkpoint come next (see MidEpochCheckpoint)
        trainer.save_checkpoint(self.last_checkpoint)  # where MidEpochCheckpoint saves: resumes with the next step
        raise self.stopped(trainer, f"after step {trainer.global_step}")

    def on_train_epoch_end(self, trainer: pl.Trainer, pl_module: pl.LightningModule) -> None:
        # Any process's signal stops them all: one that reached a single rank in the epoch's last step or its
        # validation would otherwise stop that rank alone (Lightning's should_stop is rank 0's).
        if trainer.strategy.reduce_boolean_decision(StopSignals.received is not None, all=False):
            trainer.should_stop = True  # let the epoch-end last.ckpt be written, then stop in on_train_end

    def on_train_end(self, trainer: pl.Trainer, pl_module: pl.LightningModule) -> None:
        StopSignals.deferred = False
        if trainer.strategy.reduce_boolean_decision(StopSignals.received is not None, all=False):
            raise self.stopped(trainer, f"at the end of the epoch, after step {trainer.global_step}")

    def on_exception(self, trainer: pl.Trainer, pl_module: pl.LightningModule, exception: BaseException) -> None:
        StopSignals.deferred = False
        if trainer.progress_bar_callback is not None:
            print(flush=True)  # end the progress bar's line, so that our message starts on its own

    def stopped(self, trainer: pl.Trainer, when: str) -> RunStopped:
        """What every process says and exits with: the signal one of them received (all of them call this at once)."""
        signum = StopSignals.received or 0
        if trainer.world_size > 1:
            own = torch.tensor(signum, device=trainer.strategy.root_device)
            signum = int(trainer.strategy.reduce(own, reduce_op="max"))
        signum = signum or signal.SIGTERM
        name, resume = signal.Signals(signum).name, self.resume_command
        if not trainer.is_global_zero:  # under torchrun, only rank 0 knows the run directory's name
            return RunStopped(f"stopped by {name} {when} (rank {trainer.global_rank}: rank 0 says how to resume)",
                              128 + signum)  # fmt: skip
        return RunStopped(
            f"stopped by {name}: saved {redact_path(self.last_checkpoint)} {when}\nresume with: {redact_path(resume)}",
            128 + signum,
        )
