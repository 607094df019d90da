"""`tuneloop serve` end to end: a real gateway process in front of real `mlflow models serve` processes.

The registry holds three versions of a tiny model: a good one, a copy with its label map reversed (so
its answers differ visibly from the first), and a broken one that cannot load. Tests run in file order
against one gateway.
"""

from __future__ import annotations

import json
import signal
import socket
import subprocess
import sys
import threading
import time
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path

import httpx
import pandas as pd
import pytest

from serving.inference import LABELS_FILE
from serving.inference_log import read_window
from tests.support import (
    REPO_ROOT,
    gateway_process,
    reversed_label_copy,
    sqlite_registry_with,
    two_label_slice,
    wait_until,
)

pytestmark = pytest.mark.slow

NAME = "tuneloop-serving-test"
STREAM_RATE_PER_S = 30
STREAM_THREADS = 3


@pytest.fixture(scope="module")
def registry(tmp_path_factory, tiny_base, tiny_adapter) -> dict:
    """Versions 1 (good), 2 (labels reversed) and 3 (broken: one label for a two-class head); prod -> 1."""
    home = tmp_path_factory.mktemp("serving-home")
    work = tmp_path_factory.mktemp("serving-work")
    frame = two_label_slice()
    good = tiny_adapter
    flipped = reversed_label_copy(good, work / "flipped")
    broken = reversed_label_copy(good, work / "broken")
    (broken / LABELS_FILE).write_text(json.dumps(["cancel_order"]))
    uri, client = sqlite_registry_with(home, NAME, [good, flipped, broken], tiny_base)
    texts = frame["text"].tolist()[::3]
    return {"home": home, "uri": uri, "client": client, "texts": texts}


@pytest.fixture(scope="module")
def gateway(registry, tmp_path_factory):
    project = tmp_path_factory.mktemp("serving-project")
    with gateway_process(project, NAME, registry["uri"], registry["home"]) as running:
        yield running


@dataclass
class Answer:
    sent_at: float
    status: int
    version: str | None
    text_index: int
    # What the answer said: the predicted label (/v1/predict), the generated text (/v1/generate).
    label: str | None
    error: str | None = None


def first_label(body: dict) -> str:
    return body["predictions"][0]["label"]


class RequestStream:
    """Steady traffic through the stable address from a few threads, every answer recorded.

    One text per request to ``path``; ``read`` takes what the answer said from its JSON body.
    """

    def __init__(
        self,
        url: str,
        texts: list[str],
        rate_per_s: float,
        threads: int,
        headers: dict,
        path: str = "/v1/predict",
        read: Callable[[dict], str] = first_label,
    ) -> None:
        self.url, self.texts, self.headers, self.path, self.read = url, texts, headers, path, read
        self.interval = threads / rate_per_s
        self.answers: list[Answer] = []
        self._stop = threading.Event()
        self._lock = threading.Lock()
        self._threads = [threading.Thread(target=self._send, args=(i,), daemon=True) for i in range(threads)]

    def _send(self, offset: int) -> None:
        count = offset
        with httpx.Client(timeout=30, headers=self.headers) as client:
            while not self._stop.is_set():
                started = time.monotonic()
                index = count % len(self.texts)
                count += 1
                try:
                    response = client.post(f"{self.url}{self.path}", json={"text": self.texts[index]})
                    body = response.json()
                    answer = Answer(
                        started,
                        response.status_code,
                        body.get("model_version"),
                        index,
                        self.read(body) if response.status_code == 200 else None,
                        None if response.status_code == 200 else response.text,
                    )
                except (httpx.HTTPError, ValueError, KeyError) as error:
                    answer = Answer(started, 0, None, index, None, repr(error))
                with self._lock:
                    self.answers.append(answer)
                time.sleep(max(0.0, self.interval - (time.monotonic() - started)))

    def __enter__(self) -> RequestStream:
        for thread in self._threads:
            thread.start()
        return self

    def __exit__(self, *exc) -> None:
        self._stop.set()
        for thread in self._threads:
            thread.join(timeout=60)


def served_status(gateway) -> dict:
    return httpx.get(f"{gateway['url']}/v1/status", headers=gateway["headers"], timeout=10).json()


def test_the_stable_address_serves_the_prod_version_with_top_k(gateway, registry):
    response = httpx.post(
        f"{gateway['url']}/v1/predict",
        json={"texts": registry["texts"][:3], "top_k": 2},
        headers=gateway["headers"],
        timeout=30,
    )
    assert response.status_code == 200, response.text
    body = response.json()
    assert body["model_version"] == "1" and body["model_name"] == NAME
    assert len(body["predictions"]) == 3
    for prediction in body["predictions"]:
        assert [alt["label"] for alt in prediction["top_k"]][0] == prediction["label"]
        assert len(prediction["top_k"]) == 2
    ready = httpx.get(f"{gateway['url']}/readyz", timeout=10).json()
    assert ready == {
        "ready": True,
        "model_name": NAME,
        "alias": "prod",
        "model_version": "1",
        "breaker_open": False,
        "degraded": False,
    }
    # The model server's log reads as a log: no progress bar redrawn in it.
    server_logs = list(
        (Path(gateway["env"]["TUNELOOP_HOME"]) / "serving" / "prod").glob("model-server-v1-*.log")
    )
    assert server_logs and all("Loading weights" not in log.read_text() for log in server_logs)


def test_bad_requests_get_a_4xx_that_says_what_is_wrong(gateway):
    auth = {"headers": gateway["headers"], "timeout": 10}
    both = httpx.post(f"{gateway['url']}/v1/predict", json={"text": "a", "texts": ["b"]}, **auth)
    assert both.status_code == 422 and "exactly one of `text`" in both.text
    wrong_type = httpx.post(f"{gateway['url']}/v1/predict", json={"texts": "not a list"}, **auth)
    assert wrong_type.status_code == 422 and "texts" in wrong_type.text
    mlflow_protocol = httpx.post(f"{gateway['url']}/invocations", json={"inputs": {"txt": ["x"]}}, **auth)
    assert mlflow_protocol.status_code == 400


