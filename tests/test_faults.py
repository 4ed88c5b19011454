"""Runs survive faults and hostile files: preemption signals, a diverging loss, a full disk, a checkpoint
that carries a program. Each ends with one clear line, a non-zero exit, and every good checkpoint kept.
"""

from __future__ import annotations

import contextlib
import csv
import errno
import hashlib
import io
import json
import os
import re
import shutil
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest
import torch
from conftest import ROOT, Payload, cli_env, free_port, only_run_dir, run_cli, wait_for

from project.infra import callbacks, checkpoints
from project.infra.errors import UserError

DIGITS = ("--model", "mlp", "--hidden-dim", "32", "--batch-size", "64", "--logger", "none")
TWO_PROCESSES = ("--accelerator", "cpu", "--devices", "2", "--strategy", "ddp", "--max-epochs", "2")


def write_hostile_checkpoint(path: Path, marker: Path) -> None:
    """A file that looks like one of our checkpoints, with a program riding along."""
    path.parent.mkdir(parents=True, exist_ok=True)
    torch.save({"state_dict": {}, "hyper_parameters": {}, "callbacks": {"x": Payload(marker)}}, path)


def last_line(stderr: str) -> str:
    return stderr.strip().splitlines()[-1]


@pytest.mark.slow
def test_sigterm_from_outside_saves_a_resumable_checkpoint_and_exits_143(exp_dir: Path) -> None:
    # Long enough that the signal always lands while training; it stops after the step it arrives in.
    command = [sys.executable, "-m", "project.run", *DIGITS, "--max-epochs", "1000", "--checkpoint-every-n-steps", "3"]
    process = subprocess.Popen(
        [*command, "--exp-dir", str(exp_dir)],
        cwd=ROOT,
        env=cli_env(),
        stdout=subprocess.DEVNULL,
        stderr=subprocess.PIPE,
        text=True,
    )
    try:
        deadline = time.monotonic() + 240
        while not list(exp_dir.glob("debug/*/checkpoints/last.ckpt")):
            assert process.poll() is None and time.monotonic() < deadline, "the run never wrote last.ckpt"
            time.sleep(0.2)
        process.send_signal(signal.SIGTERM)
        _, stderr = process.communicate(timeout=120)
    finally:
        process.kill()
    assert process.returncode == 143, stderr[-2000:]
    last = only_run_dir(exp_dir) / "checkpoints" / "last.ckpt"
    # Mid-epoch it saves after that step; in an epoch's last step, after the epoch's validation and checkpoint.
    assert re.search(rf"stopped by SIGTERM: saved {re.escape(str(last))} (at the end of the epoch, )?after step \d+",
                     stderr), stderr[-2000:]  # fmt: skip
    assert last_line(stderr).startswith("resume with: ") and last_line(stderr).endswith(f"--resume {last}")
    assert checkpoints.read(last, "--resume")["global_step"] >= 3
    assert not list(last.parent.glob(".*.tmp"))


@pytest.mark.slow
def test_diverging_loss_stops_the_run_and_keeps_the_last_good_checkpoint(exp_dir: Path) -> None:
    # Adam moves every weight by about the learning rate: after one step of 1e30 the logits overflow.
    result = run_cli(
        *DIGITS, "--max-epochs", "2", "--learning-rate", "1e30", "--checkpoint-every-n-steps", "1",
        "--exp-dir", str(exp_dir),
    )  # fmt: skip
    assert result.returncode == 1, result.stderr[-2000:]
    run_dir = only_run_dir(exp_dir)
    last = run_dir / "checkpoints" / "last.ckpt"
    assert last_line(result.stderr).startswith("training diverged: the loss became NaN or infinite at step 2")
    assert str(last) in last_line(result.stderr)
    kept = checkpoints.read(last)
    assert kept["global_step"] == 1
    assert all(torch.isfinite(t).all() for t in kept["state_dict"].values())
    assert not (run_dir / "test_metrics.json").exists()


