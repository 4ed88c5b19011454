"""Standalone metrics that keep small partial state (a confusion matrix, sums of errors), updated step by step on the
device and summed over processes. scikit-learn is the reference they are tested against (tests/test_metrics.py)."""

from project.metrics.classification import ConfusionMatrix, format_report, per_class_scores, summarize
from project.metrics.mean import MeanValue
from project.metrics.regression import RegressionErrors

__all__ = ["ConfusionMatrix", "MeanValue", "RegressionErrors", "format_report", "per_class_scores", "summarize"]
