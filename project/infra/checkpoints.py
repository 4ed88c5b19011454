"""Reading checkpoints weights-only, and checking that one fits what it is asked to do (test this data, continue this
run). Lightning's resume reads through `read` too (callbacks.SafeCheckpointIO): a file that carries a pickled program
is refused before any of it runs. No Lightning here: predict, export and the tracker that logs the MLflow model
rebuild networks without it.
"""

from __future__ import annotations

import pickle
import zipfile
from pathlib import Path
from typing import Any

import torch

from project.infra.errors import NothingToDo, UserError

# What --resume must share with its checkpoint (run.py checks the run's config.yaml first; this covers a file kept
# outside its run): the network, the data's shape and classes, and the learning rate, which the restored optimiser
# would silently keep. A larger --max-epochs is how a run is extended.
RESUME_MUST_MATCH = ("task", "model", "model_options", "input_shape", "output_names", "learning_rate")


def read(path: Path, flag: str = "--checkpoint") -> dict[str, Any]:
    """torch.load with weights_only=True; every failure is one line that says what is wrong."""
    if not path.is_file():
        raise UserError(f"{flag}: {path} {'is not a file' if path.exists() else 'does not exist'}")
    if path.stat().st_size == 0:
        raise UserError(f"{flag}: {path} is empty")
    if path.suffix.lower() == ".onnx" or is_torchscript(path):
        raise UserError(f"{flag}: {path} is an exported model, not a checkpoint; give the run's .ckpt")
    if not zipfile.is_zipfile(path):  # what torch.save writes; a truncated archive lacks its directory at the end
        raise UserError(f"{flag}: {path} is not a valid checkpoint (truncated, or not a file torch.save wrote)")
    try:
        # mmap: a check that reads only the hyperparameters (run.py reads a checkpoint up to three times before
        # training) touches none of the weights' pages
        checkpoint = torch.load(path, map_location="cpu", weights_only=True, mmap=True)
    except pickle.UnpicklingError as error:  # weights_only met a class or a function: something that could run
        raise UserError(
            f"{flag}: {path} holds Python objects beyond tensors and plain values; refused (loading it could run "
            "code). Only load checkpoints you trust, and re-save them."
        ) from error
    except Exception as error:  # torch.load fails in many ways on damaged bytes
        reason = str(error).splitlines()[0] if str(error) else type(error).__name__
        raise UserError(f"{flag}: {path} is not a valid checkpoint ({reason})") from error
    hparams = checkpoint.get("hyper_parameters") if isinstance(checkpoint, dict) else None
    if (
        not isinstance(hparams, dict)
        or not {"model", "task"} <= set(hparams)
        or not isinstance(checkpoint.get("state_dict"), dict)
    ):
        raise UserError(f"{flag}: {path} is not a checkpoint of this project (no model, task or state_dict)")
    return checkpoint


def is_torchscript(path: Path) -> bool:
    """A TorchScript archive holds compiled code (`<name>/code/...`); a checkpoint, only data."""
    try:
        with zipfile.ZipFile(path) as archive:
            return any("/code/" in name for name in archive.namelist())
    except (zipfile.BadZipFile, OSError):  # not an archive (read() says what it is)
        return False


def storable(settings: dict[str, Any]) -> dict[str, Any]:
    """`settings` as the checkpoint's hyperparameters will hold them: numpy values (a dataset's `mean` computed with
    numpy, its class names from scikit-learn) become plain Python, and anything else that `read` would refuse is one
    line now, before training, not a run whose every checkpoint cannot be read."""
    import io

    def plain(value: Any) -> Any:
        if isinstance(value, dict):
            return {key: plain(item) for key, item in value.items()}
        if isinstance(value, (list, tuple)):
            return [plain(item) for item in value]
        return value.tolist() if type(value).__module__ == "numpy" else value  # a numpy scalar or array

    settings = plain(settings)
    for key, value in settings.items():
        buffer = io.BytesIO()
        try:
            torch.save(value, buffer)  # a lambda cannot be saved at all
            buffer.seek(0)
            torch.load(buffer, weights_only=True)
        except Exception:
            raise UserError(f"the model's setting {key} = {repr(value)[:80]} ({type(value).__name__}) could not be "
                            "read back from a checkpoint (weights only): give plain values (str, int, float, bool, "
                            "lists, dicts)") from None  # fmt: skip
    return settings


def input_spec(hparams: dict[str, Any]) -> dict[str, Any]:
    """What a user of the model must know to feed it and read it, in plain JSON types: raw inputs (N, *input_shape)
    (images' pixels 0..pixel_max; the model standardises them with mean/std), the task and its outputs' names."""
    return {
        "task": str(hparams["task"]),
        "output_names": [str(name) for name in hparams["output_names"]],
        "task_options": dict(hparams.get("task_options") or {}),
        "input_shape": [int(n) for n in hparams["input_shape"]],
        "mean": [float(v) for v in hparams["mean"]],
        "std": [float(v) for v in hparams["std"]],
        "pixel_max": None if hparams.get("pixel_max") is None else float(hparams["pixel_max"]),
    }


