"""`monitor` step: a window of the inference log -> drift result -> MLflow -> retraining decision.

Plain functions with typed inputs; the Prefect flow (``flows/monitor_drift.py``) and ``main()`` are
thin adapters. What it writes: the Evidently HTML reports and the JSON summary to MLflow (experiment
``monitoring``), the latest summary to ``<TUNELOOP_HOME>/monitoring/latest.json`` (read by the
gateway's ``/metrics`` through :class:`serving.metrics.DriftGaugeCollector`), and, when retraining is
decided, the labelled feedback appended to the raw data as a new DVC data version whose ``.dvc`` pointer
is committed to git (``monitoring.data_branch``), so that the training it triggers has a clean lineage.

With ``task: generation`` the window is the newest logged generations (:func:`monitor_generation_once`):
prompt text drift against the train split's messages, output-validity drift against the model's own
answers on held-out messages, a report of the callers' feedback; the decision only alerts
(:func:`generation_decision`).
"""

from __future__ import annotations

import functools
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

from evaluation.drift import (
    GENERATED,
    PREDICTED,
    SCORE,
    TEXT,
    TRUE_LABEL,
    VALID,
    DriftResult,
    answers_frame,
    detect_drift,
    document_frequencies,
    generation_drift,
    held_out_answers,
    held_out_splits,
    output_validity,
)
from serving.metrics import write_drift_summary
from tuneloop.config import DataParams, Environment, MonitoringParams, load_params
from tuneloop.datastore import add_and_push, check_data_commit, commit_data_version, tracked_md5, write_table
from tuneloop.io import file_md5, read_json, read_table, write_json
from tuneloop.paths import HELD_OUT_ARTIFACT
from tuneloop.text import fold_text, normalise_whitespace

log = logging.getLogger(__name__)

