"""How well `--dataset diabetes` trains: test R², MAE and RMSE over several seeds (each seed is its own 80/10/10
split), against scikit-learn's LinearRegression and RidgeCV fitted on the same training rows of the same splits.

    python benchmarks/diabetes.py                                  # the defaults, seeds 0-4
    python benchmarks/diabetes.py --seeds 10 -- --batch-size 32 --max-epochs 100 --hidden-dim 8

Every run is a real `project.run` run (in this process, `--logger none`, under a temporary --exp-dir).
"""

import argparse
import contextlib
import io
import json
import statistics
import sys
import tempfile
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))  # run from anywhere

import numpy as np  # noqa: E402
from sklearn.datasets import load_diabetes  # noqa: E402
from sklearn.linear_model import LinearRegression, RidgeCV  # noqa: E402
from sklearn.metrics import mean_absolute_error, r2_score, root_mean_squared_error  # noqa: E402

from project import run  # noqa: E402
from project.data import stratified_split  # noqa: E402


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--seeds", type=int, default=5, help="seeds 0..N-1")
    args, run_options = parser.parse_known_args()
    run_options = [option for option in run_options if option != "--"]
    features, target = load_diabetes(return_X_y=True)
    rows: dict[str, list[dict[str, float]]] = {"template": [], "LinearRegression": [], "RidgeCV": []}
    for seed in range(args.seeds):
        with tempfile.TemporaryDirectory() as exp_dir, contextlib.redirect_stdout(io.StringIO()):
            argv = ["--dataset", "diabetes", "--logger", "none", "--seed", str(seed), "--exp-dir", exp_dir]
            assert run.main([*argv, *run_options]) == 0
            (record,) = Path(exp_dir).glob("*/*/test_metrics.json")
            rows["template"].append(json.loads(record.read_text()))
        # The template's split, as data.Diabetes makes it (float32 targets, as there).
        train, held_out = stratified_split(target.astype(np.float32), 0.2, seed)
        _, test = stratified_split(target[held_out].astype(np.float32), 0.5, seed)
        test = held_out[test]
        for name, model in (("LinearRegression", LinearRegression()), ("RidgeCV", RidgeCV())):
            predicted = model.fit(features[train], target[train]).predict(features[test])
            rows[name].append({"r2": r2_score(target[test], predicted),
                               "mae": mean_absolute_error(target[test], predicted),
                               "rmse": root_mean_squared_error(target[test], predicted)})  # fmt: skip
    options = " ".join(run_options) or "(defaults)"
    print(f"diabetes, {args.seeds} splits (seeds 0-{args.seeds - 1}), template options: {options}")
    print(f"{'model':<18} {'test R² mean ± std':>20} {'MAE':>8} {'RMSE':>8}   R² per seed")
    for name, results in rows.items():
        r2 = [r["r2"] for r in results]
        mae, rmse = (statistics.mean(r[key] for r in results) for key in ("mae", "rmse"))
        spread = f"{statistics.mean(r2):.3f} ± {statistics.stdev(r2):.3f}" if len(r2) > 1 else f"{r2[0]:.3f}"
        print(f"{name:<18} {spread:>20} {mae:8.2f} {rmse:8.2f}   {' '.join(f'{v:.3f}' for v in r2)}")


if __name__ == "__main__":
    main()
