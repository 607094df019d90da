"""The `monitor-drift` flow: one drift check of recent traffic, and retraining when it is warranted.

Each task is a thin call of ``monitoring.monitor``. On a retrain decision the feedback is appended
as a new DVC data version whose pointer is committed to git, and the flow starts the
``continuous-training/nightly`` deployment with ``reason="drift"`` and ``data_rev`` = that commit
(without waiting for it); on data drift that only alerts, it publishes a Markdown artifact (key
``drift-alert``) and logs a warning.
Deployed hourly as ``monitor-drift/hourly`` (``prefect.yaml``).
"""

from __future__ import annotations

from datetime import UTC, datetime
from pathlib import Path
from typing import Any

from prefect import flow, get_run_logger, task
from prefect.artifacts import create_markdown_artifact
from prefect.cache_policies import NO_CACHE

from monitoring import monitor
from tuneloop.config import Environment
from tuneloop.datastore import pointer_of
from tuneloop.paths import PREPARED_DIR

TRAINING_DEPLOYMENT = "continuous-training/nightly"
ALERT_ARTIFACT_KEY = "drift-alert"
# Every task reads live state (the log, the registry, the raw data): a cached result would be stale.


@task(cache_policy=NO_CACHE)
def check_drift(
    env: Environment,
    params_path: str,
    prepared_dir: str,
    model_uri: str | None,
    adapter_dir: str | None,
    append: bool,
) -> monitor.MonitorOutcome | monitor.NotEnoughTraffic:
    """The drift check itself: the same step as `tuneloop monitor`."""
    return monitor.monitor_once(
        env,
        Path(params_path),
        Path(prepared_dir),
        model_uri=model_uri,
        adapter_dir=Path(adapter_dir) if adapter_dir else None,
        append=append,
    )


@task(cache_policy=NO_CACHE, retries=3, retry_delay_seconds=[10, 30, 90])
def trigger_training(
    reasons: list[str], data_rev: str | None, data_pointers: dict[str, str] | None = None
) -> str:
    """Start the training deployment and return its flow-run id (``timeout=0``: do not wait).

    ``data_rev``: the commit of the appended data version (the run trains on exactly that version),
    None when nothing was committed (the run trains on the work tree's pointers). ``data_pointers``:
    that version's `.dvc` pointer by path and content, so that a run on another machine or pod, whose
    checkout lacks the commit, pulls the same data from the shared remote.
    Retried: by now the feedback is appended and the cool-down started. Should every attempt fail,
    the flow run fails (visible in Prefect) and the committed data version still reaches the next
    scheduled training.
    """
    from prefect.client.schemas.objects import FlowRun
    from prefect.deployments import run_deployment

    parameters: dict[str, Any] = {"reason": "drift", "data_rev": data_rev}
    if data_pointers:
        parameters["data_pointers"] = data_pointers
    run = run_deployment(TRAINING_DEPLOYMENT, parameters=parameters, timeout=0)
    if not isinstance(run, FlowRun):  # only an async caller gets a coroutine; this task is synchronous
        raise TypeError(f"run_deployment returned {type(run).__name__}, expected a FlowRun")
    get_run_logger().info(
        "started %s (flow run %s) on data %s: %s",
        TRAINING_DEPLOYMENT,
        run.id,
        data_rev or "of the work tree",
        "; ".join(reasons),
    )
    return str(run.id)


