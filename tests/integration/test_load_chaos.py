"""Load and chaos with locust: steady traffic while prod's model server is killed and prod moves.

Locust runs headless on loopback for a bounded time against a real `tuneloop serve` (tiny models:
v1 previous-prod, v2 prod, v3 the version prod moves to). benchmarks/load_chaos.py does the same
with the banking77 model for minutes and writes the figures the closing notes quote.
"""

from __future__ import annotations

import json
import time

import httpx
import pytest

from benchmarks.load_chaos import run_load_chaos
from tests.support import gateway_process, sqlite_registry_with, two_label_slice

pytestmark = pytest.mark.slow

NAME = "tuneloop-chaos-test"
OVERRIDES = {
    "serving": {"breaker_failures": 2, "breaker_open_s": 2, "health_check_interval_s": 0.5, "cache_size": 0}
}


def test_steady_load_survives_a_killed_model_server_and_an_alias_move(tiny_base, tiny_adapter, tmp_path):
    home, project = tmp_path / "home", tmp_path / "project"
    uri, client = sqlite_registry_with(home, NAME, [tiny_adapter, tiny_adapter, tiny_adapter], tiny_base)
    client.set_registered_model_alias(NAME, "previous-prod", "1")
    client.set_registered_model_alias(NAME, "prod", "2")
    with gateway_process(project, NAME, uri, home, OVERRIDES) as gateway:
        deadline = time.monotonic() + 180
        while time.monotonic() < deadline:
            status = httpx.get(f"{gateway['url']}/v1/status", headers=gateway["headers"], timeout=10).json()
            if status["serving_version"] == "2" and status["fallback"]["version"] == "1":
                break
            time.sleep(0.5)
        report = run_load_chaos(
            gateway["url"],
            gateway["headers"],
            gateway["headers"]["X-API-Key"],
            client,
            NAME,
            two_label_slice()["text"].tolist(),
            rate_per_s=15,
            seconds=45,
            kill_at_s=10,
            swap_at_s=28,
            swap_to="3",
            work_dir=tmp_path,
        )
    print(f"\nload and chaos: {json.dumps(report)}")
    assert report["requests"] >= 15 * 45 * 0.6  # the stated rate was held (within locust's pacing)
    assert report["failures"] <= 2
    versions = report["answers_per_version"]
    assert versions.get("v1", 0) > 0, "previous-prod never answered while prod was down"
    assert versions.get("v3", 0) > 0, "the alias move was never served"
    recovery = report["recovery_s"]
    assert recovery["breaker_open_after_kill"] is not None
    assert recovery["prod_serving_again_after_kill"] is not None
    assert recovery["new_version_serving_after_alias_move"] is not None
