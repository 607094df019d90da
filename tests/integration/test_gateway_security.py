"""The gateway's front door with a real `mlflow models serve` behind it: auth, limits, log, feedback, metrics.

Both ways in to a prediction (``/v1/predict`` and MLflow's ``/invocations``, JSON or CSV) obey the same
limits, are charged per text and are logged with the caller's principal; feedback is only accepted
on the caller's own requests.

Two ways in, both with a real model server behind the gateway:
- the app in process (``TestClient`` runs its lifespan: the inference log starts and is flushed on
  exit), pointed at a model server this module starts; cheap, and settings (rate limits) per test;
- ``tuneloop serve`` as a user runs it, for the burst: ≥ 2,000 requests, SIGTERM before the last
  answers are in, then every answered request must be in the inference log.
"""

from __future__ import annotations

import asyncio
import datetime as dt
import signal
import subprocess
import sys
import time
from pathlib import Path

import httpx
import jwt
import pytest
import yaml
from fastapi.testclient import TestClient

from serving.auth import (
    UNAUTHORIZED_DETAIL,
    ApiKeyStore,
    Authenticator,
    JwtSettings,
    JwtVerifier,
    create_api_key,
)
from serving.gateway import SUBJECT_HEADER, create_app
from serving.inference_log import InferenceLogWriter, erase, read_window
from serving.model_server import free_port, start_model_server, wait_until_ready
from serving.pii import CARD_MASK, EMAIL_MASK, IBAN_MASK, PHONE_MASK
from serving.routing import Backend, BackendPool
from tests.support import (
    REPO_ROOT,
    settings,
    sqlite_registry_with,
    two_label_slice,
    venv_env,
    wait_for,
)
from tuneloop.config import load_params

pytestmark = pytest.mark.slow

NAME = "tuneloop-gateway-test"
ISSUER = "https://idp.example.test/"
AUDIENCE = "tuneloop-gateway"
JWT_SECRET = "test-signing-secret-that-is-long-enough"
LABELS = load_params(REPO_ROOT / "params.yaml").data.labels
# Enough that more than 2,000 are answered before the shutdown signal.
BURST_REQUESTS = 2_100
SIGTERM_BEFORE_END = 60
BURST_CONCURRENCY = 24


@pytest.fixture(scope="module")
def registry(tmp_path_factory, tiny_base, tiny_adapter) -> dict:
    """Version 1 of a tiny two-intent model, alias prod -> 1, in a SQLite registry."""
    home = tmp_path_factory.mktemp("gateway-home")
    frame = two_label_slice()
    adapter = tiny_adapter
    uri, _ = sqlite_registry_with(home, NAME, [adapter], tiny_base)
    return {"home": home, "uri": uri, "texts": frame["text"].tolist()}


@pytest.fixture(scope="module")
def model_server(registry, tmp_path_factory):
    server = start_model_server(
        f"models:/{NAME}/1",
        "1",
        log_dir=tmp_path_factory.mktemp("model-server-logs"),
        extra_env={"MLFLOW_TRACKING_URI": registry["uri"], "HF_HUB_OFFLINE": "1"},
    )
    try:
        wait_until_ready(server, 180)
        yield server
    finally:
        server.stop()


@pytest.fixture()
def keys(tmp_path: Path) -> dict:
    path = tmp_path / "api_keys.json"
    return {
        "path": path,
        "predict": create_api_key(path, "client", ["predict"]),
        "feedback": create_api_key(path, "labeller", ["feedback"]),
        "admin": create_api_key(path, "ops", ["admin"]),
        "both": create_api_key(path, "app", ["predict", "feedback"]),
    }


