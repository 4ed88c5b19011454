"""Single-label classification: one logit per class, cross-entropy, and scores from one confusion matrix."""

from __future__ import annotations

import warnings
from pathlib import Path
from typing import Any

import torch
import torch.nn.functional as F
from torch import nn

from project.metrics import ConfusionMatrix, format_report, per_class_scores, summarize
from project.tasks.base import Report, Task

# Beyond this many classes the numbers in the matrix's cells are unreadable: the colours alone tell the story.
MAX_ANNOTATED_CLASSES = 30


class Classification(Task):
    metrics = {"acc": True, "precision": True, "recall": True, "f1": True}  # macro averages over the classes

    def check_targets(self, targets: torch.Tensor) -> str | None:
        if targets.dim() != 1 or targets.dtype.is_floating_point or targets.dtype == torch.bool:
            return (f"are {targets.dtype} of shape {tuple(targets.shape)}: classification takes one integer class per "
                    'sample (a dataset of values says task = "regression")')  # fmt: skip
        low, high = (int(targets.min()), int(targets.max())) if len(targets) else (0, 0)
        last = len(self.output_names) - 1
        return (
            f"run from {low} to {high}, but its output_names are the classes 0 to {last}"
            if low < 0 or high > last
            else None
        )

    def loss(self, outputs: torch.Tensor, targets: torch.Tensor) -> torch.Tensor:
        return F.cross_entropy(outputs, targets, reduction="none")

    def metric(self) -> ConfusionMatrix:
        return ConfusionMatrix(len(self.output_names))

    def scores(self, confusion: torch.Tensor) -> dict[str, float]:
        return summarize(confusion)

    def report(self, confusion: torch.Tensor) -> Report:
        confusion = confusion.cpu()
        per_class = per_class_scores(confusion)
        details = {
            "per_class": {name: {key: float(per_class[key][i]) for key in ("precision", "recall", "f1")}
                          | {"support": int(per_class["support"][i])} for i, name in enumerate(self.output_names)},
            "confusion_matrix": confusion.tolist(),  # rows: true class, columns: predicted class
        }  # fmt: skip
        figures = {"confusion_matrix.png": lambda path: self.draw_confusion(confusion.numpy(), path)}
        return Report(summarize(confusion), details, format_report(confusion, self.output_names), figures)

    def draw_confusion(self, confusion: Any, out: Path) -> None:
        """The test confusion matrix (rows: true class, columns: predicted), labelled with class names."""
        from matplotlib.figure import Figure
        from sklearn.metrics import ConfusionMatrixDisplay

        n = len(self.output_names)
        size = min(3 + 0.45 * n, 30)
        figure = Figure(figsize=(size, size), layout="constrained")
        ax = figure.subplots()
        longest = max((len(name) for name in self.output_names), default=1)
        labels = [name.replace("$", r"\$") for name in self.output_names]  # text between two $ is maths to matplotlib
        ConfusionMatrixDisplay(confusion_matrix=confusion, display_labels=labels).plot(
            ax=ax, cmap="Blues", colorbar=False, include_values=n <= MAX_ANNOTATED_CLASSES,
            xticks_rotation="vertical" if longest > 3 else "horizontal",
        )  # fmt: skip
        ax.set_title("Test set")
        with warnings.catch_warnings():  # a character the font lacks (an emoji in a class name) is drawn as a box
            warnings.filterwarnings("ignore", message="Glyph .* missing from font")
            figure.savefig(out, dpi=100, format="png")

    def serve(self) -> nn.Module:
        return nn.Softmax(dim=1)  # logits -> each class's probability

    def prediction_columns(self) -> list[str]:
        return ["predicted", *(f"prob_{name}" for name in self.output_names)]

    def prediction_rows(self, probabilities: torch.Tensor) -> list[list[str]]:
        rows = probabilities.tolist()
        return [[self.output_names[row.index(max(row))], *(f"{p:.6f}" for p in row)] for row in rows]
