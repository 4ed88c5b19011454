"""Reading image files safely: what trains is what a person sees in the folder, and no data file runs code.

Image folders are torchvision's ImageFolder with its two documented extension points overridden, since its own
walk lists hidden folders as classes and follows every link (`cat/loop -> ..` reads every image again, as cat):
`find_classes` and `make_dataset` skip names starting with '.' at any depth (`.ipynb_checkpoints/`, macOS's `._*`
files), refuse links to folders, and read a link to a file only when it stays inside --data-dir and names a file not
counted already (a file present directly keeps its own place), so no image is in two splits through a link.

Pillow may use only the decoders in FORMATS, none of which runs an interpreter (EPS would run Ghostscript). No pixel
is decoded before training: each file's header is read (`Image.open` decodes nothing), which names a file that is
not an image before the run starts; one that fails to decode later (a truncated JPEG) is named in one line when
training first reads it, and the run stops with exit 2, its last checkpoint intact.

CIFAR-10 (`verify_cifar10`): its files are Python pickles, and unpickling runs whatever code a file names; each
file's MD5 must match the official one (torchvision's CIFAR10 lists them) before anything unpickles it.
"""

from __future__ import annotations

import functools
import itertools
import math
import os
from collections.abc import Sequence
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path
from typing import Any

import torch
import torchvision
from torchvision.datasets.folder import IMG_EXTENSIONS
from torchvision.datasets.utils import check_integrity

from project.infra.errors import UserError

FORMATS = ("BMP", "GIF", "JPEG", "PNG", "PPM", "TIFF", "WEBP")  # Pillow's decoders that may run: no interpreter
SPLITS = ("train", "val", "test")


def read_image(path: str | Path, input_shape: tuple[int, int, int]) -> torch.Tensor:
    """An image file as a model of `input_shape` (C, H, W) takes it: uint8 (C, H, W), converted to RGB
    (grayscale for one channel) and resized to H x W. Image-folder training and project.predict both
    read images here, so a prediction sees exactly the pixels training saw."""
    from PIL import Image
    from torchvision.transforms.v2 import functional as TF

    channels, height, width = input_shape
    with Image.open(path, formats=FORMATS) as image:
        converted = image.convert("RGB" if channels == 3 else "L")
    return TF.pil_to_tensor(TF.resize(converted, [height, width]))


class UnreadableImage(UserError):
    """An image that does not decode. A DataLoader worker's exception reaches the training process rebuilt as
    `type(error)(text)`, the text ending with the worker's traceback: its last line keeps the original message."""

    def __init__(self, message: str) -> None:
        super().__init__(message.strip().splitlines()[-1].split(f"{type(self).__name__}: ", 1)[-1])


def problem(path: str, error: Exception) -> str:
    """`path` and why it cannot be read, in one line."""
    from PIL import UnidentifiedImageError

    if isinstance(error, UnidentifiedImageError):  # its message repeats the path
        why = f"not a {', '.join(FORMATS)} image"
    else:  # foreign bytes fail in many ways (OSError, SyntaxError, ValueError, ...)
        why = f"{type(error).__name__}: {' '.join(str(error).split())}"
    return f"image-folder: cannot read image {path} ({why}); remove or replace it"


def header_problem(path: str) -> str | None:
    from PIL import Image

    try:
        with Image.open(path, formats=FORMATS):  # reads the header, decodes no pixel
            return None
    except Exception as error:
        return problem(path, error)


def is_folder(path: Path) -> bool:
    """A visible folder; a link to a folder is an error."""
    if path.is_symlink() and path.is_dir():
        raise UserError(
            f"image-folder: {path} is a link to a folder, and links to folders are not followed (one can loop or "
            "bring in another class's images); put the folder itself there, or remove the link"
        )
    return path.is_dir() and not path.name.startswith(".")


class ImageFolder(torchvision.datasets.ImageFolder):
    """One split's folder (<root>/<split>, or <root>) as described above; samples are read by read_image.
    `linked`: the files already read through links, shared by the splits of one root."""

    def __init__(self, root: Path, split: str, input_shape: tuple[int, int, int], linked: set[Path]) -> None:
        self.data_root, self.presplit, self.linked = root, bool(split), linked
        super().__init__(str(root / split), loader=functools.partial(read_image, input_shape=input_shape))

    def __getitem__(self, index: int) -> tuple[Any, Any]:
        try:
            return super().__getitem__(index)
        except Exception as error:
            raise UnreadableImage(problem(self.samples[index][0], error)) from error

    def find_classes(self, directory: str | Path) -> tuple[list[str], dict[str, int]]:
        classes = sorted(name for name in os.listdir(directory) if is_folder(Path(directory, name)))
        for name in classes:
            try:
                name.encode("utf-8")
            except UnicodeEncodeError:  # os.listdir keeps bytes that are not UTF-8 as lone surrogates
                raise UserError(
                    f"image-folder: class folder {ascii(name)} in {directory} is not named in UTF-8; rename it"
                ) from None
        return classes, {name: index for index, name in enumerate(classes)}

    def make_dataset(  # type: ignore[override]  # torchvision's is a staticmethod; it is called on the instance
        self, directory: str | Path, class_to_idx: dict[str, int], *args: Any, **kwargs: Any
    ) -> list[tuple[str, int]]:
        samples = []
        for name, index in class_to_idx.items():
            found = []
            for folder, folders, files in os.walk(Path(directory, name)):  # a link to a folder is listed, not entered
                folders[:] = [child for child in folders if is_folder(Path(folder, child))]
                found += [path for file in files if (path := self.image(Path(folder, file)))]
            if not found:
                raise UserError(
                    f"image-folder: class folder {Path(directory, name)} has no images: no file whose name ends in "
                    f"{', '.join(IMG_EXTENSIONS)} (names starting with '.' are skipped)"
                )
            # In torchvision's order (folder, then file name), so a --seed splits a folder as torchvision's would.
            samples += [(str(path), index) for path in sorted(found, key=lambda path: (str(path.parent), path.name))]
        return samples

    def image(self, path: Path) -> Path | None:
        """The file to read for `path`, if it is a visible image not counted elsewhere."""
        if path.name.startswith(".") or not path.name.lower().endswith(IMG_EXTENSIONS):
            return None
        target = Path(os.path.realpath(path)) if path.is_symlink() else path
        if not target.exists():  # also a loop of links, which realpath leaves unresolved
            raise UserError(f"image-folder: {path} is a link to nothing ({target} does not exist); remove it")
        if not target.is_relative_to(self.data_root):
            raise UserError(
                f"image-folder: {path} links to {target}, outside {self.data_root}; links out of --data-dir are not "
                "followed: copy the file in, or pass a --data-dir that holds both"
            )
        if not target.is_file():  # a pipe named like an image would block forever when opened
            raise UserError(f"image-folder: {path} is not a regular file; remove it")
        if target == path:
            return path
        # A link adds its file only when that file is not listed in its own place (hidden, or outside every class
        # folder) and no earlier link added it: splits are built train, val, test, so test never gets a train image.
        parts = target.relative_to(self.data_root).parts
        listed = target.name.lower().endswith(IMG_EXTENSIONS) and not any(part.startswith(".") for part in parts)
        listed &= len(parts) >= 3 and parts[0] in SPLITS if self.presplit else len(parts) >= 2
        if listed or target in self.linked:
            return None
        self.linked.add(target)
        return target


