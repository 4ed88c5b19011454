"""project.sweep: a sweep killed or stopped by a signal mid-trial continues to exactly N finished trials
without repeating one, hopeless trials are pruned from their validation metric, and the best configuration
reruns as is."""

from __future__ import annotations

import csv
import os
import pwd
import re
import shutil
import signal
import subprocess
import sys
import tempfile
import time
from collections.abc import Iterator
from pathlib import Path

import pytest
import yaml
from conftest import ROOT, cli_env, free_port, run_cli, wait_for

from project import run, sweep

TINY = ["--model", "mlp", "--hidden-dim", "16", "--max-epochs", "2", "--logger", "csv", "--num-workers", "0"]
INTERRUPTED = "interrupted: run the same command again to continue study {}"


def load_study(exp_dir: Path, name: str):
    import optuna

    return optuna.load_study(study_name=name, storage=f"sqlite:///{exp_dir / 'optuna.db'}")


def retried_number(trial) -> int | None:
    import warnings

    from optuna.storages import RetryHeartbeatStaleTrialCallback

    with warnings.catch_warnings():
        warnings.simplefilter("ignore")  # marked experimental
        return RetryHeartbeatStaleTrialCallback.retried_trial_number(trial)


def start_sweep(command: list[str], log: Path) -> subprocess.Popen:
    """The sweep as a user starts it from a terminal (where Ctrl-C raises KeyboardInterrupt, even if this
    test runs as a background job, which inherits SIGINT ignored); its output in log.out and log.err."""
    return subprocess.Popen(
        command,
        stdout=log.with_suffix(".out").open("w"),
        stderr=log.with_suffix(".err").open("w"),
        cwd=ROOT,
        env=cli_env(),
        preexec_fn=lambda: signal.signal(signal.SIGINT, signal.SIG_DFL),
    )


def ended_with_one_line(log: Path, study: str) -> str:
    """What the sweep printed, once its stderr ended with the line that says how to continue, and no traceback."""
    output = log.with_suffix(".out").read_text() + log.with_suffix(".err").read_text()
    assert log.with_suffix(".err").read_text().strip().splitlines()[-1] == INTERRUPTED.format(study), output[-3000:]
    assert "Traceback" not in output
    return output


def assert_requeued(study, interrupted: int) -> None:
    """`interrupted` failed, and one copy with its parameters waits to run; nothing else is unfinished."""
    trials = study.trials
    assert trials[interrupted].state.name == "FAIL"
    (waiting,) = (t for t in trials if t.state.name == "WAITING")
    assert retried_number(waiting) == interrupted and waiting.params == trials[interrupted].params
    assert not [t for t in trials if t.state.name == "RUNNING"]


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
    assert "(sampled: replaces the --hidden-dim given)" in "".join(seen)  # TINY's --hidden-dim 16 is searched

    before = {t.number: t.state.name for t in load_study(exp_dir, "killed").trials}
    assert sweep.main(argv) == 0
    return {"exp_dir": exp_dir, "argv": argv, "before": before, "study": load_study(exp_dir, "killed")}


