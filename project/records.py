"""What a run leaves on disk, whatever the tracker, and the one-screen summary at its end.

    <exp-dir>/<exp-name>/<run-id>/      run-id: start time + random suffix, so two runs never collide
        config.yaml           the resolved configuration: `--config` it to run the same again
        manifest.json         command, user, host, times, exit status, git, versions, hardware, data, trackers
        checkpoints/          best-epochNNN.ckpt (by --monitor) and last.ckpt
        metrics.csv           every logged value with its step and epoch (hparams.yaml beside it: Lightning's)
        curves.png            loss and accuracy against epoch, train and val
        confusion_matrix.png  the test set, labelled with class names
        test_report.txt       the confusion matrix and per-class precision, recall and F1 as text
        test_metrics.json     the test scores, overall and per class
        tensorboard/, wandb/  when --logger chooses them

Only global rank 0 creates the directory, writes in it and opens tracker runs; `run_directory` is the one
place that decides where the directory is, for every process.
"""

from __future__ import annotations

import argparse
import atexit
import contextlib
import datetime
import getpass
import json
import os
import platform
import secrets
import shlex
import socket
import subprocess
import sys
import time
from pathlib import Path
from typing import Any

import lightning.pytorch as pl
import yaml

from project import plots, tracking
from project.checkpoints import CHECKPOINT_DIR, LAST, experiment_dir
from project.errors import UserError
from project.redact import redact, redact_argv

CONFIG = "config.yaml"
MANIFEST = "manifest.json"
METRICS = "metrics.csv"
CURVES = "curves.png"
CONFUSION = "confusion_matrix.png"
REPORT = "test_report.txt"
TEST_METRICS = "test_metrics.json"
# Rank 0 names the run directory here; Lightning's DDP launcher starts the other processes with its environment.
RUN_DIR_ENV = "PROJECT_RUN_DIR"
TRACKER_STATUS = {"finished": "FINISHED", "interrupted": "KILLED"}  # anything else: FAILED
# The test report goes on screen too while it fits there (with the summary); beyond this, only into its file.
MAX_CLASSES_ON_SCREEN = 20


def new_run_id() -> str:
    """A timestamp that sorts, plus a random suffix: two runs started in the same second differ."""
    return time.strftime("%Y%m%d-%H%M%S") + "-" + secrets.token_hex(3)


def is_global_zero() -> bool:
    """Whether this process is global rank 0, before the Trainer knows: Lightning reads the launcher's
    RANK / LOCAL_RANK / SLURM_PROCID; NODE_RANK covers the first process of every other node."""
    from lightning.fabric.utilities.rank_zero import rank_zero_only

    return getattr(rank_zero_only, "rank", 0) == 0 and os.environ.get("NODE_RANK", "0") == "0"


def run_directory(args: argparse.Namespace, resume_from: Path | None) -> Path:
    """Where this run's records go, the same on every process; only global rank 0 creates it."""
    if resume_from is not None and resume_from.parent.name == CHECKPOINT_DIR:
        return resume_from.parent.parent
    if not is_global_zero():
        return Path(os.environ.get(RUN_DIR_ENV) or experiment_dir(args) / "not-created-by-this-rank")
    directory = create_run_dir(experiment_dir(args))
    os.environ[RUN_DIR_ENV] = str(directory)
    return directory


def create_run_dir(experiment: Path) -> Path:
    """A new, empty `experiment/<run-id>`. --exp-dir may be a link the user made; a link planted as the
    experiment folder inside it is refused rather than followed out of --exp-dir."""
    try:
        experiment.parent.mkdir(parents=True, exist_ok=True)
        experiment.mkdir(exist_ok=True)
        no_follow = os.O_RDONLY | getattr(os, "O_DIRECTORY", 0) | getattr(os, "O_NOFOLLOW", 0)
        folder = os.open(experiment, no_follow)
    except OSError as error:
        if experiment.is_symlink():
            raise UserError(
                f"--exp-dir: {experiment} is a symbolic link; runs are not written through it (remove it)"
            ) from error
        raise UserError(f"--exp-dir: cannot create a run directory in {experiment}: {error.strerror}") from error
    try:
        for _ in range(10):
            run_id = new_run_id()
            try:
                # Relative to the folder opened above: a link swapped in after the check is not followed.
                os.mkdir(run_id, dir_fd=folder)
            except FileExistsError:
                continue
            return experiment / run_id
        raise UserError(f"--exp-dir: cannot find a free run name in {experiment}")
    except OSError as error:
        raise UserError(f"--exp-dir: cannot create a run directory in {experiment}: {error.strerror}") from error
    finally:
        os.close(folder)


