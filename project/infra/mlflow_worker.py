"""PROVISIONAL (replaced by the worker process): MLflow in this process."""

from __future__ import annotations


class MlflowWorker:
    def __init__(self, uri: str, artifacts: str | None) -> None:
        self.uri, self.artifacts = uri, artifacts

    @classmethod
    def start(cls, uri: str, artifacts: str | None) -> MlflowWorker:
        return cls(uri, artifacts)

    def stop(self) -> None:
        pass