MONITORING_EXPERIMENT = "monitoring"
LOG_COLUMNS = ("request_id", "item_index", "created_at", "model_name", "model_version", "text", "label")
# texts -> frame with `label` and `score`, one row per text, in order.
Predictor = Callable[[Sequence[str]], pd.DataFrame]
# messages -> frame with `generated` (the model's answer), one row per message, in order.
Generator = Callable[[Sequence[str]], pd.DataFrame]


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
    ``quality``: the labelled held-out splits (``monitoring.quality_reference_splits``, never trained
    on) with the model's predictions and confidences: the reference quality (concept drift), the
    reference predicted-label distribution (see ``evaluation.drift.data_drift``) and the calibration of
    the accuracy estimate (CBPE).
    ``vocabulary``: document frequencies of the whole train split (out-of-vocabulary share).
    """

    frame: pd.DataFrame
    quality: pd.DataFrame
    vocabulary: Counter
    key: str


def adapter_predictor(adapter_dir: Path, batch_size: int = 64) -> Predictor:
    """Predictions of a local adapter folder (``models/adapter``) through :class:`IntentClassifier`."""
    from serving.inference import IntentClassifier

    return functools.partial(IntentClassifier.load(adapter_dir).answers, batch_size=batch_size)


def _registered_pyfunc(model_uri: str, tracking_uri: str) -> tuple[Any, tempfile.TemporaryDirectory]:
    """A registered pyfunc loaded from that registry, and the folder it was downloaded to (keep it)."""
    import mlflow

    # Downloaded with this registry named, never through mlflow.set_registry_uri: that is process-global
    # and exported to every child process, so a later step would register in this registry.
    download = tempfile.TemporaryDirectory(prefix="tuneloop-monitor-model-")
    local = mlflow.artifacts.download_artifacts(
        artifact_uri=model_uri, dst_path=download.name, tracking_uri=tracking_uri, registry_uri=tracking_uri
    )
    return mlflow.pyfunc.load_model(local), download


def registry_predictor(model_uri: str, tracking_uri: str) -> Predictor:
    """Predictions of a registered pyfunc (``models:/<name>/<version>`` or ``@alias``) in that registry."""
    model, download = _registered_pyfunc(model_uri, tracking_uri)

    def predict(texts: Sequence[str], _keep=download) -> pd.DataFrame:
        return model.predict(pd.DataFrame({"text": list(texts)}))[["label", "score"]]

    return predict


def adapter_generator(adapter_dir: Path, batch_size: int = 16) -> Generator:
    """Answers of a local generation adapter (or merged) folder through :class:`TextGenerator`."""
    from serving.generation import TextGenerator

    generator = TextGenerator.load(adapter_dir)

    def generate(messages: Sequence[str]) -> pd.DataFrame:
        answers = generator.generate(list(messages), batch_size=batch_size)
        return pd.DataFrame({GENERATED: [answer.text for answer in answers]})

    return generate


def registry_generator(model_uri: str, tracking_uri: str) -> Generator:
    """Answers of a registered generation pyfunc (``serving.pyfunc_model.GenerationPyfunc``)."""
    model, download = _registered_pyfunc(model_uri, tracking_uri)

    def generate(messages: Sequence[str], _keep=download) -> pd.DataFrame:
        return model.predict(pd.DataFrame({"text": list(messages)}))[[GENERATED]]

    return generate


def reference_key(model_id: str, prepared_dir: Path, params: MonitoringParams) -> str:
    """Cache key: model identity, train data content and the reference settings."""
    parts = [
        model_id,
        file_md5(prepared_dir / "train.parquet"),
        *(file_md5(prepared_dir / f"{split}.parquet") for split in params.quality_reference_splits),
        str(params.reference_size),
        str(params.reference_seed),
    ]
    return hashlib.sha256("|".join(parts).encode()).hexdigest()[:16]


def recorded_held_out_answers(model_uri: str, tracking_uri: str) -> pd.DataFrame | None:
    """The held-out answers recorded at registration for a registered version, else None.

    ``model_uri``: ``models:/<name>/<version>`` or ``models:/<name>@<alias>``. None for versions
    registered before answers were recorded (the monitor then predicts the held-out splits itself).
    """
    import mlflow
    from mlflow.exceptions import MlflowException
    from mlflow.tracking import MlflowClient

    if not model_uri.startswith("models:/"):
        return None
    client = MlflowClient(tracking_uri=tracking_uri, registry_uri=tracking_uri)
    name_and_version = model_uri.removeprefix("models:/")
    try:
        if "@" in name_and_version:
            name, alias = name_and_version.split("@", 1)
            version = client.get_model_version_by_alias(name, alias)
        else:
            name, number = name_and_version.rsplit("/", 1)
            version = client.get_model_version(name, number)
        with tempfile.TemporaryDirectory(prefix="tuneloop-held-out-") as folder:
            local = mlflow.artifacts.download_artifacts(
                run_id=version.run_id,
                artifact_path=HELD_OUT_ARTIFACT,
                dst_path=folder,
                tracking_uri=tracking_uri,
            )
            return pd.read_parquet(local)
    except (MlflowException, OSError) as error:
        log.info("no held-out answers recorded for %s (%s): predicting the held-out splits", model_uri, error)
        return None


def build_reference(
    predictor: Predictor,
    prepared_dir: Path,
    params: MonitoringParams,
    model_id: str,
    cache_dir: Path,
    *,
    phone_region: str = "US",
    held_out: pd.DataFrame | None = None,
) -> Reference:
    """Reference frames with the model's predictions, cached per model version and data version.

    ``held_out``: the answers recorded at registration (:func:`recorded_held_out_answers`); None:
    the model answers ``monitoring.quality_reference_splits`` of ``prepared_dir`` now.

    Texts (and the vocabulary) are PII-masked as the gateway masks the inference log, with the same
    ``phone_region`` (``gateway.pii_phone_region``), so that placeholders never read as drift. The
    model still predicts on the texts as written, as it did on the logged traffic.
    """
    from serving.pii import PiiMasker

    masker = PiiMasker(phone_region=phone_region)

    def masked(frame: pd.DataFrame) -> pd.DataFrame:
        # Masking is idempotent, so frames cached before texts were masked come out as new ones do.
        return frame.assign(**{TEXT: [masker.mask(text) for text in frame[TEXT].astype(str)]})

    key = reference_key(model_id + ("|recorded" if held_out is not None else ""), prepared_dir, params)
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
    frame = masked(answers_frame(sample["text"], sample["label"], predictor))
    if held_out is None:
        held_out = held_out_answers(predictor, held_out_splits(prepared_dir, params.quality_reference_splits))
    quality = masked(held_out[[TEXT, PREDICTED, SCORE, TRUE_LABEL]])
    folder.mkdir(parents=True, exist_ok=True)
    frame.to_parquet(folder / "reference.parquet", index=False)
    quality.to_parquet(folder / "quality.parquet", index=False)
    write_json(
        folder / "meta.json", {"model": model_id, "prepared_dir": str(prepared_dir), **params.model_dump()}
    )
    return Reference(frame, quality, vocabulary, key)


@dataclass
class GenerationReference:
    """What a window of generations is compared with, for one generation model.

    ``frame``: a seeded sample of the train split's messages as ``text`` (prompt text drift).
    ``validity``: held-out messages (``monitoring.generation_reference_split``) with the model's answers
    (``generated``) and whether each meets the output contract (``valid``): the reference share.
    ``vocabulary``: document frequencies of all the train split's messages (out-of-vocabulary share).
    Messages and answers are PII-masked as the gateway masks the log.
    """

    frame: pd.DataFrame
    validity: pd.DataFrame
    vocabulary: Counter
    key: str


def generation_reference_key(
    model_id: str, prepared_dir: Path, params: MonitoringParams, input_column: str
) -> str:
    """Cache key of a generation reference: model identity, data content and the reference settings."""
    parts = [
        "generation",
        model_id,
        file_md5(prepared_dir / "train.parquet"),
        file_md5(prepared_dir / f"{params.generation_reference_split}.parquet"),
        input_column,
        str(params.reference_size),
        str(params.reference_seed),
    ]
    return hashlib.sha256("|".join(parts).encode()).hexdigest()[:16]


def build_generation_reference(
    generator: Generator,
    prepared_dir: Path,
    params: MonitoringParams,
    input_column: str,
    model_id: str,
    cache_dir: Path,
    *,
    phone_region: str = "US",
) -> GenerationReference:
    """Reference of a generation model, cached per model and data version like :func:`build_reference`.

    The model answers (at most ``reference_size``, seeded) held-out messages as written, as it did the
    logged ones; its answers are masked before their validity is judged, as logged answers are.
    """
    from serving.pii import PiiMasker

    masker = PiiMasker(phone_region=phone_region)

    def masked(values: pd.Series) -> list[str]:
        return [masker.mask(text) for text in values.astype(str)]

    key = generation_reference_key(model_id, prepared_dir, params, input_column)
    folder = cache_dir / key
    train = pd.read_parquet(prepared_dir / "train.parquet")
    if input_column not in train.columns:
        raise KeyError(
            f"{prepared_dir / 'train.parquet'} has no column {input_column!r} (generation.input_column); "
            f"it has {list(train.columns)}: prepare the data with `task: generation`"
        )
    vocabulary = document_frequencies(masked(train[input_column]))
    if (folder / "prompts.parquet").exists() and (folder / "validity.parquet").exists():
        log.info("generation reference for %s from cache %s", model_id, folder)
        return GenerationReference(
            pd.read_parquet(folder / "prompts.parquet"),
            pd.read_parquet(folder / "validity.parquet"),
            vocabulary,
            key,
        )
    sample = train.sample(n=min(params.reference_size, len(train)), random_state=params.reference_seed)
    frame = pd.DataFrame({TEXT: masked(sample[input_column])})
    held_out = pd.read_parquet(prepared_dir / f"{params.generation_reference_split}.parquet")
    if len(held_out) > params.reference_size:
        held_out = held_out.sample(n=params.reference_size, random_state=params.reference_seed)
    messages = held_out[input_column].astype(str).tolist()
    answers = masked(generator(messages)[GENERATED])
    validity = pd.DataFrame(
        {TEXT: masked(held_out[input_column]), GENERATED: answers, VALID: output_validity(answers)}
    )
    folder.mkdir(parents=True, exist_ok=True)
    frame.to_parquet(folder / "prompts.parquet", index=False)
    validity.to_parquet(folder / "validity.parquet", index=False)
    write_json(
        folder / "meta.json",
        {
            "task": "generation",
            "model": model_id,
            "prepared_dir": str(prepared_dir),
            "input_column": input_column,
            "valid_share": float(validity[VALID].mean()) if len(validity) else None,
            **params.model_dump(),
        },
    )
    return GenerationReference(frame, validity, vocabulary, key)


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
    handles is not worth a training run, and there are no labels to train on anyway. A significant
    drop in the accuracy estimated from confidence (CBPE) counts as a drop in quality: it alerts at
    once, and retrains once there are enough new labels to learn from. It is the most powerful of the
    quality tests when the inputs moved (the model grows unsure), and blind when only the labels'
    meaning changed, which the accuracy CUSUM on feedback catches.
    """
    data = bool(summary["data_drift"]["detected"])
    concept = bool(summary.get("concept_drift") and summary["concept_drift"]["detected"])
    estimate = summary.get("performance_estimate") or {}
    estimated_drop = bool(estimate.get("drifted"))
    reasons: list[str] = []
    if data:
        reasons.append("data drift in " + ", ".join(summary["data_drift"]["drifted_signals"]))
    if estimated_drop:
        reasons.append(
            f"estimated accuracy fell from {estimate['reference']:.3f} to {estimate['current']:.3f} "
            f"[{estimate['current_low']:.3f}, {estimate['current_high']:.3f}] (CBPE, no labels needed)"
        )
    if concept:
        reasons.append("concept drift in " + ", ".join(summary["concept_drift"]["drifted_signals"]))
    if not (data or concept or estimated_drop):
        return Decision(False, False, ("no drift",))
    wants_retrain = concept or estimated_drop or (data and params.retrain_on_data_drift)
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


