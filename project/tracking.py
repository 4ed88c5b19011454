"""Which experiment trackers a run logs to (`--logger`), through Lightning's own loggers.

- mlflow (the default): a local SQLite store under --exp-dir, or the team server in MLFLOW_TRACKING_URI;
- tensorboard: event files in the run directory; wandb: the hosted service (an optional extra);
- csv: metrics.csv in the run directory, written for every run whatever --logger says;
- neptune: the service ended in March 2026, so it only explains where old runs can go.

A tracker is a convenience on top of the run directory, never a reason to lose a run: MLflow calls
run on a background thread, and the first call that fails (a dead or unreachable server) ends tracking
for the run with one warning while training goes on and the local records stay complete.
Heavy imports (Lightning, MLflow, W&B) happen inside functions, after the command line is parsed.
"""

from __future__ import annotations

import contextlib
import csv
import importlib
import logging
import os
import queue
import re
import sys
import threading
from collections.abc import Callable, Iterator, Mapping
from pathlib import Path
from typing import Any

from project.errors import UserError
from project.redact import redact, redact_argv, scrub

NEPTUNE_GONE = (
    "--logger neptune: neptune.ai ended its service in March 2026 and Lightning 2.6.4 removed NeptuneLogger. "
    "Use --logger mlflow (the default); neptune-exporter moves runs you exported from Neptune into MLflow."
)
# --logger name -> modules that provide it (any one will do), and the pip extra that installs them.
OPTIONAL_TRACKERS = {"tensorboard": (("tensorboard", "tensorboardX"), "tensorboard"), "wandb": (("wandb",), "wandb")}
DISTRIBUTION = "deep-learning-project-template"  # pyproject.toml's [project] name

# MLflow's client retries a dead server for about 8 minutes by default. A run only needs to find out
# that the server is gone; a user who sets these variables keeps their values.
MLFLOW_HTTP_DEFAULTS = {
    "MLFLOW_HTTP_REQUEST_MAX_RETRIES": "2",
    "MLFLOW_HTTP_REQUEST_BACKOFF_FACTOR": "1",
    "MLFLOW_HTTP_REQUEST_TIMEOUT": "10",
}
# How long the end of a run waits for a tracker to take the calls still queued (a slow server).
DRAIN_SECONDS = 45.0
LOCAL_STORE = "mlflow.db"


def require_trackers(names: list[str]) -> None:
    """Fail before any training when a chosen tracker is gone or not installed: one line, exit 2."""
    if "neptune" in names:
        raise UserError(NEPTUNE_GONE)
    for name in dict.fromkeys(names):
        if name not in OPTIONAL_TRACKERS:
            continue
        modules, extra = OPTIONAL_TRACKERS[name]
        if not any(_importable(module) for module in modules):
            raise UserError(
                f"--logger {name}: {name} is not installed; install it with: pip install '{DISTRIBUTION}[{extra}]' "
                f"(in a clone of this project: pip install -e '.[{extra}]')"
            )


def _importable(module: str) -> bool:
    # Importing (not just finding) the module also catches a broken install.
    try:
        importlib.import_module(module)
    except ImportError:
        return False
    return True


def make_loggers(
    names: list[str],
    directory: Path,
    experiment: str,
    exp_dir: Path,
    tags: Mapping[str, str],
    previous: Mapping[str, Any],
) -> list[Any]:
    """Lightning loggers for `--logger names`, CSV first and always, with their tracker runs started (or,
    resuming, reopened) now. `previous`: the trackers' ids of the run being resumed (its manifest.json).
    Only global rank 0 calls this with trackers: the tracker runs are its alone."""
    loggers: list[Any] = [_csv_logger(directory)]
    for name in dict.fromkeys(names):
        if name == "mlflow":
            loggers.append(_mlflow_logger(directory, experiment, exp_dir, tags, previous.get("mlflow")))
        elif name == "tensorboard":
            from lightning.pytorch.loggers import TensorBoardLogger

            loggers.append(
                TensorBoardLogger(save_dir=str(directory), name="tensorboard", version="", default_hp_metric=False)
            )
        elif name == "wandb":
            loggers.append(_wandb_logger(directory, experiment, tags, previous.get("wandb")))
    return loggers


