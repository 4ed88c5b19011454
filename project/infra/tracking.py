"""The experiment trackers a run logs to (`--logger`), as Lightning loggers:

- mlflow (the default): a local SQLite store under --exp-dir, or the team server in MLFLOW_TRACKING_URI; it runs in a
  process of its own (mlflow_worker.py), started before Lightning loads, so its start-up costs the run nothing;
- tensorboard: event files in the run directory; wandb: the hosted service, or offline files (an optional extra);
- csv: metrics.csv in the run directory, written for every run whatever --logger says.

A tracker is a convenience on top of the run directory, never a reason to lose a run: a tracker server that stops
answering mid-run gets one warning, and training goes on with the local records complete. Heavy imports (Lightning,
W&B, TensorBoard) happen inside functions, after the command line is parsed.
"""

from __future__ import annotations

import argparse
import contextlib
import csv
import importlib
import os
import sys
from collections.abc import Mapping
from pathlib import Path
from typing import Any

from project.infra import runs
from project.infra.errors import UserError
from project.infra.redact import redact_argv

# --logger name -> modules that provide it (any one will do), and the pip extra that installs them.
OPTIONAL_TRACKERS = {"tensorboard": (("tensorboard", "tensorboardX"), "tensorboard"), "wandb": (("wandb",), "wandb")}
DISTRIBUTION = "deep-learning-project-template"  # pyproject.toml's [project] name
LOCAL_STORE = "mlflow.db"
CLOSE_SECONDS = 45.0  # how long the end of a run waits for a tracker to take what is still queued (a slow server)


def start(args: argparse.Namespace) -> Trackers:
    """The trackers of this run, checked to be installed (one line, before anything is written); MLflow's process is
    started now, so that it imports MLflow and opens its store while this process imports Lightning."""
    names = [name for name in dict.fromkeys(args.logger) if name not in ("csv", "none")]
    for name in names:
        modules, extra = OPTIONAL_TRACKERS.get(name, ((), ""))
        if modules and not any(importable(module) for module in modules):
            raise UserError(f"--logger {name}: {name} is not installed; pip install '{DISTRIBUTION}[{extra}]' "
                            f"(in a clone of this project: pip install -e '.[{extra}]')")  # fmt: skip
    rank_zero = all(os.environ.get(v, "0") == "0" for v in ("RANK", "LOCAL_RANK", "NODE_RANK", "SLURM_PROCID"))
    if args.fast_dev_run or not rank_zero:  # Lightning gives a fast dev run a dummy logger; trackers are rank 0's
        return Trackers([])
    mlflow = None
    if "mlflow" in names:
        from project.infra.mlflow_worker import MLflowWorkerClient

        uri = os.environ.get("MLFLOW_TRACKING_URI") or local_store(args.exp_dir)
        served = uri.startswith(("http://", "https://", "databricks"))
        # A server keeps artifacts where its --artifacts-destination says; straight into a database, MLflow would put
        # them in ./mlruns of whatever the working directory is: they stay under --exp-dir instead.
        artifacts = None if served else (Path(args.exp_dir).expanduser().resolve() / "mlflow-artifacts").as_uri()
        mlflow = MLflowWorkerClient.start(uri, artifacts)
    return Trackers(names, mlflow)


def importable(module: str) -> bool:
    try:  # importing, not just finding, catches a broken install too
        importlib.import_module(module)
    except ImportError:
        return False
    return True


def local_store(exp_dir: str | Path) -> str:
    return f"sqlite:///{(Path(exp_dir).expanduser().resolve() / LOCAL_STORE).as_posix()}"