@pytest.mark.slow
@pytest.mark.parametrize("path", ["ours", "lightning"])
def test_checkpoint_carrying_a_program_is_refused_and_the_program_never_runs(
    path: str, tmp_path: Path, exp_dir: Path
) -> None:
    marker, hostile = tmp_path / "payload-ran", tmp_path / "hostile.ckpt"
    write_hostile_checkpoint(hostile, marker)
    args = (*DIGITS, "--max-epochs", "1", "--exp-dir", str(exp_dir), "--resume", str(hostile))
    if path == "ours":
        result = run_cli(*args)
    else:  # our check skipped, as if the file were swapped after it: Lightning's own load must refuse it
        result = run_cli("skip-resume-check", "--", *args, module="tests.fault_driver")
    assert result.returncode == 2, result.stderr[-2000:]
    assert last_line(result.stderr).startswith(f"error: --resume: {hostile} holds Python objects")
    assert "refused" in last_line(result.stderr)
    assert not marker.exists()


@pytest.mark.slow
def test_disk_full_while_writing_a_checkpoint_keeps_the_previous_one(exp_dir: Path) -> None:
    # The second last.ckpt (end of epoch 1) fails halfway with ENOSPC.
    result = run_cli(
        "enospc", "2", "--", *DIGITS, "--max-epochs", "3", "--exp-dir", str(exp_dir), module="tests.fault_driver"
    )
    assert result.returncode == 2, result.stderr[-2000:]
    last = only_run_dir(exp_dir) / "checkpoints" / "last.ckpt"
    assert last_line(result.stderr) == (
        f"error: cannot write checkpoint {last}: No space left on device; the previous last.ckpt is intact. "
        "Free some space (or fix the folder's permissions), then continue with --resume."
    )
    assert checkpoints.read(last)["global_step"] == 23  # the end of epoch 0
    assert not list(last.parent.glob(".*.tmp"))


def _can_mount_tmpfs() -> bool:
    if shutil.which("unshare") is None:
        return False
    probe = subprocess.run(
        ["unshare", "--user", "--map-root-user", "--mount", "sh", "-c", "mount -t tmpfs -o size=4k none /tmp"],
        capture_output=True,
    )
    return probe.returncode == 0


@pytest.mark.slow
@pytest.mark.skipif(not _can_mount_tmpfs(), reason="needs a user and mount namespace (unshare) for a tiny tmpfs")
def test_disk_full_on_a_real_tiny_file_system(exp_dir: Path) -> None:
    first = run_cli(*DIGITS, "--max-epochs", "1", "--exp-dir", str(exp_dir))
    assert first.returncode == 0, first.stderr[-2000:]
    folder = only_run_dir(exp_dir) / "checkpoints"
    digest = hashlib.sha256((folder / "last.ckpt").read_bytes()).hexdigest()
    used = sum(f.stat().st_size for f in folder.iterdir())
    # Inside a private mount namespace: the checkpoints move onto a tmpfs with 8 KiB to spare, far less
    # than the next checkpoint needs, and the run continues there.
    script = f"""
        set -e
        cp -a {folder} {folder}.saved
        mount -t tmpfs -o size={used + 8192} none {folder}
        cp -a {folder}.saved/. {folder}/
        set +e
        {sys.executable} -m project.run {" ".join(DIGITS)} --max-epochs 2 --exp-dir {exp_dir} --resume 2>stderr.txt
        echo $? > status.txt
        sha256sum {folder}/last.ckpt > digest.txt
        ls -a {folder} > listing.txt
    """
    subprocess.run(
        ["unshare", "--user", "--map-root-user", "--mount", "sh", "-c", script],
        cwd=exp_dir,
        env=cli_env(),
        timeout=300,
        check=True,
    )
    stderr = (exp_dir / "stderr.txt").read_text()
    assert (exp_dir / "status.txt").read_text().strip() == "2", stderr[-2000:]
    assert last_line(stderr).startswith(f"error: cannot write checkpoint {folder}/")
    assert ": No space left on device" in last_line(stderr)
    assert (exp_dir / "digest.txt").read_text().split()[0] == digest
    assert not [name for name in (exp_dir / "listing.txt").read_text().split() if name.endswith(".tmp")]


