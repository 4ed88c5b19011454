"""Speed properties that can be checked without a stopwatch: both data paths train the same model,
evaluation holds no per-batch outputs, the step loss is logged only where it is written, no step waits
for the GPU (on a GPU), and the benchmarks run. The timings themselves live in benchmarks/RESULTS.md."""

from __future__ import annotations

import gc
import re
import subprocess
import sys
from pathlib import Path
from types import SimpleNamespace

import lightning.pytorch as pl
import pytest
import torch
from conftest import ROOT, cli_env, only_run_dir, register_cifar10_like, write_cifar10_like
from torch.utils.data import DistributedSampler

from project import run
from project.infra import console, records, tracking
from project.infra.batches import EpochBatches, InMemoryData
from project.infra.runs import CHECKPOINT_DIR, LAST


class Synthetic(InMemoryData):
    """Random uint8 images in memory, CIFAR-shaped but small; sizes chosen per test."""

    input_shape = (3, 8, 8)
    output_names = [str(c) for c in range(4)]
    mean, std = (127.5,) * 3, (73.6,) * 3

    def __init__(self, sizes: dict[str, int], augment: bool = False, **kwargs) -> None:
        super().__init__(**kwargs)
        self.sizes, self.augment = sizes, augment

    def load(self) -> dict:
        generator = torch.Generator().manual_seed(0)
        return {
            split: (
                torch.randint(0, 256, (n, *self.input_shape), dtype=torch.uint8, generator=generator),
                torch.randint(0, len(self.output_names), (n,), generator=generator),
            )
            for split, n in self.sizes.items()
        }


def template_parts(
    argv: list[str], sizes: dict[str, int], tmp_path: Path, augment: bool = False, real_records: bool = False
):
    """(args, datamodule, solver, trainer) as run.py builds them for the command-line flags `argv`, on
    Synthetic data of `sizes`. The Trainer logs to one StepLogger (trainer.loggers[0]) and keeps no
    checkpoints, unless `real_records`: then it has the run directory, trackers and checkpoints of a run."""
    args = run.parse_args([*argv, "--exp-dir", str(tmp_path)])
    task = run.resolve_task(args)
    pl.seed_everything(args.seed, workers=True, verbose=False)
    datamodule = Synthetic(sizes, augment=augment, **vars(args))
    solver = run.build_solver(args, datamodule)
    if real_records:
        run_records = records.open_run(args, run.config_of(args), tracking.start(args), None, task)
    else:
        run_records = SimpleNamespace(loggers=[StepLogger()], callbacks=[], directory=tmp_path,
                                      last_checkpoint=tmp_path / "last.ckpt")  # fmt: skip
    return args, datamodule, solver, run.build_trainer(args, run_records)


class StepLogger(pl.loggers.Logger):
    """Keeps what Lightning hands to the loggers: [(step, {name: value})]."""

    def __init__(self) -> None:
        super().__init__()
        self.records: list[tuple[int, dict]] = []

    name, version = "memory", "0"

    def log_metrics(self, metrics: dict, step: int | None = None) -> None:
        self.records.append((step, dict(metrics)))

    def log_hyperparams(self, params, *args, **kwargs) -> None:
        pass


