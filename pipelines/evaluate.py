"""`evaluate` stage: quality, calibration, latency, bias and behavioural tests of the trained adapter on
the test split, and the gate verdicts that decide whether the model may be promoted. With `task:
generation` the same files hold the generation report (`evaluate_generation_task`).
"""

from __future__ import annotations

import argparse
import logging
import time
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path

import mlflow
import numpy as np
import pandas as pd
import yaml

from evaluation.behavioural import BehaviouralCases, behavioural_tests, parse_cases
from evaluation.bias import counterfactual_test, group_metrics
from evaluation.gates import evaluate_gates
from evaluation.generation import group_metrics as generation_group_metrics
from evaluation.generation import is_valid, parse_output
from evaluation.plots import confusion_matrix_figure
from evaluation.quality import confusion, expected_calibration_error, headline_metrics, per_class_metrics
from pipelines.evaluate_generation import evaluate_generator
from pipelines.train import split_timed, to_ids
from serving.generation import Generation, TextGenerator
from serving.inference import MANIFEST_FILE, IntentClassifier
from tuneloop.config import Environment, EvaluateParams, GenerationParams, load_params
from tuneloop.io import read_json, write_json
from tuneloop.paths import ADAPTER_DIR, METRICS_DIR, PLOTS_DIR, PREPARED_DIR, REPORTS_DIR
from tuneloop.progress import interactive, quiet_library_bars
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
    # The confusion matrix's rows and columns (a generator's adds INVALID_ANSWER).
    label_names: tuple[str, ...]


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
    # Bars only on a terminal: the bias and behavioural tests alone draw one per batch of variants.
    progress = interactive()

    def predicted_ids(batch: list[str]) -> np.ndarray:
        return classifier.predict_proba(batch, batch_size=params.batch_size, progress=progress).argmax(1)

    y_true = np.asarray(to_ids(test_frame["label"], tuple(label_names)))

    started = time.perf_counter()
    probabilities = classifier.predict_proba(texts, batch_size=params.batch_size, progress=progress)
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
        predicted_ids,
    )
    metrics["bias/max_group_accuracy_gap"] = max((g["accuracy_gap"] for g in groups.values()), default=0.0)
    metrics["bias/max_group_macro_f1_gap"] = max((g["macro_f1_gap"] for g in groups.values()), default=0.0)
    metrics["bias/counterfactual_flip_rate"] = counterfactual["overall"]["flip_rate"]
    metrics["bias/counterfactual_accuracy_gap"] = counterfactual["overall"]["max_accuracy_gap"]
    for attribute, report in counterfactual.items():
        if attribute != "overall":
            metrics[f"bias/counterfactual_flip_rate/{attribute}"] = report["flip_rate"]

    def predict_labels(batch: list[str]) -> list[str]:
        return [label_names[i] for i in predicted_ids(batch)]

    log.info("behavioural tests: typos, casing, names, punctuation, negation, minimum functionality")
    behavioural = behavioural_tests(predict_labels, texts, label_names, behavioural_cases, params.behavioural)
    metrics.update(behavioural["metrics"])

    gates = evaluate_gates(metrics, params.gate_thresholds("classification"))
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
        label_names=tuple(label_names),
    )


# The intent a generated answer is scored with when it is not valid JSON with every field.
INVALID_ANSWER = "<invalid answer>"


def answered_intents(outputs: Sequence[str]) -> list[str]:
    """The ``intent`` field of each generated answer, or INVALID_ANSWER."""
    intents = []
    for text in outputs:
        parsed = parse_output(text)
        intents.append(str(parsed["intent"]) if parsed is not None and is_valid(parsed) else INVALID_ANSWER)
    return intents


