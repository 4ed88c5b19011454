"""Every run's records: run directory, config.yaml, manifest.json, checkpoints, metrics.csv, plots, test report,
the end-of-run summary, the local MLflow store read back; --only-test and --resume continuing them; two runs
started together; a planted token and a planted symlink. One short default run serves the read-only checks."""

from __future__ import annotations

import json
import secrets
import subprocess
import sys
from pathlib import Path
from types import SimpleNamespace

import pytest
import yaml
from conftest import ROOT, cli_env, run_cli, run_dirs

from project.run import build_parser, config_of, parse_args
from project.tasks import Classification

# Batch 16: 90 steps an epoch, so the per-step loss (written every 50 steps) shows up in 2 epochs.
TINY = ("--model", "mlp", "--num-workers", "0", "--batch-size", "16")
# Random per test session, so no test can pass by matching a fixed string somewhere.
FAKE_TOKEN = "tok-" + secrets.token_hex(12)
FAKE_TAG_SECRET = "sec-" + secrets.token_hex(12)
FAKE_ONE_TOKEN_SECRET = "one-" + secrets.token_hex(12)  # --tag=db_token=... as a single token
PNG_SIGNATURE = b"\x89PNG\r\n\x1a\n"


def launch(*args: str, cwd: Path, env: dict[str, str]) -> subprocess.Popen:
    """`python -m project.run ARGS` started in the background from `cwd`."""
    return subprocess.Popen(
        [sys.executable, "-m", "project.run", *args],
        cwd=cwd,
        env=env,
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
        text=True,
    )


def finish(process: subprocess.Popen, timeout: float = 300) -> SimpleNamespace:
    stdout, stderr = process.communicate(timeout=timeout)
    return SimpleNamespace(returncode=process.returncode, stdout=stdout, stderr=stderr)


def mlflow_client(exp_dir: Path):
    from mlflow.tracking import MlflowClient

    return MlflowClient(f"sqlite:///{(exp_dir / 'mlflow.db').resolve().as_posix()}")


@pytest.fixture(scope="module")
def default_run(tmp_path_factory) -> SimpleNamespace:
    """Two epochs of the default job (default tracker), from an empty working directory, with a fake token
    in the environment and secrets in --tag."""
    root = tmp_path_factory.mktemp("default-run")
    cwd, exp_dir = root / "cwd", root / "experiments"
    cwd.mkdir()
    argv = ["--exp-dir", str(exp_dir), "--max-epochs", "2", *TINY, "--logger", "mlflow", "--logger", "tensorboard",
            "--tag", "study=s1", "--tag", f"hub_token={FAKE_TAG_SECRET}", "--tag", f"note={FAKE_TOKEN}",
            f"--tag=db_token={FAKE_ONE_TOKEN_SECRET}"]  # fmt: skip
    result = finish(launch(*argv, cwd=cwd, env=cli_env(PROJECT_FAKE_API_TOKEN=FAKE_TOKEN)))
    assert result.returncode == 0, result.stderr
    (run_dir,) = run_dirs(exp_dir)
    manifest = json.loads((run_dir / "manifest.json").read_text())
    return SimpleNamespace(result=result, argv=argv, cwd=cwd, exp_dir=exp_dir, run_dir=run_dir, manifest=manifest)


@pytest.mark.slow
def test_a_default_run_leaves_every_record(default_run):
    run_dir = default_run.run_dir
    for name in ("config.yaml", "manifest.json", "metrics.csv", "curves.png", "confusion_matrix.png",
                 "test_report.txt", "test_metrics.json", "checkpoints/last.ckpt"):  # fmt: skip
        assert (run_dir / name).is_file(), name
    assert len(list((run_dir / "checkpoints").glob("best-epoch*.ckpt"))) == 1
    assert not (default_run.cwd / "mlruns").exists() and not any(default_run.cwd.iterdir())

    # The one-screen summary: where, best epoch, test metrics, how to open the tracker.
    recorded = json.loads((run_dir / "test_metrics.json").read_text())
    summary = default_run.result.stdout
    assert f"Run directory: {run_dir}" in summary
    assert f"Best epoch:    {recorded['checkpoint_epoch']} (val/loss " in summary
    assert f"Test scores:   acc {recorded['acc']:.4f}" in summary
    store = (default_run.exp_dir / "mlflow.db").resolve()
    assert f"mlflow ui --backend-store-uri sqlite:///{store}" in summary
    assert default_run.manifest["trackers"]["mlflow"]["run_id"] in summary


