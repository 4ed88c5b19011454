"""Search hyperparameters with Optuna: `python -m project.sweep --help`.

Every trial is a normal `project.run` run (its own run directory, checkpoints and tracker run, grouped
under `--exp-name <study>` and tagged `study=<name>`), run in this process so that Optuna's Lightning
callback can stop a hopeless trial after any epoch (pruning). What the trials try is `search_space()`
below, in Optuna's own define-by-run form: the one place to edit.

The study lives in a database (SQLite under --exp-dir unless --storage names a server), so the same
command run again continues it, to exactly --n-trials finished (completed or pruned) trials, never
repeating one. A trial cut short is marked failed and queued again with the same parameters (at most
MAX_RETRIES times):
- SIGTERM or Ctrl-C: its run saves its checkpoint as project.run does; the sweep exits 128 + signal;
- a kill or a crash: with SQLite one sweep process runs a study at a time (a lock beside the database),
  so the next sweep takes over whatever it finds still running;
- a lost machine: with a server database shared by several workers, Optuna's heartbeat fails a trial
  silent for HEARTBEAT_GRACE_S seconds.

At the end: the table of trials (printed, and trials.csv), the best trial's configuration as a YAML
file that `python -m project.run --config` runs as is, and Optuna's plots, in <exp-dir>/<study>/sweep/.
"""

from __future__ import annotations

import argparse
import contextlib
import io
import math
import sys
import warnings
from pathlib import Path
from typing import TYPE_CHECKING, Any

from project import run
from project.infra import cli
from project.infra.errors import RunStopped, UserError, run_command

if TYPE_CHECKING:  # imported where used: `--help` and mistakes answer without loading Optuna or torch
    import optuna
    from optuna.storages import RetryHeartbeatStaleTrialCallback


def search_space(trial: optuna.Trial, model_options: set[str]) -> dict[str, Any]:
    """What each trial tries: {project.run option: value}. Edit this to search other options.

    Each value becomes that option's flag (learning_rate 0.003 -> `--learning-rate 0.003`), checked by
    project.run's own parser, so only options that take a value can be searched. Optuna's `trial.suggest_*`
    give ranges (log, stepped) and choices; a value may depend on another (`if model == "cnn": ...`).
    `model_options`: the options the chosen backbone takes (a backbone option is searched only where it counts).
    """
    space = {"learning_rate": trial.suggest_float("learning_rate", 1e-4, 1e-2, log=True)}
    if "hidden_dim" in model_options:
        space["hidden_dim"] = trial.suggest_categorical("hidden_dim", [32, 64, 128, 256])
    return space


EPILOG = """\
The search space is search_space() in project/sweep.py: edit it to search other project.run options.

Every option not listed above is a project.run option (see python -m project.run --help) applied to
every trial, e.g. --dataset digits --max-epochs 10 --monitor val/acc --exp-dir runs. Trials minimise
or maximise --monitor, as the dataset's task says is better (val/loss, val/mae: lower; val/acc, val/r2: higher).

SIGTERM or Ctrl-C queues the trial in progress again and exits (143, 130); the same command continues."""

HEARTBEAT_INTERVAL_S = 60  # a running trial records it is alive this often
HEARTBEAT_GRACE_S = 300  # a trial silent this long (server storage) is failed and queued again
MAX_RETRIES = 2  # a trial that keeps dying (e.g. it kills the machine) is not queued forever


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="python -m project.sweep",
        description="Search hyperparameters with Optuna: each trial a project.run run, pruned early when "
        "hopeless. Run the same command again to continue an interrupted sweep.",
        epilog=EPILOG,
        formatter_class=argparse.RawDescriptionHelpFormatter,  # keeps the epilog's paragraphs as written
        allow_abbrev=False,  # a prefix of a project.run option must reach project.run
    )
    add = parser.add_argument
    # fmt: off
    add("--study", type=cli.name, required=True, metavar="NAME",
        help="the study's name; its trials are the runs of --exp-name NAME")
    add("--n-trials", type=cli.positive_int, required=True, metavar="N",
        help="finished (completed or pruned) trials the study should have")
    add("--storage", default=None, metavar="URL",
        help="database URL (default: sqlite:///<exp-dir>/optuna.db); a server (postgresql://...) lets "
        "workers on several machines share a study")
    add("--pruner", choices=("median", "none"), default="median",
        help="median (default): stop a trial whose metric is worse than the median of earlier trials at "
        "the same epoch")
    add("--prune-after-trials", type=cli.non_negative_int, default=5, metavar="N",
        help="completed trials needed before pruning starts (default: 5)")
    add("--prune-after-epochs", type=cli.non_negative_int, default=1, metavar="N",
        help="epochs every trial runs before it can be pruned (default: 1)")
    # fmt: on
    return parser


