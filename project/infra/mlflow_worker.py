"""MLflow in a process of its own, so that a run pays (almost) nothing for its default tracker.

Importing MLflow (~1.3 s) and opening its store (0.8 s, 2 s for a new one) would add seconds to every run;
threads cannot hide them (the GIL), but a second process can: started before the training process imports
Lightning (~5 s), the worker imports MLflow and opens the store on another core, then pre-imports what
logging the model needs (torch, torch.export: ~5 CPU seconds). During training the calls cross a pipe
(microseconds each), and a slow or dead server stalls the worker, never a training step. What is left
is CPU: on a 2-core machine the model's preparation competes with training (benchmarks/tracker_cost.py).

Two halves, one file (the protocol stays in one place):
- `MLflowWorkerClient`, the training process's side: starts the worker and sends it requests. It
  imports nothing heavy (no mlflow, torch or lightning): subprocess, json and threading only.
- the worker, `python -m project.infra.mlflow_worker`: reads JSON lines on stdin (requests), writes
  JSON lines on stdout (replies and events), and makes the MLflow calls, in order.

Requests: {"op": "connect" | "open" | "running" | "params" | "metrics" | "files" | "model" | "end", ...};
"open" and "end" carry an "id" and get a reply {"re": id, "ok": bool, ...}. Events: {"event": "failed",
"error"} (the first call that failed: every later call is dropped), {"event": "problem", "error"} (the
model could not be logged; the rest goes on), {"event": "model", "model_uri"}, {"event": "timing", "step",
"seconds"} (when each step of the worker was done: what the benchmarks read).

The worker ignores SIGINT and SIGTERM: a Ctrl-C or a scheduler's SIGTERM reaches the whole process group,
and it is the training process that decides how the run ends (its "end" request). If its stdin closes
without an "end" (the training process died, even by SIGKILL), it logs what is queued and marks the run
FAILED. Its stderr (MLflow's INFO chatter, warnings) is kept by the client, never shown: a failure
reaches the user as one line through the protocol, with the worker's last words if it crashed.
"""

from __future__ import annotations

import collections
import contextlib
import json
import os
import queue
import re
import signal
import subprocess
import sys
import threading
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

# MLflow's client retries a dead server for minutes by default; a run only needs to find out that the
# server is gone. Set in the worker's environment only if the user has not set them.
HTTP_DEFAULTS = {
    "MLFLOW_HTTP_REQUEST_MAX_RETRIES": "2",
    "MLFLOW_HTTP_REQUEST_BACKOFF_FACTOR": "1",
    "MLFLOW_HTTP_REQUEST_TIMEOUT": "10",
}
PROJECT_ROOT = Path(__file__).resolve().parents[2]  # on the worker's path: it runs this very code
STDERR_LINES = 40  # the worker's last words, kept for the reason of a crash
LOCK_SECONDS = 300.0  # how long a run waits for another that is creating the same local store
EXIT_SECONDS = 60  # the worker's exit after its last answer (SIGALRM ends a teardown that hangs)
METRICS_PER_BATCH = 1000  # MLflow's limit for one log_batch
PARAMS_PER_BATCH = 100  # MLflow's limit for one log_batch
# Training's threads come first: a core taken from them in mid-step costs more than the worker's work
# (the threads of a parallel step wait for the slowest). The worker gets what training leaves.
NICE = 19
EXAMPLE_BATCH = 2  # torch.export makes a batch of 1 a constant: the example batch keeps the axis dynamic
EOF = object()  # the request queue's marker: stdin closed


class WorkerGone(Exception):
    """The worker process ended (or never answered); the message says why."""


# --- the training process's side -----------------------------------------------------------------------------