def make_gateway(
    model_server, keys: dict, db_url: str, drift_summary_path: Path | None = None, **limits
) -> tuple[TestClient, InferenceLogWriter]:
    pool = BackendPool(NAME, "prod")
    pool.switch(Backend("1", model_server.url))
    authenticator = Authenticator(
        api_keys=ApiKeyStore(keys["path"]),
        jwt_verifier=JwtVerifier(
            JwtSettings(issuer=ISSUER, audience=AUDIENCE, algorithms=("HS256",), key=JWT_SECRET, leeway_s=0)
        ),
    )
    writer = InferenceLogWriter(db_url, flush_interval_s=0.05)
    app = create_app(
        pool,
        authenticator=authenticator,
        inference_log=writer,
        labels=LABELS,
        settings=settings(
            "gateway", **({"max_text_chars": 200, "max_batch_size": 8, "max_body_bytes": 20_000} | limits)
        ),
        drift_summary_path=drift_summary_path,
        default_top_k=settings("serving").default_top_k,
        upstream_timeout_s=settings("serving").request_timeout_s,
    )
    return TestClient(app, raise_server_exceptions=False), writer


@pytest.fixture()
def db_url(tmp_path: Path) -> str:
    return f"sqlite:///{tmp_path / 'inference_log.db'}"


def token(scope: str = "predict", expires_in_s: int = 300) -> str:
    now = dt.datetime.now(dt.UTC)
    claims = {"iss": ISSUER, "aud": AUDIENCE, "sub": "svc", "exp": now + dt.timedelta(seconds=expires_in_s)}
    return jwt.encode(claims | {"scope": scope}, JWT_SECRET, algorithm="HS256")


def bearer(credential: str) -> dict:
    return {"Authorization": f"Bearer {credential}"}


def test_every_auth_path(model_server, keys, db_url) -> None:
    client, _ = make_gateway(model_server, keys, db_url)
    body = {"text": "where is my order"}
    with client:
        cases = {
            "none": ({}, 401),
            "bad key": ({"X-API-Key": keys["predict"][:-3] + "xyz"}, 401),
            "unknown key id": (bearer("tlk_000000000000_" + "a" * 43), 401),
            "expired JWT": (bearer(token(expires_in_s=-120)), 401),
            "JWT for another audience": (
                bearer(jwt.encode({"iss": ISSUER, "aud": "x", "exp": 4102444800}, JWT_SECRET)),
                401,
            ),
            "wrong scope (key)": ({"X-API-Key": keys["feedback"]}, 403),
            "wrong scope (JWT)": (bearer(token("feedback")), 403),
            "good key": ({"X-API-Key": keys["predict"]}, 200),
            "good key as bearer": (bearer(keys["both"]), 200),
            "good JWT": (bearer(token("predict feedback")), 200),
            "admin key": ({"X-API-Key": keys["admin"]}, 200),
        }
        for case, (headers, status) in cases.items():
            response = client.post("/v1/predict", json=body, headers=headers)
            assert response.status_code == status, (case, response.text)
            assert response.headers["X-Request-ID"]
            if status == 401:
                assert response.headers["WWW-Authenticate"].startswith("Bearer"), case
            if status >= 400:
                assert response.json()["error"] in ("unauthorized", "forbidden"), case
                assert response.json()["request_id"] == response.headers["X-Request-ID"]
            else:
                assert response.json()["request_id"] == response.headers["X-Request-ID"]
                assert response.json()["model_version"] == "1"
        expired = client.post("/v1/predict", json=body, headers=bearer(token(expires_in_s=-60)))
        # The same answer as any other bad credential: why it failed is in the server log only.
        assert expired.json()["detail"] == UNAUTHORIZED_DETAIL and "expired" not in expired.text
        # Open: health, readiness and the API docs; everything else needs a credential.
        for path in ("/healthz", "/readyz", "/openapi.json", "/docs"):
            assert client.get(path).status_code == 200, path
        assert client.get("/metrics").status_code == 401
        assert client.get("/metrics", headers={"X-API-Key": keys["predict"]}).status_code == 403
        assert client.get("/v1/status").status_code == 401
        assert (
            client.post("/v1/feedback", json={"request_id": "x", "true_label": LABELS[0]}).status_code == 401
        )
        assert client.post("/invocations", json={"inputs": ["hi"]}).status_code == 401
        schemes = client.get("/openapi.json").json()["components"]["securitySchemes"]
        assert {"APIKeyHeader", "HTTPBearer"} <= set(schemes)


