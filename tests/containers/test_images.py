"""The two images of deploy/docker/Dockerfile, built and run with podman against real servers.

Both are built on an offline Debian base (no registry is reachable here). The serving image answers a
prediction through its gateway for a model it downloads from the host's MLflow server (artifacts on the
session's S3 endpoint); the worker image runs the continuous-training flow, whose data comes from and
goes to a DVC remote in that S3 bucket, and registers a version that becomes `dev` on the host's
registry. Timings go to $TUNELOOP_CONTAINER_RESULTS (benchmarks/results/containers.json when refreshing
the committed numbers), else beside the image cache.
"""

from __future__ import annotations

import json
import os
import subprocess
import time

import boto3
import httpx
import mlflow
import pytest
import yaml
from mlflow.tracking import MlflowClient

from serving.auth import create_api_key
from serving.inference import IntentClassifier
from serving.model_server import free_port
from serving.pyfunc_model import log_intent_model
from tests.containers.conftest import BUCKET
from tests.containers.podman import logs, running_container, wait_ready, world_readable
from tests.support import GATES_ANY_MODEL_PASSES, REPO_ROOT, settings, two_label_slice

pytestmark = pytest.mark.slow

PARAMS = yaml.safe_load((REPO_ROOT / "params.yaml").read_text())
SERVED_MODEL = PARAMS["registry"]["model_name"]
FLOW_MODEL = "tuneloop-container-flow"
TORCH_VERSION = next(
    line.split("==")[1].split("+")[0]
    for line in (REPO_ROOT / "constraints.txt").read_text().splitlines()
    if line.startswith("torch==")
)
# Small enough for a couple of minutes on two CPU cores; gates any model passes, since the test is
# about the image running the flow, not about the model's quality.
FLOW_OVERRIDES = {
    "registry": {"model_name": FLOW_MODEL},
    "train": {"epochs": 1, "max_train_examples": 192, "max_length": 32, "batch_size": 32},
    "evaluate": {
        "counterfactual": {"max_examples": 20},
        "behavioural": {"max_examples": 20, "variants_per_example": 1},
        "gates": GATES_ANY_MODEL_PASSES,
    },
}
# The flow as a deployment's run calls it; its summary on one line the test can find.
FLOW_SCRIPT = """
import json, sys
from flows.continuous_training import continuous_training
summary = continuous_training(params_overrides=json.loads(sys.argv[1]), reason="container-test")
print("FLOW-SUMMARY " + json.dumps(summary, default=str), flush=True)
"""


@pytest.mark.parametrize(
    ("target", "commands"),
    [
        ("worker", ["python", "tuneloop", "mlflow", "prefect", "dvc", "git", "sh", "cat", "sed"]),
        ("serving", ["tuneloop", "mlflow"]),
    ],
)
def test_each_image_keeps_the_contract_of_the_manifests(podman, images, target, commands):
    """docs/kubernetes.md, "The two images": user 10001, a writable HOME, the commands the pods run."""
    script = (
        'id -u; id -g; echo "$HOME"; touch "$HOME/.probe" && echo home-writable; '
        f"for c in {' '.join(commands)}; do command -v $c >/dev/null || echo missing-$c; done; "
        "find /tuneloop-build -type f 2>/dev/null | sed 's/^/build-file-left:/'; "
        "pip config list | grep -E 'index-url|find-links|cert' | sed 's/^/pip-setting-left:/'; "
        "python -c 'import torch; print(torch.__version__)'"
    )
    done = podman.run("run", "--rm", images[target], "sh", "-c", script, timeout=120)
    # Empty mount points of the build's --volume options may remain; nothing in them, no pip setting.
    assert done.stdout.split() == [
        "10001",
        "10001",
        "/home/tuneloop",
        "home-writable",
        f"{TORCH_VERSION}+cpu",
    ], done.stdout + done.stderr
    if target == "worker":
        tree = podman.run("run", "--rm", images[target], "sh", "-c", "git rev-parse HEAD && ls", timeout=60)
        assert {"prefect.yaml", "params.yaml", "dvc.yaml", "flows"} <= set(tree.stdout.split()[1:])


@pytest.fixture(scope="module")
def served_version(mlflow_server, tiny_base, tiny_adapter) -> str:
    """The tiny model registered on the host's server as version 1 of params' model name, alias dev."""
    previous = mlflow.get_tracking_uri()
    mlflow.set_tracking_uri(mlflow_server)
    try:
        client = MlflowClient(mlflow_server, mlflow_server)
        experiment = mlflow.create_experiment("containers-serving")
        with mlflow.start_run(experiment_id=experiment):
            info = log_intent_model(tiny_adapter, str(tiny_base), settings("serving"))
        version = mlflow.register_model(info.model_uri, SERVED_MODEL).version
        client.set_registered_model_alias(SERVED_MODEL, "dev", version)
    finally:
        mlflow.set_tracking_uri(previous)
    return str(version)


