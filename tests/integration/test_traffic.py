"""Serving that holds real traffic: the breaker and previous-prod fallback, canary and shadow.

One real `tuneloop serve --env prod` process in front of real `mlflow models serve` processes. The
registry: v1 (good), v2 (labels reversed, so whose answer it is shows), v3 (answers after 1.2 s).
prod -> 2, previous-prod -> 1, dev -> 1. Tests run in file order against one gateway. The numbers
they print (failed requests, recovery times, traffic shares) are what the closing notes quote; they
never decide pass or fail.
"""

from __future__ import annotations

import json
import os
import signal
import threading
import time
from dataclasses import dataclass
from urllib.parse import urlparse

import httpx
import mlflow
import pytest

from serving.model_server import port_owner
from serving.pyfunc_model import model_signature
from tests.support import (
    REPO_ROOT,
    gateway_process,
    reversed_label_copy,
    settings,
    sqlite_registry_with,
    two_label_slice,
    wait_until,
)

pytestmark = pytest.mark.slow

NAME = "tuneloop-traffic-test"
SLOW_MODEL = REPO_ROOT / "tests" / "integration" / "slow_model.py"
OVERRIDES = {
    "serving": {
        "breaker_failures": 2,
        "breaker_open_s": 2,
        "health_check_interval_s": 0.5,
        "micro_batch_max_wait_ms": 5,
        # Every request reaches a model server: the comparisons are about the versions, not the cache.
        "cache_size": 0,
    },
    "canary": {"min_requests": 15, "max_error_rate": 0.05, "max_p99_latency_ms": 800},
}


@pytest.fixture(scope="module")
def registry(tmp_path_factory, tiny_base, tiny_adapter) -> dict:
    home = tmp_path_factory.mktemp("traffic-home")
    work = tmp_path_factory.mktemp("traffic-work")
    flipped = reversed_label_copy(tiny_adapter, work / "flipped")
    uri, client = sqlite_registry_with(home, NAME, [tiny_adapter, flipped], tiny_base)
    with mlflow.start_run(experiment_id=client.get_experiment_by_name(f"{NAME}-runs").experiment_id):
        slow = mlflow.pyfunc.log_model(
            name="model", python_model=str(SLOW_MODEL), signature=model_signature(settings("serving"))
        )
    client.create_model_version(NAME, slow.model_uri, slow.run_id)
    client.set_registered_model_alias(NAME, "prod", "2")
    client.set_registered_model_alias(NAME, "previous-prod", "1")
    client.set_registered_model_alias(NAME, "dev", "1")
    frame = two_label_slice()
    return {
        "home": home,
        "uri": uri,
        "client": client,
        "texts": frame["text"].tolist(),
        "labels": frame["label"].tolist(),
    }


@pytest.fixture(scope="module")
def gateway(registry, tmp_path_factory):
    project = tmp_path_factory.mktemp("traffic-project")
    with gateway_process(project, NAME, registry["uri"], registry["home"], OVERRIDES) as running:
        yield running


def status(gateway) -> dict:
    return httpx.get(f"{gateway['url']}/v1/status", headers=gateway["headers"], timeout=10).json()


@dataclass
class Answer:
    at: float
    status: int
    version: str | None
    subject: str
    text_index: int = -1
    request_id: str | None = None


