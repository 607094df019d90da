"""Drift statistics and the retraining decision, on inline micro-data (no Evidently run here)."""

from __future__ import annotations

from datetime import UTC, datetime, timedelta

import numpy as np
import pandas as pd
import pytest
from prometheus_client import CollectorRegistry, generate_latest
from sklearn.metrics import f1_score

from evaluation.drift import (
    accuracy_drop_decision,
    accuracy_drop_test,
    detect_drift,
    document_frequencies,
    held_out_splits,
    macro_f1_drop_test,
    macro_f1_from_codes,
    oov_shares,
    per_class_recall_shift,
    running_tests,
    total_variation,
    window_levels,
    words,
)
from monitoring.monitor import (
    latest_version_rows,
    new_labelled_examples,
    should_retrain,
)
from serving.metrics import DriftGaugeCollector, write_drift_summary
from tests.support import settings

PARAMS = settings("monitoring")
NOW = datetime(2026, 11, 23, 12, 0, tzinfo=UTC)


def summary(data: bool = False, concept: bool | None = None) -> dict:
    """The parts of a drift summary that the decision reads."""
    return {
        "data_drift": {"detected": data, "drifted_signals": ["text"] if data else []},
        "concept_drift": None
        if concept is None
        else {"detected": concept, "drifted_signals": ["accuracy"] if concept else []},
    }


def test_words_fold_case_and_drop_digits_and_punctuation():
    assert words("Where's order NW-48305? ¿Dónde está?") == ["where", "s", "order", "nw", "dónde", "está"]


def test_oov_share_counts_unseen_words_and_leave_one_out_for_training_texts():
    vocabulary = document_frequencies(["where is my order", "where is my refund", "cancel order"])
    assert oov_shares(["where is my parcel"], vocabulary).tolist() == [0.25]
    # "refund" is only in its own training text: unseen had that text not been trained on.
    assert oov_shares(["where is my refund"], vocabulary, in_vocabulary_texts=True).tolist() == [0.25]
    assert oov_shares(["", "123"], vocabulary).tolist() == [0.0, 0.0]


@pytest.mark.parametrize("seed", range(5))
def test_macro_f1_from_codes_matches_sklearn_on_present_classes(seed):
    rng = np.random.default_rng(seed)
    truth = rng.integers(0, 6, 300)
    truth[truth == 2] = 3  # a class that only appears among predictions
    predicted = np.where(rng.random(300) < 0.6, truth, rng.integers(0, 6, 300))
    expected = f1_score(truth, predicted, labels=sorted(set(truth)), average="macro", zero_division=0)
    assert macro_f1_from_codes(truth, predicted, 6) == pytest.approx(expected)


def test_accuracy_drop_test_one_sided():
    reference = np.array([True] * 90 + [False] * 10)
    assert accuracy_drop_test(reference, np.array([True] * 60 + [False] * 40))["p_value"] < 1e-4
    assert accuracy_drop_test(reference, np.array([True] * 98 + [False] * 2))["p_value"] > 0.9
    same = accuracy_drop_test(np.ones(50, bool), np.ones(70, bool))
    assert same == {"reference": 1.0, "current": 1.0, "drop": 0.0, "p_value": 1.0}


def labelled(truth: list[str], predicted: list[str]) -> pd.DataFrame:
    return pd.DataFrame({"true_label": truth, "label": predicted})


def test_macro_f1_bootstrap_separates_a_broken_model_from_a_resample():
    rng = np.random.default_rng(0)
    truth = list(rng.choice(["a", "b", "c"], 400))
    good = [t if rng.random() < 0.9 else "a" for t in truth]
    reference = labelled(truth[:200], good[:200])
    same_quality = labelled(truth[200:], good[200:])
    broken = labelled(truth[200:], ["a"] * 200)
    assert macro_f1_drop_test(reference, same_quality, ["a", "b", "c"], 500, 1)["p_value"] > 0.05
    result = macro_f1_drop_test(reference, broken, ["a", "b", "c"], 500, 1)
    assert result["p_value"] < 0.01
    assert result["drop"] > 0.5
    assert result["drop_ci95"][0] > 0


