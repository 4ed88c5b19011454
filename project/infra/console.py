"""What the terminal shows during a run: our own lines and a progress bar, not the libraries' advice.

Each filter below names a message that says nothing to a user of this template, with the reason it does not apply.
Lightning's own warnings otherwise stay on: a researcher's change may well deserve one.
"""

from __future__ import annotations

import logging
import warnings
from typing import Any

import lightning.pytorch as pl
from lightning.pytorch.callbacks import TQDMProgressBar

IRRELEVANT_WARNINGS = (
    # Lightning calls a deprecated torch pytree API inside its own code (lightning/pytorch/utilities/_pytree.py).
    r".*isinstance\(treespec, LeafSpec\)` is deprecated.*",
    # Our in-memory loaders need no workers, and image folders get --num-workers (default: this machine's cores).
    r".*does not have many workers which may be a bottleneck.*",
    # A resumed run writes into its own checkpoints/ folder on purpose.
    r".*Checkpoint directory .* exists and is not empty.*",
    # Digits has 12 steps an epoch; the step loss is logged every 10 steps all the same.
    r".*The number of training batches .* is smaller than the logging interval.*",
    # Lightning warns that loading is weights-only when a checkpoint holds only weights and plain values: ours do.
    r".*`weights_only` was not set.*",
)


def quiet() -> None:
    """Silence Lightning's start-up banners (accelerator lines, advertisements) and the warnings listed above."""
    for name in ("lightning.pytorch", "lightning.fabric"):
        logging.getLogger(name).setLevel(logging.WARNING)
    for message in IRRELEVANT_WARNINGS:
        warnings.filterwarnings("ignore", message=message)


class ProgressBar(TQDMProgressBar):
    """Lightning's bar, redrawn every 10 steps (a redraw per step is two terminal writes per step), saying which
    epoch of how many it is, without Lightning's `v_num` (a logger's version, meaningless here)."""

    def __init__(self) -> None:
        super().__init__(refresh_rate=10)

    def on_train_epoch_start(self, trainer: pl.Trainer, *args: Any) -> None:
        super().on_train_epoch_start(trainer, *args)
        self.train_progress_bar.set_description(f"epoch {trainer.current_epoch + 1}/{trainer.max_epochs}")

    def get_metrics(self, trainer: pl.Trainer, pl_module: pl.LightningModule) -> dict[str, Any]:
        metrics = super().get_metrics(trainer, pl_module)
        metrics.pop("v_num", None)
        return metrics
