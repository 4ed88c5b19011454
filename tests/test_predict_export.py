"""project.predict and project.export: predictions equal the solver's own test-time outputs, inputs are
read as the dataset gave them, and exported files give the same logits as PyTorch for any batch size."""

from __future__ import annotations

import csv
import json
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
import torch
from conftest import ROOT, cli_env, run_cli, write_image_folder

TINY = ["--max-epochs", "1", "--logger", "csv", "--num-workers", "0", "--hidden-dim", "16"]


def train(exp_dir: Path, *options: str) -> Path:
    """Train in this process (no interpreter start-up) and return the run's best checkpoint."""
    from project import run

    assert run.main([*TINY, "--exp-dir", str(exp_dir), "--model", "cnn", *options]) == 0
    (checkpoint,) = exp_dir.glob("*/*/checkpoints/best-*.ckpt")
    return checkpoint


def read_csv(path: Path) -> tuple[list[str], list[dict[str, str]]]:
    with path.open(newline="") as file:
        reader = csv.DictReader(file)
        return list(reader.fieldnames or []), list(reader)


def probabilities(rows: list[dict[str, str]], class_names: list[str]) -> np.ndarray:
    return np.array([[float(row[f"prob_{name}"]) for name in class_names] for row in rows])


@pytest.fixture(scope="module")
def digits_run(tmp_path_factory: pytest.TempPathFactory) -> dict:
    """A digits CNN, its test split as a raw-pixel .npy, and the solver's own outputs on it."""
    from project.data import Digits
    from project.infra import checkpoints

    exp_dir = tmp_path_factory.mktemp("digits") / "experiments"
    checkpoint = train(exp_dir, "--dataset", "digits")
    data = Digits(seed=0)
    data.setup()
    images, labels = data.splits["test"]
    npy = exp_dir.parent / "test_images.npy"
    np.save(npy, images.numpy())  # uint8 (N, 1, 8, 8), digits' own 0..16 pixel values
    solver = checkpoints.load_solver(checkpoint).eval()
    with torch.inference_mode():
        logits = solver(images.float())
    return {
        "exp_dir": exp_dir,
        "checkpoint": checkpoint,
        "npy": npy,
        "images": images,
        "labels": labels.numpy(),
        "logits": logits,
        "solver": solver,
        "class_names": solver.hparams["class_names"],
    }


@pytest.mark.slow
def test_predict_matches_the_solver_and_the_test_run(digits_run: dict, tmp_path: Path) -> None:
    output = tmp_path / "predictions.csv"
    exp_dir, npy = digits_run["exp_dir"], digits_run["npy"]
    result = run_cli("--checkpoint", "best", "--exp-dir", str(exp_dir), str(npy), "--output", str(output),
                     "--batch-size", "7", module="project.predict")  # fmt: skip
    assert result.returncode == 0, result.stderr

    header, rows = read_csv(output)
    names = digits_run["class_names"]
    assert header == ["input", "predicted", *(f"prob_{n}" for n in names)]
    assert [row["input"] for row in rows] == [f"{npy}[{i}]" for i in range(len(digits_run["labels"]))]
    expected = torch.softmax(digits_run["logits"], dim=1).numpy()
    assert [row["predicted"] for row in rows] == [names[i] for i in expected.argmax(1)]
    np.testing.assert_allclose(probabilities(rows, names), expected, atol=1e-6)
    # The same accuracy as the run's own test of this checkpoint (Lightning's test loop).
    (metrics_file,) = exp_dir.glob("*/*/test_metrics.json")
    predicted = np.array([names.index(row["predicted"]) for row in rows])
    assert np.mean(predicted == digits_run["labels"]) == pytest.approx(json.loads(metrics_file.read_text())["acc"])


