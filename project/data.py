"""Datasets as Lightning DataModules, and the batch loaders behind them.

Every dataset yields raw pixels as uint8 (N, C, H, W) with int64 labels; the model standardises them
(model.Standardize) and training augmentation runs on whole batches on the device
(`on_after_batch_transfer`), so the two data paths below give the same batches for the same seed:

- in-memory datasets (digits, MNIST, Fashion-MNIST, CIFAR-10) are held as tensors, on the GPU when they
  fit, and batched by indexing: no per-sample Python, no collation, no worker processes;
- image folders (and `--data-on-device no`) go through a standard DataLoader with workers and pinned
  memory, driven by the same batch sampler.

To add a dataset: subclass InMemoryData and write `load()` (or write any LightningDataModule with the
attributes listed on InMemoryData), register it in DATASETS and its name in run.py's DATASET_NAMES.
"""

from __future__ import annotations

import functools
import math
import pickle
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import lightning.pytorch as pl
import numpy as np
import torch
import torch.nn.functional as F
from torch.utils.data import DataLoader, Dataset

from project.errors import UserError

Split = tuple[torch.Tensor, torch.Tensor]  # (uint8 images N x C x H x W, int64 labels N)

# Share of free GPU memory the in-memory data may take before `--data-on-device auto` keeps it on the
# host: the rest is for the model, activations and the allocator's slack.
DEVICE_MEMORY_FRACTION = 0.25


class EpochBatches:
    """This rank's batches of sample indices for one epoch, like DistributedSampler + BatchSampler.

    The order is a permutation seeded by `seed + epoch` (the DistributedSampler recipe). Training
    shards are padded to equal length so every rank steps the same number of times (DDP needs it);
    evaluation shards are not, so each sample is counted exactly once across processes.
    """

    def __init__(
        self,
        num_samples: int,
        batch_size: int,
        shuffle: bool,
        seed: int,
        rank: int,
        world_size: int,
    ) -> None:
        self.num_samples = num_samples
        self.batch_size = batch_size
        self.shuffle = shuffle
        self.seed = seed
        self.rank = rank
        self.world_size = world_size

    def shard(self, epoch: int) -> torch.Tensor:
        if self.shuffle:
            generator = torch.Generator().manual_seed(self.seed + epoch)
            order = torch.randperm(self.num_samples, generator=generator)
            total = math.ceil(self.num_samples / self.world_size) * self.world_size
            if total > self.num_samples:  # repeat from the start, as DistributedSampler pads
                order = order.repeat(math.ceil(total / self.num_samples))[:total]
        else:
            order = torch.arange(self.num_samples)
        return order[self.rank :: self.world_size]

    def batches(self, epoch: int, skip: int = 0, device: torch.device | None = None) -> Iterator[torch.Tensor]:
        # One copy of the whole shard to `device` per epoch; each batch is then a view of it.
        shard = self.shard(epoch).to(device or "cpu", non_blocking=True)
        for start in range(skip * self.batch_size, len(shard), self.batch_size):
            yield shard[start : start + self.batch_size]

    def __len__(self) -> int:
        per_rank = (
            math.ceil(self.num_samples / self.world_size)
            if self.shuffle
            else len(range(self.rank, self.num_samples, self.world_size))
        )
        return math.ceil(per_rank / self.batch_size)


class TensorBatches:
    """Batches gathered by index from tensors that already sit where training runs."""

    def __init__(self, images: torch.Tensor, labels: torch.Tensor, plan: EpochBatches) -> None:
        self.images, self.labels, self.plan = images, labels, plan

    def iterate(self, epoch: int, skip: int = 0) -> Iterator[Split]:
        for index in self.plan.batches(epoch, skip, device=self.images.device):
            yield self.images.index_select(0, index), self.labels.index_select(0, index)

    def __iter__(self) -> Iterator[Split]:
        return self.iterate(0)

    def __len__(self) -> int:
        return len(self.plan)


