"""The exact mean of per-sample values (a loss), over batches of any size and over processes."""

from __future__ import annotations

from typing import Any

import torch
from torchmetrics import Metric


class MeanValue(Metric):
    """Exact mean of per-sample values (a loss) over batches of any size and over processes: a float64 sum and a count.

    Not torchmetrics' MeanMetric: with nan_strategy="disable" (its NaN check is a host sync per update) it drops the
    weights (Lightning-AI/torchmetrics#3434), and a device move resets its dtype to float32, so it sums in float32
    and two processes no longer give one process's loss to the last bit (tests/test_ddp.py).
    """

    full_state_update = False

    def __init__(self, **kwargs: Any) -> None:
        super().__init__(**kwargs)
        self.add_state("total", torch.zeros((), dtype=torch.float64), dist_reduce_fx="sum")
        self.add_state("count", torch.zeros((), dtype=torch.long), dist_reduce_fx="sum")

    def update(self, values: torch.Tensor) -> None:
        self.total += values.detach().double().sum()
        self.count += values.numel()

    def compute(self) -> torch.Tensor:
        return self.total / self.count.clamp(min=1)
