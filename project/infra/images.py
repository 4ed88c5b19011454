"""Folders of images, read the way a person sees them, and checked before training starts."""

from __future__ import annotations

import functools
from pathlib import Path

import torch
import torchvision

from project.infra.errors import UserError


def read_image(path: str | Path, input_shape: tuple[int, int, int]) -> torch.Tensor:
    """An image file as a model of `input_shape` (C, H, W) takes it: uint8 (C, H, W), converted to RGB (grayscale for
    one channel) and resized to H x W. Image-folder training and project.predict both read images here, so a
    prediction sees exactly the pixels training saw."""
    from PIL import Image
    from torchvision.transforms.v2 import functional as TF

    channels, height, width = input_shape
    with Image.open(path) as image:
        converted = image.convert("RGB" if channels == 3 else "L")
    return TF.pil_to_tensor(TF.resize(converted, [height, width]))


class ImageFolder(torchvision.datasets.ImageFolder):
    """torchvision's ImageFolder, reading images with `read_image`."""

    @classmethod
    def layout(cls, root: Path, input_shape: tuple[int, int, int]) -> dict[str, ImageFolder]:
        """{"all": folder} for <root>/<class>/..., or {"train": ..., "val": ..., "test": ...} for <root>/train/<class>
        with optional val/ and test/ beside it."""
        if not root.is_dir():
            raise UserError(f"image-folder: {root} is not a folder; pass --data-dir with one folder per class")
        names = ("train", "val", "test") if (root / "train").is_dir() else ("all",)
        folders = {name: cls.read(root if name == "all" else root / name, input_shape) for name in names
                   if name == "all" or (root / name).is_dir()}  # fmt: skip
        classes = next(iter(folders.values())).classes
        for name, folder in folders.items():
            if folder.classes != classes:
                raise UserError(f"image-folder: {root / name} has classes {folder.classes}, expected {classes}")
        return folders

    @classmethod
    def read(cls, path: Path, input_shape: tuple[int, int, int]) -> ImageFolder:
        classes = sorted(p.name for p in path.iterdir() if p.is_dir() and not p.name.startswith("."))
        if len(classes) < 2:
            raise UserError(
                f"image-folder: {path} holds {len(classes)} class folder(s); a classifier needs at least 2 "
                "(one sub-folder of images per class)"
            )
        try:
            folder = cls(str(path), loader=functools.partial(read_image, input_shape=input_shape), allow_empty=False)
        except (FileNotFoundError, RuntimeError) as error:
            raise UserError(f"image-folder: {path}: {error}") from error
        for sample, _ in folder.samples:
            check_image(sample)
        return folder


def check_image(path: str) -> None:
    """Fail before training, naming the file, rather than deep inside a worker process mid-epoch."""
    from PIL import Image

    try:
        with Image.open(path) as image:
            image.verify()
    except Exception as error:
        raise UserError(
            f"image-folder: cannot read image {path} ({type(error).__name__}); remove or replace it"
        ) from error
