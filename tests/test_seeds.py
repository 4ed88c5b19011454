"""project.seeds: one configuration over several seeds, each a normal run, summarised as mean ± std."""

from __future__ import annotations

import json
import statistics
from pathlib import Path

import pytest
import yaml

from project import seeds


@pytest.mark.slow
def test_seeds_are_separate_runs_summarised_as_mean_and_std(tmp_path: Path, capsys) -> None:
    argv = ["--seeds", "3,5", "--model", "mlp", "--hidden-dim", "16", "--max-epochs", "1", "--logger", "csv",
            "--num-workers", "0", "--exp-dir", str(tmp_path), "--exp-name", "repeat"]  # fmt: skip
    assert seeds.main(argv) == 0

    (summary_file,) = (tmp_path / "repeat").glob("seeds-*.json")
    summary = json.loads(summary_file.read_text())
    run_dirs = [Path(r["run_dir"]) for r in summary["runs"]]
    # Each seed is its own run whose config.yaml reruns exactly that seed.
    assert [yaml.safe_load((d / "config.yaml").read_text())["seed"] for d in run_dirs] == [3, 5]
    accuracies = [json.loads((d / "test_metrics.json").read_text())["acc"] for d in run_dirs]
    # the numbers of the runs' own records, not Lightning's float32 copies of them
    assert [r["test/acc"] for r in summary["runs"]] == accuracies
    assert summary["summary"]["test/acc"]["mean"] == pytest.approx(statistics.mean(accuracies), rel=1e-12)
    assert summary["summary"]["test/acc"]["std"] == pytest.approx(statistics.stdev(accuracies), rel=1e-12)
    assert "mean ± std" in capsys.readouterr().out
    assert "seed" not in summary["config"]  # each run's is its own


def test_seed_list_mistakes_are_one_line(tmp_path: Path, capsys) -> None:
    for bad in ("1", "1,1", "1,x", "1,-1", "0,4294967296"):  # the last: project.run's own limit, before the first run
        with pytest.raises(SystemExit) as exit_info:
            seeds.main(["--seeds", bad, "--exp-dir", str(tmp_path)])
        assert exit_info.value.code == 2
        assert "--seeds: invalid list of two or more distinct seeds" in capsys.readouterr().err
    assert seeds.main(["--seeds", "1,2", "--seed", "4", "--exp-dir", str(tmp_path)]) == 2
    assert capsys.readouterr().err.strip() == "error: --seed and --seeds exclude each other: list every seed in --seeds"
    # Several processes would each run the whole loop of runs (and part ways between them): refused at once.
    for devices in (["--devices", "2", "--accelerator", "cpu"], ["--num-nodes", "2"]):
        assert seeds.main(["--seeds", "1,2", *devices, "--exp-dir", str(tmp_path)]) == 2
        assert "project.seeds trains each run on one device" in capsys.readouterr().err
    assert not any(tmp_path.iterdir())
