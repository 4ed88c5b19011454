"""Regression: one output per quantity predicted, in the quantity's own units; squared error, MAE, RMSE and R²."""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any

import torch
from torch import nn

from project.metrics import RegressionErrors
from project.tasks.base import Report, Task


class Rescale(nn.Module):
    """outputs * std + mean: the backbone predicts standardised values, the network answers in the targets' units
    (so a checkpoint, an export and the MLflow model all give values a user can read)."""

    def __init__(self, mean: Sequence[float], std: Sequence[float]) -> None:
        super().__init__()
        self.register_buffer("mean", torch.tensor(mean, dtype=torch.float32))
        self.register_buffer("std", torch.tensor(std, dtype=torch.float32))

    def forward(self, outputs: torch.Tensor) -> torch.Tensor:
        return outputs * self.std + self.mean


class Regression(Task):
    metrics = {"mae": False, "rmse": False, "r2": True}  # averaged over the outputs, as scikit-learn does

    def __init__(
        self, output_names: Sequence[str], target_mean: Sequence[float] = (), target_std: Sequence[float] = ()
    ):
        super().__init__(output_names)
        n = len(self.output_names)
        self.target_mean, self.target_std = list(target_mean) or [0.0] * n, list(target_std) or [1.0] * n
        if len(self.target_mean) != n or len(self.target_std) != n:  # one value would be broadcast to every output
            raise ValueError(f"target_mean and target_std hold {len(self.target_mean)} and {len(self.target_std)} "
                             f"values for {n} output_names: one per output")  # fmt: skip

    @classmethod
    def options_of(cls, datamodule: Any) -> dict[str, Any]:
        # A dataset without them trains on targets as they are (standardised ones train better: see Diabetes).
        return {key: list(getattr(datamodule, key, ())) for key in ("target_mean", "target_std")}

    def check_targets(self, targets: torch.Tensor) -> str | None:
        n = len(self.output_names)
        if tuple(targets.shape[1:]) not in ({(n,), ()} if n == 1 else {(n,)}):
            return f"are {tuple(targets.shape[1:])} per sample: one value for each of its {n} output_names"
        return None

    def output_layer(self) -> nn.Module:
        return Rescale(self.target_mean, self.target_std)

    def loss(self, outputs: torch.Tensor, targets: torch.Tensor) -> torch.Tensor:
        # In standardised units, so the loss (and its curve) reads the same whatever the targets' scale.
        scale = outputs.new_tensor(self.target_std)
        return (((outputs - targets.view_as(outputs)) / scale) ** 2).mean(dim=1)

    def metric(self) -> RegressionErrors:
        return RegressionErrors(len(self.output_names), shift=self.target_mean)

    def scores(self, state: dict[str, torch.Tensor]) -> dict[str, float]:
        return {name: float(state[name].mean()) for name in self.metrics}

    def report(self, state: dict[str, torch.Tensor]) -> Report:
        scores = self.scores(state)
        per_output = {name: {key: float(state[key].reshape(-1)[i]) for key in self.metrics} for i, name in
                      enumerate(self.output_names)}  # fmt: skip
        width = max(len("mean"), *(len(name) for name in self.output_names))
        lines = [f"{'output'.rjust(width)} {'MAE':>12} {'RMSE':>12} {'R2':>8}"]
        rows = [*per_output.items(), ("mean", scores)] if len(per_output) > 1 else list(per_output.items())
        for name, s in rows:
            lines.append(f"{name.rjust(width)} {s['mae']:12.4f} {s['rmse']:12.4f} {s['r2']:8.4f}")
        lines.append(f"{'samples'.rjust(width)} {int(state['count']):12d}")
        return Report(scores, {"per_output": per_output}, "\n".join(lines))

    def prediction_columns(self) -> list[str]:
        return list(self.output_names)

    def prediction_rows(self, values: torch.Tensor) -> list[list[str]]:
        return [[f"{v:.6g}" for v in row] for row in values.reshape(len(values), -1).tolist()]
