"""How close the template's training path comes to a hand-written PyTorch loop, on one GPU.

In one process, on the same synthetic data and the same model, it times

- a hand-written loop over GPU-resident tensors (shuffle by index on the device, batch augmentation,
  autocast, Adam with cosine decay, a validation pass with accuracy every epoch), and
- the template's own training path: its DataModule machinery (InMemoryData, Batches), Solver,
  loggers, checkpoints and progress bar, built by run.py's own functions from the same command-line
  arguments `python -m project.run` takes,

for two settings (CIFAR-shaped CNN in bf16, channels_last on a GPU; MNIST-shaped MLP in fp32), and prints
seconds per epoch (training plus a 10% validation pass), training samples per second and the ratio.

    python benchmarks/gpu_benchmark.py                         # a CUDA GPU: the table for RESULTS.md
    python benchmarks/gpu_benchmark.py --compile               # the same with torch.compile on both sides
    python benchmarks/gpu_benchmark.py --device cpu --small    # this code path on the CPU, in seconds

Without a CUDA device (and without `--device cpu`) it says so and exits 0.
"""

from __future__ import annotations

import argparse
import platform
import statistics
import sys
import tempfile
import time
from dataclasses import dataclass, replace
from pathlib import Path
from typing import Any

import lightning.pytorch as pl
import torch
import torch.nn.functional as F

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))  # the project package, from anywhere
from project import run  # noqa: E402
from project.infra import console, records, tracking  # noqa: E402
from project.infra.batches import InMemoryData, random_flip_and_translate  # noqa: E402
from project.model import build_model  # noqa: E402


@dataclass(frozen=True)
class Setting:
    shape_name: str  # the dataset these images are shaped like
    input_shape: tuple[int, int, int]
    train_size: int
    model: str
    hidden_dim: int
    precision: str  # as run.py's --precision takes it
    batch_size: int
    augment: bool  # random flips and shifts on the device, as the template does for CIFAR-10

    @property
    def val_size(self) -> int:
        return self.train_size // 10  # "epochs include a 10% validation pass"

    @property
    def title(self) -> str:
        model = f"{self.model.upper()} width {self.hidden_dim}"
        return f"{self.shape_name} {self.train_size:,}, {model}, {self.precision}, batch {self.batch_size}"


SETTINGS = {
    "cnn": Setting("CIFAR-shaped", (3, 32, 32), 50_000, "cnn", 256, "bf16-mixed", 512, augment=True),
    "mlp": Setting("MNIST-shaped", (1, 28, 28), 60_000, "mlp", 128, "32-true", 128, augment=False),
}
# --small: the same code with sizes a CPU gets through in seconds.
SMALL = {"cnn": dict(train_size=512, hidden_dim=8, batch_size=64), "mlp": dict(train_size=2_048)}
NUM_CLASSES = 10
CLOCK = [time.perf_counter]  # --clock cpu: time.process_time


def synthetic_data(setting: Setting, seed: int) -> dict[str, tuple[Any, Any]]:
    """uint8 images and int64 labels, the same for both contestants (only speed is measured)."""
    generator = torch.Generator().manual_seed(seed)

    def split(n: int) -> tuple[Any, Any]:
        images = torch.randint(0, 256, (n, *setting.input_shape), dtype=torch.uint8, generator=generator)
        return images, torch.randint(0, NUM_CLASSES, (n,), generator=generator)

    return {"train": split(setting.train_size), "val": split(setting.val_size), "test": split(setting.val_size)}