@pytest.mark.slow
def test_killed_sweep_continues_to_exactly_n_trials(resumed_sweep: dict) -> None:
    assert resumed_sweep["before"] == {0: "COMPLETE", 1: "RUNNING"}  # killed inside trial 1
    trials = resumed_sweep["study"].trials
    states = [t.state.name for t in trials]
    assert states.count("COMPLETE") + states.count("PRUNED") == 3
    assert states.count("FAIL") == 1 and "RUNNING" not in states and "WAITING" not in states
    # The killed trial ran again once, with its parameters; no finished trial ran twice.
    (killed,) = (t for t in trials if t.state.name == "FAIL")
    retries = [t for t in trials if retried_number(t) is not None]
    assert [retried_number(t) for t in retries] == [killed.number]
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
    assert best_row["state"] == "COMPLETE" and float(best_row["learning_rate"]) == best.params["learning_rate"]
    assert best_row["run_dir"] == best.user_attrs["run_dir"]
    assert float(best_row["test/acc"]) == pytest.approx(best.user_attrs["test/acc"])
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
@pytest.mark.parametrize("signum", [signal.SIGTERM, signal.SIGINT], ids=["SIGTERM", "SIGINT"])
def test_signal_during_training_saves_queues_the_trial_again_and_exits(signum: int, tmp_path: Path) -> None:
    """SIGTERM or Ctrl-C while a trial trains: its run saves last.ckpt, the sweep queues the trial again and
    exits 128 + signal with one line; the same command then finishes the study, retrying it once."""
    exp_dir = tmp_path / "experiments"
    # Small batches, a checkpoint every step: the first checkpoint comes at once, training goes on for seconds.
    argv = ["--study", "stopped", "--n-trials", "1", *TINY, "--max-epochs", "1", "--batch-size", "32",
            "--checkpoint-every-n-steps", "1", "--exp-dir", str(exp_dir)]  # fmt: skip
    log = tmp_path / "sweep.log"
    process = start_sweep([sys.executable, "-m", "project.sweep", *argv], log)
    try:
        deadline = time.monotonic() + 240
        while not list(exp_dir.glob("stopped/*/checkpoints/last.ckpt")):
            assert process.poll() is None and time.monotonic() < deadline, log.with_suffix(".err").read_text()[-3000:]
            time.sleep(0.1)
        process.send_signal(signum)
        process.wait(timeout=120)
    finally:
        process.kill()
    assert process.returncode == 128 + signum, log.with_suffix(".err").read_text()[-3000:]
    output = ended_with_one_line(log, "stopped")
    study = load_study(exp_dir, "stopped")
    assert_requeued(study, interrupted=0)
    run_dir = Path(study.trials[0].user_attrs["run_dir"])
    name = signal.Signals(signum).name
    assert f"trial 0 stopped by {name}: saved {run_dir / 'checkpoints' / 'last.ckpt'} after step" in output
    assert (run_dir / "checkpoints" / "last.ckpt").is_file() and not (run_dir / "test_metrics.json").exists()

    assert sweep.main(argv) == 0  # the same command again
    trials = load_study(exp_dir, "stopped").trials
    assert [t.state.name for t in trials] == ["FAIL", "COMPLETE"]  # exactly N = 1 finished: the retry
    assert retried_number(trials[1]) == 0 and trials[1].params == trials[0].params


@pytest.mark.slow
def test_a_regression_sweep_minimises_the_error_its_task_says_is_lower_better(tmp_path: Path) -> None:
    """The direction comes from the task (regression: val/mae, lower is better), not from the metric's name."""
    exp_dir = tmp_path / "experiments"
    result = run_cli("--study", "mae", "--n-trials", "2", "--dataset", "diabetes", "--monitor", "val/mae", *TINY,
                     "--exp-dir", str(exp_dir), module="project.sweep")  # fmt: skip
    assert result.returncode == 0, result.stderr[-3000:]
    study = load_study(exp_dir, "mae")
    values = [t.value for t in study.trials if t.state.name == "COMPLETE"]
    assert study.direction.name == "MINIMIZE" and len(values) == 2
    assert study.best_value == min(values)
    assert yaml.safe_load((exp_dir / "mae" / "sweep" / "best.yaml").read_text())["dataset"] == "diabetes"


# Runs the real CLI after arranging for one signal to arrive outside a training step: while the first
# trial is tested, or as the second trial's run is about to start (after the first one finished).
SIGNAL_DRIVER = """
import os, signal, sys
from project import run, sweep
from project.solver import Solver

where, signum, argv = sys.argv[1], signal.Signals[sys.argv[2]], sys.argv[3:]
send = lambda: os.kill(os.getpid(), signum)
if where == "test":
    test_step = Solver.test_step
    Solver.test_step = lambda self, batch, index: (send(), test_step(self, batch, index))[1]
else:
    train_and_test, calls = run.train_and_test, []
    def second_run_signalled(*args, **kwargs):
        calls.append(1)
        if len(calls) == 2:
            send()
        return train_and_test(*args, **kwargs)
    run.train_and_test = second_run_signalled
sys.exit(sweep.main(argv))
"""


