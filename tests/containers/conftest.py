"""Fixtures of the container tests: podman on a cached store, the two images built, a host MLflow server
on the session's S3 endpoint, and the measurements written outside the work tree (see `measurements`)."""

from __future__ import annotations

import json
import os
import platform
import shutil
import subprocess
import sys
from datetime import UTC, datetime
from pathlib import Path

import pytest
from filelock import FileLock, Timeout

from serving.model_server import free_port
from tests.containers.podman import (
    BASE_IMAGE,
    Podman,
    build_image,
    cache_key,
    cache_root,
    make_base_image,
    missing_tools,
    unmount_below,
)
from tests.support import venv_env, wait_for

WORKER_IMAGE = "ghcr.io/tuneloop/tuneloop-worker:test"
SERVING_IMAGE = "ghcr.io/tuneloop/tuneloop-serving:test"
# One bucket on the session's moto server: MLflow's artifacts and the worker image's DVC remote.
BUCKET = "tuneloop-containers"
DVC_REMOTE_URL = f"s3://{BUCKET}/dvc"


def _require_podman() -> None:
    """Skip where the tools are missing, except in CI, which installs them (.ci/run)."""
    problems = [f"{tool} is not installed" for tool in missing_tools()]
    if os.geteuid() != 0:
        problems.append("debootstrap needs root to make the base image")
    if problems:
        reason = "container tests: " + "; ".join(problems) + " (`apt-get install podman runc debootstrap`)"
        if os.environ.get("CI"):
            pytest.fail(reason)
        pytest.skip(reason)


def _prune_other_caches(keep: Path) -> None:
    """Stores of older Dockerfiles or pins take gigabytes: remove those no session is using."""
    for folder in keep.parent.iterdir():
        if folder == keep or not folder.is_dir():
            continue
        lock = FileLock(str(folder) + ".lock")
        try:
            with lock.acquire(timeout=0):
                # Not `podman system reset`: with its runroot gone, podman would reset the lock memory
                # that every podman on the machine shares. Builds can leave layers mounted: unmount.
                unmount_below(folder)
                shutil.rmtree(folder, ignore_errors=True)
                shutil.rmtree(Podman(folder).runroot, ignore_errors=True)
        except Timeout:
            continue


@pytest.fixture(scope="session")
def measurements():
    """What the session measured, merged under its cache state into $TUNELOOP_CONTAINER_RESULTS
    (e.g. benchmarks/results/containers.json, to refresh the committed numbers), else into the cache."""
    recorded: dict = {}
    yield recorded
    if "images" not in recorded:
        return
    target = os.environ.get("TUNELOOP_CONTAINER_RESULTS")
    results_path = Path(target) if target else cache_root() / "containers.json"
    results = json.loads(results_path.read_text()) if results_path.exists() else {}
    results.update(
        {
            "what": "tests/containers/test_images.py: build both images with podman, serve a prediction, "
            "run the continuous-training flow to dev",
            "machine": {"cpu_count": os.cpu_count(), "platform": platform.platform()},
        }
    )
    recorded["recorded_at"] = datetime.now(UTC).isoformat(timespec="seconds")
    results.setdefault("runs", {})[recorded.pop("cache")] = recorded
    results_path.parent.mkdir(parents=True, exist_ok=True)
    results_path.write_text(json.dumps(results, indent=2) + "\n")


@pytest.fixture(scope="session")
def podman(measurements):
    _require_podman()
    folder = cache_root() / cache_key()
    folder.parent.mkdir(parents=True, exist_ok=True)
    # One session at a time on a store; others wait rather than build the same layers twice.
    with FileLock(str(folder) + ".lock", timeout=3600):
        _prune_other_caches(folder)
        engine = Podman(folder)
        engine.prepare()
        version = subprocess.run(["podman", "--version"], capture_output=True, text=True).stdout.strip()
        measurements["podman"] = version
        yield engine


@pytest.fixture(scope="session")
def images(podman, measurements) -> dict[str, str]:
    """Both images, built from the offline base; a cached store rebuilds only what changed."""
    cold = not podman.image_exists(BASE_IMAGE)
    measurements["cache"] = "cold" if cold else "cached"
    measurements["cache_folder"] = str(podman.folder)
    measurements["base_image_seconds"] = round(make_base_image(podman), 1) if cold else None
    built = {}
    for target, tag in (("worker", WORKER_IMAGE), ("serving", SERVING_IMAGE)):
        build = build_image(podman, target, tag, {"DVC_REMOTE_URL": DVC_REMOTE_URL})
        built[target] = {
            "image": tag,
            "build_seconds": round(build.seconds, 1),
            "size_bytes": build.size_bytes,
            "size_mb": round(build.size_bytes / 1e6),
        }
        print(f"{target}: built in {build.seconds:.0f} s, {build.size_bytes / 1e9:.2f} GB")
    measurements["images"] = built
    return {"worker": WORKER_IMAGE, "serving": SERVING_IMAGE}


@pytest.fixture(scope="module")
def s3_bucket(s3_server) -> str:
    import boto3

    client = boto3.client("s3", endpoint_url=s3_server.endpoint_url)
    if BUCKET not in {bucket["Name"] for bucket in client.list_buckets()["Buckets"]}:
        client.create_bucket(Bucket=BUCKET)
    return BUCKET


@pytest.fixture(scope="module")
def mlflow_server(tmp_path_factory, s3_server, s3_bucket):
    """A plain `mlflow server` on 127.0.0.1 (SQLite), artifacts on S3 through its proxy."""
    root = tmp_path_factory.mktemp("containers-mlflow")
    port = free_port()
    command = [
        sys.executable,
        "-m",
        "mlflow",
        "server",
        "--workers",
        "1",
        "--backend-store-uri",
        f"sqlite:///{root / 'mlflow.db'}",
        "--artifacts-destination",
        f"s3://{s3_bucket}/mlartifacts",
        "--host",
        "127.0.0.1",
        "--port",
        str(port),
    ]
    log = open(root / "server.log", "w")  # noqa: SIM115 - lives as long as the server
    process = subprocess.Popen(
        command,
        env=venv_env(MLFLOW_S3_ENDPOINT_URL=s3_server.endpoint_url),
        stdout=log,
        stderr=subprocess.STDOUT,
        start_new_session=True,
    )
    url = f"http://127.0.0.1:{port}"
    try:
        wait_for(f"{url}/health", process, 120)
        yield url
    finally:
        process.terminate()
        try:
            process.wait(timeout=30)
        except subprocess.TimeoutExpired:
            process.kill()
        log.close()
