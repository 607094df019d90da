"""Data and concept drift of live traffic against the training reference, with Evidently 0.7.

Pure functions over pandas frames with the inference log's column names (``text``, ``label`` = the
predicted label, ``score``, ``true_label`` = feedback or None): data in, a JSON-ready summary and
Evidently snapshots out. Saving and logging them is the caller's job (``monitoring.monitor``).

Generation windows (``text`` = the prompt, ``generated`` = the answer) get the same text signals on
the prompts and a test of the share of answers that meet the output contract (:func:`generation_drift`).

False alarms are budgeted per window: the tests a window runs share ``false_alarm_rate`` by the
weights in ``monitoring.test_weights`` (weighted Bonferroni, :func:`evaluation.performance.budget_levels`),
so unchanged traffic raises any flag in at most that share of windows. Quality gets the larger shares:
accuracy on feedback (a CUSUM over the version's labelled answers) and accuracy estimated from the
model's confidence before labels arrive (CBPE), see :mod:`evaluation.performance`.
"""

from __future__ import annotations

import json
import math
import re
from collections import Counter
from collections.abc import Callable, Iterable, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import pandas as pd
from scipy.stats import chi2_contingency, fisher_exact
from statsmodels.stats.proportion import proportions_ztest

from evaluation.performance import (
    ConfidenceCalibrator,
    SequentialDesign,
    accuracy_cusum,
    budget_levels,
    estimate_accuracy,
    estimated_accuracy_drop_test,
)
from tuneloop.config import MonitoringParams

TEXT = "text"
PREDICTED = "label"
TRUE_LABEL = "true_label"
SCORE = "score"
# Descriptor columns the data-drift report tests besides the text itself.
TEXT_LENGTH = "text_length"
NON_LETTER_SHARE = "non_letter_share"
OOV_SHARE = "oov_share"
# The signals of a text column alone: the text itself and its descriptors (classifier inputs and
# generation prompts alike).
TEXT_SIGNALS = (TEXT, TEXT_LENGTH, NON_LETTER_SHARE, OOV_SHARE)
DATA_SIGNALS = (*TEXT_SIGNALS, PREDICTED)
CONCEPT_SIGNALS = ("accuracy", "macro_f1")
ESTIMATED_ACCURACY = "estimated_accuracy"
# Generation windows: the prompt's text signals and the share of answers that meet the output contract.
GENERATED = "generated"
VALID = "valid"
OUTPUT_VALIDITY = "output_validity"
GENERATION_SIGNALS = (*TEXT_SIGNALS, OUTPUT_VALIDITY)
# Our two-sample chi-square test of homogeneity, registered with Evidently under this name.
HOMOGENEITY_TEST = "chi2_homogeneity"
# Letters-only words, case-folded: digits and order numbers would make every new order id "new".
_WORD = re.compile(r"[^\W\d_]+", re.UNICODE)


def answers_frame(
    texts: pd.Series, true_labels: pd.Series, predictor: Callable[[Sequence[str]], pd.DataFrame]
) -> pd.DataFrame:
    """A model's answers on labelled texts: ``text``, ``label`` (predicted), ``score``, ``true_label``.

    ``predictor``: texts -> a frame with ``label`` and ``score`` (top-1 confidence), in order.
    """
    predicted = predictor(texts.astype(str).tolist())
    return pd.DataFrame(
        {
            TEXT: texts.astype(str).to_numpy(),
            PREDICTED: predicted["label"].astype(str).to_numpy(),
            SCORE: predicted["score"].astype(float).to_numpy(),
            TRUE_LABEL: true_labels.astype(str).to_numpy(),
        }
    )


def held_out_splits(prepared_dir: Path, splits: Sequence[str]) -> pd.DataFrame:
    """The prepared splits a model never trained on (``text``, ``label``), with a ``split`` column."""
    missing = [split for split in splits if not (Path(prepared_dir) / f"{split}.parquet").is_file()]
    if missing:
        raise FileNotFoundError(
            f"held-out split(s) {', '.join(missing)} missing from {prepared_dir}: "
            "run `dvc repro prepare`, or change monitoring.quality_reference_splits in params.yaml"
        )
    return pd.concat(
        [pd.read_parquet(Path(prepared_dir) / f"{split}.parquet").assign(split=split) for split in splits],
        ignore_index=True,
    )


def held_out_answers(
    predictor: Callable[[Sequence[str]], pd.DataFrame], held_out: pd.DataFrame
) -> pd.DataFrame:
    """:func:`answers_frame` of :func:`held_out_splits`, keeping the ``split`` column: the reference
    quality the drift job compares live feedback with, recorded at registration."""
    answers = answers_frame(held_out["text"], held_out["label"], predictor)
    return answers.assign(split=held_out["split"].to_numpy())


