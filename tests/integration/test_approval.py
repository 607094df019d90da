"""Approval that cannot be bypassed, against a real `mlflow server --app-name tuneloop` with authentication.

One server per store kind (users and roles made by `tuneloop users add` and the same function in
process), a tiny two-intent model registered twice by the trainer identity, the real promotion flow
under a Prefect test server, and a real gateway whose supervisor follows `prod` with real model servers.
Every test runs twice: on the embedded stores (SQLite, folders) and on the shared ones a team runs —
the registry and users on PostgreSQL, artifacts in S3 behind the server's proxy, the gateway's log on
PostgreSQL — with the same code.
"""

from __future__ import annotations

import json
import os
import signal
import subprocess
import time
from collections.abc import Iterator

import httpx
import mlflow
import pytest
import yaml
from fastapi.testclient import TestClient
from mlflow.server.auth.client import AuthServiceClient
from mlflow.tracking import MlflowClient

from registry.access import ADMIN_USERNAME, add_user, auth_server_command, auth_server_environment
from registry.register import metric_tags
from registry.server import audit_entries
from registry.server_rules import APPROVAL_RECORD, REGISTERED_BY, RUN_CREATED_BY, registry_vetter
from serving.auth import ApiKeyStore, Authenticator, create_api_key
from serving.gateway import create_app
from serving.inference_log import InferenceLogWriter, read_window
from serving.model_server import free_port, wait_until_ready
from serving.pyfunc_model import log_intent_model
from serving.routing import BackendPool
from serving.supervisor import AliasSupervisor, model_server_launcher, registry_version_resolver
from tests.support import (
    REPO_ROOT,
    TWO_LABELS,
    VENV_BIN,
    reversed_label_copy,
    settings,
    two_label_slice,
    venv_env,
    wait_for,
)
from tuneloop.config import load_params
from tuneloop.stores import SharedStores, ensure_bucket, ensure_databases
from tuneloop.tracking import acting_as

pytestmark = pytest.mark.slow

NAME = "tuneloop-approval-test"
EXPERIMENT = "approval-test"
ADMIN_PASSWORD = "admin-password-for-tests"
USERS = {
    "trainer": ["trainer"],
    "alice": ["approver"],
    "bob": ["trainer", "approver"],  # trains and approves: never their own work
    "deployer": ["deployer"],
    "gateway": ["viewer"],
}
PASSWORD = {user: f"{user}-password-for-tests" for user in USERS} | {ADMIN_USERNAME: ADMIN_PASSWORD}
PARAMS = load_params(REPO_ROOT / "params.yaml")
PASSING_METRICS = {
    "quality/accuracy": 0.95,
    "quality/macro_f1": 0.95,
    "quality/expected_calibration_error": 0.03,
    "bias/max_group_accuracy_gap": 0.02,
    "bias/counterfactual_flip_rate": 0.01,
    "bias/counterfactual_accuracy_gap": 0.01,
}


def identity(user: str):
    """Act as ``user`` (MLflow's client reads the credentials from the environment per request)."""
    return acting_as(user, PASSWORD[user])


def rest(server: dict, user: str, method: str, endpoint: str, body: dict) -> httpx.Response:
    """The REST call MLflow's client (``api``) or its UI (``ajax-api``) makes, as ``user``."""
    return httpx.request(
        method, f"{server['url']}/{endpoint}", json=body, auth=(user, PASSWORD[user]), timeout=30
    )


def set_tag(server: dict, user: str, version: str, key: str, value: str, api: str = "api") -> httpx.Response:
    body = {"name": NAME, "version": version, "key": key, "value": value}
    return rest(server, user, "POST", f"{api}/2.0/mlflow/model-versions/set-tag", body)


def move_alias(server: dict, user: str, alias: str, version: str) -> httpx.Response:
    body = {"name": NAME, "alias": alias, "version": version}
    return rest(server, user, "POST", "api/2.0/mlflow/registered-models/alias", body)


