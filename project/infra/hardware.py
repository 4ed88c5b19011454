"""The accelerator, devices and precision a run asks for, checked against this machine before anything is written."""

from __future__ import annotations

import argparse
import os
from typing import Any, NamedTuple

from project.infra.errors import UserError


class Machine(NamedTuple):
    accelerator: str
    devices: Any  # a count, "auto", or indices like "0,1", as Lightning's Trainer takes them
    precision: str


def resolve(args: argparse.Namespace) -> Machine:
    """From --gpus/--accelerator/--devices/--strategy/--precision/--half-precision: one line for each mistake."""
    import torch

    accelerator, count = args.accelerator, args.devices
    if args.gpus is not None:  # the original template's option
        accelerator, count = "gpu", args.gpus
    if accelerator in ("gpu", "cuda"):
        available = torch.cuda.device_count()
        if available == 0:
            raise UserError("a GPU was requested (--gpus/--accelerator gpu) but none is visible; use --accelerator cpu")
        if isinstance(count, int) and count > available:
            raise UserError(f"--devices {count}: only {available} GPU(s) visible on this machine")
    elif accelerator != "auto":
        from lightning.pytorch.accelerators import AcceleratorRegistry

        if accelerator not in AcceleratorRegistry:
            raise UserError(
                f"--accelerator {accelerator}: not one of {', '.join(sorted(AcceleratorRegistry))}, gpu, auto"
            )
        try:
            available = AcceleratorRegistry[accelerator]["accelerator"].is_available()
        except Exception:  # an accelerator whose support library is missing may fail to even ask
            available = False
        if not available:
            raise UserError(f"--accelerator {accelerator}: not available on this machine; use cpu or auto")
    if accelerator == "cpu" and isinstance(count, int) and count > (os.cpu_count() or 1):
        raise UserError(f"--devices {count}: this machine has {os.cpu_count()} CPU cores; use at most that many")
    if args.strategy != "auto":
        from lightning.pytorch.strategies import StrategyRegistry

        if args.strategy not in StrategyRegistry:
            raise UserError(
                f"--strategy {args.strategy}: not one of Lightning's strategies (ddp, ddp_spawn, fsdp, ...)"
            )
    if args.precision:
        precision = args.precision
    elif args.half_precision:
        on_gpu = accelerator in ("gpu", "cuda") or (accelerator == "auto" and torch.cuda.is_available())
        precision = "bf16-mixed" if not on_gpu or torch.cuda.is_bf16_supported() else "16-mixed"
    else:
        precision = "32-true"
    return Machine(accelerator, count, precision)
