"""The real CLI end to end, in a subprocess, on tiny data: what a user does in their first ten minutes."""

import json

import pytest
from conftest import only_run_dir, run_cli, write_image_folder, write_mnist_like

QUICK = ("--logger", "csv", "--num-workers", "0")


def test_fast_dev_run(exp_dir):
    result = run_cli("--fast-dev-run", "--exp-dir", str(exp_dir), *QUICK)
    assert result.returncode == 0, result.stderr
    assert "Test accuracy" in result.stdout


@pytest.mark.slow
def test_short_digits_run_then_only_test_reproduces_it(exp_dir):
    train = run_cli("--max-epochs", "4", "--hidden-dim", "32", "--exp-dir", str(exp_dir), "--exp-name", "short", *QUICK)
    assert train.returncode == 0, train.stderr
    run_dir = only_run_dir(exp_dir, "short")
    recorded = json.loads((run_dir / "test_metrics.json").read_text())
    assert recorded["acc"] >= 0.9
    assert list((run_dir / "checkpoints").glob("best-*.ckpt")) and (run_dir / "checkpoints" / "last.ckpt").is_file()

    retest = run_cli("--only-test", "--exp-dir", str(exp_dir), "--exp-name", "short", *QUICK)
    assert retest.returncode == 0, retest.stderr
    assert f"Test accuracy: {recorded['acc']:.4f}" in retest.stdout


def test_only_test_without_a_checkpoint_says_so(exp_dir):
    result = run_cli("--only-test", "--exp-dir", str(exp_dir), "--exp-name", "nothing-here", *QUICK)
    assert result.returncode == 2
    assert "no checkpoint found" in result.stderr and "Traceback" not in result.stderr


@pytest.mark.slow
def test_mnist_files_and_image_folder_through_the_cli(tmp_path, exp_dir):
    write_mnist_like(tmp_path / "data", "MNIST", n_train=40, n_test=10)
    mnist = run_cli("--dataset", "mnist", "--data-dir", str(tmp_path / "data"), "--model", "mlp", "--max-epochs", "1",
                    "--exp-dir", str(exp_dir), *QUICK)  # fmt: skip
    assert mnist.returncode == 0, mnist.stderr

    write_image_folder(tmp_path / "pets", per_class=10, size=16)
    folder = run_cli("--dataset", "image-folder", "--data-dir", str(tmp_path / "pets"), "--image-size", "16",
                     "--max-epochs", "1", "--hidden-dim", "16", "--exp-dir", str(exp_dir), *QUICK)  # fmt: skip
    assert folder.returncode == 0, folder.stderr
    assert "cat" in folder.stdout and "dog" in folder.stdout  # the report names the classes
