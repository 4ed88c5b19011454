"""Two processes (DDP over gloo, on the CPU) give the numbers of one process, with one set of records.

Lightning's `strategy="ddp"` starts the other ranks by re-running the command line, so these run the
real CLI in a subprocess (inside pytest it would re-run pytest).
"""

from __future__ import annotations

import json
from pathlib import Path

import pytest
from conftest import cli_env, free_port, only_run_dir, run_cli, write_mnist_like

QUICK = ("--logger", "csv", "--num-workers", "0", "--model", "mlp", "--hidden-dim", "32")
TWO_PROCESSES = ("--accelerator", "cpu", "--devices", "2", "--strategy", "ddp")
ONE_PROCESS = ("--accelerator", "cpu", "--devices", "1")

pytestmark = pytest.mark.slow


def read_test_metrics(run_dir: Path) -> dict:
    return json.loads((run_dir / "test_metrics.json").read_text())


def evaluate(checkpoint: Path, exp_dir: Path, name: str, processes: tuple[str, ...], *data: str) -> dict:
    result = run_cli("--only-test", "--checkpoint", str(checkpoint), "--exp-dir", str(exp_dir), "--exp-name", name,
                     *processes, *data, *QUICK)  # fmt: skip
    assert result.returncode == 0, result.stderr[-3000:]
    return read_test_metrics(only_run_dir(exp_dir, name))


@pytest.mark.parametrize("dataset", ["digits", "odd-sized"])
def test_two_processes_evaluate_exactly_like_one(tmp_path, dataset):
    """Every test sample counted once: no duplicates from sampler padding, none dropped."""
    data: tuple[str, ...] = ()
    if dataset == "odd-sized":
        write_mnist_like(tmp_path / "data", "MNIST", n_train=40, n_test=21)  # 21: not divisible by 2
        data = ("--dataset", "mnist", "--data-dir", str(tmp_path / "data"))
    exp_dir = tmp_path / "experiments"
    trained = run_cli("--max-epochs", "2", "--exp-dir", str(exp_dir), "--exp-name", "train", *data, *QUICK)
    assert trained.returncode == 0, trained.stderr[-3000:]
    checkpoint = next((only_run_dir(exp_dir, "train") / "checkpoints").glob("best-*.ckpt"))

    one = evaluate(checkpoint, exp_dir, "one", ONE_PROCESS, *data)
    two = evaluate(checkpoint, exp_dir, "two", TWO_PROCESSES, *data)

    test_size = 21 if dataset == "odd-sized" else 180
    assert sum(map(sum, one["confusion_matrix"])) == test_size
    assert two["confusion_matrix"] == one["confusion_matrix"]
    for key in ("acc", "precision", "recall", "f1", "loss", "per_class"):
        assert two[key] == one[key], key


def test_two_processes_evaluate_a_regression_like_one(tmp_path):
    exp_dir = tmp_path / "experiments"
    data = ("--dataset", "diabetes")
    trained = run_cli("--max-epochs", "2", "--exp-dir", str(exp_dir), "--exp-name", "train", *data, *QUICK)
    assert trained.returncode == 0, trained.stderr[-3000:]
    checkpoint = next((only_run_dir(exp_dir, "train") / "checkpoints").glob("best-*.ckpt"))
    one = evaluate(checkpoint, exp_dir, "one", ONE_PROCESS, *data)
    two = evaluate(checkpoint, exp_dir, "two", TWO_PROCESSES, *data)
    for key in ("mae", "rmse", "r2", "loss"):  # float64 sums, added in another order: equal to rounding
        assert two[key] == pytest.approx(one[key], rel=1e-12), key
    assert two["per_output"].keys() == one["per_output"].keys() == {"progression"}


