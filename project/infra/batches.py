"""The DataModule base every dataset builds on, and the batch loaders behind it.

Every dataset yields raw inputs (uint8 pixels (N, C, H, W), or float feature vectors) with targets as its task
stores them (int64 class indices, float values); the model standardises the inputs
(model.Standardize) and training augmentation runs on whole batches on the device (`on_after_batch_transfer`),
so the two data paths give the same batches for the same seed:
- in-memory datasets are held as tensors, on the GPU when they fit, and batched by indexing: no per-sample Python,
  no collation, no worker processes (the airbench way);
- image folders (and `--data-on-device no`) go through a standard DataLoader with workers and pinned memory,
  driven by the same batch plan.
Training shards follow DistributedSampler's recipe; a training loader resumes mid-epoch exactly.
"""

from __future__ import annotations

import atexit
import math
import multiprocessing
import signal
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import lightning.pytorch as pl
import torch
import torch.nn.functional as F
from torch.utils.data import DataLoader, Dataset

Split = tuple[torch.Tensor, torch.Tensor]  # (inputs N x ..., targets N x ...)

# Share of free GPU memory in-memory data may take before `--data-on-device auto` keeps it on the host: the rest is
# for the model, activations and the allocator's slack.
DEVICE_MEMORY_FRACTION = 0.25


class EpochBatches:
    """This rank's batches of sample indices for one epoch, like DistributedSampler + BatchSampler.

    The order is a permutation seeded by `seed + epoch` (DistributedSampler's recipe). Training shards are padded to
    equal length so every rank steps the same number of times (DDP needs it; as with DistributedSampler, the padding
    repeats a few samples, so shards overlap by at most world_size - 1 samples); evaluation shards are not padded, so
    each sample is counted exactly once across processes.
    """

    def __init__(self, num_samples: int, batch_size: int, shuffle: bool, seed: int, rank: int, world_size: int):
        self.num_samples, self.batch_size, self.shuffle = num_samples, batch_size, shuffle
        self.seed, self.rank, self.world_size = seed, rank, world_size

    def shard(self, epoch: int) -> torch.Tensor:
        if self.shuffle:
            order = torch.randperm(self.num_samples, generator=torch.Generator().manual_seed(self.seed + epoch))
            total = math.ceil(self.num_samples / self.world_size) * self.world_size
            if total > self.num_samples:  # repeat from the start, as DistributedSampler pads
                order = order.repeat(math.ceil(total / self.num_samples))[:total]
        else:
            order = torch.arange(self.num_samples)
        return order[self.rank :: self.world_size]

    def batches(self, epoch: int, skip: int = 0, device: torch.device | None = None) -> Iterator[torch.Tensor]:
        shard = self.shard(epoch).to(device or "cpu", non_blocking=True)  # one copy per epoch; batches are views
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


class PlannedBatchSampler(torch.utils.data.Sampler):
    """Lets a DataLoader follow an EpochBatches plan; `epoch` and `skip` are set before each iteration."""

    def __init__(self, plan: EpochBatches) -> None:
        self.plan, self.epoch, self.skip = plan, 0, 0

    def __iter__(self) -> Iterator[list[int]]:
        for index in self.plan.batches(self.epoch, self.skip):
            yield index.tolist()

    def __len__(self) -> int:
        return len(self.plan)


def ignore_stop_signals(worker_id: int) -> None:
    """DataLoader workers leave SIGTERM/SIGINT to the main process: a scheduler's SIGTERM or a Ctrl-C reaches the
    whole process group, and a worker killed by it would crash the main process before it can save a checkpoint."""
    signal.signal(signal.SIGTERM, signal.SIG_IGN)
    signal.signal(signal.SIGINT, signal.SIG_IGN)


def stop_workers() -> None:
    """At exit, end the workers still running (persistent ones live as long as their DataLoader). multiprocessing's
    own exit handler stops them with SIGTERM, which they ignore, and would then wait for them for ever; this handler,
    registered later, runs first (atexit runs handlers in reverse order)."""
    for child in multiprocessing.active_children():
        child.kill()


