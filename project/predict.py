"""Predict with a trained model: `python -m project.predict --help`.

The model is a checkpoint, a file written by project.export (ONNX, TorchScript), or the MLflow model a run logged
(`runs:/<run id>/model`, `models:/<name>/<version>`, or its folder); each answers with its task's served outputs
(class probabilities, values). Inputs are read exactly as the model's dataset gave them in training, from what the
model saved, never from constants typed again here: an image file is converted to RGB or grayscale and resized to the
model's input shape (infra/images.read_image, the reader image-folder training uses), then scaled to the dataset's
pixel range (0..16 for digits, 0..255 otherwise); a `.npy` array is taken as raw inputs already, (N, *input_shape),
or (N, H, W) for one-channel images. The model standardises them.

The CSV has one row per input, in input order (a folder's images sorted by path, an array's rows in order): the input
and the task's columns (classification: the predicted class and each class's probability; regression: each value).
"""

from __future__ import annotations

import argparse
import csv
import itertools
import json
import sys
import zipfile
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

from project.infra import runs
from project.infra.cli import Parser, add_model_options, positive_int
from project.infra.errors import UserError, run_command
from project.infra.files import write_file

IMAGE_SUFFIXES = (".png", ".jpg", ".jpeg", ".bmp", ".gif", ".tif", ".tiff", ".webp", ".ppm", ".pgm")
METADATA_KEY = "project"  # what a model needs to be fed, in ONNX metadata, a TorchScript extra file, MLflow metadata
MLFLOW_SCHEMES = ("runs:/", "models:/", "mlflow-artifacts:/")


def build_parser() -> Parser:
    parser = Parser(prog="python -m project.predict", description="Predict for images (files or folders) or for the "
                    "rows of a .npy array of raw inputs; write a CSV of the task's predictions (a class and its "
                    "probabilities, or values), one row per input, in input order.")  # fmt: skip
    parser.add_argument("inputs", nargs="+", metavar="INPUT", help="image files, folders of images, .npy arrays")
    add_model_options(parser, "a .ckpt, .onnx or TorchScript file, an MLflow model (runs:/ID/model, its folder)")
    parser.add("--output", default="predictions.csv", help="CSV file to write; - for standard output")
    parser.add("--batch-size", type=positive_int, default=256, help="inputs per forward pass")
    parser.add("--device", default="auto", help="cpu, cuda, cuda:1, ...; auto: cuda when available")
    return parser


def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    return run_command(lambda: predict(args), args.debug)


def predict(args: argparse.Namespace) -> int:
    """Write the CSV; return the number of rows."""
    import torch

    from project.tasks import build_task

    run_model, spec = load_model(args.checkpoint, args.exp_dir, args.exp_name, args.device)
    task = build_task(spec["task"], spec["output_names"], spec.get("task_options"))
    sources = find_inputs(args.inputs, spec)  # every input checked before the first forward pass

    def rows() -> Iterator[list[str]]:
        for names, inputs in batches(read_inputs(sources, spec), args.batch_size):
            served = torch.as_tensor(run_model(inputs)).float()
            for name, row in zip(names, task.prediction_rows(served), strict=True):
                yield [name, *row]

    header = ["input", *task.prediction_columns()]

    count = write_csv(args.output, header, rows())
    print(f"Wrote {count} predictions to {'standard output' if args.output == '-' else args.output}",
          file=sys.stderr if args.output == "-" else sys.stdout)  # fmt: skip
    return count


# --- Models: each gives (float inputs (N, *input_shape) -> served outputs) and the spec saved with it -------------


def load_model(source: str, exp_dir: str, exp_name: str, device: str) -> tuple[Callable[[Any], Any], dict[str, Any]]:
    if source.startswith(MLFLOW_SCHEMES) or (Path(source).expanduser() / "MLmodel").is_file():
        return load_mlflow(source)
    path = runs.find_checkpoint(source, exp_dir, exp_name, "--checkpoint")
    if path.suffix == ".onnx" or is_torchscript(path):
        return load_exported(path, device)
    import torch

    from project.infra.checkpoints import read_model

    network, spec = read_model(path)
    device = pick_device(device)
    network.to(device)

    def run_network(images: torch.Tensor) -> torch.Tensor:
        with torch.inference_mode():
            return network(images.to(device)).cpu()

    return run_network, spec


