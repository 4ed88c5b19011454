"""Every mistake a careful user would try: one clear line on stderr, a non-zero exit, no traceback, and
nothing already on disk (run directories, checkpoints, metrics) touched."""

from __future__ import annotations

import hashlib
import pickle
from pathlib import Path

import pytest
from conftest import run_cli, write_image_folder, write_mnist_like

QUICK = ("--logger", "csv", "--num-workers", "0", "--max-epochs", "1", "--model", "mlp", "--hidden-dim", "16")


@pytest.fixture(scope="module")
def trained(tmp_path_factory) -> Path:
    """One finished run whose files every bad-input case must leave exactly as they were."""
    exp_dir = tmp_path_factory.mktemp("experiments")
    result = run_cli("--exp-dir", str(exp_dir), "--exp-name", "good", *QUICK)
    assert result.returncode == 0, result.stderr
    return exp_dir


def snapshot(root: Path) -> dict[str, str]:
    return {
        str(p.relative_to(root)): hashlib.sha256(p.read_bytes()).hexdigest() for p in root.rglob("*") if p.is_file()
    }


def checkpoint_of(exp_dir: Path) -> Path:
    return next((exp_dir / "good").glob("*/checkpoints/last.ckpt"))


class Payload:
    """A pickle that would create a file when loaded: the checkpoint loader must never run it."""

    def __init__(self, marker: Path) -> None:
        self.marker = marker

    def __reduce__(self):
        return (Path.touch, (self.marker,))


