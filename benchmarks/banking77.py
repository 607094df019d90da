"""Train and evaluate on banking77 (read from ../shared, never copied) with the project's real steps.

    python -m benchmarks.banking77 --epochs 5

Uses params.yaml (default model and hyper-parameters) with banking77's columns and labels, the
official test file as a frozen test set, and writes ``benchmarks/results/banking77.json``.
"""

from __future__ import annotations

import argparse
import json
import logging
import platform
import time
from pathlib import Path

import mlflow
import torch

from pipelines.evaluate import evaluate
from pipelines.prepare import prepare
from pipelines.train import train, train_metrics
from pipelines.validate import build_validation_frame, run_suite
from serving.inference import IntentClassifier
from tuneloop.config import Environment, load_params
from tuneloop.tracking import flatten, use_experiment

log = logging.getLogger("benchmarks.banking77")
DEFAULT_DATA_DIR = Path(__file__).resolve().parents[2] / "shared" / "datasets" / "banking77"


def banking77_params(params_path: Path, data_dir: Path, epochs: float):
    """The project's params with banking77's column mapping, label set and frozen test file."""
    params = load_params(params_path)
    labels = tuple(json.loads((data_dir / "categories.json").read_text()))
    data = params.data.model_copy(
        update={
            "raw_path": str(data_dir / "train.csv"),
            "test_path": str(data_dir / "test.csv"),
            "text_column": "text",
            "label_column": "category",
            "group_columns": (),
            "labels": labels,
        }
    )
    # banking77's official train and test files share 8 texts; `validate` rejects that leak, so the
    # overlapping rows are dropped from training (and reported) rather than the check being loosened.
    prepare_params = params.prepare.model_copy(update={"drop_test_overlap": True})
    return params.model_copy(
        update={
            "data": data,
            "prepare": prepare_params,
            "train": params.train.model_copy(update={"epochs": epochs}),
        }
    )


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("--data-dir", type=Path, default=DEFAULT_DATA_DIR)
    parser.add_argument("--params", type=Path, default=Path("params.yaml"))
    parser.add_argument("--epochs", type=float, default=5)
    parser.add_argument("--work-dir", type=Path, default=Path(".tuneloop/banking77"))
    parser.add_argument("--out", type=Path, default=Path("benchmarks/results/banking77.json"))
    args = parser.parse_args(argv)
    logging.basicConfig(level=logging.INFO, format="%(levelname)s %(name)s: %(message)s")
    params = banking77_params(args.params, args.data_dir, args.epochs)

    prepared = prepare(Path(params.data.raw_path), params.data, params.prepare, Path(params.data.test_path))
    outcome = run_suite(build_validation_frame(prepared.splits), params.validate_, params.data.labels)
    log.info(outcome.summary())
    if not outcome.success:
        raise SystemExit(outcome.summary())

    env = Environment.from_env()
    use_experiment(env.model_copy(update={"experiment_name": "tuneloop-banking77"}))

    def log_epoch(row: dict) -> None:
        mlflow.log_metrics(
            {f"epoch/{k}": v for k, v in row.items() if k != "epoch" and v is not None},
            step=int(round(row["epoch"])),
        )

    with mlflow.start_run(run_name="banking77") as run:
        mlflow.log_params(
            flatten("", {"train": params.train.model_dump(), "model": params.model.model_dump()})
        )
        mlflow.set_tag("tuneloop.data_md5", prepared.source_md5)
        result = train(
            prepared.splits["train"],
            prepared.splits["val"],
            params.data.labels,
            params.model,
            params.train,
            args.work_dir / "adapter",
            on_epoch=log_epoch,
        )
        classifier = IntentClassifier.load(args.work_dir / "adapter", device=params.train.device)
        evaluation = evaluate(classifier, prepared.splits["test"], (), params.evaluate)
        mlflow.log_metrics({**train_metrics(result), **evaluation.metrics})
    report = {
        "dataset": "banking77 (PolyAI, CC BY 4.0): official train split (90% train / 10% validation), "
        "full official test split",
        "rows": {name: len(part) for name, part in prepared.splits.items()},
        "train_rows_dropped_as_in_test": prepared.dropped_test_overlap,
        "model": params.model.base,
        "train_params": params.train.model_dump(),
        "device": result.device,
        "machine": {"cpu_count": torch.get_num_threads(), "platform": platform.platform()},
        "epochs_run": result.epochs_run,
        "best_epoch": result.best_epoch,
        "training_seconds": round(result.total_seconds, 1),
        "train_loop_examples_per_second": round(result.examples_per_second, 2),
        "history": result.history,
        "test_accuracy": round(evaluation.metrics["quality/accuracy"], 4),
        "test_macro_f1": round(evaluation.metrics["quality/macro_f1"], 4),
        "test_expected_calibration_error": round(evaluation.metrics["quality/expected_calibration_error"], 4),
        "counterfactual_flip_rate": round(evaluation.metrics["bias/counterfactual_flip_rate"], 4),
        "gates": evaluation.gates,
        "mlflow_run_id": run.info.run_id,
        "measured_at": time.strftime("%Y-%m-%dT%H:%M:%S%z"),
    }
    args.out.parent.mkdir(parents=True, exist_ok=True)
    args.out.write_text(json.dumps(report, indent=2) + "\n")
    log.info(
        "banking77: accuracy %.4f, macro-F1 %.4f, %.0fs training -> %s",
        report["test_accuracy"],
        report["test_macro_f1"],
        report["training_seconds"],
        args.out,
    )


if __name__ == "__main__":
    main()
