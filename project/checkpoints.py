"""Finding checkpoints (`best`, `last`, a path) and loading them safely.

Checkpoints are loaded with `weights_only=True`: a file that carries a pickled program is refused
before any of it runs. Everything the Solver saves is plain types, so its own checkpoints always load.
"""

from __future__ import annotations

import argparse
import pickle
from pathlib import Path
from typing import Any

import torch

from project.errors import UserError

CHECKPOINT_DIR = "checkpoints"
LAST = "last.ckpt"
BEST_GLOB = "best-*.ckpt"


def experiment_dir(args: argparse.Namespace) -> Path:
    return Path(args.exp_dir).expanduser() / args.exp_name


def latest_run_with_checkpoints(exp_dir: Path) -> Path | None:
    """The newest run directory (by name: they start with a timestamp) that holds a checkpoint."""
    if not exp_dir.is_dir():
        return None
    runs = sorted((p for p in exp_dir.iterdir() if p.is_dir() and not p.is_symlink()), key=lambda p: p.name)
    for run in reversed(runs):
        if any((run / CHECKPOINT_DIR).glob("*.ckpt")):
            return run
    return None


def best_in(run_dir: Path) -> Path | None:
    best = sorted((run_dir / CHECKPOINT_DIR).glob(BEST_GLOB))
    return best[-1] if best else None


def resolve(args: argparse.Namespace) -> Path:
    """The checkpoint that --only-test (--checkpoint) or --resume names: a path, `best` or `last`."""
    spec = args.checkpoint if args.only_test else args.resume
    flag = "--checkpoint" if args.only_test else "--resume"
    if spec is None:
        spec = "best" if args.only_test else "last"
    if spec in ("best", "last"):
        exp_dir = experiment_dir(args)
        run = latest_run_with_checkpoints(exp_dir)
        if run is None:
            raise UserError(
                f"no checkpoint found for --exp-name {args.exp_name} in {exp_dir}: train first, or pass {flag} PATH"
            )
        path = best_in(run) if spec == "best" else run / CHECKPOINT_DIR / LAST
        if path is None or not path.is_file():
            raise UserError(f"{flag} {spec}: {run / CHECKPOINT_DIR} has no {spec} checkpoint")
    else:
        path = Path(spec).expanduser()
    read(path, flag)  # fail here, with a clear line, rather than deep inside Lightning
    return path


def read(path: Path, flag: str = "--checkpoint") -> dict[str, Any]:
    """torch.load with weights_only=True, every failure turned into one line that says what is wrong."""
    if not path.exists():
        raise UserError(f"{flag}: {path} does not exist")
    if not path.is_file():
        raise UserError(f"{flag}: {path} is not a file")
    if path.stat().st_size == 0:
        raise UserError(f"{flag}: {path} is empty")
    try:
        checkpoint = torch.load(path, map_location="cpu", weights_only=True)
    except pickle.UnpicklingError as error:
        if "weights_only" in str(error).lower() or "unsupported global" in str(error).lower():
            raise UserError(
                f"{flag}: {path} holds Python objects beyond tensors and plain values; refused "
                "(it could run code when loaded). Only load checkpoints you trust, and re-save them."
            ) from error
        raise UserError(f"{flag}: {path} is not a readable checkpoint ({error})") from error
    except Exception as error:  # torch.load fails in many ways on foreign bytes (IndexError, EOFError, ...)
        reason = str(error).splitlines()[0] if str(error) else type(error).__name__
        raise UserError(f"{flag}: {path} is not a valid checkpoint (truncated or another format: {reason})") from error
    if not isinstance(checkpoint, dict) or "state_dict" not in checkpoint or "hyper_parameters" not in checkpoint:
        raise UserError(f"{flag}: {path} is not a checkpoint of this project (no state_dict/hyper_parameters)")
    return checkpoint


def check_compatible(path: Path, checkpoint: dict[str, Any], datamodule: Any) -> None:
    """A checkpoint trained on other data cannot be tested on this data: say so instead of a shape error."""
    hparams = checkpoint["hyper_parameters"]
    trained = (list(hparams.get("input_shape", [])), len(hparams.get("class_names", [])))
    wanted = (list(datamodule.input_shape), datamodule.num_classes)
    if trained != wanted:
        raise UserError(
            f"{path} was trained on inputs {trained[0]} with {trained[1]} classes, but --dataset gives "
            f"{wanted[0]} with {wanted[1]}: pass the --dataset (and --image-size) it was trained with"
        )


def load_solver(path: Path, datamodule: Any = None) -> Any:
    """A Solver with the weights and hyperparameters of checkpoint `path`."""
    from project.solver import Solver

    checkpoint = read(path)
    if datamodule is not None:
        check_compatible(path, checkpoint, datamodule)
    hparams = checkpoint["hyper_parameters"]
    try:
        solver = Solver(**hparams)
        solver.load_state_dict(checkpoint["state_dict"])
    except (TypeError, KeyError, RuntimeError) as error:
        reason = str(error).splitlines()[0]
        raise UserError(f"--checkpoint: {path} does not fit this project's models ({reason})") from error
    return solver
