"""The command line: every original flag, one declaration read from flags and YAML alike (flags win), --resume and
--only-test taking the run's own configuration, and mistakes that are short and name the fix."""

import os
import subprocess
import sys

import pytest
import yaml
from conftest import ROOT, cli_env, run_cli

from project.run import FIXED_ON_TEST, MAY_CHANGE_ON_RESUME, build_parser, config_of, parse_args

ORIGINAL_FLAGS = [
    "--batch-size", "64", "--num-workers", "0", "--learning-rate", "0.001", "--hidden-dim", "32", "--only-test",
    "--half-precision", "--gpus", "2", "--max-epochs", "3", "--exp-name", "trial", "--exp-dir", "/tmp/x",
    "--fast-dev-run",
]  # fmt: skip


def test_every_original_flag_parses():
    args = build_parser().parse_args(ORIGINAL_FLAGS)
    assert (args.batch_size, args.num_workers, args.learning_rate, args.hidden_dim) == (64, 0, 0.001, 32)
    assert args.only_test and args.half_precision and args.fast_dev_run
    assert (args.gpus, args.max_epochs, args.exp_name, args.exp_dir) == (2, 3, "trial", "/tmp/x")


def test_defaults():
    import os

    args = parse_args([])
    assert (args.batch_size, args.hidden_dim, args.max_epochs, args.learning_rate) == (128, 128, 20, 1e-3)
    assert args.num_workers == min(4, len(os.sched_getaffinity(0)))  # fits the machine
    assert (args.exp_name, args.exp_dir, args.dataset, args.model, args.logger) == (
        "debug", "~/Experiments", "digits", "auto", ["mlflow"]
    )  # fmt: skip
    assert not (args.only_test or args.half_precision or args.fast_dev_run)


def test_config_file_values_and_command_line_precedence(tmp_path):
    config = tmp_path / "config.yaml"
    config.write_text(
        "learning-rate: 0.05\nbatch_size: 32\nmodel: mlp\nlogger: [csv, tensorboard]\nfast_dev_run: true\n"
    )
    args = parse_args(["--config", str(config)])
    assert (args.learning_rate, args.batch_size, args.model, args.fast_dev_run) == (0.05, 32, "mlp", True)
    assert args.logger == ["csv", "tensorboard"]
    args = parse_args(["--config", str(config), "--batch-size", "16", "--logger", "none", "--no-fast-dev-run"])
    assert (args.learning_rate, args.batch_size, args.logger, args.fast_dev_run) == (0.05, 16, ["none"], False)


def test_resolved_config_round_trips(tmp_path):
    args = parse_args(["--learning-rate", "0.02", "--logger", "csv", "--logger", "tensorboard", "--seed", "7"])
    config = tmp_path / "config.yaml"
    config.write_text(yaml.safe_dump(config_of(args)))
    assert config_of(parse_args(["--config", str(config)])) == config_of(args)
    assert not build_parser().command_only & set(config_of(args))


def fake_run(tmp_path, **config):
    """A run directory as project.run leaves it, enough for the command line: config.yaml and checkpoints."""
    run = tmp_path / "experiments" / "debug" / "20260101-000000-abcdef"
    (run / "checkpoints").mkdir(parents=True)
    for name in ("last.ckpt", "best-epoch003.ckpt"):
        (run / "checkpoints" / name).write_bytes(b"weights")
    saved = config_of(parse_args(["--exp-dir", str(tmp_path / "experiments"), "--model", "mlp", "--max-epochs", "40",
                                  "--learning-rate", "0.01", "--batch-size", "64", "--logger", "csv"]))  # fmt: skip
    (run / "config.yaml").write_text(yaml.safe_dump({**saved, **config}))
    return run


def test_resume_takes_the_runs_own_configuration(tmp_path):
    run = fake_run(tmp_path)
    args = parse_args(["--resume", "--exp-dir", str(tmp_path / "experiments"), "--max-epochs", "60"])
    assert args.resume == str(run / "checkpoints" / "last.ckpt")
    assert (args.model, args.learning_rate, args.batch_size, args.logger, args.max_epochs) == (
        "mlp", 0.01, 64, ["csv"], 60
    )  # fmt: skip
    args = parse_args(["--resume", str(run / "checkpoints" / "last.ckpt"), "--devices", "1", "--logger", "mlflow"])
    assert (args.model, args.logger) == ("mlp", ["mlflow"])  # a path finds its run's config.yaml too
    (run / "config.yaml").write_text(yaml.safe_dump({**yaml.safe_load((run / "config.yaml").read_text()),
                                                     "checkpoint_every_n_steps": 5}))  # fmt: skip
    args = parse_args(["--resume", "--exp-dir", str(tmp_path / "experiments"), "--checkpoint-every-n-steps", "0"])
    assert args.checkpoint_every_n_steps == 0  # a run saving mid-epoch resumed without (callbacks.for_run: none)


