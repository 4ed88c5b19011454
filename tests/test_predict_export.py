"""project.predict and project.export: predictions equal the served network's outputs on the same inputs, inputs are
read as the dataset gave them (images through training's own reader), exported files carry their spec and answer as
PyTorch does for any batch size, and every bad input is one line before any forward pass, with no CSV left behind."""

from __future__ import annotations

import contextlib
import csv
import io
import json
import os
import pickle
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


def served(checkpoint: Path, inputs: torch.Tensor) -> np.ndarray:
    """The network as predict and export serve it (standardisation, backbone, the task's serving head)."""
    from project.infra.checkpoints import read_model

    network, _ = read_model(checkpoint)
    with torch.inference_mode():
        return network(inputs.float()).numpy()


@pytest.fixture(scope="module")
def digits_run(tmp_path_factory: pytest.TempPathFactory) -> dict:
    """A digits CNN, its test split as a raw-pixel .npy, and the served network's outputs on it."""
    from project.data import Digits

    exp_dir = tmp_path_factory.mktemp("digits") / "experiments"
    checkpoint = train(exp_dir, "--dataset", "digits")
    data = Digits(seed=0)
    data.setup()
    images, labels = data.splits["test"]
    npy = exp_dir.parent / "test_images.npy"
    np.save(npy, images.numpy())  # uint8 (N, 1, 8, 8), digits' own 0..16 pixel values
    names = [str(n) for n in data.output_names]
    return {"exp_dir": exp_dir, "checkpoint": checkpoint, "npy": npy, "images": images, "labels": labels.numpy(),
            "served": served(checkpoint, images), "class_names": names}  # fmt: skip


@pytest.mark.slow
def test_predict_matches_the_served_network_and_the_test_run(digits_run: dict, tmp_path: Path) -> None:
    output = tmp_path / "predictions.csv"
    exp_dir, npy = digits_run["exp_dir"], digits_run["npy"]
    result = run_cli("--checkpoint", "best", "--exp-dir", str(exp_dir), str(npy), "--output", str(output),
                     "--batch-size", "7", module="project.predict")  # fmt: skip
    assert result.returncode == 0, result.stderr

    header, rows = read_csv(output)
    names = digits_run["class_names"]
    assert header == ["input", "predicted", *(f"prob_{n}" for n in names)]
    assert [row["input"] for row in rows] == [f"{npy}[{i}]" for i in range(len(digits_run["labels"]))]
    expected = digits_run["served"]
    assert [row["predicted"] for row in rows] == [names[i] for i in expected.argmax(1)]
    np.testing.assert_allclose(probabilities(rows, names), expected, atol=1e-6)
    # The same accuracy as the run's own test of this checkpoint (Lightning's test loop).
    (metrics_file,) = exp_dir.glob("*/*/test_metrics.json")
    predicted = np.array([names.index(row["predicted"]) for row in rows])
    assert np.mean(predicted == digits_run["labels"]) == pytest.approx(json.loads(metrics_file.read_text())["acc"])


@pytest.mark.slow
def test_predict_writes_to_standard_output_and_takes_h_w_arrays(digits_run: dict, capsys) -> None:
    """`--output -`: the CSV on stdout, the note on stderr; (N, H, W) is taken for a one-channel model."""
    from project import predict

    hw = digits_run["npy"].with_name("hw.npy")
    np.save(hw, digits_run["images"][:6, 0].numpy().astype(np.float32))
    assert predict.main(["--checkpoint", str(digits_run["checkpoint"]), str(hw), "--output", "-"]) == 0
    out, err = capsys.readouterr()
    rows = list(csv.DictReader(io.StringIO(out)))
    assert [row["input"] for row in rows] == [f"{hw}[{i}]" for i in range(6)]
    np.testing.assert_allclose(probabilities(rows, digits_run["class_names"]), digits_run["served"][:6], atol=1e-6)
    assert "Wrote 6 predictions" in err


