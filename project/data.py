"""The datasets, as Lightning DataModules: scikit-learn's digits (offline, the default), MNIST, Fashion-MNIST,
CIFAR-10 (torchvision's readers and downloads), and your own folders of images.

Every dataset yields raw pixels as uint8 (N, C, H, W) and int64 labels; the model standardises them with the
dataset's mean and std. How batches are made (on the device, or by a DataLoader; sharded for DDP; resumable
mid-epoch) is the base classes' business, in infra/batches.py.

To add a dataset that fits in memory: subclass InMemoryData, set its attributes and write `load()`; register it in
DATASETS and its name in run.py's DATASET_NAMES. The README shows an example.
"""

from __future__ import annotations

from typing import Any

import numpy as np
import torch

from project.infra import images
from project.infra.batches import ImageData, InMemoryData, LoaderBatches, Split
from project.infra.errors import UserError


def stratified_split(labels: np.ndarray, fraction: float, seed: int) -> tuple[np.ndarray, np.ndarray]:
    """Indices (keep, held_out) with `fraction` of each class held out, fixed by `seed`. Sets too small to stratify
    (a class with one sample, fewer held-out samples than classes) are split without stratification."""
    from sklearn.model_selection import train_test_split

    index = np.arange(len(labels))
    try:
        keep, held_out = train_test_split(index, test_size=fraction, stratify=labels, random_state=seed)
    except ValueError:
        keep, held_out = train_test_split(index, test_size=fraction, random_state=seed)
    return np.sort(keep), np.sort(held_out)


def as_split(images: Any, labels: Any, index: np.ndarray) -> Split:
    return torch.as_tensor(np.asarray(images)[index], dtype=torch.uint8), torch.as_tensor(np.asarray(labels)[index])


class Digits(InMemoryData):
    """scikit-learn's bundled 8x8 digits (1,797 images, pixel values 0-16): works offline."""

    input_shape = (1, 8, 8)
    class_names = [str(d) for d in range(10)]
    mean, std = (4.884,), (6.017,)
    pixel_max = 16

    def load(self) -> dict[str, Split]:
        from sklearn.datasets import load_digits

        digits = load_digits()
        images, labels = digits.images[:, None].astype(np.uint8), digits.target
        # 80/10/10, stratified: hold out 20%, then halve it into val and test.
        train, held_out = stratified_split(labels, 0.2, self.seed)
        val, test = stratified_split(labels[held_out], 0.5, self.seed)
        return {
            "train": as_split(images, labels, train),
            "val": as_split(images, labels, held_out[val]),
            "test": as_split(images, labels, held_out[test]),
        }


class TorchvisionData(InMemoryData):
    """A torchvision dataset with an official train/test split; val is a stratified share of train. `prepare_data`
    downloads what is missing; without a network the error names the files expected and where."""

    name: str  # as --dataset says it

    def reader(self, train: bool, download: bool = False) -> Any:
        raise NotImplementedError

    def prepare_data(self) -> None:
        try:
            self.readers = {"train": self.reader(train=True), "test": self.reader(train=False)}
            return  # both splits are there and intact
        except RuntimeError as missing:
            problem = missing
        try:
            self.readers = {"train": self.reader(train=True, download=True), "test": self.reader(train=False)}
        except Exception as error:  # any network or archive failure means the same here
            raise UserError(
                f"{self.name}: no usable files in {self.data_dir} ({str(problem).split('.')[0]}) and the download "
                f"failed ({type(error).__name__}); put the official files there, or run once with internet access"
            ) from error

    def load(self) -> dict[str, Split]:
        if not getattr(self, "readers", None):  # a process that did not prepare the data (torchrun's other ranks)
            self.prepare_data()
        train_images, train_labels = self.arrays(self.readers["train"])
        test_images, test_labels = self.arrays(self.readers["test"])
        self.readers = {}  # the arrays live on in the splits
        keep, val = stratified_split(train_labels, self.val_fraction, self.seed)
        return {
            "train": as_split(train_images, train_labels, keep),
            "val": as_split(train_images, train_labels, val),
            "test": as_split(test_images, test_labels, np.arange(len(test_labels))),
        }

    def arrays(self, dataset: Any) -> tuple[np.ndarray, np.ndarray]:
        return np.asarray(dataset.data)[:, None], np.asarray(dataset.targets)


class MNIST(TorchvisionData):
    """MNIST in its IDX files (torchvision's layout: <data-dir>/MNIST/raw/)."""

    name = "mnist"
    input_shape = (1, 28, 28)
    class_names = [str(d) for d in range(10)]
    mean, std = (33.32,), (78.57,)

    def reader(self, train: bool, download: bool = False) -> Any:
        import torchvision

        return torchvision.datasets.MNIST(str(self.data_dir), train=train, download=download)