class MLflowWorkerClient:
    """The training process's handle on one worker. `start` it as early as possible (before importing
    Lightning); `call` waits for a reply, `send` does not. `failure` is the first reason tracking stopped
    (then `on_failure(reason)` is called once, from the reader thread); `problems` lists calls that failed
    without stopping it (the model)."""

    def __init__(self, process: subprocess.Popen, tracking_uri: str) -> None:
        self.process, self.tracking_uri = process, tracking_uri
        self.failure: str | None = None
        self.problems: list[str] = []
        self.model_uri: str | None = None
        self.timings: dict[str, float] = {}  # seconds since the worker started, when each step was done
        self.on_failure: Callable[[str], None] | None = None
        self.on_problem: Callable[[str], None] | None = None
        self.ending = False  # "end" was sent: the worker's exit is expected
        self._write_lock = threading.Lock()
        self._answered = threading.Condition()
        self._replies: dict[int, dict[str, Any]] = {}
        self._next_id = 0
        self._stderr: collections.deque[str] = collections.deque(maxlen=STDERR_LINES)
        self._readers = [
            threading.Thread(target=self._read_messages, name="mlflow-worker replies", daemon=True),
            threading.Thread(target=self._read_stderr, name="mlflow-worker stderr", daemon=True),
        ]
        for reader in self._readers:
            reader.start()

    @classmethod
    def start(
        cls, tracking_uri: str, artifact_root: str | None = None, prepare_model: bool = True
    ) -> MLflowWorkerClient:
        """Start a worker for `tracking_uri` (a local `sqlite:///...` store or a server). A new experiment
        keeps its artifacts in `artifact_root/<experiment>` (None: where the server or MLflow decides).
        `prepare_model`: once the store is open, import what log_model needs (a few CPU seconds, while this
        process imports Lightning); without it, log_model pays them itself.
        The URI goes through the pipe, not the command line, where other users could read a password."""
        env = dict(os.environ)
        for name, value in HTTP_DEFAULTS.items():
            env.setdefault(name, value)
        env["PYTHONPATH"] = os.pathsep.join(p for p in (str(PROJECT_ROOT), env.get("PYTHONPATH")) if p)
        env["CUDA_VISIBLE_DEVICES"] = ""  # the worker reads checkpoints on the CPU: no CUDA context, no GPU memory
        process = subprocess.Popen(
            [sys.executable, "-m", "project.infra.mlflow_worker"],
            stdin=subprocess.PIPE,
            stdout=subprocess.PIPE,
            stderr=subprocess.PIPE,
            env=env,
        )
        client = cls(process, tracking_uri)
        client.send("connect", tracking_uri=tracking_uri, artifact_root=artifact_root, prepare_model=prepare_model)
        return client

    def send(self, op: str, **fields: Any) -> None:
        """One request, not waited for. After a failure, requests other than "end" are dropped here."""
        if self.failure is not None and op != "end":
            return
        line = (json.dumps({"op": op, **fields}) + "\n").encode()
        with self._write_lock:
            try:
                # The worker drains its stdin on a thread of its own: this write never waits for MLflow.
                self.process.stdin.write(line)
                self.process.stdin.flush()
            except (OSError, ValueError):  # the worker is gone (BrokenPipeError), or stdin was closed
                self.fail(f"its process ended ({self.last_words()})")

    def call(self, op: str, timeout: float, **fields: Any) -> dict[str, Any]:
        """Send a request and wait for its reply. Raises TimeoutError, or WorkerGone if the worker ends."""
        with self._answered:
            self._next_id += 1
            request_id = self._next_id
        self.send(op, id=request_id, **fields)
        deadline = time.monotonic() + timeout
        with self._answered:
            while request_id not in self._replies:
                if self.process.poll() is not None and not self._readers[0].is_alive():
                    raise WorkerGone(self.failure or f"its process ended ({self.last_words()})")
                left = deadline - time.monotonic()
                if left <= 0:
                    raise TimeoutError(f"no answer in {timeout:.0f} s")
                self._answered.wait(min(left, 1.0))
            return self._replies.pop(request_id)

    def stop(self, timeout: float = 10.0) -> None:
        """Close the worker's stdin and wait for it to exit; kill it after `timeout`. A worker that had
        no run just exits; one with a run that was not ended marks it FAILED first."""
        self.ending = True
        with self._write_lock, contextlib.suppress(OSError, ValueError):
            self.process.stdin.close()
        try:
            self.process.wait(timeout)
        except subprocess.TimeoutExpired:
            self.kill()
        for reader in self._readers:
            reader.join(timeout=2)

    def release(self) -> None:
        """After the worker's last answer: close its stdin and let it exit on its own. Its interpreter's
        teardown (about 2 s once torch is loaded) then overlaps this process's instead of adding to it."""
        self.ending = True
        with self._write_lock, contextlib.suppress(OSError, ValueError):
            self.process.stdin.close()

    def kill(self) -> None:
        """End the worker now (SIGKILL: it ignores SIGTERM)."""
        self.ending = True
        with contextlib.suppress(OSError):
            self.process.kill()
        self.process.wait()

    def last_words(self) -> str:
        """The worker's last line on stderr (a crash's reason), or its exit status."""
        lines = [line for line in self._stderr if line.strip()]
        if lines:
            return lines[-1].strip()[:300]
        code = self.process.poll()
        return "no answer" if code is None else f"exit status {code}"

    def fail(self, reason: str) -> None:
        if self.failure is None:
            self.failure = reason
            if self.on_failure is not None:
                self.on_failure(reason)

    def _read_messages(self) -> None:
        for line in self.process.stdout:
            try:
                message = json.loads(line)
            except ValueError:
                continue  # not the protocol's (the worker sends stray output to stderr; this is a safeguard)
            if "re" in message:
                with self._answered:
                    self._replies[message["re"]] = message
                    self._answered.notify_all()
            elif message.get("event") == "failed":
                self.fail(message["error"])
            elif message.get("event") == "problem":
                self.problems.append(message["error"])
                if self.on_problem is not None:
                    self.on_problem(message["error"])
            elif message.get("event") == "model":
                self.model_uri = message["model_uri"]
            elif message.get("event") == "timing":
                self.timings[message["step"]] = message["seconds"]
        self.process.wait()
        if not self.ending:
            self.fail(f"its process ended ({self.last_words()})")
        with self._answered:
            self._answered.notify_all()

    def _read_stderr(self) -> None:
        for line in self.process.stderr:
            self._stderr.append(line.decode(errors="replace"))