@pytest.mark.slow
def test_predict_scales_image_files_to_the_datasets_pixel_range(digits_run: dict, tmp_path: Path) -> None:
    """A PNG (0..255) given to a digits model (pixels 0..16) is scaled like the data it was trained on."""
    from PIL import Image

    images = digits_run["images"][:5, 0].numpy()
    files = []
    for i, pixels in enumerate(images):
        files.append(tmp_path / f"digit{i}.png")
        Image.fromarray(np.round(pixels.astype(np.float64) * 255 / 16).astype(np.uint8), mode="L").save(files[-1])
    output = tmp_path / "predictions.csv"
    from project import predict

    argv = ["--checkpoint", str(digits_run["checkpoint"]), *map(str, files), "--output", str(output)]
    assert predict.main(argv) == 0
    _, rows = read_csv(output)
    assert [row["input"] for row in rows] == [str(f) for f in files]
    expected = torch.softmax(digits_run["logits"][:5], dim=1).numpy()
    # The PNG round trip quantises each pixel to 1/255 of 16 (< 0.04): probabilities barely move.
    np.testing.assert_allclose(probabilities(rows, digits_run["class_names"]), expected, atol=0.01)


@pytest.mark.slow
def test_predict_reads_an_image_folder_as_training_did(tmp_path: Path) -> None:
    """Image-folder models: predictions on the image files equal the solver's on the DataModule's batches
    (RGB conversion and resizing to --image-size included; the source images are 12x12, read at 16x16)."""
    from project import predict
    from project.data import ImageFolderData
    from project.infra import checkpoints

    folder = tmp_path / "images"
    write_image_folder(folder, classes=("cat", "dog", "emu"), per_class=10, size=12)
    exp_dir = tmp_path / "experiments"
    checkpoint = train(exp_dir, "--dataset", "image-folder", "--data-dir", str(folder), "--image-size", "16",
                       "--batch-size", "8")  # fmt: skip

    data = ImageFolderData(data_dir=str(folder), image_size=16, seed=0)
    data.setup()
    test = data.subsets["test"]
    paths = [test.dataset.samples[i][0] for i in test.indices]
    images = torch.stack([test[i][0] for i in range(len(test))]).float()
    solver = checkpoints.load_solver(checkpoint).eval()
    with torch.inference_mode():
        expected = torch.softmax(solver(images), dim=1).numpy()

    output = tmp_path / "predictions.csv"
    assert predict.main(["--checkpoint", str(checkpoint), *paths, "--output", str(output)]) == 0
    _, rows = read_csv(output)
    assert [row["input"] for row in rows] == paths
    np.testing.assert_allclose(probabilities(rows, ["cat", "dog", "emu"]), expected, atol=1e-6)

    # A folder is read recursively, sorted by path: every image, one row each.
    assert predict.main(["--checkpoint", str(checkpoint), str(folder), "--output", str(output)]) == 0
    _, rows = read_csv(output)
    assert [row["input"] for row in rows] == sorted(str(p) for p in folder.rglob("*.png"))


@pytest.fixture(scope="module")
def onnx_file(digits_run: dict) -> Path:
    """The digits model exported by the real command line."""
    output = digits_run["exp_dir"].parent / "digits.onnx"
    result = run_cli("--checkpoint", str(digits_run["checkpoint"]), "--output", str(output), module="project.export")
    assert result.returncode == 0, result.stderr
    assert "max |logit difference|" in result.stdout  # the command checks its own file too
    return output


@pytest.mark.slow
@pytest.mark.parametrize("fmt", ["onnx", "torchscript"])
def test_export_gives_the_same_logits_for_any_batch_size(digits_run: dict, onnx_file: Path, tmp_path: Path, fmt: str):
    if fmt == "onnx":
        import onnxruntime

        session = onnxruntime.InferenceSession(str(onnx_file), providers=["CPUExecutionProvider"])
        assert session.get_inputs()[0].shape[0] == "batch"  # a dynamic axis, not a number

        def exported(images: torch.Tensor) -> np.ndarray:
            return session.run(None, {"images": images.numpy()})[0]
    else:
        from project import export

        output = tmp_path / "digits.pt"
        assert (
            export.main(["--checkpoint", str(digits_run["checkpoint"]), "--format", fmt, "--output", str(output)]) == 0
        )
        module = torch.jit.load(str(output))

        def exported(images: torch.Tensor) -> np.ndarray:
            return module(images).detach().numpy()

    model = digits_run["solver"].model
    generator = torch.Generator().manual_seed(1)
    for batch_size in (1, 3, 64):  # none of them the batch size the exporter traced with (2)
        images = torch.rand(batch_size, 1, 8, 8, generator=generator) * 16  # raw digits pixels
        with torch.inference_mode():
            expected = model(images).numpy()
        logits = exported(images)
        assert logits.shape == (batch_size, 10)
        assert np.abs(logits - expected).max() <= 1e-4


