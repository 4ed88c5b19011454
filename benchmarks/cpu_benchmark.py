"""The default digits job end to end (imports included) against the same training written by hand.

Each repetition runs, one after the other and each in a fresh process,

- `python benchmarks/hand_digits.py` (the hand-written script),
- `python -m project.run --exp-dir TMP` (the template with its defaults, MLflow tracking included),
- `python -m project.run --exp-dir TMP --logger none` (the template without an experiment tracker),

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
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
JOBS = {
    "hand-written script": [sys.executable, "benchmarks/hand_digits.py"],
    "template (default: MLflow)": [sys.executable, "-m", "project.run"],
    "template --logger none": [sys.executable, "-m", "project.run", "--logger", "none"],
}
IMPORTS = ("torch", "sklearn.datasets", "lightning.pytorch", "mlflow", "matplotlib.pyplot")
ACCURACY = re.compile(r"Test accuracy: ([0-9.]+)")


def environment(threads: int | None) -> dict[str, str]:
    env = {k: v for k, v in os.environ.items() if not k.startswith(("MLFLOW_", "WANDB_"))}
    env["PYTHONPATH"] = str(ROOT) + os.pathsep + env.get("PYTHONPATH", "")
    if threads:
        env["OMP_NUM_THREADS"] = str(threads)
    return env


def timed(command: list[str], env: dict[str, str]) -> tuple[float, str]:
    """Wall seconds of `command` from start to exit, and its stdout; a failure stops the benchmark."""
    start = time.perf_counter()
    done = subprocess.run(command, cwd=ROOT, env=env, capture_output=True, text=True)
    seconds = time.perf_counter() - start
    if done.returncode != 0:
        sys.exit(f"benchmark: {' '.join(command)} failed ({done.returncode}):\n{done.stderr[-2000:]}")
    return seconds, done.stdout


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

    seconds: dict[str, list[float]] = {name: [] for name in JOBS}
    accuracy: dict[str, list[float]] = {name: [] for name in JOBS}
    loads = []
    with tempfile.TemporaryDirectory() as exp_dir:
        for _ in range(options.repeats):
            for name, command in JOBS.items():
                template = "project.run" in command
                loads.append(os.getloadavg()[0])
                wall, stdout = timed(command + (["--exp-dir", exp_dir] if template else []), env)
                found = ACCURACY.search(stdout)
                seconds[name].append(wall)
                accuracy[name].append(float(found.group(1)) if found else float("nan"))
                print(f"  {name}: {wall:.1f} s, test accuracy {accuracy[name][-1]:.4f}", flush=True)

    hand = statistics.median(seconds["hand-written script"])
    print(f"\n{options.repeats} repetitions, interleaved; 1-minute load average {min(loads):.1f} to {max(loads):.1f}")
    print("\n| job | median wall s | min | max | / hand (median) | test accuracy |")
    print("|---|---|---|---|---|---|")
    for name in JOBS:
        walls = seconds[name]
        accuracies = ", ".join(sorted({f"{a:.4f}" for a in accuracy[name]}))
        median = statistics.median(walls)
        print(f"| {name} | {median:.1f} | {min(walls):.1f} | {max(walls):.1f} | {median / hand:.2f}x | {accuracies} |")

    print("\n| import (fresh process, `python -c 'import X'`) | median wall s over 3 |")
    print("|---|---|")
    for module in IMPORTS:
        walls = [timed([sys.executable, "-c", f"import {module}"], env)[0] for _ in range(3)]
        print(f"| {module} | {statistics.median(walls):.2f} |")
    return 0


if __name__ == "__main__":
    sys.exit(main())
