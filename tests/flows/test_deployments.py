"""prefect.yaml's deployments on a real Prefect server with a real process worker and MLflow server.

One Prefect server, one MLflow server and one project serve the whole module; the tests run in order:
deploy and run training, approve through MLflow's REST API and let the promotion flow move `prod`,
then kill the worker (with the run it was executing) in the middle of `train` and restart it.
"""

from __future__ import annotations

import json
import os
import subprocess
import time
from datetime import UTC, datetime
from pathlib import Path

import httpx
import mlflow
import psutil
import pytest
import yaml
from mlflow.tracking import MlflowClient
from prefect.client.orchestration import get_client
from prefect.client.schemas.filters import (
    DeploymentFilter,
    DeploymentFilterId,
    FlowRunFilter,
    FlowRunFilterId,
)
from prefect.client.schemas.objects import StateType
from prefect.deployments import run_deployment
from prefect.settings import PREFECT_API_URL, PREFECT_LOCAL_STORAGE_PATH, temporary_settings

from serving.model_server import free_port
from tests.support import VENV_BIN, wait_for
from tuneloop.paths import HomePaths

pytestmark = pytest.mark.slow

POOL = "tuneloop-test-pool"
TRAINING = "continuous-training/nightly"
PROMOTION = "promote-to-prod/poll"
RUN_TIMEOUT_S = 600


def stop(process: subprocess.Popen) -> None:
    """Stop a server started by these tests, with anything it started."""
    if process.poll() is None:
        try:
            children = psutil.Process(process.pid).children(recursive=True)
        except psutil.NoSuchProcess:
            children = []
        process.terminate()
        try:
            process.wait(timeout=20)
        except subprocess.TimeoutExpired:
            process.kill()
            process.wait()
        for child in children:
            if child.is_running():
                child.kill()


@pytest.fixture(scope="module")
def servers(module_env):
    """A Prefect server and an MLflow server (SQLite + local artifacts), started side by side."""
    prefect_port, mlflow_port = free_port(), free_port()
    logs = module_env / "logs"
    logs.mkdir()
    env = {
        **os.environ,
        "PREFECT_HOME": str(module_env / "prefect-home"),
        "PREFECT_SERVER_ANALYTICS_ENABLED": "false",
        "PREFECT_UI_ENABLED": "false",
    }
    prefect = subprocess.Popen(
        [str(VENV_BIN / "prefect"), "server", "start", "--host", "127.0.0.1", "--port", str(prefect_port)],
        env=env,
        stdout=open(logs / "prefect.log", "wb"),  # noqa: SIM115 - the server keeps it open
        stderr=subprocess.STDOUT,
    )
    store = module_env / "mlflow"
    store.mkdir()
    mlflow_server = subprocess.Popen(
        [
            str(VENV_BIN / "mlflow"),
            "server",
            "--backend-store-uri",
            f"sqlite:///{store / 'mlflow.db'}",
            "--artifacts-destination",
            str(store / "artifacts"),
            "--host",
            "127.0.0.1",
            "--port",
            str(mlflow_port),
        ],
        env=env,
        stdout=open(logs / "mlflow.log", "wb"),  # noqa: SIM115
        stderr=subprocess.STDOUT,
    )
    try:
        wait_for(f"http://127.0.0.1:{prefect_port}/api/health", prefect, 120)
        wait_for(f"http://127.0.0.1:{mlflow_port}/health", mlflow_server, 120)
        api = f"http://127.0.0.1:{prefect_port}/api"
        tracking = f"http://127.0.0.1:{mlflow_port}"
        with pytest.MonkeyPatch.context() as patch:
            patch.setenv("PREFECT_API_URL", api)
            patch.setenv("MLFLOW_TRACKING_URI", tracking)
            patch.setenv("TUNELOOP_WORK_POOL", POOL)
            # Workers poll every 10 s by default; these tests would mostly wait.
            patch.setenv("PREFECT_WORKER_QUERY_SECONDS", "2")
            # Flow results (read back with `state.result()`) go to the module's folder, not ~/.prefect.
            results = module_env / "prefect-results"
            patch.setenv("PREFECT_LOCAL_STORAGE_PATH", str(results))
            with temporary_settings(updates={PREFECT_API_URL: api, PREFECT_LOCAL_STORAGE_PATH: results}):
                yield {"api": api, "tracking": tracking, "logs": logs}
    finally:
        stop(prefect)
        stop(mlflow_server)


