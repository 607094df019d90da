"""`register` step: log the trained adapter as a pyfunc into its training run, register a version,
compare it with the current `prod` on the frozen test set, and give it the `dev` alias when it passes.

A version is created only once the logged model has loaded and predicted, with all its tags and its
evaluation card in the same call; if anything after that fails the version is deleted again, so a
crash never leaves a half-registered model behind.

With ``serving.quantize: int8`` a classifier is also loaded the way it will serve (dynamic int8 on
CPU, bf16/fp16 on a GPU) and scored on the same test texts: its accuracy and macro-F1 are logged as
``quantized/...`` metrics, shown in the card, and held to the accuracy and macro-F1 gates, so a model
whose quantised copy falls below them does not become `dev`.
"""

from __future__ import annotations

import logging
import tempfile
from collections.abc import Mapping
from dataclasses import asdict, dataclass, field
from pathlib import Path

import mlflow
import numpy as np
import pandas as pd
from mlflow.entities.model_registry import ModelVersion
from mlflow.exceptions import MlflowException
from mlflow.tracking import MlflowClient
from statsmodels.stats.contingency_tables import mcnemar

from evaluation.drift import correctness, held_out_answers, held_out_splits
from evaluation.gates import GateResult, check_gate
from evaluation.generation import compare_paired, per_example_scores
from evaluation.quality import headline_metrics
from serving.generation import GENERATION_TASK
from serving.inference import MANIFEST_FILE, IntentClassifier
from serving.pyfunc_model import QUANTIZE_ENV, log_generation_model, log_intent_model
from tuneloop.config import Params, RegistryParams, ServingParams
from tuneloop.io import file_md5, read_json
from tuneloop.paths import ADAPTER_DIR, HELD_OUT_ARTIFACT, METRICS_DIR, PREPARED_DIR
from tuneloop.tracking import current_version, git_commit

log = logging.getLogger(__name__)

DEV_ALIAS = "dev"
PROD_ALIAS = "prod"
METRIC_TAG_PREFIX = "tuneloop.metric."
HEADLINE_METRICS = (
    "quality/accuracy",
    "quality/macro_f1",
    "quality/expected_calibration_error",
    "bias/max_group_accuracy_gap",
    "bias/counterfactual_flip_rate",
    "bias/counterfactual_accuracy_gap",
    "generation/json_valid_rate",
    "generation/exact_match",
    "generation/field_micro_f1",
    "generation/reply_rouge_l",
    "bias/max_group_field_accuracy_gap",
    "bias/counterfactual_field_change_rate",
)
MAX_TAG_VALUE = 5000
EXACT_TEST_BELOW = 25
# Gates re-applied to the served (quantised) model's numbers: gate name -> the metric it reads there.
QUANTIZED_GATES = {"min_accuracy": "quantized/accuracy", "min_macro_f1": "quantized/macro_f1"}
# Recorded as version tags beside HEADLINE_METRICS, so promotion can re-check the quantised gates.
QUANTIZED_TAGGED = ("quantized/accuracy", "quantized/macro_f1")


@dataclass(frozen=True)
class Lineage:
    data_md5: str
    git_commit: str
    dvc_lock_md5: str


@dataclass(frozen=True)
class Comparison:
    """Candidate against prod on the same texts: McNemar on who got which example right."""

    prod_version: str
    candidate_accuracy: float
    prod_accuracy: float
    delta_accuracy: float
    candidate_only_correct: int
    prod_only_correct: int
    p_value: float
    verdict: str  # "improvement", "regression" or "no significant difference"
    # What was compared per example, and how: a classifier's correctness with McNemar's test, a
    # generator's field accuracy with the Wilcoxon signed-rank test (`compare_generations`).
    score: str = "accuracy"
    test: str = "McNemar"


@dataclass
class Registration:
    name: str
    version: str
    run_id: str
    model_uri: str
    promoted_to_dev: bool
    reasons: list[str]
    comparison: Comparison | None
    card: str
    tags: dict[str, str] = field(default_factory=dict)


