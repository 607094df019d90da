"""The accuracy CUSUM and the accuracy estimated from confidence (CBPE), on simulated answers."""

from __future__ import annotations

import numpy as np
import pytest

from evaluation.performance import (
    ConfidenceCalibrator,
    SequentialDesign,
    accuracy_cusum,
    budget_levels,
    correctness_log_ratios,
    cusum_path,
    estimate_accuracy,
    estimated_accuracy_drop_test,
)

REFERENCE_ACCURACY = 0.95
DESIGN = SequentialDesign.for_reference(REFERENCE_ACCURACY, 500, min_drop=0.05, horizon=600, alpha=0.01)


def answers(rng: np.random.Generator, accuracy: float, count: int) -> np.ndarray:
    return rng.random(count) < accuracy


def test_cusum_path_is_pages_recursion():
    log_ratios = correctness_log_ratios(answers(np.random.default_rng(0), 0.8, 200), 0.95, 0.9)
    statistic, expected = 0.0, []
    for value in log_ratios:
        statistic = max(0.0, statistic + value)
        expected.append(statistic)
    np.testing.assert_allclose(cusum_path(log_ratios), expected)


def test_unchanged_quality_rarely_raises_the_alarm_within_the_horizon():
    rng = np.random.default_rng(7)
    runs = 600
    alarms = sum(
        accuracy_cusum(answers(rng, REFERENCE_ACCURACY, 600), DESIGN)["drifted"] for _ in range(runs)
    )
    # alpha = 1%: allow three standard errors of the simulated rate.
    assert alarms / runs <= 0.01 + 3 * np.sqrt(0.01 * 0.99 / runs)


def test_a_five_point_drop_is_caught_within_six_hundred_labels():
    rng = np.random.default_rng(8)
    results = [accuracy_cusum(answers(rng, REFERENCE_ACCURACY - 0.05, 600), DESIGN) for _ in range(200)]
    assert np.mean([result["drifted"] for result in results]) >= 0.8
    caught = [result for result in results if result["drifted"]]
    assert all(result["max_statistic"] >= result["threshold"] for result in caught)
    assert all(result["p_value"] <= 0.02 for result in caught)


def test_a_drop_after_a_long_good_stretch_is_caught_as_fast_as_one_at_once():
    """CUSUM forgets the good stretch; a plain SPRT would first climb out of its evidence."""
    rng = np.random.default_rng(9)
    delays = []
    for _ in range(100):
        good = answers(rng, 0.99, 1500)
        bad = answers(rng, REFERENCE_ACCURACY - 0.1, 600)
        result = accuracy_cusum(np.concatenate([good, bad]), DESIGN)
        if result["drifted"]:
            delays.append(result["alarm_at"] - len(good))
    assert len(delays) >= 95 and np.median(delays) < 200
    assert min(delays) > 0  # no alarm during the good stretch


def test_a_perfect_reference_still_gives_finite_evidence():
    design = SequentialDesign.for_reference(1.0, 300, min_drop=0.05, horizon=200, alpha=0.01)
    result = accuracy_cusum(np.array([True] * 50 + [False] * 20), design)
    assert np.isfinite(result["statistic"]) and result["drifted"]


def calibrated_answers(rng: np.random.Generator, count: int, low: float, high: float):
    """Confidences uniform in [low, high], each answer right with exactly that chance."""
    confidence = rng.uniform(low, high, count)
    return confidence, rng.random(count) < confidence


def test_estimated_accuracy_tracks_the_realised_accuracy_without_labels():
    rng = np.random.default_rng(1)
    calibrator = ConfidenceCalibrator(*calibrated_answers(rng, 3000, 0.5, 1.0))
    errors, covered = [], []
    for _ in range(200):
        confidence, correct = calibrated_answers(rng, 300, 0.55, 0.9)  # a harder mix than the reference
        estimate = estimate_accuracy(calibrator.chance_correct(confidence))
        realised = correct.mean()
        errors.append(abs(estimate["estimate"] - realised))
        covered.append(estimate["low"] <= realised <= estimate["high"])
    assert np.mean(errors) < 0.03
    assert np.mean(covered) >= 0.85


def test_calibration_is_monotone_in_confidence():
    rng = np.random.default_rng(2)
    calibrator = ConfidenceCalibrator(*calibrated_answers(rng, 2000, 0.3, 1.0))
    chances = calibrator.chance_correct(np.linspace(0, 1, 50))
    assert np.all(np.diff(chances) >= 0) and chances.min() >= 0 and chances.max() <= 1


def test_a_window_of_unsure_answers_raises_the_estimated_drop():
    rng = np.random.default_rng(3)
    reference_confidence, reference_correct = calibrated_answers(rng, 800, 0.8, 1.0)
    calibrator = ConfidenceCalibrator(reference_confidence, reference_correct)
    same = estimated_accuracy_drop_test(
        calibrator, reference_confidence, rng.uniform(0.8, 1.0, 300), min_drop=0.05, alpha=0.01
    )
    unsure = estimated_accuracy_drop_test(
        calibrator, reference_confidence, rng.uniform(0.6, 0.9, 300), min_drop=0.05, alpha=0.01
    )
    assert not same["drifted"]
    assert unsure["drifted"] and unsure["drop"] > 0.1
    assert unsure["current_low"] < unsure["current"] < unsure["current_high"]


def test_budget_levels_keep_the_whole_budget_and_follow_the_weights():
    weights = {"accuracy": 2.0, "text": 1.0, "label": 1.0}
    levels = budget_levels(weights, ["accuracy", "text", "label"], 0.05)
    assert sum(levels.values()) == pytest.approx(0.05)
    assert levels["accuracy"] == pytest.approx(0.025)
    assert budget_levels(weights, ["text", "label"], 0.05)["text"] == pytest.approx(0.025)
    with pytest.raises(KeyError, match="no weight"):
        budget_levels(weights, ["macro_f1"], 0.05)
