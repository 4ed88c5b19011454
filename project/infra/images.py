"""Reading image files safely: what trains is what a person sees in the folder, and no data file runs code.

Image folders: torchvision's ImageFolder, whose own walk lists hidden folders as classes and follows every link
(`cat/loop -> ..` reads every image again, as cat). Its documented `find_classes` and `make_dataset` are overridden
to skip names starting with '.' at any depth, refuse links to folders, and read a link to a file only inside
--data-dir and only if its file is not counted elsewhere, so no image is in two splits. Pillow may use only the
decoders in FORMATS, which run no interpreter (EPS would run Ghostscript). Before training, each file's header is read
(no pixel is decoded; a file whose size and modification time have not changed since is not read again); an image
that does not decode is named in one line when training first reads it.

CIFAR-10's files are Python pickles, which can run code: `verify_cifar10` checks their official MD5s first.
"""

from __future__ import annotations

import contextlib
import functools
import hashlib
import itertools
import json
import math
import os
from collections.abc import Sequence
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path
from typing import Any

import torch
import torchvision
from PIL import Image, ImageOps, UnidentifiedImageError  # torchvision imports Pillow already
from torchvision.datasets.folder import IMG_EXTENSIONS
from torchvision.datasets.utils import check_integrity

from project.infra.errors import UserError

FORMATS = ("BMP", "JPEG", "PNG", "PPM", "TIFF", "WEBP")  # the decoders Pillow may run: torchvision's IMG_EXTENSIONS
SPLITS = ("train", "val", "test")


def read_image(path: str | Path, input_shape: tuple[int, int, int]) -> torch.Tensor:
    """An image file as a model of `input_shape` (C, H, W) takes it: uint8 (C, H, W), converted to RGB
    (grayscale for one channel) and resized to H x W. Image-folder training and project.predict both
    read images here, so a prediction sees exactly the pixels training saw."""
    from torchvision.transforms.v2 import functional as TF

    channels, height, width = input_shape
    with Image.open(path, formats=FORMATS) as image:
        upright = ImageOps.exif_transpose(image)  # as a viewer shows a photo taken sideways
        if upright.mode.startswith("I;16") or upright.mode == "I" and image.format == "PPM":  # 16-bit pixels
            upright = upright.convert("I").point(lambda value: value / 256)  # convert() would clip them at 255
        elif upright.mode in ("I", "F"):  # convert() would clip them, most often to black
            raise ValueError("32-bit integer or floating-point pixels, whose range is not known; save it with 8 or 16 "
                             "bits a channel")  # fmt: skip
        converted = upright.convert("RGB" if channels == 3 else "L")
    return TF.pil_to_tensor(TF.resize(converted, [height, width]))


def unreadable(path: str, error: Exception) -> str:
    """One line naming `path` and why it cannot be read (UnidentifiedImageError's text only repeats the path)."""
    why = f"{type(error).__name__}: {' '.join(str(error).split())}"
    why = f"not a {', '.join(FORMATS)} image" if isinstance(error, UnidentifiedImageError) else why
    shown = path if str(path).isprintable() else ascii(str(path))  # a newline or a byte that is not UTF-8 in its name
    return f"cannot read image {shown} ({why}); remove or replace it"


def header_problem(path: str) -> str | None:
    try:
        Image.open(path, formats=FORMATS).close()  # reads the header; pixels are decoded only by load()
    except Exception as error:
        return f"image-folder: {unreadable(path, error)}"
    return None


def check_headers(paths: list[str], root: Path) -> list[str]:
    """Each problem with the files' headers. A file whose size and modification time are those it had when its header
    last read well is not read again: a folder already seen starts in the time it takes to list it."""
    cache = Path(os.environ.get("XDG_CACHE_HOME") or Path.home() / ".cache", "deep-learning-project-template")
    record = cache / "image-headers" / f"{hashlib.sha256(os.fsencode(root)).hexdigest()[:32]}.json"
    try:
        known = json.loads(record.read_text())
    except (OSError, ValueError, RecursionError):  # a cache only: one that cannot be read is read anew
        known = {}
    known = known if isinstance(known, dict) else {}
    seen = {path: [(stat := os.stat(path)).st_size, stat.st_mtime_ns] for path in paths}
    named = {path: path.removeprefix(f"{root}{os.sep}") for path in paths}  # no folder above root is named
    unchecked = [path for path in paths if known.get(named[path]) != seen[path]]
    with ThreadPoolExecutor() as pool:  # reading headers mostly waits for the disk
        problems = dict(zip(unchecked, pool.map(header_problem, unchecked), strict=True))
    temporary = record.with_name(f".{record.name}.{os.getpid()}")
    try:  # a cache only: where it cannot be written, every start checks every header
        if unchecked:
            record.parent.mkdir(parents=True, exist_ok=True)
            temporary.write_text(json.dumps({named[path]: seen[path] for path in paths if not problems.get(path)}))
            os.replace(temporary, record)  # whole or absent, whatever stops the process
    except OSError:
        with contextlib.suppress(OSError):
            temporary.unlink(missing_ok=True)
    return [*filter(None, problems.values())]


