"""What a newcomer sees around a trained adapter: training off a terminal logs one line per epoch, and
loading the adapter the way serving does shows no alarming report and predicts what training ended with."""

from __future__ import annotations

import io
import logging
import shutil
from collections.abc import Iterator
from contextlib import contextmanager, redirect_stderr, redirect_stdout

import numpy as np
import pytest
import torch
from safetensors.torch import load_file, save_file

import pipelines.train
from serving.inference import IntentClassifier, load_base_classifier
from tests.support import TWO_LABELS, train_tiny_adapter, two_label_slice

TEXTS = [
    "please cancel my order",
    "where is my parcel",
    "I changed my mind, stop the purchase",
    "has it shipped yet?",
    "cancel order 5521 and refund me",
]
EPOCHS = 5  # what train_tiny_adapter trains for


class _Records(logging.Handler):
    def __init__(self) -> None:
        super().__init__(logging.INFO)
        self.messages: list[str] = []

    def emit(self, record: logging.LogRecord) -> None:
        self.messages.append(record.getMessage())


@contextmanager
def transformers_log() -> Iterator[list[str]]:
    """What transformers logs meanwhile: its handler (stderr) sees the same records as this one."""
    records = _Records()
    library_log = logging.getLogger("transformers")
    library_log.addHandler(records)
    try:
        yield records.messages
    finally:
        library_log.removeHandler(records)


@pytest.fixture(scope="module")
def trained(tmp_path_factory, tiny_base):
    """A tiny adapter trained with stdout and stderr going to files (not a terminal), keeping the
    in-memory model that training ended with, what the stage logged and what it wrote."""
    kept = {}
    save_adapter = pipelines.train.save_adapter

    def keep_and_save(model, *args, **kwargs):
        kept["model"] = model
        save_adapter(model, *args, **kwargs)

    stdout, stderr, records = io.StringIO(), io.StringIO(), _Records()
    stage_log = logging.getLogger(pipelines.train.__name__)
    level = stage_log.level
    stage_log.addHandler(records)
    stage_log.setLevel(logging.INFO)
    try:
        with pytest.MonkeyPatch.context() as patch, redirect_stdout(stdout), redirect_stderr(stderr):
            patch.setattr(pipelines.train, "save_adapter", keep_and_save)
            adapter = train_tiny_adapter(
                two_label_slice(), tiny_base, tmp_path_factory.mktemp("reload") / "adapter"
            )
    finally:
        stage_log.removeHandler(records)
        stage_log.setLevel(level)
    return {
        "adapter": adapter,
        "model": kept["model"],
        "log": records.messages,
        "stdout": stdout.getvalue(),
        "stderr": stderr.getvalue(),
    }


def test_training_off_a_terminal_logs_one_line_per_epoch(trained):
    epoch_lines = [line for line in trained["log"] if line.startswith("epoch ")]
    assert [line.split(":")[0] for line in epoch_lines] == [f"epoch {n}/{EPOCHS}" for n in range(1, 6)]
    assert all("train_loss" in line and "val_macro_f1" in line for line in epoch_lines)
    # Neither the Trainer's bar (redrawn per step) nor its printed log dicts.
    # Neither the Trainer's bar, redrawn every step, nor its printed log dicts. What stderr still holds is
    # transformers' own weight-loading bar, which the stages' entry points turn off (quiet_library_bars).
    assert all(line.startswith("Loading weights") for line in trained["stderr"].splitlines() if line)
    assert "{'loss'" not in trained["stdout"] and "eval_loss" not in trained["stdout"]


def test_loading_an_adapter_shows_no_missing_head_report(trained):
    with transformers_log() as logged:
        IntentClassifier.load(trained["adapter"], device="cpu")
    shown = "".join(logged)
    assert "LOAD REPORT" not in shown
    assert "MISSING" not in shown and "newly initialized" not in shown


def test_a_base_missing_backbone_weights_still_shows_the_report(tiny_base, tmp_path):
    damaged = shutil.copytree(tiny_base, tmp_path / "damaged-base")
    weights = load_file(damaged / "model.safetensors")
    kept = {name: tensor for name, tensor in weights.items() if "pooler" not in name}
    save_file(kept, damaged / "model.safetensors", metadata={"format": "pt"})
    with transformers_log() as logged:
        load_base_classifier(str(damaged), TWO_LABELS)
    shown = "".join(logged)
    assert "LOAD REPORT" in shown and "pooler" in shown


def test_the_loaded_adapter_predicts_what_training_ended_with(trained):
    classifier = IntentClassifier.load(trained["adapter"], device="cpu")
    model = trained["model"].eval()
    encoded = classifier.tokenizer(
        TEXTS, padding=True, truncation=True, max_length=classifier.max_length, return_tensors="pt"
    )
    with torch.no_grad():
        expected = torch.softmax(model(**encoded).logits, dim=-1).numpy()

    predictions = classifier.predict(TEXTS, top_k=len(TWO_LABELS))
    assert [p["label"] for p in predictions] == [TWO_LABELS[i] for i in expected.argmax(axis=1)]
    scores = [{score["label"]: score["score"] for score in p["top_k"]} for p in predictions]
    loaded = np.array([[by_label[label] for label in TWO_LABELS] for by_label in scores])
    np.testing.assert_allclose(loaded, expected, rtol=0, atol=1e-6)
