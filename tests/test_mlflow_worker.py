"""The MLflow worker process and its Lightning logger, against real stores: a local SQLite store in tmp_path
(read back with MlflowClient), a real `mlflow server` on a loopback port killed mid-run, a port where nothing
listens, a training process killed by SIGKILL, and the logged model loaded by MLflow and served over HTTP."""

from __future__ import annotations

import json
import os
import shutil
import signal
import subprocess
import sys
import textwrap
import time
import urllib.request
from pathlib import Path

import pytest
from conftest import ROOT, cli_env, free_port

from project.infra.errors import UserError
from project.infra.mlflow_logger import MLflowLogger, flatten_params, metric_name
from project.infra.mlflow_worker import MLflowWorkerClient

TAGS = {"user": "tester", "run_dir": "/somewhere", "study": "worker"}


def store(tmp_path: Path) -> str:
    return f"sqlite:///{(tmp_path / 'mlflow.db').as_posix()}"


@pytest.fixture(scope="module")
def empty_store(tmp_path_factory) -> Path:
    """A new store's tables take MLflow a second or more to create: made once, copied into each test."""
    from mlflow.tracking import MlflowClient

    root = tmp_path_factory.mktemp("empty-store")
    MlflowClient(store(root)).search_experiments()
    return root / "mlflow.db"


@pytest.fixture
def local(tmp_path, empty_store) -> str:
    shutil.copyfile(empty_store, tmp_path / "mlflow.db")
    return store(tmp_path)


def start(uri: str, tmp_path: Path, prepare_model: bool = False) -> MLflowWorkerClient:
    return MLflowWorkerClient.start(uri, (tmp_path / "artifacts").as_uri(), prepare_model=prepare_model)


def open_logger(client: MLflowWorkerClient, tmp_path: Path, resume: dict | None = None) -> MLflowLogger:
    logger = MLflowLogger(client, tmp_path / "run")
    logger.open_run("exp", "run-1", TAGS, resume, timeout=120)
    return logger


def wait_for(condition, timeout: float, what: str) -> None:
    deadline = time.monotonic() + timeout
    while not condition():
        if time.monotonic() > deadline:
            raise AssertionError(f"not within {timeout} s: {what}")
        time.sleep(0.1)


def history(client, run_id: str, key: str) -> list[tuple[int, float]]:
    return sorted((m.step, m.value) for m in client.get_metric_history(run_id, key))


# --- fast: a local store -----------------------------------------------------------------------------------------


def test_the_client_module_imports_nothing_heavy():
    code = (
        "import sys\nimport project.infra.mlflow_worker\n"
        "print(sorted(m for m in ('mlflow', 'torch', 'lightning', 'numpy') if m in sys.modules))\n"
    )
    result = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, cwd=ROOT, env=cli_env())
    assert result.stdout.strip() == "[]", result.stderr


def test_names_and_params_are_made_acceptable_to_mlflow():
    assert flatten_params({"a": {"b": 1, "c": {"d": [1, 2]}}, "e": None, "f": {}}) == {
        "a/b": "1", "a/c/d": "[1, 2]", "e": "None", "f": "{}"
    }  # fmt: skip
    with pytest.warns(RuntimeWarning, match="logged as"):
        assert metric_name("val/acc@top-1!") == "val/acctop-1"
    assert metric_name("a//b/./c/") == "a/b/c" and metric_name("train/loss") == "train/loss"


