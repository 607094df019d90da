"""`tuneloop demo` on a fresh project: the whole loop as a story, the stack left running, `tuneloop down`.

The default MiniLM base with a short training (the tiny random model sits at chance, where feedback
cannot show a drop in accuracy): real concept drift on the drifted sample, detected by the drift job
with its default tests. Every part is real: `tuneloop up`'s MLflow with authentication, Prefect server
and worker, gateways and model servers; the retraining runs on the stack's worker.
"""

from __future__ import annotations

import re
import subprocess
from pathlib import Path

import httpx
import pandas as pd
import pytest
import yaml
from mlflow.tracking import MlflowClient

from registry.server_rules import VersionRecord
from serving.model_server import free_port
from tests.support import GATES_ANY_MODEL_PASSES, REPO_ROOT, VENV_BIN, copy_repo_as_project, git
from tuneloop.datastore import tracked_md5
from tuneloop.tracking import acting_as

pytestmark = [pytest.mark.slow, pytest.mark.timeout(2400)]

RAW_POINTER = "data/raw/intents.csv.dvc"
MODEL_NAME = yaml.safe_load((REPO_ROOT / "params.yaml").read_text())["registry"]["model_name"]
STEPS = (
    "stop the previous demo's stack",
    "workspace: clone + sample data in DVC",
    "stack: MLflow (auth) + Prefect + worker + gateways",
    "people: reviewer `demo-reviewer`, an API key for traffic",
    "train + evaluate + register v1 (continuous-training flow, as trainer)",
    "approve v1 as `demo-reviewer` (neither trained nor registered it)",
    "promote v1 to prod (as `tuneloop-deployer`)",
    "serve v1: the prod gateway swaps to it",
    "stable traffic (intents-test.csv)",
    "drift check on stable traffic (monitor-drift flow)",
    "drifted traffic with feedback (drifted.csv)",
    "drift check on drifted traffic: feedback -> data version -> training",
    "v2 trained + registered by the stack's worker",
    "approve v2 as `demo-reviewer` (neither trained nor registered it)",
    "promote v2 to prod (as `tuneloop-deployer`)",
    "hot swap v1 -> v2 under 20 req/s",
    "rollback to v1 (as `tuneloop-deployer`)",
)


def short_demo(params: dict) -> None:
    """The default base, trained briefly; small windows; gates and the champion test out of the way."""
    params["model"]["base"] = yaml.safe_load((REPO_ROOT / "params.yaml").read_text())["model"]["base"]
    params["train"].update(epochs=2, max_train_examples=400, max_length=32)
    params["evaluate"]["counterfactual"]["max_examples"] = 20
    params["evaluate"]["gates"] = dict(GATES_ANY_MODEL_PASSES)
    # The story is about the hand-offs: a v2 trained this briefly must not be held back as a regression.
    params["registry"]["significance_level"] = 1e-12
    params["monitoring"].update(window_size=300, bootstrap_samples=200)
    params["demo"] = {"stable_requests": 120, "drifted_requests": 300, "request_rate_per_s": 20}


@pytest.fixture
def checkout(tmp_path, monkeypatch) -> Path:
    """A committed project on free ports; its tuneloop home is the default `.tuneloop/` inside it."""
    for variable in ("TUNELOOP_HOME", "TUNELOOP_DVC_REMOTE", "MLFLOW_TRACKING_URI", "PREFECT_API_URL"):
        monkeypatch.delenv(variable, raising=False)
    ports = {name: free_port() for name in ("mlflow", "prefect", "dev", "prod")}
    monkeypatch.setenv("TUNELOOP_MLFLOW_PORT", str(ports["mlflow"]))
    monkeypatch.setenv("TUNELOOP_PREFECT_PORT", str(ports["prefect"]))
    monkeypatch.setenv("TUNELOOP_DEV_URL", f"http://127.0.0.1:{ports['dev']}")
    monkeypatch.setenv("TUNELOOP_PROD_URL", f"http://127.0.0.1:{ports['prod']}")
    monkeypatch.setenv("TUNELOOP_WORK_POOL", "demo-test-pool")
    monkeypatch.setenv("DVC_NO_ANALYTICS", "1")
    root = copy_repo_as_project(tmp_path / "checkout", Path("unused"), short_demo)
    rotate_drifted_labels(root / "data" / "sample" / "drifted.csv")
    git(root, "-c", "user.name=t", "-c", "user.email=t@t", "commit", "-qam", "a concept drift to miss none")
    return root


