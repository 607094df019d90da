"""The gateway's cost per 1,000 predictions with a real `mlflow models serve` behind it.

The app is built by ``create_gateway``, as ``tuneloop serve`` builds it (the price comes from
params.yaml's ``cost`` there), and runs in process; the model server and the API keys are the security
tests' fixtures.
"""

from __future__ import annotations

import re
import threading
import time

import httpx
import pytest
import uvicorn
from fastapi.testclient import TestClient

from serving.gateway import create_gateway
from serving.model_server import free_port
from serving.routing import Backend, BackendPool
from tests.integration.test_gateway_security import (  # noqa: F401 - fixtures reused: server, keys, log URL
    NAME,
    db_url,
    keys,
    model_server,
    registry,
)
from tests.support import REPO_ROOT
from tuneloop.config import Environment, load_params

pytestmark = pytest.mark.slow

PREDICTIONS = 12


def scraped(text: str, name: str) -> float | None:
    match = re.search(rf"^{re.escape(name)} (\S+)$", text, flags=re.MULTILINE)
    return float(match.group(1)) if match else None


@pytest.fixture()
def gateway_env(keys, db_url, tmp_path, monkeypatch) -> Environment:  # noqa: F811 - imported fixtures
    """The environment `tuneloop serve` would read: this test's key file and inference log."""
    monkeypatch.setenv("TUNELOOP_HOME", str(tmp_path / "home"))
    monkeypatch.setenv("TUNELOOP_API_KEYS_FILE", str(keys["path"]))
    monkeypatch.setenv("TUNELOOP_INFERENCE_LOG_URL", db_url)
    monkeypatch.delenv("TUNELOOP_JWT_ISSUER", raising=False)
    return Environment.from_env(REPO_ROOT)


def gateway_app(server, env: Environment):
    """The gateway as `tuneloop serve` builds it (price from params.yaml), in front of ``server``."""
    pool = BackendPool(NAME, "prod")
    pool.switch(Backend("1", server.url))
    return create_gateway(pool, None, load_params(REPO_ROOT / "params.yaml"), env)


def test_metrics_export_cost_per_1000_predictions(model_server, keys, gateway_env) -> None:  # noqa: F811
    params = load_params(REPO_ROOT / "params.yaml")
    price = params.cost.device_hour_price(params.cost.serving_device)
    client = TestClient(gateway_app(model_server, gateway_env))
    admin = {"X-API-Key": keys["admin"]}
    with client:
        before = client.get("/metrics", headers=admin).text
        for n in range(PREDICTIONS // 3):
            # One text, then a batch of two: every text counts as a prediction.
            for body in ({"text": f"where is my order {n}"}, {"texts": [f"cancel order {n}", "refund?"]}):
                answer = client.post("/v1/predict", json=body, headers={"X-API-Key": keys["predict"]})
                assert answer.status_code == 200, answer.text
        after = client.get("/metrics", headers=admin).text
    assert scraped(before, "tuneloop_cost_per_1000_predictions_usd") is None  # nothing answered yet
    assert scraped(after, "tuneloop_device_hour_usd") == pytest.approx(price)
    seconds = scraped(after, "tuneloop_model_server_seconds_total")
    texts = scraped(after, "tuneloop_model_server_texts_total")
    cached = scraped(after, 'tuneloop_cache_lookups_total{result="hit"}')
    per_1000 = scraped(after, "tuneloop_cost_per_1000_predictions_usd")
    # "refund?" is computed once and then answered from the cache: a prediction without compute.
    assert (texts, cached) == (PREDICTIONS - 3, 3)
    assert seconds is not None and seconds > 0
    assert per_1000 is not None and per_1000 > 0
    assert per_1000 == pytest.approx(seconds / 3600 * price / PREDICTIONS * 1000)
    print(
        f"model-server seconds {seconds:.4f} for {texts:.0f} texts: ${per_1000:.6f} per 1,000 at ${price}/h"
    )


def test_status_reads_the_gateways_cost_per_1000_predictions(
    model_server,  # noqa: F811 - the imported fixtures
    keys,  # noqa: F811
    gateway_env,
    monkeypatch,
) -> None:
    """`tuneloop status`'s line, from a gateway listening on a port (its /metrics needs scope admin)."""
    from tuneloop.cli import _serving_cost

    port = free_port()
    server = uvicorn.Server(
        uvicorn.Config(
            gateway_app(model_server, gateway_env), host="127.0.0.1", port=port, log_level="warning"
        )
    )
    thread = threading.Thread(target=server.run, daemon=True)
    thread.start()
    url = f"http://127.0.0.1:{port}"
    try:
        deadline = time.monotonic() + 30
        while not server.started:
            assert time.monotonic() < deadline, "the gateway did not start"
            time.sleep(0.05)
        monkeypatch.delenv("TUNELOOP_API_KEY", raising=False)
        assert "set TUNELOOP_API_KEY" in _serving_cost(url, Environment.from_env(REPO_ROOT))
        monkeypatch.setenv("TUNELOOP_API_KEY", keys["predict"])
        assert "HTTP 403" in _serving_cost(url, Environment.from_env(REPO_ROOT))
        monkeypatch.setenv("TUNELOOP_API_KEY", keys["admin"])
        assert _serving_cost(url, Environment.from_env(REPO_ROOT)) == "no predictions yet"
        answer = httpx.post(
            f"{url}/v1/predict", json={"text": "where is my order"}, headers={"X-API-Key": keys["predict"]}
        )
        assert answer.status_code == 200, answer.text
        line = _serving_cost(url, Environment.from_env(REPO_ROOT))
        assert re.fullmatch(
            r"\$\d+\.\d{6} \(model-server time x list price, since the gateway started\)", line
        ), line
        print(f"tuneloop status: cost per 1,000 predictions: {line}")
    finally:
        server.should_exit = True
        thread.join(timeout=30)
