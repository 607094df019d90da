"""A decoder LLM through the whole classification path by a params.yaml change alone: a tiny Llama
built from a config, `tuneloop run` (DVC stages, GX checks, LoRA training, evaluation), register,
approve, promote, and a real `mlflow models serve` answering for the `prod` alias."""

from __future__ import annotations

import json

import httpx
import pandas as pd
import pytest
from mlflow.tracking import MlflowClient

from serving.inference import IntentClassifier
from serving.model_server import invocation_body, start_model_server, wait_until_ready
from tests.support import (
    GATES_ANY_MODEL_PASSES,
    build_tiny_decoder,
    copy_repo_as_project,
    run_cli,
    work_in_project,
)
from tuneloop.config import Environment

pytestmark = pytest.mark.slow

NAME = "tuneloop-intent-llama"


@pytest.fixture
def llama_project(tmp_path, monkeypatch):
    base = build_tiny_decoder(tmp_path / "tiny-llama", "llama")

    def decoder_run(params: dict) -> None:
        params["registry"]["model_name"] = NAME
        params["train"].update(
            target_modules="auto", epochs=2, learning_rate=0.005, batch_size=32, max_length=32
        )
        params["evaluate"]["counterfactual"]["max_examples"] = 20
        params["evaluate"]["behavioural"].update(max_examples=20, variants_per_example=1)
        params["evaluate"]["gates"] = dict(GATES_ANY_MODEL_PASSES)

    root = copy_repo_as_project(tmp_path / "project", base, decoder_run)
    return work_in_project(monkeypatch, root, tmp_path)


def test_a_tiny_llama_is_trained_registered_promoted_and_served(llama_project, tmp_path):
    run = run_cli("tuneloop", "run", cwd=llama_project)
    assert run.returncode == 0, run.stdout[-3000:] + run.stderr[-3000:]
    adapter = llama_project / "models/adapter"
    assert set(json.loads((adapter / "adapter_config.json").read_text())["target_modules"]) == {
        "q_proj",
        "v_proj",
    }
    metrics = json.loads((llama_project / "metrics/evaluate.json").read_text())
    assert 0 <= metrics["quality/accuracy"] <= 1 and "bias/counterfactual_flip_rate" in metrics

    register = run_cli("tuneloop", "register", cwd=llama_project)
    assert register.returncode == 0, register.stdout[-3000:] + register.stderr[-3000:]
    env = Environment.from_env(llama_project)
    client = MlflowClient(env.tracking_uri, env.tracking_uri)
    dev = client.get_model_version_by_alias(NAME, "dev")
    assert "Evaluation card" in dev.tags["tuneloop.evaluation_card"]

    refused = run_cli("tuneloop", "promote", cwd=llama_project)
    assert refused.returncode == 2 and "not approved" in refused.stderr
    client.set_model_version_tag(NAME, dev.version, "approval", "approved")  # the reviewer, in the UI
    promoted = run_cli("tuneloop", "promote", "--reason", "decoder smoke", cwd=llama_project)
    assert promoted.returncode == 0, promoted.stderr
    assert client.get_model_version_by_alias(NAME, "prod").version == dev.version

    texts = pd.read_csv(llama_project / "data/sample/intents-test.csv")["text"].head(12).tolist()
    server = start_model_server(
        f"models:/{NAME}@prod",
        dev.version,
        log_dir=tmp_path / "logs",
        extra_env={"MLFLOW_TRACKING_URI": env.tracking_uri, "HF_HUB_OFFLINE": "1"},
    )
    try:
        wait_until_ready(server, 240)
        answer = httpx.post(f"{server.url}/invocations", json=invocation_body(texts, top_k=2), timeout=60)
    finally:
        server.stop()
    assert answer.status_code == 200, answer.text
    served = answer.json()["predictions"]
    # The server answers with the trained adapter (not a re-initialised head or LoRA): the same labels
    # and scores as loading the stage's output folder directly.
    local = IntentClassifier.load(adapter, device="cpu").predict(texts, top_k=2)
    assert [row["label"] for row in served] == [row["label"] for row in local]
    assert [row["score"] for row in served] == pytest.approx([row["score"] for row in local], abs=1e-4)
    assert all(len(json.loads(row["top_k"])) == 2 for row in served)  # a JSON string in /invocations
