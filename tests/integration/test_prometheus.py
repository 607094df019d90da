"""A real Prometheus, started by tuneloop/prometheus.py with the checked-in alert rules, scrapes a real
`tuneloop serve` and fires TuneloopHighErrorRate on an injected fault; every dashboard query is
accepted by it.

The fault is a gateway whose alias names no version (nothing registered): every prediction is a 503
``no_model``, which is what callers see when a model server is lost, and needs no model at all. The
rules are the production file unchanged; only the intervals are 1 s (see alerts.yml for why the
error-rate alert has no ``for:``).
"""

from __future__ import annotations

import contextlib
import shutil
import subprocess
import sys
import threading
import time
from collections.abc import Iterator
from pathlib import Path

import httpx
import pytest
import yaml

from serving.auth import create_api_key
from serving.model_server import free_port
from tests.support import REPO_ROOT, venv_env, wait_for
from tests.unit.test_monitoring_config import RULES_PATH, dashboard_queries
from tuneloop.prometheus import (
    GATEWAY_JOB,
    prometheus_url,
    ready_url,
    start_prometheus,
    write_prometheus_config,
)

pytestmark = [
    pytest.mark.slow,
    pytest.mark.skipif(
        shutil.which("prometheus") is None,
        reason="prometheus is not installed (Debian: apt-get install prometheus; .ci/run does)",
    ),
]

ALERT_WITHIN_S = 60
# Predictions per second during the fault: well under the key's rate limit (params gateway: 50/s).
FAULT_RATE_PER_S = 20


@contextlib.contextmanager
def gateway_serving_nothing(project: Path, home: Path) -> Iterator[dict]:
    """`tuneloop serve --env prod` on an empty registry (its alias names nothing), ready once /healthz is.

    tests.support.gateway_process waits for /readyz, which a gateway serving nothing never passes.
    Yields its ``url``, ``port``, a ``predict_key`` and a ``scrape_key_file`` (an admin key).
    """
    project.mkdir(parents=True)
    home.mkdir(parents=True)
    params = yaml.safe_load((REPO_ROOT / "params.yaml").read_text())
    (project / "params.yaml").write_text(yaml.safe_dump(params))
    predict_key = create_api_key(home / "api_keys.json", "client", ["predict"])
    scrape_key_file = home / "prometheus.key"
    scrape_key_file.write_text(create_api_key(home / "api_keys.json", "prometheus", ["admin"]))
    port = free_port()
    env = venv_env(MLFLOW_TRACKING_URI=f"sqlite:///{home / 'mlflow.db'}", TUNELOOP_HOME=str(home))
    with open(project / "gateway.log", "w") as log:
        process = subprocess.Popen(
            [str(Path(sys.executable).parent / "tuneloop"), "serve", "--env", "prod", "--port", str(port)],
            cwd=project,
            env=env,
            stdout=log,
            stderr=subprocess.STDOUT,
        )
        try:
            url = f"http://127.0.0.1:{port}"
            wait_for(f"{url}/healthz", process, 120)
            yield {"url": url, "port": port, "predict_key": predict_key, "scrape_key_file": scrape_key_file}
        finally:
            process.terminate()
            process.wait(timeout=60)


@contextlib.contextmanager
def prometheus_scraping(gateway_url: str, key_file: Path, folder: Path) -> Iterator[str]:
    """Prometheus on loopback scraping ``gateway_url`` as ``prod`` every second; yields its URL."""
    config = write_prometheus_config(
        folder / "config",
        {"prod": gateway_url},
        RULES_PATH,
        credentials_file=key_file,
        scrape_interval_s=1,
        evaluation_interval_s=1,
    )
    port = free_port()
    with open(folder / "prometheus.log", "wb") as log:
        process = start_prometheus(config, folder / "data", port, log=log)
        try:
            wait_for(ready_url(port), process, 60)
            yield prometheus_url(port)
        finally:
            process.terminate()
            process.wait(timeout=30)


def api(prometheus: str, path: str, **params: str) -> dict:
    answer = httpx.post(f"{prometheus}/api/v1/{path}", data=params, timeout=10)
    assert answer.status_code == 200, answer.text
    body = answer.json()
    assert body["status"] == "success", body
    return body["data"]


def alerts(prometheus: str) -> dict[str, dict]:
    """The alerts pending or firing now, by name."""
    return {
        alert["labels"]["alertname"]: alert
        for alert in httpx.get(f"{prometheus}/api/v1/alerts").json()["data"]["alerts"]
    }


