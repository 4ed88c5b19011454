"""Export a trained model for serving: `python -m project.export --help`.

The exported model is the Solver's `model`, standardisation included: it takes raw pixel values as float
(N, C, H, W) — what project.predict feeds it — and returns logits, for any batch size. What predict needs
to read new inputs (class names, input shape, pixel range) travels inside the file: ONNX metadata
property `project`, or TorchScript extra file `project.json`. Every export is checked against PyTorch on
random inputs of several batch sizes before it is reported as written.
"""

from __future__ import annotations

import argparse
import importlib.util
import json
import sys
import warnings
from pathlib import Path
from typing import Any

from project.errors import UserError, exit_code

FORMATS = {"onnx": ".onnx", "torchscript": ".pt"}
METADATA_KEY = "project"  # ONNX metadata_props key; TorchScript extra file METADATA_KEY + ".json"
EXPORT_EXTRA = ("onnx", "onnxscript", "onnxruntime")  # pyproject's `export` extra
PARITY_BATCH_SIZES = (1, 4, 16)  # 1 and sizes other than the example batch: the batch axis must be dynamic
PARITY_TOLERANCE = 1e-4  # max |logit difference| in fp32


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="python -m project.export",
        description="Export a checkpoint as ONNX or TorchScript: raw pixels (N, C, H, W) in, logits out, "
        "any batch size. The file is checked against PyTorch before it is reported.",
        formatter_class=argparse.ArgumentDefaultsHelpFormatter,
    )
    add = parser.add_argument
    add("--checkpoint", default="best", help="a .ckpt file, or best/last of the latest run of --exp-name")
    add("--format", choices=tuple(FORMATS), default="onnx", help="onnx (ONNX Runtime, TensorRT, ...) or torchscript")
    add("--output", type=Path, default=None, help="file to write; unset: beside the checkpoint, as .onnx or .pt")
    add("--exp-dir", default="~/Experiments", help="where runs are, for --checkpoint best/last")
    add("--exp-name", default="debug", help="whose latest run --checkpoint best/last means")
    add("--debug", action="store_true", help="show tracebacks instead of one-line errors")
    return parser


def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    return exit_code(lambda: export(args), args.debug)


def export(args: argparse.Namespace) -> Path:
    if args.format == "onnx":
        require_export_extra()
    from project import checkpoints

    checkpoint = resolve_checkpoint(args.checkpoint, args.exp_dir, args.exp_name)
    solver = checkpoints.load_solver(checkpoint)
    model = solver.model.float().eval()
    metadata = {**input_spec(solver.hparams), "checkpoint": str(checkpoint)}
    output = args.output or checkpoint.with_suffix(FORMATS[args.format])
    if output.is_dir():
        raise UserError(f"--output: {output} is a folder; name the file to write")
    output.parent.mkdir(parents=True, exist_ok=True)

    if args.format == "onnx":
        to_onnx(model, metadata, output)
    else:
        to_torchscript(model, metadata, output)
    difference = parity(model, output, metadata)
    sizes = ", ".join(map(str, PARITY_BATCH_SIZES))
    if not difference <= PARITY_TOLERANCE:
        output.unlink()  # a file that gives other answers than the checkpoint must not be served by mistake
        raise UserError(
            f"the {args.format} export of {checkpoint} disagrees with it (max |logit difference| {difference:.2e} > "
            f"{PARITY_TOLERANCE:g} on batches of {sizes}), so it was not kept; please report it with the checkpoint"
        )
    shape = ", ".join(map(str, metadata["input_shape"]))
    print(
        f"Wrote {output} ({args.format}): raw pixels 0..{metadata['pixel_max']:g} as float (N, {shape}) in, "
        f"{len(metadata['class_names'])} logits out"
    )
    print(f"Checked against PyTorch on batches of {sizes}: max |logit difference| {difference:.1e}")
    return output


def require_export_extra() -> None:
    missing = [name for name in EXPORT_EXTRA if importlib.util.find_spec(name) is None]
    if missing:
        raise UserError(f"ONNX needs the 'export' extra (missing {', '.join(missing)}): pip install -e '.[export]'")


def resolve_checkpoint(spec: str, exp_dir: str, exp_name: str) -> Path:
    """A checkpoint path, or `best`/`last` of the latest run of `exp_name`, checked to be readable."""
    from project import checkpoints

    query = argparse.Namespace(only_test=True, checkpoint=spec, resume=None, exp_dir=exp_dir, exp_name=exp_name)
    return checkpoints.resolve(query)


def input_spec(hparams: Any) -> dict[str, Any]:
    """What a user of the model must know to feed it, as plain JSON types (from the checkpoint)."""
    return {
        "class_names": [str(name) for name in hparams["class_names"]],
        "input_shape": [int(n) for n in hparams["input_shape"]],
        # Checkpoints from before pixel_max was saved were all trained on 8-bit images or digits.
        "pixel_max": float(hparams.get("pixel_max", 255.0)),
    }


def example_input(metadata: dict[str, Any], batch_size: int, seed: int = 0) -> Any:
    """Random raw pixels in the model's range."""
    import torch

    generator = torch.Generator().manual_seed(seed)
    shape = (batch_size, *metadata["input_shape"])
    return torch.rand(shape, generator=generator) * metadata["pixel_max"]


def to_onnx(model: Any, metadata: dict[str, Any], output: Path) -> None:
    import torch

    # torch.onnx.export is the dynamo-based exporter (onnxscript); its batch axis is dynamic only if
    # the example batch is not 0 or 1, which torch.export would specialise on.
    program = torch.onnx.export(
        model,
        (example_input(metadata, batch_size=2),),
        input_names=["images"],
        output_names=["logits"],
        dynamic_shapes=({0: torch.export.Dim("batch")},),
        verbose=False,
    )
    program.model.metadata_props[METADATA_KEY] = json.dumps(metadata)
    program.save(str(output))


def to_torchscript(model: Any, metadata: dict[str, Any], output: Path) -> None:
    import torch

    with warnings.catch_warnings():
        # TorchScript is deprecated upstream (in favour of torch.export) but still what LibTorch (C++)
        # and older mobile runtimes load; ONNX is the format to prefer.
        warnings.simplefilter("ignore", FutureWarning)
        scripted = torch.jit.script(model)
        torch.jit.save(scripted, str(output), _extra_files={f"{METADATA_KEY}.json": json.dumps(metadata)})


def parity(model: Any, exported: Path, metadata: dict[str, Any]) -> float:
    """Max |logit difference| between `model` and the exported file on random inputs of several batch sizes."""
    import torch

    from project.predict import load_exported

    run_exported, _ = load_exported(exported, device="cpu")
    worst = 0.0
    for seed, batch_size in enumerate(PARITY_BATCH_SIZES):
        images = example_input(metadata, batch_size, seed=seed)
        with torch.inference_mode():
            expected = model(images)
        worst = max(worst, float((run_exported(images) - expected).abs().max()))
    return worst


if __name__ == "__main__":
    sys.exit(main())