def test_alias_move_under_steady_traffic_loses_no_request(gateway, registry):
    baseline = httpx.post(
        f"{gateway['url']}/v1/predict",
        json={"texts": registry["texts"]},
        headers=gateway["headers"],
        timeout=30,
    ).json()
    v1_labels = [p["label"] for p in baseline["predictions"]]
    stream = RequestStream(
        gateway["url"], registry["texts"], STREAM_RATE_PER_S, STREAM_THREADS, gateway["headers"]
    )
    with stream:
        time.sleep(3)
        moved_at = time.monotonic()
        registry["client"].set_registered_model_alias(NAME, "prod", "2")
        wait_until(lambda: any(a.version == "2" for a in list(stream.answers)), 180, "answers from v2")
        first_v2 = min(a.sent_at for a in list(stream.answers) if a.version == "2")
        time.sleep(3)
    answers = stream.answers
    duration = answers[-1].sent_at - answers[0].sent_at
    failures = [a for a in answers if a.status != 200]
    assert failures == [], failures[:5]
    rate = len(answers) / duration
    assert rate >= 20, f"the stream only reached {rate:.1f} requests/s"
    after = [a for a in answers if a.sent_at > first_v2]
    assert after and all(a.version == "2" for a in after), "an answer from v1 came after v2 took over"
    # v2 has the label map reversed: the new version really is the one answering.
    assert all(a.label != v1_labels[a.text_index] for a in answers if a.version == "2")
    assert all(a.label == v1_labels[a.text_index] for a in answers if a.version == "1")
    swap = served_status(gateway)["swaps"][-1]
    assert swap["ok"] and swap["to_version"] == "2" and swap["from_version"] == "1" and swap["drained"]
    print(
        f"\nswap under load: {len(answers)} requests at {rate:.1f}/s, 0 failed; "
        f"alias move -> first v2 answer {first_v2 - moved_at:.2f}s; "
        f"new server ready in {swap['ready_s']:.2f}s; swap incl. drain {swap['total_s']:.2f}s"
    )


def test_a_version_that_cannot_start_leaves_the_old_one_serving(gateway, registry):
    with RequestStream(gateway["url"], registry["texts"], 20, 2, gateway["headers"]) as stream:
        registry["client"].set_registered_model_alias(NAME, "prod", "3")
        wait_until(
            lambda: any(s["to_version"] == "3" and s["error"] for s in served_status(gateway)["swaps"]),
            240,
            "the failed start of v3",
        )
    assert stream.answers and all(a.status == 200 and a.version == "2" for a in stream.answers)
    status = served_status(gateway)
    assert status["serving_version"] == "2"
    failed = status["swaps"][-1]
    assert failed["to_version"] == "3" and not failed["ok"] and "exited" in failed["error"]
    assert "v3 failed to start (v2 keeps serving)" in gateway["log"].read_text()


def test_status_command_shows_what_the_server_serves(gateway):
    env = {**gateway["env"], "TUNELOOP_PROD_URL": gateway["url"], "TUNELOOP_DEV_URL": "http://127.0.0.1:9"}
    result = subprocess.run(
        [str(Path(sys.executable).parent / "tuneloop"), "status"],
        cwd=gateway["project"],
        env=env,
        capture_output=True,
        text=True,
        timeout=120,
    )
    assert result.returncode == 0, result.stderr
    assert f"{NAME}@prod: v3" in result.stdout
    assert f"server prod at {gateway['url']}: serving v2" in result.stdout
    assert "server dev at http://127.0.0.1:9: not running" in result.stdout


def test_simulated_concept_drift_traffic_lands_in_the_log_with_its_feedback(gateway):
    result = subprocess.run(
        [
            str(Path(sys.executable).parent / "tuneloop"),
            "simulate-traffic",
            "--scenario",
            "concept-drift",
            "--requests",
            "40",
            "--rate",
            "20",
            "--url",
            gateway["url"],
        ],
        cwd=REPO_ROOT,
        env={**gateway["env"], "TUNELOOP_API_KEY": gateway["headers"]["X-API-Key"]},
        capture_output=True,
        text=True,
        timeout=300,
    )
    assert result.returncode == 0, result.stderr[-2000:]
    assert "concept-drift: 40 requests (40 texts), 40 answered" in result.stdout
    assert "40 feedback" in result.stdout
    drifted = pd.read_csv(REPO_ROOT / "data/sample/drifted.csv")
    log_url = f"sqlite:///{gateway['env']['TUNELOOP_HOME']}/inference_log.db"
    deadline = time.monotonic() + 30
    while time.monotonic() < deadline:
        window = read_window(log_url, last_n=40)
        if window["true_label"].notna().sum() == 40:
            break
        time.sleep(0.5)
    assert window["true_label"].notna().sum() == 40
    assert set(window["true_label"]) <= set(drifted["intent"])
    assert set(window["model_version"]) == {"2"}


def test_shutdown_stops_the_model_server_too(gateway):
    upstream = served_status(gateway)["upstream"]
    host, port = upstream.removeprefix("http://").split(":")
    gateway["process"].send_signal(signal.SIGTERM)
    # uvicorn re-raises the signal after its graceful shutdown, as a well-behaved daemon does.
    assert gateway["process"].wait(timeout=60) in (0, -signal.SIGTERM)
    assert "Application shutdown complete" in gateway["log"].read_text()
    with pytest.raises(OSError), socket.create_connection((host, int(port)), timeout=2):
        pass