def read_model(path: Path, flag: str = "--checkpoint") -> tuple[torch.nn.Module, dict[str, Any]]:
    """The network of checkpoint `path` as served (standardisation, backbone, the task's output layer and serving
    head; eval mode, on the CPU) and its input spec."""
    from project.model import build_model
    from project.tasks import build_task

    checkpoint = read(path, flag)
    hparams = checkpoint["hyper_parameters"]
    weights = {k.removeprefix("model."): v for k, v in checkpoint["state_dict"].items() if k.startswith("model.")}
    try:
        task = build_task(hparams["task"], hparams["output_names"], hparams.get("task_options"))
        network = build_model(hparams["model"], hparams["input_shape"], len(hparams["output_names"]), hparams["mean"],
                              hparams["std"], task.output_layer(), **(hparams.get("model_options") or {}))  # fmt: skip
        network.load_state_dict(weights)
        spec = input_spec(hparams)
    except (TypeError, KeyError, ValueError, RuntimeError) as error:
        raise UserError(f"{flag}: {path} does not fit this project's models ({str(error).splitlines()[0]})") from error
    return torch.nn.Sequential(network, task.serve()).eval(), spec


def load_solver(path: Path, datamodule: Any = None) -> Any:
    """A Solver with the weights and hyperparameters of checkpoint `path`, checked against `datamodule`'s data."""
    from project.solver import Solver

    checkpoint = read(path)
    hparams = checkpoint["hyper_parameters"]
    if datamodule is not None:  # other data: say so, instead of a shape error
        trained = (hparams.get("task"), list(hparams.get("input_shape", [])), len(hparams.get("output_names", [])))
        wanted = (datamodule.task, list(datamodule.input_shape), len(datamodule.output_names))
        if trained != wanted:
            raise UserError(
                f"{path} was trained on inputs {trained[1]} with {trained[2]} outputs ({trained[0]}), but --dataset "
                f"gives {wanted[1]} with {wanted[2]} ({wanted[0]}): pass the --dataset (and --image-size) it was "
                "trained with"
            )
    try:
        solver = Solver(**hparams)
        solver.load_state_dict(checkpoint["state_dict"])
    except (TypeError, KeyError, ValueError, RuntimeError) as error:
        raise UserError(
            f"--checkpoint: {path} does not fit this project's models ({str(error).splitlines()[0]})"
        ) from error
    return solver


def check_resumable(path: Path, hparams: dict[str, Any], max_epochs: int) -> None:
    """--resume continues the same run: a checkpoint of another network, task or learning rate is refused by name, and
    so is a --max-epochs the run has passed; one it has reached means there is nothing to train."""
    checkpoint = read(path, "--resume")
    trained = checkpoint["hyper_parameters"]

    def plain(value: Any) -> Any:
        return list(value) if isinstance(value, tuple) else value

    keys = [key for key in RESUME_MUST_MATCH
            if key in trained and key in hparams and plain(trained[key]) != plain(hparams[key])]  # fmt: skip
    pairs = {key: (trained[key], hparams[key]) for key in ("model", "learning_rate") if key in keys}
    if "model_options" in keys:  # a backbone's options are flags of their own
        old, now = ({**h["model_options"]} if isinstance(h["model_options"], dict) else {} for h in (trained, hparams))
        pairs |= {k: (old.get(k), now.get(k)) for k in old.keys() | now.keys() if old.get(k) != now.get(k)}
    differing = [f"--{key.replace('_', '-')} {was} (now {now})" for key, (was, now) in sorted(pairs.items())]
    if {"task", "input_shape", "output_names"} & set(keys):  # no flag: the data (--dataset, --data-dir) differ
        differing.append(f"data of task {trained.get('task')}, inputs {plain(trained.get('input_shape'))} and "
                         f"{len(trained.get('output_names') or [])} outputs (now {hparams.get('task')}, "
                         f"{plain(hparams.get('input_shape'))}, {len(hparams.get('output_names') or [])}: another "
                         "--dataset or --data-dir)")  # fmt: skip
    if differing:
        raise UserError(f"--resume: {path} was trained with {', '.join(differing)}; resume with the run's own settings")
    # Lightning's loop state counts the epochs whose training finished; older files lack it.
    progress = checkpoint.get("loops", {}).get("fit_loop", {}).get("epoch_progress", {}).get("current", {})
    done = progress.get("processed")
    if isinstance(done, int) and done > max_epochs:
        raise UserError(f"--resume: {path} has already trained {done} epochs; pass --max-epochs above {done} to go on")
    if done == max_epochs:
        raise NothingToDo(
            f"nothing to train: {path} has trained all {done} epochs; pass a larger --max-epochs to go on"
        )