def words(text: str) -> list[str]:
    return _WORD.findall(text.casefold())


def document_frequencies(texts: Iterable[str]) -> Counter:
    """In how many texts each word occurs: the training vocabulary, with counts for leave-one-out."""
    frequencies: Counter = Counter()
    for text in texts:
        frequencies.update(set(words(text)))
    return frequencies


def oov_shares(texts: Sequence[str], vocabulary: Counter, *, in_vocabulary_texts: bool = False) -> np.ndarray:
    """Share of each text's words that the training vocabulary lacks.

    Written here instead of Evidently's ``OOVWordsPercentage`` because that descriptor downloads an
    NLTK English word list at run time (it fails offline), and because "out of *our training*
    vocabulary" is what says the model meets words it never learned from.

    Reference texts come from the training data, so against the full vocabulary they would score 0
    by construction and any live text would look drifted. With ``in_vocabulary_texts`` a word counts
    as out of vocabulary when this text is the only training text that has it (leave-one-out): the
    share it would have had as unseen traffic.
    """
    unseen_below = 2 if in_vocabulary_texts else 1
    shares = np.zeros(len(texts), dtype=float)
    for index, text in enumerate(texts):
        tokens = words(text)
        if tokens:
            shares[index] = sum(vocabulary.get(token, 0) < unseen_below for token in tokens) / len(tokens)
    return shares


def _register_homogeneity_test() -> None:
    """Register a two-sample chi-square test of homogeneity with Evidently (idempotent).

    Evidently's ``chisquare`` is a goodness-of-fit test that takes the reference proportions as
    exact; with a reference of 1,000 rows and windows of a few hundred that inflates false alarms
    (and a class the reference never predicted gives an infinite statistic). The contingency test
    treats both sides as samples.
    """
    from evidently.legacy.calculations.stattests.registry import (
        StatTest,
        _registered_stat_tests,
        register_stattest,
    )
    from evidently.legacy.core import ColumnType

    if HOMOGENEITY_TEST in _registered_stat_tests:
        return

    def homogeneity(reference: pd.Series, current: pd.Series, feature_type, threshold: float):
        table = pd.concat(
            [reference.value_counts().rename("reference"), current.value_counts().rename("current")], axis=1
        ).fillna(0)
        if len(table) < 2:
            return 1.0, False
        p_value = float(chi2_contingency(table.T.to_numpy())[1])
        return p_value, p_value < threshold

    register_stattest(
        StatTest(
            name=HOMOGENEITY_TEST,
            display_name="chi-square test of homogeneity p_value",
            allowed_feature_types=[ColumnType.Categorical],
        ),
        default_impl=homogeneity,
    )


def with_oov(frame: pd.DataFrame, vocabulary: Counter, *, in_vocabulary_texts: bool) -> pd.DataFrame:
    frame = frame[[TEXT]].astype(str)
    frame[OOV_SHARE] = oov_shares(frame[TEXT].tolist(), vocabulary, in_vocabulary_texts=in_vocabulary_texts)
    return frame


def running_tests(labelled: bool, estimated: bool) -> list[str]:
    """The tests a window runs: data signals always, CBPE with confidences, quality with feedback."""
    return [
        *DATA_SIGNALS,
        *([ESTIMATED_ACCURACY] if estimated else []),
        *(CONCEPT_SIGNALS if labelled else []),
    ]


def window_levels(params: MonitoringParams, running: Sequence[str]) -> dict[str, float]:
    """Each running test's false-alarm level from ``monitoring.test_weights``."""
    weights = params.test_weights
    by_test = {
        "accuracy": weights.accuracy,
        ESTIMATED_ACCURACY: weights.estimated_accuracy,
        "macro_f1": weights.macro_f1,
        **dict.fromkeys(DATA_SIGNALS, weights.each_data_signal),
    }
    return budget_levels(by_test, running, params.false_alarm_rate)


@dataclass
class DriftResult:
    """The JSON summary and the Evidently snapshots behind it (``save_html`` on each)."""

    summary: dict[str, Any]
    data_report: Any
    prediction_report: Any
    quality_report: Any | None = None