def test_two_process_training_converges_with_one_set_of_records(tmp_path):
    exp_dir = tmp_path / "experiments"
    result = run_cli("--max-epochs", "10", "--learning-rate", "0.01", "--model", "mlp", "--hidden-dim", "64",
                     "--num-workers", "0", "--logger", "mlflow", "--exp-dir", str(exp_dir), *TWO_PROCESSES)  # fmt: skip
    assert result.returncode == 0, result.stderr[-3000:]
    run_dir = only_run_dir(exp_dir)  # one run directory, not one per process
    metrics = read_test_metrics(run_dir)
    assert metrics["acc"] >= 0.9
    assert sum(map(sum, metrics["confusion_matrix"])) == 180
    assert len(list((run_dir / "checkpoints").glob("best-*.ckpt"))) == 1
    manifest = json.loads((run_dir / "manifest.json").read_text())
    assert manifest["hardware"]["world_size"] == 2

    from mlflow.tracking import MlflowClient

    client = MlflowClient(tracking_uri=f"sqlite:///{exp_dir.resolve() / 'mlflow.db'}")
    experiment = client.get_experiment_by_name("debug")
    runs = client.search_runs([experiment.experiment_id])
    assert len(runs) == 1  # one tracker run, not one per process
    assert runs[0].data.metrics["test/acc"] == pytest.approx(metrics["acc"])


def test_torchrun_launch_writes_one_run_directory(tmp_path):
    """Under torchrun every rank starts at once (no Lightning launcher): still one set of records."""
    import subprocess
    import sys

    from conftest import ROOT, cli_env

    exp_dir = tmp_path / "experiments"
    command = [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc-per-node", "2",
               "-m", "project.run", "--max-epochs", "2", "--exp-dir", str(exp_dir), *TWO_PROCESSES, *QUICK]  # fmt: skip
    result = subprocess.run(command, capture_output=True, text=True, cwd=ROOT, env=cli_env(), timeout=300)
    assert result.returncode == 0, result.stderr[-3000:]
    run_dir = only_run_dir(exp_dir)
    assert sum(map(sum, read_test_metrics(run_dir)["confusion_matrix"])) == 180
    assert json.loads((run_dir / "manifest.json").read_text())["hardware"]["world_size"] == 2


PLAIN_DATAMODULE = '''

import lightning.pytorch as pl  # noqa: E402


class PlainDigits(pl.LightningDataModule):
    """A user's plain LightningDataModule: standard DataLoaders; each sample read is noted in a file per process."""

    task, default_model, output_names = "classification", "mlp", [str(d) for d in range(10)]
    input_shape, mean, std, pixel_max = (1, 8, 8), (4.884,), (6.017,), 16

    def __init__(self, data_dir: str = "data", **_) -> None:
        super().__init__()
        from sklearn.datasets import load_digits

        digits = load_digits()
        inputs, targets = torch.as_tensor(digits.images[:, None], dtype=torch.float32), torch.as_tensor(digits.target)
        self.splits = [Noted(data_dir, inputs[part], targets[part]) for part in (slice(0, 1400), slice(1400, 1600),
                                                                                  slice(1600, None))]

    def train_dataloader(self):
        return torch.utils.data.DataLoader(self.splits[0], batch_size=100, shuffle=True)

    def val_dataloader(self):
        return torch.utils.data.DataLoader(self.splits[1], batch_size=100)

    def test_dataloader(self):
        return torch.utils.data.DataLoader(self.splits[2], batch_size=100)


class Noted(torch.utils.data.TensorDataset):
    def __init__(self, folder, *tensors):
        super().__init__(*tensors)
        self.folder = folder

    def __getitem__(self, index):
        import os

        with open(os.path.join(self.folder, f"read-by-{os.getpid()}.txt"), "a") as file:
            file.write(f"{len(self.tensors[0])} {index}\\n")
        return super().__getitem__(index)


DATASETS["plain"] = PlainDigits


class StreamedDigits(PlainDigits):
    """The same, its training set an IterableDataset (which Lightning does not shard)."""

    def train_dataloader(self):
        return torch.utils.data.DataLoader(Stream(list(zip(*self.splits[0].tensors))), batch_size=100)


class Stream(torch.utils.data.IterableDataset):
    def __init__(self, pairs):
        self.pairs = pairs

    def __iter__(self):
        return iter(self.pairs)


DATASETS["plain-stream"] = StreamedDigits


class BatchedDigits(PlainDigits):
    """The same, batched by a sampler of its own that is no BatchSampler (Lightning cannot shard it)."""

    def train_dataloader(self):
        return torch.utils.data.DataLoader(self.splits[0], batch_sampler=Batches(len(self.splits[0])))


class Batches:
    def __init__(self, size):
        self.size = size

    def __iter__(self):
        return iter([list(range(start, min(start + 100, self.size))) for start in range(0, self.size, 100)])

    def __len__(self):
        return -(-self.size // 100)


DATASETS["plain-batches"] = BatchedDigits
'''