class _PlannedBatchSampler(torch.utils.data.Sampler):
    """Lets a DataLoader follow an EpochBatches plan; `epoch` and `skip` are set before each iteration."""

    def __init__(self, plan: EpochBatches) -> None:
        self.plan, self.epoch, self.skip = plan, 0, 0

    def __iter__(self) -> Iterator[list[int]]:
        for index in self.plan.batches(self.epoch, self.skip):
            yield index.tolist()

    def __len__(self) -> int:
        return len(self.plan)


class LoaderBatches:
    """A standard DataLoader (workers, pinned memory) over a dataset, driven by an EpochBatches plan."""

    def __init__(self, dataset: Dataset, plan: EpochBatches, num_workers: int, pin_memory: bool):
        self.plan = plan
        # Not named `sampler`: Lightning would take this object for a DataLoader and look for more.
        self.planned_sampler = _PlannedBatchSampler(plan)
        # Every new DataLoader iterator draws its workers' base seed from `generator`, or else from
        # torch's global stream, which augmentation uses: a run resumed mid-epoch creates one iterator
        # more than an uninterrupted run and would then draw different augmentations.
        self.generator = torch.Generator()
        self.loader = DataLoader(
            dataset,
            batch_sampler=self.planned_sampler,
            num_workers=num_workers,
            # Page-locked batches copy to the GPU asynchronously, overlapping the previous step.
            pin_memory=pin_memory,
            # Workers are started once, not at every epoch and every validation pass.
            persistent_workers=num_workers > 0,
            generator=self.generator,
        )

    def iterate(self, epoch: int, skip: int = 0) -> Iterator[Any]:
        self.planned_sampler.epoch, self.planned_sampler.skip = epoch, skip
        # Worker seeds follow (seed, epoch). Persistent workers keep the seeds of the epoch they started
        # in; nothing here draws random numbers in workers (augmentation runs on whole batches).
        self.generator.manual_seed(self.plan.seed + epoch)
        return iter(self.loader)

    def __iter__(self) -> Iterator[Any]:
        return self.iterate(0)

    def __len__(self) -> int:
        return len(self.plan)


class ResumableEpochs:
    """The training loader: one epoch of batches per `iter()`, resumable in the middle of an epoch.

    The epoch comes from `current_epoch` (the Trainer's), read when the first batch is asked for:
    Lightning restores its epoch counter on resume but, after an end-of-epoch checkpoint, does not
    hand the loader its saved state back, so a loader that counted epochs itself would replay epoch 0.
    Mid-epoch, Lightning stores `state_dict()` in the checkpoint and gives it to `load_state_dict()`
    before the first iterator runs, and the resumed epoch skips the batches already trained on.
    """

    def __init__(self, batches: TensorBatches | LoaderBatches, current_epoch: Callable[[], int] | None = None):
        self.batches = batches
        self.current_epoch = current_epoch  # None: count iter() calls (outside a Trainer)
        self.epoch, self.yielded = -1, 0
        self.resume_at: dict[str, int] | None = None

    def __iter__(self) -> Iterator[Any]:
        # A generator: none of this runs until the first batch is asked for, after Lightning has
        # restored its counters. (Lightning asks early only of loaders without a length; ours has one.)
        epoch = self.current_epoch() if self.current_epoch is not None else self.epoch + 1
        resume_at, self.resume_at = self.resume_at, None
        skip = resume_at["consumed"] if resume_at and resume_at["epoch"] == epoch else 0
        self.epoch, self.yielded = epoch, skip
        for batch in self.batches.iterate(epoch, skip):
            self.yielded += 1
            yield batch

    def __len__(self) -> int:
        return len(self.batches)

    def state_dict(self) -> dict[str, int]:
        # Every batch handed out has been trained on when a checkpoint is saved: Lightning fetches ahead
        # only from loaders without a length. tests/test_resume.py kills and resumes runs mid-epoch.
        return {"epoch": self.epoch, "consumed": self.yielded}

    def load_state_dict(self, state: dict[str, int]) -> None:
        self.resume_at = dict(state)