@pytest.fixture(scope="module", params=["embedded", "postgres+s3"])
def server(request, tmp_path_factory) -> Iterator[dict]:
    folder = tmp_path_factory.mktemp("auth-mlflow")
    port = free_port()
    url = f"http://127.0.0.1:{port}"
    if request.param == "postgres+s3":
        stores = SharedStores(
            request.getfixturevalue("postgres_server").url,
            "s3://approval-test/team",
            request.getfixturevalue("s3_server").endpoint_url,
            database_prefix="approval_",
        )
        ensure_databases(stores)
        ensure_bucket(stores)
        backend, artifacts = stores.mlflow_backend_store_uri, stores.mlflow_artifacts_destination
        users_db, log_url = stores.mlflow_auth_database_uri, stores.inference_log_url
    else:
        stores = None
        backend, artifacts = f"sqlite:///{folder / 'mlflow.db'}", str(folder / "artifacts")
        users_db, log_url = None, f"sqlite:///{folder / 'inference_log.db'}"
    assert backend and artifacts and log_url
    environment = venv_env(
        **auth_server_environment(folder, ADMIN_PASSWORD, "secret-key-for-tests", users_db),
        **(stores.s3_client_environment() if stores else {}),
    )
    with open(folder / "server.log", "wb") as log_file:
        process = subprocess.Popen(
            auth_server_command(str(VENV_BIN / "python"), backend, artifacts, port),
            env=environment,
            stdout=log_file,
            stderr=subprocess.STDOUT,
            start_new_session=True,
        )
    try:
        wait_for(f"{url}/health", process, 120)
        yield {
            "url": url,
            "folder": folder,
            "log": folder / "server.log",
            "stores": stores,
            "inference_log_url": log_url,
        }
    finally:
        os.killpg(process.pid, signal.SIGTERM)
        process.wait(timeout=30)


@pytest.fixture(scope="module")
def users(server) -> dict:
    """alice through `tuneloop users add` (password from a file), the others through the same function."""
    password_file = server["folder"] / "alice.password"
    password_file.write_text(PASSWORD["alice"])
    admin_env = {
        "MLFLOW_TRACKING_URI": server["url"],
        "MLFLOW_TRACKING_USERNAME": ADMIN_USERNAME,
        "MLFLOW_TRACKING_PASSWORD": ADMIN_PASSWORD,
    }
    added = subprocess.run(
        [
            str(VENV_BIN / "tuneloop"),
            "users",
            "add",
            "alice",
            "--role",
            "approver",
            "--password-file",
            str(password_file),
        ],
        cwd=REPO_ROOT,
        env=venv_env(**admin_env),
        capture_output=True,
        text=True,
    )
    assert added.returncode == 0, added.stderr
    assert "alice created; roles now: approver" in added.stdout
    with identity(ADMIN_USERNAME):
        client = AuthServiceClient(server["url"])
        for user, roles in USERS.items():
            if user != "alice":
                add_user(client, user, PASSWORD[user], roles)
    return USERS


@pytest.fixture(scope="module")
def versions(server, users, tiny_base, tiny_adapter, tmp_path_factory) -> dict:
    """v1 (works) and v2 (label map reversed) registered by `trainer`; v3 by `bob`, from his own run."""
    work = tmp_path_factory.mktemp("approval-work")
    good = tiny_adapter
    broken = reversed_label_copy(good, work / "reversed")
    mlflow.set_tracking_uri(server["url"])
    with identity("trainer"):
        client = MlflowClient(server["url"], server["url"])
        experiment = client.create_experiment(EXPERIMENT)
        client.create_registered_model(NAME)
        for adapter in (good, broken):
            with mlflow.start_run(experiment_id=experiment) as run:
                info = log_intent_model(adapter, str(tiny_base), settings("serving"))
                mlflow.log_metrics(PASSING_METRICS)
            tags = {"approval": "pending", "tuneloop.gates_passed": "true", "was_dev": "true"}
            version = client.create_model_version(
                NAME,
                info.model_uri,
                run.info.run_id,
                tags=tags | metric_tags(PASSING_METRICS),
                model_id=info.model_id,
            )
            client.set_registered_model_alias(NAME, "dev", version.version)
    with identity("bob"):
        client = MlflowClient(server["url"], server["url"])
        with mlflow.start_run(experiment_id=experiment) as run:
            mlflow.log_metrics(PASSING_METRICS)
        client.create_model_version(
            NAME, info.model_uri, run.info.run_id, tags={"approval": "pending"}, model_id=info.model_id
        )
    return {"experiment": experiment, "texts": two_label_slice()["text"].tolist()}


