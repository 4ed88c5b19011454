"""Search hyperparameters with Optuna: `python -m project.sweep --help`.

Every trial is a normal `project.run` run (its own run directory, checkpoints and tracker run, grouped
under `--exp-name <study>`), run in this process so that a Lightning callback can report the validation
metric to the trial after each epoch and stop a hopeless one (pruning).

The study lives in a database (SQLite under --exp-dir unless --storage names a server), so the same
command run again continues it: trials already finished are never repeated, and the study stops at
exactly --n-trials finished (completed or pruned) trials. A trial cut short by a kill, a crash or a lost
machine is marked failed and queued again with the same parameters:
- with SQLite, one sweep process runs a study at a time (a lock file beside the database), so whatever
  it finds still running at start belongs to a dead process and is taken over at once;
- with a server database, workers on several machines share the study; Optuna's heartbeat fails a
  trial whose worker has been silent for HEARTBEAT_GRACE_S seconds.

At the end: the table of trials (printed, and trials.csv), the best trial's configuration as a YAML
file that `python -m project.run --config` runs as is, and Optuna's plots, in <exp-dir>/<study>/sweep/.
"""

from __future__ import annotations

import argparse
import csv
import json
import math
import sys
import warnings
from pathlib import Path
from typing import Any

from project import run
from project.infra.cli import name, non_negative_int, positive_int
from project.infra.errors import UserError
from project.infra.errors import run_command as exit_code

# Used when --search-space is not given; a search-space file has the same form.
DEFAULT_SEARCH_SPACE: dict[str, Any] = {
    "learning_rate": {"low": 1e-4, "high": 1e-2, "log": True},
    "hidden_dim": [32, 64, 128, 256],
}
SEARCH_SPACE_HELP = """\
search space (YAML): each key a project.run option, each value a range or a list of choices:
  learning_rate: {low: 1.0e-4, high: 1.0e-2, log: true}   # a float range (log-uniform)
  hidden_dim: {low: 32, high: 256, step: 32}              # an integer range (both bounds integers)
  model: [mlp, cnn]                                       # one of these
default: learning_rate log-uniform in [1e-4, 1e-2], hidden_dim in [32, 64, 128, 256].

Every option not listed above is a project.run option (see python -m project.run --help) applied to
every trial, e.g. --dataset digits --max-epochs 10 --monitor val/acc --exp-dir runs. Trials maximise
--monitor, or minimise it when it is a loss."""

HEARTBEAT_INTERVAL_S = 60  # a running trial records it is alive this often
HEARTBEAT_GRACE_S = 300  # a trial silent this long (server storage) is failed and queued again
MAX_RETRIES = 2  # a trial that keeps dying (e.g. it kills the machine) is not queued forever
OPTIONS_NOT_SEARCHED = {"exp_name", "exp_dir", "config", "logger", *run.build_parser().command_only}


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="python -m project.sweep",
        description="Search hyperparameters with Optuna: each trial a project.run run, pruned early when "
        "hopeless. Run the same command again to continue an interrupted sweep.",
        epilog=SEARCH_SPACE_HELP,
        formatter_class=argparse.RawDescriptionHelpFormatter,  # keeps the search-space example as written
        allow_abbrev=False,  # a prefix of a project.run option must reach project.run
    )
    add = parser.add_argument
    # fmt: off
    add("--study", type=name, required=True, metavar="NAME",
        help="the study's name; its trials are the runs of --exp-name NAME")
    add("--n-trials", type=positive_int, required=True, metavar="N",
        help="finished (completed or pruned) trials the study should have")
    add("--search-space", type=Path, default=None, metavar="FILE",
        help="YAML file of ranges and choices (below; default: the default search space)")
    add("--storage", default=None, metavar="URL",
        help="database URL (default: sqlite:///<exp-dir>/optuna.db); a server (postgresql://...) lets "
        "workers on several machines share a study")
    add("--pruner", choices=("median", "none"), default="median",
        help="median (default): stop a trial whose metric is worse than the median of earlier trials at "
        "the same epoch")
    add("--prune-after-trials", type=non_negative_int, default=5, metavar="N",
        help="finished trials needed before pruning starts (default: 5)")
    add("--prune-after-epochs", type=non_negative_int, default=1, metavar="N",
        help="epochs every trial runs before it can be pruned (default: 1)")
    # fmt: on
    return parser


