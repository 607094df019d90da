"""Limits: the token bucket's arithmetic (charged per text), control characters, and every body refusal
as a 4xx that says what was wrong."""

# No `from __future__ import annotations`: FastAPI resolves the endpoint annotations of the fixture's app.
import pytest
from fastapi import FastAPI, Request
from fastapi.exceptions import RequestValidationError
from fastapi.testclient import TestClient
from pydantic import BaseModel, ConfigDict

from serving.limits import (
    Refusal,
    TextLimits,
    TokenBucketLimiter,
    check_no_control_characters,
    read_json_model,
    refusal_handler,
    unexpected_error_handler,
    validation_error_handler,
)

MAX_BYTES = 200


class FakeClock:
    def __init__(self) -> None:
        self.now = 1000.0

    def __call__(self) -> float:
        return self.now


def test_bucket_allows_a_burst_then_the_steady_rate() -> None:
    clock = FakeClock()
    limiter = TokenBucketLimiter(rate_per_s=2.0, burst=3, clock=clock)
    assert [limiter.try_acquire("k") for _ in range(3)] == [0.0, 0.0, 0.0]
    assert limiter.try_acquire("k") == pytest.approx(0.5)
    clock.now += 0.5
    assert limiter.try_acquire("k") == 0.0
    assert limiter.try_acquire("k") > 0
    # Another key has its own bucket.
    assert limiter.try_acquire("other") == 0.0
    # Refill never exceeds the burst.
    clock.now += 3600
    assert [limiter.try_acquire("k") for _ in range(4)][-1] > 0


def test_over_the_limit_is_429_with_retry_after_in_whole_seconds() -> None:
    clock = FakeClock()
    limiter = TokenBucketLimiter(rate_per_s=0.25, burst=1, clock=clock)
    limiter.check("k")
    with pytest.raises(Refusal) as refused:
        limiter.check("k")
    assert refused.value.status == 429
    assert refused.value.headers == {"Retry-After": "4"}
    assert "rate limit" in refused.value.detail


def test_a_batch_costs_one_token_per_text() -> None:
    clock = FakeClock()
    limiter = TokenBucketLimiter(rate_per_s=2.0, burst=10, clock=clock)
    limiter.check("k", 8)
    with pytest.raises(Refusal) as refused:
        limiter.check("k", 3)
    assert refused.value.status == 429 and refused.value.headers == {"Retry-After": "1"}
    assert "texts/s" in refused.value.detail and "needs 3" in refused.value.detail
    limiter.check("k", 2)  # what is left is still usable by a smaller batch
    clock.now += 5
    limiter.check("k", 10)


def test_a_batch_larger_than_the_burst_is_422_not_an_endless_429() -> None:
    limiter = TokenBucketLimiter(rate_per_s=100.0, burst=5, clock=FakeClock())
    with pytest.raises(Refusal) as refused:
        limiter.check("k", 6)
    assert refused.value.status == 422 and refused.value.error == "batch_too_large"
    assert "at most 5" in refused.value.detail


def test_asking_does_not_take_tokens() -> None:
    limiter = TokenBucketLimiter(rate_per_s=1.0, burst=1, clock=FakeClock())
    for _ in range(3):
        limiter.check("k", take=False)
    limiter.check("k")
    with pytest.raises(Refusal):
        limiter.check("k", take=False)


def test_idle_buckets_are_forgotten_past_the_key_cap(monkeypatch: pytest.MonkeyPatch) -> None:
    clock = FakeClock()
    limiter = TokenBucketLimiter(rate_per_s=1.0, burst=1, clock=clock)
    monkeypatch.setattr(TokenBucketLimiter, "MAX_TRACKED_KEYS", 3)
    for key in "abc":
        limiter.try_acquire(key)
    clock.now += 10
    limiter.try_acquire("d")
    assert set(limiter._buckets) == {"d"}


class Echo(BaseModel):
    model_config = ConfigDict(extra="forbid")
    texts: list[str]


@pytest.fixture()
def client() -> TestClient:
    app = FastAPI()
    app.add_exception_handler(Refusal, refusal_handler)
    app.add_exception_handler(RequestValidationError, validation_error_handler)
    app.add_exception_handler(Exception, unexpected_error_handler)
    limits = TextLimits(max_text_chars=10, max_batch_size=2)

    @app.post("/echo")
    async def echo(request: Request) -> dict:
        body = await read_json_model(request, Echo, MAX_BYTES)
        limits.check(body.texts)
        return {"texts": body.texts}

    @app.post("/typed")
    async def typed(body: Echo) -> dict:
        return {"texts": body.texts}

    @app.get("/boom")
    async def boom() -> dict:
        raise RuntimeError("secret internals /srv/app.py line 42")

    return TestClient(app, raise_server_exceptions=False)


