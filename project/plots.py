"""The run's pictures: learning curves from metrics.csv, and the test set's confusion matrix.

Drawn on plain matplotlib Figures (no pyplot state, no display needed); scikit-learn draws the matrix.
"""

from __future__ import annotations

import csv
from pathlib import Path
from typing import Any

# Beyond this many classes the numbers in the cells are unreadable: the colours alone tell the story.
MAX_ANNOTATED_CLASSES = 30


def epoch_curves(metrics_csv: Path) -> dict[str, dict[int, float]]:
    """{"train/loss": {epoch: value}, ...} from Lightning's metrics.csv; for an epoch logged twice (a
    resumed run that repeated it), the later value wins."""
    curves: dict[str, dict[int, float]] = {}
    with open(metrics_csv, newline="") as file:
        for row in csv.DictReader(file):
            if not row.get("epoch"):
                continue
            epoch = int(float(row["epoch"]))
            for split in ("train", "val"):
                for name in ("loss", "acc"):
                    value = row.get(f"{split}/{name}")
                    if value:
                        curves.setdefault(f"{split}/{name}", {})[epoch] = float(value)
    return curves


def save_curves(metrics_csv: Path, out: Path) -> bool:
    """Loss and accuracy against epoch for train and val; False when there is nothing to draw."""
    if not metrics_csv.is_file():
        return False
    curves = epoch_curves(metrics_csv)
    if not curves:
        return False
    from matplotlib.figure import Figure
    from matplotlib.ticker import MaxNLocator

    figure = Figure(figsize=(10, 4), layout="constrained")
    axes = figure.subplots(1, 2)
    for ax, name, label in ((axes[0], "loss", "cross-entropy loss"), (axes[1], "acc", "accuracy")):
        for split, style in (("train", "o-"), ("val", "s--")):
            points = sorted(curves.get(f"{split}/{name}", {}).items())
            if points:
                ax.plot([e for e, _ in points], [v for _, v in points], style, label=split)
        ax.set_xlabel("epoch")
        ax.xaxis.set_major_locator(MaxNLocator(integer=True))
        ax.set_ylabel(label)
        ax.grid(alpha=0.3)
        ax.legend()
    figure.savefig(out, dpi=100)
    return True


def save_confusion_matrix(confusion: Any, class_names: list[str], out: Path) -> None:
    """The test confusion matrix (rows: true class, columns: predicted), labelled with class names."""
    from matplotlib.figure import Figure
    from sklearn.metrics import ConfusionMatrixDisplay

    n = len(class_names)
    size = min(3 + 0.45 * n, 30)
    figure = Figure(figsize=(size, size), layout="constrained")
    ax = figure.subplots()
    longest = max((len(str(c)) for c in class_names), default=1)
    ConfusionMatrixDisplay(confusion_matrix=confusion, display_labels=[str(c) for c in class_names]).plot(
        ax=ax,
        cmap="Blues",
        colorbar=False,
        include_values=n <= MAX_ANNOTATED_CLASSES,
        xticks_rotation="vertical" if longest > 3 else "horizontal",
    )
    ax.set_title("Test set")
    figure.savefig(out, dpi=100)
