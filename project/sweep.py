"""Search hyperparameters with Optuna: `python -m project.sweep --help`; what trials try is search_space() below.

Each trial is a project.run run in this process (so that optuna-integration's callback can prune it after any epoch).
The study lives in a database, so the same command continues it to exactly --n-trials finished trials. A trial cut
short (SIGTERM/Ctrl-C, a kill, with a server storage a lost machine) is failed and queued again with its parameters.
The end writes the trials table, best.yaml (which `python -m project.run --config` runs) and plots to
<exp-dir>/<study>/sweep/.
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
from project.infra import cli, runs, tracking
from project.infra.errors import Interrupted, RunStopped, UserError, exit_process, run_command
from project.infra.redact import redact, redact_path, redact_text

if TYPE_CHECKING:  # imported where used: `--help` and mistakes answer without loading Optuna or torch
    import optuna

MAX_RETRIES = 2  # a trial that keeps crashing (it kills the machine?) is not queued forever; a signal is no crash
# Trials of one study compare only when these are the same: what is scored, on which data and split, how long. An
# option search_space() samples differs by design.
STUDY_OPTIONS = ("monitor", "model", "dataset", "data_dir", "image_size", "seed", "val_fraction", "max_epochs",
                 "batch_size")  # fmt: skip
HEARTBEAT_INTERVAL, GRACE_PERIOD = 60, 300  # seconds: a trial (of any worker) silent that long is queued again


class Surplus(Exception):
    """Two workers started the last trial at once: the later one steps aside (FAIL), so the study has exactly N."""


def search_space(trial: optuna.Trial, model_options: set[str]) -> dict[str, Any]:
    """What each trial tries: {project.run option: value} (learning_rate 0.003 -> `--learning-rate 0.003`), checked by
    project.run's parser. `model_options`: the options the chosen backbone takes."""
    space = {"learning_rate": trial.suggest_float("learning_rate", 1e-4, 1e-2, log=True)}
    if "hidden_dim" in model_options:
        space["hidden_dim"] = trial.suggest_categorical("hidden_dim", [32, 64, 128, 256])
    return space


def main(argv: list[str] | None = None) -> int:
    parser = cli.Parser(  # its mistakes, like project.run's: one line, redacted, text this locale can write
        prog="python -m project.sweep",
        description="Search hyperparameters with Optuna; the same command continues an interrupted sweep.",
        epilog="Every other option is a project.run option, applied to every trial (e.g. --dataset digits --monitor "
        "val/acc); trials minimise or maximise --monitor as the dataset's task says is better.",
    )
    add = parser.add_argument
    add("--study", type=cli.name, required=True, help="its trials are the runs of --exp-name STUDY")
    add("--n-trials", type=cli.positive_int, required=True, help="finished trials the study should have")
    add("--storage", help="database URL (default: sqlite:///<exp-dir>/optuna.db), e.g. postgresql://... for a team")
    add("--prune-after-trials", type=cli.non_negative_int, default=5, help="trials before pruning starts (default: 5)")
    add("--prune-after-epochs", type=cli.non_negative_int, default=1, help="epochs before pruning a trial (default: 1)")
    args, run_argv = parser.parse_known_args(argv)
    if cli.refused_continuing(run_argv, "sweep"):
        return 2
    base = run.parse_args(run_argv)  # the trials' own options, checked now (exits 2 with one line if wrong)
    code = run_command(lambda: sweep(args, run_argv, base), base.debug)
    if code > 128:  # SIGTERM or Ctrl-C: the trial in progress was queued again
        print(f"interrupted: run the same command again to continue study {args.study}", file=sys.stderr)
    return code


