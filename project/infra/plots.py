"""The run's pictures: learning curves from metrics.csv, and the test set's confusion matrix.

Drawn on plain matplotlib Figures (no pyplot state, no display needed); scikit-learn draws the matrix. Both write
PNG to the path they are given, whatever its name says (records.write_file passes a temporary name).
"""

from __future__ import annotations

import csv
from pathlib import Path
from typing import Any

# Beyond this many classes the numbers in the cells are unreadable: the colours alone tell the story.
MAX_ANNOTATED_CLASSES = 30


def epoch_curves(metrics_csv: Path) -> dict[str, dict[int, float]]:
    """{"train/loss": {epoch: value}, "lr": {...}, ...} from metrics.csv; for an epoch logged twice (a resumed run that
    repeated it), the later value wins."""
    curves: dict[str, dict[int, float]] = {}
    rate = None  # Lightning's LearningRateMonitor logs the rate at each epoch's start, without the epoch
    with open(metrics_csv, newline="") as file:
        for row in csv.DictReader(file):
            rate = float(row["lr"]) if row.get("lr") else rate
            if not row.get("epoch"):
                continue
            epoch = int(float(row["epoch"]))
            for name in ("train/loss", "val/loss", "train/acc", "val/acc"):
                if row.get(name):
                    curves.setdefault(name, {})[epoch] = float(row[name])
            if rate is not None:
                curves.setdefault("lr", {})[epoch], rate = rate, None
    return curves


def save_curves(metrics_csv: Path, out: Path, best_epoch: int | None = None, monitor: str = "val/loss") -> None:
    """Loss (log scale: late epochs stay visible), accuracy and learning rate against epoch, train and val, with the
    epoch of the tested checkpoint marked. Nothing is drawn when there is nothing to draw."""
    curves = epoch_curves(metrics_csv) if metrics_csv.is_file() else {}
    if not any(name in curves for name in ("train/loss", "val/loss")):
        return
    from matplotlib.figure import Figure
    from matplotlib.ticker import MaxNLocator

    figure = Figure(figsize=(14, 4), layout="constrained")
    panels = [("loss", "cross-entropy loss (log scale)"), ("acc", "accuracy"), ("lr", "learning rate")]
    for ax, (name, label) in zip(figure.subplots(1, 3), panels, strict=True):
        for series, style in ((f"train/{name}", "o-"), (f"val/{name}", "s--")) if name != "lr" else (("lr", "o-"),):
            points = sorted(curves.get(series, {}).items())
            if points:
                ax.plot([e for e, _ in points], [v for _, v in points], style, markersize=3, label=series)
        if name == "loss" and all(v > 0 for key in ("train/loss", "val/loss") for v in curves.get(key, {}).values()):
            ax.set_yscale("log")
        if best_epoch is not None:
            ax.axvline(best_epoch, color="grey", linestyle=":", label=f"best by {monitor}: epoch {best_epoch}")
        ax.set_xlabel("epoch")
        ax.xaxis.set_major_locator(MaxNLocator(integer=True))
        ax.set_ylabel(label)
        ax.grid(alpha=0.3)
        ax.legend(fontsize="small")
    figure.savefig(out, dpi=100, format="png")


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
    figure.savefig(out, dpi=100, format="png")
