"""The README's own commands and examples, run as written: the "Use" sequence in order on the bundled digits, and
the extension examples (a backbone with a hyperparameter of its own, a torchvision network, an in-memory dataset)
applied to a copy of the project and trained for an epoch."""

from __future__ import annotations

import csv
import json
import re
import shlex
import shutil
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
import torch
import yaml
from conftest import ROOT, CliResult, CliServer, cli_env, only_run_dir, run_cli

README = (ROOT / "README.md").read_text()

pytestmark = pytest.mark.slow


def section(title: str) -> str:
    start = README.index(f"\n## {title}\n")
    end = README.find("\n## ", start + 1)
    return README[start : end if end > 0 else None]


def code_blocks(text: str, language: str) -> list[str]:
    return re.findall(rf"```{language}\n(.*?)```", text, flags=re.S)


def shell(
    command: str, cwd: Path, env: dict[str, str], timeout: float = 600, server: CliServer | None = None
) -> CliResult | subprocess.CompletedProcess:
    """`command` in bash; a plain `python -m MODULE ARGS` line (no shell syntax but a comment) as the same process
    forked by `server` (tests/cli_server.py: the same run, without importing the libraries again)."""
    words = shlex.split(command, comments=True)
    plain = not set(command.split("#")[0]) & set("|&;<>()$`*?[]{}~\\")
    if server is not None and plain and words[:2] == ["python", "-m"]:
        return run_cli(*words[3:], module=words[2], timeout=timeout, env=env, cwd=cwd, server=server)
    return subprocess.run(["bash", "-c", command], cwd=cwd, env=env, capture_output=True, text=True, timeout=timeout)


def test_the_use_commands_run_in_order_as_written(tmp_path: Path) -> None:
    commands = [line for line in code_blocks(section("Use"), "bash")[0].splitlines() if line.strip()]
    assert len(commands) >= 6 and all("python -m project.run" in c or c.startswith("printf") for c in commands)
    env = cli_env(HOME=str(tmp_path))  # ~/Experiments is this test's own
    with CliServer(env) as server:
        for command in commands:
            done = shell(command, tmp_path, env, server=server)
            assert done.returncode == 0, f"{command}\n{done.stderr[-3000:]}"
            assert "Traceback" not in done.stderr
        assert server.calls == len(commands) - 1  # all but printf
    experiments = tmp_path / "Experiments"
    # The resumed run is the MLP, continued with its own settings to 60 epochs.
    mlp_run = max((experiments / "debug").iterdir(), key=lambda run: json.loads((run / "manifest.json").read_text())
                  .get("resumed", [{}])[-1].get("end_time") or "")  # fmt: skip
    config = yaml.safe_load((mlp_run / "config.yaml").read_text())
    assert (config["model"], config["max_epochs"]) == ("mlp", 60)
    assert len(json.loads((mlp_run / "manifest.json").read_text())["resumed"]) == 1
    # --only-test scored the trial run's best checkpoint exactly as its own test did.
    trial_runs = sorted((experiments / "trial").iterdir())
    trained, retested = (json.loads((run / "test_metrics.json").read_text()) for run in trial_runs)
    assert retested["checkpoint"] == trained["checkpoint"] and retested["acc"] == trained["acc"] >= 0.95


