"""`monitor` step: a window of the inference log -> drift result -> MLflow -> retraining decision.

Plain functions with typed inputs; the Prefect flow (``flows/monitor_drift.py``) and ``main()`` are
thin adapters. What it writes: the Evidently HTML reports and the JSON summary to MLflow (experiment
``monitoring``), the latest summary to ``<TUNELOOP_HOME>/monitoring/latest.json`` (read by the
gateway's ``/metrics`` through :class:`serving.metrics.DriftGaugeCollector`), and, when retraining is
decided, the labelled feedback appended to the raw data as a new DVC data version whose ``.dvc`` pointer
is committed to git (``monitoring.data_branch``), so that the training it triggers has a clean lineage.
"""

from __future__ import annotations

import hashlib
import json
import logging
import os
import tempfile
from collections import Counter
from collections.abc import Callable, Sequence
from dataclasses import asdict, dataclass, field
from datetime import UTC, datetime, timedelta
from pathlib import Path
from typing import Any

import pandas as pd

from evaluation.drift import PREDICTED, TEXT, TRUE_LABEL, DriftResult, detect_drift, document_frequencies
from serving.metrics import write_drift_summary
from tuneloop.config import DataParams, Environment, MonitoringParams, load_params
from tuneloop.datastore import add_and_push, check_data_commit, commit_data_version, tracked_md5, write_table
from tuneloop.io import file_md5, read_json, read_table, write_json
from tuneloop.text import fold_text, normalise_whitespace

log = logging.getLogger(__name__)

MONITORING_EXPERIMENT = "monitoring"
LOG_COLUMNS = ("request_id", "item_index", "created_at", "model_name", "model_version", "text", "label")
# texts -> frame with `label` and `score`, one row per text, in order.
Predictor = Callable[[Sequence[str]], pd.DataFrame]


def read_log(db_url: str, *, last_n: int | None = None, since: datetime | None = None) -> pd.DataFrame:
    """Rows of the gateway's inference log (``serving.inference_log.read_window``)."""
    from serving.inference_log import read_window

    return read_window(db_url, last_n=last_n, since=since)


def labelled_rows(db_url: str, since: datetime) -> pd.DataFrame:
    """Predictions made since ``since`` that have feedback: the candidates for the next data version."""
    rows = read_log(db_url, since=since)
    return rows[rows[TRUE_LABEL].notna()].reset_index(drop=True)


def latest_version_rows(window: pd.DataFrame) -> pd.DataFrame:
    """The rows answered by the newest model version in the window.

    Right after a promotion a window mixes two models; comparing that mix with one model's reference
    would report the swap as drift.
    """
    if "model_version" not in window.columns or window["model_version"].nunique(dropna=False) <= 1:
        return window
    ordered = window.sort_values("created_at") if "created_at" in window.columns else window
    newest = ordered["model_version"].iloc[-1]
    return window[window["model_version"] == newest]


# ---------------------------------------------------------------------------------------------- reference


@dataclass
class Reference:
    """What a window is compared with, for one model version.

    ``frame``: a seeded sample of the train split (text and descriptor drift), with the model's
    predictions kept for the record.
    ``quality``: a labelled held-out split with the model's predictions: the reference quality
    (concept drift) and the reference predicted-label distribution (see ``evaluation.drift.data_drift``).
    ``vocabulary``: document frequencies of the whole train split (out-of-vocabulary share).
    """

    frame: pd.DataFrame
    quality: pd.DataFrame
    vocabulary: Counter
    key: str


def adapter_predictor(adapter_dir: Path, batch_size: int = 64) -> Predictor:
    """Predictions of a local adapter folder (``models/adapter``) through :class:`IntentClassifier`."""
    from serving.inference import IntentClassifier

    classifier = IntentClassifier.load(adapter_dir)

    def predict(texts: Sequence[str]) -> pd.DataFrame:
        results = classifier.predict(list(texts), top_k=1, batch_size=batch_size)
        return pd.DataFrame({"label": [r["label"] for r in results], "score": [r["score"] for r in results]})

    return predict