def compare_with_prod(
    y_true: np.ndarray,
    candidate: np.ndarray,
    prod: np.ndarray,
    prod_version: str,
    significance_level: float,
    min_improvement: float,
) -> Comparison:
    """McNemar's paired test: only examples the two models disagree on tell them apart.

    Exact (binomial) below 25 discordant pairs, chi-square with continuity correction above. A
    difference that is not significant is reported as such, never as an improvement.
    """
    candidate_ok = np.asarray(candidate) == np.asarray(y_true)
    prod_ok = np.asarray(prod) == np.asarray(y_true)
    candidate_only = int(np.sum(candidate_ok & ~prod_ok))
    prod_only = int(np.sum(~candidate_ok & prod_ok))
    if candidate_only + prod_only == 0:
        p_value = 1.0
    else:
        table = [
            [int(np.sum(candidate_ok & prod_ok)), candidate_only],
            [prod_only, int(np.sum(~candidate_ok & ~prod_ok))],
        ]
        exact = candidate_only + prod_only < EXACT_TEST_BELOW
        p_value = float(mcnemar(table, exact=exact, correction=True).pvalue)
    candidate_accuracy = float(candidate_ok.mean()) if len(candidate_ok) else 0.0
    prod_accuracy = float(prod_ok.mean()) if len(prod_ok) else 0.0
    delta = candidate_accuracy - prod_accuracy
    significant = p_value < significance_level
    if significant and delta < 0:
        verdict = "regression"
    elif significant and delta > 0 and delta >= min_improvement:
        verdict = "improvement"
    else:
        verdict = "no significant difference"
    return Comparison(
        prod_version=prod_version,
        candidate_accuracy=candidate_accuracy,
        prod_accuracy=prod_accuracy,
        delta_accuracy=delta,
        candidate_only_correct=candidate_only,
        prod_only_correct=prod_only,
        p_value=p_value,
        verdict=verdict,
    )


def compare_generations(
    candidate: np.ndarray,
    prod: np.ndarray,
    prod_version: str,
    significance_level: float,
    min_improvement: float,
) -> Comparison:
    """A generator against prod on per-example field accuracy of the same test messages.

    `evaluation.generation.compare_paired` (Wilcoxon signed-rank, bootstrap interval), reported in the
    classifier's terms so the same rules decide `dev`: "better" is an improvement when it is at least
    ``min_improvement``, "worse" a regression.
    """
    paired = compare_paired(candidate, prod, significance_level)
    delta = paired["mean_difference"]
    if paired["verdict"] == "worse":
        verdict = "regression"
    elif paired["verdict"] == "better" and delta >= min_improvement:
        verdict = "improvement"
    else:
        verdict = "no significant difference"
    return Comparison(
        prod_version=prod_version,
        candidate_accuracy=paired["candidate_mean"],
        prod_accuracy=paired["champion_mean"],
        delta_accuracy=delta,
        candidate_only_correct=int(np.sum(np.asarray(candidate) > np.asarray(prod))),
        prod_only_correct=int(np.sum(np.asarray(candidate) < np.asarray(prod))),
        p_value=paired["p_value"],
        verdict=verdict,
        score="field accuracy",
        test="Wilcoxon",
    )


def quantized_metrics(y_true: np.ndarray, fp32: np.ndarray, quantized: np.ndarray) -> dict[str, float]:
    """The quantised model against the fp32 one on the same texts (labels, not ids).

    ``quantized/accuracy`` and ``quantized/macro_f1`` with their deltas to fp32 (negative: the
    quantised copy is worse), the fp32 values they are measured against, and the share of texts on
    which both predict the same label.
    """
    y_true, fp32, quantized = (np.asarray(values).astype(str) for values in (y_true, fp32, quantized))
    full = headline_metrics(y_true, fp32)
    small = headline_metrics(y_true, quantized)
    return {
        "quantized/accuracy": small["accuracy"],
        "quantized/macro_f1": small["macro_f1"],
        "quantized/accuracy_delta": small["accuracy"] - full["accuracy"],
        "quantized/macro_f1_delta": small["macro_f1"] - full["macro_f1"],
        "quantized/fp32_accuracy": full["accuracy"],
        "quantized/fp32_macro_f1": full["macro_f1"],
        "quantized/agreement": float(np.mean(fp32 == quantized)) if len(fp32) else 1.0,
    }


