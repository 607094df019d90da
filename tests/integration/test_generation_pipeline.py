"""`task: generation` through the whole lifecycle by a params.yaml change alone: a tiny Llama built from
a config, `tuneloop run` on the support-pairs sample (DVC stages: prepare, the GX pairs checks, supervised
fine-tuning, the generation evaluation and its gates), register, approve, promote, a second candidate
compared with prod by a paired test on per-example scores, and the gateway (`tuneloop serve`, a real
`mlflow models serve` behind it) answering `/v1/generate` for `prod` with the version's own generations."""

from __future__ import annotations

import httpx
import mlflow
import pandas as pd
import pytest
from mlflow.tracking import MlflowClient

from serving.generation import TextGenerator
from serving.pyfunc_model import MERGED_ARTIFACT
from tests.support import (
    build_tiny_decoder,
    copy_repo_as_project,
    gateway_process,
    run_cli,
    work_in_project,
)
from tuneloop.config import Environment
from tuneloop.io import read_json

pytestmark = pytest.mark.slow

NAME = "tuneloop-support-json-llama"
GENERATION_GATES_ANY_MODEL_PASSES = {
    "min_json_valid_rate": 0.0,
    "min_exact_match": 0.0,
    "min_field_micro_f1": 0.0,
    "min_reply_rouge_l": 0.0,
    "max_group_field_accuracy_gap": 1.0,
    "max_counterfactual_field_change_rate": 1.0,
}
STAGES = ("prepare", "validate", "train", "evaluate")


@pytest.fixture
def generation_project(tmp_path, monkeypatch):
    base = build_tiny_decoder(tmp_path / "tiny-llama", "llama")

    def generation_run(params: dict) -> None:
        params["task"] = "generation"
        params["data"].update(
            raw_path="data/raw/support-pairs.csv", test_path="data/raw/support-pairs-test.csv"
        )
        params["registry"]["model_name"] = NAME
        params["train"].update(
            target_modules="auto", epochs=1, learning_rate=0.005, batch_size=16, max_train_examples=48
        )
        params["generation"]["max_new_tokens"] = 24
        params["evaluate"]["counterfactual"]["max_examples"] = 4
        params["evaluate"]["behavioural"].update(max_examples=8, variants_per_example=1)
        params["evaluate"]["generation_gates"] = dict(GENERATION_GATES_ANY_MODEL_PASSES)

    root = copy_repo_as_project(tmp_path / "project", base, generation_run)
    return work_in_project(monkeypatch, root, tmp_path)


def _succeeded(process) -> None:
    assert process.returncode == 0, process.stdout[-3000:] + process.stderr[-3000:]


