"""Shared test helpers: run the real CLI in its own process, and write tiny datasets in their real formats."""

from __future__ import annotations

import atexit
import hashlib
import io
import json
import locale
import os
import pickle
import queue
import shutil
import signal
import socket
import struct
import subprocess
import sys
import tempfile
import threading
import time
import urllib.request
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import pytest
from cli_server import LAZY
from fault_driver import CIFAR10_MD5_ENV, cifar10_checksums

ROOT = Path(__file__).resolve().parent.parent


@dataclass
class CliResult:
    returncode: int
    stdout: str
    stderr: str


def cli_env(**extra: str) -> dict[str, str]:
    """The environment for a CLI subprocess: this checkout first on the path, quiet, offline."""
    env = {k: v for k, v in os.environ.items() if not k.startswith(("MLFLOW_", "WANDB_"))}
    env["PYTHONPATH"] = str(ROOT) + os.pathsep + env.get("PYTHONPATH", "")
    env["PYTHONUNBUFFERED"] = "1"
    # The slow tests run two at a time on the cores there are: a process's threads beyond its share spin on the
    # other's cores (the README's two tests side by side: 135 and 112 s with torch's default threads, 101 and 61 s
    # with one). A test of the thread count itself sets or removes it.
    env.setdefault("OMP_NUM_THREADS", "1")
    env.update(extra)
    return env


def run_cli(
    *args: str,
    module: str = "project.run",
    timeout: float = 300,
    env: dict | None = None,
    cifar10_md5: Path | None = None,
    cwd: Path = ROOT,
    server: CliServer | None = None,
) -> CliResult:
    """`python -m project.run ARGS`, as a user would run it: in a fresh process, or (the same but ~4 s faster) a
    child forked by tests/cli_server.py where nothing it reads at start-up differs: the shared server's, or `server`,
    one a test started for many commands in an environment of their own. With `cifar10_md5` (the JSON
    write_cifar10_like writes), the run accepts those tiny CIFAR-10 files as official: it goes through
    tests/fault_driver.py, which registers their checksums in that process (see its docstring)."""
    if cifar10_md5 is not None:
        env = {**(env or cli_env()), CIFAR10_MD5_ENV: str(cifar10_md5)}
        if module == "project.run":
            module, args = "tests.fault_driver", ("none", "--", *args)
    env = env or cli_env()
    if server is None and CliServer.takes(env):
        server = CliServer.shared()
    if server is not None:
        assert same_start(env, server.env), "this run's environment differs from its server's where start-up reads it"
        return server.run(module, args, env, timeout, cwd)
    completed = subprocess.run(
        [sys.executable, "-m", module, *args], capture_output=True, text=True, timeout=timeout, cwd=cwd, env=env
    )
    return CliResult(completed.returncode, completed.stdout, completed.stderr)


# What scikit-learn sets (os.environ.setdefault) when it is imported, as every run and the server do: a test process
# that has imported it since its server started differs only there.
SET_BY_IMPORTS = {"KMP_DUPLICATE_LIB_OK": "True", "KMP_INIT_AT_FORK": "FALSE"}


def same_start(env: dict, base: dict) -> bool:
    """Whether a process started with `env` starts as one with `base`: they differ only in variables read when used."""
    env, base = SET_BY_IMPORTS | env, SET_BY_IMPORTS | base
    return all(k.startswith(LAZY) for k in env.keys() | base.keys() if env.get(k) != base.get(k))


