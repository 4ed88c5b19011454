"""The LightningModule: what one training step and one evaluation step do, the optimiser, and what gets logged. What
the outputs mean (the loss, the metrics) is the task's (project/tasks/); this file is the same for every task.

Lightning 2.x pitfalls this file avoids (see the README):
- steps return only the loss (returning outputs kept every batch's tensors alive until the epoch ended);
- metrics accumulate small states on the device; nothing calls `.item()` or `.cpu()` per step, which would make
  the CPU wait for the GPU every batch (the step loss is read on the host only on the steps the loggers write);
- validation and test share `eval_step` and `on_eval_epoch_end`: the difference is a prefix;
- metrics are reduced across processes (torchmetrics) before they are logged, so 8 GPUs report the accuracy of
  the whole test set, not of one eighth of it.
"""

from __future__ import annotations

import math
import warnings
from collections.abc import Sequence
from typing import Any

import lightning.pytorch as pl
import torch
from torchmetrics import Metric

from project.metrics import MeanValue
from project.model import build_model
from project.tasks import build_task

# Epoch values are logged after torchmetrics has summed the states over all processes, so Lightning's advice to
# add sync_dist=True (another all-reduce, of numbers already equal on every rank) does not apply.
warnings.filterwarnings("ignore", message=r".*when logging on epoch level in distributed setting.*")


class Solver(pl.LightningModule):
    def __init__(
        self,
        task: str,
        output_names: Sequence[str],
        model: str,
        input_shape: Sequence[int],
        mean: Sequence[float],
        std: Sequence[float],
        pixel_max: float | None = None,
        task_options: dict[str, Any] | None = None,
        model_options: dict[str, Any] | None = None,
        learning_rate: float = 1e-3,
        max_epochs: int = 20,
        channels_last: bool = False,
        compile: bool = False,
    ) -> None:
        super().__init__()
        # Plain types only: checkpoints load with weights_only=True. The task, input_shape, mean/std and pixel_max
        # (images' raw pixels run 0..pixel_max; None for other inputs) also tell project.predict how to read new
        # inputs. The run's whole configuration goes to the trackers from the records (logger=False).
        self.save_hyperparameters(logger=False)
        self.task = build_task(task, output_names, task_options)
        self.model = build_model(model, input_shape, len(output_names), mean, std, self.task.output_layer(),
                                 **(model_options or {}))  # fmt: skip
        self.train_metric, self.eval_metric = self.task.metric(), self.task.metric()
        self.train_loss, self.eval_loss = MeanValue(), MeanValue()  # exact means of per-sample losses
        self.test_state: Any = None  # the test set's computed metric state, kept for the report

    def __setattr__(self, name: str, value: Any) -> None:
        # Lightning sets a plain string attribute on the module around each of its ~45 hook calls a step; nn.Module's
        # checks (parameter? buffer? submodule?) cost 0.8 us each. A name already in __dict__ is none of those.
        if name in self.__dict__ and (value is None or isinstance(value, str)):
            object.__setattr__(self, name, value)
        else:
            super().__setattr__(name, value)

    def setup(self, stage: str) -> None:
        if self.hparams.channels_last:
            self.model.to(memory_format=torch.channels_last)  # NHWC: tensor-core convolutions without transposes
        if self.hparams.compile:
            self.model.compile()  # in place: state_dict keys (and checkpoints) stay the same

    def forward(self, inputs: torch.Tensor) -> torch.Tensor:
        if self.hparams.channels_last:
            inputs = inputs.contiguous(memory_format=torch.channels_last)
        return self.model(inputs)

    def training_step(self, batch: tuple[torch.Tensor, torch.Tensor], batch_idx: int) -> torch.Tensor:
        inputs, targets = batch
        outputs = self(inputs)
        losses = self.task.loss(outputs, targets)
        loss = losses.mean()
        self.train_metric.update(outputs.detach(), targets)
        self.train_loss.update(losses.detach())
        # `self.log` costs about half a millisecond of host time, as much as a whole step of a small model on a GPU:
        # the step loss is logged only on the steps whose values Lightning hands to the loggers.
        trainer = self.trainer
        if trainer.fast_dev_run or (trainer.global_step + 1) % trainer.log_every_n_steps == 0:
            self.log("train/loss_step", loss.detach(), on_step=True, on_epoch=False, batch_size=len(targets))
        return loss

    def on_train_epoch_end(self) -> None:
        self.log_epoch("train", self.train_metric, self.train_loss)

    def validation_step(self, batch: tuple[torch.Tensor, torch.Tensor], batch_idx: int) -> None:
        self.eval_step(batch)

    def test_step(self, batch: tuple[torch.Tensor, torch.Tensor], batch_idx: int) -> None:
        self.eval_step(batch)

    def on_validation_epoch_end(self) -> None:
        self.on_eval_epoch_end("val")

    def on_test_epoch_end(self) -> None:
        self.on_eval_epoch_end("test")

    def eval_step(self, batch: tuple[torch.Tensor, torch.Tensor]) -> None:
        inputs, targets = batch
        outputs = self(inputs)
        self.eval_loss.update(self.task.loss(outputs, targets))
        self.eval_metric.update(outputs, targets)

    def on_eval_epoch_end(self, prefix: str) -> None:
        state = self.log_epoch(prefix, self.eval_metric, self.eval_loss)
        if prefix == "test":
            self.test_state = state

    def log_epoch(self, prefix: str, metric: Metric, loss_metric: MeanValue) -> Any:
        # compute() sums the states over all processes first; every rank then logs the same numbers.
        state = metric.compute()
        values = {f"{prefix}/loss": float(loss_metric.compute())}
        values.update({f"{prefix}/{name}": value for name, value in self.task.scores(state).items()})
        # The progress bar fits 100 columns: the loss and the task's first metric.
        shown = {f"{prefix}/{name}" for name in self.task.metric_names()[:2]} if prefix == "val" else set()
        self.log_dict({k: v for k, v in values.items() if k in shown}, prog_bar=True, sync_dist=False)
        self.log_dict({k: v for k, v in values.items() if k not in shown}, sync_dist=False)
        metric.reset()
        loss_metric.reset()
        return {k: v.cpu() for k, v in state.items()} if isinstance(state, dict) else state.cpu()

    def configure_optimizers(self) -> dict[str, Any]:
        optimizer = torch.optim.Adam(self.parameters(), lr=self.hparams.learning_rate)
        # Cosine decay to zero over --max-epochs, one step per epoch, as in the original template. Written in closed
        # form (CosineAnnealingLR updates from the previous rate) so that a run resumed with a larger --max-epochs
        # follows the longer schedule from its first new step instead of staying at the finished schedule's 0.
        scheduler = torch.optim.lr_scheduler.LambdaLR(optimizer, self.cosine)
        return {"optimizer": optimizer, "lr_scheduler": {"scheduler": scheduler, "interval": "epoch", "name": "lr"}}

    def on_train_start(self) -> None:
        # A resumed run restores the rate it saved; with a larger --max-epochs the schedule is longer, so the rate of
        # the current epoch is recomputed before the first new step (the same number when nothing changed).
        scheduler = self.lr_schedulers()
        for group, base_lr in zip(scheduler.optimizer.param_groups, scheduler.base_lrs, strict=True):
            group["lr"] = base_lr * self.cosine(scheduler.last_epoch)

    def cosine(self, epoch: int) -> float:
        return 0.5 * (1 + math.cos(math.pi * min(epoch, self.hparams.max_epochs) / self.hparams.max_epochs))
