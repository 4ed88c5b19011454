"""Train and test a model: `python -m project.run --help`.

main() reads top to bottom: parse the command line, build the data, the model (Solver) and the
Trainer, fit, test, report. Everything heavy (torch, Lightning) is imported after parsing, so `--help`
and mistakes in the arguments answer at once.
"""

from __future__ import annotations

import argparse
import os
import re
import shlex
import sys
from collections.abc import Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

# Names only, so that --help and typos answer without importing torch. tests/test_cli.py checks that
# they match the registries (data.DATASETS, model.MODELS): add a name here when you add one there.
DATASET_NAMES = ("digits", "mnist", "fashion-mnist", "cifar10", "image-folder")
MODEL_NAMES = ("mlp", "cnn")
LOGGER_NAMES = ("mlflow", "tensorboard", "csv", "wandb", "none", "neptune")
PRECISIONS = ("32-true", "16-mixed", "bf16-mixed", "64-true")

# How often the training loss is logged and the progress bar redrawn, in steps: each is host work, and a
# logged loss is read on the host (a wait for the GPU), so not every step. Every 10th step still gives a
# digits run (12 steps an epoch) a loss curve; on a GPU it costs one wait per 10 steps.
LOG_EVERY_N_STEPS = 10
PROGRESS_BAR_REFRESH_STEPS = 10

# Options that say what to do with a run, not how to train it: never part of config.yaml.
NOT_CONFIG = ("config", "only_test", "checkpoint", "resume", "debug", "tag", "argv")


def positive_int(text: str) -> int:
    value = int(text)
    if value <= 0:
        raise ValueError
    return value


def non_negative_int(text: str) -> int:
    value = int(text)
    if value < 0:
        raise ValueError
    return value


def positive_float(text: str) -> float:
    value = float(text)
    if not value > 0 or value == float("inf"):
        raise ValueError
    return value


def fraction(text: str) -> float:
    value = float(text)
    if not 0 < value < 1:
        raise ValueError
    return value


def experiment_name(text: str) -> str:
    """A name that stays one folder inside --exp-dir: no separators, no '..', nothing hidden."""
    if not re.fullmatch(r"[A-Za-z0-9_][A-Za-z0-9_.-]{0,99}", text) or ".." in text:
        raise ValueError
    return text


def tag(text: str) -> str:
    """KEY=VALUE, with a key MLflow accepts: letters, digits, '_', '-', '.', '/'."""
    if not re.fullmatch(r"[A-Za-z0-9_.\-/]{1,250}=.*", text):
        raise ValueError
    return text


def devices(text: str) -> str | int:
    """`auto`, a count (`2`), or device indices (`0,1`), as Lightning's Trainer takes them."""
    if text == "auto":
        return text
    if re.fullmatch(r"\d+(,\d+)+,?", text):
        return text
    return positive_int(text)


for _type, _name in [
    (positive_int, "positive integer"),
    (non_negative_int, "non-negative integer"),
    (positive_float, "positive number"),
    (fraction, "fraction (between 0 and 1)"),
    (experiment_name, "experiment name (letters, digits, '_', '-', '.'; no '/' or '..')"),
    (devices, "device count ('auto', a positive count, or indices like 0,1)"),
]:
    _type.__name__ = _name  # argparse names the type in its error message