@pytest.mark.parametrize(
    "flags, named",
    [(["--model", "cnn"], "--model cnn (the run's: mlp)"), (["--batch-size", "32"], "--batch-size 32"),
     (["--seed", "1"], "--seed 1"), (["--learning-rate", "0.5"], "--learning-rate 0.5"),
     (["--val-fraction", "0.2"], "--val-fraction"), (["--monitor", "val/acc"], "--monitor")],
)  # fmt: skip
def test_resume_refuses_what_would_change_the_runs_data_model_or_optimisation(tmp_path, capsys, flags, named):
    fake_run(tmp_path)
    with pytest.raises(SystemExit) as exit_info:
        parse_args(["--resume", "--exp-dir", str(tmp_path / "experiments"), *flags])
    error = capsys.readouterr().err.strip().splitlines()
    assert exit_info.value.code == 2 and len(error) == 2 and named in error[1], error
    assert "a resumed run keeps its data, split, model and optimisation" in error[1]


def test_only_test_takes_the_runs_data_and_split(tmp_path, capsys):
    run = fake_run(tmp_path, seed=3, dataset="digits")
    args = parse_args(["--only-test", "--exp-dir", str(tmp_path / "experiments"), "--batch-size", "8"])
    assert (args.seed, args.batch_size, args.checkpoint) == (3, 8, str(run / "checkpoints" / "best-epoch003.ckpt"))
    with pytest.raises(SystemExit):
        parse_args(["--only-test", "--exp-dir", str(tmp_path / "experiments"), "--seed", "0"])
    assert "--seed 0 (the run's: 3): a run's checkpoint is tested on its own test split" in capsys.readouterr().err


def test_a_run_moved_since_continues_where_it_is_now(tmp_path, monkeypatch, capsys):
    import shutil

    run = fake_run(tmp_path)
    experiments = str(tmp_path / "experiments")
    monkeypatch.chdir(run)  # resumed from inside its own folder: it stays where its config.yaml says
    args = parse_args(["--resume", "checkpoints/last.ckpt"])
    assert (args.exp_dir, args.exp_name) == (experiments, "debug")
    moved = tmp_path / "elsewhere" / "study" / run.name
    moved.parent.mkdir(parents=True)
    shutil.move(run, moved)
    monkeypatch.chdir(tmp_path)
    for argv in (["--resume", str(moved / "checkpoints" / "last.ckpt")], ["--only-test", "--checkpoint",
                 str(moved / "checkpoints" / "best-epoch003.ckpt")]):  # fmt: skip
        args = parse_args(argv)  # its store and experiment are there now (the old folder is not made again)
        assert (args.exp_dir, args.exp_name) == (str((tmp_path / "elsewhere").resolve()), "study")
    args = parse_args(["--only-test", "--checkpoint", str(moved / "checkpoints" / "last.ckpt"), "--exp-name", "tests"])
    assert (args.exp_dir, args.exp_name) == (experiments, "tests")  # where the flags say
    shutil.move(moved.parent, tmp_path / "elsewhere" / "my runs")
    with pytest.raises(SystemExit):
        parse_args(["--resume", str(tmp_path / "elsewhere" / "my runs" / run.name / "checkpoints" / "last.ckpt")])
    assert "its folder 'my runs' is not an experiment name" in capsys.readouterr().err


