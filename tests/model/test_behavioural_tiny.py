"""Behavioural suite end to end through the real IntentClassifier, on a tiny model over two intents."""

from __future__ import annotations

import pytest

from evaluation.behavioural import INV_TESTS, TESTS, behavioural_tests
from pipelines.evaluate import evaluate, load_behavioural_cases
from serving.inference import IntentClassifier
from tests.support import REPO_ROOT, TWO_LABELS, settings, two_label_slice


@pytest.fixture(scope="module")
def classifier(tiny_base, tiny_adapter) -> IntentClassifier:
    adapter = tiny_adapter
    return IntentClassifier.load(adapter, device="cpu")


@pytest.fixture(scope="module")
def cases():
    return load_behavioural_cases(REPO_ROOT / settings("evaluate").behavioural.cases_path)


def test_the_suite_runs_through_the_real_classifier(classifier, cases):
    params = settings("evaluate").behavioural.model_copy(update={"max_examples": 12})
    texts = two_label_slice(rows_per_label=20)["text"].tolist()

    def predict(batch: list[str]) -> list[str]:
        return [result["label"] for result in classifier.predict(batch, top_k=1)]

    report = behavioural_tests(predict, texts, classifier.label_names, cases, params)
    again = behavioural_tests(predict, texts, classifier.label_names, cases, params)
    assert report == again, "same seed, same model: same report"

    tests = report["tests"]
    assert set(tests) == set(TESTS)
    for test in INV_TESTS:
        assert tests[test]["cases"] + tests[test]["skipped"] == 12
        assert 0 <= report["metrics"][f"behaviour/{test}_failure_rate"] <= 1
    # Only the cases of the two intents the model knows run; the other 13 intents' are skipped.
    mft_known = sum(case.label in TWO_LABELS for case in cases.mft)
    assert tests["mft"]["cases"] == mft_known >= 10
    assert tests["mft"]["skipped"] == len(cases.mft) - mft_known
    assert set(tests["mft"]["failures_by_label"]) == set(TWO_LABELS)
    assert tests["dir_negation"]["cases"] == 2  # cancel_order <-> check_order_status, both ways
    assert all(
        example["prediction"] in TWO_LABELS for test in TESTS for example in tests[test]["failing_examples"]
    )


def test_evaluate_writes_behavioural_metrics_and_their_optional_gates(classifier, cases):
    params = settings("evaluate")
    params = params.model_copy(
        update={
            "counterfactual": params.counterfactual.model_copy(update={"max_examples": 10}),
            "behavioural": params.behavioural.model_copy(
                update={
                    "max_examples": 10,
                    "gates": params.behavioural.gates.model_copy(
                        update={"max_inv_failure_rate": 1.0, "max_mft_failure_rate": None}
                    ),
                }
            ),
        }
    )
    result = evaluate(classifier, two_label_slice(rows_per_label=10), (), params, cases)
    assert 0 <= result.metrics["behaviour/mft_failure_rate"] <= 1
    assert result.behavioural["metrics"].items() <= result.metrics.items()
    checked = {gate["name"] for gate in result.gates["gates"]}
    assert "max_inv_failure_rate" in checked and "max_mft_failure_rate" not in checked
    assert "max_mft_failure_rate" in result.gates["not_checked"]