class Repeatable(argparse.Action):
    """`--logger a --logger b` gives [a, b]; the first use replaces the default (or the config's)."""

    def __call__(
        self,
        parser: argparse.ArgumentParser,
        namespace: argparse.Namespace,
        values: Any,
        option_string: str | None = None,
    ) -> None:
        current = getattr(namespace, self.dest)
        chosen = [] if current is self.default else list(current)
        setattr(namespace, self.dest, [*chosen, values])


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="python -m project.run",
        description="Train a classifier, test its best checkpoint, and keep a record of the run.",
        formatter_class=argparse.ArgumentDefaultsHelpFormatter,
    )
    add = parser.add_argument
    # fmt: off
    # The original template's options; README "Defaults" says why learning rate and --gpus changed.
    add("--batch-size", type=positive_int, default=128, help="samples per step on each device")
    add("--num-workers", type=non_negative_int, default=4, help="DataLoader workers (in-memory data needs none)")
    add("--learning-rate", type=positive_float, default=1e-3, help="Adam's initial learning rate (cosine decay)")
    add("--hidden-dim", type=positive_int, default=128, help="width of the model")
    add("--only-test", action="store_true", help="evaluate --checkpoint on the test set, no training")
    add("--half-precision", action="store_true", help="bf16 mixed precision where supported, else fp16")
    add("--gpus", type=positive_int, default=None, help="shorthand for --accelerator gpu --devices N")
    add("--max-epochs", type=positive_int, default=20, help="training epochs")
    add("--exp-name", type=experiment_name, default="debug", help="runs of one experiment share this folder")
    add("--exp-dir", default="~/Experiments", help="where runs, checkpoints and the local tracker live")
    add("--fast-dev-run", action="store_true", help="one batch of train, val and test: a smoke test")
    # What a user expects beside them.
    add("--config", type=Path, default=None, help="YAML file of option values; command-line flags win")
    add("--dataset", choices=DATASET_NAMES, default="digits", help="what to train on")
    add("--model", choices=MODEL_NAMES, default="cnn", help="the backbone")
    add("--seed", type=non_negative_int, default=0, help="seeds data splits, order and initialisation")
    add("--deterministic", action="store_true", help="deterministic algorithms only (bit-exact reruns)")
    add("--data-dir", default="data", help="where datasets are (downloaded to), or your image folder")
    add("--image-size", type=positive_int, default=64, help="image-folder: resize images to this square")
    add("--val-fraction", type=fraction, default=0.1, help="share of the training set held out for validation")
    add("--data-on-device", choices=("auto", "yes", "no"), default="auto",
        help="hold in-memory datasets on the GPU (auto: when they fit); no: a standard DataLoader")
    add("--accelerator", default="auto", help="cpu, gpu, mps or auto")
    add("--devices", type=devices, default=1, help="devices per node: a count, indices like 0,1, or auto")
    add("--num-nodes", type=positive_int, default=1, help="machines in a multi-node run")
    add("--strategy", default="auto", help="auto, ddp, fsdp, deepspeed, ... (Lightning's strategies)")
    add("--precision", choices=PRECISIONS, default=None,
        help="numeric precision (default: 32-true, or what --half-precision picks)")
    add("--compile", action="store_true", help="torch.compile the model")
    add("--logger", action=Repeatable, choices=LOGGER_NAMES, default=["mlflow"],
        help="experiment tracker; repeat the flag for several")
    add("--tag", action=Repeatable, type=tag, default=[], metavar="KEY=VALUE",
        help="a tag for the tracker run and manifest.json; repeat the flag for several")
    add("--monitor", default="val/loss", help="metric that picks the best checkpoint (val/loss, val/acc, ...)")
    add("--checkpoint", default=None, help="--only-test: a checkpoint file, or best/last of the latest run")
    add("--resume", nargs="?", const="last", default=None,
        help="continue a run to --max-epochs: its last.ckpt, or a checkpoint path")
    add("--checkpoint-every-n-steps", type=positive_int, default=None,
        help="also save last.ckpt every N training steps")
    add("--debug", action="store_true", help="show tracebacks instead of one-line errors")
    # fmt: on
    return parser


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    """Defaults < --config file < command-line flags. Bad values exit 2 with one line, argparse-style."""
    parser = build_parser()
    config_path = _config_path_in(argv)
    if config_path is not None:
        parser.set_defaults(**_read_config(parser, config_path))
    args = parser.parse_args(argv)
    if args.only_test and args.resume:
        parser.error("--only-test and --resume exclude each other")
    args.argv = list(sys.argv[1:] if argv is None else argv)  # for manifest.json and the tracker
    return args


def _config_path_in(argv: list[str] | None) -> Path | None:
    finder = argparse.ArgumentParser(add_help=False)
    finder.add_argument("--config", type=Path, default=None)
    known, _ = finder.parse_known_args(argv)
    return known.config