@pytest.mark.slow
def test_an_output_is_written_as_a_shell_writes_it(digits_run: dict, tmp_path: Path, capsys) -> None:
    """Through a link (the link stays), into a device in place (/dev/null stays one), and to a reader that went away
    (`| head`): exit 141 with no traceback, as a shell's own commands do."""
    import stat

    from project import export, predict

    checkpoint, inputs = str(digits_run["checkpoint"]), str(digits_run["npy"])
    (tmp_path / "kept").mkdir()
    for name in ("p.csv", "m.onnx"):
        (tmp_path / name).symlink_to(Path("kept") / name)  # relative, as users make them
    assert predict.main(["--checkpoint", checkpoint, inputs, "--output", str(tmp_path / "p.csv")]) == 0
    assert export.main(["--checkpoint", checkpoint, "--format", "onnx", "--output", str(tmp_path / "m.onnx")]) == 0
    assert (tmp_path / "p.csv").is_symlink() and (tmp_path / "m.onnx").is_symlink()
    assert read_csv(tmp_path / "kept" / "p.csv")[1] and (tmp_path / "kept" / "m.onnx").stat().st_size > 0
    assert predict.main(["--checkpoint", checkpoint, inputs, "--output", "/dev/null"]) == 0
    assert export.main(["--checkpoint", checkpoint, "--output", "/dev/null"]) == 2  # it could not read it back
    assert stat.S_ISCHR(Path("/dev/null").stat().st_mode)
    (tmp_path / "loop.csv").symlink_to("loop.csv")
    assert predict.main(["--checkpoint", checkpoint, inputs, "--output", str(tmp_path / "loop.csv")]) == 2
    assert (tmp_path / "loop.csv").is_symlink()
    assert "Too many levels of symbolic links" in capsys.readouterr().err
    # /dev/stdout when that is a file the shell opened (`>> all.csv`): a rename would leave the shell's file behind
    with open(tmp_path / "all.csv", "a") as shells:
        argv = ["--checkpoint", checkpoint, inputs, "--output", "/dev/stdout"]
        into = subprocess.run([sys.executable, "-m", "project.predict", *argv], stdout=shells, stderr=subprocess.PIPE,
                              text=True, cwd=ROOT, env=cli_env())  # fmt: skip
    assert into.returncode == 2 and "standard output: name a file (predict: --output -)" in into.stderr
    gone = subprocess.Popen([sys.executable, "-m", "project.predict", "--checkpoint", checkpoint, inputs, "--output",
                             "-"], stdout=subprocess.PIPE, stderr=subprocess.PIPE, cwd=ROOT, env=cli_env())  # fmt: skip
    gone.stdout.close()  # before the CSV is written
    assert gone.wait(timeout=120) == 141 and gone.stderr.read() == b""


@pytest.mark.slow
def test_predict_scales_image_files_to_the_datasets_pixel_range(digits_run: dict, tmp_path: Path) -> None:
    """A PNG (0..255) given to a digits model (pixels 0..16) is scaled like the data it was trained on."""
    from PIL import Image

    from project import predict

    files = []
    for i, pixels in enumerate(digits_run["images"][:5, 0].numpy()):
        files.append(tmp_path / f"digit{i}.png")
        Image.fromarray(np.round(pixels.astype(np.float64) * 255 / 16).astype(np.uint8), mode="L").save(files[-1])
    output = tmp_path / "predictions.csv"
    assert predict.main(["--checkpoint", str(digits_run["checkpoint"]), *map(str, files), "--output", str(output)]) == 0
    _, rows = read_csv(output)
    assert [row["input"] for row in rows] == [str(f) for f in files]
    # The PNG round trip quantises each pixel to 1/255 of 16 (< 0.04): probabilities barely move.
    np.testing.assert_allclose(probabilities(rows, digits_run["class_names"]), digits_run["served"][:5], atol=0.01)