def test_a_run_in_a_local_store_has_exactly_what_was_logged(tmp_path, local, capsys):
    from mlflow.tracking import MlflowClient

    logger = open_logger(start(local, tmp_path), tmp_path)
    worker = logger.client.process
    # A Ctrl-C or SIGTERM for the process group reaches the worker too: the training process decides.
    worker.send_signal(signal.SIGINT)
    worker.send_signal(signal.SIGTERM)
    logger.mark_running()
    logger.log_hyperparams({"lr": 0.1, "model": {"name": "cnn", "width": 8}, "long": "x" * 7000})
    logged = [(step, {"train/loss": 1.0 / (step + 1), "epoch": float(step // 10)}) for step in range(0, 300, 10)]
    started = time.perf_counter()
    for step, values in logged:
        logger.log_metrics(values, step)
    assert time.perf_counter() - started < 0.5  # 30 calls, none waits for the store
    record = tmp_path / "config.yaml"
    record.write_text("lr: 0.1\n")
    logger.log_files([record, tmp_path / "missing.png"])
    assert logger.close("FINISHED", timeout=60) is None
    wait_for(lambda: worker.poll() is not None, 30, "the worker exits")
    assert worker.returncode == 0  # not aborted at exit (a daemon thread reading stdin can do that)
    assert capsys.readouterr().err == ""  # MLflow's INFO lines (a new store's tables) reach no terminal

    client = MlflowClient(store(tmp_path))
    run = client.get_run(logger.run_id)
    assert run.info.status == "FINISHED" and run.info.run_name == "run-1"
    assert client.get_experiment(run.info.experiment_id).name == "exp"
    assert run.data.params["lr"] == "0.1" and run.data.params["model/width"] == "8"
    assert run.data.params["long"] == "x" * 6000  # MLflow's limit for a param value
    assert run.data.tags["study"] == "worker" and run.data.tags["mlflow.user"]
    assert history(client, logger.run_id, "train/loss") == [(step, v["train/loss"]) for step, v in logged]
    assert [a.path for a in client.list_artifacts(logger.run_id)] == ["config.yaml"]
    assert (
        Path(client.download_artifacts(logger.run_id, "config.yaml", str(tmp_path / "dl"))).read_text() == "lr: 0.1\n"
    )
    assert (tmp_path / "artifacts" / "exp").is_dir()  # artifact_root/<experiment>
    assert logger.describe() == {"tracking_uri": store(tmp_path), "experiment_id": run.info.experiment_id,
                                 "run_id": logger.run_id, "complete": True}  # fmt: skip
    assert logger.how_to_open().startswith(f"mlflow ui --backend-store-uri {store(tmp_path)}")
    assert f"#/experiments/{run.info.experiment_id}/runs/{logger.run_id}" in logger.how_to_open()


def test_resuming_reopens_the_run_untouched_until_training_starts(tmp_path, local, capsys):
    from mlflow.tracking import MlflowClient

    # Started together, as a run starts its worker early: they import MLflow at the same time.
    clients = [start(local, tmp_path) for _ in range(3)]
    first = open_logger(clients[0], tmp_path)
    first.mark_running()
    first.log_hyperparams({"max_epochs": 2, "lr": 0.1})
    first.log_metrics({"val/loss": 0.5}, step=10)
    assert first.close("KILLED", timeout=60) is None
    previous = first.describe()
    client = MlflowClient(store(tmp_path))

    # Reopened, then abandoned before training: nothing about the run changes.
    untouched = open_logger(clients[1], tmp_path, resume=previous)
    assert untouched.run_id == first.run_id
    untouched.log_hyperparams({"max_epochs": 99})
    untouched.abandon()
    run = client.get_run(first.run_id)
    assert run.info.status == "KILLED" and "resumed.max_epochs" not in run.data.tags

    second = open_logger(clients[2], tmp_path, resume=previous)
    assert second.run_id == first.run_id and second.experiment_id == first.experiment_id
    second.log_hyperparams({"max_epochs": 4, "lr": 0.1, "note": "new"})  # held until mark_running
    second.log_metrics({"val/loss": 0.25}, step=20)
    assert client.get_run(first.run_id).info.status == "KILLED"
    second.mark_running()
    assert second.close("FINISHED", timeout=60) is None
    run = client.get_run(first.run_id)
    assert run.info.status == "FINISHED"
    assert run.data.params["max_epochs"] == "2" and run.data.tags["resumed.max_epochs"] == "4"
    assert run.data.params["note"] == "new" and "resumed.lr" not in run.data.tags
    assert history(client, first.run_id, "val/loss") == [(10, 0.5), (20, 0.25)]
    assert capsys.readouterr().err == ""


def test_a_deleted_run_on_resume_starts_a_new_one_which_leaves_no_trace_if_never_started(tmp_path, local, capsys):
    from mlflow.tracking import MlflowClient

    clients = [start(local, tmp_path) for _ in range(2)]
    first = open_logger(clients[0], tmp_path)
    first.mark_running()
    assert first.close("FINISHED", timeout=60) is None
    client = MlflowClient(local)
    client.delete_run(first.run_id)

    second = open_logger(clients[1], tmp_path, resume=first.describe())
    assert second.run_id != first.run_id
    warnings = [line for line in capsys.readouterr().err.splitlines() if line.strip()]
    assert len(warnings) == 1 and first.run_id in warnings[0] and "new MLflow run" in warnings[0]
    assert client.get_run(second.run_id).info.lifecycle_stage == "active"
    second.abandon()  # the run failed before training: its new tracker run is removed (MLflow can restore it)
    assert client.get_run(second.run_id).info.lifecycle_stage == "deleted"


@pytest.mark.slow
def test_two_runs_starting_together_share_one_new_store(tmp_path):
    from mlflow.tracking import MlflowClient

    # MLflow's schema creation races when two processes create one SQLite store: the worker locks it.
    clients = [MLflowWorkerClient.start(store(tmp_path), None, prepare_model=False) for _ in range(2)]
    loggers = [MLflowLogger(client, tmp_path) for client in clients]
    for logger in loggers:
        logger.open_run("together", "r", TAGS, None, timeout=120)
        logger.mark_running()
    assert [logger.close("FINISHED", timeout=60) for logger in loggers] == [None, None]
    client = MlflowClient(store(tmp_path))
    assert loggers[0].experiment_id == loggers[1].experiment_id
    assert {client.get_run(logger.run_id).info.status for logger in loggers} == {"FINISHED"}


def test_a_server_that_cannot_be_reached_is_one_line_quickly(tmp_path):
    url = f"http://127.0.0.1:{free_port()}"  # nothing listens there
    client = MLflowWorkerClient.start(url, None, prepare_model=False)
    started = time.monotonic()
    with pytest.raises(UserError) as raised:
        MLflowLogger(client, tmp_path).open_run("exp", "r", TAGS, None, timeout=60)
    message = str(raised.value)
    assert message.startswith(f"MLflow at {url} cannot be used (no answer from {url}")
    assert "MLFLOW_TRACKING_URI" in message and "\n" not in message
    assert time.monotonic() - started < 30
    assert client.process.poll() is not None  # the worker is gone too


# The training process, reduced to the worker's protocol (no Lightning to import): it opens a run, logs, and waits.
DRIVER = textwrap.dedent(
    """
    import sys, time
    from project.infra.mlflow_worker import MLflowWorkerClient
    client = MLflowWorkerClient.start(sys.argv[1], None, prepare_model=False)
    reply = client.call("open", 120, experiment="exp", run_name="doomed", tags={}, resume_run_id=None)
    client.send("running")
    client.send("metrics", metrics={"loss": 1.0}, step=1, timestamp=int(time.time() * 1000))
    print(reply["run_id"], client.process.pid, flush=True)
    time.sleep(600)
    """
)


@pytest.mark.slow
def test_a_training_process_killed_by_sigkill_leaves_a_failed_run(tmp_path, local):
    from mlflow.tracking import MlflowClient

    driver = subprocess.Popen([sys.executable, "-c", DRIVER, local], cwd=ROOT, env=cli_env(),
                              stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)  # fmt: skip
    try:
        line = driver.stdout.readline()
        assert line, driver.stderr.read()
        run_id, worker_pid = line.split()
        driver.kill()
        driver.wait(timeout=10)
        client = MlflowClient(local)
        wait_for(lambda: client.get_run(run_id).info.status == "FAILED", 30, "the run is marked FAILED")
        assert history(client, run_id, "loss") == [(1, 1.0)]  # what was sent before the kill is kept
        wait_for(lambda: not _alive(int(worker_pid)), 30, "the worker exits")
    finally:
        if driver.poll() is None:
            driver.kill()


def _alive(pid: int) -> bool:
    try:
        state = Path(f"/proc/{pid}/status").read_text()
    except OSError:
        return False
    return "\nState:\tZ" not in state  # a zombie has exited (nobody may reap it in a container)


def test_the_network_is_rebuilt_from_a_checkpoint_weights_only(tmp_path: Path) -> None:
    import torch

    from project.infra.checkpoints import read_model
    from project.model import build_model

    hparams = {"model": "cnn", "input_shape": [1, 8, 8], "class_names": list("abc"), "mean": [4.0], "std": [6.0],
               "pixel_max": 16, "model_options": {"hidden_dim": 16}}  # fmt: skip
    network = build_model("cnn", (1, 8, 8), 3, mean=[4.0], std=[6.0], hidden_dim=16).eval()
    state = {f"model.{k}": v for k, v in network.state_dict().items()}
    x = torch.rand(5, 1, 8, 8) * 16
    path = tmp_path / "a.ckpt"
    torch.save({"hyper_parameters": hparams, "state_dict": state}, path)
    rebuilt, spec = read_model(path)
    assert spec == {"class_names": list("abc"), "input_shape": [1, 8, 8], "pixel_max": 16.0}
    with torch.no_grad():
        assert torch.allclose(rebuilt(x), network(x), atol=1e-6)
    hostile = tmp_path / "hostile.ckpt"
    torch.save({"hyper_parameters": hparams, "state_dict": state, "x": Path("/")}, hostile)
    with pytest.raises(UserError, match="holds Python objects"):  # a pickled object: refused, never run
        read_model(hostile)


# --- slow: a real server, the model ------------------------------------------------------------------------------


@pytest.mark.slow
def test_a_server_killed_mid_run_costs_one_warning_and_no_waiting(mlflow_server, tmp_path, capsys):
    from mlflow.tracking import MlflowClient

    logger = open_logger(start(mlflow_server.url, tmp_path), tmp_path)
    logger.mark_running()
    logger.log_hyperparams({"lr": 0.1})
    for step in range(5):
        logger.log_metrics({"loss": 1.0 / (step + 1)}, step)
    client = MlflowClient(mlflow_server.url)
    wait_for(lambda: len(client.get_metric_history(logger.run_id, "loss")) == 5, 30, "the server has the metrics")

    mlflow_server.kill()
    slowest, step = 0.0, 5
    deadline = time.monotonic() + 120
    while logger.client.failure is None:  # training goes on: calls keep returning at once
        assert time.monotonic() < deadline, "the worker never noticed the dead server"
        started = time.perf_counter()
        logger.log_metrics({"loss": 0.1}, step)
        logger.log_files([tmp_path / "nothing"])
        slowest = max(slowest, time.perf_counter() - started)
        step += 1
        time.sleep(0.05)
    for _ in range(20):  # after the failure, calls are dropped
        started = time.perf_counter()
        logger.log_metrics({"loss": 0.1}, step)
        slowest = max(slowest, time.perf_counter() - started)
    assert slowest < 0.05
    started = time.monotonic()
    problem = logger.close("FINISHED", timeout=60)
    assert time.monotonic() - started < 5  # nothing more is sent to a dead server
    assert problem.startswith("MLflow: records stop where the server stopped answering (no answer from")
    assert logger.describe()["complete"] is False
    lines = [line for line in capsys.readouterr().err.splitlines() if line.strip()]
    assert len(lines) == 1 and lines[0].startswith("warning: MLflow stopped answering (no answer from")
    assert f"{tmp_path / 'run'} keeps the complete records" in lines[0] and "Traceback" not in lines[0]


@pytest.fixture(scope="module")
def checkpoint(tmp_path_factory) -> Path:
    """The best checkpoint of a 1-epoch run of this project, as a user would make it."""
    exp_dir = tmp_path_factory.mktemp("trained")
    command = [sys.executable, "-m", "project.run", "--max-epochs", "1", "--logger", "csv", "--exp-dir", str(exp_dir),
               "--num-workers", "0"]  # fmt: skip
    result = subprocess.run(command, cwd=ROOT, env=cli_env(), capture_output=True, text=True, timeout=300)
    assert result.returncode == 0, result.stderr
    (best,) = exp_dir.glob("debug/*/checkpoints/best-*.ckpt")
    return best


@pytest.fixture(scope="module")
def logged_model(checkpoint, tmp_path_factory) -> tuple[str, str]:
    """(tracking URI, model URI) of the checkpoint's network logged by the worker."""
    root = tmp_path_factory.mktemp("model-store")
    logger = open_logger(start(store(root), root, prepare_model=True), root)
    logger.mark_running()
    logger.log_model(checkpoint)
    started = time.monotonic()
    assert logger.close("FINISHED", timeout=120) is None
    print(f"close waited {time.monotonic() - started:.2f} s")
    assert logger.describe()["complete"] and logger.describe()["model_uri"].startswith("models:/")
    return store(root), logger.describe()["model_uri"]


def reference_logits(checkpoint: Path, x):
    import torch

    from project.infra.checkpoints import read_model

    network, _ = read_model(checkpoint)
    with torch.no_grad():
        return network(torch.from_numpy(x)).numpy()


@pytest.mark.slow
def test_the_logged_model_loads_in_mlflow_and_gives_the_networks_logits(checkpoint, logged_model, monkeypatch):
    import mlflow
    import numpy as np

    uri, model_uri = logged_model
    monkeypatch.setenv("MLFLOW_TRACKING_URI", uri)
    mlflow.set_tracking_uri(uri)
    model = mlflow.pyfunc.load_model(model_uri)
    for batch in (1, 3, 7):  # the batch axis is dynamic, a batch of 1 included
        x = np.random.default_rng(batch).uniform(0, 16, (batch, 1, 8, 8)).astype(np.float32)
        np.testing.assert_allclose(model.predict(x), reference_logits(checkpoint, x), atol=1e-5)
    info = mlflow.models.get_model_info(model_uri)
    assert [spec.shape for spec in info.signature.inputs.inputs] == [(-1, 1, 8, 8)]
    assert [spec.shape for spec in info.signature.outputs.inputs] == [(-1, 10)]
    assert info.saved_input_example_info is not None
    assert info.metadata["project"]["class_names"] == [str(i) for i in range(10)]
    assert info.metadata["project"]["input_shape"] == [1, 8, 8] and info.metadata["project"]["pixel_max"] == 16
    client = mlflow.MlflowClient(uri)
    run = client.get_run(info.run_id)  # the run lists it among its logged models, in its experiment's artifacts
    assert [output.model_id for output in run.outputs.model_outputs] == [info.model_id]
    found = client.get_logged_model(info.model_id)
    assert found.experiment_id == run.info.experiment_id
    assert found.artifact_location.startswith(client.get_experiment(run.info.experiment_id).artifact_location)


@pytest.mark.slow
def test_mlflow_serves_the_logged_model_over_http(checkpoint, logged_model, tmp_path):
    import numpy as np

    uri, model_uri = logged_model
    port = free_port()
    log = open(tmp_path / "serve.log", "w")  # noqa: SIM115 (closed below)
    server = subprocess.Popen(
        [sys.executable, "-m", "mlflow", "models", "serve", "-m", model_uri, "--env-manager", "local",
         "-h", "127.0.0.1", "-p", str(port)],
        cwd=tmp_path, env=cli_env(MLFLOW_TRACKING_URI=uri), stdout=log, stderr=subprocess.STDOUT,
        start_new_session=True,
    )  # fmt: skip
    try:
        deadline = time.monotonic() + 180
        while True:
            assert server.poll() is None, (tmp_path / "serve.log").read_text()[-3000:]
            try:
                with urllib.request.urlopen(f"http://127.0.0.1:{port}/ping", timeout=2) as answer:
                    if answer.status == 200:
                        break
            except OSError:
                assert time.monotonic() < deadline, "mlflow models serve did not answer"
                time.sleep(0.5)
        x = np.random.default_rng(0).uniform(0, 16, (4, 1, 8, 8)).astype(np.float32)
        request = urllib.request.Request(
            f"http://127.0.0.1:{port}/invocations",
            data=json.dumps({"inputs": x.tolist()}).encode(),
            headers={"Content-Type": "application/json"},
        )
        with urllib.request.urlopen(request, timeout=60) as answer:
            predictions = np.asarray(json.loads(answer.read())["predictions"], dtype=np.float32)
        np.testing.assert_allclose(predictions, reference_logits(checkpoint, x), atol=1e-5)
    finally:
        if server.poll() is None:
            os.killpg(server.pid, signal.SIGKILL)
        server.wait()
        log.close()
