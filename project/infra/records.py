"""One run's records, whatever the tracker: its directory (runs.py), the lock that keeps a second process out,
config.yaml and manifest.json, the test reports and plots, and the one-screen summary at the end.

Every check comes before the first write. `Run(...)` only names the run; the Trainer is built; `Run.open` reads the
manifest of the run it continues, takes the lock, creates a new run's directory and opens the tracker runs (a resumed
tracker run changes only once training starts); config.yaml, manifest.json and the lock's note are written when the
Trainer starts (`Run.setup`). A command that fails before then leaves every run, its lock file and its tracker run as
they were, and a new run leaves no directory and no tracker run. Only global rank 0 writes and opens tracker runs.
"""

from __future__ import annotations

import argparse
import contextlib
import datetime
import getpass
import json
import os
import platform
import re
import secrets
import shlex
import shutil
import socket
import subprocess
import sys
import time
from pathlib import Path
from typing import Any

import lightning.pytorch as pl
import torch
import yaml
from lightning.pytorch.callbacks import ModelCheckpoint

from project.infra import checkpoints, plots, runs
from project.infra.cli import load_config
from project.infra.errors import Interrupted, RunStopped, UserError
from project.infra.files import write_file, write_text
from project.infra.redact import redact, redact_argv, redact_path, redact_text
from project.infra.tracking import Trackers

try:
    import fcntl
except ImportError:  # Windows: no flock; runs there are not locked
    fcntl = None

# Rank 0 names the run directory here; Lightning's DDP launcher starts the other processes with its environment.
RUN_DIR_ENV = "PROJECT_RUN_DIR"
# The test report goes on screen too while it fits there (with the summary); beyond this, only into its file.
MAX_REPORT_LINES_ON_SCREEN = 40


def is_global_zero() -> bool:
    """Whether this process is global rank 0, before the Trainer knows: Lightning reads the launcher's RANK,
    LOCAL_RANK or SLURM_PROCID; NODE_RANK covers the first process of every other node."""
    from lightning.fabric.utilities.rank_zero import rank_zero_only

    return getattr(rank_zero_only, "rank", 0) == 0 and os.environ.get("NODE_RANK", "0") == "0"


def open_run(args: argparse.Namespace, config: dict[str, Any], trackers: Trackers, resume_from: Path | None,
             task: Any) -> Run:  # fmt: skip
    """A Run opened at once, for a caller that builds its Trainer afterwards (benchmarks/)."""
    run = Run(args, config, trackers, resume_from, task)
    run.open()
    return run


def finished(checkpoint: Path) -> bool:
    """Whether the run of `checkpoint` ended "finished" (one killed in its test or its reports did not); a checkpoint
    kept outside a run has nothing left to complete."""
    run = runs.run_of(checkpoint)
    return run is None or read_manifest(run).get("exit_status") == "finished"


def check_split(checkpoint: Path, datamodule: Any) -> None:
    """A run is continued and tested on the split it trained on: split sizes that differ from its manifest's (its data
    split otherwise by another release of this project) would mix its test and training samples."""
    run = runs.run_of(checkpoint)
    recorded = read_manifest(run).get("data", {}).get("split_sizes") if run is not None else None
    try:
        now = dict(datamodule.split_sizes)
    except (AttributeError, NotImplementedError, TypeError):  # a datamodule without sizes
        return
    differ = [f"{name} {recorded[name]} -> {now[name]}" for name in sorted(recorded.keys() & now.keys())
              if recorded[name] != now[name]] if isinstance(recorded, dict) else []  # fmt: skip
    if differ:
        raise UserError(f"{run}: its data would split otherwise now ({', '.join(differ)}), mixing its test and "
                        "training samples; start a new run to train on this split")  # fmt: skip


