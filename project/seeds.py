"""One configuration over several seeds: `python -m project.seeds --seeds 0,1,2 [project.run options]`.

Each seed is a normal project.run run (its config.yaml reruns that seed: a run stays one run); at the end each test
metric of the runs is reported as mean ± sample std, printed and saved as seeds-<time>.json in the experiment folder.
"""

from __future__ import annotations

import argparse
import json
import secrets
import statistics
import time

from project import run
from project.infra import cli, runs
from project.infra.errors import UserError, exit_process, run_command
from project.infra.files import write_text
from project.infra.redact import redact, redact_path


def seed_list(text: str) -> list[int]:
    seeds = [cli.seed(part) for part in text.split(",") if part.strip()]
    if len(seeds) < 2 or len(set(seeds)) != len(seeds):
        raise ValueError
    return seeds


seed_list.__name__ = "list of two or more distinct seeds (integers from 0), like 0,1,2"  # argparse names it in errors


def main(argv: list[str] | None = None) -> int:
    parser = cli.Parser(  # its mistakes, like project.run's: one line, redacted; no abbreviations (project.run's)
        prog="python -m project.seeds",
        description="Train and test one configuration once per seed; report the test metrics as mean ± std.",
        epilog="Every other option is a project.run option (python -m project.run --help), the same for each seed.",
    )
    parser.add_argument("--seeds", type=seed_list, required=True, help="comma-separated seeds, e.g. 0,1,2")
    args, run_argv = parser.parse_known_args(argv)
    if cli.refused_continuing(run_argv, "seeds"):
        return 2
    base = run.parse_args(run_argv)  # checked once, before the first run (exits 2 with one line if wrong)
    return run_command(lambda: repeat(args.seeds, run_argv, base), base.debug)


def repeat(seeds: list[int], run_argv: list[str], base: argparse.Namespace) -> None:
    if any(arg.split("=")[0] == "--seed" for arg in run_argv):
        raise UserError("--seed and --seeds exclude each other: list every seed in --seeds")
    cli.require_one_device(base, "project.seeds")
    results = []
    for number, seed in enumerate(seeds, 1):
        print(f"\n--- seed {seed} ({number} of {len(seeds)})", flush=True)
        result = run.train_and_test(run.parse_args([*run_argv, "--seed", str(seed)]))
        results.append({"seed": seed, "run_dir": redact_path(result.directory), **result.test_metrics})
    names = [name for name in results[0] if name.startswith("test/") and all(name in r for r in results)]
    values = {name: [r[name] for r in results] for name in names}
    summary = {name: {"mean": statistics.mean(v), "std": statistics.stdev(v)} for name, v in values.items()}
    # Named like a run: two commands that end within a second keep a summary each.
    name = f"seeds-{time.strftime('%Y%m%d-%H%M%S')}-{secrets.token_hex(4)}.json"
    path = runs.experiment_dir(base.exp_dir, base.exp_name) / name
    config = redact(run.config_of(base))
    del config["seed"]  # each run's is its own
    write_text(path, json.dumps({"seeds": seeds, "config": config, "runs": results, "summary": summary}, indent=2))
    print(
        f"\nTest metrics over seeds {','.join(map(str, seeds))}, mean ± std (sample std); saved in {redact_path(path)}"
    )
    for name, value in summary.items():
        print(f"{name:>16}  {value['mean']:.4f} ± {value['std']:.4f}")


if __name__ == "__main__":
    exit_process(main())
