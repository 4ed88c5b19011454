"""Put runs into MLflow after the fact: `python -m project.sync RUN_DIR [RUN_DIR ...]`.

The run directory is the record; an MLflow run is a view of it. Sync gives the view what the directory holds: the
parameters and tags a live run logs, every point of metrics.csv with its step and time, the run's files, the tested
checkpoint as an MLflow model and the status the run ended with. It goes to the store MLFLOW_TRACKING_URI names, else
to the run's own local store (<exp-dir>/mlflow.db), and finds the MLflow run again by the tag `project_run_id` (or the
id manifest.json recorded): a second sync adds nothing. A live run ends by calling `sync_run` itself, so a server that
missed part of it gets the rest then. A run whose process died without recording how it ended ("running", and no
process holds its lock) ends FAILED: it crashed (killed outright, out of memory, a lost node); --resume continues it.
"""

from __future__ import annotations

import collections
import contextlib
import csv
import datetime
import hashlib
import importlib.metadata
import json
import os
import signal
import sys
import time
from collections.abc import Mapping
from pathlib import Path
from typing import Any

from project.infra import cli, runs, tracking
from project.infra.errors import Interrupted, RunStopped, UserError, exit_process, run_command
from project.infra.redact import redact_path, redact_text

TAG = "project_run_id"  # names the run directory in any store
FILES_TAG = "project_files"  # the digests of the run's files the MLflow run holds
STATUS = {"finished": "FINISHED", "interrupted": "KILLED", "pruned": "KILLED"}  # any other end: FAILED
FILES = (runs.CONFIG, runs.MANIFEST, runs.METRICS, runs.CURVES, runs.REPORT, runs.TEST_METRICS)
EXAMPLE_BATCH = 2  # torch.export makes a batch of 1 a constant: the example batch keeps the axis dynamic
BATCH = 1000  # MLflow's limit of metrics in one log_batch


def main(argv: list[str] | None = None) -> int:
    parser = cli.Parser(  # its mistakes, like project.run's: one line, redacted
        prog="python -m project.sync",
        usage="python -m project.sync RUN_DIR [RUN_DIR ...]  (see --help)",
        description=__doc__.split("\n\n")[0],
    )
    parser.add_argument("run_dirs", nargs="+", type=Path, metavar="RUN_DIR", help="<exp-dir>/<exp-name>/<run-id>")
    parser.add_argument("--debug", action="store_true", help="a traceback instead of one line on errors")
    args = parser.parse_args(argv)
    return run_command(lambda: sync(args.run_dirs), args.debug)


def sync(run_dirs: list[Path]) -> None:
    """Every run checked, locked and its store reached before the first is changed."""
    from project.infra.records import RunLock

    locks, found, clients = [], [], {}
    unique: dict[Path, Path] = {}
    for run_dir in run_dirs:
        unique.setdefault(run_dir.resolve(), run_dir)  # a run named twice (or through a link) is synced once
    try:
        for run_dir in unique.values():
            read_run(run_dir)  # a run directory, before its lock is taken
            locks.append(RunLock(run_dir / runs.LOCK))
            locks[-1].acquire()  # a run still running is synced by its own process at its end
            manifest = read_run(run_dir)
            metric_points(run_dir)  # every value readable, before the first run is changed
            found.append((run_dir, manifest, tracking.store_uri(run_dir.resolve().parent.parent)))
        for _, _, uri in found:
            clients[uri] = clients.get(uri) or tracking.open_client(uri)
        for run_dir, manifest, uri in found:
            client, run, made = clients[uri], None, False
            try:
                run, reopened = find(client, uri, run_dir.resolve(), manifest, run_tags(manifest, run_dir))
                made = not reopened
                run_id, problem, model_uri = sync_run(client, uri, run_dir.resolve(), manifest, run.info.run_id)
                made = False  # MLflow holds the whole run now: a manifest that cannot be rewritten leaves it there
                record(client, uri, run_dir, manifest, run_id, problem, model_uri)
            except Interrupted as stop:  # SIGTERM, Ctrl-C: what MLflow holds is kept, and found again next time
                raise RunStopped(f"stopped by {signal.Signals(stop.signum).name}: {run_dir} is in MLflow in part; "
                                 "the same command sends the rest", 128 + stop.signum) from None  # fmt: skip
            except Exception as error:  # a server gone mid-way (--debug: the traceback)
                later = "; the same command sends the rest once MLflow answers" if tracking.unreachable(error) else ""
                if made:  # not a RUNNING run for good: the one this command made is deleted (MLflow can restore it)
                    with contextlib.suppress(Exception):  # a server gone: the same command finds it and goes on
                        client.delete_run(run.info.run_id)
                raise UserError(f"{run_dir}: not synced ({tracking.reason(error)}){later}") from error
            note = f" ({redact_text(problem)})" if problem else ""
            print(f"{redact_path(run_dir)}: MLflow run {run_id} at {redact_path(uri)}{note}")
    finally:
        for lock in locks:
            lock.release()