def main(argv: list[str] | None = None) -> int:
    args, run_argv = build_parser().parse_known_args(argv)
    if cli.refused_continuing(run_argv, "sweep"):
        return 2
    base = run.parse_args(run_argv)  # the trials' own options, checked now (exits 2 with one line if wrong)
    code = run_command(lambda: sweep(args, run_argv, base), base.debug)
    if code > 128:  # SIGTERM or Ctrl-C: the trial in progress was queued again
        print(f"interrupted: run the same command again to continue study {args.study}", file=sys.stderr)
    return code


def sweep(args: argparse.Namespace, run_argv: list[str], base: argparse.Namespace) -> None:
    check_run_options(args, base)
    from project.model import backbone_options

    task = run.resolve_task(base)  # a --monitor the task logs, and which way is better; --model auto resolved
    model_options = set(backbone_options(base.model, vars(base)))
    try:
        import filelock  # noqa: F401
        import optuna
        import optuna_integration  # noqa: F401
    except ImportError as error:
        raise UserError(f"project.sweep needs {error.name}: pip install -e '.[sweep]'") from error

    # Our own lines say what happens; Optuna's warning for a failed trial would add the traceback of a
    # signal that we report in one line.
    optuna.logging.set_verbosity(optuna.logging.ERROR)
    url = storage_url(args.storage, base.exp_dir)
    lock = lock_study(url, args.study) if url.startswith("sqlite:///") else None
    try:
        with warnings.catch_warnings():
            # Heartbeats, retries and MaxTrialsCallback are marked experimental; we rely on them knowingly.
            warnings.simplefilter("ignore", optuna.exceptions.ExperimentalWarning)
            study, retry = open_study(
                args, base, url, "maximize" if task.higher_is_better(base.monitor) else "minimize"
            )
            run_trials(study, retry, args, run_argv, url, model_options)
        report(study, Path(base.exp_dir).expanduser() / args.study / "sweep")
    finally:
        if lock is not None:
            lock.release()


def run_trials(
    study: optuna.Study,
    retry: RetryHeartbeatStaleTrialCallback,
    args: argparse.Namespace,
    run_argv: list[str],
    url: str,
    model_options: set[str],
) -> None:
    """Run trials until the study has --n-trials finished ones, first queueing again those a dead sweep left."""
    import optuna
    from optuna.trial import TrialState

    # SQLite: this process holds the study's lock, so every trial still running was left by a dead sweep.
    # (With a server database, Optuna's heartbeat finds those, before each trial.)
    if url.startswith("sqlite:///"):
        requeue(study, retry, [t.number for t in study.get_trials(deepcopy=False, states=(TrialState.RUNNING,))])
    finished_states = (TrialState.COMPLETE, TrialState.PRUNED)
    finished = len(study.get_trials(deepcopy=False, states=finished_states))
    remaining = args.n_trials - finished
    more = f"; running {remaining} more" if remaining > 0 else ""
    print(f"Study {args.study}: {finished} of {args.n_trials} trials finished{more} (storage {url})", flush=True)
    if remaining <= 0:
        return
    in_progress: list[int] = []  # the trial this process runs, to queue it again if interrupted
    try:
        study.optimize(
            lambda trial: objective(trial, args, run_argv, in_progress, model_options),
            n_trials=remaining,
            # With several workers, whoever finishes the last trial stops the others.
            callbacks=[optuna.study.MaxTrialsCallback(args.n_trials, states=finished_states)],
            gc_after_trial=True,
        )
    except UserError:
        raise  # a value search_space() chose that project.run refuses: it would fail again
    except BaseException:  # a signal (or a bug): the trial reruns from scratch when the sweep is run again
        requeue(study, retry, in_progress)
        raise


