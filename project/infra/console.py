"""What the terminal shows during a run: our own lines and a progress bar, not the libraries' advice. Lightning's
other warnings stay on: a researcher's change may well deserve one."""

from __future__ import annotations

import logging
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
)


def quiet() -> None:
    """Silence Lightning's start-up banners (accelerator lines, advertisements) and the warnings above."""
    for name in ("lightning.pytorch", "lightning.fabric"):
        logging.getLogger(name).setLevel(logging.WARNING)
    for message in IRRELEVANT_WARNINGS:
        warnings.filterwarnings("ignore", message=message)


class ProgressBar(TQDMProgressBar):
    """Lightning's bar, redrawn every 10 steps (each redraw is two terminal writes), naming the epoch out of how many,
    without Lightning's `v_num` (a logger's version, meaningless here)."""

    def __init__(self) -> None:
        super().__init__(refresh_rate=10)

    def on_train_epoch_start(self, trainer: pl.Trainer, *args: Any) -> None:
        super().on_train_epoch_start(trainer, *args)
        self.train_progress_bar.set_description(f"epoch {trainer.current_epoch + 1}/{trainer.max_epochs}")

    def get_metrics(self, trainer: pl.Trainer, pl_module: pl.LightningModule) -> dict[str, Any]:
        return {k: v for k, v in super().get_metrics(trainer, pl_module).items() if k != "v_num"}