def test_a_run_goes_on_from_its_last_checkpoint_and_is_tested_on_the_one_it_tested(tmp_path, capsys):
    """--resume of another checkpoint of the run would train over its later epochs; --only-test's `best` is the
    checkpoint the run tested (a resumed run's `-v1` beside a file its killed session left), by name before that."""
    import json

    from project.infra import runs

    run = fake_run(tmp_path)
    with pytest.raises(SystemExit):
        parse_args(["--resume", str(run / "checkpoints" / "best-epoch003.ckpt")])
    assert "best-epoch003.ckpt is not its run's last.ckpt" in capsys.readouterr().err
    for name in ("best-epoch003-v1.ckpt", "best-epoch002.ckpt", "best-epoch001-very-good.ckpt"):
        (run / "checkpoints" / name).write_bytes(b"weights")
    assert runs.best_checkpoint(run).name == "best-epoch003-v1.ckpt"
    tested = {"run_id": run.name, "test": {"checkpoint": "/x/password=[redacted]/checkpoints/best-epoch002.ckpt"}}
    (run / "manifest.json").write_text(json.dumps(tested))
    assert parse_args(["--only-test", "--exp-dir", str(tmp_path / "experiments")]).checkpoint == str(
        run / "checkpoints" / "best-epoch002.ckpt"
    )


def test_the_latest_run_is_the_one_continued_even_before_its_first_checkpoint(tmp_path, capsys):
    """A newer run killed before its first checkpoint is not skipped for an older, finished one (SLURM's requeue
    with --resume would otherwise train on in the older run); a folder that is no run (the sweep's report), a
    test-only run and a finished --fast-dev-run, which keep no checkpoint, are."""
    import json

    older = fake_run(tmp_path)
    for name, mode in (("20260102-000000-tested", "test"), ("20260103-000000-smoked", "train")):  # keep none
        (older.parent / name).mkdir()
        (older.parent / name / "manifest.json").write_text(json.dumps({"mode": mode, "exit_status": "finished"}))
    (older.parent / "sweep").mkdir()
    assert parse_args(["--resume", "--exp-dir", str(tmp_path / "experiments")]).resume == str(
        older / "checkpoints" / "last.ckpt"
    )
    newer = older.parent / "20260104-000000-abcdef"
    (newer / "checkpoints").mkdir(parents=True)
    (newer / "config.yaml").write_text((older / "config.yaml").read_text())
    (newer / "manifest.json").write_text(json.dumps({"mode": "train", "exit_status": "running"}))  # killed
    for flags in (["--resume"], ["--only-test"], ["--only-test", "--checkpoint", "last"]):
        with pytest.raises(SystemExit):
            parse_args([*flags, "--exp-dir", str(tmp_path / "experiments")])
        assert f"{newer / 'checkpoints'} has no" in capsys.readouterr().err
    (newer / "checkpoints" / "last.ckpt").write_bytes(b"weights")
    assert parse_args(["--resume", "--exp-dir", str(tmp_path / "experiments")]).resume == str(
        newer / "checkpoints" / "last.ckpt"
    )


def test_a_run_renamed_by_hand_is_as_old_as_its_start(tmp_path):
    """A run kept as `baseline` sorts after every timestamped name: by name it was the latest run for good, and
    --resume trained on in it, --only-test and predict took its checkpoint."""
    import json

    baseline = fake_run(tmp_path).rename(tmp_path / "experiments" / "debug" / "baseline")
    (baseline / "manifest.json").write_text(json.dumps({"run_id": "20260101-000000-abcdef", "mode": "train",
                                                         "start_time": "2026-01-01T00:00:00+00:00"}))  # fmt: skip
    newer = fake_run(tmp_path).rename(tmp_path / "experiments" / "debug" / "20260105-000000-fedcba")
    for flags, found in ((["--resume"], "resume"), (["--only-test", "--checkpoint", "last"], "checkpoint")):
        args = parse_args([*flags, "--exp-dir", str(tmp_path / "experiments")])
        assert getattr(args, found) == str(newer / "checkpoints" / "last.ckpt")


def test_a_run_goes_on_with_its_data_where_they_are_now(tmp_path):
    """A relative --data-dir, given from another working directory or after the folder moved: --resume and
    --only-test take the new place (the data's own checks say whether they are the same), not a refusal."""
    run = fake_run(tmp_path, data_dir="scratch/pets")
    moved = str(tmp_path / "pets")
    for flags in (["--resume"], ["--only-test"]):
        args = parse_args([*flags, "--exp-dir", str(tmp_path / "experiments"), "--data-dir", moved])
        assert args.data_dir == moved and (args.resume or args.checkpoint).startswith(str(run))


