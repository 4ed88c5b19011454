"""Export a trained model for serving: `python -m project.export --help`.

The network as served (checkpoints.read_model), for any batch size, with its spec inside (ONNX metadata `project`,
TorchScript extra file `project.json`); the file is kept only if it agrees with PyTorch on several batch sizes.
"""

from __future__ import annotations

import argparse
import importlib.util
import json
from pathlib import Path
from typing import Any

from project.infra import runs
from project.infra.cli import Parser, add_model_options
from project.infra.errors import UserError, exit_process, run_command
from project.infra.files import in_place, write_file
from project.infra.redact import redact_path, redact_text
from project.predict import KEY, load_model

FORMATS = {"onnx": ".onnx", "torchscript": ".pt"}  # TorchScript: for LibTorch (C++); deprecated upstream
EXPORT_EXTRA = ("onnx", "onnxscript", "onnxruntime")  # pyproject's `export` extra
PARITY_BATCH_SIZES = (1, 4, 16)  # 1 and sizes other than the traced one (2): the batch axis must be dynamic
PARITY_TOLERANCE = 1e-4  # fp32 round-off, relative to the outputs' scale (probabilities near 1, values in hundreds)


def build_parser() -> Parser:
    parser = Parser(prog="python -m project.export", description="Export a checkpoint as ONNX or TorchScript.")
    add_model_options(parser, "a .ckpt file")
    parser.add(
        "--format",
        choices=tuple(FORMATS),
        default="onnx",
        help="onnx (ONNX Runtime, TensorRT) or torchscript (LibTorch; deprecated by PyTorch)",
    )
    parser.add("--output", type=Path, help="file to write (unset: beside the checkpoint, as .onnx or .pt)")
    return parser


def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    return run_command(lambda: export(args), args.debug)


def export(args: argparse.Namespace) -> None:
    if args.format == "onnx":
        require_export_extra()
    import torch

    from project.infra.checkpoints import read_model

    checkpoint = runs.find_checkpoint(args.checkpoint, args.exp_dir, args.exp_name, "--checkpoint")
    network, spec = read_model(checkpoint)
    spec["checkpoint"] = redact_path(checkpoint)  # the file travels: a secret in its path stays here
    example = example_input(spec, batch_size=2)  # not 0 or 1, which torch.export would specialise the batch axis on
    differences = []

    def write(path: Path) -> None:  # the file appears under its name only once it answers as the network does
        if (output.suffix.lower() == ".onnx") != (args.format == "onnx"):  # predict tells ONNX files by their name
            named = "an ONNX file is named" if args.format == "onnx" else "a TorchScript file is not named"
            raise UserError(f"--output: {output}: {named} *.onnx (predict tells the formats apart by it)")
        if args.format == "onnx":
            batch = {0: torch.export.Dim("batch")}
            program = torch.onnx.export(network, (example,), input_names=["inputs"], output_names=["outputs"],
                                        dynamo=True, dynamic_shapes=(batch,), verbose=False)  # fmt: skip
            program.model.metadata_props[KEY] = json.dumps(spec)
            program.save(str(path))
        else:  # traced: the forward pass has no data-dependent branches
            torch.jit.save(torch.jit.trace(network, example), str(path), _extra_files={f"{KEY}.json": json.dumps(spec)})
        differences.append(parity(network, path, spec))
        if not differences[0] <= PARITY_TOLERANCE:
            reason = f"max relative difference {differences[0]:.2e} > {PARITY_TOLERANCE:g}"
            raise UserError(f"the {args.format} export of {checkpoint} disagrees with it ({reason}); not kept")

    output = (args.output or checkpoint.with_suffix(FORMATS[args.format])).expanduser()
    if in_place(output):
        raise UserError(f"--output: {output} is not a regular file; the export is written, then read back to check it")
    write_file(output, write, flag="--output: ", reads=[checkpoint])
    sizes = ", ".join(map(str, PARITY_BATCH_SIZES))
    wrote = f"Wrote {output}; checked against PyTorch on batches of {sizes}: max difference {differences[0]:.1e}"
    print(redact_text(wrote))  # a path may hold a secret too


def require_export_extra() -> None:
    missing = [name for name in EXPORT_EXTRA if importlib.util.find_spec(name) is None]
    if missing:
        raise UserError(f"ONNX needs the 'export' extra (missing {', '.join(missing)}): pip install -e '.[export]'")


def example_input(spec: dict[str, Any], batch_size: int, seed: int = 0) -> Any:
    """Random raw inputs around the dataset's statistics (pixels kept in their range), float32."""
    import torch

    shape = (batch_size, *spec["input_shape"])
    mean, std = (torch.tensor(spec[key]).view(1, -1, *[1] * (len(shape) - 2)) for key in ("mean", "std"))
    inputs = torch.randn(shape, generator=torch.Generator().manual_seed(seed)) * std + mean
    return inputs if spec["pixel_max"] is None else inputs.clamp(0, spec["pixel_max"])


def parity(network: Any, exported: Path, spec: dict[str, Any]) -> float:
    """The largest difference between the network and the exported file on random inputs of several batch sizes,
    relative to the outputs' scale (their largest magnitude, at least 1)."""
    import torch

    run, _, _ = load_model(str(exported))
    worst = 0.0
    for seed, batch_size in enumerate(PARITY_BATCH_SIZES):
        inputs = example_input(spec, batch_size, seed=seed)
        with torch.inference_mode():
            expected, answered = network(inputs), torch.as_tensor(run(inputs))
        worst = max(worst, float((answered - expected).abs().max() / expected.abs().max().clamp(min=1)))
    return worst


if __name__ == "__main__":
    exit_process(main())