def text_drift(
    reference: pd.DataFrame,
    current: pd.DataFrame,
    vocabulary: Counter,
    params: MonitoringParams,
    alpha: float,
) -> tuple[dict[str, dict], Any]:
    """Evidently report of the ``text`` column and its descriptors; per-signal flags at level ``alpha``.

    The text column is tested with Evidently's domain classifier (TF-IDF + logistic regression, ROC
    AUC on a held-out half); its length, non-letter share and out-of-vocabulary share (against
    ``vocabulary``, see :func:`oov_shares`) with two-sample Kolmogorov-Smirnov. ``reference`` holds
    training texts, ``current`` the window's. Used for classifier inputs (:func:`data_drift`) and for
    generation prompts (:func:`generation_drift`).

    Returns:
        The signals of :data:`TEXT_SIGNALS` (descriptors with their reference and current means) and
        the Evidently ``Snapshot``.
    """
    from evidently import DataDefinition, Dataset, Report
    from evidently.descriptors import NonLetterCharacterPercentage, TextLength
    from evidently.metrics import ValueDrift

    text_definition = DataDefinition(text_columns=[TEXT], numerical_columns=[OOV_SHARE])
    descriptors = [
        TextLength(TEXT, alias=TEXT_LENGTH),
        NonLetterCharacterPercentage(TEXT, alias=NON_LETTER_SHARE),
    ]
    text_sets = [
        Dataset.from_pandas(
            with_oov(frame, vocabulary, in_vocabulary_texts=is_reference),
            data_definition=text_definition,
            descriptors=descriptors,
        )
        for frame, is_reference in ((current, False), (reference, True))
    ]
    if params.text_method == "perc_text_content_drift":
        text_threshold = 1 - alpha
    else:
        text_threshold = params.text_auc_threshold
    text_methods = {
        TEXT: (params.text_method, text_threshold),
        TEXT_LENGTH: ("ks", alpha),
        NON_LETTER_SHARE: ("ks", alpha),
        OOV_SHARE: ("ks", alpha),
    }
    text_snapshot = Report(
        [
            ValueDrift(column=column, method=method, threshold=threshold)
            for column, (method, threshold) in text_methods.items()
        ],
        include_tests=True,
    ).run(text_sets[0], text_sets[1])
    signals = _signals_from_snapshot(json.loads(text_snapshot.json()), text_methods)
    current_frame, reference_frame = (dataset.as_dataframe() for dataset in text_sets)
    for column in (TEXT_LENGTH, NON_LETTER_SHARE, OOV_SHARE):
        signals[column]["reference_mean"] = float(reference_frame[column].mean())
        signals[column]["current_mean"] = float(current_frame[column].mean())
    return signals, text_snapshot


def _drift_section(signals: dict[str, dict], order: Sequence[str]) -> dict[str, Any]:
    """The ``data_drift`` part of a summary: which of ``order``'s signals drifted, and each signal."""
    drifted = [name for name in order if signals[name]["drifted"]]
    return {
        "detected": bool(drifted),
        "drifted_signals": drifted,
        "share_drifted": len(drifted) / len(order),
        "signals": {name: signals[name] for name in order},
    }


def data_drift(
    reference: pd.DataFrame,
    prediction_reference: pd.DataFrame,
    current: pd.DataFrame,
    vocabulary: Counter,
    params: MonitoringParams,
    alpha: float,
) -> tuple[dict[str, Any], Any, Any]:
    """Evidently reports of text, descriptor and predicted-label drift; per-signal flags at level ``alpha``.

    Text and descriptors: :func:`text_drift` against ``reference`` (training texts). Predicted labels
    are tested with a chi-square test of homogeneity against ``prediction_reference``, the model's
    predictions on held-out texts: on its own training texts a model is right far more often than on
    anything new, so their predicted-label distribution is the true one, while live predictions carry
    the model's usual errors. Measured with the tiny test model: 12 false alarms in 20 stable windows
    against training predictions.

    Returns:
        The summary, the text snapshot and the prediction snapshot (Evidently ``Snapshot``s).
    """
    from evidently import DataDefinition, Dataset, Report
    from evidently.metrics import ValueDrift

    _register_homogeneity_test()
    text_signals, text_snapshot = text_drift(reference, current, vocabulary, params, alpha)
    prediction_methods = {PREDICTED: (HOMOGENEITY_TEST, alpha)}
    label_definition = DataDefinition(categorical_columns=[PREDICTED])
    prediction_snapshot = Report(
        [ValueDrift(column=PREDICTED, method=HOMOGENEITY_TEST, threshold=alpha)], include_tests=True
    ).run(
        *(
            Dataset.from_pandas(frame[[PREDICTED]].astype(str), data_definition=label_definition)
            for frame in (current, prediction_reference)
        )
    )
    signals = {
        **text_signals,
        **_signals_from_snapshot(json.loads(prediction_snapshot.json()), prediction_methods),
    }
    signals[PREDICTED]["total_variation"] = total_variation(
        prediction_reference[PREDICTED], current[PREDICTED]
    )
    return _drift_section(signals, DATA_SIGNALS), text_snapshot, prediction_snapshot