@pytest.mark.slow
@pytest.mark.parametrize("where", ["test", "start"])
@pytest.mark.parametrize("signum", [signal.SIGTERM, signal.SIGINT], ids=["SIGTERM", "SIGINT"])
def test_signal_outside_training_queues_the_trial_again_and_exits(where: str, signum: int, tmp_path: Path) -> None:
    """Outside training, no checkpoint to save: the signal still ends the sweep with one line and 128 + signal,
    and the trial it cut short (the one being tested, or the one starting) waits to run again."""
    exp_dir = tmp_path / "experiments"
    interrupted = 0 if where == "test" else 1
    argv = ["--study", "outside", "--n-trials", str(interrupted + 1), *TINY, "--max-epochs", "1",
            "--exp-dir", str(exp_dir)]  # fmt: skip
    log = tmp_path / "sweep.log"
    name = signal.Signals(signum).name
    process = start_sweep([sys.executable, "-c", SIGNAL_DRIVER, where, name, *argv], log)
    try:
        process.wait(timeout=240)
    finally:
        process.kill()
    assert process.returncode == 128 + signum, log.with_suffix(".err").read_text()[-3000:]
    ended_with_one_line(log, "outside")
    study = load_study(exp_dir, "outside")
    assert [t.state.name for t in study.trials[:interrupted]] == ["COMPLETE"] * interrupted
    assert_requeued(study, interrupted)


@pytest.mark.slow
def test_hopeless_and_diverging_trials_are_pruned(tmp_path: Path, monkeypatch: pytest.MonkeyPatch, capsys) -> None:
    """Trial 0 (lr 1e30) diverges in its first epoch: a finished, hopeless trial, not the end of the sweep.
    Trial 1 learns (lr 0.01); trial 2 cannot (lr 1e-6): after its first epoch its validation loss is above
    the median of completed trials at that epoch, and the sweep stops it there."""
    import optuna

    rates = [1e30, 0.01, 1e-6]
    monkeypatch.setattr(
        sweep, "search_space", lambda t, _: {"learning_rate": t.suggest_categorical("learning_rate", rates)}
    )
    exp_dir = tmp_path / "experiments"
    exp_dir.mkdir()
    study = optuna.create_study(study_name="prune", storage=f"sqlite:///{exp_dir / 'optuna.db'}")
    for rate in rates:  # the order matters to the median pruner: nothing to compare with until 0.01 completes
        study.enqueue_trial({"learning_rate": rate})
    argv = ["--study", "prune", "--n-trials", "3", "--prune-after-trials", "1", "--prune-after-epochs", "0",
            *TINY, "--max-epochs", "3", "--exp-dir", str(exp_dir)]  # fmt: skip
    assert sweep.main(argv) == 0

    diverged, good, hopeless = load_study(exp_dir, "prune").trials
    assert (good.state.name, len(good.intermediate_values)) == ("COMPLETE", 3)
    assert (hopeless.state.name, list(hopeless.intermediate_values)) == ("PRUNED", [0])
    assert hopeless.intermediate_values[0] > good.intermediate_values[0]
    assert diverged.state.name == "PRUNED"
    out = capsys.readouterr().out
    assert "trial 0 pruned: training diverged" in out and "trial 2 pruned: Trial was pruned at epoch 0" in out
    # Both runs stopped before testing; each run directory is recorded, and closed with the reason.
    for trial, status in ((diverged, "failed: RunStopped"), (hopeless, "pruned")):
        run_dir = Path(trial.user_attrs["run_dir"])
        manifest = yaml.safe_load((run_dir / "manifest.json").read_text())
        assert (manifest["exit_status"], bool(manifest["end_time"])) == (status, True)
        assert (run_dir / "metrics.csv").is_file() and not (run_dir / "test_metrics.json").exists()


