"""Train and test a model: `python -m project.run --help`.

main() reads top to bottom: the command line, then data -> model -> trainer -> fit -> test -> report. Everything heavy
(torch, Lightning) is imported after parsing, so `--help` and typos answer at once. What keeps a run safe and
recorded (run directory, trackers, checkpoints, signals) lives in project/infra/.
"""

from __future__ import annotations

import argparse
import os
import sys
from collections.abc import Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from project.infra import runs
from project.infra.cli import (
    Parser,
    Repeatable,
    devices,
    fraction,
    image_size,
    learning_rate,
    monitor,
    name,
    non_negative_int,
    path,
    positive_float,
    positive_int,
    seed,
    tag,
    tracker,
)
from project.infra.errors import UserError, exit_process, run_command
from project.infra.redact import REDACTED, redact

# Names only, so that --help needs no torch; tests/test_models.py checks them against data.DATASETS and model.MODELS.
DATASET_NAMES = ("digits", "mnist", "fashion-mnist", "cifar10", "image-folder", "diabetes")
MODEL_NAMES = ("mlp", "cnn")
LOGGERS = ("mlflow", "tensorboard", "csv", "wandb", "none")
PRECISIONS = ("32-true", "16-mixed", "bf16-mixed", "64-true")
CPUS = len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else os.cpu_count() or 1
# How often the step loss is logged: a logged value is read on the host, a wait for the GPU. Every 10th step still
# gives a digits run (12 steps an epoch) a loss curve.
LOG_EVERY_N_STEPS = 10
# --resume continues a run with its own config.yaml: flags may change where and how it runs, for how long and what it
# records. Anything else would change its data, its split, its model or its optimisation, and is refused. The data's
# folder may move (--data-dir, as each node of a run has its own): the data themselves are checked to be the same
# (an image folder's listing, every dataset's split sizes, CIFAR-10's checksums).
MAY_CHANGE_ON_RESUME = {"max_epochs", "accelerator", "devices", "gpus", "num_nodes", "strategy", "precision",
                        "half_precision", "compile", "deterministic", "num_workers", "data_on_device", "logger",
                        "checkpoint_every_n_steps", "fast_dev_run", "exp_dir", "exp_name", "image_memory",
                        "data_dir"}  # fmt: skip
# --only-test scores a checkpoint on its run's own test split: what picks those images cannot change.
FIXED_ON_TEST = {"dataset", "image_size", "seed", "val_fraction"}


