"""Regression errors accumulated step by step: sums of errors and of targets, per output, never the stored outputs.

Reduction across DDP processes is one `sum` per state (torchmetrics does it at `compute()`); float64 sums keep the
scores equal to scikit-learn's `mean_absolute_error`, `root_mean_squared_error` and `r2_score` on the same
predictions (tests/test_metrics.py).
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any

import torch
from torchmetrics import Metric


class RegressionErrors(Metric):
    full_state_update = False
    is_differentiable = False
    higher_is_better = None  # a state of several scores: the task says which way each is better

    def __init__(self, num_outputs: int, shift: Sequence[float] = (), **kwargs: Any) -> None:
        super().__init__(**kwargs)
        # Targets are summed less `shift` (about their mean): R² from sums of y and y² would lose the digits of targets
        # whose mean is large beside their spread (timestamps, 1e8 ± 10: 0.7375 where scikit-learn says 0.7386).
        self.register_buffer("shift", torch.tensor(list(shift) or [0.0] * num_outputs, dtype=torch.float64), False)
        for name in ("abs_error", "squared_error", "target", "squared_target"):
            self.add_state(name, torch.zeros(num_outputs, dtype=torch.float64), dist_reduce_fx="sum")
        self.add_state("count", torch.zeros((), dtype=torch.long), dist_reduce_fx="sum")

    def update(self, preds: torch.Tensor, target: torch.Tensor) -> None:
        preds = preds.detach().double().reshape(len(preds), -1)
        target = target.detach().double().reshape_as(preds)
        error = preds - target
        self.abs_error += error.abs().sum(dim=0)
        self.squared_error += (error * error).sum(dim=0)
        target = target - self.shift
        self.target += target.sum(dim=0)
        self.squared_target += (target * target).sum(dim=0)
        self.count += len(preds)

    def compute(self) -> dict[str, torch.Tensor]:
        n = self.count.clamp(min=1).double()
        total = self.squared_target - self.target * self.target / n  # sum of (y - mean y)^2
        # scikit-learn's r2_score for a constant target: 1 if predicted exactly, else 0 (never -inf or NaN).
        exact = torch.where(self.squared_error == 0, 1.0, 0.0).double()
        r2 = torch.where(total > 0, 1 - self.squared_error / total.clamp(min=1e-300), exact)
        return {"mae": self.abs_error / n, "rmse": (self.squared_error / n).sqrt(), "r2": r2, "count": self.count}
