"""The continuous-training flow under `prefect_test_harness`, on a real project with the tiny model.

Real DVC (repo, local remote, stages), real training, a real MLflow registry on SQLite, a real
(temporary) Prefect server for states, retries, concurrency limits and artifacts. The tests share one
project and run in order: a full run first, then runs that find the DVC cache warm.
"""

from __future__ import annotations

import logging
import os
import shutil
import threading
from pathlib import Path

import mlflow
import pandas as pd
import pytest
import yaml
from mlflow.tracking import MlflowClient
from prefect.client.orchestration import get_client
from prefect.client.schemas.filters import (
    ArtifactFilter,
    ArtifactFilterKey,
    FlowRunFilter,
    FlowRunFilterId,
)

from flows.continuous_training import ARTIFACT_KEY, continuous_training
from monitoring.monitor import recorded_held_out_answers
from tuneloop.config import Environment
from tuneloop.io import file_md5

pytestmark = pytest.mark.slow


def task_runs_of(flow_run_id) -> list:
    with get_client(sync_client=True) as client:
        return client.read_task_runs(flow_run_filter=FlowRunFilter(id=FlowRunFilterId(any_=[flow_run_id])))


def registry(project: Path) -> MlflowClient:
    mlflow.set_tracking_uri(Environment.from_env(project).tracking_uri)
    return MlflowClient()


def test_a_full_run_ends_with_a_new_dev_version(flow_project, prefect_harness):
    state = continuous_training(project_dir=str(flow_project), reason="manual", return_state=True)

    assert state.is_completed(), state.message
    summary = state.result()
    print(f"full run: {summary['duration_s']:.1f} s, stages {summary['stages']}")
    assert summary["stages"] == {"prepare": True, "validate": True, "train": True, "evaluate": True}
    registration = summary["registration"]
    assert registration["new_version"] and registration["promoted_to_dev"]
    # Nothing process-global names a registry: a later flow or child process registers where it tracks.
    assert mlflow.get_registry_uri() == mlflow.get_tracking_uri()
    assert "MLFLOW_REGISTRY_URI" not in os.environ
    client = registry(flow_project)
    dev = client.get_model_version_by_alias(registration["name"], "dev")
    assert str(dev.version) == registration["version"] == "1"
    assert dev.run_id == registration["run_id"]
    assert "Evaluation card" in dev.tags["tuneloop.evaluation_card"]
    assert "evaluate:" in Path(client.download_artifacts(dev.run_id, "lineage/dvc.lock")).read_text()
    # The drift job's frozen reference: the version's answers on every held-out split, recorded now.
    held_out = recorded_held_out_answers(f"models:/{registration['name']}/1", mlflow.get_tracking_uri())
    prepared = flow_project / "data" / "prepared"
    expected_rows = sum(len(pd.read_parquet(prepared / f"{split}.parquet")) for split in ("val", "test"))
    assert held_out is not None and len(held_out) == expected_rows
    assert set(held_out["split"]) == {"val", "test"} and held_out["score"].between(0, 1).all()

    names = {run.name for run in task_runs_of(state.state_details.flow_run_id)}
    assert {"prepare", "validate", "train", "evaluate"} <= names
    with get_client(sync_client=True) as prefect:
        artifacts = prefect.read_artifacts(
            artifact_filter=ArtifactFilter(key=ArtifactFilterKey(any_=[ARTIFACT_KEY]))
        )
    assert artifacts, "each run publishes its summary artifact"
    markdown = artifacts[-1].data
    assert f"`{registration['name']}` v{dev.version} is `dev`" in markdown
    assert "quality/accuracy" in markdown and "min_accuracy" in markdown and dev.run_id in markdown


def test_a_pull_that_fails_once_is_retried_and_the_run_succeeds(flow_project, prefect_harness, module_env):
    """A fresh checkout (no data, no DVC cache) whose remote is unreachable on the first attempt."""
    raw = flow_project / "data/raw/intents.csv"
    md5 = file_md5(raw)
    raw.unlink()
    shutil.rmtree(flow_project / ".dvc/cache")
    remote = module_env / "remote"
    offline = remote.with_name("remote-offline")
    remote.rename(offline)

    retries_seen: list[str] = []

    class RemoteComesBack(logging.Handler):
        """When Prefect announces the retry, the remote comes back (a mount or network recovering)."""

        def emit(self, record: logging.LogRecord) -> None:
            message = record.getMessage()
            if "Retry 1/" in message and not retries_seen:
                retries_seen.append(message)
                offline.rename(remote)

    watcher = RemoteComesBack()
    task_logger = logging.getLogger("prefect.task_runs")
    task_logger.addHandler(watcher)
    try:
        state = continuous_training(project_dir=str(flow_project), return_state=True)
    finally:
        task_logger.removeHandler(watcher)
        if offline.exists():
            offline.rename(remote)

    assert retries_seen, "the first pull must have failed and been scheduled for a retry"
    assert "dvc" in retries_seen[0] and "pull" in retries_seen[0]
    assert state.is_completed(), state.message
    assert file_md5(raw) == md5
    pulls = [run for run in task_runs_of(state.state_details.flow_run_id) if run.name.startswith("pull-data")]
    assert len(pulls) == 1 and pulls[0].run_count == 2 and pulls[0].state.is_completed()
    print(f"pull attempts: {pulls[0].run_count}; first failure: {retries_seen[0][:200]}")


def test_two_runs_started_together_run_one_after_the_other(flow_project, prefect_harness):
    """One run re-evaluates (a params override), the other is plain; they must not overlap in time."""
    states: dict[str, object] = {}

    def start(label: str, overrides: dict | None) -> None:
        states[label] = continuous_training(
            project_dir=str(flow_project), params_overrides=overrides, reason=label, return_state=True
        )

    threads = [
        threading.Thread(target=start, args=("reevaluate", {"evaluate": {"batch_size": 64}})),
        threading.Thread(target=start, args=("plain", None)),
    ]
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join(timeout=600)

    windows = {}
    for label, state in states.items():
        assert state.is_completed(), (label, state.message)
        runs = task_runs_of(state.state_details.flow_run_id)
        windows[label] = (min(r.start_time for r in runs), max(r.end_time for r in runs))
        print(f"{label}: tasks from {windows[label][0]:%H:%M:%S.%f} to {windows[label][1]:%H:%M:%S.%f}")
    (first_start, first_end), (second_start, second_end) = sorted(windows.values())
    assert first_end <= second_start, f"the runs overlapped: {windows}"
    assert yaml.safe_load((flow_project / "params.yaml").read_text())["evaluate"]["batch_size"] == 64
    # Whichever ran first, `evaluate` ran once (its params changed) and nothing else did.
    ran = [stage for state in states.values() for stage, did in state.result()["stages"].items() if did]
    assert ran == ["evaluate"]


def test_a_bad_params_override_fails_the_run_and_changes_nothing(flow_project, prefect_harness):
    before = (flow_project / "params.yaml").read_text()
    state = continuous_training(
        project_dir=str(flow_project), params_overrides={"train": {"lora_rank": 0}}, return_state=True
    )
    assert state.is_failed()
    assert "lora_rank" in str(state.message) or "lora_rank" in repr(state.result(raise_on_failure=False))
    assert (flow_project / "params.yaml").read_text() == before
