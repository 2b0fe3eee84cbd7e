"""A registered stand-in for a trained model, for tests that need a version in the registry but not its answers."""
from __future__ import annotations

import mlflow

from medplib.registry import Registry, use_tracking


class EchoModel(mlflow.pyfunc.PythonModel):
    """Answers each question with itself: enough for MLflow to log, register and load."""

    def predict(self, context, model_input: list[str], params=None) -> list[str]:
        return list(model_input)


def register_stand_in(registry: Registry, data_version: str) -> str:
    """Log an EchoModel in the registry's experiment and register it with lineage `data_version`; its version."""
    with use_tracking(registry.cfg), mlflow.start_run(experiment_id=registry.experiment_id()) as run:
        mlflow.pyfunc.log_model(name="model", python_model=EchoModel(), pip_requirements=[])
    return registry.register(run.info.run_id, "model", git_commit="test", data_version=data_version,
                             config_digest="test")
