"""Exact resume: a run killed at any point and continued with --resume ends bit for bit where an
uninterrupted run with the same seed ends (weights, optimizer, scheduler, best checkpoint, test metrics).

Faults are injected into real CLI runs by tests/fault_driver.py (SIGKILL or a signal at an exact point).
"""

from __future__ import annotations

import io
import json
import random
import re
import shlex
import signal
import time
from pathlib import Path

import numpy as np
import pytest
import torch
from conftest import file_digests, only_run_dir, run_cli, write_cifar10_like

from project.infra import checkpoints
from project.infra.batches import Batches, EpochBatches
from project.infra.callbacks import RandomState

# 1,437 training digits in batches of 64: 23 steps an epoch. last.ckpt is written after steps 5, 10,
# 15, 20, 23 (end of epoch 0), 25, 30, ...; validation runs after steps 23, 46 and 69.
DIGITS = (
    "--model", "mlp", "--hidden-dim", "32", "--batch-size", "64", "--max-epochs", "3",
    "--logger", "none", "--deterministic", "--checkpoint-every-n-steps", "5",
)  # fmt: skip

# Tiny CIFAR-10 files (random flips and shifts: the random streams matter) read through the standard
# DataLoader with worker processes: 180 training images in batches of 16, 12 steps an epoch. last.ckpt
# is written after steps 4, 8, 12 (end of epoch 0, after validation: not before it), 16, ...
CIFAR = (
    "--dataset", "cifar10", "--model", "mlp", "--hidden-dim", "16", "--batch-size", "16", "--max-epochs", "3",
    "--logger", "none", "--deterministic", "--checkpoint-every-n-steps", "4", "--data-on-device", "no",
    "--num-workers", "2",
)  # fmt: skip


def tensors(tree: object, prefix: str = "") -> dict[str, torch.Tensor]:
    """Every tensor in a nested checkpoint structure, by its path."""
    if isinstance(tree, torch.Tensor):
        return {prefix: tree}
    items = tree.items() if isinstance(tree, dict) else enumerate(tree) if isinstance(tree, list | tuple) else []
    found: dict[str, torch.Tensor] = {}
    for key, value in items:
        found.update(tensors(value, f"{prefix}/{key}"))
    return found


def assert_same_run(reference: Path, resumed: Path) -> None:
    """The final checkpoints are equal tensor for tensor, the same best checkpoint was tested, with the
    same test metrics."""
    ours, theirs = (checkpoints.read(run / "checkpoints" / "last.ckpt") for run in (reference, resumed))
    assert (ours["global_step"], ours["epoch"]) == (theirs["global_step"], theirs["epoch"])
    for part in ("state_dict", "optimizer_states"):
        expected, actual = tensors(ours[part]), tensors(theirs[part])
        assert expected.keys() == actual.keys() and expected, part
        different = [name for name in expected if not torch.equal(expected[name], actual[name])]
        assert not different, f"{part} differs in {different}"
    assert ours["lr_schedulers"] == theirs["lr_schedulers"]
    metrics = [json.loads((run / "test_metrics.json").read_text()) for run in (reference, resumed)]
    assert Path(metrics[0].pop("checkpoint")).name == Path(metrics[1].pop("checkpoint")).name
    assert metrics[0] == metrics[1]
    assert not list((resumed / "checkpoints").glob(".*.tmp")), "a temporary checkpoint file was left behind"


def last_step(run_dir: Path) -> int:
    return checkpoints.read(run_dir / "checkpoints" / "last.ckpt")["global_step"]


def uninterrupted(tmp_path_factory: pytest.TempPathFactory, *options: str, **run_options: object) -> Path:
    """The run directory of an uninterrupted run of `options`: what a killed and resumed run must end as."""
    exp_dir = tmp_path_factory.mktemp("reference")
    result = run_cli(*options, "--exp-dir", str(exp_dir), **run_options)
    assert result.returncode == 0, result.stderr
    return only_run_dir(exp_dir)


