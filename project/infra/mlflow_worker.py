"""MLflow in a process of its own, so that a run pays (almost) nothing for its default tracker.

Importing MLflow (~1.3 s) and opening its store (0.8 s, 2 s for a new one) would add seconds to every run, and
threads cannot hide them (the GIL). A worker process started before the training process imports Lightning (~5 s)
does them on another core, then prepares what logging the model needs (~5 CPU seconds). During training the calls
cross a pipe (microseconds each): a slow or dead server stalls the worker, never a training step.

`MLflowWorkerClient` is the training process's side (it imports nothing heavy); `python -m project.infra.mlflow_worker
SETTINGS` is the worker. Requests are JSON lines on its stdin ({"op": "open" | "running" | "params" | "metrics" |
"files" | "model" | "end", ...}), made in order; "open" and "end" are answered on its stdout ({"ok": bool, ...}), and
{"failed": reason} reports the first call that failed (every later one is dropped). The tracking URI travels in its
environment, not on its command line, where other users could read a password.

The worker ignores SIGINT and SIGTERM (they reach the whole process group; the training process decides how the
run ends). If its stdin closes without an "end" (the training process died, even by SIGKILL), it logs what is
queued and marks the run FAILED. Its stderr (MLflow's chatter) is never shown: only its last line, if it crashed.
"""

from __future__ import annotations

import contextlib
import gc
import getpass
import json
import os
import queue
import re
import signal
import subprocess
import sys
import threading
from pathlib import Path
from typing import Any

from project.infra.redact import scrub

# MLflow's client retries a dead server for minutes by default; a run only needs to find out that the server is
# gone. The user's own settings win.
HTTP_DEFAULTS = {
    "MLFLOW_HTTP_REQUEST_MAX_RETRIES": "2",
    "MLFLOW_HTTP_REQUEST_BACKOFF_FACTOR": "1",
    "MLFLOW_HTTP_REQUEST_TIMEOUT": "10",
}
PROJECT_ROOT = Path(__file__).resolve().parents[2]  # on the worker's path: it runs this very code
LOCK_SECONDS = 300.0  # how long a run waits for another that is creating the same local store
EXIT_SECONDS = 60  # nobody waits for the worker's exit after its last answer: SIGALRM ends a teardown that hangs
NICE = 19  # training's threads first: a core taken from a parallel step makes all its threads wait
EXAMPLE_BATCH = 2  # torch.export makes a batch of 1 a constant: the example batch keeps the axis dynamic
STDIN_CLOSED = {"op": "end", "status": "FAILED"}  # the training process is gone without saying how the run ended


