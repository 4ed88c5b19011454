"""The real CLI end to end, in a subprocess, on tiny data: what a user does in their first ten minutes."""

import json

import pytest
import yaml
from conftest import only_run_dir, run_cli, run_dirs, write_image_folder, write_mnist_like

QUICK = ("--logger", "csv", "--num-workers", "0")


def test_fast_dev_run(exp_dir):
    result = run_cli("--fast-dev-run", "--exp-dir", str(exp_dir), *QUICK)
    assert result.returncode == 0, result.stderr
    assert (
        "Test scores:   acc " in result.stdout
        and "(one batch, a smoke test (--fast-dev-run); details:" in result.stdout
    )
    (run_dir,) = exp_dir.glob("*/*")  # its scores are of one batch: not to be taken for the model's
    assert json.loads((run_dir / "test_metrics.json").read_text())["fast_dev_run"] is True


@pytest.mark.slow
def test_short_digits_run_then_only_test_reproduces_it(exp_dir):
    train = run_cli("--max-epochs", "4", "--hidden-dim", "32", "--exp-dir", str(exp_dir), "--exp-name", "short", *QUICK)
    assert train.returncode == 0, train.stderr
    run_dir = only_run_dir(exp_dir, "short")
    recorded = json.loads((run_dir / "test_metrics.json").read_text())
    assert recorded["acc"] >= 0.9
    assert list((run_dir / "checkpoints").glob("best-*.ckpt")) and (run_dir / "checkpoints" / "last.ckpt").is_file()

    # A network flag given to --only-test changes nothing: the checkpoint's network is tested, and recorded.
    retest = run_cli("--only-test", "--exp-dir", str(exp_dir), "--exp-name", "short", "--hidden-dim", "16", *QUICK)
    assert retest.returncode == 0, retest.stderr
    assert f"Test scores:   acc {recorded['acc']:.4f}" in retest.stdout
    (test_run,) = [d for d in run_dirs(exp_dir, "short") if d != run_dir]
    assert yaml.safe_load((test_run / "config.yaml").read_text())["hidden_dim"] == 32


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


@pytest.mark.slow
@pytest.mark.parametrize("model", ["cnn", "mlp"])
def test_one_epoch_scores_what_the_model_learned(exp_dir, model):
    """BatchNorm's statistics are recomputed before evaluation: one epoch on digits (12 steps) tests at >= 0.8, not
    at chance (0.10 with the statistics a 12-step epoch leaves behind)."""
    result = run_cli("--max-epochs", "1", "--model", model, "--exp-dir", str(exp_dir), *QUICK)
    assert result.returncode == 0, result.stderr
    metrics = json.loads((only_run_dir(exp_dir) / "test_metrics.json").read_text())
    assert metrics["acc"] >= 0.8 if model == "cnn" else metrics["acc"] >= 0.6  # the MLP learns slower


@pytest.mark.slow
def test_a_run_a_resume_and_only_test_print_nothing_on_stderr_but_our_own_words(exp_dir):
    """The default tracker included: no library banners, advice or warnings; the progress bar and the report go to
    stdout, and the bar names the epoch out of how many, without Lightning's v_num."""
    for argv in (["--max-epochs", "2"], ["--resume", "--max-epochs", "3"], ["--only-test"]):
        result = run_cli(*argv, "--exp-dir", str(exp_dir), "--num-workers", "0")
        assert result.returncode == 0, result.stderr
        assert result.stderr == "", f"{argv}: {result.stderr}"
        assert "v_num" not in result.stdout
    assert "epoch 4/4" in run_cli("--resume", "--max-epochs", "4", "--exp-dir", str(exp_dir)).stdout


def test_plots_mark_the_best_epoch_and_draw_loss_on_a_log_scale(tmp_path, monkeypatch):
    from matplotlib.figure import Figure

    from project.infra import plots

    metrics = tmp_path / "metrics.csv"
    rows = ["step,epoch,lr,train/loss,val/loss,train/acc,val/acc", "0,,0.001,,,,"]
    rows += [f"{12 * e + 11},{e},,{2 / (e + 1)},{2.5 / (e + 1)},{0.5 + e / 20},{0.5 + e / 25}" for e in range(8)]
    metrics.write_text("\n".join(rows) + "\n")
    drawn = []
    monkeypatch.setattr(Figure, "savefig", lambda figure, *args, **kwargs: drawn.append(figure))
    plots.save_curves(metrics, tmp_path / "curves.png", "acc", best_epoch=5, monitor="val/loss")
    (figure,) = drawn
    loss, accuracy, rate = figure.axes
    assert loss.get_yscale() == "log" and accuracy.get_yscale() == "linear"
    for ax in (loss, accuracy, rate):
        marked = [line for line in ax.get_lines() if list(line.get_xdata()) == [5, 5]]
        assert marked and "epoch 5" in marked[0].get_label()
    assert [list(line.get_ydata()) for line in rate.get_lines() if line.get_label() == "lr"] == [[0.001]]


@pytest.mark.slow
def test_the_progress_bar_fits_a_100_column_terminal(exp_dir):
    """In a real terminal 100 columns wide (a pseudo-terminal), no line the run draws is wider, and the bar says
    which epoch of how many it shows."""
    import fcntl
    import os
    import pty
    import re
    import struct
    import sys
    import termios
    import time

    from conftest import ROOT, cli_env

    pid, terminal = pty.fork()
    if pid == 0:  # the child: the CLI, attached to the pseudo-terminal
        os.chdir(ROOT)
        os.execve(sys.executable, [sys.executable, "-m", "project.run", "--max-epochs", "2", "--exp-dir", str(exp_dir),
                                   *QUICK], cli_env(COLUMNS="100", LINES="40"))  # fmt: skip
    fcntl.ioctl(terminal, termios.TIOCSWINSZ, struct.pack("HHHH", 40, 100, 0, 0))
    output, deadline = b"", time.monotonic() + 240
    while time.monotonic() < deadline:
        try:
            chunk = os.read(terminal, 65536)
        except OSError:  # the child closed the terminal: it has ended
            break
        if not chunk:
            break
        output += chunk
    _, status = os.waitpid(pid, 0)
    assert os.waitstatus_to_exitcode(status) == 0, output.decode(errors="replace")[-3000:]
    text = re.sub(r"\x1b\[[0-9;?]*[A-Za-z]", "", output.decode("utf-8", errors="replace"))
    bars = [line for line in re.split(r"[\r\n]", text) if "it/s" in line]
    assert bars and max(len(line) for line in bars) <= 100, max(bars, key=len)
    assert any(line.startswith("epoch 2/2: 100%") for line in bars)
    report = text[text.index("Confusion matrix") : text.index("Run directory")]
    assert max(len(line) for line in report.splitlines()) <= 80  # ten digits' report fits a narrow terminal