def test_a_run_without_its_config_yaml_is_not_taken_for_a_copy(tmp_path, capsys):
    """Before: --resume went on from its last.ckpt in a new run, with the default settings."""
    run = fake_run(tmp_path)
    (run / "config.yaml").unlink()
    (run / "manifest.json").write_text('{"run_id": "20260101-000000-abcdef"}')
    for flags in (
        ["--resume", str(run / "checkpoints" / "last.ckpt")],
        ["--only-test", "--exp-dir", str(run.parent.parent)],
    ):
        with pytest.raises(SystemExit):
            parse_args(flags)
        assert f"{run}: its config.yaml is missing; restore it" in capsys.readouterr().err


def test_a_checkpoint_kept_outside_its_run_is_refused_by_the_flags_that_differ(tmp_path):
    """A copy of a checkpoint has no config.yaml to resume with: what differs is named as the flags to give, and
    another dataset's checkpoint as data (task, inputs and outputs are no flags)."""
    import torch

    from project.infra import checkpoints
    from project.infra.errors import UserError

    trained = {"task": "regression", "model": "mlp", "model_options": {"hidden_dim": 128}, "input_shape": (10,),
               "output_names": ["target"], "learning_rate": 1e-3}  # fmt: skip
    torch.save({"hyper_parameters": trained, "state_dict": {}}, tmp_path / "copy.ckpt")
    now = {**trained, "model_options": {"hidden_dim": 64}, "learning_rate": 0.01}
    with pytest.raises(UserError) as refused:
        checkpoints.check_resumable(tmp_path / "copy.ckpt", now, 20)
    assert "was trained with --hidden-dim 128 (now 64), --learning-rate 0.001 (now 0.01);" in str(refused.value)
    digits = {**trained, "task": "classification", "input_shape": (1, 8, 8), "output_names": list("0123456789")}
    with pytest.raises(UserError) as refused:
        checkpoints.check_resumable(tmp_path / "copy.ckpt", digits, 20)
    assert "trained with data of task regression, inputs [10] and 1 outputs (now classification, [1, 8, 8], 10:" in (
        str(refused.value)
    )
    assert "--task" not in str(refused.value) and "--dataset" in str(refused.value)


def test_what_may_change_is_a_subset_of_the_options():
    options = set(config_of(parse_args([])))
    assert options >= MAY_CHANGE_ON_RESUME and options >= FIXED_ON_TEST
    assert {"model", "learning_rate", "batch_size", "seed", "dataset", "hidden_dim"}.isdisjoint(MAY_CHANGE_ON_RESUME)


BAD_ARGS = [
    (["--learning-rate", "abc"], "--learning-rate"),
    (["--learning-rate", "4e37"], "--learning-rate"),  # Adam's first step (10x) would overflow float32
    (["--resume="], "--resume"),  # an unset $CKPT in `--resume "$CKPT"`: not a new run of the defaults
    (["--resume", ""], "--resume"),
    (["--only-test", "--checkpoint", ""], "--checkpoint"),
    (["--checkpoint", "pretrained.ckpt"], "to train on from one, use --resume"),  # never silently ignored
    (["--learning-rate", "0"], "--learning-rate"),
    (["--learning-rate", "-1"], "--learning-rate"),
    (["--learning-rate", "inf"], "--learning-rate"),
    (["--batch-size", "0"], "--batch-size"),
    (["--batch-size", "1.5"], "--batch-size"),
    (["--max-epochs", "-3"], "--max-epochs"),
    (["--seed", "4294967296"], "--seed"),
    (["--seed", "-1"], "--seed"),
    (["--dataset", "imagenet"], "--dataset"),
    (["--model", "resnet999"], "--model"),
    (["--exp-name", "a/b"], "--exp-name"),
    (["--exp-name", ".."], "--exp-name"),
    (["--devices", "zero"], "--devices"),
    (["--logger", "comet"], "--logger"),
    (["--monitor", "typo"], "--monitor"),
    (["--no-such-flag"], "unknown option --no-such-flag"),
    (["--learning-rat", "0.01"], "did you mean --learning-rate?"),  # no abbreviations: a typo is not a prefix
    (["--only-test", "--resume"], "--resume"),
]


@pytest.mark.parametrize("argv, named", BAD_ARGS)
def test_bad_values_are_at_most_three_lines(argv, named):
    result = subprocess.run(
        [sys.executable, "-m", "project.run", *argv], capture_output=True, text=True, cwd=ROOT, env=cli_env()
    )
    assert result.returncode == 2
    lines = result.stderr.strip().splitlines()
    assert len(lines) <= 3 and lines[-1].startswith("python -m project.run: error: ") and named in lines[-1], lines


