"""The whole loop once, on the tiny model, asserting every hand-off.

train + register v1 (`continuous-training` flow) -> approve, promote v1 to `prod` -> drifted traffic
answered by `prod`, with feedback that says the model was wrong (concept drift) -> `monitor-drift`
flow -> the feedback is a new DVC data version, pushed, its pointer alone committed to git -> the flow
starts `continuous-training/nightly` on that commit -> a Prefect Runner serving that deployment (in a
background thread, as `prefect.serve` would; the run itself in a subprocess) executes it -> v2 is
registered, reaches `dev`, and records the data commit as its clean lineage.

Real git, DVC (local remote), MLflow (SQLite), Prefect (a temporary server) and inference log; nothing
mocked. Every wait has a deadline, and the runner is stopped whatever happens.
"""

from __future__ import annotations

import asyncio
import datetime as dt
import os
import threading
import time
from pathlib import Path

import mlflow
import pandas as pd
import pytest
import yaml
from mlflow.tracking import MlflowClient

from tests.support import REPO_ROOT, VENV_BIN, git, make_project
from tuneloop.config import Environment, load_params
from tuneloop.datastore import tracked_md5

pytestmark = [pytest.mark.slow, pytest.mark.timeout(1500)]

RAW_POINTER = "data/raw/intents.csv.dvc"
DEPLOYMENT = "continuous-training/nightly"
TRAINING_DEADLINE_S = 900


@pytest.fixture(scope="module")
def loop_env(tmp_path_factory):
    """TUNELOOP_HOME, the DVC remote and MLflow's store in a temp folder; a temporary Prefect server."""
    from prefect.testing.utilities import prefect_test_harness

    base = tmp_path_factory.mktemp("loop")
    with pytest.MonkeyPatch.context() as patch:
        patch.setenv("TUNELOOP_HOME", str(base / "home"))
        patch.setenv("TUNELOOP_DVC_REMOTE", str(base / "remote"))
        patch.delenv("MLFLOW_TRACKING_URI", raising=False)
        patch.delenv("TUNELOOP_INFERENCE_LOG_URL", raising=False)
        patch.setenv("DVC_NO_ANALYTICS", "1")
        patch.setenv("PATH", f"{VENV_BIN}:{__import__('os').environ['PATH']}")
        patch.setenv("PREFECT_SERVER_ANALYTICS_ENABLED", "false")
        with prefect_test_harness(server_startup_timeout=60):
            yield base


def loop_settings(project: Path) -> None:
    """Small windows and a quick bootstrap; settings for a near-chance model, committed.

    The tiny model's accuracy is about 1/15, barely above the default smallest drop that counts
    (`min_accuracy_drop` 0.05): 0.01 keeps the concept test about significance, not about the tiny
    model's luck. The champion/challenger test could call a near-chance v2 a significant regression
    against a near-chance v1; model quality is not what this test is about (make_project relaxes the
    gates for the same reason), so only an astronomically significant regression would block it.
    """
    params_path = project / "params.yaml"
    params = yaml.safe_load(params_path.read_text())
    params["monitoring"].update(
        window_size=200, bootstrap_samples=200, min_labelled_examples=50, min_accuracy_drop=0.01
    )
    params["registry"]["significance_level"] = 1e-12
    params_path.write_text(yaml.safe_dump(params, sort_keys=False))
    git(project, "-c", "user.name=t", "-c", "user.email=t@t", "commit", "-qam", "whole-loop settings")


class ServedDeployment:
    """`continuous-training/nightly` served by a Prefect Runner in a background thread.

    What `prefect.serve` does, minus its signal handling (only possible in the main thread): the
    runner polls the server for scheduled runs of its deployment and executes each in a subprocess.
    """

    def __init__(self, project: Path):
        from prefect.runner import Runner

        from flows.continuous_training import continuous_training

        self.runner = Runner(name="whole-loop", query_seconds=1, pause_on_shutdown=False)
        # The deployment's default project folder: the runs train the project copy, never the repo.
        self.runner.add_deployment(
            continuous_training.to_deployment(name="nightly", parameters={"project_dir": str(project)})
        )
        self.loop = asyncio.new_event_loop()
        self.thread = threading.Thread(
            target=self.loop.run_until_complete, args=(self.runner.start(),), daemon=True
        )

    def __enter__(self) -> ServedDeployment:
        from prefect.client.orchestration import get_client
        from prefect.exceptions import ObjectNotFound

        self.thread.start()
        deadline = time.monotonic() + 60
        with get_client(sync_client=True) as client:
            while True:
                try:
                    client.read_deployment_by_name(DEPLOYMENT)
                    break
                except ObjectNotFound:
                    if time.monotonic() > deadline or not self.thread.is_alive():
                        raise TimeoutError(f"the runner did not register {DEPLOYMENT}") from None
                    time.sleep(0.5)
        return self

    def __exit__(self, *exc) -> None:
        if self.runner.started:
            asyncio.run_coroutine_threadsafe(self.runner.astop(), self.loop).result(timeout=60)
        self.thread.join(timeout=60)