def test_per_class_recall_flags_only_the_class_that_broke():
    reference = labelled(["a"] * 50 + ["b"] * 50, ["a"] * 48 + ["b"] * 2 + ["b"] * 49 + ["a"])
    current = labelled(["a"] * 40 + ["b"] * 40, ["a"] * 39 + ["b"] + ["a"] * 30 + ["b"] * 10)
    shifts = per_class_recall_shift(reference, current, ["a", "b", "c"], alpha=0.01)
    assert shifts["b"]["dropped"] and not shifts["a"]["dropped"]
    assert shifts["b"]["shift"] == pytest.approx(0.25 - 0.98)
    assert shifts["c"]["current_recall"] is None and "dropped" not in shifts["c"]


def test_total_variation():
    assert total_variation(pd.Series(["a", "b"]), pd.Series(["a", "b"])) == 0
    assert total_variation(pd.Series(["a", "a"]), pd.Series(["b", "b"])) == 1


def test_false_alarm_budget_is_split_by_weight_over_the_tests_that_run():
    assert len(running_tests(labelled=False, estimated=False)) == 5
    assert running_tests(labelled=True, estimated=True)[-3:] == ["estimated_accuracy", "accuracy", "macro_f1"]
    everything = window_levels(PARAMS, running_tests(labelled=True, estimated=True))
    assert sum(everything.values()) == pytest.approx(PARAMS.false_alarm_rate)
    # With the default weights the three quality tests, which can retrain, share 1%.
    quality = everything["accuracy"] + everything["estimated_accuracy"] + everything["macro_f1"]
    assert quality == pytest.approx(0.01)
    assert everything["accuracy"] > everything["estimated_accuracy"] > everything["macro_f1"]
    unlabelled = window_levels(PARAMS, running_tests(labelled=False, estimated=True))
    assert sum(unlabelled.values()) == pytest.approx(PARAMS.false_alarm_rate)
    assert unlabelled["text"] > everything["text"]  # the label-free tests share the whole budget


def test_detect_drift_refuses_bad_input_with_reasons():
    reference = pd.DataFrame({"text": ["a b"] * 200, "label": ["x"] * 200})
    quality = pd.DataFrame({"true_label": ["x"] * 50, "label": ["x"] * 50})
    with pytest.raises(KeyError, match="current window lacks columns \\['label'\\]"):
        detect_drift(
            reference, quality, pd.DataFrame({"text": ["a"] * 200}), document_frequencies([]), ["x"], PARAMS
        )
    with pytest.raises(ValueError, match="fewer than monitoring.min_window_size"):
        detect_drift(reference, quality, reference.head(10), document_frequencies([]), ["x"], PARAMS)


def test_held_out_splits_name_the_missing_split_and_the_fix(tmp_path):
    pd.DataFrame({"text": ["a"], "label": ["x"]}).to_parquet(tmp_path / "test.parquet")
    assert held_out_splits(tmp_path, ["test"])["split"].tolist() == ["test"]
    with pytest.raises(FileNotFoundError, match="held-out split\\(s\\) val missing.*dvc repro prepare"):
        held_out_splits(tmp_path, ["val", "test"])


def test_the_accuracy_cusum_keeps_its_level_over_every_label_it_is_run_on():
    """A threshold set for 500 labels and run over 1,200 raised 1.6% false alarms at a 0.25% level."""
    reference = np.r_[np.ones(380, dtype=bool), np.zeros(20, dtype=bool)]
    short = accuracy_drop_decision(reference, np.ones(300, dtype=bool), 0.05, 500, 0.01)
    long = accuracy_drop_decision(reference, np.ones(1200, dtype=bool), 0.05, 500, 0.01)
    assert (short["horizon"], long["horizon"]) == (500, 1500)
    assert long["threshold"] > short["threshold"]


# ------------------------------------------------------------------------------------------- decision


def test_no_drift_no_action():
    decision = should_retrain(summary(), 500, None, NOW, PARAMS)
    assert (decision.retrain, decision.alert) == (False, False)


def test_data_drift_alone_alerts_but_does_not_retrain_by_default():
    decision = should_retrain(summary(data=True), 500, None, NOW, PARAMS)
    assert (decision.retrain, decision.alert) == (False, True)
    assert any("retrain_on_data_drift" in reason for reason in decision.reasons)


def test_data_drift_retrains_when_configured():
    params = PARAMS.model_copy(update={"retrain_on_data_drift": True})
    assert should_retrain(summary(data=True), 500, None, NOW, params).retrain


def test_concept_drift_needs_enough_new_labels():
    few = should_retrain(summary(concept=True), PARAMS.min_labelled_examples - 1, None, NOW, PARAMS)
    assert not few.retrain and few.alert
    assert "fewer than monitoring.min_labelled_examples" in few.reasons[-1]
    assert should_retrain(summary(concept=True), PARAMS.min_labelled_examples, None, NOW, PARAMS).retrain


