"""benchmarks/drift_power.py on synthetic answers: pools, mixtures, power, CBPE error and the report."""

from __future__ import annotations

import json

import numpy as np
import pandas as pd
import pytest

from benchmarks.drift_power import (
    POOL_COLUMNS,
    Settings,
    build_pools,
    cbpe_accuracy,
    main,
    mixture,
    mixture_window,
    run_cells,
)
from evaluation.drift import DATA_SIGNALS, ESTIMATED_ACCURACY
from tests.support import REPO_ROOT

LABELS = ("cancel", "refund", "return", "status", "address")
# A false-alarm split over the quality tests and the data signals (only the ratios matter).
WEIGHTS = {"accuracy": 0.2, ESTIMATED_ACCURACY: 0.2, "macro_f1": 0.1, **dict.fromkeys(DATA_SIGNALS, 0.1)}
# Settings as params.yaml has them, with a coarse CUSUM step so that few thresholds are simulated.
SETTINGS = Settings(
    false_alarm_rate=0.05,
    min_accuracy_drop=0.05,
    min_macro_f1_drop=0.05,
    weights=WEIGHTS,
    cusum_step=300,
)


def synthetic_answers(
    seed: int = 0,
    sizes: dict[str, int] | None = None,
    confidence: dict[str, tuple[float, float]] | None = None,
) -> pd.DataFrame:
    """Answers whose chance of being right is their confidence (calibration holds in every pool).

    Confidence is Beta-distributed per pool: the held-out splits sure of themselves (accuracy about
    0.82), the drifted pool less so (about 0.67).
    """
    rng = np.random.default_rng(seed)
    sizes = sizes or {"val": 190, "test": 263, "drifted": 400}
    confidence = confidence or {"val": (9, 2), "test": (9, 2), "drifted": (5, 2.5)}
    parts = []
    for pool, size in sizes.items():
        score = rng.beta(*confidence[pool], size)
        correct = rng.random(size) < score
        truth = rng.integers(0, len(LABELS), size)
        predicted = np.where(correct, truth, (truth + rng.integers(1, len(LABELS), size)) % len(LABELS))
        names = np.asarray(LABELS, dtype=object)
        parts.append(
            pd.DataFrame(
                {
                    "pool": pool,
                    "text": [f"{pool} text {index}" for index in range(size)],
                    "true_label": names[truth],
                    "predicted": names[predicted],
                    "score": score,
                    "correct": correct,
                }
            )
        )
    return pd.concat(parts, ignore_index=True)


@pytest.fixture(scope="module")
def pools():
    return build_pools(synthetic_answers())


def test_pools_split_the_answers_and_relabelling_makes_every_answer_wrong(pools):
    assert len(pools.held_out) == len(pools.stable) == len(pools.relabelled) == 190 + 263
    assert len(pools.test) == len(pools.before_reference) == 263
    assert len(pools.drifted) == 400
    assert pools.stable.accuracy - pools.drifted.accuracy > 0.08
    assert pools.relabelled.accuracy == 0.0
    np.testing.assert_array_equal(pools.relabelled.score, pools.stable.score)
    np.testing.assert_array_equal(pools.relabelled.predicted, pools.stable.predicted)


@pytest.mark.parametrize("drop", [0.0, 0.02, 0.05, 0.10, 0.30])
def test_the_mixture_realises_the_asked_drop(pools, drop):
    shares = mixture(pools, drop)
    assert sum(shares.values()) == pytest.approx(1)
    expected = sum(shares[name] * getattr(pools, name).accuracy for name in shares)
    assert expected == pytest.approx(pools.stable.accuracy - drop)
    if drop > pools.stable.accuracy - pools.drifted.accuracy:
        # Beyond what the drifted texts alone lose, wrong labels make up the rest.
        assert shares["stable"] == 0 and shares["relabelled"] > 0
    rng = np.random.default_rng(1)
    realised = [pools.stable.accuracy - mixture_window(pools, shares, 600, rng).accuracy for _ in range(40)]
    assert np.mean(realised) == pytest.approx(drop, abs=0.012)


def test_a_drifted_pool_no_worse_than_stable_mixes_in_wrong_labels_only():
    better = build_pools(
        synthetic_answers(seed=2, confidence={"val": (9, 2), "test": (9, 2), "drifted": (30, 1)})
    )
    shares = mixture(better, 0.05)
    assert shares["drifted"] == 0
    assert shares["stable"] * better.stable.accuracy == pytest.approx(better.stable.accuracy - 0.05)


