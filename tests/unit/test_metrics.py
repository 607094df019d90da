import numpy as np
import pandas as pd
import pytest

from evaluation.bias import counterfactual_test, group_metrics, insert_identity
from evaluation.gates import evaluate_gates
from evaluation.quality import expected_calibration_error, headline_metrics, per_class_metrics


def test_headline_and_per_class():
    metrics = headline_metrics([0, 0, 1, 1], [0, 1, 1, 1])
    assert metrics["accuracy"] == 0.75
    per_class = per_class_metrics([0, 0, 1, 1], [0, 1, 1, 1], ["a", "b"])
    assert per_class["a"] == {"precision": 1.0, "recall": 0.5, "f1": pytest.approx(2 / 3), "support": 2}


def test_ece_is_zero_when_confidence_matches_accuracy_and_large_when_overconfident():
    calibrated = np.array([[0.75, 0.25]] * 4)
    assert expected_calibration_error(calibrated, [0, 0, 0, 1]) == pytest.approx(0.0)
    overconfident = np.array([[0.99, 0.01]] * 4)
    assert expected_calibration_error(overconfident, [1, 1, 0, 1]) == pytest.approx(0.74)


def test_group_metrics_reports_the_gap_between_channels():
    groups = pd.DataFrame({"channel": ["chat", "chat", "email", "email"]})
    report = group_metrics([0, 1, 0, 1], [0, 1, 1, 1], groups)["channel"]
    assert report["by_group"]["chat"]["accuracy"] == 1.0
    assert report["by_group"]["email"]["accuracy"] == 0.5
    assert report["accuracy_gap"] == 0.5


def test_insert_identity_prefixes_and_lowercases_first_letter():
    assert insert_identity("Where is my order?", "As a woman,") == "As a woman, where is my order?"


def test_counterfactual_flags_a_model_that_reacts_to_identity():
    texts, y_true = ["cancel it", "refund please"], [0, 1]

    def biased(batch):
        return np.array(
            [0 if "man," in t and "woman" not in t else (0 if "cancel" in t else 1) for t in batch]
        )

    report = counterfactual_test(texts, y_true, {"gender": ["As a woman,", "As a man,"]}, biased)
    assert report["gender"]["flip_rate"] == 0.25
    assert report["gender"]["accuracy_gap"] == 0.5
    fair = counterfactual_test(
        texts,
        y_true,
        {"gender": ["As a woman,", "As a man,"]},
        lambda b: np.array([0 if "cancel" in t else 1 for t in b]),
    )
    assert fair["overall"]["flip_rate"] == 0.0


def test_gates_pass_and_fail_with_reasons():
    metrics = {"quality/accuracy": 0.9, "quality/macro_f1": 0.7}
    verdict = evaluate_gates(metrics, {"min_accuracy": 0.8, "min_macro_f1": 0.75})
    assert verdict["passed"] is False
    assert verdict["failed"] == ["min_macro_f1"]
    assert "quality/macro_f1 = 0.7000, must be >= 0.7500" in verdict["reasons"][0]
    with pytest.raises(KeyError, match="max_expected_calibration_error"):
        evaluate_gates(metrics, {"max_expected_calibration_error": 0.1})