def pick_device(name: str) -> str:
    import torch

    if name == "auto":
        return "cuda" if torch.cuda.is_available() else "cpu"
    try:
        device = torch.device(name)
    except RuntimeError as error:
        raise UserError(f"--device: unknown device {name!r} (cpu, cuda, cuda:1, ...)") from error
    if device.type == "cuda" and not torch.cuda.is_available():
        raise UserError(f"--device {name}: no CUDA device is available here; use --device cpu")
    return name


def is_torchscript(path: Path) -> bool:
    """TorchScript archives hold compiled code (`<name>/code/...`); checkpoints hold only data."""
    try:
        with zipfile.ZipFile(path) as archive:
            return any("/code/" in name for name in archive.namelist())
    except (zipfile.BadZipFile, OSError):
        return False


def load_exported(path: Path, device: str) -> tuple[Callable[[Any], Any], dict[str, Any]]:
    """A model written by project.export, with the input spec saved inside it. `device` as --device takes it."""
    import warnings

    import torch

    if path.suffix == ".onnx":
        from project.export import require_export_extra

        require_export_extra()
        import onnxruntime

        has_cuda = "CUDAExecutionProvider" in onnxruntime.get_available_providers()
        device = ("cuda" if has_cuda else "cpu") if device == "auto" else device  # onnxruntime's build decides
        providers: list[Any] = ["CPUExecutionProvider"]
        if device.startswith("cuda"):
            if not has_cuda:
                raise UserError(f"--device {device}: this onnxruntime has no CUDA; install onnxruntime-gpu or use cpu")
            providers.insert(0, ("CUDAExecutionProvider", {"device_id": int(device.partition(":")[2] or 0)}))
        try:
            session = onnxruntime.InferenceSession(str(path), providers=providers)
        except Exception as error:  # onnxruntime raises its own exception types for every kind of bad file
            raise UserError(f"--checkpoint: {path} is not a readable ONNX model ({type(error).__name__})") from error
        metadata = session.get_modelmeta().custom_metadata_map.get(METADATA_KEY)
        input_name = session.get_inputs()[0].name

        def run(images: torch.Tensor) -> Any:
            return session.run(None, {input_name: images.float().numpy()})[0]

    else:
        device = pick_device(device)
        extra_files = {f"{METADATA_KEY}.json": ""}
        with warnings.catch_warnings():
            warnings.simplefilter("ignore", FutureWarning)  # TorchScript is deprecated upstream; see export.py
            try:
                module = torch.jit.load(str(path), map_location=device, _extra_files=extra_files).eval()
            except RuntimeError as error:
                raise UserError(f"--checkpoint: {path} is not a readable TorchScript model") from error
        metadata = extra_files[f"{METADATA_KEY}.json"] or None

        def run(images: torch.Tensor) -> Any:
            with torch.inference_mode():
                return module(images.float().to(device)).cpu()

    if not metadata:
        raise UserError(f"--checkpoint: {path} was not written by project.export (no '{METADATA_KEY}' metadata)")
    return run, json.loads(metadata)


def load_mlflow(uri: str) -> tuple[Callable[[Any], Any], dict[str, Any]]:
    """The MLflow model a run logged (MLFLOW_TRACKING_URI says where runs:/ and models:/ are looked up)."""
    import mlflow

    try:
        model = mlflow.pyfunc.load_model(uri)
    except Exception as error:  # MLflow's errors for unknown runs, missing artifacts, unreachable servers
        raise UserError(
            f"--checkpoint: cannot load the MLflow model {uri} ({str(error).splitlines()[0][:200]})"
        ) from error
    spec = (model.metadata.metadata or {}).get(METADATA_KEY)
    if not spec:
        raise UserError(f"--checkpoint: {uri} was not logged by project.run (no '{METADATA_KEY}' metadata)")
    return (lambda images: model.predict(images.float().numpy())), spec


# --- Inputs: found and checked first, then read lazily, batch by batch -----------------------------------------------


