"""Schemathesis against the live gateway (uvicorn, a real `mlflow models serve` behind it), from its own
OpenAPI document: no generated request may get a 5xx, and every answer must match the schema.

Each operation gets ``FUZZ_EXAMPLES`` valid and ``FUZZ_EXAMPLES`` invalid requests (Hypothesis,
derandomized so a failure reproduces), sent with an ``admin`` API key so every endpoint is reached.
With ``TUNELOOP_FUZZ_REPORT`` set, a JSON summary (requests, 5xx, schema violations) is written there.
"""

from __future__ import annotations

import json
import os
import threading
import time
from collections import Counter
from pathlib import Path

import hypothesis
import pytest
import requests
import schemathesis
import uvicorn
from schemathesis import GenerationMode
from schemathesis.checks import not_a_server_error
from schemathesis.core.failures import FailureGroup
from schemathesis.specs.openapi.checks import response_schema_conformance

from serving.auth import ApiKeyStore, Authenticator, create_api_key
from serving.gateway import create_app
from serving.inference_log import InferenceLogWriter
from serving.model_server import free_port
from serving.routing import Backend, BackendPool
from tests.integration.test_gateway_security import (  # noqa: F401 - fixtures reused: one tiny model, one server
    LABELS,
    NAME,
    model_server,
    registry,
)
from tests.support import settings

pytestmark = pytest.mark.slow

FUZZ_EXAMPLES = 50
REPORT_ENV = "TUNELOOP_FUZZ_REPORT"


@pytest.fixture(scope="module")
def live_gateway(model_server, tmp_path_factory):  # noqa: F811 - the imported fixture, requested
    """The gateway app served by uvicorn on a free loopback port, as `tuneloop serve` runs it."""
    home = tmp_path_factory.mktemp("fuzz-home")
    key = create_api_key(home / "api_keys.json", "fuzzer", ["admin"])
    pool = BackendPool(NAME, "prod")
    pool.switch(Backend("1", model_server.url))
    app = create_app(
        pool,
        authenticator=Authenticator(api_keys=ApiKeyStore(home / "api_keys.json")),
        inference_log=InferenceLogWriter(f"sqlite:///{home / 'inference_log.db'}", flush_interval_s=0.05),
        labels=LABELS,
        # params.yaml's limits; only the rate is lifted, so that what is fuzzed is the input, not the bucket.
        settings=settings("gateway", rate_limit_per_s=100_000, rate_limit_burst=100_000),
        default_top_k=settings("serving").default_top_k,
        upstream_timeout_s=settings("serving").request_timeout_s,
    )
    port = free_port()
    server = uvicorn.Server(uvicorn.Config(app, host="127.0.0.1", port=port, log_level="warning"))
    thread = threading.Thread(target=server.run, daemon=True)
    thread.start()
    deadline = time.monotonic() + 30
    while not server.started:
        assert thread.is_alive() and time.monotonic() < deadline, "the gateway did not start"
        time.sleep(0.05)
    try:
        yield {"url": f"http://127.0.0.1:{port}", "headers": {"X-API-Key": key}}
    finally:
        server.should_exit = True
        thread.join(timeout=60)


def _failure_titles(case, response, check) -> list[str]:
    try:
        case.validate_response(response, checks=[check])
    except FailureGroup as group:
        return [f"{failure.title}: {failure.message[:300]}" for failure in group.exceptions]
    return []


class Fuzzer:
    """Sends generated requests to one gateway and keeps the tally."""

    def __init__(self, url: str, headers: dict[str, str], session: requests.Session) -> None:
        self.url, self.headers, self.session = url, headers, session
        self.statuses: Counter[str] = Counter()
        self.server_errors: list[dict] = []
        self.violations: list[dict] = []
        self.not_sent: Counter[str] = Counter()
        self.nothing_to_negate: list[str] = []

    def send(self, case, label: str) -> None:
        try:
            response = case.call(base_url=self.url, session=self.session, headers=self.headers, timeout=60)
        except requests.RequestException as error:  # e.g. a header value the HTTP client will not send
            self.not_sent[type(error).__name__] += 1
            return
        self.statuses[f"{label} {response.status_code}"] += 1
        for why in _failure_titles(case, response, not_a_server_error):
            self.server_errors.append({"operation": label, "status": response.status_code, "why": why})
        for why in _failure_titles(case, response, response_schema_conformance):
            self.violations.append({"operation": label, "status": response.status_code, "why": why})

    def run(self, operation, mode: GenerationMode) -> None:
        @hypothesis.settings(
            max_examples=FUZZ_EXAMPLES,
            deadline=None,
            database=None,
            derandomize=True,
            phases=[hypothesis.Phase.explicit, hypothesis.Phase.generate],
            suppress_health_check=list(hypothesis.HealthCheck),
        )
        @hypothesis.given(case=operation.as_strategy(generation_mode=mode))
        def exercise(case) -> None:
            self.send(case, operation.label)

        try:
            exercise()
        except hypothesis.errors.Unsatisfiable:
            # An operation without parameters or body (GET /healthz) has no invalid request to make.
            if mode is not GenerationMode.NEGATIVE:
                raise
            self.nothing_to_negate.append(operation.label)


def fuzz(url: str, headers: dict[str, str]) -> dict:
    """Valid and invalid requests for every operation in the gateway's OpenAPI; the tally as a dict."""
    schema = schemathesis.openapi.from_url(f"{url}/openapi.json", timeout=10)
    started = time.monotonic()
    operations = []
    with requests.Session() as session:
        fuzzer = Fuzzer(url, headers, session)
        for result in schema.get_all_operations():
            operation = result.ok()
            operations.append(operation.label)
            for mode in (GenerationMode.POSITIVE, GenerationMode.NEGATIVE):
                fuzzer.run(operation, mode)
    return {
        "schemathesis": schemathesis.__version__,
        "operations": operations,
        "examples_per_operation_and_mode": FUZZ_EXAMPLES,
        "requests_sent": sum(fuzzer.statuses.values()),
        "not_sent_by_the_client": dict(fuzzer.not_sent),
        "operations_without_invalid_input": fuzzer.nothing_to_negate,
        "server_errors_5xx": len(fuzzer.server_errors),
        "schema_violations": len(fuzzer.violations),
        "seconds": round(time.monotonic() - started, 1),
        "statuses": dict(sorted(fuzzer.statuses.items())),
        "server_error_examples": fuzzer.server_errors[:10],
        "schema_violation_examples": fuzzer.violations[:10],
    }


def test_no_generated_request_gets_a_5xx_or_breaks_the_schema(live_gateway) -> None:
    summary = fuzz(live_gateway["url"], live_gateway["headers"])
    if os.environ.get(REPORT_ENV):
        Path(os.environ[REPORT_ENV]).write_text(json.dumps(summary, indent=2) + "\n")
    print("\nfuzz:", json.dumps({k: v for k, v in summary.items() if not k.endswith("examples")}))
    assert summary["requests_sent"] >= len(summary["operations"]) * FUZZ_EXAMPLES
    assert summary["server_errors_5xx"] == 0, json.dumps(summary["server_error_examples"], indent=2)
    assert summary["schema_violations"] == 0, json.dumps(summary["schema_violation_examples"], indent=2)
    assert summary["seconds"] < 60, f"fuzzing took {summary['seconds']} s"
