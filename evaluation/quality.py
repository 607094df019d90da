"""Quality metrics over predictions: plain functions, plain dicts, no I/O."""

from __future__ import annotations

from collections.abc import Sequence

import numpy as np
from sklearn.metrics import accuracy_score, confusion_matrix, f1_score, precision_recall_fscore_support

# Label ids, one per example: a list, or the 1-d integer array a model's argmax gives.
LabelIds = Sequence[int] | np.ndarray


def headline_metrics(y_true: LabelIds, y_pred: LabelIds) -> dict[str, float]:
    return {
        "accuracy": float(accuracy_score(y_true, y_pred)),
        "macro_f1": float(f1_score(y_true, y_pred, average="macro", zero_division=0)),
    }


def per_class_metrics(
    y_true: LabelIds, y_pred: LabelIds, label_names: Sequence[str]
) -> dict[str, dict[str, float]]:
    precision, recall, f1, support = precision_recall_fscore_support(
        y_true, y_pred, labels=list(range(len(label_names))), zero_division=0
    )
    return {
        name: {
            "precision": float(precision[i]),
            "recall": float(recall[i]),
            "f1": float(f1[i]),
            "support": int(support[i]),
        }
        for i, name in enumerate(label_names)
    }


def confusion(y_true: LabelIds, y_pred: LabelIds, n_labels: int) -> np.ndarray:
    return confusion_matrix(y_true, y_pred, labels=list(range(n_labels)))


def expected_calibration_error(probabilities: np.ndarray, y_true: LabelIds, n_bins: int = 15) -> float:
    """Top-label ECE with equal-width confidence bins.

    Written by hand: scikit-learn offers only the binary calibration curve, and the torchmetrics
    version would add a dependency for twelve lines.
    """
    probabilities = np.asarray(probabilities)
    confidence = probabilities.max(axis=1)
    correct = probabilities.argmax(axis=1) == np.asarray(y_true)
    bins = np.minimum((confidence * n_bins).astype(int), n_bins - 1)
    error = 0.0
    for b in range(n_bins):
        in_bin = bins == b
        if in_bin.any():
            error += in_bin.mean() * abs(correct[in_bin].mean() - confidence[in_bin].mean())
    return float(error)
