"""Figures people would rather look at than read: confusion matrix and training curves.

Figures are built with matplotlib's object API, not pyplot: no GUI backend to choose at import, and no
global figure registry that keeps every figure alive. ``Figure.savefig`` renders with Agg.
"""

from __future__ import annotations

from collections.abc import Sequence

import numpy as np
from matplotlib.figure import Figure


def confusion_matrix_figure(matrix: np.ndarray, label_names: Sequence[str]) -> Figure:
    """Row-normalised confusion matrix; counts are written in the cells when the matrix is small."""
    n = len(label_names)
    size = max(6.0, 0.35 * n + 3)
    figure = Figure(figsize=(size, size))
    axes = figure.subplots()
    row_sums = matrix.sum(axis=1, keepdims=True).clip(min=1)
    image = axes.imshow(matrix / row_sums, cmap="Blues", vmin=0, vmax=1)
    axes.set_xticks(range(n), label_names, rotation=90, fontsize=7 if n > 30 else 9)
    axes.set_yticks(range(n), label_names, fontsize=7 if n > 30 else 9)
    axes.set_xlabel("predicted")
    axes.set_ylabel("true")
    axes.set_title("Confusion matrix (row-normalised)")
    if n <= 30:
        for i in range(n):
            for j in range(n):
                if matrix[i, j]:
                    colour = "white" if matrix[i, j] / row_sums[i, 0] > 0.5 else "black"
                    axes.text(
                        j, i, str(int(matrix[i, j])), ha="center", va="center", fontsize=7, color=colour
                    )
    figure.colorbar(image, ax=axes, fraction=0.046, pad=0.04)
    figure.tight_layout()
    return figure


def training_curves_figure(history: Sequence[dict]) -> Figure:
    """Training loss and validation metrics per epoch."""
    epochs = [row["epoch"] for row in history]
    figure = Figure(figsize=(11, 4))
    loss_axes, metric_axes = figure.subplots(1, 2)
    loss_axes.plot(epochs, [row.get("train_loss") for row in history], marker="o", label="train loss")
    loss_axes.plot(epochs, [row.get("val_loss") for row in history], marker="o", label="validation loss")
    loss_axes.set_xlabel("epoch")
    loss_axes.legend()
    metric_axes.plot(epochs, [row.get("val_accuracy") for row in history], marker="o", label="val accuracy")
    metric_axes.plot(epochs, [row.get("val_macro_f1") for row in history], marker="o", label="val macro-F1")
    metric_axes.set_xlabel("epoch")
    metric_axes.set_ylim(0, 1)
    metric_axes.legend()
    figure.tight_layout()
    return figure