def quantized_gate_results(
    thresholds: Mapping[str, float | None], metrics: Mapping[str, float]
) -> list[GateResult]:
    """The accuracy and macro-F1 gates applied to the quantised numbers in ``metrics``.

    ``thresholds`` maps gate names to thresholds (``EvaluateParams.gate_thresholds``); a gate that is
    off (None) or a metric that was not measured (no quantised serving) gives no result.
    """
    results = []
    for gate, metric in QUANTIZED_GATES.items():
        threshold = thresholds.get(gate)
        if threshold is None or metric not in metrics:
            continue
        results.append(check_gate(f"quantized_{gate}", metric, metrics[metric], threshold, ">="))
    return results


def quantized_gate_failures(
    thresholds: Mapping[str, float | None], metrics: Mapping[str, float]
) -> list[str]:
    """Why the quantised model fails its gates (empty when it passes or was not measured).

    For promotion's re-check too: ``metrics_from_tags`` of a version includes its quantised metrics.
    """
    return [result.reason for result in quantized_gate_results(thresholds, metrics) if not result.passed]


def with_quantized_gates(gates: dict, metrics: Mapping[str, float]) -> dict:
    """``gates`` (`evaluate_gates`' verdict) plus the quantised gates, at the thresholds it applied.

    A failed quantised gate fails the verdict, is listed with its reason, and so blocks `dev` through
    :func:`dev_decision` like any other gate.
    """
    thresholds = {gate["name"]: gate["threshold"] for gate in gates.get("gates", [])}
    added = quantized_gate_results(thresholds, metrics)
    if not added:
        return gates
    failed = [result for result in added if not result.passed]
    return {
        **gates,
        "passed": bool(gates.get("passed", False)) and not failed,
        "failed": [*gates.get("failed", []), *(result.name for result in failed)],
        "reasons": [*gates.get("reasons", []), *(result.reason for result in failed)],
        "gates": [*gates.get("gates", []), *(asdict(result) for result in added)],
    }


def dev_decision(gates: dict, comparison: Comparison | None, require_improvement: bool) -> list[str]:
    """Why a candidate may not become `dev`; an empty list means it may."""
    reasons = [f"gate failed: {reason}" for reason in gates.get("reasons", [])]
    if not gates.get("passed", False) and not reasons:
        reasons.append("gates did not pass")
    if comparison is not None:
        if comparison.verdict == "regression":
            reasons.append(
                f"significant regression against prod v{comparison.prod_version}: {comparison.score} "
                f"{comparison.delta_accuracy:+.4f}, {comparison.test} p = {comparison.p_value:.4g}"
            )
        elif require_improvement and comparison.verdict != "improvement":
            reasons.append(
                f"not a significant improvement over prod v{comparison.prod_version} "
                f"({comparison.score} {comparison.delta_accuracy:+.4f}, {comparison.test} p = "
                f"{comparison.p_value:.4g}) "
                "and registry.require_improvement is set"
            )
    return reasons


def _bias_lines(bias: dict) -> list[str]:
    lines = []
    for column, report in sorted(bias.get("groups", {}).items()):
        if "field_accuracy_gap" in report:
            lines.append(
                f"- group `{column}`: field accuracy gap {report['field_accuracy_gap']:.4f}, "
                f"exact match gap {report.get('exact_gap', float('nan')):.4f}"
            )
            continue
        lines.append(
            f"- group `{column}`: accuracy gap {report.get('accuracy_gap', float('nan')):.4f}, "
            f"macro-F1 gap {report.get('macro_f1_gap', float('nan')):.4f}"
        )
    for attribute, report in sorted(bias.get("counterfactual", {}).items()):
        if "field_change_rate" in report:
            lines.append(
                f"- counterfactual `{attribute}`: field change rate {report['field_change_rate']:.4f} "
                f"(both answers valid in {report.get('both_valid_share', float('nan')):.0%} of the pairs)"
            )
            continue
        lines.append(
            f"- counterfactual `{attribute}`: flip rate {report.get('flip_rate', float('nan')):.4f}"
            + (
                f", accuracy gap {report['max_accuracy_gap']:.4f}"
                if isinstance(report.get("max_accuracy_gap"), int | float)
                else ""
            )
        )
    return lines or ["- no bias report"]


