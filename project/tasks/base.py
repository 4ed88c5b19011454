"""What every task gives the rest of the project (project/tasks/__init__.py says who calls what)."""

from __future__ import annotations

from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch
from torch import nn
from torchmetrics import Metric


@dataclass
class Report:
    """A test set's results as a task presents them: `scores` go to test_metrics.json, the trackers and the summary;
    `details` only to test_metrics.json; `text` to test_report.txt (and the screen while it is short); each figure is
    a function that draws a PNG to the path it is given."""

    scores: dict[str, float]
    details: dict[str, Any] = field(default_factory=dict)
    text: str = ""
    figures: dict[str, Callable[[Path], None]] = field(default_factory=dict)


class Task:
    """A task over `output_names` (one per network output: the classes, or the quantities predicted).

    Subclasses set `metrics` ({name: higher is better}; "loss" is always there and lower is better), and write
    `loss`, `metric`, `scores`, `report`, `serve` and `prediction_columns`/`prediction_rows`.
    """

    metrics: dict[str, bool] = {}

    def __init__(self, output_names: Sequence[str]) -> None:
        self.output_names = [str(name) for name in output_names]

    @classmethod
    def options_of(cls, datamodule: Any) -> dict[str, Any]:
        """What the task needs to know about the data beyond its output names: keyword arguments of its constructor,
        plain values (saved in checkpoints as the Solver's `task_options`)."""
        return {}

    @classmethod
    def higher_is_better(cls, metric: str) -> bool:
        """Whether a larger value of `metric` ("val/acc", "mae", ...) is better: picks checkpoints and sweep trials."""
        return cls.metrics.get(metric.rpartition("/")[2], False)

    @classmethod
    def metric_names(cls) -> list[str]:
        return ["loss", *cls.metrics]

    def check_targets(self, targets: torch.Tensor) -> str | None:
        """What is wrong with a split's targets for this task, as the end of a sentence, or None. In-memory data are
        checked as they are read: a dataset of one's own fails there, in one line, not in the first step's traceback."""
        return None

    def output_layer(self) -> nn.Module:
        """The network's last layer, after the backbone: part of every checkpoint and export."""
        return nn.Identity()

    def loss(self, outputs: torch.Tensor, targets: torch.Tensor) -> torch.Tensor:
        """One loss per sample (N,): their mean is trained on; their exact mean over an epoch is logged."""
        raise NotImplementedError

    def metric(self) -> Metric:
        """A fresh metric state, updated each step with (outputs, targets) and summed over processes."""
        raise NotImplementedError

    def scores(self, state: Any) -> dict[str, float]:
        """{metric name: value} from the computed state, one entry per name in `metrics`."""
        raise NotImplementedError

    def report(self, state: Any) -> Report:
        """The test set's scores; a task with more to say (per class, per output, figures) says it here."""
        scores = self.scores(state)
        return Report(scores, text="\n".join(f"{name:>12} {value:.4f}" for name, value in scores.items()))

    def serve(self) -> nn.Module:
        """What follows the network when it is served (predict, export, MLflow): outputs -> what users read."""
        return nn.Identity()

    def prediction_columns(self) -> list[str]:
        raise NotImplementedError

    def prediction_rows(self, served: torch.Tensor) -> list[list[str]]:
        """One row of strings per sample, matching `prediction_columns`, from the served outputs."""
        raise NotImplementedError
