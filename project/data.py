"""The datasets, as Lightning DataModules: scikit-learn's digits (offline, the default), MNIST, Fashion-MNIST,
CIFAR-10 (torchvision's readers and downloads), your own folders of images (classification), and scikit-learn's
diabetes data (regression, offline).

Every dataset names its task (project/tasks/) and yields raw inputs (uint8 pixels (N, C, H, W), or float feature
vectors (N, F)) with targets (class indices, or values); the model standardises the inputs with the dataset's mean
and std. How batches are made (on the device, or by a DataLoader; sharded for DDP; resumable
mid-epoch) is the base classes' business, in infra/batches.py.

To add a dataset that fits in memory: subclass InMemoryData, set its attributes and write `load()`; register it in
DATASETS and its name in run.py's DATASET_NAMES. The README shows an example.
"""

from __future__ import annotations

import hashlib
from collections.abc import Iterator
from fractions import Fraction
from pathlib import Path
from typing import Any

import numpy as np
import torch

from project.infra import images
from project.infra.batches import Batches, DataModule, EpochBatches, InMemoryData, Split
from project.infra.errors import UserError

TEST_FRACTION = Fraction(1, 10)  # of data that has no test split of its own


def stratified_split(targets: np.ndarray, fraction: float, seed: int) -> tuple[np.ndarray, np.ndarray]:
    """Indices (keep, held_out) with `fraction` held out, fixed by `seed`: `fraction` of each class for class labels.
    Real-valued targets, and sets too small to stratify (a class with one sample, fewer held-out samples than
    classes), are split without stratification."""
    from sklearn.model_selection import train_test_split

    index = np.arange(len(targets))
    stratify = None if np.asarray(targets).dtype.kind == "f" else targets
    try:
        keep, held_out = train_test_split(index, test_size=fraction, stratify=stratify, random_state=seed)
    except ValueError:
        keep, held_out = train_test_split(index, test_size=fraction, random_state=seed)
    return np.sort(keep), np.sort(held_out)


def split_all(targets: np.ndarray, val_fraction: float, seed: int) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """Indices (train, val, test) of data with no test split of its own: a tenth of it for the test and
    `val_fraction` of it for validation (the default 0.1: 80/10/10), stratified, by `seed`."""
    val, test = held_out_fractions(val_fraction)
    try:
        train, held_out = stratified_split(targets, float(val + test), seed)
        val_index, test_index = stratified_split(targets[held_out], float(test / (val + test)), seed)
    except ValueError:  # scikit-learn's: a split would be empty
        raise UserError(f"--val-fraction {val_fraction}: leaves no sample for training or for validation in "
                        f"{len(targets)}") from None  # fmt: skip
    return train, held_out[val_index], held_out[test_index]


def held_out_fractions(val_fraction: float) -> tuple[Fraction, Fraction]:
    """(val, test) as shares of all the data. Exact fractions: 0.1 + 0.1 is 1/5, and 0.1 of all is 1/9 of the rest,
    so the default split is the same on every machine and in every release."""
    val = Fraction(val_fraction).limit_denominator(10**6)
    if val == 0:
        raise UserError(f"--val-fraction {val_fraction}: too small to hold out anything")
    if val + TEST_FRACTION >= 1:
        raise UserError(f"--val-fraction {val_fraction}: a tenth of the data is the test split; below 0.9 is left to "
                        "train on")  # fmt: skip
    return val, TEST_FRACTION


def as_split(inputs: Any, targets: Any, index: np.ndarray) -> Split:
    """Rows `index` as tensors: 8-bit pixels stay uint8, other inputs and real-valued targets become float32, class
    labels int64."""
    inputs, targets = np.asarray(inputs)[index], np.asarray(targets)[index]
    return (
        torch.as_tensor(inputs, dtype=torch.uint8 if inputs.dtype == np.uint8 else torch.float32),
        torch.as_tensor(targets, dtype=torch.float32 if targets.dtype.kind == "f" else torch.int64),
    )


class Digits(InMemoryData):
    """scikit-learn's bundled 8x8 digits (1,797 images, pixel values 0-16): works offline."""

    input_shape = (1, 8, 8)
    output_names = [str(d) for d in range(10)]
    mean, std = (4.884,), (6.017,)
    pixel_max = 16

    def load(self) -> dict[str, Split]:
        from sklearn.datasets import load_digits

        digits = load_digits()
        images, labels = digits.images[:, None].astype(np.uint8), digits.target  # pixels are whole numbers 0-16
        train, val, test = split_all(labels, self.val_fraction, self.seed)
        return {
            "train": as_split(images, labels, train),
            "val": as_split(images, labels, val),
            "test": as_split(images, labels, test),
        }