def _behavioural_lines(behavioural: dict | None) -> list[str]:
    """Failure rate per behavioural test type (metrics/behavioural.json, evaluation/behavioural.py)."""
    tests = (behavioural or {}).get("tests", {})
    if not tests:
        return ["- no behavioural report"]
    lines = ["| test | failure rate | failures / cases | skipped |", "|---|---|---|---|"]
    for test, report in tests.items():
        rate = report.get("failure_rate")
        shown = f"{rate:.4f}" if isinstance(rate, int | float) else "- (no cases)"
        lines.append(
            f"| {test} | {shown} | {report.get('failures', 0)} / {report.get('cases', 0)} "
            f"| {report.get('skipped', 0)} |"
        )
    return lines


def _cost_lines(cost: dict[str, float]) -> list[str]:
    """The card's Cost section from the training run's metrics (pipelines/train.py), at list prices."""
    if "cost/training_usd" not in cost:
        return []
    lines = [
        "",
        "## Cost (list prices: params.yaml `cost`)",
        "",
        f"- training: {cost['cost/device_hours']:.4f} device-hours, ${cost['cost/training_usd']:.6f}",
    ]
    if "cost/storage_usd_per_month" in cost:
        lines.append(
            f"- adapter storage: {cost['cost/artifact_gb']:.4f} GB, "
            f"${cost['cost/storage_usd_per_month']:.6f} per month"
        )
    return lines


def _quantized_lines(quantized: dict[str, float], precision: str) -> list[str]:
    """The card's "Quantised serving (int8)" section from :func:`quantized_metrics`."""
    if not quantized:
        return []
    rows = (("accuracy", "accuracy"), ("macro-F1", "macro_f1"))
    lines = [
        "",
        "## Quantised serving (int8)",
        "",
        f"`serving.quantize: int8`: the model servers run it as `{precision}`. Measured on the same "
        "test texts as the fp32 model; the accuracy and macro-F1 gates apply to the int8 numbers.",
        "",
        "| metric | fp32 | int8 | delta |",
        "|---|---|---|---|",
    ]
    for shown, key in rows:
        lines.append(
            f"| {shown} | {quantized[f'quantized/fp32_{key}']:.4f} | {quantized[f'quantized/{key}']:.4f} "
            f"| {quantized[f'quantized/{key}_delta']:+.4f} |"
        )
    lines.append(f"- same label as fp32 on {quantized['quantized/agreement']:.2%} of the test texts")
    return lines


