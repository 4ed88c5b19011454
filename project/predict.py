"""Predict with a trained model: `python -m project.predict --help`.

Every model form carries its spec (checkpoints.input_spec), so inputs are read as training read them (images through
images.read_image); the task writes the CSV. On a GPU when there is one (CUDA_VISIBLE_DEVICES picks or hides them).
"""

from __future__ import annotations

import argparse
import csv
import io
import itertools
import json
import sys
import warnings
import zipfile
from collections.abc import Iterator
from pathlib import Path
from typing import Any

from project.infra import runs
from project.infra.cli import Parser, add_model_options, positive_int
from project.infra.errors import UserError, exit_process, run_command
from project.infra.files import write_file
from project.infra.redact import redact_text

# PyTorch deprecates TorchScript (export's --help says so); a user who chose it gets no two lines on each save and load.
warnings.filterwarnings("ignore", message=r"`torch\.jit\.\w+` is deprecated", category=FutureWarning)
KEY = "project"  # where the spec is: ONNX metadata `project`, TorchScript extra file `project.json`, MLflow metadata


def build_parser() -> Parser:
    parser = Parser(prog="python -m project.predict", description="Predict for images and .npy arrays: a CSV.")
    parser.add_argument("inputs", nargs="+", metavar="INPUT", help="image files, folders of images, .npy arrays")
    add_model_options(parser, "a .ckpt, .onnx or TorchScript file, an MLflow model (runs:/ID/model, its folder)")
    parser.add("--output", default="predictions.csv", help="CSV file to write; - for standard output")
    parser.add("--batch-size", type=positive_int, default=256, help="inputs per forward pass")
    return parser


def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    return run_command(lambda: predict(args), args.debug)


def predict(args: argparse.Namespace) -> None:
    import torch

    from project.tasks import build_task

    run, spec = load_model(args.checkpoint, args.exp_dir, args.exp_name)
    task = build_task(spec["task"], spec["output_names"], spec.get("task_options"))
    sources = [source for text in args.inputs for source in find_inputs(Path(text).expanduser(), spec)]

    def write(file: Any) -> None:
        writer = csv.writer(file)
        writer.writerow(["input", *task.prediction_columns()])
        samples = read_inputs(sources, spec)
        while chunk := list(itertools.islice(samples, args.batch_size)):
            names, inputs = zip(*chunk, strict=True)
            with torch.inference_mode():
                served = torch.as_tensor(run(torch.stack(inputs))).float()
            writer.writerows([n, *row] for n, row in zip(names, task.prediction_rows(served), strict=True))

    def write_to(path: Path) -> None:
        with open(path, "w", newline="") as file:
            write(file)

    if args.output == "-":  # the CSV appears only whole: on standard output too
        text = io.StringIO(newline="")
        write(text)
        sys.stdout.write(text.getvalue())
        sys.stdout.flush()  # before the note below: a reader that went away stops the command here
    else:
        write_file(Path(args.output).expanduser(), write_to, flag="--output: ")
    count = sum(1 if array is None else len(array) for _, array in sources)
    wrote = redact_text(f"Wrote {count} predictions to {args.output}")  # a path may hold a secret too
    print(wrote, file=sys.stderr if args.output == "-" else sys.stdout)


def load_model(source: str, exp_dir: str = "", exp_name: str = "") -> tuple[Any, dict[str, Any]]:
    """(float32 raw inputs (N, *input_shape) -> served outputs, the spec saved with the model)."""
    import torch

    device = "cuda" if torch.cuda.is_available() else "cpu"
    if source.startswith(("runs:/", "models:/", "mlflow-artifacts:/")) or Path(source, "MLmodel").is_file():
        import mlflow

        from project.infra import tracking

        tracking.configure_mlflow()  # a server that does not answer: one line within seconds
        uri = tracking.store_uri(exp_dir)  # where the runs were logged; an MLflow model's folder needs none
        database = runs.sqlite_file(uri)
        if database is not None and not database.is_file() and not Path(source, "MLmodel").is_file():
            raise UserError(f"--checkpoint {source}: no MLflow store at {database}; set MLFLOW_TRACKING_URI to where "
                            "the run was logged, or --exp-dir to the folder of its mlflow.db")  # fmt: skip
        with tracking.keep_environment("MLFLOW_TRACKING_URI"):
            mlflow.set_tracking_uri(uri)
            model = loaded(source, lambda: mlflow.pyfunc.load_model(source))
        return (lambda inputs: model.predict(inputs.numpy())), spec_of(model.metadata.metadata or {}, source)
    path = runs.find_checkpoint(source, exp_dir, exp_name, "--checkpoint")
    if path.suffix == ".onnx":
        from project.export import require_export_extra

        require_export_extra()
        import onnxruntime

        found = onnxruntime.get_available_providers()
        providers = [p for p in ("CUDAExecutionProvider", "CPUExecutionProvider") if p in found]
        session = loaded(path, lambda: onnxruntime.InferenceSession(str(path), providers=providers))
        name, metadata = session.get_inputs()[0].name, session.get_modelmeta().custom_metadata_map
        return (lambda inputs: session.run(None, {name: inputs.numpy()})[0]), spec_of(metadata, path)
    if is_torchscript(path):
        extra = {f"{KEY}.json": ""}  # torch.jit.load fills it in
        module = loaded(path, lambda: torch.jit.load(str(path), map_location=device, _extra_files=extra))
        return (lambda inputs: module(inputs.to(device)).cpu()), spec_of({KEY: extra[f"{KEY}.json"]}, path)
    from project.infra.checkpoints import read_model

    network, spec = read_model(path)
    network.to(device)
    return (lambda inputs: network(inputs.to(device)).cpu()), spec