GENERATION_ALERT_ONLY = "generation drift only alerts: no data is appended and no training is started"


def generation_decision(summary: dict[str, Any]) -> Decision:
    """The decision on a generation window (:func:`evaluation.drift.generation_drift`): alert only.

    Prompt drift or output-validity drift raises an alert; nothing is appended and no retraining is
    decided. :func:`should_retrain` and :func:`decide_and_append` are not reused: they append labelled
    feedback (a text and a class label) to ``data.raw_path``, while generation feedback is an accepted
    answer or an edited output, which would need its own check against the output contract (and a
    person's review) before it became a (message, target) training pair.
    """
    reasons: list[str] = []
    prompt = summary["prompt_drift"]
    validity = summary["validity_drift"]
    if prompt["detected"]:
        reasons.append("prompt drift in " + ", ".join(prompt["drifted_signals"]))
    if validity["detected"]:
        reasons.append(
            f"output validity drift: valid answers {validity['reference_share']:.3f} on held-out messages, "
            f"{validity['current_share']:.3f} in the window (p = {validity['p_value']:.3g})"
        )
    if not reasons:
        return Decision(False, False, ("no drift",))
    reasons.append(GENERATION_ALERT_ONLY)
    return Decision(False, True, tuple(reasons))


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
            if report is None:  # a generation window has no predicted labels
                continue
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
        metrics["concept/n_feedback"] = float(concept.get("n_feedback", summary["n_labelled"]))
        for name, test in concept["tests"].items():
            for key in ("reference", "current", "drop", "p_value", "statistic", "threshold"):
                if key in test:
                    metrics[f"concept/{name}_{key}"] = float(test[key])
    estimate = summary.get("performance_estimate")
    if estimate:
        metrics["estimate/detected"] = float(estimate["drifted"])
        for key in ("reference", "current", "current_low", "current_high", "drop", "p_value"):
            metrics[f"estimate/accuracy_{key}"] = float(estimate[key])
        if "realised_on_labelled" in estimate:
            metrics["estimate/accuracy_realised_on_labelled"] = float(estimate["realised_on_labelled"])
            metrics["estimate/accuracy_estimated_on_labelled"] = float(estimate["estimated_on_labelled"])
    validity = summary.get("validity_drift")
    if validity:
        metrics["drift/prompt_detected"] = float(summary["prompt_drift"]["detected"])
        for key in ("reference_share", "current_share", "drop"):
            metrics[f"drift/output_validity_{key}"] = float(validity[key])
    feedback = summary.get("feedback")
    if feedback:
        metrics["feedback/n_feedback"] = float(feedback["n_feedback"])
        metrics["feedback/n_edited"] = float(feedback["n_edited"])
        if feedback["accepted_share"] is not None:
            metrics["feedback/accepted_share"] = float(feedback["accepted_share"])
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