@pytest.mark.slow
def test_predict_reads_an_image_folder_as_training_did(tmp_path: Path) -> None:
    """Image-folder models: predictions on the image files equal the network's on the DataModule's batches
    (RGB conversion and resizing to --image-size included; the source images are 12x12, read at 16x16)."""
    from PIL import Image

    from project import predict
    from project.data import ImageFolderData

    folder = tmp_path / "images"
    write_image_folder(folder, classes=("cat", "dog", "emu"), per_class=10, size=12)
    exp_dir = tmp_path / "experiments"
    checkpoint = train(exp_dir, "--dataset", "image-folder", "--data-dir", str(folder), "--image-size", "16",
                       "--batch-size", "8")  # fmt: skip

    data = ImageFolderData(data_dir=str(folder), image_size=16, seed=0)
    data.setup()
    test = data.subsets["test"]
    paths = [test.dataset.samples[i][0] for i in test.indices]
    expected = served(checkpoint, torch.stack([test[i][0] for i in range(len(test))]))
    output = tmp_path / "predictions.csv"
    assert predict.main(["--checkpoint", str(checkpoint), *paths, "--output", str(output)]) == 0
    _, rows = read_csv(output)
    assert [row["input"] for row in rows] == paths
    np.testing.assert_allclose(probabilities(rows, ["cat", "dog", "emu"]), expected, atol=1e-6)

    # A folder is read recursively, sorted by path, one row per image; hidden entries are skipped, as in training.
    images = sorted(str(p) for p in folder.rglob("*.png"))
    (folder / ".ipynb_checkpoints").mkdir()
    Image.new("RGB", (12, 12)).save(folder / ".ipynb_checkpoints" / "0.png")
    Image.new("RGB", (12, 12)).save(folder / "cat" / "._0.png")  # macOS's AppleDouble file
    assert predict.main(["--checkpoint", str(checkpoint), str(folder), "--output", str(output)]) == 0
    _, rows = read_csv(output)
    assert [row["input"] for row in rows] == images


@pytest.fixture(scope="module")
def onnx_file(digits_run: dict) -> Path:
    """The digits model exported by the real command line."""
    output = digits_run["exp_dir"].parent / "digits.onnx"
    result = run_cli("--checkpoint", str(digits_run["checkpoint"]), "--output", str(output), module="project.export")
    assert result.returncode == 0, result.stderr
    assert "checked against PyTorch on batches of 1, 4, 16" in result.stdout  # the command checks its own file too
    return output


@pytest.mark.slow
@pytest.mark.parametrize("fmt", ["onnx", "torchscript"])
def test_export_carries_its_spec_and_answers_as_pytorch_for_any_batch_size(digits_run, onnx_file, tmp_path, fmt):
    if fmt == "onnx":
        import onnxruntime

        session = onnxruntime.InferenceSession(str(onnx_file), providers=["CPUExecutionProvider"])
        assert session.get_inputs()[0].shape[0] == "batch"  # a dynamic axis, not a number
        spec = json.loads(session.get_modelmeta().custom_metadata_map["project"])

        def exported(images: torch.Tensor) -> np.ndarray:
            return session.run(None, {session.get_inputs()[0].name: images.numpy()})[0]
    else:
        from project import export

        output = tmp_path / "digits.pt"
        assert (
            export.main(["--checkpoint", str(digits_run["checkpoint"]), "--format", fmt, "--output", str(output)]) == 0
        )
        extra = {"project.json": ""}
        module = torch.jit.load(str(output), _extra_files=extra)
        spec = json.loads(extra["project.json"])

        def exported(images: torch.Tensor) -> np.ndarray:
            return module(images).detach().numpy()

    assert spec["task"] == "classification" and spec["output_names"] == digits_run["class_names"]
    assert spec["input_shape"] == [1, 8, 8] and spec["pixel_max"] == 16
    generator = torch.Generator().manual_seed(1)
    for batch_size in (1, 3, 64):  # none of them the batch size the exporter traced with (2)
        images = torch.rand(batch_size, 1, 8, 8, generator=generator) * 16  # raw digits pixels
        outputs = exported(images)
        assert outputs.shape == (batch_size, 10)
        np.testing.assert_allclose(outputs, served(digits_run["checkpoint"], images), atol=1e-5)


