"""Trackers used for real, offline: MLflow through `Trackers` as records.py drives it, into a local SQLite store and
a real `mlflow server` on a loopback port (read back with MlflowClient, then killed mid-run), and through the command
line; TensorBoard event files, W&B offline files when installed; neptune and missing extras as one-line errors; what
secret redaction hides."""

from __future__ import annotations

import csv
import json
import os
import subprocess
import sys
import time
from pathlib import Path

import pytest
from conftest import ROOT, cli_env, file_digests, free_port, only_run_dir, run_cli, wait_for

from project.infra import runs
from project.infra.redact import REDACTED, redact, redact_argv, redact_path, redact_text

# Batch 16: 90 steps an epoch, so the per-step loss (written every 50 steps) shows up in 2 epochs.
TINY = ("--model", "mlp", "--num-workers", "0", "--batch-size", "16")


def rows_of(metrics_csv: Path) -> list[dict[str, str]]:
    with open(metrics_csv, newline="") as file:
        return list(csv.DictReader(file))


@pytest.mark.slow
def test_a_team_server_gets_the_run_and_a_dead_one_loses_nothing_local(mlflow_server, tmp_path):
    from mlflow.tracking import MlflowClient

    # The server ignores the password; MLflow itself would print it (its "View run at" lines).
    with_password = mlflow_server.url.replace("http://", "http://alice:Hunter2secret@")
    env = cli_env(MLFLOW_TRACKING_URI=with_password)
    exp_dir = tmp_path / "logged"
    # TensorBoard rides along: its event files must hold the same scalars.
    logged = run_cli("--exp-dir", str(exp_dir), "--max-epochs", "2", "--logger", "mlflow", "--logger", "tensorboard",
                     "--tag", "study=server", *TINY, env=env)  # fmt: skip
    assert logged.returncode == 0, logged.stderr
    run_dir = only_run_dir(exp_dir)
    manifest = json.loads((run_dir / "manifest.json").read_text())
    assert manifest["trackers"]["mlflow"]["tracking_uri"] == redact_text(with_password) != with_password
    assert f"{redact_text(with_password)}/#/experiments/" in logged.stdout
    assert "Hunter2secret" not in logged.stdout + logged.stderr
    assert not [path for path in run_dir.rglob("*") if path.is_file() and b"Hunter2secret" in path.read_bytes()]
    assert not (exp_dir / "mlflow.db").exists()  # a server's run is not also kept in a local store

    client = MlflowClient(mlflow_server.url)
    run = client.get_run(manifest["trackers"]["mlflow"]["run_id"])
    assert run.info.status == "FINISHED" and run.info.run_name == run_dir.name
    assert run.data.params["max_epochs"] == "2" and run.data.params["command"] == manifest["command"]
    assert run.data.tags["study"] == "server" and run.data.tags["git_commit"] == manifest["git"]["commit"]
    rows = rows_of(run_dir / "metrics.csv")
    history = sorted(client.get_metric_history(run.info.run_id, "val/loss"), key=lambda m: m.step)
    assert [(m.step, m.value) for m in history] == [
        (int(r["step"]), float(r["val/loss"])) for r in rows if r["val/loss"]
    ]
    assert len(client.get_metric_history(run.info.run_id, "train/loss_step")) >= 2
    names = {a.path for a in client.list_artifacts(run.info.run_id)}
    assert {"config.yaml", "curves.png", "confusion_matrix.png", "test_metrics.json"} <= names
    copy = Path(client.download_artifacts(run.info.run_id, "config.yaml", str(tmp_path)))
    assert copy.read_bytes() == (run_dir / "config.yaml").read_bytes()

    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

    events = EventAccumulator(str(run_dir / "tensorboard")).Reload()
    scalars = events.Tags()["scalars"]
    assert {"train/loss_step", "val/acc", "test/acc"} <= set(scalars)
    logged_val = [(int(r["step"]), float(r["val/acc"])) for r in rows if r["val/acc"]]
    assert [e.step for e in events.Scalars("val/acc")] == [step for step, _ in logged_val]
    assert [e.value for e in events.Scalars("val/acc")] == pytest.approx([value for _, value in logged_val])

    # The same server, killed mid-run and still down at the end: a warning, every local record whole, and the
    # command that completes the MLflow run once the server is back.
    exp_dir = tmp_path / "killed"
    epochs = 4
    process = subprocess.Popen(
        [sys.executable, "-m", "project.run", "--exp-dir", str(exp_dir), "--max-epochs", str(epochs),
         "--batch-size", "64", *TINY],
        cwd=ROOT, env=env, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True,
    )  # fmt: skip
    try:
        wait_for(lambda: first_epoch_logged(exp_dir), process, "an epoch logged", seconds=240)
        mlflow_server.kill()  # after the first epoch, before the second ends
        stdout, stderr = process.communicate(timeout=300)
    finally:
        if process.poll() is None:
            process.kill()
    assert process.returncode == 0, stderr
    assert stderr.count("warning: MLflow stopped answering") == 1 and "Traceback" not in stderr
    run_dir = only_run_dir(exp_dir)
    rows = rows_of(run_dir / "metrics.csv")
    assert sorted(int(r["epoch"]) for r in rows if r["val/acc"]) == list(range(epochs))
    for name in ("config.yaml", "curves.png", "confusion_matrix.png", "test_report.txt", "test_metrics.json",
                 "checkpoints/last.ckpt"):  # fmt: skip
        assert (run_dir / name).is_file(), name
    manifest = json.loads((run_dir / "manifest.json").read_text())
    assert manifest["exit_status"] == "finished" and manifest["trackers"]["mlflow"]["complete"] is False
    assert "Test scores:   acc " in stdout
    (line,) = [line for line in stdout.splitlines() if "python -m project.sync" in line]
    assert line.startswith("warning: MLflow still does not answer") and line.endswith(
        f"python -m project.sync {run_dir}"
    )
    mlflow_server.start()
    mlflow_server.wait_until_up()
    words = line.split(": ")[-1].split()
    assert words[:3] == ["python", "-m", "project.sync"]
    done = run_cli(*words[3:], module=words[2], env=env)
    assert done.returncode == 0, done.stderr
    run = client.get_run(manifest["trackers"]["mlflow"]["run_id"])
    assert run.info.status == "FINISHED" and len(client.get_metric_history(run.info.run_id, "val/acc")) == epochs
    assert {"curves.png", "manifest.json", "test_report.txt"} <= {
        a.path for a in client.list_artifacts(run.info.run_id)
    }
    assert len(client.search_logged_models([run.info.experiment_id], f"source_run_id = '{run.info.run_id}'")) == 1


