"""The DataModule base every dataset builds on, and its batch loader: in-memory tensors batched by indexing on the
training device (no per-sample Python, no collation, no workers: the airbench way), other datasets read by a standard
DataLoader with workers. Both follow one epoch plan, so they give the same batches; augmentation runs on the device."""

from __future__ import annotations

import atexit
import itertools
import math
import multiprocessing
import os
import signal
import traceback
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import lightning.pytorch as pl
import torch
import torch.nn.functional as F
from torch.utils.data import DataLoader, Dataset, TensorDataset

from project.infra.errors import UserError

Split = tuple[torch.Tensor, torch.Tensor]  # (inputs N x ..., targets N x ...)

DEFAULT_THREADS = torch.get_num_threads()
DEVICE_MEMORY_FRACTION = 0.25  # of free GPU memory, for in-memory data under `auto`; the rest is the model's


class EpochBatches:
    """This rank's batches of sample indices for one epoch, as DistributedSampler + BatchSampler give them: a
    permutation seeded by `seed + epoch`; training shards padded to equal length so every rank steps the same number of
    times (DDP needs it; a few samples repeat); evaluation shards not padded, so each sample counts once in all."""

    def __init__(self, num_samples: int, batch_size: int, shuffle: bool, seed: int, rank: int, world_size: int):
        self.num_samples, self.batch_size, self.shuffle = num_samples, batch_size, shuffle
        self.seed, self.rank, self.world_size = seed, rank, world_size
        self.total = math.ceil(num_samples / world_size) * world_size if shuffle else num_samples  # padded or not

    def shard(self, epoch: int) -> torch.Tensor:
        if not self.shuffle:
            return torch.arange(self.rank, self.num_samples, self.world_size)
        order = torch.randperm(self.num_samples, generator=torch.Generator().manual_seed(self.seed + epoch))
        if self.total > self.num_samples:  # repeat from the start, as DistributedSampler pads
            order = order.repeat(math.ceil(self.total / self.num_samples))[: self.total]
        return order[self.rank :: self.world_size]

    def batches(self, epoch: int, skip: int = 0, device: torch.device | str = "cpu") -> Iterator[torch.Tensor]:
        shard = self.shard(epoch).to(device, non_blocking=True)  # one copy per epoch; batches are views
        for start in range(skip * self.batch_size, len(shard), self.batch_size):
            yield shard[start : start + self.batch_size]

    def __len__(self) -> int:
        return math.ceil(len(range(self.rank, self.total, self.world_size)) / self.batch_size)


def cores_beside(num_workers: int) -> None:
    """Torch's threads in this process: its default (a thread per core) less the DataLoader workers reading a split,
    at least one. Those threads spin after each operation: beside workers decoding on the same cores they took the
    workers' time (a 16,000-image folder's first epoch, 2 cores, 2 workers: 8.1 s with 2 threads, 5.5 s with 1).
    OMP_NUM_THREADS, when set, decides. With --deterministic, always the default: some operations' results depend on
    the number of threads, and an epoch read from memory (no workers) must compute as one decoded by workers did."""
    if "OMP_NUM_THREADS" not in os.environ:
        deterministic = torch.are_deterministic_algorithms_enabled()
        torch.set_num_threads(DEFAULT_THREADS if deterministic else max(1, DEFAULT_THREADS - num_workers))


def ignore_stop_signals(worker_id: int) -> None:
    """DataLoader workers leave SIGTERM/SIGINT to the main process: a scheduler's SIGTERM or a Ctrl-C reaches the
    whole process group, and a worker killed by it would crash the main process before it can save a checkpoint."""
    signal.signal(signal.SIGTERM, signal.SIG_IGN)
    signal.signal(signal.SIGINT, signal.SIG_IGN)


def stop_workers() -> None:
    """Ends the (persistent) workers still running at exit: multiprocessing's own exit handler would stop them with
    SIGTERM, which they ignore, and wait for ever. Registered after it, this handler runs first."""
    for child in multiprocessing.active_children():
        child.kill()