@pytest.mark.slow
@pytest.mark.parametrize("fmt", ["onnx", "torchscript"])
def test_predict_runs_from_an_exported_file(digits_run: dict, onnx_file: Path, tmp_path: Path, fmt: str) -> None:
    from project import export, predict

    model = onnx_file
    if fmt == "torchscript":  # under a name of the user's choosing: recognised by its contents
        model = tmp_path / "digits.scripted"
        assert (
            export.main(["--checkpoint", str(digits_run["checkpoint"]), "--format", fmt, "--output", str(model)]) == 0
        )
    output = tmp_path / "predictions.csv"
    assert predict.main(["--checkpoint", str(model), str(digits_run["npy"]), "--output", str(output)]) == 0
    _, rows = read_csv(output)
    np.testing.assert_allclose(probabilities(rows, digits_run["class_names"]), digits_run["served"], atol=1e-5)


def bad_inputs(tmp: Path) -> dict[str, str]:
    """{bad input: what its one error line says}, several of each kind; written into `tmp`."""
    from PIL import Image

    def npy(name: str, array: np.ndarray, **options) -> str:
        np.save(tmp / name, array, **options)
        return str(tmp / name)

    nan, inf = np.full((3, 1, 8, 8), 4.0, dtype=np.float32), np.full((3, 8, 8), 4.0, dtype=np.float32)
    nan[1, 0, 2, 2], inf[2, 0, 0] = np.nan, -np.inf
    (tmp / "empty.npy").write_bytes(b"")
    (tmp / "pickle.npy").write_bytes(pickle.dumps({"not": "an array"}))
    (tmp / "text.npy").write_text("1,2,3\n")
    (tmp / "notes.txt").write_text("hello")
    (tmp / "broken.png").write_bytes(b"\x89PNG not really")
    (tmp / "text.jpg").write_text("a text file with an image's name")
    (tmp / "no-images").mkdir()
    (tmp / "only-hidden" / ".cache").mkdir(parents=True)
    Image.new("L", (8, 8)).save(tmp / "only-hidden" / ".cache" / "x.png")
    return {
        str(tmp / "missing.png"): "does not exist",
        str(tmp / "missing.npy"): "does not exist",
        npy(
            "wrong.npy", np.zeros((3, 28, 28), np.uint8)
        ): "shape (3, 28, 28), but the model takes (N, 1, 8, 8) or (N, 8, 8)",
        npy("rgb.npy", np.zeros((3, 3, 8, 8), np.uint8)): "shape (3, 3, 8, 8)",
        npy("flat.npy", np.zeros(64, np.float32)): "shape (64,)",
        npy("nan.npy", nan): "row 1 (and 0 more) holds NaN or infinite values",
        npy("inf.npy", inf): "row 2 (and 0 more) holds NaN or infinite values",
        npy("strings.npy", np.full((2, 1, 8, 8), "a")): "holds <U1 values",
        npy("bools.npy", np.ones((2, 1, 8, 8), bool)): "holds bool values",
        npy("objects.npy", np.array([None, 1], dtype=object), allow_pickle=True): "not a readable .npy array",
        str(tmp / "empty.npy"): "not a readable .npy array",
        str(tmp / "pickle.npy"): "not a readable .npy array",
        str(tmp / "text.npy"): "not a readable .npy array (it holds Python objects, or is not a .npy file)",
        npy(
            "0-255.npy", np.full((2, 1, 8, 8), 255, np.uint8)
        ): "values run 255..255, but this model reads raw pixels 0..16",
        npy("negative.npy", np.full((2, 8, 8), -0.5, np.float32)): "values run -0.5..-0.5",
        "": "INPUT: an empty name",
        str(tmp / "notes.txt"): "not an image, a folder of images or a .npy array",
        str(tmp / "broken.png"): "cannot read image",
        str(tmp / "text.jpg"): "cannot read image",
        str(tmp / "no-images"): "no image files",
        str(tmp / "only-hidden"): "no image files",
    }


@pytest.mark.slow
def test_bad_inputs_get_one_line_and_no_csv(digits_run: dict, tmp_path: Path, capsys: pytest.CaptureFixture) -> None:
    from project import predict

    output = tmp_path / "out" / "predictions.csv"
    checkpoint = str(digits_run["checkpoint"])
    for bad_input, message in bad_inputs(tmp_path).items():
        code = predict.main(["--checkpoint", checkpoint, str(digits_run["npy"]), bad_input, "--output", str(output)])
        stderr = capsys.readouterr().err
        assert code == 2 and stderr.startswith("error: ") and message in stderr, (bad_input, stderr)
        assert len(stderr.strip().splitlines()) == 1, stderr
        assert not output.parent.exists() or not list(output.parent.iterdir())  # nothing written, not even in part
    with pytest.raises(SystemExit):
        predict.main(["--checkpoint", checkpoint, "--batch-size", "0", str(digits_run["npy"])])


