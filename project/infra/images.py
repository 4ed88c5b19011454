"""Reading image files safely: what trains is what a person sees in the folder, and no data file runs code.

Image folders (`scan_image_folder`, `check_images`, `ListedImageFolder`). torchvision's ImageFolder lists
hidden folders as classes and follows every link, so a `.ipynb_checkpoints/` becomes a class and a link
`cat/loop -> ..` reads every image again, labelled cat. Here:

- entries whose name starts with '.' are skipped, at any depth (`.ipynb_checkpoints/`, the AppleDouble
  files macOS leaves beside each image);
- a link to a folder is refused, naming it: it can loop or pull in another class's images;
- a link to a file is read only when it resolves inside --data-dir, and a file is counted once however
  many names it has (a file present directly keeps its own place; then the first link in path order),
  so no image is in two splits through a link; a link out of --data-dir is refused, naming it;
- every image is decoded in full, as training will read it, before training starts: a truncated JPEG
  (which PIL's `verify()` passes) is named in one line instead of failing in a worker mid-epoch;
- an empty class folder, one with only hidden files, and a folder too small to split each get one line.

CIFAR-10 (`verify_cifar10`): its files are Python pickles, and unpickling runs whatever
code a file names. torchvision's stock reader checks each file's MD5 against the official one before it
unpickles it; we keep those checks on and turn a mismatch into one line.
"""

from __future__ import annotations

import functools
import math
import os
from collections.abc import Sequence
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch
import torchvision
from torchvision.datasets.folder import IMG_EXTENSIONS
from torchvision.datasets.utils import check_integrity

from project.infra.errors import UserError

SPLITS = ("train", "val", "test")


def read_image(path: str | Path, input_shape: tuple[int, int, int]) -> torch.Tensor:
    """An image file as a model of `input_shape` (C, H, W) takes it: uint8 (C, H, W), converted to RGB
    (grayscale for one channel) and resized to H x W. Image-folder training and project.predict both
    read images here, so a prediction sees exactly the pixels training saw."""
    from PIL import Image
    from torchvision.transforms.v2 import functional as TF

    channels, height, width = input_shape
    with Image.open(path) as image:
        converted = image.convert("RGB" if channels == 3 else "L")
    return TF.pil_to_tensor(TF.resize(converted, [height, width]))


@dataclass(frozen=True)
class FolderListing:
    """One folder of class sub-folders as it will be read: class names, and (image path, class index)."""

    root: Path
    classes: tuple[str, ...]
    samples: tuple[tuple[str, int], ...]


@dataclass
class _ClassFiles:
    """What one class folder holds, before links are resolved."""

    folder: Path
    direct: list[Path] = field(default_factory=list)  # regular files with an image suffix
    links: list[Path] = field(default_factory=list)  # links to files, with an image suffix
    hidden: int = 0
    other: int = 0  # files without an image suffix


def scan_image_folder(data_dir: Path) -> dict[str, FolderListing]:
    """The images under `data_dir`, by split: {"all": ...} for <data_dir>/<class>/<image...>, or
    {"train": ..., "val": ..., "test": ...} (val and test when present) for <data_dir>/train/<class>/...
    Sub-folders of a class folder belong to that class. Raises UserError, in one line, for anything the
    module docstring lists."""
    if not data_dir.is_dir():
        raise UserError(f"image-folder: {data_dir} is not a folder; pass --data-dir with one folder per class")
    root = data_dir.resolve()  # --data-dir itself may be a link: the user named it
    presplit = _is_real_folder(root / "train")
    split_roots = {name: root / name for name in SPLITS if _is_real_folder(root / name)} if presplit else {"all": root}

    found: dict[str, dict[str, _ClassFiles]] = {}
    for split, split_root in split_roots.items():
        classes = sorted(_folders(split_root))
        if split in ("all", "train") and len(classes) < 2:
            raise UserError(
                f"image-folder: {split_root} holds {len(classes)} class folder(s); "
                "a classifier needs at least 2 (one sub-folder of images per class)"
            )
        expected = sorted(found["train"]) if found else classes
        if classes != expected:
            raise UserError(f"image-folder: {split_root} has classes {classes}, expected {expected} (as in train/)")
        found[split] = {name: _walk(split_root / name) for name in classes}

    # A file counts once, however many names it has. Files present directly come first; links to them
    # add nothing. Splits are visited train, val, test, so a link never puts a training image in test.
    counted = {path for classes in found.values() for files in classes.values() for path in files.direct}
    listings = {}
    for split, classes in found.items():
        samples = []
        for index, files in enumerate(classes.values()):
            linked = []
            for link in sorted(files.links, key=str):
                target = _link_target(link, root)
                if target not in counted:
                    counted.add(target)
                    linked.append(target)
            # In torchvision's order (folder, then file name), so a --seed splits a folder as it used to.
            paths = sorted([*files.direct, *linked], key=lambda path: (str(path.parent), path.name))
            if not paths:
                raise UserError(
                    f"image-folder: class folder {files.folder} has no images: {_why_empty(files)}; "
                    "add images or remove the folder"
                )
            samples += [(str(path), index) for path in paths]
        listings[split] = FolderListing(split_roots[split], tuple(classes), tuple(samples))
    return listings