@pytest.mark.slow
def test_manifest_says_what_ran_where_and_how_it_ended(default_run):
    manifest = default_run.manifest
    assert manifest["run_id"] == default_run.run_dir.name and manifest["experiment"] == "debug"
    assert manifest["command"].startswith("python -m project.run --exp-dir ")
    assert "--max-epochs 2" in manifest["command"] and "study=s1" in manifest["command"]
    assert manifest["user"] and manifest["host"]
    assert manifest["start_time"] <= manifest["end_time"] and manifest["exit_status"] == "finished"
    commit = subprocess.run(["git", "-C", str(ROOT), "rev-parse", "HEAD"], capture_output=True, text=True)
    assert manifest["git"]["commit"] == commit.stdout.strip() and isinstance(manifest["git"]["dirty"], bool)
    assert {"python", "torch", "lightning"} <= set(manifest["versions"])
    assert manifest["hardware"]["accelerator"] == "cpu" and len(manifest["hardware"]["devices"]) == 1
    assert manifest["data"]["dataset"] == "digits"
    assert sum(manifest["data"]["split_sizes"].values()) == 1797  # scikit-learn's digits, all of it
    assert manifest["seed"] == 0 and manifest["tags"]["study"] == "s1"


@pytest.mark.slow
def test_metrics_csv_plots_and_test_report(default_run):
    import csv

    from PIL import Image

    run_dir = default_run.run_dir
    with open(run_dir / "metrics.csv", newline="") as file:
        rows = list(csv.DictReader(file))
    for column in ("train/loss", "train/acc", "val/loss", "val/acc"):
        assert sorted(int(r["epoch"]) for r in rows if r[column]) == [0, 1], column
    # The step loss is written every LOG_EVERY_N_STEPS steps: in order, once each, when the run is that long.
    from project.run import LOG_EVERY_N_STEPS

    steps = [int(r["step"]) for r in rows if r.get("train/loss_step")]
    assert steps == sorted(set(steps))
    assert len(steps) == max(int(r["step"]) for r in rows) // LOG_EVERY_N_STEPS

    for name in ("curves.png", "confusion_matrix.png"):
        data = (run_dir / name).read_bytes()
        assert data.startswith(PNG_SIGNATURE)
        with Image.open(run_dir / name) as image:
            image.verify()
            assert image.width >= 300 and image.height >= 300

    recorded = json.loads((run_dir / "test_metrics.json").read_text())
    class_names = [str(d) for d in range(10)]
    assert list(recorded["per_class"]) == class_names
    test_size = default_run.manifest["data"]["split_sizes"]["test"]
    assert sum(c["support"] for c in recorded["per_class"].values()) == test_size
    confusion = recorded["confusion_matrix"]
    assert recorded["acc"] == sum(confusion[i][i] for i in range(10)) / sum(map(sum, confusion))
    assert recorded["checkpoint"].endswith(".ckpt")
    report = (run_dir / "test_report.txt").read_text()
    assert "accuracy" in report and f"{recorded['acc']:.4f}" in report
    assert report in default_run.result.stdout  # ten classes fit on the screen


@pytest.mark.slow
def test_config_yaml_round_trip_gives_identical_hyperparameters(default_run):
    written = yaml.safe_load((default_run.run_dir / "config.yaml").read_text())
    again = config_of(parse_args(["--config", str(default_run.run_dir / "config.yaml")]))
    original = config_of(parse_args(default_run.argv))
    assert written == original == again
    assert not build_parser().command_only & set(written)
    # ... and the tracker holds the same values.
    client = mlflow_client(default_run.exp_dir)
    params = client.get_run(default_run.manifest["trackers"]["mlflow"]["run_id"]).data.params
    assert {k: str(v) for k, v in written.items()} == {k: params[k] for k in written}


