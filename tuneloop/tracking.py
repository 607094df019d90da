"""MLflow wiring shared by the stage adapters: experiment set-up, lineage tags, run hand-over."""

from __future__ import annotations

import subprocess
from pathlib import Path
from typing import Any

import mlflow
from mlflow.entities.model_registry import ModelVersion
from mlflow.exceptions import MlflowException
from mlflow.tracking import MlflowClient

from tuneloop.config import Environment


def use_experiment(env: Environment) -> str:
    """Point MLflow at the configured store and make sure the experiment exists.

    The experiment is created with an explicit artifact folder inside TUNELOOP_HOME so that a
    SQLite-backed store keeps its artifacts beside it, not in whatever folder a stage runs in.
    """
    env.home_dir.mkdir(parents=True, exist_ok=True)
    mlflow.set_tracking_uri(env.tracking_uri)
    client = MlflowClient()
    experiment = client.get_experiment_by_name(env.experiment_name)
    if experiment is None:
        location = env.artifact_root.as_uri() if env.tracking_uri.startswith("sqlite") else None
        experiment_id = client.create_experiment(env.experiment_name, artifact_location=location)
    else:
        experiment_id = experiment.experiment_id
    mlflow.set_experiment(experiment_id=experiment_id)
    return experiment_id


def git_commit(project_dir: Path) -> str:
    """The commit the code ran at, with '-dirty' when the tree has uncommitted changes."""
    try:
        commit = subprocess.run(
            ["git", "rev-parse", "HEAD"], cwd=project_dir, capture_output=True, text=True, check=True
        ).stdout.strip()
        dirty = subprocess.run(
            ["git", "status", "--porcelain", "--untracked-files=no"],
            cwd=project_dir,
            capture_output=True,
            text=True,
            check=True,
        ).stdout.strip()
    except (OSError, subprocess.CalledProcessError):
        return "unknown"
    return f"{commit}-dirty" if dirty else commit


def flatten(prefix: str, values: dict[str, Any]) -> dict[str, Any]:
    """Flatten nested settings into MLflow param keys like ``train.lora_rank``."""
    flat: dict[str, Any] = {}
    for key, value in values.items():
        name = f"{prefix}.{key}" if prefix else key
        if isinstance(value, dict):
            flat.update(flatten(name, value))
        elif isinstance(value, list | tuple):
            flat[name] = ",".join(map(str, value))
        else:
            flat[name] = value
    return flat


def current_version(client: MlflowClient, name: str, alias: str) -> ModelVersion | None:
    """The version behind ``alias``, or None when the model or the alias does not exist."""
    try:
        return client.get_model_version_by_alias(name, alias)
    except MlflowException as error:
        if error.error_code in {"RESOURCE_DOES_NOT_EXIST", "INVALID_PARAMETER_VALUE"}:
            return None
        raise