def _read_config(parser: argparse.ArgumentParser, path: Path) -> dict[str, Any]:
    """Values from a YAML file, checked and converted exactly as the same flags would be."""
    import yaml

    try:
        values = yaml.safe_load(path.read_text())
    except OSError as error:
        parser.error(f"--config: cannot read {path}: {error.strerror}")
    except yaml.YAMLError as error:
        where = getattr(error, "problem_mark", None)
        line = f" at line {where.line + 1}" if where else ""
        parser.error(f"--config: {path} is not valid YAML{line}")
    if values is None:
        return {}
    if not isinstance(values, dict):
        parser.error(f"--config: {path} must hold a mapping of option: value")
    actions = {action.dest: action for action in parser._actions}
    converted = {}
    for key, value in values.items():
        dest = str(key).replace("-", "_")
        action = actions.get(dest)
        if action is None or dest in ("help", "config"):
            parser.error(f"--config: {path}: unknown option '{key}'")
        converted[dest] = _convert(parser, action, value, path)
    return converted


def _convert(parser: argparse.ArgumentParser, action: argparse.Action, value: Any, path: Path) -> Any:
    flag = action.option_strings[0]
    if isinstance(action, argparse._StoreTrueAction):
        if not isinstance(value, bool):
            parser.error(f"--config: {path}: {flag} must be true or false")
        return value
    if isinstance(action, Repeatable):
        items = value if isinstance(value, list) else [value]
        return [_convert_one(parser, action, item, flag, path) for item in items]
    if value is None:
        return None
    return _convert_one(parser, action, value, flag, path)


def _convert_one(parser: argparse.ArgumentParser, action: argparse.Action, value: Any, flag: str, path: Path) -> Any:
    try:
        converted = action.type(str(value)) if action.type else str(value)
    except (TypeError, ValueError):
        parser.error(f"--config: {path}: {flag}: invalid {getattr(action.type, '__name__', 'value')}: {value!r}")
    if action.choices is not None and converted not in action.choices:
        parser.error(
            f"--config: {path}: {flag}: invalid choice {value!r} (choose from {', '.join(map(str, action.choices))})"
        )
    return converted


def config_of(args: argparse.Namespace) -> dict[str, Any]:
    """The fully resolved training configuration, as config.yaml stores it."""
    return {k: (str(v) if isinstance(v, Path) else v) for k, v in vars(args).items() if k not in NOT_CONFIG}


def resume_command(argv: Sequence[str], checkpoint: Path) -> str:
    """The command line that started this run (for a sweep's trial, its own) with `--resume CHECKPOINT`
    in place of any --resume it had, ready to paste."""
    kept, skip_value = [], False
    for token in argv:
        if skip_value and not token.startswith("-"):
            skip_value = False
            continue
        skip_value = token == "--resume"  # nargs="?": it may or may not have taken a value
        if not skip_value and not token.startswith("--resume="):
            kept.append(token)
    return shlex.join([sys.executable, "-m", "project.run", *kept, "--resume", str(checkpoint.resolve())])


def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv)
    from project.errors import RunStopped, exit_code

    try:
        return exit_code(lambda: train_and_test(args), args.debug)
    except RunStopped as error:
        if args.debug:
            raise
        print(error, file=sys.stderr)
        return error.exit_code
    except KeyboardInterrupt:  # Ctrl-C outside Lightning's loops (loading data, reporting)
        print("stopped by SIGINT outside training: nothing new to save", file=sys.stderr)
        return 130
    except SystemExit as error:
        from lightning.pytorch.utilities.exceptions import SIGTERMException

        # Outside training steps (sanity check, testing) Lightning's own SIGTERM handler stops the run
        # with this SystemExit, whose code (None) would tell a scheduler that the job succeeded.
        if not isinstance(error, SIGTERMException):
            raise
        print("stopped by SIGTERM outside a training step: nothing new to save", file=sys.stderr)
        return 143


@dataclass
class RunResult:
    """What a finished run leaves for a caller that runs several (project.sweep, project.seeds)."""

    directory: Path
    best_score: float | None  # the best value of --monitor, from the checkpoint that was tested
    test_metrics: dict[str, float] = field(default_factory=dict)  # "test/acc", "test/loss", ...


