"""`evaluate` stage: quality, calibration, latency, bias and behavioural tests of the trained adapter on
the test split, and the gate verdicts that decide whether the model may be promoted.
"""

from __future__ import annotations

import argparse
import logging
import time
from dataclasses import dataclass
from pathlib import Path

import mlflow
import numpy as np
import pandas as pd
import yaml

from evaluation.behavioural import BehaviouralCases, behavioural_tests, parse_cases
from evaluation.bias import counterfactual_test, group_metrics
from evaluation.gates import evaluate_gates
from evaluation.plots import confusion_matrix_figure
from evaluation.quality import confusion, expected_calibration_error, headline_metrics, per_class_metrics
from pipelines.train import to_ids
from serving.inference import MANIFEST_FILE, IntentClassifier
from tuneloop.config import Environment, EvaluateParams, load_params
from tuneloop.io import read_json, write_json
from tuneloop.paths import ADAPTER_DIR, METRICS_DIR, PLOTS_DIR, PREPARED_DIR, REPORTS_DIR
from tuneloop.tracking import use_experiment

log = logging.getLogger(__name__)

SINGLE_LATENCY_SAMPLES = 50


@dataclass
class EvaluationResult:
    metrics: dict[str, float]
    per_class: dict[str, dict[str, float]]
    bias: dict
    behavioural: dict
    gates: dict
    confusion: np.ndarray
    predictions: pd.DataFrame


def load_behavioural_cases(path: str | Path) -> BehaviouralCases:
    """The MFT and DIR cases file named by ``evaluate.behavioural.cases_path``."""
    with open(path, encoding="utf-8") as handle:
        return parse_cases(yaml.safe_load(handle))