def open_run(args: argparse.Namespace, config: dict[str, Any], resume_from: Path | None = None) -> Run:
    """The run directory with config.yaml and manifest.json, the loggers and the checkpoint callbacks.
    Resuming from a run's checkpoint continues that run's directory and tracker runs."""
    from lightning.pytorch.callbacks import ModelCheckpoint

    started = _now()
    zero = is_global_zero()
    directory = run_directory(args, resume_from)
    resuming = resume_from is not None and (directory / MANIFEST).is_file()
    previous = _read_json(directory / MANIFEST) if resuming and zero else {}
    command = "python -m project.run " + shlex.join(redact_argv(list(getattr(args, "argv", sys.argv[1:]))))
    user, git = _user(), git_state()
    tags = redact(dict(tag.split("=", 1) for tag in getattr(args, "tag", [])))
    tracker_tags = {
        "user": user,
        "host": socket.gethostname(),
        **({"git_commit": git["commit"], "git_dirty": str(git["dirty"])} if git["commit"] else {}),
        "run_dir": str(directory),
        "mode": "test" if args.only_test else "train",
        **tags,
    }
    # Tracker runs belong to rank 0 alone; Lightning replaces every logger of a fast dev run with a dummy.
    trackers = args.logger if zero and not args.fast_dev_run else []
    try:
        loggers = tracking.make_loggers(
            trackers,
            directory,
            experiment=args.exp_name,
            exp_dir=Path(args.exp_dir),
            tags=tracker_tags,
            previous=previous.get("trackers", {}),
        )
    except UserError:
        if resume_from is None:
            with contextlib.suppress(OSError):
                directory.rmdir()  # still empty: leave no trace of a run that never started
        raise
    run = Run(directory, loggers, monitor=args.monitor, zero=zero)
    run.callbacks = [
        ModelCheckpoint(
            dirpath=directory / CHECKPOINT_DIR,
            filename="best-epoch{epoch:03d}",
            monitor=args.monitor,
            mode="min" if "loss" in args.monitor else "max",
            save_top_k=1,
            auto_insert_metric_name=False,
        ),
        ModelCheckpoint(
            dirpath=directory / CHECKPOINT_DIR,
            filename=LAST.removesuffix(".ckpt"),
            save_top_k=1,
            enable_version_counter=False,
        ),
        run,
    ]
    if not zero:
        return run

    safe_config = redact(config)
    session = {"command": command, "start_time": started, "user": user, "host": socket.gethostname(), "git": git}
    if previous:
        old_config = _read_yaml(directory / CONFIG)
        changed = {k: [old_config.get(k), v] for k, v in safe_config.items() if old_config.get(k) != v}
        previous.setdefault("resumed", []).append({**session, "from": str(resume_from), "changed": changed})
        run.manifest = {**previous, "end_time": None, "exit_status": "running"}
    else:
        run.manifest = {
            "run_id": directory.name,
            "experiment": args.exp_name,
            "mode": "test" if args.only_test else "train",
            **session,
            "end_time": None,
            "exit_status": "running",
            "versions": _versions(),
            "seed": args.seed,
            "data": {"dataset": args.dataset},
            "tags": tags,
        }
    run.manifest["trackers"] = tracking.describe(loggers)
    write_atomic(directory / CONFIG, yaml.safe_dump(safe_config, sort_keys=True))
    run.write_manifest()
    tracking.log_params(loggers, {**safe_config, "user": user, "command": command})
    return run


