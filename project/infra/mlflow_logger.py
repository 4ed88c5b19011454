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
import threading
import time
import warnings
from collections.abc import Iterable, Mapping
from pathlib import Path
from typing import Any

from lightning.pytorch.loggers import Logger
from lightning.pytorch.utilities import rank_zero_only

from project.infra.errors import UserError
from project.infra.mlflow_worker import MLflowWorkerClient, WorkerGone
from project.infra.redact import scrub

OPEN_SECONDS = 120.0  # the worker's first answer: a cold start imports MLflow and may create the store
CLOSE_SECONDS = 45.0  # the end of a run waits this long for queued calls (a slow server), then gives up
EXIT_SECONDS = 10.0  # for the worker to exit once it has answered "end"
ABANDON_SECONDS = 15.0
# What Lightning's MLFlowLogger keeps in a metric name (MLflow refuses other characters); the rest is dropped.
NOT_IN_A_NAME = re.compile(r"[^a-zA-Z0-9_/. -]+")


class MLflowLogger(Logger):
    """A Lightning logger for one MLflow run, opened by `open_run` (not by Lightning: a server that cannot
    be used must be an error before training). Only global rank 0 should make one."""

    def __init__(self, client: MLflowWorkerClient, run_dir: Path | str | None = None) -> None:
        super().__init__()
        self.client = client
        self.run_dir = Path(run_dir) if run_dir is not None else None
        self.experiment_name = ""
        self.experiment_id: str | None = None
        self.run_id: str | None = None
        self.closed = False
        self._warned = threading.Lock()  # the failure's one warning line, whichever thread sees it first
        self._warned_once = False

    # Lightning's Logger API

    @property
    def name(self) -> str:
        return self.experiment_name

    @property
    def version(self) -> str | None:
        return self.run_id

    @rank_zero_only
    def log_hyperparams(self, params: Mapping[str, Any] | argparse.Namespace, *args: Any, **kwargs: Any) -> None:
        """Nested dicts become `a/b` keys; values are str()-ed (MLflow truncates nothing itself: the worker
        cuts them at MLflow's limit). On a resumed run, a param logged before with another value becomes the
        tag `resumed.<key>`."""
        self.client.send("params", params=flatten_params(params))

    @rank_zero_only
    def log_metrics(self, metrics: Mapping[str, Any], step: int | None = None) -> None:
        """Queued for the worker: returns at once whatever the server is doing."""
        values = {}
        for key, value in metrics.items():
            try:
                values[metric_name(key)] = float(value)
            except (TypeError, ValueError):  # a string: MLflow keeps numbers only (Lightning drops them too)
                continue
        if values:
            self.client.send("metrics", metrics=values, step=int(step or 0), timestamp=int(time.time() * 1000))

    def finalize(self, status: str) -> None:
        # Lightning calls this after fit and again after test; the run goes on (test, reports), so its
        # status is set once, by close(), when the whole run has ended.
        pass

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
        resume_id = None
        if resume and resume.get("tracking_uri") == uri and resume.get("run_id"):
            resume_id = resume["run_id"]
        elif resume:
            print(f"warning: the resumed run was tracked at {resume.get('tracking_uri')}, not {uri}: "
                  "its metrics go to a new MLflow run", file=sys.stderr)  # fmt: skip
        self.experiment_name = experiment
        try:
            reply = self.client.call("open", timeout, experiment=experiment, run_name=run_name, tags=dict(tags),
                                     resume_run_id=resume_id, source=sys.argv[0])  # fmt: skip
        except (TimeoutError, WorkerGone) as error:
            self.client.kill()
            raise UserError(self._cannot_use(str(error))) from None
        if not reply["ok"]:
            self.client.stop(EXIT_SECONDS)
            raise UserError(self._cannot_use(reply["error"]))
        self.experiment_id, self.run_id = reply["experiment_id"], reply["run_id"]
        if reply.get("warning"):
            print(f"warning: {reply['warning']}", file=sys.stderr)
        self.client.on_failure = self._warn
        self.client.on_problem = lambda problem: print(f"warning: MLflow: {problem}", file=sys.stderr, flush=True)
        if self.client.failure:  # failed between the reply and now
            self._warn(self.client.failure)

    def mark_running(self) -> None:
        """Training starts now: a reopened run is marked RUNNING and gets what was logged since open_run."""
        self.client.send("running")

    def log_files(self, paths: Iterable[Path | str]) -> None:
        """Copies of the run's records as the run's artifacts (files that do not exist are skipped)."""
        self.client.send("files", paths=[str(Path(path).resolve()) for path in paths])

    def log_model(self, checkpoint: Path | str, name: str = "model") -> None:
        """The network of `checkpoint` as an MLflow model (`models:/...`, shown under the run's Logged
        models): raw pixels (N, C, H, W) float32 in, logits out; its metadata["project"] holds the class
        names, input shape and pixel range. Sent now, done by the worker while this process tests."""
        self.client.send("model", checkpoint=str(Path(checkpoint).resolve()), name=name)

    def close(self, status: str, timeout: float = CLOSE_SECONDS) -> str | None:
        """Wait (at most `timeout` s) for the queued calls, set the run's status (FINISHED, FAILED or
        KILLED), and end the worker. Returns what went wrong, as one line, or None."""
        if not self.closed:
            self.closed = True
            self._end(timeout, status=status)
        if self.client.failure:
            return f"MLflow: records stop where the server stopped answering ({self.client.failure})"
        if self.client.problems:
            return f"MLflow: {self.client.problems[0]}"
        return None

    def abandon(self) -> None:
        """The run never started: a new MLflow run is deleted (MLflow keeps it restorable), a reopened one
        is left exactly as it was; the worker ends."""
        if not self.closed:
            self.closed = True
            self._end(ABANDON_SECONDS, status="FAILED", abandon=True)

    def describe(self) -> dict[str, Any]:
        """What manifest.json keeps: enough to find the run again and to resume it."""
        found = {
            "tracking_uri": scrub(self.client.tracking_uri),
            "experiment_id": self.experiment_id,
            "run_id": self.run_id,
            "complete": self.client.failure is None and not self.client.problems,
        }
        if self.client.model_uri:
            found["model_uri"] = self.client.model_uri
        return found

    def how_to_open(self) -> str:
        """The command or address that shows this run."""
        page = f"#/experiments/{self.experiment_id}/runs/{self.run_id}"
        uri = scrub(self.client.tracking_uri)
        if uri.startswith("sqlite:"):
            return f"mlflow ui --backend-store-uri {uri}   then open http://127.0.0.1:5000/{page}"
        return f"{uri.rstrip('/')}/{page}"

    # Helpers

    def _end(self, timeout: float, **fields: Any) -> None:
        if self.run_id is None:
            self.client.stop(EXIT_SECONDS)
            return
        try:
            self.client.call("end", timeout, **fields)
        except TimeoutError:
            self.client.fail(f"no answer for {timeout:.0f} s")
            self.client.kill()
        except WorkerGone:  # its reason is the client's failure
            self.client.stop(EXIT_SECONDS)
        else:
            self.client.release()  # everything is recorded: its exit is nobody's wait

    def _warn(self, reason: str) -> None:
        with self._warned:
            if self._warned_once:
                return
            self._warned_once = True
        where = f"{self.run_dir} keeps" if self.run_dir else "the run directory keeps"
        print(f"warning: MLflow stopped answering ({reason}); training goes on without it, and {where} the "
              "complete records of this run", file=sys.stderr, flush=True)  # fmt: skip

    def _cannot_use(self, reason: str) -> str:
        uri = scrub(self.client.tracking_uri)
        if uri.startswith("sqlite:") and not os.environ.get("MLFLOW_TRACKING_URI"):
            advice = "check --exp-dir, or choose another --logger"
        else:
            advice = "start the server or fix MLFLOW_TRACKING_URI, or choose another --logger"
        return f"MLflow at {uri} cannot be used ({reason}): {advice}"


def flatten_params(params: Mapping[str, Any] | argparse.Namespace, prefix: str = "") -> dict[str, str]:
    """{"a": {"b": 1}} -> {"a/b": "1"} (Lightning's separator), keys made acceptable to MLflow."""
    if isinstance(params, argparse.Namespace):
        params = vars(params)
    flat: dict[str, str] = {}
    for key, value in params.items():
        name = metric_name(f"{prefix}/{key}" if prefix else str(key))
        if isinstance(value, argparse.Namespace):
            value = vars(value)
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
