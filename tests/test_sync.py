"""project.sync: a run directory put into MLflow after the fact (a `--logger csv` run, an offline run, a live run
whose server went away), against a real `mlflow server` on loopback or the local store; idempotence; bad input."""

from __future__ import annotations

import json
import time
from pathlib import Path

import pytest
from conftest import cli_env, free_port, only_run_dir, run_cli, wait_for
from test_tracking import TINY, open_trackers, rows_of, tiny_checkpoint

from project import sync


def snapshot(client, run_id: str, artifacts_root: Path | None = None) -> dict:
    """All an MLflow run holds, and the stored artifact files' modification times (a re-upload changes them)."""
    run = client.get_run(run_id)
    models = client.search_logged_models([run.info.experiment_id], f"source_run_id = '{run_id}'")
    return {
        "status": run.info.status,
        "params": run.data.params,
        "tags": run.data.tags,
        "metrics": {
            k: sorted((m.step, m.value, m.timestamp) for m in client.get_metric_history(run_id, k))
            for k in run.data.metrics
        },  # fmt: skip
        "artifacts": sorted((a.path, a.file_size) for a in client.list_artifacts(run_id)),
        "models": sorted((m.model_id, str(m.status)) for m in models),
        "files": {
            p: p.stat().st_mtime_ns
            for p in (artifacts_root or Path("/nonexistent")).rglob("*")
            if p.is_file() and run_id in p.parts
        },  # fmt: skip
    }


def csv_histories(metrics_csv: Path) -> dict[str, list[tuple[int, float, int]]]:
    histories: dict[str, list] = {}
    for row in rows_of(metrics_csv):
        step, stamp = int(row.pop("step")), int(row.pop("timestamp"))
        for key, value in row.items():
            if value:
                histories.setdefault(key, []).append((step, float(value), stamp))
    return {key: sorted(points) for key, points in histories.items()}