def wait_for_flow_run(flow_run_id: str, seconds: float):
    from prefect.client.orchestration import get_client

    deadline = time.monotonic() + seconds
    with get_client(sync_client=True) as client:
        while True:
            run = client.read_flow_run(flow_run_id)
            if run.state is not None and run.state.is_final():
                return run
            if time.monotonic() > deadline:
                raise TimeoutError(f"flow run {flow_run_id} still {run.state} after {seconds:.0f} s")
            time.sleep(2)


def log_drifted_traffic(env: Environment, name: str, version: str, labels: tuple[str, ...]) -> pd.DataFrame:
    """200 drifted texts answered by `prod`, each with feedback naming another label than predicted.

    The tiny model is near chance, so the drifted batch's own labels would not measurably lower its
    accuracy; feedback that says every answer was wrong is concept drift (P(label | text) moved) at
    any accuracy. The feedback labels cycle through ``labels`` so that no class swells.
    """
    from monitoring.monitor import registry_predictor
    from serving.inference_log import FeedbackRecord, InferenceLogWriter, PredictionRecord

    drifted = pd.read_csv(REPO_ROOT / "data/sample/drifted.csv").sample(n=200, random_state=0)
    predicted = registry_predictor(f"models:/{name}@prod", env.tracking_uri)(drifted["text"].tolist())
    # Loading from a named registry leaves none behind for this process or its children.
    assert "MLFLOW_REGISTRY_URI" not in os.environ
    start = dt.datetime.now(dt.UTC) - dt.timedelta(minutes=30)
    records, feedback = [], []
    for i, (text, label, score) in enumerate(
        zip(drifted["text"], predicted["label"], predicted["score"], strict=True)
    ):
        record = PredictionRecord(
            f"req-{i}", 0, start + dt.timedelta(seconds=i), name, version, text, label, float(score), 4.0
        )
        wrong = labels[i % len(labels)]
        if wrong == label:
            wrong = labels[(i + 1) % len(labels)]
        records.append(record)
        feedback.append(FeedbackRecord(record.request_id, 0, wrong, record.created_at))
    writer = InferenceLogWriter(env.inference_log_url).start()
    assert writer.submit(records) and writer.submit(feedback)
    writer.close()
    return predicted