class CliServer:
    """Client of tests/cli_server.py: one server per test process for cli_env()'s environment, started on first
    use; a test that runs many commands in another (a HOME of its own, a patched copy on PYTHONPATH) starts its own,
    as a context manager."""

    instance: CliServer | None = None

    @classmethod
    def shared(cls) -> CliServer:
        if not cls.alive():
            cls.instance = cls()
        return cls.instance

    @classmethod
    def alive(cls) -> bool:
        return cls.instance is not None and cls.instance.process.poll() is None

    @classmethod
    def takes(cls, env: dict) -> bool:
        """Whether the shared server may fork a run with `env` (with none running yet, the one started now)."""
        return same_start(env, cls.instance.env if cls.alive() else cli_env())

    def __init__(self, env: dict | None = None) -> None:
        self.env, self.calls = env or cli_env(), 0
        self.folder = Path(tempfile.mkdtemp(prefix="cli-server-"))
        atexit.register(shutil.rmtree, self.folder, ignore_errors=True)
        with open(self.folder / "server.err", "wb") as errors:
            self.process = subprocess.Popen([sys.executable, str(ROOT / "tests" / "cli_server.py")], cwd=ROOT,
                                            env=self.env, stdin=subprocess.PIPE, stdout=subprocess.PIPE,
                                            stderr=errors, text=True)  # fmt: skip
        self.answers: queue.Queue = queue.Queue()
        threading.Thread(target=lambda: [self.answers.put(json.loads(line)) for line in self.process.stdout],
                         daemon=True).start()  # fmt: skip
        assert self.answers.get(timeout=120) == {"ready": True}
        # Importing the libraries printed nothing: a fresh process would have printed nothing there either.
        assert (self.folder / "server.err").read_bytes() == b"", (self.folder / "server.err").read_text()

    def __enter__(self) -> CliServer:
        return self

    def __exit__(self, *exc: object) -> None:
        self.process.stdin.close()  # the server ends when its input does
        self.process.wait(timeout=60)
        shutil.rmtree(self.folder, ignore_errors=True)

    def run(self, module: str, args: tuple[str, ...], env: dict, timeout: float, cwd: Path = ROOT) -> CliResult:
        self.calls += 1
        pipes = [self.folder / f"{self.calls}.{name}" for name in ("stdout", "stderr")]
        ends = []
        for pipe in pipes:
            os.mkfifo(pipe)
            ends.append(os.open(pipe, os.O_RDONLY | os.O_NONBLOCK))  # there for the server to open the other end
        request = {"module": module, "args": list(args), "env": env, "cwd": str(cwd), "stdout": str(pipes[0]),
                   "stderr": str(pipes[1])}  # fmt: skip
        self.process.stdin.write(json.dumps(request) + "\n")
        self.process.stdin.flush()
        pid = self.answers.get(timeout=60)["pid"]  # the child holds the write ends now
        read: list[bytes] = [b"", b""]

        def drain(index: int) -> None:
            os.set_blocking(ends[index], True)
            with open(ends[index], "rb") as stream:
                read[index] = stream.read()

        readers = [threading.Thread(target=drain, args=(i,), daemon=True) for i in (0, 1)]
        deadline = time.monotonic() + timeout
        for reader in readers:
            reader.start()
        for reader in readers:
            reader.join(max(0.0, deadline - time.monotonic()))
        for pipe in pipes:
            pipe.unlink()
        if any(reader.is_alive() for reader in readers):
            os.kill(pid, signal.SIGKILL)
            self.answers.get(timeout=60)  # its end, as subprocess.run waits for it
            raise subprocess.TimeoutExpired([module, *args], timeout)
        ended = self.answers.get(timeout=60)
        out, err = (io.TextIOWrapper(io.BytesIO(data), encoding=locale.getpreferredencoding(False)).read()
                    for data in read)  # as subprocess.run(text=True) decodes  # fmt: skip
        return CliResult(ended["returncode"], out, err)


def run_dirs(exp_dir: Path, exp_name: str = "debug") -> list[Path]:
    """The run directories of an experiment, oldest first (their names start with the start time)."""
    return sorted(p for p in (exp_dir / exp_name).iterdir() if p.is_dir())


def file_digests(root: Path) -> dict[str, str]:
    """Every file's bytes (as digests) and every folder under `root`: an empty run directory left behind counts."""
    return {str(p.relative_to(root)): hashlib.sha256(p.read_bytes()).hexdigest() if p.is_file() else "folder"
            for p in root.rglob("*")}  # fmt: skip


def only_run_dir(exp_dir: Path, exp_name: str = "debug") -> Path:
    runs = run_dirs(exp_dir, exp_name)
    assert len(runs) == 1, runs
    return runs[0]


class Payload:
    """A pickle that creates `marker` when it is loaded: the file appears if, and only if, the pickle ran."""

    def __init__(self, marker: Path) -> None:
        self.marker = marker

    def __reduce__(self) -> tuple:
        return (Path.touch, (self.marker,))