@pytest.mark.slow
def test_bad_models_get_one_line(digits_run: dict, onnx_file: Path, tmp_path: Path, capsys) -> None:
    from project import predict

    (tmp_path / "garbage.onnx").write_bytes(b"not a protobuf")
    scripted = torch.jit.script(torch.nn.Identity())
    torch.jit.save(scripted, str(tmp_path / "plain.pt"))  # TorchScript, but not written by project.export
    (tmp_path / "mlflow-model").mkdir()
    (tmp_path / "mlflow-model" / "MLmodel").write_text("not: [an MLmodel")
    pickled_model(tmp_path / "pickled-mlflow-model", marker=tmp_path / "code-ran")
    capsys.readouterr()  # MLflow's own warnings as it saved that
    cases = {
        "garbage.onnx": "cannot load",
        "plain.pt": "was not written by this project",
        "mlflow-model": "cannot load",
        "pickled-mlflow-model": "is not a PyTorch model that this project logged; not loaded",
        "nowhere.ckpt": "does not exist",
    }
    # An exported file whose spec was edited: each part checked, one line (never a KeyError or TypeError)
    import onnx

    exported = onnx.load(str(onnx_file))
    spec = json.loads(next(p.value for p in exported.metadata_props if p.key == "project"))
    edited = {
        "not-json": "{task",
        "a-string": json.dumps("classification"),
        "no-task": json.dumps({k: v for k, v in spec.items() if k != "task"}),
        "bad-shape": json.dumps({**spec, "input_shape": "8x8"}),
        "other-task-options": json.dumps({**spec, "task_options": {"target_mean": 1.0}}),
    }
    for name, value in edited.items():
        next(p for p in exported.metadata_props if p.key == "project").value = value
        onnx.save(exported, str(tmp_path / f"{name}.onnx"))
        cases[f"{name}.onnx"] = "metadata"
    for model, message in cases.items():
        assert predict.main(["--checkpoint", str(tmp_path / model), str(digits_run["npy"]), "--output", "-"]) == 2
        stderr = capsys.readouterr().err
        assert message in stderr and len(stderr.strip().splitlines()) == 1, (model, stderr)
    assert not (tmp_path / "code-ran").exists()


def pickled_model(path: Path, marker: Path) -> None:
    """An MLflow model whose pickle runs code when it is loaded (it would create `marker`)."""
    import mlflow.pyfunc

    class Trap:
        def __reduce__(self):
            return (Path.touch, (marker,))

    class Model(mlflow.pyfunc.PythonModel):
        def __init__(self) -> None:
            self.trap = Trap()

        def predict(self, context, model_input):
            return model_input

    mlflow.pyfunc.save_model(str(path), python_model=Model())
    marker.unlink(missing_ok=True)  # MLflow loaded it back as it saved it


