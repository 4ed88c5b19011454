"""project.sweep: a sweep killed mid-trial continues to exactly N finished trials without repeating one,
hopeless trials are pruned from their validation metric, and the best configuration reruns as is."""

from __future__ import annotations

import csv
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest
import yaml
from conftest import ROOT, cli_env

from project import run, sweep
from project.infra.errors import UserError

TINY = ["--model", "mlp", "--hidden-dim", "16", "--max-epochs", "2", "--logger", "csv", "--num-workers", "0"]


def load_study(exp_dir: Path, name: str):
    import optuna

    return optuna.load_study(study_name=name, storage=f"sqlite:///{exp_dir / 'optuna.db'}")


@pytest.fixture(scope="module")
def resumed_sweep(tmp_path_factory: pytest.TempPathFactory) -> dict:
    """A 3-trial sweep SIGKILLed as its second trial starts, then run again with the same command."""
    exp_dir = tmp_path_factory.mktemp("sweep") / "experiments"
    argv = ["--study", "killed", "--n-trials", "3", *TINY, "--exp-dir", str(exp_dir)]
    process = subprocess.Popen(
        [sys.executable, "-m", "project.sweep", *argv],
        stdout=subprocess.PIPE,
        stderr=subprocess.STDOUT,
        text=True,
        cwd=ROOT,
        env=cli_env(),
    )
    deadline = time.monotonic() + 300
    seen = []
    for line in process.stdout:
        seen.append(line)
        if "trial 1:" in line or time.monotonic() > deadline:
            break
    process.send_signal(signal.SIGKILL)  # no chance to clean up: the worst case
    process.wait()
    process.stdout.close()
    assert any("trial 1:" in line for line in seen), "".join(seen[-20:])

    before = {t.number: t.state.name for t in load_study(exp_dir, "killed").trials}
    assert sweep.main(argv) == 0
    return {"exp_dir": exp_dir, "argv": argv, "before": before, "study": load_study(exp_dir, "killed")}


@pytest.mark.slow
def test_killed_sweep_continues_to_exactly_n_trials(resumed_sweep: dict) -> None:
    from optuna.storages import RetryHeartbeatStaleTrialCallback as Retry

    assert resumed_sweep["before"] == {0: "COMPLETE", 1: "RUNNING"}  # killed inside trial 1
    trials = resumed_sweep["study"].trials
    states = [t.state.name for t in trials]
    assert states.count("COMPLETE") + states.count("PRUNED") == 3
    assert states.count("FAIL") == 1 and "RUNNING" not in states and "WAITING" not in states
    # The killed trial ran again once, with its parameters; no finished trial ran twice.
    (killed,) = (t for t in trials if t.state.name == "FAIL")
    retries = [t for t in trials if Retry.retried_trial_number(t) is not None]
    assert [Retry.retried_trial_number(t) for t in retries] == [killed.number]
    assert retries[0].params == killed.params and retries[0].state.name == "COMPLETE"
    # Each finished trial is its own run, tested once.
    finished = [t for t in trials if t.state.name == "COMPLETE"]
    run_dirs = [Path(t.user_attrs["run_dir"]) for t in finished]
    assert len(set(run_dirs)) == 3 and all((d / "test_metrics.json").is_file() for d in run_dirs)
    tested = list((resumed_sweep["exp_dir"] / "killed").glob("*/test_metrics.json"))
    assert sorted(tested) == sorted(d / "test_metrics.json" for d in run_dirs)


@pytest.mark.slow
def test_running_the_finished_sweep_again_runs_nothing(resumed_sweep: dict, capsys) -> None:
    assert sweep.main(resumed_sweep["argv"]) == 0
    assert "3 of 3 trials finished (" in capsys.readouterr().out
    assert len(load_study(resumed_sweep["exp_dir"], "killed").trials) == len(resumed_sweep["study"].trials)


@pytest.mark.slow
def test_sweep_writes_the_table_best_config_and_plots(resumed_sweep: dict) -> None:
    out = resumed_sweep["exp_dir"] / "killed" / "sweep"
    with (out / "trials.csv").open() as file:
        rows = list(csv.DictReader(file))
    study = resumed_sweep["study"]
    assert [int(r["trial"]) for r in rows] == [t.number for t in study.trials]
    best = study.best_trial
    (best_row,) = (r for r in rows if int(r["trial"]) == best.number)
    assert float(best_row["val/loss"]) == pytest.approx(best.value)
    for plot in ("optimization_history.png", "param_importances.png"):
        assert (out / plot).read_bytes().startswith(b"\x89PNG")