def build_parser() -> Parser:
    parser = Parser(prog="python -m project.run", description="Train a model, test its best checkpoint, and "
                    "keep a record of the run. Values come from the defaults, then --config (or, with --resume and "
                    "--only-test, the run's own config.yaml), then these flags.")  # fmt: skip
    add = parser.add
    # fmt: off
    # The original template's options; the README's "Defaults" says why the learning rate and --gpus changed.
    add("--batch-size", type=positive_int, default=128, help="samples per step on each device")
    add("--num-workers", type=non_negative_int, default=min(4, CPUS), help="DataLoader workers (image folders)")
    add("--learning-rate", type=learning_rate, default=1e-3, help="Adam's initial learning rate, cosine decay to 0")
    add("--only-test", action="store_true", command_only=True, help="test --checkpoint on its run's test split")
    add("--half-precision", action="store_true", help="bf16 mixed precision where supported, else fp16")
    add("--gpus", type=non_negative_int, help="shorthand for --accelerator gpu --devices N (0: none, as unset)")
    add("--max-epochs", type=positive_int, default=20, help="epochs to train (with --resume: extend the run to this)")
    add("--exp-name", type=name, default="debug", help="runs of one experiment share this folder")
    add("--exp-dir", type=path, default="~/Experiments", help="where runs, checkpoints and the local MLflow store live")
    add("--fast-dev-run", action="store_true", help="one batch of train, val and test: a smoke test")
    # Backbone options: a backbone in model.py receives each one it names as a keyword argument.
    add("--hidden-dim", type=positive_int, default=128, help="width of the model")
    # What a user expects beside them.
    add("--config", type=Path, command_only=True, help="YAML of option values (a run's config.yaml reruns it)")
    add("--dataset", choices=DATASET_NAMES, default="digits", help="what to train on")
    add("--model", choices=("auto", *MODEL_NAMES), default="auto",
        help="the backbone (project/model.py); auto: the dataset's default_model (cnn for images, mlp for vectors)")
    add("--seed", type=seed, default=0, help="seeds the data split, the batch order and the initial weights")
    add("--deterministic", action="store_true", help="deterministic algorithms only (bit-exact reruns)")
    add("--data-dir", type=path, default="data", help="where datasets are (downloaded to), or your image folder")
    add("--image-size", type=image_size, default=64, help="image-folder: resize images to this square")
    add("--image-memory", type=positive_float, default=4.0, metavar="GIB", help="image-folder: keep the resized images "
        "in memory when they fit in this many GiB (the machine's: each process keeps a copy), so epochs after the "
        "first decode none")
    add("--val-fraction", type=fraction, default=0.1, help="share held out for validation: of the training set where "
        "the data has its own test split (mnist, cifar10, train/ folders), else of all of it (beside a tenth for test)")
    add("--data-on-device", choices=("auto", "yes", "no"), default="auto",
        help="hold in-memory datasets on the GPU (auto: when they fit; no: a standard DataLoader)")
    add("--accelerator", default="auto", help="cpu, gpu, mps or auto")
    add("--devices", type=devices, default=1, help="devices per node: a count, indices like 0,1, or auto")
    add("--num-nodes", type=positive_int, default=1, help="machines in a multi-node run")
    add("--strategy", default="auto", help="auto, ddp, fsdp, deepspeed, ... (Lightning's strategies)")
    add("--precision", choices=PRECISIONS, help="numeric precision (unset: 32-true, or what --half-precision picks)")
    add("--compile", action="store_true", help="torch.compile the model")
    add("--logger", action=Repeatable, type=tracker, choices=LOGGERS, default=["mlflow"],
        help="experiment tracker; repeat the flag for several")
    add("--tag", action=Repeatable, type=tag, default=[], metavar="KEY=VALUE", command_only=True,
        help="a tag for the tracker run and manifest.json; repeat the flag for several")
    add("--monitor", type=monitor, default="val/loss", metavar="METRIC",
        help="metric that picks the best checkpoint: val/loss or val/<a metric of the dataset's task> (e.g. val/acc, "
        "val/mae), or train/...")
    add("--checkpoint", type=path, default="best", command_only=True,
        help="--only-test: a checkpoint file, or best/last of the latest run of --exp-name")
    add("--resume", type=path, nargs="?", const="last", command_only=True,
        help="continue a run to --max-epochs: the latest run's last.ckpt, or a checkpoint path")
    add("--checkpoint-every-n-steps", type=non_negative_int,
        help="also save last.ckpt every N training steps (0: only at each epoch's end, e.g. to resume without)")
    add("--debug", action="store_true", command_only=True, help="show tracebacks instead of one-line errors")
    # fmt: on
    return parser