def log_params(loggers: list[Any], params: Mapping[str, Any]) -> None:
    """The whole config, user and command line as hyperparameters of every tracker, secrets redacted."""
    safe = redact(dict(params))
    for logger in loggers:
        logger.log_hyperparams(safe)


def log_files(loggers: list[Any], directory: Path, paths: list[Path]) -> None:
    """Copies of the run's records (plots, config, reports) as the tracker run's artifacts."""
    paths = [p for p in paths if p.is_file()]
    for logger in loggers:
        if _is_mlflow(logger):
            logger.log_files(paths)
        elif type(logger).__name__ == "WandbLogger":
            for path in paths:
                logger.experiment.save(str(path), base_path=str(directory), policy="now")


def describe(loggers: list[Any]) -> dict[str, Any]:
    """What manifest.json keeps about each tracker run: enough to find it again and to resume it."""
    found: dict[str, Any] = {}
    for logger in loggers:
        kind = type(logger).__name__
        if _is_mlflow(logger):
            found["mlflow"] = logger.description()
        elif kind == "WandbLogger":
            experiment = logger.experiment
            found["wandb"] = {"id": logger.version, "project": logger.name, "url": getattr(experiment, "url", None)}
        elif kind == "TensorBoardLogger":
            found["tensorboard"] = {"log_dir": logger.log_dir}
    return found


def how_to_open(loggers: list[Any]) -> list[str]:
    """One line per tracker: the command or address that shows this run."""
    lines = []
    for logger in loggers:
        kind = type(logger).__name__
        if _is_mlflow(logger):
            lines.append(logger.how_to_open())
        elif kind == "TensorBoardLogger":
            lines.append(f"tensorboard --logdir {logger.log_dir}")
        elif kind == "WandbLogger":
            url = getattr(logger.experiment, "url", None)
            lines.append(url or f"wandb sync {Path(logger.experiment.dir).parent}  (offline run: uploads it)")
    return lines


def close(loggers: list[Any], status: str) -> list[str]:
    """End the tracker runs with `status` (FINISHED, FAILED, KILLED); returns what went wrong, if anything."""
    problems = []
    for logger in loggers:
        if _is_mlflow(logger):
            problem = logger.close(status)
            if problem:
                problems.append(problem)
    return problems


# --- CSV ---------------------------------------------------------------------------------------------


def _csv_logger(directory: Path) -> Any:
    from lightning.pytorch.loggers import CSVLogger
    from lightning.pytorch.loggers.csv_logs import ExperimentWriter
    from lightning.pytorch.loggers.logger import rank_zero_experiment

    class AppendingWriter(ExperimentWriter):
        """Lightning's writer deletes an existing metrics.csv; a resumed run appends to it instead."""

        def _check_log_dir_exists(self) -> None:
            if os.path.isfile(self.metrics_file_path):
                with open(self.metrics_file_path, newline="") as file:
                    self.metrics_keys = list(next(csv.reader(file), []))

    class AppendingCSVLogger(CSVLogger):
        @property
        @rank_zero_experiment
        def experiment(self) -> AppendingWriter:
            if self._experiment is None:
                self._fs.makedirs(self.root_dir, exist_ok=True)
                self._experiment = AppendingWriter(log_dir=self.log_dir)
            return self._experiment

    # Flushed at every log call (every 10 steps and each epoch end): a crash loses no logged value.
    return AppendingCSVLogger(save_dir=str(directory), name="", version="", flush_logs_every_n_steps=1)


# --- MLflow ------------------------------------------------------------------------------------------