def _is_real_folder(path: Path) -> bool:
    if path.is_symlink() and path.is_dir():
        raise _folder_link(path)
    return path.is_dir()


def _folders(path: Path) -> list[str]:
    """The visible, real sub-folders of `path`; a link to a folder is an error."""
    names = []
    with os.scandir(path) as entries:
        for entry in entries:
            if entry.name.startswith("."):
                continue
            if entry.is_symlink() and entry.is_dir():
                raise _folder_link(Path(entry.path))
            if entry.is_dir(follow_symlinks=False):
                names.append(entry.name)
    return names


def _walk(folder: Path) -> _ClassFiles:
    """Every file under a class folder, without following links or entering hidden folders."""
    files = _ClassFiles(folder)
    pending = [folder]
    while pending:
        with os.scandir(pending.pop()) as entries:
            for entry in entries:
                path = Path(entry.path)
                image_suffix = path.suffix.lower() in IMG_EXTENSIONS
                if entry.name.startswith("."):
                    files.hidden += 1
                elif entry.is_symlink():
                    if entry.is_dir():
                        raise _folder_link(path)
                    if image_suffix:
                        files.links.append(path)
                    else:
                        files.other += 1
                elif entry.is_dir(follow_symlinks=False):
                    pending.append(path)
                elif not image_suffix:
                    files.other += 1
                elif entry.is_file(follow_symlinks=False):
                    files.direct.append(path)
                else:  # a pipe or device named like an image would block or stream forever when opened
                    raise UserError(f"image-folder: {path} is not a regular file; remove it")
    return files


def _folder_link(path: Path) -> UserError:
    return UserError(
        f"image-folder: {path} is a link to a folder, and links to folders are not followed (one can loop or "
        "bring in another class's images); put the folder itself there, or remove the link"
    )


def _link_target(link: Path, root: Path) -> Path:
    """The real file a link names, if it is a regular file inside `root`."""
    target = Path(os.path.realpath(link))
    if not target.exists():  # also a loop of links, which realpath leaves unresolved
        raise UserError(f"image-folder: {link} is a link to nothing ({target} does not exist); remove it")
    if not target.is_relative_to(root):
        raise UserError(
            f"image-folder: {link} links to {target}, outside {root}; links out of --data-dir are not followed: "
            "copy the file in, or pass a --data-dir that holds both"
        )
    if not target.is_file():
        raise UserError(f"image-folder: {link} links to {target}, which is not a regular file; remove it")
    return target


def _why_empty(files: _ClassFiles) -> str:
    if files.links:
        return "it holds only links to images already counted elsewhere"
    if files.other:
        return f"none of its {files.other} file(s) ends in {', '.join(IMG_EXTENSIONS)}"
    if files.hidden:
        return "it holds only hidden files, whose names start with '.' and are skipped"
    return "it is empty"


def _splits(count: int, fractions: Sequence[float]) -> bool:
    for fraction in fractions:
        # scikit-learn's train_test_split holds out ceil(f * n), at least 1, and keeps floor((1 - f) * n).
        count = math.floor((1 - fraction) * count)
        if count < 1:
            return False
    return True


def smallest_splittable(fractions: Sequence[float]) -> int:
    """The fewest samples that leave at least one in every split when each fraction in turn is held out
    of what remains, by scikit-learn's arithmetic. What is kept only grows with the count, so the answer
    is found by doubling, then bisecting."""
    high = 1
    while not _splits(high, fractions):  # ends: every fraction is below 1
        high *= 2
    low = high // 2  # 0, or a count that does not split
    while high - low > 1:
        middle = (low + high) // 2
        if _splits(middle, fractions):
            high = middle
        else:
            low = middle
    return high