@pytest.mark.slow
def test_best_config_reruns_as_is(resumed_sweep: dict) -> None:
    best_file = resumed_sweep["exp_dir"] / "killed" / "sweep" / "best.yaml"
    best = yaml.safe_load(best_file.read_text())
    assert best == resumed_sweep["study"].best_trial.user_attrs["config"]
    study_dir = resumed_sweep["exp_dir"] / "killed"
    before = set(study_dir.iterdir())
    assert run.main(["--config", str(best_file)]) == 0
    (rerun,) = set(study_dir.iterdir()) - before
    assert yaml.safe_load((rerun / "config.yaml").read_text()) == best


@pytest.mark.slow
def test_hopeless_trials_are_pruned(tmp_path: Path) -> None:
    """Trial 0 learns (lr 0.01); trial 1 cannot (lr 1e-6): after its first epoch its validation loss is
    above the median of finished trials at that epoch, and the sweep stops it there."""
    import optuna

    exp_dir = tmp_path / "experiments"
    exp_dir.mkdir()
    space = tmp_path / "space.yaml"
    space.write_text("learning_rate: [0.01, 1.0e-6]\n")
    study = optuna.create_study(study_name="prune", storage=f"sqlite:///{exp_dir / 'optuna.db'}")
    study.enqueue_trial({"learning_rate": 0.01})  # the order matters to the median pruner: good one first
    study.enqueue_trial({"learning_rate": 1e-6})
    argv = ["--study", "prune", "--n-trials", "2", "--search-space", str(space), "--prune-after-trials", "1",
            "--prune-after-epochs", "0", *TINY, "--max-epochs", "3", "--exp-dir", str(exp_dir)]  # fmt: skip
    assert sweep.main(argv) == 0

    good, hopeless = load_study(exp_dir, "prune").trials
    assert (good.state.name, len(good.intermediate_values)) == ("COMPLETE", 3)
    assert (hopeless.state.name, list(hopeless.intermediate_values)) == ("PRUNED", [0])
    assert hopeless.intermediate_values[0] > good.intermediate_values[0]
    run_dir = Path(hopeless.user_attrs["run_dir"])
    assert run_dir.is_dir() and not (run_dir / "test_metrics.json").exists()  # stopped before testing


def test_search_space_is_checked_against_project_run(tmp_path: Path) -> None:
    cases = {
        "learning_rte: [0.1]\n": "not a project.run option",
        "deterministic: [true, false]\n": "cannot be searched",
        "exp_dir: [a, b]\n": "cannot be searched",
        "hidden_dim: {low: 0, high: 8}\n": "is not a valid positive integer",
        "learning_rate: {low: 0.1, high: 0.01}\n": "low < high",
        "learning_rate: {low: 0, high: 0.1, log: true}\n": "low > 0",
        "model: [mlp, transformer]\n": "is not one of mlp, cnn",
        "learning_rate: 0.1\n": "or a list of choices",
    }
    space = tmp_path / "space.yaml"
    for text, message in cases.items():
        space.write_text(text)
        with pytest.raises(UserError, match=message):
            sweep.read_search_space(space)
    space.write_text("learning-rate: {low: 1e-4, high: 1e-2, log: true}\nhidden_dim: {low: 16, high: 64, step: 16}\n")
    parsed = sweep.read_search_space(space)
    assert parsed["learning-rate"] == {"low": 1e-4, "high": 1e-2, "log": True, "step": None, "int": False}
    assert parsed["hidden_dim"] == {"low": 16, "high": 64, "log": False, "step": 16, "int": True}


def test_a_trial_is_a_project_run_command_line() -> None:
    argv = sweep.trial_argv(["--dataset", "digits", "--hidden-dim", "8"], "study", {"hidden_dim": 32, "model": "mlp"})
    args = run.parse_args(argv)
    assert (args.hidden_dim, args.model, args.exp_name, args.dataset) == (32, "mlp", "study", "digits")
    assert args.tag == ["study=study"]  # the tracker run is tagged with its study


def test_sweep_option_mistakes_are_one_line(tmp_path: Path, capsys) -> None:
    common = ["--study", "s", "--n-trials", "1", "--exp-dir", str(tmp_path)]
    for extra, message in (
        (["--exp-name", "other"], "grouped under --study s"),
        (["--only-test"], "not sweep options"),
        (["--search-space", str(tmp_path / "none.yaml")], "cannot read"),
    ):
        assert sweep.main([*common, *extra]) == 2
        err = capsys.readouterr().err
        assert err.startswith("error: ") and message in err and len(err.strip().splitlines()) == 1