def test_an_estimated_accuracy_drop_alerts_at_once_and_retrains_once_labels_arrive():
    estimated = {
        **summary(),
        "performance_estimate": {
            "drifted": True,
            "reference": 0.95,
            "current": 0.89,
            "current_low": 0.87,
            "current_high": 0.91,
        },
    }
    unlabelled = should_retrain(estimated, 0, None, NOW, PARAMS)
    assert (unlabelled.retrain, unlabelled.alert) == (False, True)
    assert "estimated accuracy fell from 0.950 to 0.890 [0.870, 0.910]" in unlabelled.reasons[0]
    assert should_retrain(estimated, PARAMS.min_labelled_examples, None, NOW, PARAMS).retrain


def test_cool_down_blocks_then_expires():
    recently = NOW - timedelta(hours=PARAMS.cooldown_hours - 1)
    blocked = should_retrain(summary(concept=True), 500, recently, NOW, PARAMS)
    assert not blocked.retrain and "cool-down" in blocked.reasons[-1]
    long_ago = NOW - timedelta(hours=PARAMS.cooldown_hours + 1)
    assert should_retrain(summary(concept=True), 500, long_ago, NOW, PARAMS).retrain


# ------------------------------------------------------------------------------------------- feedback

DATA = settings(
    "data",
    raw_path="data/raw/intents.csv",
    label_column="intent",
    group_columns=("channel",),
    labels=("a", "b"),
)


def test_new_labelled_examples_skip_known_texts_unlabelled_rows_and_keep_the_latest_label():
    raw = pd.DataFrame({"text": ["Where is my order?"], "intent": ["a"], "channel": ["app"]})
    log = pd.DataFrame(
        {
            "text": ["where is my   order", "new text", "new text", "unlabelled", "  "],
            "true_label": ["a", "a", "b", None, "a"],
        }
    )
    examples = new_labelled_examples(log, raw, DATA)
    assert examples.to_dict("records") == [{"text": "new text", "label": "b"}]


def test_latest_version_rows_keeps_the_newest_model_only():
    window = pd.DataFrame(
        {
            "created_at": pd.to_datetime(["2026-01-01", "2026-01-02", "2026-01-03"]),
            "model_version": ["1", "2", "2"],
        }
    )
    assert latest_version_rows(window)["model_version"].tolist() == ["2", "2"]


# ---------------------------------------------------------------------------------------- prometheus


def test_gauge_collector_exports_the_latest_summary(tmp_path):
    registry = CollectorRegistry()
    path = tmp_path / "latest.json"
    registry.register(DriftGaugeCollector(path))
    assert b"tuneloop_drift" not in generate_latest(registry)  # nothing before the first run
    write_drift_summary(
        {
            "n_current": 300,
            "n_labelled": 120,
            "finished_at": NOW.isoformat(),
            "data_drift": {
                "detected": True,
                "signals": {
                    "text": {"method": "perc_text_content_drift", "score": 0.81, "drifted": True},
                    "oov_share": {"method": "ks", "score": 1e-9, "drifted": True},
                },
            },
            "concept_drift": {
                "detected": False,
                "tests": {"accuracy": {"reference": 0.9, "current": 0.88}},
            },
            "performance_estimate": {
                "reference": 0.9,
                "current": 0.8,
                "current_low": 0.77,
                "current_high": 0.83,
                "drifted": True,
            },
        },
        path,
    )
    text = generate_latest(registry).decode()
    assert 'tuneloop_drift_detected{kind="data"} 1.0' in text
    assert 'tuneloop_drift_detected{kind="concept"} 0.0' in text
    assert 'tuneloop_drift_score{method="perc_text_content_drift",signal="text"} 0.81' in text
    assert 'tuneloop_drift_quality{metric="accuracy",which="current"} 0.88' in text
    assert 'tuneloop_drift_window_rows{kind="labelled"} 120.0' in text
    assert 'tuneloop_drift_detected{kind="estimated_accuracy"} 1.0' in text
    assert 'tuneloop_drift_estimated_accuracy{which="low"} 0.77' in text
    assert "tuneloop_drift_last_run_timestamp_seconds 1.7954352e+09" in text
    path.write_text("{not json")
    assert b"tuneloop_drift_detected" not in generate_latest(registry)  # a torn file is skipped, not fatal
