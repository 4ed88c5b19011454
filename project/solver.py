"""The LightningModule: what one training step and one evaluation step do, the optimiser, and what gets logged.

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
import torch.nn.functional as F

from project.metrics import ConfusionMatrix, MeanValue, summarize
from project.model import build_model

# Epoch values are logged after torchmetrics has summed the states over all processes, so Lightning's advice to
# add sync_dist=True (another all-reduce, of numbers already equal on every rank) does not apply.
warnings.filterwarnings("ignore", message=r".*when logging on epoch level in distributed setting.*")


class Solver(pl.LightningModule):
    def __init__(
        self,
        model: str,
        input_shape: Sequence[int],
        class_names: Sequence[str],
        mean: Sequence[float],
        std: Sequence[float],
        pixel_max: float = 255.0,
        model_options: dict[str, Any] | None = None,
        learning_rate: float = 1e-3,
        max_epochs: int = 20,
        channels_last: bool = False,
        compile: bool = False,
    ) -> None:
        super().__init__()
        # Plain types only: checkpoints load with weights_only=True. input_shape, class_names, mean/std and pixel_max
        # (raw pixels run 0..pixel_max) also tell project.predict how to read new inputs. The run's whole
        # configuration goes to the trackers from the records, so Lightning does not log these (logger=False).
        self.save_hyperparameters(logger=False)
        self.model = build_model(model, input_shape, len(class_names), mean, std, **(model_options or {}))
        self.train_confusion, self.eval_confusion = ConfusionMatrix(len(class_names)), ConfusionMatrix(len(class_names))
        self.train_loss, self.eval_loss = MeanValue(), MeanValue()  # exact means of per-sample losses
        self.test_confusion: torch.Tensor | None = None  # kept after testing, for the report

    def setup(self, stage: str) -> None:
        if self.hparams.channels_last:
            self.model.to(memory_format=torch.channels_last)  # NHWC: tensor-core convolutions without transposes
        if self.hparams.compile:
            self.model.compile()  # in place: state_dict keys (and checkpoints) stay the same

    def forward(self, images: torch.Tensor) -> torch.Tensor:
        if self.hparams.channels_last:
            images = images.contiguous(memory_format=torch.channels_last)
        return self.model(images)

    def training_step(self, batch: tuple[torch.Tensor, torch.Tensor], batch_idx: int) -> torch.Tensor:
        images, labels = batch
        logits = self(images)
        losses = F.cross_entropy(logits, labels, reduction="none")
        loss = losses.mean()
        self.train_confusion.update(logits.detach(), labels)
        self.train_loss.update(losses.detach())
        # `self.log` costs about half a millisecond of host time, as much as a whole step of a small model on a GPU:
        # the step loss is logged only on the steps whose values Lightning hands to the loggers.
        trainer = self.trainer
        if trainer.fast_dev_run or (trainer.global_step + 1) % trainer.log_every_n_steps == 0:
            self.log("train/loss_step", loss.detach(), on_step=True, on_epoch=False, batch_size=len(labels))
        return loss

    def on_train_epoch_end(self) -> None:
        self.log_epoch("train", self.train_confusion, self.train_loss)

    def validation_step(self, batch: tuple[torch.Tensor, torch.Tensor], batch_idx: int) -> None:
        self.eval_step(batch)

    def test_step(self, batch: tuple[torch.Tensor, torch.Tensor], batch_idx: int) -> None:
        self.eval_step(batch)

    def on_validation_epoch_end(self) -> None:
        self.on_eval_epoch_end("val")

    def on_test_epoch_end(self) -> None:
        self.on_eval_epoch_end("test")

    def eval_step(self, batch: tuple[torch.Tensor, torch.Tensor]) -> None:
        images, labels = batch
        logits = self(images)
        self.eval_loss.update(F.cross_entropy(logits, labels, reduction="none"))
        self.eval_confusion.update(logits, labels)

    def on_eval_epoch_end(self, prefix: str) -> None:
        confusion = self.log_epoch(prefix, self.eval_confusion, self.eval_loss)
        if prefix == "test":
            self.test_confusion = confusion.cpu()

    def log_epoch(self, prefix: str, confusion_metric: ConfusionMatrix, loss_metric: MeanValue) -> torch.Tensor:
        # compute() sums the states over all processes first; every rank then logs the same numbers.
        confusion = confusion_metric.compute()
        values = {f"{prefix}/loss": float(loss_metric.compute())}
        values.update({f"{prefix}/{name}": value for name, value in summarize(confusion).items()})
        shown = {f"{prefix}/loss", f"{prefix}/acc"} if prefix == "val" else set()  # the progress bar fits 100 columns
        self.log_dict({k: v for k, v in values.items() if k in shown}, prog_bar=True, sync_dist=False)
        self.log_dict({k: v for k, v in values.items() if k not in shown}, sync_dist=False)
        confusion_metric.reset()
        loss_metric.reset()
        return confusion

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