def registry_predictor(model_uri: str, tracking_uri: str) -> Predictor:
    """Predictions of a registered pyfunc (``models:/<name>/<version>`` or ``@alias``) in that registry."""
    import mlflow

    # Downloaded with this registry named, never through mlflow.set_registry_uri: that is process-global
    # and exported to every child process, so a later step would register in this registry.
    download = tempfile.TemporaryDirectory(prefix="tuneloop-monitor-model-")
    local = mlflow.artifacts.download_artifacts(
        artifact_uri=model_uri, dst_path=download.name, tracking_uri=tracking_uri, registry_uri=tracking_uri
    )
    model = mlflow.pyfunc.load_model(local)

    def predict(texts: Sequence[str], _keep=download) -> pd.DataFrame:
        return model.predict(pd.DataFrame({"text": list(texts)}))[["label", "score"]]

    return predict


def reference_key(model_id: str, prepared_dir: Path, params: MonitoringParams) -> str:
    """Cache key: model identity, train data content and the reference settings."""
    parts = [
        model_id,
        file_md5(prepared_dir / "train.parquet"),
        file_md5(prepared_dir / f"{params.quality_reference_split}.parquet"),
        str(params.reference_size),
        str(params.reference_seed),
    ]
    return hashlib.sha256("|".join(parts).encode()).hexdigest()[:16]


def build_reference(
    predictor: Predictor,
    prepared_dir: Path,
    params: MonitoringParams,
    model_id: str,
    cache_dir: Path,
    *,
    phone_region: str = "US",
) -> Reference:
    """Reference frames with the model's predictions, cached per model version and data version.

    Texts (and the vocabulary) are PII-masked as the gateway masks the inference log, with the same
    ``phone_region`` (``gateway.pii_phone_region``), so that placeholders never read as drift. The
    model still predicts on the texts as written, as it did on the logged traffic.
    """
    from serving.pii import PiiMasker

    masker = PiiMasker(phone_region=phone_region)

    def masked(frame: pd.DataFrame) -> pd.DataFrame:
        # Masking is idempotent, so frames cached before texts were masked come out as new ones do.
        return frame.assign(**{TEXT: [masker.mask(text) for text in frame[TEXT].astype(str)]})

    key = reference_key(model_id, prepared_dir, params)
    folder = cache_dir / key
    train = pd.read_parquet(prepared_dir / "train.parquet")
    vocabulary = document_frequencies(masker.mask(text) for text in train["text"].astype(str))
    if (folder / "reference.parquet").exists() and (folder / "quality.parquet").exists():
        log.info("reference for %s from cache %s", model_id, folder)
        return Reference(
            masked(pd.read_parquet(folder / "reference.parquet")),
            masked(pd.read_parquet(folder / "quality.parquet")),
            vocabulary,
            key,
        )
    sample = train.sample(n=min(params.reference_size, len(train)), random_state=params.reference_seed)
    quality = pd.read_parquet(prepared_dir / f"{params.quality_reference_split}.parquet")
    frames = []
    for part in (sample, quality):
        predicted = predictor(part["text"].astype(str).tolist())
        frames.append(
            pd.DataFrame(
                {
                    TEXT: [masker.mask(text) for text in part["text"].astype(str)],
                    PREDICTED: predicted["label"].astype(str).to_numpy(),
                    "score": predicted["score"].astype(float).to_numpy(),
                    TRUE_LABEL: part["label"].astype(str).to_numpy(),
                }
            )
        )
    folder.mkdir(parents=True, exist_ok=True)
    frames[0].to_parquet(folder / "reference.parquet", index=False)
    frames[1].to_parquet(folder / "quality.parquet", index=False)
    write_json(
        folder / "meta.json", {"model": model_id, "prepared_dir": str(prepared_dir), **params.model_dump()}
    )
    return Reference(frames[0], frames[1], vocabulary, key)


# ------------------------------------------------------------------------------------------- decision


@dataclass(frozen=True)
class Decision:
    """What the job does with a drift result: alert people, retrain, or neither, and why."""

    retrain: bool
    alert: bool
    reasons: tuple[str, ...]


