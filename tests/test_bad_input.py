"""Every mistake a careless or hostile user would try, as a table of real command lines: one clear line on stderr,
a non-zero exit, no traceback, no program smuggled in a file ever run, and every finished run (its files and the
MLflow store beside it) byte for byte as it was."""

from __future__ import annotations

import fcntl
import json
import os
import pickle
import re
import shlex
import shutil
import sqlite3
from collections.abc import Callable
from pathlib import Path

import numpy as np
import pytest
from conftest import Payload, file_digests, only_run_dir, run_cli, write_image_folder, write_mnist_like

# Short runs; the finished run below uses the default tracker, so its MLflow store is part of what must not change.
QUICK = ("--num-workers", "0", "--max-epochs", "1", "--model", "mlp", "--hidden-dim", "16")

pytestmark = pytest.mark.slow
SECRET = "Hunter2secret"  # typed into some cases below: no case may print it
NOT_UTF8 = os.fsdecode(b"caf\xe9")  # a name in Latin-1, as the file system gives it
TOO_LONG = "L" * 256  # a byte over what a name may be


@pytest.fixture(scope="module")
def trained(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """An exp-dir with one finished run (2 epochs, MLflow) whose bytes every case must leave as they were."""
    exp_dir = tmp_path_factory.mktemp("experiments")
    result = run_cli("--exp-dir", str(exp_dir), "--exp-name", "good", *QUICK, "--max-epochs", "2")
    assert result.returncode == 0, result.stderr
    return exp_dir


def hostile_checkpoint(tmp: Path) -> Path:
    import torch

    path = tmp / "evil.ckpt"
    torch.save(
        {"state_dict": {}, "hyper_parameters": {"model": "mlp"}, "callbacks": {"x": Payload(tmp / "pwned")}}, path
    )
    return path


def copy_of_run(exp_dir: Path, tmp: Path, edit: Callable[[Path], None]) -> tuple[Path, list[str]]:
    """A copy of the finished run in an exp-dir of its own, edited by `edit`: (the copied run, --resume argv). That
    exp-dir may gain an MLflow store (opened while the command starts); the run's own files may not change."""
    copy = tmp / "copy" / "good" / only_run_dir(exp_dir, "good").name
    shutil.copytree(only_run_dir(exp_dir, "good"), copy)
    edit(copy)
    return copy, ["--resume", "--exp-dir", str(tmp / "copy"), "--exp-name", "good"]


# case: (class, words the one error line must contain)
CASES = {
    # 1. No data file, checkpoint or cache is ever unpickled beyond plain arrays.
    "checkpoint with a pickle payload (--only-test)": ("code", "holds Python objects beyond tensors"),
    "checkpoint with a pickle payload (--resume)": ("code", "holds Python objects beyond tensors"),
    "checkpoint with a pickle payload (predict)": ("code", "holds Python objects beyond tensors"),
    "checkpoint with a pickle payload (export)": ("code", "holds Python objects beyond tensors"),
    "cifar10 batch with a pickle payload": ("code", "checksums"),
    "npy of pickled objects (predict)": ("code", "not a readable .npy array"),
    # 3. A failed or mistaken command changes no finished run.
    "resume below the epochs trained": ("unchanged", "has already trained 2 epochs; pass --max-epochs above 2"),
    "resume to another accelerator that is not there": ("unchanged", "--accelerator tpu"),
    "resume onto more devices than there are": ("unchanged", "--devices 512"),
    "resume with another seed": ("unchanged", "--seed 1 (the run's: 0)"),
    "resume with another batch size": ("unchanged", "--batch-size 32 (the run's: 128)"),
    "resume with another learning rate": ("unchanged", "--learning-rate 0.5 (the run's: 0.001)"),
    "resume with a config file": ("unchanged", "uses the run's own config.yaml"),
    "resume a run whose config.yaml is a list": ("unchanged", "must hold a mapping"),
    "resume a run whose manifest.json is broken": ("unchanged", "is not a run's manifest"),
    "resume a run whose manifest.json has odd parts": ("unchanged", "is not a run's manifest"),
    "resume a run whose config.yaml is empty": ("unchanged", "holds no options; restore the run's config.yaml"),
    "resume a run whose data splits otherwise now": ("unchanged", "its data would split otherwise now (train 1000 ->"),
    "test a run whose data splits otherwise now": ("unchanged", "its data would split otherwise now (train 1000 ->"),
    "resume a run another process holds": ("unchanged", "is in use by pid 4242 on elsewhere since"),
    "resume as a fast dev run": ("unchanged", "--fast-dev-run: a smoke test does not continue a run"),
    "resume with a strategy Lightning refuses": (
        "unchanged",
        "--strategy fsdp --precision 32-true: The strategy `fsdp` requires",
    ),
    "test with a strategy Lightning refuses": (
        "unchanged",
        "--strategy fsdp --precision 32-true: The strategy `fsdp` requires",
    ),
    "new run with a strategy Lightning refuses": (
        "unchanged",
        "--strategy fsdp --precision 32-true: The strategy `fsdp` requires",
    ),
    "resume with nothing to resume": ("unchanged", "no checkpoint found"),
    "test on another split": ("unchanged", "--seed 5 (the run's: 0): a run's checkpoint is tested on its own test"),
    "test a run's checkpoint on another dataset": ("unchanged", "a run's checkpoint is tested on its own test split"),
    "test a checkpoint file of another dataset": ("unchanged", "was trained on inputs"),
    "test a checkpoint file on another split": ("unchanged", "trained on the split of --seed 0 (not 5)"),
    "resume a checkpoint file on another split": ("unchanged", "trained on the split of --val-fraction 0.1 (not 0.2)"),
    "only-test with nothing trained": ("unchanged", "no checkpoint found"),
    # 7. Image folders read the way a person sees them, problems named before training.
    "image folder missing": ("images", "is not a folder"),
    "image folder empty": ("images", "class folder"),
    "image folder with one class": ("images", "at least 2"),
    "image folder with an unreadable image": ("images", "corrupt.png"),
    "image folder with a truncated jpeg": ("images", "truncated.jpg"),
    "image folder too small to split": ("images", "too few to split"),
    # 8. One line, not a traceback.
    "monitor that is never logged": ("one line", "--monitor"),
    "seed beyond 32 bits": ("one line", "--seed"),
    "config that is not UTF-8": ("one line", "not UTF-8"),
    "config malformed": ("one line", "not valid YAML"),
    "config with an unknown key": ("one line", "unknown option 'max_epoch'"),
    "config missing": ("one line", "cannot read"),
    "config that is a FIFO": ("one line", "a pipe that nothing writes to"),  # opening it waited for good
    "exp-dir of a user this machine does not know": ("one line", "--exp-dir"),
    "exp-name of a file in exp-dir": ("unchanged", "mlflow.db is a file, not a folder of runs"),
    "sweep of fast dev runs": ("one line", "--fast-dev-run: a sweep's trials are whole runs"),
    "exp-dir behind a file": ("one line", "--exp-dir"),
    "export into a path under a file": ("one line", "cannot write"),
    "predict pixels that are NaN": ("one line", "holds NaN or infinite values"),
    "predict into a path under a file": ("one line", "cannot write"),
    "predict pixels beyond float32": ("one line", "holds NaN or infinite values (in float32)"),
    "predict an empty array": ("one line", "holds no inputs"),
    "predict a decompression bomb": ("one line", "cannot read image"),
    "predict from an MLflow run without its store": ("one line", "no MLflow store at"),
    "predict from a checkpoint with odd values": ("one line", "does not fit this project's models"),
    "learning rate beyond float32": ("one line", "--learning-rate"),
    "image size below what augmentation shifts": ("one line", "--image-size"),
    "exp-dir empty": ("one line", "--exp-dir"),
    "val fraction leaving nothing to train": ("one line", "--val-fraction 0.95: a tenth of the data is the test"),
    "sweep storage in memory": ("one line", "SQLite in memory keeps nothing"),
    "sweep storage of another application": ("unchanged", "holds tables of another application (alembic_version"),
    "gpu requested, none present": ("one line", "GPU"),
    "unknown strategy": ("one line", "strategy"),
    "dataset files missing": ("one line", "no usable files"),
    "checkpoint missing": ("one line", "does not exist"),
    "checkpoint empty": ("one line", "is empty"),
    "checkpoint not a checkpoint": ("one line", "not a valid checkpoint"),
    "checkpoint truncated": ("one line", "not a valid checkpoint"),
    "exp-name climbing out": ("one line", "--exp-name"),
    "learning rate zero": ("one line", "--learning-rate"),
    "epochs not a number": ("one line", "--max-epochs"),
    # 3. Paths: any the file system takes works (test_odd_paths_work_and_are_where_the_summary_says) or is one line.
    "exp-dir not UTF-8": ("paths", "--exp-dir: not text in this locale's encoding"),
    "data-dir not UTF-8": ("paths", "--data-dir: not text in this locale's encoding"),
    "exp-dir with a name too long": ("paths", "cannot create a run directory"),
    "sweep storage not UTF-8": ("paths", "--storage: not text in this locale's encoding"),
    "sweep exp-dir behind a file": ("paths", "Not a directory"),
    "sweep exp-dir with a name too long": ("paths", "File name too long"),
    "predict output not UTF-8": ("paths", "--output: not text in this locale's encoding"),
    "predict output with a name too long": ("paths", "cannot write"),
    "export output not UTF-8": ("paths", "--output: not text in this locale's encoding"),
    # 5. Secrets: a line that quotes what was typed quotes no secret (every case is checked for SECRET).
    "checkpoint missing, its folder named with a password": ("secrets", "does not exist"),
    "sweep storage refusing, its URL with a password": (
        "secrets",
        "cannot open --storage postgresql://bob:[redacted]@",
    ),
    "learning rate that is a token": (
        "secrets",
        "--learning-rate: invalid learning rate (a positive number below 3.4e37) value: 'token=[redacted]'",
    ),
    # 7. Concurrency: a second command on what another one is writing waits or is one line.
    "sweep of a SQLite study another sweep runs": ("concurrency", "study s is being run by another sweep"),
}


def prepare(case: str, tmp: Path, exp_dir: Path) -> tuple[str, list[str], Path]:
    """(module, argv, the folder whose bytes must not change) for one case, after writing what it needs."""
    module, guarded = "project.run", exp_dir
    good = ["--exp-dir", str(exp_dir), "--exp-name", "good"]  # for the cases about the finished run
    fresh = ["--exp-dir", str(tmp / "fresh")]  # the others: a case that wrongly succeeded would not touch it
    last = only_run_dir(exp_dir, "good") / "checkpoints" / "last.ckpt"
    best = next((only_run_dir(exp_dir, "good") / "checkpoints").glob("best-*.ckpt"))
    if case.startswith("checkpoint with a pickle payload"):
        evil = str(hostile_checkpoint(tmp))
        module = {"predict": "project.predict", "export": "project.export"}.get(case.split("(")[1][:-1], module)
        argv = {"--only-test": ["--only-test", "--checkpoint", evil, *fresh], "--resume": ["--resume", evil, *fresh],
                "predict": ["--checkpoint", evil, str(tmp / "x.npy")], "export": ["--checkpoint", evil]}  # fmt: skip
        np.save(tmp / "x.npy", np.zeros((1, 1, 8, 8), dtype=np.uint8))
        return module, argv[case.split("(")[1][:-1]], guarded
    if case == "cifar10 batch with a pickle payload":
        folder = tmp / "data" / "cifar-10-batches-py"
        folder.mkdir(parents=True)
        for name in [*(f"data_batch_{i}" for i in range(1, 6)), "test_batch", "batches.meta"]:
            (folder / name).write_bytes(pickle.dumps({"data": Payload(tmp / "pwned"), "labels": [0]}))
        return module, ["--dataset", "cifar10", "--data-dir", str(tmp / "data"), *fresh], guarded
    if case == "npy of pickled objects (predict)":
        np.save(tmp / "evil.npy", np.array([Payload(tmp / "pwned")], dtype=object), allow_pickle=True)
        return "project.predict", ["--checkpoint", str(best), str(tmp / "evil.npy")], guarded
    resume = ["--resume", *good]
    simple = {
        "resume below the epochs trained": [*resume, "--max-epochs", "1"],
        "resume to another accelerator that is not there": [*resume, "--max-epochs", "3", "--accelerator", "tpu"],
        "resume onto more devices than there are": [*resume, "--accelerator", "cpu", "--devices", "512"],
        "resume with another seed": [*resume, "--max-epochs", "3", "--seed", "1"],
        "resume with another batch size": [*resume, "--max-epochs", "3", "--batch-size", "32"],
        "resume with another learning rate": [*resume, "--max-epochs", "3", "--learning-rate", "0.5"],
        "resume as a fast dev run": [*resume, "--max-epochs", "3", "--fast-dev-run"],
        # Lightning refuses these when the Trainer is built: no new run directory, no tracker run, no lock touched.
        "resume with a strategy Lightning refuses": [
            *resume,
            "--max-epochs",
            "3",
            "--strategy",
            "fsdp",
            "--accelerator",
            "cpu",
        ],
        "test with a strategy Lightning refuses": ["--only-test", *good, "--strategy", "fsdp", "--accelerator", "cpu"],
        "new run with a strategy Lightning refuses": [*good, "--strategy", "fsdp", "--accelerator", "cpu"],
        "resume with nothing to resume": ["--resume", "--exp-dir", str(exp_dir), "--exp-name", "never-ran"],
        "test on another split": ["--only-test", *good, "--seed", "5"],
        "only-test with nothing trained": ["--only-test", "--exp-dir", str(exp_dir), "--exp-name", "never-ran"],
        "monitor that is never logged": [*fresh, "--monitor", "val/typo"],
        "seed beyond 32 bits": [*fresh, "--seed", "4294967296"],
        "exp-dir behind a file": ["--exp-dir", str(tmp / "a-file" / "experiments")],
        "gpu requested, none present": [*fresh, "--gpus", "1"],
        "unknown strategy": [*fresh, "--strategy", "warp-drive"],
        "dataset files missing": [*fresh, "--dataset", "cifar10", "--data-dir", str(tmp / "no-data")],
        "checkpoint missing": ["--only-test", "--checkpoint", str(tmp / "nope.ckpt"), *fresh],
        "exp-name climbing out": ["--exp-dir", str(exp_dir), "--exp-name", "../escape"],
        "learning rate zero": [*fresh, "--learning-rate", "0"],
        "learning rate beyond float32": [*fresh, "--learning-rate", "1e308"],
        "image size below what augmentation shifts": [*fresh, "--image-size", "4"],
        "exp-dir empty": ["--exp-dir", ""],
        "exp-dir of a user this machine does not know": ["--exp-dir", "~no-such-user-here/x"],
        "exp-name of a file in exp-dir": ["--exp-dir", str(exp_dir), "--exp-name", "mlflow.db", "--max-epochs", "1"],
        "val fraction leaving nothing to train": [*fresh, "--val-fraction", "0.95"],
        "epochs not a number": [*fresh, "--max-epochs", "ten"],
        "image folder missing": [*fresh, "--dataset", "image-folder", "--data-dir", str(tmp / "no-pets")],
    }
    (tmp / "a-file").write_text("in the way")
    np.save(tmp / "x.npy", np.zeros((2, 1, 8, 8), dtype=np.uint8))
    sweep, predict = ["--study", "s", "--n-trials", "1"], ["--checkpoint", str(best), str(tmp / "x.npy")]
    other = {  # module, argv
        "exp-dir not UTF-8": ("project.run", ["--exp-dir", str(tmp / NOT_UTF8)]),
        "data-dir not UTF-8": ("project.run", [*fresh, "--data-dir", str(tmp / NOT_UTF8)]),
        "exp-dir with a name too long": ("project.run", ["--exp-dir", str(tmp / TOO_LONG), *QUICK]),
        "sweep storage not UTF-8": ("project.sweep", [*sweep, "--storage", f"sqlite:///{tmp / NOT_UTF8}/o.db"]),
        "sweep exp-dir behind a file": ("project.sweep", [*sweep, "--exp-dir", str(tmp / "a-file" / "x")]),
        "sweep exp-dir with a name too long": ("project.sweep", [*sweep, "--exp-dir", str(tmp / TOO_LONG)]),
        "predict output not UTF-8": ("project.predict", [*predict, "--output", str(tmp / NOT_UTF8)]),
        "predict output with a name too long": ("project.predict", [*predict, "--output", str(tmp / TOO_LONG)]),
        "export output not UTF-8": ("project.export", ["--checkpoint", str(best), "--output", str(tmp / NOT_UTF8)]),
        "checkpoint missing, its folder named with a password": (
            "project.predict",
            ["--checkpoint", str(tmp / f"password={SECRET}" / "m.ckpt"), str(tmp / "x.npy")],
        ),
        "sweep storage refusing, its URL with a password": (
            "project.sweep",
            [*sweep, "--storage", f"postgresql://bob:{SECRET}@127.0.0.1:1/db", *fresh],
        ),
        "learning rate that is a token": ("project.run", [*fresh, "--learning-rate", f"token={SECRET}"]),
        "sweep of a SQLite study another sweep runs": ("project.sweep", [*sweep, *fresh, *QUICK]),
        "sweep storage in memory": ("project.sweep", [*sweep, *fresh, "--storage", "sqlite://"]),
        "sweep of fast dev runs": ("project.sweep", [*sweep, *fresh, "--fast-dev-run"]),
        "sweep storage of another application": (
            "project.sweep",
            [*sweep, *fresh, "--storage", f"sqlite:///{exp_dir / 'mlflow.db'}"],
        ),  # fmt: skip
        "predict from an MLflow run without its store": (
            "project.predict",
            ["--checkpoint", "runs:/0123/model", *fresh, str(tmp / "x.npy")],
        ),  # fmt: skip
    }
    if case == "sweep of a SQLite study another sweep runs":  # held as a running sweep holds it
        (tmp / "fresh").mkdir()
        HELD.append(open(tmp / "fresh" / "optuna.db.s.lock", "a"))  # noqa: SIM115 (held until the case ends)
        fcntl.flock(HELD[-1], fcntl.LOCK_EX)
    if case in other:
        return *other[case], guarded
    if case in simple:
        return module, [*simple[case], *QUICK[:2]], guarded
    if case == "resume with a config file":
        (tmp / "c.yaml").write_text("max_epochs: 3\n")
        return module, [*resume, "--config", str(tmp / "c.yaml")], guarded
    if case == "resume a run whose config.yaml is a list":
        copy, argv = copy_of_run(exp_dir, tmp, lambda run: (run / "config.yaml").write_text("- max_epochs: 3\n"))
        return module, [*argv, "--max-epochs", "3"], copy
    if case == "resume a run whose manifest.json is broken":
        copy, argv = copy_of_run(exp_dir, tmp, lambda run: (run / "manifest.json").write_text("[1, 2"))
        return module, [*argv, "--max-epochs", "3"], copy
    if case == "resume a run whose manifest.json has odd parts":  # each refused (tests/test_sync.py); one here

        def edit(run: Path) -> None:
            manifest = json.loads((run / "manifest.json").read_text())
            (run / "manifest.json").write_text(json.dumps({**manifest, "resumed": 5}))

        copy, argv = copy_of_run(exp_dir, tmp, edit)
        return module, [*argv, "--max-epochs", "3"], copy
    if case.endswith("whose data splits otherwise now"):  # as a run an earlier release split otherwise

        def split_otherwise(run: Path) -> None:
            manifest = json.loads((run / "manifest.json").read_text())
            manifest["data"]["split_sizes"]["train"] = 1000
            (run / "manifest.json").write_text(json.dumps(manifest))

        copy, argv = copy_of_run(exp_dir, tmp, split_otherwise)
        return module, [*argv, "--max-epochs", "3"] if "resume" in case else ["--only-test", *argv[1:]], copy
    if case == "resume a run whose config.yaml is empty":
        copy, argv = copy_of_run(exp_dir, tmp, lambda run: (run / "config.yaml").write_text("# emptied\n"))
        return module, [*argv, "--max-epochs", "3"], copy
    if case in ("predict pixels beyond float32", "predict an empty array", "predict a decompression bomb"):
        source = tmp / ("bomb.png" if "bomb" in case else "inputs.npy")
        if "bomb" in case:  # 225 million pixels in a 27 kB file
            from PIL import Image

            Image.MAX_IMAGE_PIXELS, limit = None, Image.MAX_IMAGE_PIXELS
            Image.new("1", (15000, 15000)).save(source)
            Image.MAX_IMAGE_PIXELS = limit
        else:
            np.save(source, np.full((2, 1, 8, 8), 1e300) if "float32" in case else np.zeros((0, 8, 8)))
        return "project.predict", ["--checkpoint", str(best), str(source), "--output", str(tmp / "p.csv")], guarded
    if case == "predict from a checkpoint with odd values":
        import torch

        checkpoint = torch.load(best, weights_only=True)
        checkpoint["hyper_parameters"]["pixel_max"] = "abc"
        torch.save(checkpoint, tmp / "odd.ckpt")
        return "project.predict", ["--checkpoint", str(tmp / "odd.ckpt"), str(tmp / "x.npy")], guarded
    if case == "resume a run another process holds":  # a holder as records.RunLock is one, its note written
        copy, argv = copy_of_run(exp_dir, tmp, lambda run: None)
        holder = open(copy / ".lock", "a")  # noqa: SIM115 (held until the case ends)
        fcntl.flock(holder, fcntl.LOCK_EX)
        holder.write("pid 4242 on elsewhere since 2026-01-01T00:00:00+00:00 (python -m project.run --resume)\n")
        holder.flush()
        HELD.append(holder)
        return module, [*argv, "--max-epochs", "3"], copy
    if case.endswith("checkpoint file on another split"):  # kept outside its run: its own record says which split
        weights = str(shutil.copy(last if case.startswith("resume") else best, tmp / "weights.ckpt"))
        other = ["--resume", weights, "--max-epochs", "9", "--val-fraction", "0.2"] if case.startswith("resume") else [
            "--only-test", "--checkpoint", weights, "--seed", "5"]  # fmt: skip
        return module, [*other, *fresh], guarded
    if case.startswith("test a") and "another dataset" in case:
        write_mnist_like(tmp / "data", "MNIST", n_train=20, n_test=10)
        if "file" in case:  # a checkpoint kept outside its run: no config.yaml, its weights say what they fit
            best = Path(shutil.copy(best, tmp / "weights.ckpt"))
        return module, ["--only-test", "--checkpoint", str(best), "--dataset", "mnist", "--data-dir", str(tmp / "data"),
                        *fresh], guarded  # fmt: skip
    if case.startswith("image folder"):
        pets = tmp / "pets"
        if case == "image folder empty":
            pets.mkdir()
        elif case == "image folder with one class":
            write_image_folder(pets, classes=("cat",))
        else:
            write_image_folder(pets, per_class=1 if case == "image folder too small to split" else 10)
        if case == "image folder with an unreadable image":
            (pets / "dog" / "corrupt.png").write_bytes(b"\x89PNG\r\n\x1a\n garbage")
        if case == "image folder with a truncated jpeg":
            from PIL import Image

            Image.new("RGB", (64, 64), (200, 10, 10)).save(pets / "cat" / "whole.jpg", quality=95)
            data = (pets / "cat" / "whole.jpg").read_bytes()
            (pets / "cat" / "truncated.jpg").write_bytes(data[: len(data) * 2 // 3])
        return module, [*fresh, "--dataset", "image-folder", "--data-dir", str(pets), "--image-size", "16"], guarded
    if case.startswith("config"):
        config = tmp / "c.yaml"
        content = {"config that is not UTF-8": b"\xff\xfe\x00m", "config malformed": b"max_epochs: [1,\n",
                   "config with an unknown key": b"max_epoch: 3\n"}  # fmt: skip
        if case in content:
            config.write_bytes(content[case])
        elif case == "config that is a FIFO":
            os.mkfifo(config)
        return module, [*fresh, "--config", str(config)], guarded
    if case.startswith("checkpoint"):
        path = tmp / "c.ckpt"
        path.write_bytes({"checkpoint empty": b"", "checkpoint not a checkpoint": b"my notes, not weights\n",
                          "checkpoint truncated": last.read_bytes()[: last.stat().st_size // 2]}[case])  # fmt: skip
        return module, ["--only-test", "--checkpoint", str(path), *fresh], guarded
    if case == "export into a path under a file":
        return "project.export", ["--checkpoint", str(best), "--output", str(tmp / "a-file" / "m.onnx")], guarded
    if case == "predict pixels that are NaN":
        pixels = np.full((3, 1, 8, 8), 4.0, dtype=np.float32)
        pixels[1, 0, 2, 2] = np.nan
        np.save(tmp / "nan.npy", pixels)
        return (
            "project.predict",
            ["--checkpoint", str(best), str(tmp / "nan.npy"), "--output", str(tmp / "p.csv")],
            guarded,
        )
    if case == "predict into a path under a file":
        return (
            "project.predict",
            ["--checkpoint", str(best), str(tmp / "x.npy"), "--output", str(tmp / "a-file" / "p.csv")],
            guarded,
        )
    raise KeyError(case)


HELD: list = []  # lock files this test process holds (released when it ends)


@pytest.mark.parametrize("case", sorted(CASES))
def test_bad_input_is_one_line_and_harmless(case: str, trained: Path, tmp_path: Path) -> None:
    kind, words = CASES[case]
    module, argv, guarded = prepare(case, tmp_path, trained)
    before = file_digests(guarded)
    try:
        result = run_cli(*argv, module=module)
    finally:
        while HELD:
            HELD.pop().close()
    assert result.returncode == 2, f"{case}: exit {result.returncode}\n{result.stdout[-1500:]}\n{result.stderr[-1500:]}"
    assert "Traceback" not in result.stderr, result.stderr
    errors = [line for line in result.stderr.splitlines() if "error:" in line]
    assert len(errors) == 1 and len(result.stderr.strip().splitlines()) <= 3, result.stderr
    assert words in errors[0], errors[0]
    assert SECRET not in result.stdout + result.stderr
    assert file_digests(guarded) == before, f"{case}: a finished run changed"
    assert not (tmp_path / "pwned").exists(), "a pickled program ran"
    assert not list(tmp_path.rglob(".*.partial*")), "a half-written file was left behind"


@pytest.mark.parametrize("smoke", [[], ["--fast-dev-run"]], ids=["plain", "fast-dev-run"])
def test_resuming_a_finished_run_to_its_own_end_says_so_and_changes_nothing(trained: Path, smoke: list[str]) -> None:
    before = file_digests(trained)
    result = run_cli("--resume", "--exp-dir", str(trained), "--exp-name", "good", "--max-epochs", "2", *smoke)
    assert result.returncode == 0, result.stderr
    assert result.stdout.startswith("nothing to train: ") and "trained all 2 epochs" in result.stdout
    assert file_digests(trained) == before


def summary(output: str, label: str) -> Path:
    """The path a command's summary gives after `label` (to the end of the line, or to export's '; checked')."""
    return Path(re.search(rf"^{label}\s*(.+?)(?:; checked|$)", output, re.MULTILINE).group(1))


def test_odd_paths_work_and_are_where_the_summary_says(tmp_path: Path) -> None:
    """A folder with the characters a URL or a shell reads otherwise and a 255-byte name, for runs (MLflow and csv),
    data, the sweep's default study store, predict's and export's output files (255-byte names too)."""
    from project.infra import runs

    odd = tmp_path / "f%78 a?b#c&d=e;f" / ("L" * 255)
    write_image_folder(odd / "pets", per_class=6, size=8)
    tracked = run_cli("--exp-dir", str(odd), *QUICK)
    assert tracked.returncode == 0, tracked.stderr[-2000:]
    assert (summary(tracked.stdout, "Run directory:") / "test_metrics.json").is_file()
    command = shlex.split(re.search(r"(mlflow ui .+?)   then open", tracked.stdout).group(1))  # pasted as printed
    store = runs.sqlite_file(command[command.index("--backend-store-uri") + 1])
    assert store == odd / "mlflow.db"
    with sqlite3.connect(store) as database:
        assert database.execute("select status from runs").fetchall() == [("FINISHED",)]

    images = ["--dataset", "image-folder", "--data-dir", str(odd / "pets"), "--image-size", "8"]
    plain = run_cli("--exp-dir", str(odd), "--exp-name", "csv", "--logger", "csv", *images, *QUICK)
    assert plain.returncode == 0, plain.stderr[-2000:]
    assert (summary(plain.stdout, "Run directory:") / "checkpoints" / "last.ckpt").is_file()
    model = ["--checkpoint", "best", "--exp-dir", str(odd), "--exp-name", "csv"]
    output = odd / f"{'P' * 251}.csv"
    predicted = run_cli(*model, str(odd / "pets" / "cat"), "--output", str(output), module="project.predict")
    assert predicted.returncode == 0 and predicted.stdout == f"Wrote 6 predictions to {output}\n", predicted.stderr
    exported = run_cli(*model, "--format", "torchscript", "--output", str(odd / f"{'M' * 252}.pt"),
                       module="project.export")  # fmt: skip
    assert exported.returncode == 0 and summary(exported.stdout, "Wrote").is_file(), exported.stderr[-2000:]

    swept = run_cli("--study", "s", "--n-trials", "1", "--exp-dir", str(odd), "--logger", "csv", *QUICK,
                    module="project.sweep")  # fmt: skip
    assert swept.returncode == 0, swept.stderr[-2000:]
    assert (summary(swept.stdout, "Saved in") / "trials.csv").is_file()
    storage = re.search(r"\(storage (.+)\)$", swept.stdout, re.MULTILINE).group(1)
    assert runs.sqlite_file(storage) == odd / "optuna.db" and storage == runs.sqlite_url(odd / "optuna.db")


def test_a_secret_in_a_path_is_printed_nowhere(tmp_path: Path) -> None:
    """--exp-dir .../password=X Y: the summary's run directory and the tracker's command name the path redacted (the
    folder's whole name: a space does not end it)."""
    exp_dir = tmp_path / f"password=abc {SECRET}"
    result = run_cli("--exp-dir", str(exp_dir), *QUICK)
    assert result.returncode == 0, result.stderr[-2000:]
    run_dir = only_run_dir(exp_dir)
    assert f"Run directory: {tmp_path}/password=[redacted]/debug/{run_dir.name}" in result.stdout
    assert "--backend-store-uri" in result.stdout and SECRET not in result.stdout + result.stderr
    # The records name the tested checkpoint with each folder redacted on its own: sync still finds it by name.
    from project.sync import tested_checkpoint

    manifest = json.loads((run_dir / "manifest.json").read_text())
    for record in (manifest["test"], json.loads((run_dir / "test_metrics.json").read_text())):
        assert "/password=[redacted]/" in record["checkpoint"] and SECRET not in record["checkpoint"]
    assert tested_checkpoint(run_dir, manifest) == run_dir / "checkpoints" / Path(manifest["test"]["checkpoint"]).name
    assert tested_checkpoint(run_dir, manifest).is_file()
    # Resumed into TensorBoard too, its text records still hold it nowhere (the checkpoints keep Lightning's paths:
    # resume needs them)
    resumed = run_cli("--exp-dir", str(exp_dir), *QUICK, "--max-epochs", "2", "--resume", "--logger", "tensorboard")
    assert resumed.returncode == 0, resumed.stderr[-2000:]
    assert SECRET not in resumed.stdout + resumed.stderr and "tensorboard --logdir" in resumed.stdout
    tested = run_cli("--exp-dir", str(exp_dir), *QUICK, "--only-test", "--logger", "csv")  # every summary line
    assert tested.returncode == 0, tested.stderr[-2000:]
    assert SECRET not in tested.stdout + tested.stderr and "metrics.csv (no tracker)" in tested.stdout
    texts = [path for path in exp_dir.rglob("*") if path.suffix in (".json", ".yaml", ".csv", ".txt")]
    assert len(texts) >= 10 and not [path.name for path in texts if SECRET in path.read_text()]


def test_a_run_on_data_in_a_secret_folder_resumes_when_given_the_folder_again(tmp_path: Path) -> None:
    """config.yaml names --data-dir .../password=X redacted: resuming, the folder given again is the run's own."""
    pets = tmp_path / f"password={SECRET}" / "pets"
    write_image_folder(pets)
    data = ("--dataset", "image-folder", "--data-dir", str(pets), "--image-size", "8", "--logger", "csv")
    assert run_cli("--exp-dir", str(tmp_path / "runs"), *data, *QUICK).returncode == 0
    resumed = run_cli("--exp-dir", str(tmp_path / "runs"), *data, *QUICK, "--max-epochs", "2", "--resume")
    assert resumed.returncode == 0, resumed.stderr[-2000:]
    assert SECRET not in resumed.stdout + resumed.stderr + (only_run_dir(tmp_path / "runs") / "config.yaml").read_text()
    write_image_folder(tmp_path / "other", per_class=3)  # the data may move, not change
    other = run_cli("--exp-dir", str(tmp_path / "runs"), *data[:2], "--data-dir", str(tmp_path / "other"), *data[4:],
                    *QUICK, "--max-epochs", "3", "--resume")  # fmt: skip
    assert other.returncode == 2 and "has changed since this run started" in other.stderr, other.stderr[-2000:]
