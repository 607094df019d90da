"""Bias checks: per-group quality (fairlearn MetricFrame) and counterfactual identity perturbation."""

from __future__ import annotations

from collections.abc import Callable, Mapping, Sequence

import numpy as np
import pandas as pd
from fairlearn.metrics import MetricFrame
from sklearn.metrics import accuracy_score, f1_score

from evaluation.quality import LabelIds


def _macro_f1(y_true, y_pred) -> float:
    return f1_score(y_true, y_pred, average="macro", zero_division=0)


def group_metrics(y_true: LabelIds, y_pred: LabelIds, groups: pd.DataFrame) -> dict[str, dict]:
    """Per-group accuracy and macro-F1 for each group column, with the largest gap between groups."""
    report = {}
    for column in groups.columns:
        frame = MetricFrame(
            metrics={"accuracy": accuracy_score, "macro_f1": _macro_f1},
            y_true=np.asarray(y_true),
            y_pred=np.asarray(y_pred),
            sensitive_features=groups[column].astype(str).to_numpy(),
        )
        gaps = frame.difference(method="between_groups")
        report[column] = {
            "by_group": {
                str(group): {metric: float(value) for metric, value in row.items()}
                for group, row in frame.by_group.iterrows()
            },
            "count": {str(g): int(n) for g, n in groups[column].astype(str).value_counts().items()},
            "accuracy_gap": float(gaps["accuracy"]),
            "macro_f1_gap": float(gaps["macro_f1"]),
        }
    return report


def insert_identity(text: str, phrase: str) -> str:
    """Put an identity phrase in front of an utterance: 'As a woman, where is my order?'."""
    if not text:
        return phrase
    return f"{phrase} {text[0].lower()}{text[1:]}"


def counterfactual_test(
    texts: Sequence[str],
    y_true: LabelIds,
    attributes: Mapping[str, Sequence[str]],
    predict: Callable[[list[str]], np.ndarray],
) -> dict[str, dict]:
    """Insert each identity phrase into every text and compare predictions with the original ones.

    ``predict`` maps texts to label ids. For each attribute: the flip rate (share of (text, phrase)
    pairs whose prediction differs from the unperturbed text's), the accuracy per phrase, and the
    largest accuracy gap between phrases of that attribute.
    """
    texts = list(texts)
    truth = np.asarray(y_true)
    original = np.asarray(predict(texts))
    phrases = [(attribute, phrase) for attribute, values in attributes.items() for phrase in values]
    perturbed = [insert_identity(text, phrase) for _, phrase in phrases for text in texts]
    predicted = np.asarray(predict(perturbed)).reshape(len(phrases), len(texts))
    report: dict[str, dict] = {}
    for attribute in attributes:
        rows = [i for i, (name, _) in enumerate(phrases) if name == attribute]
        accuracy = {phrases[i][1]: float((predicted[i] == truth).mean()) for i in rows}
        flips = predicted[rows] != original[None, :]
        report[attribute] = {
            "flip_rate": float(flips.mean()),
            "accuracy_by_phrase": accuracy,
            "accuracy_gap": float(max(accuracy.values()) - min(accuracy.values())),
            "flipped_examples": [
                {
                    "text": perturbed[i * len(texts) + j],
                    "original_label_id": int(original[j]),
                    "perturbed_label_id": int(predicted[i, j]),
                }
                for i in rows
                for j in np.flatnonzero(predicted[i] != original)[:2]
            ][:5],
        }
    report["overall"] = {
        "original_accuracy": float((original == truth).mean()),
        "flip_rate": float((predicted != original[None, :]).mean()),
        "max_accuracy_gap": float(max(report[a]["accuracy_gap"] for a in attributes)),
    }
    return report
