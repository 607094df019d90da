"""Promotion gates: thresholds from params applied to evaluation metrics, with readable reasons."""

from __future__ import annotations

from collections.abc import Mapping
from dataclasses import asdict, dataclass


@dataclass(frozen=True)
class GateResult:
    name: str
    metric: str
    value: float
    threshold: float
    direction: str  # ">=" or "<="
    passed: bool
    reason: str


def check_gate(name: str, metric: str, value: float, threshold: float, direction: str) -> GateResult:
    passed = value >= threshold if direction == ">=" else value <= threshold
    verdict = "ok" if passed else "FAILED"
    reason = f"{metric} = {value:.4f}, must be {direction} {threshold:.4f}: {verdict}"
    return GateResult(name, metric, float(value), float(threshold), direction, bool(passed), reason)


def evaluate_gates(metrics: Mapping[str, float], gates: Mapping[str, float | None]) -> dict:
    """Apply ``min_<x>`` / ``max_<x>`` thresholds to the namespaced metrics they name.

    ``gates`` maps a gate name to its threshold; GATE_METRICS says which metric each gate reads. A
    gate whose threshold is None is optional and switched off: it is not checked and not listed.
    """
    results = []
    for name, threshold in gates.items():
        if threshold is None:
            continue
        metric = GATE_METRICS[name]
        if metric not in metrics:
            raise KeyError(f"gate {name} reads metric {metric!r}, which evaluation did not produce")
        direction = ">=" if name.startswith("min_") else "<="
        results.append(check_gate(name, metric, metrics[metric], threshold, direction))
    failed = [r for r in results if not r.passed]
    return {
        "passed": not failed,
        "failed": [r.name for r in failed],
        "reasons": [r.reason for r in failed],
        "gates": [asdict(r) for r in results],
        "not_checked": [name for name, threshold in gates.items() if threshold is None],
    }


GATE_METRICS = {
    "min_accuracy": "quality/accuracy",
    "min_macro_f1": "quality/macro_f1",
    "max_group_accuracy_gap": "bias/max_group_accuracy_gap",
    "max_counterfactual_flip_rate": "bias/counterfactual_flip_rate",
    "max_counterfactual_accuracy_gap": "bias/counterfactual_accuracy_gap",
    "max_expected_calibration_error": "quality/expected_calibration_error",
    # The generative task (evaluation/generation.py, pipelines/evaluate_generation.py).
    "min_json_valid_rate": "generation/json_valid_rate",
    "min_exact_match": "generation/exact_match",
    "min_field_micro_f1": "generation/field_micro_f1",
    "min_reply_rouge_l": "generation/reply_rouge_l",
    "max_group_field_accuracy_gap": "bias/max_group_field_accuracy_gap",
    "max_counterfactual_field_change_rate": "bias/counterfactual_field_change_rate",
    # Optional behavioural gates (evaluate.behavioural.gates; evaluation/behavioural.py).
    "max_inv_failure_rate": "behaviour/inv_max_failure_rate",
    "max_dir_failure_rate": "behaviour/dir_negation_failure_rate",
    "max_mft_failure_rate": "behaviour/mft_failure_rate",
}