def first_epoch_logged(exp_dir: Path) -> bool:
    found = list(exp_dir.glob("debug/*/metrics.csv"))
    return bool(found) and any(row.get("val/acc") for row in rows_of(found[0]))


@pytest.mark.slow
@pytest.mark.parametrize("where", ["nothing listens", "databricks, not configured"])
def test_a_server_that_cannot_be_reached_is_one_line_before_training(exp_dir, where):
    url = f"http://127.0.0.1:{free_port()}" if where == "nothing listens" else "databricks"
    result = run_cli("--exp-dir", str(exp_dir), *TINY, env=cli_env(MLFLOW_TRACKING_URI=url))
    assert result.returncode == 2
    (line,) = result.stderr.strip().splitlines()
    assert line.startswith(f"error: MLflow at {url} cannot be used")
    assert not exp_dir.exists()  # no run directory left behind, nor the folders made for it


def test_neptune_says_the_service_ended_and_where_runs_can_go(exp_dir):
    result = run_cli("--logger", "neptune", "--exp-dir", str(exp_dir))
    assert result.returncode == 2
    line = result.stderr.strip().splitlines()[-1]
    assert line.startswith("python -m project.run: error: argument --logger: neptune.ai ended its service in March")
    assert "neptune-exporter" in line and "mlflow" in line
    assert not exp_dir.exists()


def test_a_missing_optional_tracker_names_its_extra(tmp_path, exp_dir):
    shim = tmp_path / "shim" / "wandb"
    shim.mkdir(parents=True)
    (shim / "__init__.py").write_text("raise ImportError('No module named wandb')\n")
    env = cli_env()
    env["PYTHONPATH"] = os.pathsep.join([str(shim.parent), env["PYTHONPATH"]])
    result = run_cli("--logger", "wandb", "--exp-dir", str(exp_dir), env=env)
    assert result.returncode == 2
    (line,) = result.stderr.strip().splitlines()
    assert "wandb is not installed" in line and "pip install" in line and "[wandb]" in line
    assert not exp_dir.exists()  # before any training