class Batches:
    """One split's batches on this rank, in an EpochBatches plan's order: tensors (inputs, targets) gathered by index
    where they sit, any other dataset read by a standard DataLoader (workers, pinned memory). Each `iter()` is one
    epoch: `current_epoch()`, the Trainer's (after an end-of-epoch checkpoint Lightning restores it, not the loader's
    state), or else a count. Mid-epoch, Lightning saves `state_dict()` and hands it to `load_state_dict()` before the
    first iterator runs: the resumed epoch skips the batches already trained on."""

    def __init__(self, plan: EpochBatches, source: Split | Dataset, num_workers: int = 0, pin_memory: bool = False,
                 current_epoch: Callable[[], int] | None = None) -> None:  # fmt: skip
        self.plan, self.source, self.current_epoch = plan, source, current_epoch
        self.epoch, self.yielded, self.resume_at = -1, 0, None
        if isinstance(source, tuple):
            return
        # The batch sampler: refilled before each epoch (not named `sampler`: Lightning would take us for a DataLoader).
        self.index_lists: list[list[int]] = []
        # Each DataLoader iterator draws its workers' seed from `generator`, else from the global stream augmentation
        # uses: a run resumed mid-epoch makes one iterator more than an uninterrupted run, and would augment otherwise.
        self.generator = torch.Generator()
        if num_workers > 0:
            atexit.unregister(stop_workers)  # registered once, and after multiprocessing's own handler
            atexit.register(stop_workers)
        # Pinned batches copy to the GPU asynchronously, overlapping the last step; persistent workers start once.
        self.loader = DataLoader(source, batch_sampler=self.index_lists, num_workers=num_workers, pin_memory=pin_memory,
                                 persistent_workers=num_workers > 0, generator=self.generator,
                                 worker_init_fn=ignore_stop_signals)  # fmt: skip

    def iterate(self, epoch: int, skip: int = 0) -> Iterator[Any]:
        if isinstance(self.source, tuple):
            return self.gather(*self.source, epoch, skip)
        self.index_lists[:] = [index.tolist() for index in self.plan.batches(epoch, skip)]
        self.generator.manual_seed(self.plan.seed + epoch)  # nothing random runs in workers: augmentation is batched
        cores_beside(self.loader.num_workers)
        return self.read(self.loader)

    @staticmethod
    def read(loader: DataLoader) -> Iterator[Any]:
        """The DataLoader's batches. A worker's error (an unreadable image) comes with frames that hold the loader's
        iterator in a reference cycle: they are cleared, so that the workers stop when the loader goes (teardown).
        Freed by a garbage collection instead, the iterator's queues close first and its shutdown waits 5 s a worker."""
        try:
            yield from loader
        except Exception as error:
            traceback.clear_frames(error.__traceback__)
            raise

    def gather(self, inputs: torch.Tensor, targets: torch.Tensor, epoch: int, skip: int) -> Iterator[Split]:
        """The epoch's batches of tensors held in memory, gathered by index where they sit (no workers)."""
        cores_beside(0)
        indices = self.plan.batches(epoch, skip, device=inputs.device)
        return ((inputs.index_select(0, i), targets.index_select(0, i)) for i in indices)

    def __iter__(self) -> Iterator[Any]:
        # A generator: nothing here runs until the first batch is asked for, after Lightning restored its counters.
        epoch = self.current_epoch() if self.current_epoch is not None else self.epoch + 1
        resume_at, self.resume_at = self.resume_at, None
        self.epoch, self.yielded = epoch, resume_at["consumed"] if resume_at and resume_at["epoch"] == epoch else 0
        for batch in self.iterate(epoch, skip=self.yielded):
            self.yielded += 1
            yield batch

    def __len__(self) -> int:
        return len(self.plan)

    def state_dict(self) -> dict[str, int]:
        # Every batch handed out has been trained on: Lightning fetches ahead only from loaders without a length.
        return {"epoch": self.epoch, "consumed": self.yielded}

    def load_state_dict(self, state: dict[str, int]) -> None:
        self.resume_at = dict(state)