def version_feedback(labelled_log: pd.DataFrame, window: pd.DataFrame) -> pd.DataFrame | None:
    """The labelled answers of the model version that answered the window's newest rows, oldest first.

    The accuracy CUSUM runs over these, so its evidence starts again when prod moves to a new version.
    None when the log names no versions (then the window's own labelled rows are used).
    """
    if "model_version" not in window.columns or "model_version" not in labelled_log.columns or window.empty:
        return None
    newest = window.sort_values("created_at").iloc[-1] if "created_at" in window.columns else window.iloc[-1]
    rows = labelled_log[labelled_log["model_version"] == newest["model_version"]]
    if "model_name" in rows.columns and "model_name" in window.columns:
        rows = rows[rows["model_name"] == newest["model_name"]]
    if "created_at" in rows.columns:
        rows = rows.sort_values("created_at", kind="stable")
    return rows.reset_index(drop=True)


def evaluate_window(
    window: pd.DataFrame,
    reference: Reference,
    labels: Sequence[str],
    params: MonitoringParams,
    quality_html: bool = True,
    labelled_log: pd.DataFrame | None = None,
) -> DriftResult:
    """Drift of one window against a reference; the summary says which model and data it concerns.

    ``labelled_log``: recent labelled answers (:func:`labelled_rows`); the quality tests use those of
    the window's model version. None: the window's own labelled rows.
    """
    window = latest_version_rows(window)
    feedback = None if labelled_log is None else version_feedback(labelled_log, window)
    result = detect_drift(
        reference.frame,
        reference.quality,
        window,
        reference.vocabulary,
        labels,
        params,
        quality_html,
        version_feedback=feedback,
    )
    describe_window(result.summary, window, reference.key)
    return result


