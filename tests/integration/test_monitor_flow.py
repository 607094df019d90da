"""The `monitor-drift` flow end to end on a real Prefect server, a real inference log and DVC.

Drifted, labelled traffic (predicted by the tiny adapter) goes through the gateway's log writer
(SQLite, or PostgreSQL with the DVC remote on S3: the test runs on both);
the flow detects drift, appends the feedback as a new DVC data version (pushed to the remote, its
pointer committed to git), logs to MLflow, writes the Prometheus summary, publishes the alert
artifact, and starts a run of the `continuous-training/nightly` deployment on that commit. A second
run right after is held by the cool-down.
"""

from __future__ import annotations

import datetime as dt
import json
from pathlib import Path

import mlflow
import pandas as pd
import pytest
import yaml
from mlflow.tracking import MlflowClient

from monitoring.monitor import MONITORING_EXPERIMENT, adapter_predictor
from pipelines.prepare import prepare, write_prepared
from pipelines.train import train
from tests.support import REPO_ROOT, git, settings
from tuneloop.config import Environment, ModelParams, load_params
from tuneloop.datastore import init_project, tracked_md5
from tuneloop.stores import SharedStores, ensure_bucket, ensure_databases

RAW_POINTER = "data/raw/intents.csv.dvc"


@pytest.fixture(scope="module")
def prefect_server():
    from prefect.testing.utilities import prefect_test_harness

    with prefect_test_harness(server_startup_timeout=60):
        yield


def configure(project: Path) -> None:
    """Small windows, a quick bootstrap, and data drift allowed to retrain (the tiny model is near chance)."""
    params_path = project / "params.yaml"
    params = yaml.safe_load(params_path.read_text())
    params["monitoring"].update(
        window_size=200, bootstrap_samples=200, retrain_on_data_drift=True, min_labelled_examples=50
    )
    params_path.write_text(yaml.safe_dump(params, sort_keys=False))


def log_drifted_traffic(db_url: str, adapter: Path, drifted: pd.DataFrame, first_id: int) -> None:
    from serving.inference_log import FeedbackRecord, InferenceLogWriter, PredictionRecord

    predicted = adapter_predictor(adapter)(drifted["text"].tolist())
    start = dt.datetime.now(dt.UTC) - dt.timedelta(minutes=30)
    writer = InferenceLogWriter(db_url).start()
    records = [
        PredictionRecord(
            f"req-{first_id + i}",
            0,
            start + dt.timedelta(seconds=i),
            "tuneloop-intent",
            "3",
            text,
            label,
            score,
            4.0,
        )
        for i, (text, label, score) in enumerate(
            zip(drifted["text"], predicted["label"], predicted["score"], strict=True)
        )
    ]
    assert writer.submit(records)
    assert writer.submit(
        [
            FeedbackRecord(r.request_id, 0, intent, r.created_at)
            for r, intent in zip(records, drifted["intent"], strict=True)
        ]
    )
    writer.close()


@pytest.fixture(params=["embedded", "postgres+s3"])
def stores(request, project, monkeypatch) -> SharedStores | None:
    """The embedded log and folder remote, or the inference log on PostgreSQL and the DVC remote on S3."""
    if request.param == "embedded":
        return None
    postgres, s3 = request.getfixturevalue("postgres_server"), request.getfixturevalue("s3_server")
    shared = SharedStores(postgres.url, "s3://drift-test/team", s3.endpoint_url, database_prefix="drift_")
    ensure_databases(shared)
    ensure_bucket(shared)
    monkeypatch.setenv("TUNELOOP_DATABASE_URL", postgres.url)
    monkeypatch.setenv("TUNELOOP_DATABASE_PREFIX", shared.database_prefix)
    monkeypatch.setenv("TUNELOOP_S3_URL", str(shared.s3_url))
    monkeypatch.setenv("TUNELOOP_S3_ENDPOINT_URL", s3.endpoint_url)
    monkeypatch.delenv("TUNELOOP_DVC_REMOTE")
    return shared


def in_remote(env: Environment, md5: str) -> bool:
    """Whether DVC's remote (a folder, or S3) holds the object with this md5."""
    key = f"files/md5/{md5[:2]}/{md5[2:]}"
    if not env.dvc_remote_url.startswith("s3://"):
        return (Path(env.dvc_remote_url) / key).exists()
    import boto3

    bucket, _, prefix = env.dvc_remote_url.removeprefix("s3://").partition("/")
    listed = boto3.client("s3", endpoint_url=env.s3_endpoint_url).list_objects_v2(
        Bucket=bucket, Prefix=f"{prefix}/{key}"
    )
    return listed["KeyCount"] == 1