def record(client: Any, uri: str, run_dir: Path, manifest: dict, run_id: str, problem: Any, model_uri: Any) -> None:
    """manifest.json names the MLflow run that now holds the run, as a live run's does (and MLflow gets that copy)."""
    from project.infra.records import write_manifest

    before = manifest.get("trackers", {}).get("mlflow") or {}
    model_uri = model_uri or (before.get("model_uri") if before.get("run_id") == run_id else None)
    run = client.get_run(run_id)
    entry = {"tracking_uri": redact_path(uri), "experiment_id": run.info.experiment_id, "run_id": run_id,
             "complete": problem is None} | ({"model_uri": model_uri} if model_uri else {})  # fmt: skip
    if entry != before:
        write_manifest(run_dir, {**manifest, "trackers": {**manifest.get("trackers", {}), "mlflow": entry}})
        send_files(client, run, [run_dir / runs.MANIFEST])


def read_run(run_dir: Path) -> dict[str, Any]:
    """A run directory's manifest, its config.yaml checked too (sync sends its values)."""
    from project.infra.cli import load_config
    from project.infra.records import read_manifest

    if not (run_dir / runs.MANIFEST).is_file() or not (run_dir / runs.CONFIG).is_file():
        raise UserError(f"{run_dir} is not a run directory (no {runs.MANIFEST} and {runs.CONFIG})")
    try:
        check_names(load_config(run_dir / runs.CONFIG) or {})
    except ValueError as error:
        raise UserError(f"{run_dir / runs.CONFIG}: {error}; restore it") from None
    return read_manifest(run_dir)


def check_names(names: Any) -> None:
    """Names MLflow takes for a parameter or a metric, checked before any run is changed (MLflow checks each call)."""
    from mlflow.utils.validation import MAX_ENTITY_KEY_LENGTH, path_not_unique, validate_param_and_metric_name

    for name in map(str, names):
        if not validate_param_and_metric_name(name) or path_not_unique(name) or len(name) > MAX_ENTITY_KEY_LENGTH:
            raise ValueError(f"{name[:80]!r} is not a name MLflow takes (letters, digits, _ - . / : and spaces)")


def metric_points(run_dir: Path) -> dict[str, list]:
    """metrics.csv's points by metric: (value, time, step); a value that is not a number, or a name MLflow refuses,
    is one line."""
    from mlflow.entities import Metric

    points, now, line = collections.defaultdict(list), int(time.time() * 1000), 1
    if not (run_dir / runs.METRICS).is_file():
        return points
    try:
        with open(run_dir / runs.METRICS, newline="") as file:
            reader = csv.DictReader(file)
            names = [name for name in reader.fieldnames or [] if name not in ("step", "timestamp")]
            for line, row in enumerate(reader, start=2):  # noqa: B007 (the error names it)
                stamp, step = int(float(row.pop("timestamp", "") or now)), int(float(row.pop("step", "") or 0))
                if max(abs(stamp), abs(step)) >= 2**63:  # what a store keeps as an integer
                    raise OverflowError
                for key, value in row.items():
                    if value:
                        points[key].append(Metric(key, float(value), stamp, step))
    except (TypeError, ValueError, OverflowError, csv.Error) as error:  # a UnicodeDecodeError is a ValueError
        what = "not UTF-8 text" if isinstance(error, UnicodeError) else "not a number where one belongs"
        if isinstance(error, csv.Error):  # raised while the next line is read
            what, line = f"not a CSV line ({error})", reader.line_num + 1
        raise UserError(f"{run_dir / runs.METRICS}, line {line}: {what}; restore it") from None
    try:
        check_names(names)
    except ValueError as error:
        raise UserError(f"{run_dir / runs.METRICS}, line 1: {error}; restore it") from None
    return points