def should_retrain(
    summary: dict[str, Any],
    new_labelled: int,
    last_trigger_at: datetime | None,
    now: datetime,
    params: MonitoringParams,
) -> Decision:
    """Retrain on concept drift (or data drift when configured), with enough new labels, out of cool-down.

    Data drift without labels only alerts by default: a shift in wording that the model still
    handles is not worth a training run, and there are no labels to train on anyway.
    """
    data = bool(summary["data_drift"]["detected"])
    concept = bool(summary.get("concept_drift") and summary["concept_drift"]["detected"])
    reasons: list[str] = []
    if data:
        reasons.append("data drift in " + ", ".join(summary["data_drift"]["drifted_signals"]))
    if concept:
        reasons.append("concept drift in " + ", ".join(summary["concept_drift"]["drifted_signals"]))
    if not (data or concept):
        return Decision(False, False, ("no drift",))
    wants_retrain = concept or (data and params.retrain_on_data_drift)
    if not wants_retrain:
        reasons.append("data drift alone only alerts (monitoring.retrain_on_data_drift is false)")
        return Decision(False, True, tuple(reasons))
    if new_labelled < params.min_labelled_examples:
        reasons.append(
            f"only {new_labelled} new labelled examples, fewer than monitoring.min_labelled_examples "
            f"({params.min_labelled_examples})"
        )
        return Decision(False, True, tuple(reasons))
    if last_trigger_at is not None:
        cool_down_ends = last_trigger_at + timedelta(hours=params.cooldown_hours)
        if now < cool_down_ends:
            reasons.append(f"in cool-down until {cool_down_ends.isoformat()} (monitoring.cooldown_hours)")
            return Decision(False, True, tuple(reasons))
    reasons.append(f"{new_labelled} new labelled examples")
    return Decision(True, True, tuple(reasons))


# ------------------------------------------------------------------------------------------- feedback


def new_labelled_examples(labelled_log: pd.DataFrame, raw: pd.DataFrame, data: DataParams) -> pd.DataFrame:
    """Labelled log rows whose text is not in the raw data yet, as ``text``/``label`` (latest label wins).

    Texts are compared case- and punctuation-folded, as `validate` does for duplicates.
    """
    rows = labelled_log[labelled_log[TRUE_LABEL].notna()]
    rows = pd.DataFrame(
        {
            "text": normalise_whitespace(rows[TEXT].astype("string")),
            "label": rows[TRUE_LABEL].astype("string"),
        }
    ).dropna()
    rows = rows[rows["text"].str.len() > 0]
    known = set(fold_text(normalise_whitespace(raw[data.text_column].astype("string"))).dropna())
    rows = rows[~fold_text(rows["text"]).isin(known)]
    return rows.drop_duplicates(subset="text", keep="last").reset_index(drop=True)


@dataclass(frozen=True)
class AppendResult:
    raw_path: Path
    rows_added: int
    rejected_labels: dict[str, int]
    md5: str | None
    pushed_files: int
    # The git commit of the new data version's pointer and its branch (None: nothing committed,
    # e.g. no rows appended or the project is not a git work tree).
    data_commit: str | None = None
    data_branch: str | None = None
    md5_before: str | None = None


def data_commit_message(
    raw_path: str,
    rows: int,
    reasons: Sequence[str],
    md5_before: str | None,
    md5: str | None,
    rejected: dict[str, int],
    pushed: int,
) -> str:
    """Why this data version exists: the subject says what and why, the body the version's facts."""
    why = f" ({'; '.join(reasons)})" if reasons else ""
    lines = [
        f"drift monitor appended {rows} labelled feedback rows{why} -> data md5 {md5}",
        "",
        f"Data version of {raw_path}: md5 {md5_before} -> {md5}; {pushed} file(s) pushed to the DVC remote.",
        "Committed by tuneloop's drift monitor (monitoring/monitor.py): only the data's pointer changed.",
    ]
    if rejected:
        lines.append(f"Feedback with labels outside data.labels, not appended: {rejected}")
    return "\n".join(lines) + "\n"