def test_a_users_plain_datamodule_is_sharded_across_processes(tmp_path):
    """Lightning puts a DistributedSampler into a user's own DataLoaders (ours shard themselves): each of two
    processes trains on half of the training set, not on all of it."""
    import shutil
    import subprocess
    import sys

    from conftest import ROOT, cli_env

    copy = tmp_path / "copy"
    shutil.copytree(ROOT / "project", copy / "project", ignore=shutil.ignore_patterns("__pycache__"))
    data_py = copy / "project" / "data.py"
    data_py.write_text(data_py.read_text() + PLAIN_DATAMODULE)
    run_py = copy / "project" / "run.py"
    run_py.write_text(run_py.read_text().replace('"diabetes")', '"diabetes", "plain", "plain-stream", "plain-batches")',
                                                 1))  # fmt: skip
    notes = tmp_path / "notes"
    notes.mkdir()
    done = subprocess.run([sys.executable, "-m", "project.run", "--dataset", "plain", "--data-dir", str(notes),
                           "--max-epochs", "1", "--exp-dir", str(tmp_path / "experiments"), *QUICK, *TWO_PROCESSES],
                          cwd=copy, env={**cli_env(), "PYTHONPATH": str(copy)}, capture_output=True, text=True,
                          timeout=600)  # fmt: skip
    assert done.returncode == 0, done.stderr[-3000:]
    training = [[line for line in path.read_text().splitlines() if line.startswith("1400 ")]
                for path in notes.glob("read-by-*.txt")]  # fmt: skip
    training = [reads for reads in training if reads]
    assert len(training) == 2 and [len(reads) for reads in training] == [700, 700], [len(r) for r in training]
    assert not set(training[0]) & set(training[1])  # two halves, not the whole set twice
    assert "IterableDataset" not in done.stderr

    # An IterableDataset is not sharded by Lightning: it is said once, not left silent.
    done = subprocess.run([sys.executable, "-m", "project.run", "--dataset", "plain-stream", "--data-dir", str(notes),
                           "--max-epochs", "1", "--exp-dir", str(tmp_path / "experiments"), *QUICK, *TWO_PROCESSES],
                          cwd=copy, env={**cli_env(), "PYTHONPATH": str(copy)}, capture_output=True, text=True,
                          timeout=600)  # fmt: skip
    assert done.returncode == 0, done.stderr[-3000:]
    assert done.stderr.count("warning: the training data is an IterableDataset, which Lightning does not split") == 1

    # A batch sampler Lightning cannot rebuild for several processes: one line from each, not its TypeError traceback.
    done = subprocess.run([sys.executable, "-m", "project.run", "--dataset", "plain-batches", "--data-dir", str(notes),
                           "--max-epochs", "1", "--exp-dir", str(tmp_path / "experiments"), *QUICK, *TWO_PROCESSES],
                          cwd=copy, env={**cli_env(), "PYTHONPATH": str(copy)}, capture_output=True, text=True,
                          timeout=600)  # fmt: skip
    assert done.returncode != 0 and "Traceback" not in done.stderr, done.stderr[-3000:]
    assert "error: Lightning cannot split this DataLoader across the processes: its batch sampler" in done.stderr


