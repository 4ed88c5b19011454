"""The run's learning curves from metrics.csv (a task's own figures are the task's: project/tasks/).

Drawn on plain matplotlib Figures (no pyplot state, no display needed), as PNG to the path given, whatever its name
says (files.write_file passes a temporary name).
"""

from __future__ import annotations

import csv
from pathlib import Path


def epoch_curves(metrics_csv: Path, names: tuple[str, ...]) -> dict[str, dict[int, float]]:
    """{"train/loss": {epoch: value}, "lr": {...}, ...} for `names` from metrics.csv; for an epoch logged twice (a
    resumed run that repeated it), the later value wins."""
    curves: dict[str, dict[int, float]] = {}
    rate = None  # Lightning's LearningRateMonitor logs the rate at each epoch's start, without the epoch
    with open(metrics_csv, newline="") as file:
        for row in csv.DictReader(file):
            rate = float(row["lr"]) if row.get("lr") else rate
            if not row.get("epoch"):
                continue
            epoch = int(float(row["epoch"]))
            for name in names:
                if row.get(name):
                    curves.setdefault(name, {})[epoch] = float(row[name])
            if rate is not None:
                curves.setdefault("lr", {})[epoch], rate = rate, None
    return curves


def save_curves(
    metrics_csv: Path, out: Path, metric: str, best_epoch: int | None = None, monitor: str = "val/loss"
) -> None:
    """Loss (log scale: late epochs stay visible), `metric` and learning rate against epoch, train and val, with the
    epoch of the tested checkpoint marked. Nothing is drawn when there is nothing to draw."""
    names = tuple(f"{split}/{name}" for name in ("loss", metric) for split in ("train", "val"))
    curves = epoch_curves(metrics_csv, names) if metrics_csv.is_file() else {}
    if not any(name in curves for name in ("train/loss", "val/loss")):
        return
    from matplotlib.figure import Figure
    from matplotlib.ticker import MaxNLocator

    figure = Figure(figsize=(14, 4), layout="constrained")
    panels = [("loss", "loss (log scale)"), (metric, metric), ("lr", "learning rate")]
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