class MLflowWorkerClient:
    """The training process's handle on one worker. `start` it before importing Lightning; `call` waits for an
    answer, `send` does not. `failure` is the first reason tracking stopped."""

    def __init__(self, process: subprocess.Popen, tracking_uri: str) -> None:
        self.process, self.tracking_uri = process, tracking_uri
        self.failure: str | None = None
        self.ending = False  # the worker's exit is expected: it was told to end, or killed
        self.answers: queue.SimpleQueue = queue.SimpleQueue()
        self.last_line = ""  # of the worker's stderr: a crash's reason (kept in memory: it may quote the URI)
        self.stderr_reader = threading.Thread(target=self.read_stderr, daemon=True)
        self.stderr_reader.start()
        threading.Thread(target=self.read_answers, daemon=True).start()

    @classmethod
    def start(
        cls, tracking_uri: str, artifact_root: str | None = None, prepare_model: bool = True
    ) -> MLflowWorkerClient:
        """A worker for `tracking_uri` (a local `sqlite:///...` store or a server). A new experiment keeps its
        artifacts in `artifact_root/<experiment>` (None: where the server or MLflow decides). `prepare_model`:
        prepare log_model while this process imports Lightning; without it, log_model pays that itself."""
        env = {
            **HTTP_DEFAULTS,
            **os.environ,
            "MLFLOW_TRACKING_URI": tracking_uri,
            "PYTHONPATH": os.pathsep.join(filter(None, [str(PROJECT_ROOT), os.environ.get("PYTHONPATH")])),
            "CUDA_VISIBLE_DEVICES": "",  # it reads checkpoints on the CPU: no CUDA context, no GPU memory
            "OMP_NUM_THREADS": "1",  # it exports a small network: the other cores are training's
        }
        settings = json.dumps({"artifact_root": artifact_root, "prepare_model": prepare_model})
        command = [sys.executable, "-m", "project.infra.mlflow_worker", settings]
        pipe = subprocess.PIPE
        return cls(subprocess.Popen(command, stdin=pipe, stdout=pipe, stderr=pipe, env=env), tracking_uri)

    def send(self, op: str, **fields: Any) -> None:
        """One request, not waited for: the worker drains its stdin on a thread of its own, whatever MLflow is
        doing. After a failure, requests other than "end" are dropped."""
        if self.failure is None or op == "end":
            with contextlib.suppress(OSError, ValueError):  # the worker is gone: read_answers says why
                self.process.stdin.write((json.dumps({"op": op, **fields}) + "\n").encode())
                self.process.stdin.flush()

    def call(self, op: str, timeout: float, **fields: Any) -> dict[str, Any]:
        """Send a request and wait for its answer; {"ok": False, "error"} if none comes in `timeout` s (the
        worker is then killed) or the worker ends."""
        if op == "end":
            self.ending = True  # the worker exits once it has answered
        self.send(op, **fields)
        try:
            answer = self.answers.get(timeout=timeout)
        except queue.Empty:
            self.kill()
            self.fail(f"no answer for {timeout:.0f} s")
            return {"ok": False, "error": self.failure}
        if answer is None:  # the worker ended without answering
            self.fail(f"its process ended ({self.last_words()})")
            return {"ok": False, "error": self.failure}
        return answer

    def stop(self, timeout: float = 10.0) -> None:
        """Close the worker's stdin and wait for it to exit (one creating a new store finishes it first; one
        with a run marks it FAILED); kill it after `timeout`."""
        self.ending = True
        with contextlib.suppress(OSError):
            self.process.stdin.close()
        try:
            self.process.wait(timeout)
        except subprocess.TimeoutExpired:
            self.kill()

    def kill(self) -> None:
        self.ending = True
        self.process.kill()  # SIGKILL: it ignores SIGTERM
        self.process.wait()

    def fail(self, reason: str) -> None:
        if self.failure is None:
            self.failure = reason

    def last_words(self) -> str:
        """The worker's last line on stderr (a crash's reason), or its exit status."""
        self.stderr_reader.join(timeout=5)  # it ends with the worker
        return scrub(self.last_line[:300]) or f"exit status {self.process.wait()}"

    def read_answers(self) -> None:
        for line in self.process.stdout:
            message = json.loads(line)
            if "failed" in message:
                self.fail(message["failed"])
            else:
                self.answers.put(message)
        if not self.ending:
            self.fail(f"its process ended ({self.last_words()})")
        self.answers.put(None)  # a call waiting for an answer gets none

    def read_stderr(self) -> None:
        for line in self.process.stderr:  # as it comes: a full pipe would block the worker
            if line.strip():
                self.last_line = line.decode(errors="replace").strip()


# --- the worker ------------------------------------------------------------------------------------------------


def main() -> int:
    signal.signal(signal.SIGINT, signal.SIG_IGN)  # first: the run must be recorded whatever the process group gets
    signal.signal(signal.SIGTERM, signal.SIG_IGN)
    with contextlib.suppress(AttributeError):  # no os.nice on Windows
        os.nice(NICE)
    # The protocol gets the real stdout; anything else that prints (MLflow does) goes to stderr.
    answers = os.fdopen(os.dup(sys.stdout.fileno()), "w", buffering=1)
    os.dup2(sys.stderr.fileno(), sys.stdout.fileno())
    # mlflow.pytorch imports pytorch_lightning, if installed, for an autologging callback this worker never uses
    # (2 s); a None entry in sys.modules makes that import fail, which mlflow.pytorch allows.
    sys.modules.setdefault("pytorch_lightning", None)
    requests: queue.SimpleQueue = queue.SimpleQueue()
    threading.Thread(target=read_requests, args=(requests,), daemon=True).start()
    Worker(answers, **json.loads(sys.argv[1])).serve(requests)
    # Every call is made and answered. The interpreter's exit would now collect MLflow's and torch's objects one by
    # one (2.2-2.6 s of CPU here, which the training process's last seconds share); frozen, they are left to the
    # operating system (0.3 s).
    gc.freeze()
    if hasattr(signal, "alarm"):
        signal.alarm(EXIT_SECONDS)
    return 0


