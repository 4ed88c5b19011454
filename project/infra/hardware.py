"""Where a run computes: --gpus and --half-precision in Lightning's terms, checked by Lightning itself before
anything is written."""

from __future__ import annotations

import argparse
import os
from typing import Any

from project.infra.errors import UserError


def resolve(args: argparse.Namespace) -> dict[str, Any]:
    """The Trainer's accelerator, devices, num_nodes, strategy and precision for `args`. A mistake in them is one
    line: a throwaway Trainer (a few milliseconds, nothing written) runs Lightning's own checks now, before a run
    directory exists. Lightning names no missing GPU as such, and would start a process for each of 512 CPU devices."""
    import lightning.pytorch as pl
    import torch
    from lightning.pytorch.utilities.exceptions import MisconfigurationException

    accelerator, devices = ("gpu", args.gpus) if args.gpus is not None else (args.accelerator, args.devices)
    if accelerator in ("gpu", "cuda") and not torch.cuda.is_available():
        raise UserError("a GPU was requested (--gpus/--accelerator gpu) but none is visible; use --accelerator cpu")
    if accelerator == "cpu" and isinstance(devices, int) and devices > (os.cpu_count() or 1):
        raise UserError(f"--devices {devices}: this machine has {os.cpu_count()} CPU cores; use at most that many")
    on_gpu = accelerator in ("gpu", "cuda") or (accelerator == "auto" and torch.cuda.is_available())
    half = "bf16-mixed" if not on_gpu or torch.cuda.is_bf16_supported() else "16-mixed"
    precision = args.precision or (half if args.half_precision else "32-true")
    settings = dict(accelerator=accelerator, devices=devices, num_nodes=args.num_nodes, strategy=args.strategy,
                    precision=precision)  # fmt: skip
    try:
        pl.Trainer(**settings, logger=False, enable_checkpointing=False, enable_progress_bar=False)
    except (ValueError, TypeError, ImportError, MisconfigurationException) as error:
        reason = (str(error) or type(error).__name__).split(". ")[0].splitlines()[0]
        flags = f"--accelerator {accelerator} --devices {devices} --strategy {args.strategy} --precision {precision}"
        raise UserError(f"{flags}: {reason}") from error
    return settings