def test_valid_body_passes(client: TestClient) -> None:
    response = client.post("/echo", json={"texts": ["héllo", "wörld"]})
    assert response.status_code == 200
    assert response.json() == {"texts": ["héllo", "wörld"]}


def test_tab_and_newline_are_the_control_characters_allowed(client: TestClient) -> None:
    response = client.post("/echo", json={"texts": ["a\tb", "c\nd"]})
    assert response.status_code == 200, response.text


def test_control_character_check_names_the_field() -> None:
    check_no_control_characters("fine\ttext\n", "true_label")
    with pytest.raises(Refusal) as refused:
        check_no_control_characters("cancel\x00order", "true_label")
    assert refused.value.status == 400
    assert refused.value.detail.startswith("true_label contains the control character U+0000 at position 6")


@pytest.mark.parametrize(
    ("kwargs", "status", "error", "says"),
    [
        (
            {"content": b'{"texts": ["a"]}', "headers": {"content-type": "text/plain"}},
            415,
            "unsupported_media_type",
            "text/plain",
        ),
        ({"content": b'{"texts": ["a"]}'}, 415, "unsupported_media_type", "none"),
        (
            {"content": b'{"texts": ["a"', "headers": {"content-type": "application/json"}},
            400,
            "invalid_json",
            "not valid JSON",
        ),
        (
            {"content": b'{"texts": ["caf\xe9"]}', "headers": {"content-type": "application/json"}},
            400,
            "invalid_utf8",
            "UTF-8",
        ),
        ({"json": {"texts": "not a list"}}, 422, "invalid_request", "schema"),
        ({"json": {"texts": ["a"], "extra": 1}}, 422, "invalid_request", "schema"),
        ({"json": {"texts": ["a", "b", "c"]}}, 422, "batch_too_large", "at most 2"),
        ({"json": {"texts": ["short", "much too long"]}}, 422, "text_too_long", "text 1 has 13 characters"),
        ({"json": {"texts": ["  "]}}, 422, "empty_text", "empty"),
        ({"json": {"texts": []}}, 422, "empty_batch", "no text"),
        (
            {"json": {"texts": ["ok", "a\x00b"]}},
            400,
            "control_character",
            "text 1 contains the control character U+0000 at position 1",
        ),
        ({"json": {"texts": ["\x1b[31mred"]}}, 400, "control_character", "U+001B at position 0"),
        ({"json": {"texts": ["a\rb"]}}, 400, "control_character", "U+000D"),
        ({"json": {"texts": ["del\x7f"]}}, 400, "control_character", "U+007F"),
        ({"json": {"texts": ["c1\x85"]}}, 400, "control_character", "U+0085"),
        ({"json": {"texts": ["x" * 9] * 30}}, 413, "body_too_large", f"{MAX_BYTES} bytes"),
    ],
)
def test_each_refusal_is_a_4xx_that_says_why(
    client: TestClient, kwargs: dict, status: int, error: str, says: str
) -> None:
    response = client.post("/echo", **kwargs)
    assert response.status_code == status
    body = response.json()
    assert body["error"] == error
    assert says in body["detail"] or says in str(body.get("problems"))


def test_streamed_body_over_the_limit_is_refused_without_content_length(client: TestClient) -> None:
    def chunks():
        yield b'{"texts": ["'
        for _ in range(50):
            yield b"xxxxxxxxxx"
        yield b'"]}'

    response = client.post("/echo", content=chunks(), headers={"content-type": "application/json"})
    assert response.status_code == 413
    assert response.json()["error"] == "body_too_large"


def test_schema_errors_do_not_echo_the_input(client: TestClient) -> None:
    response = client.post("/echo", json={"texts": [{"secret": "4111 1111 1111 1111"}]})
    assert response.status_code == 422
    assert "4111" not in response.text


def test_fastapi_own_validation_errors_use_the_refusal_format(client: TestClient) -> None:
    response = client.post("/typed", json={"texts": ["ok", {"card": "4111 1111 1111 1111"}]})
    assert response.status_code == 422
    body = response.json()
    assert body["error"] == "invalid_request" and body["problems"][0]["location"] == "body.texts.1"
    assert "4111" not in response.text


def test_a_bug_is_a_json_500_without_a_stack_trace(client: TestClient) -> None:
    response = client.get("/boom")
    assert response.status_code == 500
    assert response.json()["error"] == "internal_error"
    assert "secret internals" not in response.text and "Traceback" not in response.text