@pytest.mark.slow
def test_the_local_mlflow_store_holds_the_run(default_run):
    import csv

    client = mlflow_client(default_run.exp_dir)
    tracked = default_run.manifest["trackers"]["mlflow"]
    run = client.get_run(tracked["run_id"])
    assert run.info.status == "FINISHED" and run.info.run_name == default_run.run_dir.name
    assert tracked["complete"] is True
    # Params: the whole config, user and command.
    assert run.data.params["command"] == default_run.manifest["command"]
    assert run.data.params["user"] == default_run.manifest["user"]
    assert run.data.params["max_epochs"] == "2" and run.data.params["model"] == "mlp"
    # Tags: git commit, user, --tag.
    tags = run.data.tags
    assert tags["git_commit"] == default_run.manifest["git"]["commit"] and tags["user"] == default_run.manifest["user"]
    assert tags["study"] == "s1" and tags["run_dir"] == str(default_run.run_dir)
    # Metrics per step, the same as metrics.csv.
    with open(default_run.run_dir / "metrics.csv", newline="") as file:
        rows = list(csv.DictReader(file))
    for key in ("train/loss_step", "val/acc"):
        history = sorted(client.get_metric_history(run.info.run_id, key), key=lambda m: m.step)
        assert [m.step for m in history] == [int(r["step"]) for r in rows if r[key]], key
        assert [m.value for m in history] == pytest.approx([float(r[key]) for r in rows if r[key]]), key
    # Artifacts: the plots, config and reports, stored under --exp-dir.
    names = {a.path for a in client.list_artifacts(run.info.run_id)}
    assert {"config.yaml", "curves.png", "confusion_matrix.png", "test_metrics.json", "manifest.json"} <= names
    assert run.info.artifact_uri.startswith(default_run.exp_dir.resolve().as_uri())
    copy = Path(client.download_artifacts(run.info.run_id, "curves.png", str(default_run.cwd.parent)))
    assert copy.read_bytes() == (default_run.run_dir / "curves.png").read_bytes()


@pytest.mark.slow
def test_planted_secrets_are_written_nowhere(default_run):
    manifest = default_run.manifest
    # The secrets did get into the run (as tags): they arrive redacted, by name and by value.
    assert manifest["tags"]["hub_token"] == "[redacted]" and manifest["tags"]["note"] == "[redacted]"
    assert manifest["tags"]["db_token"] == "[redacted]" and "--tag=db_token=[redacted]" in manifest["command"]
    everything = [p for p in default_run.exp_dir.rglob("*") if p.is_file()]
    assert any(p.name == "mlflow.db" for p in everything) and len(everything) > 15
    for path in everything:
        data = path.read_bytes()
        for secret in (FAKE_TOKEN, FAKE_TAG_SECRET, FAKE_ONE_TOKEN_SECRET):
            assert secret.encode() not in data, (path, secret)
    for stream in (default_run.result.stdout, default_run.result.stderr):
        assert FAKE_TOKEN not in stream and FAKE_TAG_SECRET not in stream and FAKE_ONE_TOKEN_SECRET not in stream


@pytest.mark.slow
def test_only_test_on_the_best_checkpoint_reproduces_the_recorded_accuracy(default_run):
    recorded = json.loads((default_run.run_dir / "test_metrics.json").read_text())
    result = run_cli("--only-test", "--exp-dir", str(default_run.exp_dir), "--num-workers", "0", "--logger", "csv")
    assert result.returncode == 0, result.stderr
    (test_run,) = [d for d in run_dirs(default_run.exp_dir) if d != default_run.run_dir]
    retested = json.loads((test_run / "test_metrics.json").read_text())
    assert retested["checkpoint"] == recorded["checkpoint"]
    assert retested["acc"] == recorded["acc"] and retested["loss"] == recorded["loss"]
    assert retested["per_class"] == recorded["per_class"]
    assert json.loads((test_run / "manifest.json").read_text())["mode"] == "test"