@pytest.mark.slow
def test_wandb_offline_keeps_its_files_in_the_run_directory(exp_dir):
    pytest.importorskip("wandb")
    secret = "tok-" + os.urandom(8).hex()
    env = cli_env(WANDB_MODE="offline", WANDB_SILENT="true", PROJECT_FAKE_API_TOKEN=secret)
    result = run_cli("--logger", "wandb", "--exp-dir", str(exp_dir), "--max-epochs", "1", *TINY,
                     "--tag", f"hub_token={secret}", env=env)  # fmt: skip
    assert result.returncode == 0, result.stderr
    run_dir = only_run_dir(exp_dir)
    manifest = json.loads((run_dir / "manifest.json").read_text())
    (offline,) = (run_dir / "wandb").glob(f"offline-run-*-{manifest['trackers']['wandb']['id']}")
    (history,) = offline.glob("*.wandb")
    assert b"val/acc" in history.read_bytes()
    assert (offline / "files" / "curves.png").is_file()
    for path in run_dir.rglob("*"):
        if path.is_file():
            assert secret.encode() not in path.read_bytes(), path
    # A tracker refused at the start leaves no trace: MLflow, which can refuse, opens before W&B, which writes files
    # into the run; W&B online with no API key is one line too.
    before = file_digests(exp_dir)
    refusing = {"MLFLOW_TRACKING_URI": f"http://127.0.0.1:{free_port()}", "WANDB_MODE": "offline"}
    no_key = {"WANDB_MODE": "online", "WANDB_API_KEY": "", "WANDB_CONFIG_DIR": str(exp_dir.parent / "wandb-config")}
    for argv, extra, words in (
        (["--resume", "--max-epochs", "2", "--logger", "wandb", "--logger", "mlflow"], refusing, "cannot be used"),
        (["--logger", "wandb", "--logger", "mlflow"], refusing, "cannot be used"),
        (["--logger", "wandb"], no_key, "--logger wandb: W&B cannot start"),
    ):
        result = run_cli(*argv, "--exp-dir", str(exp_dir), *TINY, env=cli_env(WANDB_SILENT="true", **extra))
        errors = [line for line in result.stderr.splitlines() if line.startswith("error:")]
        assert result.returncode == 2 and len(errors) == 1 and words in errors[0], result.stderr
        assert "Traceback" not in result.stderr and file_digests(exp_dir) == before, argv


def test_help_imports_no_tracker():
    code = (
        "import sys\n"
        "from project.run import build_parser\n"
        "build_parser().format_help()\n"
        "print(sorted(m for m in ('mlflow', 'wandb', 'tensorboard', 'torch', 'lightning') if m in sys.modules))\n"
    )
    result = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, cwd=ROOT, env=cli_env())
    assert result.stdout.strip() == "[]", result.stderr


def test_tag_must_be_key_equals_value():
    result = run_cli("--tag", "nonsense")
    assert result.returncode == 2 and "--tag: invalid name=value tag value: 'nonsense'" in result.stderr


def test_redaction_by_name_by_value_and_in_urls(monkeypatch):
    monkeypatch.setenv("SOME_SERVICE_TOKEN", "abc123secret")
    monkeypatch.setenv("HARMLESS", "abc123harmless")
    assert redact_argv(["--api-key", "k1k1k1", "--hf-token=t2t2t2", "--tag", "db_password=p3p3p3", "--seed", "1"]) == [
        "--api-key", REDACTED, f"--hf-token={REDACTED}", "--tag", f"db_password={REDACTED}", "--seed", "1"
    ]  # fmt: skip
    assert redact_argv(["--tag", "note=abc123secret", "--data-dir", "abc123harmless"]) == [
        "--tag", f"note={REDACTED}", "--data-dir", "abc123harmless"
    ]  # fmt: skip
    assert redact_text("https://me:hunter22@mlflow.example.org/x") == f"https://me:{REDACTED}@mlflow.example.org/x"
    config = {"learning_rate": 0.1, "nested": {"aws_secret_access_key": "zzz", "ok": ["abc123secret", 3]}}
    assert redact(config) == {"learning_rate": 0.1, "nested": {"aws_secret_access_key": REDACTED, "ok": [REDACTED, 3]}}
    assert redact({"wandb_api_key": None}) == {"wandb_api_key": None}  # nothing to hide


