"""The experiment trackers a run logs to (`--logger`), as Lightning loggers:

- mlflow (the default): Lightning's MLFlowLogger with MLflow's own asynchronous logging, into a local SQLite store
  under --exp-dir or the team server in MLFLOW_TRACKING_URI; the tested model goes in as an MLflow model;
- tensorboard: event files in the run directory; wandb: the hosted service, or offline files (an optional extra);
- csv: metrics.csv in the run directory, written for every run whatever --logger says.

The run directory is the record; a tracker is a view of it, never a reason to lose a run. MLflow gets metrics and
params live; the files, the model and the status, and whatever a server that stopped answering missed, arrive at the
run's end through project.sync, the code that also puts a run there later (`python -m project.sync RUN_DIR`).
PROJECT_TRACKING=offline trains with no MLflow run at all, to sync later (W&B's WANDB_MODE=offline, in this project's
PROJECT_ names: MLflow owns MLFLOW_ and might give one a meaning). Heavy imports (Lightning, MLflow, W&B, TensorBoard)
happen inside functions, after the command line is parsed.
"""

from __future__ import annotations

import argparse
import contextlib
import csv
import importlib
import io
import logging
import os
import re
import shlex
import sys
import time
from collections.abc import Mapping
from pathlib import Path
from typing import Any

from project.infra import runs
from project.infra.errors import UserError, signals_held
from project.infra.redact import redact_argv, redact_path, redact_text

# --logger name -> modules that provide it (any one will do), and the pip extra that installs them.
OPTIONAL_TRACKERS = {"tensorboard": (("tensorboard", "tensorboardX"), "tensorboard"), "wandb": (("wandb",), "wandb")}
DISTRIBUTION = "deep-learning-project-template"  # pyproject.toml's [project] name
LOCAL_STORE = "mlflow.db"
# MLflow's client retries a dead server for minutes by default; a run only needs to find out that it is gone (a
# server that cannot be reached at the start is an error within seconds). The user's own settings win.
# MLflow's asynchronous logging, unbuffered, polls its queue every second: the run's end (a flush) and the
# interpreter's exit each wait for that poll. Buffered, it waits on an event that the flush sets, and sends what a
# second gathered in one batch. MLflow prints a run's address, password included; the summary prints it redacted.
# A model is loaded without unpickling (its torch.export archive is checked to hold only tensors and plain values):
# a model from anyone runs no code. Downloads draw no progress bars over our lines.
MLFLOW_DEFAULTS = {"MLFLOW_HTTP_REQUEST_MAX_RETRIES": "2", "MLFLOW_HTTP_REQUEST_BACKOFF_FACTOR": "1",
                   "MLFLOW_HTTP_REQUEST_TIMEOUT": "10", "MLFLOW_ASYNC_LOGGING_BUFFERING_SECONDS": "1",
                   "MLFLOW_SUPPRESS_PRINTING_URL_TO_STDOUT": "true", "MLFLOW_ALLOW_PICKLE_DESERIALIZATION": "false",
                   "MLFLOW_ENABLE_ARTIFACTS_PROGRESS_BAR": "false"}  # fmt: skip
LOCK_SECONDS = 300.0  # how long a run waits for another that is creating the same local store
OFFLINE = "PROJECT_TRACKING"  # =offline: no MLflow run; project.sync puts the run there later
ASYNC_LOGGER = "mlflow.utils.async_logging.async_logging_queue"  # where MLflow reports a batch it could not log


def start(args: argparse.Namespace) -> Trackers:
    """The trackers of this run, checked to be installed (one line, before anything is written)."""
    names = [name for name in dict.fromkeys(args.logger) if name not in ("csv", "none")]
    for name in names:
        modules, extra = OPTIONAL_TRACKERS.get(name, ((), ""))
        if modules and not any(importable(module) for module in modules):
            raise UserError(f"--logger {name}: {name} is not installed; pip install '{DISTRIBUTION}[{extra}]' "
                            f"(in a clone of this project: pip install -e '.[{extra}]')")  # fmt: skip
    rank_zero = all(os.environ.get(v, "0") == "0" for v in ("RANK", "LOCAL_RANK", "NODE_RANK", "SLURM_PROCID"))
    if args.fast_dev_run or not rank_zero:  # Lightning gives a fast dev run a dummy logger; trackers are rank 0's
        return Trackers([])
    offline = os.environ.get(OFFLINE) == "offline" and "mlflow" in names
    return Trackers([name for name in names if not offline or name != "mlflow"], offline)