def main(argv: list[str] | None = None) -> int:
    args, run_argv = build_parser().parse_known_args(argv)
    base = run.parse_args(run_argv)  # the trials' own options, checked now (exits 2 with one line if wrong)
    try:
        return exit_code(lambda: sweep(args, run_argv, base), base.debug)
    except KeyboardInterrupt:
        print(f"interrupted: run the same command again to continue study {args.study}", file=sys.stderr)
        return 130


def sweep(args: argparse.Namespace, run_argv: list[str], base: argparse.Namespace) -> None:
    check_run_options(args, base)
    space = read_search_space(args.search_space)
    out_dir = Path(base.exp_dir).expanduser() / args.study / "sweep"
    out_dir.mkdir(parents=True, exist_ok=True)

    import optuna
    from optuna.trial import TrialState

    optuna.logging.set_verbosity(optuna.logging.WARNING)  # our own lines say what happens
    finished_states = (TrialState.COMPLETE, TrialState.PRUNED)
    url = storage_url(args.storage, base.exp_dir)
    lock = lock_study(url, args.study) if url.startswith("sqlite:///") else None
    try:
        with warnings.catch_warnings():
            # Heartbeats, retries and MaxTrialsCallback are marked experimental; we rely on them knowingly.
            warnings.simplefilter("ignore", optuna.exceptions.ExperimentalWarning)
            study = open_study(args, base, space, url)
            taken_over = take_over_interrupted(study, exclusive=lock is not None)
            finished = len(study.get_trials(deepcopy=False, states=finished_states))
            remaining = args.n_trials - finished
            print(
                f"Study {args.study}: {finished} of {args.n_trials} trials finished"
                + (f", {taken_over} interrupted trial(s) queued again" if taken_over else "")
                + (f"; running {remaining} more" if remaining > 0 else "")
                + f" (storage {url})",
                flush=True,
            )
            if remaining > 0:
                study.optimize(
                    lambda trial: objective(trial, args, run_argv, space),
                    n_trials=remaining,
                    # With several workers, whoever finishes the last trial stops the others.
                    callbacks=[optuna.study.MaxTrialsCallback(args.n_trials, states=finished_states)],
                    gc_after_trial=True,
                )
        report(study, out_dir)
    finally:
        if lock is not None:
            lock.release()


def check_run_options(args: argparse.Namespace, base: argparse.Namespace) -> None:
    if base.only_test or base.resume or base.checkpoint:
        raise UserError("--only-test, --resume and --checkpoint are not sweep options: each trial trains afresh")
    if base.exp_name not in ("debug", args.study):
        raise UserError(f"--exp-name: a sweep's trials are grouped under --study {args.study}; drop --exp-name")
    if base.gpus not in (None, 1) or base.devices not in (1, "1") or base.num_nodes != 1:
        raise UserError(
            "a sweep runs each trial on one device in this process (--devices 1); to use several GPUs, "
            "run one sweep per GPU against a shared --storage (CUDA_VISIBLE_DEVICES=i)"
        )


# ---------------------------------------------------------------------------------------------------
# The search space: project.run options, each a range or a list of choices.