@pytest.mark.slow
def test_device_resident_and_dataloader_paths_train_the_same_weights(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """Same seed, same batches, same augmentation draws: the in-memory path (tensors batched by index)
    and the standard DataLoader path (`--data-on-device no`, a worker process) end with the same weights."""
    register_cifar10_like(monkeypatch, write_cifar10_like(tmp_path / "data", per_batch=20, n_test=16))
    weights = {}
    for path, workers in (("auto", "0"), ("no", "1")):
        exp_dir = tmp_path / path
        flags = ["--dataset", "cifar10", "--data-dir", str(tmp_path / "data"), "--model", "cnn", "--hidden-dim", "8"]
        flags += ["--batch-size", "16", "--max-epochs", "2", "--logger", "none", "--accelerator", "cpu"]
        flags += ["--data-on-device", path, "--num-workers", workers, "--exp-dir", str(exp_dir)]
        assert run.main(flags) == 0
        checkpoint = only_run_dir(exp_dir) / CHECKPOINT_DIR / LAST
        weights[path] = torch.load(checkpoint, map_location="cpu", weights_only=True)["state_dict"]
    assert weights["auto"].keys() == weights["no"].keys()
    for name, value in weights["auto"].items():
        torch.testing.assert_close(value, weights["no"][name], msg=f"{name} differs between the data paths")


@pytest.mark.parametrize("num_samples, world_size", [(19, 2), (20, 3), (2, 3), (2, 5)])
def test_training_shards_are_the_indices_distributed_sampler_gives(num_samples: int, world_size: int) -> None:
    """The in-memory path shuffles and shards on its own, exactly as DistributedSampler would (same
    permutation per seed and epoch, same padding, same rank slicing), so DDP runs see the same data."""
    for epoch in (0, 3):
        for rank in range(world_size):
            sampler = DistributedSampler(range(num_samples), world_size, rank, shuffle=True, seed=7)
            sampler.set_epoch(epoch)
            plan = EpochBatches(num_samples, 4, shuffle=True, seed=7, rank=rank, world_size=world_size)
            assert plan.shard(epoch).tolist() == list(sampler)


class StepLosses(pl.Callback):
    """The training loss of every step, by global step (0-based), as the step returned it."""

    def __init__(self) -> None:
        self.losses: dict[int, float] = {}

    def on_train_batch_end(self, trainer: pl.Trainer, pl_module, outputs, batch, batch_idx: int) -> None:
        self.losses[trainer.global_step - 1] = float(outputs["loss"])


def test_step_loss_is_logged_with_its_own_value_on_the_steps_lightning_writes(tmp_path: Path) -> None:
    """The Solver calls `self.log` for the step loss only on the steps whose values Lightning hands to
    the loggers: each of those steps must get the loss of that very step, and no step is left out."""
    flags = ["--model", "mlp", "--hidden-dim", "8", "--batch-size", "2", "--max-epochs", "2", "--accelerator", "cpu"]
    _, datamodule, solver, trainer = template_parts(flags, {"train": 110, "val": 4, "test": 4}, tmp_path)
    recorder = StepLosses()
    trainer.callbacks.append(recorder)
    trainer.fit(solver, datamodule=datamodule)

    every = trainer.log_every_n_steps
    assert trainer.global_step >= 2 * every, "the run is too short to show two written steps"
    written = {step: m["train/loss_step"] for step, m in trainer.loggers[0].records if "train/loss_step" in m}
    assert sorted(written) == [s for s in range(trainer.global_step) if (s + 1) % every == 0]
    for step, value in written.items():
        assert value == pytest.approx(recorder.losses[step]), f"step {step} logged another step's loss"


def test_the_progress_bar_redraws_by_time_and_always_at_a_splits_last_batch(monkeypatch: pytest.MonkeyPatch) -> None:
    """A redraw costs about as much as a fast GPU step: in a 50-step burst the bar draws the first and the last
    batch only; once REDRAW_SECONDS have passed it draws again."""
    bar, now, split = console.ProgressBar(), [100.0], SimpleNamespace(total=50)
    monkeypatch.setattr(console.time, "monotonic", lambda: now[0])
    assert [i for i in range(50) if bar.due(i, split)] == [0, 49]
    now[0] += bar.REDRAW_SECONDS
    assert bar.due(10, split) and not bar.due(11, split)


class LiveTensorBytes(pl.Callback):
    """Bytes held by live CPU tensors (distinct storages) at the end of the evaluation batches `at`
    (a scan of every Python object: too slow to run after each batch)."""

    def __init__(self, at: tuple[int, ...]) -> None:
        self.at, self.after_batch = at, {}

    def on_validation_batch_end(self, trainer: pl.Trainer, pl_module, outputs, batch, batch_idx: int) -> None:
        if batch_idx not in self.at:
            return
        gc.collect()
        storages = {}
        for obj in gc.get_objects():
            if isinstance(obj, torch.Tensor) and obj.device.type == "cpu":
                try:
                    storage = obj.untyped_storage()
                    storages[storage.data_ptr()] = storage.nbytes()
                except RuntimeError:  # a FakeTensor that torch.export (an earlier test's export) left: no memory
                    continue
        self.after_batch[batch_idx] = sum(storages.values())


@pytest.mark.slow
def test_evaluation_memory_does_not_grow_with_the_number_of_batches(tmp_path: Path) -> None:
    """Evaluation keeps a confusion matrix, not the outputs of every batch: after the first batches the
    live tensors are the same size whether the loop has run 2 batches or 12."""
    flags = ["--model", "cnn", "--hidden-dim", "8", "--batch-size", "16", "--accelerator", "cpu"]
    _, datamodule, solver, trainer = template_parts(flags, {"train": 16, "val": 12 * 16, "test": 16}, tmp_path)
    meter = LiveTensorBytes(at=(1, 11))
    trainer.callbacks.append(meter)
    trainer.validate(solver, datamodule=datamodule, verbose=False)

    assert meter.after_batch[11] == meter.after_batch[1], f"live tensor bytes grew: {meter.after_batch}"


class FailOnHostSync(pl.Callback):
    """CUDA's sync debug mode set to "error" through every training and validation epoch, so that any
    operation that makes the host wait for the GPU raises. Waits are allowed only where intended:
    at epoch ends (metrics computed and logged, checkpoints written) and after the steps whose loss
    the loggers write (every `log_every_n_steps`)."""

    def _strict(self, *_args, **_kwargs) -> None:
        torch.cuda.set_sync_debug_mode("error")

    def _lenient(self, *_args, **_kwargs) -> None:
        torch.cuda.set_sync_debug_mode("default")

    on_train_epoch_start = on_train_batch_start = on_validation_epoch_start = _strict
    on_train_epoch_end = on_validation_epoch_end = teardown = _lenient

    def on_train_batch_end(self, trainer: pl.Trainer, *_args) -> None:
        if trainer.global_step % trainer.log_every_n_steps == 0:
            self._lenient()


@pytest.mark.gpu
@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA device")
def test_training_and_validation_steps_never_wait_for_the_gpu(tmp_path: Path) -> None:
    """Two epochs of the real setup on a GPU (data on the device, augmentation, bf16, channels_last, the
    default tracker, checkpoints, progress bar) with sync debug mode on: no step waits for the GPU."""
    flags = ["--model", "cnn", "--hidden-dim", "16", "--precision", "bf16-mixed", "--batch-size", "8"]
    flags += ["--max-epochs", "2", "--accelerator", "gpu", "--devices", "1"]
    sizes = {"train": 8 * 60, "val": 8 * 4, "test": 8}
    _, datamodule, solver, trainer = template_parts(flags, sizes, tmp_path, augment=True, real_records=True)
    trainer.callbacks.append(FailOnHostSync())
    try:
        trainer.fit(solver, datamodule=datamodule)
    finally:
        torch.cuda.set_sync_debug_mode("default")
        for callback in trainer.callbacks:
            if isinstance(callback, records.Run):
                callback.close("finished")
    assert trainer.global_step == 120 and trainer.global_step > 2 * trainer.log_every_n_steps
    assert datamodule.splits["train"][0].is_cuda, "the in-memory data should sit on the GPU"


def run_gpu_benchmark(*flags: str) -> subprocess.CompletedProcess:
    # One OpenMP thread: on a busy 2-core machine a second one mostly waits for the first.
    return subprocess.run(
        [sys.executable, "benchmarks/gpu_benchmark.py", *flags],
        cwd=ROOT,
        env=cli_env(OMP_NUM_THREADS="1"),
        capture_output=True,
        text=True,
        timeout=600,
    )


@pytest.mark.slow
def test_gpu_benchmark_runs_end_to_end_on_the_cpu() -> None:
    """The benchmark's own code path (hand loop, then the template through run.py, default tracker
    included) for both settings, shrunk to run on a CPU; it prints one table row per setting."""
    done = run_gpu_benchmark("--device", "cpu", "--small", "--epochs", "2")
    assert done.returncode == 0, done.stderr[-3000:]
    rows = [line for line in done.stdout.splitlines() if re.match(r"\| (CIFAR|MNIST)-shaped", line)]
    assert len(rows) == 2, done.stdout[-3000:]
    for row in rows:
        cells = [cell.strip() for cell in row.strip(" |").split("|")]
        hand, template = float(cells[1]), float(cells[2])  # seconds per epoch
        assert 0 <= float(cells[3]) + float(cells[4]) <= template  # checkpoints and trackers are part of it
        # The ratio is of these two times; the cells are rounded to 0.001 s and the ratio to 0.01.
        lowest, highest = (hand - 0.0005) / (template + 0.0005), (hand + 0.0005) / (template - 0.0005)
        assert lowest - 0.005 <= float(cells[-1].rstrip("x")) <= highest + 0.005


@pytest.mark.slow
@pytest.mark.skipif(torch.cuda.is_available(), reason="this machine has a CUDA device")
def test_gpu_benchmark_without_cuda_says_so_and_exits_cleanly() -> None:
    done = run_gpu_benchmark()
    assert done.returncode == 0, done.stderr[-3000:]
    assert "no CUDA device: GPU part skipped" in done.stdout
    assert "Traceback" not in done.stderr


@pytest.mark.slow
def test_a_run_imports_only_the_trackers_it_uses(tmp_path: Path) -> None:
    """Start-up time: a run that logs to CSV never imports MLflow, TensorBoard, W&B or Neptune."""
    trackers = ("mlflow", "tensorboard", "tensorboardX", "wandb", "neptune")
    flags = ["--fast-dev-run", "--model", "mlp", "--logger", "csv", "--exp-dir", str(tmp_path)]
    code = (
        "import sys; from project.run import main; code = main(sys.argv[1:]); "
        f"print('imported:', sorted(m for m in sys.modules if m.split('.')[0] in {trackers!r})); sys.exit(code)"
    )
    done = subprocess.run(
        [sys.executable, "-c", code, *flags], cwd=ROOT, env=cli_env(), capture_output=True, text=True, timeout=300
    )
    assert done.returncode == 0, done.stderr[-3000:]
    assert "imported: []" in done.stdout, done.stdout[-500:]