def importable(module: str) -> bool:
    try:  # importing, not just finding, catches a broken install too
        importlib.import_module(module)
    except ImportError:
        return False
    return True


def local_store(exp_dir: str | Path) -> str:
    return runs.sqlite_url(Path(exp_dir) / LOCAL_STORE)


def store_uri(exp_dir: str | Path) -> str:
    """Where this project's MLflow runs are: MLFLOW_TRACKING_URI, else the local store of --exp-dir."""
    return os.environ.get("MLFLOW_TRACKING_URI") or local_store(exp_dir)


def configure_mlflow() -> None:
    """This project's MLflow settings (the user's own win) and quiet loggers, before MLflow is first used."""
    for name, value in MLFLOW_DEFAULTS.items():
        os.environ.setdefault(name, value)
    logging.getLogger("mlflow").setLevel(logging.WARNING)  # a new store's tables, in INFO lines
    logging.getLogger("urllib3.connectionpool").setLevel(logging.ERROR)  # each retry of a dead server
    logging.getLogger("mlflow.utils.databricks_utils").setLevel(logging.ERROR)  # its auth's fallback: our line says


def artifact_location(uri: str, exp_dir: str | Path, experiment: str) -> str | None:
    """A server keeps artifacts where its --artifacts-destination says; straight into a database, MLflow would put
    them in ./mlruns of whatever the working directory is: they stay under --exp-dir instead."""
    if uri.startswith(("http://", "https://", "databricks")):
        return None
    return (Path(exp_dir).expanduser().resolve() / "mlflow-artifacts" / experiment).as_uri()


def open_client(uri: str, advice: str = "start the server or fix MLFLOW_TRACKING_URI") -> Any:
    """MLflow's client of the store `uri`, answering (one line within seconds if not)."""
    import mlflow

    configure_mlflow()
    try:
        with store_lock(uri):  # two runs that start together must not both create the store
            database = uri.split(":", 1)[0].split("+")[0] in ("sqlite", "postgresql", "mysql", "mssql")
            if database and not uri.startswith("sqlite"):
                runs.table_names(uri)  # MLflow tries a database it cannot reach for minutes (10 times, longer waits)
            # This process makes a database's tables: a signal waits for them (a store half made cannot be opened).
            # A server makes its own: a signal stops the wait for one that does not answer, at once.
            with signals_held() if database else contextlib.nullcontext():
                client = mlflow.MlflowClient(uri)
                client.search_experiments(max_results=1)
        return client
    except Exception as error:
        raise UserError(f"MLflow at {redact_path(uri)} cannot be used ({reason(error)}): {advice}") from None