def _signals_from_snapshot(snapshot: dict, methods: dict[str, tuple[str, float]]) -> dict[str, dict]:
    """Score per column from the metrics, drift flag from Evidently's own test of each metric."""
    status = {test["metric_config"]["metric_id"]: test["status"] for test in snapshot["tests"]}
    signals = {}
    for metric in snapshot["metrics"]:
        column = metric["config"]["column"]
        method, threshold = methods[column]
        if metric["id"] not in status:
            raise RuntimeError(f"Evidently returned no drift test for column {column!r}")
        signals[column] = {
            "method": method,
            # A p-value for the statistical tests, the domain classifier's ROC AUC for the text.
            "score": float(metric["value"]),
            "threshold": float(threshold),
            "drifted": status[metric["id"]] == "FAIL",
        }
    missing = set(methods) - set(signals)
    if missing:
        raise RuntimeError(f"Evidently returned no drift metric for {sorted(missing)}")
    return signals


def total_variation(reference: pd.Series, current: pd.Series) -> float:
    """Half the L1 distance between two label distributions: 0 identical, 1 disjoint."""
    ref = reference.astype(str).value_counts(normalize=True)
    cur = current.astype(str).value_counts(normalize=True)
    return float(0.5 * ref.subtract(cur, fill_value=0).abs().sum())


def accuracy_drop_test(reference_correct: np.ndarray, current_correct: np.ndarray) -> dict[str, float]:
    """One-sided two-proportion z-test that current accuracy is below the reference accuracy.

    The two sets are different texts (independent samples), so an unpaired test is the right one.
    """
    k = np.array([reference_correct.sum(), current_correct.sum()])
    n = np.array([len(reference_correct), len(current_correct)])
    reference_accuracy, current_accuracy = k / n
    # Every answer right (or every answer wrong) on both sides: no variance, nothing to test.
    degenerate = k.sum() in (0, n.sum())
    p_value = 1.0 if degenerate else float(proportions_ztest(k, n, alternative="larger")[1])
    return {
        "reference": float(reference_accuracy),
        "current": float(current_accuracy),
        "drop": float(reference_accuracy - current_accuracy),
        "p_value": p_value,
    }


def macro_f1_from_codes(truth: np.ndarray, predicted: np.ndarray, n_labels: int) -> float:
    """Macro-F1 over the classes present in ``truth``, from integer label codes.

    Equals ``sklearn.metrics.f1_score(average="macro", labels=<present classes>)``; written with
    bincount because the bootstrap calls it thousands of times and sklearn's input checks alone
    take milliseconds per call. Classes absent from ``truth`` are left out, as a resample that
    misses a rare class should not score it as F1 = 0.
    """
    true_positives = np.bincount(truth[truth == predicted], minlength=n_labels)
    actual = np.bincount(truth, minlength=n_labels)
    predicted_count = np.bincount(predicted, minlength=n_labels)
    present = actual > 0
    denominator = actual[present] + predicted_count[present]
    return float(np.mean(2 * true_positives[present] / denominator))


def macro_f1_drop_test(
    reference: pd.DataFrame, current: pd.DataFrame, labels: Sequence[str], samples: int, seed: int
) -> dict[str, Any]:
    """Bootstrap test that current macro-F1 is below the reference's.

    Returns ``reference``, ``current``, ``drop`` and ``p_value`` (floats) and ``drop_ci95`` (the 95%
    bootstrap interval of the drop, ``[low, high]``).

    Macro-F1 has no closed-form variance, so both sets are resampled independently ``samples`` times;
    the one-sided p-value is the share of resampled differences (reference - current) at or below 0,
    with the +1 correction so it is never exactly 0.
    """
    rng = np.random.default_rng(seed)
    codes = {
        label: index
        for index, label in enumerate(
            dict.fromkeys(
                [
                    *labels,
                    *reference[TRUE_LABEL],
                    *reference[PREDICTED],
                    *current[TRUE_LABEL],
                    *current[PREDICTED],
                ]
            )
        )
    }
    n_labels = len(codes)

    def encode(frame: pd.DataFrame) -> tuple[np.ndarray, np.ndarray]:
        return (
            frame[TRUE_LABEL].map(codes).to_numpy(dtype=np.int64),
            frame[PREDICTED].map(codes).to_numpy(dtype=np.int64),
        )

    (ref_truth, ref_pred), (cur_truth, cur_pred) = encode(reference), encode(current)
    reference_f1 = macro_f1_from_codes(ref_truth, ref_pred, n_labels)
    current_f1 = macro_f1_from_codes(cur_truth, cur_pred, n_labels)
    differences = np.empty(samples)
    for index in range(samples):
        ref_rows = rng.integers(0, len(ref_truth), len(ref_truth))
        cur_rows = rng.integers(0, len(cur_truth), len(cur_truth))
        differences[index] = macro_f1_from_codes(
            ref_truth[ref_rows], ref_pred[ref_rows], n_labels
        ) - macro_f1_from_codes(cur_truth[cur_rows], cur_pred[cur_rows], n_labels)
    p_value = (np.sum(differences <= 0) + 1) / (samples + 1)
    low, high = np.quantile(differences, [0.025, 0.975])
    return {
        "reference": reference_f1,
        "current": current_f1,
        "drop": reference_f1 - current_f1,
        "p_value": float(p_value),
        "drop_ci95": [float(low), float(high)],
    }