@pytest.mark.slow
def test_resume_continues_the_run_directory_and_the_tracker_run(default_run):
    """Last in this file: it extends the shared run."""
    import csv

    client = mlflow_client(default_run.exp_dir)
    run_id = default_run.manifest["trackers"]["mlflow"]["run_id"]
    before = sorted(m.step for m in client.get_metric_history(run_id, "train/loss_step"))
    dirs_before = run_dirs(default_run.exp_dir)

    result = run_cli("--resume", "--max-epochs", "3", "--exp-dir", str(default_run.exp_dir), *TINY)
    assert result.returncode == 0, result.stderr
    assert f"Run directory: {default_run.run_dir}" in result.stdout
    assert run_dirs(default_run.exp_dir) == dirs_before  # no new directory

    manifest = json.loads((default_run.run_dir / "manifest.json").read_text())
    assert manifest["start_time"] == default_run.manifest["start_time"] and manifest["exit_status"] == "finished"
    (resumed,) = manifest["resumed"]
    assert resumed["changed"] == {"max_epochs": [2, 3]} and resumed["exit_status"] == "finished"
    assert resumed["from"].endswith("last.ckpt")
    assert manifest["trackers"]["mlflow"]["run_id"] == run_id  # the same tracker run ...
    run = client.get_run(run_id)
    assert run.info.status == "FINISHED" and run.data.tags["resumed.max_epochs"] == "3"
    after = sorted(m.step for m in client.get_metric_history(run_id, "train/loss_step"))
    assert after[: len(before)] == before and len(after) > len(before)  # ... with the step count going on
    assert after == sorted(set(after))
    with open(default_run.run_dir / "metrics.csv", newline="") as file:
        epochs = sorted({int(r["epoch"]) for r in csv.DictReader(file) if r["val/acc"]})
    assert epochs == [0, 1, 2]  # the first session's rows kept, the new epoch appended


@pytest.mark.slow
def test_two_runs_started_together_never_share_anything(tmp_path):
    exp_dir = tmp_path / "experiments"
    common = ("--exp-dir", str(exp_dir), "--max-epochs", "1", *TINY)
    runs = {who: launch(*common, "--tag", f"who={who}", cwd=ROOT, env=cli_env()) for who in ("a", "b")}
    results = {who: finish(process) for who, process in runs.items()}
    for result in results.values():
        assert result.returncode == 0, result.stderr

    dirs = run_dirs(exp_dir)
    assert len(dirs) == 2
    manifests = {json.loads((d / "manifest.json").read_text())["tags"]["who"]: d for d in dirs}
    assert set(manifests) == {"a", "b"}
    client = mlflow_client(exp_dir)
    tracker_runs = set()
    for who, run_dir in manifests.items():
        manifest = json.loads((run_dir / "manifest.json").read_text())
        assert manifest["run_id"] == run_dir.name and f"who={who}" in manifest["command"]
        assert f"Run directory: {run_dir}" in results[who].stdout
        assert (run_dir / "checkpoints" / "last.ckpt").is_file() and (run_dir / "test_metrics.json").is_file()
        run = client.get_run(manifest["trackers"]["mlflow"]["run_id"])
        assert run.data.tags["who"] == who and run.data.tags["run_dir"] == str(run_dir)
        assert run.info.status == "FINISHED" and "val/acc" in run.data.metrics
        tracker_runs.add(run.info.run_id)
    assert len(tracker_runs) == 2


def test_a_planted_symlink_is_not_followed_out_of_exp_dir(tmp_path):
    from project.infra.errors import UserError
    from project.infra.records import create_run_dir

    outside, exp_dir = tmp_path / "outside", tmp_path / "experiments"
    outside.mkdir()
    exp_dir.mkdir()
    (exp_dir / "debug").symlink_to(outside, target_is_directory=True)
    with pytest.raises(UserError, match="symbolic link"):
        create_run_dir(exp_dir / "debug" / "20260101-000000-abcdef01")
    assert not any(outside.iterdir())

    create_run_dir(exp_dir / "real" / "20260101-000000-abcdef01")
    with pytest.raises(UserError, match="exists already"):  # a run directory is never shared
        create_run_dir(exp_dir / "real" / "20260101-000000-abcdef01")


