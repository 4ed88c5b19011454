"""Where runs live on disk (the README's "What a run leaves behind"), and finding one: the latest run of an
experiment, its best or last checkpoint, the run a checkpoint belongs to. Paths only (no torch), so the command line
can find a run's config.yaml before it loads. A run is `<exp-dir>/<exp-name>/<run-id>/`, the id its start time and a
random suffix."""

from __future__ import annotations

import contextlib
import datetime
import json
import os
import re
from pathlib import Path
from typing import Any

from project.infra.errors import UserError
from project.infra.redact import redact_text

CONFIG = "config.yaml"
MANIFEST = "manifest.json"
METRICS = "metrics.csv"
CURVES = "curves.png"
REPORT = "test_report.txt"
TEST_METRICS = "test_metrics.json"
CHECKPOINT_DIR = "checkpoints"
LAST = "last.ckpt"
BEST_GLOB = "best-*.ckpt"
LOCK = ".lock"  # held while a process runs the run (records.RunLock)
CONNECT_TIMEOUT = 10  # seconds: a database server that does not answer


def sqlite_url(database: Path) -> str:
    """The one place a SQLite store's URL is built (MLflow's local store, the sweep's study): SQLAlchemy escapes
    what a URL would read otherwise (`%`, `?`, `#`); a path that is not UTF-8 cannot be in a URL and gets one line."""
    from sqlalchemy.engine import URL

    path = Path(database).expanduser().resolve()
    try:
        path.as_posix().encode()
    except UnicodeEncodeError:
        raise UserError(
            f"{os.fsdecode(path)!a}: a database path must be UTF-8 text; choose another --exp-dir"
        ) from None
    return URL.create("sqlite", database=path.as_posix()).render_as_string()


def sqlite_file(url: str) -> Path | None:
    """The file a sqlite:/// URL names, or None for any other store. SQLite in memory keeps nothing: one line."""
    from sqlalchemy.engine import make_url

    if not url.startswith("sqlite"):
        return None
    try:
        database = make_url(url).database
    except Exception:  # SQLAlchemy's ArgumentError, or a ValueError from a port that is not a number
        raise UserError(f"{redact_text(url)} is not a database URL (sqlite:///PATH)") from None
    if database in (None, "", ":memory:") or "mode=memory" in url:
        raise UserError(f"{redact_text(url)}: SQLite in memory keeps nothing once the command ends; name a file")
    return Path(database)


def table_names(url: str) -> list[str]:
    """The tables of the database at `url` (SQLAlchemy's URL), after one try to connect: MLflow and Optuna would
    retry a database that cannot be reached for minutes."""
    from sqlalchemy import create_engine, inspect

    engine = create_engine(url, **engine_options(url))
    try:
        return sorted(inspect(engine).get_table_names())
    finally:
        engine.dispose()


def engine_options(url: str) -> dict[str, Any]:
    """SQLAlchemy's engine options for a database server: a host that takes the connection and never answers is an
    error after CONNECT_TIMEOUT seconds (drivers wait for good by default)."""
    server = url.split(":", 1)[0].split("+")[0] in ("postgresql", "mysql", "mariadb")
    return {"connect_args": {"connect_timeout": CONNECT_TIMEOUT}} if server else {}


def experiment_dir(exp_dir: str | Path, exp_name: str) -> Path:
    return Path(exp_dir).expanduser() / exp_name


def latest_run(experiment: Path) -> Path | None:
    """The newest run directory (by its manifest's start time; a run renamed by hand is no newer for its name) that
    holds a checkpoint, or that trained and did not finish: an older run is never continued for a newer one killed
    before its first checkpoint. A test-only run and a finished smoke test (--fast-dev-run) keep no checkpoint, and
    are passed over."""
    if not experiment.is_dir():
        return None

    def manifest(run: Path) -> Any:
        try:
            return json.loads((run / MANIFEST).read_text())
        except (OSError, ValueError):
            return None

    def trained_or_training(run: Path, manifest: Any) -> bool:
        if any((run / CHECKPOINT_DIR).glob("*.ckpt")):
            return True
        if manifest is None:
            return (run / CONFIG).is_file()  # killed as its records were first written
        return (
            isinstance(manifest, dict) and manifest.get("mode") != "test" and manifest.get("exit_status") != "finished"
        )

    def started(run: Path, manifest: Any) -> float:
        with contextlib.suppress(ValueError, TypeError, KeyError):
            return datetime.datetime.fromisoformat(manifest["start_time"]).timestamp()
        with contextlib.suppress(ValueError):  # no manifest yet (killed as it started): its name is its start time
            return datetime.datetime.strptime(run.name[:15], "%Y%m%d-%H%M%S").timestamp()
        return run.stat().st_mtime

    found = [(run, manifest(run)) for run in experiment.iterdir() if run.is_dir() and not run.is_symlink()]
    found.sort(key=lambda pair: started(*pair))
    return next((run for run, read in reversed(found) if trained_or_training(run, read)), None)


def best_checkpoint(run: Path) -> Path | None:
    """The checkpoint the run tested (its manifest names it); before its test, the best of its latest epoch (a version
    `-v1` a resumed run wrote beside a file left by its killed session is the newer)."""
    with contextlib.suppress(OSError, ValueError, KeyError, TypeError, AttributeError):
        tested = run / CHECKPOINT_DIR / Path(json.loads((run / MANIFEST).read_text())["test"]["checkpoint"]).name
        if tested.is_file():
            return tested
    versions = {path: re.fullmatch(r"(.*?)(?:-v(\d+))?", path.stem) for path in (run / CHECKPOINT_DIR).glob(BEST_GLOB)}
    found = sorted(versions, key=lambda path: (versions[path][1], int(versions[path][2] or 0)))
    return found[-1] if found else None


def find_checkpoint(spec: str, exp_dir: str | Path, exp_name: str, flag: str) -> Path:
    """The checkpoint `spec` names: a path, or `best`/`last` of the latest run of `exp_name` (not yet read)."""
    if spec not in ("best", "last"):
        path = Path(spec).expanduser()
        if not path.is_file():
            raise UserError(f"{flag}: {path} {'is not a file' if path.exists() else 'does not exist'}")
        return path
    experiment = experiment_dir(exp_dir, exp_name)
    run = latest_run(experiment)
    if run is None:
        raise UserError(
            f"no checkpoint found for --exp-name {exp_name} in {experiment}: train first, or pass {flag} PATH"
        )
    path = best_checkpoint(run) if spec == "best" else run / CHECKPOINT_DIR / LAST
    if path is None or not path.is_file():
        raise UserError(
            f"{flag} {spec}: {run / CHECKPOINT_DIR} has no {spec} checkpoint (the latest run of --exp-name "
            f"{exp_name} stopped, or is still running, before it saved one): train again, or pass {flag} PATH"
        )
    return path


def run_of(checkpoint: Path) -> Path | None:
    """The run directory a checkpoint was written in, or None for a checkpoint file kept anywhere else."""
    run = checkpoint.parent.parent
    return run if checkpoint.parent.name == CHECKPOINT_DIR and (run / CONFIG).is_file() else None