def wait_for(condition, process: subprocess.Popen | None, what: str, seconds: float = 240) -> None:
    """Poll `condition` until it holds; fail if `process` ends first or `seconds` pass."""
    deadline = time.monotonic() + seconds
    while not condition():
        if process is not None:
            assert process.poll() is None, f"ended before {what}: {process.communicate()[1][-2000:]}"
        assert time.monotonic() < deadline, f"no {what} within {seconds} s"
        time.sleep(0.2)


def write_idx(path: Path, array: np.ndarray) -> None:
    """An IDX file (MNIST's format): magic with the dtype code and rank, big-endian sizes, raw bytes."""
    assert array.dtype == np.uint8
    path.parent.mkdir(parents=True, exist_ok=True)
    header = struct.pack(">BBBB", 0, 0, 0x08, array.ndim) + struct.pack(f">{array.ndim}I", *array.shape)
    path.write_bytes(header + array.tobytes())


def write_mnist_like(root: Path, folder: str, n_train: int = 60, n_test: int = 20, seed: int = 0) -> None:
    """Tiny MNIST/Fashion-MNIST files where torchvision looks for them: <root>/<folder>/raw/."""
    rng = np.random.default_rng(seed)
    raw = root / folder / "raw"
    for prefix, n in (("train", n_train), ("t10k", n_test)):
        write_idx(raw / f"{prefix}-images-idx3-ubyte", rng.integers(0, 256, (n, 28, 28), dtype=np.uint8))
        write_idx(raw / f"{prefix}-labels-idx1-ubyte", (np.arange(n) % 10).astype(np.uint8))


@dataclass
class Cifar10Like:
    md5_file: Path  # {file name: MD5} of the files written, for register_cifar10_like and run_cli
    batches: dict[str, dict]  # what each file holds, by file name


def write_cifar10_like(root: Path, per_batch: int = 20, n_test: int = 20, seed: int = 0) -> Cifar10Like:
    """Tiny CIFAR-10 python batches in <root>/cifar-10-batches-py/, in the official files' format:
    protocol-2 pickles of dicts with str keys (the official Python 2 pickles load so under encoding="latin1"),
    uint8 rows of 3,072 pixels (1,024 red, then green, then blue). Their MD5s go to <root>/cifar10-md5.json:
    torchvision refuses them as not official unless a test registers those (register_cifar10_like)."""
    rng = np.random.default_rng(seed)
    folder = root / "cifar-10-batches-py"
    folder.mkdir(parents=True, exist_ok=True)

    def batch(label: str, n: int) -> dict:
        return {
            "batch_label": label,
            "labels": [i % 10 for i in range(n)],
            "data": rng.integers(0, 256, (n, 3072), dtype=np.uint8),
            "filenames": [f"image_{i}.png" for i in range(n)],
        }

    names = ["airplane", "automobile", "bird", "cat", "deer", "dog", "frog", "horse", "ship", "truck"]
    batches = {f"data_batch_{i}": batch(f"training batch {i} of 5", per_batch) for i in range(1, 6)}
    batches["test_batch"] = batch("testing batch 1 of 1", n_test)
    batches["batches.meta"] = {"num_cases_per_batch": per_batch, "label_names": names, "num_vis": 3072}
    for name, content in batches.items():
        (folder / name).write_bytes(pickle.dumps(content, protocol=2))
    md5 = {name: hashlib.md5((folder / name).read_bytes()).hexdigest() for name in batches}
    md5_file = root / "cifar10-md5.json"
    md5_file.write_text(json.dumps(md5))
    return Cifar10Like(md5_file, batches)


def register_cifar10_like(monkeypatch: pytest.MonkeyPatch, written: Cifar10Like) -> None:
    """Make torchvision's CIFAR10 (and so the template) take `written`'s checksums for the official ones,
    in this process, through its public class attributes; monkeypatch restores them after the test."""
    import torchvision

    for name, value in cifar10_checksums(json.loads(written.md5_file.read_text())).items():
        monkeypatch.setattr(torchvision.datasets.CIFAR10, name, value)


def write_image_folder(root: Path, classes: tuple[str, ...] = ("cat", "dog"), per_class: int = 10, size: int = 12):
    """PNG files, one sub-folder per class."""
    from PIL import Image

    rng = np.random.default_rng(0)
    for c, name in enumerate(classes):
        (root / name).mkdir(parents=True, exist_ok=True)
        for i in range(per_class):
            pixels = rng.integers(0, 256, (size, size, 3), dtype=np.uint8)
            pixels[..., c % 3] = 255  # a learnable colour cue per class
            Image.fromarray(pixels).save(root / name / f"{i}.png")


