"""One request id from the caller's header to the answer, the inference log, the JSON log lines and the
model server; an unsafe incoming id is replaced, never echoed. A real `mlflow models serve` behind."""

from __future__ import annotations

import io
import json
import logging
from collections.abc import Iterator

import httpx
import pytest

from serving.inference_log import read_window
from serving.logs import ROUTED_LOGGERS, configure_logging, is_sane_request_id
from tests.integration.test_gateway_security import (  # noqa: F401 - fixtures reused: server, keys, log URL
    db_url,
    keys,
    make_gateway,
    model_server,
    registry,
)

pytestmark = pytest.mark.slow

# Loggers configure_logging touches besides the root: put back as they were after each test.
_TOUCHED = (
    "uvicorn",
    "uvicorn.error",
    "uvicorn.access",
    "uvicorn.asgi",
    "mlflow",
    "sqlalchemy.engine",
    "alembic",
)


@pytest.fixture()
def json_log() -> Iterator[io.StringIO]:
    """The process's logging as `tuneloop serve` sets it up with `log_format: json`, into a buffer."""
    # The loggers configure_logging touches: put back as they were after the test.
    loggers = [logging.getLogger(), *(logging.getLogger(name) for name in ROUTED_LOGGERS)]
    saved = [(logger.handlers[:], logger.level, logger.propagate) for logger in loggers]
    stream = io.StringIO()
    configure_logging("json", logging.DEBUG, stream=stream)
    try:
        yield stream
    finally:
        for logger, (handlers, level, propagate) in zip(loggers, saved, strict=True):
            logger.handlers, logger.propagate = handlers, propagate
            logger.setLevel(level)


def log_lines(stream: io.StringIO) -> list[dict]:
    # Every line must be one JSON object: json.loads fails the test otherwise.
    return [json.loads(line) for line in stream.getvalue().splitlines()]


def test_the_callers_request_id_goes_everywhere(model_server, keys, db_url, json_log) -> None:  # noqa: F811
    client, _ = make_gateway(model_server, keys, db_url)
    forwarded: list[str | None] = []

    async def record(request: httpx.Request) -> None:
        forwarded.append(request.headers.get("X-Request-ID"))

    body = {"text": "where is my order"}
    with client:
        client.app.state.http.event_hooks["request"].append(record)
        answered = client.post(
            "/v1/predict", json=body, headers={"X-API-Key": keys["predict"], "X-Request-ID": "abc-123"}
        )
        refused = client.post(
            "/v1/predict", json=body, headers={"X-API-Key": "nope", "X-Request-ID": "r:456"}
        )
    assert answered.status_code == 200, answered.text
    assert answered.headers["X-Request-ID"] == "abc-123" and answered.json()["request_id"] == "abc-123"
    assert forwarded == ["abc-123"]
    assert read_window(db_url)["request_id"].tolist() == ["abc-123"]
    assert refused.status_code == 401
    assert refused.headers["X-Request-ID"] == "r:456" and refused.json()["request_id"] == "r:456"

    lines = log_lines(json_log)
    upstream = [line for line in lines if line["logger"] == "httpx"]  # httpx logs each call at INFO
    assert upstream and all(line["request_id"] == "abc-123" for line in upstream)
    auth = [line for line in lines if line["event"].startswith("authentication failed")]
    assert len(auth) == 1 and auth[0]["request_id"] == "r:456" and auth[0]["level"] == "warning"
    # The lifespan's lines (the log writer closing) belong to no request.
    closed = [line for line in lines if line["event"].startswith("inference log closed")]
    assert len(closed) == 1 and "request_id" not in closed[0]
    assert all({"timestamp", "level", "logger", "event"} <= set(line) for line in lines)


# (A line break or non-ASCII cannot be sent through the test client; tests/unit/test_logs.py covers them.)
@pytest.mark.parametrize("incoming", ["x" * 200, "abc 123", 'abc"}, "admin": true', "a/../b;c"])
def test_an_unsafe_request_id_is_replaced_not_echoed(model_server, keys, db_url, json_log, incoming) -> None:  # noqa: F811
    client, _ = make_gateway(model_server, keys, db_url)
    with client:
        answered = client.post(
            "/v1/predict",
            json={"text": "where is my order"},
            headers={"X-API-Key": keys["predict"], "X-Request-ID": incoming},
        )
    assert answered.status_code == 200, answered.text
    request_id = answered.headers["X-Request-ID"]
    assert request_id != incoming and is_sane_request_id(request_id)
    assert answered.json()["request_id"] == request_id
    assert read_window(db_url)["request_id"].tolist() == [request_id]
    replaced = [line for line in log_lines(json_log) if "not a sane id; replaced" in line["event"]]
    assert len(replaced) == 1 and replaced[0]["request_id"] == request_id
    assert incoming not in json_log.getvalue()