def random_flip_and_translate(images: torch.Tensor, max_shift: int = 4) -> torch.Tensor:
    """Per-sample random horizontal flip and shift by up to `max_shift` pixels (reflect-padded), for a
    whole batch in a few tensor ops on the device (the airbench way), instead of per-sample PIL calls."""
    n, _, height, width = images.shape
    flip = torch.rand(n, device=images.device) < 0.5
    images = torch.where(flip.view(-1, 1, 1, 1), images.flip(3), images)
    padded = F.pad(images, (max_shift,) * 4, mode="reflect")
    dy = torch.randint(0, 2 * max_shift + 1, (n, 1), device=images.device)
    dx = torch.randint(0, 2 * max_shift + 1, (n, 1), device=images.device)
    rows = (dy + torch.arange(height, device=images.device)).view(n, 1, height, 1)
    cols = (dx + torch.arange(width, device=images.device)).view(n, 1, 1, width)
    padded = padded.gather(2, rows.expand(-1, padded.shape[1], -1, padded.shape[3]))
    return padded.gather(3, cols.expand(-1, padded.shape[1], height, -1))


class ImageData(pl.LightningDataModule):
    """What every dataset here gives the solver: input_shape (C, H, W), class_names, mean/std per
    channel in raw pixel units, pixel_max, split_sizes after setup(), and this rank's batches of each split."""

    input_shape: tuple[int, int, int]
    class_names: list[str]
    mean: tuple[float, ...]
    std: tuple[float, ...]
    pixel_max = 255  # raw pixel values run 0..pixel_max (8-bit images); saved with the model for predict
    augment = False  # random flips and shifts while training

    def __init__(
        self,
        data_dir: str = "data",
        batch_size: int = 128,
        num_workers: int = 0,
        seed: int = 0,
        val_fraction: float = 0.1,
        data_on_device: str = "auto",
        **_: Any,
    ) -> None:
        super().__init__()
        self.data_dir = Path(data_dir).expanduser()
        self.batch_size = batch_size
        self.num_workers = num_workers
        self.seed = seed
        self.val_fraction = val_fraction
        self.data_on_device = data_on_device

    @property
    def num_classes(self) -> int:
        return len(self.class_names)

    @property
    def split_sizes(self) -> dict[str, int]:
        raise NotImplementedError

    def _batches(self, split: str, shuffle: bool) -> TensorBatches | LoaderBatches:
        raise NotImplementedError

    def _plan(self, num_samples: int, shuffle: bool) -> EpochBatches:
        trainer = self.trainer
        rank, world_size = (trainer.global_rank, trainer.world_size) if trainer else (0, 1)
        return EpochBatches(num_samples, self.batch_size, shuffle, self.seed, rank, world_size)

    def _training_device(self) -> torch.device:
        return self.trainer.strategy.root_device if self.trainer is not None else torch.device("cpu")

    def train_dataloader(self) -> ResumableEpochs:
        trainer = self.trainer
        current_epoch = (lambda: trainer.current_epoch) if trainer is not None else None
        return ResumableEpochs(self._batches("train", shuffle=True), current_epoch)

    def val_dataloader(self) -> TensorBatches | LoaderBatches:
        return self._batches("val", shuffle=False)

    def test_dataloader(self) -> TensorBatches | LoaderBatches:
        return self._batches("test", shuffle=False)

    def on_after_batch_transfer(self, batch: Split, dataloader_idx: int) -> Split:
        images, labels = batch
        images = images.float()
        if self.augment and self.trainer is not None and self.trainer.training:
            images = random_flip_and_translate(images)
        return images, labels


