"""Output-validity drift, the generation feedback report and the generation decision, on inline data
(no Evidently run and no model here: tests/integration/test_generation_drift.py has those)."""

from __future__ import annotations

import json

import numpy as np
import pandas as pd
import pytest
from prometheus_client import CollectorRegistry, generate_latest

from evaluation.drift import (
    GENERATION_SIGNALS,
    OUTPUT_VALIDITY,
    generation_feedback,
    output_validity,
    validity_drift,
    validity_share,
)
from monitoring.monitor import GENERATION_ALERT_ONLY, flat_metrics, generation_decision, should_retrain
from serving.metrics import DriftGaugeCollector, write_drift_summary
from tests.support import settings

PARAMS = settings("monitoring")
ANSWER = {
    "intent": "track_order",
    "order_id": "NW-123456",
    "product": None,
    "action": "check_status",
    "urgency": "normal",
    "reply": "Let me look that up.",
}
VALID = json.dumps(ANSWER)


def test_validity_follows_the_output_contract():
    answers = [
        VALID,
        f"Sure! {VALID} </s> and more",  # text around the object is ignored by parse_output
        json.dumps({**ANSWER, "extra": "key"}),  # an invented key breaks the contract
        json.dumps({key: value for key, value in ANSWER.items() if key != "reply"}),
        json.dumps({**ANSWER, "intent": None}),  # only order_id and product may be null
        VALID[:-5],  # cut off by the token limit
        "not json at all",
        None,  # no answer
    ]
    assert output_validity(answers).tolist() == [True, True, False, False, False, False, False, False]
    assert validity_share(answers) == pytest.approx(2 / 8)
    assert validity_share([]) is None


def test_a_significant_and_large_validity_drop_drifts():
    reference = np.array([True] * 90 + [False] * 10)
    dropped = validity_drift(reference, np.array([True] * 120 + [False] * 80), alpha=0.01, min_drop=0.05)
    assert dropped["drifted"] and dropped["score"] == dropped["p_value"] < 1e-4
    assert dropped["reference_share"] == pytest.approx(0.9) and dropped["current_share"] == pytest.approx(0.6)
    assert dropped["drop"] == pytest.approx(0.3)
    assert (dropped["n_reference"], dropped["n_current"]) == (100, 200)
    # One-sided: more valid answers than the reference is no drift.
    better = validity_drift(reference, np.array([True] * 199 + [False]), alpha=0.01, min_drop=0.05)
    assert not better["drifted"] and better["score"] > 0.9


def test_a_significant_but_small_validity_drop_does_not_drift():
    reference = np.array([True] * 9_900 + [False] * 100)  # 0.99
    current = np.array([True] * 9_700 + [False] * 300)  # 0.97: p ~ 1e-25, but only 2 points
    small = validity_drift(reference, current, alpha=0.01, min_drop=0.05)
    assert small["score"] < 1e-10 and not small["drifted"]
    assert validity_drift(reference, current, alpha=0.01, min_drop=0.01)["drifted"]


def test_validity_drift_degenerate_and_empty_sides():
    # Every answer invalid on both sides (a model that never learnt the format): nothing to test.
    none_valid = validity_drift(np.zeros(60, bool), np.zeros(150, bool), alpha=0.01, min_drop=0.05)
    assert none_valid["score"] == 1.0 and not none_valid["drifted"]
    with pytest.raises(ValueError, match="both sides"):
        validity_drift(np.array([], bool), np.ones(10, bool), alpha=0.01, min_drop=0.05)


def test_feedback_report_counts_accepted_and_edited_answers():
    feedback = pd.DataFrame(
        {
            "accepted": [True, True, None, None, False, True],
            "edited_output": [None, None, '{"intent": "x"}', None, "better answer", None],
        }
    ).astype(object)
    report = generation_feedback(feedback)
    # Row 3 has no feedback; row 5 was refused and edited.
    assert report == {"n_feedback": 5, "n_accepted": 3, "accepted_share": 0.6, "n_edited": 2}
    empty = generation_feedback(pd.DataFrame({"accepted": [None], "edited_output": [None]}).astype(object))
    assert empty == {"n_feedback": 0, "n_accepted": 0, "accepted_share": None, "n_edited": 0}
    assert generation_feedback(pd.DataFrame(columns=["accepted", "edited_output"]))["n_feedback"] == 0


