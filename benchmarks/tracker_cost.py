"""What the default tracker costs: the default job (`python -m project.run`: digits, CNN, 20 epochs) with
`--logger mlflow` (the default) against the same job with `--logger csv`, each job a fresh process with its
own fresh --exp-dir.

    python benchmarks/tracker_cost.py                        # mlflow vs csv, 3 interleaved rounds
    python benchmarks/tracker_cost.py --existing-store       # each mlflow job into a store made beforehand
    python benchmarks/tracker_cost.py --rounds 5 -- --max-epochs 20
    python benchmarks/tracker_cost.py --server-dies          # one mlflow job against a local `mlflow server`
                                                             # killed after the first epoch
    python benchmarks/tracker_cost.py --per-epoch            # seconds per epoch on MNIST-shaped 60,000-sample
                                                             # epochs (gpu_benchmark.py's mlp setting, on the CPU)

Rounds run the variants in rotated order, so that a machine that slows down over time does not favour one
of them. Prints per-job wall and CPU seconds (the job and every process it started) and test accuracy, then
the medians, each variant's ratio to csv and its difference from csv.
"""

from __future__ import annotations

import argparse
import csv
import json
import os
import signal
import socket
import statistics
import subprocess
import sys
import tempfile
import threading
import time
from pathlib import Path
from typing import Any

ROOT = Path(__file__).resolve().parent.parent
VARIANTS = ("csv", "mlflow")
SAMPLE_SECONDS = 0.2


def job_command(variant: str, exp_dir: Path, extra: list[str]) -> list[str]:
    return [sys.executable, "-m", "project.run", "--exp-dir", str(exp_dir), *extra, "--logger", variant]


def job_env() -> dict[str, str]:
    env = dict(os.environ)
    env["PYTHONPATH"] = os.pathsep.join([str(ROOT), env.get("PYTHONPATH", "")])
    return env


def cpu_seconds_busy() -> float:
    """CPU seconds this machine has been busy since boot, all cores and all processes (Linux /proc/stat)."""
    fields = Path("/proc/stat").read_text().split("\n", 1)[0].split()[1:]
    user, nice, system, idle, iowait, irq, softirq, steal = (int(f) for f in fields[:8])
    return (user + nice + system + irq + softirq) / os.sysconf("SC_CLK_TCK")


def wait_until_idle(limit: float, timeout: float = 900) -> None:
    """This machine is shared: start a job only when the others leave less than `limit` cores busy."""
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        before = cpu_seconds_busy()
        time.sleep(2)
        if (cpu_seconds_busy() - before) / 2 < limit:
            return
    print(f"warning: the machine stayed busy for {timeout:.0f} s; measuring anyway", file=sys.stderr)


def run_job(command: list[str], env: dict[str, str]) -> dict[str, Any]:
    """One job: its wall seconds (until it exits: when the prompt would return), the CPU seconds of it and of
    every process it started, also any that outlive it, its exit status, and the CPU seconds other processes on
    the machine took meanwhile."""
    machine_before = cpu_seconds_busy()
    start = time.perf_counter()
    # A session of its own: its process group holds the job and whatever it starts.
    process = subprocess.Popen(
        command, cwd=ROOT, env=env, stdout=subprocess.PIPE, stderr=subprocess.PIPE, start_new_session=True
    )
    sampler = GroupSampler(process.pid)
    sampler.start()
    # os.wait4 gives this one child's resource usage (with the children it reaped), not the whole
    # benchmark's; communicate() would reap the process first, so read the pipes on threads.
    out, err = _collect(process)
    _, status, usage = os.wait4(process.pid, 0)
    wall = time.perf_counter() - start
    sampler.job_ended()
    sampler.join(timeout=120)
    process.returncode = os.waitstatus_to_exitcode(status)
    cpu = usage.ru_utime + usage.ru_stime + sum(sampler.outliving.values())
    return {
        "wall": wall,
        "cpu": cpu,
        "tail": sampler.group_gone - wall if sampler.group_gone else None,
        "others": max(cpu_seconds_busy() - machine_before - cpu, 0.0),
        "returncode": process.returncode,
        "stdout": out.decode(errors="replace"),
        "stderr": err.decode(errors="replace"),
    }


