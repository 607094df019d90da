"""banking77 (CC BY 4.0) from ../shared/datasets, read in place; skipped where it is absent."""

from __future__ import annotations

import pytest

from benchmarks.banking77 import DEFAULT_DATA_DIR, banking77_params
from pipelines.evaluate import evaluate
from pipelines.prepare import prepare
from pipelines.train import train
from pipelines.validate import build_validation_frame, run_suite
from serving.inference import IntentClassifier
from tests.support import REPO_ROOT

pytestmark = [
    pytest.mark.slow,
    pytest.mark.skipif(not (DEFAULT_DATA_DIR / "train.csv").exists(), reason="../shared banking77 is absent"),
]


@pytest.fixture(scope="module")
def params():
    return banking77_params(REPO_ROOT / "params.yaml", DEFAULT_DATA_DIR, epochs=1)


def _prepare(params, drop_overlap: bool):
    prepare_params = params.prepare.model_copy(update={"drop_test_overlap": drop_overlap})
    return prepare(DEFAULT_DATA_DIR / "train.csv", params.data, prepare_params, DEFAULT_DATA_DIR / "test.csv")


def test_official_split_leaks_eight_texts_and_validate_catches_them(params):
    leaky = _prepare(params, drop_overlap=False)
    outcome = run_suite(build_validation_frame(leaky.splits), params.validate_, params.data.labels)
    assert [failure.check for failure in outcome.failed] == ["no_test_text_in_train"]
    assert outcome.failed[0].unexpected_count == 8

    clean = _prepare(params, drop_overlap=True)
    assert clean.dropped_test_overlap == 8
    assert len(clean.splits["test"]) == 3080, "the full official test set is kept"
    assert run_suite(build_validation_frame(clean.splits), params.validate_, params.data.labels).success


def test_minilm_learns_a_banking77_subset_in_one_epoch(params, tmp_path):
    """Eight intents, one epoch of the real default model: far above the 12.5% of guessing."""
    splits = _prepare(params, drop_overlap=True).splits
    labels = tuple(sorted(splits["train"]["label"].unique()))[:8]
    subset = {name: part[part["label"].isin(labels)] for name, part in splits.items()}
    result = train(
        subset["train"],
        subset["val"],
        labels,
        params.model,
        params.train.model_copy(update={"epochs": 1}),
        tmp_path / "adapter",
    )
    classifier = IntentClassifier.load(tmp_path / "adapter")
    evaluation = evaluate(
        classifier,
        subset["test"],
        (),
        params.evaluate.model_copy(
            update={"counterfactual": params.evaluate.counterfactual.model_copy(update={"max_examples": 40})}
        ),
    )
    assert result.history[0]["val_accuracy"] > 0.5
    assert evaluation.metrics["quality/accuracy"] > 0.5
