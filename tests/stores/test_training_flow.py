"""The continuous-training flow on the shared stores a team runs, every engine real, on loopback.

Prefect's server on PostgreSQL, MLflow's tracking server on PostgreSQL with its artifacts in S3 (moto)
behind the server's proxy, the DVC remote in the same bucket. The project's data is pushed to S3 by
`tuneloop init`; the local copy and DVC cache are then deleted, so the flow can only train on what it
pulls back from S3. The run must end with a `dev` version whose rows are in PostgreSQL and whose files
are in S3.
"""

from __future__ import annotations

import json
import os
import shutil
import signal
import subprocess
import time
from collections.abc import Iterator
from pathlib import Path

import boto3
import pytest
import sqlalchemy
from mlflow.tracking import MlflowClient

from tests.support import VENV_BIN, make_project, prefect_server_at, venv_env, wait_for
from tuneloop.local_engines import free_port
from tuneloop.stores import PREFECT_DATABASE, SharedStores, ensure_bucket, ensure_databases

pytestmark = pytest.mark.slow

BUCKET_PREFIX = "team"


def _server(command: list[str], environment: dict[str, str], health_url: str, log: Path):
    with open(log, "wb") as log_file:
        process = subprocess.Popen(
            command, env=environment, stdout=log_file, stderr=subprocess.STDOUT, start_new_session=True
        )
    wait_for(health_url, process, 120)
    return process


def _stop(process: subprocess.Popen) -> None:
    os.killpg(process.pid, signal.SIGTERM)
    process.wait(timeout=30)


@pytest.fixture(scope="module")
def shared_stack(postgres_server, s3_server, tmp_path_factory, tiny_base) -> Iterator[dict]:
    """Prefect and MLflow servers on PostgreSQL + S3, and a project whose environment names those stores."""
    base = tmp_path_factory.mktemp("shared-stack")
    bucket_url = f"s3://flows-test/{BUCKET_PREFIX}"
    stores = SharedStores(postgres_server.url, bucket_url, s3_server.endpoint_url, database_prefix="flows_")
    ensure_databases(stores)
    ensure_bucket(stores)
    prefect_port, mlflow_port = free_port(), free_port()
    server_env = venv_env(
        **stores.server_environment(),
        PREFECT_HOME=str(base / "prefect-home"),
        PREFECT_SERVER_ANALYTICS_ENABLED="false",
    )
    prefect = _server(
        [str(VENV_BIN / "prefect"), "server", "start", "--host", "127.0.0.1", "--port", str(prefect_port)],
        server_env,
        f"http://127.0.0.1:{prefect_port}/api/health",
        base / "prefect.log",
    )
    mlflow_server = _server(
        [
            str(VENV_BIN / "mlflow"),
            "server",
            "--workers",
            "1",
            "--backend-store-uri",
            str(stores.mlflow_backend_store_uri),
            "--artifacts-destination",
            str(stores.mlflow_artifacts_destination),
            "--host",
            "127.0.0.1",
            "--port",
            str(mlflow_port),
        ],
        server_env,
        f"http://127.0.0.1:{mlflow_port}/health",
        base / "mlflow.log",
    )
    tracking_uri = f"http://127.0.0.1:{mlflow_port}"
    try:
        with pytest.MonkeyPatch.context() as patch:
            # The one switch a team sets: everything else (log, DVC remote) follows from these.
            patch.setenv("TUNELOOP_DATABASE_URL", postgres_server.url)
            patch.setenv("TUNELOOP_DATABASE_PREFIX", "flows_")
            patch.setenv("TUNELOOP_S3_URL", str(stores.s3_url))
            patch.setenv("TUNELOOP_S3_ENDPOINT_URL", str(stores.s3_endpoint_url))
            patch.delenv("TUNELOOP_DVC_REMOTE", raising=False)
            patch.setenv("MLFLOW_TRACKING_URI", tracking_uri)
            patch.setenv("TUNELOOP_HOME", str(base / "home"))
            patch.setenv("DVC_NO_ANALYTICS", "1")
            patch.setenv("PATH", f"{VENV_BIN}:{os.environ['PATH']}")
            project = make_project(base / "project", tiny_base)
            with prefect_server_at(f"http://127.0.0.1:{prefect_port}/api"):
                yield {"stores": stores, "project": project, "tracking_uri": tracking_uri}
    finally:
        _stop(mlflow_server)
        _stop(prefect)