class Trackers:
    """The Lightning loggers of one run (metrics.csv first, always) and what the records ask of them."""

    def __init__(self, names: list[str], mlflow: Any = None) -> None:
        self.names, self.mlflow_worker = names, mlflow
        self.loggers: list[Any] = []
        self.mlflow: Any = None  # the MLflow logger, once open

    def open(
        self, directory: Path, args: argparse.Namespace, previous: Mapping[str, Any], tags: dict[str, str]
    ) -> None:
        """Start (or, resuming, reopen) the tracker runs; a server that cannot be used is an error now, not later.
        `previous`: the trackers' ids of the run being resumed (its manifest.json)."""
        self.loggers = [csv_logger(directory / runs.METRICS)]
        for name in self.names:
            if name == "mlflow":
                from project.infra.mlflow_logger import MLflowLogger

                self.mlflow = MLflowLogger(self.mlflow_worker, directory)
                self.mlflow.open_run(args.exp_name, directory.name, tags, previous.get("mlflow"))
                self.loggers.append(self.mlflow)
            elif name == "tensorboard":
                from lightning.pytorch.loggers import TensorBoardLogger

                self.loggers.append(TensorBoardLogger(save_dir=str(directory), name="tensorboard", version="",
                                                      default_hp_metric=False))  # fmt: skip
            elif name == "wandb":
                self.loggers.append(wandb_logger(directory, args.exp_name, tags, previous.get("wandb")))

    def start(self, params: dict[str, Any]) -> None:
        """The run's configuration, user and command line as every tracker's hyperparameters (already redacted)."""
        if self.mlflow is not None:
            self.mlflow.mark_running()
        for logger in self.loggers:
            logger.log_hyperparams(params)

    def log_model(self, checkpoint: Path) -> None:
        if self.mlflow is not None:
            self.mlflow.log_model(checkpoint)

    def finish(self, directory: Path, files: list[Path], scores: dict[str, Any] | None) -> None:
        """Copies of the run's records (plots, config, reports) for each tracker; TensorBoard gets the plots as images
        and the hyperparameters beside the test scores (its HPARAMS tab)."""
        files = [path for path in files if path.is_file()]
        for logger in self.loggers:
            kind = type(logger).__name__
            if logger is self.mlflow:
                logger.log_files(files)
            elif kind == "WandbLogger":
                for path in files:
                    logger.experiment.save(str(path), base_path=str(directory), policy="now")
            elif kind == "TensorBoardLogger":
                tensorboard_summary(logger, directory, files, scores)

    def close(self, manifest: Path, status: str) -> list[str]:
        """End the tracker runs with a status ("finished", "interrupted", "failed: ..."); returns what went wrong."""
        problems = []
        for logger in self.loggers:
            if logger is self.mlflow:
                logger.log_files([manifest])
                ended = {"finished": "FINISHED", "interrupted": "KILLED", "pruned": "KILLED"}.get(status, "FAILED")
                problem = logger.close(ended, CLOSE_SECONDS)
                problems += [problem] if problem else []
            elif type(logger).__name__ == "WandbLogger":
                with contextlib.suppress(Exception):  # W&B keeps its own offline copy when its service fails
                    logger.experiment.finish(exit_code=0 if status == "finished" else 1)
            else:
                logger.finalize("success" if status == "finished" else "failed")
        return problems

    def abandon(self) -> None:
        """The run never started: end the tracker runs this command opened, without marking anything."""
        if self.mlflow is not None:
            self.mlflow.abandon()
        elif self.mlflow_worker is not None:
            self.mlflow_worker.stop()

    def describe(self) -> dict[str, Any]:
        """What manifest.json keeps about each tracker run: enough to find it again and to resume it."""
        found: dict[str, Any] = {}
        for logger in self.loggers:
            kind = type(logger).__name__
            if logger is self.mlflow:
                found["mlflow"] = logger.describe()
            elif kind == "WandbLogger":
                found["wandb"] = {
                    "id": logger.version,
                    "project": logger.name,
                    "url": getattr(logger.experiment, "url", None),
                }
            elif kind == "TensorBoardLogger":
                found["tensorboard"] = {"log_dir": logger.log_dir}
        return found

    def how_to_open(self) -> list[str]:
        """One line per tracker: the command or address that shows this run."""
        lines = []
        for logger in self.loggers:
            kind = type(logger).__name__
            if logger is self.mlflow:
                lines.append(logger.how_to_open())
            elif kind == "TensorBoardLogger":
                lines.append(f"tensorboard --logdir {logger.log_dir}")
            elif kind == "WandbLogger":
                url = getattr(logger.experiment, "url", None)
                lines.append(url or f"wandb sync {Path(logger.experiment.dir).parent}  (an offline run: uploads it)")
        return lines