class InMemoryData(ImageData):
    """A dataset that fits in memory as uint8 tensors: subclasses set the attributes and write load()."""

    splits: dict[str, Split]

    def load(self) -> dict[str, Split]:
        """Return {"train": ..., "val": ..., "test": ...} as uint8 images and int64 labels."""
        raise NotImplementedError

    @property
    def split_sizes(self) -> dict[str, int]:
        return {name: len(labels) for name, (_, labels) in self.splits.items()}

    def setup(self, stage: str | None = None) -> None:
        if getattr(self, "splits", None):
            return
        splits = self.load()
        device = self._placement(sum(x.nbytes + y.nbytes for x, y in splits.values()))
        self.splits = {k: (x.to(device), y.to(device)) for k, (x, y) in splits.items()}

    def _placement(self, nbytes: int) -> torch.device:
        """Where the tensors live: on the GPU when they fit in a safe share of its free memory (`auto`)
        or when asked (`yes`); otherwise on the host, from where a DataLoader feeds the GPU."""
        device = self._training_device()
        if device.type != "cuda" or self.data_on_device == "no":
            return torch.device("cpu")
        free_bytes, _ = torch.cuda.mem_get_info(device)
        if self.data_on_device == "yes" or nbytes < DEVICE_MEMORY_FRACTION * free_bytes:
            return device
        return torch.device("cpu")

    def _batches(self, split: str, shuffle: bool) -> TensorBatches | LoaderBatches:
        images, labels = self.splits[split]
        plan = self._plan(len(labels), shuffle)
        to_gpu = self._training_device().type == "cuda"
        if self.data_on_device == "no" or (to_gpu and images.device.type == "cpu"):
            dataset = torch.utils.data.TensorDataset(images, labels)
            return LoaderBatches(dataset, plan, self.num_workers, pin_memory=to_gpu)
        # Training on the device that holds the tensors (or on the CPU, or a device without
        # pinned memory): batches are gathered by index, no workers and no collation.
        return TensorBatches(images, labels, plan)


def stratified_split(labels: np.ndarray, fraction: float, seed: int) -> tuple[np.ndarray, np.ndarray]:
    """Indices (keep, held_out) with `fraction` of each class held out, fixed by `seed`.

    Sets too small to stratify (a class with one sample, fewer held-out samples than classes) are
    split without stratification rather than refused.
    """
    from sklearn.model_selection import train_test_split

    index = np.arange(len(labels))
    try:
        keep, held_out = train_test_split(index, test_size=fraction, stratify=labels, random_state=seed)
    except ValueError:
        keep, held_out = train_test_split(index, test_size=fraction, random_state=seed)
    return np.sort(keep), np.sort(held_out)


def _as_split(images: np.ndarray | torch.Tensor, labels: Any, index: np.ndarray) -> Split:
    images = torch.as_tensor(np.asarray(images)[index], dtype=torch.uint8)
    return images, torch.as_tensor(np.asarray(labels)[index], dtype=torch.long)


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
        val_pos, test_pos = stratified_split(labels[held_out], 0.5, self.seed)
        return {
            "train": _as_split(images, labels, train),
            "val": _as_split(images, labels, held_out[val_pos]),
            "test": _as_split(images, labels, held_out[test_pos]),
        }


class TorchvisionData(InMemoryData):
    """A torchvision dataset with an official train/test split; val is a stratified share of train.

    `prepare_data` (run once per node by Lightning) downloads what is missing; without a network the
    error names the files expected and where.
    """

    folder: str  # where torchvision keeps the files, under --data-dir
    files: tuple[str, ...]

    def missing_files(self) -> list[Path]:
        return [self.data_dir / self.folder / f for f in self.files if not (self.data_dir / self.folder / f).is_file()]

    def prepare_data(self) -> None:
        missing = self.missing_files()
        if not missing:
            return
        try:
            self.download()
        except Exception as error:  # any network or archive failure means the same thing here
            names = ", ".join(p.name for p in missing)
            raise UserError(
                f"{self.name}: missing {names} in {missing[0].parent} and the download failed "
                f"({type(error).__name__}); put the files there or run once with internet access"
            ) from error

    def download(self) -> None:
        raise NotImplementedError

    def read(self, train: bool) -> tuple[np.ndarray, np.ndarray]:
        raise NotImplementedError

    def load(self) -> dict[str, Split]:
        self.prepare_data()  # no-op when present; a clear error when a rank finds files missing
        train_images, train_labels = self.read(train=True)
        test_images, test_labels = self.read(train=False)
        train, val = stratified_split(train_labels, self.val_fraction, self.seed)
        every = np.arange(len(test_labels))
        return {
            "train": _as_split(train_images, train_labels, train),
            "val": _as_split(train_images, train_labels, val),
            "test": _as_split(test_images, test_labels, every),
        }


