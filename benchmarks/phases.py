"""Where one `python -m project.run` job spends its time: imports, opening the run (trackers), training,
testing, the records at the end, checkpoint writes. Takes the same arguments as project.run.

    OMP_NUM_THREADS=1 python benchmarks/phases.py --exp-dir /tmp/x              # the default job
    OMP_NUM_THREADS=1 python benchmarks/phases.py --exp-dir /tmp/x --logger none

It wraps a few functions with a stopwatch (nothing else changes) and prints one line on stderr;
interpreter start-up and shut-down are not included: time the whole command to see them.
"""

from __future__ import annotations

import sys
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

START = time.perf_counter()

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))  # the project package, from anywhere
import lightning.pytorch as pl  # noqa: E402

from project import run  # noqa: E402
from project.infra import callbacks, records  # noqa: E402

SPENT: dict[str, float] = {}


def stopwatch(owner: Any, name: str, label: str) -> None:
    """Replace `owner.name` by a wrapper that adds its duration to SPENT[label]."""
    function: Callable[..., Any] = getattr(owner, name)

    def timed(*args: Any, **kwargs: Any) -> Any:
        start = time.perf_counter()
        try:
            return function(*args, **kwargs)
        finally:
            SPENT[label] = SPENT.get(label, 0.0) + time.perf_counter() - start

    setattr(owner, name, timed)


def main() -> int:
    stopwatch(records.Run, "open", "open run (trackers)")
    stopwatch(pl.Trainer, "fit", "fit")
    stopwatch(callbacks.SafeCheckpointIO, "save_checkpoint", "of which checkpoint writes")
    stopwatch(records.Run, "log_model", "log the model (trackers)")
    stopwatch(pl.Trainer, "test", "test")
    stopwatch(records.Run, "finish", "records at the end")
    imported = time.perf_counter()
    code = run.main(sys.argv[1:])
    total = time.perf_counter() - imported
    parts = ", ".join(f"{label} {seconds:.2f} s" for label, seconds in SPENT.items())
    print(f"imports {imported - START:.2f} s, run.main {total:.2f} s: {parts}", file=sys.stderr)
    return code


if __name__ == "__main__":
    sys.exit(main())
