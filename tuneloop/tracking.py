"""MLflow wiring shared by the stage adapters: experiment set-up, lineage tags, run hand-over."""

from __future__ import annotations

import logging
import os
import subprocess
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path
from typing import Any

import mlflow
from mlflow.entities.model_registry import ModelVersion
from mlflow.exceptions import MlflowException
from mlflow.tracking import MlflowClient

from tuneloop.config import Environment

log = logging.getLogger(__name__)

CREDENTIAL_VARIABLES = ("MLFLOW_TRACKING_USERNAME", "MLFLOW_TRACKING_PASSWORD")


@contextmanager
def acting_as(username: str, password: str) -> Iterator[None]:
    """Act as another MLflow identity for a while: MLflow's client reads these two variables per request."""
    saved = {key: os.environ.get(key) for key in CREDENTIAL_VARIABLES}
    os.environ.update(zip(CREDENTIAL_VARIABLES, (username, password), strict=True))
    try:
        yield
    finally:
        for key, value in saved.items():
            if value is None:
                os.environ.pop(key, None)
            else:
                os.environ[key] = value


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


def pipeline_outputs(project_dir: Path) -> tuple[str, ...] | None:
    """Paths (project-relative, POSIX) that the DVC pipeline writes itself, None when unknown.

    The outputs, metrics and plots of every stage of every ``dvc.yaml`` (as DVC resolves them,
    templating included) and each ``dvc.yaml``'s ``dvc.lock``. Pointer files (``*.dvc``) are not
    among them: they name the input data. A project without a DVC pipeline has none.
    """
    project = Path(project_dir).resolve()
    if not (project / ".dvc").is_dir():
        return ()
    from dvc.exceptions import DvcException
    from dvc.repo import Repo
    from dvc.stage import PipelineStage

    paths: set[str] = set()
    try:
        with Repo(str(project)) as repo:
            for stage in repo.index.stages:
                if not isinstance(stage, PipelineStage):
                    continue
                lock = Path(stage.dvcfile.path).with_name("dvc.lock")
                paths.add(lock.resolve().relative_to(project).as_posix())
                for out in stage.outs:
                    paths.add(Path(out.fs_path).resolve().relative_to(project).as_posix())
    except (DvcException, OSError, ValueError) as error:
        # A broken dvc.yaml (or an output outside the project) must not break lineage: count everything.
        log.warning(
            "could not list the DVC pipeline's outputs in %s (%s): every change counts", project, error
        )
        return None
    return tuple(sorted(paths))


def changed_tracked_files(project_dir: Path) -> list[str]:
    """Tracked files (project-relative) whose content differs from HEAD, staged or not."""
    project = Path(project_dir).resolve()
    prefix = _git(project, "rev-parse", "--show-prefix").strip()
    status = _git(project, "status", "--porcelain=v1", "-z", "--untracked-files=no", "--no-renames")
    changed = []
    for entry in status.split("\0"):
        if len(entry) > 3:
            path = entry[3:]  # "XY path", relative to the repository's top level
            if path.startswith(prefix):
                changed.append(path[len(prefix) :])
            else:
                changed.append("../" * prefix.count("/") + path)
    return changed


def _git(cwd: Path, *args: str) -> str:
    return subprocess.run(["git", *args], cwd=cwd, capture_output=True, text=True, check=True).stdout


def _is_output(path: str, outputs: tuple[str, ...]) -> bool:
    return any(path == out or path.startswith(out + "/") for out in outputs)


def git_commit(project_dir: Path) -> str:
    """The commit the run's inputs are at; with '-dirty' when a tracked input differs from it.

    Inputs are the files git tracks (code, params.yaml, the data's ``.dvc`` pointers, ...), except
    what the DVC pipeline writes as its own outputs (stage outs, metrics, plots, ``dvc.lock``, see
    :func:`pipeline_outputs`): a training run rewrites those while it runs, from the inputs, so their
    change says nothing about what the run was trained from. Untracked files are not inputs either.
    """
    try:
        commit = _git(project_dir, "rev-parse", "HEAD").strip()
        changed = changed_tracked_files(project_dir)
    except (OSError, subprocess.CalledProcessError):
        return "unknown"
    if changed:
        outputs = pipeline_outputs(project_dir) or ()
        changed = [path for path in changed if not _is_output(path, outputs)]
    if changed:
        log.info("lineage of %s is dirty: %s", project_dir, ", ".join(changed[:10]))
    return f"{commit}-dirty" if changed else commit


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
