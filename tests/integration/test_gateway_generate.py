"""``POST /v1/generate`` with a real `mlflow models serve` of a registered generation model behind the
gateway: answers, limits, auth, the per-token rate limit, the masked log and feedback on answers.

One model server for the module (the tiny Llama adapter that answers ``memorised_pairs`` exactly); the
gateway app runs in process per test (``TestClient`` runs its lifespan, so the log is flushed on exit),
built by the security tests' ``make_gateway`` with the same API keys.
"""

from __future__ import annotations

from types import SimpleNamespace

import httpx
import pytest

from serving.inference_log import read_generations, read_window
from serving.model_server import start_model_server, wait_until_ready
from serving.pii import EMAIL_MASK, PiiMasker
from tests.integration.test_gateway_security import (  # noqa: F401 - fixtures reused: keys, log URL
    db_url,
    keys,
    make_gateway,
)
from tests.support import memorised_pairs, settings, sqlite_registry_with

pytestmark = pytest.mark.slow

NAME = "tuneloop-gateway-generate-test"
CEILING = settings("gateway").max_new_tokens
# The memorised messages are short, their answers ~170 characters: the security tests' 200-character
# text limit would do, but the answers' feedback (edited_output) needs room too.
LIMITS = {"max_text_chars": 1000}


@pytest.fixture(scope="module")
def generation_server(tiny_generator, tmp_path_factory):
    """Version 1 of the generation model in a SQLite registry, served by one `mlflow models serve`.

    Also records how many tokens each memorised answer takes (asked of the model server directly).
    """
    home = tmp_path_factory.mktemp("generate-home")
    uri, _ = sqlite_registry_with(home, NAME, [tiny_generator], base=None)
    server = start_model_server(
        f"models:/{NAME}/1",
        "1",
        log_dir=home / "logs",
        extra_env={"MLFLOW_TRACKING_URI": uri, "HF_HUB_OFFLINE": "1"},
    )
    try:
        wait_until_ready(server, 240)
        pairs = memorised_pairs()
        body = {"dataframe_split": {"columns": ["text"], "data": [[m] for m in pairs["message"]]}}
        rows = httpx.post(f"{server.url}/invocations", json=body, timeout=120).json()["predictions"]
        yield SimpleNamespace(url=server.url, answer_tokens=[row["new_tokens"] for row in rows])
    finally:
        server.stop()


def gateway(generation_server, keys, db_url, **limits):  # noqa: F811 - the imported fixtures' values
    return make_gateway(generation_server, keys, db_url, **(LIMITS | limits))


def test_memorised_messages_come_back_as_their_targets(generation_server, keys, db_url) -> None:  # noqa: F811
    pairs = memorised_pairs()
    client, _ = gateway(generation_server, keys, db_url)
    headers = {"X-API-Key": keys["predict"]}
    with client:
        batch = client.post("/v1/generate", json={"texts": pairs["message"].tolist()}, headers=headers)
        single = client.post("/v1/generate", json={"text": pairs["message"][0]}, headers=headers)
    assert batch.status_code == 200, batch.text
    assert batch.headers["X-Model-Version"] == "1"
    body = batch.json()
    assert body["model_version"] == "1" and body["request_id"] == batch.headers["X-Request-ID"]
    answers = body["generations"]
    assert [answer["text"] for answer in answers] == pairs["target"].tolist()
    assert all(answer["valid_json"] for answer in answers)
    assert [answer["new_tokens"] for answer in answers] == generation_server.answer_tokens
    assert all(answer["prompt_tokens"] > 10 for answer in answers)
    assert single.status_code == 200, single.text
    assert single.json()["generations"][0]["text"] == pairs["target"][0]


def test_limits_auth_and_the_wrong_endpoint_are_4xx_that_say_why(generation_server, keys, db_url) -> None:  # noqa: F811
    client, writer = gateway(generation_server, keys, db_url, max_batch_size=4)
    headers = {"X-API-Key": keys["predict"]}
    with client:
        over = client.post(
            "/v1/generate", json={"text": "hi", "max_new_tokens": CEILING + 1}, headers=headers
        )
        zero = client.post("/v1/generate", json={"text": "hi", "max_new_tokens": 0}, headers=headers)
        anonymous = client.post("/v1/generate", json={"text": "hi"})
        wrong_scope = client.post(
            "/v1/generate", json={"text": "hi"}, headers={"X-API-Key": keys["feedback"]}
        )
        too_long = client.post("/v1/generate", json={"text": "x" * 1001}, headers=headers)
        too_many = client.post("/v1/generate", json={"texts": ["hi"] * 5}, headers=headers)
        both = client.post("/v1/generate", json={"text": "hi", "texts": ["hi"]}, headers=headers)
        predict = client.post("/v1/predict", json={"text": "where is my order"}, headers=headers)
        invocations = client.post(
            "/invocations", json={"dataframe_split": {"columns": ["text"], "data": [["hi"]]}}, headers=headers
        )
    assert (over.status_code, over.json()["error"]) == (422, "max_new_tokens_too_large")
    assert f"at most {CEILING}" in over.json()["detail"] and over.json()["limit"] == CEILING
    assert zero.status_code == 422
    assert anonymous.status_code == 401 and "WWW-Authenticate" in anonymous.headers
    assert wrong_scope.status_code == 403
    assert (too_long.status_code, too_long.json()["error"]) == (422, "text_too_long")
    assert (too_many.status_code, too_many.json()["error"]) == (422, "batch_too_large")
    assert both.status_code == 422 and "exactly one of `text`" in both.text
    # A generation model behind the classification endpoints: a clear 409, not a 502.
    for response in (predict, invocations):
        assert (response.status_code, response.json()["error"]) == (409, "wrong_model_task"), response.text
        assert "use /v1/generate" in response.json()["detail"]
    assert writer.written_rows == 0