def test_a_ten_point_drop_is_flagged_far_more_often_than_stable_windows_raise_alarms(pools):
    cells = run_cells(pools, SETTINGS, drops=(0.0, 0.10), sizes=(300,), windows=30, stable_windows=60, seed=3)
    power = cells["power"]
    for side in ("before", "after"):
        stable = power[side]["combined"]["0"]["300"]
        drifted = power[side]["combined"]["0.1"]["300"]
        assert stable["windows"] == 60 and drifted["windows"] == 30
        assert drifted["rate"] >= stable["rate"] + 0.5, side
        assert stable["rate"] <= 0.1, side
        assert drifted["low"] <= drifted["rate"] <= drifted["high"]
        assert drifted["realised_drop"] == pytest.approx(0.10, abs=0.015)
        assert abs(stable["realised_drop"]) < 0.015
    # Every test of each side is reported; "combined" is the retraining decision, accuracy or macro-F1.
    assert set(power["before"]) == {"accuracy", "macro_f1", "combined"}
    assert set(power["after"]) == {"accuracy", "estimated_accuracy", "macro_f1", "combined"}
    # After's CUSUM catches it in most windows of 300 labels.
    assert power["after"]["combined"]["0.1"]["300"]["rate"] >= 0.8
    for tests in power.values():
        single = max(tests[name]["0.1"]["300"]["rate"] for name in ("accuracy", "macro_f1"))
        assert tests["combined"]["0.1"]["300"]["rate"] >= single


def test_estimated_accuracy_is_close_when_calibration_holds():
    """Large pools with confidence spread wide, so the calibrator has answers at every confidence and the
    drifted pool's own accuracy is close to its expectation: what is left is each window's noise."""
    wide = {"val": (4, 1.5), "test": (4, 1.5), "drifted": (3, 1.5)}
    pools = build_pools(
        synthetic_answers(seed=6, sizes={"val": 1500, "test": 1500, "drifted": 3000}, confidence=wide)
    )
    cbpe = cbpe_accuracy(pools, sizes=(500,), windows=60, seed=4)
    drifted = cbpe["drifted"]["500"]
    # A window of 500 answers at accuracy about 0.67 has a realised accuracy with sd about 0.02.
    assert drifted["mae"] <= 0.03
    assert abs(drifted["bias"]) <= 0.02
    assert drifted["coverage"] >= 0.8
    whole = cbpe["whole_pool"]["drifted"]
    assert abs(whole["error"]) <= 0.02
    assert whole["low"] <= whole["estimate"] <= whole["high"]


def test_the_command_writes_the_report_the_plot_and_the_pools(tmp_path):
    answers = tmp_path / "answers.parquet"
    synthetic_answers(seed=5).to_parquet(answers)
    output = tmp_path / "results" / "drift_power.json"
    plot = tmp_path / "results" / "drift_power.png"
    main(
        [
            "--pools",
            str(answers),
            "--params",
            str(REPO_ROOT / "params.yaml"),
            "--windows",
            "4",
            "--stable-windows",
            "4",
            "--drops",
            "0",
            "0.05",
            "--labels",
            "600",
            "--cbpe-sizes",
            "500",
            "--output",
            str(output),
            "--plot",
            str(plot),
            "--no-mlflow",
        ]
    )
    report = json.loads(output.read_text())
    assert {"inputs", "settings", "power", "cbpe", "headline", "targets_met", "seconds"} <= set(report)
    assert report["inputs"]["pool_sizes"]["drifted"] == 400
    assert set(report["inputs"]["accuracy"]) >= {"held_out", "stable", "test", "drifted"}
    design = report["settings"]["cusum_designs_at_full_held_out"]["600"]
    assert design["threshold"] > 0 and design["horizon"] == 600
    assert report["settings"]["macro_f1_bootstrap_samples"] == 1000
    cell = report["power"]["after"]["combined"]["0.05"]["600"]
    assert set(cell) == {"rate", "low", "high", "windows", "realised_drop"}
    headline = report["headline"]
    assert set(headline["false_alarm_rate_combined"]["after"]) == {"600"}
    assert set(headline["detection_5pt_drop_at_600_labels"]) == {"before", "after"}
    assert {"mae", "coverage"} <= set(headline["cbpe_drifted_500"])
    assert len(report["targets_met"]) == 3
    assert all(isinstance(met, bool) for met in report["targets_met"].values())
    assert plot.stat().st_size > 0
    written = pd.read_parquet(output.with_name("drift_power_pools.parquet"))
    assert list(written.columns) == list(POOL_COLUMNS) and len(written) == 190 + 263 + 400