class FashionMNIST(TorchvisionData):
    """Fashion-MNIST, the same IDX format (<data-dir>/FashionMNIST/raw/)."""

    name = "fashion-mnist"
    input_shape = (1, 28, 28)
    class_names = ["T-shirt/top", "Trouser", "Pullover", "Dress", "Coat", "Sandal", "Shirt", "Sneaker", "Bag",
                   "Ankle boot"]  # fmt: skip
    mean, std = (72.94,), (90.02,)

    def reader(self, train: bool, download: bool = False) -> Any:
        import torchvision

        return torchvision.datasets.FashionMNIST(str(self.data_dir), train=train, download=download)


class CIFAR10(TorchvisionData):
    """CIFAR-10's python batches (<data-dir>/cifar-10-batches-py/), read by torchvision with its checksums on: the
    batches are pickles, which can run code when read, so only the official files are ever unpickled."""

    name = "cifar10"
    input_shape = (3, 32, 32)
    class_names = ["airplane", "automobile", "bird", "cat", "deer", "dog", "frog", "horse", "ship", "truck"]
    mean, std = (125.31, 122.95, 113.87), (62.99, 62.09, 66.70)
    augment = True

    def prepare_data(self) -> None:
        if (self.data_dir / "cifar-10-batches-py").is_dir():
            images.verify_cifar10(self.data_dir)  # planted or damaged files: refused by name, before any is read
        super().prepare_data()

    def reader(self, train: bool, download: bool = False) -> Any:
        import torchvision

        return torchvision.datasets.CIFAR10(str(self.data_dir), train=train, download=download)

    def arrays(self, dataset: Any) -> tuple[np.ndarray, np.ndarray]:
        return dataset.data.transpose(0, 3, 1, 2), np.asarray(dataset.targets)  # stored N x H x W x C


class ImageFolderData(ImageData):
    """Your own images, one folder per class, read by DataLoader workers.

    Layouts: <data-dir>/<class>/<image> (split 80/10/10, stratified, fixed by --seed), or <data-dir>/train/<class>/...
    with optional val/ and test/ beside it (a missing one is split off train). Images are converted to RGB and resized
    to --image-size squared. Hidden entries are skipped, links to folders refused, and every image is decoded before
    training starts (infra/images.py).
    """

    augment = True
    mean, std = (123.68, 116.28, 103.53), (58.40, 57.12, 57.38)  # ImageNet's, in 0-255 units

    def __init__(self, image_size: int = 64, **kwargs: Any) -> None:
        super().__init__(**kwargs)
        self.input_shape = (3, image_size, image_size)
        listings = images.scan_image_folder(self.data_dir)
        base = "train" if "train" in listings else "all"
        self.class_names = list(listings[base].classes)
        # What setup() splits off the base folder, in order: test then val (80/10/10), or whichever is missing.
        given = [name for name in ("val", "test") if name in listings]
        self.held_out = [("test", 0.1), ("val", 1 / 9)] if base == "all" else [
            (name, self.val_fraction) for name in ("val", "test") if name not in given]  # fmt: skip
        # Every problem fails now, in one line, before the run starts: too few images, an unreadable one.
        images.require_splittable(listings[base], self.held_out)
        images.check_images([path for listing in listings.values() for path, _ in listing.samples], self.input_shape)
        self.folders = {name: images.ListedImageFolder(listing, self.input_shape) for name, listing in listings.items()}
        self.subsets: dict[str, Any] = {}

    @property
    def split_sizes(self) -> dict[str, int]:
        return {name: len(subset) for name, subset in self.subsets.items()}

    def setup(self, stage: str | None = None) -> None:
        from torch.utils.data import Subset

        if self.subsets:
            return
        base = self.folders["train" if "train" in self.folders else "all"]
        index, labels = np.arange(len(base)), np.asarray(base.targets)
        for name, fraction in self.held_out:
            keep, held = stratified_split(labels[index], fraction, self.seed)
            self.subsets[name], index = Subset(base, index[held]), index[keep]
        self.subsets.update({name: folder for name, folder in self.folders.items() if name in ("val", "test")})
        self.subsets["train"] = Subset(base, index)

    def batches(self, split: str, shuffle: bool) -> LoaderBatches:
        subset = self.subsets[split]
        pin = self.training_device().type == "cuda"
        return LoaderBatches(subset, self.plan(len(subset), shuffle), self.num_workers, pin_memory=pin)


DATASETS: dict[str, type[ImageData]] = {
    "digits": Digits,
    "mnist": MNIST,
    "fashion-mnist": FashionMNIST,
    "cifar10": CIFAR10,
    "image-folder": ImageFolderData,
}
