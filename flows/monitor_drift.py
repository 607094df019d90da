"""The `monitor-drift` flow: one drift check of recent traffic, and retraining when it is warranted.

Each task is a thin call of ``pipelines.monitor``. On a retrain decision the flow starts the
``continuous-training/nightly`` deployment with ``reason="drift"`` (without waiting for it); on data
drift that only alerts, it publishes a Markdown artifact (key ``drift-alert``) and logs a warning.
Deployed hourly as ``monitor-drift/hourly`` (``prefect.yaml``).
"""

from __future__ import annotations

from datetime import UTC, datetime, timedelta
from pathlib import Path
from typing import Any

import pandas as pd
from prefect import flow, get_run_logger, task
from prefect.artifacts import create_markdown_artifact
from prefect.cache_policies import NO_CACHE

from pipelines import monitor
from pipelines.config import Environment, load_params

TRAINING_DEPLOYMENT = "continuous-training/nightly"
ALERT_ARTIFACT_KEY = "drift-alert"
# Every task reads live state (the log, the registry, the raw data): a cached result would be stale.


@task(cache_policy=NO_CACHE)
def read_window(db_url: str, last_n: int) -> pd.DataFrame:
    return monitor.read_log(db_url, last_n=last_n)


@task(cache_policy=NO_CACHE)
def read_recent_feedback(db_url: str, lookback_hours: float) -> pd.DataFrame:
    return monitor.labelled_rows(db_url, datetime.now(UTC) - timedelta(hours=lookback_hours))


@task(cache_policy=NO_CACHE)
def build_reference(
    window: pd.DataFrame,
    params_path: str,
    prepared_dir: str,
    home_dir: str,
    tracking_uri: str,
    model_uri: str | None,
    adapter_dir: str | None,
) -> monitor.Reference:
    params = load_params(params_path)
    uri = None if adapter_dir else (model_uri or monitor.window_model_uri(window, params.registry.model_name))
    model_id, predictor = monitor.model_identity(
        uri, Path(adapter_dir) if adapter_dir else None, tracking_uri
    )
    cache = monitor.monitoring_dir(Path(home_dir)) / "reference"
    return monitor.build_reference(predictor, Path(prepared_dir), params.monitoring, model_id, cache)


@task(cache_policy=NO_CACHE)
def check_drift(
    window: pd.DataFrame,
    labelled: pd.DataFrame,
    reference: monitor.Reference,
    env: Environment,
    params_path: str,
    append: bool,
) -> monitor.MonitorOutcome:
    return monitor.run_monitor(window, labelled, reference, env, Path(params_path), append=append)


@task(cache_policy=NO_CACHE, retries=3, retry_delay_seconds=[10, 30, 90])
def trigger_training(reasons: list[str]) -> str:
    """Start the training deployment and return its flow-run id (``timeout=0``: do not wait).

    Retried: by now the feedback is appended and the cool-down started. Should every attempt fail,
    the flow run fails (visible in Prefect) and the appended data version still reaches the next
    scheduled training, which trains on the work tree.
    """
    from prefect.deployments import run_deployment

    run = run_deployment(TRAINING_DEPLOYMENT, parameters={"reason": "drift", "data_rev": None}, timeout=0)
    get_run_logger().info("started %s (flow run %s): %s", TRAINING_DEPLOYMENT, run.id, "; ".join(reasons))
    return str(run.id)


def alert_markdown(summary: dict[str, Any], reasons: list[str]) -> str:
    data = summary["data_drift"]
    lines = [
        "# Drift alert",
        "",
        f"- model: {summary.get('model_name', '?')} v{summary.get('model_version', '?')}",
        f"- window: {summary['n_current']} predictions ({summary['n_labelled']} labelled), "
        f"{summary.get('window_start', '?')} to {summary.get('window_end', '?')}",
        f"- decision: {'; '.join(reasons)}",
        f"- MLflow run: {summary.get('mlflow_run_id', 'not logged')}",
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
    prepared_dir: str = "data/prepared",
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
        append: append new labelled feedback to the raw data (a new DVC version) when retraining.
        trigger: start the training deployment on a retrain decision.
    """
    logger = get_run_logger()
    env = Environment.from_env()
    params = load_params(params_path)
    db_url = monitor.inference_log_url(env.home_dir)
    window = read_window(db_url, params.monitoring.window_size)
    if len(monitor.latest_version_rows(window)) < params.monitoring.min_window_size:
        logger.info(
            "%d predictions in the log, fewer than monitoring.min_window_size (%d): nothing to judge yet",
            len(window),
            params.monitoring.min_window_size,
        )
        return {"skipped": "not enough traffic", "n_current": len(window)}
    labelled = read_recent_feedback(db_url, params.monitoring.feedback_lookback_hours)
    reference = build_reference(
        window, params_path, prepared_dir, str(env.home_dir), env.tracking_uri, model_uri, adapter_dir
    )
    outcome = check_drift(window, labelled, reference, env, params_path, append)
    decision = outcome.decision
    result = outcome.as_dict()
    if decision.alert:
        logger.warning("drift: %s", "; ".join(decision.reasons))
        create_markdown_artifact(
            markdown=alert_markdown(outcome.summary, list(decision.reasons)),
            key=ALERT_ARTIFACT_KEY,
            description=f"drift alert {datetime.now(UTC):%Y-%m-%d %H:%M} UTC",
        )
    if decision.retrain and trigger:
        result["training_flow_run_id"] = trigger_training(list(decision.reasons))
    return result
