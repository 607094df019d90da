"""The pure parts of ``/v1/generate`` and of feedback on generations: request and feedback bodies, their
OpenAPI schemas, reading the model server's rows, and the token bucket's reserve-then-give-back."""

from __future__ import annotations

import json

import jsonschema
import pytest
from pydantic import ValidationError

from serving.gateway import (
    FeedbackRequest,
    GenerateRequest,
    feedback_request_schema,
    generate_request_schema,
    generation_body,
    generations_from_server,
    invocation_rows,
    is_json_object,
    predictions_from_server,
    served_task,
)
from serving.limits import Refusal, TextLimits, TokenBucketLimiter

GENERATED = {"generated": '{"intent": "x"}', "prompt_tokens": 12, "new_tokens": 7}
CLASSIFIED = {"label": "cancel_order", "score": 0.9, "top_k": "[]"}


class FakeClock:
    def __init__(self) -> None:
        self.now = 1000.0

    def __call__(self) -> float:
        return self.now


def test_a_generate_request_takes_one_text_or_a_batch_and_a_positive_budget() -> None:
    assert GenerateRequest.model_validate({"text": "hi"}).all_texts() == ["hi"]
    batch = GenerateRequest.model_validate({"texts": ["a", "b"], "max_new_tokens": 5})
    assert batch.all_texts() == ["a", "b"] and batch.max_new_tokens == 5
    for bad in (
        {},
        {"text": "a", "texts": ["b"]},
        {"text": "a", "max_new_tokens": 0},
        {"text": "a", "top_k": 2},
    ):
        with pytest.raises(ValidationError):
            GenerateRequest.model_validate(bad)


def test_the_generate_schema_states_the_ceiling_and_exactly_one_input() -> None:
    schema = generate_request_schema(TextLimits(max_text_chars=10, max_batch_size=2), max_new_tokens=160)
    jsonschema.validate({"text": "hi", "max_new_tokens": 160}, schema)
    jsonschema.validate({"texts": ["a", "b"]}, schema)
    for bad in (
        {"text": "hi", "max_new_tokens": 161},
        {"text": "hi", "max_new_tokens": 0},
        {"text": "x" * 11},
        {"texts": ["a", "b", "c"]},
        {"text": "a", "texts": ["b"]},
    ):
        with pytest.raises(jsonschema.ValidationError):
            jsonschema.validate(bad, schema)


def test_the_model_server_gets_one_text_column_and_the_budget_as_a_param() -> None:
    assert generation_body(["a", "b"], 12) == {
        "dataframe_split": {"columns": ["text"], "data": [["a"], ["b"]]},
        "params": {"max_new_tokens": 12},
    }


@pytest.mark.parametrize(
    ("text", "valid"),
    [
        ('{"intent": "x"}', True),
        ('  {"a": 1}\n', True),
        ('{"a": 1} trailing', False),
        ("[1, 2]", False),
        ('{"a": ', False),
        ("", False),
        ("[" * 100_000, False),
    ],
)
def test_valid_json_means_exactly_one_json_object(text: str, valid: bool) -> None:
    assert is_json_object(text) is valid


def test_the_served_task_is_read_from_the_rows() -> None:
    assert served_task({"predictions": [GENERATED, GENERATED]}) == "generation"
    assert served_task({"predictions": [CLASSIFIED]}) == "classification"
    for unknown in (
        None,
        {},
        {"predictions": []},
        {"predictions": [1]},
        {"predictions": [GENERATED, CLASSIFIED]},
    ):
        assert served_task(unknown) is None


def test_generations_are_read_with_their_counts_and_json_validity() -> None:
    rows = [GENERATED, {"generated": "not json", "prompt_tokens": 3, "new_tokens": 2}]
    answers = generations_from_server({"predictions": rows}, expected=2)
    assert [(a.text, a.prompt_tokens, a.new_tokens, a.valid_json) for a in answers] == [
        ('{"intent": "x"}', 12, 7, True),
        ("not json", 3, 2, False),
    ]