def wait_until(check, seconds: float, what: str):
    """``check()``'s first truthy answer, polled every 0.5 s for at most ``seconds``."""
    deadline = time.monotonic() + seconds
    while time.monotonic() < deadline:
        answer = check()
        if answer:
            return answer
        time.sleep(0.5)
    raise AssertionError(f"{what}: not within {seconds} s")


def predict_until(stop: threading.Event, gateway: dict, statuses: list[int]) -> None:
    with httpx.Client(base_url=gateway["url"], headers={"X-API-Key": gateway["predict_key"]}) as client:
        while not stop.is_set():
            statuses.append(client.post("/v1/predict", json={"text": "where is my order"}).status_code)
            stop.wait(1 / FAULT_RATE_PER_S)


@pytest.fixture()
def monitored_gateway(tmp_path) -> Iterator[tuple[dict, str]]:
    with (
        gateway_serving_nothing(tmp_path / "project", tmp_path / "home") as gateway,
        prometheus_scraping(
            gateway["url"], gateway["scrape_key_file"], tmp_path / "prometheus"
        ) as prometheus,
    ):
        yield gateway, prometheus


def test_an_outage_fires_the_error_rate_alert(monitored_gateway) -> None:
    gateway, prometheus = monitored_gateway
    instance = f"127.0.0.1:{gateway['port']}"

    def scraped() -> bool:
        result = api(prometheus, "query", query=f'up{{job="{GATEWAY_JOB}"}}')["result"]
        return bool(result) and result[0]["value"][1] == "1"

    wait_until(scraped, 30, "Prometheus scraping the gateway with its admin key")
    # Healthy first: probes answered 503 (no model is ready) over several scrapes are no error rate.
    for _ in range(40):
        assert httpx.get(f"{gateway['url']}/readyz").status_code == 503
        time.sleep(0.1)
    time.sleep(2)  # two more evaluations
    assert "TuneloopHighErrorRate" not in alerts(prometheus)

    def firing() -> dict | None:
        alert = alerts(prometheus).get("TuneloopHighErrorRate")
        return alert if alert and alert["state"] == "firing" else None

    stop, statuses = threading.Event(), []
    traffic = threading.Thread(target=predict_until, args=(stop, gateway, statuses))
    traffic.start()
    try:
        alert = wait_until(firing, ALERT_WITHIN_S, "TuneloopHighErrorRate firing")
    finally:
        stop.set()
        traffic.join(timeout=10)

    assert set(statuses) == {503}, "the fault: every prediction refused with 503"
    assert alert["labels"] == {
        "alertname": "TuneloopHighErrorRate",
        "severity": "critical",
        "job": GATEWAY_JOB,
        "instance": instance,
        "env": "prod",
    }
    assert alert["annotations"]["summary"] == "100% of requests to prod fail with 5xx"
    # The slower alert about the same fault matches the real gateway's series and waits out its `for:`.
    assert alerts(prometheus)["TuneloopNoModelServed"]["state"] == "pending"
    reasons = api(
        prometheus, "query", query='sum by (reason) (tuneloop_gateway_errors_total{endpoint="/v1/predict"})'
    )
    assert [series["metric"]["reason"] for series in reasons["result"]] == ["no_model"]


def test_prometheus_accepts_every_dashboard_query(monitored_gateway) -> None:
    gateway, prometheus = monitored_gateway
    wait_until(
        lambda: api(prometheus, "query", query="tuneloop_gateway_requests_total")["result"],
        30,
        "a first scrape",
    )
    refused = {}
    for where, query in dashboard_queries():
        answer = httpx.post(f"{prometheus}/api/v1/query", data={"query": query}, timeout=10).json()
        if answer["status"] != "success":
            refused[where] = answer.get("error")
    assert not refused, refused
    # And they read the real series: the scrapes themselves show as traffic on /metrics.
    traffic = dict(dashboard_queries())["Requests/s by endpoint [A]"]

    def scrape_rate() -> list[dict]:
        result = api(prometheus, "query", query=traffic)["result"]
        return [series for series in result if series["metric"]["endpoint"] == "/metrics"]

    (series,) = wait_until(scrape_rate, 15, "the scrapes' rate on the traffic panel")
    # (Far below 1/s while the series is younger than the panel's 1-minute window: rate divides by it.)
    assert float(series["value"][1]) > 0