class Trackers:
    """The Lightning loggers of one run (metrics.csv first, always) and what the records ask of them."""

    def __init__(self, names: list[str], offline: bool = False) -> None:
        self.names, self.offline, self.directory = names, offline, Path()
        self.loggers: list[Any] = []
        self.mlflow: MLflowRun | None = None  # each, once open
        self.tensorboard: Any = None
        self.wandb: Any = None

    def open(
        self, directory: Path, args: argparse.Namespace, previous: Mapping[str, Any], tags: dict[str, str]
    ) -> None:
        """Start (or, resuming, reopen) the tracker runs; a server that cannot be used is an error now, not later.
        `previous`: the manifest.json of the run being resumed (its id, and its trackers' ids), or {}."""
        self.loggers, self.directory = [csv_logger(directory / runs.METRICS)], directory
        run_id, previous = previous.get("run_id") or directory.name, previous.get("trackers", {})  # a renamed run's own
        if "mlflow" in self.names:  # first: it may refuse, and W&B, which writes files, comes last
            self.mlflow = MLflowRun(directory, args, previous.get("mlflow"), tags, run_id)
            self.loggers.append(self.mlflow.logger)
        if "tensorboard" in self.names:
            from lightning.pytorch.loggers import TensorBoardLogger

            self.tensorboard = TensorBoardLogger(save_dir=str(directory), name="tensorboard", version="",
                                                 default_hp_metric=False)  # fmt: skip
            self.loggers.append(self.tensorboard)
        if "wandb" in self.names:
            self.wandb = wandb_logger(directory, args.exp_name, tags, previous.get("wandb"))
            self.loggers.append(self.wandb)

    def rewind(self, step: int, since: int) -> None:
        """metrics.csv without what the session that began at `since` (ms) logged after the checkpoint its run
        resumes from (at `step`)."""
        self.loggers[0].rewind(step, since)

    def start(self, params: dict[str, Any]) -> None:
        """The run's configuration, user and command line as every tracker's hyperparameters (already redacted)."""
        if self.mlflow is not None and self.mlflow.reopened:
            self.mlflow.call(self.mlflow.client.update_run, self.mlflow.run_id, "RUNNING")
        for logger in self.loggers:
            logger.log_hyperparams(params)

    def log_model(self, checkpoint: Path) -> None:
        if self.mlflow is not None:
            self.mlflow.log_model(checkpoint)

    def finish(self, directory: Path, files: list[Path], scores: dict[str, Any] | None) -> None:
        """Copies of the run's records (plots, config, reports) for each tracker; TensorBoard gets the plots as images
        and the hyperparameters beside the test scores (its HPARAMS tab)."""
        files = [path for path in files if path.is_file()]
        for path in files if self.wandb is not None else []:
            self.wandb.experiment.save(str(path), base_path=str(directory), policy="now")
        if self.tensorboard is not None:
            tensorboard_summary(self.tensorboard, directory, files, scores)

    def close(self, manifest: Path, status: str) -> list[str]:
        """End the tracker runs with a status ("finished", "interrupted", "failed: ..."); returns what went wrong."""
        problem = self.mlflow.close(manifest, status) if self.mlflow is not None else None
        if self.wandb is not None:
            with contextlib.suppress(Exception):  # W&B keeps its own offline copy when its service fails
                self.wandb.experiment.finish(exit_code=0 if status == "finished" else 1)
        for logger in filter(None, self.loggers[:1] + [self.tensorboard]):
            logger.finalize("success" if status == "finished" else "failed")
        return [problem] if problem else []

    def abandon(self) -> None:
        """The run never started: a new MLflow run this command made is deleted (MLflow can restore it), a reopened
        one is left as it was."""
        if self.mlflow is not None and not self.mlflow.reopened:
            self.mlflow.call(self.mlflow.client.delete_run, self.mlflow.run_id)

    def describe(self) -> dict[str, Any]:
        """What manifest.json keeps about each tracker run: enough to find it again and to resume it."""
        found: dict[str, Any] = {"mlflow": self.mlflow.describe()} if self.mlflow is not None else {}
        if self.wandb is not None:
            url = getattr(self.wandb.experiment, "url", None)
            found["wandb"] = {"id": self.wandb.version, "project": self.wandb.name, "url": url}
        if self.tensorboard is not None:
            found["tensorboard"] = {"log_dir": redact_path(self.tensorboard.log_dir)}
        return found

    def how_to_open(self) -> list[str]:
        """One line per tracker: the command or address that shows this run."""
        lines = [self.mlflow.how_to_open()] if self.mlflow is not None else []
        if self.offline:
            sync = f"python -m project.sync {redact_path(self.directory)}"
            lines.append(f"MLflow offline ({OFFLINE}=offline): {sync} puts it there")
        if self.tensorboard is not None:
            lines.append(f"tensorboard --logdir {shlex.quote(redact_path(self.tensorboard.log_dir))}")
        if self.wandb is not None:
            url = getattr(self.wandb.experiment, "url", None)
            offline = redact_path(Path(self.wandb.experiment.dir).parent)
            lines.append(url or f"wandb sync {offline}  (an offline run: uploads it)")
        return lines


