"""The generation evaluation on the session's tiny Llama generator, which knows its six pairs by heart."""

from __future__ import annotations

import pytest

from evaluation.gates import evaluate_gates
from pipelines.evaluate_generation import evaluate_generator
from serving.generation import TextGenerator
from tests.support import memorised_pairs, settings

pytestmark = pytest.mark.slow


@pytest.fixture(scope="module")
def evaluation(tiny_generator):
    generator = TextGenerator.load(tiny_generator, device="cpu")
    counterfactual = settings("evaluate").counterfactual.model_copy(
        update={"max_examples": 3, "attributes": {"gender": ("As a woman,", "As a man,")}}
    )
    return evaluate_generator(
        generator.generate,
        memorised_pairs(),
        settings("generation"),
        counterfactual,
        group_columns=["channel"],
    )


def test_learnt_answers_score_full_marks_with_speed_and_groups(evaluation):
    metrics = evaluation.metrics
    assert metrics["generation/json_valid_rate"] == 1.0
    assert metrics["generation/exact_match"] == 1.0
    assert metrics["generation/reply_chrf"] == pytest.approx(100.0)
    assert metrics["speed/output_tokens_per_second"] > 0 and metrics["generation/output_tokens_mean"] > 10
    assert metrics["bias/max_group_exact_gap"] == 0.0
    assert set(evaluation.per_example["exact"]) == {1}


def test_identity_phrases_are_inserted_and_their_field_changes_counted(evaluation):
    changes = evaluation.counterfactual["gender"]
    assert 0.0 <= changes["bias/counterfactual_field_change_rate"] <= 1.0
    assert (
        evaluation.metrics["bias/counterfactual_field_change_rate"]
        == changes["bias/counterfactual_field_change_rate"]
    )


def test_generation_gates_read_the_generation_metrics(evaluation):
    passing = evaluate_gates(evaluation.metrics, {"min_json_valid_rate": 0.95, "min_exact_match": 0.5})
    assert passing["passed"], passing["reasons"]
    failing = evaluate_gates(evaluation.metrics, {"max_counterfactual_field_change_rate": -0.1})
    assert failing["failed"] == ["max_counterfactual_field_change_rate"]