def read_requests(requests: queue.SimpleQueue) -> None:
    """Drain stdin as fast as the training process writes (a full pipe would block its training step). Through a
    reader of its own: the interpreter's exit would abort on sys.stdin's lock, held by this thread as it waits."""
    with open(sys.stdin.fileno(), "rb", closefd=False) as stdin:
        for line in stdin:
            requests.put(json.loads(line))
    requests.put(STDIN_CLOSED)


class Worker:
    """The MLflow side: one run, its calls made in order. The first failing call ends tracking (later calls are
    dropped); a resumed run is left untouched until "running" (training really started)."""

    def __init__(self, answers: Any, artifact_root: str | None, prepare_model: bool) -> None:
        self.answers, self.artifact_root, self.prepare_model = answers, artifact_root, prepare_model
        self.client: Any = None
        self.run_id: str | None = None
        self.experiment_id: str | None = None
        self.failure: str | None = None  # the first call that failed (or the store that could not be opened)
        self.held: list[dict[str, Any]] | None = None  # a resumed run's calls, until "running"
        self.params: dict[str, str] = {}  # what the run holds: MLflow refuses to change a param
        self.preparing: threading.Thread | None = None
        self.model_uri: str | None = None
        self.problem: str | None = None  # why the model was not logged (the rest of the run was)

    def emit(self, **message: Any) -> None:
        with contextlib.suppress(OSError):  # the training process is gone: nobody listens
            self.answers.write(json.dumps(message) + "\n")

    def serve(self, requests: queue.SimpleQueue) -> None:
        self.connect()
        waiting = None  # a request taken from the queue while gathering metrics
        while True:
            request, waiting = waiting or requests.get(), None
            if request["op"] == "end":
                return self.end(request)
            if request["op"] == "open":
                self.open(request)
            elif request["op"] == "running":
                self.running()
            else:
                if request["op"] == "metrics":
                    request, waiting = gather_metrics(request, requests)
                self.log(request)

    def connect(self) -> None:
        """Import MLflow and open the store (a new local store gets its tables), and meanwhile prepare log_model, all
        while the training process imports Lightning: once training runs, this low-priority process gets little."""
        try:
            import mlflow

            if self.prepare_model:  # after MLflow's own import, which both threads need: no import runs twice
                self.preparing = threading.Thread(target=prepare_log_model, daemon=True)
                self.preparing.start()
            with store_lock():
                self.client = mlflow.MlflowClient()  # MLFLOW_TRACKING_URI, as for log_model's fluent API
                self.client.search_experiments(max_results=1)
        except Exception as error:
            self.failure = _reason(error)  # the answer to "open"

    def open(self, request: dict[str, Any]) -> None:
        """Reopen the run being resumed if it is still there (untouched until "running"), else create one."""
        if self.failure:
            return self.emit(ok=False, error=self.failure)
        resume_id, warning = request.get("resume_run_id"), None
        try:
            if resume_id and not self.reopen(resume_id):
                warning = f"MLflow run {resume_id} is gone (deleted?); this run's metrics go to a new MLflow run"
            if self.run_id is None:
                self.create_run(request)
        except Exception as error:
            return self.emit(ok=False, error=_reason(error))
        self.emit(ok=True, experiment_id=self.experiment_id, run_id=self.run_id, warning=warning)

    def reopen(self, run_id: str) -> bool:
        from mlflow.exceptions import MlflowException

        try:
            run = self.client.get_run(run_id)
        except MlflowException as error:
            if error.error_code == "RESOURCE_DOES_NOT_EXIST":
                return False
            raise
        if run.info.lifecycle_stage == "deleted":
            return False
        self.run_id, self.experiment_id, self.held = run_id, run.info.experiment_id, []
        self.params = dict(run.data.params)
        return True

    def create_run(self, request: dict[str, Any]) -> None:
        from mlflow.utils.mlflow_tags import MLFLOW_SOURCE_NAME, MLFLOW_SOURCE_TYPE, MLFLOW_USER

        self.experiment_id = self.experiment(request["experiment"])
        tags = {MLFLOW_USER: _user(), MLFLOW_SOURCE_NAME: request.get("source", ""), MLFLOW_SOURCE_TYPE: "LOCAL"}
        run = self.client.create_run(self.experiment_id, run_name=request["run_name"], tags=tags | request["tags"])
        self.run_id = run.info.run_id

    def experiment(self, name: str) -> str:
        with store_lock():  # two runs that start together must not both create it
            found = self.client.get_experiment_by_name(name)
            if found is None:
                location = f"{self.artifact_root.rstrip('/')}/{name}" if self.artifact_root else None
                return self.client.create_experiment(name, artifact_location=location)
        if found.lifecycle_stage == "deleted":
            restore = f"mlflow experiments restore --experiment-id {found.experiment_id}"
            raise ValueError(f"experiment {name!r} was deleted: restore it ({restore}) or choose another --exp-name")
        return found.experiment_id

    def running(self) -> None:
        """Training starts: a reopened run is marked RUNNING and gets the calls held for it."""
        if self.held is None or self.failure:
            return
        held, self.held = self.held, None
        try:
            self.client.update_run(self.run_id, status="RUNNING")
        except Exception as error:
            self.fail(error)
        for request in held:
            self.log(request)

    def log(self, request: dict[str, Any]) -> None:
        if self.failure:
            return
        if self.held is not None:
            self.held.append(request)
            return
        try:
            if request["op"] == "params":
                self.log_params(request["params"])
            elif request["op"] == "metrics":
                self.log_metrics(request["rows"])
            elif request["op"] == "files":
                for path in filter(os.path.isfile, request["paths"]):
                    self.client.log_artifact(self.run_id, path)
            elif request["op"] == "model":
                self.log_model(request["checkpoint"], request["name"])
        except Exception as error:
            self.fail(error)

    def log_params(self, params: dict[str, str]) -> None:
        from mlflow.entities import Param, RunTag
        from mlflow.utils.validation import MAX_PARAM_VAL_LENGTH

        params = {key: value[:MAX_PARAM_VAL_LENGTH] for key, value in params.items()}  # as MLflow keeps them
        new = [Param(key, value) for key, value in params.items() if key not in self.params]
        # MLflow refuses to change a logged param: a resumed run that runs with another value records it as a tag.
        changed = [RunTag(f"resumed.{k}", v) for k, v in params.items() if self.params.get(k, v) != v]
        self.params.update({param.key: param.value for param in new})
        self.client.log_batch(self.run_id, params=new, tags=changed)  # MLflow splits it within its limits

    def log_metrics(self, rows: list[dict[str, Any]]) -> None:
        from mlflow.entities import Metric

        metrics = [Metric(k, v, row["timestamp"], row["step"]) for row in rows for k, v in row["metrics"].items()]
        self.client.log_batch(self.run_id, metrics=metrics)

    def log_model(self, checkpoint: str, name: str) -> None:
        if self.preparing is not None:
            self.preparing.join()
        try:
            self.model_uri = save_model(Path(checkpoint), name, self.run_id, self.experiment_id).model_uri
        except Exception as error:
            if _unreachable(error):
                raise  # the server is gone: tracking stops, as for any other call
            self.problem = f"the model was not logged ({_reason(error)})"

    def end(self, request: dict[str, Any]) -> None:
        """The run's status, once every earlier call is made. A resumed run whose training never started stays as
        it was; an abandoned new one is deleted (MLflow can restore it); after a failure nothing is sent."""
        if self.run_id and self.held is None and not self.failure:
            try:
                if request.get("abandon"):
                    self.client.delete_run(self.run_id)
                else:
                    self.client.set_terminated(self.run_id, request["status"])
            except Exception as error:
                self.fail(error)
        self.emit(ok=not self.failure, error=self.failure, model_uri=self.model_uri, problem=self.problem)

    def fail(self, error: BaseException) -> None:
        if self.failure is None:
            self.failure = _reason(error)
            self.emit(failed=self.failure)