def test_the_rate_limit_is_charged_in_generated_tokens(generation_server, keys, db_url) -> None:  # noqa: F811
    """Each text reserves its max_new_tokens; what was not generated is given back."""
    message = memorised_pairs()["message"][0]
    answer_tokens = generation_server.answer_tokens[0]
    assert answer_tokens > 20 and answer_tokens + 10 <= CEILING
    burst = answer_tokens + 20
    client, _ = gateway(
        generation_server, keys, db_url, generate_tokens_per_s=0.001, generate_token_burst=burst
    )
    headers = {"X-API-Key": keys["predict"]}

    def ask(max_new_tokens: int, texts: int = 1) -> httpx.Response:
        body = {"texts": [message] * texts, "max_new_tokens": max_new_tokens}
        return client.post("/v1/generate", json=body, headers=headers)

    with client:
        # More than the burst could ever hold: a 422 that says so, not a 429 retried forever.
        never = ask(burst // 2 + 1, texts=2)
        assert (never.status_code, never.json()["error"]) == (422, "batch_too_large")
        assert f"at most {burst}" in never.json()["detail"]
        # Reserves answer_tokens + 10, uses answer_tokens: 20 of the burst are left, not 10.
        first = ask(answer_tokens + 10)
        assert first.status_code == 200, first.text
        assert first.json()["generations"][0]["new_tokens"] == answer_tokens
        refused = ask(21)
        assert refused.status_code == 429 and refused.headers["Retry-After"].isdigit()
        assert "tokens/s" in refused.json()["detail"] and "needs 21" in refused.json()["detail"]
        cut = ask(20)
        assert cut.status_code == 200, cut.text
        assert cut.json()["generations"][0]["new_tokens"] == 20
        # Nothing left: refused before the body is read.
        assert ask(1).status_code == 429
        # The texts bucket of /v1/predict is another one: untouched (the model is a generator: 409).
        assert client.post("/v1/predict", json={"text": "hi"}, headers=headers).status_code == 409


def test_answers_are_logged_masked_and_take_feedback(generation_server, keys, db_url) -> None:  # noqa: F811
    pairs = memorised_pairs()
    private = "where is my order? mail me at jane.doe@example.com"
    client, writer = gateway(generation_server, keys, db_url)
    own = {"X-API-Key": keys["both"]}
    with client:
        answer = client.post(
            "/v1/generate",
            json={"texts": [pairs["message"][1], private]},
            headers=own,
        )
        assert answer.status_code == 200, answer.text
        request_id = answer.json()["request_id"]
        generated = [item["text"] for item in answer.json()["generations"]]
        accepted = client.post("/v1/feedback", json={"request_id": request_id, "accepted": True}, headers=own)
        corrected = pairs["target"][0].replace("}", ', "note": "write to jane.doe@example.com"}')
        edited = client.post(
            "/v1/feedback",
            json={"request_id": request_id, "item_index": 1, "edited_output": corrected},
            headers=own,
        )
        refusals = [
            ({"request_id": request_id, "true_label": "cancel_order"}, own, 422, "wrong_feedback_kind"),
            ({"request_id": request_id, "accepted": True, "edited_output": "x"}, own, 422, "invalid_request"),
            (
                {"request_id": request_id, "item_index": 2, "accepted": False},
                own,
                422,
                "item_index_out_of_range",
            ),
            (
                {"request_id": request_id, "accepted": False},
                {"X-API-Key": keys["feedback"]},
                404,
                "unknown_request",
            ),
        ]
        for body, headers, status, error in refusals:
            response = client.post("/v1/feedback", json=body, headers=headers)
            assert (response.status_code, response.json()["error"]) == (status, error), (body, response.text)
        metrics = client.get("/metrics", headers={"X-API-Key": keys["admin"]}).text
    assert accepted.status_code == 200 and accepted.json()["accepted"] is True, accepted.text
    assert edited.status_code == 200 and edited.json()["edited"] is True, edited.text
    stored = read_generations(db_url)
    assert list(stored["request_id"]) == [request_id] * 2 and list(stored["item_index"]) == [0, 1]
    assert list(stored["text"]) == [pairs["message"][1], f"where is my order? mail me at {EMAIL_MASK}"]
    assert "jane.doe" not in "".join(stored["text"])
    masker = PiiMasker(phone_region=settings("gateway").pii_phone_region)
    assert list(stored["generated"]) == [masker.mask(text) for text in generated]
    answers = answer.json()["generations"]
    assert list(stored["new_tokens"]) == [item["new_tokens"] for item in answers]
    assert list(stored["prompt_tokens"]) == [item["prompt_tokens"] for item in answers]
    both_id = keys["both"].split("_")[1]
    assert set(stored["principal"]) == {f"api_key:{both_id}"}
    assert list(stored["accepted"]) == [True, None]
    assert stored["edited_output"][0] is None
    assert stored["edited_output"][1] == corrected.replace("jane.doe@example.com", EMAIL_MASK)
    assert list(stored["feedback_principal"]) == [f"api_key:{both_id}"] * 2
    # The classification window (drift, retraining) does not see generations.
    assert read_window(db_url).empty and writer.written_rows == 4
    for line in (
        'tuneloop_generations_total{model_version="1",valid_json="true"}',
        'tuneloop_generation_feedback_total{kind="accepted"} 1.0',
        'tuneloop_generation_feedback_total{kind="edited"} 1.0',
        'tuneloop_gateway_requests_total{endpoint="/v1/generate",status="200"} 1.0',
    ):
        assert line in metrics, line
