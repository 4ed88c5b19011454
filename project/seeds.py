"""Repeat one configuration over several seeds: `python -m project.seeds --seeds 0,1,2 [run options]`.

Each seed is a normal project.run run (its own run directory, config.yaml that reruns exactly that seed,
tracker run, test report); at the end the test metrics are reported as mean ± standard deviation over
the seeds (sample std, n - 1), printed and saved as seeds-<time>.json in the experiment folder.

A sibling of project.run rather than a flag on it: project.run stays one run read top to bottom, and no
run's config.yaml carries a list of seeds that would make it something other than one run.
"""

from __future__ import annotations

import argparse
import json
import statistics
import sys
import time
from pathlib import Path
from typing import Any

from project import run
from project.infra import cli, runs
from project.infra.errors import UserError, run_command


def seed_list(text: str) -> list[int]:
    seeds = [cli.non_negative_int(part) for part in text.split(",") if part.strip()]
    if len(seeds) < 2 or len(set(seeds)) != len(seeds):
        raise ValueError
    return seeds


seed_list.__name__ = "list of two or more distinct seeds, like 0,1,2"  # argparse names it in errors


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="python -m project.seeds",
        description="Train and test one configuration once per seed; report the test metrics as mean ± std.",
        epilog="Every other option is a project.run option (python -m project.run --help), the same for each seed.",
        allow_abbrev=False,  # a prefix of a project.run option must reach project.run
    )
    parser.add_argument(
        "--seeds", type=seed_list, required=True, metavar="LIST", help="comma-separated seeds, e.g. 0,1,2"
    )
    return parser


def main(argv: list[str] | None = None) -> int:
    args, run_argv = build_parser().parse_known_args(argv)
    if cli.refused_continuing(run_argv, "seeds"):
        return 2
    base = run.parse_args(run_argv)  # checked once, before the first run (exits 2 with one line if wrong)
    return run_command(lambda: repeat(args.seeds, run_argv, base), base.debug)


def repeat(seeds: list[int], run_argv: list[str], base: argparse.Namespace) -> dict[str, Any]:
    if any(arg == "--seed" or arg.startswith("--seed=") for arg in run_argv):
        raise UserError("--seed and --seeds exclude each other: list every seed in --seeds")
    results = []
    for seed in seeds:
        print(f"\n--- seed {seed} ({len(results) + 1} of {len(seeds)})", flush=True)
        result = run.train_and_test(run.parse_args([*run_argv, "--seed", str(seed)]))
        results.append({"seed": seed, "run_dir": str(result.directory), **result.test_metrics})

    names = sorted({name for r in results for name in r if name.startswith("test/")})
    summary = {
        name: {"mean": statistics.mean(r[name] for r in results), "std": statistics.stdev(r[name] for r in results)}
        for name in names
        if all(name in r for r in results)
    }
    record = {"seeds": seeds, "config": run.config_of(base), "runs": results, "summary": summary}
    path = runs.experiment_dir(base.exp_dir, base.exp_name) / f"seeds-{time.strftime('%Y%m%d-%H%M%S')}.json"
    path.write_text(json.dumps(record, indent=2) + "\n")
    print(format_summary(results, summary, path))
    return record


def format_summary(runs: list[dict[str, Any]], summary: dict[str, dict[str, float]], path: Path) -> str:
    names = list(summary)
    width = max(10, *(len(n) for n in names))
    lines = ["", "seed".ljust(10) + "".join(n.rjust(width + 2) for n in names) + "  run directory"]
    for r in runs:
        lines.append(str(r["seed"]).ljust(10) + "".join(f"{r[n]:{width + 2}.4f}" for n in names) + f"  {r['run_dir']}")
    cells = "".join(f"{summary[n]['mean']:.4f} ± {summary[n]['std']:.4f}".rjust(width + 2) for n in names)
    lines.append(f"{'mean ± std':<10}" + cells)
    lines.append(f"\nOver {len(runs)} seeds (sample std). Saved: {path}")
    return "\n".join(lines)


if __name__ == "__main__":
    sys.exit(main())