def require_splittable(listing: FolderListing, held_out: Sequence[tuple[str, float]]) -> None:
    """One line, instead of scikit-learn's error, when `listing` has too few images for every split
    (train and each of `held_out`, split off in order) to get at least one."""
    needed = smallest_splittable([fraction for _, fraction in held_out])
    count = len(listing.samples)
    if count < needed:
        names = ", ".join(["train", *(name for name, _ in held_out)])
        raise UserError(
            f"image-folder: {listing.root} holds {count} image(s), too few to split into {names}: "
            f"that needs at least {needed}; add images, or split them yourself into train/, val/ and test/ folders"
        )


def check_images(paths: Sequence[str], input_shape: tuple[int, int, int], workers: int | None = None) -> None:
    """Read every image exactly as training will (`read_image`: a full decode, then convert and resize),
    so that an unreadable one stops the run before it starts, named in one line. Threads run in parallel
    here: PIL releases the GIL while it decodes and resizes. `workers`: threads (None: Python's default)."""
    read = functools.partial(_problem, input_shape=input_shape)
    with ThreadPoolExecutor(max_workers=workers) as pool:
        problems = [(path, problem) for path, problem in zip(paths, pool.map(read, paths), strict=True) if problem]
    if len(problems) == 1:
        path, problem = problems[0]
        raise UserError(f"image-folder: cannot read image {path} ({problem}); remove or replace it")
    if problems:
        path, problem = problems[0]
        raise UserError(
            f"image-folder: cannot read {len(problems)} images, the first {path} ({problem}); remove or replace them"
        )


def _problem(path: str, input_shape: tuple[int, int, int]) -> str | None:
    """Why `path` cannot be read as training reads it, in a few words; None when it can."""
    from PIL import UnidentifiedImageError

    try:
        read_image(path, input_shape)
    except UnidentifiedImageError:  # its message repeats the path
        return "not an image PIL can identify"
    except Exception as error:  # PIL fails on foreign bytes in many ways (OSError, SyntaxError, ValueError, ...)
        return f"{type(error).__name__}: {' '.join(str(error).split())}"
    return None


class ListedImageFolder(torchvision.datasets.ImageFolder):
    """torchvision's ImageFolder over a FolderListing: `find_classes` and `make_dataset`, the methods
    torchvision documents for overriding, return the listing instead of listing the folder again their way
    (which would show hidden folders and follow links). Samples are read with `read_image`."""

    def __init__(self, listing: FolderListing, input_shape: tuple[int, int, int]) -> None:
        self.listing = listing
        super().__init__(str(listing.root), loader=functools.partial(read_image, input_shape=input_shape))

    def find_classes(self, directory: str | Path) -> tuple[list[str], dict[str, int]]:
        return list(self.listing.classes), {name: index for index, name in enumerate(self.listing.classes)}

    def make_dataset(  # type: ignore[override]  # torchvision's is a staticmethod; it is called on the instance
        self, directory: str | Path, class_to_idx: dict[str, int], *args: Any, **kwargs: Any
    ) -> list[tuple[str, int]]:
        return list(self.listing.samples)


def cifar10_mismatches(data_dir: Path) -> list[str]:
    """The CIFAR-10 files in <data_dir>/cifar-10-batches-py/ whose MD5 differs from the one torchvision's
    CIFAR10 class lists (its public `train_list`, `test_list` and `meta`), missing files included."""
    cifar = torchvision.datasets.CIFAR10
    folder = data_dir / cifar.base_folder
    expected = [*cifar.train_list, *cifar.test_list, [cifar.meta["filename"], cifar.meta["md5"]]]
    mismatches = []
    for name, md5 in expected:
        try:
            matches = check_integrity(str(folder / name), md5)
        except OSError as error:  # unreadable: permissions, a folder in the file's place, ...
            raise UserError(f"cifar10: cannot read {folder / name} ({error.strerror or error})") from error
        if not matches:
            mismatches.append(name)
    return mismatches


def _mismatch_error(data_dir: Path, names: list[str]) -> UserError:
    folder = data_dir / torchvision.datasets.CIFAR10.base_folder
    which = ", ".join(names) or "a file changed while being read"
    return UserError(
        f"cifar10: the files in {folder} do not match the official CIFAR-10 checksums ({which}), so they are not "
        "read (they are Python pickles, which can run code); delete them and let the dataset download again, "
        "or put the official files there"
    )


def verify_cifar10(data_dir: Path) -> None:
    """Raise UserError unless every CIFAR-10 file matches its official checksum (hashing ~170 MB: ~0.3 s)."""
    names = cifar10_mismatches(data_dir)
    if names:
        raise _mismatch_error(data_dir, names)
