import json

import numpy as np
import pandas as pd
import pytest

from evaluation.generation import (
    EXTRACTED_FIELDS,
    compare_paired,
    counterfactual_field_changes,
    generation_metrics,
    group_metrics,
    is_valid,
    parse_output,
    per_example_scores,
)

ANSWER = {
    "intent": "track_order",
    "order_id": "NW-48305",
    "product": "wireless mouse",
    "action": "lookup_order",
    "urgency": "normal",
    "reply": "I am checking the status of order NW-48305 for you now.",
}
OTHER = {
    "intent": "refund_request",
    "order_id": None,
    "product": None,
    "action": "start_refund",
    "urgency": "high",
    "reply": "I am sorry about that and will start your refund right away.",
}
TARGETS = [json.dumps(ANSWER), json.dumps(OTHER)]


def test_a_perfect_prediction_scores_one_everywhere_and_chrf_100():
    metrics = generation_metrics(TARGETS, TARGETS)
    assert metrics.pop("generation/reply_chrf") == pytest.approx(100.0)
    assert metrics.pop("generation/output_chars_mean") == np.mean([len(t) for t in TARGETS])
    assert len(metrics) == 4 + len(EXTRACTED_FIELDS)
    assert metrics == {key: pytest.approx(1.0) for key in metrics}


def test_invalid_json_counts_against_validity_and_every_field():
    truncated = TARGETS[0][:40]
    metrics = generation_metrics([truncated, TARGETS[1]], TARGETS)
    assert metrics["generation/json_valid_rate"] == 0.5
    assert metrics["generation/exact_match"] == 0.5
    assert all(metrics[f"generation/field_exact/{field}"] == 0.5 for field in EXTRACTED_FIELDS)
    assert metrics["generation/field_micro_f1"] == 0.5
    assert metrics["generation/reply_rouge_l"] == 0.5
    assert 0 < metrics["generation/reply_chrf"] < 100
    scores = per_example_scores([truncated, TARGETS[1]], TARGETS)
    assert scores.loc[0, ["valid", "exact", "field_accuracy", "reply_rouge_l"]].tolist() == [0, 0, 0, 0]


def test_a_wrong_order_id_drops_only_its_field():
    wrong = json.dumps({**ANSWER, "order_id": "NW-48306"})
    metrics = generation_metrics([wrong, TARGETS[1]], TARGETS)
    assert metrics["generation/field_exact/order_id"] == 0.5
    assert all(metrics[f"generation/field_exact/{f}"] == 1.0 for f in EXTRACTED_FIELDS if f != "order_id")
    assert metrics["generation/json_valid_rate"] == 1.0
    assert metrics["generation/exact_match"] == 0.5
    assert metrics["generation/reply_rouge_l"] == 1.0
    # One token of six (five fields, "wireless mouse" is two) differs: F1 5/6 on that example.
    assert metrics["generation/field_micro_f1"] == pytest.approx((5 / 6 + 1) / 2)
    assert per_example_scores([wrong], TARGETS[:1]).loc[0, "field_accuracy"] == pytest.approx(0.8)


@pytest.mark.parametrize(
    ("text", "expected"),
    [
        ('{"a":1}</s> trailing', {"a": 1}),
        ('  \n{"a": {"b": [1, 2]}}\n<|endoftext|>{"a": 2}', {"a": {"b": [1, 2]}}),
        ('{"a": 1', None),
        ("no json here", None),
        ("", None),
    ],
)
def test_the_parser_takes_the_first_complete_object(text, expected):
    assert parse_output(text) == expected


@pytest.mark.parametrize(
    ("change", "valid"),
    [
        ({}, True),
        ({"order_id": None, "product": None}, True),
        ({"extra": "x"}, False),
        ({"intent": None}, False),
        ({"urgency": 2}, False),
    ],
)
def test_is_valid_wants_the_exact_schema(change, valid):
    assert is_valid({**ANSWER, **change}) is valid
    assert is_valid({k: v for k, v in ANSWER.items() if k != "reply"}) is False


def test_paired_comparison_detects_better_and_worse_and_survives_identical_scores():
    rng = np.random.default_rng(1)
    champion = rng.uniform(0.3, 0.7, size=200)
    better = np.clip(champion + rng.uniform(0.05, 0.2, size=200), 0, 1)
    result = compare_paired(better, champion, significance_level=0.05)
    assert result["verdict"] == "better"
    assert 0 < result["ci_low"] <= result["mean_difference"] <= result["ci_high"]
    assert compare_paired(champion, better, significance_level=0.05)["verdict"] == "worse"
    same = compare_paired(champion, champion.copy(), significance_level=0.05)
    assert same["verdict"] == "no significant difference"
    assert (same["p_value"], same["mean_difference"], same["ci_low"], same["ci_high"]) == (1.0, 0, 0, 0)


def test_paired_comparison_is_reproducible_and_refuses_unpaired_scores():
    rng = np.random.default_rng(2)
    a, b = rng.integers(0, 2, size=50), rng.integers(0, 2, size=50)
    assert compare_paired(a, b, 0.05, seed=3) == compare_paired(a, b, 0.05, seed=3)
    with pytest.raises(ValueError, match="50 and 49"):
        compare_paired(a, b[:-1], 0.05)


def test_counterfactual_change_rate_counts_an_output_that_became_invalid():
    original = [TARGETS[0], TARGETS[1], TARGETS[0], "garbage"]
    perturbed = [
        TARGETS[0],  # unchanged
        json.dumps({**OTHER, "urgency": "low", "reply": "Different words."}),  # urgency changed
        '{"intent": "track_order"',  # became invalid: every field changed
        "still garbage",  # invalid both times: unchanged
    ]
    report = counterfactual_field_changes(original, perturbed)
    assert report["bias/counterfactual_field_change_rate"] == 0.5
    assert report["bias/counterfactual_change/urgency"] == 0.5
    assert report["bias/counterfactual_change/intent"] == 0.25
    assert "bias/counterfactual_change/reply" not in report
    # Only the first two pairs could show a change of field values.
    assert report["bias/counterfactual_both_valid_share"] == 0.5


def test_group_gap_on_a_hand_made_frame():
    per_example = pd.DataFrame({"exact": [1, 1, 0, 1, 0, 0], "field_accuracy": [1, 1, 0.6, 1, 0.4, 0.2]})
    groups = pd.Series(["chat", "chat", "chat", "email", "email", "email"])
    report = group_metrics(per_example, groups)
    assert report["slice/chat/exact"] == pytest.approx(2 / 3)
    assert report["slice/email/exact"] == pytest.approx(1 / 3)
    assert report["bias/max_group_exact_gap"] == pytest.approx(1 / 3)
    assert report["bias/max_group_field_accuracy_gap"] == pytest.approx(13 / 15 - 8 / 15)
