"""Close the loop once, for real: drifted traffic -> drift detected -> feedback appended -> retrain.

    python -m benchmarks.drift_retrain --old-adapter /tmp/fresh/models/adapter \
        --old-prepared /tmp/fresh/data/prepared [--work-dir DIR] [--reuse-training]

1. Stable traffic, 20 windows of 200 sample texts with feedback, two ways: independent windows
   (the sample re-split with a new seed per window) and windows from the old model's own test
   split (a fixed 263-text pool, so the windows overlap). Every flag is a false alarm.
2. ``data/sample/drifted.csv`` split (stratified, seeded) into a feedback half and a held-out half.
   The held-out texts without labels: data drift, which alone only alerts.
3. The feedback half, predicted by the old model and labelled, through the monitor step in a
   throwaway copy of the project (``git archive HEAD``; the sample as raw data, a local DVC remote):
   drift, decision, the feedback appended as a new DVC data version.
4. ``dvc repro train`` retrains there with default params (the slow part: half an hour on a busy
   2-core CPU). ``--reuse-training`` keeps a finished run's data and model and recomputes the rest.
5. Old vs new accuracy and macro-F1 on the held-out drifted half, with McNemar's paired test.

Nothing under the repository's own data/ is touched. JSON: ``benchmarks/results/drift_retrain.json``.
"""

from __future__ import annotations

import argparse
import json
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
from statsmodels.stats.contingency_tables import mcnemar
from tqdm.auto import tqdm

from monitoring.monitor import (
    adapter_predictor,
    build_reference,
    evaluate_window,
    new_labelled_examples,
    run_monitor,
    should_retrain,
)
from pipelines.prepare import prepare, write_prepared
from tuneloop.config import Environment, MonitoringParams, load_params
from tuneloop.datastore import init_project
from tuneloop.io import write_json
from tuneloop.paths import HomePaths

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


def memoised(predictor):
    """The same predictions for a text every time, computed once: windows re-use the same texts."""
    seen: dict[str, tuple[str, float]] = {}

    def predict(texts):
        missing = [text for text in dict.fromkeys(texts) if text not in seen]
        if missing:
            fresh = predictor(missing)
            seen.update(zip(missing, zip(fresh["label"], fresh["score"], strict=True), strict=True))
        return pd.DataFrame([seen[text] for text in texts], columns=["label", "score"])

    return predict


def window_record(index: int, summary: dict) -> dict:
    return {
        "window": index,
        "drift_detected": summary["drift_detected"],
        "data_drifted_signals": summary["data_drift"]["drifted_signals"],
        "concept_drifted_signals": summary["concept_drift"]["drifted_signals"],
        "text_auc": summary["data_drift"]["signals"]["text"]["score"],
        "accuracy": summary["concept_drift"]["tests"]["accuracy"]["current"],
    }


def stable_fixed_pool(
    predictor,
    prepared_dir: Path,
    params: MonitoringParams,
    cache_dir: Path,
    model_id: str,
    windows: int,
    size: int,
) -> dict:
    """Windows drawn from the old model's own test split (never trained on) against its reference.

    With the default split that pool has 263 texts, so windows of 200 overlap heavily: this is
    close to one comparison repeated, reported beside the independent protocol below.
    """
    stable_params = params.model_copy(update={"quality_reference_splits": ("val",)})
    reference = build_reference(predictor, prepared_dir, stable_params, model_id, cache_dir)
    pool = pd.read_parquet(prepared_dir / "test.parquet")
    labels = load_params(REPO_ROOT / "params.yaml").data.labels
    rng = np.random.default_rng(params.reference_seed)
    per_window = []
    for index in tqdm(range(windows), desc="stable windows (fixed pool)", unit="window"):
        rows = pool.iloc[rng.choice(len(pool), size=min(size, len(pool)), replace=False)]
        texts = rows["text"].astype(str).tolist()
        window = log_rows(texts, predictor(texts), rows["label"].astype(str).tolist(), "old-prod")
        summary = evaluate_window(window, reference, labels, stable_params, quality_html=False).summary
        per_window.append(window_record(index, summary))
    return {
        "protocol": "fixed pool: the old model's test split; quality reference: its validation split",
        "pool_size": len(pool),
        "false_alarms": sum(w["drift_detected"] for w in per_window),
        "per_window": per_window,
    }