class LoaderBatches:
    """A standard DataLoader (workers, pinned memory) over a dataset, driven by an EpochBatches plan."""

    def __init__(self, dataset: Dataset, plan: EpochBatches, num_workers: int, pin_memory: bool):
        self.plan = plan
        # Not named `sampler`: Lightning would take this object for a DataLoader and look for more.
        self.planned_sampler = PlannedBatchSampler(plan)
        # Every new DataLoader iterator draws its workers' base seed from `generator`, or else from torch's global
        # stream, which augmentation uses: a run resumed mid-epoch makes one iterator more than an uninterrupted run
        # and would then draw different augmentations.
        self.generator = torch.Generator()
        if num_workers > 0:
            atexit.unregister(stop_workers)  # registered once, and after multiprocessing's own handler
            atexit.register(stop_workers)
        self.loader = DataLoader(
            dataset,
            batch_sampler=self.planned_sampler,
            num_workers=num_workers,
            pin_memory=pin_memory,  # page-locked batches copy to the GPU asynchronously, overlapping the last step
            persistent_workers=num_workers > 0,  # started once, not at every epoch and every validation pass
            generator=self.generator,
            worker_init_fn=ignore_stop_signals,
        )

    def iterate(self, epoch: int, skip: int = 0) -> Iterator[Any]:
        self.planned_sampler.epoch, self.planned_sampler.skip = epoch, skip
        self.generator.manual_seed(self.plan.seed + epoch)  # nothing random runs in workers: augmentation is batched
        return iter(self.loader)

    def __iter__(self) -> Iterator[Any]:
        return self.iterate(0)

    def __len__(self) -> int:
        return len(self.plan)


class ResumableEpochs:
    """The training loader: one epoch of batches per `iter()`, resumable in the middle of an epoch.

    The epoch comes from `current_epoch` (the Trainer's), read when the first batch is asked for: Lightning restores
    its epoch counter on resume but, after an end-of-epoch checkpoint, does not hand the loader its saved state back,
    so a loader that counted epochs itself would replay epoch 0. Mid-epoch, Lightning stores `state_dict()` in the
    checkpoint and gives it to `load_state_dict()` before the first iterator runs; the resumed epoch skips the batches
    already trained on.
    """

    def __init__(self, batches: TensorBatches | LoaderBatches, current_epoch: Callable[[], int] | None = None):
        self.batches = batches
        self.current_epoch = current_epoch  # None: count iter() calls (outside a Trainer)
        self.epoch, self.yielded = -1, 0
        self.resume_at: dict[str, int] | None = None

    def __iter__(self) -> Iterator[Any]:
        # A generator: nothing here runs until the first batch is asked for, after Lightning restored its counters.
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
        # Every batch handed out has been trained on when a checkpoint is saved: Lightning fetches ahead only from
        # loaders without a length. tests/test_resume.py kills and resumes runs mid-epoch.
        return {"epoch": self.epoch, "consumed": self.yielded}

    def load_state_dict(self, state: dict[str, int]) -> None:
        self.resume_at = dict(state)


def random_flip_and_translate(images: torch.Tensor, max_shift: int = 4) -> torch.Tensor:
    """Per-sample random horizontal flip and shift by up to `max_shift` pixels (reflect-padded), for a whole batch in
    a few tensor ops on the device, instead of per-sample PIL calls in workers."""
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


