"""Backbones. To add one: write a function `(input_shape, num_classes, hidden_dim) -> nn.Module` and
register it in MODELS (and its name in run.py's MODEL_NAMES, which `--help` lists without importing torch).
"""

from __future__ import annotations

from collections.abc import Sequence

import torch
from torch import nn


def mlp(input_shape: Sequence[int], num_classes: int, hidden_dim: int) -> nn.Module:
    """The original template's backbone, without the ReLU it put on the logits (it clipped them at 0)."""
    in_features = int(torch.tensor(input_shape).prod())
    return nn.Sequential(
        nn.Flatten(),
        nn.Linear(in_features, hidden_dim),
        nn.ReLU(),
        nn.Linear(hidden_dim, num_classes),
    )


def cnn(input_shape: Sequence[int], num_classes: int, hidden_dim: int) -> nn.Module:
    """Three stages of two conv-BN-ReLU blocks, widths hidden_dim/4, hidden_dim/2, hidden_dim.

    Each stage halves the resolution while it is at least 2 pixels, so 8x8 digits, 28x28 MNIST and
    32x32 CIFAR all fit; global average pooling makes the head independent of the input size.
    """
    channels, height, width = input_shape
    widths = [max(hidden_dim // 4, 4), max(hidden_dim // 2, 4), hidden_dim]
    layers: list[nn.Module] = []
    in_channels = channels
    for out_channels in widths:
        for _ in range(2):
            layers += [
                # No conv bias: the BatchNorm right after it has its own.
                nn.Conv2d(in_channels, out_channels, kernel_size=3, padding=1, bias=False),
                nn.BatchNorm2d(out_channels),
                nn.ReLU(inplace=True),
            ]
            in_channels = out_channels
        if min(height, width) >= 2:
            layers.append(nn.MaxPool2d(2))
            height, width = height // 2, width // 2
    layers += [
        nn.AdaptiveAvgPool2d(1),
        nn.Flatten(),
        nn.Linear(in_channels, num_classes),
    ]
    return nn.Sequential(*layers)


MODELS = {"mlp": mlp, "cnn": cnn}


class Standardize(nn.Module):
    """(x - mean) / std per channel, on raw pixel values. Part of the model, so a checkpoint or an
    exported file carries its own preprocessing and nobody re-types the constants."""

    def __init__(self, mean: Sequence[float], std: Sequence[float]) -> None:
        super().__init__()
        self.register_buffer("mean", torch.tensor(mean, dtype=torch.float32).view(1, -1, 1, 1))
        self.register_buffer("std", torch.tensor(std, dtype=torch.float32).view(1, -1, 1, 1))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return (x - self.mean) / self.std


def build_model(
    name: str,
    input_shape: Sequence[int],
    num_classes: int,
    hidden_dim: int,
    mean: Sequence[float],
    std: Sequence[float],
) -> nn.Module:
    """The backbone `name` behind the dataset's standardisation: raw pixels (N, C, H, W) in, logits out."""
    return nn.Sequential(
        Standardize(mean, std),
        MODELS[name](tuple(input_shape), num_classes, hidden_dim),
    )