def sweep(args: argparse.Namespace, run_argv: list[str], base: argparse.Namespace) -> None:
    typed = any(arg.split("=", 1)[0] == "--exp-name" for arg in run_argv)  # a --config's own is replaced
    if typed and base.exp_name not in ("debug", args.study):
        raise UserError(f"--exp-name: a sweep's trials are grouped under --study {args.study}; drop --exp-name")
    cli.require_one_device(base, "project.sweep", "for more, run one sweep per GPU with a --storage")
    if base.fast_dev_run:  # Lightning logs no metric in a fast dev run: every trial would end pruned, for good
        raise UserError("--fast-dev-run: a sweep's trials are whole runs; smoke-test with project.run --fast-dev-run")
    try:
        import optuna
        import optuna_integration  # noqa: F401 (the pruning callback, imported per trial)
    except ImportError as error:
        raise UserError(f"project.sweep needs {error.name}: pip install -e '.[sweep]'") from error
    from filelock import FileLock, Timeout
    from optuna.storages import RDBStorage
    from optuna.trial import TrialState
    from sqlalchemy.exc import IntegrityError

    from project.model import backbone_options

    task = run.resolve_task(base)  # a --monitor the task logs, and which way is better; --model auto resolved
    model_options = set(backbone_options(base.model, vars(base)))
    optuna.logging.set_verbosity(optuna.logging.ERROR)  # our lines say what happens, without a signal's traceback
    warnings.filterwarnings("ignore", category=optuna.exceptions.ExperimentalWarning)  # retries: we rely on them
    url = args.storage or runs.sqlite_url(Path(base.exp_dir) / "optuna.db")
    database = runs.sqlite_file(url)
    direction = "maximize" if task.higher_is_better(base.monitor) else "minimize"
    pruner = optuna.pruners.MedianPruner(args.prune_after_trials, n_warmup_steps=args.prune_after_epochs)
    # Workers starting together on a new database race to create its tables and the study's records (SQLite: a lock,
    # as for MLflow's store; a server: the losers find them made when they try again).
    for attempt in range(3):
        try:  # (a folder that cannot be made, under a file or with a name too long, is one line too)
            with tracking.store_lock(url):
                others = runs.table_names(url)  # Optuna would add its tables to another application's database
                if others and "studies" not in others:
                    raise UserError(f"--storage {url} holds tables of another application ({', '.join(others[:3])}"
                                    ", ...) and no Optuna study: name a database of its own")  # fmt: skip
                storage = RDBStorage(url, heartbeat_interval=HEARTBEAT_INTERVAL, grace_period=GRACE_PERIOD,
                                     heartbeat_stale_trial_callback=retry_unless_crashing,
                                     engine_kwargs=runs.engine_options(url))  # fmt: skip
                study = optuna.create_study(storage=storage, study_name=args.study, direction=direction,
                                            pruner=pruner, load_if_exists=True)  # fmt: skip
                # What every trial of the study must share; a study none of whose trials finished (its first command
                # refused a trial's options) takes the options of now.
                begun = study.get_trials(deepcopy=False, states=(TrialState.COMPLETE, TrialState.PRUNED))
                for key in STUDY_OPTIONS:
                    if key not in study.user_attrs or not begun:
                        study.set_user_attr(key, study_value(base, key))
            break
        except UserError:
            raise
        except Exception as error:  # a database driver not installed, a bad URL, a refused connection
            if isinstance(error, IntegrityError) and attempt < 2:
                continue
            reason = f"{type(error).__name__}: {error}".splitlines()[0]  # psycopg's hints, SQLAlchemy's links follow
            raise UserError(f"cannot open --storage {url} ({reason})") from error
    url = redact_text(url)  # printed below: a server's password never is
    sqlite = database is not None
    with contextlib.ExitStack() as held:
        try:  # SQLite: one sweep per study at a time. The OS drops the lock when its process dies, however it dies.
            if sqlite:
                held.enter_context(FileLock(f"{database}.{args.study}.lock", timeout=0))
        except Timeout:
            raise UserError(f"study {args.study} is being run by another sweep (parallel workers need a server "
                            "--storage, e.g. postgresql://...)") from None  # fmt: skip
        monitor = study.user_attrs["monitor"]
        sampled = {name for trial in study.get_trials(deepcopy=False) for name in trial.params}
        changed = [f"{parser_flag(key)} {study.user_attrs[key]}" for key in STUDY_OPTIONS
                   if key not in sampled and study.user_attrs[key] != study_value(base, key)]  # fmt: skip
        if changed or study.direction.name.lower() != direction:
            raise UserError(f"study {args.study} is of {' '.join(changed) or f'--monitor {monitor}'}: continue it "
                            "with the same, or start another --study")  # fmt: skip
        if sqlite:  # we hold the lock: a trial still running was left by a dead sweep
            requeue(study, [t.number for t in study.get_trials(states=(TrialState.RUNNING,))])

        finished = len(study.get_trials(states=(TrialState.COMPLETE, TrialState.PRUNED)))
        print(f"Study {args.study}: {finished} of {args.n_trials} trials finished (storage {url})", flush=True)
        started: list[int] = []  # the trials this process ran: the last is queued again if it is cut short
        enough = lambda study, _: claimed(study) >= args.n_trials and study.stop()  # noqa: E731 (workers sharing it)
        try:
            study.optimize(lambda trial: objective(trial, args, run_argv, model_options, started),
                           max(args.n_trials - claimed(study), 0), callbacks=[enough], gc_after_trial=True,
                           catch=(Surplus,))  # fmt: skip
        except UserError:
            raise  # a value search_space() chose that project.run refuses: it would fail again
        except BaseException:  # a signal (or a bug): the trial reruns from scratch when the sweep is run again
            requeue(study, started[-1:])
            if not sqlite:  # a trial Optuna's ask() had just made, before its heartbeat started, would run for good
                with contextlib.suppress(Exception):  # a server gone: what stopped the sweep is what it says
                    keep_alive_once(study, storage)
            raise
    report(study, monitor, Path(base.exp_dir).expanduser() / args.study / "sweep")


