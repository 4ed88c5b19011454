"""The LightningModule: what one training step and one evaluation step do, and what gets logged.

Lightning 2.x pitfalls this file avoids (see the README):
- steps return only the loss (returning outputs kept every batch's tensors alive until epoch end);
- metrics accumulate a confusion matrix on the device; nothing calls `.item()` or `.cpu()` per step,
  which would make the CPU wait for the GPU every batch (the step loss is read on the host only on
  the steps the loggers write, every `log_every_n_steps`);
- validation and test share `eval_step` and `on_eval_epoch_end`: the difference is a prefix;
- metrics are reduced across processes (torchmetrics) before they are logged, so 8 GPUs report the
  accuracy of the whole test set, not of one eighth of it.
"""

from __future__ import annotations

import math
import warnings
from collections.abc import Sequence

import lightning.pytorch as pl
import torch
import torch.nn.functional as F

from project.metrics import ConfusionMatrix, MeanValue, summarize
from project.model import build_model

# Epoch values are logged after torchmetrics has summed the states over all processes, so Lightning's advice
# to add sync_dist=True (another all-reduce, of numbers already equal on every rank) does not apply.
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
        hidden_dim: int = 128,
        learning_rate: float = 1e-3,
        max_epochs: int = 20,
        channels_last: bool = False,
        compile: bool = False,
    ) -> None:
        super().__init__()
        # Plain types only: checkpoints load with weights_only=True, which refuses arbitrary objects.
        # input_shape, class_names, mean/std and pixel_max (raw pixels run 0..pixel_max) are also how
        # project.predict reads new inputs exactly as the dataset gave them.
        self.save_hyperparameters()
        self.class_names = list(class_names)
        num_classes = len(class_names)
        self.model = build_model(model, input_shape, num_classes, hidden_dim, mean, std)
        self.train_confusion = ConfusionMatrix(num_classes)
        self.train_loss = MeanValue()
        self.eval_confusion = ConfusionMatrix(num_classes)
        self.eval_loss = MeanValue()
        self.test_confusion: torch.Tensor | None = None  # set after testing, for the report

    def setup(self, stage: str) -> None:
        if self.hparams.channels_last:
            # NHWC lets cuDNN use tensor-core convolutions without transposes.
            self.model.to(memory_format=torch.channels_last)
        if self.hparams.compile:
            self.model.compile()  # in place: state_dict keys (and checkpoints) stay the same

    def forward(self, images: torch.Tensor) -> torch.Tensor:
        if self.hparams.channels_last:
            images = images.contiguous(memory_format=torch.channels_last)
        return self.model(images)

    def training_step(self, batch: tuple[torch.Tensor, torch.Tensor], batch_idx: int) -> torch.Tensor:
        images, labels = batch
        logits = self(images)
        loss = F.cross_entropy(logits, labels)
        self.train_confusion.update(logits.detach(), labels)
        self.train_loss.update(loss.detach() * len(labels), len(labels))
        if self._loggers_write_this_step():
            self.log("train/loss_step", loss.detach(), on_step=True, on_epoch=False, batch_size=len(labels))
        return loss

    def _loggers_write_this_step(self) -> bool:
        """Whether Lightning hands this step's logged values to the loggers (every `log_every_n_steps`).

        `self.log` costs about half a millisecond of host time per call (Lightning's bookkeeping of
        logged results), as much as a whole training step of a small model on a GPU, so the per-step
        loss is logged only on the steps whose value is written; tests/test_speed.py checks the rule.
        """
        trainer = self.trainer
        every = trainer.log_every_n_steps
        return bool(trainer.fast_dev_run) or (every > 0 and (trainer.global_step + 1) % every == 0)

    def on_train_epoch_end(self) -> None:
        self._log_epoch("train", self.train_confusion, self.train_loss)

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
        self.eval_loss.update(F.cross_entropy(logits, labels, reduction="sum"), len(labels))
        self.eval_confusion.update(logits, labels)

    def on_eval_epoch_end(self, prefix: str) -> None:
        confusion = self._log_epoch(prefix, self.eval_confusion, self.eval_loss)
        if prefix == "test":
            self.test_confusion = confusion.cpu()

    def _log_epoch(self, prefix: str, confusion_metric: ConfusionMatrix, loss_metric: MeanValue) -> torch.Tensor:
        # compute() sums the states over all processes first; every rank then logs the same numbers,
        # so no further sync_dist is needed.
        confusion = confusion_metric.compute()
        scores = summarize(confusion)
        values = {
            f"{prefix}/loss": float(loss_metric.compute()),
            **{f"{prefix}/{k}": v for k, v in scores.items()},
        }
        self.log_dict(values, prog_bar=prefix == "val", sync_dist=False)
        confusion_metric.reset()
        loss_metric.reset()
        return confusion

    def configure_optimizers(self):  # noqa: ANN201 (Lightning's own return type is a union)
        optimizer = torch.optim.Adam(self.parameters(), lr=self.hparams.learning_rate)
        # Cosine decay to zero over the run, one step per epoch, as in the original template. Written in closed
        # form (not CosineAnnealingLR, which updates from the previous rate) so that a run resumed with a larger
        # --max-epochs follows the longer schedule instead of staying at the finished schedule's rate of 0.
        scheduler = torch.optim.lr_scheduler.LambdaLR(optimizer, self._cosine)
        return {"optimizer": optimizer, "lr_scheduler": {"scheduler": scheduler, "interval": "epoch"}}

    def _cosine(self, epoch: int) -> float:
        return 0.5 * (1 + math.cos(math.pi * min(epoch, self.hparams.max_epochs) / self.hparams.max_epochs))
