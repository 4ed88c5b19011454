"""The MLflow tracker as a Lightning logger, its work done by the worker process (mlflow_worker.py).

    client = MLflowWorkerClient.start(uri, artifact_root)      # early: before Lightning is imported
    logger = MLflowLogger(client, run_dir)
    logger.open_run(experiment, run_name, tags, resume)        # waits: a store that cannot be used is a UserError
    logger.mark_running()                                      # right before fit: a resumed run changes from here
    ...Trainer(logger=[..., logger]).fit(...)                  # log_hyperparams / log_metrics: never wait
    logger.log_model(best_checkpoint)                          # right after fit: overlaps the test and the reports
    logger.log_files(paths)
    problem = logger.close("FINISHED", timeout)                # or "FAILED", "KILLED"; abandon() if never started
    manifest["trackers"]["mlflow"] = logger.describe()

A server that stops answering mid-run costs one warning line; training goes on, later calls are dropped,
`describe()["complete"]` is False and `close` returns the problem as one line.
"""

from __future__ import annotations

import argparse
import os
import re
import sys
import time
import warnings
from collections.abc import Iterable, Mapping
from pathlib import Path
from typing import Any

from lightning.pytorch.loggers import Logger
from lightning.pytorch.utilities import rank_zero_only

from project.infra.errors import UserError
from project.infra.mlflow_worker import MLflowWorkerClient
from project.infra.redact import scrub

OPEN_SECONDS = 120.0  # the worker's first answer: a cold start imports MLflow and may create the store
ABANDON_SECONDS = 15.0
# What Lightning's MLFlowLogger keeps in a metric name (MLflow refuses other characters); the rest is dropped.
NOT_IN_A_NAME = re.compile(r"[^a-zA-Z0-9_/. -]+")