def evaluate(
    classifier: IntentClassifier,
    test_frame: pd.DataFrame,
    group_columns: tuple[str, ...],
    params: EvaluateParams,
    behavioural_cases: BehaviouralCases | None = None,
) -> EvaluationResult:
    """Score ``classifier`` on ``test_frame`` and apply the gates from ``params``.

    ``behavioural_cases`` defaults to the file ``params.behavioural.cases_path`` (relative to the
    working directory, the project folder when DVC runs the stage).
    """
    if behavioural_cases is None:
        behavioural_cases = load_behavioural_cases(params.behavioural.cases_path)
    label_names = classifier.label_names
    texts = test_frame["text"].tolist()
    y_true = np.asarray(to_ids(test_frame["label"], tuple(label_names)))

    started = time.perf_counter()
    probabilities = classifier.predict_proba(texts, batch_size=params.batch_size, progress=True)
    batched_seconds = time.perf_counter() - started
    y_pred = probabilities.argmax(axis=1)

    single = []
    for text in texts[:SINGLE_LATENCY_SAMPLES]:
        tick = time.perf_counter()
        classifier.predict_proba([text], batch_size=1)
        single.append(time.perf_counter() - tick)

    metrics = {f"quality/{k}": v for k, v in headline_metrics(y_true, y_pred).items()}
    metrics["quality/expected_calibration_error"] = expected_calibration_error(probabilities, y_true)
    metrics["quality/test_examples"] = len(texts)
    metrics["latency/batched_ms_per_example"] = 1000 * batched_seconds / max(len(texts), 1)
    metrics["latency/single_p50_ms"] = 1000 * float(np.median(single))

    groups = group_metrics(y_true, y_pred, test_frame[list(group_columns)]) if group_columns else {}
    sample = test_frame.sample(n=min(params.counterfactual.max_examples, len(test_frame)), random_state=0)
    counterfactual = counterfactual_test(
        sample["text"].tolist(),
        to_ids(sample["label"], tuple(label_names)),
        params.counterfactual.attributes,
        lambda batch: classifier.predict_proba(batch, batch_size=params.batch_size, progress=True).argmax(1),
    )
    metrics["bias/max_group_accuracy_gap"] = max((g["accuracy_gap"] for g in groups.values()), default=0.0)
    metrics["bias/max_group_macro_f1_gap"] = max((g["macro_f1_gap"] for g in groups.values()), default=0.0)
    metrics["bias/counterfactual_flip_rate"] = counterfactual["overall"]["flip_rate"]
    metrics["bias/counterfactual_accuracy_gap"] = counterfactual["overall"]["max_accuracy_gap"]
    for attribute, report in counterfactual.items():
        if attribute != "overall":
            metrics[f"bias/counterfactual_flip_rate/{attribute}"] = report["flip_rate"]

    def predict_labels(batch: list[str]) -> list[str]:
        ids = classifier.predict_proba(batch, batch_size=params.batch_size, progress=True).argmax(1)
        return [label_names[i] for i in ids]

    log.info("behavioural tests: typos, casing, names, punctuation, negation, minimum functionality")
    behavioural = behavioural_tests(predict_labels, texts, label_names, behavioural_cases, params.behavioural)
    metrics.update(behavioural["metrics"])

    gates = evaluate_gates(metrics, params.gate_thresholds())
    predictions = test_frame.assign(
        predicted=[label_names[i] for i in y_pred], score=probabilities.max(axis=1)
    )
    return EvaluationResult(
        metrics=metrics,
        per_class=per_class_metrics(y_true, y_pred, label_names),
        bias={"groups": groups, "counterfactual": counterfactual},
        behavioural=behavioural,
        gates=gates,
        confusion=confusion(y_true, y_pred, len(label_names)),
        predictions=predictions,
    )


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("--params", default="params.yaml")
    parser.add_argument("--prepared-dir", default=str(PREPARED_DIR))
    parser.add_argument("--model-dir", default=str(ADAPTER_DIR))
    parser.add_argument("--metrics-dir", default=str(METRICS_DIR))
    parser.add_argument("--plots-dir", default=str(PLOTS_DIR))
    parser.add_argument("--reports-dir", default=str(REPORTS_DIR))
    args = parser.parse_args(argv)
    logging.basicConfig(level=logging.INFO, format="%(levelname)s %(name)s: %(message)s")
    params = load_params(args.params)
    env = Environment.from_env()
    metrics_dir, plots_dir, reports_dir = Path(args.metrics_dir), Path(args.plots_dir), Path(args.reports_dir)

    classifier = IntentClassifier.load(args.model_dir, device=params.train.device)
    result = evaluate(
        classifier,
        pd.read_parquet(Path(args.prepared_dir) / "test.parquet"),
        params.data.group_columns,
        params.evaluate,
    )

    write_json(metrics_dir / "evaluate.json", {k: round(v, 6) for k, v in result.metrics.items()})
    write_json(metrics_dir / "per_class.json", result.per_class)
    write_json(metrics_dir / "bias.json", result.bias)
    write_json(metrics_dir / "behavioural.json", result.behavioural)
    write_json(metrics_dir / "gates.json", result.gates)
    plots_dir.mkdir(parents=True, exist_ok=True)
    result.predictions[["label", "predicted"]].rename(columns={"label": "actual"}).to_csv(
        plots_dir / "confusion.csv", index=False
    )
    figure = confusion_matrix_figure(result.confusion, classifier.label_names)
    figure.savefig(plots_dir / "confusion_matrix.png", dpi=120)
    reports_dir.mkdir(parents=True, exist_ok=True)
    result.predictions.to_csv(reports_dir / "test_predictions.csv", index=False)

    run_id = read_json(Path(args.model_dir) / MANIFEST_FILE).get("mlflow_run_id")
    use_experiment(env)
    with mlflow.start_run(run_id=run_id):
        mlflow.log_metrics(result.metrics)
        mlflow.set_tag("tuneloop.gates_passed", str(result.gates["passed"]).lower())
        if not result.gates["passed"]:
            mlflow.set_tag("tuneloop.gates_failed_reason", "; ".join(result.gates["reasons"])[:5000])
        for name in ("evaluate.json", "per_class.json", "bias.json", "behavioural.json", "gates.json"):
            mlflow.log_artifact(str(metrics_dir / name), artifact_path="metrics")
        mlflow.log_figure(figure, "plots/confusion_matrix.png")
        mlflow.log_artifact(str(reports_dir / "test_predictions.csv"), artifact_path="reports")
        validation = reports_dir / "validation" / "summary.json"
        if validation.exists():
            mlflow.log_artifact(str(validation), artifact_path="reports/validation")
        lock = env.project_dir / "dvc.lock"
        if lock.exists():
            mlflow.log_text(lock.read_text(encoding="utf-8"), "lineage/dvc.lock")
    verdict = "PASSED" if result.gates["passed"] else "FAILED: " + "; ".join(result.gates["reasons"])
    log.info(
        "behavioural failure rates: %s",
        ", ".join(
            f"{test} {report['failure_rate']:.3f}" if report["failure_rate"] is not None else f"{test} -"
            for test, report in result.behavioural["tests"].items()
        ),
    )
    log.info(
        "accuracy %.4f, macro-F1 %.4f; gates %s",
        result.metrics["quality/accuracy"],
        result.metrics["quality/macro_f1"],
        verdict,
    )


if __name__ == "__main__":
    main()