# --- the worker ------------------------------------------------------------------------------------------------


def main() -> int:
    # First: a Ctrl-C or SIGTERM for the process group must not end the worker before the run is recorded.
    signal.signal(signal.SIGINT, signal.SIG_IGN)
    signal.signal(signal.SIGTERM, signal.SIG_IGN)
    with contextlib.suppress(OSError, AttributeError):  # not on Windows
        os.nice(NICE)
    # The protocol gets the real stdout; anything else that prints (MLflow does) goes to stderr.
    replies = os.fdopen(os.dup(sys.stdout.fileno()), "w", buffering=1)
    os.dup2(sys.stderr.fileno(), sys.stdout.fileno())
    requests: queue.SimpleQueue = queue.SimpleQueue()
    threading.Thread(target=_read_requests, args=(sys.stdin.buffer, requests), daemon=True).start()
    code = Worker(replies).serve(requests)
    if hasattr(signal, "alarm"):  # nobody waits for this exit: should the interpreter's teardown hang, end it
        signal.alarm(EXIT_SECONDS)
    return code


def _read_requests(stream: Any, requests: queue.SimpleQueue) -> None:
    """Drain stdin as fast as the training process writes, whatever MLflow is waiting for."""
    for line in stream:
        with contextlib.suppress(ValueError):
            requests.put(json.loads(line))
    requests.put(EOF)