def evaluation_card(
    name: str,
    metrics: dict[str, float],
    gates: dict,
    bias: dict,
    behavioural: dict | None,
    comparison: Comparison | None,
    prod_metrics: dict[str, float],
    reasons: list[str],
    lineage: Lineage,
    run_id: str,
    cost: dict[str, float] | None = None,
    quantized: dict[str, float] | None = None,
    quantized_precision: str = "int8-dynamic",
) -> str:
    """Markdown a reviewer reads before approving: metrics vs prod, quantised serving, gates, paired
    test, bias, behaviour, cost, lineage. ``cost`` is the training run's ``cost/...`` metrics (no
    section when it has none); ``quantized`` is :func:`quantized_metrics` when the model serves
    quantised (``quantized_precision`` says how), else no section."""
    verdict = "passes: becomes `dev`" if not reasons else "blocked: " + "; ".join(reasons)
    lines = [f"# Evaluation card: {name}", "", f"**Verdict:** {verdict}", "", "## Metrics", ""]
    lines += ["| metric | candidate | prod | delta |", "|---|---|---|---|"]
    for key in HEADLINE_METRICS:
        if key not in metrics:
            continue
        value = metrics[key]
        if key in prod_metrics:
            lines.append(
                f"| {key} | {value:.4f} | {prod_metrics[key]:.4f} | {value - prod_metrics[key]:+.4f} |"
            )
        else:
            lines.append(f"| {key} | {value:.4f} | - | - |")
    lines += _quantized_lines(quantized or {}, quantized_precision)
    lines += ["", "## Gates", ""]
    for gate in gates.get("gates", []):
        lines.append(f"- {'ok' if gate['passed'] else '**FAILED**'} `{gate['name']}`: {gate['reason']}")
    if not gates.get("gates"):
        lines.append(f"- passed: {gates.get('passed')}")
    test = comparison.test if comparison is not None else "paired test"
    lines += ["", f"## Champion / challenger (frozen test set, {test})", ""]
    if comparison is None:
        lines.append("- no `prod` version yet: nothing to compare with")
    else:
        lines += [
            f"- prod version: {comparison.prod_version}",
            f"- {comparison.score}: candidate {comparison.candidate_accuracy:.4f}, "
            f"prod {comparison.prod_accuracy:.4f}, delta {comparison.delta_accuracy:+.4f}",
            f"- examples where they differ: candidate better {comparison.candidate_only_correct}, "
            f"prod better {comparison.prod_only_correct}",
            f"- p-value {comparison.p_value:.4g}: **{comparison.verdict}**",
        ]
    lines += ["", "## Bias", "", *_bias_lines(bias)]
    lines += ["", "## Behavioural tests", "", *_behavioural_lines(behavioural)]
    lines += _cost_lines(cost or {})
    lines += ["", "## Lineage", ""]
    lines += [
        f"- MLflow run: `{run_id}`",
        f"- data md5: `{lineage.data_md5}`",
        f"- git commit: `{lineage.git_commit}`",
        f"- dvc.lock md5: `{lineage.dvc_lock_md5}`",
        "",
        "To approve: set the version tag `approval` to `approved` (or `rejected`), then "
        "`tuneloop promote --to prod`.",
    ]
    return "\n".join(lines) + "\n"


def metric_tags(metrics: dict[str, float]) -> dict[str, str]:
    return {f"{METRIC_TAG_PREFIX}{key}": f"{metrics[key]:.6f}" for key in HEADLINE_METRICS if key in metrics}


def metrics_from_tags(tags: dict[str, str]) -> dict[str, float]:
    return {
        key[len(METRIC_TAG_PREFIX) :]: float(v)
        for key, v in tags.items()
        if key.startswith(METRIC_TAG_PREFIX)
    }


def _ensure_registered_model(client: MlflowClient, name: str) -> None:
    try:
        client.get_registered_model(name)
    except MlflowException as error:
        if error.error_code != "RESOURCE_DOES_NOT_EXIST":
            raise
        try:
            client.create_registered_model(name, description="tuneloop model (LoRA fine-tuned pyfunc)")
        except MlflowException as race:
            if race.error_code != "RESOURCE_ALREADY_EXISTS":
                raise


def _predict_labels(model_uri: str, texts: list[str]) -> np.ndarray:
    model = mlflow.pyfunc.load_model(model_uri)
    return model.predict(pd.DataFrame({"text": texts}))["label"].to_numpy()


def _predict_quantized(model_uri: str, texts: list[str]) -> tuple[np.ndarray, str]:
    """Labels of the logged classifier loaded with ``quantize=int8``, and the precision that ran.

    Refuses when the loaded model is not quantised (``TUNELOOP_SERVING_QUANTIZE=none`` in this
    process overrides the model config), rather than report fp32 numbers as int8 ones.
    """
    model = mlflow.pyfunc.load_model(model_uri, model_config={"quantize": "int8"})
    classifier = model.unwrap_python_model().classifier
    if classifier.quantize != "int8":
        raise RuntimeError(
            f"the quantised model loaded as {classifier.precision!r}: unset {QUANTIZE_ENV} "
            "(it overrides serving.quantize) to measure the int8 model at registration"
        )
    labels = model.predict(pd.DataFrame({"text": texts}))["label"].to_numpy()
    return labels, classifier.precision


