"""Evaluation of a generation model on its frozen test pairs: quality, speed and bias in one report.

Quality is `evaluation.generation` on the greedy answers. Speed is answer tokens per second and
seconds per message. Bias has two parts. The counterfactual test inserts each identity phrase of
``evaluate.counterfactual`` into the messages and asks whether the extracted fields change. The group
test compares exact match and field accuracy between the values of each group column.
"""

from __future__ import annotations

import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass

import pandas as pd

from evaluation.bias import insert_identity
from evaluation.generation import (
    counterfactual_field_changes,
    generation_metrics,
    group_metrics,
    per_example_scores,
)
from serving.generation import Generation
from tuneloop.config import CounterfactualParams, GenerationParams

Generate = Callable[[Sequence[str]], list[Generation]]


@dataclass(frozen=True)
class GenerationEvaluation:
    metrics: dict[str, float]
    per_example: pd.DataFrame
    outputs: list[str]
    counterfactual: dict[str, dict[str, float]]


def evaluate_generator(
    generate: Generate,
    test: pd.DataFrame,
    generation: GenerationParams,
    counterfactual: CounterfactualParams,
    group_columns: Sequence[str] = (),
    seed: int = 0,
) -> GenerationEvaluation:
    """Answer every test message, score the answers, and run the counterfactual and group tests."""
    test = test.reset_index(drop=True)
    messages = test[generation.input_column].astype(str).tolist()
    targets = test[generation.target_column].astype(str).tolist()
    started = time.perf_counter()
    answers = generate(messages)
    seconds = time.perf_counter() - started
    outputs = [answer.text for answer in answers]
    metrics = generation_metrics(outputs, targets)
    new_tokens = sum(answer.new_tokens for answer in answers)
    metrics |= {
        "generation/output_tokens_mean": new_tokens / max(len(answers), 1),
        "speed/output_tokens_per_second": new_tokens / max(seconds, 1e-9),
        "speed/seconds_per_message": seconds / max(len(answers), 1),
    }
    per_example = per_example_scores(outputs, targets)
    for column in group_columns:
        if column in test.columns:
            metrics |= group_metrics(per_example, test[column].astype(str))

    sample = test.sample(n=min(counterfactual.max_examples, len(test)), random_state=seed)
    originals = [outputs[position] for position in sample.index]
    sampled_messages = sample[generation.input_column].astype(str).tolist()
    by_attribute: dict[str, dict[str, float]] = {}
    for attribute, phrases in counterfactual.attributes.items():
        perturbed = [insert_identity(message, phrase) for phrase in phrases for message in sampled_messages]
        changed = counterfactual_field_changes(
            originals * len(phrases), [answer.text for answer in generate(perturbed)]
        )
        by_attribute[attribute] = changed
    metrics["bias/counterfactual_field_change_rate"] = max(
        (changes["bias/counterfactual_field_change_rate"] for changes in by_attribute.values()), default=0.0
    )
    # How much of the test above could show anything: pairs where both answers were valid JSON.
    metrics["bias/counterfactual_both_valid_share"] = min(
        (changes["bias/counterfactual_both_valid_share"] for changes in by_attribute.values()), default=0.0
    )
    return GenerationEvaluation(metrics, per_example, outputs, by_attribute)