def find_inputs(inputs: list[str], spec: dict[str, Any]) -> list[tuple[Path, Any]]:
    """(path, None) for each image file, (path, array) for each .npy, in order; folders expanded."""
    import numpy as np

    found: list[tuple[Path, Any]] = []
    images = spec["pixel_max"] is not None  # a model of images also reads image files
    for text in inputs:
        path = Path(text).expanduser()
        if path.is_dir() and images:
            files = sorted(p for p in path.rglob("*") if is_image(p) and not hidden(p.relative_to(path)))
            if not files:
                raise UserError(f"{path}: no image files ({', '.join(IMAGE_SUFFIXES)}) in this folder")
            found += [(p, None) for p in files]
        elif not path.exists():
            raise UserError(f"{path} does not exist")
        elif path.suffix.lower() == ".npy":
            try:
                array = np.load(path, mmap_mode="r", allow_pickle=False)
            except (ValueError, OSError) as error:
                raise UserError(f"{path}: not a readable .npy array ({error})") from error
            found.append((path, checked_array(path, array, spec)))
        elif is_image(path) and images:
            found.append((path, None))
        else:
            kinds = f"an image ({', '.join(IMAGE_SUFFIXES)}), a folder or a .npy array" if images else "a .npy array"
            raise UserError(f"{path}: not {kinds}")
    return found


def is_image(path: Path) -> bool:
    return path.is_file() and path.suffix.lower() in IMAGE_SUFFIXES


def hidden(relative: Path) -> bool:
    return any(part.startswith(".") for part in relative.parts)


def checked_array(path: Path, array: Any, spec: dict[str, Any]) -> Any:
    import numpy as np

    shape = tuple(spec["input_shape"])
    if array.dtype.kind not in "uif":
        raise UserError(f"{path}: holds {array.dtype} values; expected raw input values (integers or floats)")
    one_channel = len(shape) == 3 and shape[0] == 1
    if one_channel and array.ndim == 3 and array.shape[1:] == shape[1:]:
        array = array[:, None]  # (N, H, W) for a one-channel model
    if array.ndim != 1 + len(shape) or array.shape[1:] != shape:
        wanted = f"(N, {', '.join(map(str, shape))})" + (f" or (N, {shape[1]}, {shape[2]})" if one_channel else "")
        raise UserError(f"{path}: shape {tuple(array.shape)}, but the model takes {wanted} raw input values")
    if array.dtype.kind == "f":
        bad = np.flatnonzero(~np.isfinite(array).reshape(len(array), -1).all(axis=1))
        if len(bad):  # a NaN would come out as "class 0" with probabilities of nan, or as a value of nan
            raise UserError(f"{path}: row {bad[0]} (and {len(bad) - 1} more) holds NaN or infinite values")
    return array


def read_inputs(sources: list[tuple[Path, Any]], spec: dict[str, Any]) -> Iterator[tuple[str, Any]]:
    """(name, float32 raw input (*input_shape)) for each input, in order."""
    import numpy as np
    import torch

    from project.infra.images import read_image

    scale = (
        spec["pixel_max"] or 255.0
    ) / 255.0  # image files hold 8-bit pixels; the dataset's range may differ (digits: 0..16)
    for path, array in sources:
        if array is None:
            try:
                image = read_image(path, tuple(spec["input_shape"]))
            except OSError as error:  # PIL's UnidentifiedImageError is an OSError
                raise UserError(f"cannot read image {path} ({type(error).__name__}); remove or replace it") from error
            yield str(path), image.float() * scale
        else:
            for index in range(len(array)):
                yield f"{path}[{index}]", torch.from_numpy(np.array(array[index], dtype=np.float32))


def batches(samples: Iterator[tuple[str, Any]], batch_size: int) -> Iterator[tuple[list[str], Any]]:
    import torch

    while chunk := list(itertools.islice(samples, batch_size)):
        names, images = zip(*chunk, strict=True)
        yield list(names), torch.stack(images)


def write_csv(output: str, header: list[str], rows: Iterator[list[str]]) -> int:
    """Write all rows; a file appears only when complete (a failure mid-way leaves no partial CSV)."""
    if output == "-":
        return write_rows(sys.stdout, header, rows)
    counted = []

    def write(path: Path) -> None:
        with path.open("w", newline="") as file:
            counted.append(write_rows(file, header, rows))

    write_file(Path(output).expanduser(), write, flag="--output: ")
    return counted[0]


def write_rows(file: Any, header: list[str], rows: Iterator[list[str]]) -> int:
    writer = csv.writer(file)
    writer.writerow(header)
    count = 0
    for row in rows:
        writer.writerow(row)
        count += 1
    return count


if __name__ == "__main__":
    sys.exit(main())