def stable_independent(
    predictor, params: MonitoringParams, work: Path, model_id: str, windows: int, size: int
) -> dict:
    """Each window re-splits the sample with a new seed (as tests/integration/test_monitor.py does).

    The reference (train texts, held-out predictions) and the window (other held-out texts) are a
    fresh exchangeable pair each time; the old model saw some of these texts, but the same share on
    both sides, so the comparison stays fair.
    """
    project_params = load_params(REPO_ROOT / "params.yaml")
    stable_params = params.model_copy(update={"quality_reference_splits": ("val",)})
    raw = REPO_ROOT / "data/sample/intents.csv"
    per_window = []
    for index in tqdm(range(windows), desc="stable windows (re-split)", unit="window"):
        split = project_params.prepare.model_copy(update={"test_fraction": 0.3, "seed": 1000 + index})
        prepared = work / "stable-splits" / str(index)
        write_prepared(prepare(raw, project_params.data, split), raw, prepared)
        reference = build_reference(predictor, prepared, stable_params, model_id, work / "stable-cache")
        rows = pd.read_parquet(prepared / "test.parquet").sample(size, random_state=index)
        texts = rows["text"].astype(str).tolist()
        window = log_rows(texts, predictor(texts), rows["label"].astype(str).tolist(), "old-prod")
        summary = evaluate_window(
            window, reference, project_params.data.labels, stable_params, quality_html=False
        )
        per_window.append(window_record(index, summary.summary))
    return {
        "protocol": "independent: the sample re-split per window (seed 1000+i, test_fraction 0.3)",
        "false_alarms": sum(w["drift_detected"] for w in per_window),
        "per_window": per_window,
    }


