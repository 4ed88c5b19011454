"""What each part of the template costs per training step: gpu_benchmark.py's 60,000-sample MLP job on the CPU, once
in full and once with each part switched off (`--without`), in interleaved rounds (each run a fresh process, with its
own hand loop), printing a Markdown table of medians for RESULTS.md.

    python benchmarks/epoch_parts.py --rounds 3                # wall clock
    python benchmarks/epoch_parts.py --rounds 3 --clock cpu    # CPU seconds: steadier on a shared machine
"""

from __future__ import annotations

import argparse
import os
import re
import statistics
import subprocess
import sys
from pathlib import Path

from gpu_benchmark import EMPTY_CALLBACKS, PARTS

ROOT = Path(__file__).resolve().parent.parent
STEPS = 469 + 47  # training and validation batches of an epoch: 60,000 and 6,000 samples in batches of 128
CSV = ["--logger", "csv"]
VARIANTS = {"nothing (the template, `--logger csv`)": CSV, **{part: [*CSV, f"--without={part}"] for part in PARTS}}
VARIANTS[f"(added: {EMPTY_CALLBACKS} callbacks that do nothing)"] = [*CSV, "--with-empty-callbacks"]
VARIANTS["all of the above, and `--logger none`"] = ["--logger", "none", *(f"--without={part}" for part in PARTS)]


def epoch_seconds(flags: list[str], clock: str) -> tuple[float, float]:
    """(hand loop, template) seconds per epoch, from one run of gpu_benchmark.py."""
    command = [sys.executable, "benchmarks/gpu_benchmark.py", "--device", "cpu", "--settings", "mlp", "--epochs", "3"]
    env = {**os.environ, "OMP_NUM_THREADS": "1"}
    done = subprocess.run([*command, "--clock", clock, *flags], cwd=ROOT, env=env, capture_output=True,
                          text=True, check=True)  # fmt: skip
    cells = re.search(r"^\| MNIST-shaped.*$", done.stdout, re.M).group(0).strip(" |").split("|")
    return float(cells[1]), float(cells[2])


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--rounds", type=int, default=3)
    parser.add_argument("--clock", choices=("wall", "cpu"), default="wall")
    options = parser.parse_args()
    hand: list[float] = []
    template: dict[str, list[float]] = {name: [] for name in VARIANTS}
    for round_ in range(options.rounds):
        for name, flags in VARIANTS.items():
            h, t = epoch_seconds(flags, options.clock)
            hand.append(h)
            template[name].append(t)
            print(f"round {round_ + 1}, without {name}: hand {h:.3f} s, template {t:.3f} s", file=sys.stderr)
    full, hand_median = statistics.median(template[next(iter(VARIANTS))]), statistics.median(hand)
    print(f"hand loop: median {hand_median:.3f} s/epoch over {len(hand)} runs ({options.clock} clock)\n")
    print("| switched off | template s/epoch (median) | / hand | saved per epoch | saved per step |")
    print("|---|---|---|---|---|")
    for name, seconds in template.items():
        median, saved = statistics.median(seconds), full - statistics.median(seconds)
        cells = [name, f"{median:.3f}", f"{median / hand_median:.2f}x", f"{saved * 1e3:.0f} ms"]
        print("| " + " | ".join([*cells, f"{saved / STEPS * 1e6:.0f} us"]) + " |")
    return 0


if __name__ == "__main__":
    sys.exit(main())