def generation_summary(prompt: list[str], validity: bool) -> dict:
    """A generation summary shaped like ``evaluation.drift.generation_drift``'s."""
    signals = {
        name: {"method": "ks", "score": 0.5, "threshold": 0.01, "drifted": name in prompt}
        for name in GENERATION_SIGNALS
    }
    signals[OUTPUT_VALIDITY] = {
        "method": "two-proportion z-test, one-sided",
        "score": 1e-6 if validity else 0.4,
        "threshold": 0.01,
        "drifted": validity,
        "reference_share": 0.92,
        "current_share": 0.61 if validity else 0.9,
        "drop": 0.31 if validity else 0.02,
        "p_value": 1e-6 if validity else 0.4,
        "min_drop": 0.05,
        "n_reference": 64,
        "n_current": 200,
    }
    drifted = [name for name in GENERATION_SIGNALS if signals[name]["drifted"]]
    return {
        "task": "generation",
        "n_current": 200,
        "n_labelled": 12,
        "data_drift": {
            "detected": bool(drifted),
            "drifted_signals": drifted,
            "share_drifted": len(drifted) / len(GENERATION_SIGNALS),
            "signals": signals,
        },
        "prompt_drift": {"detected": bool(prompt), "drifted_signals": prompt},
        "validity_drift": {"detected": validity, **signals[OUTPUT_VALIDITY]},
        "concept_drift": None,
        "feedback": {"n_feedback": 10, "n_accepted": 7, "accepted_share": 0.7, "n_edited": 3},
        "drift_detected": bool(prompt) or validity,
    }


def test_no_generation_drift_no_alert():
    decision = generation_decision(generation_summary([], False))
    assert (decision.retrain, decision.alert, decision.reasons) == (False, False, ("no drift",))


@pytest.mark.parametrize(
    ("prompt", "validity", "expected"),
    [
        (["text", "oov_share"], False, ["prompt drift in text, oov_share"]),
        ([], True, ["output validity drift: valid answers 0.920 on held-out messages, 0.610 in the window"]),
        (["text"], True, ["prompt drift in text", "output validity drift"]),
    ],
)
def test_generation_drift_only_alerts(prompt, validity, expected):
    decision = generation_decision(generation_summary(prompt, validity))
    assert decision.alert and not decision.retrain
    assert decision.reasons[-1] == GENERATION_ALERT_ONLY
    for reason, start in zip(decision.reasons, expected, strict=False):
        assert reason.startswith(start)
    assert len(decision.reasons) == len(expected) + 1


def test_the_classifier_decision_would_retrain_on_a_generation_summary_so_it_is_not_used():
    """Why generations get their own decision: ``should_retrain`` reads output-validity drift as data
    drift and, configured to retrain on data drift with enough labels, would append feedback rows."""
    configured = PARAMS.model_copy(update={"retrain_on_data_drift": True, "min_labelled_examples": 1})
    summary = generation_summary([], True)
    now = pd.Timestamp("2026-11-30T12:00:00Z").to_pydatetime()
    assert should_retrain(summary, 5, None, now, configured).retrain
    assert not generation_decision(summary).retrain


def test_generation_summary_feeds_mlflow_metrics_and_prometheus(tmp_path):
    summary = generation_summary(["text"], True)
    metrics = flat_metrics(summary)
    assert metrics["drift/detected"] == 1.0 and metrics["drift/prompt_detected"] == 1.0
    assert metrics["drift/output_validity_score"] == pytest.approx(1e-6)
    assert metrics["drift/output_validity_drifted"] == 1.0
    assert metrics["drift/output_validity_reference_share"] == pytest.approx(0.92)
    assert metrics["drift/output_validity_current_share"] == pytest.approx(0.61)
    assert metrics["feedback/accepted_share"] == pytest.approx(0.7)
    assert metrics["feedback/n_edited"] == 3.0

    path = write_drift_summary(summary, tmp_path / "latest.json")
    registry = CollectorRegistry()
    registry.register(DriftGaugeCollector(path))
    scraped = generate_latest(registry).decode()
    assert 'tuneloop_drift_signal_drifted{signal="output_validity"} 1.0' in scraped
    assert 'tuneloop_drift_detected{kind="data"} 1.0' in scraped


def test_the_flow_alert_renders_a_generation_summary():
    from flows.monitor_drift import alert_markdown

    summary = generation_summary(["text"], True)
    decision = generation_decision(summary)
    markdown = alert_markdown(summary, list(decision.reasons))
    assert "| output_validity | two-proportion z-test, one-sided | 1e-06 | 0.01 | **yes** |" in markdown
    assert GENERATION_ALERT_ONLY in markdown