@pytest.mark.parametrize(
    ("space", "message"),
    [
        (lambda t, _: {"hidden_dim": t.suggest_int("hidden_dim", 0, 0)}, "invalid positive integer value: '0'"),
        (lambda t, _: {"model": t.suggest_categorical("model", ["transformer"])}, "invalid choice: 'transformer'"),
        (lambda t, _: {"learning_rte": t.suggest_float("learning_rte", 0.1, 0.2)}, "did you mean --learning-rate?"),
        (lambda t, _: {"learning_rate": t.suggest_float("learning_rate", 0.1, 0.01)}, "low <= high"),
    ],
    ids=["refused-value", "refused-choice", "unknown-option", "bad-range"],
)
def test_a_search_space_value_project_run_refuses_is_one_line(
    space, message: str, tmp_path: Path, monkeypatch: pytest.MonkeyPatch, capsys
) -> None:
    monkeypatch.setattr(sweep, "search_space", space)
    assert sweep.main(["--study", "s", "--n-trials", "1", "--exp-dir", str(tmp_path)]) == 2
    err = capsys.readouterr().err
    assert err.startswith("error: search_space(): ") and message in err and len(err.strip().splitlines()) == 1
    (trial,) = load_study(tmp_path, "s").trials  # failed, and not queued again: it would fail the same way
    assert trial.state.name == "FAIL"


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
        (["--resume"], "not sweep options"),
        (["--devices", "2"], "one device"),
    ):
        assert sweep.main([*common, *extra]) == 2
        err = capsys.readouterr().err
        assert err.startswith("error: ") and message in err and len(err.strip().splitlines()) == 1


def test_a_second_sweep_of_the_same_study_is_one_line(tmp_path: Path, capsys) -> None:
    from filelock import FileLock

    with FileLock(str(tmp_path / "optuna.db.s.lock")):  # as a running sweep holds it
        assert sweep.main(["--study", "s", "--n-trials", "1", "--exp-dir", str(tmp_path)]) == 2
    err = capsys.readouterr().err
    assert "study s is being run by another sweep" in err and len(err.strip().splitlines()) == 1


def test_a_study_continues_only_with_what_its_trials_are_compared_on(tmp_path: Path, monkeypatch, capsys) -> None:
    """Its monitor, model, data, split, epochs and batch size; not an option its trials sample. A study none of whose
    trials finished (its first command failed) takes the options of now."""
    from types import SimpleNamespace

    import optuna
    from optuna.distributions import CategoricalDistribution, FloatDistribution

    storage = f"sqlite:///{tmp_path / 'optuna.db'}"
    sweep_s = ["--study", "s", "--n-trials", "1", "--exp-dir", str(tmp_path), "--model", "mlp", "--logger", "csv"]
    study = optuna.create_study(study_name="s", storage=storage)
    for key, value in {"monitor": "val/acc", "model": "cnn", "dataset": "diabetes"}.items():  # as a first command
        study.set_user_attr(key, value)
    # whose trial was refused (--dataset diabetes --model cnn) left it; no trial finished: it takes the options of now
    monkeypatch.setattr(run, "train_and_test", lambda args, callbacks: SimpleNamespace(test_metrics={}, best_score=0.5))
    assert sweep.main(sweep_s) == 0
    study = optuna.load_study(study_name="s", storage=storage)
    assert (study.user_attrs["monitor"], study.user_attrs["model"]) == ("val/loss", "mlp")
    capsys.readouterr()
    changes = [(["--monitor", "val/acc"], "--monitor val/loss"), (["--model", "cnn"], "--model mlp"),
               (["--dataset", "diabetes"], "--dataset digits"), (["--seed", "1"], "--seed 0"),
               (["--val-fraction", "0.3"], "--val-fraction 0.1"), (["--max-epochs", "3"], "--max-epochs 20"),
               (["--batch-size", "32"], "--batch-size 128"), (["--data-dir", "other"], "--data-dir data")]  # fmt: skip
    for changed, recorded in changes:
        assert sweep.main([*sweep_s, *changed]) == 2
        (line,) = capsys.readouterr().err.splitlines()
        assert f"study s is of {recorded}: continue it with the same" in line, line
    # A trial that sampled --batch-size: the study's value of it is no longer what its trials share
    sampled = {
        "learning_rate": FloatDistribution(1e-4, 1e-2, log=True),
        "batch_size": CategoricalDistribution([32, 64]),
    }
    study.add_trial(optuna.trial.create_trial(params={"learning_rate": 1e-3, "batch_size": 64}, value=0.5,
                                              distributions=sampled))  # fmt: skip
    assert sweep.main([*sweep_s, "--batch-size", "32"]) == 0, capsys.readouterr().err


