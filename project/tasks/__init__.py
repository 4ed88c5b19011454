"""The tasks: what a model's outputs mean. One file per task; `TASKS` names them for the datasets (`task = "..."`).

A task owns everything that depends on what is predicted: the loss, the metrics and which way each is better, the
network's last layer and the head that turns its outputs into what a user reads, the test report, and the columns
`project.predict` writes. The machinery (records, checkpoints, predict, export, sweep) only calls these; to add a
task, write a `Task` subclass in a file of its own and add it here. The README shows one (multi-label).
"""

from project.tasks.base import Task
from project.tasks.classification import Classification
from project.tasks.regression import Regression

TASKS: dict[str, type[Task]] = {"classification": Classification, "regression": Regression}


def build_task(name: str, output_names: list[str], options: dict | None = None) -> Task:
    return TASKS[name](output_names, **(options or {}))