def read_search_space(path: Path | None) -> dict[str, dict[str, Any]]:
    """{option: {"choices": [...]} or {"low", "high", "log", "step", "int"}}, every bound and choice checked
    as project.run would check the same value on its command line."""
    import yaml

    if path is None:
        raw = DEFAULT_SEARCH_SPACE
    else:
        try:
            raw = yaml.safe_load(path.read_text())
        except OSError as error:
            raise UserError(f"--search-space: cannot read {path}: {error.strerror}") from error
        except yaml.YAMLError as error:
            raise UserError(f"--search-space: {path} is not valid YAML") from error
        if not isinstance(raw, dict) or not raw:
            raise UserError(f"--search-space: {path} must map option names to ranges or lists of choices")
    where = f"--search-space {path}" if path else "the default search space"
    actions = {action.dest: action for action in run.build_parser()._actions}
    return {str(name): _dimension(where, str(name), spec, actions) for name, spec in raw.items()}


def _dimension(where: str, name: str, spec: Any, actions: dict[str, argparse.Action]) -> dict[str, Any]:
    dest = name.replace("-", "_")
    action = actions.get(dest)
    if action is None or dest == "help":
        raise UserError(f"{where}: {name} is not a project.run option")
    if dest in OPTIONS_NOT_SEARCHED or action.nargs == 0 or isinstance(action, run.Repeatable):
        raise UserError(f"{where}: {name} cannot be searched (searchable: options that take one value)")

    def checked(value: Any) -> Any:
        try:
            converted = action.type(str(value)) if action.type else str(value)
        except (TypeError, ValueError):
            raise UserError(f"{where}: {name}: {value!r} is not a valid {action.type.__name__}") from None
        if action.choices is not None and converted not in action.choices:
            raise UserError(f"{where}: {name}: {value!r} is not one of {', '.join(map(str, action.choices))}")
        return value

    if isinstance(spec, list) and spec and all(isinstance(v, (str, int, float)) for v in spec):
        return {"choices": [checked(v) for v in spec]}
    if not isinstance(spec, dict) or not {"low", "high"} <= spec.keys() or spec.keys() - {"low", "high", "log", "step"}:
        raise UserError(
            f"{where}: {name}: give {{low: ..., high: ..., log: true|false, step: ...}} or a list of choices"
        )
    low, high, step = _number(spec["low"]), _number(spec["high"]), _number(spec.get("step"))
    log = spec.get("log", False)
    if low is None or high is None or not low < high or not isinstance(log, bool) or (log and low <= 0):
        raise UserError(f"{where}: {name}: needs numbers low < high (and low > 0 with log: true)")
    if log and step is not None:
        raise UserError(f"{where}: {name}: a range is either log or stepped, not both")
    dimension = {"low": checked(low), "high": checked(high), "log": log, "step": step}
    is_int = all(isinstance(v, int) for v in (low, high)) and isinstance(step, (int, type(None)))
    return {**dimension, "int": is_int}


def _number(value: Any) -> int | float | None:
    """YAML reads 1e-4 (no dot) as text; accept it as the number it means."""
    if value is None or isinstance(value, bool):
        return None
    if isinstance(value, (int, float)):
        return value
    for kind in (int, float):
        try:
            return kind(str(value))
        except ValueError:
            pass
    return None


def suggest(trial: Any, space: dict[str, dict[str, Any]]) -> dict[str, Any]:
    params = {}
    for name, dim in space.items():
        if "choices" in dim:
            params[name] = trial.suggest_categorical(name, dim["choices"])
        elif dim["int"]:
            params[name] = trial.suggest_int(name, dim["low"], dim["high"], step=dim["step"] or 1, log=dim["log"])
        else:
            params[name] = trial.suggest_float(name, dim["low"], dim["high"], step=dim["step"], log=dim["log"])
    return params


def trial_argv(run_argv: list[str], study: str, params: dict[str, Any]) -> list[str]:
    """The project.run command line of one trial: the sweep's run options, the sampled values (which win
    over the options before them), and the study's grouping of its runs: one experiment, and a tracker tag."""
    sampled = [item for name, value in params.items() for item in (f"--{name.replace('_', '-')}", str(value))]
    return [*run_argv, *sampled, "--exp-name", study, "--tag", f"study={study}"]


# ---------------------------------------------------------------------------------------------------
# The study: storage, recovery of interrupted trials, and one trial.


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