class Run(pl.Callback):
    """One run's records. As a Lightning callback it writes config.yaml and manifest.json when the Trainer starts and
    notes the hardware and data sizes; as a context manager it records how the run ended, however it ends."""

    def __init__(self, args: argparse.Namespace, config: dict[str, Any], trackers: Trackers, resume_from: Path | None,
                 task: Any) -> None:  # fmt: skip
        """The run `resume_from` belongs to, or a new one, named; its checkpoint callbacks keep the best by --monitor
        in the direction the `task` says is better. Reads and writes nothing."""
        self.args, self.zero, self.config = args, is_global_zero(), redact(config)
        # Every rank has the loggers Lightning's callbacks ask for; only rank 0's write (and have tracker runs).
        self.trackers = trackers if self.zero else Trackers([])
        continued = runs.run_of(resume_from) if resume_from is not None else None
        experiment = runs.experiment_dir(args.exp_dir, args.exp_name)
        if continued is not None:
            self.directory = continued
        elif self.zero:  # its start time and 32 random bits; `open` creates it, and never one that exists
            self.directory = experiment / f"{time.strftime('%Y%m%d-%H%M%S')}-{secrets.token_hex(4)}"
        else:  # torchrun's other ranks never write; Lightning's launcher tells its ranks rank 0's directory
            self.directory = Path(os.environ.get(RUN_DIR_ENV) or experiment / "rank-0")
        self.new, self.started, self.closed = continued is None, False, False
        self.created: list[Path] = []  # the folders this command made for a new run, the run's own last
        self.command = "python -m project.run " + shlex.join(redact_argv(list(args.argv)))
        self.git = git_state() if self.zero else {}
        self.lock = RunLock(self.directory / runs.LOCK)
        self.previous: dict[str, Any] = {}  # the manifest of the run continued
        self.manifest: dict[str, Any] = {}
        self.test_record: dict[str, Any] | None = None  # test_metrics.json, once written
        self.last_checkpoint = self.directory / runs.CHECKPOINT_DIR / runs.LAST
        self.callbacks: list[Any] = [self]
        if not args.only_test:
            last, mode = self.last_checkpoint, "max" if task.higher_is_better(args.monitor) else "min"
            self.callbacks += [
                ModelCheckpoint(dirpath=last.parent, filename="best-epoch{epoch:03d}", monitor=args.monitor, mode=mode,
                                auto_insert_metric_name=False),
                ModelCheckpoint(dirpath=last.parent, filename=last.stem, enable_version_counter=False),
            ]  # fmt: skip

    def on_load_checkpoint(self, trainer: pl.Trainer, pl_module: pl.LightningModule, checkpoint: dict) -> None:
        # before any callback loads its state (resume, and the test of a checkpoint)
        if trainer.checkpoint_callbacks:  # one folder for all, rank 0's on every process
            follow_moved_run(checkpoint, trainer.checkpoint_callbacks[0].dirpath)

    @property
    def loggers(self) -> list[Any]:
        return self.trackers.loggers

    def open(self, trainer: pl.Trainer | None = None) -> None:
        """The last checks, then the first writes: the manifest of the run continued is read, the lock taken (a
        process that does not get it writes nothing), a new run's directory created, the tracker runs opened. The
        `trainer`, built before, gets the loggers."""
        try:
            if self.zero and not self.new:
                if self.args.fast_dev_run:
                    raise UserError("--fast-dev-run: a smoke test does not continue a run; run it without --resume")
                self.previous = read_manifest(self.directory)
            elif self.zero:
                self.created = create_run_dir(self.directory)
                os.environ[RUN_DIR_ENV] = str(self.directory)
            if self.zero:
                self.lock.acquire()
            tags = self.tags(tracker=True) if self.zero else {}
            self.trackers.open(self.directory, self.args, self.previous, tags)
        except BaseException:
            self.abandon()
            raise
        if trainer is not None:
            trainer.loggers = self.loggers

    def tags(self, tracker: bool = False) -> dict[str, str]:
        """The --tag values; for the tracker run, also who ran what where."""
        tags = redact(dict(tag.split("=", 1) for tag in self.args.tag))
        if not tracker:
            return tags
        git = {"git_commit": self.git["commit"], "git_dirty": str(self.git["dirty"])} if self.git["commit"] else {}
        mode = "test" if self.args.only_test else "train"  # and ours win over --tag: sync finds a run by them
        return {**tags, "user": user(), "host": socket.gethostname(), **git, "mode": mode,
                "run_dir": redact_path(self.directory.resolve())}  # fmt: skip

    def setup(self, trainer: pl.Trainer, pl_module: pl.LightningModule, stage: str) -> None:
        if not (self.zero and trainer.is_global_zero):
            return
        if not self.started:
            self.start()
        self.manifest["hardware"] = hardware(trainer)
        with contextlib.suppress(AttributeError, NotImplementedError, TypeError):  # a datamodule without sizes
            self.manifest.setdefault("data", {})["split_sizes"] = dict(trainer.datamodule.split_sizes)
        self.write_manifest()

    def start(self) -> None:
        """The run's first writes; everything they hold is gathered first, so a failure leaves the run as it was."""
        session = {"command": self.command, "start_time": now(), "user": user(), "host": socket.gethostname(),
                   "pid": os.getpid(), "git": self.git}  # fmt: skip
        if self.previous:
            old = load_config(self.directory / runs.CONFIG)  # the parser has read and checked it already
            changed = {k: [old.get(k), v] for k, v in self.config.items() if old.get(k) != v}
            resumed = {**session, "from": redact_path(self.args.resume), "changed": changed, "tags": self.tags()}
            self.manifest = {**self.previous, "experiment": self.args.exp_name, "end_time": None,
                             "exit_status": "running",
                             "resumed": [*self.previous.get("resumed", []), resumed]}  # fmt: skip
        else:
            self.manifest = {"run_id": self.directory.name, "experiment": self.args.exp_name,
                             "mode": "test" if self.args.only_test else "train", **session, "end_time": None,
                             "exit_status": "running", "versions": versions(), "seed": self.args.seed,
                             "data": {"dataset": self.args.dataset}, "tags": self.tags()}  # fmt: skip
        self.manifest["trackers"] = self.tracker_runs()
        self.started = True
        self.lock.note(f"pid {session['pid']} on {session['host']} since {session['start_time']} ({self.command})\n")
        # Before this session is recorded: killed in between, the next one rewinds from the same session's start.
        if self.previous and self.previous.get("exit_status") != "finished":  # killed: it may have logged beyond
            began, since = [self.previous, *self.previous.get("resumed", [])][-1].get("start_time"), 0
            with contextlib.suppress(TypeError, ValueError):  # no time recorded: all it has from the checkpoint on
                since = int(datetime.datetime.fromisoformat(began).timestamp() * 1000)
            self.trackers.rewind(checkpoints.read(Path(self.args.resume))["global_step"], since)
        write_text(self.directory / runs.CONFIG, yaml.safe_dump(self.config, sort_keys=True))
        self.write_manifest()
        self.trackers.start({**self.config, "user": session["user"], "command": self.command})

    def best_checkpoint(self, trainer: pl.Trainer) -> Path | None:
        """The best checkpoint's path, the same on every process (Lightning broadcasts rank 0's directory), so each
        rank tests the same weights whoever launched it (Lightning, torchrun, SLURM)."""
        found = [c for c in trainer.checkpoint_callbacks if c.monitor == self.args.monitor and c.best_model_path]
        return Path(found[0].best_model_path) if found else None

    def best_score(self, trainer: pl.Trainer) -> float | None:
        found = [c.best_model_score for c in trainer.checkpoint_callbacks if c.monitor == self.args.monitor]
        return None if not found or found[0] is None else float(found[0])

    def test_metrics(self, trainer: pl.Trainer) -> dict[str, float]:
        """The test scores as test_metrics.json holds them (Lightning keeps logged values in float32)."""
        logged = {k: float(v) for k, v in trainer.callback_metrics.items() if k.startswith("test/")}
        written = {f"test/{k}": v for k, v in (self.test_record or {}).items() if isinstance(v, float)}
        return logged | {k: v for k, v in written.items() if k in logged}

    def log_model(self, checkpoint: Path | None) -> None:
        if self.zero and checkpoint is not None:
            self.trackers.log_model(checkpoint)

    def finish(self, trainer: pl.Trainer, solver: Any, tested: Path | None) -> None:
        """The task's test report, scores and figures, the curves, the trackers' copies, then the summary on screen."""
        if not (self.zero and trainer.is_global_zero):
            return
        report = solver.task.report(solver.test_state) if solver.test_state is not None else None
        epoch = checkpoints.read(tested).get("epoch") if tested is not None else None
        names = [runs.CONFIG, runs.CURVES, runs.METRICS]
        if report is not None:
            loss = trainer.callback_metrics.get("test/loss")
            where = {"checkpoint": redact_path(tested) if tested else None, "checkpoint_epoch": epoch}
            where |= {"fast_dev_run": True} if self.args.fast_dev_run else {}  # one batch: no score of the model
            self.test_record = {**report.scores, "loss": None if loss is None else float(loss), **report.details,
                                **where}  # fmt: skip
            self.manifest["test"] = {**report.scores, **where}
            write_text(self.directory / runs.REPORT, report.text + "\n")
            write_text(self.directory / runs.TEST_METRICS, json.dumps(self.test_record, indent=2) + "\n")
            for name, draw in report.figures.items():
                write_file(self.directory / name, draw)
            names += [runs.REPORT, runs.TEST_METRICS, *report.figures]
        marked, metric = None if self.args.only_test else epoch, next(iter(solver.task.metrics), "loss")
        write_file(self.directory / runs.CURVES, lambda path: plots.save_curves(
            self.directory / runs.METRICS, path, metric, marked, self.args.monitor))  # fmt: skip
        self.trackers.finish(self.directory, [self.directory / name for name in names], self.test_record)
        problems = self.close("finished")
        if report is not None and report.text.count("\n") < MAX_REPORT_LINES_ON_SCREEN:
            print(report.text)
        print(self.summary(report, tested, self.best_score(trainer), problems))

    def __enter__(self) -> Run:
        return self

    def __exit__(self, kind: type | None, error: BaseException | None, traceback: Any) -> None:
        if error is None or self.closed:
            return
        stopped = isinstance(error, (Interrupted, KeyboardInterrupt)) or (
            isinstance(error, RunStopped) and error.exit_code > 128
        )
        try:
            if not self.started:
                self.abandon()  # nothing was written: leave the run (or no trace of a new one) as it was
            else:  # a stopped or failed run says what its trackers did not get, as a finished one's summary does
                pruned = type(error).__name__ == "TrialPruned"  # a sweep stopped a hopeless trial (no Optuna import)
                status = "interrupted" if stopped else "pruned" if pruned else f"failed: {type(error).__name__}"
                for problem in self.close(status):
                    print(redact_text(f"warning: {problem}"), file=sys.stderr, flush=True)
        finally:
            if isinstance(error, RunStopped) and error.exit_code > 128 and torch.distributed.is_initialized():
                # Stopped together (callbacks.GracefulStop): each process leaves once rank 0's records are written,
                # as Lightning's launcher kills rank 0 when another of its processes has exited with a non-zero code.
                with contextlib.suppress(Exception):  # one that died meanwhile: the others leave on their own
                    torch.distributed.barrier()

    def tracker_runs(self) -> dict[str, Any]:
        """Each tracker's run of this run directory: this session's, and those of earlier sessions that logged to
        another tracker (a run resumed with another --logger keeps its link to them)."""
        now = self.trackers.describe()
        earlier = {name: entry | {"complete": False} if isinstance(entry, dict) and "complete" in entry else entry
                   for name, entry in self.previous.get("trackers", {}).items() if name not in now}  # fmt: skip
        return {**earlier, **now}

    def close(self, status: str) -> list[str]:
        """Record the end time and exit status, end the tracker runs, empty the lock's note and release it; once."""
        if self.closed:
            return []
        self.closed, problems = True, []
        try:
            if self.zero:
                self.manifest.update(end_time=now(), exit_status=status, trackers=self.tracker_runs())
                for session in self.manifest.get("resumed", [])[-1:]:
                    session.update(end_time=self.manifest["end_time"], exit_status=status)
                self.write_manifest()  # the trackers get this copy: unchanged below unless they failed
                problems = self.trackers.close(self.directory / runs.MANIFEST, status)
                if self.manifest["trackers"] != self.tracker_runs():
                    self.manifest["trackers"] = self.tracker_runs()
                    self.write_manifest()
        finally:
            self.lock.note("")
            self.lock.release()
        return problems

    def abandon(self) -> None:
        """The run never started: end the tracker runs this command opened, unmarked, release the run, and remove the
        directory this command created."""
        self.closed = True
        self.trackers.abandon()
        self.lock.release()
        if self.created:  # with what a tracker wrote there (W&B's files): the run never was
            shutil.rmtree(self.directory, ignore_errors=True)
            for folder in reversed(self.created[:-1]):
                with contextlib.suppress(OSError):  # not empty: another run is there now
                    folder.rmdir()

    def write_manifest(self) -> None:
        write_manifest(self.directory, self.manifest)

    def summary(self, report: Any, tested: Path | None, best: float | None, problems: list[str]) -> str:
        lines = ["", f"Run directory: {redact_path(self.directory)}"]
        if tested is not None and report is not None:
            where = tested.relative_to(self.directory) if tested.is_relative_to(self.directory) else redact_path(tested)
            value = f" ({self.args.monitor} {best:.4f})" if best is not None and not self.args.only_test else ""
            lines.append(f"Best epoch:    {self.test_record['checkpoint_epoch']}{value}, tested from {where}")
        if report is not None:
            scores = "  ".join(f"{name} {value:.4f}" for name, value in report.scores.items())
            details = f"details: {', '.join([runs.REPORT, *report.figures])}"
            details = f"one batch, a smoke test (--fast-dev-run); {details}" if self.args.fast_dev_run else details
            lines.append(f"Test scores:   {scores}   ({details})")
        opened = self.trackers.how_to_open() or [f"{redact_path(self.directory / runs.METRICS)} (no tracker)"]
        for i, line in enumerate(opened):
            lines.append(f"{'Tracker:' if i == 0 else '':<15}{line}")
        earlier = self.manifest.get("trackers", {}).get("mlflow") or {}  # a run resumed with another --logger
        if self.trackers.mlflow is None and not self.trackers.offline and earlier.get("complete") is False:
            problems = [*problems, f"MLflow run {earlier.get('run_id')} has this run only in part; python -m "
                        f"project.sync {redact_path(self.directory)} completes it"]  # fmt: skip
        # a path may hold a secret too (--exp-dir .../password=X): printed lines are redacted like every record
        return redact_text("\n".join([*lines, *(f"warning: {problem}" for problem in problems)]))