@pytest.mark.parametrize(
    "value", ["db_password=abc {}", "api_key=x,{}", "my_token=a&{}", "token: a;{}", "db_password=,{}", "api_key='{}",
              "x_token:{}"]
)  # fmt: skip
def test_a_secret_value_of_one_argument_or_one_folder_is_hidden_whole(value):
    """One argument, or one folder's name, is one value: a secret-named one is hidden to its end, whatever it holds
    (in running text a value ends at a space or a comma)."""
    secret = "Hunter2secret"
    argv = redact_argv(["--tag", value.format(secret), f"--note={value.format(secret)}"])
    path = redact_path(f"/data/{value.format(secret)}/run/last.ckpt")
    assert secret not in " ".join(argv) + path and path.endswith(f"{REDACTED}/run/last.ckpt"), (argv, path)


def test_a_number_and_a_file_named_before_a_colon_are_no_secrets():
    """A backbone's `num_tokens` or `key_dim` stays in config.yaml, which resume and --only-test read again; an error
    line that names a config file (keypoints, tokenizer, monkey) says what is wrong with it."""
    options = {"num_tokens": 4, "key_dim": 64, "use_key": True, "token_dropout": 0.1, "api_key": "k1k1k1"}
    assert redact(options) == {**options, "api_key": REDACTED}
    for path in ("/data/keypoints/exp.yaml", "monkey.yaml", "turkey_params.yaml", "tokenizer-v2.yaml"):
        line = f"--config {path}: unknown option 'learnig_rate'; did you mean learning_rate?"
        assert redact_text(line) == line
    for form in ("api_key: {}", "hf_tokens: {}", "db.password: {}", "SECRET:{}", "x/my_token=b/{}"):
        assert "Hunter2secret" not in redact_text(form.format("Hunter2secret")), form


def test_a_url_password_with_a_slash_and_a_path_redacted_already_stay_as_they_should():
    for password in ("Hunter2/secret", "p@ssHunter2secret"):  # as SQLAlchemy and requests read it: to the last '@'
        assert redact_text(f"postgresql://u:{password}@127.0.0.1:1/db") == f"postgresql://u:{REDACTED}@127.0.0.1:1/db"
    store = runs.sqlite_url(Path("/runs/x_token:Hunter2secret/mlflow.db"))  # SQLAlchemy escapes ':' as %3A
    assert "Hunter2secret" not in redact_path(store) and redact_path(store).endswith(f"{REDACTED}/mlflow.db")
    once = redact_path("/x/password=Hunter2secret/debug/run-1")
    assert once == f"/x/password={REDACTED}/debug/run-1" and redact_text(f"Run directory: {once}") == (
        f"Run directory: {once}"
    )
    assert redact_text(f"password={REDACTED}Hunter2secret") == f"password={REDACTED}"


@pytest.mark.slow
def test_tensorboard_gets_the_learning_rate_the_hyperparameters_with_test_scores_and_the_plots(exp_dir):
    result = run_cli("--exp-dir", str(exp_dir), "--max-epochs", "2", "--logger", "tensorboard", *TINY)
    assert result.returncode == 0, result.stderr
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

    run_dir = only_run_dir(exp_dir)
    events = EventAccumulator(str(run_dir / "tensorboard"), size_guidance={"images": 0, "tensors": 0}).Reload()
    tags = events.Tags()
    assert {"lr", "val/loss", "hparams/test_acc"} <= set(tags["scalars"])
    assert [round(e.value, 9) for e in events.Scalars("lr")] == [1e-3, 5e-4]  # cosine over 2 epochs
    recorded = json.loads((run_dir / "test_metrics.json").read_text())
    assert events.Scalars("hparams/test_acc")[-1].value == pytest.approx(recorded["acc"])
    assert {"curves", "confusion_matrix"} <= set(tags["images"])
    # The HPARAMS tab: the run's configuration beside those scores.
    hparams = events.PluginTagToContent("hparams")
    assert {"_hparams_/experiment", "_hparams_/session_start_info"} <= set(hparams)
    assert (
        b"learning_rate" in hparams["_hparams_/session_start_info"]
        and b"hparams/test_acc" in hparams["_hparams_/experiment"]
    )