def parse_args(argv: Sequence[str] | None = None) -> argparse.Namespace:
    """Defaults < --config FILE (or the config.yaml of the run --resume/--only-test continues) < flags. Every value is
    checked by one parser; a mistake exits 2 with one line. --resume/--checkpoint come back as checkpoint paths."""
    argv = list(sys.argv[1:] if argv is None else argv)
    parser = build_parser()
    args = parser.parse_args(argv)
    continued = None  # the run whose own configuration --resume or --only-test takes
    if args.resume and args.only_test:
        parser.error("--only-test and --resume exclude each other")
    if args.checkpoint != "best" and not args.only_test:  # not ignored: training on from one is --resume
        parser.error(f"--checkpoint {args.checkpoint}: a checkpoint to test with --only-test; to train on from one, "
                     "use --resume")  # fmt: skip
    if args.resume or args.only_test:
        flag = "--resume" if args.resume else "--checkpoint"
        try:
            checkpoint = runs.find_checkpoint(args.resume or args.checkpoint, args.exp_dir, args.exp_name, flag)
        except UserError as error:
            parser.error(str(error))
        continued = runs.run_of(checkpoint)
        folder = checkpoint.parent.parent
        if continued is None and checkpoint.parent.name == runs.CHECKPOINT_DIR and (folder / runs.MANIFEST).is_file():
            parser.error(f"{folder}: its {runs.CONFIG} is missing; restore it (a run goes on with its own settings), "
                         f"or copy {checkpoint.name} out of the run to start a new one from it")  # fmt: skip
        if continued and args.resume and checkpoint.name != runs.LAST:  # it would train over the run's later epochs
            parser.error(
                f"--resume: {checkpoint.name} is not its run's {runs.LAST}: a run goes on from where it "
                "stopped; to train on from this one, copy it out of the run and resume the copy (a new run)"
            )
        if continued and args.config:
            parser.error(f"--config: {'--resume' if args.resume else '--only-test'} uses the run's own config.yaml")
    source = args.config or (continued / runs.CONFIG if continued else None)
    if source:
        saved = parser.read_config(source)
        if continued and not saved:  # a run's own record, emptied: resuming with the defaults would be another run
            parser.error(f"{source} holds no options; restore the run's config.yaml, or start a new run")
        parser.set_defaults(**saved)
        args = parser.parse_args(argv)
        hidden = [parser.flags[key] for key, value in saved.items() if value == REDACTED == getattr(args, key)]
        if hidden:  # a value whose option's name reads as a secret's was written down redacted: it is not there
            parser.error(f"{source}: {', '.join(hidden)} was written down as {REDACTED} (its name reads as a "
                         "secret's): give it again")  # fmt: skip
        if continued:
            refuse_changes(parser, args, saved, continued)
            follow_the_run(parser, args, saved, continued)
    if args.resume or args.only_test:
        args.resume, args.checkpoint = (str(checkpoint), None) if args.resume else (None, str(checkpoint))
    args.argv = argv  # for manifest.json and the trackers
    return args


def follow_the_run(parser: Parser, args: argparse.Namespace, saved: dict[str, Any], run: Path) -> None:
    """A run moved or copied since its config.yaml was written continues where it is now (its store and experiment
    there), and --only-test records its test beside it unless --exp-dir/--exp-name say otherwise."""
    here = run.resolve()
    if (Path(args.exp_dir).expanduser() / args.exp_name / here.name).resolve() == here:
        return
    if args.only_test and (args.exp_dir, args.exp_name) != (saved.get("exp_dir"), saved.get("exp_name")):
        return  # the flags chose where the test run goes
    try:
        args.exp_dir, args.exp_name = str(here.parent.parent), name(here.parent.name)
    except ValueError:
        parser.error(f"{here}: its folder {here.parent.name!r} is not an experiment name (letters, digits, '_', '-', "
                     "'.'); rename it")  # fmt: skip


def refuse_changes(parser: Parser, args: argparse.Namespace, saved: dict[str, Any], run: Path) -> None:
    if args.resume:
        fixed = [key for key in saved if key not in MAY_CHANGE_ON_RESUME]
        why = "a resumed run keeps its data, split, model and optimisation"
    else:
        fixed = [key for key in saved if key in FIXED_ON_TEST]
        why = "a run's checkpoint is tested on its own test split"
    # config.yaml holds values redacted: a --data-dir .../password=X given again is the same as the one it names
    changed = [f"{parser.flags[key]} {redact(getattr(args, key), key)} (the run's: {saved[key]})"
               for key in fixed if redact(getattr(args, key), key) != saved[key]]  # fmt: skip
    if changed:
        parser.error(f"{', '.join(changed)}: {why} ({run / runs.CONFIG}); start a new run to change that")


def config_of(args: argparse.Namespace) -> dict[str, Any]:
    """The fully resolved training configuration, as config.yaml stores it."""
    skip = build_parser().command_only | {"argv"}
    return {k: str(v) if isinstance(v, Path) else v for k, v in vars(args).items() if k not in skip}


def main(argv: Sequence[str] | None = None) -> int:
    args = parse_args(argv)
    return run_command(lambda: train_and_test(args), args.debug)


@dataclass
class RunResult:
    """What a finished run leaves for a caller that runs several (project.sweep, project.seeds)."""

    directory: Path
    best_score: float | None  # the best value of --monitor, from the checkpoint that was tested
    test_metrics: dict[str, float] = field(default_factory=dict)  # "test/acc", "test/loss", ...