def per_class_recall_shift(
    reference: pd.DataFrame, current: pd.DataFrame, labels: Sequence[str], alpha: float
) -> dict[str, dict]:
    """Recall per true class, reference vs current, with a one-sided Fisher exact test per class.

    Reported for diagnosis, not used to trigger: its p-values are Bonferroni-corrected over the
    classes that have current examples, and a class needs a few examples before a shift means much.
    """
    shifts: dict[str, dict] = {}
    tested = [label for label in labels if (current[TRUE_LABEL] == label).any()]
    for label in labels:
        ref_rows = reference[reference[TRUE_LABEL] == label]
        cur_rows = current[current[TRUE_LABEL] == label]
        ref_hits = int((ref_rows[PREDICTED] == label).sum())
        cur_hits = int((cur_rows[PREDICTED] == label).sum())
        entry: dict[str, Any] = {
            "n_reference": len(ref_rows),
            "n_current": len(cur_rows),
            "reference_recall": ref_hits / len(ref_rows) if len(ref_rows) else None,
            "current_recall": cur_hits / len(cur_rows) if len(cur_rows) else None,
        }
        if len(ref_rows) and len(cur_rows):
            entry["shift"] = entry["current_recall"] - entry["reference_recall"]
            table = [[ref_hits, len(ref_rows) - ref_hits], [cur_hits, len(cur_rows) - cur_hits]]
            p_value = float(fisher_exact(table, alternative="greater")[1])
            entry["p_value"] = min(1.0, p_value * len(tested))
            entry["dropped"] = entry["p_value"] < alpha
        shifts[label] = entry
    return shifts


def correctness(frame: pd.DataFrame) -> np.ndarray:
    return (frame[TRUE_LABEL].astype(str) == frame[PREDICTED].astype(str)).to_numpy()