def postgres_bin() -> Path | None:
    """The folder of the OS's PostgreSQL server programs (Debian keeps them off the PATH), or None."""
    on_path = shutil.which("pg_ctl")
    folders = [Path(on_path).parent] if on_path else sorted(Path("/usr/lib/postgresql").glob("*/bin"), reverse=True)
    return next((folder for folder in folders if (folder / "initdb").is_file()), None)


@pytest.fixture
def postgres() -> Iterator[str]:
    """A throwaway PostgreSQL server on a unix socket only, in a temporary folder: its SQLAlchemy URL."""
    pytest.importorskip("psycopg", reason="no PostgreSQL driver (pip install -e '.[test]')")
    programs = postgres_bin()
    if programs is None:
        pytest.skip("no PostgreSQL server programs (Debian: apt-get install postgresql; .ci/run does)")
    owner = {}
    if os.geteuid() == 0:  # PostgreSQL refuses to run as root
        try:
            nobody = pwd.getpwnam("nobody")
        except KeyError:
            pytest.skip("running as root, and there is no user 'nobody' to run PostgreSQL as")
        owner = {"user": nobody.pw_uid, "group": nobody.pw_gid}
    # In /tmp: pytest's folders admit only their owner, and a socket's path must stay short (~100 bytes).
    root = Path(tempfile.mkdtemp(prefix="sweep-pg-", dir="/tmp" if os.path.isdir("/tmp") else None))
    if owner:
        os.chown(root, owner["user"], owner["group"])
    port, data = free_port(), root / "data"
    server = f"-c listen_addresses='' -c unix_socket_directories={root} -p {port}"
    try:
        for command in (["initdb", "-D", data, "-U", "sweep", "--auth", "trust"],
                        ["pg_ctl", "-D", data, "-l", root / "log", "-w", "-o", server, "start"]):  # fmt: skip
            subprocess.run([programs / command[0], *command[1:]], cwd=root, check=True, capture_output=True, **owner)
        yield f"postgresql+psycopg://sweep@/postgres?host={root}&port={port}"
    finally:
        subprocess.run([programs / "pg_ctl", "-D", data, "-m", "immediate", "stop"], cwd=root, capture_output=True,
                       **owner)  # fmt: skip
        shutil.rmtree(root, ignore_errors=True)


# A worker as users start it, but a trial silent for 4 s (not 5 minutes) counts as lost.
HEARTBEAT, GRACE = 1, 4  # seconds, for the workers below: a killed worker's trial is queued again within seconds
WORKER = f"import sys; from project import sweep; sweep.HEARTBEAT_INTERVAL, sweep.GRACE_PERIOD = {HEARTBEAT}, {GRACE}; "
WORKER += "sys.exit(sweep.main(sys.argv[1:]))"