def test_the_generation_task_runs_the_pipeline_and_is_registered_promoted_and_served(
    generation_project, tmp_path
):
    project = generation_project
    run = run_cli("tuneloop", "run", cwd=project)
    _succeeded(run)
    # `tuneloop init` chose the pairs sample for `task: generation`, with its own frozen test file.
    assert (project / "data/raw/support-pairs.csv").read_bytes() == (
        project / "data/sample/support-pairs.csv"
    ).read_bytes()
    assert "valid JSON" in run.stdout and "exact match" in run.stdout
    lock = (project / "dvc.lock").read_text()
    assert all(f"  {stage}:" in lock for stage in STAGES)

    prepared = project / "data/prepared"
    train = pd.read_parquet(prepared / "train.parquet")
    test = pd.read_parquet(prepared / "test.parquet")
    assert {"message", "target", "channel"} <= set(train.columns) and len(test) == 120
    assert not set(train["message"]) & set(test["message"])  # no test message leaks into training
    validation = read_json(project / "reports/validation/summary.json")
    assert validation["success"] is True and validation["checks_run"] >= 8

    manifest = read_json(project / "models/adapter/tuneloop.json")
    assert manifest["task"] == "generation"
    metrics = read_json(project / "metrics/evaluate.json")
    for key in (
        "generation/json_valid_rate",
        "generation/exact_match",
        "generation/field_micro_f1",
        "generation/reply_rouge_l",
        "generation/reply_chrf",
        "bias/counterfactual_field_change_rate",
        "bias/max_group_field_accuracy_gap",
    ):
        assert key in metrics, key
    # Speed differs from run to run: beside the tracked metrics, never in them.
    assert "speed/output_tokens_per_second" not in metrics
    assert read_json(project / "reports/timing/evaluate.json")["speed/output_tokens_per_second"] > 0
    assert metrics["quality/test_examples"] == 120
    gates = read_json(project / "metrics/gates.json")
    assert gates["passed"] and {gate["name"] for gate in gates["gates"]} == set(
        GENERATION_GATES_ANY_MODEL_PASSES
    )
    per_intent = read_json(project / "metrics/per_class.json")
    assert sum(row["support"] for row in per_intent.values()) == 120
    assert "behaviour/inv_max_failure_rate" in metrics
    confusion = pd.read_csv(project / "plots/confusion.csv")
    assert len(confusion) == 120 and (project / "plots/confusion_matrix.png").stat().st_size > 0
    predictions = pd.read_csv(project / "reports/test_predictions.csv")
    assert {"generated", "exact", "field_accuracy"} <= set(predictions.columns)

    _succeeded(run_cli("tuneloop", "register", cwd=project))
    env = Environment.from_env(project)
    client = MlflowClient(env.tracking_uri, env.tracking_uri)
    first = client.get_model_version_by_alias(NAME, "dev")
    assert first.tags["tuneloop.task"] == "generation"
    assert "generation/json_valid_rate" in first.tags["tuneloop.evaluation_card"]
    refused = run_cli("tuneloop", "promote", cwd=project)
    assert refused.returncode == 2 and "not approved" in refused.stderr
    client.set_model_version_tag(NAME, first.version, "approval", "approved")  # the reviewer, in the UI
    _succeeded(run_cli("tuneloop", "promote", "--reason", "generation smoke", cwd=project))
    assert client.get_model_version_by_alias(NAME, "prod").version == first.version

    # A second candidate (another seed) is compared with prod on per-example field accuracy.
    params_path = project / "params.yaml"
    params_path.write_text(params_path.read_text().replace("seed: 42", "seed: 7", 1))
    _succeeded(run_cli("tuneloop", "run", "--skip-init", cwd=project))
    _succeeded(run_cli("tuneloop", "register", cwd=project))
    second = max(client.search_model_versions(f"name = '{NAME}'"), key=lambda v: int(v.version))
    assert second.version != first.version
    assert second.tags["tuneloop.vs_prod.version"] == str(first.version)
    assert 0 <= float(second.tags["tuneloop.vs_prod.p_value"]) <= 1
    assert "Wilcoxon" in second.tags["tuneloop.evaluation_card"]

    # The stable address: `tuneloop serve` for prod, answering /v1/generate through the gateway.
    messages = test["message"].head(6).tolist()
    with gateway_process(tmp_path / "gateway", NAME, env.tracking_uri, tmp_path / "gateway-home") as gateway:
        answer = httpx.post(
            f"{gateway['url']}/v1/generate",
            json={"texts": messages},
            headers=gateway["headers"],
            timeout=120,
        )
    assert answer.status_code == 200, answer.text
    assert answer.json()["model_version"] == str(first.version)
    served = [row["text"] for row in answer.json()["generations"]]
    # The adapter folder now holds the second training: load the first version's merged model instead.
    first_model = mlflow.artifacts.download_artifacts(
        artifact_uri=client.get_model_version_download_uri(NAME, first.version), dst_path=str(tmp_path / "v1")
    )
    local = TextGenerator.load(f"{first_model}/artifacts/{MERGED_ARTIFACT}", device="cpu").generate(messages)
    assert served == [generation.text for generation in local]
    headline = ", ".join(f"{k} {metrics[k]:.4f}" for k in sorted(metrics) if k.startswith("generation/"))
    print(
        f"\ngeneration pipeline: {headline}"
        f"; v{first.version} prod, v{second.version} vs prod: {second.tags['tuneloop.vs_prod.verdict']} "
        f"(Wilcoxon p = {float(second.tags['tuneloop.vs_prod.p_value']):.3g}); /v1/generate answered "
        f"{len(served)} messages from v{answer.json()['model_version']}"
    )