def describe_window(summary: dict[str, Any], window: pd.DataFrame, reference_key: str) -> None:
    """Add which model answered the window, when, and which reference it was compared with."""
    for column in ("model_name", "model_version"):
        if column in window.columns and len(window):
            summary[column] = str(window[column].iloc[-1])
    if "created_at" in window.columns and len(window):
        summary["window_start"] = str(pd.to_datetime(window["created_at"]).min())
        summary["window_end"] = str(pd.to_datetime(window["created_at"]).max())
    summary["reference_key"] = reference_key
    summary["finished_at"] = datetime.now(UTC).isoformat()


def evaluate_generation_window(
    window: pd.DataFrame,
    reference: GenerationReference,
    params: MonitoringParams,
    feedback: pd.DataFrame | None = None,
) -> DriftResult:
    """Prompt and output-validity drift of a window of generations (newest model version's rows)."""
    window = latest_version_rows(window)
    result = generation_drift(
        reference.frame, reference.validity, window, reference.vocabulary, params, feedback
    )
    describe_window(result.summary, window, reference.key)
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


def adapter_identity(adapter_dir: Path) -> str:
    """A cache identity of a local adapter folder: its weights' md5."""
    weights = sorted(adapter_dir.glob("*.safetensors")) or sorted(adapter_dir.glob("*.bin"))
    if not weights:
        raise FileNotFoundError(f"{adapter_dir} holds no adapter weights (*.safetensors / *.bin)")
    return f"adapter:{file_md5(weights[0])}"


def model_identity(
    model_uri: str | None, adapter_dir: Path | None, tracking_uri: str
) -> tuple[str, Predictor]:
    """A cache identity and a predictor for a registered model URI or a local adapter folder."""
    if adapter_dir is not None:
        return adapter_identity(adapter_dir), adapter_predictor(adapter_dir)
    if not model_uri:
        raise ValueError("give a registered model URI or a local adapter folder")
    return model_uri, registry_predictor(model_uri, tracking_uri)


