"""Locust users for benchmarks/load_chaos.py: one text per request to /v1/predict at a fixed rate.

Run by load_chaos.py as ``locust --headless``; settings come from the environment:
``TUNELOOP_API_KEY`` (scope predict), ``LOAD_TEXTS_FILE`` (one text per line) and
``LOAD_RATE_PER_USER`` (requests per second per user). Each answer is also counted under the
version that gave it (request type ``VERSION``), so the statistics show who answered when.
"""

from __future__ import annotations

import os
import random
from pathlib import Path

from locust import HttpUser, constant_throughput, task

TEXTS = Path(os.environ["LOAD_TEXTS_FILE"]).read_text(encoding="utf-8").splitlines()
API_KEY = os.environ["TUNELOOP_API_KEY"]


class GatewayCaller(HttpUser):
    wait_time = constant_throughput(float(os.environ.get("LOAD_RATE_PER_USER", "1")))

    @task
    def predict(self) -> None:
        with self.client.post(
            "/v1/predict",
            json={"text": random.choice(TEXTS)},
            headers={"X-API-Key": API_KEY},
            name="/v1/predict",
            catch_response=True,
        ) as response:
            if response.status_code != 200:
                response.failure(f"HTTP {response.status_code}: {response.text[:200]}")
                return
            version = response.headers.get("X-Model-Version", "?")
            self.environment.events.request.fire(
                request_type="VERSION",
                name=f"v{version}",
                response_time=response.elapsed.total_seconds() * 1000,
                response_length=0,
                exception=None,
                context={},
            )