def evaluate_generation_task(
    generator: TextGenerator,
    test_frame: pd.DataFrame,
    label_names: tuple[str, ...],
    group_columns: tuple[str, ...],
    generation: GenerationParams,
    params: EvaluateParams,
    behavioural_cases: BehaviouralCases | None = None,
) -> EvaluationResult:
    """`task: generation`: the generation report (`pipelines.evaluate_generation`) in the stage's files.

    The answers are scored as JSON against the targets; the ``intent`` they extract is also scored as a
    classifier's label would be (per intent, confusion matrix, behavioural tests), since that is the
    field a support tool routes on.
    """
    if behavioural_cases is None:
        behavioural_cases = load_behavioural_cases(params.behavioural.cases_path)
    progress = interactive()

    def generate(messages: Sequence[str]) -> list[Generation]:
        return generator.generate(messages, batch_size=params.batch_size, progress=progress)

    report = evaluate_generator(
        generate, test_frame, generation, params.counterfactual, group_columns, params.behavioural.seed
    )
    metrics = dict(report.metrics)
    metrics["quality/test_examples"] = len(test_frame)
    true_intents = [
        str((parse_output(target) or {}).get("intent")) for target in test_frame[generation.target_column]
    ]
    predicted_intents = answered_intents(report.outputs)
    names = tuple(dict.fromkeys([*label_names, *true_intents, *predicted_intents, INVALID_ANSWER]))
    per_intent = report.per_example.assign(intent=true_intents).groupby("intent")
    per_class = {
        intent: {
            "support": int(len(rows)),
            "json_valid_rate": float(rows["valid"].mean()),
            "exact_match": float(rows["exact"].mean()),
            "field_accuracy": float(rows["field_accuracy"].mean()),
            "intent_accuracy": float(rows["field_exact/intent"].mean()),
        }
        for intent, rows in per_intent
    }
    groups = {}
    for column in group_columns:
        by_group = generation_group_metrics(report.per_example, test_frame[column].reset_index(drop=True))
        groups[column] = {
            "exact_gap": by_group["bias/max_group_exact_gap"],
            "field_accuracy_gap": by_group["bias/max_group_field_accuracy_gap"],
            "slices": {key: value for key, value in by_group.items() if key.startswith("slice/")},
        }
    counterfactual = {
        attribute: {
            "field_change_rate": changes["bias/counterfactual_field_change_rate"],
            "both_valid_share": changes["bias/counterfactual_both_valid_share"],
            "changes": {
                key.rsplit("/", 1)[1]: value
                for key, value in changes.items()
                if key.startswith("bias/counterfactual_change/")
            },
        }
        for attribute, changes in report.counterfactual.items()
    }

    def predict_intents(batch: list[str]) -> list[str]:
        return answered_intents([answer.text for answer in generate(batch)])

    log.info("behavioural tests on the answers' intent: typos, casing, names, punctuation, negation, MFT")
    messages = test_frame[generation.input_column].astype(str).tolist()
    behavioural = behavioural_tests(
        predict_intents, messages, label_names, behavioural_cases, params.behavioural
    )
    metrics.update(behavioural["metrics"])
    index = {name: position for position, name in enumerate(names)}
    return EvaluationResult(
        metrics=metrics,
        per_class=per_class,
        bias={"groups": groups, "counterfactual": counterfactual},
        behavioural=behavioural,
        gates=evaluate_gates(metrics, params.gate_thresholds("generation")),
        confusion=confusion(
            [index[i] for i in true_intents], [index[i] for i in predicted_intents], len(names)
        ),
        predictions=test_frame.assign(
            generated=report.outputs,
            label=true_intents,
            predicted=predicted_intents,
            exact=report.per_example["exact"].to_numpy(),
            field_accuracy=report.per_example["field_accuracy"].to_numpy(),
        ),
        label_names=names,
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
    quiet_library_bars()
    params = load_params(args.params)
    env = Environment.from_env()
    metrics_dir, plots_dir, reports_dir = Path(args.metrics_dir), Path(args.plots_dir), Path(args.reports_dir)
    inputs = (Path(args.prepared_dir) / "test.parquet", Path(args.model_dir) / MANIFEST_FILE)
    missing = [str(path) for path in inputs if not path.is_file()]
    if missing:
        raise SystemExit(
            f"evaluate: there is no {' or '.join(missing)}. The `prepare` and `train` stages write them: "
            "run `dvc repro train` (or `tuneloop run`) first."
        )

    test_frame = pd.read_parquet(Path(args.prepared_dir) / "test.parquet")
    if params.task == "generation":
        result = evaluate_generation_task(
            TextGenerator.load(args.model_dir, device=params.train.device),
            test_frame,
            params.data.labels,
            params.data.group_columns,
            params.generation,
            params.evaluate,
        )
    else:
        classifier = IntentClassifier.load(args.model_dir, device=params.train.device)
        result = evaluate(classifier, test_frame, params.data.group_columns, params.evaluate)

    reproducible, timed = split_timed({k: round(v, 6) for k, v in result.metrics.items()})
    write_json(metrics_dir / "evaluate.json", reproducible)
    # Latency and throughput: MLflow has them too; untracked, since no two runs agree on them.
    write_json(reports_dir / "timing" / "evaluate.json", timed)
    write_json(metrics_dir / "per_class.json", result.per_class)
    write_json(metrics_dir / "bias.json", result.bias)
    write_json(metrics_dir / "behavioural.json", result.behavioural)
    write_json(metrics_dir / "gates.json", result.gates)
    plots_dir.mkdir(parents=True, exist_ok=True)
    result.predictions[["label", "predicted"]].rename(columns={"label": "actual"}).to_csv(
        plots_dir / "confusion.csv", index=False
    )
    figure = confusion_matrix_figure(result.confusion, result.label_names)
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
    headline = (
        ("generation/json_valid_rate", "generation/exact_match", "generation/field_micro_f1")
        if params.task == "generation"
        else ("quality/accuracy", "quality/macro_f1")
    )
    log.info("%s; gates %s", ", ".join(f"{key} {result.metrics[key]:.4f}" for key in headline), verdict)


if __name__ == "__main__":
    main()