def patched_project(tmp_path: Path) -> Path:
    """A copy of the project (code, tests, benchmarks, README, pyproject.toml) with the README's extension examples
    applied where the README says, as a user would paste them."""
    root = tmp_path / "copy"
    ignore = shutil.ignore_patterns("__pycache__")
    for part in ("project", "tests", "benchmarks"):
        shutil.copytree(ROOT / part, root / part, ignore=ignore)
    for part in ("pyproject.toml", "README.md"):
        shutil.copy(ROOT / part, root)
    blocks = code_blocks(section("Your own data and model"), "python")
    model_code = [b for b in blocks if "MODELS[" in b]
    data_code = [b for b in blocks if "DATASETS[" in b]
    (task_file,) = [b for b in blocks if "(Task):" in b]
    (task_import,) = [b.strip() for b in blocks if b.startswith("from project.tasks.")]
    (tasks_line,) = [b.strip() for b in blocks if b.startswith("TASKS:")]
    (names_line,) = [b.strip() for b in blocks if b.startswith("MODEL_NAMES =")]
    (datasets_line,) = [b.strip() for b in blocks if b.startswith("DATASET_NAMES =")]
    (option_line,) = [b.rstrip("\n") for b in blocks if b.strip().startswith('add("--')]
    (search_lines,) = [b for b in blocks if "suggest_" in b]
    assert len(model_code) == 2 and len(data_code) == 2
    append(root / "project" / "model.py", model_code)
    append(root / "project" / "data.py", data_code)
    (root / "project" / "tasks" / "multilabel.py").write_text(task_file)
    tasks = (root / "project" / "tasks" / "__init__.py").read_text()
    tasks = re.sub(r"^TASKS: .*$", tasks_line, tasks, count=1, flags=re.M)
    imports = re.findall(r"^from project\.tasks\.\w+ import \w+$", tasks, flags=re.M)
    tasks = tasks.replace("\n".join(imports), "\n".join(sorted([*imports, task_import])))  # beside the others
    (root / "project" / "tasks" / "__init__.py").write_text(tasks)
    run_py = (root / "project" / "run.py").read_text()
    run_py = re.sub(r"^MODEL_NAMES = .*$", names_line, run_py, count=1, flags=re.M)
    run_py = run_py.replace(
        'MODEL_NAMES = ("mlp", "cnn", "mlp-dropout")', 'MODEL_NAMES = ("mlp", "cnn", "mlp-dropout", "resnet18")'
    )
    run_py = re.sub(r"^DATASET_NAMES = .*$", datasets_line, run_py, count=1, flags=re.M)
    run_py = run_py.replace('"npz")', '"npz", "digit-traits")')
    marker = re.search(r"^ *# Backbone options.*\n", run_py, flags=re.M)
    run_py = run_py[: marker.end()] + option_line + "\n" + run_py[marker.end() :]
    (root / "project" / "run.py").write_text(run_py)
    sweep_py = (root / "project" / "sweep.py").read_text()
    end = sweep_py.index("    return space\n", sweep_py.index("def search_space("))
    (root / "project" / "sweep.py").write_text(sweep_py[:end] + search_lines + sweep_py[end:])
    return root


def append(path: Path, blocks: list[str]) -> None:
    path.write_text(path.read_text() + "\n\n" + "\n\n".join(blocks))


def train_in(server: CliServer, root: Path, exp_dir: Path, *flags: str) -> Path:
    done = run_cli("--max-epochs", "1", "--logger", "csv", "--num-workers", "0", "--exp-dir", str(exp_dir), *flags,
                   timeout=600, env=server.env, cwd=root, server=server)  # fmt: skip
    assert done.returncode == 0, done.stderr[-3000:]
    return only_run_dir(exp_dir)


def test_the_extension_examples_work_as_the_readme_shows(tmp_path: Path) -> None:
    root = patched_project(tmp_path)
    env = {**cli_env(), "PYTHONPATH": str(root)}  # the patched copy, not this checkout
    with CliServer(env) as server:
        extended_project_trains(server, root, tmp_path)
        assert server.calls == 5  # forked: the same runs, each without importing the libraries again
    extended_parts_do_what_they_say(root, env)

    # The changed copy still passes the project's own tests and its linters; no machinery file was touched (the
    # sweep's search_space() is the part of it meant to be edited).
    for command in ("python -m pytest -q -x -p no:cacheprovider", "ruff format --check .", "ruff check ."):
        done = shell(command, root, env, timeout=900)
        assert done.returncode == 0, f"{command}\n{done.stdout[-3000:]}{done.stderr[-2000:]}"
    changed = [path.relative_to(root).as_posix() for path in (root / "project").rglob("*.py")
               if not (ROOT / path.relative_to(root)).is_file() or (ROOT / path.relative_to(root)).read_bytes()
               != path.read_bytes()]  # fmt: skip
    assert sorted(changed) == ["project/data.py", "project/model.py", "project/run.py", "project/sweep.py",
                               "project/tasks/__init__.py", "project/tasks/multilabel.py"]  # fmt: skip


