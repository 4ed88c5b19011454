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
FAR = 100.0  # standard deviations from the training mean beyond which a feature value is named in a warning


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

    run, spec, where = load_model(args.checkpoint, args.exp_dir, args.exp_name)
    try:
        task = build_task(spec["task"], spec["output_names"], spec.get("task_options"))
    except (TypeError, ValueError) as error:  # metadata edited by hand, or of another release
        raise UserError(f"--checkpoint: {where or args.checkpoint}: its '{KEY}' metadata does not fit this project's "
                        f"tasks ({str(error).splitlines()[0]})") from None  # fmt: skip
    sources = [source for text in args.inputs for source in find_inputs(text, spec)]

    def write(file: Any) -> None:
        writer = csv.writer(file)
        writer.writerow(["input", *task.prediction_columns()])
        samples = read_inputs(sources, spec)
        while chunk := list(itertools.islice(samples, args.batch_size)):
            names, inputs = zip(*chunk, strict=True)
            with torch.inference_mode():
                served = torch.as_tensor(run(torch.stack(inputs))).float()
            # a file name that is not UTF-8 (bytes kept as surrogates) is written with those bytes escaped
            names = [n.encode("utf-8", "surrogateescape").decode("utf-8", "backslashreplace") for n in names]
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
        reads = [path for path, _ in sources] + ([where] if where else [])  # never written over
        write_file(Path(args.output).expanduser(), write_to, flag="--output: ", reads=reads)
    count = sum(1 if array is None else len(array) for _, array in sources)
    wrote = redact_text(f"Wrote {count} predictions to {args.output}")  # a path may hold a secret too
    print(wrote, file=sys.stderr if args.output == "-" else sys.stdout)


def load_model(source: str, exp_dir: str = "", exp_name: str = "") -> tuple[Any, dict[str, Any], Path | None]:
    """(float32 raw inputs (N, *input_shape) -> served outputs, the spec saved with the model, the file or folder it
    was read from here)."""
    import torch

    from project.infra.checkpoints import is_torchscript, read_model

    device = "cuda" if torch.cuda.is_available() else "cpu"
    folder = Path(source) if Path(source, "MLmodel").is_file() else None
    if source.startswith(("runs:/", "models:/", "mlflow-artifacts:/")) or folder is not None:
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
            # Its description first: another kind of model (a pickled python_model, code of its own) could run code
            # as it loads; MLflow checks that this kind's archive holds no pickled objects (tracking.MLFLOW_DEFAULTS).
            info = loaded(source, lambda: mlflow.models.Model.load(source))  # its MLmodel file only
            loader = info.flavors.get("python_function", {}).get("loader_module")
            if loader != "mlflow.pytorch" or info.flavors.get("pytorch", {}).get("code"):
                raise UserError(f"--checkpoint: {source} is not a PyTorch model that this project logged; not loaded "
                                "(loading another kind of MLflow model could run its code)")  # fmt: skip
            spec = spec_of(info.metadata or {}, source)
            model = loaded(source, lambda: mlflow.pyfunc.load_model(source))
        return (lambda inputs: model.predict(inputs.numpy())), spec, folder
    path = runs.find_checkpoint(source, exp_dir, exp_name, "--checkpoint")
    if path.suffix.lower() == ".onnx":
        from project.export import require_export_extra

        require_export_extra()
        import onnxruntime

        found = onnxruntime.get_available_providers()
        providers = [p for p in ("CUDAExecutionProvider", "CPUExecutionProvider") if p in found]
        session = loaded(path, lambda: onnxruntime.InferenceSession(str(path), providers=providers))
        name, metadata = session.get_inputs()[0].name, session.get_modelmeta().custom_metadata_map
        return (lambda inputs: session.run(None, {name: inputs.numpy()})[0]), spec_of(metadata, path), path
    if is_torchscript(path):
        extra = {f"{KEY}.json": ""}  # torch.jit.load fills it in
        module = loaded(path, lambda: torch.jit.load(str(path), map_location=device, _extra_files=extra))
        return (lambda inputs: module(inputs.to(device)).cpu()), spec_of({KEY: extra[f"{KEY}.json"]}, path), path
    network, spec = read_model(path)
    network.to(device)
    return (lambda inputs: network(inputs.to(device)).cpu()), spec, path


def loaded(source: Any, load: Any) -> Any:
    try:
        return load()
    except Exception as error:  # MLflow, onnxruntime and torch.jit have their own errors for every kind of bad model
        reason = (str(error) or type(error).__name__).splitlines()[0][:200]
        raise UserError(f"--checkpoint: cannot load {source} ({reason})") from error