def generation_model_identity(
    model_uri: str | None, adapter_dir: Path | None, tracking_uri: str
) -> tuple[str, Generator]:
    """A cache identity and a generator for a registered generation model or a local adapter folder."""
    if adapter_dir is not None:
        return adapter_identity(adapter_dir), adapter_generator(adapter_dir)
    if not model_uri:
        raise ValueError("give a registered model URI or a local adapter folder")
    return model_uri, registry_generator(model_uri, tracking_uri)


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
    result = evaluate_window(
        window, reference, params.data.labels, params.monitoring, labelled_log=labelled_log
    )
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


def run_generation_monitor(
    window: pd.DataFrame,
    feedback: pd.DataFrame | None,
    reference: GenerationReference,
    env: Environment,
    params_path: Path,
    *,
    log_mlflow: bool = True,
) -> MonitorOutcome:
    """The step for a generation model's window: drift, MLflow, latest.json and the decision.

    The decision is :func:`generation_decision`: alert only, nothing appended (``appended`` is None).
    """
    params = load_params(params_path)
    result = evaluate_generation_window(window, reference, params.monitoring, feedback)
    run_id = None
    if log_mlflow:
        run_id = log_to_mlflow(
            result,
            env,
            {"model_version": str(result.summary.get("model_version", "")), "tuneloop.task": "generation"},
        )
        result.summary["mlflow_run_id"] = run_id
    write_drift_summary(result.summary, env.paths.drift_summary)
    decision = generation_decision(result.summary)
    if run_id is not None:
        log_decision_to_mlflow(run_id, decision, None, env)
    log.info("generation drift decision: %s", "; ".join(decision.reasons))
    return MonitorOutcome(result.summary, decision, run_id, None, notes=[GENERATION_ALERT_ONLY])


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

    With ``task: generation`` in ``params.yaml`` the window is the newest logged generations, judged by
    :func:`run_generation_monitor` (prompt text drift, output-validity drift, feedback report; an
    alert at most, so ``append`` does not apply); ``model_uri`` / ``adapter_dir`` then name a
    generation model (``GenerationPyfunc``, or a `pipelines.sft` adapter folder).
    """
    params = load_params(params_path)
    if params.task == "generation":
        return monitor_generation_once(
            env, params_path, prepared_dir, model_uri=model_uri, adapter_dir=adapter_dir, now=now
        )
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
        held_out=recorded_held_out_answers(uri, env.tracking_uri) if uri else None,
    )
    return run_monitor(window, labelled_log, reference, env, Path(params_path), append=append, now=now)


def monitor_generation_once(
    env: Environment,
    params_path: Path,
    prepared_dir: Path,
    *,
    model_uri: str | None = None,
    adapter_dir: Path | None = None,
    now: datetime | None = None,
) -> MonitorOutcome | NotEnoughTraffic:
    """:func:`monitor_once` for ``task: generation``: the newest ``window_size`` logged generations and
    the generation feedback of the last ``feedback_lookback_hours`` against a generation reference."""
    from serving.inference_log import read_generations

    params = load_params(params_path)
    window = read_generations(env.inference_log_url, last_n=params.monitoring.window_size)
    if len(latest_version_rows(window)) < params.monitoring.min_window_size:
        log.info(
            "%d generations in the log, fewer than monitoring.min_window_size (%d): nothing to judge yet",
            len(window),
            params.monitoring.min_window_size,
        )
        return NotEnoughTraffic(len(window))
    lookback = timedelta(hours=params.monitoring.feedback_lookback_hours)
    feedback = read_generations(env.inference_log_url, since=(now or datetime.now(UTC)) - lookback)
    uri = None if adapter_dir else (model_uri or window_model_uri(window, params.registry.model_name))
    model_id, generator = generation_model_identity(uri, adapter_dir, env.tracking_uri)
    reference = build_generation_reference(
        generator,
        Path(prepared_dir),
        params.monitoring,
        params.generation.input_column,
        model_id,
        env.paths.reference_cache,
        phone_region=params.gateway.pii_phone_region,
    )
    return run_generation_monitor(window, feedback, reference, env, Path(params_path))
