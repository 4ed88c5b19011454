"""Where a run's records go: its run directory, the experiment trackers, checkpoints and the report."""

from __future__ import annotations

import argparse
import json
import os
import secrets
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import yaml

from project.checkpoints import CHECKPOINT_DIR, LAST, best_in, experiment_dir
from project.errors import UserError


def new_run_id() -> str:
    """A timestamp that sorts, plus a random suffix: two runs started in the same second differ."""
    return time.strftime("%Y%m%d-%H%M%S") + "-" + secrets.token_hex(3)


@dataclass
class Run:
    directory: Path
    loggers: list[Any] = field(default_factory=list)
    callbacks: list[Any] = field(default_factory=list)

    def best_checkpoint(self) -> Path | None:
        return best_in(self.directory)

    def finish(self, trainer: Any, solver: Any, datamodule: Any, tested: Path | None) -> None:
        from project.metrics import format_report, summarize

        if not trainer.is_global_zero or solver.test_confusion is None:
            return
        scores = summarize(solver.test_confusion)
        report = format_report(solver.test_confusion, datamodule.class_names)
        (self.directory / "test_report.txt").write_text(report + "\n")
        (self.directory / "test_metrics.json").write_text(
            json.dumps({**scores, "checkpoint": str(tested) if tested else None}, indent=2) + "\n"
        )
        print(report)
        print(f"\nRun directory: {self.directory}")
        print(f"Test accuracy: {scores['acc']:.4f}")


def open_run(args: argparse.Namespace, config: dict[str, Any], resume_from: Path | None = None) -> Run:
    from lightning.pytorch.callbacks import ModelCheckpoint

    if resume_from is not None and resume_from.parent.name == CHECKPOINT_DIR:
        directory = resume_from.parent.parent
    else:
        directory = _create_run_dir(experiment_dir(args))
    (directory / "config.yaml").write_text(yaml.safe_dump(config, sort_keys=True))
    checkpoint_dir = directory / CHECKPOINT_DIR
    mode = "min" if "loss" in args.monitor else "max"
    callbacks = [
        ModelCheckpoint(
            dirpath=checkpoint_dir,
            filename="best-epoch{epoch:03d}",
            monitor=args.monitor,
            mode=mode,
            save_top_k=1,
            auto_insert_metric_name=False,
        ),
        ModelCheckpoint(
            dirpath=checkpoint_dir,
            filename=LAST.removesuffix(".ckpt"),
            save_top_k=1,
            enable_version_counter=False,
        ),
    ]
    return Run(directory=directory, loggers=_loggers(args, directory), callbacks=callbacks)


def _create_run_dir(parent: Path) -> Path:
    try:
        parent.mkdir(parents=True, exist_ok=True)
        directory = parent / new_run_id()
        directory.mkdir()
    except OSError as error:
        raise UserError(f"--exp-dir: cannot create a run directory in {parent}: {error.strerror}") from error
    return directory


def _loggers(args: argparse.Namespace, directory: Path) -> list[Any]:
    from lightning.pytorch.loggers import CSVLogger

    loggers: list[Any] = [CSVLogger(save_dir=str(directory), name="", version="")]
    for name in dict.fromkeys(args.logger):
        if name == "mlflow":
            from lightning.pytorch.loggers import MLFlowLogger

            exp_dir = Path(args.exp_dir).expanduser().resolve()
            uri = os.environ.get("MLFLOW_TRACKING_URI") or f"sqlite:///{exp_dir / 'mlflow.db'}"
            loggers.append(
                MLFlowLogger(
                    experiment_name=args.exp_name,
                    run_name=directory.name,
                    tracking_uri=uri,
                    artifact_location=str(exp_dir / "mlflow-artifacts"),
                )
            )
        elif name == "tensorboard":
            from lightning.pytorch.loggers import TensorBoardLogger

            loggers.append(TensorBoardLogger(save_dir=str(directory), name="tensorboard", version=""))
    return loggers