def test_invocations_answer_top_k_as_a_json_array_whether_the_pyfunc_sent_a_string_or_a_list() -> None:
    alternatives = [{"label": "cancel_order", "score": 0.9}, {"label": "return_item", "score": 0.1}]
    as_string = {"label": "cancel_order", "score": 0.9, "top_k": json.dumps(alternatives)}
    as_list = {**as_string, "top_k": alternatives}
    for rows in ([as_string], [as_list]):
        (pred,) = invocation_rows(rows)
        assert isinstance(pred["top_k"], list) and pred["top_k"] == alternatives
        assert json.loads(json.dumps({"predictions": [pred]}))["predictions"][0] == as_list
    with pytest.raises(Refusal) as refused:
        invocation_rows([{**as_string, "top_k": "not json"}])
    assert refused.value.status == 502


def test_a_classifier_behind_generate_is_409_and_a_generator_behind_predict_too() -> None:
    with pytest.raises(Refusal) as refused:
        generations_from_server({"predictions": [CLASSIFIED]}, expected=1)
    assert (refused.value.status, refused.value.error) == (409, "wrong_model_task")
    assert "classifier; use /v1/predict" in refused.value.detail
    with pytest.raises(Refusal) as refused:
        predictions_from_server({"predictions": [GENERATED]})
    assert refused.value.status == 409 and "use /v1/generate" in refused.value.detail


@pytest.mark.parametrize(
    "payload",
    [
        None,
        {"predictions": [{"generated": "x"}]},
        {"predictions": [{"generated": None, "prompt_tokens": 1, "new_tokens": 1}]},
        {"predictions": [{"generated": "x", "prompt_tokens": "many", "new_tokens": 1}]},
    ],
)
def test_an_unreadable_answer_is_502(payload) -> None:
    with pytest.raises(Refusal) as refused:
        generations_from_server(payload, expected=1)
    assert refused.value.status == 502


def test_a_different_number_of_answers_is_502() -> None:
    with pytest.raises(Refusal) as refused:
        generations_from_server({"predictions": [GENERATED]}, expected=2)
    assert refused.value.status == 502 and "different number" in refused.value.detail


def test_feedback_takes_exactly_one_of_a_label_a_verdict_or_an_edit() -> None:
    base = {"request_id": "abc"}
    assert FeedbackRequest.model_validate(base | {"true_label": "x"}).about_generation is False
    assert FeedbackRequest.model_validate(base | {"accepted": True}).about_generation is True
    assert FeedbackRequest.model_validate(base | {"accepted": False}).accepted is False
    assert FeedbackRequest.model_validate(base | {"edited_output": "{}"}).about_generation is True
    for bad in (
        base,
        base | {"true_label": "x", "accepted": True},
        base | {"accepted": True, "edited_output": "{}"},
        base | {"edited_output": ""},
        base | {"accepted": None},
    ):
        with pytest.raises(ValidationError):
            FeedbackRequest.model_validate(bad)


def test_the_feedback_schema_says_the_same() -> None:
    schema = feedback_request_schema(["a", "b"], max_output_chars=5)
    for good in ({"true_label": "a"}, {"accepted": False}, {"edited_output": "{}"}):
        jsonschema.validate({"request_id": "abc"} | good, schema)
    for bad in (
        {"true_label": "c"},
        {"true_label": "a", "accepted": True},
        {"edited_output": "x" * 6},
        {},
    ):
        with pytest.raises(jsonschema.ValidationError):
            jsonschema.validate({"request_id": "abc"} | bad, schema)


def test_a_token_bucket_reservation_gives_back_what_was_not_used() -> None:
    clock = FakeClock()
    limiter = TokenBucketLimiter(rate_per_s=1.0, burst=100, clock=clock, unit="tokens")
    limiter.check("k", 80)
    limiter.give_back("k", 80 - 30)  # 30 generated
    limiter.check("k", 70)
    with pytest.raises(Refusal) as refused:
        limiter.check("k", 1)
    assert refused.value.status == 429 and "tokens/s" in refused.value.detail
    # Never above the burst, and nothing for a key without a bucket.
    limiter.give_back("k", 1000)
    limiter.give_back("unknown", 5)
    assert "unknown" not in limiter._buckets
    limiter.check("k", 100)
    with pytest.raises(Refusal) as too_large:
        limiter.check("k", 101)
    assert too_large.value.error == "batch_too_large" and "101 tokens" in too_large.value.detail