def test_every_limit_is_a_4xx_that_says_what_was_wrong(model_server, keys, db_url) -> None:
    client, _ = make_gateway(model_server, keys, db_url)
    json_type = {"X-API-Key": keys["predict"], "content-type": "application/json"}
    with client:
        cases = [
            ("text too long", {"json": {"text": "x" * 201}}, 422, "text_too_long"),
            ("batch too big", {"json": {"texts": ["a"] * 9}}, 422, "batch_too_large"),
            ("bad JSON", {"content": b'{"text": "unclosed'}, 400, "invalid_json"),
            (
                "wrong content type",
                {"content": b"text=hello", "headers": {"content-type": "application/x-www-form-urlencoded"}},
                415,
                "unsupported_media_type",
            ),
            ("invalid UTF-8", {"content": b'{"text": "caf\xc3\x28"}'}, 400, "invalid_utf8"),
            ("body too large", {"json": {"texts": ["y" * 150] * 200}}, 413, "body_too_large"),
            ("both text and texts", {"json": {"text": "a", "texts": ["b"]}}, 422, "invalid_request"),
            ("empty batch", {"json": {"texts": []}}, 422, "invalid_request"),
            ("not an object", {"json": ["where is my order"]}, 422, "invalid_request"),
            ("unknown field", {"json": {"text": "a", "model": "other"}}, 422, "invalid_request"),
            ("top_k out of range", {"json": {"text": "a", "top_k": 0}}, 422, "invalid_request"),
        ]
        for case, kwargs, status, error in cases:
            headers = {**json_type, **kwargs.pop("headers", {})}
            response = client.post("/v1/predict", headers=headers, **kwargs)
            assert response.status_code == status, (case, response.text)
            body = response.json()
            assert body["error"] == error and body["detail"], case
            assert "Traceback" not in response.text
        assert (
            "text 0 has 201 characters; at most 200"
            in client.post("/v1/predict", json={"text": "x" * 201}, headers=json_type).json()["detail"]
        )
        invocations = client.post("/invocations", json={"inputs": ["a"] * 9}, headers=json_type)
        assert invocations.status_code == 422 and invocations.json()["error"] == "batch_too_large"


def test_rate_limit_is_429_with_retry_after_per_credential(model_server, keys, db_url) -> None:
    client, _ = make_gateway(model_server, keys, db_url, rate_limit_per_s=0.2, rate_limit_burst=2)
    with client:
        statuses = [
            client.post("/v1/predict", json={"text": "cancel it"}, headers={"X-API-Key": keys["predict"]})
            for _ in range(3)
        ]
        assert [r.status_code for r in statuses] == [200, 200, 429]
        refused = statuses[-1]
        assert refused.json()["error"] == "rate_limited"
        assert 1 <= int(refused.headers["Retry-After"]) <= 5
        # Another credential has its own bucket.
        other = client.post("/v1/predict", json={"text": "cancel it"}, headers={"X-API-Key": keys["both"]})
        assert other.status_code == 200
        metrics = client.get("/metrics", headers={"X-API-Key": keys["admin"]}).text
        assert 'tuneloop_gateway_errors_total{endpoint="/v1/predict",reason="rate_limited"} 1.0' in metrics