class Load:
    """Steady traffic from a few threads, each request as one of ``subjects`` end users."""

    def __init__(
        self, gateway, texts: list[str], subjects: int = 50, threads: int = 3, rate_per_s: float = 30
    ):
        self.gateway, self.texts, self.subjects = gateway, texts, subjects
        self.interval = threads / rate_per_s
        self.answers: list[Answer] = []
        self._stop = threading.Event()
        self._lock = threading.Lock()
        self._threads = [threading.Thread(target=self._send, args=(n,), daemon=True) for n in range(threads)]

    def _send(self, offset: int) -> None:
        count = offset
        with httpx.Client(timeout=30) as client:
            while not self._stop.is_set():
                started = time.monotonic()
                subject = f"user-{count % self.subjects}"
                text_index = count % len(self.texts)
                headers = self.gateway["headers"] | {"X-Subject-Id": subject}
                try:
                    response = client.post(
                        f"{self.gateway['url']}/v1/predict",
                        json={"text": self.texts[text_index]},
                        headers=headers,
                    )
                    answer = Answer(
                        started,
                        response.status_code,
                        response.headers.get("X-Model-Version"),
                        subject,
                        text_index,
                        response.headers.get("X-Request-ID"),
                    )
                except httpx.HTTPError:
                    answer = Answer(started, 0, None, subject)
                count += 3
                with self._lock:
                    self.answers.append(answer)
                time.sleep(max(0.0, self.interval - (time.monotonic() - started)))

    def __enter__(self) -> Load:
        for thread in self._threads:
            thread.start()
        return self

    def __exit__(self, *exc) -> None:
        self._stop.set()
        for thread in self._threads:
            thread.join(timeout=60)

    def snapshot(self) -> list[Answer]:
        with self._lock:
            return list(self.answers)


def test_previous_prod_is_loaded_beside_prod(gateway):
    # Either may be ready first: /readyz is ready as soon as one of them can answer.
    wait_until(
        lambda: (lambda now: now["fallback"]["version"] == "1" and now["serving_version"] == "2")(
            status(gateway)
        ),
        180,
        "prod v2 and previous-prod v1 to load",
    )
    described = status(gateway)
    assert described["serving_version"] == "2"
    assert described["breaker"]["open"] is False
    ready = httpx.get(f"{gateway['url']}/readyz", timeout=5).json()
    assert ready == ready | {"ready": True, "model_version": "2", "degraded": False}


def test_killing_prod_under_load_falls_back_then_recovers(gateway, registry):
    """Chaos: prod's model server is killed mid-traffic; previous-prod answers until prod is back."""
    upstream = urlparse(status(gateway)["upstream"])
    with Load(gateway, registry["texts"]) as load:
        time.sleep(3)
        killed_at = time.monotonic()
        pid = port_owner(upstream.port)
        assert pid is not None
        os.killpg(os.getpgid(pid), signal.SIGKILL)
        wait_until(
            lambda: any(a.at > killed_at and a.version == "1" for a in load.snapshot()),
            60,
            "fallback answers",
        )
        wait_until(
            lambda: (
                status(gateway)["upstream"] != f"{upstream.scheme}://{upstream.netloc}"
                and any(a.at > killed_at + 1 and a.version == "2" for a in load.snapshot())
            ),
            240,
            "prod restarted",
        )
        time.sleep(2)
    after = [a for a in load.answers if a.at >= killed_at]
    failed = [a for a in after if a.status != 200]
    to_fallback = min(a.at for a in after if a.version == "1") - killed_at
    fallback_answers = [a for a in after if a.version == "1"]
    back = min(a.at for a in after if a.version == "2" and a.at > killed_at + to_fallback) - killed_at
    print(
        f"\nchaos: {len(load.answers)} requests, {len(after)} after the kill, {len(failed)} failed; "
        f"previous-prod answered {len(fallback_answers)} from {to_fallback:.2f}s; prod again from {back:.1f}s"
    )
    assert len(failed) <= 2, [(a.status, a.version) for a in failed]
    assert load.answers[-1].version == "2"
    described = status(gateway)
    assert described["breaker"]["open"] is False and described["breaker"]["opened_total"] >= 1


def canary(gateway, method: str, **kwargs) -> httpx.Response:
    return httpx.request(
        method, f"{gateway['url']}/v1/canary", headers=gateway["headers"], timeout=240, **kwargs
    )