@pytest.mark.parametrize(
    "content, named",
    [(b"learning_rate: [1, 2\n", "not valid YAML at line 2"), (b"lerning_rate: 0.1\n", "did you mean learning_rate"),
     (b"batch_size: -4\n", "--batch-size"), (b"- a list\n", "mapping"), (b"fast_dev_run: 3\n", "true or false"),
     (b"resume: last\n", "'resume' is given on the command line only (--resume)"),
     (b"\xff\xfe not text\n", "not UTF-8"),
     (b"learning_rate: 0.1\nlearning_rate: 0.2\n", "'learning_rate' is given twice"),  # YAML keeps the last
     (b"max-epochs: 1\nmax_epochs: 2\n", "'max_epochs' is given twice"),
     (b"max_epochs: true\n", "takes a value, not true"), (b"logger: []\n", "logger takes a value, not []")],
)  # fmt: skip
def test_bad_config_files_are_one_line(tmp_path, content, named):
    config = tmp_path / "bad.yaml"
    config.write_bytes(content)
    result = run_cli("--config", str(config))
    assert result.returncode == 2 and named in result.stderr and "Traceback" not in result.stderr, result.stderr
    assert f"--config {config}" in result.stderr.splitlines()[-1] or "--config:" in result.stderr


def test_an_option_of_several_values_is_read_back_from_a_config_file(tmp_path):
    """A backbone's option of several values (`nargs`), as a run's config.yaml writes it: resume reads it back."""
    from project.infra.cli import Parser, positive_int

    parser = Parser(prog="test")
    parser.add("--widths", type=positive_int, nargs="+", default=[64, 32], help="layer widths")
    config = tmp_path / "c.yaml"
    for text, widths in (("widths: [128, 64]\n", [128, 64]), ("widths: 16\n", [16]), ("widths:\n", [64, 32])):
        config.write_text(text)
        assert parser.read_config(config) == {"widths": widths}
    config.write_text("widths: [8, -2]\n")
    with pytest.raises(SystemExit):  # each value checked by the option's type
        parser.read_config(config)


def test_gpus_0_undoes_the_gpus_of_a_config_file(tmp_path):
    """A run trained with --gpus 1 is tested or resumed on a machine without one: its config.yaml holds gpus: 1."""
    import torch

    from project.infra import hardware
    from project.infra.errors import UserError

    config = tmp_path / "c.yaml"
    config.write_text("gpus: 1\n")
    args = parse_args(["--config", str(config), "--gpus", "0"])
    assert args.gpus == 0 and hardware.resolve(args)["accelerator"] == "auto"
    if not torch.cuda.is_available():
        with pytest.raises(UserError, match="none is visible; use --gpus 0"):
            hardware.resolve(parse_args(["--config", str(config)]))


def test_a_value_written_down_redacted_is_asked_for_again(tmp_path, monkeypatch, capsys):
    """A backbone option named like a secret (`--tokenizer`) is [redacted] in config.yaml: a resume or a rerun from
    that file must not train with the text "[redacted]"."""
    from project import run
    from project.infra.redact import redact

    plain = run.build_parser

    def with_a_secret_named_option():
        parser = plain()
        parser.add("--tokenizer", default="bpe", help="a backbone option whose name reads as a secret's")
        return parser

    monkeypatch.setattr(run, "build_parser", with_a_secret_named_option)
    config = tmp_path / "config.yaml"
    config.write_text(yaml.safe_dump(redact({"tokenizer": "wordpiece", "max_epochs": 2})))
    with pytest.raises(SystemExit):
        run.parse_args(["--config", str(config)])
    assert "--tokenizer was written down as [redacted]" in capsys.readouterr().err
    assert run.parse_args(["--config", str(config), "--tokenizer", "wordpiece"]).tokenizer == "wordpiece"


def test_help_shows_each_default_once_and_only_choices_that_work():
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
    help_text = " ".join(result.stdout.split())  # argparse wraps lines
    for flag in [*ORIGINAL_FLAGS[::2], "--dataset", "--model", "--seed", "--config", "--precision", "--devices"]:
        if flag.startswith("--"):
            assert flag in help_text
    assert "(default: 128)" in help_text and "(default: mlflow)" in help_text
    assert "(default: None)" not in help_text and help_text.count("(default:") == help_text.count("default:")
    assert "neptune" not in help_text