@pytest.mark.slow
def test_two_workers_on_postgresql_finish_exactly_n_trials_and_requeue_a_killed_ones(
    postgres: str, tmp_path: Path
) -> None:
    """Two machines' workers on one study in a PostgreSQL server: one is SIGKILLed mid-trial and started again; together
    they finish exactly N trials, each run once, and the killed trial is run again with its parameters."""
    import optuna

    exp_dir, n = tmp_path / "experiments", 5
    command = [sys.executable, "-c", WORKER, "--study", "pg", "--n-trials", str(n), "--storage", postgres, *TINY,
               "--exp-dir", str(exp_dir)]  # fmt: skip
    logs = [tmp_path / name for name in ("a", "b", "a-again")]
    workers = [start_sweep(command, logs[0]), start_sweep(command, logs[1])]
    try:
        started = re.compile(r"--- study pg, trial (\d+):")
        first = lambda: started.findall(logs[0].with_suffix(".out").read_text())  # noqa: E731
        wait_for(first, workers[0], "worker a's first trial")
        study = optuna.load_study(study_name="pg", storage=postgres)
        killed = int(first()[0])
        wait_for(lambda: study.trials[killed].user_attrs.get("run_dir"), workers[0], "its run to start")
        workers[0].kill()
        workers[0].wait()
        time.sleep(GRACE)  # as a lost machine's worker restarted after that grace (or another joining)
        workers.append(start_sweep(command, logs[2]))
        for worker, log in zip(workers[1:], logs[1:], strict=True):
            assert worker.wait(timeout=400) == 0, log.with_suffix(".err").read_text()[-3000:]
    finally:
        for worker in workers:
            worker.kill()
    trials = study.trials
    finished = [t for t in trials if t.state.name in ("COMPLETE", "PRUNED")]
    assert len(finished) == n and not [t for t in trials if t.state.name in ("RUNNING", "WAITING")]
    (retry,) = (t for t in trials if retried_number(t) is not None)
    assert (trials[killed].state.name, retried_number(retry), retry.params) == ("FAIL", killed, trials[killed].params)
    assert retry in finished
    # Each trial ran in one worker only; every finished one is its own run, tested once.
    ran = [[int(k) for k in started.findall(log.with_suffix(".out").read_text())] for log in logs]
    assert sorted(sum(ran, [])) == sorted({*sum(ran, [])}) and {t.number for t in finished} <= {*sum(ran, [])}
    tested = sorted(exp_dir.glob("pg/*/test_metrics.json"))
    # The killed trial's run may have tested before the SIGKILL reached it (a loaded machine): its trial still failed.
    lost = Path(trials[killed].user_attrs["run_dir"]) / "test_metrics.json"
    assert [path for path in tested if path != lost] == sorted(
        Path(t.user_attrs["run_dir"]) / "test_metrics.json" for t in finished if t.value
    )


@pytest.mark.slow
def test_two_sweeps_of_one_sqlite_study_at_once_finish_it_or_say_why_not(tmp_path: Path) -> None:
    """SQLite serves one sweep per study: started together, one runs the study to exactly N and the other ends with
    one line (or, if it comes after, finds the study finished); no trial runs twice."""
    exp_dir = tmp_path / "experiments"
    command = [sys.executable, "-m", "project.sweep", "--study", "s", "--n-trials", "2", *TINY, "--max-epochs", "1",
               "--exp-dir", str(exp_dir)]  # fmt: skip
    logs = [tmp_path / "a", tmp_path / "b"]
    sweeps = [start_sweep(command, log) for log in logs]
    try:
        codes = sorted(process.wait(timeout=400) for process in sweeps)
    finally:
        for process in sweeps:
            process.kill()
    errors = [log.with_suffix(".err").read_text() for log in logs]
    assert codes in ([0, 0], [0, 2]), errors
    refused = [err.strip().splitlines() for err in errors if "being run by another sweep" in err]
    assert len(refused) == codes.count(2) and all(len(lines) == 1 for lines in refused), errors
    trials = load_study(exp_dir, "s").trials
    assert [t.state.name for t in trials] == ["COMPLETE", "COMPLETE"]
    assert len(list(exp_dir.glob("s/*/test_metrics.json"))) == 2


def test_a_trial_begun_when_n_were_already_claimed_steps_aside(capsys) -> None:
    """Two workers that begin the last trial at once: the later one fails at once, runs nothing; its worker stops."""
    import argparse

    import optuna

    study = optuna.create_study()
    study.tell(study.ask(), 1.0)
    args, started = argparse.Namespace(study="s", n_trials=1), []
    study.optimize(lambda trial: sweep.objective(trial, args, [], set(), started), 3, catch=(sweep.Surplus,))
    assert [t.state.name for t in study.trials] == ["COMPLETE", "FAIL"] and started == []
    assert "trial 1 not needed: 1 trials are finished or running" in capsys.readouterr().out