class GroupSampler(threading.Thread):
    """CPU seconds of the job's descendants that it does not reap, from /proc (a zombie keeps its figures
    until init reaps it). One that vanishes while the job runs was reaped by the job: its CPU is then in
    the job's own resource usage. Sampled every SAMPLE_SECONDS, so an outliving process's last moments
    may be missed."""

    def __init__(self, job: int) -> None:
        super().__init__(daemon=True)
        self.job, self.started = job, time.perf_counter()
        self.outliving: dict[int, float] = {}
        self.group_gone: float | None = None
        self.ended = threading.Event()

    def job_ended(self) -> None:
        self.ended.set()

    def run(self) -> None:
        deadline = time.monotonic() + 900
        while time.monotonic() < deadline:
            ended = self.ended.is_set()
            current = _group_cpu(self.job, self.job)
            if not ended:  # vanished while the job lives: the job reaped it
                self.outliving = {pid: cpu for pid, cpu in self.outliving.items() if pid in current}
            self.outliving.update(current)
            if ended and not current:
                self.group_gone = time.perf_counter() - self.started
                return
            time.sleep(SAMPLE_SECONDS)


def _group_cpu(group: int, leader: int) -> dict[int, float]:
    """pid -> CPU seconds (user + system) of the processes in process group `group`, but `leader`."""
    found = {}
    tick = os.sysconf("SC_CLK_TCK")
    for entry in os.scandir("/proc"):
        if not entry.name.isdigit() or int(entry.name) == leader:
            continue
        try:
            stat = Path(entry.path, "stat").read_text()
        except OSError:
            continue
        fields = stat[stat.rindex(")") + 2 :].split()  # after "pid (command) ": state, ppid, pgrp, ...
        if int(fields[2]) == group:
            found[int(entry.name)] = (int(fields[11]) + int(fields[12])) / tick  # utime, stime
    return found


def _collect(process: subprocess.Popen) -> tuple[bytes, bytes]:
    chunks: dict[str, bytes] = {}

    def read(name: str, stream: Any) -> None:
        chunks[name] = stream.read()

    threads = [
        threading.Thread(target=read, args=(n, s)) for n, s in (("out", process.stdout), ("err", process.stderr))
    ]
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join()
    return chunks["out"], chunks["err"]


def test_accuracy(exp_dir: Path) -> float | None:
    found = sorted(exp_dir.glob("*/*/test_metrics.json"))
    return json.loads(found[-1].read_text())["acc"] if found else None