def loaded(source: Any, load: Any) -> Any:
    try:
        return load()
    except Exception as error:  # MLflow, onnxruntime and torch.jit have their own errors for every kind of bad model
        reason = (str(error) or type(error).__name__).splitlines()[0][:200]
        raise UserError(f"--checkpoint: cannot load {source} ({reason})") from error


def is_torchscript(path: Path) -> bool:
    """A TorchScript archive holds compiled code (`<name>/code/...`); a checkpoint, only data."""
    if not zipfile.is_zipfile(path):
        return False
    with zipfile.ZipFile(path) as archive:
        return any("/code/" in name for name in archive.namelist())


def spec_of(metadata: dict[str, Any], source: Any) -> dict[str, Any]:
    """The spec in a model's metadata: a dict (MLflow) or its JSON (ONNX: str; TorchScript: bytes)."""
    if not metadata.get(KEY):
        raise UserError(f"--checkpoint: {source} was not written by this project (no '{KEY}' metadata)")
    return metadata[KEY] if isinstance(metadata[KEY], dict) else json.loads(metadata[KEY])


def find_inputs(path: Path, spec: dict[str, Any]) -> list[tuple[Path, Any]]:
    """(path, None) for an image, (path, array) for a .npy, checked; folders: images sorted, hidden ones skipped."""
    import numpy as np

    from project.infra.images import IMG_EXTENSIONS

    images = spec["pixel_max"] is not None  # only a model of images reads image files
    if images and path.is_dir():
        found = [(p, None) for p in sorted(path.rglob("*")) if p.is_file() and p.suffix.lower() in IMG_EXTENSIONS
                 and not any(part.startswith(".") for part in p.relative_to(path).parts)]  # fmt: skip
        if not found:
            raise UserError(f"{path}: no image files ({', '.join(IMG_EXTENSIONS)}) in this folder")
        return found
    if not path.is_file():
        raise UserError(f"{path} {'is not a file' if path.exists() else 'does not exist'}")
    if images and path.suffix.lower() in IMG_EXTENSIONS:
        return [(path, None)]
    if path.suffix.lower() != ".npy":
        raise UserError(f"{path}: not {'an image, a folder of images or ' if images else ''}a .npy array")
    try:
        array = np.load(path, mmap_mode="r", allow_pickle=False)  # never unpickled: it could run code
    except (ValueError, OSError, EOFError) as error:
        raise UserError(f"{path}: not a readable .npy array ({str(error).splitlines()[0]})") from error
    shape = tuple(spec["input_shape"])
    if array.dtype.kind not in "uif":
        raise UserError(f"{path}: holds {array.dtype} values; expected raw input values (integers or floats)")
    one_channel = len(shape) == 3 and shape[0] == 1
    if one_channel and array.shape[1:] == shape[1:]:
        array = array[:, None]  # (N, H, W) for a one-channel model
    if array.shape[1:] != shape:
        wanted = f"(N, {', '.join(map(str, shape))})" + (f" or (N, {shape[1]}, {shape[2]})" if one_channel else "")
        raise UserError(f"{path}: shape {tuple(array.shape)}, but the model takes {wanted} raw input values")
    if len(array) == 0:
        raise UserError(f"{path}: holds no inputs (shape {tuple(array.shape)})")
    values = array.reshape(len(array), -1)  # the model reads float32: a larger value is infinite there
    finite = np.isfinite(values) & (np.abs(values) <= np.finfo(np.float32).max)
    bad = np.flatnonzero(~finite.all(axis=1))
    if len(bad):  # a NaN would come out as a prediction of NaN, or as a confident one
        raise UserError(f"{path}: row {bad[0]} (and {len(bad) - 1} more) holds NaN or infinite values (in float32)")
    return [(path, array)]


def read_inputs(sources: list[tuple[Path, Any]], spec: dict[str, Any]) -> Iterator[tuple[str, Any]]:
    """(name, float32 raw input (*input_shape)) for each input, in order."""
    import torch

    from project.infra.images import read_image, unreadable

    for path, array in sources:
        if array is not None:
            yield from ((f"{path}[{i}]", torch.tensor(row, dtype=torch.float32)) for i, row in enumerate(array))
            continue
        try:
            image = read_image(path, tuple(spec["input_shape"]))
        except Exception as error:  # Pillow's errors: OSError, a decompression bomb, ...
            raise UserError(unreadable(str(path), error)) from error
        yield str(path), image.float() * (spec["pixel_max"] / 255)  # 8-bit files; a dataset's range may differ


if __name__ == "__main__":
    exit_process(main())