def append_feedback(
    project_dir: Path,
    raw_path: Path,
    examples: pd.DataFrame,
    data: DataParams,
    group_value: str,
    *,
    data_branch: str | None = None,
    reasons: Sequence[str] = (),
) -> AppendResult:
    """Append labelled feedback to the raw data in its own columns, ``dvc add`` + push it, commit it.

    Labels outside ``data.labels`` are not appended (validate would reject the whole data version);
    they are counted in ``rejected_labels`` so that nobody loses sight of them. The new ``.dvc``
    pointer (and the data folder's .gitignore, when DVC changed it) is committed to git, alone, on
    ``data_branch`` (None: the checked-out branch), with a message that says why
    (``tuneloop.datastore.commit_data_version``). Whether that commit is safe is checked before
    anything is written: a refusal (``DataCommitRefused``) leaves the data as it was.
    """
    raw_file = raw_path if raw_path.is_absolute() else project_dir / raw_path
    pointer = raw_file.with_name(raw_file.name + ".dvc")
    ignore_file = raw_file.parent / ".gitignore"
    raw = read_table(raw_file)
    known = examples["label"].isin(set(data.labels))
    rejected = examples.loc[~known, "label"].value_counts().to_dict()
    if rejected:
        log.warning("feedback labels not in data.labels were not appended: %s", rejected)
    kept = examples[known]
    md5_before = tracked_md5(pointer)
    if kept.empty:
        return AppendResult(raw_file, 0, rejected, md5_before, 0, md5_before=md5_before)
    check_data_commit(project_dir, [pointer, ignore_file], data_branch)
    ignores_before = ignore_file.read_bytes() if ignore_file.exists() else None
    addition = pd.DataFrame(
        {column: pd.Series(dtype="string") for column in raw.columns}, index=range(len(kept))
    )
    addition[data.text_column] = kept["text"].to_numpy()
    addition[data.label_column] = kept["label"].to_numpy()
    for column in data.group_columns:
        if column in addition.columns:
            addition[column] = group_value
    write_table(pd.concat([raw, addition], ignore_index=True), raw_file)
    # Absolute: DVC resolves a relative target against the process's working folder, not the repo.
    pushed = add_and_push(project_dir, raw_file.resolve())
    md5 = tracked_md5(pointer)
    log.info("appended %d feedback rows to %s: data version md5 %s", len(kept), raw_file, md5)
    to_commit = [pointer]
    if ignore_file.exists() and ignore_file.read_bytes() != ignores_before:
        to_commit.append(ignore_file)
    shown = Path(os.path.relpath(raw_file.resolve(), Path(project_dir).resolve())).as_posix()
    message = data_commit_message(shown, len(kept), reasons, md5_before, md5, rejected, pushed)
    commit = commit_data_version(project_dir, to_commit, message, data_branch)
    return AppendResult(
        raw_file,
        len(kept),
        rejected,
        md5,
        pushed,
        data_commit=commit.sha if commit else None,
        data_branch=commit.branch if commit else None,
        md5_before=md5_before,
    )


# ----------------------------------------------------------------------------------- state and outputs


def read_state(path: Path) -> dict[str, Any]:
    return read_json(path) if path.exists() else {}


def last_trigger_time(state: dict[str, Any]) -> datetime | None:
    value = state.get("last_trigger_at")
    return datetime.fromisoformat(value) if value else None


def record_trigger(
    path: Path, now: datetime, reasons: Sequence[str], data_md5: str | None, data_commit: str | None = None
) -> None:
    state = read_state(path)
    state.update(
        last_trigger_at=now.isoformat(),
        last_trigger_reasons=list(reasons),
        last_data_md5=data_md5,
        last_data_commit=data_commit,
    )
    write_json(path, state)


def log_to_mlflow(result: DriftResult, env: Environment, tags: dict[str, str]) -> str:
    """Log the reports and summary as a run of the ``monitoring`` experiment; returns the run id."""
    import mlflow

    from tuneloop.tracking import use_experiment

    use_experiment(env.model_copy(update={"experiment_name": MONITORING_EXPERIMENT}))
    with mlflow.start_run(run_name="drift", tags=tags) as run, tempfile.TemporaryDirectory() as folder:
        mlflow.log_metrics(flat_metrics(result.summary))
        mlflow.log_dict(result.summary, "drift/summary.json")
        for name, report in (
            ("text_drift", result.data_report),
            ("prediction_drift", result.prediction_report),
        ):
            report.save_html(str(Path(folder) / f"{name}.html"))
            mlflow.log_artifact(str(Path(folder) / f"{name}.html"), "drift")
        if result.quality_report is not None:
            result.quality_report.save_html(str(Path(folder) / "quality.html"))
            mlflow.log_artifact(str(Path(folder) / "quality.html"), "drift")
        return run.info.run_id


def log_decision_to_mlflow(
    run_id: str, decision: Decision, appended: AppendResult | None, env: Environment
) -> None:
    """Add what the job decided and did to its MLflow run: tags and ``drift/decision.json``.

    Tags ``tuneloop.decision`` (retrain / alert / none) and, after an append, ``tuneloop.data_md5``,
    ``tuneloop.data_commit`` (the git commit of the new data version) and ``tuneloop.rows_appended``.
    """
    from mlflow.tracking import MlflowClient

    client = MlflowClient(env.tracking_uri)
    verdict = "retrain" if decision.retrain else "alert" if decision.alert else "none"
    tags = {"tuneloop.decision": verdict}
    if appended is not None:
        tags.update(
            {
                "tuneloop.data_md5": str(appended.md5),
                "tuneloop.data_commit": appended.data_commit or "not committed",
                "tuneloop.rows_appended": str(appended.rows_added),
            }
        )
    for key, value in tags.items():
        client.set_tag(run_id, key, value)
    record = {"decision": asdict(decision), "appended": asdict(appended) if appended else None}
    client.log_dict(run_id, json.loads(json.dumps(record, default=str)), "drift/decision.json")