class Run(pl.Callback):
    """One run's records. As a Lightning callback it notes the hardware and data sizes when they are known
    (setup) and how a failed run ended (on_exception); `finish` writes the reports and the summary."""

    def __init__(self, directory: Path, loggers: list[Any], monitor: str, zero: bool) -> None:
        self.directory, self.loggers, self.monitor, self.zero = directory, loggers, monitor, zero
        self.callbacks: list[Any] = []
        self.manifest: dict[str, Any] = {}
        self.closed = False
        # A run that ends any other way (an error outside the Trainer, sys.exit) still records how it ended.
        atexit.register(self._close_unfinished)

    def setup(self, trainer: pl.Trainer, pl_module: pl.LightningModule, stage: str) -> None:
        if not (self.zero and trainer.is_global_zero):
            return
        self.manifest["hardware"] = hardware(trainer)
        with contextlib.suppress(AttributeError, NotImplementedError, TypeError):  # a datamodule without sizes
            self.manifest.setdefault("data", {})["split_sizes"] = dict(trainer.datamodule.split_sizes)
        self.write_manifest()

    def on_exception(self, trainer: pl.Trainer, pl_module: pl.LightningModule, exception: BaseException) -> None:
        interrupted = isinstance(exception, (KeyboardInterrupt, SystemExit))
        self.close("interrupted" if interrupted else f"failed: {type(exception).__name__}")

    def finish(self, trainer: pl.Trainer, solver: Any, datamodule: Any, tested: Path | None) -> None:
        """Test report, test_metrics.json, plots, the tracker's artifacts, then the summary on screen."""
        if not (self.zero and trainer.is_global_zero):
            self.close("finished")
            return
        scores = None
        if solver.test_confusion is not None:
            scores = self._write_test_records(trainer, solver, datamodule, tested)
        plots.save_curves(self.directory / METRICS, self.directory / CURVES)
        records = [CONFIG, CURVES, CONFUSION, REPORT, TEST_METRICS, METRICS]
        tracking.log_files(self.loggers, self.directory, [self.directory / name for name in records])
        problems = self.close("finished")
        if scores is not None and len(scores["per_class"]) <= MAX_CLASSES_ON_SCREEN:
            print((self.directory / REPORT).read_text(), end="")
        print(self._summary(scores, tested, problems))

    def _write_test_records(self, trainer: pl.Trainer, solver: Any, datamodule: Any, tested: Path | None) -> dict:
        from project.checkpoints import read
        from project.metrics import format_report, per_class_scores, summarize

        confusion = solver.test_confusion
        names = [str(n) for n in datamodule.class_names]
        scores = summarize(confusion)
        per_class = per_class_scores(confusion)
        loss = trainer.callback_metrics.get("test/loss")
        epoch = read(tested)["epoch"] if tested is not None else None
        record = {
            **scores,
            "loss": float(loss) if loss is not None else None,
            "per_class": {
                name: {
                    "precision": float(per_class["precision"][i]),
                    "recall": float(per_class["recall"][i]),
                    "f1": float(per_class["f1"][i]),
                    "support": int(per_class["support"][i]),
                }
                for i, name in enumerate(names)
            },
            "confusion_matrix": confusion.tolist(),  # rows: true class, columns: predicted class
            "checkpoint": str(tested) if tested else None,
            "checkpoint_epoch": epoch,
        }
        write_atomic(self.directory / REPORT, format_report(confusion, names) + "\n")
        write_atomic(self.directory / TEST_METRICS, json.dumps(record, indent=2) + "\n")
        plots.save_confusion_matrix(confusion.numpy(), names, self.directory / CONFUSION)
        self.manifest["test"] = {**scores, "checkpoint": record["checkpoint"], "checkpoint_epoch": epoch}
        return record

    def close(self, status: str) -> list[str]:
        """Record the end time and exit status, and end the tracker runs; once, whatever calls it first."""
        if self.closed:
            return []
        self.closed = True
        atexit.unregister(self._close_unfinished)
        if not self.zero:
            return []
        self.manifest.update(end_time=_now(), exit_status=status)
        if self.manifest.get("resumed"):
            self.manifest["resumed"][-1].update(end_time=self.manifest["end_time"], exit_status=status)
        self.write_manifest()
        tracking.log_files(self.loggers, self.directory, [self.directory / MANIFEST])
        problems = tracking.close(self.loggers, TRACKER_STATUS.get(status, "FAILED"))
        self.manifest["trackers"] = tracking.describe(self.loggers)
        self.write_manifest()
        return problems

    def _close_unfinished(self) -> None:
        self.close("failed: the process ended before the run finished")

    def write_manifest(self) -> None:
        write_atomic(self.directory / MANIFEST, json.dumps(self.manifest, indent=2, default=str) + "\n")

    def _summary(self, scores: dict | None, tested: Path | None, problems: list[str]) -> str:
        best = next((c for c in self.callbacks if getattr(c, "monitor", None) == self.monitor), None)
        lines = ["", f"Run directory: {self.directory}"]
        if tested is not None and scores is not None:
            where = tested.relative_to(self.directory) if tested.is_relative_to(self.directory) else tested
            score = getattr(best, "best_model_score", None)
            value = f" ({self.monitor} {float(score):.4f})" if score is not None and best.best_model_path else ""
            lines.append(f"Best epoch:    {scores['checkpoint_epoch']}{value}, tested from {where}")
        if scores is not None:
            lines.append(f"Test accuracy: {scores['acc']:.4f}")
            lines.append(
                f"Test macro:    precision {scores['precision']:.4f}  recall {scores['recall']:.4f}  "
                f"f1 {scores['f1']:.4f}   (per class: {REPORT}, {CONFUSION})"
            )
        opened = tracking.how_to_open(self.loggers)
        for i, line in enumerate(opened or [f"{self.directory / METRICS} (no tracker)"]):
            lines.append(f"{'Tracker:' if i == 0 else '':<15}{line}")
        lines.extend(f"warning: {problem}" for problem in problems)
        return "\n".join(lines)