class Diabetes(InMemoryData):
    """scikit-learn's bundled diabetes data (works offline): 442 patients, 10 features (age, sex, BMI, blood pressure,
    six blood serum measurements), and the disease's progression one year later, a value from 25 to 346.

    Split 80/10/10 by --seed (--val-fraction: val's share). The features are standardised with the training split's
    statistics; the model predicts the progression in its own units (the task's output layer rescales with the
    training targets' mean and std).
    """

    task = "regression"
    default_model = "mlp"
    output_names = ["progression"]
    pixel_max = None

    def load(self) -> dict[str, Split]:
        from sklearn.datasets import load_diabetes

        features, target = load_diabetes(return_X_y=True)
        features, target = features.astype(np.float32), target.astype(np.float32)
        train, val, test = split_all(target, self.val_fraction, self.seed)
        self.input_shape = (features.shape[1],)
        self.mean, self.std = tuple(features[train].mean(0).tolist()), tuple(features[train].std(0).tolist())
        self.target_mean, self.target_std = [float(target[train].mean())], [float(target[train].std())]
        return {
            "train": as_split(features, target, train),
            "val": as_split(features, target, val),
            "test": as_split(features, target, test),
        }


class TorchvisionData(InMemoryData):
    """A torchvision dataset with an official train/test split; val is a stratified share of train. `prepare_data`
    downloads what is missing; without a network the error names the files expected and where."""

    name: str  # as --dataset says it
    source: str  # its class in torchvision.datasets

    def reader(self, train: bool, download: bool = False) -> Any:
        import torchvision

        return getattr(torchvision.datasets, self.source)(str(self.data_dir), train=train, download=download)

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

    name, source = "mnist", "MNIST"
    input_shape = (1, 28, 28)
    output_names = [str(d) for d in range(10)]
    mean, std = (33.32,), (78.57,)


class FashionMNIST(TorchvisionData):
    """Fashion-MNIST, the same IDX format (<data-dir>/FashionMNIST/raw/)."""

    name, source = "fashion-mnist", "FashionMNIST"
    input_shape = (1, 28, 28)
    output_names = ["T-shirt/top", "Trouser", "Pullover", "Dress", "Coat", "Sandal", "Shirt", "Sneaker", "Bag",
                   "Ankle boot"]  # fmt: skip
    mean, std = (72.94,), (90.02,)


class CIFAR10(TorchvisionData):
    """CIFAR-10's python batches (<data-dir>/cifar-10-batches-py/), read by torchvision with its checksums on: the
    batches are pickles, which can run code when read, so only the official files are ever unpickled."""

    name, source = "cifar10", "CIFAR10"
    input_shape = (3, 32, 32)
    output_names = ["airplane", "automobile", "bird", "cat", "deer", "dog", "frog", "horse", "ship", "truck"]
    mean, std = (125.31, 122.95, 113.87), (62.99, 62.09, 66.70)
    augment = True

    def prepare_data(self) -> None:
        if (self.data_dir / "cifar-10-batches-py").is_dir():
            images.verify_cifar10(self.data_dir)  # planted or damaged files: refused by name, before any is read
        super().prepare_data()

    def arrays(self, dataset: Any) -> tuple[np.ndarray, np.ndarray]:
        return dataset.data.transpose(0, 3, 1, 2), np.asarray(dataset.targets)  # stored N x H x W x C


class KeptImages(Batches):
    """An image folder split's batches, each image kept as decoded once read: an epoch whose samples (on this rank) were
    all read before gathers them by index from memory, as in-memory data are, in the same batches; any other epoch is
    read by the DataLoader's workers, and what they decode is kept. `kept` (images, labels, read) is the split's, shared
    by its loaders (precise BatchNorm's too)."""

    def __init__(self, plan: EpochBatches, source: Any, num_workers: int, pin_memory: bool, kept: tuple) -> None:
        super().__init__(plan, source, num_workers, pin_memory)
        self.kept = kept

    def iterate(self, epoch: int, skip: int = 0) -> Iterator[Any]:
        images, labels, read = self.kept
        if read[self.plan.shard(epoch)].all():
            return self.gather(images, labels, epoch, skip)
        return self.keep(super().iterate(epoch, skip), list(self.index_lists))

    def keep(self, batches: Iterator[Any], index_lists: list[list[int]]) -> Iterator[Any]:
        images, labels, read = self.kept
        for index, (inputs, targets) in zip(map(torch.tensor, index_lists), batches, strict=False):
            images[index], labels[index], read[index] = inputs, targets, True
            yield inputs, targets