def train_and_test(args: argparse.Namespace, callbacks: Sequence[Any] = ()) -> RunResult:
    """One run; `callbacks` join the Trainer's (a sweep reports validation metrics through one)."""
    from project.infra import tracking

    trackers = tracking.start(args)  # a tracker that is not installed: one line, before Lightning loads

    import lightning.pytorch as pl
    import torch

    from project.data import DATASETS
    from project.infra import checkpoints, console, errors, hardware, records

    console.quiet()  # our own lines and the progress bar, not the libraries' banners
    hardware.resolve(args)  # a GPU that is not there, an unknown strategy: one line, before anything is written
    task = resolve_task(args)  # --model auto, and a --monitor the dataset's task logs
    pl.seed_everything(args.seed, workers=True, verbose=False)

    # 1. Data: the dataset tells the model its task, input shape, outputs and input statistics. Everything is read
    # and checked now, so a missing or broken file fails before anything is written.
    try:  # every option, as keyword arguments: a DataModule of one's own takes **kwargs
        datamodule = DATASETS[args.dataset](**vars(args))
    except TypeError as error:
        raise UserError(f"--dataset {args.dataset}: {str(error).splitlines()[0]}") from error
    datamodule.prepare_data()
    datamodule.setup("test" if args.only_test else "fit")

    # 2. Model: fresh, or the weights being resumed or tested (checked against the data and --max-epochs first).
    checkpoint = Path(args.resume or args.checkpoint) if (args.resume or args.only_test) else None
    if checkpoint is not None:  # what the data saved there (an image folder: its files) is checked before a run opens
        saved = checkpoints.read(checkpoint, "--resume" if args.resume else "--checkpoint")
        datamodule.load_state_dict(saved.get(type(datamodule).__qualname__, {}))
        records.check_split(checkpoint, datamodule)
    if args.only_test:
        solver = checkpoints.load_solver(checkpoint, datamodule)
        # The checkpoint decides the network: config.yaml records the one tested, whatever the flags said.
        args.model, args.learning_rate = solver.hparams["model"], solver.hparams["learning_rate"]
        vars(args).update(solver.hparams.get("model_options") or {})
    else:
        solver = build_solver(args, datamodule)
        if args.resume:
            try:
                checkpoints.check_resumable(checkpoint, dict(solver.hparams), args.max_epochs)
            except errors.NothingToDo:  # trained to the end: a run killed in its test or reports is completed below
                if records.finished(checkpoint):
                    raise

    # 3. Records: the run (named; nothing written yet), the Trainer that writes it, then the run opened (its lock,
    # directory and tracker runs), so that a setting Lightning refuses leaves every run as it was.
    run = records.Run(args, config_of(args), trackers, checkpoint if args.resume else None, task)
    with run:  # however this block ends, the run's records say how (finished, interrupted, failed)
        trainer = build_trainer(args, run, callbacks)
        # Lightning resumes an epoch at its count of batches: with other shards it would end the epoch at once, or skip
        # samples it never trained on
        mid_epoch = getattr(datamodule, "mid_epoch", None) or {}
        if args.resume and mid_epoch and mid_epoch != {"processes": trainer.world_size, "batch_size": args.batch_size}:
            raise UserError(f"--resume: {checkpoint.name} was saved mid-epoch by a run of {mid_epoch['processes']} "
                            f"processes (--devices x --num-nodes) with --batch-size {mid_epoch['batch_size']}: "
                            "continue with the same; from the next epoch on, its last.ckpt resumes with any (a "
                            "SIGTERM during an epoch's validation stops the run at that epoch's end)")  # fmt: skip
        run.open(trainer)

        # 4. Train, then test the best checkpoint (never the last epoch's weights by accident). With --only-test the
        # solver holds its checkpoint's weights already.
        if not args.only_test:
            trainer.fit(solver, datamodule=datamodule, ckpt_path=checkpoint, weights_only=True)
            checkpoint = run.best_checkpoint(trainer)
        run.log_model(checkpoint)  # the weights about to be tested, as an MLflow model
        tested = None if args.only_test else checkpoint
        trainer.test(solver, datamodule=datamodule, ckpt_path=tested, verbose=False, weights_only=True)

        # 5. Report.
        run.finish(trainer, solver, checkpoint)
    if torch.distributed.is_initialized():  # gloo's and NCCL's threads end before the interpreter (or it may abort)
        torch.distributed.destroy_process_group()
    return RunResult(run.directory, run.best_score(trainer), run.test_metrics(trainer))


