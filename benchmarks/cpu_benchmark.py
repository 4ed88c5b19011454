"""The default digits job end to end (imports included) against the same training written by hand.

Each repetition runs, one after the other and each in a fresh process,

- `python benchmarks/hand_digits.py` (the hand-written script),
- `python -m project.run --exp-dir TMP` (the template with its defaults, MLflow tracking included),
- `python -m project.run --exp-dir TMP --logger csv` (the template without an experiment tracker: metrics.csv only),

and times each from start to exit; interleaving them spreads any change in the machine's load over all
three. It also times `python -m project.run --help` and, for the record, the import of the libraries
the jobs load. It prints Markdown tables for benchmarks/RESULTS.md.

    python benchmarks/cpu_benchmark.py                  # 3 repetitions
    python benchmarks/cpu_benchmark.py --repeats 5 --threads 1
"""

from __future__ import annotations

import argparse
import os
import platform
import re
import resource
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
HAND = "hand-written script"
JOBS = {
    HAND: [sys.executable, "benchmarks/hand_digits.py"],
    "template (default: MLflow)": [sys.executable, "-m", "project.run"],
    "template --logger csv": [sys.executable, "-m", "project.run", "--logger", "csv"],
}
IMPORTS = ("torch", "sklearn.datasets", "lightning.pytorch", "mlflow", "matplotlib.pyplot")
ACCURACY = re.compile(r"(?:Test accuracy: |Test scores: +acc )([0-9.]+)")  # the hand script; the template


def environment(threads: int | None) -> dict[str, str]:
    env = {k: v for k, v in os.environ.items() if not k.startswith(("MLFLOW_", "WANDB_"))}
    env["PYTHONPATH"] = str(ROOT) + os.pathsep + env.get("PYTHONPATH", "")
    if threads:
        env["OMP_NUM_THREADS"] = str(threads)
    return env


def timed(command: list[str], env: dict[str, str]) -> tuple[float, float, str]:
    """Wall seconds of `command` from start to exit, the CPU seconds it used (user + system, all its
    threads: less sensitive to other processes than wall time), and its stdout. A failure stops here."""
    before = resource.getrusage(resource.RUSAGE_CHILDREN)
    start = time.perf_counter()
    done = subprocess.run(command, cwd=ROOT, env=env, capture_output=True, text=True)
    wall = time.perf_counter() - start
    after = resource.getrusage(resource.RUSAGE_CHILDREN)
    if done.returncode != 0:
        sys.exit(f"benchmark: {' '.join(command)} failed ({done.returncode}):\n{done.stderr[-2000:]}")
    cpu = (after.ru_utime - before.ru_utime) + (after.ru_stime - before.ru_stime)
    return wall, cpu, done.stdout


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--repeats", type=int, default=3, help="runs of each job")
    parser.add_argument("--threads", type=int, default=None, help="OMP_NUM_THREADS for every job (default: unset)")
    parser.add_argument("--help-runs", type=int, default=10, help="runs of `--help`")
    options = parser.parse_args(argv)
    env = environment(options.threads)
    print(f"# {platform.machine()}, {os.cpu_count()} CPUs, {time.strftime('%Y-%m-%d %H:%M %Z')}, "
          f"OMP_NUM_THREADS={env.get('OMP_NUM_THREADS', 'unset')}, load before {os.getloadavg()[0]:.1f}")  # fmt: skip

    help_seconds = [timed([sys.executable, "-m", "project.run", "--help"], env)[0] for _ in range(options.help_runs)]
    print(f"\n`python -m project.run --help`: median {statistics.median(help_seconds):.3f} s, "
          f"max {max(help_seconds):.3f} s over {options.help_runs} runs")  # fmt: skip

    walls: dict[str, list[float]] = {name: [] for name in JOBS}
    cpus: dict[str, list[float]] = {name: [] for name in JOBS}
    accuracy: dict[str, list[float]] = {name: [] for name in JOBS}
    loads = []
    with tempfile.TemporaryDirectory() as exp_dir:
        for _ in range(options.repeats):
            for name, command in JOBS.items():
                template = "project.run" in command
                loads.append(os.getloadavg()[0])
                wall, cpu, stdout = timed(command + (["--exp-dir", exp_dir] if template else []), env)
                found = ACCURACY.search(stdout)
                walls[name].append(wall)
                cpus[name].append(cpu)
                accuracy[name].append(float(found.group(1)) if found else float("nan"))
                print(
                    f"  {name}: {wall:.1f} s wall, {cpu:.1f} s CPU, test accuracy {accuracy[name][-1]:.4f}", flush=True
                )

    hand_wall, hand_cpu = statistics.median(walls[HAND]), statistics.median(cpus[HAND])
    print(f"\n{options.repeats} repetitions, interleaved; 1-minute load average {min(loads):.1f} to {max(loads):.1f}")
    print("\n| job | wall s: median (min-max) | / hand | CPU s: median | / hand | test accuracy |")
    print("|---|---|---|---|---|---|")
    for name in JOBS:
        wall, cpu = statistics.median(walls[name]), statistics.median(cpus[name])
        spread = f"{min(walls[name]):.1f}-{max(walls[name]):.1f}"
        accuracies = ", ".join(sorted({f"{a:.4f}" for a in accuracy[name]}))
        cells = [name, f"{wall:.1f} ({spread})", f"{wall / hand_wall:.2f}x", f"{cpu:.1f}", f"{cpu / hand_cpu:.2f}x"]
        print("| " + " | ".join([*cells, accuracies]) + " |")

    print("\n| import (fresh process, `python -c 'import X'`) | median wall s over 3 |")
    print("|---|---|")
    for module in IMPORTS:
        seconds = [timed([sys.executable, "-c", f"import {module}"], env)[0] for _ in range(3)]
        print(f"| {module} | {statistics.median(seconds):.2f} |")
    return 0


if __name__ == "__main__":
    sys.exit(main())
