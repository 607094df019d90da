"""Close the loop once, for real: drifted traffic -> drift detected -> feedback appended -> retrain.

    python -m benchmarks.drift_retrain --old-adapter /tmp/fresh/models/adapter \
        --old-prepared /tmp/fresh/data/prepared

1. Stable traffic: 20 windows of 200 held-out sample texts (the old model's test split) against the
   old model's reference; counts false alarms (quality reference: its validation split, so the
   windows' labels are not the reference's own).
2. Drifted traffic: ``data/sample/drifted.csv`` split (stratified, seeded) into a feedback half and
   a held-out half. The feedback half, predicted by the old model and labelled, is the window.
3. The monitor step runs on it in a throwaway copy of the project (``git archive HEAD``; the sample
   as raw data, a local DVC remote): drift, decision, the feedback appended as a new DVC version.
4. ``dvc repro train`` retrains there with default params (the one slow part: minutes on a CPU).
5. Old vs new accuracy and macro-F1 on the held-out drifted half.

Nothing under the repository's own data/ is touched. JSON: ``benchmarks/results/drift_retrain.json``.
"""

from __future__ import annotations

import argparse
import logging
import os
import subprocess
import sys
import tarfile
import time
import uuid
from datetime import UTC, datetime, timedelta
from pathlib import Path

import numpy as np
import pandas as pd
from sklearn.metrics import accuracy_score, f1_score
from sklearn.model_selection import train_test_split
from tqdm.auto import tqdm

from pipelines.config import Environment, MonitoringParams, load_params
from pipelines.datastore import init_project
from pipelines.io import write_json
from pipelines.monitor import adapter_predictor, build_reference, evaluate_window, run_monitor

log = logging.getLogger("benchmarks.drift_retrain")
REPO_ROOT = Path(__file__).resolve().parents[1]


def log_rows(
    texts: list[str], predicted: pd.DataFrame, true_labels: list[str] | None, version: str
) -> pd.DataFrame:
    """Rows shaped like the gateway's inference log (``serving.inference_log.read_window``)."""
    now = datetime.now(UTC)
    count = len(texts)
    return pd.DataFrame(
        {
            "request_id": [uuid.uuid4().hex for _ in range(count)],
            "item_index": 0,
            "created_at": [now - timedelta(seconds=count - i) for i in range(count)],
            "model_name": "tuneloop-intent",
            "model_version": version,
            "text": texts,
            "label": predicted["label"].to_numpy(),
            "score": predicted["score"].to_numpy(),
            "latency_ms": np.nan,
            "true_label": true_labels if true_labels is not None else [None] * count,
        }
    )


def stable_false_alarms(
    predictor,
    prepared_dir: Path,
    params: MonitoringParams,
    cache_dir: Path,
    model_id: str,
    windows: int,
    size: int,
) -> dict:
    """Windows of held-out sample texts (same distribution as training): every flag is a false alarm."""
    stable_params = params.model_copy(update={"quality_reference_split": "val"})
    reference = build_reference(predictor, prepared_dir, stable_params, model_id, cache_dir)
    pool = pd.read_parquet(prepared_dir / "test.parquet")
    predictions = predictor(pool["text"].astype(str).tolist())
    labels = load_params(REPO_ROOT / "params.yaml").data.labels
    rng = np.random.default_rng(params.reference_seed)
    per_window = []
    for index in tqdm(range(windows), desc="stable windows", unit="window"):
        rows = rng.choice(len(pool), size=min(size, len(pool)), replace=False)
        window = log_rows(
            pool["text"].iloc[rows].astype(str).tolist(),
            predictions.iloc[rows].reset_index(drop=True),
            pool["label"].iloc[rows].astype(str).tolist(),
            "old-prod",
        )
        summary = evaluate_window(window, reference, labels, stable_params).summary
        per_window.append(
            {
                "window": index,
                "drift_detected": summary["drift_detected"],
                "data_drifted_signals": summary["data_drift"]["drifted_signals"],
                "concept_drifted_signals": summary["concept_drift"]["drifted_signals"],
                "text_auc": summary["data_drift"]["signals"]["text"]["score"],
                "accuracy": summary["concept_drift"]["tests"]["accuracy"]["current"],
            }
        )
    return {
        "windows": windows,
        "window_size": size,
        "pool": f"{len(pool)} texts of the old model's test split (never trained on)",
        "quality_reference": "validation split",
        "false_alarms": sum(w["drift_detected"] for w in per_window),
        "per_window": per_window,
    }


def copy_project(target: Path) -> Path:
    """The committed tree (``git archive HEAD``): what a user clones, without anyone's local edits."""
    target.mkdir(parents=True)
    archive = target / "head.tar"
    subprocess.run(["git", "archive", "--format=tar", "-o", str(archive), "HEAD"], cwd=REPO_ROOT, check=True)
    with tarfile.open(archive) as tar:
        tar.extractall(target, filter="data")
    archive.unlink()
    for name in ("dvc.lock", "data/raw/intents.csv.dvc"):
        (target / name).unlink(missing_ok=True)
    for command in (["init", "-q"], ["add", "-A"], ["commit", "-qm", "copy"]):
        subprocess.run(["git", "-c", "user.name=t", "-c", "user.email=t@t", *command], cwd=target, check=True)
    return target


