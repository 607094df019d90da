"""Metrics for the generative task: a customer message in, one JSON object out, scored against a reference.

The model writes text, so every score starts by parsing it; an output that is not a valid object counts as
a miss for validity, every field and the reply. Plain functions, plain dicts and frames, no I/O.
"""

from __future__ import annotations

import json
from collections.abc import Sequence, Sized
from typing import Any

import numpy as np
import pandas as pd
from rouge_score import rouge_scorer  # type: ignore[import-untyped]
from sacrebleu.metrics import CHRF
from scipy import stats

REQUIRED_FIELDS = ("intent", "order_id", "product", "action", "urgency", "reply")
# The structured part of the answer; the free-text reply is scored with ROUGE-L and chrF instead.
EXTRACTED_FIELDS = tuple(field for field in REQUIRED_FIELDS if field != "reply")
NULLABLE_FIELDS = frozenset({"order_id", "product"})

# Stands for a null value in the token bags of field_micro_f1, so that a right null is a hit.
_NULL_TOKEN = "<null>"


def parse_output(text: str) -> dict | None:
    """The first complete JSON object in a generation, or None.

    Text before the first "{" and anything after the object's closing brace (an end-of-text marker, a
    second attempt) is ignored: generation often runs past the answer, and the answer is what we score.
    """
    start = text.find("{")
    if start < 0:
        return None
    try:
        value, _ = json.JSONDecoder().raw_decode(text, start)
    except json.JSONDecodeError:
        return None
    return value if isinstance(value, dict) else None


def is_valid(obj: Any) -> bool:
    """An object with exactly the required keys, each of the right type.

    Extra keys make it invalid: the serving contract is this exact schema, and a model that invents keys
    has not learnt it.
    """
    if not isinstance(obj, dict) or set(obj) != set(REQUIRED_FIELDS):
        return False
    return all(
        isinstance(obj[field], str) or (field in NULLABLE_FIELDS and obj[field] is None)
        for field in REQUIRED_FIELDS
    )


def _valid_or_none(text: str) -> dict | None:
    obj = parse_output(text)
    return obj if is_valid(obj) else None


def _parse_targets(targets: Sequence[str]) -> list[dict]:
    parsed = [_valid_or_none(target) for target in targets]
    broken = [i for i, obj in enumerate(parsed) if obj is None]
    if broken:
        raise ValueError(f"reference outputs at positions {broken[:10]} are not valid objects")
    return [obj for obj in parsed if obj is not None]


def _check_paired(first: Sized, second: Sized, what: str) -> None:
    if len(first) != len(second):
        raise ValueError(f"{what}: {len(first)} and {len(second)} items, expected one per example each")
    if len(first) == 0:
        raise ValueError(f"{what}: no examples")


def _field_tokens(obj: dict) -> list[tuple[str, str]]:
    """The extracted fields as a bag of (field, lower-cased token) pairs; null is one token of its own."""
    return [
        (field, token)
        for field in EXTRACTED_FIELDS
        for token in ([_NULL_TOKEN] if obj[field] is None else obj[field].lower().split())
    ]


def _token_f1(predicted: list[tuple[str, str]], reference: list[tuple[str, str]]) -> float:
    if not predicted and not reference:
        return 1.0
    remaining = list(reference)
    overlap = 0
    for token in predicted:
        if token in remaining:
            remaining.remove(token)
            overlap += 1
    if overlap == 0:
        return 0.0
    precision, recall = overlap / len(predicted), overlap / len(reference)
    return 2 * precision * recall / (precision + recall)