def alias_bomb(option: str = "") -> bytes:
    """Under 400 bytes that hold a list of 9**9 (387 million) items, nine levels of aliases deep: as keys a..i, or
    inside one option's value (where str() of it took 27 s and 3 GB, then a MemoryError traceback)."""
    lists = [f"[{', '.join('x' * 9)}]"] + [f"[{', '.join(['*' + name] * 9)}]" for name in "abcdefgh"]
    named = list(zip("abcdefghi", lists, strict=True))
    if option:
        return f"{option}: [{', '.join(f'&{name} {items}' for name, items in named)}]".encode()
    return "\n".join(f"{name}: &{name} {items}" for name, items in named).encode()


@pytest.mark.parametrize(
    "content, named",
    [(alias_bomb(), "aliases"), (alias_bomb("learning_rate"), "nested too deeply"),
     (alias_bomb("logger"), "nested too deeply"),
     (b"learning_rate: &lr 0.1\nmax_epochs: *lr\n", "aliases"),
     (b"learning_rate: 0.1\n" * 100_000, "larger than 64 KiB"), (b"#" * 70_000, "larger than 64 KiB"),
     (b"learning_rate: " + b"[" * 30_000 + b"]" * 30_000, "nested too deeply"),
     (b"logger: {a: {b: {c: 1}}}\n", "nested too deeply"), (b"logger: [[csv]]\n", "nested too deeply"),
     (b"data_dir: {a: 1}\n", "data_dir takes one value"), (b"max_epochs: [1, 2]\n", "max_epochs takes one value"),
     (b"devices: [1, 2]\n", "devices takes one value"), (b"logger: {a: 1}\n", "logger takes one value or a list"),
     (b"- a list\n", "mapping"), (b"just text\n", "mapping"), (b"42\n", "mapping"), (b"[1, 2]\n", "mapping")],
)  # fmt: skip
def test_config_files_that_would_explode_are_one_line_before_any_work(tmp_path, capsys, content, named):
    import tracemalloc

    config = tmp_path / "bad.yaml"
    config.write_bytes(content)
    tracemalloc.start()
    with pytest.raises(SystemExit) as exit_info:
        parse_args(["--config", str(config)])
    _, peak = tracemalloc.get_traced_memory()
    tracemalloc.stop()
    error = capsys.readouterr().err.strip().splitlines()
    assert exit_info.value.code == 2 and len(error) == 2 and named in error[1], error
    assert error[1].startswith(f"python -m project.run: error: --config {config}: "), error
    assert peak < 50 * 2**20, peak  # refused before anything big was built (no wall-clock check: machines differ)


def test_a_huge_sparse_config_file_is_not_read(tmp_path):
    config = tmp_path / "huge.yaml"
    with open(config, "wb") as file:
        file.truncate(2**40)  # a terabyte, sparse
    result = run_cli("--config", str(config))
    assert result.returncode == 2 and "larger than 64 KiB" in result.stderr.splitlines()[-1], result.stderr


@pytest.mark.parametrize(
    "content, flag",
    [("resume: true", "--resume"), ("resume: last", "--resume"), ("only_test: true", "--only-test"),
     ("only-test: true", "--only-test"), ("checkpoint: best", "--checkpoint"), ("config: other.yaml", "--config"),
     ("debug: true", "--debug"), ("tag: [study=lr]", "--tag"), ("tag: study=lr", "--tag")],
)  # fmt: skip
def test_command_only_options_in_a_config_file_say_so(tmp_path, capsys, content, flag):
    config = tmp_path / "c.yaml"
    config.write_text(f"learning_rate: 0.01\n{content}\n")
    with pytest.raises(SystemExit) as exit_info:
        parse_args(["--config", str(config)])
    error = capsys.readouterr().err.strip().splitlines()
    key = content.split(":")[0]
    assert exit_info.value.code == 2 and len(error) == 2, error
    assert error[1].endswith(f"'{key}' is given on the command line only ({flag})"), error
    assert "did you mean" not in error[1]