def train_and_test(args: argparse.Namespace, callbacks: Sequence[Any] = ()) -> RunResult:
    """One run; `callbacks` are added to the Trainer's (a sweep reports validation metrics through one)."""
    from project import tracking

    tracking.require_trackers(args.logger)  # before the slow imports: a missing tracker answers at once

    import lightning.pytorch as pl

    from project import checkpoints, records
    from project.data import DATASETS

    pl.seed_everything(args.seed, workers=True, verbose=False)
    _hardware(args)  # hardware mistakes fail here, before anything is written

    # 1. Data: the dataset tells the model its input shape, classes and pixel statistics. Missing files
    # fail here, before a run directory exists (Lightning calls prepare_data again, then a no-op).
    datamodule = DATASETS[args.dataset](**vars(args))
    if os.environ.get("LOCAL_RANK", "0") == "0":
        datamodule.prepare_data()

    # 2. Model: fresh, or the weights under test / being resumed.
    checkpoint = checkpoints.resolve(args) if (args.only_test or args.resume) else None
    if args.only_test:
        solver = checkpoints.load_solver(checkpoint, datamodule)
    else:
        solver = build_solver(args, datamodule)
        if args.resume:
            checkpoints.check_resumable(checkpoint, dict(solver.hparams))

    # 3. Records: a run directory, trackers, checkpoints; and the Trainer that writes them.
    run = records.open_run(args, config_of(args), resume_from=checkpoint if args.resume else None)
    trainer = build_trainer(args, run, callbacks)

    # 4. Train, then test the best checkpoint (never the weights of the last epoch by accident).
    if not args.only_test:
        trainer.fit(solver, datamodule=datamodule, ckpt_path=str(checkpoint) if checkpoint else None, weights_only=True)
        tested = _best_checkpoint(trainer, args.monitor)
    else:
        tested = checkpoint
    # Name the checkpoint under test: with ckpt_path=None, Lightning on SLURM would load an hpc_ckpt_*.ckpt
    # that its auto-requeue left in the run directory instead of these weights.
    trainer.test(solver, datamodule=datamodule, verbose=False, ckpt_path=str(tested) if tested else None)

    # 5. Report.
    run.finish(trainer, solver, datamodule, tested)
    return RunResult(
        directory=run.directory,
        best_score=_best_score(trainer, args.monitor),
        test_metrics={k: float(v) for k, v in trainer.callback_metrics.items() if k.startswith("test/")},
    )


def _best_checkpoint(trainer: Any, monitor: str) -> Path | None:
    """The best checkpoint's path, the same on every process (Lightning broadcasts rank 0's directory),
    so each rank tests the same weights whoever launched it (Lightning, torchrun, SLURM)."""
    for callback in trainer.checkpoint_callbacks:
        if callback.monitor == monitor and callback.best_model_path:
            return Path(callback.best_model_path)
    return None


def _best_score(trainer: Any, monitor: str) -> float | None:
    for callback in trainer.checkpoint_callbacks:
        if callback.monitor == monitor and callback.best_model_score is not None:
            return float(callback.best_model_score)
    return None


def build_solver(args: argparse.Namespace, datamodule: Any) -> Any:
    """A fresh Solver for `datamodule`'s inputs and classes (benchmarks/ builds it the same way)."""
    from project.solver import Solver

    accelerator, _, _ = _hardware(args)
    return Solver(
        model=args.model,
        input_shape=list(datamodule.input_shape),
        class_names=list(datamodule.class_names),
        mean=list(datamodule.mean),
        std=list(datamodule.std),
        pixel_max=datamodule.pixel_max,
        hidden_dim=args.hidden_dim,
        learning_rate=args.learning_rate,
        max_epochs=args.max_epochs,
        channels_last=args.model == "cnn" and accelerator != "cpu",
        compile=args.compile,
    )


