"""Shared test helpers: run the real CLI in a subprocess, and write tiny datasets in their real formats."""

from __future__ import annotations

import os
import pickle
import struct
import subprocess
import sys
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import pytest

ROOT = Path(__file__).resolve().parent.parent


@dataclass
class CliResult:
    returncode: int
    stdout: str
    stderr: str


def cli_env(**extra: str) -> dict[str, str]:
    """The environment for a CLI subprocess: this checkout first on the path, quiet, offline."""
    env = {k: v for k, v in os.environ.items() if not k.startswith(("MLFLOW_", "WANDB_"))}
    env["PYTHONPATH"] = str(ROOT) + os.pathsep + env.get("PYTHONPATH", "")
    env["PYTHONUNBUFFERED"] = "1"
    env.update(extra)
    return env


def run_cli(*args: str, module: str = "project.run", timeout: float = 300, env: dict | None = None) -> CliResult:
    """`python -m project.run ARGS` in a subprocess, as a user would run it."""
    completed = subprocess.run(
        [sys.executable, "-m", module, *args],
        capture_output=True,
        text=True,
        timeout=timeout,
        cwd=ROOT,
        env=env or cli_env(),
    )
    return CliResult(completed.returncode, completed.stdout, completed.stderr)


def only_run_dir(exp_dir: Path, exp_name: str = "debug") -> Path:
    runs = [p for p in (exp_dir / exp_name).iterdir() if p.is_dir()]
    assert len(runs) == 1, runs
    return runs[0]


def write_idx(path: Path, array: np.ndarray) -> None:
    """An IDX file (MNIST's format): magic with the dtype code and rank, big-endian sizes, raw bytes."""
    assert array.dtype == np.uint8
    path.parent.mkdir(parents=True, exist_ok=True)
    header = struct.pack(">BBBB", 0, 0, 0x08, array.ndim) + struct.pack(f">{array.ndim}I", *array.shape)
    path.write_bytes(header + array.tobytes())


def write_mnist_like(root: Path, folder: str, n_train: int = 60, n_test: int = 20, seed: int = 0) -> None:
    """Tiny MNIST/Fashion-MNIST files where torchvision looks for them: <root>/<folder>/raw/."""
    rng = np.random.default_rng(seed)
    raw = root / folder / "raw"
    for prefix, n in (("train", n_train), ("t10k", n_test)):
        write_idx(raw / f"{prefix}-images-idx3-ubyte", rng.integers(0, 256, (n, 28, 28), dtype=np.uint8))
        write_idx(raw / f"{prefix}-labels-idx1-ubyte", (np.arange(n) % 10).astype(np.uint8))


def write_cifar10_like(root: Path, per_batch: int = 20, n_test: int = 20, seed: int = 0) -> None:
    """Tiny CIFAR-10 python batches in <root>/cifar-10-batches-py/: pickled dicts of uint8 rows (the
    official files are Python 2 pickles whose keys load as str under encoding="latin1", as here)."""
    rng = np.random.default_rng(seed)
    folder = root / "cifar-10-batches-py"
    folder.mkdir(parents=True, exist_ok=True)

    def batch(n: int) -> dict:
        return {"data": rng.integers(0, 256, (n, 3072), dtype=np.uint8), "labels": [i % 10 for i in range(n)]}

    for i in range(1, 6):
        (folder / f"data_batch_{i}").write_bytes(pickle.dumps(batch(per_batch)))
    (folder / "test_batch").write_bytes(pickle.dumps(batch(n_test)))
    names = ["airplane", "automobile", "bird", "cat", "deer", "dog", "frog", "horse", "ship", "truck"]
    (folder / "batches.meta").write_bytes(pickle.dumps({"label_names": names}))


def write_image_folder(root: Path, classes: tuple[str, ...] = ("cat", "dog"), per_class: int = 10, size: int = 12):
    """PNG files, one sub-folder per class."""
    from PIL import Image

    rng = np.random.default_rng(0)
    for c, name in enumerate(classes):
        (root / name).mkdir(parents=True, exist_ok=True)
        for i in range(per_class):
            pixels = rng.integers(0, 256, (size, size, 3), dtype=np.uint8)
            pixels[..., c % 3] = 255  # a learnable colour cue per class
            Image.fromarray(pixels).save(root / name / f"{i}.png")


@pytest.fixture
def exp_dir(tmp_path: Path) -> Path:
    return tmp_path / "experiments"