class Worker:
    """The MLflow side: one run, its calls made in order. The first failing call ends tracking (later
    calls are dropped); a resumed run is left untouched until "running" (training really started)."""

    def __init__(self, replies: Any) -> None:
        self.replies = replies
        self.emitting = threading.Lock()
        self.client: Any = None
        self.uri = ""
        self.artifact_root: str | None = None
        self.connect_error: str | None = None
        self.run_id: str | None = None
        self.experiment_id: str | None = None
        self.failure: str | None = None
        self.held: list[dict[str, Any]] | None = None  # a resumed run's calls, until "running"
        self.params: dict[str, str] = {}  # what the run holds: MLflow refuses to change a param
        self.warm: threading.Thread | None = None
        self.warm_error: str | None = None
        self.next_request: dict[str, Any] | None = None  # taken from the queue while batching metrics
        self.started = time.perf_counter()

    def timing(self, step: str) -> None:
        self.emit(event="timing", step=step, seconds=round(time.perf_counter() - self.started, 3))

    # Protocol

    def emit(self, **message: Any) -> None:
        line = json.dumps(message) + "\n"
        # One line at a time (the warm-up thread reports too); if the training process is gone, nobody listens.
        with self.emitting, contextlib.suppress(OSError, ValueError):
            self.replies.write(line)

    def serve(self, requests: queue.SimpleQueue) -> int:
        self.quiet_and_import()
        while True:
            request = self.next_request or requests.get()
            self.next_request = None
            if request is EOF:
                self.parent_gone()
                return 0
            op = request.get("op")
            if op == "end":
                self.end(request)
                return 0
            if op == "connect":
                self.connect(request)
            elif op == "open":
                self.open(request)
            elif op == "running":
                self.running()
            elif op in ("params", "metrics", "files", "model"):
                if op == "metrics":
                    request = self.more_metrics(request, requests)
                self.log(request)

    def quiet_and_import(self) -> None:
        import logging

        try:
            import mlflow  # noqa: F401  (the slow part of starting: at once, before the first request is read)
        except Exception as error:  # a broken install: every request answers with it
            self.connect_error = f"cannot import mlflow: {_reason(error)}"
        self.timing("mlflow imported")
        for name in ("mlflow", "alembic", "sqlalchemy"):
            logging.getLogger(name).setLevel(logging.WARNING)

    # Requests

    def connect(self, request: dict[str, Any]) -> None:
        """Create the client and open the store now (a new local store gets its schema here), while the
        training process is still importing Lightning."""
        if self.connect_error:
            return
        self.uri, self.artifact_root = request["tracking_uri"], request.get("artifact_root")
        try:
            import mlflow

            mlflow.set_tracking_uri(self.uri)  # for log_model, which finds the store through MLflow's fluent API
            with self.store_lock():
                self.client = mlflow.MlflowClient(self.uri)
                self.client.search_experiments(max_results=1)
        except Exception as error:
            self.connect_error = _reason(error)
            return
        self.timing("store open")
        if not request.get("prepare_model", True):
            return
        self.warm = threading.Thread(target=self.warm_up, name="warm up log_model", daemon=True)
        self.warm.start()

    def open(self, request: dict[str, Any]) -> None:
        if self.connect_error:
            self.emit(re=request["id"], ok=False, error=self.connect_error)
            return
        try:
            warning = self.open_run(request)
        except Exception as error:
            self.emit(re=request["id"], ok=False, error=_reason(error))
            return
        self.emit(re=request["id"], ok=True, experiment_id=self.experiment_id, run_id=self.run_id,
                  resumed=self.held is not None, warning=warning)  # fmt: skip

    def open_run(self, request: dict[str, Any]) -> str | None:
        from mlflow.exceptions import MlflowException
        from mlflow.utils.mlflow_tags import MLFLOW_SOURCE_NAME, MLFLOW_SOURCE_TYPE, MLFLOW_USER

        resume_id, warning = request.get("resume_run_id"), None
        if resume_id:
            try:
                run = self.client.get_run(resume_id)
                found = run.info.lifecycle_stage != "deleted"
            except MlflowException as error:
                if error.error_code != "RESOURCE_DOES_NOT_EXIST":
                    raise
                found = False
            if found:  # the same run again: untouched until training starts ("running")
                self.run_id, self.experiment_id = resume_id, run.info.experiment_id
                self.params = dict(run.data.params)
                self.held = []
                return None
            warning = f"MLflow run {resume_id} is gone (deleted?); the resumed run's metrics go to a new MLflow run"
        experiment = request["experiment"]
        with self.store_lock():
            found = self.client.get_experiment_by_name(experiment)
            if found is not None and found.lifecycle_stage == "deleted":
                raise ValueError(
                    f"experiment {experiment!r} was deleted: restore it (mlflow experiments restore "
                    f"--experiment-id {found.experiment_id}) or choose another --exp-name"
                )
            if found is None:
                location = f"{self.artifact_root.rstrip('/')}/{experiment}" if self.artifact_root else None
                self.experiment_id = self.client.create_experiment(experiment, artifact_location=location)
            else:
                self.experiment_id = found.experiment_id
        tags = {MLFLOW_USER: _user(), MLFLOW_SOURCE_TYPE: "LOCAL", **dict(request.get("tags") or {})}
        if request.get("source"):
            tags[MLFLOW_SOURCE_NAME] = request["source"]
        run = self.client.create_run(self.experiment_id, run_name=request.get("run_name"), tags=_tags(tags))
        self.run_id = run.info.run_id
        return warning

    def running(self) -> None:
        """Training starts: a resumed run is marked RUNNING and gets the calls held for it."""
        if self.held is None or self.failure:
            return
        held, self.held = self.held, None
        try:
            self.client.update_run(self.run_id, status="RUNNING")
        except Exception as error:
            self.fail(error)
            return
        for request in held:
            self.log(request)

    def more_metrics(self, request: dict[str, Any], requests: queue.SimpleQueue) -> dict[str, Any]:
        """Metrics already queued behind this request go into the same log_batch (a backlog after a slow
        call costs one database transaction, not one per step)."""
        rows = [(request["metrics"], request["step"], request["timestamp"])]
        count = len(request["metrics"])
        while count < METRICS_PER_BATCH:
            try:
                following = requests.get_nowait()
            except queue.Empty:
                break
            if following is EOF or following.get("op") != "metrics":
                self.next_request = following
                break
            rows.append((following["metrics"], following["step"], following["timestamp"]))
            count += len(following["metrics"])
        return {"op": "metrics", "rows": rows}

    def log(self, request: dict[str, Any]) -> None:
        if self.failure or self.run_id is None:
            return
        if self.held is not None:
            self.held.append(request)
            return
        op = request["op"]
        if op == "model":
            self.log_model(request)
            return
        try:
            if op == "params":
                self.log_params(request["params"])
            elif op == "metrics":
                self.log_metrics(request["rows"])
            elif op == "files":
                for path in request["paths"]:
                    if os.path.isfile(path):
                        self.client.log_artifact(self.run_id, path)
        except Exception as error:
            self.fail(error)

    def log_params(self, values: dict[str, str]) -> None:
        from mlflow.entities import Param, RunTag
        from mlflow.utils.validation import MAX_PARAM_VAL_LENGTH, MAX_TAG_VAL_LENGTH

        values = {key: str(value)[:MAX_PARAM_VAL_LENGTH] for key, value in values.items()}
        new = [Param(key, value) for key, value in values.items() if key not in self.params]
        # MLflow refuses to change a logged param: a resumed run that runs with another value records it as a tag.
        changed = [
            RunTag(f"resumed.{key}", value[:MAX_TAG_VAL_LENGTH])
            for key, value in values.items()
            if self.params.get(key, value) != value
        ]
        self.params.update({param.key: param.value for param in new})
        for start in range(0, len(new), PARAMS_PER_BATCH):
            self.client.log_batch(self.run_id, params=new[start : start + PARAMS_PER_BATCH])
        for start in range(0, len(changed), PARAMS_PER_BATCH):
            self.client.log_batch(self.run_id, tags=changed[start : start + PARAMS_PER_BATCH])

    def log_metrics(self, rows: list[tuple[dict[str, float], int, int]]) -> None:
        from mlflow.entities import Metric

        metrics = [
            Metric(key, value, timestamp, step) for values, step, timestamp in rows for key, value in values.items()
        ]
        for start in range(0, len(metrics), METRICS_PER_BATCH):
            self.client.log_batch(self.run_id, metrics=metrics[start : start + METRICS_PER_BATCH])

    def log_model(self, request: dict[str, Any]) -> None:
        """The tested network as an MLflow model (torch.export's pt2 format, MLflow's default: loading it
        runs no pickle and needs neither this project nor Lightning), with its signature and an example."""
        started = time.perf_counter()
        if self.warm is not None:
            self.warm.join()
        try:
            if self.warm_error:
                raise RuntimeError(self.warm_error)
            info = self.save_model(request["checkpoint"], request.get("name") or "model")
        except Exception as error:
            from mlflow.exceptions import MlflowException

            if isinstance(error, (MlflowException, OSError)) and _unreachable(error):
                self.fail(error)  # the server is gone: the same as any other call
            else:
                self.emit(event="problem", error=f"the model was not logged ({_reason(error)})")
            return
        self.emit(event="model", model_uri=info.model_uri)
        self.timing("model logged")
        self.emit(event="timing", step="log_model seconds", seconds=round(time.perf_counter() - started, 3))

    def save_model(self, checkpoint: str, name: str) -> Any:
        import mlflow.pytorch
        import numpy as np
        import torch
        from mlflow.models import ModelSignature
        from mlflow.types import Schema, TensorSpec

        from project.infra.checkpoints import read_model

        network, spec = read_model(Path(checkpoint))  # weights only: a checkpoint may come from anyone
        shape, classes, pixel_max = spec["input_shape"], spec["class_names"], spec["pixel_max"]
        # Raw pixels, as the dataset gives them (the network standardises them itself).
        example = np.random.default_rng(0).uniform(0, pixel_max, (EXAMPLE_BATCH, *shape)).round().astype(np.float32)
        signature = ModelSignature(
            inputs=Schema([TensorSpec(np.dtype(np.float32), (-1, *shape))]),  # unnamed: predict takes an array
            outputs=Schema([TensorSpec(np.dtype(np.float32), (-1, len(classes)))]),
        )
        metadata = {
            "project": {
                "class_names": classes,
                "input_shape": shape,
                "pixel_max": pixel_max,
                "input": f"raw pixel values 0..{pixel_max:g} as float32, shape (N, {', '.join(map(str, shape))})",
                "output": "logits, one per class name; the highest is the prediction",
                "checkpoint": checkpoint,
            }
        }
        # MLflow files a logged model under the fluent API's current experiment (else "Default", in ./mlruns),
        # not its run's: name it.
        mlflow.set_experiment(experiment_id=self.experiment_id)
        with torch.no_grad():
            return mlflow.pytorch.log_model(
                network,
                name=name,
                run_id=self.run_id,
                input_example=example,
                signature=signature,
                metadata=metadata,
                serialization_format="pt2",
                # Explicit: inferring requirements starts a Python process that loads the model (seconds).
                pip_requirements=_requirements(),
                # Checked by our tests instead: it loads the model again and predicts (a second, here).
                validate_serving_input=False,
            )

    def warm_up(self) -> None:
        """While the training process imports Lightning, import what log_model needs and export a tiny
        network once (torch.export's first call loads much of torch's compiler): the model at the end of
        the run then takes a fraction of a second instead of several."""
        try:
            # mlflow.pytorch imports pytorch_lightning, if installed, for an autologging callback this
            # worker never uses (2 s); a None entry in sys.modules makes that import fail, which it allows.
            sys.modules.setdefault("pytorch_lightning", None)
            import torch

            torch.set_num_threads(1)  # a small network on one core; the others are training's
            import mlflow.pytorch  # noqa: F401

            import project.model  # noqa: F401

            tiny = torch.nn.Sequential(
                torch.nn.Conv2d(1, 2, 3, padding=1), torch.nn.BatchNorm2d(2), torch.nn.ReLU(), torch.nn.MaxPool2d(2),
                torch.nn.AdaptiveAvgPool2d(1), torch.nn.Flatten(), torch.nn.Linear(2, 2),
            ).eval()  # fmt: skip
            with torch.no_grad():
                dims = {0: torch.export.Dim.AUTO}
                torch.export.export(tiny, (torch.zeros(EXAMPLE_BATCH, 1, 4, 4),), dynamic_shapes=[dims])
            # log_model checks its requirements against what is installed: the first check reads every
            # installed package's file list (1.4 s here); made now, it is cached for log_model.
            from mlflow.utils.requirements_utils import warn_dependency_requirement_mismatches

            warn_dependency_requirement_mismatches(_requirements())
        except Exception as error:
            self.warm_error = _reason(error)
        self.timing("model prepared")

    def end(self, request: dict[str, Any]) -> None:
        """The run's status, once every earlier call is made. A resumed run whose training never started
        stays as it was; after a failure nothing more is sent (the server is gone)."""
        status = request.get("status", "FINISHED")
        if self.failure:
            self.emit(re=request["id"], ok=False, error=self.failure)
            return
        try:
            if request.get("abandon") and self.run_id and self.held is None:
                self.client.delete_run(self.run_id)  # a new run that never started: no trace (recoverable)
            elif self.run_id and self.held is None:
                self.client.set_terminated(self.run_id, status)
        except Exception as error:
            self.fail(error)
            self.emit(re=request["id"], ok=False, error=self.failure)
            return
        self.emit(re=request["id"], ok=True)
        self.timing("ended")

    def parent_gone(self) -> None:
        """stdin closed without "end": the training process died. Everything it sent before has been logged
        (the queue is in order); the run is marked FAILED. A resumed run that never started is left as it was."""
        if self.run_id is None or self.held is not None or self.failure:
            return
        with contextlib.suppress(Exception):
            self.client.set_terminated(self.run_id, "FAILED")

    # Helpers

    def fail(self, error: BaseException) -> None:
        if self.failure is None:
            self.failure = _reason(error)
            self.emit(event="failed", error=self.failure)

    @contextlib.contextmanager
    def store_lock(self) -> Any:
        """Two runs that start together must not both create the local SQLite store (MLflow's schema set-up
        races and one of them fails), nor the same experiment. A server needs no lock."""
        if not self.uri.startswith("sqlite:///"):
            yield
            return
        from filelock import FileLock, Timeout

        database = Path(self.uri[len("sqlite:///") :])
        database.parent.mkdir(parents=True, exist_ok=True)
        lock = FileLock(f"{database}.lock", timeout=LOCK_SECONDS)
        try:
            with lock:
                yield
        except Timeout as error:
            raise TimeoutError(f"{lock.lock_file} is held by another run for over {LOCK_SECONDS:.0f} s") from error