class Worker:
    """`tuneloop worker` as a subprocess; `kill_with_its_runs` is what a machine dying does to it."""

    def __init__(self, project: Path, logs: Path):
        self.project, self.logs, self.starts = project, logs, 0
        self.process: subprocess.Popen | None = None

    def start(self) -> None:
        self.starts += 1
        self.process = subprocess.Popen(
            [str(VENV_BIN / "tuneloop"), "worker", "--name", f"test-worker-{self.starts}"],
            cwd=self.project,
            stdout=open(self.logs / f"worker-{self.starts}.log", "wb"),  # noqa: SIM115
            stderr=subprocess.STDOUT,
        )

    def kill_with_its_runs(self) -> list[str]:
        """SIGKILL the worker and every process under it (flow run, DVC, the training)."""
        root = psutil.Process(self.process.pid)
        victims = [*root.children(recursive=True), root]
        names = [" ".join(p.cmdline()[:4]) for p in victims]
        for proc in victims:
            proc.kill()
        psutil.wait_procs(victims, timeout=10)
        self.process.wait()
        return names

    def stop(self) -> None:
        if self.process is not None:
            stop(self.process)


@pytest.fixture(scope="module")
def deployed(servers, flow_project):
    """`tuneloop deploy` in the project, then a worker on the pool."""
    result = subprocess.run(
        [str(VENV_BIN / "tuneloop"), "deploy"], cwd=flow_project, capture_output=True, text=True
    )
    assert result.returncode == 0, result.stdout[-3000:] + result.stderr[-3000:]
    worker = Worker(flow_project, servers["logs"])
    worker.start()
    yield {"worker": worker, "deploy_output": result.stdout + result.stderr}
    worker.stop()


def registry() -> MlflowClient:
    mlflow.set_tracking_uri(os.environ["MLFLOW_TRACKING_URI"])
    return MlflowClient()


def wait_for_run(flow_run_id, seconds: float = RUN_TIMEOUT_S):
    deadline = time.monotonic() + seconds
    with get_client(sync_client=True) as client:
        while time.monotonic() < deadline:
            run = client.read_flow_run(flow_run_id)
            if run.state is not None and run.state.is_final():
                return run
            time.sleep(1)
    raise TimeoutError(f"flow run {flow_run_id} did not finish within {seconds}s")


def test_deploy_registers_the_deployments_with_their_schedules_and_a_triggered_run_completes(
    deployed, flow_project
):
    declared = yaml.safe_load((flow_project / "prefect.yaml").read_text())["deployments"]
    with get_client(sync_client=True) as client:
        deployments = {f"{client.read_flow(d.flow_id).name}/{d.name}": d for d in client.read_deployments()}
        limit = client.read_global_concurrency_limit_by_name("continuous-training")
    assert {TRAINING, PROMOTION} <= set(deployments)
    assert len(deployments) == len(declared)
    for spec in declared:
        deployment = next(d for d in deployments.values() if d.name == spec["name"])
        assert deployment.work_pool_name == POOL
        assert [s.schedule.cron for s in deployment.schedules] == [c["cron"] for c in spec["schedules"]]
        assert all(s.active for s in deployment.schedules)
    assert deployments[TRAINING].parameters == {"reason": "schedule"}
    assert limit.limit == 1 and limit.active
    # A 02:00 UTC training or the hourly drift check must not interleave with the runs counted below.
    with get_client(sync_client=True) as client:
        for name, deployment in deployments.items():
            if name != PROMOTION:
                client.pause_deployment(deployment.id)

    started = time.monotonic()
    flow_run = run_deployment(TRAINING, parameters={"reason": "manual"}, timeout=RUN_TIMEOUT_S)
    print(f"deployment run of {TRAINING}: {time.monotonic() - started:.1f} s")
    assert flow_run.state.is_completed(), flow_run.state.message
    summary = flow_run.state.result()
    assert summary["registration"]["promoted_to_dev"] and summary["registration"]["version"] == "1"
    assert str(registry().get_model_version_by_alias("tuneloop-intent", "dev").version) == "1"


