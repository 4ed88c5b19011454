"""PROVISIONAL (replaced by the worker process): Lightning's MLFlowLogger(synchronous=False)."""

from __future__ import annotations

from pathlib import Path
from typing import Any

from lightning.pytorch.loggers import MLFlowLogger

from project.infra.errors import UserError
from project.infra.redact import scrub


class MlflowLogger(MLFlowLogger):
    def __init__(self, worker: Any, directory: Path) -> None:
        self.worker, self.directory = worker, directory
        self.uri = worker.uri

    def open_run(self, experiment: str, run_name: str, tags: dict[str, str], previous: dict | None) -> None:
        run_id = previous.get("run_id") if previous and previous.get("tracking_uri") == scrub(self.uri) else None
        super().__init__(experiment_name=experiment, run_name=run_name, tracking_uri=self.uri, tags=tags,
                         artifact_location=self.worker.artifacts, run_id=run_id, synchronous=False)  # fmt: skip
        try:
            _ = self.experiment
        except Exception as error:
            raise UserError(
                f"MLflow at {scrub(self.uri)} cannot be used ({str(error).splitlines()[0][:200]})"
            ) from error

    def mark_running(self) -> None:
        self.experiment.update_run(self.run_id, status="RUNNING")

    def log_hyperparams(self, params: Any) -> None:
        logged = self.experiment.get_run(self.run_id).data.params
        super().log_hyperparams({k: v for k, v in params.items() if k not in logged})

    def finalize(self, status: str = "success") -> None:
        pass  # the run's end is close()'s

    def log_model(self, checkpoint: Path) -> None:
        pass

    def log_files(self, paths: list[Path]) -> None:
        for path in paths:
            self.experiment.log_artifact(self.run_id, str(path))

    def close(self, status: str, timeout: float) -> str | None:
        import mlflow

        mlflow.flush_async_logging()
        self.experiment.set_terminated(self.run_id, status)
        return None

    def abandon(self) -> None:
        pass

    def describe(self) -> dict[str, Any]:
        return {"tracking_uri": scrub(self.uri), "experiment_id": self.experiment_id, "run_id": self.run_id,
                "complete": True}  # fmt: skip

    def how_to_open(self) -> str:
        page = f"#/experiments/{self.experiment_id}/runs/{self.run_id}"
        if self.uri.startswith("sqlite:"):
            return f"mlflow ui --backend-store-uri {scrub(self.uri)}   then open http://127.0.0.1:5000/{page}"
        return f"{scrub(self.uri).rstrip('/')}/{page}"