def score(predictor, frame: pd.DataFrame) -> dict:
    predicted = predictor(frame["text"].astype(str).tolist())["label"].astype(str)
    truth = frame["intent"].astype(str)
    return {
        "accuracy": float(accuracy_score(truth, predicted)),
        "macro_f1": float(f1_score(truth, predicted, average="macro", zero_division=0)),
        "n": len(frame),
    }


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("--old-adapter", type=Path, required=True)
    parser.add_argument(
        "--old-prepared", type=Path, required=True, help="the data/prepared the old model came from"
    )
    parser.add_argument("--work-dir", type=Path, default=None, help="default: a new folder under /tmp")
    parser.add_argument("--seed", type=int, default=42)
    parser.add_argument("--windows", type=int, default=20)
    parser.add_argument("--window-size", type=int, default=200)
    parser.add_argument("--output", type=Path, default=REPO_ROOT / "benchmarks/results/drift_retrain.json")
    args = parser.parse_args(argv)
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(levelname)s %(name)s: %(message)s")
    started = time.perf_counter()
    work = args.work_dir or Path(f"/tmp/tuneloop-drift-retrain-{datetime.now(UTC):%Y%m%d-%H%M%S}")
    home = work / "home"
    params = load_params(REPO_ROOT / "params.yaml")
    predictor = adapter_predictor(args.old_adapter)
    old_id = f"old-prod:{args.old_adapter}"
    cache = home / "monitoring" / "reference"

    stable = stable_false_alarms(
        predictor, args.old_prepared, params.monitoring, cache, old_id, args.windows, args.window_size
    )
    log.info("stable traffic: %d false alarms in %d windows", stable["false_alarms"], stable["windows"])

    drifted = pd.read_csv(REPO_ROOT / "data/sample/drifted.csv")
    feedback, held_out = train_test_split(
        drifted, test_size=0.5, random_state=args.seed, stratify=drifted["intent"]
    )
    project = copy_project(work / "project")
    env = Environment(
        project_dir=project,
        home_dir=home,
        tracking_uri=f"sqlite:///{home / 'mlflow.db'}",
        experiment_name="tuneloop",
        dvc_remote_url=str(work / "dvc-remote"),
    )
    project_params = load_params(project / "params.yaml")
    os.chdir(project)  # as `tuneloop init` runs: in the project folder
    init_project(
        project, project / "data/sample/intents.csv", Path(project_params.data.raw_path), env.dvc_remote_url
    )
    window = log_rows(
        feedback["text"].tolist(),
        predictor(feedback["text"].tolist()),
        feedback["intent"].tolist(),
        "old-prod",
    )
    reference = build_reference(predictor, args.old_prepared, params.monitoring, old_id, cache)
    outcome = run_monitor(window, window, reference, env, project / "params.yaml")
    log.info("decision: %s", outcome.decision)
    if not outcome.decision.retrain:
        raise SystemExit(f"the monitor did not decide to retrain: {outcome.decision.reasons}")

    training_log = work / "train.log"
    train_started = time.perf_counter()
    with training_log.open("w") as out:
        subprocess.run(
            [sys.executable, "-m", "dvc", "repro", "train"],
            cwd=project,
            env={
                **os.environ,
                "PATH": f"{Path(sys.executable).parent}{os.pathsep}{os.environ['PATH']}",
                "TUNELOOP_HOME": str(home),
                "TUNELOOP_DVC_REMOTE": env.dvc_remote_url,
                "MLFLOW_TRACKING_URI": env.tracking_uri,
            },
            stdout=out,
            stderr=subprocess.STDOUT,
            check=True,
        )
    train_seconds = time.perf_counter() - train_started
    new_predictor = adapter_predictor(project / "models/adapter")
    old_score, new_score = score(predictor, held_out), score(new_predictor, held_out)
    result = {
        "what": "drift -> feedback appended as a DVC version -> retrain -> old vs new on held-out drifted",
        "old_adapter": str(args.old_adapter),
        "work_dir": str(work),
        "split": {
            "feedback": len(feedback),
            "held_out": len(held_out),
            "seed": args.seed,
            "stratified_by": "intent",
        },
        "stable_traffic": stable,
        "drifted_window": {
            "summary": outcome.summary,
            "decision": outcome.as_dict()["decision"],
            "appended": outcome.as_dict()["appended"],
        },
        "retrain": {
            "command": "dvc repro train",
            "seconds": round(train_seconds, 1),
            "log": str(training_log),
        },
        "held_out_drifted": {"old_prod": old_score, "new": new_score},
        "total_seconds": round(time.perf_counter() - started, 1),
    }
    write_json(args.output, result)
    log.info(
        "old %.4f -> new %.4f accuracy on held-out drifted data", old_score["accuracy"], new_score["accuracy"]
    )


if __name__ == "__main__":
    main()
