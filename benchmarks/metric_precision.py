"""Why the regression errors are ours (README, Reasoning): torchmetrics' R2Score and MeanAbsoluteError against
project.metrics.RegressionErrors, each against scikit-learn, on 6,377 float32 diabetes-like values fed in 200 uneven
batches (three draws).

    python benchmarks/metric_precision.py
"""

from __future__ import annotations

import sys
from pathlib import Path

import numpy as np
import torch
import torchmetrics
from sklearn.metrics import mean_absolute_error, r2_score

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))  # the project package, from anywhere
from project.metrics.regression import RegressionErrors  # noqa: E402

VALUES, BATCHES = 6377, 200

for seed in range(3):
    rng = np.random.default_rng(seed)
    target = rng.normal(152.0, 77.0, VALUES).astype(np.float32)  # the diabetes targets' mean and spread
    pred = (target + rng.normal(0.0, 55.0, VALUES)).astype(np.float32)
    cuts = np.sort(rng.choice(np.arange(1, VALUES), BATCHES - 1, replace=False))
    r2, mae, ours = torchmetrics.R2Score(), torchmetrics.MeanAbsoluteError(), RegressionErrors(1)
    for p, t in zip(np.split(pred, cuts), np.split(target, cuts), strict=True):
        for metric in (r2, mae, ours):
            metric.update(torch.from_numpy(p), torch.from_numpy(t))
    exact = target.astype(np.float64), pred.astype(np.float64)  # scikit-learn sums float32 inputs in float32
    ref_r2, ref_mae = r2_score(*exact), mean_absolute_error(*exact)
    scores = ours.compute()
    print(f"draw {seed}: torchmetrics R2 {abs(float(r2.compute()) - ref_r2):.1e} off, MAE "
          f"{abs(float(mae.compute()) - ref_mae):.1e} off; ours R2 {abs(float(scores['r2']) - ref_r2):.1e}, MAE "
          f"{abs(float(scores['mae']) - ref_mae):.1e}")  # fmt: skip