def sync_run(client: Any, uri: str, run_dir: Path, manifest: Mapping[str, Any], run_id: str) -> tuple:
    """What the MLflow run `run_id` (see `find`) lacks of `run_dir`; the caller holds the run's lock. Returns the MLflow
    run's id, why the model was not logged (or None) and the model's URI if logged now."""
    from mlflow.entities import RunTag

    from project.infra.cli import load_config

    run = client.get_run(run_id)
    held = run.data
    tags = [RunTag(k, v) for k, v in run_tags(manifest, run_dir).items() if held.tags.get(k) != v]
    config = (load_config(run_dir / runs.CONFIG) if (run_dir / runs.CONFIG).is_file() else {}) or {}
    # As a live run logs them: the first session's values as parameters, what a resumed run went on with as tags.
    sessions, first = manifest.get("resumed", []), dict(config)
    for session in reversed(sessions):
        changed = session.get("changed") if isinstance(session.get("changed"), dict) else {}
        first |= {key: change[0] for key, change in changed.items() if isinstance(change, list) and len(change) == 2}
    who = {key: manifest[key] for key in ("user", "command") if manifest.get(key) is not None}
    log_params(client, run_id, {**first, **who}, held.params, tags)
    if sessions:
        last = {key: sessions[-1][key] for key in ("user", "command") if sessions[-1].get(key) is not None}
        log_params(client, run_id, {**config, **last}, client.get_run(run_id).data.params, [])

    wanted, now = metric_points(run_dir), int(time.time() * 1000)
    missing = []
    for key, points in wanted.items():  # a point is (key, step, value); one logged twice counts twice
        there = collections.Counter((m.step, str(m.value)) for m in client.get_metric_history(run_id, key))
        for point in points:
            there[point.step, str(point.value)] -= 1
            if there[point.step, str(point.value)] < 0:
                missing.append(point)
    for start in range(0, len(missing), BATCH):
        client.log_batch(run_id, metrics=missing[start : start + BATCH])

    figures = sorted(path.name for path in run_dir.glob("*.png"))  # the curves and the task's own figures
    send_files(client, run, [run_dir / name for name in dict.fromkeys([*FILES, *figures])])

    problem = model_uri = None
    checkpoint = tested_checkpoint(run_dir, manifest)
    if checkpoint is not None and not has_model(client, run):
        try:
            model_uri = log_model(uri, run_id, run.info.experiment_id, checkpoint)
        except Exception as error:
            if tracking.unreachable(error):
                raise
            problem = f"the model was not logged ({tracking.reason(error)})"
    status = STATUS.get(manifest.get("exit_status"), "FAILED")
    if client.get_run(run_id).info.status != status:
        client.set_terminated(run_id, status, milliseconds(manifest.get("end_time")) or now)
    return run_id, problem, model_uri


def send_files(client: Any, run: Any, paths: list[Path]) -> None:
    """Each file the MLflow run lacks or holds other bytes of (a resumed run rewrites config.yaml at the same size);
    the tag FILES_TAG keeps what was sent. A link is no file of a run: what it points to is never sent."""
    try:
        sent = {str(k): str(v) for k, v in json.loads(run.data.tags.get(FILES_TAG) or "{}").items()}
    except (ValueError, TypeError, AttributeError):  # a tag edited by hand: send everything again
        sent = {}
    now = dict(sent)
    for path in paths:
        if path.is_file() and not path.is_symlink():
            now[path.name] = hashlib.sha256(path.read_bytes()).hexdigest()[:16]
            if sent.get(path.name) != now[path.name]:
                client.log_artifact(run.info.run_id, str(path))
    if now != sent:
        client.set_tag(run.info.run_id, FILES_TAG, json.dumps(now, sort_keys=True))


def find(client: Any, uri: str, run_dir: Path, manifest: Mapping[str, Any], tags: dict[str, str]) -> tuple[Any, bool]:
    """The MLflow run of `run_dir` in this store (by its tag, else by the id its manifest recorded), and True; or a
    new one, with `tags`, and False. A deleted run is not found."""
    from mlflow.exceptions import MlflowException

    name = manifest.get("experiment") or run_dir.parent.name
    experiment = client.get_experiment_by_name(name)
    if experiment is not None and experiment.lifecycle_stage != "active":
        raise UserError(f"MLflow's experiment {name} is deleted: restore it (mlflow experiments restore "
                        f"--experiment-id {experiment.experiment_id}), or remove it for good (mlflow gc)")  # fmt: skip
    if experiment is not None:
        found = client.search_runs([experiment.experiment_id], f"tags.{TAG} = '{manifest['run_id']}'")
        found = [run for run in found if not copied_from(run, run_dir)]
        if found:
            return found[0], True
    recorded = manifest.get("trackers", {}).get("mlflow") or {}
    if recorded.get("tracking_uri") == redact_path(uri) and recorded.get("run_id"):
        try:
            run = client.get_run(recorded["run_id"])
            ours = run.data.tags.get(TAG, manifest["run_id"]) == manifest["run_id"]  # not another run directory's
            if run.info.lifecycle_stage == "active" and ours and not copied_from(run, run_dir):
                return run, True
        except MlflowException:
            pass
    if experiment is None:
        location = tracking.artifact_location(uri, run_dir.parent.parent, name)
        experiment_id = client.create_experiment(name, artifact_location=location)
    else:
        experiment_id = experiment.experiment_id
    started = milliseconds(manifest.get("start_time"))
    return client.create_run(experiment_id, start_time=started, tags=tags, run_name=run_dir.name), False