def test_an_approval_set_through_the_mlflow_rest_api_is_promoted_to_prod_by_the_flow(
    deployed, servers, module_env
):
    answer = httpx.post(
        f"{servers['tracking']}/api/2.0/mlflow/model-versions/set-tag",
        json={"name": "tuneloop-intent", "version": "1", "key": "approval", "value": "approved"},
        timeout=10,
    )
    assert answer.status_code == 200, answer.text

    approved_at = datetime.now(UTC)

    # Nobody runs anything: the next scheduled poll (every two minutes) must find the approval.
    deadline = time.monotonic() + 150 + RUN_TIMEOUT_S
    with get_client(sync_client=True) as prefect:
        poll = prefect.read_deployment_by_name(PROMOTION)
        while time.monotonic() < deadline:
            scheduled = prefect.read_flow_runs(
                deployment_filter=DeploymentFilter(id=DeploymentFilterId(any_=[poll.id]))
            )
            after = [r for r in scheduled if r.auto_scheduled and r.start_time and r.start_time > approved_at]
            done = sorted((r for r in after if r.state.is_final()), key=lambda r: r.start_time)
            if done:
                break
            time.sleep(2)
        else:
            pytest.fail("no scheduled promote-to-prod/poll run started after the approval")
    waited = (datetime.now(UTC) - approved_at).total_seconds()
    print(f"approval reached prod through the scheduled poll {waited:.0f} s after it was set")
    assert done[0].state.is_completed(), done[0].state.message
    assert done[0].state.result()["promoted"] is True
    client = registry()
    assert str(client.get_model_version_by_alias("tuneloop-intent", "prod").version) == "1"
    audit = [
        json.loads(line) for line in (HomePaths(module_env / "home").registry_audit).read_text().splitlines()
    ]
    assert len(audit) == 1, audit
    assert audit[0]["action"] == "promote" and audit[0]["to_version"] == "1"
    assert audit[0]["alias"] == "prod" and audit[0]["actor"] == "prefect:promote-to-prod"
    assert json.loads(client.get_registered_model("tuneloop-intent").tags["audit.last"]) == audit[0]

    again = run_deployment(PROMOTION, timeout=RUN_TIMEOUT_S)
    assert again.state.is_completed() and again.state.result()["promoted"] is False


def test_a_run_killed_with_its_worker_during_train_is_rerun_to_completion(deployed):
    worker = deployed["worker"]
    client = registry()
    versions_before = {str(v.version) for v in client.search_model_versions("name = 'tuneloop-intent'")}
    queued = run_deployment(
        TRAINING, parameters={"reason": "manual", "params_overrides": {"train": {"seed": 11}}}, timeout=0
    )

    deadline = time.monotonic() + RUN_TIMEOUT_S
    with get_client(sync_client=True) as prefect:
        while time.monotonic() < deadline:
            tasks = prefect.read_task_runs(
                flow_run_filter=FlowRunFilter(id=FlowRunFilterId(any_=[queued.id]))
            )
            if any(t.name == "train" and t.state_type == StateType.RUNNING for t in tasks):
                break
            time.sleep(0.5)
        else:
            pytest.fail("train never started")
        time.sleep(3)  # let the training process get going
        killed = worker.kill_with_its_runs()
        killed_at = time.monotonic()
        print(f"killed {len(killed)} processes: {killed}")
        assert prefect.read_flow_run(queued.id).state_type == StateType.RUNNING, "left as a zombie"

        worker.start()
        restarted_at = time.monotonic()
        finished = wait_for_run(queued.id)
    done_at = time.monotonic()
    print(
        f"recovery: {done_at - killed_at:.1f} s from the kill to the completed run "
        f"({done_at - restarted_at:.1f} s after the worker restarted); run_count {finished.run_count}"
    )

    assert finished.state.is_completed(), finished.state.message
    assert finished.run_count >= 2
    versions = client.search_model_versions("name = 'tuneloop-intent'")
    new = [v for v in versions if str(v.version) not in versions_before]
    assert len(new) == 1, f"exactly one new version, got {[v.version for v in new]}"
    for version in versions:
        assert "Evaluation card" in version.tags.get("tuneloop.evaluation_card", ""), version.version
        run = client.get_run(version.run_id)
        assert "quality/accuracy" in run.data.metrics, f"v{version.version} has no evaluation"
    assert finished.state.result()["registration"]["version"] == str(new[0].version)