def follow_moved_run(checkpoint: dict[str, Any], here: str) -> None:
    """The checkpoint callbacks' states of a run moved since `checkpoint` was saved (its folder, or --exp-dir renamed)
    name their files in `here`, where the run's checkpoint callbacks keep them now. From a state saved in another
    folder Lightning restores only best_model_path: the resumed run would keep its first new epoch as the best,
    however bad, and test it. A state of another run (its id names the folder above) is left as it is."""
    for state in checkpoint.get("callbacks", {}).values():
        then = state.get("dirpath") if isinstance(state, dict) else None
        if not isinstance(then, str) or then == here or Path(then).parent.name != Path(here).parent.name:
            continue

        def moved(value: Any, then: str = then) -> Any:
            return here + value[len(then) :] if isinstance(value, str) and value.startswith(then + os.sep) else value

        state.update({key: moved(value) for key, value in state.items()}, dirpath=here)
        if isinstance(state.get("best_k_models"), dict):
            state["best_k_models"] = {moved(key): value for key, value in state["best_k_models"].items()}


class RunLock:
    """An exclusive flock on a run's lock file while a process runs the run (the OS drops it however the process
    dies). The holder notes who it is in the file once the run starts, so that a second process can say who holds
    the run, and empties it at the end; a process that does not get the lock writes nothing."""

    def __init__(self, path: Path) -> None:
        self.path, self.file = path, None

    def acquire(self) -> None:
        if fcntl is None:
            return
        try:
            file = open(self.path, "a+")  # noqa: SIM115 (held until release); "a+": opening it changes nothing
        except OSError as error:
            raise UserError(f"cannot lock {self.path.parent}: {error.strerror}") from error
        try:
            fcntl.flock(file, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except OSError:
            file.seek(0)
            holder = file.read().strip() or "another process"
            file.close()
            raise UserError(f"{self.path.parent} is in use by {holder}; wait for it to end, or stop it") from None
        self.file = file

    def note(self, text: str) -> None:
        if self.file is not None:
            self.file.truncate(0)
            self.file.write(text)  # "a+" appends: at 0 now
            self.file.flush()

    def release(self) -> None:
        if self.file is not None:
            fcntl.flock(self.file, fcntl.LOCK_UN)
            self.file.close()
            self.file = None


def create_run_dir(directory: Path) -> list[Path]:
    """The new run directory `directory`, never one that exists; returns the folders made, the run's last. --exp-dir
    may be a link the user made; a link planted as the experiment folder inside it is refused rather than followed."""
    try:
        made = [folder for folder in reversed(directory.parents) if not folder.exists()] + [directory]
        for attempt in range(3):  # a command refused meanwhile may remove an empty parent (Run.abandon)
            directory.parent.mkdir(parents=True, exist_ok=True)
            if directory.parent.is_symlink():
                raise UserError(f"--exp-dir: {directory.parent} is a symbolic link; runs are not written through it")
            try:
                directory.mkdir()
                return made
            except FileNotFoundError:
                if attempt == 2:
                    raise
    except FileExistsError as error:
        # A file where a folder should be (--exp-name mlflow.db) is not a run that exists already.
        file = next((folder for folder in reversed(directory.parents) if folder.is_file()), None)
        if file is not None:
            raise UserError(f"--exp-dir, --exp-name: {file} is a file, not a folder of runs") from error
        raise UserError(f"--exp-dir: {directory} exists already; start the run again for a new name") from error
    except OSError as error:
        raise UserError(f"--exp-dir: cannot create a run directory in {directory.parent}: {error.strerror}") from error


def read_manifest(run: Path) -> dict[str, Any]:
    """A run's manifest.json, {} when there is none; one that is there but not a run's is an error."""
    path = run / runs.MANIFEST
    if not path.exists():
        return {}
    try:
        found = json.loads(path.read_text())
    except (OSError, ValueError):
        found = None
    if not is_manifest(found):
        raise UserError(f"{path} is not a run's manifest (a JSON object with its run_id); restore it or start anew")
    return found


def is_manifest(found: Any) -> bool:
    """A run's id, and each part that resume, sync and the summary read of the kind this project writes."""
    if not isinstance(found, dict) or not re.fullmatch(r"[\w.-]+", str(found.get("run_id") or "")):
        return False
    parts = [found.get(key, {}) for key in ("tags", "trackers", "git", "test", "data")]
    if not all(isinstance(part, dict) for part in parts) or not all(isinstance(v, dict) for v in parts[1].values()):
        return False
    mlflow, resumed = parts[1].get("mlflow", {}), found.get("resumed", [])
    texts = [found.get("experiment"), found.get("exit_status"), parts[3].get("checkpoint"),
             *map(mlflow.get, ("run_id", "tracking_uri"))]  # fmt: skip
    return (
        all(text is None or isinstance(text, str) for text in texts)
        and isinstance(resumed, list)
        and all(isinstance(session, dict) for session in resumed)
    )


def write_manifest(run: Path, manifest: dict[str, Any]) -> None:
    write_text(run / runs.MANIFEST, json.dumps(manifest, indent=2, default=str) + "\n")


def hardware(trainer: pl.Trainer) -> dict[str, Any]:
    import torch

    accelerator = type(trainer.accelerator).__name__.removesuffix("Accelerator").lower()
    ids = list(getattr(trainer, "device_ids", []) or [])
    names = [torch.cuda.get_device_name(i) for i in ids] if accelerator == "cuda" else [cpu_name()] * max(len(ids), 1)
    return {"accelerator": accelerator, "devices": names, "num_nodes": trainer.num_nodes,
            "world_size": trainer.world_size, "precision": str(trainer.precision),
            "strategy": type(trainer.strategy).__name__}  # fmt: skip


def git_state() -> dict[str, Any]:
    """The commit of this project's code and whether it had uncommitted changes (None outside git)."""
    git = ["git", "-C", str(Path(__file__).resolve().parents[2])]
    try:
        commit = subprocess.run([*git, "rev-parse", "HEAD"], capture_output=True, text=True, timeout=10, check=True)
        status = subprocess.run([*git, "status", "--porcelain", "--untracked-files=no"], capture_output=True,
                                text=True, timeout=10)  # fmt: skip
    except (OSError, subprocess.SubprocessError):  # no git, not a repository, or too slow
        return {"commit": None, "dirty": None}
    return {"commit": commit.stdout.strip(), "dirty": bool(status.stdout.strip())}


def versions() -> dict[str, str]:
    import lightning
    import torch
    import torchmetrics

    found = {"python": platform.python_version(), "torch": torch.__version__, "lightning": lightning.__version__,
             "torchmetrics": torchmetrics.__version__, "platform": platform.platform()}  # fmt: skip
    for tracker in ("mlflow", "wandb", "tensorboard"):  # the ones this run imported
        if tracker in sys.modules:
            found[tracker] = getattr(sys.modules[tracker], "__version__", "unknown")
    return found


def cpu_name() -> str:
    with contextlib.suppress(OSError):  # Linux names the model; platform.processor() is often empty there
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                return line.split(":", 1)[1].strip()
    return platform.processor() or platform.machine()


def user() -> str:
    try:
        return getpass.getuser()
    except (OSError, KeyError):  # a container user with no name
        return str(os.getuid()) if hasattr(os, "getuid") else "unknown"


def now() -> str:
    return datetime.datetime.now().astimezone().isoformat(timespec="seconds")