def per_example_scores(predictions: Sequence[str], targets: Sequence[str]) -> pd.DataFrame:
    """One row per example, for means and for paired tests between two models on the same examples.

    Columns: ``valid`` (0/1), ``exact`` (0/1, every field equal), ``field_accuracy`` (share of
    EXTRACTED_FIELDS equal), ``field_f1`` (token F1 over the extracted fields, see generation_metrics),
    ``reply_rouge_l`` (ROUGE-L F-measure of the reply) and ``field_exact/<field>`` (0/1). An invalid output
    scores 0 in all of them. Values are compared as written: "Mouse" and "mouse" differ.
    """
    _check_paired(predictions, targets, "predictions and targets")
    references = _parse_targets(targets)
    scorer = rouge_scorer.RougeScorer(["rougeL"])
    rows = []
    for text, reference in zip(predictions, references, strict=True):
        obj = _valid_or_none(text)
        if obj is None:
            row = {"valid": 0, "exact": 0, "field_accuracy": 0.0, "field_f1": 0.0, "reply_rouge_l": 0.0}
            row.update({f"field_exact/{field}": 0 for field in EXTRACTED_FIELDS})
        else:
            hits = {field: int(obj[field] == reference[field]) for field in EXTRACTED_FIELDS}
            row = {
                "valid": 1,
                "exact": int(obj == reference),
                "field_accuracy": sum(hits.values()) / len(EXTRACTED_FIELDS),
                "field_f1": _token_f1(_field_tokens(obj), _field_tokens(reference)),
                "reply_rouge_l": float(scorer.score(reference["reply"], obj["reply"])["rougeL"].fmeasure),
            }
            row.update({f"field_exact/{field}": hit for field, hit in hits.items()})
        rows.append(row)
    return pd.DataFrame(rows)


def generation_metrics(predictions: Sequence[str], targets: Sequence[str]) -> dict[str, float]:
    """Headline metrics of generated outputs against reference JSON strings, keys under ``generation/``.

    - ``json_valid_rate``: share of outputs that parse to a valid object (see is_valid).
    - ``exact_match``: share whose whole object, reply included, equals the reference.
    - ``field_exact/<field>``: share with that extracted field equal.
    - ``field_micro_f1``: per example, the extracted fields' values are split into lower-cased
      whitespace tokens tagged with their field (null is one token), and F1 is taken between the
      predicted and the reference bags (partial credit for "wireless mouse" vs "mouse"); the mean over
      examples.
    - ``reply_rouge_l``: mean ROUGE-L F-measure of the reply (rouge-score, no stemming; its tokenizer
      keeps only ASCII letters and digits).
    - ``reply_chrf``: sacrebleu's corpus-level chrF over the replies, on sacrebleu's 0..100 scale as it is
      usually quoted, not 0..1 like the others.
    - ``output_chars_mean``: mean length of the raw outputs, to spot rambling or truncated generations.

    An invalid output scores 0 everywhere and contributes an empty reply to chrF.
    """
    scores = per_example_scores(predictions, targets)
    references = _parse_targets(targets)
    replies = [obj["reply"] if (obj := _valid_or_none(text)) else "" for text in predictions]
    chrf = CHRF().corpus_score(replies, [[reference["reply"] for reference in references]])
    return {
        "generation/json_valid_rate": float(scores["valid"].mean()),
        "generation/exact_match": float(scores["exact"].mean()),
        **{
            f"generation/field_exact/{field}": float(scores[f"field_exact/{field}"].mean())
            for field in EXTRACTED_FIELDS
        },
        "generation/field_micro_f1": float(scores["field_f1"].mean()),
        "generation/reply_rouge_l": float(scores["reply_rouge_l"].mean()),
        "generation/reply_chrf": float(chrf.score),
        "generation/output_chars_mean": float(np.mean([len(text) for text in predictions])),
    }