def spec_of(metadata: dict[str, Any], source: Any) -> dict[str, Any]:
    """The spec in a model's metadata: a dict (MLflow) or its JSON (ONNX: str; TorchScript: bytes), checked."""
    from project.infra.checkpoints import input_spec

    if not metadata.get(KEY):
        raise UserError(f"--checkpoint: {source} was not written by this project (no '{KEY}' metadata)")
    try:
        found = metadata[KEY] if isinstance(metadata[KEY], dict) else json.loads(metadata[KEY])
        return input_spec(found)  # every part there, of its type
    except (TypeError, KeyError, ValueError, AttributeError) as error:  # a JSONDecodeError is a ValueError
        why = f"no {error}" if isinstance(error, KeyError) else str(error).splitlines()[0]
        raise UserError(f"--checkpoint: {source}: its '{KEY}' metadata is not this project's spec ({why})") from None


def find_inputs(text: str, spec: dict[str, Any]) -> list[tuple[Path, Any]]:
    """(path, None) for an image, (path, array) for a .npy, checked; folders: images sorted, hidden ones skipped."""
    import numpy as np

    from project.infra.images import IMG_EXTENSIONS

    if not text:  # Path("") is the current folder
        raise UserError("INPUT: an empty name; give a file or a folder")
    path, images = Path(text).expanduser(), spec["pixel_max"] is not None  # only a model of images reads images
    if not images and path.is_dir():
        raise UserError(f"{path} is a folder; this model reads .npy arrays of feature vectors")
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
    except (ValueError, OSError, EOFError) as error:  # numpy suggests allow_pickle for anything it cannot parse
        why = "it holds Python objects, or is not a .npy file" if "pickle" in str(error) else str(error).splitlines()[0]
        raise UserError(f"{path}: not a readable .npy array ({why})") from error
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
    check_scale(path, values, spec)
    return [(path, array)]


def check_scale(path: Path, values: Any, spec: dict[str, Any]) -> None:
    """Raw inputs on the scale the model was trained on: pixels beyond 0..pixel_max are refused; pixels all in 0..1
    for a model of 0..16 or 0..255, or values hundreds of standard deviations from the training data's mean, are
    named in a warning (scaled twice, or not as the dataset gives them?), since they give confident nonsense."""
    import numpy as np

    low, high, pixel_max = float(values.min()), float(values.max()), spec["pixel_max"]
    if pixel_max is not None and (low < 0 or high > pixel_max * (1 + 1e-6)):
        raise UserError(f"{path}: values run {low:g}..{high:g}, but this model reads raw pixels 0..{pixel_max:g}")
    if pixel_max is not None and pixel_max > 1 and high <= 1:
        print(f"warning: {path}: every value is at most 1, but this model reads raw pixels 0..{pixel_max:g} "
              "(scaled already?)", file=sys.stderr)  # fmt: skip
        return
    mean, std = np.asarray(spec["mean"], dtype=np.float64), np.asarray(spec["std"], dtype=np.float64)
    if pixel_max is None and values.shape[1] == len(mean):  # feature vectors: a mean and deviation each
        furthest = float(np.max(np.abs((values - mean) / np.where(std > 0, std, 1))))
        if furthest > FAR:
            print(f"warning: {path}: values lie up to {furthest:.3g} standard deviations from the training data's "
                  "mean: are they the raw values, as the dataset gives them?", file=sys.stderr)  # fmt: skip


def read_inputs(sources: list[tuple[Path, Any]], spec: dict[str, Any]) -> Iterator[tuple[str, Any]]:
    """(name, float32 raw input (*input_shape)) for each input, in order."""
    import numpy as np
    import torch

    from project.infra.images import read_image, unreadable

    for path, array in sources:
        if array is not None:
            # float32 in this machine's byte order, whatever the file's (big-endian, long double)
            yield from (
                (f"{path}[{i}]", torch.from_numpy(np.array(row, dtype=np.float32))) for i, row in enumerate(array)
            )
            continue
        try:
            image = read_image(path, tuple(spec["input_shape"]))
        except Exception as error:  # Pillow's errors: OSError, a decompression bomb, ...
            raise UserError(unreadable(str(path), error)) from error
        yield str(path), image.float() * (spec["pixel_max"] / 255)  # 8-bit files; a dataset's range may differ


if __name__ == "__main__":
    exit_process(main())