@pytest.mark.slow
def test_what_a_command_reads_is_never_written_over(digits_run: dict, tmp_path: Path, capsys) -> None:
    """predict's --output on its input or its checkpoint, export's output on its checkpoint (a .pt checkpoint's
    default output is itself), a folder or no name: one line each, every file byte for byte as it was."""
    from project import export, predict

    inputs, checkpoint = tmp_path / "inputs.npy", tmp_path / "model.pt"
    inputs.write_bytes(digits_run["npy"].read_bytes())
    checkpoint.write_bytes(digits_run["checkpoint"].read_bytes())
    before = {path: path.read_bytes() for path in (inputs, checkpoint)}
    (tmp_path / "link.ckpt").symlink_to(checkpoint.name)
    commands = {
        "predict over its input": (predict, [str(inputs), "--output", str(inputs)], "is what this command reads"),
        "predict over its checkpoint": (predict, [str(inputs), "--output", str(checkpoint)], "what this command reads"),
        "predict over a link to it": (predict, [str(inputs), "--output", str(tmp_path / "link.ckpt")], "reads"),
        "export beside itself": (export, ["--format", "torchscript"], "is what this command reads"),
        "export over its checkpoint": (export, ["--output", str(checkpoint)], "is what this command reads"),
        "predict into no name": (predict, [str(inputs), "--output", ""], "is a folder; name the file to write"),
        "predict into the root": (predict, [str(inputs), "--output", "/"], "is a folder"),
        "export into this folder": (export, ["--output", "."], "is a folder"),
        "ONNX without its suffix": (export, ["--output", str(tmp_path / "model")], "an ONNX file is named *.onnx"),
        "TorchScript named .onnx": (export, ["--format", "torchscript", "--output", str(tmp_path / "m.onnx")],
                                    "a TorchScript file is not named *.onnx"),
    }  # fmt: skip
    for what, (module, argv, message) in commands.items():
        assert module.main(["--checkpoint", str(checkpoint), *argv]) == 2, what
        stderr = capsys.readouterr().err
        assert message in stderr and len(stderr.strip().splitlines()) == 1, (what, stderr)
        assert {path: path.read_bytes() for path in before} == before, what
    assert sorted(path.name for path in tmp_path.iterdir()) == ["inputs.npy", "link.ckpt", "model.pt"]
    # An exported file is not a checkpoint to export again
    assert (
        export.main(["--checkpoint", str(checkpoint), "--format", "torchscript", "--output", str(tmp_path / "m.pt")])
        == 0
    )
    assert export.main(["--checkpoint", str(tmp_path / "m.pt")]) == 2
    assert "is an exported model, not a checkpoint; give the run's .ckpt" in capsys.readouterr().err


@pytest.mark.slow
def test_any_float_layout_and_any_file_name_is_read(digits_run: dict, tmp_path: Path) -> None:
    """Big-endian and long-double arrays predict as the native array does; a file name that is not UTF-8 is in the
    CSV with its bytes escaped."""
    from PIL import Image

    from project import predict

    images = digits_run["images"][:4].numpy()
    for name, dtype in {"native": np.float32, "big-endian": ">f8", "long-double": np.longdouble}.items():
        np.save(tmp_path / f"{name}.npy", images.astype(dtype))
    argv = ["--checkpoint", str(digits_run["checkpoint"]), "--output"]
    for name in ("native", "big-endian", "long-double"):
        assert predict.main([*argv, str(tmp_path / f"{name}.csv"), str(tmp_path / f"{name}.npy")]) == 0
    found = [probabilities(read_csv(tmp_path / f"{name}.csv")[1], digits_run["class_names"])
             for name in ("native", "big-endian", "long-double")]  # fmt: skip
    np.testing.assert_array_equal(found[0], found[1])
    np.testing.assert_array_equal(found[0], found[2])
    folder = tmp_path / "images"
    folder.mkdir()
    Image.fromarray(images[0, 0] * 15).save(os.fsdecode(bytes(folder) + b"/bad\xff.png"), format="PNG")
    assert predict.main([*argv, str(tmp_path / "names.csv"), str(folder)]) == 0
    assert [row["input"] for row in read_csv(tmp_path / "names.csv")[1]] == [f"{folder}/bad\\xff.png"]


def test_inputs_on_another_scale_are_refused_or_named(capsys) -> None:
    """Pixels beyond the model's range: refused; pixels all in 0..1 for a 0..16 model, and feature values far beyond
    the training data's spread (raw where the dataset gives them scaled): a warning, since they predict nonsense."""
    from project.infra.errors import UserError
    from project.predict import check_scale

    images = {"pixel_max": 16.0, "mean": [4.9], "std": [6.0]}
    features = {"pixel_max": None, "mean": [0.0, 10.0], "std": [0.05, 2.0]}
    with pytest.raises(UserError, match=r"values run 0\.\.255, but this model reads raw pixels 0\.\.16"):
        check_scale(Path("a.npy"), np.array([[0, 255]]), images)
    for values, spec in [(np.array([[0.0, 1.0]]), images), (np.array([[30.0, 10.0]]), features)]:
        check_scale(Path("a.npy"), values, spec)
        assert capsys.readouterr().err.startswith("warning: a.npy: ")
    for values, spec in [(np.array([[0, 16]]), images), (np.array([[0.3, -20.0]]), features)]:  # in range: silent
        check_scale(Path("a.npy"), values, spec)
        assert capsys.readouterr().err == ""


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
    assert "disagrees with it" in capsys.readouterr().err and not list(tmp_path.iterdir())