def resolve_task(args: argparse.Namespace) -> Any:
    """The task class of --dataset; sets --model auto to the dataset's default and checks --monitor (before any
    file is written: a typo must not cost a whole run that then keeps the wrong checkpoint)."""
    from project.data import DATASETS
    from project.tasks import TASKS

    dataset = DATASETS[args.dataset]
    task = TASKS.get(getattr(dataset, "task", None))
    if task is None:
        raise UserError(f"--dataset {args.dataset}: its task {getattr(dataset, 'task', None)!r} is not one of "
                        f"project/tasks/'s TASKS ({', '.join(TASKS)})")  # fmt: skip
    if args.model == "auto":
        args.model = getattr(dataset, "default_model", None)
        if args.model is None:
            raise UserError(f"--model auto: --dataset {args.dataset} names no default_model; give --model")
    if args.monitor.partition("/")[2] not in task.metric_names():
        names = ", ".join(f"val/{name}" for name in task.metric_names())
        raise UserError(
            f"--monitor {args.monitor}: --dataset {args.dataset} ({dataset.task}) logs {names} (or train/...)"
        )
    return task


def build_solver(args: argparse.Namespace, datamodule: Any) -> Any:
    """A fresh Solver for the dataset's task and inputs (benchmarks/ build it the same way)."""
    from project.infra import checkpoints, hardware
    from project.model import backbone_options
    from project.solver import Solver
    from project.tasks import TASKS

    settings = dict(
        task=datamodule.task,
        output_names=list(datamodule.output_names),
        task_options=TASKS[datamodule.task].options_of(datamodule),
        model=args.model,
        model_options=backbone_options(args.model, vars(args)),
        input_shape=list(datamodule.input_shape),
        mean=list(datamodule.mean),
        std=list(datamodule.std),
        pixel_max=datamodule.pixel_max,
        learning_rate=args.learning_rate,
        max_epochs=args.max_epochs,
        channels_last=args.model == "cnn" and hardware.resolve(args)["accelerator"] != "cpu",
        compile=args.compile,
    )
    try:
        return Solver(**checkpoints.storable(settings))
    except (TypeError, ValueError) as error:  # a backbone that does not fit the data, or its options
        raise UserError(f"--model {args.model}: {str(error).splitlines()[0]}") from error


def build_trainer(args: argparse.Namespace, run: Any, callbacks: Sequence[Any] = ()) -> Any:
    """The Trainer for `args`, logging and checkpointing into `run` (a records.Run), with the callbacks that keep
    a run safe and any `callbacks` given (benchmarks/ time exactly this one)."""
    import lightning.pytorch as pl

    from project.infra import callbacks as safety
    from project.infra import hardware

    # The processes' settings are compared first: a refusal comes before the run writes a record.
    same = hardware.SameSettings({**config_of(args), "resume": bool(args.resume), "only_test": args.only_test})
    settings = dict(
        **hardware.resolve(args),  # accelerator, devices, num_nodes, strategy, precision: checked, in one line if wrong
        max_epochs=args.max_epochs,
        fast_dev_run=args.fast_dev_run,
        deterministic=args.deterministic or None,
        benchmark=not args.deterministic,  # cuDNN picks the fastest convolution for our fixed shapes
        logger=run.loggers,
        enable_checkpointing=not args.only_test,
        callbacks=[same, *run.callbacks, *safety.for_run(run.last_checkpoint, args), *callbacks],
        # Checkpoints written atomically and read weights-only, also when Lightning resumes from one.
        plugins=[safety.SafeCheckpointIO("--checkpoint" if args.only_test else "--resume")],
        default_root_dir=run.directory,
        # Lightning shards a plain DataLoader (a user's own LightningDataModule) with a DistributedSampler; it leaves
        # our loaders alone (they are not DataLoaders): they shard by rank themselves, evaluation without padding.
        use_distributed_sampler=True,
        log_every_n_steps=LOG_EVERY_N_STEPS,
        enable_model_summary=False,
    )
    return pl.Trainer(**settings)


if __name__ == "__main__":
    exit_process(main())