def _field_accuracy(model_uri: str, messages: list[str], targets: list[str]) -> pd.DataFrame:
    """Per-example scores of a logged generation model's answers (`evaluation.generation`)."""
    answers = mlflow.pyfunc.load_model(model_uri).predict(pd.DataFrame({"text": messages}))
    return per_example_scores(answers["generated"].astype(str).tolist(), targets)


def register_candidate(
    client: MlflowClient,
    adapter_dir: Path,
    base: str,
    test_frame: pd.DataFrame,
    metrics: dict[str, float],
    gates: dict,
    bias: dict,
    lineage: Lineage,
    params: RegistryParams,
    serving: ServingParams,
    behavioural: dict | None = None,
) -> Registration:
    """Log, verify, compare, register and (when it passes) alias one candidate as `dev`.

    With ``serving.quantize == "int8"`` a classifier's quantised copy is scored too (see the module
    docstring) and ``gates`` gains its accuracy and macro-F1 gates. The fluent MLflow API and
    ``client`` must point at the same tracking server.
    """
    manifest = read_json(Path(adapter_dir) / MANIFEST_FILE)
    run_id = manifest["mlflow_run_id"]
    generates = manifest.get("task") == GENERATION_TASK
    name = params.model_name
    with mlflow.start_run(run_id=run_id):
        if generates:
            info = log_generation_model(Path(adapter_dir), serving)
        else:
            info = log_intent_model(Path(adapter_dir), base, serving)
    texts = test_frame["text"].astype(str).tolist()

    _ensure_registered_model(client, name)
    prod = current_version(client, name, PROD_ALIAS)
    comparison = None
    prod_metrics: dict[str, float] = {}
    quantized: dict[str, float] = {}
    quantized_precision = ""
    if generates and serving.quantize != "none":
        log.warning(
            "serving.quantize=%s does not apply to a generation model: it serves as trained", serving.quantize
        )
    if generates:
        # A generator's test frame has the reference answers in `target` (register_workspace).
        targets = test_frame["target"].astype(str).tolist()
        candidate_scores = _field_accuracy(info.model_uri, texts, targets)
        frozen_test_accuracy = float(candidate_scores["exact"].mean())
        if prod is not None:
            prod_scores = _field_accuracy(f"models:/{name}/{prod.version}", texts, targets)
            comparison = compare_generations(
                candidate_scores["field_accuracy"].to_numpy(),
                prod_scores["field_accuracy"].to_numpy(),
                prod.version,
                params.significance_level,
                params.min_improvement,
            )
    else:
        y_true = test_frame["label"].astype(str).to_numpy()
        candidate_labels = _predict_labels(info.model_uri, texts)
        frozen_test_accuracy = float(np.mean(candidate_labels == y_true))
        if serving.quantize == "int8":
            quantized_labels, quantized_precision = _predict_quantized(info.model_uri, texts)
            quantized = quantized_metrics(y_true, candidate_labels, quantized_labels)
            gates = with_quantized_gates(gates, quantized)
            for key, value in quantized.items():
                client.log_metric(run_id, key, value)
            log.info(
                "quantised (%s) accuracy %.4f (%+.4f vs fp32), macro-F1 %.4f",
                quantized_precision,
                quantized["quantized/accuracy"],
                quantized["quantized/accuracy_delta"],
                quantized["quantized/macro_f1"],
            )
        if prod is not None:
            prod_labels = _predict_labels(f"models:/{name}/{prod.version}", texts)
            comparison = compare_with_prod(
                y_true,
                candidate_labels,
                prod_labels,
                prod.version,
                params.significance_level,
                params.min_improvement,
            )
    if prod is not None:
        prod_metrics = metrics_from_tags(prod.tags)
    reasons = dev_decision(gates, comparison, params.require_improvement)
    run_metrics = client.get_run(run_id).data.metrics
    cost = {key: value for key, value in run_metrics.items() if key.startswith("cost/")}
    card = evaluation_card(
        name,
        metrics,
        gates,
        bias,
        behavioural,
        comparison,
        prod_metrics,
        reasons,
        lineage,
        run_id,
        cost,
        quantized=quantized,
        quantized_precision=quantized_precision,
    )

    tags = {
        "approval": "pending",
        "tuneloop.data_md5": lineage.data_md5,
        "tuneloop.git_commit": lineage.git_commit,
        "tuneloop.dvc_lock_md5": lineage.dvc_lock_md5,
        "tuneloop.gates_passed": str(bool(gates.get("passed"))).lower(),
        "tuneloop.gates_failed": ",".join(gates.get("failed", [])),
        # A generator's "accuracy" on the frozen test set is its exact-match rate.
        "tuneloop.frozen_test_accuracy": f"{frozen_test_accuracy:.6f}",
        "tuneloop.task": GENERATION_TASK if generates else "classification",
        "tuneloop.evaluation_card": card[:MAX_TAG_VALUE],
        **metric_tags(metrics),
    }
    if quantized:
        tags["tuneloop.serving_precision"] = quantized_precision
        tags.update({f"{METRIC_TAG_PREFIX}{key}": f"{quantized[key]:.6f}" for key in QUANTIZED_TAGGED})
    if comparison is not None:
        tags.update(
            {
                "tuneloop.vs_prod.version": comparison.prod_version,
                "tuneloop.vs_prod.p_value": f"{comparison.p_value:.6g}",
                "tuneloop.vs_prod.delta_accuracy": f"{comparison.delta_accuracy:+.6f}",
                "tuneloop.vs_prod.verdict": comparison.verdict,
            }
        )
    if reasons:
        tags["tuneloop.blocked_reason"] = "; ".join(reasons)[:MAX_TAG_VALUE]
    client.log_text(run_id, card, "evaluation_card.md")

    version = client.create_model_version(
        name, source=info.model_uri, run_id=run_id, tags=tags, description=card, model_id=info.model_id
    )
    try:
        if reasons:
            client.set_tag(run_id, "tuneloop.blocked_reason", "; ".join(reasons)[:MAX_TAG_VALUE])
        else:
            client.set_model_version_tag(name, version.version, "was_dev", "true")
            client.set_registered_model_alias(name, DEV_ALIAS, version.version)
        client.set_tag(run_id, "tuneloop.registry_verdict", "blocked" if reasons else "dev")
        client.set_tag(run_id, "tuneloop.registered_version", f"{name}/{version.version}")
    except Exception:
        log.error("registering %s v%s failed after creation; deleting that version", name, version.version)
        client.delete_model_version(name, version.version)
        raise
    return Registration(
        name=name,
        version=version.version,
        run_id=run_id,
        model_uri=info.model_uri,
        promoted_to_dev=not reasons,
        reasons=reasons,
        comparison=comparison,
        card=card,
        tags=tags,
    )