def test_rate_limit_is_charged_per_text_on_both_ways_in(model_server, keys, db_url) -> None:
    client, _ = make_gateway(model_server, keys, db_url, rate_limit_per_s=0.1, rate_limit_burst=5)
    headers = {"X-API-Key": keys["predict"]}
    with client:
        assert (
            client.post(
                "/v1/predict", json={"texts": ["a b", "c d", "e f", "g h"]}, headers=headers
            ).status_code
            == 200
        )
        # One token left: a batch of two is refused and says so, one text still passes.
        refused = client.post("/invocations", json={"inputs": ["a b", "c d"]}, headers=headers)
        assert refused.status_code == 429 and "needs 2" in refused.json()["detail"]
        assert int(refused.headers["Retry-After"]) >= 1
        assert client.post("/invocations", json={"inputs": ["a b"]}, headers=headers).status_code == 200
        assert client.post("/v1/predict", json={"text": "a b"}, headers=headers).status_code == 429
        other = {"X-API-Key": keys["both"]}
        too_big = client.post("/v1/predict", json={"texts": ["x y"] * 6}, headers=other)
        assert (too_big.status_code, too_big.json()["error"]) == (422, "batch_too_large")


def test_invocations_json_and_csv_obey_the_limits_and_are_logged(model_server, keys, db_url) -> None:
    client, _ = make_gateway(model_server, keys, db_url)
    headers = {"X-API-Key": keys["predict"], SUBJECT_HEADER: "user-42"}
    csv_type = headers | {"content-type": "text/csv"}
    answered: dict[str, int] = {}
    with client:
        for body in (
            {"dataframe_records": [{"text": "cancel my order"}, {"text": "where is it"}]},
            {"inputs": ["cancel my order"]},
            {"instances": {"text": ["where is it", "cancel it", "stop it"]}},
            {"dataframe_split": {"columns": ["text"], "data": [["cancel it"]]}, "params": {"top_k": 1}},
        ):
            response = client.post("/invocations", json=body, headers=headers)
            assert response.status_code == 200, (body, response.text)
            answered[response.headers["X-Request-ID"]] = len(response.json()["predictions"])
        # MLflow's record shape: top_k a JSON array of {label, score}, not a string to parse again.
        top_1 = response.json()["predictions"][0]["top_k"]
        assert isinstance(top_1, list) and len(top_1) == 1
        assert set(top_1[0]) == {"label", "score"}
        as_csv = client.post(
            "/invocations", content='text,channel\n"cancel, now",chat\nwhere is it,mail\n', headers=csv_type
        )
        assert as_csv.status_code == 200, as_csv.text
        assert as_csv.headers["X-Model-Version"] == "1" and len(as_csv.json()["predictions"]) == 2
        answered[as_csv.headers["X-Request-ID"]] = 2
        refusals = [
            ({"json": {"inputs": ["x"] * 9}}, 422, "batch_too_large"),
            ({"json": {"inputs": ["x" * 201]}}, 422, "text_too_long"),
            ({"json": {"inputs": ["  "]}}, 422, "empty_text"),
            ({"json": {"inputs": []}}, 422, "empty_batch"),
            ({"json": {"inputs": {"txt": ["x"]}}}, 400, "unrecognised_input"),
            ({"json": {"inputs": ["x"], "params": {"top_k": 0}}}, 422, "invalid_request"),
            ({"json": {"inputs": ["x"], "params": {"other": 1}}}, 422, "invalid_request"),
            ({"content": "text\n" + "a\n" * 9, "headers": csv_type}, 422, "batch_too_large"),
            ({"content": "text\n" + "y" * 201 + "\n", "headers": csv_type}, 422, "text_too_long"),
            ({"content": "label\ncancel\n", "headers": csv_type}, 400, "unrecognised_input"),
            ({"content": "", "headers": csv_type}, 400, "unrecognised_input"),
            ({"content": b"text\ncaf\xe9\n", "headers": csv_type}, 400, "invalid_utf8"),
        ]
        for kwargs, status, error in refusals:
            kwargs.setdefault("headers", headers)
            response = client.post("/invocations", **kwargs)
            assert (response.status_code, response.json()["error"]) == (status, error), (
                kwargs,
                response.text,
            )
    window = read_window(db_url)
    assert window.groupby("request_id").size().to_dict() == answered
    csv_rows = window[window["request_id"] == as_csv.headers["X-Request-ID"]]
    assert list(csv_rows["text"]) == ["cancel, now", "where is it"]
    assert set(window["principal"]) == {f"api_key:{keys['predict'].split('_')[1]}"}
    # The end-user id travels with the rows, so that person's rows can be erased on request.
    removed = erase(db_url, subject="user-42")
    assert removed["predictions"] == sum(answered.values()) and sorted(answered) == removed["request_ids"]
    assert read_window(db_url).empty