def build_trainer(args: argparse.Namespace, run: Any, callbacks: Sequence[Any] = ()) -> Any:
    """The Trainer for `args`, logging and checkpointing into `run` (records.open_run's), with the safety
    callbacks and any `callbacks` given (benchmarks/ times exactly this one)."""
    import lightning.pytorch as pl
    from lightning.fabric.utilities.exceptions import MisconfigurationException
    from lightning.pytorch.callbacks import TQDMProgressBar

    from project import checkpoints
    from project.callbacks import safety_callbacks
    from project.errors import UserError

    accelerator, device_count, precision = _hardware(args)
    last = run.directory / checkpoints.CHECKPOINT_DIR / checkpoints.LAST
    safety = safety_callbacks(last, resume_command(args.argv, last), args.checkpoint_every_n_steps)
    settings = dict(
        accelerator=accelerator,
        devices=device_count,
        num_nodes=args.num_nodes,
        strategy=args.strategy,
        precision=precision,
        max_epochs=args.max_epochs,
        fast_dev_run=args.fast_dev_run,
        deterministic=args.deterministic or None,
        # cuDNN picks the fastest convolution for our fixed batch shapes (ignored on the CPU).
        benchmark=not args.deterministic,
        logger=run.loggers,
        # A progress bar redrawn every step costs a terminal write per step; every 10th is as readable.
        callbacks=[*run.callbacks, *safety, *callbacks, TQDMProgressBar(refresh_rate=PROGRESS_BAR_REFRESH_STEPS)],
        # Checkpoints written atomically, read weights_only (also when Lightning resumes from one).
        plugins=[checkpoints.SafeCheckpointIO("--checkpoint" if args.only_test else "--resume")],
        default_root_dir=str(run.directory),
        # Our loaders shard by rank themselves (evaluation without padding duplicates).
        use_distributed_sampler=False,
        # Each logged step reads the loss on the host (a GPU sync) and writes to every tracker.
        log_every_n_steps=LOG_EVERY_N_STEPS,
        enable_model_summary=False,
    )
    try:
        return pl.Trainer(**settings)
    except (MisconfigurationException, ValueError, TypeError, ModuleNotFoundError) as error:
        # Hardware mistakes (no GPU, too many devices, unknown strategy) as one line.
        first_sentence = str(error).split(". ")[0].splitlines()[0]
        raise UserError(f"--accelerator/--devices/--strategy/--precision: {first_sentence}") from error


def _hardware(args: argparse.Namespace) -> tuple[str, Any, str]:
    """(accelerator, devices, precision) for the Trainer, from --gpus/--accelerator/--devices/--precision,
    checked against what this machine has before anything is written."""
    import torch

    from project.errors import UserError

    accelerator, count = args.accelerator, args.devices
    if args.gpus is not None:
        accelerator, count = "gpu", args.gpus
    if accelerator in ("gpu", "cuda"):
        available = torch.cuda.device_count()
        if available == 0:
            raise UserError("a GPU was requested (--gpus/--accelerator gpu) but none is visible; use --accelerator cpu")
        if isinstance(count, int) and count > available:
            raise UserError(f"--devices {count}: only {available} GPU(s) visible on this machine")
    if accelerator == "cpu" and isinstance(count, int) and count > (os.cpu_count() or 1):
        raise UserError(f"--devices {count}: this machine has {os.cpu_count()} CPU cores; use at most that many")
    if args.strategy != "auto":
        from lightning.pytorch.strategies import StrategyRegistry

        if args.strategy not in StrategyRegistry:
            raise UserError(
                f"--strategy {args.strategy}: not one of Lightning's strategies (ddp, ddp_spawn, fsdp, deepspeed, "
                f"...: {len(StrategyRegistry)} in lightning.pytorch.strategies.StrategyRegistry)"
            )
    if args.precision:
        precision = args.precision
    elif args.half_precision:
        on_gpu = accelerator in ("gpu", "cuda") or (accelerator == "auto" and torch.cuda.is_available())
        bf16 = not on_gpu or torch.cuda.is_bf16_supported()
        precision = "bf16-mixed" if bf16 else "16-mixed"
    else:
        precision = "32-true"
    return accelerator, count, precision


if __name__ == "__main__":
    sys.exit(main())