# Writes `letter` slowly into the target through files.write_file, once the file `go` appears.
SLOW_WRITER = """
import sys, time
from pathlib import Path
from project.infra.files import write_file
target, letter, go = Path(sys.argv[1]), sys.argv[2], Path(sys.argv[3])
while not go.exists():
    time.sleep(0.005)
def slowly(path):
    with open(path, "w") as file:
        for _ in range(40):
            file.write(letter * 1000)
            file.flush()
            time.sleep(0.01)
write_file(target, slowly)
"""


def test_two_processes_writing_one_file_at_once_each_leave_a_whole_one(tmp_path):
    target, go = tmp_path / "out.txt", tmp_path / "go"
    writers = [subprocess.Popen([sys.executable, "-c", SLOW_WRITER, str(target), letter, str(go)], env=cli_env(),
                                stderr=subprocess.PIPE, text=True) for letter in "ab"]  # fmt: skip
    go.touch()
    for writer in writers:
        assert writer.wait(timeout=120) == 0, writer.stderr.read()
    assert target.read_text() in ("a" * 40000, "b" * 40000)
    assert sorted(p.name for p in tmp_path.iterdir()) == ["go", "out.txt"]


def test_other_ranks_create_and_write_nothing(tmp_path, monkeypatch):
    """In a multi-process run only global rank 0 makes the directory, writes files and opens tracker runs;
    the others learn the directory from rank 0 (Lightning's launcher passes its environment on)."""
    from lightning.fabric.utilities.rank_zero import rank_zero_only

    from project.infra import records

    exp_dir = tmp_path / "experiments"
    from_rank_0 = exp_dir / "debug" / "20260101-000000-abcdef"
    monkeypatch.setattr(rank_zero_only, "rank", 1)  # what Lightning reads from LOCAL_RANK=1 at import
    monkeypatch.setenv(records.RUN_DIR_ENV, str(from_rank_0))
    args = parse_args(["--exp-dir", str(exp_dir), "--logger", "mlflow", "--logger", "tensorboard"])
    run = records.open_run(args, config_of(args), records.Trackers(["mlflow", "tensorboard"]), None, Classification)
    assert run.directory == from_rank_0
    assert [type(logger).__name__ for logger in run.loggers] == ["AppendingCsvLogger"]  # no tracker runs
    run.close("finished")
    assert not exp_dir.exists()


def test_a_stopped_or_failed_run_says_what_its_trackers_did_not_get(tmp_path, capsys):
    """A finished run's summary names the sync command when MLflow did not take its records; a run stopped by a
    signal or failed, which prints no summary, says it too."""
    import signal

    from project.infra import records
    from project.infra.errors import Interrupted

    for error in (Interrupted(signal.SIGTERM), RuntimeError("boom")):
        args = parse_args(["--exp-dir", str(tmp_path / "experiments"), "--logger", "csv"])
        run = records.open_run(args, config_of(args), records.Trackers([]), None, Classification)
        run.start()  # what the Trainer's setup does
        run.trackers.close = lambda *_: [
            "MLflow still does not answer; to complete its record: python -m project.sync X"
        ]
        with pytest.raises(type(error)), run:
            raise error
        assert capsys.readouterr().err == (
            "warning: MLflow still does not answer; to complete its record: python -m project.sync X\n"
        )


# Secrets inside values: each form hides the planted value X, wherever it is written or printed.
SECRET_FORMS = [
    "host=db user=bob password={}", "token: {}", "api_key = {}", "password='{}' port=5432",
    "postgresql://bob:{}@db.example.org/runs", "sqlite+pysqlcipher://:{}@/runs.db", "mysql://bob:{}@db:3306/x?ssl=1",
    "https://example.org/data?access_token={}&page=2", "/data/run password={}/images",
]  # fmt: skip