def open_study(args: argparse.Namespace, base: argparse.Namespace, space: dict[str, Any], url: str) -> Any:
    import optuna
    from optuna.storages import RDBStorage, RetryHeartbeatStaleTrialCallback

    try:
        storage = RDBStorage(
            url,
            heartbeat_interval=HEARTBEAT_INTERVAL_S,
            grace_period=HEARTBEAT_GRACE_S,
            heartbeat_stale_trial_callback=RetryHeartbeatStaleTrialCallback(max_retry=MAX_RETRIES),
        )
    except ImportError as error:
        raise UserError(f"--storage {url}: its database driver is not installed ({error.name})") from error
    except Exception as error:  # SQLAlchemy's errors for bad URLs, refused connections, ...
        raise UserError(f"--storage {url}: cannot open ({type(error).__name__}: {error})") from error
    direction = "minimize" if "loss" in base.monitor else "maximize"
    if args.pruner == "median":
        pruner: Any = optuna.pruners.MedianPruner(
            n_startup_trials=args.prune_after_trials, n_warmup_steps=args.prune_after_epochs
        )
    else:
        pruner = optuna.pruners.NopPruner()
    study = optuna.create_study(
        study_name=args.study, storage=storage, direction=direction, pruner=pruner, load_if_exists=True
    )
    # A new sampler seed on each (re)start: a resumed sweep must not replay the random draws it made before.
    study.sampler = optuna.samplers.TPESampler(seed=base.seed + len(study.trials))

    stored = study.user_attrs
    if "search_space" not in stored:
        study.set_user_attr("search_space", space)
        study.set_user_attr("monitor", base.monitor)
    elif stored["search_space"] != json.loads(json.dumps(space)):
        raise UserError(
            f"study {args.study} was started with another search space ({stored['search_space']}); "
            "continue it with the same --search-space, or start a new --study"
        )
    if study.direction.name.lower() != direction or stored.get("monitor", base.monitor) != base.monitor:
        raise UserError(
            f"study {args.study} {study.direction.name.lower()}s --monitor {stored.get('monitor')}; "
            f"continue it with that --monitor, or start a new --study"
        )
    return study


def take_over_interrupted(study: Any, exclusive: bool) -> int:
    """Fail the trials a dead sweep left running and queue each again with the same parameters.

    `exclusive`: this process holds the study's lock, so every running trial is an orphan. Otherwise
    only those whose heartbeat has stopped are (Optuna checks again before each new trial).
    """
    import copy

    import optuna
    from optuna.trial import TrialState

    storage = study._storage
    if not exclusive:
        optuna.storages.fail_stale_trials(study)  # queues them again through the storage's callback
        return 0
    orphans = study.get_trials(deepcopy=False, states=(TrialState.RUNNING,))
    for trial in orphans:
        storage.set_trial_state_values(trial._trial_id, state=TrialState.FAIL)
        storage.get_heartbeat_stale_trial_callback()(study, copy.deepcopy(storage.get_trial(trial._trial_id)))
    return len(orphans)


def objective(trial: Any, args: argparse.Namespace, run_argv: list[str], space: dict[str, Any]) -> float:
    import optuna

    params = suggest(trial, space)
    trial_args = run.parse_args(trial_argv(run_argv, args.study, params))
    trial.set_user_attr("config", run.config_of(trial_args))
    trial.set_user_attr("run_dir", None)  # a retried trial inherits the dead attempt's; set on fit start
    print(f"\n--- study {args.study}, trial {trial.number}: {params}", flush=True)
    result = run.train_and_test(trial_args, callbacks=[trial_reporter(trial, trial_args.monitor)])
    trial.set_user_attr("test_metrics", result.test_metrics)
    if result.best_score is None or not math.isfinite(result.best_score):
        raise optuna.TrialPruned(f"no finite {trial_args.monitor} (diverged, or no checkpoint was kept)")
    return result.best_score