def s3_keys(stores: SharedStores, prefix: str) -> list[str]:
    client = boto3.client("s3", endpoint_url=stores.s3_endpoint_url)
    pages = client.get_paginator("list_objects_v2").paginate(
        Bucket=stores.bucket, Prefix=f"{BUCKET_PREFIX}/{prefix}/"
    )
    return [item["Key"] for page in pages for item in page.get("Contents", [])]


def row_counts(url: str, tables: tuple[str, ...]) -> dict[str, int]:
    engine = sqlalchemy.create_engine(url)
    with engine.connect() as connection:
        counts = {
            table: connection.execute(sqlalchemy.text(f"SELECT count(*) FROM {table}")).scalar()
            for table in tables
        }
    engine.dispose()
    return {table: int(count or 0) for table, count in counts.items()}


def prefect_row_counts(url: str, min_task_runs: int, timeout_s: float = 120) -> dict[str, int]:
    """Prefect 3 records task runs from their events, after the flow has returned: on a loaded
    machine the rows were not there yet when read at once."""
    deadline = time.monotonic() + timeout_s
    while True:
        counts = row_counts(url, ("flow_run", "task_run", "log", "artifact"))
        if counts["task_run"] >= min_task_runs or time.monotonic() > deadline:
            return counts
        time.sleep(2)


def test_a_training_flow_pulls_from_s3_and_registers_to_dev_on_postgres(shared_stack) -> None:
    from flows.continuous_training import continuous_training

    stores, project = shared_stack["stores"], shared_stack["project"]
    assert "endpointurl" in (project / ".dvc/config.local").read_text()
    pushed_by_init = s3_keys(stores, "dvc")
    assert pushed_by_init, "tuneloop init pushed the data to the S3 remote"
    # Only S3 holds the data now: the flow must pull it.
    (project / "data/raw/intents.csv").unlink()
    shutil.rmtree(project / ".dvc/cache")

    state = continuous_training(project_dir=str(project), reason="manual", return_state=True)

    assert state.is_completed(), state.message
    summary = state.result()
    assert (project / "data/raw/intents.csv").exists()
    registration = summary["registration"]
    assert registration["promoted_to_dev"], registration
    client = MlflowClient(shared_stack["tracking_uri"])
    dev = client.get_model_version_by_alias(registration["name"], "dev")
    assert str(dev.version) == registration["version"]
    # The model's files went through the server's proxy into S3; the stage outputs into the DVC remote.
    artifacts = s3_keys(stores, "mlartifacts")
    assert any(key.endswith("/MLmodel") for key in artifacts)
    pushed_after = s3_keys(stores, "dvc")
    assert len(pushed_after) > len(pushed_by_init), "the flow pushed its stage outputs"
    counts = {
        **row_counts(str(stores.mlflow_backend_store_uri), ("runs", "metrics", "model_versions")),
        **prefect_row_counts(str(stores.database(PREFECT_DATABASE)), min_task_runs=7),
        "s3_mlflow_objects": len(artifacts),
        "s3_dvc_objects": len(pushed_after),
        "flow_seconds": round(summary["duration_s"], 1),
    }
    print(json.dumps(counts, indent=2))
    assert counts["model_versions"] >= 1 and counts["runs"] >= 1
    assert counts["flow_run"] >= 1 and counts["task_run"] >= 7
    # Nothing fell back to the embedded stores.
    home = project.parent / "home"
    assert not (home / "mlflow.db").exists() and not (home / "dvc-remote").exists()