def hardware(trainer: pl.Trainer) -> dict[str, Any]:
    import torch

    accelerator = type(trainer.accelerator).__name__.removesuffix("Accelerator").lower()
    ids = list(getattr(trainer, "device_ids", []) or [])
    on_gpu = accelerator == "cuda"
    names = [torch.cuda.get_device_name(i) for i in ids] if on_gpu else [_cpu_name()] * max(len(ids), 1)
    return {
        "accelerator": accelerator,
        "devices": names,
        "num_nodes": trainer.num_nodes,
        "world_size": trainer.world_size,
        "precision": str(trainer.precision),
        "strategy": type(trainer.strategy).__name__,
    }


def git_state() -> dict[str, Any]:
    """The commit of this project's code and whether it had uncommitted changes (None outside git)."""
    root = Path(__file__).resolve().parent.parent
    try:
        commit = subprocess.run(
            ["git", "-C", str(root), "rev-parse", "HEAD"], capture_output=True, text=True, timeout=10
        )
        status = subprocess.run(
            ["git", "-C", str(root), "status", "--porcelain", "--untracked-files=no"],
            capture_output=True,
            text=True,
            timeout=10,
        )
    except (OSError, subprocess.TimeoutExpired):
        return {"commit": None, "dirty": None}
    if commit.returncode != 0:
        return {"commit": None, "dirty": None}
    return {"commit": commit.stdout.strip(), "dirty": bool(status.stdout.strip())}


def write_atomic(path: Path, text: str) -> None:
    """Write through a temporary file and rename: a crash leaves the old file or the new, never half."""
    partial = path.with_name(f".{path.name}.partial")
    partial.write_text(text)
    os.replace(partial, path)


def _versions() -> dict[str, str]:
    import lightning
    import torch
    import torchmetrics

    versions = {
        "python": platform.python_version(),
        "torch": torch.__version__,
        "lightning": lightning.__version__,
        "torchmetrics": torchmetrics.__version__,
        "platform": platform.platform(),
    }
    for tracker in ("mlflow", "wandb", "tensorboard"):  # the ones this run imported
        if tracker in sys.modules:
            versions[tracker] = getattr(sys.modules[tracker], "__version__", "unknown")
    return versions


def _cpu_name() -> str:
    with contextlib.suppress(OSError):  # Linux names the model; platform.processor() is often empty there
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                return line.split(":", 1)[1].strip()
    return platform.processor() or platform.machine()


def _user() -> str:
    try:
        return getpass.getuser()
    except (OSError, KeyError):  # a container user with no name
        return str(os.getuid()) if hasattr(os, "getuid") else "unknown"


def _now() -> str:
    return datetime.datetime.now().astimezone().isoformat(timespec="seconds")


def _read_json(path: Path) -> dict[str, Any]:
    try:
        return json.loads(path.read_text())
    except (OSError, ValueError):
        return {}


def _read_yaml(path: Path) -> dict[str, Any]:
    try:
        return yaml.safe_load(path.read_text()) or {}
    except (OSError, yaml.YAMLError):
        return {}