def pytest_configure(config: pytest.Config) -> None:
    """What the runs leave in the temporary directory (multiprocessing's and torchelastic's folders of a killed
    process, MLflow's lock files) goes into one folder removed when the session ends: hundreds of runs must not fill
    a shared /tmp. One folder, not one inside another for each xdist worker or a test's own pytest run: a socket's
    path must stay under ~100 bytes. pytest's tmp_path folders stay where they were (PYTEST_DEBUG_TEMPROOT)."""
    if os.environ.get("TMPDIR") and os.environ.get("TMPDIR") == os.environ.get("TESTS_TMPDIR"):
        return
    os.environ.setdefault("PYTEST_DEBUG_TEMPROOT", tempfile.gettempdir())
    scratch = tempfile.mkdtemp(prefix="tests-")
    config.add_cleanup(lambda: shutil.rmtree(scratch, ignore_errors=True))
    os.environ["TMPDIR"] = os.environ["TESTS_TMPDIR"] = scratch
    tempfile.tempdir = None  # tempfile caches the folder it found first


# The longest tests (each runs many commands: ~40 s alone), first: two workers that end with them side by side take
# twice as long over them as two that run them beside shorter ones.
LONGEST_FIRST = ("tests/test_readme.py",)


def pytest_collection_modifyitems(items: list[pytest.Item]) -> None:
    items.sort(key=lambda item: not item.nodeid.startswith(LONGEST_FIRST))  # stable: the rest keep their order


@pytest.fixture(autouse=True)
def own_cache(tmp_path, monkeypatch):
    """Each test's record of checked image headers (infra/images.check_headers) is its own, in its commands too."""
    monkeypatch.setenv("XDG_CACHE_HOME", str(tmp_path / "cache"))


@pytest.fixture
def exp_dir(tmp_path: Path) -> Path:
    return tmp_path / "experiments"


def free_port() -> int:
    with socket.socket() as probe:
        probe.bind(("127.0.0.1", 0))
        return probe.getsockname()[1]


class MlflowServer:
    """`mlflow server` on 127.0.0.1 with its own SQLite database and artifact folder, in its own process group."""

    def __init__(self, root: Path) -> None:
        root.mkdir(parents=True, exist_ok=True)
        self.url = f"http://127.0.0.1:{free_port()}"
        command = [sys.executable, "-m", "mlflow", "server", "--host", "127.0.0.1", "--port", self.url.rsplit(":")[-1],
                   "--workers", "1", "--backend-store-uri", f"sqlite:///{root / 'server.db'}",
                   "--artifacts-destination", str(root / "artifacts")]  # fmt: skip
        self.log = open(root / "server.log", "w")  # noqa: SIM115 (closed in stop)
        self.root, self.command = root, command
        self.start()

    def start(self) -> None:
        """(Again, after kill: the same port and store.)"""
        self.process = subprocess.Popen(
            self.command,
            cwd=self.root,
            # MLflow's job runner (GenAI jobs, nothing a training run uses) starts 7 more processes that import MLflow
            env=cli_env(MLFLOW_SERVER_ENABLE_JOB_EXECUTION="false"),
            stdout=self.log,
            stderr=subprocess.STDOUT,
            start_new_session=True,
        )

    def wait_until_up(self, timeout: float = 120) -> None:
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            assert self.process.poll() is None, "mlflow server exited"
            try:
                with urllib.request.urlopen(f"{self.url}/health", timeout=2) as answer:
                    if answer.status == 200:
                        return
            except OSError:
                time.sleep(0.5)
        raise TimeoutError("mlflow server did not start")

    def kill(self) -> None:
        if self.process.poll() is None:
            os.killpg(self.process.pid, signal.SIGKILL)  # the server and the workers it started
            self.process.wait()

    def stop(self) -> None:
        self.kill()
        self.log.close()


@pytest.fixture
def mlflow_server(tmp_path):
    server = MlflowServer(tmp_path / "server")
    try:
        server.wait_until_up()
        yield server
    finally:
        server.stop()