@pytest.mark.slow
def test_a_server_restarted_mid_run_gets_the_whole_run_at_its_end(mlflow_server, tmp_path, monkeypatch, capsys):
    import mlflow

    monkeypatch.setenv("MLFLOW_TRACKING_URI", mlflow_server.url)
    trackers = open_trackers(tmp_path, "run")
    run_dir = tmp_path / "exp" / "run"
    trackers.start({"lr": 0.1})
    steps = iter(range(10_000))

    def train_step() -> float:  # every logger, as Lightning calls them: metrics.csv and MLflow
        step, started = next(steps), time.perf_counter()
        for logger in trackers.loggers:
            logger.log_metrics({"loss": 1.0 / (step + 1), "epoch": step // 3}, step)
        return time.perf_counter() - started

    for _ in range(5):
        train_step()
    client = mlflow.MlflowClient(mlflow_server.url)
    run_id = trackers.describe()["mlflow"]["run_id"]
    wait_for(lambda: len(client.get_metric_history(run_id, "loss")) == 5, None, "the metrics on the server", seconds=30)

    mlflow_server.kill()
    slowest, deadline = 0.0, time.monotonic() + 120
    while trackers.describe()["mlflow"]["complete"]:  # training goes on: calls keep returning at once
        assert time.monotonic() < deadline, "the dead server was never noticed"
        slowest = max(slowest, train_step())
        time.sleep(0.05)
    mlflow_server.start()  # the same port and store: a deploy, say
    mlflow_server.wait_until_up()
    for _ in range(5):  # live logging stopped at the failure: these are in metrics.csv only
        slowest = max(slowest, train_step())
    checkpoint = tiny_checkpoint(run_dir / "best.ckpt")
    trackers.log_model(checkpoint)  # dropped too: the end logs it
    assert slowest < 0.05
    (run_dir / "config.yaml").write_text("lr: 0.1\n")
    (run_dir / "curves.png").write_bytes(b"not really a png")
    manifest = {"run_id": "run", "experiment": "exp", "test": {"checkpoint": str(checkpoint)}}
    (run_dir / "manifest.json").write_text(json.dumps(manifest))

    assert trackers.close(run_dir / "manifest.json", "finished") == []
    assert trackers.describe()["mlflow"]["complete"] is True
    lines = [line for line in capsys.readouterr().err.splitlines() if line.strip()]
    assert len(lines) == 1 and lines[0].startswith("warning: MLflow stopped answering (no answer from")
    held = snapshot(client, run_id)
    assert held["status"] == "FINISHED" and held["params"] == {"lr": "0.1"}
    assert {key: [p[:2] for p in points] for key, points in held["metrics"].items()} == {
        key: [p[:2] for p in points] for key, points in csv_histories(run_dir / "metrics.csv").items()
    }
    assert {"config.yaml", "curves.png", "manifest.json", "metrics.csv"} <= {path for path, _ in held["artifacts"]}
    assert [status for _, status in held["models"]] == ["READY"]
    mlflow.set_tracking_uri(mlflow_server.url)
    assert mlflow.pyfunc.load_model(f"runs:/{run_id}/model").predict(
        __import__("numpy").zeros((2, 1, 8, 8), "float32")
    ).shape == (2, 3)


@pytest.mark.slow
def test_csv_live_and_offline_runs_synced_equal_their_records_and_a_second_sync_adds_nothing(
    mlflow_server, exp_dir, monkeypatch, capsys
):
    import mlflow

    common = ("--exp-dir", str(exp_dir), "--max-epochs", "2", *TINY)
    offline = run_cli(*common, "--exp-name", "offline", env=cli_env(PROJECT_TRACKING="offline"))
    assert offline.returncode == 0, offline.stderr
    offline_dir = only_run_dir(exp_dir, "offline")
    assert f"python -m project.sync {offline_dir}" in offline.stdout and not (exp_dir / "mlflow.db").exists()
    logged = run_cli(*common, "--exp-name", "csv", "--logger", "csv")
    live = run_cli(*common, "--exp-name", "live", env=cli_env(MLFLOW_TRACKING_URI=mlflow_server.url))
    assert logged.returncode == 0 and live.returncode == 0, logged.stderr + live.stderr
    csv_dir, live_dir = only_run_dir(exp_dir, "csv"), only_run_dir(exp_dir, "live")

    # The offline run, by the command its summary printed: into its own local store.
    done = run_cli(str(offline_dir), module="project.sync")
    assert done.returncode == 0 and done.stderr == "", done.stderr
    local = mlflow.MlflowClient(f"sqlite:///{(exp_dir / 'mlflow.db').resolve()}")
    (found,) = local.search_runs([local.get_experiment_by_name("offline").experiment_id])
    assert found.info.status == "FINISHED" and f"MLflow run {found.info.run_id}" in done.stdout
    recorded = json.loads((offline_dir / "manifest.json").read_text())["trackers"]["mlflow"]  # no longer offline
    assert (recorded["run_id"], recorded["complete"]) == (found.info.run_id, True) and recorded.get("model_uri")

    monkeypatch.setenv("MLFLOW_TRACKING_URI", mlflow_server.url)
    client = mlflow.MlflowClient(mlflow_server.url)
    live_id = json.loads((live_dir / "manifest.json").read_text())["trackers"]["mlflow"]["run_id"]
    before_live = snapshot(client, live_id, mlflow_server.root / "artifacts")
    assert sync.main([str(csv_dir), str(live_dir)]) == 0
    (csv_run,) = client.search_runs([client.get_experiment_by_name("csv").experiment_id])
    synced = snapshot(client, csv_run.info.run_id)
    after = snapshot(client, live_id, mlflow_server.root / "artifacts")
    assert after == before_live  # a live-logged run: nothing to add

    # Synced from metrics.csv: every point with its step and time; and what a live run holds.
    assert synced["metrics"] == csv_histories(csv_dir / "metrics.csv")
    recorded = json.loads((csv_dir / "manifest.json").read_text())["trackers"]["mlflow"]
    assert (recorded["run_id"], recorded["complete"]) == (csv_run.info.run_id, True)
    assert synced["status"] == "FINISHED" and len(synced["models"]) == 1
    assert synced["params"]["command"] == json.loads((csv_dir / "manifest.json").read_text())["command"]
    assert set(synced["params"]) == set(after["params"]) and set(synced["metrics"]) == set(after["metrics"])
    assert [p for p, _ in synced["artifacts"]] == [p for p, _ in after["artifacts"]]
    assert {k for k in synced["tags"] if not k.startswith("mlflow.")} == {
        k for k in after["tags"] if not k.startswith("mlflow.")
    }

    # Again: nothing changes, not even a stored file.
    before = snapshot(client, csv_run.info.run_id, mlflow_server.root / "artifacts")
    capsys.readouterr()
    manifests = [(run / "manifest.json").read_bytes() for run in (csv_dir, live_dir)]
    assert sync.main([str(csv_dir), str(live_dir)]) == 0
    assert [(run / "manifest.json").read_bytes() for run in (csv_dir, live_dir)] == manifests
    assert snapshot(client, csv_run.info.run_id, mlflow_server.root / "artifacts") == before
    assert snapshot(client, live_id) == {**after, "files": {}}
    assert capsys.readouterr().out.count("MLflow run ") == 2


def fake_run(root: Path, name: str = "20260101-000000-abcd1234") -> Path:
    """A run directory as a run leaves it (no training needed for what sync refuses)."""
    run_dir = root / "exp" / name
    run_dir.mkdir(parents=True)
    (run_dir / "config.yaml").write_text("lr: 0.1\n")
    (run_dir / "manifest.json").write_text(json.dumps({"run_id": name, "experiment": "exp", "exit_status": "finished"}))
    (run_dir / "metrics.csv").write_text("step,epoch,timestamp,val/loss\n0,0,1700000000000,0.5\n")
    (run_dir / ".lock").write_text("")
    return run_dir


def test_bad_input_is_one_line_and_changes_nothing(tmp_path, monkeypatch, capsys):
    from project.infra.records import RunLock

    good = fake_run(tmp_path)
    locked = fake_run(tmp_path, "20260101-000000-locked00")
    not_json, a_list, no_id = (fake_run(tmp_path, f"20260101-000000-bad{i}") for i in range(3))
    (not_json / "manifest.json").write_text("{not json")
    (a_list / "manifest.json").write_text("[]")
    (no_id / "manifest.json").write_text('{"run_id": "x\' OR 1=1"}')
    odd = [("experiment", 5), ("trackers", {"mlflow": "abc"}), ("test", {"checkpoint": 5}), ("resumed", 5),
           ("exit_status", ["x"]),
           ("trackers", {"mlflow": {"run_id": 5}}), ("trackers", []), ("resumed", [1]), ("run_id", None)]  # fmt: skip
    odd_runs = [fake_run(tmp_path, f"20260101-000000-odd{i}") for i in range(len(odd))]
    for (key, value), run in zip(odd, odd_runs, strict=True):
        manifest = json.loads((run / "manifest.json").read_text())
        (run / "manifest.json").write_text(json.dumps({**manifest, key: value}))
    not_a_number = fake_run(tmp_path, "20260101-000000-nan00000")
    (not_a_number / "metrics.csv").write_text("step,epoch,timestamp,val/loss\n0,0,1700000000000,oops\n")
    too_far = fake_run(tmp_path, "20260101-000000-far00000")
    (too_far / "metrics.csv").write_text("step,epoch,timestamp,val/loss\n1e19,0,1700000000000,0.5\n")
    odd_name = fake_run(tmp_path, "20260101-000000-name0000")
    (odd_name / "metrics.csv").write_text("step,epoch,timestamp,lr!\n0,0,1700000000000,0.5\n")
    odd_param = fake_run(tmp_path, "20260101-000000-param000")
    (odd_param / "config.yaml").write_text("bad key!: 1\n")
    infinite_step = fake_run(tmp_path, "20260101-000000-inf00000")
    (infinite_step / "metrics.csv").write_text("step,epoch,timestamp,val/loss\ninf,0,1700000000000,0.5\n")
    huge_field = fake_run(tmp_path, "20260101-000000-huge0000")
    (huge_field / "metrics.csv").write_text("step,epoch,timestamp,val/loss\n0,0,1700000000000,0.5" + "0" * 140_000)
    not_utf8 = fake_run(tmp_path, "20260101-000000-latin100")
    (not_utf8 / "metrics.csv").write_bytes(b"\xff\xfe,\x00\n1,2\n")
    configs = {"a list": "- max_epochs: 3\n", "malformed": "max_epochs: [3\n", "with an alias": "a: &x 1\nb: *x\n"}
    bad_configs = {what: fake_run(tmp_path, f"20260101-000000-config{i}") for i, what in enumerate(configs)}
    for what, run in bad_configs.items():
        (run / "config.yaml").write_text(configs[what])
    (tmp_path / "a-file").write_text("")
    (tmp_path / "empty").mkdir()
    holder = RunLock(locked / ".lock")
    holder.acquire()
    holder.note("pid 123 on elsewhere")
    before = {p: p.read_bytes() for p in tmp_path.rglob("*") if p.is_file()}
    monkeypatch.delenv("MLFLOW_TRACKING_URI", raising=False)
    cases = {  # each with a good run beside it: nothing of that one is synced either
        "does-not-exist": ([tmp_path / "missing"], "is not a run directory"),
        "a file": ([tmp_path / "a-file"], "is not a run directory"),
        "not a run": ([tmp_path / "empty"], "is not a run directory"),
        "not JSON": ([not_json], "is not a run's manifest"),
        "a JSON list": ([a_list], "is not a run's manifest"),
        "no usable run_id": ([no_id], "is not a run's manifest"),
        "locked": ([locked], "is in use by pid 123 on elsewhere"),
        **{
            f"manifest {key}: {value}": ([run], "is not a run's manifest")
            for (key, value), run in zip(odd, odd_runs, strict=True)
        },  # fmt: skip
        "a metric that is not a number": ([not_a_number], "metrics.csv, line 2: not a number"),
        "metrics that are not UTF-8": ([not_utf8], "metrics.csv, line 1: not UTF-8 text; restore it"),
        "an infinite step": ([infinite_step], "metrics.csv, line 2: not a number where one belongs"),
        "a step no store keeps": ([too_far], "metrics.csv, line 2: not a number where one belongs"),
        "a metric name MLflow refuses": ([odd_name], "metrics.csv, line 1: 'lr!' is not a name MLflow takes"),
        "a parameter name MLflow refuses": ([odd_param], "config.yaml: 'bad key!' is not a name MLflow takes"),
        "a field over the csv module's limit": ([huge_field], "metrics.csv, line 2: not a CSV line (field larger"),
        **{f"config.yaml {what}": ([run], f"{run / 'config.yaml'}: ") for what, run in bad_configs.items()},
    }
    for what, (dirs, message) in cases.items():
        assert sync.main([str(good), *map(str, dirs)]) == 2, what
        captured = capsys.readouterr()
        (line,) = captured.err.splitlines()
        assert line.startswith("error: ") and message in line and captured.out == "", what
    holder.release()
    url = f"http://127.0.0.1:{free_port()}"  # nothing listens there
    monkeypatch.setenv("MLFLOW_TRACKING_URI", url)
    assert sync.main([str(good)]) == 2
    (line,) = capsys.readouterr().err.splitlines()
    assert line.startswith(f"error: MLflow at {url} cannot be used (no answer from {url}")
    database = "postgresql+psycopg://bob:Hunter2secret@127.0.0.1:1/db"  # MLflow would retry it for minutes
    monkeypatch.setenv("MLFLOW_TRACKING_URI", database)
    started = time.monotonic()
    assert sync.main([str(good)]) == 2
    (line,) = capsys.readouterr().err.splitlines()
    assert "cannot be used" in line and "Hunter2secret" not in line and time.monotonic() - started < 60
    for in_memory in ("sqlite://", "sqlite:///:memory:", "sqlite:///file:x?mode=memory&uri=true"):
        monkeypatch.setenv("MLFLOW_TRACKING_URI", in_memory)
        assert sync.main([str(good)]) == 2
        (line,) = capsys.readouterr().err.splitlines()
        assert "SQLite in memory keeps nothing" in line, line
    assert {p: p.read_bytes() for p in tmp_path.rglob("*") if p.is_file()} == before  # no store created either
    assert run_cli(module="project.sync").returncode == 2  # no RUN_DIR: argparse's usage line


def test_a_run_named_twice_is_synced_once_into_its_own_run_and_its_secrets_are_not_printed(
    tmp_path, monkeypatch, capsys
):
    import mlflow

    monkeypatch.delenv("MLFLOW_TRACKING_URI", raising=False)
    secret_root = tmp_path / "password=Hunter2secret"
    first, second = fake_run(secret_root), fake_run(secret_root, "20260101-000000-second00")
    (tmp_path / "link").symlink_to(first)
    assert sync.main([str(first), str(first), str(tmp_path / "link")]) == 0
    out = capsys.readouterr().out
    assert len(out.splitlines()) == 1 and "Hunter2secret" not in out
    client = mlflow.MlflowClient(f"sqlite:///{secret_root / 'mlflow.db'}")
    (synced,) = client.search_runs([client.get_experiment_by_name("exp").experiment_id])
    assert "Hunter2secret" not in synced.data.tags["run_dir"]
    # A manifest that names the first run's MLflow run (copied, or edited) does not take that run over.
    recorded = json.loads((first / "manifest.json").read_text())["trackers"]
    manifest = json.loads((second / "manifest.json").read_text())
    (second / "manifest.json").write_text(json.dumps({**manifest, "trackers": recorded}))
    assert sync.main([str(second)]) == 0
    runs = client.search_runs([synced.info.experiment_id])
    assert sorted(r.data.tags[sync.TAG] for r in runs) == sorted([first.name, second.name])
    assert client.get_run(synced.info.run_id).data.tags[sync.TAG] == first.name


def test_metrics_csv_keeps_its_readers_with_a_time_column(tmp_path):
    from project.infra.plots import epoch_curves
    from project.infra.tracking import csv_logger

    logger = csv_logger(tmp_path / "metrics.csv")
    logger.log_metrics({"train/loss": 0.5, "epoch": 0}, 0)
    logger.log_metrics({"val/loss": 0.25, "epoch": 0}, 1)
    assert all(
        int(row["timestamp"]) > 1.7e12 for row in rows_of(tmp_path / "metrics.csv")
    )  # ms since 1970: MLflow's unit
    assert epoch_curves(tmp_path / "metrics.csv", ("train/loss", "val/loss")) == {
        "train/loss": {0: 0.5},
        "val/loss": {0: 0.25},
    }


def test_a_run_whose_process_died_ends_failed_in_its_own_local_store(tmp_path, monkeypatch, capsys):
    import mlflow

    from project.infra.tracking import local_store

    monkeypatch.delenv("MLFLOW_TRACKING_URI", raising=False)
    run_dir = fake_run(tmp_path)
    manifest = json.loads((run_dir / "manifest.json").read_text())
    (run_dir / "manifest.json").write_text(json.dumps({**manifest, "exit_status": "running"}))  # SIGKILLed
    assert sync.main([str(run_dir)]) == 0
    client = mlflow.MlflowClient(local_store(tmp_path))
    (run,) = client.search_runs([client.get_experiment_by_name("exp").experiment_id])
    assert f"MLflow run {run.info.run_id} at {local_store(tmp_path)}" in capsys.readouterr().out
    held = snapshot(client, run.info.run_id)
    assert held["status"] == "FAILED" and held["metrics"] == csv_histories(run_dir / "metrics.csv")
    assert held["tags"]["project_run_id"] == run_dir.name and held["params"] == {"lr": "0.1"}
    assert sync.main([str(run_dir)]) == 0 and snapshot(client, run.info.run_id) == held


def test_a_file_changed_at_the_same_size_is_sent_again_and_a_link_never(tmp_path, monkeypatch, capsys):
    """A resumed run rewrites config.yaml (max_epochs: 2 -> 3) at the same size; a link in a run directory (one
    received from someone else) would send what it points to."""
    import mlflow

    from project.infra.tracking import local_store

    monkeypatch.delenv("MLFLOW_TRACKING_URI", raising=False)
    run_dir = fake_run(tmp_path)
    (tmp_path / "private_key").write_text("-----BEGIN KEY-----")
    (run_dir / "test_report.txt").symlink_to(tmp_path / "private_key")
    assert sync.main([str(run_dir)]) == 0
    (run_dir / "config.yaml").write_text("lr: 0.2\n")
    assert sync.main([str(run_dir)]) == 0
    client = mlflow.MlflowClient(local_store(tmp_path))
    (run,) = client.search_runs([client.get_experiment_by_name("exp").experiment_id])
    stored = Path(client.download_artifacts(run.info.run_id, "", str(tmp_path / "download")))
    assert (stored / "config.yaml").read_text() == "lr: 0.2\n" and not (stored / "test_report.txt").exists()
    held = snapshot(client, run.info.run_id, tmp_path / "mlflow-artifacts")
    assert sync.main([str(run_dir)]) == 0 and snapshot(client, run.info.run_id, tmp_path / "mlflow-artifacts") == held


def test_a_run_synced_whole_stays_when_its_manifest_cannot_be_rewritten(tmp_path, monkeypatch, capsys):
    import mlflow

    from project.infra.tracking import local_store

    monkeypatch.delenv("MLFLOW_TRACKING_URI", raising=False)
    run_dir = fake_run(tmp_path)

    def full_disk(*args):
        raise OSError(28, "No space left on device")

    monkeypatch.setattr(sync, "record", full_disk)
    assert sync.main([str(run_dir)]) == 2
    assert "No space left on device" in capsys.readouterr().err
    client = mlflow.MlflowClient(local_store(tmp_path))
    (run,) = client.search_runs([client.get_experiment_by_name("exp").experiment_id])
    assert run.info.status == "FINISHED" and run.info.lifecycle_stage == "active"


def test_a_resumed_run_synced_has_the_parameters_and_tags_a_live_one_has(tmp_path, monkeypatch):
    """A live run logs its first session's values as parameters (MLflow keeps a parameter as first logged) and what a
    resumed session went on with as `resumed.<key>` tags."""
    import mlflow

    from project.infra.tracking import local_store

    monkeypatch.delenv("MLFLOW_TRACKING_URI", raising=False)
    run_dir = fake_run(tmp_path)
    (run_dir / "config.yaml").write_text("lr: 0.1\nmax_epochs: 9\n")
    manifest = json.loads((run_dir / "manifest.json").read_text())
    sessions = [
        {"command": "run --resume --max-epochs 6", "user": "ann", "changed": {"max_epochs": [3, 6]}},
        {"command": "run --resume --max-epochs 9", "user": "ann", "changed": {"max_epochs": [6, 9]}},
    ]
    manifest |= {"command": "run --max-epochs 3", "user": "ann", "resumed": sessions}
    (run_dir / "manifest.json").write_text(json.dumps(manifest))
    assert sync.main([str(run_dir)]) == 0
    client = mlflow.MlflowClient(local_store(tmp_path))
    (run,) = client.search_runs([client.get_experiment_by_name("exp").experiment_id])
    assert run.data.params == {"lr": "0.1", "max_epochs": "3", "command": "run --max-epochs 3", "user": "ann"}
    resumed = {k: v for k, v in run.data.tags.items() if k.startswith("resumed.")}
    assert resumed == {"resumed.max_epochs": "9", "resumed.command": "run --resume --max-epochs 9"}


def test_a_sync_stopped_by_a_signal_says_the_same_command_sends_the_rest(tmp_path, monkeypatch, capsys):
    import signal

    from project.infra.errors import Interrupted

    monkeypatch.delenv("MLFLOW_TRACKING_URI", raising=False)
    run_dir = fake_run(tmp_path)

    def stopped(*args):
        raise Interrupted(signal.SIGTERM)

    monkeypatch.setattr(sync, "sync_run", stopped)
    assert sync.main([str(run_dir)]) == 143
    assert (
        capsys.readouterr().err
        == f"stopped by SIGTERM: {run_dir} is in MLflow in part; the same command sends the rest\n"
    )
    monkeypatch.undo()
    monkeypatch.delenv("MLFLOW_TRACKING_URI", raising=False)
    assert sync.main([str(run_dir)]) == 0  # and it does


def test_a_deleted_experiment_is_named_with_how_to_restore_it(tmp_path, monkeypatch, capsys):
    import mlflow

    from project.infra.tracking import local_store

    monkeypatch.delenv("MLFLOW_TRACKING_URI", raising=False)
    run_dir = fake_run(tmp_path)
    assert sync.main([str(run_dir)]) == 0
    client = mlflow.MlflowClient(local_store(tmp_path))
    experiment = client.get_experiment_by_name("exp").experiment_id
    client.delete_experiment(experiment)
    capsys.readouterr()
    assert sync.main([str(run_dir)]) == 2
    (line,) = capsys.readouterr().err.splitlines()
    assert (
        f"MLflow's experiment exp is deleted: restore it (mlflow experiments restore --experiment-id {experiment})"
        in line
    )


def test_a_store_that_refuses_the_files_leaves_no_running_run(tmp_path, monkeypatch, capsys):
    import mlflow

    from project.infra.tracking import local_store

    monkeypatch.delenv("MLFLOW_TRACKING_URI", raising=False)
    run_dir = fake_run(tmp_path)
    (tmp_path / "mlflow-artifacts").write_text("in the way")  # where the store keeps the run's files
    assert sync.main([str(run_dir)]) == 2
    (line,) = capsys.readouterr().err.splitlines()
    assert line.startswith(f"error: {run_dir}: not synced (") and "once MLflow answers" not in line
    client = mlflow.MlflowClient(local_store(tmp_path))
    experiment = client.get_experiment_by_name("exp").experiment_id
    assert client.search_runs([experiment]) == []  # the half-filled run this sync made is deleted, not RUNNING
    (tmp_path / "mlflow-artifacts").unlink()
    assert sync.main([str(run_dir)]) == 0  # the same command, once the store takes files, makes the whole run
    (run,) = client.search_runs([experiment])
    assert run.info.status == "FINISHED" and [a.path for a in client.list_artifacts(run.info.run_id)]


def test_a_run_is_a_copy_only_of_another_directory_that_still_exists(tmp_path):
    from types import SimpleNamespace

    original, copy = tmp_path / "a" / "run", tmp_path / "b" / "run"
    original.mkdir(parents=True)
    copy.mkdir(parents=True)
    (tmp_path / "link").symlink_to(tmp_path / "a")

    def tagged(run_dir: str | None):
        return SimpleNamespace(data=SimpleNamespace(tags={} if run_dir is None else {"run_dir": run_dir}))

    assert sync.copied_from(tagged(str(original)), copy)  # its original is still there: a copy
    assert not sync.copied_from(tagged(str(tmp_path / "link" / "run")), original)  # the same folder through a link
    assert not sync.copied_from(tagged(str(tmp_path / "gone" / "run")), copy)  # moved: it finds its run again
    assert not sync.copied_from(tagged("a/run"), copy)  # a relative tag (runs before 2026-12) says nothing
    assert not sync.copied_from(tagged(None), copy) and not sync.copied_from(tagged("[redacted]/run"), copy)