def test_a_worker_that_ends_while_another_runs_a_trial_says_the_study_is_not_finished(tmp_path, capsys) -> None:
    import optuna

    study = optuna.create_study()
    done = study.ask()
    done.set_user_attr("config", {"max_epochs": 1})
    done.set_user_attr("run_dir", str(tmp_path / "run"))
    study.tell(done, 1.0)
    study.ask()  # trial 1: another worker's, running
    study.enqueue_trial({}, user_attrs={"run_dir": "the interrupted trial's"})  # trial 2: a retry, waiting
    sweep.report(study, "val/loss", tmp_path / "sweep")
    assert "Not finished: trial 1 still running in another worker" in capsys.readouterr().out
    assert (tmp_path / "sweep" / "best.yaml").is_file()  # the best so far, as before
    rows = (tmp_path / "sweep" / "trials.csv").read_text().splitlines()
    assert rows[-1].startswith("2,WAITING") and "interrupted" not in rows[-1]  # no run of its own yet


SECRET = "Hunter2secret"


@pytest.mark.parametrize(
    "storage",
    [f"postgresql+psycopg://bob:{SECRET}@127.0.0.1:1/db", f"postgresql://bob@127.0.0.1:1/db?password={SECRET}",
     f"mysql://bob:{SECRET}@127.0.0.1:1/db", f"bogus:/x?token={SECRET}", f"postgresql://127.0.0.1:1/{SECRET}",
     f"postgresql+psycopg://bob:a {SECRET}@127.0.0.1:1/db", f"postgresql+psycopg://bob:{SECRET}@x@127.0.0.1:1/db"],
    ids=["url-password", "query-password", "no-driver", "not-a-url", "environment", "a-space-in-it", "an-at-in-it"],
)  # fmt: skip
def test_a_storage_that_cannot_be_opened_is_one_line_without_its_secret(storage, tmp_path, monkeypatch, capsys):
    """Also where the driver's own message quotes a part of the password (an '@' in it, unescaped), and in --debug's
    traceback."""
    from project.infra.errors import UserError

    monkeypatch.setenv("DB_PASSWORD", SECRET)  # the environment case: a secret the environment names, typed in plain
    argv = ["--study", "s", "--n-trials", "1", "--storage", storage, "--exp-dir", str(tmp_path)]
    assert sweep.main(argv) == 2
    out, err = capsys.readouterr()
    assert err.startswith("error: cannot open --storage ") and len(err.strip().splitlines()) == 1, err
    assert SECRET not in out + err and "Hunter2" not in out + err
    with pytest.raises(UserError) as raised:
        sweep.main([*argv, "--debug"])
    assert "cannot open --storage" in str(raised.value) and "Hunter2" not in str(raised.value)


def test_a_database_server_that_never_answers_is_one_line_within_seconds(tmp_path, monkeypatch, capsys) -> None:
    """A host that takes the connection and says nothing (a firewall, a hung server): drivers wait for good."""
    import socket

    from project.infra import runs

    monkeypatch.setattr(runs, "CONNECT_TIMEOUT", 2)
    with socket.socket() as silent:
        silent.bind(("127.0.0.1", 0))
        silent.listen(8)  # the kernel completes each handshake; nothing ever answers
        storage = f"postgresql+psycopg://bob:pw@127.0.0.1:{silent.getsockname()[1]}/db"
        started = time.monotonic()
        assert sweep.main(["--study", "s", "--n-trials", "1", "--storage", storage, "--exp-dir", str(tmp_path)]) == 2
        assert time.monotonic() - started < 60
    err = capsys.readouterr().err
    assert err.startswith("error: cannot open --storage ") and len(err.strip().splitlines()) == 1, err


def test_a_sweep_prints_and_writes_no_secret(tmp_path: Path, monkeypatch: pytest.MonkeyPatch, capsys) -> None:
    """Its storage URL and its trials' options (best.yaml, the table, the study's records): no secret stays."""
    from types import SimpleNamespace

    import optuna

    fake_run = SimpleNamespace(test_metrics={"test/acc": 0.5}, best_score=0.25)  # the trial's work is not the point
    monkeypatch.setattr(run, "train_and_test", lambda args, callbacks: fake_run)
    storage, exp_dir = f"sqlite:///{tmp_path}/token={SECRET}/optuna.db", tmp_path / f"api_key={SECRET}"
    argv = ["--study", "s", "--n-trials", "2", "--storage", storage, "--exp-dir", str(exp_dir), "--logger", "csv",
            "--data-dir", f"{tmp_path}/password={SECRET}"]  # fmt: skip
    assert sweep.main(argv) == 0
    out, err = capsys.readouterr()
    assert "Study s: 0 of 2 trials finished (storage sqlite:///" in out and SECRET not in out + err
    written = [(exp_dir / "s" / "sweep" / name).read_text() for name in ("best.yaml", "trials.csv")]
    assert "password=[redacted]" in written[0] and not [text for text in written if SECRET in text]
    trials = optuna.load_study(study_name="s", storage=storage).trials
    assert len(trials) == 2 and SECRET not in str([t.user_attrs for t in trials])