def local_tracking_uri(exp_dir: Path) -> str:
    return f"sqlite:///{(exp_dir.expanduser().resolve() / LOCAL_STORE).as_posix()}"


def _mlflow_logger(
    directory: Path,
    experiment: str,
    exp_dir: Path,
    tags: Mapping[str, str],
    previous: Mapping[str, Any] | None,
) -> Any:
    for name, value in MLFLOW_HTTP_DEFAULTS.items():
        os.environ.setdefault(name, value)
    for name in ("alembic", "mlflow.store.db.utils"):  # schema migration chatter on a new local store
        logging.getLogger(name).setLevel(logging.WARNING)
    uri = os.environ.get("MLFLOW_TRACKING_URI") or local_tracking_uri(exp_dir)
    served = uri.startswith(("http://", "https://", "databricks"))
    exp_dir = exp_dir.expanduser().resolve()
    # A server stores artifacts where its own --artifacts-destination says. Straight into a database,
    # MLflow's default would be ./mlruns in the working directory: they stay under --exp-dir instead.
    artifacts = None if served else (exp_dir / "mlflow-artifacts" / experiment).as_uri()
    run_id = None
    if previous and previous.get("tracking_uri") == scrub(uri):
        run_id = previous.get("run_id")
    elif previous:
        print(
            f"warning: the resumed run was tracked at {previous.get('tracking_uri')}, not {scrub(uri)}: "
            "its metrics go to a new MLflow run",
            file=sys.stderr,
        )
    logger_class = _guarded_mlflow_class()
    with _store_lock(None if served else exp_dir):
        try:
            logger = logger_class(
                experiment_name=experiment,
                run_name=directory.name,
                tracking_uri=uri,
                tags=redact(dict(tags)),
                artifact_location=artifacts,
                run_id=run_id,
                run_dir=directory,
            )
            logger.open()
        except Exception as error:
            if isinstance(error, UserError):
                raise
            raise UserError(
                f"MLflow at {scrub(uri)} cannot be used ({_first_line(error)}): start the server or fix "
                "MLFLOW_TRACKING_URI, or choose another --logger"
            ) from error
    return logger


@contextlib.contextmanager
def _store_lock(exp_dir: Path | None) -> Iterator[None]:
    """Two runs that start together must not both create the local SQLite store (MLflow's schema setup
    races and one of them fails), nor the same experiment. A server needs no lock."""
    try:
        import fcntl
    except ImportError:  # Windows: no flock; runs there start one at a time
        fcntl = None
    if exp_dir is None or fcntl is None:
        yield
        return
    exp_dir.mkdir(parents=True, exist_ok=True)
    with open(exp_dir / f"{LOCAL_STORE}.lock", "a") as lock:
        fcntl.flock(lock, fcntl.LOCK_EX)
        try:
            yield
        finally:
            fcntl.flock(lock, fcntl.LOCK_UN)


_STOP, _DONE = object(), object()  # markers in TrackerCalls' queue


class TrackerCalls:
    """A tracker's calls, made in order on one background thread, so that a slow or dead server never
    stalls a training step. After the first call that fails, the rest are dropped, with one warning."""

    def __init__(self, tracker: str, run_dir: Path) -> None:
        self.tracker, self.run_dir = tracker, run_dir
        self.failure: str | None = None
        self._queue: queue.SimpleQueue = queue.SimpleQueue()
        self._thread = threading.Thread(target=self._work, name=f"{tracker} calls", daemon=True)
        self._thread.start()

    def submit(self, call: Callable[..., Any], *args: Any, **kwargs: Any) -> None:
        if self.failure is None and self._thread.is_alive():
            self._queue.put((call, args, kwargs))

    def stop(self) -> None:
        """End the thread once the queued calls are done (a sweep runs many runs in one process)."""
        self._queue.put((_STOP, (), {}))

    def drain(self, timeout: float) -> bool:
        """Wait until every call submitted so far is made (or dropped); False if `timeout` ran out."""
        if not self._thread.is_alive():
            return True
        done = threading.Event()
        self._queue.put((_DONE, (done,), {}))
        return done.wait(timeout)

    def fail(self, reason: str) -> None:
        if self.failure is None:
            self.failure = reason
            print(
                f"warning: {self.tracker} stopped answering ({reason}); training goes on without it, "
                f"and {self.run_dir} keeps the complete records of this run",
                file=sys.stderr,
                flush=True,
            )

    def _work(self) -> None:
        while True:
            call, args, kwargs = self._queue.get()
            if call is _STOP:
                return
            if call is _DONE:
                args[0].set()
            elif self.failure is None:
                try:
                    call(*args, **kwargs)
                except Exception as error:
                    self.fail(_first_line(error))


