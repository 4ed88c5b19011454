"""Where a run computes: --gpus and --half-precision in Lightning's terms, and a launch that can start, checked
before anything is written; every process of a run checked to train the same thing before any record."""

from __future__ import annotations

import argparse
import os
import sys
import warnings
from typing import Any

import lightning.pytorch as pl
import torch

from project.infra.errors import UserError

# Lightning's spawn and fork launchers pickle or fork the Trainer at every fit and test and return the weights in a
# checkpoint of their own; ddp starts the same processes once, each running the command line.
SPAWNING = ("ddp_spawn", "ddp_fork", "ddp_notebook")
# What may differ between the processes of a run: only global rank 0 writes, and each node has its own cores.
LOCAL_OPTIONS = {"num_workers", "data_dir", "exp_dir", "exp_name", "logger"}
# What launchers set to tell a process its place in the run (Lightning reads them; SLURM's only inside its jobs).
RANKS = ("RANK", "LOCAL_RANK", "NODE_RANK", "SLURM_PROCID")


def resolve(args: argparse.Namespace) -> dict[str, Any]:
    """The Trainer's accelerator, devices, num_nodes, strategy and precision for `args`. A mistake in them is one
    line: a throwaway Trainer (a few milliseconds, nothing written) runs Lightning's own checks now, before a run
    directory exists, and its cluster environment checks the launch (torchrun's or SLURM's world against
    --devices x --num-nodes). Lightning names no missing GPU as such, would start a process for each of 512 CPU devices,
    and with --num-nodes but no launcher waits for the other nodes forever."""
    from lightning.fabric.plugins.environments import LightningEnvironment
    from lightning.pytorch.utilities.exceptions import MisconfigurationException

    accelerator, devices = ("gpu", args.gpus) if args.gpus else (args.accelerator, args.devices)
    if accelerator in ("gpu", "cuda") and not torch.cuda.is_available():
        advice = "--gpus 0 (none: it undoes a --gpus of a config file)" if args.gpus else "--accelerator cpu"
        raise UserError(f"a GPU was requested (--gpus/--accelerator gpu) but none is visible; use {advice}")
    if accelerator == "cpu" and isinstance(devices, int) and devices > (os.cpu_count() or 1):
        raise UserError(f"--devices {devices}: this machine has {os.cpu_count()} CPU cores; use at most that many")
    if str(args.strategy).startswith(SPAWNING):
        raise UserError(f"--strategy {args.strategy}: not supported (it pickles or forks the Trainer at every fit "
                        "and test); use --strategy ddp: the same processes, each running this command")  # fmt: skip
    on_gpu = accelerator in ("gpu", "cuda") or (accelerator == "auto" and torch.cuda.is_available())
    half = "bf16-mixed" if not on_gpu or torch.cuda.is_bf16_supported() else "16-mixed"
    precision = args.precision or (half if args.half_precision else "32-true")
    settings = dict(accelerator=accelerator, devices=devices, num_nodes=args.num_nodes, strategy=args.strategy,
                    precision=precision)  # fmt: skip
    flags = (f"--accelerator {accelerator} --devices {devices} --num-nodes {args.num_nodes} --strategy {args.strategy} "
             f"--precision {precision}")  # fmt: skip
    try:
        with warnings.catch_warnings():  # said once, by the run's own Trainer
            warnings.simplefilter("ignore")
            trainer = pl.Trainer(**settings, logger=False, enable_checkpointing=False, enable_progress_bar=False)
        environment = getattr(trainer.strategy, "cluster_environment", None)
        if environment is not None:
            environment.validate_settings(num_devices=trainer.num_devices, num_nodes=trainer.num_nodes)
    except (ValueError, TypeError, ImportError, MisconfigurationException) as error:
        reason = (str(error) or type(error).__name__).split(". ")[0].splitlines()[0]
        raise UserError(f"{flags}: {reason}") from error
    stray = [f"{name}={os.environ[name]}" for name in RANKS if os.environ.get(name, "0") != "0"]
    if trainer.world_size == 1 and stray:  # Lightning would train on, and every record is rank 0's to write
        raise UserError(
            f"{' '.join(stray)} in the environment makes this process one that keeps no records, but "
            f"the run has one process ({flags}); unset it, or give the launch's --devices and --num-nodes"
        )
    launched = {"MASTER_ADDR", "NODE_RANK"} <= os.environ.keys()
    if trainer.num_nodes > 1 and type(environment) is LightningEnvironment and not launched:
        raise UserError(f"--num-nodes {trainer.num_nodes}: nothing started the other nodes, so this process would wait "
                        "for them forever; start the command on every node with torchrun --nnodes or srun (README: "
                        "Many GPUs, many nodes)")  # fmt: skip
    return settings


class SameSettings(pl.Callback):
    """Processes started with different options (one node given another --max-epochs) part ways and wait for each
    other forever. One exchange as the Trainer sets up, before the run writes its first record, refuses them."""

    def __init__(self, config: dict[str, Any]) -> None:
        self.config = {key: value for key, value in config.items() if key not in LOCAL_OPTIONS}

    def setup(self, trainer: pl.Trainer, pl_module: pl.LightningModule, stage: str) -> None:
        if not torch.distributed.is_initialized():
            return
        configs: list[Any] = [None] * torch.distributed.get_world_size()
        torch.distributed.all_gather_object(configs, self.config)
        differ = sorted({key for config in configs for key in config if config.get(key) != configs[0].get(key)})
        if differ:
            values = ", ".join(
                f"--{key.replace('_', '-')} " + "/".join(str(c.get(key)) for c in configs) for key in differ
            )
            raise UserError(f"the processes of this run were started with different options ({values}, by rank); "
                            "start every node with the same command")  # fmt: skip

    def on_train_start(self, trainer: pl.Trainer, pl_module: pl.LightningModule) -> None:
        # Lightning shards a map-style dataset (a DistributedSampler), never an IterableDataset: whether one splits
        # itself by rank cannot be seen from here, so it is said, not refused.
        dataset = getattr(trainer.train_dataloader, "dataset", None)
        if trainer.world_size > 1 and trainer.is_global_zero and isinstance(dataset, torch.utils.data.IterableDataset):
            print(f"warning: the training data is an IterableDataset, which Lightning does not split across the "
                  f"{trainer.world_size} processes: unless it splits itself by torch.distributed.get_rank() (README: "
                  "Your own data and model), each process trains on all of it", file=sys.stderr,
                  flush=True)  # fmt: skip