def scenario(summary: dict, decision) -> dict:
    data = summary["data_drift"]
    concept = summary.get("concept_drift")
    return {
        "drift_detected": summary["drift_detected"],
        "n_current": summary["n_current"],
        "n_labelled": summary["n_labelled"],
        "data_drift": {
            name: {"score": s["score"], "threshold": s["threshold"], "drifted": s["drifted"]}
            for name, s in data["signals"].items()
        },
        "concept_drift": None
        if not concept
        else {
            name: {k: t[k] for k in ("reference", "current", "drop", "p_value", "drifted")}
            for name, t in concept["tests"].items()
        },
        "decision": {"retrain": decision.retrain, "alert": decision.alert, "reasons": list(decision.reasons)},
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


def compare(old_predictor, new_predictor, frame: pd.DataFrame) -> dict:
    """Accuracy and macro-F1 of both models on the same texts, with McNemar's exact paired test."""
    truth = frame["intent"].astype(str).to_numpy()
    texts = frame["text"].astype(str).tolist()
    scores, correct = {}, {}
    for name, predictor in (("old_prod", old_predictor), ("new", new_predictor)):
        predicted = predictor(texts)["label"].astype(str).to_numpy()
        correct[name] = predicted == truth
        scores[name] = {
            "accuracy": float(accuracy_score(truth, predicted)),
            "macro_f1": float(f1_score(truth, predicted, average="macro", zero_division=0)),
            "n": len(frame),
        }
    only_new = int((correct["new"] & ~correct["old_prod"]).sum())
    only_old = int((correct["old_prod"] & ~correct["new"]).sum())
    table = [[0, only_old], [only_new, 0]]  # McNemar reads only the discordant cells
    scores["mcnemar"] = {
        "only_new_right": only_new,
        "only_old_right": only_old,
        "p_value": float(mcnemar(table, exact=True).pvalue),
    }
    return scores


def retrain(project: Path, env: Environment, work: Path) -> dict:
    """``dvc repro train`` in the project copy, as the training deployment would run it."""
    training_log = work / "train.log"
    started = time.perf_counter()
    with training_log.open("w") as out:
        subprocess.run(
            [sys.executable, "-m", "dvc", "repro", "train"],
            cwd=project,
            env={
                **os.environ,
                "PATH": f"{Path(sys.executable).parent}{os.pathsep}{os.environ['PATH']}",
                "TUNELOOP_HOME": str(env.home_dir),
                "TUNELOOP_DVC_REMOTE": env.dvc_remote_url,
                "MLFLOW_TRACKING_URI": env.tracking_uri,
            },
            stdout=out,
            stderr=subprocess.STDOUT,
            check=True,
        )
    return {
        "command": "dvc repro train",
        "seconds": round(time.perf_counter() - started, 1),
        "log": str(training_log),
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
    parser.add_argument(
        "--reuse-training",
        action="store_true",
        help="the work dir holds a finished run: recompute drift numbers, keep its appended data and model",
    )
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
    predictor = memoised(adapter_predictor(args.old_adapter))
    old_id = f"old-prod:{args.old_adapter}"
    cache = home / "monitoring" / "reference"
    labels = params.data.labels

    stable = {
        "windows": args.windows,
        "window_size": args.window_size,
        "independent": stable_independent(
            predictor, params.monitoring, work, old_id, args.windows, args.window_size
        ),
        "fixed_pool": stable_fixed_pool(
            predictor, args.old_prepared, params.monitoring, cache, old_id, args.windows, args.window_size
        ),
    }
    for name in ("independent", "fixed_pool"):
        log.info(
            "stable traffic (%s): %d false alarms in %d windows",
            name,
            stable[name]["false_alarms"],
            args.windows,
        )

    drifted = pd.read_csv(REPO_ROOT / "data/sample/drifted.csv")
    feedback, held_out = train_test_split(
        drifted, test_size=0.5, random_state=args.seed, stratify=drifted["intent"]
    )
    reference = build_reference(predictor, args.old_prepared, params.monitoring, old_id, cache)
    sample = pd.read_csv(REPO_ROOT / "data/sample/intents.csv")

    # Data drift without labels: the held-out drifted texts, no feedback. Alerts, does not retrain.
    unlabelled = log_rows(held_out["text"].tolist(), predictor(held_out["text"].tolist()), None, "old-prod")
    unlabelled_summary = evaluate_window(unlabelled, reference, labels, params.monitoring).summary
    data_only = scenario(
        unlabelled_summary, should_retrain(unlabelled_summary, 0, None, datetime.now(UTC), params.monitoring)
    )

    window = log_rows(
        feedback["text"].tolist(),
        predictor(feedback["text"].tolist()),
        feedback["intent"].tolist(),
        "old-prod",
    )
    project = work / "project"
    # The environment's defaults (ports, gateway URLs, ...), with everything stateful in the work folder.
    home_paths = HomePaths(home)
    env = Environment.from_env(project).model_copy(
        update={
            "home_dir": home,
            "tracking_uri": f"sqlite:///{home_paths.mlflow_db}",
            "experiment_name": "tuneloop",
            "dvc_remote_url": str(work / "dvc-remote"),
            "inference_log_url": f"sqlite:///{home_paths.inference_log_db}",
            "api_keys_path": home_paths.api_keys,
        }
    )
    previous = json.loads(args.output.read_text()) if args.output.exists() else {}
    if args.reuse_training:
        if not (project / "models/adapter").exists() or "retrain" not in previous:
            raise SystemExit(f"--reuse-training: no finished run in {work} / {args.output}")
        summary = evaluate_window(window, reference, labels, params.monitoring).summary
        new_examples = new_labelled_examples(window, sample, params.data)
        decision = should_retrain(summary, len(new_examples), None, datetime.now(UTC), params.monitoring)
        appended, training = previous["concept_and_data_drift"]["appended"], previous["retrain"]
    else:
        copy_project(project)
        project_params = load_params(project / "params.yaml")
        os.chdir(project)  # as `tuneloop init` runs: in the project folder
        init_project(
            project,
            project / "data/sample/intents.csv",
            Path(project_params.data.raw_path),
            env.dvc_remote_url,
        )
        outcome = run_monitor(window, window, reference, env, project / "params.yaml")
        summary, decision = outcome.summary, outcome.decision
        appended = outcome.as_dict()["appended"]
        if not decision.retrain:
            raise SystemExit(f"the monitor did not decide to retrain: {decision.reasons}")
        training = retrain(project, env, work)
    if not decision.retrain:
        raise SystemExit(f"the monitor does not decide to retrain: {decision.reasons}")
    new_predictor = adapter_predictor(project / "models/adapter")
    held_out_scores = compare(predictor, new_predictor, held_out)
    old_score, new_score = held_out_scores["old_prod"], held_out_scores["new"]
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
        "data_drift_only": data_only,
        "concept_and_data_drift": {**scenario(summary, decision), "appended": appended},
        "retrain": training,
        "held_out_drifted": held_out_scores,
        "total_seconds": round(time.perf_counter() - started, 1),
    }
    write_json(args.output, result)
    log.info(
        "old %.4f -> new %.4f accuracy on held-out drifted data", old_score["accuracy"], new_score["accuracy"]
    )


if __name__ == "__main__":
    main()
