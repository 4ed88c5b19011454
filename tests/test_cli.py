"""The command line: every original flag, YAML config with command-line precedence, one-line errors."""

import subprocess
import sys

import pytest
from conftest import ROOT, cli_env, run_cli

from project.run import NOT_CONFIG, config_of, parse_args

ORIGINAL_FLAGS = [
    "--batch-size", "64", "--num-workers", "0", "--learning-rate", "0.001", "--hidden-dim", "32", "--only-test",
    "--half-precision", "--gpus", "2", "--max-epochs", "3", "--exp-name", "trial", "--exp-dir", "/tmp/x",
    "--fast-dev-run",
]  # fmt: skip


def test_every_original_flag_parses():
    args = parse_args(ORIGINAL_FLAGS)
    assert (args.batch_size, args.num_workers, args.learning_rate, args.hidden_dim) == (64, 0, 0.001, 32)
    assert args.only_test and args.half_precision and args.fast_dev_run
    assert (args.gpus, args.max_epochs, args.exp_name, args.exp_dir) == (2, 3, "trial", "/tmp/x")


def test_original_defaults_kept():
    args = parse_args([])
    assert (args.batch_size, args.num_workers, args.hidden_dim, args.max_epochs) == (128, 4, 128, 20)
    assert (args.exp_name, args.exp_dir) == ("debug", "~/Experiments")
    assert not (args.only_test or args.half_precision or args.fast_dev_run)
    assert args.dataset == "digits" and args.logger == ["mlflow"]


def test_config_file_values_and_command_line_precedence(tmp_path):
    config = tmp_path / "config.yaml"
    config.write_text(
        "learning-rate: 0.05\nbatch_size: 32\nmodel: mlp\nlogger: [csv, tensorboard]\nfast_dev_run: true\n"
    )
    args = parse_args(["--config", str(config)])
    assert (args.learning_rate, args.batch_size, args.model, args.fast_dev_run) == (0.05, 32, "mlp", True)
    assert args.logger == ["csv", "tensorboard"]
    args = parse_args(["--config", str(config), "--batch-size", "16", "--logger", "none"])
    assert (args.learning_rate, args.batch_size, args.logger) == (0.05, 16, ["none"])


def test_resolved_config_round_trips(tmp_path):
    import yaml

    args = parse_args(["--learning-rate", "0.02", "--logger", "csv", "--logger", "tensorboard", "--seed", "7"])
    config = tmp_path / "config.yaml"
    config.write_text(yaml.safe_dump(config_of(args)))
    again = parse_args(["--config", str(config)])
    assert config_of(again) == config_of(args)
    assert not set(NOT_CONFIG) & set(config_of(args))


BAD_ARGS = [
    (["--learning-rate", "abc"], "--learning-rate"),
    (["--learning-rate", "0"], "--learning-rate"),
    (["--learning-rate", "-1"], "--learning-rate"),
    (["--batch-size", "0"], "--batch-size"),
    (["--batch-size", "1.5"], "--batch-size"),
    (["--max-epochs", "-3"], "--max-epochs"),
    (["--dataset", "imagenet"], "--dataset"),
    (["--model", "resnet999"], "--model"),
    (["--exp-name", "a/b"], "--exp-name"),
    (["--exp-name", ".."], "--exp-name"),
    (["--devices", "zero"], "--devices"),
    (["--logger", "comet"], "--logger"),
    (["--no-such-flag"], "unrecognized"),
    (["--only-test", "--resume"], "--resume"),
]


@pytest.mark.parametrize("argv, named", BAD_ARGS)
def test_bad_values_exit_2_with_one_line(argv, named):
    result = subprocess.run(
        [sys.executable, "-m", "project.run", *argv], capture_output=True, text=True, cwd=ROOT, env=cli_env()
    )
    assert result.returncode == 2
    error_lines = [line for line in result.stderr.splitlines() if line.startswith("python -m project.run: error")]
    assert len(error_lines) == 1 and named in error_lines[0]
    assert "Traceback" not in result.stderr


@pytest.mark.parametrize(
    "content, named",
    [("learning_rate: [1, 2\n", "not valid YAML"), ("lerning_rate: 0.1\n", "unknown option"),
     ("batch_size: -4\n", "--batch-size"), ("- a list\n", "mapping"), ("fast_dev_run: 3\n", "true or false")],
)  # fmt: skip
def test_bad_config_files_exit_2_with_one_line(tmp_path, content, named):
    config = tmp_path / "bad.yaml"
    config.write_text(content)
    result = run_cli("--config", str(config))
    assert result.returncode == 2 and named in result.stderr and "Traceback" not in result.stderr


def test_help_lists_every_option_with_defaults_without_importing_torch():
    code = (
        "import sys, contextlib, io\n"
        "from project import run\n"
        "with contextlib.redirect_stdout(io.StringIO()) as out, contextlib.suppress(SystemExit):\n"
        "    run.main(['--help'])\n"
        "assert 'torch' not in sys.modules and 'lightning' not in sys.modules, 'heavy import'\n"
        "print(out.getvalue())\n"
    )
    result = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, cwd=ROOT, env=cli_env())
    assert result.returncode == 0, result.stderr
    for flag in ORIGINAL_FLAGS[::2] + ["--dataset", "--model", "--seed", "--config", "--precision", "--devices"]:
        if flag.startswith("--"):
            assert flag in result.stdout
    assert "(default: 128)" in result.stdout