def synchronize(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def hand_loop(setting: Setting, data: dict, device: torch.device, epochs: int, seed: int, compile: bool) -> list[float]:
    """Seconds per epoch of the loop one would write by hand: everything on the device, one host sync
    per epoch (the validation accuracy)."""
    torch.manual_seed(seed)
    channels_last = setting.model == "cnn" and device.type == "cuda"
    memory_format = torch.channels_last if channels_last else torch.contiguous_format
    channels = setting.input_shape[0]
    model = build_model(setting.model, setting.input_shape, NUM_CLASSES, (127.5,) * channels, (73.6,) * channels,
                        hidden_dim=setting.hidden_dim)  # fmt: skip
    model = model.to(device, memory_format=memory_format)
    if compile:
        model.compile()
    optimizer = torch.optim.Adam(model.parameters(), lr=1e-3)
    scheduler = torch.optim.lr_scheduler.CosineAnnealingLR(optimizer, T_max=epochs)
    train_x, train_y = (t.to(device) for t in data["train"])
    val_x, val_y = (t.to(device) for t in data["val"])
    bf16 = setting.precision.startswith("bf16")
    batch = setting.batch_size

    def inputs(images: torch.Tensor, augment: bool = False) -> torch.Tensor:
        images = (random_flip_and_translate(images) if augment else images).float()  # as the template does
        return images.contiguous(memory_format=memory_format)

    seconds = []
    for _ in range(epochs):
        synchronize(device)
        start = CLOCK[0]()
        model.train()
        order = torch.randperm(len(train_y), device=device)
        for i in range(0, len(order), batch):
            index = order[i : i + batch]
            images = inputs(train_x[index], setting.augment)
            with torch.autocast(device.type, dtype=torch.bfloat16, enabled=bf16):
                loss = F.cross_entropy(model(images), train_y[index])
            optimizer.zero_grad(set_to_none=True)
            loss.backward()
            optimizer.step()
        scheduler.step()
        model.eval()
        correct = torch.zeros((), dtype=torch.long, device=device)
        with torch.no_grad(), torch.autocast(device.type, dtype=torch.bfloat16, enabled=bf16):
            for i in range(0, len(val_y), batch):
                correct += (model(inputs(val_x[i : i + batch])).argmax(1) == val_y[i : i + batch]).sum()
        _ = correct.item() / len(val_y)
        synchronize(device)
        seconds.append(CLOCK[0]() - start)
    return seconds


def template_path(
    setting: Setting, data: dict, device: torch.device, epochs: int, seed: int, options: argparse.Namespace
) -> list[dict[str, float]]:
    """Per epoch, the template's seconds in all and in checkpoint writes and tracker calls, for run.py's
    own Solver and Trainer over an InMemoryData dataset."""

    class Synthetic(InMemoryData):
        input_shape = setting.input_shape
        output_names = [str(c) for c in range(NUM_CLASSES)]
        mean, std = (127.5,) * setting.input_shape[0], (73.6,) * setting.input_shape[0]
        augment = setting.augment

        def load(self) -> dict:
            return data

    with tempfile.TemporaryDirectory() as exp_dir:
        # The arguments a user would type; everything else is the template's default.
        argv = ["--model", setting.model, "--hidden-dim", str(setting.hidden_dim), "--precision", setting.precision,
                "--batch-size", str(setting.batch_size), "--max-epochs", str(epochs), "--seed", str(seed),
                "--accelerator", "gpu" if device.type == "cuda" else "cpu", "--devices", "1",
                "--data-on-device", options.data_on_device, "--exp-dir", exp_dir]  # fmt: skip
        argv += [flag for name in options.logger for flag in ("--logger", name)]
        argv += ["--compile"] if options.compile else []
        args = run.parse_args(argv)
        # As run.train_and_test builds them:
        pl.seed_everything(args.seed, workers=True, verbose=False)
        datamodule = Synthetic(**vars(args))
        solver = run.build_solver(args, datamodule)
        run_records = records.open_run(args, run.config_of(args), tracking.start(args), None, run.resolve_task(args))
        trainer = run.build_trainer(args, run_records)
        switch_off(options.without, trainer, solver)
        trainer.callbacks.extend(pl.Callback() for _ in range(EMPTY_CALLBACKS if options.with_empty_callbacks else 0))
        # Diagnostics only: add up the time spent in checkpoint writes and tracker calls.
        clock = EpochClock(device)
        trainer.save_checkpoint = clock.timing("checkpoints", trainer.save_checkpoint)
        for logger in trainer.loggers:
            logger.log_metrics = clock.timing("trackers", logger.log_metrics)
        trainer.callbacks.append(clock)
        trainer.fit(solver, datamodule=datamodule)
        run_records.close("finished")  # trackers finish their background writes inside the temporary folder
    return clock.epochs()


# What `--without` switches off in the template, to measure each part's cost (the callbacks by class name).
CALLBACKS_OF = {"progress-bar": {"ProgressBar"}, "checkpoints": {"ModelCheckpoint"},
                "lr-monitor": {"LearningRateMonitor"},
                "safety": {"FiniteLoss", "RandomState", "GracefulStop", "PreciseBatchNorm"}}  # fmt: skip
PARTS = (*CALLBACKS_OF, "train-metrics", "step-logging")
EMPTY_CALLBACKS = 20  # --with-empty-callbacks: what Lightning's per-step calls of a callback cost, hooks doing nothing


def switch_off(parts: list[str], trainer: pl.Trainer, solver: pl.LightningModule) -> None:
    names = set().union(*(CALLBACKS_OF.get(part, ()) for part in parts))
    trainer.callbacks[:] = [c for c in trainer.callbacks if type(c).__name__ not in names]
    if "train-metrics" in parts:  # the per-step updates of the training accuracy and mean loss
        solver.train_metric.update = solver.train_loss.update = lambda *_: None
    if "step-logging" in parts:  # no step is logged (the solver logs the loss on the loggers' steps only)
        trainer.log_every_n_steps = 1 << 62


class EpochClock(pl.Callback):
    """Wall time from the start of one training epoch to the start of the next (so validation, logging
    and checkpointing count), and from the last start to the end of training; with the time spent in
    the functions wrapped by `timing`, per epoch."""

    def __init__(self, device: torch.device) -> None:
        self.device = device
        self.spent = {"seconds": 0.0, "checkpoints": 0.0, "trackers": 0.0}
        self.marks: list[dict[str, float]] = []

    def timing(self, key: str, function: Any) -> Any:
        def timed(*args: Any, **kwargs: Any) -> Any:
            start = CLOCK[0]()
            try:
                return function(*args, **kwargs)
            finally:
                self.spent[key] += CLOCK[0]() - start

        return timed

    def _mark(self) -> None:
        synchronize(self.device)
        self.marks.append({**self.spent, "seconds": CLOCK[0]()})

    def on_train_epoch_start(self, trainer: pl.Trainer, pl_module: pl.LightningModule) -> None:
        self._mark()

    def on_train_end(self, trainer: pl.Trainer, pl_module: pl.LightningModule) -> None:
        self._mark()

    def epochs(self) -> list[dict[str, float]]:
        return [{k: b[k] - a[k] for k in a} for a, b in zip(self.marks, self.marks[1:], strict=False)]


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--device", choices=("cuda", "cpu"), default="cuda", help="cpu: exercise the code here")
    parser.add_argument("--small", action="store_true", help="tiny sizes (for --device cpu)")
    parser.add_argument("--settings", nargs="+", choices=tuple(SETTINGS), default=list(SETTINGS))
    parser.add_argument("--epochs", type=int, default=None, help="epochs per run, the first not timed (6; --small 3)")
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--compile", action="store_true", help="torch.compile the model on both sides")
    parser.add_argument("--logger", action="append", default=None, help="the template's tracker(s); default: its own")
    parser.add_argument("--data-on-device", choices=("auto", "yes", "no"), default="auto",
                        help="the template's data path (no: the standard DataLoader)")  # fmt: skip
    parser.add_argument(
        "--clock",
        choices=("wall", "cpu"),
        default="wall",
        help="cpu: this process's CPU seconds, steadier on a shared machine (--device cpu, one thread)",
    )
    parser.add_argument("--with-empty-callbacks", action="store_true", help=f"add {EMPTY_CALLBACKS} that do nothing")
    parser.add_argument("--without", action="append", choices=PARTS, default=[],
                        help="switch off this part of the template (repeatable), to measure what it costs")  # fmt: skip
    args = parser.parse_args(argv)
    args.epochs = args.epochs or (3 if args.small else 6)
    if args.epochs < 2:
        parser.error("--epochs must be at least 2 (one warm-up epoch, one timed)")
    if args.logger is None:
        args.logger = run.build_parser().get_default("logger")
    return args


def main(argv: list[str] | None = None) -> int:
    options = parse_args(argv)
    if options.device == "cuda" and not torch.cuda.is_available():
        print("no CUDA device: GPU part skipped (run on a machine with a GPU, or pass --device cpu --small)")
        return 0
    if options.clock == "cpu":
        CLOCK[0] = time.process_time
    console.quiet()  # as run.main: the table, not Lightning's banners
    device = torch.device(options.device)
    torch.backends.cudnn.benchmark = True  # both sides: the Trainer sets the same (run.build_trainer)
    machine = torch.cuda.get_device_name(device) if device.type == "cuda" else f"CPU ({platform.machine()})"
    print(
        f"# {machine}, torch {torch.__version__}, {options.epochs} epochs (first not timed), compile "
        f"{options.compile}, template loggers {options.logger}, data-on-device {options.data_on_device}, "
        f"without {options.without or 'nothing'}, {options.clock} clock"
    )
    rows = []
    for key in options.settings:
        setting = SETTINGS[key]
        if options.small:
            setting = replace(setting, **SMALL[key])
        data = synthetic_data(setting, options.seed)
        hand = hand_loop(setting, data, device, options.epochs, options.seed, options.compile)[1:]
        template = template_path(setting, data, device, options.epochs, options.seed, options)[1:]
        mean = {key: statistics.mean(epoch[key] for epoch in template) for key in template[0]}
        rows.append((setting, statistics.mean(hand), mean))
    print()
    print("Seconds per epoch: training plus a 10% validation pass; the first epoch (warm-up) not counted.")
    print("Template's checkpoint writes and tracker calls are included in its time and shown apart.\n")
    print("| setting | hand loop s/epoch | template s/epoch | of which checkpoints | of which trackers "
          "| hand samples/s | template samples/s | template/hand |")  # fmt: skip
    print("|---|---|---|---|---|---|---|---|")
    for setting, hand, template in rows:
        seconds = template["seconds"]
        row = [setting.title, f"{hand:.3f}", f"{seconds:.3f}", f"{template['checkpoints']:.3f}"]
        row += [f"{template['trackers']:.3f}", f"{setting.train_size / hand:,.0f}"]
        row += [f"{setting.train_size / seconds:,.0f}", f"{hand / seconds:.2f}x"]
        print("| " + " | ".join(row) + " |")
    return 0


if __name__ == "__main__":
    sys.exit(main())
