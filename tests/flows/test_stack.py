"""`tuneloop up --background` starts the whole local stack, `tuneloop down` stops every process of it.

Twice: on the embedded stores, and with `--stores postgres+s3` (its own PostgreSQL and S3 endpoint).
"""

from __future__ import annotations

import re
import subprocess
import tempfile
from pathlib import Path

import httpx
import psutil
import pytest
import sqlalchemy
from prefect.client.orchestration import get_client
from prefect.settings import PREFECT_API_URL, temporary_settings

from serving.model_server import free_port
from tests.engines import require_postgres
from tests.support import VENV_BIN

pytestmark = pytest.mark.slow


@pytest.mark.parametrize("stores", ["env", "postgres+s3"])
def test_up_in_the_background_then_down(stores, flow_project, module_env, monkeypatch):
    ports = {name: free_port() for name in ("mlflow", "prefect", "dev", "prod", "postgres", "s3")}
    monkeypatch.setenv("TUNELOOP_MLFLOW_PORT", str(ports["mlflow"]))
    monkeypatch.setenv("TUNELOOP_PREFECT_PORT", str(ports["prefect"]))
    monkeypatch.setenv("TUNELOOP_DEV_URL", f"http://127.0.0.1:{ports['dev']}")
    monkeypatch.setenv("TUNELOOP_PROD_URL", f"http://127.0.0.1:{ports['prod']}")
    monkeypatch.setenv("TUNELOOP_POSTGRES_PORT", str(ports["postgres"]))
    monkeypatch.setenv("TUNELOOP_S3_PORT", str(ports["s3"]))
    monkeypatch.setenv("TUNELOOP_WORK_POOL", "stack-test-pool")
    home = module_env / "home"
    if stores == "postgres+s3":
        require_postgres()
        # A home the `postgres` system user can reach (pytest's tmp folders are closed to it).
        home = Path(tempfile.mkdtemp(prefix="tuneloop-stack-"))
        home.chmod(0o755)
        monkeypatch.setenv("TUNELOOP_HOME", str(home))

    up = subprocess.run(
        [str(VENV_BIN / "tuneloop"), "up", "--background", "--stores", stores],
        cwd=flow_project,
        capture_output=True,
        text=True,
    )
    log = (home / "logs" / "up.log").read_text()
    pids = {name: int(pid) for name, pid in re.findall(r"started (\S+) \(pid (\d+)\)", log)}
    try:
        assert up.returncode == 0, up.stdout + up.stderr + log
        assert f"MLflow UI      http://127.0.0.1:{ports['mlflow']}" in up.stdout
        assert f"Prefect UI     http://127.0.0.1:{ports['prefect']}" in up.stdout
        services = {"mlflow", "prefect", "worker", "serve-dev", "serve-prod"}
        if stores == "postgres+s3":
            services |= {"postgres", "s3"}
            assert f"PostgreSQL postgresql://postgres@127.0.0.1:{ports['postgres']}" in up.stdout
            assert f"S3 s3://tuneloop at http://127.0.0.1:{ports['s3']}" in up.stdout
            assert not (home / "mlflow.db").exists() and not (home / "mlartifacts").exists()
        assert set(pids) == services
        assert "deployments registered" in log
        mlflow_url = f"http://127.0.0.1:{ports['mlflow']}"
        assert httpx.get(f"{mlflow_url}/health", timeout=5).status_code == 200
        # MLflow runs with authentication and the promotion rules; each service has its own identity.
        search = f"{mlflow_url}/api/2.0/mlflow/experiments/search?max_results=1"
        assert httpx.get(search, timeout=5).status_code == 401
        secrets = home / "secrets"
        admin = ("admin", (secrets / "mlflow-admin.password").read_text())
        assert httpx.get(search, auth=admin, timeout=5).status_code == 200
        for identity, role in (("tuneloop-deployer", "deployer"), ("tuneloop-trainer", "trainer")):
            roles = httpx.get(
                f"{mlflow_url}/api/3.0/mlflow/users/roles/list", params={"username": identity}, auth=admin
            )
            assert roles.status_code == 200 and f"tuneloop-{role}" in roles.text, roles.text
            assert (secrets / f"{identity}.password").stat().st_mode & 0o077 == 0
        api = f"http://127.0.0.1:{ports['prefect']}/api"
        with temporary_settings(updates={PREFECT_API_URL: api}), get_client(sync_client=True) as client:
            names = {d.name for d in client.read_deployments()}
            pool = client.read_work_pool("stack-test-pool")
        assert {"nightly", "poll"} <= names and pool.type == "process"
        if stores == "postgres+s3":
            # MLflow's runs, users and Prefect's deployments are rows in the stack's PostgreSQL.
            server = f"postgresql://postgres@127.0.0.1:{ports['postgres']}"
            counts = {}
            for database, table in (
                ("mlflow_auth", "users"),
                ("prefect", "deployment"),
                ("mlflow", "experiments"),
            ):
                engine = sqlalchemy.create_engine(f"{server}/{database}")
                with engine.connect() as connection:
                    counts[table] = connection.execute(
                        sqlalchemy.text(f"SELECT count(*) FROM {table}")
                    ).scalar()
                engine.dispose()
            assert counts["users"] >= 4 and counts["deployment"] >= 2 and counts["experiments"] >= 1, counts
        assert all(psutil.pid_exists(pid) for pid in pids.values()), log
    finally:
        down = subprocess.run(
            [str(VENV_BIN / "tuneloop"), "down"], cwd=flow_project, capture_output=True, text=True
        )
    assert down.returncode == 0, down.stdout + down.stderr
    gone, alive = psutil.wait_procs([psutil.Process(p) for p in pids.values() if psutil.pid_exists(p)], 10)
    assert not alive, f"still running after down: {alive}"
    assert not (home / "stack.pid").exists()
    with pytest.raises(httpx.HTTPError):
        httpx.get(f"http://127.0.0.1:{ports['mlflow']}/health", timeout=2)