def gather_metrics(request: dict[str, Any], requests: queue.SimpleQueue) -> tuple[dict[str, Any], Any]:
    """Metrics queued behind this request go into the same log_batch (a backlog after a slow call costs one
    transaction, not one per step). Returns the batch and the next request, if one was taken."""
    rows = [request]
    while True:
        try:
            following = requests.get_nowait()
        except queue.Empty:
            return {"op": "metrics", "rows": rows}, None
        if following["op"] != "metrics":
            return {"op": "metrics", "rows": rows}, following
        rows.append(following)


def save_model(checkpoint: Path, name: str, run_id: str, experiment_id: str) -> Any:
    """The tested network as an MLflow model in torch.export's pt2 format (MLflow's default: loading it runs no
    pickle and needs neither this project nor Lightning), with its signature and an example."""
    import mlflow.pytorch
    import numpy as np
    import torch
    from mlflow.models import infer_signature

    from project.infra.checkpoints import read_model

    network, spec = read_model(checkpoint)  # weights only: a checkpoint may come from anyone
    shape, pixel_max = spec["input_shape"], spec["pixel_max"]
    # Raw pixels, as the dataset gives them (the network standardises them itself).
    example = np.random.default_rng(0).uniform(0, pixel_max, (EXAMPLE_BATCH, *shape)).round().astype(np.float32)
    about = {
        **spec,  # class_names, input_shape, pixel_max
        "input": f"raw pixel values 0..{pixel_max:g} as float32, shape (N, {', '.join(map(str, shape))})",
        "output": "logits, one per class name; the highest is the prediction",
        "checkpoint": str(checkpoint),
    }
    # MLflow files a logged model under the fluent API's current experiment (else "Default"), not its run's.
    mlflow.set_experiment(experiment_id=experiment_id)
    with torch.no_grad():
        return mlflow.pytorch.log_model(
            network,
            name=name,
            run_id=run_id,
            input_example=example,
            signature=infer_signature(example, network(torch.from_numpy(example)).numpy()),
            metadata={"project": about},
            serialization_format="pt2",
            pip_requirements=_requirements(),  # explicit: inferring them loads the model in another process (seconds)
            validate_serving_input=False,  # our tests load the model and predict instead (a second, here)
        )


