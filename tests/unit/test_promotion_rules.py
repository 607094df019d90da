"""Pure promotion rules and the champion/challenger decision, on inline facts: no MLflow, no model."""

from __future__ import annotations

import numpy as np
import pytest

from registry.promote import VersionFacts, promotion_refusals, rollback_refusals
from registry.register import (
    METRIC_TAG_PREFIX,
    compare_generations,
    compare_with_prod,
    dev_decision,
    metric_tags,
    metrics_from_tags,
)

GOOD_METRICS = {"quality/accuracy": 0.9, "quality/macro_f1": 0.88}
GOOD_TAGS = {
    "approval": "approved",
    "was_dev": "true",
    "tuneloop.gates_passed": "true",
    **metric_tags(GOOD_METRICS),
}


def facts(aliases: tuple[str, ...] = (), **tags: str) -> VersionFacts:
    return VersionFacts(version="3", tags={**GOOD_TAGS, **tags}, aliases=aliases)


def test_an_approved_former_dev_that_passes_may_be_promoted():
    assert promotion_refusals(facts(), "prod") == []
    assert promotion_refusals(facts(aliases=("dev",), was_dev=""), "prod") == []


@pytest.mark.parametrize(
    ("tags", "aliases", "expected"),
    [
        ({"approval": ""}, (), "is not approved (tag approval=<unset>)"),
        ({"approval": "pending"}, (), "is not approved (tag approval=pending)"),
        ({"approval": "rejected"}, (), "was rejected by a reviewer"),
        ({"was_dev": ""}, (), "was never `dev`"),
        ({"tuneloop.gates_passed": "false", "tuneloop.gates_failed": "min_accuracy"}, (), "min_accuracy"),
        ({}, ("prod",), "is already `prod`"),
    ],
)
def test_each_refusal_says_why(tags, aliases, expected):
    reasons = promotion_refusals(facts(aliases=aliases, **tags), "prod")
    assert len(reasons) == 1
    assert expected in reasons[0]


def test_every_reason_is_reported_at_once():
    reasons = promotion_refusals(
        facts(approval="rejected", was_dev="", **{"tuneloop.gates_passed": "false"}), "prod"
    )
    assert len(reasons) == 3


def test_gates_are_rechecked_against_todays_thresholds():
    assert promotion_refusals(facts(), "prod", {"min_accuracy": 0.85, "min_macro_f1": 0.8}) == []
    reasons = promotion_refusals(facts(), "prod", {"min_accuracy": 0.95})
    assert (
        len(reasons) == 1 and "no longer passes its gates" in reasons[0] and "quality/accuracy" in reasons[0]
    )
    missing = promotion_refusals(facts(), "prod", {"max_counterfactual_flip_rate": 0.1})
    assert "no recorded metric" in missing[0]


def test_a_version_served_int8_is_rechecked_on_its_int8_figures():
    # register_candidate tags these beside the headline metrics when serving.quantize is int8.
    quantised = {
        f"{METRIC_TAG_PREFIX}quantized/accuracy": "0.84",
        f"{METRIC_TAG_PREFIX}quantized/macro_f1": "0.86",
    }
    thresholds = {"min_accuracy": 0.85, "min_macro_f1": 0.8}
    reasons = promotion_refusals(facts(**quantised), "prod", thresholds)
    assert len(reasons) == 1 and reasons[0].startswith("v3 (int8):") and "0.84" in reasons[0]
    assert promotion_refusals(facts(), "prod", thresholds) == []  # served fp32: nothing to re-check


def test_rollback_needs_a_previous_version_not_rejected_since():
    assert "no `previous-prod`" in rollback_refusals(None, "prod")[0]
    assert "rejected" in rollback_refusals(facts(approval="rejected"), "prod")[0]
    assert rollback_refusals(facts(), "prod") == []


def test_metric_tags_round_trip():
    assert metrics_from_tags(metric_tags(GOOD_METRICS)) == pytest.approx(GOOD_METRICS)