def test_control_characters_are_refused_the_same_way_everywhere(model_server, keys, db_url) -> None:
    """NUL and other control characters (not tab or newline) are a 400 naming the character, on every
    endpoint and format; nothing of such a request reaches the model or the log."""
    client, _ = make_gateway(model_server, keys, db_url)
    headers = {"X-API-Key": keys["both"]}
    with client:
        ok = client.post("/v1/predict", json={"text": "cancel\tmy\norder"}, headers=headers)
        assert ok.status_code == 200, ok.text
        attempts = [
            client.post("/v1/predict", json={"texts": ["fine", "nul\x00here"]}, headers=headers),
            client.post("/invocations", json={"inputs": ["fine", "nul\x00here"]}, headers=headers),
            client.post(
                "/invocations",
                content="text\nfine\nnul\x00here\n",
                headers=headers | {"content-type": "text/csv"},
            ),
        ]
        for response in attempts:
            assert response.status_code == 400, response.text
            assert response.json()["error"] == "control_character"
            assert "text 1 contains the control character U+0000 at position 3" in response.json()["detail"]
        escape = client.post("/v1/predict", json={"text": "\x1b[2Jcleared"}, headers=headers)
        assert escape.status_code == 400 and "U+001B" in escape.json()["detail"]
        label = client.post(
            "/v1/feedback",
            json={"request_id": ok.json()["request_id"], "true_label": "cancel_order\x00"},
            headers=headers,
        )
        assert label.status_code == 400 and label.json()["detail"].startswith("true_label contains")
    window = read_window(db_url)
    assert list(window["text"]) == ["cancel\tmy\norder"] and list(window["true_label"]) == [None]


def test_garbage_never_crashes_the_gateway(model_server, keys, db_url) -> None:
    client, _ = make_gateway(model_server, keys, db_url)
    headers = {"X-API-Key": keys["admin"], "content-type": "application/json"}
    bodies = [
        b"",
        b"null",
        b"[]",
        b"{}",
        b"\x00\xff\xfe",
        b'{"text": null}',
        b'{"text": 5}',
        b'{"texts": [1, 2]}',
        b'{"texts": [null]}',
        b'{"text": "\\ud800"}',
        b"[" * 5000 + b"]" * 5000,
        b'{"text": "a"}' * 3,
        b'{"request_id": {"$ne": 1}}',
        b"NaN",
    ]
    with client:
        for body in bodies:
            for path in ("/v1/predict", "/v1/feedback", "/invocations"):
                response = client.post(path, content=body, headers=headers)
                assert 400 <= response.status_code < 500, (
                    path,
                    body[:40],
                    response.status_code,
                    response.text,
                )
                assert response.json()["error"] and "Traceback" not in response.text
        assert client.get("/healthz").status_code == 200