def check_run_options(args: argparse.Namespace, base: argparse.Namespace) -> None:
    if base.exp_name not in ("debug", args.study):
        raise UserError(f"--exp-name: a sweep's trials are grouped under --study {args.study}; drop --exp-name")
    if base.gpus not in (None, 1) or base.devices not in (1, "1") or base.num_nodes != 1:
        raise UserError(
            "a sweep runs each trial on one device in this process (--devices 1); to use several GPUs, "
            "run one sweep per GPU against a shared --storage (CUDA_VISIBLE_DEVICES=i)"
        )


# ---------------------------------------------------------------------------------------------------
# The study: storage, trials queued again, and one trial.


def storage_url(storage: str | None, exp_dir: str) -> str:
    if storage:
        return storage
    path = Path(exp_dir).expanduser().resolve() / "optuna.db"
    path.parent.mkdir(parents=True, exist_ok=True)
    return f"sqlite:///{path}"


def lock_study(url: str, study: str) -> Any:
    """Hold a lock beside the SQLite file while this process runs `study`; the OS drops it when the process
    dies, however it dies, so the next sweep knows the study's running trials are orphans."""
    from filelock import FileLock, Timeout

    database = Path(url.removeprefix("sqlite:///"))
    lock = FileLock(str(database.with_name(f"{database.name}.{study}.lock")))
    try:
        lock.acquire(timeout=0)
    except Timeout:
        raise UserError(
            f"study {study} is being run by another sweep on {database}; wait for it to finish, or run "
            "parallel workers against a server database (--storage postgresql://...)"
        ) from None
    return lock


def open_study(
    args: argparse.Namespace, base: argparse.Namespace, url: str, direction: str
) -> tuple[optuna.Study, RetryHeartbeatStaleTrialCallback]:
    """The study, created or continued, and the callback that queues a failed trial again."""
    import optuna
    from optuna.storages import RDBStorage, RetryHeartbeatStaleTrialCallback

    # Ours as well as the storage's: it queues the trials we fail ourselves (SQLite's orphans, an
    # interrupted trial) exactly as the heartbeat queues the stale ones, with the same retry limit.
    retry = RetryHeartbeatStaleTrialCallback(max_retry=MAX_RETRIES)
    try:
        storage = RDBStorage(
            url,
            heartbeat_interval=HEARTBEAT_INTERVAL_S,
            grace_period=HEARTBEAT_GRACE_S,
            heartbeat_stale_trial_callback=retry,
        )
    except ImportError as error:
        raise UserError(f"--storage {url}: its database driver is not installed ({error.name})") from error
    except Exception as error:  # SQLAlchemy's errors for bad URLs, refused connections, ...
        raise UserError(f"--storage {url}: cannot open ({type(error).__name__}: {error})") from error
    pruner = (
        optuna.pruners.MedianPruner(n_startup_trials=args.prune_after_trials, n_warmup_steps=args.prune_after_epochs)
        if args.pruner == "median"
        else optuna.pruners.NopPruner()
    )
    study = optuna.create_study(
        study_name=args.study, storage=storage, direction=direction, pruner=pruner, load_if_exists=True
    )
    # A new sampler seed on each (re)start: a resumed sweep must not replay the random draws it made before.
    study.sampler = optuna.samplers.TPESampler(seed=base.seed + len(study.trials))
    if "monitor" not in study.user_attrs:
        study.set_user_attr("monitor", base.monitor)
    monitor = study.user_attrs["monitor"]
    if monitor != base.monitor or study.direction.name.lower() != direction:
        raise UserError(
            f"study {args.study} {study.direction.name.lower()}s --monitor {monitor}; "
            "continue it with that --monitor, or start a new --study"
        )
    return study, retry