class UnreadableImage(UserError):
    """A DataLoader worker's exception reaches the training process as `type(error)(text)`, the text ending with the
    worker's traceback, whose last line holds the original message: one line is kept."""

    def __init__(self, message: str) -> None:
        super().__init__(message.strip().splitlines()[-1].split(f"{type(self).__name__}: ", 1)[-1])


def is_folder(path: Path) -> bool:
    """A visible folder; a link to a folder is an error."""
    if path.is_symlink() and path.is_dir():
        raise UserError(f"image-folder: {path} is a link to a folder; links to folders are not followed (they loop)")
    return path.is_dir() and not path.name.startswith(".")


class ImageFolder(torchvision.datasets.ImageFolder):
    """<root>/<split> (<root> itself for split ""); `linked`: the files read through links (symbolic: their
    targets; hard: their identities), shared by all splits, which are listed train, val, test: test never gets a
    training image."""

    def __init__(self, root: Path, split: str, input_shape: tuple[int, int, int], linked: set[Any]) -> None:
        self.data_root, self.presplit, self.linked = root, bool(split), linked
        super().__init__(str(root / split), loader=functools.partial(read_image, input_shape=input_shape))

    def __getitem__(self, index: int) -> tuple[Any, Any]:
        try:
            return super().__getitem__(index)
        except MemoryError:  # not the image's fault (run_command says what is)
            raise
        except Exception as error:
            raise UnreadableImage(f"image-folder: {unreadable(self.samples[index][0], error)}") from error

    def find_classes(self, directory: str | Path) -> tuple[list[str], dict[str, int]]:
        classes = sorted(name for name in os.listdir(directory) if is_folder(Path(directory, name)))
        if not all(name.isprintable() for name in classes):  # bytes that are not UTF-8 come as lone surrogates
            bad = ", ".join(ascii(name) for name in classes if not name.isprintable())
            raise UserError(f"image-folder: class folder {bad} in {directory} is not named in printable UTF-8 (a "
                            "byte that is not UTF-8, a newline or another control character); rename it")  # fmt: skip
        return classes, {name: index for index, name in enumerate(classes)}

    def make_dataset(self, directory: str | Path, class_to_idx: dict[str, int], *args: Any, **kwargs: Any) -> list:
        samples = []
        for name, index in class_to_idx.items():
            found = []
            for folder, folders, files in os.walk(Path(directory, name)):  # a link to a folder is listed, not entered
                folders[:] = sorted(child for child in folders if is_folder(Path(folder, child)))
                found += [path for file in sorted(files) if (path := self.image(Path(folder, file)))]
            if not found:
                raise UserError(
                    f"image-folder: class folder {Path(directory, name)} has no images: no file whose name ends in "
                    f"{', '.join(IMG_EXTENSIONS)} (names starting with '.' are skipped)"
                )
            # torchvision's order (folder, then file name), so a --seed splits a folder as torchvision's would
            samples += [(str(path), index) for path in sorted(found, key=lambda path: (str(path.parent), path.name))]
        return samples

    def image(self, path: Path) -> Path | None:
        """The file to read for `path`, if it is a visible image not counted elsewhere."""
        if path.name.startswith(".") or not path.name.lower().endswith(IMG_EXTENSIONS):
            return None
        target = Path(os.path.realpath(path)) if path.is_symlink() else path
        if not target.is_file():  # a pipe would block forever when opened; a broken link or a loop of links
            raise UserError(f"image-folder: {path} is not a regular file, nor a link to one; remove it")
        if not target.is_relative_to(self.data_root):
            raise UserError(f"image-folder: {path} links to {target}, outside --data-dir {self.data_root}; copy it in")
        if target == path:
            info = path.stat()  # a hard link: one image under two names counts once, where it is listed first
            if info.st_nlink > 1:
                if (info.st_dev, info.st_ino) in self.linked:
                    return None
                self.linked.add((info.st_dev, info.st_ino))
            return path
        # A link counts when its file is not listed in its own place (hidden, or outside the class folders) and no
        # earlier link counted it: splits are listed train, val, test, so test never gets a training image.
        parts = target.relative_to(self.data_root).parts
        listed = target.name.lower().endswith(IMG_EXTENSIONS) and not any(part.startswith(".") for part in parts)
        listed &= len(parts) >= 3 and parts[0] in SPLITS if self.presplit else len(parts) >= 2
        if listed or target in self.linked:
            return None
        self.linked.add(target)
        return target