@pytest.mark.slow
def test_predict_takes_the_mlflow_model_the_run_logged(exp_dir, tmp_path):
    import numpy as np

    result = run_cli("--exp-dir", str(exp_dir), "--max-epochs", "1", *TINY)
    assert result.returncode == 0, result.stderr
    run_dir = only_run_dir(exp_dir)
    model_uri = json.loads((run_dir / "manifest.json").read_text())["trackers"]["mlflow"]["model_uri"]
    from sklearn.datasets import load_digits

    np.save(tmp_path / "digits.npy", load_digits().images[:20])
    env = cli_env(MLFLOW_TRACKING_URI=f"sqlite:///{(exp_dir / 'mlflow.db').resolve()}")
    outputs = {}
    for name, source in (("mlflow", model_uri), ("checkpoint", str(next((run_dir / "checkpoints").glob("best-*"))))):
        outputs[name] = tmp_path / f"{name}.csv"
        done = run_cli("--checkpoint", source, str(tmp_path / "digits.npy"), "--output", str(outputs[name]),
                       module="project.predict", env=env)  # fmt: skip
        assert done.returncode == 0, done.stderr
    rows = {name: rows_of(path) for name, path in outputs.items()}
    assert [r["predicted"] for r in rows["mlflow"]] == [r["predicted"] for r in rows["checkpoint"]]
    for ours, theirs in zip(rows["mlflow"], rows["checkpoint"], strict=True):
        assert [float(ours[k]) for k in ours if k.startswith("prob_")] == pytest.approx(
            [float(theirs[k]) for k in theirs if k.startswith("prob_")], abs=1e-5
        )


@pytest.mark.slow
def test_a_copied_run_resumes_into_records_of_its_own_and_keeps_its_tracker_links(exp_dir):
    """A run directory copied (to branch a run off) and resumed: the original's files and MLflow run stay as they
    were, the copy continues where it is (its experiment) in an MLflow run of its own; resumed with another --logger,
    its manifest still names that MLflow run."""
    import shutil

    import yaml
    from mlflow import MlflowClient

    from project.infra.tracking import local_store

    assert run_cli("--exp-dir", str(exp_dir), "--exp-name", "a", "--max-epochs", "1", *TINY).returncode == 0
    original = only_run_dir(exp_dir, "a")
    shutil.copytree(exp_dir / "a", exp_dir / "b", symlinks=True)
    copy = exp_dir / "b" / original.name
    client, files = MlflowClient(local_store(exp_dir)), file_digests(original)
    original_id = json.loads((original / "manifest.json").read_text())["trackers"]["mlflow"]["run_id"]
    points = history(client, original_id, "val/loss")

    resumed = run_cli("--resume", str(copy / "checkpoints" / "last.ckpt"), "--max-epochs", "2", "--exp-dir",
                      str(exp_dir), *TINY)  # fmt: skip
    assert resumed.returncode == 0, resumed.stderr
    assert file_digests(original) == files and history(client, original_id, "val/loss") == points
    manifest = json.loads((copy / "manifest.json").read_text())
    copy_id = manifest["trackers"]["mlflow"]["run_id"]
    assert copy_id != original_id and len(history(client, copy_id, "val/loss")) == 2  # its first epoch too
    assert manifest["experiment"] == yaml.safe_load((copy / "config.yaml").read_text())["exp_name"] == "b"

    again = run_cli("--resume", "--exp-name", "b", "--max-epochs", "3", "--exp-dir", str(exp_dir), "--logger", "csv",
                    *TINY)  # fmt: skip
    assert again.returncode == 0, again.stderr
    assert json.loads((copy / "manifest.json").read_text())["trackers"]["mlflow"]["run_id"] == copy_id
    assert f"warning: MLflow run {copy_id} has this run only in part; python -m project.sync {copy}" in again.stdout
    assert file_digests(original) == files

    # The original renamed, then resumed: the same MLflow run goes on (the manifest's run id names it, not the folder).
    renamed = original.rename(original.parent / "renamed-1")
    moved = run_cli("--resume", str(renamed / "checkpoints" / "last.ckpt"), "--max-epochs", "2", *TINY)
    assert moved.returncode == 0 and "warning" not in moved.stderr, moved.stderr
    assert json.loads((renamed / "manifest.json").read_text())["trackers"]["mlflow"]["run_id"] == original_id
    assert len(history(client, original_id, "val/loss")) == 2
    experiment = client.get_experiment_by_name("a").experiment_id
    assert [run.info.run_id for run in client.search_runs([experiment])] == [original_id]