class ImageFolderData(DataModule):
    """Your own images, one folder per class, read by DataLoader workers.

    Layouts: <data-dir>/<class>/<image> (split 80/10/10, stratified, fixed by --seed; --val-fraction: val's share),
    or <data-dir>/train/<class>/... with optional val/ and test/ beside it (a missing one is split off train). Images
    are converted to RGB and resized to --image-size squared. Hidden entries are skipped, links to folders refused,
    every file's header is checked before training starts and its pixels when training first reads it
    (infra/images.py). When all of them, resized, fit in --image-memory GiB, each is decoded once: later epochs read
    it from memory (KeptImages).
    """

    augment = True
    mean, std = (123.68, 116.28, 103.53), (58.40, 57.12, 57.38)  # ImageNet's, in 0-255 units

    def __init__(self, image_size: int = 64, image_memory: float = 4.0, **kwargs: Any) -> None:
        super().__init__(**kwargs)
        self.input_shape, self.image_memory = (3, image_size, image_size), image_memory
        self.folders = images.open_image_folder(self.data_dir, self.input_shape)
        base = "train" if "train" in self.folders else "all"
        self.output_names = list(self.folders[base].classes)
        # What setup() splits off the base folder, in order: the test's tenth, then val's share of all (of the rest),
        # or of train/ whichever has no folder of its own.
        val, test = held_out_fractions(self.val_fraction)
        self.held_out = [("test", float(test)), ("val", float(val / (1 - test)))] if base == "all" else [
            (name, self.val_fraction) for name in ("val", "test") if name not in self.folders]  # fmt: skip
        images.require_splittable(self.folders[base], self.held_out)
        self.subsets: dict[str, Any] = {}
        self.kept: dict[str, tuple] = {}
        # What decides the splits: the files listed (relative to --data-dir) and their classes, in order.
        listed = hashlib.sha256()
        for name, folder in self.folders.items():
            for path, label in folder.samples:
                # a name that is not UTF-8 as its bytes (two such names would be one with errors="replace")
                listed.update(
                    f"{name}/{Path(path).relative_to(folder.data_root)}/{label}\n".encode(errors="surrogateescape")
                )
        self.listed = {"images": sum(map(len, self.folders.values())), "sha256": listed.hexdigest()}

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
        # --image-memory is the machine's: each of its processes (one per device) keeps a copy of its own
        copies = getattr(self.trainer, "num_devices", 1) if self.trainer is not None else 1
        if self.listed["images"] * np.prod(self.input_shape) * copies <= self.image_memory * 2**30:
            self.kept = {name: (torch.empty(len(subset), *self.input_shape, dtype=torch.uint8),
                                torch.empty(len(subset), dtype=torch.int64), torch.zeros(len(subset), dtype=torch.bool))
                         for name, subset in self.subsets.items()}  # fmt: skip

    def batches(self, split: str, shuffle: bool) -> Batches:
        if split not in self.kept:
            return self.loader(self.subsets[split], shuffle)
        rank, world_size = (self.trainer.global_rank, self.trainer.world_size) if self.trainer else (0, 1)
        plan = EpochBatches(len(self.subsets[split]), self.batch_size, shuffle, self.seed, rank, world_size)
        pin_memory = self.training_device().type == "cuda"
        return KeptImages(plan, self.subsets[split], self.num_workers, pin_memory, self.kept[split])

    def state_dict(self) -> dict[str, Any]:
        # in every checkpoint: a resumed or tested run checks its folder against it
        return {**super().state_dict(), "listed": self.listed}

    def load_state_dict(self, state: dict[str, Any]) -> None:
        super().load_state_dict(state)
        then = state.get("listed", self.listed)
        if then != self.listed:
            raise UserError(
                f"image-folder: {self.data_dir} has changed since this run started ({then['images']} images then, "
                f"{self.listed['images']} now): its splits would change, and its test scores with them; put the "
                "folder back as it was, or start a new run"
            )


DATASETS: dict[str, type[DataModule]] = {
    "digits": Digits,
    "mnist": MNIST,
    "fashion-mnist": FashionMNIST,
    "cifar10": CIFAR10,
    "image-folder": ImageFolderData,
    "diabetes": Diabetes,
}