def registered_version_of(client: MlflowClient, name: str, run_id: str) -> ModelVersion | None:
    """The version already registered from ``run_id`` whose registration finished, or None.

    `register_candidate` tags the run last (`tuneloop.registered_version`); a version without that
    tag was left by a registration that crashed half-way, and is deleted so it can be redone.
    """
    versions = client.search_model_versions(f"name = '{name}' and run_id = '{run_id}'")
    if not versions:
        return None
    finished = client.get_run(run_id).data.tags.get("tuneloop.registered_version")
    for version in versions:
        if finished == f"{name}/{version.version}":
            # Search results leave out aliases: read the version itself.
            return client.get_model_version(name, version.version)
        log.warning("deleting %s v%s: its registration did not finish", name, version.version)
        client.delete_model_version(name, version.version)
    return None


@dataclass(frozen=True)
class WorkspaceRegistration:
    """What `tuneloop register` and the training flow report: the version, and whether it is new."""

    name: str
    version: str
    run_id: str
    new_version: bool
    promoted_to_dev: bool
    reasons: list[str]


def record_reference(
    client: MlflowClient, run_id: str, adapter_dir: Path, prepared: Path, params: Params
) -> None:
    """The classifier's answers on all held-out splits, logged with its run before it is registered.

    The drift job compares a registered version with these answers (reference accuracy, predicted
    labels, confidence calibration), however the data's splits move after later data versions.
    """
    splits = params.monitoring.quality_reference_splits
    answers = held_out_answers(IntentClassifier.load(adapter_dir).answers, held_out_splits(prepared, splits))
    folder, name = HELD_OUT_ARTIFACT.rsplit("/", 1)
    with tempfile.TemporaryDirectory(prefix="tuneloop-held-out-") as local:
        answers.to_parquet(Path(local) / name, index=False)
        client.log_artifact(run_id, str(Path(local) / name), artifact_path=folder)
    accuracy = float(correctness(answers).mean())
    log.info("recorded %d held-out answers (%s), accuracy %.4f", len(answers), "+".join(splits), accuracy)