def c_locale_env(utf8_mode: bool) -> dict[str, str]:
    """LC_ALL=C without PYTHONIOENCODING: Python's UTF-8 mode, or (PYTHONUTF8=0) ASCII for argv, files and output."""
    env = {k: v for k, v in cli_env(LC_ALL="C").items() if k not in ("PYTHONIOENCODING", "PYTHONUTF8")}
    return env if utf8_mode else {**env, "PYTHONUTF8": "0"}


def one_line_or_success(result, *, ascii_says: str = "") -> None:
    assert "Traceback" not in result.stderr and "UnicodeEncodeError" not in result.stderr, result.stderr
    if result.returncode:
        lines = result.stderr.strip().splitlines()
        assert result.returncode == 2 and len(lines) <= 3 and "error: " in lines[-1], lines
        assert ascii_says in lines[-1], lines


@pytest.mark.parametrize("utf8_mode", [True, False])
@pytest.mark.parametrize(
    "argv, config",
    [(["--exp-name", "é"], ""), (["--lerning-ré", "1"], ""), (["--data-dir", "données", "--seed", "-1"], ""),
     (["--tag", "note=café", "--batch-size", "0"], ""), ([], "exp_name: é\n"), ([], "lérning_rate: 1\n"),
     ([], "data_dir: données\nbatch_size: 0\n"), ([], "# ünïcode comment\nbatch_size: 0\n")],
)  # fmt: skip
def test_a_non_utf8_locale_with_non_ascii_input_is_one_line(tmp_path, utf8_mode, argv, config):
    if config:
        (tmp_path / "c.yaml").write_text(config, encoding="utf-8")
        argv = [*argv, "--config", str(tmp_path / "c.yaml")]
    one_line_or_success(run_cli(*argv, env=c_locale_env(utf8_mode)))


@pytest.mark.slow
@pytest.mark.parametrize("utf8_mode", [True, False])
@pytest.mark.parametrize("where", ["argv", "config"])
def test_a_non_utf8_locale_runs_non_ascii_values_or_says_why_not(tmp_path, utf8_mode, where):
    (tmp_path / "c.yaml").write_text("data_dir: données\n", encoding="utf-8")
    values = (
        ["--data-dir", "données", "--tag", "note=café"] if where == "argv" else ["--config", str(tmp_path / "c.yaml")]
    )
    result = run_cli("--exp-dir", str(tmp_path / "exp"), "--fast-dev-run", "--logger", "csv", "--num-workers", "0",
                     *values, env=c_locale_env(utf8_mode))  # fmt: skip
    one_line_or_success(result, ascii_says="--data-dir: not text in this locale's encoding (ascii)")
    assert (result.returncode == 0) == utf8_mode, result.stderr


@pytest.mark.slow
def test_the_test_server_forks_runs_of_a_process_that_imported_scikit_learn_since_it_started():
    """scikit-learn sets variables when imported; a test process that imports it after its server started must not
    lose the server (every run would then start afresh, ~4 s each, as the suite did on 2 workers)."""
    from conftest import SET_BY_IMPORTS, same_start

    code = (
        "import os; before = set(os.environ.items()); import sklearn; print(sorted(set(os.environ.items()) - before))"
    )
    base = {k: v for k, v in cli_env().items() if k not in SET_BY_IMPORTS}  # as this process started
    done = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, env=base, timeout=120)
    assert done.stdout.strip() == str(sorted(SET_BY_IMPORTS.items())), done.stderr
    threads = str(int(base.get("OMP_NUM_THREADS", "1")) + 1)  # read when torch is imported: another start
    assert same_start(base | SET_BY_IMPORTS, base) and not same_start(base | {"OMP_NUM_THREADS": threads}, base)


@pytest.mark.slow
@pytest.mark.parametrize(
    "argv",
    [("--max-epochs", "0"), ("--exp-dir", "{file}/runs", "--logger", "csv"), ("--only-test", "--exp-dir", "{tmp}"),
     ("--model", "nope"), ("--learning-rate", "0", "--config", "{file}")],
)  # fmt: skip
def test_a_run_forked_by_the_test_server_prints_and_ends_as_a_fresh_process(tmp_path, argv):
    """conftest.run_cli forks runs from a process that imported the libraries once (tests/cli_server.py): the same
    command in a fresh interpreter gives the same output, byte for byte, and the same exit status."""
    from conftest import CliServer

    (tmp_path / "file").write_text("not a folder, not a config\n")
    argv = [arg.format(file=tmp_path / "file", tmp=tmp_path) for arg in argv]
    calls = CliServer.shared().calls
    forked = run_cli(*argv)
    assert CliServer.shared().calls == calls + 1  # it went through the server
    fresh = subprocess.run([sys.executable, "-m", "project.run", *argv], capture_output=True, text=True, cwd=ROOT,
                           env=cli_env(), timeout=300)  # fmt: skip
    assert (forked.returncode, forked.stdout, forked.stderr) == (fresh.returncode, fresh.stdout, fresh.stderr)
    assert forked.returncode != 0 and forked.stderr.count("\n") <= 2, forked.stderr