@pytest.mark.parametrize("form", SECRET_FORMS)
def test_one_redaction_hides_a_secret_inside_any_value(form):
    from project.infra.redact import redact, redact_argv, redact_text

    secret = "x" + secrets.token_hex(8)
    value = form.format(secret)
    hidden = [redact_text(value), redact({"tags": {"dsn": value}, "data_dir": value, "logger": [value]}),
              redact_argv(["--tag", f"note={value}", f"--data-dir={value}", "--data-dir", value])]  # fmt: skip
    assert secret not in repr(hidden) and "[redacted]" in repr(hidden)


@pytest.mark.parametrize(
    "argv",
    [["--batch-size", "password={}"], ["--exp-name", "db password={}"], ["--monitor", "token: {}"],
     ["--devices", "postgresql://bob:{}@host/db"], ["--tag", "dsn=host=db password={}", "--seed", "-1"],
     ["--config", "{}"]],
)  # fmt: skip
def test_a_rejected_value_with_a_secret_inside_is_not_echoed(tmp_path, argv):
    secret = "x" + secrets.token_hex(8)
    config = tmp_path / "c.yaml"
    config.write_text(f"batch_size: 'sqlite+pysqlcipher://:{secret}@/runs.db'\n")
    result = run_cli(*[str(config) if arg == "{}" else arg.format(secret) for arg in argv])
    assert result.returncode == 2 and "error:" in result.stderr and secret not in result.stderr, result.stderr


@pytest.mark.slow
def test_secrets_inside_values_are_written_and_printed_nowhere(tmp_path):
    planted = {form: "x" + secrets.token_hex(8) for form in SECRET_FORMS}
    tags = [arg for i, (form, secret) in enumerate(planted.items()) for arg in ("--tag", f"t{i}={form.format(secret)}")]
    data_dir = f"data password={planted[SECRET_FORMS[0]]}"
    exp_dir = tmp_path / "experiments"
    result = run_cli("--exp-dir", str(exp_dir), "--max-epochs", "1", *TINY, "--logger", "mlflow", *tags,
                     "--data-dir", data_dir)  # fmt: skip
    assert result.returncode == 0, result.stderr
    (run_dir,) = run_dirs(exp_dir)
    manifest = json.loads((run_dir / "manifest.json").read_text())
    assert manifest["tags"]["t0"] == "host=db user=bob password=[redacted]"
    assert yaml.safe_load((run_dir / "config.yaml").read_text())["data_dir"] == "data password=[redacted]"
    everything = [path for path in exp_dir.rglob("*") if path.is_file()]  # the lock file and mlflow.db among them
    assert any(path.name == "mlflow.db" for path in everything) and len(everything) > 10
    for secret in planted.values():
        assert not any(secret.encode() in path.read_bytes() for path in everything), secret
        assert secret not in result.stdout + result.stderr, secret


def test_a_moved_runs_checkpoint_states_follow_it_and_another_runs_stay_as_they_are():
    from project.infra.records import follow_moved_run

    def state(folder: str) -> dict:
        best = f"{folder}/best-epoch001.ckpt"
        return {"monitor": "val/loss", "dirpath": folder, "best_model_path": best, "kth_best_model_path": best,
                "last_model_path": f"{folder}2/last.ckpt", "best_k_models": {best: 0.5}}  # fmt: skip

    here = "/new/place/run-1/checkpoints"
    moved = {"callbacks": {"ModelCheckpoint{'monitor': 'val/loss'}": state("/old/exp/run-1/checkpoints"), "R": {}}}
    follow_moved_run(moved, here)
    expected = {**state(here), "last_model_path": "/old/exp/run-1/checkpoints2/last.ckpt"}  # another folder's: kept
    assert moved["callbacks"] == {"ModelCheckpoint{'monitor': 'val/loss'}": expected, "R": {}}
    foreign = {"callbacks": {"M": state("/old/exp/run-2/checkpoints")}}  # another run's checkpoint, copied in
    follow_moved_run(foreign, here)
    assert foreign["callbacks"]["M"] == state("/old/exp/run-2/checkpoints")
