"""serving/logs.py: one JSON object per line, request_id inside a request only; sane ids kept, others
replaced."""

from __future__ import annotations

import io
import json
import logging
from collections.abc import Iterator

import pytest
from starlette.applications import Starlette
from starlette.requests import Request
from starlette.responses import JSONResponse
from starlette.routing import Route
from starlette.testclient import TestClient

from serving.logs import (
    ROUTED_LOGGERS,
    RequestIdMiddleware,
    bound_request_id,
    configure_logging,
    is_sane_request_id,
    log_format_from,
    log_formatter,
    request_id_for,
    request_id_var,
)


@pytest.fixture()
def captured() -> Iterator[tuple[logging.Logger, io.StringIO]]:
    """A logger whose lines go, formatted as JSON, into a buffer (nothing global is touched)."""
    stream = io.StringIO()
    handler = logging.StreamHandler(stream)
    handler.setFormatter(log_formatter("json"))
    logger = logging.getLogger("tests.unit.test_logs")
    logger.handlers = [handler]
    logger.propagate = False
    logger.setLevel(logging.DEBUG)
    yield logger, stream
    logger.handlers = []
    logger.propagate = True


def lines(stream: io.StringIO) -> list[dict]:
    return [json.loads(line) for line in stream.getvalue().splitlines()]


def test_json_lines_carry_the_request_id_inside_a_request_only(captured) -> None:
    logger, stream = captured
    logger.info("outside %s", "any request")
    with bound_request_id("abc-123"):
        logger.warning("inside one")
        try:
            raise RuntimeError("boom")
        except RuntimeError:
            logger.exception("failed")
    logger.info("outside again")
    outside, inside, failed, after = lines(stream)
    assert outside["event"] == "outside any request" and "request_id" not in outside
    assert inside == inside | {"event": "inside one", "level": "warning", "request_id": "abc-123"}
    assert inside["logger"] == "tests.unit.test_logs"
    assert inside["timestamp"].endswith("Z") and "T" in inside["timestamp"]
    assert failed["request_id"] == "abc-123" and "RuntimeError: boom" in failed["exception"]
    assert "request_id" not in after
    assert request_id_var.get() is None


def test_text_format_stays_close_to_the_old_one() -> None:
    record = logging.LogRecord("serving.gateway", logging.INFO, __file__, 1, "swapped to %s", ("2",), None)
    assert log_formatter("text").format(record) == "INFO serving.gateway: swapped to 2"
    with bound_request_id("r1"):
        assert log_formatter("text").format(record) == "INFO serving.gateway: swapped to 2 [request_id=r1]"


@pytest.mark.parametrize(
    ("incoming", "kept"),
    [
        ("abc-123", True),
        ("A.b_c:d-9", True),
        ("x" * 128, True),
        ("x" * 129, False),
        ("", False),
        ("abc\n123", False),
        ("abc-123\n", False),
        ("abc 123", False),
        ('abc"}', False),
        ("ab\u00e9", False),
        (None, False),
    ],
)
def test_only_a_sane_incoming_id_is_kept(incoming: str | None, kept: bool) -> None:
    assert is_sane_request_id(incoming) is kept
    chosen = request_id_for(incoming)
    assert (chosen == incoming) is kept
    assert is_sane_request_id(chosen)


def echo_app() -> Starlette:
    async def echo(request: Request) -> JSONResponse:
        logging.getLogger("tests.unit.test_logs").info("handling")
        return JSONResponse({"request_id": request.state.request_id, "bound": request_id_var.get()})

    app = Starlette(routes=[Route("/", echo)])
    app.add_middleware(RequestIdMiddleware)
    return app


def test_the_middleware_honours_a_sane_id_and_replaces_another(captured) -> None:
    _, stream = captured
    with TestClient(echo_app()) as client:
        kept = client.get("/", headers={"X-Request-ID": "abc-123"}).json()
        replaced = client.get("/", headers={"X-Request-ID": "x" * 200}).json()
        fresh = client.get("/").json()
    assert kept == {"request_id": "abc-123", "bound": "abc-123"}
    assert replaced["request_id"] != "x" * 200 and replaced["bound"] == replaced["request_id"]
    assert is_sane_request_id(replaced["request_id"]) and is_sane_request_id(fresh["request_id"])
    assert [line["request_id"] for line in lines(stream)] == [
        "abc-123",
        replaced["request_id"],
        fresh["request_id"],
    ]


def test_a_replaced_id_is_logged_at_debug_with_the_new_id_not_the_old_value(caplog) -> None:
    with caplog.at_level(logging.DEBUG, logger="serving.logs"), TestClient(echo_app()) as client:
        answer = client.get("/", headers={"X-Request-ID": "evil injected=1"})
        client.get("/", headers={"X-Request-ID": "fine"})
    (record,) = [record for record in caplog.records if record.name == "serving.logs"]
    assert record.levelno == logging.DEBUG and "replaced" in record.getMessage()
    assert "injected" not in caplog.text and answer.headers.get("X-Request-ID") is None
    assert answer.json()["bound"] == answer.json()["request_id"]


def test_configure_logging_routes_the_root_and_uvicorn_through_one_handler() -> None:
    touched = [logging.getLogger(), *(logging.getLogger(name) for name in ROUTED_LOGGERS)]
    saved = [(logger.handlers[:], logger.level, logger.propagate) for logger in touched]
    access = logging.getLogger("uvicorn.access")
    stream = io.StringIO()
    try:
        handler = configure_logging("json", logging.INFO, stream=stream)
        assert logging.getLogger().handlers == [handler]
        assert access.propagate and not access.handlers
        access.setLevel(logging.INFO)  # as uvicorn.run(log_level="info") sets it
        with bound_request_id("r-9"):
            access.info('%s - "%s %s HTTP/%s" %d', "127.0.0.1:1", "GET", "/healthz", "1.1", 200)
        logging.getLogger("some.library").debug("below the level")
    finally:
        for logger, (handlers, level, propagate) in zip(touched, saved, strict=True):
            logger.handlers, logger.propagate = handlers, propagate
            logger.setLevel(level)
    (line,) = lines(stream)
    assert line["logger"] == "uvicorn.access" and line["request_id"] == "r-9"
    assert line["event"] == '127.0.0.1:1 - "GET /healthz HTTP/1.1" 200'


@pytest.mark.parametrize(
    ("configured", "override", "chosen"),
    [("text", None, "text"), ("text", "", "text"), ("text", "JSON", "json"), ("json", "text", "text")],
)
def test_the_environment_overrides_params(configured, override, chosen) -> None:
    assert log_format_from(configured, override) == chosen


def test_an_unknown_format_fails() -> None:
    with pytest.raises(ValueError, match="TUNELOOP_LOG_FORMAT"):
        log_format_from("text", "xml")
    with pytest.raises(ValueError, match="log format"):
        log_formatter("xml")  # type: ignore[arg-type]