class MLflowLogger(Logger):
    """A Lightning logger for one MLflow run, opened by `open_run` (not by Lightning: a server that cannot
    be used must be an error before training). Only global rank 0 should make one."""

    def __init__(self, client: MLflowWorkerClient, run_dir: Path | str) -> None:
        super().__init__()
        self.client, self.run_dir = client, Path(run_dir)
        self.experiment_name = ""
        self.experiment_id: str | None = None
        self.run_id: str | None = None
        self.closed = False
        self.warned = False
        self.model_uri: str | None = None
        self.problem: str | None = None  # why the model was not logged (the rest of the run was)

    # Lightning's Logger API (its finalize, called after fit and again after test, does nothing: close() ends the run)

    @property
    def name(self) -> str:
        return self.experiment_name

    @property
    def version(self) -> str | None:
        return self.run_id

    @rank_zero_only
    def log_hyperparams(self, params: Mapping[str, Any] | argparse.Namespace, *args: Any, **kwargs: Any) -> None:
        """Nested dicts become `a/b` keys; values are str()-ed (the worker cuts them at MLflow's limit). On a
        resumed run, a param logged before with another value becomes the tag `resumed.<key>`."""
        self._send("params", params=flatten_params(params))

    @rank_zero_only
    def log_metrics(self, metrics: Mapping[str, Any], step: int | None = None) -> None:
        """Queued for the worker: returns at once whatever the server is doing. MLflow keeps numbers only."""
        values = {metric_name(key): float(value) for key, value in metrics.items() if not isinstance(value, str)}
        self._send("metrics", metrics=values, step=int(step or 0), timestamp=int(time.time() * 1000))

    # The run

    def open_run(
        self,
        experiment: str,
        run_name: str,
        tags: Mapping[str, str],
        resume: Mapping[str, Any] | None = None,
        timeout: float = OPEN_SECONDS,
    ) -> None:
        """Create the run in `experiment` (created if needed), or reopen `resume` (manifest.json's
        {"tracking_uri", "experiment_id", "run_id"} of the run being resumed) if it is at the same URI and
        still there; otherwise warn once and start a new one. A reopened run is not changed until
        `mark_running`. Raises UserError (one line) when the store or server cannot be used."""
        uri = scrub(self.client.tracking_uri)
        resume_id = resume.get("run_id") if resume and resume.get("tracking_uri") == uri else None
        if resume and not resume_id:
            print(f"warning: the resumed run was tracked at {resume.get('tracking_uri')}, not {uri}: "
                  "its metrics go to a new MLflow run", file=sys.stderr)  # fmt: skip
        self.experiment_name = experiment
        reply = self.client.call("open", timeout, experiment=experiment, run_name=run_name, tags=dict(tags),
                                 resume_run_id=resume_id, source=sys.argv[0])  # fmt: skip
        if not reply["ok"]:
            self.client.stop()
            if uri.startswith("sqlite:") and not os.environ.get("MLFLOW_TRACKING_URI"):
                advice = "check --exp-dir"
            else:
                advice = "start the server or fix MLFLOW_TRACKING_URI"
            raise UserError(f"MLflow at {uri} cannot be used ({reply['error']}): {advice}, or choose another --logger")
        self.experiment_id, self.run_id = reply["experiment_id"], reply["run_id"]
        if reply["warning"]:
            print(f"warning: {reply['warning']}", file=sys.stderr)

    def mark_running(self) -> None:
        """Training starts now: a reopened run is marked RUNNING and gets what was logged since open_run."""
        self._send("running")

    def log_files(self, paths: Iterable[Path | str]) -> None:
        """Copies of the run's records as the run's artifacts (files that do not exist are skipped)."""
        self._send("files", paths=[str(Path(path).resolve()) for path in paths])

    def log_model(self, checkpoint: Path | str, name: str = "model") -> None:
        """The network of `checkpoint` as an MLflow model (`models:/...`, shown under the run's Logged
        models): raw pixels (N, C, H, W) float32 in, logits out; its metadata["project"] holds the class
        names, input shape and pixel range. Sent now, done by the worker while this process tests."""
        self._send("model", checkpoint=str(Path(checkpoint).resolve()), name=name)

    def close(self, status: str, timeout: float) -> str | None:
        """Wait (at most `timeout` s) for the queued calls, set the run's status (FINISHED, FAILED or
        KILLED); the worker then ends. Returns what went wrong, as one line, or None."""
        self._end(timeout, status=status)
        self._warn_if_failed()
        if self.client.failure:
            return f"MLflow: records stop where the server stopped answering ({self.client.failure})"
        return f"MLflow: {self.problem}" if self.problem else None

    def abandon(self) -> None:
        """The run never started: a new MLflow run is deleted (MLflow keeps it restorable), a reopened one
        is left exactly as it was; the worker ends."""
        self._end(ABANDON_SECONDS, abandon=True)

    def describe(self) -> dict[str, Any]:
        """What manifest.json keeps: enough to find the run again and to resume it."""
        found = {
            "tracking_uri": scrub(self.client.tracking_uri),
            "experiment_id": self.experiment_id,
            "run_id": self.run_id,
            "complete": self.client.failure is None and self.problem is None,
        }
        return found | ({"model_uri": self.model_uri} if self.model_uri else {})

    def how_to_open(self) -> str:
        """The command or address that shows this run."""
        page = f"#/experiments/{self.experiment_id}/runs/{self.run_id}"
        uri = scrub(self.client.tracking_uri)
        if uri.startswith("sqlite:"):
            return f"mlflow ui --backend-store-uri {uri}   then open http://127.0.0.1:5000/{page}"
        return f"{uri.rstrip('/')}/{page}"

    def _end(self, timeout: float, **fields: Any) -> None:
        if self.closed or self.run_id is None:  # once; a run that could not be opened has no worker left
            return
        self.closed = True
        reply = self.client.call("end", timeout, **fields)
        self.model_uri, self.problem = reply.get("model_uri"), reply.get("problem")

    def _send(self, op: str, **fields: Any) -> None:
        self._warn_if_failed()
        self.client.send(op, **fields)

    def _warn_if_failed(self) -> None:
        """The first failure as one warning line, printed by the training thread at its next call (not by the
        client's reader thread, which would write into whatever this process is printing)."""
        if self.client.failure and not self.warned:
            self.warned = True
            print(f"warning: MLflow stopped answering ({self.client.failure}); training goes on without it, and "
                  f"{self.run_dir} keeps the complete records of this run", file=sys.stderr, flush=True)  # fmt: skip


def flatten_params(params: Mapping[str, Any] | argparse.Namespace, prefix: str = "") -> dict[str, str]:
    """{"a": {"b": 1}} -> {"a/b": "1"} (Lightning's separator), keys made acceptable to MLflow."""
    flat: dict[str, str] = {}
    for key, value in (vars(params) if isinstance(params, argparse.Namespace) else params).items():
        name = metric_name(f"{prefix}/{key}" if prefix else str(key))
        if isinstance(value, Mapping) and value:
            flat.update(flatten_params(value, name))
        else:
            flat[name] = str(value)
    return flat


def metric_name(key: str) -> str:
    """`key` as MLflow takes it: Lightning's character rule, and no empty, '.' or '..' path parts (MLflow
    refuses a name that a file path would change)."""
    cleaned = NOT_IN_A_NAME.sub("", key)
    if cleaned != key:
        warnings.warn(f"MLflow takes only letters, digits, '_', '/', '.', '-' and ' ' in names: {key!r} is logged "
                      f"as {cleaned!r}", RuntimeWarning, stacklevel=3)  # fmt: skip
    parts = [part for part in cleaned.split("/") if part not in ("", ".", "..")]
    return "/".join(parts) or "unnamed"