def test_the_serving_container_answers_a_prediction_through_its_gateway(
    podman, images, mlflow_server, served_version, tiny_base, tiny_adapter, tmp_path, measurements
):
    keys = tmp_path / "api-keys"
    keys.mkdir()
    api_key = create_api_key(keys / "api_keys.json", "container-test", ["predict"])
    world_readable(keys)
    port = free_port()
    # The text the tiny model (trained in seconds) labels right with the clearest margin, on this host.
    frame = two_label_slice()
    answers = IntentClassifier.load(tiny_adapter, str(tiny_base), device="cpu").predict(
        frame["text"].tolist()
    )
    best = max(
        range(len(frame)),
        key=lambda i: (answers[i]["label"] == frame["label"][i], answers[i]["score"]),
    )
    text, expected = frame["text"][best], answers[best]

    started = time.monotonic()
    with running_container(
        podman,
        "tuneloop-serving-test",
        "--network=host",
        f"--env=MLFLOW_TRACKING_URI={mlflow_server}",
        "--env=TUNELOOP_API_KEYS_FILE=/etc/tuneloop/api-keys/api_keys.json",
        "--env=OMP_NUM_THREADS=2",
        f"--volume={keys}:/etc/tuneloop/api-keys:ro",
        images["serving"],
        "tuneloop",
        "serve",
        "--env",
        "dev",
        "--host",
        "127.0.0.1",
        "--port",
        str(port),
    ) as container:
        url = f"http://127.0.0.1:{port}"
        wait_ready(f"{url}/readyz", podman, container, 300)
        ready_s = time.monotonic() - started
        ready = httpx.get(f"{url}/readyz", timeout=10).json()
        answer = httpx.post(
            f"{url}/v1/predict", json={"text": text}, headers={"X-API-Key": api_key}, timeout=60
        )
        refused = httpx.post(f"{url}/v1/predict", json={"text": text}, timeout=60)
        user = podman.run("exec", container, "id", "-u").stdout.strip()
        server_log = logs(podman, container)

    assert ready == {
        "ready": True,
        "model_name": SERVED_MODEL,
        "alias": "dev",
        "model_version": served_version,
        "breaker_open": False,
        "degraded": False,
    }
    assert answer.status_code == 200, answer.text + server_log
    body = answer.json()
    prediction = body["predictions"][0]
    assert body["model_version"] == served_version
    assert prediction["label"] == expected["label"]
    assert prediction["score"] == pytest.approx(expected["score"], abs=1e-4)
    assert refused.status_code == 401
    assert user == "10001"
    measurements["serving"] = {
        "start_to_ready_seconds": round(ready_s, 1),
        "text": text,
        "true_label": frame["label"][best],
        "prediction": prediction,
        "model": f"{SERVED_MODEL} v{served_version} (@dev)",
    }
    print(f"serving: ready {ready_s:.1f} s after `podman run`; {text!r} -> {prediction}")


def test_the_worker_container_trains_and_registers_a_dev_version(
    podman, images, mlflow_server, s3_server, s3_bucket, measurements
):
    environment = {
        name: value
        for name, value in os.environ.items()
        if name in {"AWS_ACCESS_KEY_ID", "AWS_SECRET_ACCESS_KEY", "AWS_DEFAULT_REGION"}
    }
    # The image's default DVC remote is the bucket (build argument); the endpoint is this machine's.
    script = (
        'dvc remote modify --local storage endpointurl "$S3_ENDPOINT_URL" && tuneloop init && '
        'exec python -c "$0" "$1"'
    )
    command = podman.command(
        "run",
        "--rm",
        "--network=host",
        f"--env=MLFLOW_TRACKING_URI={mlflow_server}",
        f"--env=S3_ENDPOINT_URL={s3_server.endpoint_url}",
        "--env=OMP_NUM_THREADS=2",
        *[f"--env={name}={value}" for name, value in environment.items()],
        images["worker"],
        "sh",
        "-c",
        script,
        FLOW_SCRIPT,
        json.dumps(FLOW_OVERRIDES),
    )
    started = time.monotonic()
    done = subprocess.run(command, env=podman.env, capture_output=True, text=True, timeout=1500)
    wall_s = time.monotonic() - started
    output = done.stdout + done.stderr
    assert done.returncode == 0, output[-8000:]
    summary_line = next(line for line in done.stdout.splitlines() if line.startswith("FLOW-SUMMARY "))
    summary = json.loads(summary_line.removeprefix("FLOW-SUMMARY "))

    registration = summary["registration"]
    assert summary["stages"] == {"prepare": True, "validate": True, "train": True, "evaluate": True}
    assert registration["name"] == FLOW_MODEL and registration["promoted_to_dev"]
    client = MlflowClient(mlflow_server, mlflow_server)
    dev = client.get_model_version_by_alias(FLOW_MODEL, "dev")
    assert str(dev.version) == str(registration["version"])
    run = client.get_run(dev.run_id)
    assert run.data.metrics["quality/accuracy"] == pytest.approx(summary["metrics"]["quality/accuracy"])
    # The flow pushed the data and the stage outputs to the DVC remote in the bucket.
    stored = boto3.client("s3", endpoint_url=s3_server.endpoint_url).list_objects_v2(
        Bucket=BUCKET, Prefix="dvc/"
    )
    assert stored.get("KeyCount", 0) >= 3

    measurements["worker"] = {
        "container_seconds": round(wall_s, 1),
        "flow_seconds": round(summary["duration_s"], 1),
        "model": f"{FLOW_MODEL} v{dev.version} (@dev)",
        "accuracy": run.data.metrics["quality/accuracy"],
        "dvc_remote": f"s3://{BUCKET}/dvc on the session's moto server",
    }
    flow_s = summary["duration_s"]
    print(f"worker: {FLOW_MODEL} v{dev.version} is dev; flow {flow_s:.0f} s, container {wall_s:.0f} s")