def torchrun_nodes(tmp_path: Path, *nodes: tuple[str, ...], timeout: float = 300) -> list[tuple[int, str]]:
    """One torchrun launcher per node (one process each), meeting on loopback, each in an empty folder of its own:
    their exit statuses and their workers' stderr."""
    import subprocess
    import sys

    port, launched = free_port(), []
    for rank, args in enumerate(nodes):
        (tmp_path / f"node{rank}").mkdir()
        command = [sys.executable, "-m", "torch.distributed.run", "--nnodes", str(len(nodes)), "--node-rank",
                   str(rank), "--nproc-per-node", "1", "--rdzv-backend", "c10d", "--rdzv-endpoint", f"127.0.0.1:{port}",
                   "--log-dir", str(tmp_path / f"log{rank}"), "--redirects", "3", "-m", "project.run",
                   "--num-nodes", str(len(nodes)), "--accelerator", "cpu", "--devices", "1", *args]  # fmt: skip
        launched.append(subprocess.Popen(command, cwd=tmp_path / f"node{rank}", env=cli_env(OMP_NUM_THREADS="1"),
                                         stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL))  # fmt: skip
    try:
        codes = [process.wait(timeout) for process in launched]
    finally:
        for process in launched:
            process.kill()
    stderr = [next((tmp_path / f"log{rank}").glob("**/stderr.log")).read_text() for rank in range(len(nodes))]
    return list(zip(codes, stderr, strict=True))


def test_two_nodes_on_loopback_give_the_numbers_of_two_processes_on_one_node(tmp_path):
    """Two torchrun launchers (--nnodes 2, one process each) train and test exactly like --devices 2 on one node,
    into rank 0's one run directory; the other node writes nothing anywhere."""
    training = ("--max-epochs", "3", *QUICK)
    # One thread per process, as Lightning sets for 2 processes on one node: sums in the same order, the same bits.
    one_node = run_cli(
        *training, "--exp-dir", str(tmp_path / "one-node"), *TWO_PROCESSES, env=cli_env(OMP_NUM_THREADS="1")
    )
    assert one_node.returncode == 0, one_node.stderr[-3000:]
    exp_dir = tmp_path / "experiments"
    for code, stderr in torchrun_nodes(tmp_path, *[(*training, "--exp-dir", str(exp_dir))] * 2):
        assert code == 0, stderr[-3000:]
    run_dir = only_run_dir(exp_dir)
    two_nodes, one_node = read_test_metrics(run_dir), read_test_metrics(only_run_dir(tmp_path / "one-node"))
    tested = Path(two_nodes.pop("checkpoint"))
    assert tested.parent == run_dir / "checkpoints" and tested.name == Path(one_node.pop("checkpoint")).name
    assert two_nodes == one_node
    assert [p.name for p in exp_dir.iterdir()] == ["debug"]
    assert not list((tmp_path / "node0").iterdir()) and not list((tmp_path / "node1").iterdir())
    hardware = json.loads((run_dir / "manifest.json").read_text())["hardware"]
    assert hardware["world_size"] == 2


def test_nodes_started_with_different_options_are_refused_before_any_record(tmp_path):
    """A node given another --max-epochs would deadlock after the shorter run's last epoch: every process says so in
    one line at the start, and no run directory is left."""
    exp_dir = tmp_path / "experiments"
    nodes = [("--max-epochs", epochs, "--exp-dir", str(exp_dir), *QUICK) for epochs in ("2", "3")]
    for code, stderr in torchrun_nodes(tmp_path, *nodes, timeout=120):
        assert code != 0
        assert stderr.strip() == (
            "error: the processes of this run were started with different options (--max-epochs 2/3, by rank); "
            "start every node with the same command"
        )
    assert not [p for p in exp_dir.glob("*/*") if p.is_dir()]