def study_value(args: argparse.Namespace, key: str) -> Any:
    return redact(getattr(args, key), key)  # as records keep it: a path may hold a secret


def parser_flag(key: str) -> str:
    return f"--{key.replace('_', '-')}"


def keep_alive_once(study: optuna.Study, storage: Any) -> None:
    """A heartbeat now for every running trial: one of a live worker keeps its own fresh, and one no worker runs (a
    trial ask() made as a signal came, which Optuna never ends: it has no heartbeat) goes stale after GRACE_PERIOD and
    is queued again."""
    from optuna.trial import TrialState

    study_id = storage.get_study_id_from_name(study.study_name)
    for trial in study.get_trials(deepcopy=False, states=(TrialState.RUNNING,)):
        storage.record_heartbeat(storage.get_trial_id_from_study_id_trial_number(study_id, trial.number))


def requeue(study: optuna.Study, numbers: list[int]) -> None:
    """Fail these trials, if still running, and queue each again with the same parameters."""
    from optuna.trial import TrialState

    for number in numbers:
        trial = study.tell(number, state=TrialState.FAIL, skip_if_finished=True)  # a finished one stays as it is
        if trial.state == TrialState.FAIL:
            queued = retry_unless_crashing(study, trial)
            print(f"trial {number} did not finish; {'queued again' if queued else 'given up'}", flush=True)


def retry_unless_crashing(study: optuna.Study, trial: optuna.trial.FrozenTrial) -> bool:
    """Queue a copy of the failed `trial` with its parameters (Optuna's RetryHeartbeatStaleTrialCallback, which links
    it to the trial it repeats), unless its attempts crashed more than MAX_RETRIES times. An attempt stopped on purpose
    (marked "stopped": SLURM's preemption, Ctrl-C) never counts. Also the storage's callback for a silent worker."""
    from optuna.storages import RetryHeartbeatStaleTrialCallback

    retry = RetryHeartbeatStaleTrialCallback(max_retry=None)
    trials = study.get_trials(deepcopy=False)  # by number
    attempts = [*retry.retry_history(trial), trial.number]
    if sum(not trials[number].user_attrs.get("stopped") for number in attempts) > MAX_RETRIES:
        return False
    retry(study, trial)
    return True


def claimed(study: optuna.Study, before: int | None = None) -> int:
    """Trials finished or running, on any worker (one silent for GRACE_PERIOD is failed, and queued again, first);
    with `before`, only those numbered below it."""
    from optuna.storages import fail_stale_trials
    from optuna.trial import TrialState

    fail_stale_trials(study)
    trials = study.get_trials(deepcopy=False, states=(TrialState.COMPLETE, TrialState.PRUNED, TrialState.RUNNING))
    return sum(before is None or t.number < before for t in trials)


def objective(
    trial: optuna.Trial, args: argparse.Namespace, run_argv: list, model_options: set, started: list
) -> float:
    """One trial: a project.run run with the values search_space() chose; its best --monitor value."""
    import optuna
    from lightning.pytorch.callbacks import LambdaCallback
    from optuna_integration import PyTorchLightningPruningCallback

    study = args.study
    if claimed(trial.study, before=trial.number) >= args.n_trials:
        trial.study.stop()
        print(f"trial {trial.number} not needed: {args.n_trials} trials are finished or running", flush=True)
        raise Surplus
    started.append(trial.number)
    try:
        params = search_space(trial, model_options)
    except ValueError as error:  # Optuna refuses a range (low > high), or a parameter's kind changed
        raise UserError(f"search_space(): {error}") from error
    refusal = io.StringIO()  # project.run's parser checks the values: a refusal is one line, without argparse's usage
    try:
        with contextlib.redirect_stderr(refusal):
            trial_args = run.parse_args(trial_argv(run_argv, study, params))
    except SystemExit:
        raise UserError(f"search_space(): {refusal.getvalue().strip().rpartition('error: ')[2]}") from None

    trial.set_user_attr("config", redact(run.config_of(trial_args)))  # best.yaml's: no secret is written down
    trial.set_user_attr("run_dir", None)  # a retried trial inherits the interrupted one's until its run starts
    trial.set_user_attr("stopped", False)  # and whether that one was stopped on purpose
    given = {arg.split("=", 1)[0] for arg in run_argv}  # --hidden-dim 16 or --hidden-dim=16
    replaced = [flag for flag in map(parser_flag, params) if flag in given]
    replacing = f" (sampled: replaces the {' '.join(replaced)} given)" if replaced else ""
    print(f"\n--- study {study}, trial {trial.number}: {params}{replacing}", flush=True)
    callbacks = [
        LambdaCallback(
            on_fit_start=lambda trainer, _: trial.set_user_attr("run_dir", redact_path(trainer.default_root_dir))
        ),
        # Raises TrialPruned after a hopeless epoch's validation, before its checkpoints; the run ends as "pruned".
        PyTorchLightningPruningCallback(trial, monitor=trial_args.monitor),
    ]
    try:
        result = run.train_and_test(trial_args, callbacks=callbacks)
    except (Interrupted, KeyboardInterrupt):  # a signal outside a training step: no crash (retry_unless_crashing)
        trial.set_user_attr("stopped", True)
        raise
    except (RunStopped, optuna.TrialPruned) as error:
        # A signal: the sweep stops, and the trial reruns from scratch (so without the run's "resume with" line).
        if isinstance(error, RunStopped) and error.exit_code > 128:
            trial.set_user_attr("stopped", True)
            raise RunStopped(f"trial {trial.number} {str(error).splitlines()[0]}", error.exit_code) from error
        # pruned, or diverged: a finished, hopeless trial (its reason may name the run's paths)
        print(redact_text(f"trial {trial.number} pruned: {error}"), flush=True)
        raise optuna.TrialPruned(str(error)) from error
    for name, value in result.test_metrics.items():
        trial.set_user_attr(name, value)  # one column each in the table
    if result.best_score is None or not math.isfinite(result.best_score):
        raise optuna.TrialPruned(f"no finite {trial_args.monitor} (diverged, or no checkpoint was kept)")
    return result.best_score