def copied_from(run: Any, run_dir: Path) -> bool:
    """Whether `run` is the MLflow run of another run directory that still exists: `run_dir` is a copy of it, and
    must not write into its record (a moved run directory finds its run again)."""
    recorded = run.data.tags.get("run_dir") or ""  # absolute since 2026-12 (relative before: it says nothing)
    return os.path.isabs(recorded) and os.path.isdir(recorded) and not os.path.samefile(recorded, run_dir)


def run_tags(manifest: Mapping[str, Any], run_dir: Path) -> dict[str, str]:
    """The tags a live run gets (records.Run.tags), from its manifest."""
    git = manifest.get("git") or {}
    found = {**manifest.get("tags", {}), "user": manifest.get("user"), "host": manifest.get("host"),
             "mode": manifest.get("mode"), "run_dir": redact_path(run_dir.resolve()),
             TAG: manifest.get("run_id") or run_dir.name}  # fmt: skip
    if git.get("commit"):
        found |= {"git_commit": git["commit"], "git_dirty": str(git.get("dirty"))}
    return {key: str(value) for key, value in found.items() if value is not None}


def log_params(client: Any, run_id: str, params: Mapping[str, Any], held: Mapping[str, str], tags: list) -> None:
    """Values cut at MLflow's limit; those `held` already are skipped. MLflow refuses to change a param: a run that
    ran on with another value (resumed) records it as the tag `resumed.<key>`."""
    from mlflow.entities import Param, RunTag
    from mlflow.utils.validation import MAX_PARAM_VAL_LENGTH

    flat = {str(key): str(value)[:MAX_PARAM_VAL_LENGTH] for key, value in params.items()}
    tags = [*tags, *(RunTag(f"resumed.{k}", v) for k, v in flat.items() if held.get(k, v) != v)]
    new = [Param(k, v) for k, v in flat.items() if k not in held]
    if new or tags:
        client.log_batch(run_id, params=new, tags=tags)


def tested_checkpoint(run_dir: Path, manifest: Mapping[str, Any]) -> Path | None:
    """The checkpoint the run tested; one the run kept is found in the run directory, wherever that was moved."""
    recorded = (manifest.get("test") or {}).get("checkpoint")
    if not recorded:
        return None
    path = Path(recorded)
    moved = run_dir / runs.CHECKPOINT_DIR / path.name
    return path if path.is_file() else moved if moved.is_file() else None


def has_model(client: Any, run: Any) -> bool:
    from mlflow.entities import LoggedModelStatus

    found = client.search_logged_models([run.info.experiment_id], f"source_run_id = '{run.info.run_id}'")
    return any(model.status == LoggedModelStatus.READY for model in found)


def log_model(uri: str, run_id: str, experiment_id: str, checkpoint: Path) -> str:
    """The network of `checkpoint` as an MLflow model, in torch.export's pt2 format (MLflow's default: loading it
    runs no pickle and needs neither this project nor Lightning), with a signature and an example of raw pixels;
    metadata["project"] holds what project.predict needs to feed it. Returns its URI."""
    # mlflow.pytorch imports pytorch_lightning, if installed, for an autologging callback this run never uses
    # (2 s, and its log lines); a None entry in sys.modules makes that import fail, which mlflow.pytorch allows.
    sys.modules.setdefault("pytorch_lightning", None)
    import mlflow.pytorch
    import torch
    from mlflow.models import infer_signature

    from project.export import example_input
    from project.infra.checkpoints import read_model

    network, spec = read_model(checkpoint)  # weights only: a checkpoint may come from anyone
    example = example_input(spec, EXAMPLE_BATCH).numpy()
    with tracking.keep_environment("MLFLOW_TRACKING_URI"), torch.no_grad():
        mlflow.set_tracking_uri(uri)
        # MLflow files a logged model under the fluent API's current experiment (else "Default"), not its run's.
        mlflow.set_experiment(experiment_id=experiment_id)
        signature = infer_signature(example, network(torch.from_numpy(example)).numpy())
        return mlflow.pytorch.log_model(
            network, name="model", run_id=run_id, input_example=example, signature=signature,
            metadata={"project": spec},
            # explicit: inferring them loads the model in another process (seconds)
            pip_requirements=[f"torch=={importlib.metadata.version('torch')}"],
            validate_serving_input=False,  # tests load the logged model and predict with it instead
        ).model_uri  # fmt: skip


def milliseconds(when: Any) -> int | None:
    try:
        return int(datetime.datetime.fromisoformat(when).timestamp() * 1000)
    except (TypeError, ValueError):  # none recorded (a run still running), or not a time
        return None


if __name__ == "__main__":
    exit_process(main())