def test_drift_appends_commits_and_retrains_to_a_clean_dev_version(loop_env, tiny_base, monkeypatch):
    from flows.continuous_training import continuous_training
    from flows.monitor_drift import monitor_drift
    from registry.promote import promote

    started = time.monotonic()
    marks: dict[str, float] = {}

    def mark(step: str) -> None:
        marks[step] = time.monotonic() - started
        print(f"[{marks[step]:6.1f} s] {step}")

    (loop_env / "project").mkdir()
    project = make_project(loop_env / "project", tiny_base)
    monkeypatch.chdir(project)  # the monitor flow reads params.yaml and data/prepared from here
    loop_settings(project)
    params = load_params(project / "params.yaml")
    env = Environment.from_env(project)
    name = params.registry.model_name
    mark("project ready")

    # 1. train + register v1; it is `dev` and its lineage is the commit it was trained at.
    first = continuous_training(project_dir=str(project), reason="manual", return_state=True)
    assert first.is_completed(), first.message
    v1 = first.result()["registration"]
    assert v1["version"] == "1" and v1["new_version"] and v1["promoted_to_dev"], v1
    mlflow.set_tracking_uri(env.tracking_uri)
    client = MlflowClient()
    assert (
        client.get_model_version(name, "1").tags["tuneloop.git_commit"]
        == git(project, "rev-parse", "HEAD").strip()
    )
    # A real project commits what the pipeline wrote (this repository tracks them too); the next
    # training rewrites these files, which must not make its lineage dirty.
    git(project, "add", "dvc.lock", "metrics", "plots")
    git(project, "-c", "user.name=t", "-c", "user.email=t@t", "commit", "-qm", "pipeline outputs of v1")
    outputs_commit = git(project, "rev-parse", "HEAD").strip()
    mark("v1 trained and registered")

    # 2. a reviewer approves v1; it becomes `prod`.
    client.set_model_version_tag(name, "1", "approval", "approved")
    promote(
        client,
        name,
        env.paths.registry_audit,
        to="prod",
        version="1",
        actor="whole-loop test",
        reason="first prod",
        gate_thresholds=params.evaluate.gates.model_dump(),
    )
    assert str(client.get_model_version_by_alias(name, "prod").version) == "1"

    # 3. drifted traffic answered by prod, with feedback.
    log_drifted_traffic(env, name, "1", params.data.labels)
    md5_before = tracked_md5(project / RAW_POINTER)
    raw_rows_before = len(pd.read_csv(project / params.data.raw_path))
    mark("prod v1 answered 200 drifted requests with feedback")

    with ServedDeployment(project):
        mark("continuous-training/nightly served by a runner")
        # 4. the drift job: concept drift, feedback appended and committed, training started.
        result = monitor_drift()
        mark("monitor-drift finished")

        summary, decision, appended = result["summary"], result["decision"], result["appended"]
        accuracy = summary["concept_drift"]["tests"]["accuracy"]
        print(f"accuracy on feedback {accuracy['current']:.3f} vs reference {accuracy['reference']:.3f}")
        assert summary["model_version"] == "1" and summary["concept_drift"]["detected"], summary[
            "concept_drift"
        ]
        assert decision["retrain"], decision["reasons"]
        assert any(reason.startswith("concept drift") for reason in decision["reasons"])

        # the new data version: appended, tracked, pushed
        md5_after = tracked_md5(project / RAW_POINTER)
        assert appended["md5_before"] == md5_before != md5_after == appended["md5"]
        assert len(pd.read_csv(project / params.data.raw_path)) == raw_rows_before + appended["rows_added"]
        assert appended["rows_added"] >= params.monitoring.min_labelled_examples
        assert (Path(env.dvc_remote_url) / "files/md5" / md5_after[:2] / md5_after[2:]).exists()

        # ... committed: HEAD is the data commit, on top of what was there, and changes the pointer only
        data_commit = appended["data_commit"]
        assert data_commit == git(project, "rev-parse", "HEAD").strip()
        assert appended["data_branch"] == git(project, "symbolic-ref", "--short", "HEAD").strip()
        assert git(project, "rev-parse", "HEAD~1").strip() == outputs_commit
        assert git(project, "diff-tree", "--no-commit-id", "--name-only", "-r", "HEAD").split() == [
            RAW_POINTER
        ]
        subject = git(project, "log", "-1", "--format=%s").strip()
        assert subject == (
            f"drift monitor appended {appended['rows_added']} labelled feedback rows "
            f"({'; '.join(decision['reasons'])}) -> data md5 {md5_after}"
        )
        print(git(project, "log", "-1", "--stat"))
        assert git(project, "status", "--porcelain", "--untracked-files=no") == ""
        monitoring_run = client.get_run(result["mlflow_run_id"])
        assert monitoring_run.data.tags["tuneloop.data_commit"] == data_commit

        # ... and the training deployment started on that commit
        assert result["training_data_rev"] == data_commit
        # 5. the runner executes the triggered run: v2 trained on the appended data, registered, `dev`.
        run = wait_for_flow_run(result["training_flow_run_id"], TRAINING_DEADLINE_S)
        mark(f"triggered training finished: {run.state.name}")
        # The data version travels as its pointer too: a worker elsewhere lacks the commit, not the data.
        assert run.parameters == {
            "project_dir": str(project),
            "reason": "drift",
            "data_rev": data_commit,
            "data_pointers": {RAW_POINTER: git(project, "show", f"{data_commit}:{RAW_POINTER}")},
        }
        assert run.state.is_completed(), run.state.message
        training = run.state.result()

    assert training["reason"] == "drift" and training["data_rev"] == data_commit
    assert training["stages"] == {"prepare": True, "validate": True, "train": True, "evaluate": True}
    v2 = training["registration"]
    assert v2["version"] == "2" and v2["new_version"] and v2["promoted_to_dev"], v2
    dev = client.get_model_version_by_alias(name, "dev")
    assert str(dev.version) == "2" and str(client.get_model_version_by_alias(name, "prod").version) == "1"
    # Lineage: the data commit itself, not `-dirty`, although the run rewrote tracked outputs.
    assert dev.tags["tuneloop.git_commit"] == data_commit
    assert client.get_run(dev.run_id).data.tags["tuneloop.git_commit"] == data_commit
    assert dev.tags["tuneloop.data_md5"] == md5_after
    rewritten = git(project, "status", "--porcelain", "--untracked-files=no").split()
    assert "dvc.lock" in rewritten and RAW_POINTER not in rewritten
    mark("v2 is dev with lineage = the data commit")
    print("hand-offs:", ", ".join(f"{step} @ {at:.0f} s" for step, at in marks.items()))