def trial_argv(run_argv: list[str], study: str, params: dict[str, Any]) -> list[str]:
    """A trial's project.run command line: the sweep's options, the sampled values (which win), its study's name."""
    sampled = [item for name, value in params.items() for item in (parser_flag(name), str(value))]
    return [*run_argv, *sampled, "--exp-name", study, "--tag", f"study={study}"]


def report(study: optuna.Study, monitor: str, out_dir: Path) -> None:
    """The trials table (printed, and trials.csv), best.yaml and Optuna's plots, in `out_dir`."""
    import matplotlib

    matplotlib.use("Agg")  # files only: no display needed
    import matplotlib.pyplot as plt
    import yaml
    from optuna.trial import TrialState
    from optuna.visualization import matplotlib as optuna_plots

    names = {"number": "trial", "value": monitor}
    table = (
        study.trials_dataframe(attrs=("number", "state", "value", "params", "user_attrs"))
        .drop(columns="user_attrs_config", errors="ignore")
        .rename(columns=lambda c: names.get(c, c.removeprefix("params_").removeprefix("user_attrs_")))
    )
    if "run_dir" in table:  # a retry waiting to run inherited its interrupted trial's
        table.loc[table["state"] == "WAITING", "run_dir"] = None
    out_dir.mkdir(parents=True, exist_ok=True)
    table.to_csv(out_dir / "trials.csv", index=False)
    print(
        "\n"
        + table.drop(columns="run_dir", errors="ignore").to_string(index=False)
        + redact_text(f"\nSaved in {out_dir}")
    )
    running = [str(t.number) for t in study.get_trials(deepcopy=False, states=(TrialState.RUNNING,))]
    if running:  # this worker has nothing left to run, but the study is not done
        print(f"Not finished: trial {', '.join(running)} still running in another worker (one whose machine was lost "
              f"is run again by a worker started after {GRACE_PERIOD // 60} minutes of its silence)")  # fmt: skip
    if not study.get_trials(states=(TrialState.COMPLETE,)):
        return
    best = study.best_trial
    (out_dir / "best.yaml").write_text(
        f"# Study {study.study_name}, trial {best.number}, {monitor} = {best.value:.6g}, {best.user_attrs['run_dir']}\n"
        + yaml.safe_dump(best.user_attrs["config"], sort_keys=True)
    )
    print(redact_text(f"Best: trial {best.number}, {monitor} = {best.value:.6g}, {best.params}: {out_dir}/best.yaml"))
    for name in ("optimization_history", "param_importances"):
        try:
            with warnings.catch_warnings():  # "too few trials" for the importances: the plot says it
                warnings.simplefilter("ignore")
                axes = getattr(optuna_plots, f"plot_{name}")(study, target_name=monitor)
        except (ValueError, RuntimeError, ImportError, ZeroDivisionError) as error:  # importances need 2 trials
            print(f"note: no {name} plot ({type(error).__name__}: {error})")
            continue
        axes.figure.savefig(out_dir / f"{name}.png", dpi=120, bbox_inches="tight")
        plt.close(axes.figure)


if __name__ == "__main__":
    exit_process(main())