def flat_metrics(summary: dict[str, Any]) -> dict[str, float]:
    """Namespaced numbers for MLflow and Prometheus: ``drift/<signal>_score``, ``concept/<metric>_*``."""
    data = summary["data_drift"]
    metrics = {
        "drift/detected": float(summary["drift_detected"]),
        "drift/data_detected": float(data["detected"]),
        "drift/share_drifted": float(data["share_drifted"]),
        "drift/n_current": float(summary["n_current"]),
        "drift/n_labelled": float(summary["n_labelled"]),
    }
    for name, signal in data["signals"].items():
        if signal["score"] is not None:
            metrics[f"drift/{name}_score"] = float(signal["score"])
        metrics[f"drift/{name}_drifted"] = float(signal["drifted"])
    concept = summary.get("concept_drift")
    if concept:
        metrics["concept/detected"] = float(concept["detected"])
        for name, test in concept["tests"].items():
            for key in ("reference", "current", "drop", "p_value"):
                metrics[f"concept/{name}_{key}"] = float(test[key])
    return metrics


# ---------------------------------------------------------------------------------------------- the step


@dataclass
class MonitorOutcome:
    summary: dict[str, Any]
    decision: Decision
    mlflow_run_id: str | None
    appended: AppendResult | None = None
    notes: list[str] = field(default_factory=list)

    def as_dict(self) -> dict[str, Any]:
        return {
            "summary": self.summary,
            "decision": asdict(self.decision),
            "mlflow_run_id": self.mlflow_run_id,
            "appended": asdict(self.appended) if self.appended else None,
            "notes": self.notes,
        }


def evaluate_window(
    window: pd.DataFrame,
    reference: Reference,
    labels: Sequence[str],
    params: MonitoringParams,
    quality_html: bool = True,
) -> DriftResult:
    """Drift of one window against a reference; the summary says which model and data it concerns."""
    window = latest_version_rows(window)
    result = detect_drift(
        reference.frame, reference.quality, window, reference.vocabulary, labels, params, quality_html
    )
    for column in ("model_name", "model_version"):
        if column in window.columns and len(window):
            result.summary[column] = str(window[column].iloc[-1])
    if "created_at" in window.columns and len(window):
        result.summary["window_start"] = str(pd.to_datetime(window["created_at"]).min())
        result.summary["window_end"] = str(pd.to_datetime(window["created_at"]).max())
    result.summary["reference_key"] = reference.key
    result.summary["finished_at"] = datetime.now(UTC).isoformat()
    return result


def decide_and_append(
    summary: dict[str, Any],
    labelled_log: pd.DataFrame,
    project_dir: Path,
    data: DataParams,
    params: MonitoringParams,
    state_path: Path,
    now: datetime,
) -> tuple[Decision, AppendResult | None]:
    """Decide; on retrain, append the new labelled examples as a committed DVC data version (see
    :func:`append_feedback`) and start the cool-down."""
    raw = read_table(project_dir / data.raw_path)
    examples = new_labelled_examples(labelled_log, raw, data)
    decision = should_retrain(summary, len(examples), last_trigger_time(read_state(state_path)), now, params)
    if not decision.retrain:
        return decision, None
    appended = append_feedback(
        project_dir,
        Path(data.raw_path),
        examples,
        data,
        params.feedback_group_value,
        data_branch=params.data_branch,
        reasons=decision.reasons,
    )
    record_trigger(state_path, now, decision.reasons, appended.md5, appended.data_commit)
    return decision, appended


def model_identity(
    model_uri: str | None, adapter_dir: Path | None, tracking_uri: str
) -> tuple[str, Predictor]:
    """A cache identity and a predictor for a registered model URI or a local adapter folder."""
    if adapter_dir is not None:
        weights = sorted(adapter_dir.glob("*.safetensors")) or sorted(adapter_dir.glob("*.bin"))
        if not weights:
            raise FileNotFoundError(f"{adapter_dir} holds no adapter weights (*.safetensors / *.bin)")
        return f"adapter:{file_md5(weights[0])}", adapter_predictor(adapter_dir)
    if not model_uri:
        raise ValueError("give a registered model URI or a local adapter folder")
    return model_uri, registry_predictor(model_uri, tracking_uri)