def open_image_folder(data_dir: Path, input_shape: tuple[int, int, int]) -> dict[str, ImageFolder]:
    """{"all": ...} for <data_dir>/<class>/<image...>, or {"train": ..., "val": ..., "test": ...} (val and test when
    present) for <data_dir>/train/<class>/... Anything listed above, or a file whose header is not an image's, is
    a UserError in one line."""
    if not data_dir.is_dir():
        raise UserError(f"image-folder: {data_dir} is not a folder; pass --data-dir with one folder per class")
    root, linked = data_dir.resolve(), set()  # --data-dir itself may be a link: the user named it
    splits = [name for name in SPLITS if is_folder(root / name)] if is_folder(root / "train") else [""]
    folders = {split or "all": ImageFolder(root, split, input_shape, linked) for split in splits}
    base = folders.get("train") or folders["all"]
    if len(base.classes) < 2:
        raise UserError(
            f"image-folder: {base.root} holds {len(base.classes)} class folder(s); a classifier needs at least 2 "
            "(one sub-folder of images per class)"
        )
    for folder in folders.values():
        if folder.classes != base.classes:
            raise UserError(f"image-folder: {folder.root} has classes {folder.classes}, expected {base.classes}")
    paths = [path for folder in folders.values() for path, _ in folder.samples]
    with ThreadPoolExecutor() as pool:  # reading headers mostly waits for the disk
        problems = [problem for problem in pool.map(header_problem, paths) if problem]
    if len(problems) > 1:
        raise UserError(f"{problems[0]} ({len(problems) - 1} more images cannot be read)")
    if problems:
        raise UserError(problems[0])
    return folders


def smallest_splittable(fractions: Sequence[float]) -> int:
    """The fewest samples that leave at least one in every split when each fraction in turn is held out of what
    remains, by scikit-learn's arithmetic: it holds out ceil(f * n), at least 1, and keeps floor((1 - f) * n)."""

    def kept(count: int) -> int:
        return functools.reduce(lambda left, fraction: math.floor((1 - fraction) * left), fractions, count)

    return next(count for count in itertools.count(1) if kept(count) >= 1)


def require_splittable(folder: ImageFolder, held_out: Sequence[tuple[str, float]]) -> None:
    """One line, instead of scikit-learn's error, when `folder` has too few images for train and each of `held_out`
    (split off in order) to get at least one."""
    needed, count = smallest_splittable([fraction for _, fraction in held_out]), len(folder)
    if count < needed:
        raise UserError(
            f"image-folder: {folder.root} holds {count} image(s), too few to split into "
            f"{', '.join(['train', *(name for name, _ in held_out)])}: that needs at least {needed}; add images, or "
            "split them yourself into train/, val/ and test/ folders"
        )


def verify_cifar10(data_dir: Path) -> None:
    """Raise UserError unless every CIFAR-10 file in <data_dir>/cifar-10-batches-py/ matches the MD5 torchvision's
    CIFAR10 lists (its public train_list, test_list and meta); hashing ~170 MB takes ~0.3 s."""
    cifar = torchvision.datasets.CIFAR10
    folder = data_dir / cifar.base_folder
    expected = [*cifar.train_list, *cifar.test_list, [cifar.meta["filename"], cifar.meta["md5"]]]
    try:
        wrong = [name for name, md5 in expected if not check_integrity(str(folder / name), md5)]
    except OSError as error:  # unreadable: permissions, a folder in a file's place, ...
        raise UserError(f"cifar10: cannot read {error.filename or folder} ({error.strerror or error})") from error
    if wrong:
        raise UserError(
            f"cifar10: the files in {folder} do not match the official CIFAR-10 checksums ({', '.join(wrong)}), so "
            "they are not read (they are Python pickles, which can run code); delete them and let the dataset "
            "download again, or put the official files there"
        )