def test_disk_filling_while_writing_leaves_the_previous_checkpoint(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    io_plugin, path = callbacks.SafeCheckpointIO(), tmp_path / "last.ckpt"
    (tmp_path / ".last.ckpt.12345.tmp").write_bytes(b"left by a process killed mid-write")
    io_plugin.save_checkpoint({"state_dict": {"w": torch.ones(3)}, "hyper_parameters": {}}, path)
    assert [p.name for p in tmp_path.iterdir()] == ["last.ckpt"]
    before = path.read_bytes()

    class FillingDisk(io.BufferedWriter):
        """Takes 1,000 bytes, then fails as a full disk does."""

        def write(self, data: bytes) -> int:
            if self.tell() + len(data) > 1000:
                raise OSError(errno.ENOSPC, "No space left on device")
            return super().write(data)

    # torch.save reports a failed write as a RuntimeError without errno: the real error must come through.
    monkeypatch.setattr(callbacks, "open", lambda name, mode: FillingDisk(io.FileIO(name, mode)), raising=False)
    with pytest.raises(UserError, match="No space left on device; the previous last.ckpt is intact"):
        io_plugin.save_checkpoint({"state_dict": {"w": torch.zeros(1000)}, "hyper_parameters": {}}, path)
    assert path.read_bytes() == before
    assert [p.name for p in tmp_path.iterdir()] == ["last.ckpt"]


def test_lightning_resume_reads_weights_only_whatever_it_is_asked(tmp_path: Path) -> None:
    marker, hostile = tmp_path / "payload-ran", tmp_path / "hostile.ckpt"
    write_hostile_checkpoint(hostile, marker)
    with pytest.raises(UserError, match="refused"):
        callbacks.SafeCheckpointIO().load_checkpoint(hostile, weights_only=False)
    assert not marker.exists()


def start(args: list[str], *, module: str = "project.run", env: dict | None = None) -> subprocess.Popen:
    """The CLI in a process group of its own (as a shell runs a job), so the group can be signalled as SLURM and
    Ctrl-C in a terminal do: the main process, its DataLoader workers and its tracker process at once."""
    command = [sys.executable, "-m", module, *args]
    pipes = {"stdout": subprocess.PIPE, "stderr": subprocess.PIPE}
    return subprocess.Popen(command, cwd=ROOT, env=env or cli_env(), text=True, start_new_session=True, **pipes)


@pytest.fixture(scope="module")
def pets(tmp_path_factory: pytest.TempPathFactory) -> Path:
    from conftest import write_image_folder

    root = tmp_path_factory.mktemp("pets")
    write_image_folder(root, per_class=40, size=24)
    return root


@pytest.mark.slow
@pytest.mark.parametrize(
    "signum, attempt", [(signal.SIGTERM, 1), (signal.SIGTERM, 2), (signal.SIGINT, 1), (signal.SIGINT, 2)]
)
def test_a_signal_to_the_whole_process_group_with_workers_saves_and_exits(signum, attempt, pets, exp_dir) -> None:
    """DataLoader workers leave the signal to the main process, which finishes its step,
    saves last.ckpt and exits 128 + signal: no worker's death is taken for a crash."""
    process = start(["--dataset", "image-folder", "--data-dir", str(pets), "--image-size", "16", "--model", "mlp",
                     "--hidden-dim", "16", "--batch-size", "8", "--num-workers", "2", "--max-epochs", "500",
                     "--checkpoint-every-n-steps", "2", "--exp-dir", str(exp_dir)])  # fmt: skip
    try:
        wait_for(lambda: any(exp_dir.glob("debug/*/checkpoints/last.ckpt")), process, "last.ckpt")
        os.killpg(process.pid, signum)
        _, stderr = process.communicate(timeout=120)
    finally:
        with contextlib.suppress(ProcessLookupError):
            os.killpg(process.pid, signal.SIGKILL)
    assert process.returncode == 128 + signum, stderr[-2000:]
    assert "Traceback" not in stderr and "DataLoader worker" not in stderr
    run_dir = only_run_dir(exp_dir)
    assert f"stopped by {signal.Signals(signum).name}: saved {run_dir / 'checkpoints' / 'last.ckpt'}" in stderr
    assert json.loads((run_dir / "manifest.json").read_text())["exit_status"] == "interrupted"


@pytest.mark.slow
def test_seeds_stopped_by_sigterm_exits_143_with_one_line(exp_dir) -> None:
    process = start(["--seeds", "0,1", *DIGITS, "--max-epochs", "500", "--checkpoint-every-n-steps", "3",
                     "--exp-dir", str(exp_dir)], module="project.seeds")  # fmt: skip
    try:
        wait_for(lambda: any(exp_dir.glob("debug/*/checkpoints/last.ckpt")), process, "last.ckpt")
        os.killpg(process.pid, signal.SIGTERM)
        _, stderr = process.communicate(timeout=120)
    finally:
        with contextlib.suppress(ProcessLookupError):
            os.killpg(process.pid, signal.SIGKILL)
    assert process.returncode == 143, stderr[-2000:]
    assert "Traceback" not in stderr and last_line(stderr).startswith("resume with: ")


@pytest.mark.slow
def test_sigterm_while_the_reports_are_written_exits_143_and_says_so(exp_dir) -> None:
    result = run_cli("signal-report", "SIGTERM", "--", *DIGITS, "--max-epochs", "1", "--exp-dir", str(exp_dir),
                     module="tests.fault_driver")  # fmt: skip
    assert result.returncode == 143, result.stderr[-2000:]
    assert last_line(result.stderr) == "stopped by SIGTERM outside a training step: nothing new to save"
    manifest = json.loads((only_run_dir(exp_dir) / "manifest.json").read_text())
    assert manifest["exit_status"] == "interrupted" and manifest["end_time"]


@pytest.mark.slow
def test_a_full_disk_while_plotting_is_one_line_and_the_run_says_it_failed(exp_dir) -> None:
    result = run_cli("enospc-plot", "--", *DIGITS, "--max-epochs", "1", "--exp-dir", str(exp_dir),
                     module="tests.fault_driver")  # fmt: skip
    run_dir = only_run_dir(exp_dir)
    assert result.returncode == 2, result.stderr[-2000:]
    assert last_line(result.stderr) == f"error: cannot write {run_dir / 'curves.png'}: No space left on device"
    assert json.loads((run_dir / "manifest.json").read_text())["exit_status"] == "failed: UserError"
    assert not list(run_dir.glob(".*partial*")) and not (run_dir / "curves.png").exists()


@pytest.mark.slow
def test_a_second_process_cannot_resume_a_run_that_is_running(exp_dir) -> None:
    first = run_cli(*DIGITS, "--max-epochs", "1", "--exp-dir", str(exp_dir))
    assert first.returncode == 0, first.stderr
    run_dir = only_run_dir(exp_dir)
    resume = ["--resume", "--exp-dir", str(exp_dir), "--max-epochs", "500", "--checkpoint-every-n-steps", "3"]
    holder = start(resume)
    try:
        wait_for(lambda: json.loads((run_dir / "manifest.json").read_text())["exit_status"] == "running", holder,
                 "the resumed run to start")  # fmt: skip
        second = run_cli(*resume)
        assert second.returncode == 2 and "Traceback" not in second.stderr
        assert last_line(second.stderr).startswith(f"error: {run_dir} is in use by pid {holder.pid} on ")
        os.killpg(holder.pid, signal.SIGTERM)
        holder.communicate(timeout=120)
    finally:
        with contextlib.suppress(ProcessLookupError):
            os.killpg(holder.pid, signal.SIGKILL)
    assert holder.returncode == 143
    with open(run_dir / "metrics.csv", newline="") as file:
        epochs = [int(float(row["epoch"])) for row in csv.DictReader(file) if row.get("val/loss")]
    assert epochs == sorted(set(epochs))  # one row per epoch: the second process wrote nothing
    manifest = json.loads((run_dir / "manifest.json").read_text())
    assert len(manifest["resumed"]) == 1 and manifest["exit_status"] == "interrupted"


@pytest.mark.slow
@pytest.mark.parametrize(
    "torchrun, flags, line",
    [
        (False, ("--num-nodes", "2"), "error: --num-nodes 2: nothing started the other nodes, so this process would"),
        (True, ("--num-nodes", "2"), "error: --accelerator cpu --devices 1 --num-nodes 2 --strategy auto --precision "
         "32-true: You set `devices=1` and `num_nodes=2` in Lightning, but the product (1 * 2) does not match the "
         "world size (1)"),  # torchrun --nnodes 1
        (False, ("--devices", "2", "--strategy", "ddp_spawn"), "error: --strategy ddp_spawn: not supported"),
        (False, ("--devices", "2", "--strategy", "ddp_fork"), "error: --strategy ddp_fork: not supported"),
        (False, ("NODE_RANK=1",), "error: NODE_RANK=1 in the environment makes this process one that keeps no record"),
        (False, ("LOCAL_RANK=1", "RANK=1"), "error: RANK=1 LOCAL_RANK=1 in the environment makes this process one"),
    ],
)  # fmt: skip
def test_a_launch_that_cannot_start_is_one_line_before_anything_is_written(tmp_path, exp_dir, torchrun, flags, line):
    """Before: --num-nodes 2 with no launcher waited for the other node forever, deaf to SIGTERM and Ctrl-C; a rank
    left in the environment (NODE_RANK=1 from another launch) made a one-process run keep no records, with exit 0."""
    env = cli_env(**dict(flag.split("=") for flag in flags if "=" in flag))
    flags = tuple(flag for flag in flags if "=" not in flag)
    launcher = ("torch.distributed.run", "--nnodes", "1", "--log-dir", str(tmp_path / "logs"), "--redirects", "3", "-m")
    command = [sys.executable, "-m", *(launcher if torchrun else ()), "project.run", *DIGITS, "--accelerator", "cpu",
               *flags, "--exp-dir", str(exp_dir)]  # fmt: skip
    done = subprocess.run(command, cwd=ROOT, env=env, capture_output=True, text=True, timeout=120)
    stderr = next((tmp_path / "logs").glob("**/stderr.log")).read_text() if torchrun else done.stderr
    assert done.returncode != 0 and len(stderr.strip().splitlines()) == 1 and stderr.startswith(line), stderr[-2000:]
    assert not exp_dir.exists()


@pytest.mark.slow
@pytest.mark.parametrize("fault", [("signal-train", "SIGTERM", "0", "11"), ("signal-val", "SIGINT", "0")],
                         ids=["last-step", "validation"])  # fmt: skip
def test_a_signal_to_one_rank_at_an_epochs_end_stops_every_rank_as_one(exp_dir, fault) -> None:
    """Before: the rank that got it stopped alone, and rank 0 trained on, then failed ("another process ... ended")."""
    ddp = (*TWO_PROCESSES, "--exp-dir", str(exp_dir))
    stopped = run_cli(*fault, "--", *DIGITS, *ddp, module="tests.fault_driver", env=cli_env(FAULT_RANK="1"),
                      timeout=120)  # fmt: skip
    code = 128 + signal.Signals[fault[1]]
    assert stopped.returncode == code and "Traceback" not in stopped.stderr, stopped.stderr[-2000:]
    assert "another process" not in stopped.stderr and "resume with: " in stopped.stderr, stopped.stderr[-2000:]
    run_dir = only_run_dir(exp_dir)
    assert json.loads((run_dir / "manifest.json").read_text())["exit_status"] == "interrupted"
    assert checkpoints.read(run_dir / "checkpoints" / "last.ckpt")["global_step"] == 12  # the epoch's end


@pytest.mark.slow
def test_ranks_stopped_together_wait_for_rank_zeros_records(exp_dir) -> None:
    """Lightning's launcher SIGKILLs rank 0 (its observer looks every 5 s) when another process has exited with a
    non-zero code: rank 1, stopped by the signal, left at once, and rank 0, still writing its records (an MLflow
    server's end of run takes seconds), died with manifest.json saying "running"."""
    ddp = (*TWO_PROCESSES, "--exp-dir", str(exp_dir))
    stopped = run_cli("signal-train", "SIGTERM", "0", "5", "--", *DIGITS, *ddp, module="tests.fault_driver",
                      env=cli_env(FAULT_RANK="1", FAULT_SLOW_RECORDS="7"), timeout=120)  # fmt: skip
    assert stopped.returncode == 143 and "resume with: " in stopped.stderr, stopped.stderr[-2000:]
    assert json.loads((only_run_dir(exp_dir) / "manifest.json").read_text())["exit_status"] == "interrupted"


@pytest.mark.slow
@pytest.mark.parametrize("victim", ["0", "1"])
def test_a_rank_killed_mid_epoch_stops_the_other_with_one_line_and_the_run_resumes(exp_dir, victim) -> None:
    """Before: the survivor printed gloo's 100-line traceback."""
    ddp = (*TWO_PROCESSES, "--checkpoint-every-n-steps", "2", "--exp-dir", str(exp_dir))
    killed = run_cli("kill-train", "1", "5", "--", *DIGITS, *ddp, module="tests.fault_driver",
                     env=cli_env(FAULT_RANK=victim), timeout=120)  # fmt: skip
    assert killed.returncode == (-signal.SIGKILL if victim == "0" else 1), killed.stderr[-2000:]
    assert "Traceback" not in killed.stderr, killed.stderr[-2000:]
    assert last_line(killed.stderr).startswith("error: another process of this run ended or cannot be reached (")
    last = only_run_dir(exp_dir) / "checkpoints" / "last.ckpt"
    assert checkpoints.read(last)["global_step"] == 16  # 12 steps an epoch: saved after step 16, killed in step 18
    resumed = run_cli(*DIGITS, *ddp, "--resume", timeout=300)
    assert resumed.returncode == 0, resumed.stderr[-2000:]
    assert json.loads((only_run_dir(exp_dir) / "manifest.json").read_text())["exit_status"] == "finished"
    if victim == "0":  # the epoch resumed mid-way reports every batch of both processes: as a run never killed
        reference = exp_dir.parent / "reference"
        assert run_cli(*DIGITS, *ddp, "--exp-dir", str(reference), timeout=300).returncode == 0

        def rows(run: Path) -> list[dict[str, str]]:
            with open(run / "metrics.csv", newline="") as file:
                return [{k: v for k, v in row.items() if k != "timestamp"} for row in csv.DictReader(file)]

        assert rows(only_run_dir(exp_dir)) == rows(only_run_dir(reference))


@pytest.mark.slow
@pytest.mark.parametrize("signum", [signal.SIGTERM, signal.SIGINT])
def test_a_stop_signal_while_waiting_for_another_node_ends_the_process(exp_dir, signum) -> None:
    """A process blocked in the rendezvous (C code: Python's handlers cannot run) still answers SIGTERM and Ctrl-C."""
    command = [sys.executable, "-m", "project.run", *DIGITS, "--accelerator", "cpu", "--num-nodes", "2",
               "--exp-dir", str(exp_dir)]  # fmt: skip
    port = free_port()
    env = cli_env(MASTER_ADDR="127.0.0.1", MASTER_PORT=str(port), NODE_RANK="0")  # node 1 never comes
    process = subprocess.Popen(command, cwd=ROOT, env=env, stderr=subprocess.PIPE, text=True)

    def listening() -> bool:  # rank 0's rendezvous store is up: the process waits inside it, in C
        rows = [row.split() for table in ("tcp", "tcp6") for row in Path(f"/proc/net/{table}").read_text().splitlines()]
        return any(row[1].endswith(f":{port:04X}") and row[3] == "0A" for row in rows[1:])

    try:
        wait_for(listening, process, "the rendezvous")
        time.sleep(1)
        process.send_signal(signum)
        _, stderr = process.communicate(timeout=60)
    finally:
        process.kill()
    assert process.returncode == 128 + signum, stderr[-2000:]
    assert stderr.strip() == (
        f"stopped by {signal.Signals(signum).name} while waiting for the other processes of the run: any checkpoint "
        "written is whole, continue with --resume"
    )


def test_a_signal_while_a_store_is_made_waits_for_it_then_stops_the_command(capsys) -> None:
    """A store whose tables were half made (SIGTERM in MLflow's schema set-up) could not be opened again."""
    from project.infra import errors

    done = []

    def make_store() -> None:
        with errors.signals_held():
            os.kill(os.getpid(), signal.SIGTERM)
            time.sleep(0.2)  # the handler has run by now: it only noted the signal
            done.append("tables")
        done.append("after")

    assert errors.run_command(make_store) == 128 + signal.SIGTERM
    assert done == ["tables"] and "stopped by SIGTERM" in capsys.readouterr().err
    assert errors.StopSignals.received is None  # a Trainer built next in this process does not stop at its first step


def test_a_signal_that_comes_inside_a_finalizer_still_stops_the_command(capsys) -> None:
    """The handler raises in whatever code runs when a signal comes: in a finalizer or a garbage collector's callback
    Python would print "Exception ignored" with a traceback and drop the signal."""
    from project.infra import errors

    done = []

    class Finalized:
        def __del__(self) -> None:
            os.kill(os.getpid(), signal.SIGINT)  # a second Ctrl-C, as it lands in a finalizer
            time.sleep(0.2)

    def work() -> None:
        Finalized()  # gone at once: its finalizer runs here
        for _ in range(100):
            time.sleep(0.01)
        done.append("went on")

    assert errors.run_command(work) == 128 + signal.SIGINT
    err = capsys.readouterr().err
    assert (
        not done
        and "Exception ignored" not in err
        and err.strip() == ("stopped by SIGINT outside a training step: nothing new to save")
    )


@pytest.mark.parametrize(
    "error",
    [RuntimeError("[enforce fail at alloc_cpu.cpp:117] data. DefaultCPUAllocator: can't allocate memory: you tried "
                  "to allocate 25769803776 bytes. Error code 12 (Cannot allocate memory)"),
     torch.OutOfMemoryError("CUDA out of memory. Tried to allocate 24.00 GiB"), MemoryError()],
)  # fmt: skip
def test_out_of_memory_is_one_line_that_says_what_needs_less(error, capsys) -> None:
    from project.infra import errors

    def allocate() -> None:
        raise error

    assert errors.run_command(allocate) == 1
    (line,) = capsys.readouterr().err.splitlines()
    assert line.startswith("error: out of memory (") and "a smaller --batch-size, --image-size or model" in line
    assert "in a new run (--resume keeps the run's own)" in line  # resume refuses another --batch-size


class DiesInItsWorker(torch.utils.data.Dataset):
    """A DataLoader worker killed as the OS's out-of-memory killer kills one."""

    def __len__(self) -> int:
        return 4

    def __getitem__(self, index: int) -> None:
        os.kill(os.getpid(), signal.SIGKILL)


def test_a_dataloader_worker_killed_by_the_os_is_one_line(capsys) -> None:
    """--image-size 100000 took a worker past the machine's memory: one line that says what needs less."""
    from torch.utils.data import DataLoader

    from project.infra import errors

    assert errors.run_command(lambda: list(DataLoader(DiesInItsWorker(), num_workers=1))) == 1
    (line,) = capsys.readouterr().err.splitlines()
    assert line.startswith("error: DataLoader worker (pid"), line  # "is killed by signal", or "exited unexpectedly"
    assert "--num-workers" in line and "--resume" in line


def test_a_broken_pipe_other_than_standard_output_is_not_taken_for_a_reader_gone() -> None:
    """`| head` ends a command quietly (tests/test_predict_export.py); any other broken pipe is a real error."""
    from project.infra import errors

    def fail() -> None:
        raise BrokenPipeError(32, "a socket's reader went away")

    with pytest.raises(BrokenPipeError):
        errors.run_command(fail)


def test_a_rank_other_than_zero_stopped_by_a_signal_names_no_checkpoint_of_its_own() -> None:
    """Under torchrun the other ranks do not know the run directory's name: rank 0's line says how to resume."""
    from types import SimpleNamespace

    stop = callbacks.GracefulStop(Path("/runs/rank-0/checkpoints/last.ckpt"), "python -m project.run --resume X")
    message = str(stop.stopped(SimpleNamespace(is_global_zero=False, global_rank=1, world_size=1), "after step 3"))
    assert message == "stopped by SIGTERM after step 3 (rank 1: rank 0 says how to resume)"