def start(module: str, *argv: str) -> subprocess.Popen:
    return subprocess.Popen([sys.executable, "-m", module, *argv], stdout=subprocess.PIPE, stderr=subprocess.PIPE,
                            text=True, cwd=ROOT, env=cli_env())  # fmt: skip


@pytest.mark.slow
def test_two_commands_writing_one_file_at_once_each_leave_it_whole(digits_run: dict, tmp_path: Path) -> None:
    """Two predicts (of different inputs) into one --output, and two exports into one file, started together: each
    finishes and says so; the file is then the whole work of one of them, never a mix or a half, and no temporary
    file stays. (Each CSV is big enough that their writes overlap, which mixed them when each wrote in place.)"""
    from project.predict import load_model

    checkpoint, images = str(digits_run["checkpoint"]), digits_run["images"].numpy()
    inputs = [tmp_path / "many.npy", tmp_path / "more.npy"]
    for factor, npy in enumerate(inputs, start=40):
        np.save(npy, np.tile(images, (factor, 1, 1, 1)))  # 14,400 and 14,760 rows
    output, model = tmp_path / "out" / "p.csv", tmp_path / "out" / "m.onnx"
    processes = [start("project.predict", "--checkpoint", checkpoint, str(npy), "--output", str(output))
                 for npy in inputs] + [start("project.export", "--checkpoint", checkpoint, "--output", str(model))
                                       for _ in range(2)]  # fmt: skip
    for process in processes:
        out, err = process.communicate(timeout=600)
        assert process.returncode == 0 and out.startswith("Wrote "), err[-2000:]
    _, rows = read_csv(output)
    (npy,) = (npy for npy in inputs if rows[0]["input"].startswith(str(npy)))
    served_rows = np.tile(digits_run["served"], (len(np.load(npy)) // len(images), 1))
    assert [row["input"] for row in rows] == [f"{npy}[{i}]" for i in range(len(served_rows))]
    np.testing.assert_allclose(probabilities(rows, digits_run["class_names"]), served_rows, atol=1e-6)
    run, _, _ = load_model(str(model))
    np.testing.assert_allclose(run(digits_run["images"].float()), digits_run["served"], atol=1e-5)
    assert sorted(p.name for p in output.parent.iterdir()) == ["m.onnx", "p.csv"]


SECRET = "Hunter2secret"


@pytest.mark.slow
def test_predict_and_export_print_no_secret_from_what_was_typed(digits_run: dict, tmp_path: Path, capsys) -> None:
    """Written where asked, in a folder whose name holds a secret; said without it; errors quoting it, too."""
    from project import export, predict

    folder, checkpoint, npy = tmp_path / f"token={SECRET}", str(digits_run["checkpoint"]), str(digits_run["npy"])
    assert predict.main(["--checkpoint", checkpoint, npy, "--output", str(folder / "p.csv")]) == 0
    assert export.main(["--checkpoint", checkpoint, "--format", "torchscript", "--output", str(folder / "m.pt")]) == 0
    assert (folder / "p.csv").is_file() and (folder / "m.pt").is_file()
    for main, argv in (
        (predict.main, ["--checkpoint", str(folder / "none.ckpt"), npy]),
        (export.main, ["--checkpoint", f"api_key={SECRET}"]),
        (predict.main, ["--checkpoint", checkpoint, npy, "--output", str(folder / "p.csv" / "under-a-file.csv")]),
        (predict.main, [npy, "--batch-size", f"password={SECRET}"]),
    ):
        with pytest.raises(SystemExit) if "--batch-size" in argv else contextlib.nullcontext():
            assert main(argv) == 2
    out, err = capsys.readouterr()
    assert out.count("Wrote ") == 2 and err.count("error: ") == 4 and SECRET not in out + err, out + err