def test_a_log_row_for_every_answered_text_with_pii_masked(model_server, keys, db_url) -> None:
    client, writer = make_gateway(model_server, keys, db_url)
    headers = {"X-API-Key": keys["both"]}
    pii_texts = [
        "cancel my order, mail me at jane.doe@example.com",
        "card 4111 1111 1111 1111 was charged, where is my order",
        "refund to GB82 WEST 1234 5698 7654 32 please",
        "call me on +44 20 7946 0958 about my order",
    ]
    answered: dict[str, int] = {}
    with client:
        single = client.post("/v1/predict", json={"text": "where is my order"}, headers=headers)
        batch = client.post("/v1/predict", json={"texts": pii_texts, "top_k": 2}, headers=headers)
        mlflow_style = client.post(
            "/invocations",
            json={"dataframe_split": {"columns": ["text"], "data": [["cancel it"], ["where is it"]]}},
            headers=headers,
        )
        refused = client.post("/v1/predict", json={"text": "x" * 500}, headers=headers)
        for response, n in ((single, 1), (batch, 4)):
            assert response.status_code == 200
            answered[response.json()["request_id"]] = n
        assert mlflow_style.status_code == 200 and mlflow_style.headers["X-Model-Version"] == "1"
        answered[mlflow_style.headers["X-Request-ID"]] = 2
        assert refused.status_code == 422
    # Leaving the client ran the shutdown: the log is flushed.
    window = read_window(db_url)
    assert len(window) == sum(answered.values()) == writer.written_rows
    assert window.groupby("request_id").size().to_dict() == answered
    assert refused.headers["X-Request-ID"] not in set(window["request_id"])
    assert set(window["model_version"]) == {"1"} and set(window["model_name"]) == {NAME}
    assert (window["latency_ms"] > 0).all() and window["label"].isin(LABELS).all()
    stored = window[window["request_id"] == batch.json()["request_id"]].sort_values("item_index")
    assert list(stored["text"]) == [
        f"cancel my order, mail me at {EMAIL_MASK}",
        f"card {CARD_MASK} was charged, where is my order",
        f"refund to {IBAN_MASK} please",
        f"call me on {PHONE_MASK} about my order",
    ]
    answers = batch.json()["predictions"]
    assert list(stored["label"]) == [p["label"] for p in answers]
    assert list(stored["score"]) == pytest.approx([p["score"] for p in answers])


def test_feedback_joins_the_logged_prediction(model_server, keys, db_url) -> None:
    client, _ = make_gateway(model_server, keys, db_url)
    with client:
        own = {"X-API-Key": keys["both"]}
        answer = client.post(
            "/v1/predict", json={"texts": ["cancel my order", "where is it"]}, headers=own
        ).json()
        request_id = answer["request_id"]
        accepted = client.post(
            "/v1/feedback",
            json={"request_id": request_id, "item_index": 1, "true_label": "check_order_status"},
            headers=own,
        )
        assert accepted.status_code == 200, accepted.text
        assert accepted.json()["feedback_for"] == request_id
        refusals = [
            ({"request_id": request_id, "true_label": "not_a_label"}, 422, "unknown_label"),
            ({"request_id": "0" * 32, "true_label": "cancel_order"}, 404, "unknown_request"),
            (
                {"request_id": request_id, "item_index": 2, "true_label": "cancel_order"},
                422,
                "item_index_out_of_range",
            ),
            (
                {"request_id": request_id, "item_index": -1, "true_label": "cancel_order"},
                422,
                "invalid_request",
            ),
        ]
        for body, status, error in refusals:
            response = client.post("/v1/feedback", json=body, headers=own)
            assert (response.status_code, response.json()["error"]) == (status, error), body
        predict_only = client.post(
            "/v1/feedback",
            json={"request_id": request_id, "true_label": "cancel_order"},
            headers={"X-API-Key": keys["predict"]},
        )
        assert predict_only.status_code == 403
        metrics = client.get("/metrics", headers={"X-API-Key": keys["admin"]}).text
    window = read_window(db_url)
    assert list(window["true_label"]) == [None, "check_order_status"]
    for name in (
        'tuneloop_gateway_requests_total{endpoint="/v1/predict",status="200"} 1.0',
        'tuneloop_gateway_requests_total{endpoint="/v1/feedback",status="200"} 1.0',
        "tuneloop_gateway_request_latency_seconds_bucket",
        'tuneloop_feedback_total{true_label="check_order_status"} 1.0',
        'tuneloop_model_info{alias="prod",model_name="tuneloop-gateway-test",model_version="1"} 1.0',
        "tuneloop_inference_log_queue_depth",
        "tuneloop_inference_log_dropped_total 0.0",
        "tuneloop_inference_log_dead_lettered_total 0.0",
        "tuneloop_predictions_total{",
    ):
        assert name in metrics, name