def random_flip_and_translate(images: torch.Tensor, max_shift: int = 4) -> torch.Tensor:
    """Per-sample random horizontal flip and shift by up to `max_shift` pixels (reflect-padded), for a whole batch in
    two gathers on the device (rows, then columns: 2.5x faster on a CPU than one four-index gather), instead of
    per-sample PIL calls in workers."""
    n, c, height, width = images.shape
    device = images.device
    flip = torch.rand(n, 1, 1, 1, device=device) < 0.5
    dy, dx = (torch.randint(0, 2 * max_shift + 1, (n, 1, 1, 1), device=device) for _ in range(2))
    rows, cols = dy + torch.arange(height, device=device).view(-1, 1), dx + torch.arange(width, device=device)
    cols = torch.where(flip, width + 2 * max_shift - 1 - cols, cols)  # flipped, then padded = padded, then flipped
    padded = F.pad(images, (max_shift,) * 4, mode="reflect")
    return padded.gather(2, rows.expand(n, c, height, padded.shape[3])).gather(3, cols.expand(n, c, height, width))


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
    split_sizes: dict[str, int]  # a property, after setup()

    def __init__(self, data_dir: str = "data", batch_size: int = 128, num_workers: int = 0, seed: int = 0,
                 val_fraction: float = 0.1, data_on_device: str = "auto", **_: Any) -> None:  # fmt: skip
        super().__init__()
        self.data_dir = Path(data_dir).expanduser()
        self.batch_size, self.num_workers, self.seed = batch_size, num_workers, seed
        self.val_fraction, self.data_on_device = val_fraction, data_on_device
        self.statistics_source: Batches | None = None
        self.opened: list[Batches] = []
        self.mid_epoch: dict[str, int] | None = None  # of the checkpoint resumed (load_state_dict)

    def batches(self, split: str, shuffle: bool) -> Batches:
        raise NotImplementedError  # `self.loader(tensors or dataset, shuffle)`

    def state_dict(self) -> dict[str, Any]:
        """In every checkpoint: what picks the split, so that a checkpoint kept outside its run (no config.yaml to
        continue from) is resumed and tested on its own split; another would mix its test and training samples. Saved
        mid-epoch: the processes and batch size that split the epoch (the rest of it is where their batches end)."""
        state: dict[str, Any] = {"split": {"seed": self.seed, "val_fraction": self.val_fraction}}
        train = next((batches for batches in self.opened if batches.plan.shuffle), None)
        if train is not None and 0 < train.yielded < len(train):
            state["mid_epoch"] = {"processes": train.plan.world_size, "batch_size": train.plan.batch_size}
        return state

    def load_state_dict(self, state: dict[str, Any]) -> None:
        self.mid_epoch = state.get("mid_epoch")  # run.py checks it against the new Trainer's
        then, now = state.get("split", {}), self.state_dict()["split"]  # (older checkpoints recorded none)
        differ = [f"--{key.replace('_', '-')} {then[key]} (not {value})" for key, value in now.items()
                  if key in then and then[key] != value]  # fmt: skip
        if differ:
            raise UserError(f"the checkpoint was trained on the split of {', '.join(differ)}: give the same to "
                            "continue or test it on its own split")  # fmt: skip

    def loader(self, source: Split | Dataset, shuffle: bool) -> Batches:
        rank, world_size = (self.trainer.global_rank, self.trainer.world_size) if self.trainer else (0, 1)
        size = len(source[1]) if isinstance(source, tuple) else len(source)
        plan = EpochBatches(size, self.batch_size, shuffle, self.seed, rank, world_size)
        return Batches(plan, source, self.num_workers, pin_memory=self.training_device().type == "cuda")

    def teardown(self, stage: str) -> None:
        """The end of fit, validate or test: the persistent DataLoader workers stop now. Lightning stops a DataLoader's
        own, not those inside Batches; left to the garbage collector, the loader's parts were finalized out of order
        (a collection took 5 s a worker and left them running: in-process runs, a sweep's trials, piled them up)."""
        for batches in self.opened:
            batches.loader = None  # its last reference: its workers are shut down now, as a DataLoader does
        self.opened.clear()
        self.statistics_source = None

    def on_exception(self, exception: BaseException) -> None:
        self.teardown("exception")  # a run that fails, or a sweep's trial pruned mid-fit: Lightning skips teardown

    def training_device(self) -> torch.device:
        return self.trainer.strategy.root_device if self.trainer is not None else torch.device("cpu")

    def opened_batches(self, split: str, shuffle: bool) -> Batches:
        self.opened.append(self.batches(split, shuffle))
        return self.opened[-1]

    def train_dataloader(self) -> Batches:
        loader, trainer = self.opened_batches("train", shuffle=True), self.trainer
        loader.current_epoch = (lambda: trainer.current_epoch) if trainer else None
        return loader

    def val_dataloader(self) -> Batches:
        return self.opened_batches("val", shuffle=False)

    def test_dataloader(self) -> Batches:
        return self.opened_batches("test", shuffle=False)

    def on_after_batch_transfer(self, batch: Split, dataloader_idx: int) -> Split:
        inputs, targets = batch
        if self.augment and self.trainer is not None and self.trainer.training:
            return random_flip_and_translate(inputs).float(), targets  # on the raw bytes: 30% faster than on floats
        return inputs.float(), targets

    def statistics_batches(self, max_samples: int) -> Iterator[torch.Tensor]:
        """Up to `max_samples` training images of this rank, always the same random subset and not augmented, as float
        batches on the training device: what callbacks.PreciseBatchNorm recomputes BatchNorm's statistics from."""
        if self.statistics_source is None:  # kept: a DataLoader's workers start once
            self.statistics_source = self.opened_batches("train", shuffle=True)
        batches = self.statistics_source.iterate(epoch=0)
        for images, _ in itertools.islice(batches, math.ceil(max_samples / self.batch_size)):
            yield images.to(self.training_device(), non_blocking=True).float()