def _first_line(error: BaseException) -> str:
    """A short reason: MLflow's own messages quote the whole urllib3 retry chain."""
    text = str(error).strip()
    request = re.search(r"API request to (\w+://[^/\s]+)\S* failed", text)
    if request:
        kind = next((k for k in ("Connection refused", "timed out", "Name or service not known") if k in text), None)
        return scrub(f"no answer from {request.group(1)}" + (f": {kind.lower()}" if kind else ""))
    lines = text.splitlines()
    return scrub(lines[0][:300]) if lines else type(error).__name__


def _guarded_mlflow_class() -> type:
    """The MLflow logger class, defined on first use so that importing this module stays cheap."""
    global _GuardedMLFlowLogger
    if _GuardedMLFlowLogger is None:
        _GuardedMLFlowLogger = _define_guarded_mlflow_logger()
    return _GuardedMLFlowLogger


_GuardedMLFlowLogger: type | None = None


def _is_mlflow(logger: Any) -> bool:
    # Not isinstance(logger, _guarded_mlflow_class()): that would import MLflow (over a second) in
    # runs that never chose it. Until the class exists, no logger can be one.
    return _GuardedMLFlowLogger is not None and isinstance(logger, _GuardedMLFlowLogger)


def _define_guarded_mlflow_logger() -> type:
    from lightning.fabric.utilities.logger import _convert_params, _flatten_dict
    from lightning.pytorch.loggers import MLFlowLogger
    from lightning.pytorch.utilities.rank_zero import rank_zero_only
    from mlflow.entities import Param, RunTag
    from mlflow.utils.validation import MAX_PARAM_VAL_LENGTH

    class GuardedMLFlowLogger(MLFlowLogger):
        """Lightning's MLFlowLogger, with its calls on a background thread (TrackerCalls), params that
        survive a resume (MLflow refuses to change a logged param), and the run's files as artifacts."""

        def __init__(self, *, run_dir: Path, **kwargs: Any) -> None:
            super().__init__(**kwargs)
            self.run_dir = run_dir
            self.calls = TrackerCalls("MLflow", run_dir)
            self._params: dict[str, str] = {}

        def open(self) -> None:
            """Create (or, resuming, reopen) the run now, in the foreground: a server that cannot be
            reached is an error before training, not a surprise after it."""
            client = self._mlflow_client
            resuming = self._run_id is not None and self._run_exists()
            if not resuming and self._find_experiment() is None:
                try:
                    client.create_experiment(self._experiment_name, artifact_location=self._artifact_location)
                except Exception:
                    if self._find_experiment() is None:  # not another run creating it at the same moment
                        raise
            _ = self.experiment
            if resuming:  # the same run again: keep its params, mark it running
                self._params = dict(client.get_run(self._run_id).data.params)
                client.update_run(self._run_id, status="RUNNING")

        def _run_exists(self) -> bool:
            from mlflow.exceptions import MlflowException

            try:
                found = self._mlflow_client.get_run(self._run_id).info.lifecycle_stage != "deleted"
            except MlflowException as error:
                if error.error_code != "RESOURCE_DOES_NOT_EXIST":
                    raise
                found = False
            if not found:
                print(f"warning: MLflow run {self._run_id} is gone; the resumed run starts a new one", file=sys.stderr)
                self._run_id = None
            return found

        def _find_experiment(self) -> Any:
            found = self._mlflow_client.get_experiment_by_name(self._experiment_name)
            return None if found is None or found.lifecycle_stage == "deleted" else found

        @rank_zero_only
        def log_hyperparams(self, params: Any) -> None:
            flat = _flatten_dict(_convert_params(params))
            values = {k: str(v)[:MAX_PARAM_VAL_LENGTH] for k, v in flat.items()}
            # MLflow refuses to change a param; a resumed run with other values records them as tags.
            new = [Param(k, v) for k, v in values.items() if k not in self._params]
            changed = [RunTag(f"resumed.{k}", v) for k, v in values.items() if self._params.get(k, v) != v]
            self._params.update({p.key: p.value for p in new})
            for start in range(0, len(new), 100):  # MLflow takes at most 100 params per call
                self.calls.submit(self._log_batch, params=new[start : start + 100])
            if changed:
                self.calls.submit(self._log_batch, tags=changed)

        def _log_batch(self, **batch: Any) -> None:
            self.experiment.log_batch(run_id=self.run_id, **batch)

        @rank_zero_only
        def log_metrics(self, metrics: Mapping[str, float], step: int | None = None) -> None:
            self.calls.submit(super().log_metrics, dict(metrics), step)

        def finalize(self, status: str = "success") -> None:
            # Lightning calls this after fit and again after test; the run goes on (test, report), so the
            # status is set once, by close(), when the whole run has ended.
            pass

        def log_files(self, paths: list[Path]) -> None:
            for path in paths:
                self.calls.submit(self.experiment.log_artifact, self.run_id, str(path))

        def close(self, status: str) -> str | None:
            if self._initialized:
                self.calls.submit(self.experiment.set_terminated, self.run_id, status)
            if not self.calls.drain(DRAIN_SECONDS):
                self.calls.fail(f"no answer for {DRAIN_SECONDS:.0f} s")
            self.calls.stop()
            if self.calls.failure:
                return f"MLflow: records stop where the server stopped answering ({self.calls.failure})"
            return None

        def description(self) -> dict[str, Any]:
            return {
                "tracking_uri": scrub(self._tracking_uri),
                "experiment_id": self._experiment_id,
                "run_id": self._run_id,
                "complete": self.calls.failure is None,
            }

        def how_to_open(self) -> str:
            page = f"#/experiments/{self._experiment_id}/runs/{self._run_id}"
            uri = scrub(self._tracking_uri)
            if uri.startswith("sqlite:"):
                return f"mlflow ui --backend-store-uri {uri}   then open http://127.0.0.1:5000/{page}"
            return f"{uri.rstrip('/')}/{page}"

    return GuardedMLFlowLogger


# --- Weights & Biases --------------------------------------------------------------------------------


def _wandb_logger(directory: Path, experiment: str, tags: Mapping[str, str], previous: Mapping[str, Any] | None) -> Any:
    from lightning.pytorch.loggers import WandbLogger

    run_id = (previous or {}).get("id")
    # W&B honours WANDB_MODE=offline (files under <run>/wandb, `wandb sync` uploads them later).
    logger = WandbLogger(
        project=experiment,
        name=directory.name,
        save_dir=str(directory),
        id=run_id,
        resume="allow" if run_id else None,
        tags=[f"{k}={v}"[:64] for k, v in redact(dict(tags)).items()],  # W&B tags are short labels
    )
    # wandb.init now, so that its run id goes into manifest.json. W&B records sys.argv with the run: it
    # sees the command line with its secrets redacted, as every other record does.
    argv = sys.argv
    sys.argv = [argv[0], *redact_argv(argv[1:])]
    try:
        _ = logger.experiment
    finally:
        sys.argv = argv
    return logger