def test_feedback_only_on_your_own_requests_unless_admin(model_server, keys, db_url) -> None:
    """Rows record who asked; another caller's request id reads as unknown (404), an admin may label any."""
    client, _ = make_gateway(model_server, keys, db_url)
    labeller = create_api_key(keys["path"], "other-app", ["predict", "feedback"])
    with client:
        mine = client.post(
            "/v1/predict", json={"text": "cancel my order"}, headers={"X-API-Key": keys["both"]}
        )
        request_id = mine.json()["request_id"]
        body = {"request_id": request_id, "true_label": "cancel_order"}
        for key in (labeller, keys["feedback"]):
            foreign = client.post("/v1/feedback", json=body, headers={"X-API-Key": key})
            assert (foreign.status_code, foreign.json()["error"]) == (404, "unknown_request")
        admin = client.post("/v1/feedback", json=body, headers={"X-API-Key": keys["admin"]})
        assert admin.status_code == 200, admin.text
        as_jwt = client.post(
            "/v1/predict", json={"text": "where is it"}, headers=bearer(token("predict feedback"))
        )
        jwt_feedback = client.post(
            "/v1/feedback",
            json={"request_id": as_jwt.json()["request_id"], "true_label": "check_order_status"},
            headers=bearer(token("feedback")),
        )
        assert jwt_feedback.status_code == 200, jwt_feedback.text
    window = read_window(db_url)
    both_id = keys["both"].split("_")[1]
    admin_id = keys["admin"].split("_")[1]
    assert list(window["principal"]) == [f"api_key:{both_id}", "jwt:svc"]
    assert list(window["feedback_principal"]) == [f"api_key:{admin_id}", "jwt:svc"]


def test_metrics_export_the_drift_jobs_latest_result(model_server, keys, db_url, tmp_path) -> None:
    """The drift job (another process) writes its summary; the gateway's /metrics reads it at scrape time."""
    from serving.metrics import write_drift_summary

    client, _ = make_gateway(model_server, keys, db_url, drift_summary_path=tmp_path / "latest.json")
    admin = {"X-API-Key": keys["admin"]}
    with client:
        assert "tuneloop_drift_detected" not in client.get("/metrics", headers=admin).text
        summary = {
            "data_drift": {
                "detected": True,
                "signals": {"text": {"score": 0.81, "method": "roc_auc", "drifted": True}},
            },
            "concept_drift": None,
            "n_current": 250,
            "n_labelled": 0,
            "finished_at": "2026-11-23T07:00:00+00:00",
        }
        write_drift_summary(summary, tmp_path / "latest.json")
        metrics = client.get("/metrics", headers=admin).text
    assert 'tuneloop_drift_detected{kind="data"} 1.0' in metrics
    assert 'tuneloop_drift_score{method="roc_auc",signal="text"} 0.81' in metrics
    assert 'tuneloop_drift_window_rows{kind="predictions"} 250.0' in metrics