def trial_reporter(trial: Any, monitor: str) -> Any:
    """A Lightning callback that reports `monitor` to the trial after each validation epoch, and stops
    the run (TrialPruned) when the pruner finds it hopeless."""
    import lightning.pytorch as pl
    import optuna

    class ReportToTrial(pl.Callback):
        def on_fit_start(self, trainer: pl.Trainer, pl_module: pl.LightningModule) -> None:
            trial.set_user_attr("run_dir", str(trainer.default_root_dir))

        def on_validation_end(self, trainer: pl.Trainer, pl_module: pl.LightningModule) -> None:
            value = trainer.callback_metrics.get(monitor)
            if trainer.sanity_checking or value is None:
                return
            epoch = trainer.current_epoch
            trial.report(float(value), step=epoch)
            if trial.should_prune():
                # Lightning finalises the run's loggers as failed; its checkpoints so far stay on disk.
                raise optuna.TrialPruned(f"pruned at epoch {epoch}: {monitor} {float(value):.4g}")

    return ReportToTrial()


# ---------------------------------------------------------------------------------------------------
# The end: table, best configuration, plots.


def report(study: Any, out_dir: Path) -> None:
    from optuna.trial import TrialState

    monitor = study.user_attrs.get("monitor", "value")
    trials = [t for t in study.get_trials(deepcopy=False) if t.state != TrialState.WAITING]
    params = sorted({name for t in trials for name in t.params})
    metrics = sorted({name for t in trials for name in (t.user_attrs.get("test_metrics") or {})})
    header = ["trial", "state", "epochs", monitor, *params, *metrics, "run_dir"]
    rows = [
        [
            t.number,
            t.state.name,
            len(t.intermediate_values),
            t.value,
            *(t.params.get(p) for p in params),
            *((t.user_attrs.get("test_metrics") or {}).get(m) for m in metrics),
            t.user_attrs.get("run_dir"),
        ]
        for t in trials
    ]
    with (out_dir / "trials.csv").open("w", newline="") as file:
        csv.writer(file).writerows([header, *rows])
    print("\n" + _table(header[:-1], [row[:-1] for row in rows]))

    if not any(t.state == TrialState.COMPLETE for t in trials):
        print(f"\nNo completed trial yet. Trials: {out_dir / 'trials.csv'}")
        return
    best = study.best_trial
    config_file = out_dir / "best.yaml"
    write_best_config(study, best, monitor, config_file)
    plots = save_plots(study, monitor, out_dir)
    print(f"\nBest: trial {best.number}, {monitor} = {best.value:.6g}, {best.params}")
    print(f"Trials: {out_dir / 'trials.csv'}\nBest configuration: {config_file}")
    print("Plots: " + (", ".join(str(p) for p in plots) if plots else "none (see the notes above)"))


def write_best_config(study: Any, best: Any, monitor: str, path: Path) -> None:
    """The best trial's full project.run configuration, which `project.run --config` runs as is."""
    import yaml

    path.write_text(
        f"# Best trial of study {study.study_name}: trial {best.number}, {monitor} = {best.value:.6g}\n"
        f"# Its run directory: {best.user_attrs.get('run_dir')}\n"
        f"# Rerun: python -m project.run --config {path}\n" + yaml.safe_dump(best.user_attrs["config"], sort_keys=True)
    )


def save_plots(study: Any, monitor: str, out_dir: Path) -> list[Path]:
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


def _table(header: list[str], rows: list[list[Any]]) -> str:
    def cell(value: Any) -> str:
        if value is None:
            return ""
        return f"{value:.6g}" if isinstance(value, float) else str(value)

    lines = [header, *([cell(v) for v in row] for row in rows)]
    widths = [max(len(line[i]) for line in lines) for i in range(len(header))]
    return "\n".join("  ".join(c.ljust(w) for c, w in zip(line, widths, strict=True)).rstrip() for line in lines)


if __name__ == "__main__":
    sys.exit(main())
