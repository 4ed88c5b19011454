"""The second shipped task keeps the task seam honest: regression on scikit-learn's diabetes data, through the same
command line, records, predict and export as the default classification, with scores equal to scikit-learn's."""

from __future__ import annotations

import csv
import json
from pathlib import Path

import numpy as np
import pytest
import torch
from conftest import only_run_dir

from project import export, predict, run
from project.data import Diabetes
from project.infra.checkpoints import read_model
from project.tasks import Classification, Regression

DIABETES = ["--dataset", "diabetes", "--logger", "csv", "--max-epochs", "8", "--batch-size", "32"]


def test_each_task_says_which_way_its_metrics_are_better():
    assert not Regression.higher_is_better("val/mae") and not Regression.higher_is_better("val/rmse")
    assert Regression.higher_is_better("val/r2") and Classification.higher_is_better("train/f1")
    assert not Classification.higher_is_better("val/loss") and not Regression.higher_is_better("val/loss")


def test_diabetes_is_split_and_standardised_from_its_training_split():
    data = Diabetes(seed=0)
    data.setup("fit")
    assert data.split_sizes == {"train": 353, "val": 44, "test": 45}
    inputs, targets = data.splits["train"]
    assert data.input_shape == (10,) and inputs.dtype == torch.float32 and targets.dtype == torch.float32
    assert data.target_mean == pytest.approx([float(targets.mean())], rel=1e-5)
    np.testing.assert_allclose(data.mean, inputs.mean(0).numpy(), atol=1e-6)  # features kept, not cast to integers
    assert inputs.abs().max() < 1 and inputs.std() > 0.01


@pytest.fixture(scope="module")
def diabetes_run(tmp_path_factory: pytest.TempPathFactory) -> Path:
    exp_dir = tmp_path_factory.mktemp("experiments")
    assert run.main([*DIABETES, "--monitor", "val/mae", "--exp-dir", str(exp_dir)]) == 0
    return only_run_dir(exp_dir)


def test_scores_equal_scikit_learns_on_the_same_predictions(diabetes_run: Path):
    from sklearn.metrics import mean_absolute_error, r2_score, root_mean_squared_error

    recorded = json.loads((diabetes_run / "test_metrics.json").read_text())
    network, spec = read_model(Path(recorded["checkpoint"]))
    data = Diabetes(seed=0)
    data.setup("test")
    inputs, targets = data.splits["test"]
    with torch.inference_mode():
        predicted = network(inputs).numpy().ravel()
    assert spec["task"] == "regression" and spec["output_names"] == ["progression"]
    assert recorded["mae"] == pytest.approx(mean_absolute_error(targets, predicted), rel=1e-5)
    assert recorded["rmse"] == pytest.approx(root_mean_squared_error(targets, predicted), rel=1e-5)
    assert recorded["r2"] == pytest.approx(r2_score(targets, predicted), rel=1e-5, abs=1e-6)
    assert 0 < recorded["r2"] < 1 and 20 < recorded["mae"] < 80  # in the target's own units (25-346)
    assert "confusion_matrix" not in recorded and not (diabetes_run / "confusion_matrix.png").exists()
    assert "progression" in (diabetes_run / "test_report.txt").read_text()


def test_monitor_val_mae_keeps_the_epoch_with_the_lowest(diabetes_run: Path):
    with open(diabetes_run / "metrics.csv", newline="") as file:
        val_mae = {int(float(row["epoch"])): float(row["val/mae"]) for row in csv.DictReader(file) if row["val/mae"]}
    (best,) = (diabetes_run / "checkpoints").glob("best-*.ckpt")
    assert best.name == f"best-epoch{min(val_mae, key=val_mae.get):03d}.ckpt"
    assert len(val_mae) == 8 and len(set(val_mae.values())) > 1


@pytest.mark.parametrize("form", ["checkpoint", "onnx", "torchscript"])
def test_predict_writes_the_predicted_value_of_each_row(diabetes_run: Path, tmp_path: Path, form: str):
    checkpoint = next((diabetes_run / "checkpoints").glob("best-*.ckpt"))
    network, _ = read_model(checkpoint)
    rows = np.random.default_rng(0).normal(0, 0.05, size=(7, 10)).astype(np.float32)
    np.save(tmp_path / "rows.npy", rows)
    model = checkpoint
    if form != "checkpoint":
        model = tmp_path / f"model.{form}"
        assert export.main(["--checkpoint", str(checkpoint), "--format", form, "--output", str(model)]) == 0
    output = tmp_path / "predictions.csv"
    assert predict.main(["--checkpoint", str(model), str(tmp_path / "rows.npy"), "--output", str(output)]) == 0
    with open(output, newline="") as file:
        reader = csv.DictReader(file)
        assert reader.fieldnames == ["input", "progression"]
        values = [float(row["progression"]) for row in reader]
    with torch.inference_mode():
        expected = network(torch.from_numpy(rows)).numpy().ravel()
    np.testing.assert_allclose(values, expected, rtol=1e-4)
    assert len(set(values)) == 7  # values, not one softmax over a single output


def test_predict_refuses_inputs_of_the_wrong_width(diabetes_run: Path, tmp_path: Path, capsys):
    checkpoint = next((diabetes_run / "checkpoints").glob("best-*.ckpt"))
    np.save(tmp_path / "wide.npy", np.zeros((3, 11), dtype=np.float32))
    assert predict.main(["--checkpoint", str(checkpoint), str(tmp_path / "wide.npy"), "--output", "-"]) == 2
    assert "shape (3, 11), but the model takes (N, 10)" in capsys.readouterr().err


@pytest.mark.parametrize(
    "argv, message",
    [
        (["--dataset", "diabetes", "--monitor", "val/acc"], "--monitor val/acc: --dataset diabetes (regression) logs"),
        (["--monitor", "val/mae"], "--monitor val/mae: --dataset digits (classification) logs"),
        (["--dataset", "diabetes", "--model", "cnn"], "cnn takes images (C, H, W)"),
    ],
)
def test_options_that_do_not_fit_the_task_are_one_line_before_any_run(argv, message, tmp_path, capsys):
    assert run.main([*argv, "--logger", "csv", "--exp-dir", str(tmp_path)]) == 2
    err = capsys.readouterr().err
    assert message in err and len(err.strip().splitlines()) == 1
    assert not list(tmp_path.rglob("*.ckpt")) and not list(tmp_path.rglob("manifest.json"))


def test_the_mlflow_model_serves_values(tmp_path: Path, monkeypatch):
    import mlflow

    exp_dir = tmp_path / "experiments"
    assert run.main([*DIABETES, "--logger", "mlflow", "--max-epochs", "2", "--exp-dir", str(exp_dir)]) == 0
    run_dir = only_run_dir(exp_dir)
    model_uri = json.loads((run_dir / "manifest.json").read_text())["trackers"]["mlflow"]["model_uri"]
    monkeypatch.setenv("MLFLOW_TRACKING_URI", f"sqlite:///{(exp_dir / 'mlflow.db').resolve()}")
    rows = np.random.default_rng(1).normal(0, 0.05, size=(5, 10)).astype(np.float32)
    served = mlflow.pyfunc.load_model(model_uri).predict(rows)
    network, spec = read_model(Path(json.loads((run_dir / "test_metrics.json").read_text())["checkpoint"]))
    with torch.inference_mode():
        expected = network(torch.from_numpy(rows)).numpy()
    np.testing.assert_allclose(np.asarray(served).reshape(expected.shape), expected, rtol=1e-5)
    assert 25 < float(np.mean(served)) < 346  # the disease's progression, in its own units