class InMemoryData(DataModule):
    """A dataset that fits in memory as uint8 tensors: subclasses set the attributes and write load()."""

    splits: dict[str, Split] | None = None

    def load(self) -> dict[str, Split]:
        raise NotImplementedError  # {"train": ..., "val": ..., "test": ...}: (inputs, targets), as data.as_split makes

    @property
    def split_sizes(self) -> dict[str, int]:
        return {name: len(labels) for name, (_, labels) in (self.splits or {}).items()}

    def setup(self, stage: str | None = None) -> None:
        """Read the data (on the host) the first time; once a Trainer runs on a GPU, put it there when it fits in a safe
        share of the free memory (`auto`) or when asked (`yes`); otherwise a DataLoader feeds the GPU from the host."""
        if self.splits is None:
            self.splits = self.load()
            self.check(self.splits)
        device = self.training_device()
        if device.type == "cuda" and self.data_on_device != "yes":
            nbytes = sum(x.nbytes + y.nbytes for x, y in self.splits.values())
            if self.data_on_device == "no" or nbytes >= DEVICE_MEMORY_FRACTION * torch.cuda.mem_get_info(device)[0]:
                device = torch.device("cpu")
        self.splits = {k: (x.to(device), y.to(device)) for k, (x, y) in self.splits.items()}

    def check(self, splits: dict[str, Split]) -> None:
        """Arrays that do not fit what the dataset declares (input_shape, its task's targets): one line now."""
        from project.tasks import TASKS

        dataset = type(self).__name__
        try:  # an unknown task is named before the data is read (run.resolve_task)
            task = TASKS[self.task](self.output_names, **TASKS[self.task].options_of(self))
        except ValueError as error:
            raise UserError(f"{dataset}: {error}") from None
        for name, (inputs, targets) in splits.items():
            if tuple(inputs.shape[1:]) != tuple(self.input_shape):
                raise UserError(f"{dataset}: its {name} inputs are {tuple(inputs.shape[1:])} per sample, but its "
                                f"input_shape says {tuple(self.input_shape)}")  # fmt: skip
            problem = task.check_targets(targets)
            if problem:
                raise UserError(f"{dataset}: its {name} targets {problem}")

    def batches(self, split: str, shuffle: bool) -> Batches:
        images, labels = self.splits[split]
        if self.data_on_device == "no" or images.device.type != self.training_device().type:
            return self.loader(TensorDataset(images, labels), shuffle)
        return self.loader((images, labels), shuffle)  # where training runs (or the CPU): gathered by index