# --- MLflow through Trackers, as records.py drives it, in this process ---------------------------------------------

TAGS = {"user": "tester", "study": "trackers"}


def mlflow_args(exp_dir: Path):
    import argparse

    return argparse.Namespace(exp_dir=str(exp_dir), exp_name="exp")


@pytest.fixture(scope="module")
def empty_store(tmp_path_factory) -> Path:
    """A new store's tables take MLflow a second or more to create: made once, copied into each test."""
    from mlflow.tracking import MlflowClient

    from project.infra.tracking import local_store

    root = tmp_path_factory.mktemp("empty-store")
    MlflowClient(local_store(root)).search_experiments()
    return root / "mlflow.db"


@pytest.fixture
def local(tmp_path, empty_store, monkeypatch) -> Path:
    """An --exp-dir with an (empty) local store and no MLFLOW_TRACKING_URI: the default."""
    import shutil

    monkeypatch.delenv("MLFLOW_TRACKING_URI", raising=False)
    exp_dir = tmp_path / "exp-dir"
    exp_dir.mkdir()
    shutil.copyfile(empty_store, exp_dir / "mlflow.db")
    return exp_dir


def open_trackers(exp_dir: Path, name: str, previous: dict | None = None):
    from project.infra.tracking import Trackers

    directory = exp_dir / "exp" / name
    directory.mkdir(parents=True, exist_ok=True)
    trackers = Trackers(["mlflow"])
    trackers.open(directory, mlflow_args(exp_dir), {"trackers": {"mlflow": previous}} if previous else {}, TAGS)
    return trackers


def history(client, run_id: str, key: str) -> list[tuple[int, float]]:
    return sorted((m.step, m.value) for m in client.get_metric_history(run_id, key))


def tiny_checkpoint(path: Path) -> Path:
    """A checkpoint as the Solver writes it (weights and plain hyperparameters), for read_model."""
    import torch

    from project.model import build_model

    hparams = {"task": "classification", "output_names": list("abc"), "model": "cnn", "input_shape": [1, 8, 8],
               "mean": [4.0], "std": [6.0], "pixel_max": 16, "model_options": {"hidden_dim": 16}}  # fmt: skip
    network = build_model("cnn", (1, 8, 8), 3, mean=[4.0], std=[6.0], hidden_dim=16)
    torch.save({"hyper_parameters": hparams, "state_dict": {f"model.{k}": v for k, v in network.state_dict().items()}},
               path)  # fmt: skip
    return path