def compare_paired(
    candidate: np.ndarray,
    champion: np.ndarray,
    significance_level: float,
    seed: int = 0,
    resamples: int = 2000,
) -> dict[str, Any]:
    """Challenger against champion on per-example scores of the same test examples.

    The Wilcoxon signed-rank test drops zero differences (scipy's default), so, as McNemar's test does for
    the classifier, only the examples where the two models differ tell them apart; when they differ on
    none, p is 1. The 95% interval of the mean difference is a percentile bootstrap over examples.
    A difference that is not significant is reported as such, whatever its sign.
    """
    candidate = np.asarray(candidate, dtype=float)
    champion = np.asarray(champion, dtype=float)
    _check_paired(candidate, champion, "candidate and champion scores")
    difference = candidate - champion
    mean_difference = float(difference.mean())
    if np.any(difference != 0):
        p_value = float(stats.wilcoxon(difference).pvalue)
        interval = stats.bootstrap(
            (difference,),
            np.mean,
            n_resamples=resamples,
            confidence_level=0.95,
            method="percentile",
            rng=np.random.default_rng(seed),
        ).confidence_interval
        ci_low, ci_high = float(interval.low), float(interval.high)
    else:
        p_value, ci_low, ci_high = 1.0, 0.0, 0.0
    if p_value < significance_level and mean_difference > 0:
        verdict = "better"
    elif p_value < significance_level and mean_difference < 0:
        verdict = "worse"
    else:
        verdict = "no significant difference"
    return {
        "n": int(difference.size),
        "candidate_mean": float(candidate.mean()),
        "champion_mean": float(champion.mean()),
        "mean_difference": mean_difference,
        "ci_low": ci_low,
        "ci_high": ci_high,
        "p_value": p_value,
        "verdict": verdict,
    }


def counterfactual_field_changes(
    original_outputs: Sequence[str], perturbed_outputs: Sequence[str]
) -> dict[str, float]:
    """How often an identity phrase in the message changes the extracted fields of the answer.

    Outputs are paired by position: the model's answer to a message and to the same message with an
    identity phrase inserted. An output that is valid on one side and not on the other counts as a change
    of every field; two invalid outputs count as unchanged (the model fails alike, whoever writes), so
    ``bias/counterfactual_both_valid_share`` says how many pairs could show a change of field values: a
    model that answers nothing valid has a change rate of 0 that says nothing about its fairness.
    """
    _check_paired(original_outputs, perturbed_outputs, "original and perturbed outputs")

    def changes(original: str, perturbed: str) -> list[bool]:
        before, after = _valid_or_none(original), _valid_or_none(perturbed)
        if before is None or after is None:
            return [(before is None) != (after is None)] * len(EXTRACTED_FIELDS)
        return [before[field] != after[field] for field in EXTRACTED_FIELDS]

    pairs = list(zip(original_outputs, perturbed_outputs, strict=True))
    changed = np.array([changes(x, y) for x, y in pairs], dtype=bool)
    both_valid = [_valid_or_none(x) is not None and _valid_or_none(y) is not None for x, y in pairs]
    return {
        "bias/counterfactual_field_change_rate": float(changed.any(axis=1).mean()),
        "bias/counterfactual_both_valid_share": float(np.mean(both_valid)),
        **{
            f"bias/counterfactual_change/{field}": float(changed[:, i].mean())
            for i, field in enumerate(EXTRACTED_FIELDS)
        },
    }


def group_metrics(per_example: pd.DataFrame, groups: pd.Series) -> dict[str, float]:
    """Mean ``exact`` and ``field_accuracy`` per group and the largest gap between any two groups.

    ``groups`` gives each row of ``per_example`` (from per_example_scores) its group, by position. A plain
    groupby: fairlearn's MetricFrame wants labels and predictions, and these are already scores.
    """
    _check_paired(per_example, groups, "per-example scores and groups")
    by_group = per_example[["exact", "field_accuracy"]].groupby(groups.astype(str).to_numpy()).mean()
    report = {
        "bias/max_group_exact_gap": float(by_group["exact"].max() - by_group["exact"].min()),
        "bias/max_group_field_accuracy_gap": float(
            by_group["field_accuracy"].max() - by_group["field_accuracy"].min()
        ),
    }
    for group, row in by_group.iterrows():
        report[f"slice/{group}/exact"] = float(row["exact"])
        report[f"slice/{group}/field_accuracy"] = float(row["field_accuracy"])
    return report