def alert_markdown(
    summary: dict[str, Any], reasons: list[str], appended: monitor.AppendResult | None = None
) -> str:
    data = summary["data_drift"]
    lines = [
        "# Drift alert",
        "",
        f"- model: {summary.get('model_name', '?')} v{summary.get('model_version', '?')}",
        f"- window: {summary['n_current']} predictions ({summary['n_labelled']} labelled), "
        f"{summary.get('window_start', '?')} to {summary.get('window_end', '?')}",
        f"- decision: {'; '.join(reasons)}",
        f"- MLflow run: {summary.get('mlflow_run_id', 'not logged')}",
    ]
    estimate = summary.get("performance_estimate")
    if estimate:
        lines.append(
            f"- accuracy estimated from confidence (CBPE): {estimate['current']:.3f} "
            f"[{estimate['current_low']:.3f}, {estimate['current_high']:.3f}] against "
            f"{estimate['reference']:.3f} held out"
            + (
                f"; on the {estimate['n_labelled']} labelled rows: estimated "
                f"{estimate['estimated_on_labelled']:.3f}, realised {estimate['realised_on_labelled']:.3f}"
                if "realised_on_labelled" in estimate
                else ""
            )
        )
    if appended is not None:
        committed = (
            f"commit `{appended.data_commit}` on `{appended.data_branch}`"
            if appended.data_commit
            else "not committed"
        )
        lines.append(
            f"- data version: {appended.rows_added} feedback rows appended, md5 `{appended.md5}`, {committed}"
        )
    lines += [
        "",
        "| signal | method | score | threshold | drifted |",
        "|---|---|---|---|---|",
    ]
    for name, signal in data["signals"].items():
        lines.append(
            f"| {name} | {signal['method']} | {signal['score']:.4g} | {signal['threshold']:.4g} | "
            f"{'**yes**' if signal['drifted'] else 'no'} |"
        )
    concept = summary.get("concept_drift")
    if concept:
        lines += ["", "| quality | reference | current | p-value | drifted |", "|---|---|---|---|---|"]
        for name, test in concept["tests"].items():
            lines.append(
                f"| {name} | {test['reference']:.4f} | {test['current']:.4f} | {test['p_value']:.3g} | "
                f"{'**yes**' if test['drifted'] else 'no'} |"
            )
    return "\n".join(lines)


@flow(name="monitor-drift", persist_result=True)
def monitor_drift(
    params_path: str = "params.yaml",
    prepared_dir: str = str(PREPARED_DIR),
    model_uri: str | None = None,
    adapter_dir: str | None = None,
    append: bool = True,
    trigger: bool = True,
) -> dict[str, Any]:
    """Check the newest window of the inference log for drift; retrain or alert as ``params.yaml`` says.

    Args:
        params_path: the project's params.yaml (section ``monitoring``).
        prepared_dir: the prepared splits the reference is drawn from.
        model_uri: the model to build the reference with; default the version that answered the window.
        adapter_dir: a local adapter folder instead of a registered model.
        append: append new labelled feedback to the raw data (a new DVC version, its pointer committed
            to git on ``monitoring.data_branch``) when retraining.
        trigger: start the training deployment on a retrain decision.
    """
    logger = get_run_logger()
    env = Environment.from_env()
    outcome = check_drift(env, params_path, prepared_dir, model_uri, adapter_dir, append)
    if isinstance(outcome, monitor.NotEnoughTraffic):
        return outcome.as_dict()
    decision = outcome.decision
    result = outcome.as_dict()
    if decision.alert:
        logger.warning("drift: %s", "; ".join(decision.reasons))
        create_markdown_artifact(
            markdown=alert_markdown(outcome.summary, list(decision.reasons), outcome.appended),
            key=ALERT_ARTIFACT_KEY,
            description=f"drift alert {datetime.now(UTC):%Y-%m-%d %H:%M} UTC",
        )
    appended = outcome.appended
    data_commit = appended.data_commit if appended is not None else None
    if appended is not None and data_commit:
        logger.info("data version committed: %s on %s", data_commit, appended.data_branch)
    if decision.retrain and trigger:
        pointers = None
        if appended is not None and data_commit:
            pointer = pointer_of(appended.raw_path).resolve()
            pointers = {str(pointer.relative_to(env.project_dir)): pointer.read_text(encoding="utf-8")}
        result["training_flow_run_id"] = trigger_training(list(decision.reasons), data_commit, pointers)
        result["training_data_rev"] = data_commit
    return result