class DataModule(pl.LightningDataModule):
    """What every dataset gives the solver: its task (a name in project/tasks), output_names (the classes, or the
    quantities predicted), input_shape ((C, H, W) images or (F,) feature vectors), mean/std per channel or feature in
    raw units, pixel_max, split_sizes after setup(), and this rank's batches of each split (`batches`)."""

    task = "classification"
    default_model = "cnn"  # what --model auto picks
    output_names: list[str]
    input_shape: tuple[int, ...]
    mean: tuple[float, ...]
    std: tuple[float, ...]
    pixel_max: float | None = 255  # images' raw pixels run 0..pixel_max (8-bit); None for other inputs
    augment = False  # random flips and shifts while training (images)

    def __init__(self, data_dir: str = "data", batch_size: int = 128, num_workers: int = 0, seed: int = 0,
                 val_fraction: float = 0.1, data_on_device: str = "auto", **_: Any) -> None:  # fmt: skip
        super().__init__()
        self.data_dir = Path(data_dir).expanduser()
        self.batch_size, self.num_workers, self.seed = batch_size, num_workers, seed
        self.val_fraction, self.data_on_device = val_fraction, data_on_device
        self.statistics_source: TensorBatches | LoaderBatches | None = None

    @property
    def split_sizes(self) -> dict[str, int]:
        raise NotImplementedError

    def batches(self, split: str, shuffle: bool) -> TensorBatches | LoaderBatches:
        raise NotImplementedError

    def plan(self, num_samples: int, shuffle: bool) -> EpochBatches:
        rank, world_size = (self.trainer.global_rank, self.trainer.world_size) if self.trainer else (0, 1)
        return EpochBatches(num_samples, self.batch_size, shuffle, self.seed, rank, world_size)

    def training_device(self) -> torch.device:
        return self.trainer.strategy.root_device if self.trainer is not None else torch.device("cpu")

    def train_dataloader(self) -> ResumableEpochs:
        trainer = self.trainer
        return ResumableEpochs(
            self.batches("train", shuffle=True), (lambda: trainer.current_epoch) if trainer else None
        )

    def val_dataloader(self) -> TensorBatches | LoaderBatches:
        return self.batches("val", shuffle=False)

    def test_dataloader(self) -> TensorBatches | LoaderBatches:
        return self.batches("test", shuffle=False)

    def on_after_batch_transfer(self, batch: Split, dataloader_idx: int) -> Split:
        inputs, targets = batch
        inputs = inputs.float()
        if self.augment and self.trainer is not None and self.trainer.training:
            inputs = random_flip_and_translate(inputs)
        return inputs, targets

    def statistics_batches(self, max_samples: int) -> Iterator[torch.Tensor]:
        """Up to `max_samples` training images of this rank, always the same random subset and not augmented, as float
        batches on the training device: what callbacks.PreciseBatchNorm recomputes BatchNorm's statistics from."""
        if self.statistics_source is None:  # kept: a DataLoader's workers start once
            self.statistics_source = self.batches("train", shuffle=True)
        device = self.training_device()
        for count, (images, _) in enumerate(self.statistics_source.iterate(epoch=0)):
            if count * self.batch_size >= max_samples:
                return
            yield images.to(device, non_blocking=True).float()


class InMemoryData(DataModule):
    """A dataset that fits in memory as uint8 tensors: subclasses set the attributes and write load()."""

    splits: dict[str, Split] | None = None

    def load(self) -> dict[str, Split]:
        """Return {"train": ..., "val": ..., "test": ...}: (inputs, targets) tensors, as `as_split` makes them."""
        raise NotImplementedError

    @property
    def split_sizes(self) -> dict[str, int]:
        return {name: len(labels) for name, (_, labels) in (self.splits or {}).items()}

    def setup(self, stage: str | None = None) -> None:
        """Read the data (on the host) the first time; once a Trainer runs, put it where training runs."""
        if self.splits is None:
            self.splits = self.load()
        device = self.placement(sum(x.nbytes + y.nbytes for x, y in self.splits.values()))
        self.splits = {k: (x.to(device), y.to(device)) for k, (x, y) in self.splits.items()}

    def placement(self, nbytes: int) -> torch.device:
        """On the GPU when the tensors fit in a safe share of its free memory (`auto`) or when asked (`yes`);
        otherwise on the host, from where a DataLoader feeds the GPU."""
        device = self.training_device()
        if device.type != "cuda" or self.data_on_device == "no":
            return torch.device("cpu")
        free_bytes, _ = torch.cuda.mem_get_info(device)
        if self.data_on_device == "yes" or nbytes < DEVICE_MEMORY_FRACTION * free_bytes:
            return device
        return torch.device("cpu")

    def batches(self, split: str, shuffle: bool) -> TensorBatches | LoaderBatches:
        images, labels = self.splits[split]
        plan = self.plan(len(labels), shuffle)
        to_gpu = self.training_device().type == "cuda"
        if self.data_on_device == "no" or (to_gpu and images.device.type == "cpu"):
            dataset = torch.utils.data.TensorDataset(images, labels)
            return LoaderBatches(dataset, plan, self.num_workers, pin_memory=to_gpu)
        return TensorBatches(images, labels, plan)  # on the device that trains (or the CPU): gathered by index