def requeue(study: optuna.Study, retry: RetryHeartbeatStaleTrialCallback, numbers: list[int]) -> None:
    """Fail these trials, if still running, and queue each again with the same parameters."""
    from optuna.trial import TrialState

    for number in numbers:
        # tell() fails a trial whichever process started it; one that finished just before the signal stays.
        trial = study.tell(number, state=TrialState.FAIL, skip_if_finished=True)
        if trial.state != TrialState.FAIL:
            continue
        retry(study, trial)  # a copy with the same parameters, unless this one was already retried MAX_RETRIES times
        again = "queued again" if len(retry.retry_history(trial)) < MAX_RETRIES else f"{MAX_RETRIES} retries: given up"
        print(f"trial {number} did not finish; {again}", flush=True)


def objective(
    trial: optuna.Trial, args: argparse.Namespace, run_argv: list[str], in_progress: list[int], model_options: set[str]
) -> float:
    """One trial: a project.run run with the values search_space() chose; its best --monitor value."""
    in_progress[:] = [trial.number]
    try:
        params = search_space(trial, model_options)
    except ValueError as error:  # Optuna refuses a range (low > high), or a parameter's kind changed
        raise UserError(f"search_space(): {error}") from error
    trial_args = parse_trial_args(trial_argv(run_argv, args.study, params))

    import optuna
    from lightning.pytorch.callbacks import LambdaCallback
    from optuna_integration import PyTorchLightningPruningCallback

    trial.set_user_attr("config", run.config_of(trial_args))
    trial.set_user_attr("run_dir", None)  # a retried trial inherits the interrupted one's until its run starts
    print(f"\n--- study {args.study}, trial {trial.number}: {params}", flush=True)
    callbacks = [
        LambdaCallback(on_fit_start=lambda trainer, _: trial.set_user_attr("run_dir", trainer.default_root_dir)),
        # Raises TrialPruned after a hopeless epoch's validation, before that epoch's checkpoints (Lightning runs
        # checkpoint callbacks last). The run ends as "pruned" in its manifest.json (KILLED in MLflow); its metrics
        # and the checkpoints of earlier epochs stay on disk, untested.
        PyTorchLightningPruningCallback(trial, monitor=trial_args.monitor),
    ]
    try:
        result = run.train_and_test(trial_args, callbacks=callbacks)
    except (RunStopped, optuna.TrialPruned) as error:
        if isinstance(error, RunStopped) and error.exit_code > 128:  # a signal: the sweep stops, the trial reruns
            # Only what was saved: the trial reruns from scratch, so the run's "resume with" line does not apply.
            print(f"trial {trial.number} {str(error).splitlines()[0]}", flush=True)
            raise
        # Pruned, or diverged (FiniteLoss stopped it): a finished, hopeless trial, not the end of the sweep.
        print(f"trial {trial.number} pruned: {error}", flush=True)
        raise optuna.TrialPruned(str(error)) from error
    for name, value in result.test_metrics.items():
        trial.set_user_attr(name, value)  # one column each in the table
    if result.best_score is None or not math.isfinite(result.best_score):
        raise optuna.TrialPruned(f"no finite {trial_args.monitor} (diverged, or no checkpoint was kept)")
    return result.best_score


def trial_argv(run_argv: list[str], study: str, params: dict[str, Any]) -> list[str]:
    """The project.run command line of one trial: the sweep's run options, the sampled values (which win
    over the options before them), and the study's grouping of its runs: one experiment, and a tracker tag."""
    sampled = [item for name, value in params.items() for item in (f"--{name.replace('_', '-')}", str(value))]
    return [*run_argv, *sampled, "--exp-name", study, "--tag", f"study={study}"]