def _requirements() -> list[str]:
    """What serving the model needs besides MLflow (which MLflow pins itself): the torch that exported it."""
    import importlib.metadata

    return [f"torch=={importlib.metadata.version('torch')}"]


def _tags(tags: dict[str, Any]) -> dict[str, str]:
    from mlflow.utils.validation import MAX_TAG_VAL_LENGTH

    return {str(k): str(v)[:MAX_TAG_VAL_LENGTH] for k, v in tags.items()}


def _user() -> str:
    import getpass

    try:
        return getpass.getuser()
    except (OSError, KeyError):  # a container user with no name
        return str(os.getuid()) if hasattr(os, "getuid") else "unknown"


def _unreachable(error: BaseException) -> bool:
    return bool(re.search(r"API request to \S+ failed|Connection refused|timed out|Max retries", str(error)))


def _reason(error: BaseException) -> str:
    """A short reason: MLflow's own messages quote the whole urllib3 retry chain."""
    from project.infra.redact import scrub

    text = str(error).strip()
    request = re.search(r"API request to (\w+://[^/\s]+)\S* failed", text)
    if request:
        known = ("Connection refused", "timed out", "Name or service not known", "Connection reset")
        kind = next((k for k in known if k in text), None)
        return scrub(f"no answer from {request.group(1)}" + (f": {kind.lower()}" if kind else ""))
    lines = text.splitlines()
    return scrub(lines[0][:300]) if lines else type(error).__name__


if __name__ == "__main__":
    sys.exit(main())
