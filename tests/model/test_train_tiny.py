"""The real train step and inference class on a tiny transformer built from a config."""

from __future__ import annotations

import numpy as np
import pandas as pd
import pytest

from pipelines.train import train
from serving.inference import IntentClassifier
from tests.support import build_tiny_base, settings
from tuneloop.config import ModelParams

LABELS = ("cancel_order", "check_order_status")
ONE_BATCH = pd.DataFrame(
    {
        "text": [
            "please cancel my order",
            "cancel it now",
            "i want to cancel the purchase",
            "stop my order pls",
            "cancel order 5521",
            "dont send it, cancel",
            "undo my order",
            "cancel the blue hoodie order",
            "where is my parcel",
            "has my order shipped",
            "tracking number please",
            "when will it arrive",
            "order status?",
            "where's my package at",
            "is my delivery on the way",
            "still waiting for my order",
        ],
        "label": ["cancel_order"] * 8 + ["check_order_status"] * 8,
    }
)


@pytest.fixture(scope="module")
def tiny_base(tmp_path_factory):
    """This module's own tiny base with fixed initial weights: overfitting 16 texts to 1.0 must not depend
    on how many random numbers earlier tests consumed before the shared fixture was built."""
    return build_tiny_base(tmp_path_factory.mktemp("seeded-tiny-base"), seed=0)


@pytest.fixture(scope="module")
def overfit(tiny_base, tmp_path_factory):
    out_dir = tmp_path_factory.mktemp("adapter")
    params = settings(
        "train",
        epochs=30,
        learning_rate=0.01,
        batch_size=16,
        lora_rank=8,
        warmup_fraction=0.0,
        early_stopping_patience=30,
        max_length=32,
    )
    epochs_seen = []
    result = train(
        ONE_BATCH,
        ONE_BATCH,
        LABELS,
        ModelParams(base=str(tiny_base)),
        params,
        out_dir,
        on_epoch=epochs_seen.append,
    )
    return result, out_dir, epochs_seen


def test_overfits_one_batch(overfit):
    result, _, _ = overfit
    assert result.history[-1]["train_loss"] < result.history[0]["train_loss"]
    assert max(row["val_accuracy"] for row in result.history) == 1.0


def test_reports_every_epoch_and_a_throughput(overfit):
    result, _, epochs_seen = overfit
    assert len(epochs_seen) == len(result.history) >= 2
    assert result.examples_per_second > 0
    assert 0 < result.trainable_parameters < result.total_parameters


def test_saved_adapter_reloads_and_predicts_what_it_learned(overfit, tiny_base):
    _, out_dir, _ = overfit
    assert {"adapter_config.json", "adapter_model.safetensors", "labels.json", "tuneloop.json"} <= {
        p.name for p in out_dir.iterdir()
    }
    classifier = IntentClassifier.load(out_dir)
    predictions = classifier.predict(ONE_BATCH["text"].tolist(), top_k=2)
    assert [p["label"] for p in predictions] == ONE_BATCH["label"].tolist()
    assert all(abs(sum(t["score"] for t in p["top_k"]) - 1.0) < 1e-4 for p in predictions)
    probabilities = classifier.predict_proba(ONE_BATCH["text"].tolist(), batch_size=3)
    np.testing.assert_allclose(
        probabilities, classifier.predict_proba(ONE_BATCH["text"].tolist(), batch_size=16), atol=1e-5
    )