def register_workspace(project_dir: Path, params: Params, client: MlflowClient) -> WorkspaceRegistration:
    """Register the project's trained adapter once per training run (the step behind CLI and flow).

    Reads what the DVC stages left in the project (adapter, prepared test split, metrics, dvc.lock),
    attaches ``dvc.lock`` to the training run, and registers it with its lineage. A training run that
    is already registered is reported, not registered twice. ``client`` and the fluent MLflow API must
    point at the same tracking server.
    """
    project = Path(project_dir)
    prepared, metrics_dir, adapter_dir = project / PREPARED_DIR, project / METRICS_DIR, project / ADAPTER_DIR
    run_id = read_json(adapter_dir / MANIFEST_FILE)["mlflow_run_id"]
    name = params.registry.model_name
    existing = registered_version_of(client, name, run_id)
    if existing is not None:
        log.info("training run %s is already %s v%s: nothing new to register", run_id, name, existing.version)
        blocked = existing.tags.get("tuneloop.blocked_reason")
        return WorkspaceRegistration(
            name,
            str(existing.version),
            run_id,
            False,
            DEV_ALIAS in existing.aliases,
            [blocked] if blocked else [],
        )
    lock = project / "dvc.lock"
    if not lock.exists():
        raise FileNotFoundError(f"{lock} is missing: run the pipeline (`tuneloop run`) before registering")
    with mlflow.start_run(run_id=run_id):
        mlflow.log_text(lock.read_text(encoding="utf-8"), "lineage/dvc.lock")
    test_frame = pd.read_parquet(prepared / "test.parquet")
    if params.task == "generation":
        test_frame = test_frame.rename(
            columns={params.generation.input_column: "text", params.generation.target_column: "target"}
        )
    else:
        record_reference(client, run_id, adapter_dir, prepared, params)
    registration = register_candidate(
        client,
        adapter_dir,
        params.model.base,
        test_frame,
        read_json(metrics_dir / "evaluate.json"),
        read_json(metrics_dir / "gates.json"),
        read_json(metrics_dir / "bias.json"),
        Lineage(
            data_md5=read_json(prepared / "meta.json")["source_md5"],
            git_commit=git_commit(project),
            dvc_lock_md5=file_md5(lock),
        ),
        params.registry,
        params.serving,
        behavioural=read_json(metrics_dir / "behavioural.json"),
    )
    log.info(
        "registered %s v%s: %s",
        name,
        registration.version,
        "dev" if registration.promoted_to_dev else "blocked: " + "; ".join(registration.reasons),
    )
    return WorkspaceRegistration(
        name,
        str(registration.version),
        registration.run_id,
        True,
        registration.promoted_to_dev,
        registration.reasons,
    )