class MNIST(TorchvisionData):
    """MNIST in its IDX files (torchvision's layout: <data-dir>/MNIST/raw/)."""

    name = "mnist"
    input_shape = (1, 28, 28)
    class_names = [str(d) for d in range(10)]
    mean, std = (33.32,), (78.57,)
    files = (
        "train-images-idx3-ubyte",
        "train-labels-idx1-ubyte",
        "t10k-images-idx3-ubyte",
        "t10k-labels-idx1-ubyte",
    )

    @property
    def torchvision_class(self) -> Any:
        import torchvision

        return torchvision.datasets.MNIST

    @property
    def folder(self) -> str:  # type: ignore[override]
        return f"{self.torchvision_class.__name__}/raw"

    def download(self) -> None:
        self.torchvision_class(str(self.data_dir), train=True, download=True)

    def read(self, train: bool) -> tuple[np.ndarray, np.ndarray]:
        dataset = self.torchvision_class(str(self.data_dir), train=train, download=False)
        return dataset.data.numpy()[:, None], dataset.targets.numpy()


class FashionMNIST(MNIST):
    """Fashion-MNIST, same IDX format (<data-dir>/FashionMNIST/raw/)."""

    name = "fashion-mnist"
    class_names = [
        "T-shirt/top", "Trouser", "Pullover", "Dress", "Coat",
        "Sandal", "Shirt", "Sneaker", "Bag", "Ankle boot",
    ]  # fmt: skip
    mean, std = (72.94,), (90.02,)

    @property
    def torchvision_class(self) -> Any:
        import torchvision

        return torchvision.datasets.FashionMNIST


class CIFAR10(TorchvisionData):
    """CIFAR-10 in its python pickle batches (<data-dir>/cifar-10-batches-py/)."""

    name = "cifar10"
    input_shape = (3, 32, 32)
    class_names = [
        "airplane", "automobile", "bird", "cat", "deer",
        "dog", "frog", "horse", "ship", "truck",
    ]  # fmt: skip
    mean, std = (125.31, 122.95, 113.87), (62.99, 62.09, 66.70)
    augment = True
    folder = "cifar-10-batches-py"
    files = tuple(f"data_batch_{i}" for i in range(1, 6)) + (
        "test_batch",
        "batches.meta",
    )

    def download(self) -> None:
        import torchvision

        torchvision.datasets.CIFAR10(str(self.data_dir), train=True, download=True)

    def read(self, train: bool) -> tuple[np.ndarray, np.ndarray]:
        import torchvision

        class Unchecked(torchvision.datasets.CIFAR10):
            """torchvision's reader minus its MD5 checks: the hashes pin the official archive, and a
            truncated or foreign file still fails loudly when unpickled. Class names are ours."""

            def _check_integrity(self) -> bool:
                return True  # missing files were reported by prepare_data

            def _load_meta(self) -> None:
                pass

        try:
            dataset = Unchecked(str(self.data_dir), train=train, download=False)
        except (pickle.UnpicklingError, EOFError, KeyError, ValueError, RuntimeError, OSError) as error:
            raise UserError(
                f"cifar10: cannot read {self.data_dir / self.folder} ({type(error).__name__}: {error})"
            ) from error
        return dataset.data.transpose(0, 3, 1, 2), np.asarray(dataset.targets)