def tensorboard_summary(logger: Any, directory: Path, files: list[Path], scores: dict[str, Any] | None) -> None:
    import numpy as np
    import yaml
    from PIL import Image

    config = yaml.safe_load((directory / runs.CONFIG).read_text()) or {}
    results = {
        f"hparams/test_{k}": float(scores[k]) for k in ("acc", "f1", "loss") if scores and scores.get(k) is not None
    }
    logger.log_hyperparams({k: v if isinstance(v, (int, float, str, bool)) else str(v) for k, v in config.items()},
                           results)  # fmt: skip
    for path in files:
        if path.suffix == ".png":
            with Image.open(path) as image:
                logger.experiment.add_image(path.stem, np.asarray(image.convert("RGB")), dataformats="HWC")
    logger.experiment.flush()


def csv_logger(path: Path) -> Any:
    """The logger that writes metrics.csv (its class is defined on first use: importing this module stays cheap)."""
    from lightning.pytorch.loggers import Logger
    from lightning.pytorch.utilities import rank_zero_only

    class AppendingCsvLogger(Logger):
        """metrics.csv: one row per logged step, a column per metric. Ours, not Lightning's CSVLogger, which deletes
        an existing metrics.csv when it starts: a resumed run keeps the rows of its earlier sessions."""

        def __init__(self) -> None:
            super().__init__()
            self.path = path
            self.columns: list[str] = []
            with contextlib.suppress(OSError), open(path, newline="") as file:
                self.columns = next(csv.reader(file), [])

        @property
        def name(self) -> str:
            return "csv"

        @property
        def version(self) -> str:
            return ""

        @rank_zero_only
        def log_hyperparams(self, params: Any, *args: Any, **kwargs: Any) -> None:
            pass  # config.yaml holds them

        @rank_zero_only
        def log_metrics(self, metrics: Mapping[str, Any], step: int | None = None) -> None:
            row = {"step": step, **{k: v if isinstance(v, (int, float)) else float(v) for k, v in metrics.items()}}
            if set(row) - set(self.columns):  # a new column: rewrite the file with the wider header, atomically
                from project.infra.files import write_text

                rows = []
                with contextlib.suppress(OSError), open(self.path, newline="") as file:
                    rows = list(csv.DictReader(file))
                self.columns = ["step", *sorted((set(self.columns) | set(row)) - {"step"})]
                write_text(self.path, to_csv(self.columns, [*rows, row]))
                return
            with open(self.path, "a", newline="") as file:  # flushed at every call: a crash loses no logged value
                csv.DictWriter(file, fieldnames=self.columns).writerow(row)

    return AppendingCsvLogger()


def to_csv(columns: list[str], rows: list[dict[str, Any]]) -> str:
    import io

    text = io.StringIO()
    writer = csv.DictWriter(text, fieldnames=columns)
    writer.writeheader()
    writer.writerows(rows)
    return text.getvalue()


def wandb_logger(directory: Path, experiment: str, tags: dict[str, str], previous: Mapping[str, Any] | None) -> Any:
    from lightning.pytorch.loggers import WandbLogger

    run_id = (previous or {}).get("id")
    # W&B honours WANDB_MODE=offline (files under <run>/wandb; `wandb sync` uploads them later).
    labels = [f"{k}={v}"[:64] for k, v in tags.items()]  # W&B tags are short labels
    logger = WandbLogger(project=experiment, name=directory.name, save_dir=str(directory), id=run_id,
                         resume="allow" if run_id else None, tags=labels)  # fmt: skip
    # wandb.init now, so that its run id goes into manifest.json. W&B records sys.argv with the run: it sees the
    # command line with its secrets redacted, as every other record does.
    argv = sys.argv
    sys.argv = [argv[0], *redact_argv(argv[1:])]
    try:
        _ = logger.experiment
    finally:
        sys.argv = argv
    return logger
