"""Standalone metrics that keep small partial state (a confusion matrix), updated step by step on the device.
scikit-learn is the reference they are tested against (tests/test_metrics.py)."""

from project.metrics.classification import ConfusionMatrix, MeanValue, format_report, per_class_scores, summarize

__all__ = ["ConfusionMatrix", "MeanValue", "format_report", "per_class_scores", "summarize"]