def test_a_run_in_the_default_local_store_has_what_was_logged_and_the_tested_model(local, tmp_path, capsys):
    import mlflow
    import numpy as np
    import torch

    from project.export import example_input
    from project.infra.checkpoints import read_model
    from project.infra.tracking import local_store

    trackers = open_trackers(local, "run-1")
    trackers.start({"lr": 0.1, "model": "cnn", "command": "python -m project.run " + "x" * 300})
    logged = [(step, {"train/loss": 1.0 / (step + 1), "epoch": float(step // 10)}) for step in range(0, 300, 10)]
    started = time.perf_counter()
    for step, values in logged:
        for logger in trackers.loggers[1:]:
            logger.log_metrics(values, step)
    assert time.perf_counter() - started < 1.0  # 30 calls: none waits for the store
    checkpoint = tiny_checkpoint(tmp_path / "best.ckpt")
    trackers.log_model(checkpoint)
    run_dir = local / "exp" / "run-1"
    (run_dir / "config.yaml").write_text("lr: 0.1\n")
    (run_dir / "manifest.json").write_text("{}\n")
    trackers.finish(run_dir, [run_dir / "config.yaml", run_dir / "missing.png"], None)
    assert trackers.close(run_dir / "manifest.json", "finished") == []
    assert capsys.readouterr().err == ""  # MLflow's chatter reaches no terminal

    uri = local_store(local)
    described = trackers.describe()["mlflow"]
    assert uri == f"sqlite:///{(local / 'mlflow.db').resolve()}" and described["tracking_uri"] == uri
    assert described["complete"] is True and described["model_uri"].startswith("models:/")
    client = mlflow.MlflowClient(uri)
    run = client.get_run(described["run_id"])
    assert run.info.status == "FINISHED" and run.info.run_name == "run-1"
    assert (
        client.get_experiment(run.info.experiment_id).name == "exp"
        and described["experiment_id"] == run.info.experiment_id
    )
    assert run.info.artifact_uri.startswith((local / "mlflow-artifacts" / "exp").resolve().as_uri())
    assert run.data.params["lr"] == "0.1" and run.data.params["command"].endswith("x" * 300)  # not cut at 250
    assert run.data.tags["study"] == "trackers" and run.data.tags["mlflow.runName"] == "run-1"
    assert history(client, run.info.run_id, "train/loss") == [(step, v["train/loss"]) for step, v in logged]
    assert {a.path for a in client.list_artifacts(run.info.run_id)} >= {"config.yaml", "manifest.json"}
    assert "missing.png" not in {a.path for a in client.list_artifacts(run.info.run_id)}
    line = trackers.how_to_open()[0]
    assert line.startswith(f"mlflow ui --backend-store-uri {uri}")
    assert f"#/experiments/{run.info.experiment_id}/runs/{run.info.run_id}" in line

    # The model: the network of the checkpoint, its spec as metadata["project"], a signature and an input example.
    network, spec = read_model(checkpoint)
    mlflow.set_tracking_uri(uri)
    info = mlflow.models.get_model_info(described["model_uri"])
    assert info.metadata["project"] == spec and info.saved_input_example_info is not None
    assert [s.shape for s in info.signature.inputs.inputs] == [(-1, 1, 8, 8)]
    assert [s.shape for s in info.signature.outputs.inputs] == [(-1, 3)]
    assert [output.model_id for output in run.outputs.model_outputs] == [info.model_id]
    model = mlflow.pyfunc.load_model(f"runs:/{run.info.run_id}/model")  # as project.predict loads it
    for batch in (1, 3):  # the batch axis is dynamic, a batch of 1 included
        x = example_input(spec, batch, seed=batch)
        with torch.no_grad():
            np.testing.assert_allclose(model.predict(x.numpy()), network(x).numpy(), atol=1e-5)


def test_each_way_a_run_ends_is_its_mlflow_status(local):
    import mlflow

    from project.infra.tracking import local_store

    client = mlflow.MlflowClient(local_store(local))
    for status, expected in (("finished", "FINISHED"), ("interrupted", "KILLED"), ("pruned", "KILLED"),
                             ("failed: ValueError", "FAILED")):  # fmt: skip
        trackers = open_trackers(local, status.split(":")[0])
        trackers.start({"lr": 0.1})
        assert trackers.close(local / "no-manifest.json", status) == []
        assert client.get_run(trackers.describe()["mlflow"]["run_id"]).info.status == expected, status


def test_resuming_reopens_the_run_untouched_until_training_starts(local):
    import mlflow

    from project.infra.tracking import local_store

    client = mlflow.MlflowClient(local_store(local))
    first = open_trackers(local, "run-1")
    first.start({"max_epochs": 2, "lr": 0.1})
    first.loggers[1].log_metrics({"val/loss": 0.5}, step=10)
    first.close(local / "none.json", "interrupted")
    previous = first.describe()["mlflow"]
    run_id = previous["run_id"]

    # Reopened, then abandoned before training (a bad option, a checkpoint that does not fit): nothing changes.
    untouched = open_trackers(local, "run-1", previous)
    assert untouched.describe()["mlflow"]["run_id"] == run_id
    untouched.abandon()
    run = client.get_run(run_id)
    assert (
        run.info.status == "KILLED"
        and run.info.lifecycle_stage == "active"
        and "resumed.max_epochs" not in run.data.tags
    )

    second = open_trackers(local, "run-1", previous)
    assert client.get_run(run_id).info.status == "KILLED"  # until training starts
    second.start({"max_epochs": 4, "lr": 0.1, "note": "new"})
    assert client.get_run(run_id).info.status == "RUNNING"
    second.loggers[1].log_metrics({"val/loss": 0.25}, step=20)
    assert second.close(local / "none.json", "finished") == []
    run = client.get_run(run_id)
    assert run.info.status == "FINISHED" and second.describe()["mlflow"]["run_id"] == run_id
    # MLflow refuses to change a param: the new value is a tag.
    assert run.data.params["max_epochs"] == "2" and run.data.tags["resumed.max_epochs"] == "4"
    assert run.data.params["note"] == "new" and "resumed.lr" not in run.data.tags
    assert history(client, run_id, "val/loss") == [(10, 0.5), (20, 0.25)]


def test_a_failed_start_leaves_no_running_run_and_a_deleted_one_is_not_resumed(local, capsys):
    import mlflow

    from project.infra.tracking import local_store

    client = mlflow.MlflowClient(local_store(local))
    abandoned = open_trackers(local, "never-started")
    run_id = abandoned.describe()["mlflow"]["run_id"]
    abandoned.abandon()  # the run failed before training: its new tracker run is removed (MLflow can restore it)
    assert client.get_run(run_id).info.lifecycle_stage == "deleted"

    first = open_trackers(local, "run-1")
    first.start({})
    first.close(local / "none.json", "finished")
    client.delete_run(first.describe()["mlflow"]["run_id"])
    capsys.readouterr()
    second = open_trackers(local, "run-1", first.describe()["mlflow"])
    assert second.describe()["mlflow"]["run_id"] != first.describe()["mlflow"]["run_id"]
    (warning,) = [line for line in capsys.readouterr().err.splitlines() if line.strip()]
    assert first.describe()["mlflow"]["run_id"] in warning and "new MLflow run" in warning
    second.abandon()


def test_runs_one_after_another_in_one_process_each_use_their_own_store(tmp_path, empty_store, monkeypatch):
    """As project.sweep and project.seeds run them (MLflow's set_tracking_uri exports its URI to the environment)."""
    import shutil

    import mlflow

    from project.infra.tracking import local_store

    monkeypatch.delenv("MLFLOW_TRACKING_URI", raising=False)
    for name in ("first", "second"):
        (tmp_path / name).mkdir()
        shutil.copyfile(empty_store, tmp_path / name / "mlflow.db")
        trackers = open_trackers(tmp_path / name, "run")
        trackers.start({"lr": 0.1})
        assert trackers.close(tmp_path / "none.json", "finished") == []
        described = trackers.describe()["mlflow"]
        assert described["tracking_uri"] == local_store(tmp_path / name)
        assert mlflow.MlflowClient(local_store(tmp_path / name)).get_run(described["run_id"]).info.status == "FINISHED"
    assert "MLFLOW_TRACKING_URI" not in os.environ


def test_a_server_that_cannot_be_reached_is_one_line_quickly(tmp_path, monkeypatch):
    from project.infra.errors import UserError

    url = f"http://127.0.0.1:{free_port()}"  # nothing listens there
    monkeypatch.setenv("MLFLOW_TRACKING_URI", url)
    started = time.monotonic()
    with pytest.raises(UserError) as raised:
        open_trackers(tmp_path, "r")
    message = str(raised.value)
    assert message.startswith(f"MLflow at {url} cannot be used (no answer from {url}")
    assert "MLFLOW_TRACKING_URI" in message and "PROJECT_TRACKING=offline" in message and "\n" not in message
    assert time.monotonic() - started < 30


def test_a_wait_for_the_local_store_says_whom_it_waits_for(tmp_path, capsys):
    import fcntl
    import threading

    from project.infra.tracking import local_store, store_lock

    holder = open(tmp_path / "mlflow.db.lock", "a")  # noqa: SIM115 (another process creating the store, as it holds it)
    fcntl.flock(holder, fcntl.LOCK_EX)
    threading.Timer(2.5, holder.close).start()  # closing drops the lock
    with store_lock(local_store(tmp_path)):
        pass
    assert f"waiting for another process that holds {tmp_path / 'mlflow.db.lock'}" in capsys.readouterr().err


def test_metrics_csv_of_a_resumed_run_loses_only_what_the_ended_session_logged_after_its_checkpoint(tmp_path):
    """A finished run extended, then killed before its first new checkpoint (step 69): the rows its killed session
    logged from that step on go (they are logged again); the first session's test rows at step 69 stay."""
    from project.infra.tracking import csv_logger

    path = tmp_path / "metrics.csv"
    path.write_text(
        "step,lr,test/acc,timestamp,val/loss\n68,,,1000,0.5\n69,,0.9,1000,\n69,0.001,,2500,\n75,,,2600,0.4\n"
    )
    csv_logger(path).rewind(69, since=2000)
    with open(path, newline="") as file:
        assert [(row["step"], row["timestamp"]) for row in csv.DictReader(file)] == [("68", "1000"), ("69", "1000")]