@pytest.mark.slow
def test_predict_runs_from_the_exported_onnx_file(digits_run: dict, onnx_file: Path, tmp_path: Path) -> None:
    from project import predict

    output = tmp_path / "predictions.csv"
    assert predict.main(["--checkpoint", str(onnx_file), str(digits_run["npy"]), "--output", str(output)]) == 0
    _, rows = read_csv(output)
    expected = torch.softmax(digits_run["logits"], dim=1).numpy()
    np.testing.assert_allclose(probabilities(rows, digits_run["class_names"]), expected, atol=1e-5)


@pytest.mark.slow
def test_bad_inputs_get_one_line_and_no_csv(digits_run: dict, tmp_path: Path, capsys: pytest.CaptureFixture) -> None:
    output = tmp_path / "predictions.csv"
    wrong_shape = tmp_path / "wrong.npy"
    np.save(wrong_shape, np.zeros((3, 28, 28), dtype=np.uint8))
    not_an_image = tmp_path / "notes.txt"
    not_an_image.write_text("hello")
    broken_png = tmp_path / "broken.png"
    broken_png.write_bytes(b"\x89PNG not really")
    checkpoint = str(digits_run["checkpoint"])
    cases = {
        str(tmp_path / "missing.png"): "does not exist",
        str(wrong_shape): "shape (3, 28, 28), but the model takes (N, 1, 8, 8) or (N, 8, 8)",
        str(not_an_image): "not an image",
        str(broken_png): "cannot read image",
    }
    from project import predict

    for bad_input, message in cases.items():
        code = predict.main(["--checkpoint", checkpoint, str(digits_run["npy"]), bad_input, "--output", str(output)])
        stderr = capsys.readouterr().err
        assert code == 2 and stderr.startswith("error: ") and message in stderr, stderr
        assert len(stderr.strip().splitlines()) == 1
        assert not output.exists() and not list(tmp_path.glob("*.partial"))  # nothing half-written
    with pytest.raises(SystemExit):
        predict.main(["--checkpoint", checkpoint, "--batch-size", "0", str(digits_run["npy"])])


def test_missing_export_extra_is_named(monkeypatch: pytest.MonkeyPatch, capsys: pytest.CaptureFixture) -> None:
    from project import export

    monkeypatch.setattr(export, "EXPORT_EXTRA", (*export.EXPORT_EXTRA, "surely_not_installed_module"))
    assert export.main(["--checkpoint", "nowhere.ckpt"]) == 2
    error = capsys.readouterr().err
    assert "'export' extra" in error and "surely_not_installed_module" in error


@pytest.mark.parametrize("module", ["project.predict", "project.export", "project.sweep", "project.seeds"])
def test_help_does_not_import_torch(module: str) -> None:
    code = (
        f"import runpy, sys; sys.argv = ['{module}', '--help']\n"
        f"try:\n    runpy.run_module('{module}', run_name='__main__')\nexcept SystemExit:\n    pass\n"
        "assert 'torch' not in sys.modules, 'torch imported'; print('no torch')"
    )
    result = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, cwd=ROOT, env=cli_env())
    assert result.returncode == 0 and "no torch" in result.stdout, result.stderr


@pytest.mark.slow
def test_an_export_that_disagrees_is_not_kept(digits_run: dict, tmp_path: Path, monkeypatch, capsys) -> None:
    from project import export

    monkeypatch.setattr(export, "PARITY_TOLERANCE", -1.0)  # no file can pass: the failure path, for real
    output = tmp_path / "digits.pt"
    argv = ["--checkpoint", str(digits_run["checkpoint"]), "--format", "torchscript", "--output", str(output)]
    assert export.main(argv) == 2
    assert "disagrees with it" in capsys.readouterr().err and not output.exists()