class MLflowRun:
    """One MLflow run: Lightning's MLFlowLogger logs metrics and params (MLflow's asynchronous logging: a step never
    waits for the store), project.sync the model, and at the end the files, the status and what the store missed. The
    first call that fails stops live tracking (one warning, no waiting on a dead server); the end tries again."""

    def __init__(
        self, directory: Path, args: argparse.Namespace, previous: Mapping | None, tags: dict, run_id: str
    ) -> None:
        from project.sync import TAG, find

        logging.getLogger("lightning.pytorch.loggers.mlflow").setLevel(logging.ERROR)  # "Creating" the experiment
        # MLflow's asynchronous logging reports a batch it could not log only to its logger, from its own thread: the
        # first is the run's failure (the training thread prints it), and none reaches the terminal.
        logging.getLogger(ASYNC_LOGGER).filters = [
            lambda record: record.levelno < logging.ERROR or self.fail(reason(record.getMessage()))
        ]
        self.directory, self.uri = directory, store_uri(args.exp_dir)
        self.failure: str | None = None
        self.problem: str | None = None  # why the model was not logged (the rest of the run was)
        self.model_uri: str | None = None
        self.run_id, self.reopened, self.warned = None, False, False
        local = self.uri.startswith("sqlite:") and not os.environ.get("MLFLOW_TRACKING_URI")
        advice = "check --exp-dir" if local else "start the server or fix MLFLOW_TRACKING_URI"
        advice += f", train offline ({OFFLINE}=offline) and sync later, or choose another --logger"
        self.client = open_client(self.uri, advice)
        # Two runs that start together must not both create the experiment. MLflow's set_tracking_uri, which
        # Lightning's logger calls, exports its URI to the environment: a next run in this process would take it.
        try:
            with store_lock(self.uri), keep_environment("MLFLOW_TRACKING_URI"):
                seen = {"run_id": run_id, "experiment": args.exp_name, "trackers": {"mlflow": previous or {}}}
                run, self.reopened = find(self.client, self.uri, directory, seen, {**tags, TAG: run_id})
                self.experiment_id, self.run_id = run.info.experiment_id, run.info.run_id
                self.logger = mlflow_logger(self, tracking_uri=self.uri, run_id=self.run_id, synchronous=False)
                _ = self.logger.experiment  # now, inside keep_environment
        except Exception as error:
            raise UserError(f"MLflow at {redact_path(self.uri)} cannot be used ({reason(error)}): {advice}") from None
        if previous and not self.reopened:  # a reopened run is left exactly as it was until training starts
            print(f"warning: MLflow run {previous.get('run_id')} is not in {redact_path(self.uri)} (deleted, or "
                  "tracked elsewhere); this run's metrics go to a new MLflow run", file=sys.stderr)  # fmt: skip

    def call(self, method: Any, *args: Any) -> None:
        """`method(*args)` unless tracking has stopped; the first failure stops it, with one warning line, printed by
        the training thread (MLflow's logging thread would write into whatever this process is printing)."""
        if self.failure is None:
            try:
                method(*args)
            except Exception as error:
                self.fail(reason(error))
        self.warn()

    def warn(self) -> None:
        if self.failure is not None and not self.warned:
            self.warned = True
            print(
                f"warning: MLflow stopped answering ({self.failure}); training goes on, {redact_path(self.directory)} "
                "keeps the complete records, and the run's end sends MLflow what it missed",
                file=sys.stderr,
                flush=True,
            )

    def fail(self, why: str) -> bool:
        self.failure = self.failure or why
        return False  # as a logging filter: the record goes no further

    def log_params(self, params: Mapping[str, Any]) -> None:
        from project.sync import log_params

        def log() -> None:
            held = self.client.get_run(self.run_id).data.params if self.reopened else {}
            log_params(self.client, self.run_id, params, held, [])

        self.call(log)

    def log_model(self, checkpoint: Path) -> None:
        """The tested model, before the test (a run that fails in its test keeps it); see project.sync.log_model."""
        from project.sync import log_model

        if self.failure is None:
            try:
                self.model_uri = log_model(self.uri, self.run_id, self.experiment_id, checkpoint)
            except Exception as error:
                if unreachable(error):
                    self.fail(reason(error))
                else:
                    self.problem = f"the model was not logged ({reason(error)})"
        self.warn()

    def close(self, manifest: Path, status: str) -> str | None:
        """Wait for the metrics still queued, then sync the run directory (what the store missed, the files, the
        model, the status: FINISHED, FAILED or KILLED); returns what went wrong, as one line, or None."""
        import json

        import mlflow

        from project.sync import sync_run

        with contextlib.suppress(Exception):  # what failed to arrive, sync_run sends
            mlflow.flush_async_logging()  # Lightning's logger set MLflow's tracking URI to this store
        recorded = json.loads(manifest.read_text()) if manifest.is_file() else {}
        try:
            _, problem, model_uri = sync_run(self.client, self.uri, self.directory, {**recorded, "exit_status": status},
                                             self.run_id)  # fmt: skip
        except Exception as error:
            self.fail(reason(error))
            what = "still does not answer" if unreachable(error) else f"did not take the records ({reason(error)})"
            return f"MLflow {what}; to complete its record: python -m project.sync {redact_path(self.directory)}"
        self.failure, self.problem, self.model_uri = None, problem or self.problem, model_uri or self.model_uri
        return f"MLflow: {self.problem}" if self.problem else None

    def describe(self) -> dict[str, Any]:
        found = {"tracking_uri": redact_path(self.uri), "experiment_id": self.experiment_id, "run_id": self.run_id,
                 "complete": self.failure is None and self.problem is None}  # fmt: skip
        return found | ({"model_uri": self.model_uri} if self.model_uri else {})

    def how_to_open(self) -> str:
        page = f"#/experiments/{self.experiment_id}/runs/{self.run_id}"
        if self.uri.startswith("sqlite:"):
            return f"mlflow ui --backend-store-uri {shlex.quote(redact_path(self.uri))}   then open http://127.0.0.1:5000/{page}"
        return f"{redact_path(self.uri).rstrip('/')}/{page}"