def measure(args: argparse.Namespace) -> int:
    variants = args.variants.split(",")
    unknown = set(variants) - set(VARIANTS)
    if unknown:
        sys.exit(f"unknown variant(s) {sorted(unknown)}; choose from {VARIANTS}")
    env = job_env()
    scratch = Path(tempfile.mkdtemp(prefix="tracker-cost-"))
    stores: dict[str, Path] = {}
    if args.existing_store:
        # One untimed job per tracker variant makes its store (and the experiment) first.
        for variant in variants:
            if variant != "csv":
                stores[variant] = scratch / f"store-{variant}"
                done = run_job(job_command(variant, stores[variant], args.job_args), env)
                if done["returncode"] != 0:
                    sys.exit(f"{variant}: the job that makes the store failed:\n{done['stderr'][-2000:]}")
    results: dict[str, list[dict[str, Any]]] = {v: [] for v in variants}
    print(f"load average before: {os.getloadavg()[0]:.2f}; jobs write under {scratch}")
    for round_index in range(args.rounds):
        order = variants[round_index % len(variants) :] + variants[: round_index % len(variants)]
        for variant in order:
            for attempt in range(1 + args.retries):
                exp_dir = stores.get(variant) or scratch / f"{variant}-{round_index}-{attempt}"
                wait_until_idle(args.idle_below)
                done = run_job(job_command(variant, exp_dir, args.job_args), env)
                if done["others"] <= args.max_others:
                    break
                print(f"round {round_index + 1} {variant:<8} disturbed (others took {done['others']:.1f} CPU s)")
            else:
                continue  # disturbed every time: not counted
            if done["returncode"] != 0:
                sys.exit(f"{variant} failed ({done['returncode']}):\n{done['stderr'][-3000:]}")
            done["acc"] = test_accuracy(exp_dir) if variant not in stores else None
            results[variant].append(done)
            acc = "" if done["acc"] is None else f"  test acc {done['acc']:.4f}"
            tail = f"  (its processes ended {done['tail']:.1f} s later)" if (done["tail"] or 0) > 0.3 else ""
            print(
                f"round {round_index + 1} {variant:<8} wall {done['wall']:6.2f} s  cpu {done['cpu']:6.2f} s  "
                f"others {done['others']:4.1f} s{acc}{tail}"
            )
    print(f"load average after: {os.getloadavg()[0]:.2f}")
    base = statistics.median(r["wall"] for r in results["csv"]) if results.get("csv") else None
    print("\nvariant   jobs   median wall   median cpu   wall / csv   wall - csv")
    for variant, rows in results.items():
        if not rows:
            print(f"{variant:<9} no undisturbed job")
            continue
        wall = statistics.median(r["wall"] for r in rows)
        cpu = statistics.median(r["cpu"] for r in rows)
        ratio, extra = (f"{wall / base:.2f}x", f"{wall - base:+.2f} s") if base else ("-", "-")
        print(f"{variant:<9} {len(rows):4d} {wall:9.2f} s  {cpu:9.2f} s   {ratio:>10}   {extra:>10}")
    return 0


# --- a server that dies mid-run ------------------------------------------------------------------------------------


def free_port() -> int:
    with socket.socket() as probe:
        probe.bind(("127.0.0.1", 0))
        return probe.getsockname()[1]


def server_dies(args: argparse.Namespace) -> int:
    """One job per tracker variant against a fresh local `mlflow server`, killed once the first epoch is
    in metrics.csv: does training go on, how long does the job take, what lands on stderr."""
    import urllib.request

    scratch = Path(tempfile.mkdtemp(prefix="tracker-dies-"))
    for variant in [v for v in args.variants.split(",") if v != "csv"]:
        root = scratch / variant
        root.mkdir()
        url = f"http://127.0.0.1:{free_port()}"
        server = subprocess.Popen(
            [sys.executable, "-m", "mlflow", "server", "--host", "127.0.0.1", "--port", url.rsplit(":")[-1],
             "--workers", "1", "--backend-store-uri", f"sqlite:///{root / 'server.db'}",
             "--artifacts-destination", str(root / "artifacts")],
            cwd=root, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL, start_new_session=True,
            env={**os.environ, "MLFLOW_SERVER_ENABLE_JOB_EXECUTION": "false"},  # its 7 job processes: not ours to time
        )  # fmt: skip
        try:
            deadline = time.monotonic() + 120
            while True:
                try:
                    with urllib.request.urlopen(f"{url}/health", timeout=2):
                        break
                except OSError:
                    if time.monotonic() > deadline or server.poll() is not None:
                        sys.exit("mlflow server did not start")
                    time.sleep(0.5)
            env = {**job_env(), "MLFLOW_TRACKING_URI": url}
            exp_dir = root / "runs"
            command = job_command(variant, exp_dir, args.job_args)
            start = time.perf_counter()
            job = subprocess.Popen(
                command, cwd=ROOT, env=env, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True
            )
            killed_at = None
            deadline = time.monotonic() + 600
            while job.poll() is None and time.monotonic() < deadline:
                if killed_at is None and _first_epoch_logged(exp_dir):
                    os.killpg(server.pid, signal.SIGKILL)
                    killed_at = time.perf_counter() - start
                time.sleep(0.1)
            stdout, stderr = job.communicate(timeout=max(deadline - time.monotonic(), 1))
            wall = time.perf_counter() - start
        finally:
            if server.poll() is None:
                os.killpg(server.pid, signal.SIGKILL)
            server.wait()
        epochs = sorted({r["epoch"] for r in _rows(exp_dir) if r.get("val/acc")})
        lines = [line for line in stderr.splitlines() if line.strip()]
        print(f"\n== {variant}: server killed at {killed_at and round(killed_at, 1)} s; job exit {job.returncode} "
              f"after {wall:.1f} s; epochs with val/acc: {len(epochs)}; stderr: {len(lines)} lines")  # fmt: skip
        for line in lines[:8]:
            print(f"   {line[:200]}")
        if len(lines) > 8:
            print(f"   ... ({len(lines) - 8} more; the last 6:)")
            for line in lines[max(8, len(lines) - 6) :]:
                print(f"   {line[:200]}")
        print("   summary: " + " | ".join(line.strip() for line in stdout.splitlines()[-4:]))
    return 0