def cusum_design(
    reference_correct: np.ndarray, n_labels: int, min_drop: float, step: int, alpha: float
) -> SequentialDesign:
    """The accuracy CUSUM's design for ``n_labels`` labels: its threshold holds over all of them.

    The horizon is ``n_labels`` rounded up to a multiple of ``step``, so that a few designs serve
    every window and each is simulated once. A threshold set for 500 labels and run over 1,200 raised
    1.6% false alarms at a 0.25% level; one set for 1,000 labels and run over 600 cost a quarter of
    the power on a 5-point drop (both measured in ``benchmarks/results/drift_power*.json``).
    """
    horizon = step * max(1, -(-n_labels // step))
    return SequentialDesign.for_reference(
        float(reference_correct.mean()), len(reference_correct), min_drop, horizon, alpha
    )


def accuracy_drop_decision(
    reference_correct: np.ndarray, current_correct: np.ndarray, min_drop: float, step: int, alpha: float
) -> dict[str, Any]:
    """Did accuracy drop? A CUSUM and a fixed-sample test of the same labels, at ``alpha / 2`` each.

    The CUSUM (:func:`evaluation.performance.accuracy_cusum`) tells the reference accuracy from one
    ``min_drop`` lower, so the smallest drop that matters is in the hypothesis instead of a gate on the
    observed drop (such a gate misses half the drops of exactly its size), and it gathers evidence
    across windows. But its threshold must hold over all the labels it runs on
    (:func:`cusum_design`) and allow for the reference's own error, so a large drop in few labels
    takes it a while: measured, a 10-point drop in 100 labels caught 0.12 of the time. The one-sided
    two-proportion z-test with the ``min_drop`` gate catches those (the gate costs nothing for drops
    well above it). Either counts.
    """
    design = cusum_design(reference_correct, len(current_correct), min_drop, step, alpha / 2)
    result = accuracy_cusum(current_correct, design)
    fixed = accuracy_drop_test(reference_correct, current_correct)
    fixed_drifted = bool(fixed["p_value"] < alpha / 2 and fixed["drop"] >= min_drop)
    result["fixed_test"] = {
        **fixed,
        "method": "two-proportion z-test, one-sided, with the min-drop gate",
        "threshold": alpha / 2,
        "drifted": fixed_drifted,
    }
    result["cusum_drifted"] = result["drifted"]
    result["drifted"] = bool(result["cusum_drifted"] or fixed_drifted)
    return result


def concept_drift(
    quality_reference: pd.DataFrame,
    feedback: pd.DataFrame,
    labels: Sequence[str],
    params: MonitoringParams,
    levels: dict[str, float],
) -> dict[str, Any]:
    """Accuracy and macro-F1 of the labelled feedback against the reference quality.

    ``feedback``: the labelled answers of one model version, oldest first. Accuracy:
    :func:`accuracy_drop_decision`. Macro-F1 has no sequential form here: a bootstrap test at its
    level that counts when the drop is also at least ``min_macro_f1_drop``.
    """
    accuracy = accuracy_drop_decision(
        correctness(quality_reference),
        correctness(feedback),
        params.min_accuracy_drop,
        params.cusum_step_labels,
        levels["accuracy"],
    )
    macro_f1 = macro_f1_drop_test(
        quality_reference, feedback, labels, params.bootstrap_samples, params.reference_seed
    )
    macro_f1["drifted"] = (
        macro_f1["p_value"] < levels["macro_f1"] and macro_f1["drop"] >= params.min_macro_f1_drop
    )
    drifted = [name for name, test in (("accuracy", accuracy), ("macro_f1", macro_f1)) if test["drifted"]]
    return {
        "detected": bool(drifted),
        "drifted_signals": drifted,
        "n_feedback": len(feedback),
        "tests": {
            "accuracy": accuracy,
            "macro_f1": {**macro_f1, "method": "bootstrap, one-sided", "threshold": levels["macro_f1"]},
        },
        "per_class_recall": per_class_recall_shift(quality_reference, feedback, labels, levels["accuracy"]),
    }


def performance_estimate(
    quality_reference: pd.DataFrame, current: pd.DataFrame, params: MonitoringParams, alpha: float
) -> dict[str, Any]:
    """Accuracy of the window estimated from the model's confidence (CBPE), before any label arrives.

    The calibrator is fitted on the held-out answers (``score`` -> right or wrong). With feedback in
    the window, ``realised`` puts the accuracy on those labels next to the estimate for the same rows.
    """
    calibrator = ConfidenceCalibrator(quality_reference[SCORE].to_numpy(), correctness(quality_reference))
    result = estimated_accuracy_drop_test(
        calibrator,
        quality_reference[SCORE].to_numpy(),
        current[SCORE].to_numpy(),
        params.min_accuracy_drop,
        alpha,
    )
    labelled = current[current[TRUE_LABEL].notna()] if TRUE_LABEL in current.columns else current.iloc[:0]
    result["n_labelled"] = len(labelled)
    if len(labelled):
        on_labelled = estimate_accuracy(calibrator.chance_correct(labelled[SCORE].to_numpy()))
        result["estimated_on_labelled"] = on_labelled["estimate"]
        result["realised_on_labelled"] = float(correctness(labelled).mean())
    return result


def quality_report(quality_reference: pd.DataFrame, labelled: pd.DataFrame, labels: Sequence[str]) -> Any:
    """Evidently's classification quality of the labelled feedback next to the reference, for people."""
    from evidently import DataDefinition, Dataset, MulticlassClassification, Report
    from evidently.presets import ClassificationPreset

    definition = DataDefinition(
        classification=[MulticlassClassification(target=TRUE_LABEL, prediction_labels=PREDICTED)],
        categorical_columns=[TRUE_LABEL, PREDICTED],
    )
    current, reference = (
        Dataset.from_pandas(frame[[TRUE_LABEL, PREDICTED]].astype(str), data_definition=definition)
        for frame in (labelled, quality_reference)
    )
    return Report([ClassificationPreset()]).run(current, reference)


def _check_inputs(
    frames: Sequence[tuple[str, pd.DataFrame, set[str]]],
    window_rows: int,
    unit: str,
    params: MonitoringParams,
) -> None:
    """Each named frame has its columns and rows, and the window is big enough to judge; else say which."""
    for name, frame, needed in frames:
        missing = needed - set(frame.columns)
        if missing:
            raise KeyError(f"the {name} lacks columns {sorted(missing)} (it has {list(frame.columns)})")
        if frame.empty:
            raise ValueError(f"the {name} is empty")
    if window_rows < params.min_window_size:
        raise ValueError(
            f"the window has {window_rows} {unit}, fewer than monitoring.min_window_size "
            f"({params.min_window_size}): too few to tell drift from noise"
        )


def detect_drift(
    reference: pd.DataFrame,
    quality_reference: pd.DataFrame,
    current: pd.DataFrame,
    vocabulary: Counter,
    labels: Sequence[str],
    params: MonitoringParams,
    quality_html: bool = True,
    version_feedback: pd.DataFrame | None = None,
) -> DriftResult:
    """Data drift of ``current`` against ``reference``; concept drift when there is enough feedback.

    Args:
        reference: training texts (``text``) for text and descriptor drift.
        quality_reference: labelled held-out texts with the model's predictions (``true_label``,
            ``label``, ``score``): the reference quality, the reference predicted-label distribution,
            and the calibration of the accuracy estimate.
        current: a window of the inference log (``text``, ``label``, ``score``, ``true_label`` or
            None). Without ``score`` on both sides there is no accuracy estimate.
        vocabulary: document frequencies of the training words (``document_frequencies``).
        labels: the model's label set.
        params: thresholds and budgets from ``params.yaml``.
        quality_html: also build Evidently's classification report of the feedback (for people; the
            flags do not depend on it).
        version_feedback: the labelled answers of the window's model version, oldest first, for the
            quality tests; None: the window's own labelled rows.
    """
    _check_inputs(
        (
            ("reference", reference, {TEXT}),
            ("quality reference", quality_reference, {TRUE_LABEL, PREDICTED}),
            ("current window", current, {TEXT, PREDICTED}),
        ),
        len(current),
        "predictions",
        params,
    )
    labelled = current[current[TRUE_LABEL].notna()] if TRUE_LABEL in current.columns else current.iloc[:0]
    feedback = labelled if version_feedback is None else version_feedback
    with_quality = len(feedback) >= params.min_labelled_for_quality
    estimated = SCORE in current.columns and SCORE in quality_reference.columns
    running = running_tests(with_quality, estimated)
    levels = window_levels(params, running)
    data, data_snapshot, prediction_snapshot = data_drift(
        reference, quality_reference, current, vocabulary, params, levels[TEXT]
    )
    summary: dict[str, Any] = {
        "n_reference": len(reference),
        "n_quality_reference": len(quality_reference),
        "n_current": len(current),
        "n_labelled": len(labelled),
        "n_tests": len(running),
        "test_levels": levels,
        "false_alarm_rate": params.false_alarm_rate,
        "data_drift": data,
        "performance_estimate": None,
        "concept_drift": None,
    }
    if estimated:
        summary["performance_estimate"] = performance_estimate(
            quality_reference, current, params, levels[ESTIMATED_ACCURACY]
        )
    quality_snapshot = None
    if with_quality:
        summary["concept_drift"] = concept_drift(quality_reference, feedback, labels, params, levels)
        if quality_html:
            quality_snapshot = quality_report(quality_reference, feedback, labels)
    summary["drift_detected"] = (
        data["detected"]
        or bool(summary["concept_drift"] and summary["concept_drift"]["detected"])
        or bool(summary["performance_estimate"] and summary["performance_estimate"]["drifted"])
    )
    return DriftResult(
        summary=_finite(summary),
        data_report=data_snapshot,
        prediction_report=prediction_snapshot,
        quality_report=quality_snapshot,
    )


# ------------------------------------------------------------------------------- generation models


def output_validity(answers: Iterable[str | None]) -> np.ndarray:
    """True per answer that meets the output contract: ``is_valid(parse_output(answer))``.

    A missing answer (None) counts as invalid.
    """
    from evaluation.generation import is_valid, parse_output

    return np.array(
        [answer is not None and is_valid(parse_output(str(answer))) for answer in answers], dtype=bool
    )


def validity_share(answers: Iterable[str | None]) -> float | None:
    """Share of answers that meet the output contract (None for no answers)."""
    valid = output_validity(answers)
    return float(valid.mean()) if len(valid) else None


def validity_drift(
    reference_valid: np.ndarray, current_valid: np.ndarray, alpha: float, min_drop: float
) -> dict[str, Any]:
    """Has the share of valid answers dropped below the reference share? A signal of the summary.

    One-sided two-proportion z-test (:func:`accuracy_drop_test`: reference and window are different
    messages, independent samples). Like concept drift, a drop counts when it is significant at
    ``alpha`` AND at least ``min_drop`` (``monitoring.min_validity_drop``). ``score`` is the p-value.
    """
    if len(reference_valid) == 0 or len(current_valid) == 0:
        raise ValueError("output validity needs answers on both sides (reference and window)")
    test = accuracy_drop_test(np.asarray(reference_valid, bool), np.asarray(current_valid, bool))
    return {
        "method": "two-proportion z-test, one-sided",
        "score": test["p_value"],
        "threshold": float(alpha),
        "drifted": bool(test["p_value"] < alpha and test["drop"] >= min_drop),
        "reference_share": test["reference"],
        "current_share": test["current"],
        "drop": test["drop"],
        "p_value": test["p_value"],
        "min_drop": float(min_drop),
        "n_reference": len(reference_valid),
        "n_current": len(current_valid),
    }


def generation_feedback(feedback: pd.DataFrame) -> dict[str, Any]:
    """What callers said about logged answers (``accepted``, ``edited_output`` columns of
    ``serving.inference_log.read_generations``): reported, never tested.

    ``n_feedback``: answers with any feedback; ``accepted_share``: the share of those accepted as they
    were (None without feedback); ``n_edited``: answers whose caller sent a corrected output.
    """
    if feedback.empty:
        return {"n_feedback": 0, "n_accepted": 0, "accepted_share": None, "n_edited": 0}
    accepted = feedback["accepted"]
    edited = feedback["edited_output"].notna()
    given = accepted.notna() | edited
    n_accepted = int((accepted.notna() & accepted.astype(object).eq(True)).sum())
    n_feedback = int(given.sum())
    return {
        "n_feedback": n_feedback,
        "n_accepted": n_accepted,
        "accepted_share": n_accepted / n_feedback if n_feedback else None,
        "n_edited": int(edited.sum()),
    }


def generation_drift(
    reference: pd.DataFrame,
    validity_reference: pd.DataFrame,
    current: pd.DataFrame,
    vocabulary: Counter,
    params: MonitoringParams,
    feedback: pd.DataFrame | None = None,
) -> DriftResult:
    """Prompt text drift and output-validity drift of a window of logged generations.

    Args:
        reference: training messages (``text``, masked as the log masks prompts).
        validity_reference: the model's answers on held-out messages, with ``valid`` (bool).
        current: a window of ``serving.inference_log.read_generations`` (``text``, ``generated``).
        vocabulary: document frequencies of the training messages (out-of-vocabulary share).
        params: thresholds and budgets from ``params.yaml``.
        feedback: generation rows with their feedback over the lookback (``accepted``,
            ``edited_output``), for the report only; None: none read.

    The summary keeps the classifier's shape, so that the decision, the alert, MLflow's metrics and the
    Prometheus collector read it unchanged: ``data_drift`` holds the prompt's signals
    (:data:`TEXT_SIGNALS`) and ``output_validity``, the generation counterpart of predicted-label drift;
    ``prompt_drift`` and ``validity_drift`` say which of the two kinds drifted; ``concept_drift`` is
    None (there are no labels). Five tests share ``false_alarm_rate`` (Bonferroni).
    """
    _check_inputs(
        (
            ("reference", reference, {TEXT}),
            ("validity reference", validity_reference, {VALID}),
            ("current window", current, {TEXT, GENERATED}),
        ),
        len(current),
        "generations",
        params,
    )
    n_tests = len(GENERATION_SIGNALS)
    alpha = params.false_alarm_rate / n_tests
    text_signals, text_snapshot = text_drift(reference, current, vocabulary, params, alpha)
    validity = validity_drift(
        validity_reference[VALID].to_numpy(dtype=bool),
        output_validity(current[GENERATED]),
        alpha,
        params.min_validity_drop,
    )
    data = _drift_section({**text_signals, OUTPUT_VALIDITY: validity}, GENERATION_SIGNALS)
    prompt = [name for name in TEXT_SIGNALS if text_signals[name]["drifted"]]
    has_feedback = {"accepted", "edited_output"} <= set(current.columns)
    n_labelled = generation_feedback(current)["n_feedback"] if has_feedback else 0
    summary: dict[str, Any] = {
        "task": "generation",
        "n_reference": len(reference),
        "n_validity_reference": len(validity_reference),
        "n_current": len(current),
        # Answers in the window with any feedback (accepted or edited): the classifier's labelled rows.
        "n_labelled": n_labelled,
        "n_tests": n_tests,
        "alpha_per_test": alpha,
        "false_alarm_rate": params.false_alarm_rate,
        "data_drift": data,
        "prompt_drift": {"detected": bool(prompt), "drifted_signals": prompt},
        "validity_drift": {"detected": validity["drifted"], **validity},
        "concept_drift": None,
        "feedback": generation_feedback(feedback) if feedback is not None else None,
    }
    summary["drift_detected"] = bool(prompt) or validity["drifted"]
    return DriftResult(summary=_finite(summary), data_report=text_snapshot, prediction_report=None)


def _finite(value: Any) -> Any:
    """JSON has no NaN/inf: turn them into None so that the summary always parses."""
    if isinstance(value, dict):
        return {key: _finite(item) for key, item in value.items()}
    if isinstance(value, list | tuple):
        return [_finite(item) for item in value]
    if isinstance(value, float) and not math.isfinite(value):
        return None
    if isinstance(value, np.generic):
        return _finite(value.item())
    return value