def prepare_log_model() -> None:
    """Import what log_model needs and export a tiny network once (torch.export's first call loads much of torch's
    compiler): the model at the end of the run then takes a fraction of a second instead of several. Best effort:
    what fails here, log_model reports."""
    with contextlib.suppress(Exception):
        import mlflow.pytorch  # noqa: F401
        import torch

        import project.model  # noqa: F401

        tiny = torch.nn.Sequential(
            torch.nn.Conv2d(1, 2, 3, padding=1), torch.nn.BatchNorm2d(2), torch.nn.ReLU(), torch.nn.MaxPool2d(2),
            torch.nn.AdaptiveAvgPool2d(1), torch.nn.Flatten(), torch.nn.Linear(2, 2),
        ).eval()  # fmt: skip
        with torch.no_grad():
            torch.export.export(
                tiny, (torch.zeros(EXAMPLE_BATCH, 1, 4, 4),), dynamic_shapes=[{0: torch.export.Dim.AUTO}]
            )
        # log_model checks its requirements against what is installed: the first check reads every installed
        # package's file list (1.4 s here); made now, it is cached.
        from mlflow.utils.requirements_utils import warn_dependency_requirement_mismatches

        warn_dependency_requirement_mismatches(_requirements())


def store_lock() -> Any:
    """Two runs that start together must not both create the local SQLite store (MLflow's schema set-up races and
    one of them fails). A server needs no lock."""
    uri = os.environ["MLFLOW_TRACKING_URI"]
    if not uri.startswith("sqlite:///"):
        return contextlib.nullcontext()
    from filelock import FileLock

    database = Path(uri.removeprefix("sqlite:///"))
    database.parent.mkdir(parents=True, exist_ok=True)
    return FileLock(f"{database}.lock", timeout=LOCK_SECONDS)


def _requirements() -> list[str]:
    """What serving the model needs besides MLflow (which MLflow pins itself): the torch that exported it."""
    import importlib.metadata

    return [f"torch=={importlib.metadata.version('torch')}"]


def _user() -> str:
    """As records.user() (which the worker cannot import: it imports Lightning)."""
    try:
        return getpass.getuser()
    except (OSError, KeyError):  # a container user with no name
        return str(os.getuid()) if hasattr(os, "getuid") else "unknown"


def _unreachable(error: BaseException) -> bool:
    return bool(re.search(r"API request to \S+ failed|Connection refused|timed out|Max retries", str(error)))


def _reason(error: BaseException) -> str:
    """A short reason: MLflow's own messages quote the whole urllib3 retry chain."""
    text = str(error).strip()
    request = re.search(r"API request to (\w+://[^/\s]+)\S* failed", text)
    if request:
        known = ("Connection refused", "timed out", "Name or service not known", "Connection reset")
        kind = next((f": {k.lower()}" for k in known if k in text), "")
        return scrub(f"no answer from {request.group(1)}{kind}")
    return scrub(text.splitlines()[0][:300]) if text else type(error).__name__


if __name__ == "__main__":
    sys.exit(main())
