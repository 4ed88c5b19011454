"""Classification metrics derived from one confusion matrix, accumulated step by step on the device.

The state is a C x C count matrix, never the stored outputs: memory does not grow with the number of
batches, and reduction across DDP processes is one `sum` (torchmetrics does it at `compute()`).
scikit-learn is the reference these are tested against (tests/test_metrics.py).
"""

from __future__ import annotations

import numpy as np
import torch
from torchmetrics import Metric

MAX_COLUMN_NAME = 12  # longer class names head the report's matrix columns by number


class ConfusionMatrix(Metric):
    """Counts of (true class, predicted class) pairs; row = true class, column = predicted class.

    `update` is a fixed-size `scatter_add_`: no `bincount`, no `.item()`, so it never waits for the GPU
    (torchmetrics' MulticlassConfusionMatrix validates its inputs and bincounts: a host sync per call).
    """

    full_state_update = False
    is_differentiable = False
    higher_is_better = None

    def __init__(self, num_classes: int, **kwargs) -> None:
        super().__init__(**kwargs)
        self.num_classes = num_classes
        self.add_state(
            "counts",
            torch.zeros(num_classes * num_classes, dtype=torch.long),
            dist_reduce_fx="sum",
        )

    def update(self, preds: torch.Tensor, target: torch.Tensor) -> None:
        """`preds`: class indices (N,) or scores (N, C); `target`: class indices (N,)."""
        if preds.ndim == target.ndim + 1:
            preds = preds.argmax(dim=1)
        flat_index = target.long() * self.num_classes + preds.long()
        self.counts.scatter_add_(0, flat_index, torch.ones_like(flat_index))

    def compute(self) -> torch.Tensor:
        return self.counts.view(self.num_classes, self.num_classes)


def summarize(confusion: torch.Tensor) -> dict[str, float]:
    """Accuracy and macro precision/recall/F1 over all C classes.

    Matches scikit-learn's `precision_recall_fscore_support(..., labels=range(C), average="macro",
    zero_division=0)`: a class never predicted has precision 0, a class never present has recall 0.
    """
    per_class = per_class_scores(confusion)
    cm = confusion.double()
    total = cm.sum()
    # numpy's mean (pairwise summation), as scikit-learn averages: equal to the last bit.
    return {
        "acc": float(cm.trace() / total) if total > 0 else 0.0,
        **{name: float(np.mean(per_class[name].numpy())) for name in ("precision", "recall", "f1")},
    }


def per_class_scores(confusion: torch.Tensor) -> dict[str, torch.Tensor]:
    """Precision, recall, F1 and support of each class (float64, on the CPU)."""
    cm = confusion.detach().cpu().double()
    true_pos = cm.diagonal()
    predicted = cm.sum(dim=0)
    support = cm.sum(dim=1)
    precision = _safe_divide(true_pos, predicted)
    recall = _safe_divide(true_pos, support)
    # scikit-learn >= 1.3 computes F1 from counts, which differs from 2PR/(P+R) in the last bit.
    f1 = _safe_divide(2 * true_pos, predicted + support)
    return {"precision": precision, "recall": recall, "f1": f1, "support": support}


def _safe_divide(num: torch.Tensor, den: torch.Tensor) -> torch.Tensor:
    return torch.where(den > 0, num / den.clamp(min=1), torch.zeros_like(num))


def format_report(confusion: torch.Tensor, class_names: list[str]) -> str:
    """A readable confusion matrix and a per-class report, as plain text. Long class names head the matrix's columns
    by number (one 120-character name made every cell that wide: a 460 kB report for 36 images)."""
    cm = confusion.detach().cpu().long()
    scores = per_class_scores(cm)
    names = [str(n) for n in class_names]
    columns = names if max(map(len, names)) <= MAX_COLUMN_NAME else [str(i) for i in range(len(names))]
    rows = names if columns is names else [f"{i} {name}" for i, name in enumerate(names)]
    width = max(len("macro avg"), *(len(n) for n in rows))
    cell = max(*(len(n) for n in columns), len(str(int(cm.max()))))  # narrow cells: 10 digits fit 80 columns
    lines = ["Confusion matrix (rows: true class, columns: predicted class)"]
    lines.append(" " * width + " " + " ".join(n.rjust(cell) for n in columns))
    for name, row in zip(rows, cm.tolist(), strict=True):
        lines.append(name.rjust(width) + " " + " ".join(str(v).rjust(cell) for v in row))
    lines.append("")
    lines.append("class".rjust(width) + "  precision     recall         f1    support")
    for i, name in enumerate(names):
        lines.append(
            f"{name.rjust(width)} {scores['precision'][i]:10.4f} {scores['recall'][i]:10.4f} "
            f"{scores['f1'][i]:10.4f} {int(scores['support'][i]):10d}"
        )
    summary = summarize(cm)
    lines.append("")
    lines.append(
        f"{'macro avg'.rjust(width)} {summary['precision']:10.4f} {summary['recall']:10.4f} "
        f"{summary['f1']:10.4f} {int(cm.sum()):10d}"
    )
    lines.append(f"{'accuracy'.rjust(width)} {summary['acc']:10.4f}")
    absent = [name for name, support in zip(names, scores["support"].tolist(), strict=True) if support == 0]
    if absent:  # scikit-learn's default macro average leaves them out: say why ours is lower
        shown = ", ".join(absent[:5]) + (f" and {len(absent) - 5} more" if len(absent) > 5 else "")
        lines.append(f"\nNo test samples of {shown}: the macro averages count each as 0 (scikit-learn's with "
                     "labels=range(C), zero_division=0)")  # fmt: skip
    return "\n".join(lines)