@pytest.mark.slow
def test_flow_detects_appends_versions_logs_alerts_and_triggers_training(
    project, stores, tiny_base, prefect_server
):
    from prefect.client.orchestration import get_client
    from prefect.client.schemas.filters import ArtifactFilter, ArtifactFilterKey

    from flows.continuous_training import continuous_training
    from flows.monitor_drift import ALERT_ARTIFACT_KEY, monitor_drift

    configure(project)
    params = load_params(project / "params.yaml")
    env = Environment.from_env(project)
    if stores is not None:
        assert env.inference_log_url == stores.inference_log_url
        assert env.dvc_remote_url == stores.dvc_remote_url
    init_project(
        project,
        project / "data/sample/intents.csv",
        Path(params.data.raw_path),
        env.dvc_remote_url,
        remote_endpoint_url=env.s3_endpoint_url,
    )
    md5_before = tracked_md5(project / RAW_POINTER)
    raw_rows_before = len(pd.read_csv(project / params.data.raw_path))
    prepared = project / "data/prepared"
    write_prepared(
        prepare(project / params.data.raw_path, params.data, params.prepare),
        project / params.data.raw_path,
        prepared,
    )
    adapter = project / "models/adapter"
    train(
        pd.read_parquet(prepared / "train.parquet"),
        pd.read_parquet(prepared / "val.parquet"),
        params.data.labels,
        ModelParams(base=str(tiny_base)),
        settings("train", epochs=1, batch_size=64, max_length=32, device="cpu"),
        adapter,
    )
    assert monitor_drift(adapter_dir=str(adapter)) == {"skipped": "not enough traffic", "n_current": 0}
    drifted = pd.read_csv(REPO_ROOT / "data/sample/drifted.csv").sample(frac=1, random_state=0)
    log_drifted_traffic(env.inference_log_url, adapter, drifted.iloc[:200], first_id=0)
    continuous_training.to_deployment(name="nightly").apply()

    result = monitor_drift(adapter_dir=str(adapter))

    assert result["summary"]["data_drift"]["detected"]
    assert result["summary"]["model_version"] == "3"
    assert result["decision"]["retrain"], result["decision"]["reasons"]
    appended = result["appended"]
    raw_after = pd.read_csv(project / params.data.raw_path)
    assert appended["rows_added"] > 50 and len(raw_after) == raw_rows_before + appended["rows_added"]
    assert set(raw_after["channel"].iloc[raw_rows_before:]) == {params.monitoring.feedback_group_value}
    md5_after = tracked_md5(project / RAW_POINTER)
    assert md5_after == appended["md5"] != md5_before
    assert in_remote(env, md5_after)
    # The pointer, and only it, is committed; the training is started on that commit.
    data_commit = appended["data_commit"]
    assert data_commit == git(project, "rev-parse", "HEAD").strip()
    assert git(project, "diff-tree", "--no-commit-id", "--name-only", "-r", "HEAD").split() == [RAW_POINTER]
    assert git(project, "log", "-1", "--format=%s").startswith(
        f"drift monitor appended {appended['rows_added']} labelled feedback rows ("
    )
    assert result["training_data_rev"] == data_commit

    with get_client(sync_client=True) as client:
        run = client.read_flow_run(result["training_flow_run_id"])
        # The pointer travels with the run: a worker in another pod lacks the commit, not the data.
        assert run.parameters == {
            "reason": "drift",
            "data_rev": data_commit,
            "data_pointers": {RAW_POINTER: (project / RAW_POINTER).read_text()},
        }
        alerts = client.read_artifacts(
            artifact_filter=ArtifactFilter(key=ArtifactFilterKey(any_=[ALERT_ARTIFACT_KEY]))
        )
        assert alerts and "Drift alert" in alerts[0].data

    latest = json.loads((env.home_dir / "monitoring/latest.json").read_text())
    assert latest["mlflow_run_id"] == result["mlflow_run_id"]
    mlflow.set_tracking_uri(env.tracking_uri)
    client = MlflowClient()
    experiment = client.get_experiment_by_name(MONITORING_EXPERIMENT)
    logged = {item.path for item in client.list_artifacts(result["mlflow_run_id"], "drift")}
    assert {"drift/text_drift.html", "drift/prediction_drift.html", "drift/summary.json"} <= logged
    monitoring_run = client.get_run(result["mlflow_run_id"])
    assert monitoring_run.info.experiment_id == experiment.experiment_id
    assert monitoring_run.data.tags["tuneloop.data_commit"] == data_commit
    assert monitoring_run.data.tags["tuneloop.decision"] == "retrain"

    # New labelled traffic right after the trigger: enough to retrain, but inside the cool-down.
    log_drifted_traffic(env.inference_log_url, adapter, drifted.iloc[200:], first_id=200)
    again = monitor_drift(adapter_dir=str(adapter))
    assert not again["decision"]["retrain"] and again["appended"] is None
    assert "cool-down" in again["decision"]["reasons"][-1]
    assert "training_flow_run_id" not in again
    assert tracked_md5(project / RAW_POINTER) == md5_after
    assert git(project, "rev-parse", "HEAD").strip() == data_commit