@pytest.fixture()
def served_gateway(registry, tmp_path):
    """`tuneloop serve --env prod` as a user starts it, with an API key in its TUNELOOP_HOME."""
    project = tmp_path / "project"
    project.mkdir()
    params = yaml.safe_load((REPO_ROOT / "params.yaml").read_text())
    params["registry"]["model_name"] = NAME
    # The burst is one client: lift its rate limit so every request is answered or fails for real.
    params["gateway"].update(rate_limit_per_s=100_000, rate_limit_burst=100_000)
    (project / "params.yaml").write_text(yaml.safe_dump(params))
    home = tmp_path / "home"
    home.mkdir()
    key = create_api_key(home / "api_keys.json", "burst", ["predict"])
    port = free_port()
    env = venv_env(MLFLOW_TRACKING_URI=registry["uri"], TUNELOOP_HOME=str(home), HF_HUB_OFFLINE="1")
    env.pop("TUNELOOP_INFERENCE_LOG_URL", None)
    log_file = open(project / "gateway.log", "w")  # noqa: SIM115 - lives as long as the process
    process = subprocess.Popen(
        [str(Path(sys.executable).parent / "tuneloop"), "serve", "--env", "prod", "--port", str(port)],
        cwd=project,
        env=env,
        stdout=log_file,
        stderr=subprocess.STDOUT,
    )
    url = f"http://127.0.0.1:{port}"
    try:
        wait_for(f"{url}/readyz", process, 240)
        yield {"url": url, "key": key, "process": process, "home": home, "log": project / "gateway.log"}
    finally:
        if process.poll() is None:
            process.kill()
            process.wait(timeout=60)
        log_file.close()


def test_burst_then_graceful_shutdown_loses_no_log_row(served_gateway, registry) -> None:
    """≥ 2,000 requests from concurrent clients; SIGTERM while the last ones are in flight; every request
    that got an answer is in the inference log, with all its texts."""
    url, texts = served_gateway["url"], registry["texts"]
    answered: dict[str, int] = {}
    failed: list[str] = []
    sigterm_after = BURST_REQUESTS - SIGTERM_BEFORE_END

    async def burst() -> float:
        queue: asyncio.Queue[int] = asyncio.Queue()
        for n in range(BURST_REQUESTS):
            queue.put_nowait(n)
        done = 0

        async def worker(client: httpx.AsyncClient) -> None:
            nonlocal done
            while not queue.empty():
                n = queue.get_nowait()
                batch = [texts[(n + i) % len(texts)] for i in range(1 + n % 4)]
                body = {"text": batch[0]} if len(batch) == 1 else {"texts": batch}
                try:
                    response = await client.post(f"{url}/v1/predict", json=body)
                except httpx.HTTPError as error:
                    failed.append(repr(error))
                    continue
                finally:
                    done += 1
                    if done == sigterm_after:
                        served_gateway["process"].send_signal(signal.SIGTERM)
                if response.status_code == 200:
                    answered[response.json()["request_id"]] = len(batch)
                else:
                    failed.append(f"{response.status_code}: {response.text[:200]}")

        started = time.perf_counter()
        headers = {"X-API-Key": served_gateway["key"]}
        async with httpx.AsyncClient(headers=headers, timeout=60) as client:
            await asyncio.gather(*(worker(client) for _ in range(BURST_CONCURRENCY)))
        return time.perf_counter() - started

    elapsed = asyncio.run(burst())
    exit_code = served_gateway["process"].wait(timeout=120)
    assert exit_code in (0, -signal.SIGTERM)
    gateway_log = served_gateway["log"].read_text()
    assert "inference log closed" in gateway_log

    window = read_window(f"sqlite:///{served_gateway['home'] / 'inference_log.db'}")
    logged = window.groupby("request_id").size().to_dict()
    missing = set(answered) - set(logged)
    assert len(answered) >= sigterm_after * 0.99, f"only {len(answered)} answered; failures: {failed[:3]}"
    assert missing == set(), f"{len(missing)} answered requests are not in the log"
    assert all(logged[request_id] == n for request_id, n in answered.items())
    # Nothing in the log that was not answered (a request cut off by the shutdown leaves no row).
    assert set(logged) == set(answered)
    print(
        f"\nburst through `tuneloop serve`: {BURST_REQUESTS} requests ({BURST_CONCURRENCY} concurrent) in "
        f"{elapsed:.1f}s, SIGTERM after {sigterm_after}; answered {len(answered)}, "
        f"not answered {len(failed)}; "
        f"log rows {len(window)} for {sum(answered.values())} answered texts; missing requests {len(missing)}"
    )