@pytest.fixture(scope="module")
def digits_reference(tmp_path_factory: pytest.TempPathFactory) -> Path:
    return uninterrupted(tmp_path_factory, *DIGITS)


@pytest.fixture(scope="module")
def cifar_dir(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """Tiny CIFAR-10 files; runs on them pass cifar10_md5=cifar_dir / "cifar10-md5.json" to accept them."""
    data_dir = tmp_path_factory.mktemp("cifar")
    write_cifar10_like(data_dir, per_batch=40, n_test=20)
    return data_dir


def cifar_md5(cifar_dir: Path) -> Path:
    return cifar_dir / "cifar10-md5.json"


@pytest.fixture(scope="module")
def cifar_reference(tmp_path_factory: pytest.TempPathFactory, cifar_dir: Path) -> Path:
    return uninterrupted(tmp_path_factory, *CIFAR, "--data-dir", str(cifar_dir), cifar10_md5=cifar_md5(cifar_dir))


def killed_then_resumed(
    options: tuple[str, ...], fault: tuple[str, ...], resumes_from_step: int, exp_dir: Path, again: bool = False
) -> Path:
    """Run `options` with `fault` (SIGKILL), check where last.ckpt stands, resume (`again`: killed once more as the
    resumed run rewinds metrics.csv, then resumed again); the run directory, continued."""
    killed = run_cli(*fault, "--", *options, "--exp-dir", str(exp_dir), module="tests.fault_driver")
    assert killed.returncode == -signal.SIGKILL, killed.stderr[-2000:]
    run_dir = only_run_dir(exp_dir)
    assert last_step(run_dir) == resumes_from_step
    if again:
        time.sleep(1)  # manifest.json's times are in seconds: the killed session's rows must be older than the next
        killed = run_cli("kill-rewind", "--", *options, "--exp-dir", str(exp_dir), "--resume",
                         module="tests.fault_driver")  # fmt: skip
        assert killed.returncode == -signal.SIGKILL, killed.stderr[-2000:]
    resumed = run_cli(*options, "--exp-dir", str(exp_dir), "--resume")
    assert resumed.returncode == 0, resumed.stderr[-2000:]
    assert only_run_dir(exp_dir) == run_dir  # continued in place, not a new run
    return run_dir


# point: (fault, the step of the last.ckpt the resumed run starts from)
KILLS = {
    "first-step-of-an-epoch": (("kill-train", "1", "0"), 23),
    "mid-epoch": (("kill-train", "1", "12"), 35),
    "right-after-epoch-end-checkpoint": (("kill-after-save", "5"), 23),
    "during-validation": (("kill-val", "1"), 45),
    "first-step-of-an-epoch-then-as-the-resume-starts": (("kill-train", "1", "0"), 23),
}
# Killed again as the resumed run starts: the next resume still drops each row logged after the checkpoint.
KILLED_AGAIN = {"first-step-of-an-epoch-then-as-the-resume-starts"}
# Killed between the epoch-end checkpoint and Lightning's logging of the epoch's train/* values: the resumed run
# starts after that epoch, and its train/* row is not in metrics.csv (Lightning does not run the epoch's end again).
LOSES_A_ROW = {"right-after-epoch-end-checkpoint"}


@pytest.mark.slow
@pytest.mark.parametrize("point", KILLS)
def test_run_killed_then_resumed_ends_bit_identical(point: str, digits_reference: Path, exp_dir: Path) -> None:
    """The same weights, optimiser and test scores as the uninterrupted run; and metrics.csv holds its rows, value for
    value, each once: the learning rate logged after an epoch-end checkpoint is not there twice, and a resumed
    epoch's train/* averages every batch of it (the metrics' partial sums are in the checkpoint)."""
    import csv

    fault, resumes_from_step = KILLS[point]
    run_dir = killed_then_resumed(DIGITS, fault, resumes_from_step, exp_dir, again=point in KILLED_AGAIN)
    assert_same_run(digits_reference, run_dir)

    def rows(run: Path) -> list[dict[str, str]]:
        with open(run / "metrics.csv", newline="") as file:
            return [{k: v for k, v in row.items() if k != "timestamp"} for row in csv.DictReader(file)]

    expected = rows(digits_reference)
    if point in LOSES_A_ROW:  # the killed epoch's (the first) train/* row, and only that
        expected = [row for row in expected if not (row["epoch"] == "0" and row["train/loss"])]
    assert rows(run_dir) == expected


@pytest.mark.slow
def test_a_mid_epoch_checkpoint_resumes_only_with_as_many_processes(exp_dir: Path) -> None:
    """Resumed mid-epoch by another number of processes, Lightning would end that epoch at once: the rest of its
    batches and its validation lost, silently. It is one line, and the run stays as it was."""
    fault, resumes_from_step = KILLS["mid-epoch"]
    killed = run_cli(*fault, "--", *DIGITS, "--exp-dir", str(exp_dir), module="tests.fault_driver")
    assert killed.returncode == -signal.SIGKILL and last_step(only_run_dir(exp_dir)) == resumes_from_step
    before = file_digests(exp_dir)
    two = ("--devices", "2", "--strategy", "ddp", "--accelerator", "cpu")
    refused = run_cli(*DIGITS, "--exp-dir", str(exp_dir), "--resume", *two)
    assert refused.returncode == 2 and refused.stderr.count("\n") == 1, refused.stderr[-2000:]
    assert "saved mid-epoch by a run of 1 processes (--devices x --num-nodes) with --batch-size 64" in refused.stderr
    # A copy of the checkpoint outside its run (no config.yaml to keep its batch size) with another --batch-size
    copy = exp_dir.parent / "mid-epoch.ckpt"
    copy.write_bytes((only_run_dir(exp_dir) / "checkpoints" / "last.ckpt").read_bytes())
    smaller = [*DIGITS[:5], "32", *DIGITS[6:]]
    assert DIGITS[4:6] == ("--batch-size", "64")
    elsewhere = run_cli(*smaller, "--exp-dir", str(exp_dir.parent / "other"), "--resume", str(copy))
    assert elsewhere.returncode == 2 and "with --batch-size 64" in elsewhere.stderr, elsewhere.stderr[-2000:]
    assert file_digests(exp_dir) == before and not (exp_dir.parent / "other").exists()


@pytest.mark.slow
def test_run_killed_while_writing_last_ckpt_keeps_the_previous_one(exp_dir: Path) -> None:
    killed = run_cli("kill-mid-write", "6", "--", *DIGITS, "--exp-dir", str(exp_dir), module="tests.fault_driver")
    assert killed.returncode == -signal.SIGKILL, killed.stderr[-2000:]
    folder = only_run_dir(exp_dir) / "checkpoints"
    assert len(list(folder.glob(".last.ckpt.*.tmp"))) == 1  # killed halfway through the 6th write...
    assert last_step(folder.parent) == 23  # ...so last.ckpt is still the 5th, whole (resumed as above)


# A run stopped after its training ended: (fault, its exit status). 16 writes of last.ckpt make the 3 epochs.
AFTER_TRAINING = {
    "killed-right-after-the-last-checkpoint": (("kill-after-save", "16"), -signal.SIGKILL),
    "killed-during-the-test": (("kill-test",), -signal.SIGKILL),
    "killed-during-the-reports": (("kill-plot",), -signal.SIGKILL),
    "SIGINT-in-the-last-training-step": (("signal-train", "SIGINT", "2", "22"), 130),
}


@pytest.mark.slow
@pytest.mark.parametrize("point", AFTER_TRAINING)
def test_a_run_stopped_after_training_is_completed_by_resume(point: str, digits_reference: Path, exp_dir: Path) -> None:
    """--resume runs the test and the reports in the same directory and tracker run, and the run ends "finished"
    (never "nothing to train"), with the test scores of an uninterrupted run."""
    from mlflow.tracking import MlflowClient

    fault, status = AFTER_TRAINING[point]
    args = (*DIGITS, "--logger", "mlflow", "--exp-dir", str(exp_dir))
    stopped = run_cli(*fault, "--", *args, module="tests.fault_driver")
    assert stopped.returncode == status, stopped.stderr[-2000:]
    run_dir = only_run_dir(exp_dir)
    assert last_step(run_dir) == 69  # all 3 epochs trained
    tracked = json.loads((run_dir / "manifest.json").read_text())["trackers"]["mlflow"]["run_id"]

    resumed = run_cli(*args, "--resume")
    assert resumed.returncode == 0, resumed.stderr[-2000:]
    assert "nothing to train" not in resumed.stdout and f"Run directory: {run_dir}" in resumed.stdout
    assert only_run_dir(exp_dir) == run_dir
    manifest = json.loads((run_dir / "manifest.json").read_text())
    assert manifest["exit_status"] == "finished" and manifest["resumed"][-1]["exit_status"] == "finished"
    assert manifest["trackers"]["mlflow"]["run_id"] == tracked
    client = MlflowClient(f"sqlite:///{(exp_dir / 'mlflow.db').resolve().as_posix()}")
    assert client.get_run(tracked).info.status == "FINISHED" and len(client.search_runs(["1"])) == 1
    assert (run_dir / "curves.png").is_file() and (run_dir / "test_report.txt").is_file()
    assert_same_run(digits_reference, run_dir)
    again = run_cli(*args, "--resume")  # and now it is finished
    assert again.returncode == 0 and again.stdout.startswith("nothing to train: "), again.stderr[-2000:]


# point: (fault, exit status, the step last.ckpt was saved at)
SIGNALS = {
    "SIGTERM-mid-epoch": (("signal-train", "SIGTERM", "1", "5"), 143, 29),
    # After the last step of an epoch the run validates first, then saves the epoch-end last.ckpt.
    "SIGINT-in-the-last-step-of-an-epoch": (("signal-train", "SIGINT", "1", "22"), 130, 46),
}


@pytest.mark.slow
@pytest.mark.parametrize("point", SIGNALS)
def test_signal_saves_prints_the_resume_command_that_ends_bit_identical(
    point: str, digits_reference: Path, exp_dir: Path
) -> None:
    fault, status, saved_step = SIGNALS[point]
    stopped = run_cli(*fault, "--", *DIGITS, "--exp-dir", str(exp_dir), module="tests.fault_driver")
    assert stopped.returncode == status, stopped.stderr[-2000:]
    run_dir = only_run_dir(exp_dir)
    assert last_step(run_dir) == saved_step  # the step the signal came in was finished and saved
    assert f"stopped by {fault[1]}: saved {run_dir / 'checkpoints' / 'last.ckpt'}" in stopped.stderr
    command = [line for line in stopped.stderr.splitlines() if line.startswith("resume with: ")]
    assert len(command) == 1, stopped.stderr[-2000:]
    # The run's own config.yaml holds every setting: the command names only the checkpoint.
    last = run_dir / "checkpoints" / "last.ckpt"
    assert shlex.split(command[0].removeprefix("resume with: "))[1:] == ["-m", "project.run", "--resume", str(last)]

    resumed = run_cli("--resume", str(last))  # the command printed (checked above), forked
    assert resumed.returncode == 0, resumed.stderr[-2000:]
    assert only_run_dir(exp_dir) == run_dir
    assert_same_run(digits_reference, run_dir)


@pytest.mark.slow
@pytest.mark.parametrize(
    ("fault", "resumes_from_step"),
    [(("kill-val", "0"), 8), (("kill-after-save", "3"), 12)],
    ids=["during-validation-after-a-checkpointed-last-step", "epoch-boundary"],
)
def test_dataloader_run_with_augmentation_killed_then_resumed_ends_bit_identical(
    fault: tuple[str, ...], resumes_from_step: int, cifar_dir: Path, cifar_reference: Path, exp_dir: Path
) -> None:
    args = (*CIFAR, "--data-dir", str(cifar_dir), "--exp-dir", str(exp_dir))
    killed = run_cli(*fault, "--", *args, module="tests.fault_driver", cifar10_md5=cifar_md5(cifar_dir))
    assert killed.returncode == -signal.SIGKILL, killed.stderr[-2000:]
    run_dir = only_run_dir(exp_dir)
    assert last_step(run_dir) == resumes_from_step

    resumed = run_cli(*args, "--resume", cifar10_md5=cifar_md5(cifar_dir))
    assert resumed.returncode == 0, resumed.stderr[-2000:]
    assert_same_run(cifar_reference, run_dir)


def test_random_state_restores_every_stream_through_a_weights_only_checkpoint() -> None:
    def draw() -> tuple:
        return random.random(), np.random.rand(), np.random.randn(), torch.rand(3).tolist()

    buffer = io.BytesIO()
    torch.save({"callbacks": {"RandomState": RandomState().state_dict()}}, buffer)
    expected = draw()
    draw()  # move every stream on
    buffer.seek(0)
    RandomState().load_state_dict(torch.load(buffer, weights_only=True)["callbacks"]["RandomState"])
    assert draw() == expected


def test_resumable_epochs_continue_with_the_next_batch_of_the_same_epoch() -> None:
    images, labels = torch.arange(50, dtype=torch.uint8).view(50, 1, 1, 1), torch.arange(50)
    plan = EpochBatches(50, batch_size=8, shuffle=True, seed=3, rank=0, world_size=1)
    epoch = 1

    def loader() -> Batches:
        return Batches(plan, (images, labels), current_epoch=lambda: epoch)

    uninterrupted = [y.tolist() for _, y in loader()]
    assert sorted(sum(uninterrupted, [])) == list(range(50))

    interrupted = loader()
    iterator = iter(interrupted)
    trained = [next(iterator)[1].tolist() for _ in range(3)]
    state = interrupted.state_dict()
    assert state == {"epoch": 1, "consumed": 3}

    resumed = loader()
    resumed.load_state_dict(state)
    assert trained + [y.tolist() for _, y in resumed] == uninterrupted
    epoch = 2  # the saved position belongs to epoch 1: the next epoch starts from its beginning
    assert len(list(resumed)) == len(uninterrupted)


@pytest.mark.slow
def test_a_cnn_killed_then_resumed_ends_bit_identical(tmp_path_factory: pytest.TempPathFactory, exp_dir: Path) -> None:
    """The same with BatchNorm, whose statistics are recomputed before each validation (PreciseBatchNorm): the
    recomputation draws nothing from the random streams, so resuming still ends bit for bit."""
    cnn = [*DIGITS, "--model", "cnn", "--hidden-dim", "16", "--max-epochs", "2"]
    reference_dir = tmp_path_factory.mktemp("cnn-reference")
    reference = run_cli(*cnn, "--exp-dir", str(reference_dir))
    assert reference.returncode == 0, reference.stderr[-2000:]
    killed = run_cli("kill-train", "1", "12", "--", *cnn, "--exp-dir", str(exp_dir), module="tests.fault_driver")
    assert killed.returncode == -signal.SIGKILL, killed.stderr[-2000:]
    resumed = run_cli(*cnn, "--exp-dir", str(exp_dir), "--resume")
    assert resumed.returncode == 0, resumed.stderr[-2000:]
    assert_same_run(only_run_dir(reference_dir), only_run_dir(exp_dir))


@pytest.mark.slow
def test_extending_a_finished_run_follows_the_longer_schedule_from_its_first_new_step(exp_dir: Path) -> None:
    """A 2-epoch run extended to 4: epoch 2 trains at the 4-epoch cosine schedule's rate (half the initial one), not
    at the finished 2-epoch schedule's 0, and so learns something."""
    import csv
    import math

    args = ("--model", "mlp", "--hidden-dim", "32", "--logger", "csv", "--exp-dir", str(exp_dir))
    assert run_cli(*args, "--max-epochs", "2").returncode == 0
    extended = run_cli(*args, "--max-epochs", "4", "--resume")
    assert extended.returncode == 0, extended.stderr[-2000:]
    with open(only_run_dir(exp_dir) / "metrics.csv", newline="") as file:
        rows = list(csv.DictReader(file))
    rates = [float(row["lr"]) for row in rows if row.get("lr")]
    assert rates == pytest.approx([1e-3 * 0.5 * (1 + math.cos(math.pi * e / s)) for e, s in
                                   ((0, 2), (1, 2), (2, 4), (3, 4))])  # fmt: skip
    val_loss = [float(row["val/loss"]) for row in rows if row.get("val/loss")]
    assert len(val_loss) == 4 and val_loss[2] != val_loss[1] and val_loss[3] != val_loss[2]


@pytest.mark.slow
def test_a_moved_run_resumed_keeps_its_best_checkpoint(exp_dir: Path) -> None:
    """Lightning restores a checkpoint callback's best scores only from a state saved in the same folder: a run moved
    and then resumed would keep its first new epoch as the best, however bad, and test it."""
    import shutil

    args = ("--model", "mlp", "--hidden-dim", "16", "--logger", "csv")
    assert run_cli(*args, "--max-epochs", "2", "--exp-dir", str(exp_dir / "a")).returncode == 0
    last = only_run_dir(exp_dir / "a") / "checkpoints" / "last.ckpt"
    saved = torch.load(last, weights_only=True)
    for state in saved["callbacks"].values():  # the best so far made unbeatable: no new epoch may replace it
        if state.get("monitor") == "val/loss":
            state["best_model_score"] = torch.tensor(0.0)
            state["best_k_models"] = dict.fromkeys(state["best_k_models"], torch.tensor(0.0))
    torch.save(saved, last)
    shutil.move(exp_dir / "a", exp_dir / "b")
    resumed = run_cli(*args, "--max-epochs", "3", "--exp-dir", str(exp_dir / "b"), "--resume")
    assert resumed.returncode == 0, resumed.stderr[-2000:]
    assert re.search(r"Best epoch: +1 \(val/loss [\d.]+\), tested from checkpoints/best-epoch001.ckpt", resumed.stdout)


# Regression on the diabetes data: 353 training rows in batches of 32, 12 steps an epoch; last.ckpt after steps 5,
# 10, 12 (end of epoch 0), 15, 20, ...
DIABETES = (
    "--dataset", "diabetes", "--batch-size", "32", "--max-epochs", "3", "--logger", "none", "--deterministic",
    "--checkpoint-every-n-steps", "5",
)  # fmt: skip


@pytest.fixture(scope="module")
def diabetes_reference(tmp_path_factory: pytest.TempPathFactory) -> Path:
    return uninterrupted(tmp_path_factory, *DIABETES)


@pytest.mark.slow
@pytest.mark.parametrize(("fault", "resumes_from_step"), [(("kill-train", "1", "8"), 20), (("kill-val", "1"), 20)])
def test_regression_run_killed_then_resumed_ends_bit_identical(
    fault: tuple[str, ...], resumes_from_step: int, diabetes_reference: Path, exp_dir: Path
) -> None:
    run_dir = killed_then_resumed(DIABETES, fault, resumes_from_step, exp_dir)
    assert_same_run(diabetes_reference, run_dir)