def _rows(exp_dir: Path) -> list[dict[str, str]]:
    found = sorted(exp_dir.glob("*/*/metrics.csv"))
    if not found:
        return []
    with open(found[-1], newline="") as file:
        return list(csv.DictReader(file))


def _first_epoch_logged(exp_dir: Path) -> bool:
    return any(row.get("val/acc") for row in _rows(exp_dir))


def per_epoch(args: argparse.Namespace) -> int:
    """gpu_benchmark.py's MNIST-shaped setting (60,000 samples an epoch, the template's MLP, batch 128) on the CPU
    with each tracker, in rotated order; its table's template seconds per epoch and the part spent in tracker calls."""
    variants, results = args.variants.split(","), {}
    for round_index in range(args.rounds):
        for variant in variants[round_index % len(variants) :] + variants[: round_index % len(variants)]:
            command = [sys.executable, "benchmarks/gpu_benchmark.py", "--device", "cpu", "--settings", "mlp",
                       "--epochs", "3", "--logger", variant, *args.job_args]  # fmt: skip
            done = subprocess.run(command, cwd=ROOT, env=job_env(), capture_output=True, text=True)
            if done.returncode != 0:
                sys.exit(f"{variant} failed:\n{done.stderr[-3000:]}")
            row = [line for line in done.stdout.splitlines() if line.startswith("| MNIST")][0].split(" | ")
            results.setdefault(variant, []).append((float(row[2]), float(row[4])))
            print(f"round {round_index + 1} {variant:<8} s/epoch {row[2]}  of which trackers {row[4]}", flush=True)
    for variant, rows in results.items():
        print(f"{variant:<8} median s/epoch {statistics.median(r[0] for r in rows):.3f}  "
              f"of which trackers {statistics.median(r[1] for r in rows):.4f}")  # fmt: skip
    return 0


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--rounds", type=int, default=3, help="interleaved rounds (one job per variant each)")
    parser.add_argument("--variants", default="csv,mlflow", help=f"comma-separated, of {', '.join(VARIANTS)}")
    parser.add_argument("--existing-store", action="store_true", help="tracker jobs log into a store made beforehand")
    parser.add_argument("--server-dies", action="store_true", help="one job per tracker variant, server killed")
    parser.add_argument("--per-epoch", action="store_true", help="seconds per 60,000-sample epoch, per tracker")
    parser.add_argument("--idle-below", type=float, default=0.3, help="start a job when others use fewer cores")
    parser.add_argument("--max-others", type=float, default=2.0, help="redo a job if others took more CPU s")
    parser.add_argument("--retries", type=int, default=2, help="how often to redo a disturbed job")
    parser.add_argument("job_args", nargs="*", help="more project.run arguments (after --), e.g. -- --max-epochs 5")
    args = parser.parse_args()
    return server_dies(args) if args.server_dies else per_epoch(args) if args.per_epoch else measure(args)


if __name__ == "__main__":
    sys.exit(main())