def _paired(candidate_only: int, prod_only: int, both: int = 50, neither: int = 10):
    """Labels where the candidate alone is right ``candidate_only`` times and prod alone ``prod_only``."""
    y = np.array(["a"] * (candidate_only + prod_only + both + neither))
    right, wrong = np.array(["a"]), np.array(["b"])
    candidate = np.concatenate(
        [
            np.repeat(right, candidate_only),
            np.repeat(wrong, prod_only),
            np.repeat(right, both),
            np.repeat(wrong, neither),
        ]
    )
    prod = np.concatenate(
        [
            np.repeat(wrong, candidate_only),
            np.repeat(right, prod_only),
            np.repeat(right, both),
            np.repeat(wrong, neither),
        ]
    )
    return y, candidate, prod


def test_identical_predictions_are_no_difference():
    y, candidate, _ = _paired(0, 0)
    result = compare_with_prod(y, candidate, candidate, "1", 0.05, 0.0)
    assert result.p_value == 1.0 and result.verdict == "no significant difference"


def test_a_small_gain_is_noise_not_an_improvement():
    result = compare_with_prod(*_paired(4, 2), "1", 0.05, 0.0)
    assert result.delta_accuracy > 0
    assert result.p_value > 0.05
    assert result.verdict == "no significant difference"


def test_a_large_gain_is_an_improvement_unless_below_the_minimum():
    paired = _paired(30, 2)
    assert compare_with_prod(*paired, "1", 0.05, 0.0).verdict == "improvement"
    assert compare_with_prod(*paired, "1", 0.05, 0.5).verdict == "no significant difference"


def test_a_significant_regression_blocks_dev():
    result = compare_with_prod(*_paired(1, 20), "1", 0.05, 0.0)
    assert result.verdict == "regression" and result.p_value < 0.001
    reasons = dev_decision({"passed": True, "reasons": []}, result, require_improvement=False)
    assert len(reasons) == 1 and "significant regression against prod v1" in reasons[0]


def test_noise_passes_unless_an_improvement_is_required():
    noise = compare_with_prod(*_paired(4, 2), "1", 0.05, 0.0)
    assert dev_decision({"passed": True}, noise, require_improvement=False) == []
    assert (
        "not a significant improvement" in dev_decision({"passed": True}, noise, require_improvement=True)[0]
    )


def test_failed_gates_block_dev_with_their_reasons():
    gates = {"passed": False, "failed": ["min_accuracy"], "reasons": ["quality/accuracy = 0.5 ... FAILED"]}
    assert dev_decision(gates, None, require_improvement=False) == [
        "gate failed: quality/accuracy = 0.5 ... FAILED"
    ]


def _field_accuracy(better: int, worse: int, same: int = 60) -> tuple[np.ndarray, np.ndarray]:
    """Per-example field accuracy of a candidate and prod: ``better`` examples up, ``worse`` down."""
    prod = np.full(better + worse + same, 0.6)
    candidate = np.concatenate([np.full(better, 1.0), np.full(worse, 0.2), np.full(same, 0.6)])
    return candidate, prod


def test_a_generator_compared_on_identical_scores_is_no_difference():
    candidate, _ = _field_accuracy(0, 0)
    result = compare_generations(candidate, candidate, "1", 0.05, 0.0)
    assert result.p_value == 1.0 and result.verdict == "no significant difference"
    assert (result.test, result.score) == ("Wilcoxon", "field accuracy")


def test_a_generator_that_answers_worse_is_a_regression_named_by_its_test():
    result = compare_generations(*_field_accuracy(2, 25), "4", 0.05, 0.0)
    assert result.verdict == "regression" and result.delta_accuracy < 0
    assert (result.candidate_only_correct, result.prod_only_correct) == (2, 25)
    reasons = dev_decision({"passed": True}, result, require_improvement=False)
    assert reasons == [
        f"significant regression against prod v4: field accuracy {result.delta_accuracy:+.4f}, "
        f"Wilcoxon p = {result.p_value:.4g}"
    ]


def test_a_generator_that_answers_better_is_an_improvement_unless_below_the_minimum():
    paired = _field_accuracy(25, 2)
    assert compare_generations(*paired, "1", 0.05, 0.0).verdict == "improvement"
    assert compare_generations(*paired, "1", 0.05, 0.5).verdict == "no significant difference"