def prepare(case: str, tmp: Path, exp_dir: Path) -> list[str]:
    """The command-line arguments for one bad-input case, after writing whatever files it needs."""
    ckpt = checkpoint_of(exp_dir)
    if case == "checkpoint missing":
        return ["--only-test", "--checkpoint", str(tmp / "nope.ckpt")]
    if case == "checkpoint empty":
        (tmp / "empty.ckpt").write_bytes(b"")
        return ["--only-test", "--checkpoint", str(tmp / "empty.ckpt")]
    if case == "checkpoint not a checkpoint":
        (tmp / "notes.ckpt").write_text("these are my notes, not weights\n")
        return ["--only-test", "--checkpoint", str(tmp / "notes.ckpt")]
    if case == "checkpoint truncated":
        data = ckpt.read_bytes()
        (tmp / "half.ckpt").write_bytes(data[: len(data) // 2])
        return ["--only-test", "--checkpoint", str(tmp / "half.ckpt")]
    if case == "checkpoint of another dataset":
        write_mnist_like(tmp / "data", "MNIST", n_train=20, n_test=10)
        return ["--only-test", "--checkpoint", str(ckpt), "--dataset", "mnist", "--data-dir", str(tmp / "data")]
    if case == "checkpoint with a pickle payload":
        (tmp / "evil.ckpt").write_bytes(pickle.dumps({"state_dict": {}, "hyper_parameters": Payload(tmp / "pwned")}))
        return ["--only-test", "--checkpoint", str(tmp / "evil.ckpt")]
    if case == "resume with other settings":
        return ["--resume", "--exp-name", "good", "--learning-rate", "0.5"]
    if case == "resume with nothing to resume":
        return ["--resume", "--exp-name", "never-ran"]
    if case == "only-test with nothing trained":
        return ["--only-test", "--exp-name", "never-ran"]
    if case == "dataset files missing":
        return ["--dataset", "cifar10", "--data-dir", str(tmp / "no-data")]
    if case == "image folder missing":
        return ["--dataset", "image-folder", "--data-dir", str(tmp / "no-pets")]
    if case == "image folder empty":
        (tmp / "empty-pets").mkdir()
        return ["--dataset", "image-folder", "--data-dir", str(tmp / "empty-pets")]
    if case == "image folder with one class":
        write_image_folder(tmp / "cats", classes=("cat",))
        return ["--dataset", "image-folder", "--data-dir", str(tmp / "cats")]
    if case == "image folder with an unreadable image":
        write_image_folder(tmp / "pets")
        (tmp / "pets" / "dog" / "corrupt.png").write_bytes(b"\x89PNG\r\n\x1a\n garbage")
        return ["--dataset", "image-folder", "--data-dir", str(tmp / "pets")]
    if case == "config malformed":
        (tmp / "bad.yaml").write_text("max_epochs: [1,\n")
        return ["--config", str(tmp / "bad.yaml")]
    if case == "config with unknown keys":
        (tmp / "typo.yaml").write_text("max_epoch: 3\n")
        return ["--config", str(tmp / "typo.yaml")]
    if case == "config missing":
        return ["--config", str(tmp / "absent.yaml")]
    if case == "exp-dir cannot be written":
        (tmp / "a-file").write_text("in the way")
        return ["--exp-dir", str(tmp / "a-file" / "experiments")]
    if case == "gpu requested, none present":
        return ["--gpus", "1"]
    if case == "more devices than present":
        return ["--accelerator", "cpu", "--devices", "512"]
    if case == "unknown strategy":
        return ["--strategy", "warp-drive"]
    arguments = {
        "unknown dataset": ["--dataset", "imagenet-22k"],
        "unknown model": ["--model", "gpt5"],
        "learning rate not a number": ["--learning-rate", "fast"],
        "learning rate zero": ["--learning-rate", "0"],
        "learning rate negative": ["--learning-rate", "-0.1"],
        "batch size zero": ["--batch-size", "0"],
        "batch size negative": ["--batch-size", "-8"],
        "epochs not a number": ["--max-epochs", "ten"],
        "epochs zero": ["--max-epochs", "0"],
        "exp-name with a path separator": ["--exp-name", "a/b"],
        "exp-name climbing out": ["--exp-name", "../escape"],
        "exp-name dot-dot": ["--exp-name", ".."],
    }
    return arguments[case]


CASES = {
    # case: words the one-line message must contain
    "checkpoint missing": "does not exist",
    "checkpoint empty": "is empty",
    "checkpoint not a checkpoint": "not a valid checkpoint",
    "checkpoint truncated": "not a valid checkpoint",
    "checkpoint of another dataset": "was trained on inputs",
    "checkpoint with a pickle payload": "refused",
    "resume with nothing to resume": "no checkpoint found",
    "resume with other settings": "was trained with --learning-rate 0.001 (now 0.5)",
    "only-test with nothing trained": "no checkpoint found",
    "dataset files missing": "missing",
    "image folder missing": "is not a folder",
    "image folder empty": "class folder",
    "image folder with one class": "at least 2",
    "image folder with an unreadable image": "corrupt.png",
    "config malformed": "not valid YAML",
    "config with unknown keys": "unknown option 'max_epoch'",
    "config missing": "cannot read",
    "exp-dir cannot be written": "--exp-dir",
    "gpu requested, none present": "GPU",
    "more devices than present": "--devices 512",
    "unknown strategy": "strategy",
    "unknown dataset": "--dataset",
    "unknown model": "--model",
    "learning rate not a number": "--learning-rate",
    "learning rate zero": "--learning-rate",
    "learning rate negative": "--learning-rate",
    "batch size zero": "--batch-size",
    "batch size negative": "--batch-size",
    "epochs not a number": "--max-epochs",
    "epochs zero": "--max-epochs",
    "exp-name with a path separator": "--exp-name",
    "exp-name climbing out": "--exp-name",
    "exp-name dot-dot": "--exp-name",
}


@pytest.mark.slow
@pytest.mark.parametrize("case", sorted(CASES))
def test_bad_input_is_one_line_and_harmless(case, trained, tmp_path):
    before = snapshot(trained)
    args = prepare(case, tmp_path, trained)
    result = run_cli(*args, "--exp-dir", str(trained), *QUICK) if "--exp-dir" not in args else run_cli(*args, *QUICK)

    assert result.returncode != 0, f"{case}: accepted\n{result.stdout[-2000:]}"
    assert "Traceback" not in result.stderr, result.stderr
    errors = [line for line in result.stderr.splitlines() if "error:" in line]
    assert len(errors) == 1, result.stderr
    assert CASES[case] in errors[0], errors[0]
    after = snapshot(trained)
    assert {name: after.get(name) for name in before} == before, "an existing run was changed"
    assert not (tmp_path / "pwned").exists(), "the checkpoint's payload ran"
