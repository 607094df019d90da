"""The generation model as a registered MLflow version: the adapter merged into its base, logged as a
pyfunc, registered, and answered by a real `mlflow models serve` from the registry alone."""

from __future__ import annotations

import httpx
import mlflow
import pytest
from mlflow.tracking import MlflowClient

from serving.generation import TextGenerator
from serving.model_server import start_model_server, wait_until_ready
from serving.pyfunc_model import MERGED_ARTIFACT, log_generation_model
from tests.support import memorised_pairs, settings

pytestmark = pytest.mark.slow

NAME = "tuneloop-support-json"


def test_a_registered_generation_model_is_served_with_its_answers(tiny_generator, tmp_path):
    uri = f"sqlite:///{tmp_path / 'mlflow.db'}"
    mlflow.set_tracking_uri(uri)
    experiment = mlflow.create_experiment("generation", artifact_location=str(tmp_path / "artifacts"))
    client = MlflowClient(uri, uri)
    client.create_registered_model(NAME)
    with mlflow.start_run(experiment_id=experiment) as run:
        info = log_generation_model(tiny_generator, settings("serving"))
    version = client.create_model_version(NAME, info.model_uri, run.info.run_id).version
    client.set_registered_model_alias(NAME, "prod", version)
    # The version holds a whole model: no adapter to fold, no base folder to find at load time.
    files = {
        item.path for item in client.list_artifacts(run.info.run_id, f"model/artifacts/{MERGED_ARTIFACT}")
    }
    assert any(path.endswith("model.safetensors") for path in files), files
    assert not any("adapter_model" in path for path in files), files

    pairs = memorised_pairs()
    server = start_model_server(
        f"models:/{NAME}@prod",
        version,
        log_dir=tmp_path / "logs",
        extra_env={"MLFLOW_TRACKING_URI": uri, "HF_HUB_OFFLINE": "1"},
    )
    try:
        ready_s = wait_until_ready(server, 240)
        body = {"dataframe_split": {"columns": ["text"], "data": [[m] for m in pairs["message"]]}}
        answer = httpx.post(f"{server.url}/invocations", json=body, timeout=120)
        short = httpx.post(
            f"{server.url}/invocations", json={**body, "params": {"max_new_tokens": 5}}, timeout=120
        )
    finally:
        server.stop()
    print(f"generation model server ready in {ready_s:.1f} s")
    assert answer.status_code == 200, answer.text
    served = answer.json()["predictions"]
    assert [row["generated"] for row in served] == pairs["target"].tolist()
    assert all(row["new_tokens"] > 10 and row["prompt_tokens"] > 10 for row in served)
    # A request may ask for fewer tokens than the model's limit, and gets them.
    assert short.status_code == 200, short.text
    assert all(row["new_tokens"] <= 5 for row in short.json()["predictions"])
    # The merged model answers as the adapter on its base does.
    local = TextGenerator.load(tiny_generator, device="cpu").generate(pairs["message"].tolist())
    assert [row["generated"] for row in served] == [answer.text for answer in local]