def open_image_folder(data_dir: Path, input_shape: tuple[int, int, int]) -> dict[str, ImageFolder]:
    """{"all": ...} for <data_dir>/<class>/<image...>, or {"train": ..., "val": ..., "test": ...} (val and test when
    present) for <data_dir>/train/<class>/...; any problem, a file that is not an image included, is one line."""
    if not data_dir.is_dir():
        raise UserError(f"image-folder: {data_dir} is not a folder; pass --data-dir with one folder per class")
    root, linked = data_dir.resolve(), set()  # --data-dir itself may be a link: the user named it
    if not is_folder(root / "train") and any(is_folder(root / name) for name in SPLITS[1:]):
        raise UserError(f"image-folder: {root} has val/ or test/ but no train/: put the training images in "
                        f"{root / 'train'}, or the class folders straight in {root}")  # fmt: skip
    splits = [name for name in SPLITS if is_folder(root / name)] if is_folder(root / "train") else [""]
    folders = {split or "all": ImageFolder(root, split, input_shape, linked) for split in splits}
    base = folders.get("train") or folders["all"]
    if len(base.classes) < 2:
        raise UserError(f"image-folder: {base.root} holds {len(base.classes)} class folder(s); a classifier needs at "
                        "least 2 (one sub-folder of images per class)")  # fmt: skip
    for folder in folders.values():
        if folder.classes != base.classes:
            raise UserError(f"image-folder: {folder.root} has classes {folder.classes}, expected {base.classes}")
    problems = check_headers([path for folder in folders.values() for path, _ in folder.samples], root)
    if problems:
        raise UserError(problems[0] + (f" ({len(problems) - 1} more images cannot be read)" if problems[1:] else ""))
    return folders


def smallest_splittable(fractions: Sequence[float]) -> int:
    """The fewest samples that leave at least one in every split when each fraction in turn is held out of what
    remains, by scikit-learn's arithmetic: it holds out ceil(f * n), at least 1, and keeps floor((1 - f) * n)."""
    # kept(n): what is left of n samples once each fraction in turn is held out
    kept = functools.partial(functools.reduce, lambda count, fraction: math.floor((1 - fraction) * count), fractions)
    return next(count for count in itertools.count(1) if kept(count) >= 1)


def require_splittable(folder: ImageFolder, held_out: Sequence[tuple[str, float]]) -> None:
    """One line, instead of scikit-learn's error, when `folder` is too small for train and `held_out` (in order)."""
    needed, names = smallest_splittable([fraction for _, fraction in held_out]), ["train", *dict(held_out)]
    if len(folder) < needed:
        raise UserError(f"image-folder: {folder.root} holds {len(folder)} image(s), too few to split into "
                        f"{', '.join(names)}: that needs at least {needed}; add images, or split them yourself into "
                        "train/, val/ and test/ folders")  # fmt: skip


def verify_cifar10(data_dir: Path) -> None:
    """Raise UserError unless every CIFAR-10 file matches the MD5 torchvision's CIFAR10 lists (~0.3 s)."""
    cifar = torchvision.datasets.CIFAR10
    folder = data_dir / cifar.base_folder
    expected = [*cifar.train_list, *cifar.test_list, [cifar.meta["filename"], cifar.meta["md5"]]]
    try:
        wrong = [name for name, md5 in expected if not check_integrity(str(folder / name), md5)]
    except OSError as error:  # unreadable: permissions, a folder in a file's place, ...
        raise UserError(f"cifar10: cannot read {error.filename or folder} ({error.strerror or error})") from error
    if wrong:
        raise UserError(f"cifar10: the files in {folder} do not match the official CIFAR-10 checksums "
                        f"({', '.join(wrong)}), so they are not read (they are Python pickles, which can run code); "
                        "delete them and let the dataset download again, or put the official files there")  # fmt: skip
