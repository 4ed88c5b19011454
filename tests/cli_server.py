"""Runs `python -m MODULE ARGS` for the tests in a forked child of one process that has already imported the heavy
libraries (torch, Lightning, MLflow: ~4 s a start on a 2-core machine, most of a short end-to-end test).

Each child is a real process: its own stdout and stderr, its exit status, signals, atexit handlers and the
interpreter's shutdown, as `python -m` gives them. It imports this project's code afresh (the server never imports
`project`). conftest.run_cli uses this only where nothing read at interpreter or library start-up differs from a
fresh process: the same interpreter flags and environment, but for the variables in LAZY, which the project and its
libraries read when they are used. Protocol: one JSON request a line on stdin; the server answers the child's pid,
then its exit code (negative: the signal that ended it) as `subprocess` gives it.
"""

from __future__ import annotations

import gc
import json
import os
import runpy
import sys

PRELOADED = ("torch", "lightning", "torchvision", "torchmetrics", "sklearn.metrics", "mlflow")
# Environment variables read only when used (not at start-up or import): a request may set these differently.
# PL_GLOBAL_SEED and PL_SEED_WORKERS: Lightning's seed_everything sets them in a test process that trained in-process.
LAZY = ("MLFLOW_", "WANDB_", "PROJECT_", "PYTEST_", "FAULT_", "XDG_CACHE_HOME", "PL_GLOBAL_SEED", "PL_SEED_WORKERS")


def serve() -> dict:
    """Answer requests until stdin closes; in a forked child, return its request instead."""
    for name in PRELOADED:
        __import__(name)
    gc.freeze()  # the children neither collect nor copy what is loaded here (Python's advice for forking servers)
    answer(ready=True)
    for line in sys.stdin:
        request = json.loads(line)
        sys.stdout.flush()
        sys.stderr.flush()
        # The client reads these pipes to their end, as `subprocess.run` does: until every process that holds them
        # (the child and whatever it starts, e.g. DDP's other ranks) is gone.
        outputs = [os.open(request[name], os.O_WRONLY) for name in ("stdout", "stderr")]
        pid = os.fork()
        if pid == 0:
            return request | {"outputs": outputs}
        for fd in outputs:
            os.close(fd)
        answer(pid=pid)
        _, status = os.waitpid(pid, 0)
        answer(pid=pid, returncode=os.waitstatus_to_exitcode(status))
    sys.exit(0)


def answer(**fields: object) -> None:
    sys.stdout.write(json.dumps(fields) + "\n")
    sys.stdout.flush()


def become(request: dict) -> None:
    """Turn this forked child into `python -m MODULE ARGS` run in `cwd` with `env`, writing into the given pipes."""
    os.environ.clear()
    os.environ.update(request["env"])
    os.chdir(request["cwd"])
    null = os.open(os.devnull, os.O_RDONLY)
    for fd, opened in zip((0, 1, 2), (null, *request["outputs"]), strict=True):
        os.dup2(opened, fd)
        os.close(opened)
    sys.path[0] = os.getcwd()  # as `python -m` sets it
    sys.argv = ["-m", *request["args"]]
    runpy.run_module(request["module"], run_name="__main__", alter_sys=True)


if __name__ == "__main__":
    become(serve())