def mlflow_logger(run: MLflowRun, **options: Any) -> Any:
    """Lightning's MLFlowLogger, its calls made through `run` (a failure stops them), and the run's end left to
    MLflowRun.close: Lightning's finalize, after fit and again after test, would mark it FINISHED before the test and
    the records are done, and would raise if the server were gone."""
    from lightning.pytorch.loggers import MLFlowLogger

    class RunLogger(MLFlowLogger):
        def log_metrics(self, metrics: Mapping[str, Any], step: int | None = None) -> None:
            run.call(super().log_metrics, metrics, step)

        def log_hyperparams(self, params: Any, *args: Any, **kwargs: Any) -> None:
            run.log_params(vars(params) if isinstance(params, argparse.Namespace) else params)

        def finalize(self, status: str = "success") -> None:
            pass

    return RunLogger(**options)


@contextlib.contextmanager
def keep_environment(name: str) -> Any:
    value = os.environ.get(name)
    try:
        yield
    finally:
        if value is None:
            os.environ.pop(name, None)
        else:
            os.environ[name] = value


@contextlib.contextmanager
def store_lock(uri: str) -> Any:
    """MLflow's schema set-up races when two processes create one SQLite store (one of them fails); a server needs
    no lock. A wait longer than a moment says whom it waits for."""
    database = runs.sqlite_file(uri)
    if database is None:
        yield
        return
    from filelock import FileLock, Timeout

    database.parent.mkdir(parents=True, exist_ok=True)
    lock = FileLock(f"{database}.lock")
    try:
        lock.acquire(timeout=2)
    except Timeout:
        print(f"waiting for another process that holds {redact_path(f'{database}.lock')} (at most {LOCK_SECONDS:.0f} "
              "s)", file=sys.stderr, flush=True)  # fmt: skip
        lock.acquire(timeout=LOCK_SECONDS)
    try:
        yield
    finally:
        lock.release()


def unreachable(error: BaseException) -> bool:
    return bool(re.search(r"API request to \S+ failed|Connection refused|timed out|Max retries", str(error)))


