"""Where one `python -m project.run` job spends its time: imports, opening the run (trackers), training,
testing, the records at the end, checkpoint writes. Takes the same arguments as project.run.

    OMP_NUM_THREADS=1 python benchmarks/phases.py --exp-dir /tmp/x              # the default job
    OMP_NUM_THREADS=1 python benchmarks/phases.py --exp-dir /tmp/x --logger none

It wraps a few functions with a stopwatch (nothing else changes) and prints one line on stderr, wall seconds and this
process's CPU seconds (steadier on a shared machine; with one thread they match on an idle one);
interpreter start-up and shut-down are not included: time the whole command to see them.
"""

from __future__ import annotations

import sys
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

START = time.perf_counter(), time.process_time()

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))  # the project package, from anywhere
import lightning.pytorch as pl  # noqa: E402

from project import run  # noqa: E402
from project.infra import callbacks, records  # noqa: E402

SPENT: dict[str, list[float]] = {}  # label: [wall seconds, CPU seconds]


def stopwatch(owner: Any, name: str, label: str) -> None:
    """Replace `owner.name` by a wrapper that adds its duration to SPENT[label]."""
    function: Callable[..., Any] = getattr(owner, name)

    def timed(*args: Any, **kwargs: Any) -> Any:
        start = time.perf_counter(), time.process_time()
        try:
            return function(*args, **kwargs)
        finally:
            spent = SPENT.setdefault(label, [0.0, 0.0])
            spent[0] += time.perf_counter() - start[0]
            spent[1] += time.process_time() - start[1]

    setattr(owner, name, timed)


def main() -> int:
    stopwatch(records.Run, "open", "open run (trackers)")
    stopwatch(pl.Trainer, "fit", "fit")
    stopwatch(callbacks.SafeCheckpointIO, "save_checkpoint", "of which checkpoint writes")
    stopwatch(records.Run, "log_model", "log the model (trackers)")
    stopwatch(pl.Trainer, "test", "test")
    stopwatch(records.Run, "finish", "records at the end")
    imported = time.perf_counter(), time.process_time()
    code = run.main(sys.argv[1:])
    SPENT["run.main"] = [time.perf_counter() - imported[0], time.process_time() - imported[1]]
    parts = ", ".join(f"{label} {wall:.2f} s ({cpu:.2f} s CPU)" for label, (wall, cpu) in SPENT.items())
    print(f"imports {imported[0] - START[0]:.2f} s ({imported[1] - START[1]:.2f} s CPU), {parts}", file=sys.stderr)
    return code


if __name__ == "__main__":
    sys.exit(main())