def rotate_drifted_labels(path: Path) -> None:
    """Every drifted utterance labelled with the next intent: P(label | text) moved for all of them.

    A model trained this briefly loses only ~5 points on the shipped drifted batch, which the drift
    job's default tests cannot tell from chance on 300 labels (how much power they have is another
    matter); this keeps the test about the hand-offs of the story, each real.
    """
    frame = pd.read_csv(path)
    intents = sorted(frame["intent"].unique())
    following = dict(zip(intents, intents[1:] + intents[:1], strict=True))
    frame["intent"] = frame["intent"].map(following)
    frame.to_csv(path, index=False)


def test_the_demo_tells_the_whole_loop_and_leaves_the_uis_running(checkout):
    tuneloop = str(VENV_BIN / "tuneloop")
    demo = subprocess.run([tuneloop, "demo"], cwd=checkout, capture_output=True, text=True, timeout=2000)
    print(demo.stdout[-6000:])
    try:
        assert demo.returncode == 0, demo.stdout[-8000:] + demo.stderr[-4000:]
        assert "the demo ran end to end" in demo.stdout
        rows = re.findall(r"^\| +\d+ \| (.+?) +\| +([\d.]+)s \| (.*)$", demo.stdout, flags=re.MULTILINE)
        assert [name for name, _, _ in rows] == list(STEPS)
        outcomes = {name: outcome for name, _, outcome in rows}
        assert all(float(seconds) >= 0 for _, seconds, _ in rows)
        assert re.search(r"total [\d.]+ s", demo.stdout)

        # The numbers a newcomer reads: accuracy, drift decisions, swaps without a failed request.
        assert re.search(r"v1 registered, dev; accuracy 0\.\d+", outcomes[STEPS[4]])
        # Stable traffic retrains nothing (a data-drift alert alone may happen: it only alerts).
        assert "accuracy" in outcomes[STEPS[9]] and "retrained anyway" not in outcomes[STEPS[9]]
        assert "concept drift" in outcomes[STEPS[11]] and "feedback rows appended" in outcomes[STEPS[11]]
        assert re.search(r"v2 is dev: accuracy 0\.\d+", outcomes[STEPS[12]])
        for swap in (STEPS[15], STEPS[16]):
            assert re.search(r"\d+ requests, 0 failed", outcomes[swap]), outcomes[swap]
        assert "answered by v1: " in outcomes[STEPS[15]] and "v2: " in outcomes[STEPS[15]]
        assert "prod v2 -> v1" in outcomes[STEPS[16]]
        assert "MISSING" not in demo.stdout + demo.stderr
        assert "Traceback" not in demo.stdout + demo.stderr

        # Left running, as the ending says.
        ports = {
            name: re.search(rf"{label} +http://127\.0\.0\.1:(\d+)", demo.stdout)
            for name, label in (
                ("mlflow", "MLflow UI"),
                ("prefect", "Prefect UI"),
                ("prod", "gateway prod docs"),
            )
        }
        assert all(ports.values()), demo.stdout[-3000:]
        assert httpx.get(f"http://127.0.0.1:{ports['mlflow'][1]}/health", timeout=10).status_code == 200
        assert httpx.get(f"http://127.0.0.1:{ports['prefect'][1]}/api/health", timeout=10).status_code == 200
        assert httpx.get(f"http://127.0.0.1:{ports['prod'][1]}/docs", timeout=10).status_code == 200
        ready = httpx.get(f"http://127.0.0.1:{ports['prod'][1]}/readyz", timeout=10).json()
        assert str(ready["model_version"]) == "1"

        # The drift job committed the data version (its pointer alone) in the demo's own clone, and v2
        # records that commit as a clean lineage; the checkout itself is untouched.
        project = checkout / ".tuneloop" / "demo" / "project"
        data_commit = git(project, "rev-parse", "HEAD").strip()
        assert git(project, "log", "-1", "--format=%s").startswith("drift monitor appended")
        assert git(project, "diff-tree", "--no-commit-id", "--name-only", "-r", "HEAD").split() == [
            RAW_POINTER
        ]
        assert git(checkout, "status", "--porcelain") == ""
        admin_password = (checkout / ".tuneloop" / "secrets" / "mlflow-admin.password").read_text().strip()
        tracking_uri = f"http://127.0.0.1:{ports['mlflow'][1]}"
        with acting_as("admin", admin_password):
            client = MlflowClient(tracking_uri, tracking_uri)
            v2 = client.get_model_version(MODEL_NAME, "2")
            record = VersionRecord.from_tags(v2.tags)
        assert v2.tags["tuneloop.git_commit"] == data_commit
        assert v2.tags["tuneloop.data_md5"] == tracked_md5(project / RAW_POINTER)
        assert record.approved_by == "demo-reviewer" and record.registered_by == "tuneloop-trainer"
    finally:
        down = subprocess.run([tuneloop, "down"], cwd=checkout, capture_output=True, text=True, timeout=300)
    assert down.returncode == 0 and "stopped" in down.stdout, down.stdout + down.stderr