def window_model_uri(window: pd.DataFrame, model_name: str, alias: str = "prod") -> str:
    """The registered version that answered the window's newest rows, else the alias."""
    if "model_version" in window.columns and window["model_version"].notna().any():
        newest = latest_version_rows(window)
        name = str(newest["model_name"].iloc[-1]) if "model_name" in newest.columns else model_name
        return f"models:/{name}/{newest['model_version'].iloc[-1]}"
    return f"models:/{model_name}@{alias}"


def run_monitor(
    window: pd.DataFrame,
    labelled_log: pd.DataFrame,
    reference: Reference,
    env: Environment,
    params_path: Path,
    *,
    append: bool = True,
    log_mlflow: bool = True,
    now: datetime | None = None,
) -> MonitorOutcome:
    """The whole step for inputs already loaded: drift, MLflow, latest.json, decision, feedback append."""
    params = load_params(params_path)
    now = now or datetime.now(UTC)
    result = evaluate_window(window, reference, params.data.labels, params.monitoring)
    run_id = None
    if log_mlflow:
        run_id = log_to_mlflow(result, env, {"model_version": str(result.summary.get("model_version", ""))})
        result.summary["mlflow_run_id"] = run_id
    write_drift_summary(result.summary, env.paths.drift_summary)
    state_path = env.paths.monitor_state
    if append:
        decision, appended = decide_and_append(
            result.summary, labelled_log, env.project_dir, params.data, params.monitoring, state_path, now
        )
    else:
        raw = read_table(env.project_dir / params.data.raw_path)
        examples = new_labelled_examples(labelled_log, raw, params.data)
        decision = should_retrain(
            result.summary, len(examples), last_trigger_time(read_state(state_path)), now, params.monitoring
        )
        appended = None
    if run_id is not None:
        log_decision_to_mlflow(run_id, decision, appended, env)
    log.info(
        "drift decision: %s (%s)",
        "retrain" if decision.retrain else "no retrain",
        "; ".join(decision.reasons),
    )
    return MonitorOutcome(result.summary, decision, run_id, appended)


@dataclass(frozen=True)
class NotEnoughTraffic:
    """The window held fewer predictions than ``monitoring.min_window_size``: nothing was judged."""

    n_current: int

    def as_dict(self) -> dict[str, Any]:
        return {"skipped": "not enough traffic", "n_current": self.n_current}


def monitor_once(
    env: Environment,
    params_path: Path,
    prepared_dir: Path,
    *,
    model_uri: str | None = None,
    adapter_dir: Path | None = None,
    append: bool = True,
    now: datetime | None = None,
) -> MonitorOutcome | NotEnoughTraffic:
    """One drift check, the step behind `tuneloop monitor` and the `monitor-drift` flow.

    Reads the newest window and the recent feedback from the inference log, builds (or reuses) the
    reference with the model that answered the window (or ``model_uri`` / ``adapter_dir``), then runs
    :func:`run_monitor`.
    """
    params = load_params(params_path)
    window = read_log(env.inference_log_url, last_n=params.monitoring.window_size)
    if len(latest_version_rows(window)) < params.monitoring.min_window_size:
        log.info(
            "%d predictions in the log, fewer than monitoring.min_window_size (%d): nothing to judge yet",
            len(window),
            params.monitoring.min_window_size,
        )
        return NotEnoughTraffic(len(window))
    lookback = timedelta(hours=params.monitoring.feedback_lookback_hours)
    from serving.inference_log import cap_feedback_share

    labelled_log = cap_feedback_share(
        labelled_rows(env.inference_log_url, (now or datetime.now(UTC)) - lookback),
        params.monitoring.max_feedback_share_per_principal,
    )
    uri = None if adapter_dir else (model_uri or window_model_uri(window, params.registry.model_name))
    model_id, predictor = model_identity(uri, adapter_dir, env.tracking_uri)
    reference = build_reference(
        predictor,
        Path(prepared_dir),
        params.monitoring,
        model_id,
        env.paths.reference_cache,
        phone_region=params.gateway.pii_phone_region,
    )
    return run_monitor(window, labelled_log, reference, env, Path(params_path), append=append, now=now)