class ImageFolderData(ImageData):
    """Your own images, one folder per class (torchvision's ImageFolder), read by DataLoader workers.

    Layouts: <data-dir>/<class>/<image> (train/val/test split 80/10/10, stratified, fixed by --seed),
    or <data-dir>/train/<class>/... with optional val/ and test/ beside it (a missing one is split
    off train). Images are converted to RGB and resized to image_size x image_size.
    """

    augment = True
    mean, std = (
        (123.68, 116.28, 103.53),
        (58.40, 57.12, 57.38),
    )  # ImageNet's, in 0-255 units

    def __init__(self, data_dir: str = "data", image_size: int = 64, **kwargs: Any) -> None:
        super().__init__(data_dir=data_dir, **kwargs)
        root = self.data_dir
        if not root.is_dir():
            raise UserError(f"image-folder: {root} is not a folder; pass --data-dir with one folder per class")
        self.presplit = (root / "train").is_dir()
        class_root = root / "train" if self.presplit else root
        self.class_names = sorted(p.name for p in class_root.iterdir() if p.is_dir() and not p.name.startswith("."))
        if len(self.class_names) < 2:
            raise UserError(
                f"image-folder: {class_root} holds {len(self.class_names)} class folder(s); "
                "a classifier needs at least 2 (one sub-folder of images per class)"
            )
        self.input_shape = (3, image_size, image_size)
        self.image_size = image_size
        self.subsets: dict[str, Dataset] = {}
        # Read every folder now: an unreadable image fails before the run starts, naming the file.
        if self.presplit:
            self.folders = {
                name: self._folder(root / name) for name in ("train", "val", "test") if (root / name).is_dir()
            }
        else:
            self.folders = {"all": self._folder(root)}

    @property
    def split_sizes(self) -> dict[str, int]:
        return {name: len(subset) for name, subset in self.subsets.items()}

    def _folder(self, path: Path) -> Any:
        import torchvision

        try:
            folder = torchvision.datasets.ImageFolder(
                str(path),
                allow_empty=False,
                loader=functools.partial(read_image, input_shape=self.input_shape),
            )
        except (FileNotFoundError, RuntimeError) as error:
            raise UserError(f"image-folder: {path}: {error}") from error
        if folder.classes != self.class_names:
            raise UserError(f"image-folder: {path} has classes {folder.classes}, expected {self.class_names}")
        for sample_path, _ in folder.samples:
            _check_image(sample_path)
        return folder

    def setup(self, stage: str | None = None) -> None:
        if self.subsets:
            return
        from torch.utils.data import Subset

        if not self.presplit:
            folder = self.folders["all"]
            labels = np.asarray(folder.targets)
            rest, test = stratified_split(labels, 0.1, self.seed)
            train, val = stratified_split(labels[rest], 1 / 9, self.seed)
            self.subsets = {
                "train": Subset(folder, rest[train]),
                "val": Subset(folder, rest[val]),
                "test": Subset(folder, test),
            }
            return
        train_folder = self.folders["train"]
        given = {name: folder for name, folder in self.folders.items() if name != "train"}
        train_index = np.arange(len(train_folder))
        for name in ("val", "test"):
            if name not in given:
                labels = np.asarray(train_folder.targets)[train_index]
                keep, held_out = stratified_split(labels, self.val_fraction, self.seed)
                given[name] = Subset(train_folder, train_index[held_out])
                train_index = train_index[keep]
        self.subsets = {"train": Subset(train_folder, train_index), **given}

    def _batches(self, split: str, shuffle: bool) -> LoaderBatches:
        subset = self.subsets[split]
        plan = self._plan(len(subset), shuffle)
        return LoaderBatches(subset, plan, self.num_workers, pin_memory=self._training_device().type == "cuda")


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


def _check_image(path: str) -> None:
    """Fail before training, naming the file, rather than deep inside a worker process mid-epoch."""
    from PIL import Image

    try:
        with Image.open(path) as image:
            image.verify()
    except Exception as error:
        raise UserError(
            f"image-folder: cannot read image {path} ({type(error).__name__}); remove or replace it"
        ) from error


DATASETS: dict[str, type[ImageData]] = {
    "digits": Digits,
    "mnist": MNIST,
    "fashion-mnist": FashionMNIST,
    "cifar10": CIFAR10,
    "image-folder": ImageFolderData,
}