def extended_parts_do_what_they_say(root: Path, env: dict[str, str]) -> None:
    """The sweep searches the new option for the backbone that takes it; the multi-label metrics read small logits
    (all within [0, 1], which torchmetrics would take for probabilities) as logits."""
    check = """
import optuna, torch
from project.sweep import search_space
from project.tasks.multilabel import MultiLabel
trial = optuna.create_study().ask()
assert set(search_space(trial, {"hidden_dim", "dropout"})) == {"learning_rate", "hidden_dim", "dropout"}
assert set(search_space(optuna.create_study().ask(), {"hidden_dim"})) == {"learning_rate", "hidden_dim"}
metric = MultiLabel(["a", "b"]).metric()
metric.update(torch.tensor([[0.3, 0.2], [0.1, 0.4]]), torch.tensor([[1, 1], [1, 1]]))  # all labels: logits > 0
assert {k: float(v) for k, v in metric.compute().items()} == {"f1": 1.0, "exact_match": 1.0}
"""
    done = subprocess.run([sys.executable, "-c", check], cwd=root, env=env, capture_output=True, text=True, timeout=300)
    assert done.returncode == 0, done.stderr[-3000:]


def extended_project_trains(server: CliServer, root: Path, tmp_path: Path) -> None:
    """The README's backbone with an option of its own, the torchvision network, the in-memory dataset and the task of
    one's own, each trained in the patched copy."""
    run = train_in(server, root, tmp_path / "dropout", "--model", "mlp-dropout", "--dropout", "0.3")
    assert yaml.safe_load((run / "config.yaml").read_text())["dropout"] == 0.3
    hparams = torch.load(run / "checkpoints" / "last.ckpt", weights_only=True)["hyper_parameters"]
    assert hparams["model_options"] == {"hidden_dim": 128, "dropout": 0.3}

    run = train_in(server, root, tmp_path / "resnet", "--model", "resnet18")
    assert json.loads((run / "test_metrics.json").read_text())["acc"] > 0.1  # digits through a ResNet-18

    from sklearn.datasets import load_digits

    digits = load_digits()
    keep = digits.target < 2
    data_dir = tmp_path / "npz-data"
    data_dir.mkdir()
    np.savez(data_dir / "images.npz", images=digits.images[keep][:, None].astype(np.uint8), labels=digits.target[keep])
    run = train_in(server, root, tmp_path / "npz", "--dataset", "npz", "--data-dir", str(data_dir))
    metrics = json.loads((run / "test_metrics.json").read_text())
    assert list(metrics["per_class"]) == ["no", "yes"] and metrics["acc"] >= 0.9

    # The task of one's own: the best checkpoint by the highest val/f1, its scores, predict's columns.
    run = train_in(
        server, root, tmp_path / "traits", "--dataset", "digit-traits", "--monitor", "val/f1", "--max-epochs", "3"
    )
    metrics = json.loads((run / "test_metrics.json").read_text())
    assert set(metrics) >= {"f1", "exact_match", "loss"} and metrics["f1"] > 0.8
    with open(run / "metrics.csv", newline="") as file:
        val_f1 = {int(float(r["epoch"])): float(r["val/f1"]) for r in csv.DictReader(file) if r.get("val/f1")}
    (best,) = (run / "checkpoints").glob("best-*.ckpt")
    assert best.name == f"best-epoch{max(val_f1, key=val_f1.get):03d}.ckpt"
    np.save(tmp_path / "rows.npy", digits.images[:4][:, None])
    command = f"python -m project.predict --checkpoint {best} {tmp_path / 'rows.npy'} --output -"
    done = shell(command, root, server.env, server=server)
    assert done.returncode == 0, done.stderr[-3000:]
    assert done.stdout.splitlines()[0] == "input,labels,prob_even,prob_above_4"
    assert done.stdout.splitlines()[1].split(",")[1] == "even"  # digit 0: even, not above 4