def test_a_canary_takes_a_sticky_share_and_reports_the_comparison(gateway, registry):
    started = canary(gateway, "POST", json={"percent": 20})
    assert started.status_code == 200, started.text
    assert started.json()["candidate"]["version"] == "1"
    with Load(gateway, registry["texts"], subjects=100, rate_per_s=40) as load:
        wait_until(lambda: len(load.snapshot()) >= 400, 120, "400 answers")
    answers = [a for a in load.answers if a.status == 200]
    by_subject: dict[str, set] = {}
    for answer in answers:
        by_subject.setdefault(answer.subject, set()).add(answer.version)
    assert all(len(versions) == 1 for versions in by_subject.values()), "a caller flipped between versions"
    share = sum(a.version == "1" for a in answers) / len(answers)
    # Feedback (the true label) on every fifth answer (within the rate-limit burst): live accuracy.
    with httpx.Client(timeout=30, headers=gateway["headers"]) as client:
        for answer in answers[::5]:
            true_label = registry["labels"][answer.text_index]
            given = client.post(
                f"{gateway['url']}/v1/feedback",
                json={"request_id": answer.request_id, "item_index": 0, "true_label": true_label},
            )
            assert given.status_code == 200, given.text
    wait_until(
        lambda: canary(gateway, "GET").json()["live_accuracy"]["prod"]["labelled"] > 0,
        30,
        "feedback in the log",
    )
    report = canary(gateway, "GET").json()
    print(
        f"\ncanary at 20%: {len(answers)} answers, candidate share {share:.1%}; report {json.dumps(report)}"
    )
    assert 0.08 < share < 0.35
    assert report["mode"] == "canary" and report["candidate"]["calls"] > 0 and report["prod"]["calls"] > 0
    # v1 and v2 give opposite labels: the mirrored comparison sees them disagree.
    assert report["agreement"]["texts"] > 0 and report["agreement"]["share"] < 0.5
    assert report["error_rate_test"] is not None
    live = report["live_accuracy"]
    assert live["prod"]["labelled"] + live["candidate"]["labelled"] > 0
    assert live["candidate_worse_test"] is None or 0 <= live["candidate_worse_test"]["p_value"] <= 1
    stopped = canary(gateway, "DELETE", params={"reason": "enough data"})
    assert stopped.status_code == 200 and stopped.json()["mode"] is None


def test_a_slow_canary_is_ended_automatically_with_an_audit_entry(gateway, registry):
    registry["client"].set_registered_model_alias(NAME, "dev", "3")
    started = canary(gateway, "POST", json={"percent": 50})
    assert started.status_code == 200, started.text
    with Load(gateway, registry["texts"], subjects=40, threads=4, rate_per_s=20) as load:
        wait_until(
            lambda: canary(gateway, "GET").json()["mode"] is None, 180, "the SLO guard to end the canary"
        )
        ended_at = time.monotonic()
        time.sleep(2)
    report = canary(gateway, "GET").json()
    ended = report["ended"]
    print(f"\nslow canary ended: {json.dumps(ended)}")
    assert ended["by"] == "slo-guard" and "p99 latency" in ended["reason"]
    assert all(a.version == "2" for a in load.answers if a.at > ended_at and a.status == 200)
    audit = registry["home"] / "serving" / "prod" / "canary-audit.jsonl"
    entries = [json.loads(line) for line in audit.read_text().splitlines()]
    assert entries[-1]["action"] == "stop" and entries[-1]["actor"] == "slo-guard"
    assert entries[-1]["candidate_version"] == "3"


def test_shadow_answers_from_prod_and_compares_in_the_background(gateway, registry):
    registry["client"].set_registered_model_alias(NAME, "dev", "1")
    started = canary(gateway, "POST", json={"shadow": True})
    assert started.status_code == 200, started.text
    with Load(gateway, registry["texts"], subjects=20) as load:
        wait_until(
            lambda: (canary(gateway, "GET").json()["agreement"] or {}).get("texts", 0) >= 30, 60, "shadows"
        )
    assert {a.version for a in load.answers if a.status == 200} == {"2"}
    report = canary(gateway, "DELETE").json()
    assert report["ended"]["report"]["candidate"]["calls"] >= 30
