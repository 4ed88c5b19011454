"""Finding checkpoints (`best`, `last`, a path), and reading and writing them safely.

Checkpoints are loaded with `weights_only=True`, by us and by Lightning when it resumes (through
SafeCheckpointIO): a file that carries a pickled program is refused before any of it runs. Everything
the Solver and our callbacks save is plain types and tensors, so their own checkpoints always load.
They are written to a temporary file and renamed, so a crash or a full disk never leaves a
half-written checkpoint in place of a good one.
"""

from __future__ import annotations

import argparse
import contextlib
import os
import pickle
from pathlib import Path
from typing import Any

import torch
from lightning.fabric.plugins import TorchCheckpointIO

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


# What a resumed run must share with the run it continues: the model's shape, the data, and the learning rate
# (the restored optimiser would silently keep the old one). A larger --max-epochs is how a run is extended.
RESUME_MUST_MATCH = ("model", "hidden_dim", "input_shape", "class_names", "learning_rate")


def check_resumable(path: Path, hparams: dict[str, Any]) -> None:
    """--resume continues the same run: settings that differ from the checkpoint's are refused, by name."""
    trained = read(path, "--resume")["hyper_parameters"]
    differing = [
        f"--{key.replace('_', '-')} {trained[key]} (now {hparams[key]})"
        for key in RESUME_MUST_MATCH
        if key in trained and key in hparams and list_if_tuple(trained[key]) != list_if_tuple(hparams[key])
    ]
    if differing:
        raise UserError(
            f"--resume: {path} was trained with {', '.join(differing)}; resume with the run's own settings "
            "(add --config <run-dir>/config.yaml) or start a new run"
        )


def list_if_tuple(value: Any) -> Any:
    return list(value) if isinstance(value, tuple) else value


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


class SafeCheckpointIO(TorchCheckpointIO):
    """Lightning's checkpoint reader and writer, made safe for files a crash or a stranger may have touched.

    Writes go to a temporary file in the same folder, are flushed to the disk, then renamed over the
    target: a rename within one file system is atomic, so `last.ckpt` is always either the previous
    checkpoint or the new one, whatever kills the process (SIGKILL, power loss, a full disk). Reads
    (Lightning's `fit(ckpt_path=...)` resume path) go through `read`, always with weights_only=True.
    """

    def save_checkpoint(self, checkpoint: dict[str, Any], path: Any, storage_options: Any = None) -> None:
        path = Path(path)
        temporary = path.with_name(f".{path.name}.{os.getpid()}.tmp")
        try:
            path.parent.mkdir(parents=True, exist_ok=True)
            for stale in path.parent.glob(f".{path.name}.*.tmp"):  # left by a process killed mid-write
                stale.unlink(missing_ok=True)
            with open(temporary, "wb") as file:
                writer = _KeepsWriteError(file)
                try:
                    torch.save(checkpoint, writer)
                except RuntimeError:
                    # torch reports a failed write (a full disk) as "unexpected pos": raise the real one
                    if writer.error is None:
                        raise
                    raise writer.error from None
                file.flush()
                os.fsync(file.fileno())
            os.replace(temporary, path)
        except OSError as error:
            kept = f"; the previous {path.name} is intact" if path.is_file() else ""
            raise UserError(
                f"cannot write checkpoint {path}: {error.strerror or error}{kept}. "
                "Free some space (or fix the folder's permissions), then continue with --resume."
            ) from error
        finally:
            with contextlib.suppress(OSError):
                temporary.unlink(missing_ok=True)  # after a failure: no half-written file left behind
        _fsync_folder(path.parent)  # make the rename itself survive a power loss

    def __init__(self, flag: str = "--resume") -> None:
        self.flag = flag  # the option that named the file, for error messages

    def load_checkpoint(self, path: Any, map_location: Any = None, weights_only: bool | None = None) -> dict[str, Any]:
        return read(Path(path), self.flag)  # weights_only=True whatever the caller asked


class _KeepsWriteError:
    """A file for torch.save that remembers the OSError its write raised (errno and all)."""

    def __init__(self, file: Any) -> None:
        self.file, self.error = file, None

    def write(self, data: Any) -> int:
        try:
            return self.file.write(data)
        except OSError as error:
            self.error = error
            raise

    def flush(self) -> None:
        self.file.flush()


def _fsync_folder(folder: Path) -> None:
    # Some platforms and file systems cannot open or sync a folder; the rename is atomic all the same.
    with contextlib.suppress(OSError):
        descriptor = os.open(folder, os.O_RDONLY)
        try:
            os.fsync(descriptor)
        finally:
            os.close(descriptor)