def test_a_trial_stopped_on_purpose_is_always_queued_again_and_one_that_keeps_crashing_is_given_up() -> None:
    """A cluster that preempts a trial again and again (SIGTERM each time) must not make the sweep give it up."""
    import warnings

    import optuna
    from optuna.trial import TrialState

    warnings.simplefilter("ignore", optuna.exceptions.ExperimentalWarning)
    study = optuna.create_study()
    study.enqueue_trial({"x": 1.0})

    def attempt(stopped: bool) -> bool:
        trial = study.ask({"x": optuna.distributions.FloatDistribution(0, 2)})  # the copy waiting to run
        assert trial.params == {"x": 1.0}
        trial.set_user_attr("stopped", stopped)  # as sweep.objective marks it (a copy inherits the mark)
        return sweep.retry_unless_crashing(study, study.tell(trial, state=TrialState.FAIL))

    assert all(attempt(stopped=True) for _ in range(5))
    assert [attempt(stopped=False) for _ in range(sweep.MAX_RETRIES + 1)] == [True] * sweep.MAX_RETRIES + [False]
    assert not study.get_trials(states=(TrialState.WAITING,))


@pytest.mark.filterwarnings("ignore")  # Optuna's heartbeats are "experimental", and "meant for Study.optimize"
def test_a_trial_made_as_a_signal_came_goes_stale_and_runs_again(tmp_path: Path) -> None:
    """A signal inside Optuna's ask() leaves a RUNNING trial with no heartbeat, which Optuna never fails: on a server
    storage every other worker would wait for it for good. The sweep's last act gives it one, so it goes stale."""
    import optuna
    from optuna.storages import RDBStorage, fail_stale_trials

    storage = RDBStorage(f"sqlite:///{tmp_path / 'optuna.db'}", heartbeat_interval=1, grace_period=1,
                         heartbeat_stale_trial_callback=sweep.retry_unless_crashing)  # fmt: skip
    study = optuna.create_study(storage=storage, study_name="s")
    orphan = study.ask()  # made; the signal came before its worker's heartbeat began
    time.sleep(2.5)
    fail_stale_trials(study)
    assert study.trials[orphan.number].state.name == "RUNNING"  # for good, without the sweep's heartbeat
    sweep.keep_alive_once(study, storage)
    time.sleep(2.5)
    fail_stale_trials(study)
    assert [t.state.name for t in study.trials] == ["FAIL", "WAITING"]
    assert retried_number(study.trials[1]) == orphan.number


def test_a_sweep_from_a_config_file_groups_its_trials_under_its_study(tmp_path: Path, monkeypatch, capsys) -> None:
    """A run's config.yaml (or a study's best.yaml) names its own experiment: the sweep's trials go under --study, and
    only an --exp-name typed on the command line is refused."""
    from types import SimpleNamespace

    seen = []
    monkeypatch.setattr(run, "train_and_test", lambda args, callbacks: seen.append(args.exp_name)
                        or SimpleNamespace(test_metrics={}, best_score=0.5))  # fmt: skip
    (tmp_path / "best.yaml").write_text("exp_name: r1\nlearning_rate: 0.01\nmodel: mlp\n")
    argv = ["--study", "refine", "--n-trials", "1", "--config", str(tmp_path / "best.yaml"), "--exp-dir", str(tmp_path)]
    assert sweep.main([*argv, "--logger", "csv"]) == 0 and seen == ["refine"]
    assert sweep.main([*argv, "--exp-name=r1"]) == 2
    assert "grouped under --study refine; drop --exp-name" in capsys.readouterr().err