def parse_trial_args(argv: list[str]) -> argparse.Namespace:
    """project.run's own parser checks the sampled values; a value it refuses is one line, without the usage
    text argparse prints first."""
    refusal = io.StringIO()
    try:
        with contextlib.redirect_stderr(refusal):
            return run.parse_args(argv)
    except SystemExit:
        last_line = (refusal.getvalue().strip().splitlines() or ["refused"])[-1]
        raise UserError(f"search_space(): {last_line.split('error: ', 1)[-1]}") from None


# ---------------------------------------------------------------------------------------------------
# The end: table, best configuration, plots.


def report(study: optuna.Study, out_dir: Path) -> None:
    from optuna.trial import TrialState

    monitor = study.user_attrs.get("monitor", "value")
    table = study.trials_dataframe(attrs=("number", "state", "value", "duration", "params", "user_attrs"))
    if table.empty:
        return
    table = table[table["state"] != TrialState.WAITING.name].drop(columns="user_attrs_config", errors="ignore")
    table = table.rename(
        columns=lambda c: {"number": "trial", "value": monitor}.get(
            c, c.removeprefix("params_").removeprefix("user_attrs_")
        )
    )
    table["duration"] = table["duration"].dt.total_seconds().round(1)
    out_dir.mkdir(parents=True, exist_ok=True)
    table.to_csv(out_dir / "trials.csv", index=False)
    print("\n" + table.drop(columns="run_dir", errors="ignore").to_string(index=False))

    if not any(t.state == TrialState.COMPLETE for t in study.get_trials(deepcopy=False)):
        print(f"\nNo completed trial yet. Trials: {out_dir / 'trials.csv'}")
        return
    best = study.best_trial
    config_file = out_dir / "best.yaml"
    write_best_config(study, best, monitor, config_file)
    plots = save_plots(study, monitor, out_dir)
    print(f"\nBest: trial {best.number}, {monitor} = {best.value:.6g}, {best.params}")
    print(f"Trials: {out_dir / 'trials.csv'}\nBest configuration: {config_file}")
    print("Plots: " + (", ".join(str(p) for p in plots) if plots else "none (see the notes above)"))


def write_best_config(study: optuna.Study, best: optuna.trial.FrozenTrial, monitor: str, path: Path) -> None:
    """The best trial's full project.run configuration, which `project.run --config` runs as is."""
    import yaml

    path.write_text(
        f"# Best trial of study {study.study_name}: trial {best.number}, {monitor} = {best.value:.6g}\n"
        f"# Its run directory: {best.user_attrs.get('run_dir')}\n"
        f"# Rerun: python -m project.run --config {path}\n" + yaml.safe_dump(best.user_attrs["config"], sort_keys=True)
    )


def save_plots(study: optuna.Study, monitor: str, out_dir: Path) -> list[Path]:
    """Optuna's optimisation history and parameter importances, as PNG files."""
    import matplotlib

    matplotlib.use("Agg")  # files only: no display needed
    import matplotlib.pyplot as plt
    import optuna
    from optuna.visualization import matplotlib as optuna_plots

    saved = []
    for name, plot in (
        ("optimization_history", optuna_plots.plot_optimization_history),
        ("param_importances", optuna_plots.plot_param_importances),
    ):
        try:
            with warnings.catch_warnings():
                warnings.simplefilter("ignore", optuna.exceptions.ExperimentalWarning)
                axes = plot(study, target_name=monitor)
        except (ValueError, RuntimeError, ImportError, ZeroDivisionError) as error:
            # Importances need at least two completed trials that differ in some parameter.
            print(f"note: no {name} plot ({type(error).__name__}: {error})")
            continue
        path = out_dir / f"{name}.png"
        axes.figure.savefig(path, dpi=120, bbox_inches="tight")
        plt.close(axes.figure)
        saved.append(path)
    return saved


if __name__ == "__main__":
    sys.exit(main())