def test_the_server_records_who_registered_and_trained(server, versions) -> None:
    with identity("gateway"):
        client = MlflowClient(server["url"], server["url"])
        v1, v3 = client.get_model_version(NAME, "1"), client.get_model_version(NAME, "3")
    assert (v1.tags[REGISTERED_BY], v1.tags[RUN_CREATED_BY]) == ("trainer", "trainer")
    assert (v3.tags[REGISTERED_BY], v3.tags[RUN_CREATED_BY]) == ("bob", "bob")
    # Nobody can write those keys, not even the admin.
    forged = set_tag(server, ADMIN_USERNAME, "1", REGISTERED_BY, "someone-else")
    assert forged.status_code == 403
    assert "tracking server only" in forged.json()["message"]


def test_only_approve_then_promote_reaches_prod(
    server, versions, prefect_harness, tmp_path, monkeypatch
) -> None:
    refusals = {
        "trainer approves": set_tag(server, "trainer", "1", "approval", "approved"),
        "trainer moves prod": move_alias(server, "trainer", "prod", "1"),
        "bob approves his own v3": set_tag(server, "bob", "3", "approval", "approved"),
        "viewer approves": set_tag(server, "gateway", "1", "approval", "approved"),
        "deployer moves prod to unapproved v1": move_alias(server, "deployer", "prod", "1"),
        "trainer rolls back (drops previous-prod)": rest(
            server,
            "trainer",
            "DELETE",
            "api/2.0/mlflow/registered-models/alias",
            {"name": NAME, "alias": "previous-prod"},
        ),
    }
    report = {case: (r.status_code, r.text[:200]) for case, r in refusals.items()}
    print(json.dumps(report, indent=2))
    assert {case: status for case, (status, _) in report.items()} == dict.fromkeys(refusals, 403)
    assert "four eyes" in report["bob approves his own v3"][1]

    # The approver clicks "approved" in the UI: the same REST call the UI makes.
    approved = set_tag(server, "alice", "1", "approval", "approved", api="ajax-api")
    assert approved.status_code == 200, approved.text
    with identity("gateway"):
        record = json.loads(
            MlflowClient(server["url"], server["url"]).get_model_version(NAME, "1").tags[APPROVAL_RECORD]
        )
    assert record["decision"] == "approved" and record["by"] == "alice"
    assert record["run_metrics"]["quality/accuracy"] == pytest.approx(0.95)

    # The promotion flow, as the deployer identity, against the same server.
    from flows.promotion import promote_to_prod

    project = tmp_path / "project"
    project.mkdir()
    params = yaml.safe_load((REPO_ROOT / "params.yaml").read_text())
    params["registry"]["model_name"] = NAME
    (project / "params.yaml").write_text(yaml.safe_dump(params))
    monkeypatch.setenv("MLFLOW_TRACKING_URI", server["url"])
    monkeypatch.setenv("TUNELOOP_EXPERIMENT", EXPERIMENT)
    monkeypatch.setenv("TUNELOOP_HOME", str(tmp_path / "home"))
    # As on a `tuneloop up` worker: the process is the trainer, the flow acts as the deployer.
    password_file = tmp_path / "deployer.password"
    password_file.write_text(PASSWORD["deployer"])
    monkeypatch.setenv("TUNELOOP_DEPLOYER_USERNAME", "deployer")
    monkeypatch.setenv("TUNELOOP_DEPLOYER_PASSWORD_FILE", str(password_file))
    with identity("trainer"):
        result = promote_to_prod(project_dir=str(project))
        model_tags = MlflowClient(server["url"], server["url"]).get_registered_model(NAME).tags
    assert result["promoted"] is True and result["version"] == "1", result
    entry = audit_entries(model_tags)[-1]
    print(json.dumps(entry, indent=2))
    assert (entry["alias"], entry["version"], entry["by"], entry["approved_by"]) == (
        "prod",
        "1",
        "deployer",
        "alice",
    )
    assert entry["by_admin"] is False


