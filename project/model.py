"""Backbones: raw inputs (N, *input_shape) in (pixels (N, C, H, W), or feature vectors (N, F)), one value per output
of the task out (a logit per class, a standardised value per quantity).

To add one: write a function `(input_shape, num_outputs, **options) -> nn.Module`, add it to MODELS, and its name
to run.py's MODEL_NAMES (which `--help` lists without importing torch). Each keyword option the function takes
(`hidden_dim`, or a `dropout` of its own) receives the command-line option of the same name: declare a new one
in run.py's build_parser under "Backbone options". The README shows a complete example.
"""

from __future__ import annotations

import inspect
import math
from collections.abc import Sequence
from typing import Any

import torch
from torch import nn


def mlp(input_shape: Sequence[int], num_outputs: int, hidden_dim: int = 128) -> nn.Module:
    """The original template's backbone, without the ReLU it put on the logits (it clipped them at 0)."""
    return nn.Sequential(
        nn.Flatten(),
        nn.Linear(math.prod(input_shape), hidden_dim),
        nn.ReLU(),
        nn.Linear(hidden_dim, num_outputs),
    )


def cnn(input_shape: Sequence[int], num_outputs: int, hidden_dim: int = 128) -> nn.Module:
    """Three stages of two conv-BN-ReLU blocks, widths hidden_dim/4, hidden_dim/2, hidden_dim.

    Each stage halves the resolution while it is at least 2 pixels, so 8x8 digits, 28x28 MNIST and 32x32 CIFAR all
    fit; global average pooling makes the head independent of the input size. BatchNorm's running statistics are
    recomputed before every evaluation (infra/callbacks.PreciseBatchNorm), so even a one-epoch model scores right.
    """
    if len(input_shape) != 3:
        raise ValueError(f"cnn takes images (C, H, W), not inputs of shape {tuple(input_shape)}: use --model mlp")
    channels, height, width = input_shape
    layers: list[nn.Module] = []
    for out_channels in (max(hidden_dim // 4, 4), max(hidden_dim // 2, 4), hidden_dim):
        for _ in range(2):
            # No conv bias: the BatchNorm right after it has its own.
            layers += [nn.Conv2d(channels, out_channels, 3, padding=1, bias=False), nn.BatchNorm2d(out_channels)]
            layers.append(nn.ReLU(inplace=True))
            channels = out_channels
        if min(height, width) >= 2:
            layers.append(nn.MaxPool2d(2))
            height, width = height // 2, width // 2
    return nn.Sequential(*layers, nn.AdaptiveAvgPool2d(1), nn.Flatten(), nn.Linear(channels, num_outputs))


MODELS = {"mlp": mlp, "cnn": cnn}


class Standardize(nn.Module):
    """(x - mean) / std per channel of an image or per feature of a vector, on raw values. Part of the model, so a
    checkpoint or an exported file carries its own preprocessing and nobody re-types the constants."""

    def __init__(self, mean: Sequence[float], std: Sequence[float], input_shape: Sequence[int]) -> None:
        super().__init__()
        shape = (1, -1, *[1] * (len(input_shape) - 1))  # broadcast over the pixels of each channel
        self.register_buffer("mean", torch.tensor(mean, dtype=torch.float32).view(shape))
        std = torch.tensor(std, dtype=torch.float32).view(shape)
        # A feature constant in the training data (std 0) is divided by 1, as scikit-learn's StandardScaler does.
        self.register_buffer("std", torch.where(std > 0, std, torch.ones_like(std)))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return (x - self.mean) / self.std


def build_model(
    name: str,
    input_shape: Sequence[int],
    num_outputs: int,
    mean: Sequence[float],
    std: Sequence[float],
    output_layer: nn.Module | None = None,
    **options: Any,
) -> nn.Module:
    """The backbone `name` between the dataset's standardisation and the task's output layer."""
    backbone = MODELS[name](tuple(input_shape), num_outputs, **options)
    return nn.Sequential(Standardize(mean, std, input_shape), backbone, output_layer or nn.Identity())


def backbone_options(name: str, config: dict[str, Any]) -> dict[str, Any]:
    """The run's option values that backbone `name` takes as keyword arguments (saved with its checkpoints). A
    parameter named like an option of the data (`image_size`, `batch_size`) would silently get the data's value: it
    is refused (the backbone knows its input_shape)."""
    from project.data import DATASETS
    from project.infra.errors import UserError

    parameters = list(inspect.signature(MODELS[name]).parameters)[2:]  # after input_shape, num_outputs
    data = {parameter.name for dataset in DATASETS.values() for cls in dataset.__mro__ if "__init__" in vars(cls)
            for parameter in inspect.signature(cls.__init__).parameters.values()
            if parameter.kind in (parameter.POSITIONAL_OR_KEYWORD, parameter.KEYWORD_ONLY)}  # fmt: skip
    taken = sorted(set(parameters) & data - {"self"})
    if taken:
        raise UserError(f"--model {name}: its parameter {taken[0]} is the data's option --{taken[0].replace('_', '-')},"
                        " not the backbone's: give the backbone's option a name of its own")  # fmt: skip
    return {key: config[key] for key in parameters if key in config}
