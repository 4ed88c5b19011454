"""Export a trained model for serving: `python -m project.export --help`.

The file holds the network as it is served (checkpoints.read_model): standardisation included, raw inputs as float
(N, *input_shape) in, the task's served outputs (class probabilities, values) out, for any batch size. What
project.predict needs to read new inputs and name the outputs (the task, output names, input shape, pixel range)
travels inside the file: ONNX metadata property `project`, or TorchScript extra file `project.json`. Every export is
checked against PyTorch on several batch sizes before it is reported as written.
"""

from __future__ import annotations

import argparse
import importlib.util
import json
import sys
import warnings
from pathlib import Path
from typing import Any

from project.infra import runs
from project.infra.cli import Parser, add_model_options
from project.infra.errors import UserError, run_command
from project.infra.files import write_file
from project.predict import METADATA_KEY, load_exported

FORMATS = {"onnx": ".onnx", "torchscript": ".pt"}
EXPORT_EXTRA = ("onnx", "onnxscript", "onnxruntime")  # pyproject's `export` extra
PARITY_BATCH_SIZES = (1, 4, 16)  # 1 and sizes other than the traced one (2): the batch axis must be dynamic
# fp32 round-off, relative to the outputs' scale (probabilities near 1, values in the hundreds).
PARITY_TOLERANCE = 1e-4


def build_parser() -> Parser:
    parser = Parser(
        prog="python -m project.export",
        description="Export a checkpoint as ONNX or TorchScript: raw "
        "inputs in, the task's served outputs out, any batch size; checked against PyTorch before it is kept.",
    )
    add_model_options(parser, "a .ckpt file")
    parser.add(
        "--format", choices=tuple(FORMATS), default="onnx", help="onnx (ONNX Runtime, TensorRT, ...) or torchscript"
    )
    parser.add("--output", type=Path, help="file to write (unset: beside the checkpoint, as .onnx or .pt)")
    return parser


def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    return run_command(lambda: export(args), args.debug)


def export(args: argparse.Namespace) -> Path:
    if args.format == "onnx":
        require_export_extra()
    from project.infra.checkpoints import read_model

    checkpoint = runs.find_checkpoint(args.checkpoint, args.exp_dir, args.exp_name, "--checkpoint")
    network, spec = read_model(checkpoint)
    metadata = {**spec, "checkpoint": str(checkpoint)}
    output = (args.output or checkpoint.with_suffix(FORMATS[args.format])).expanduser()
    checked = []

    def write(path: Path) -> None:  # the file appears under its name only once it answers as the checkpoint does
        (to_onnx if args.format == "onnx" else to_torchscript)(network, metadata, path)
        checked.append(parity(network, path, metadata))
        if not checked[0] <= PARITY_TOLERANCE:
            raise UserError(
                f"the {args.format} export of {checkpoint} disagrees with it (max relative difference "
                f"{checked[0]:.2e} > {PARITY_TOLERANCE:g}), so it was not kept; please report it"
            )

    write_file(output, write, flag="--output: ")
    difference = checked[0]
    shape = ", ".join(map(str, metadata["input_shape"]))
    pixels = f" (pixels 0..{metadata['pixel_max']:g})" if metadata["pixel_max"] is not None else ""
    print(f"Wrote {output} ({args.format}): raw inputs as float (N, {shape}){pixels} in, {metadata['task']} "
          f"outputs ({', '.join(metadata['output_names'][:5])}{', ...' if len(metadata['output_names']) > 5 else ''}) "
          "out")  # fmt: skip
    print(f"Checked against PyTorch on batches of {', '.join(map(str, PARITY_BATCH_SIZES))}: "
          f"max difference {difference:.1e} of the outputs' scale")  # fmt: skip
    return output


def require_export_extra() -> None:
    missing = [name for name in EXPORT_EXTRA if importlib.util.find_spec(name) is None]
    if missing:
        raise UserError(f"ONNX needs the 'export' extra (missing {', '.join(missing)}): pip install -e '.[export]'")


def example_input(metadata: dict[str, Any], batch_size: int, seed: int = 0) -> Any:
    """Random raw inputs around the dataset's statistics (pixels clipped to their range), float32."""
    import torch

    generator = torch.Generator().manual_seed(seed)
    shape = metadata["input_shape"]
    broadcast = (1, -1, *[1] * (len(shape) - 1))
    mean, std = (torch.tensor(metadata[key]).view(broadcast) for key in ("mean", "std"))
    inputs = torch.randn((batch_size, *shape), generator=generator) * std + mean
    return inputs.clamp(0, metadata["pixel_max"]) if metadata["pixel_max"] is not None else inputs


def to_onnx(network: Any, metadata: dict[str, Any], output: Path) -> None:
    import torch

    # The dynamo exporter (onnxscript); its batch axis is dynamic only if the example batch is not 0 or 1, which
    # torch.export would specialise on.
    program = torch.onnx.export(
        network,
        (example_input(metadata, batch_size=2),),
        dynamo=True,
        input_names=["inputs"],
        output_names=["outputs"],
        dynamic_shapes=({0: torch.export.Dim("batch")},),
        verbose=False,
    )
    program.model.metadata_props[METADATA_KEY] = json.dumps(metadata)
    program.save(str(output))


def to_torchscript(network: Any, metadata: dict[str, Any], output: Path) -> None:
    import torch

    with warnings.catch_warnings():
        # TorchScript is deprecated upstream (in favour of torch.export) but still what LibTorch (C++) and older
        # mobile runtimes load; ONNX is the format to prefer. Traced: the forward pass has no data-dependent branches.
        warnings.simplefilter("ignore", (FutureWarning, torch.jit.TracerWarning))
        scripted = torch.jit.trace(network, example_input(metadata, batch_size=2))
        torch.jit.save(scripted, str(output), _extra_files={f"{METADATA_KEY}.json": json.dumps(metadata)})


def parity(network: Any, exported: Path, metadata: dict[str, Any]) -> float:
    """The largest difference between the network and the exported file on random inputs of several batch sizes,
    relative to the outputs' scale (their largest magnitude, at least 1)."""
    import torch

    run_exported, _ = load_exported(exported, device="cpu")
    worst = 0.0
    for seed, batch_size in enumerate(PARITY_BATCH_SIZES):
        inputs = example_input(metadata, batch_size, seed=seed)
        with torch.inference_mode():
            expected = network(inputs)
        difference = (torch.as_tensor(run_exported(inputs)) - expected).abs().max()
        worst = max(worst, float(difference / expected.abs().max().clamp(min=1)))
    return worst


if __name__ == "__main__":
    sys.exit(main())