def reason(error: BaseException | str) -> str:
    """A short reason: MLflow's own messages quote the whole urllib3 retry chain."""
    text = str(error).strip()
    request = re.search(r"API request to (\w+://[^/\s]+)\S* failed", text)
    if request:
        known = ("Connection refused", "timed out", "Name or service not known", "Connection reset")
        kind = next((f": {k.lower()}" for k in known if k in text), "")
        return redact_text(f"no answer from {request.group(1)}{kind}")
    return redact_text(text.splitlines()[0][:300]) if text else type(error).__name__


def tensorboard_summary(logger: Any, directory: Path, files: list[Path], scores: dict[str, Any] | None) -> None:
    import numpy as np
    import yaml
    from PIL import Image

    config = yaml.safe_load((directory / runs.CONFIG).read_text()) or {}
    results = {f"hparams/test_{name}": float(value) for name, value in (scores or {}).items()
               if isinstance(value, float)}  # the task's scores and the loss, whatever the task  # fmt: skip
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
        """metrics.csv: one row per logged step, a column per metric, and its time in ms. Ours, not Lightning's
        CSVLogger, which deletes an existing metrics.csv when it starts: a resumed run keeps its earlier rows."""

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
            row = {"step": step, **{k: v if isinstance(v, (int, float)) else float(v) for k, v in metrics.items()},
                   "timestamp": int(time.time() * 1000)}  # as MLflow keeps it: project.sync sends it  # fmt: skip
            if set(row) - set(self.columns):  # a new column: rewrite the file with the wider header
                self.columns = ["step", *sorted((set(self.columns) | set(row)) - {"step"})]
                self.write([*self.rows(), row])
                return
            with open(self.path, "a", newline="") as file:  # flushed at every call: a crash loses no logged value
                csv.DictWriter(file, fieldnames=self.columns).writerow(row)

        def rewind(self, step: int, since: int) -> None:
            """Without the rows logged from `since` (ms) at `step` or later: the process that ended logged them after
            the checkpoint its run resumes from, and they are logged again (an earlier session's test rows stay)."""
            rows = self.rows()
            with contextlib.suppress(ValueError):  # not numbers: a file edited by hand, left as it is
                kept = [row for row in rows if int(float(row.get("step") or 0)) < step
                        or int(float(row.get("timestamp") or 0)) < since]  # fmt: skip
                if len(kept) < len(rows):
                    self.write(kept)

        def rows(self) -> list[dict[str, str]]:
            with contextlib.suppress(OSError), open(self.path, newline="") as file:
                return list(csv.DictReader(file))
            return []

        def write(self, rows: list[dict[str, Any]]) -> None:
            from project.infra.files import write_text

            text = io.StringIO()
            writer = csv.DictWriter(text, fieldnames=self.columns)
            writer.writeheader()
            writer.writerows(rows)
            write_text(self.path, text.getvalue())  # atomically

    return AppendingCsvLogger()


def wandb_logger(directory: Path, experiment: str, tags: dict[str, str], previous: Mapping[str, Any] | None) -> Any:
    from lightning.pytorch.loggers import WandbLogger

    run_id = (previous or {}).get("id")
    # W&B honours WANDB_MODE=offline (files under <run>/wandb; `wandb sync` uploads them later). Its own lines name the
    # run's paths unredacted; the summary says where the run is (the user's own setting wins).
    os.environ.setdefault("WANDB_SILENT", "true")
    labels = [f"{k}={v}"[:64] for k, v in tags.items()]  # W&B tags are short labels
    logger = WandbLogger(project=experiment, name=directory.name, save_dir=str(directory), id=run_id,
                         resume="allow" if run_id else None, tags=labels)  # fmt: skip
    # wandb.init now, so that its run id goes into manifest.json. W&B records sys.argv with the run: it sees the
    # command line with its secrets redacted, as every other record does.
    argv = sys.argv
    sys.argv = [argv[0], *redact_argv(argv[1:])]
    try:
        _ = logger.experiment
    except Exception as error:  # no API key, no network, a bad entity: W&B's own errors, each its own class
        raise UserError(f"--logger wandb: W&B cannot start ({reason(error)}); log in (wandb login), or train offline "
                        "(WANDB_MODE=offline) and sync later (wandb sync)") from None  # fmt: skip
    finally:
        sys.argv = argv
    return logger