def test_config_numbers_are_read_as_written_like_flags(tmp_path):
    # YAML 1.1 reads 0123 as the octal 83 and 1:30 as 90 (base 60); a flag --exp-name 0123 is the name "0123".
    config = tmp_path / "c.yaml"
    config.write_text("exp_name: 0123\nseed: 010\nmax_epochs: 1_000\nlearning_rate: 1e-3\nlogger: [csv]\n")
    args = parse_args(["--config", str(config)])
    assert (args.exp_name, args.seed, args.max_epochs, args.learning_rate, args.logger) == ("0123", 10, 1000, 1e-3,
                                                                                            ["csv"])  # fmt: skip
    config.write_text("exp_name: 1:30\n")
    with pytest.raises(SystemExit):
        parse_args(["--config", str(config)])
    config.write_text("<<: {max_epochs: 3}\nlearning_rate: 0.01\n")  # a merge key: the values line up by name
    assert (parse_args(["--config", str(config)]).max_epochs, parse_args(["--config", str(config)]).learning_rate) == (
        3, 0.01)  # fmt: skip


def test_a_config_from_a_pipe_is_read_and_one_nothing_writes_to_is_one_line(tmp_path, capsys):
    import os

    read, write = os.pipe()  # `--config <(...)`, or /dev/stdin
    os.write(write, b"max_epochs: 4\n")
    os.close(write)
    assert parse_args(["--config", f"/proc/self/fd/{read}"]).max_epochs == 4
    os.close(read)
    os.mkfifo(tmp_path / "fifo")  # opening it for reading waited for a writer for good
    with pytest.raises(SystemExit):
        parse_args(["--config", str(tmp_path / "fifo")])
    assert "a pipe that nothing writes to" in capsys.readouterr().err


def test_debug_shows_the_traceback_that_a_mistake_otherwise_hides(tmp_path):
    """A mistake is one line and exit 2; with --debug its exception goes up, traceback and all."""
    argv = ("--dataset", "diabetes", "--monitor", "val/acc", "--exp-dir", str(tmp_path / "runs"), "--logger", "csv")
    plain, debug = run_cli(*argv), run_cli(*argv, "--debug")
    assert plain.returncode == 2 and plain.stderr.count("\n") == 1 and "Traceback" not in plain.stderr, plain.stderr
    assert debug.returncode == 1 and "Traceback" in debug.stderr and "UserError: --monitor val/acc" in debug.stderr
    assert not (tmp_path / "runs").exists()


@pytest.mark.parametrize(
    "module, argv",
    [("project.seeds", ["--seeds", "password=Hunter2secret"]), ("project.sync", ["--api-token=Hunter2secret", "x"]),
     ("project.sweep", ["--study", "s", "--n-trials", "1", "--db-password=Hunter2secret"])],
)  # fmt: skip
def test_a_mistake_is_redacted_by_every_entry_point(module, argv, capsys):
    import importlib

    with pytest.raises(SystemExit) as stopped:
        importlib.import_module(module).main(argv)
    err = capsys.readouterr().err
    assert stopped.value.code == 2 and "error:" in err and "Hunter2secret" not in err, err


def test_a_name_that_is_not_utf8_is_named_itself_not_the_option_before_it(capsys):
    from project.predict import build_parser

    bad = os.fsdecode(b"bad\xff.png")  # a file name in another encoding, as the file system hands it over
    for argv, named in [(["--checkpoint", "m.ckpt", bad], "'bad\\udcff.png': not text"),
                        (["--debug", bad], "'bad\\udcff.png': not text"),
                        (["--checkpoint", bad, "x.npy"], "--checkpoint: not text")]:  # fmt: skip
        with pytest.raises(SystemExit):
            build_parser().parse_args(argv)
        error = capsys.readouterr().err
        assert named in error and "m.ckpt" not in error, error
