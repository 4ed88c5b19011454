"""Reusable metrics that keep small partial state (a confusion matrix) instead of every output."""

from project.metrics.classification import (
    ConfusionMatrix,
    MeanValue,
    format_report,
    per_class_scores,
    summarize,
)

__all__ = [
    "ConfusionMatrix",
    "MeanValue",
    "format_report",
    "per_class_scores",
    "summarize",
]