def test_an_admin_move_to_an_unapproved_version_is_not_served(
    server, versions, tmp_path, monkeypatch
) -> None:
    """prod -> v1 (approved, promoted) is served; an admin then points prod at v2: v1 keeps serving."""
    with identity("gateway"):
        client = MlflowClient(server["url"], server["url"])
        if client.get_model_version_by_alias(NAME, "prod").version != "1":
            pytest.skip("needs the promotion of v1 from test_only_approve_then_promote_reaches_prod")
    for secret in ("TUNELOOP_JWT_KEY", "AWS_SECRET_ACCESS_KEY"):
        monkeypatch.setenv(secret, f"{secret.lower()}-value")
    keys = tmp_path / "keys.json"
    predict_key = create_api_key(keys, "client", ["predict"])
    admin_key = create_api_key(keys, "ops", ["admin"])
    serving_settings = settings("serving", poll_interval_s=0.5, start_timeout_s=180)
    gateway_settings = settings("gateway")
    # Half the key's rate limit: a 429 is not what this test is about. Unpaced, a fast machine sent
    # about 240 requests/s, the limiter refused most of them, and the log held only the rest.
    pace_s = 2 / gateway_settings.rate_limit_per_s
    pool = BackendPool(NAME, "prod")
    with identity("gateway"):
        supervisor = AliasSupervisor(
            pool,
            registry_version_resolver(server["url"], NAME, "prod"),
            model_server_launcher(server["url"], NAME, tmp_path / "serving", serving_settings),
            serving_settings,
            vet=registry_vetter(client, NAME, "prod", PARAMS.evaluate.gate_thresholds(PARAMS.task)),
        )
        app = create_app(
            pool,
            supervisor,
            authenticator=Authenticator(api_keys=ApiKeyStore(keys)),
            inference_log=InferenceLogWriter(server["inference_log_url"], flush_interval_s=0.05),
            labels=list(TWO_LABELS),
            settings=gateway_settings,
            default_top_k=1,
            upstream_timeout_s=30,
        )
        with TestClient(app) as gateway:
            deadline = time.monotonic() + 180
            while gateway.get("/readyz").status_code != 200:
                assert time.monotonic() < deadline, supervisor.describe()
                time.sleep(0.5)
            # The served process got none of the gateway's secrets and listens where it was started.
            served = pool.current
            assert served is not None and served.server is not None and served.server.owns_port()
            answers = []
            moved = move_alias(server, ADMIN_USERNAME, "prod", "2")
            assert moved.status_code == 200, moved.text
            until = time.monotonic() + 5
            while time.monotonic() < until:
                for text in versions["texts"][:4]:
                    response = gateway.post(
                        "/v1/predict", json={"text": text}, headers={"X-API-Key": predict_key}
                    )
                    answers.append((response.status_code, response.json().get("model_version")))
                    time.sleep(pace_s)
            status = gateway.get("/v1/status", headers={"X-API-Key": admin_key}).json()
            metrics = gateway.get("/metrics", headers={"X-API-Key": admin_key}).text
    logged = read_window(server["inference_log_url"])
    assert len(logged) == len(answers) and set(logged["model_version"]) == {"1"}
    failed = [a for a in answers if a[0] != 200]
    print(
        json.dumps({"requests": len(answers), "failed": len(failed), "status": status}, indent=2, default=str)
    )
    assert answers and not failed
    assert {version for _, version in answers} == {"1"}
    assert status["serving_version"] == "1"
    assert status["refused"]["version"] == "2"
    assert any("no server-recorded approval" in reason for reason in status["refused"]["reasons"])
    refused_lines = [line for line in metrics.splitlines() if line.startswith("tuneloop_serving_refused{")]
    assert refused_lines and 'model_version="2"' in refused_lines[0] and refused_lines[0].endswith(" 1.0")
    with identity("gateway"):
        entry = audit_entries(client.get_registered_model(NAME).tags)[-1]
    assert (entry["version"], entry["by"], entry["by_admin"], entry["approved_by"]) == (
        "2",
        ADMIN_USERNAME,
        True,
        None,
    )


