"""What the terminal shows during a run: our own lines and a progress bar, not the libraries' advice. Lightning's
other warnings stay on: a researcher's change may well deserve one."""

from __future__ import annotations

import logging
import time
import warnings
from typing import Any

import lightning.pytorch as pl
from lightning.pytorch.callbacks import TQDMProgressBar

IRRELEVANT_WARNINGS = (  # each says nothing to a user of this template, for the reason beside it
    r".*isinstance\(treespec, LeafSpec\)` is deprecated.*",  # inside Lightning's own code (utilities/_pytree.py)
    r".*does not have many workers which may be a bottleneck.*",  # ours need none; image folders get --num-workers
    r".*Checkpoint directory .* exists and is not empty.*",  # a resumed run writes into its own checkpoints/
    r".*The number of training batches .* is smaller than the logging interval.*",  # digits: 12 steps an epoch
    r".*`weights_only` was not set.*",  # our checkpoints hold only tensors and plain values
    # A checkpoint resumed outside its run starts a new run (a moved run's are followed: records.follow_moved_run)
    r".*The dirpath has changed from.*",
)


def quiet() -> None:
    """Silence Lightning's start-up banners (accelerator lines, advertisements) and the warnings above."""
    for name in ("lightning.pytorch", "lightning.fabric"):
        logging.getLogger(name).setLevel(logging.WARNING)
    for message in IRRELEVANT_WARNINGS:
        warnings.filterwarnings("ignore", message=message)


class ProgressBar(TQDMProgressBar):
    """Lightning's bar, naming the epoch out of how many, without Lightning's `v_num` (a logger's version, meaningless
    here), and redrawn by time, not by step: a redraw (two terminal writes, ~40 us) every few steps is a fast GPU step's
    whole time, and a log file gets a line per redraw."""

    REDRAW_SECONDS = 0.25

    def __init__(self) -> None:
        super().__init__(refresh_rate=1)  # every batch that `due` lets through is drawn
        self.next_draw = 0.0

    def due(self, batch_idx: int, bar: Any) -> bool:
        now = time.monotonic()
        if now < self.next_draw and batch_idx + 1 != bar.total:  # a split's last batch is always drawn
            return False
        self.next_draw = now + self.REDRAW_SECONDS
        return True

    def on_train_batch_end(self, trainer: pl.Trainer, pl_module: pl.LightningModule, outputs: Any, batch: Any,
                           batch_idx: int) -> None:  # fmt: skip
        if self.due(batch_idx, self.train_progress_bar):
            super().on_train_batch_end(trainer, pl_module, outputs, batch, batch_idx)

    def on_validation_batch_end(self, trainer: pl.Trainer, pl_module: pl.LightningModule, outputs: Any, batch: Any,
                                batch_idx: int, dataloader_idx: int = 0) -> None:  # fmt: skip
        if self.due(batch_idx, self.val_progress_bar):
            super().on_validation_batch_end(trainer, pl_module, outputs, batch, batch_idx, dataloader_idx)

    def on_train_epoch_start(self, trainer: pl.Trainer, *args: Any) -> None:
        super().on_train_epoch_start(trainer, *args)
        self.train_progress_bar.set_description(f"epoch {trainer.current_epoch + 1}/{trainer.max_epochs}")

    def get_metrics(self, trainer: pl.Trainer, pl_module: pl.LightningModule) -> dict[str, Any]:
        return {k: v for k, v in super().get_metrics(trainer, pl_module).items() if k != "v_num"}
