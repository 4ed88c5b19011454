"""Reading checkpoints safely, and checking that one fits what it is asked to do (test this data, continue this run).

Checkpoints are read with `weights_only=True`, by us and by Lightning when it resumes (callbacks.SafeCheckpointIO):
a file that carries a pickled program is refused before any of it runs. Everything the Solver and our callbacks
save is tensors and plain values, so their own checkpoints always load. No Lightning here: predict, export and the
tracker that logs the MLflow model rebuild a network from a checkpoint without it.
"""

from __future__ import annotations

import pickle
from pathlib import Path
from typing import Any

import torch

from project.infra.errors import NothingToDo, UserError

# What a resumed run must share with the checkpoint it continues (a run's config.yaml is checked first, by run.py;
# this covers a checkpoint file kept outside its run): the network, the data's shape and classes, and the learning
# rate (the restored optimiser would silently keep the old one). A larger --max-epochs is how a run is extended.
RESUME_MUST_MATCH = ("model", "model_options", "input_shape", "class_names", "learning_rate")


def read(path: Path, flag: str = "--checkpoint") -> dict[str, Any]:
    """torch.load with weights_only=True, every failure turned into one line that says what is wrong."""
    if not path.is_file():
        raise UserError(f"{flag}: {path} {'is not a file' if path.exists() else 'does not exist'}")
    if path.stat().st_size == 0:
        raise UserError(f"{flag}: {path} is empty")
    with open(path, "rb") as file:
        if not file.read(4).startswith((b"PK\x03\x04", b"\x80")):  # torch.save's zip archive, or its legacy pickle
            raise UserError(f"{flag}: {path} is not a valid checkpoint (another format: not a file torch.save wrote)")
    try:
        checkpoint = torch.load(path, map_location="cpu", weights_only=True)
    except pickle.UnpicklingError as error:
        if "weights_only" in str(error).lower() or "unsupported global" in str(error).lower():
            raise UserError(
                f"{flag}: {path} holds Python objects beyond tensors and plain values; refused (it could run code "
                "when loaded). Only load checkpoints you trust, and re-save them."
            ) from error
        raise UserError(f"{flag}: {path} is not a readable checkpoint ({str(error).splitlines()[0]})") from error
    except Exception as error:  # torch.load fails in many ways on foreign bytes (IndexError, EOFError, ...)
        reason = str(error).splitlines()[0] if str(error) else type(error).__name__
        raise UserError(f"{flag}: {path} is not a valid checkpoint (truncated or another format: {reason})") from error
    if not isinstance(checkpoint, dict) or not isinstance(checkpoint.get("hyper_parameters"), dict):
        raise UserError(f"{flag}: {path} is not a checkpoint of this project (no hyper_parameters)")
    if not isinstance(checkpoint.get("state_dict"), dict) or "model" not in checkpoint["hyper_parameters"]:
        raise UserError(f"{flag}: {path} is not a checkpoint of this project (no model or state_dict)")
    return checkpoint


def input_spec(hparams: dict[str, Any]) -> dict[str, Any]:
    """What a user of the model must know to feed it, as plain JSON types: raw pixels (N, *input_shape) in the range
    0..pixel_max (the model standardises them itself), and the name of each output logit's class."""
    return {
        "class_names": [str(name) for name in hparams["class_names"]],
        "input_shape": [int(n) for n in hparams["input_shape"]],
        "pixel_max": float(hparams.get("pixel_max", 255.0)),
    }


def read_model(path: Path, flag: str = "--checkpoint") -> tuple[torch.nn.Module, dict[str, Any]]:
    """The network of checkpoint `path` (standardisation included; eval mode, on the CPU) and its input spec."""
    from project.model import build_model

    checkpoint = read(path, flag)
    hparams = checkpoint["hyper_parameters"]
    weights = {k.removeprefix("model."): v for k, v in checkpoint["state_dict"].items() if k.startswith("model.")}
    try:
        network = build_model(hparams["model"], hparams["input_shape"], len(hparams["class_names"]), hparams["mean"],
                              hparams["std"], **(hparams.get("model_options") or {}))  # fmt: skip
        network.load_state_dict(weights)
    except (TypeError, KeyError, ValueError, RuntimeError) as error:
        raise UserError(f"{flag}: {path} does not fit this project's models ({str(error).splitlines()[0]})") from error
    return network.eval(), input_spec(hparams)


def check_compatible(path: Path, checkpoint: dict[str, Any], datamodule: Any) -> None:
    """A checkpoint trained on other data cannot be tested on this data: say so instead of a shape error."""
    hparams = checkpoint["hyper_parameters"]
    trained = (list(hparams.get("input_shape", [])), len(hparams.get("class_names", [])))
    wanted = (list(datamodule.input_shape), len(datamodule.class_names))
    if trained != wanted:
        raise UserError(
            f"{path} was trained on inputs {trained[0]} with {trained[1]} classes, but --dataset gives {wanted[0]} "
            f"with {wanted[1]}: pass the --dataset (and --image-size) it was trained with"
        )


def check_resumable(path: Path, hparams: dict[str, Any], max_epochs: int) -> None:
    """--resume continues the same run: a checkpoint of another network or learning rate is refused, by name, and so
    is a --max-epochs the run has already passed; one it has reached means there is nothing to train."""
    checkpoint = read(path, "--resume")
    trained = checkpoint["hyper_parameters"]
    differing = [f"--{key.replace('_', '-')} {trained[key]} (now {hparams[key]})" for key in RESUME_MUST_MATCH
                 if key in trained and key in hparams and plain(trained[key]) != plain(hparams[key])]  # fmt: skip
    if differing:
        raise UserError(f"--resume: {path} was trained with {', '.join(differing)}; resume with the run's own settings")
    # Lightning's checkpoint records how many epochs' training finished (its loop state); older files lack it.
    progress = checkpoint.get("loops", {}).get("fit_loop", {}).get("epoch_progress", {}).get("current", {})
    done = progress.get("processed")
    if isinstance(done, int) and done > max_epochs:
        raise UserError(f"--resume: {path} has already trained {done} epochs; pass --max-epochs above {done} to go on")
    if isinstance(done, int) and done == max_epochs:
        raise NothingToDo(
            f"nothing to train: {path} has trained all {done} epochs; pass a larger --max-epochs to go on"
        )


def plain(value: Any) -> Any:
    return list(value) if isinstance(value, tuple) else value


def load_solver(path: Path, datamodule: Any = None) -> Any:
    """A Solver with the weights and hyperparameters of checkpoint `path`."""
    from project.solver import Solver

    checkpoint = read(path)
    if datamodule is not None:
        check_compatible(path, checkpoint, datamodule)
    try:
        solver = Solver(**checkpoint["hyper_parameters"])
        solver.load_state_dict(checkpoint["state_dict"])
    except (TypeError, KeyError, ValueError, RuntimeError) as error:
        raise UserError(
            f"--checkpoint: {path} does not fit this project's models ({str(error).splitlines()[0]})"
        ) from error
    return solver