ENV_MODEL = '''
import json
import os

import mlflow


class EnvironmentModel(mlflow.pyfunc.PythonModel):
    """Answers each row with the environment variables its server process sees."""

    def predict(self, context, model_input, params=None):
        seen = json.dumps(dict(os.environ))
        return [{"label": "environment", "environment": seen} for _ in range(len(model_input))]


mlflow.models.set_model(EnvironmentModel())
'''


def test_model_code_sees_none_of_the_gateway_secrets(server, users, versions, tmp_path, monkeypatch) -> None:
    secrets = {
        "TUNELOOP_JWT_KEY": "jwt-signing-key-value",
        "TUNELOOP_API_KEY": "tl_api_key_value",
        "TUNELOOP_INFERENCE_LOG_URL": "postgresql://logger:db-password@127.0.0.1/log",
        "DATABASE_URL": "postgresql://app:db-password@127.0.0.1/app",
        "AWS_ACCESS_KEY_ID": "AKIAEXAMPLE",
        "AWS_SECRET_ACCESS_KEY": "aws-secret-value",
    }
    for key, value in secrets.items():
        monkeypatch.setenv(key, value)
    script = tmp_path / "environment_model.py"
    script.write_text(ENV_MODEL)
    name = f"{NAME}-environment"
    with identity("trainer"):
        client = MlflowClient(server["url"], server["url"])
        with mlflow.start_run(experiment_id=versions["experiment"]) as run:
            info = mlflow.pyfunc.log_model(
                name="model", python_model=str(script), pip_requirements=["mlflow"]
            )
        client.create_registered_model(name)
        client.create_model_version(name, info.model_uri, run.info.run_id, model_id=info.model_id)
    with identity("gateway"):
        launch = model_server_launcher(server["url"], name, tmp_path / "serving", settings("serving"))
        model_server = launch("1")
    try:
        wait_until_ready(model_server, 120)
        answer = httpx.post(
            f"{model_server.url}/invocations",
            json={"dataframe_split": {"columns": ["text"], "data": [["hi"]]}},
        ).json()
        seen = json.loads(answer["predictions"][0]["environment"])
    finally:
        model_server.stop()
    forbidden = set(secrets) | {"MLFLOW_TRACKING_URI", "MLFLOW_TRACKING_USERNAME", "MLFLOW_TRACKING_PASSWORD"}
    leaked_names = sorted(forbidden & set(seen))
    leaked_values = sorted(k for k, v in seen.items() if v in set(secrets.values()) | {PASSWORD["gateway"]})
    print(json.dumps({"variables_seen": sorted(seen), "leaked": leaked_names + leaked_values}, indent=2))
    assert leaked_names == [] and leaked_values == []
    assert "PATH" in seen


def test_the_shared_stores_hold_the_registry_and_the_artifacts(server, versions) -> None:
    """On PostgreSQL + S3 nothing lands in local files: rows in the databases, objects in the bucket."""
    stores = server["stores"]
    if stores is None:
        pytest.skip("the embedded stores are files by design")
    import boto3
    import sqlalchemy

    counts = {}
    for database, tables in {
        stores.mlflow_backend_store_uri: ("registered_models", "model_versions", "runs", "metrics"),
        stores.mlflow_auth_database_uri: ("users",),
        stores.inference_log_url: ("predictions",),
    }.items():
        engine = sqlalchemy.create_engine(database)
        with engine.connect() as connection:
            for table in tables:
                counts[table] = connection.execute(sqlalchemy.text(f"SELECT count(*) FROM {table}")).scalar()
        engine.dispose()
    objects = boto3.client("s3", endpoint_url=stores.s3_endpoint_url).list_objects_v2(
        Bucket=stores.bucket, Prefix="team/mlartifacts/"
    )
    counts["s3_objects"] = objects["KeyCount"]
    print(json.dumps(counts, indent=2))
    assert counts["registered_models"] >= 1 and counts["model_versions"] >= 3 and counts["users"] >= 6
    # Each logged model is its MLmodel, the pyfunc's code/environment files and the adapter + base files.
    assert counts["s3_objects"] >= 10
    assert not (server["folder"] / "artifacts").exists() and not (server["folder"] / "mlflow.db").exists()
