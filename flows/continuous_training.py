"""The `continuous-training` flow: pull a data version, run each DVC stage as its own task, register.

Every task is a thin call of an existing step: DVC's own commands for data and stages (so DVC still
skips what is up to date and a re-run resumes from its cache) and `registry.register` for the
registry. The whole run holds one slot of a Prefect global concurrency limit, so runs started together
(a schedule, a drift trigger, a person) take turns instead of fighting over one work tree.
"""

from __future__ import annotations

import time
from dataclasses import asdict
from io import StringIO
from pathlib import Path
from typing import Any

import yaml
from mlflow.tracking import MlflowClient
from prefect import flow, get_run_logger, task
from prefect.artifacts import create_markdown_artifact
from prefect.client.orchestration import get_client
from prefect.concurrency.sync import concurrency
from ruamel.yaml import YAML

from flows.admin import ensure_concurrency_limit
from registry.register import HEADLINE_METRICS, register_workspace
from tuneloop import commands
from tuneloop.config import Environment, Params, load_params
from tuneloop.io import read_json
from tuneloop.paths import EVALUATE_METRICS, GATES_FILE
from tuneloop.tracking import use_experiment

ARTIFACT_KEY = "continuous-training-summary"


def deep_merge(base: Any, overrides: dict) -> Any:
    """``overrides`` written into ``base`` key by key (nested mappings merged, anything else replaced)."""
    for key, value in overrides.items():
        if isinstance(value, dict) and isinstance(base.get(key), dict):
            deep_merge(base[key], value)
        else:
            base[key] = value
    return base


def write_params_overrides(params_path: Path, overrides: dict) -> Params:
    """Apply ``{"train": {"epochs": 3}}``-style overrides to params.yaml, as `dvc exp run -S` would.

    The merged file is validated before anything is written, so a wrong key or value fails the run
    and leaves params.yaml as it was. ruamel.yaml keeps the file's comments and order.
    """
    editor = YAML()
    editor.preserve_quotes = True
    document = deep_merge(editor.load(params_path.read_text(encoding="utf-8")), overrides)
    buffer = StringIO()
    editor.dump(document, buffer)
    validated = Params.model_validate(yaml.safe_load(buffer.getvalue()))
    params_path.write_text(buffer.getvalue(), encoding="utf-8")
    return validated


@task(name="apply-params-overrides")
def apply_params_overrides(project_dir: str, overrides: dict) -> dict:
    write_params_overrides(Path(project_dir) / "params.yaml", overrides)
    get_run_logger().info("params.yaml overridden with %s", overrides)
    return overrides


@task(name="pull-data")
def pull_data(project_dir: str, data_rev: str | None, data_pointers: dict[str, str] | None) -> list[str]:
    return commands.pull_data(Path(project_dir), get_run_logger(), data_rev, data_pointers)


@task(name="dvc-stage")
def run_stage(project_dir: str, stage: str, timeout_s: float) -> bool:
    ran = commands.repro_stage(Path(project_dir), stage, get_run_logger(), timeout_s)
    get_run_logger().info("stage %s %s", stage, "ran" if ran else "was up to date: skipped")
    return ran


@task(name="push-outputs")
def push_outputs(project_dir: str) -> None:
    commands.push_outputs(Path(project_dir), get_run_logger())


@task(name="register")
def register(project_dir: str) -> dict:
    """Register the trained adapter (`registry.register.register_workspace`), once per training run."""
    project = Path(project_dir)
    env = Environment.from_env(project)
    use_experiment(env)
    client = MlflowClient(tracking_uri=env.tracking_uri, registry_uri=env.tracking_uri)
    outcome = register_workspace(project, load_params(project / "params.yaml"), client)
    return asdict(outcome)


def mlflow_run_link(tracking_uri: str, experiment_id: str, run_id: str) -> str:
    if tracking_uri.startswith(("http://", "https://")):
        url = f"{tracking_uri.rstrip('/')}/#/experiments/{experiment_id}/runs/{run_id}"
        return f"[{run_id}]({url})"
    return f"`{run_id}` in `{tracking_uri}` (browse with `mlflow ui --backend-store-uri {tracking_uri}`)"


def summary_markdown(summary: dict, metrics: dict, gates: dict, run_link: str) -> str:
    """The run's Prefect artifact: what ran, the metrics, each gate's verdict, what was registered."""
    registration = summary["registration"]
    if registration["promoted_to_dev"]:
        verdict = f"`{registration['name']}` v{registration['version']} is `dev`"
    else:
        verdict = f"`{registration['name']}` v{registration['version']} is NOT `dev`: " + "; ".join(
            registration["reasons"] or ["see the evaluation card"]
        )
    if not registration["new_version"]:
        verdict += " (already registered by an earlier run: no stage had new inputs)"
    stages = ", ".join(f"{s} {'ran' if ran else 'skipped'}" for s, ran in summary["stages"].items())
    lines = [
        f"# continuous-training ({summary['reason']})",
        "",
        f"**Result:** {verdict}",
        "",
        f"- MLflow run: {run_link}",
        f"- data: {summary['data_rev'] or 'work tree'} ({', '.join(summary['data_pointers'])})",
        f"- params overrides: `{summary['params_overrides'] or {}}`",
        f"- stages: {stages}",
        f"- duration: {summary['duration_s']:.1f} s",
        "",
        "## Metrics",
        "",
        "| metric | value |",
        "|---|---|",
    ]
    lines += [f"| {key} | {metrics[key]:.4f} |" for key in HEADLINE_METRICS if key in metrics]
    lines += ["", "## Gates", "", "| gate | verdict | detail |", "|---|---|---|"]
    for gate in gates.get("gates", []):
        lines.append(f"| {gate['name']} | {'pass' if gate['passed'] else '**FAIL**'} | {gate['reason']} |")
    return "\n".join(lines) + "\n"


@flow(name="continuous-training", persist_result=True)
def continuous_training(
    data_rev: str | None = None,
    params_overrides: dict | None = None,
    reason: str = "manual",
    project_dir: str | None = None,
    data_pointers: dict[str, str] | None = None,
) -> dict:
    """Pull data (at ``data_rev``), run prepare → validate → train → evaluate, push, register.

    Args:
        data_rev: git commit, branch or tag whose `.dvc` pointers name the data to train on; None
            trains on the work tree's pointers.
        params_overrides: nested params.yaml values to set first (persisted, as `dvc exp run -S` does).
        reason: why this run started ("schedule", "drift", "manual"); shown in the summary.
        project_dir: the project folder; default the working directory (the deployment's).
        data_pointers: `.dvc` pointer files by path and content, written before the pull; they win over
            ``data_rev`` (kept as the version's name). The drift job sends them, so that a run in a
            fresh pod, whose checkout lacks the drift job's commit, trains on that data version too.
    """
    started = time.monotonic()
    logger = get_run_logger()
    env = Environment.from_env(project_dir)
    project = str(env.project_dir)
    settings = load_params(env.project_dir / "params.yaml").orchestration
    with get_client(sync_client=True) as client:
        ensure_concurrency_limit(client, settings.concurrency_limit, settings.max_concurrent_trainings)
    logger.info("reason: %s; waiting for a slot of concurrency limit %r", reason, settings.concurrency_limit)
    with concurrency(settings.concurrency_limit, occupy=1, lease_duration=settings.slot_lease_s, strict=True):
        logger.info("slot acquired: this is the only continuous-training run in progress")
        io_retries: dict[str, Any] = {
            "retries": settings.io_retries,
            "retry_delay_seconds": list(settings.io_retry_delays_s),
        }
        if params_overrides:
            apply_params_overrides(project, params_overrides)
        pointers = pull_data.with_options(**io_retries)(project, data_rev, data_pointers)
        stages = {}
        for stage in commands.STAGES:
            limit = settings.train_timeout_s if stage == "train" else settings.stage_timeout_s
            # A stage failing on its own code or data is not retried: it would fail the same way.
            stage_task = run_stage.with_options(name=stage, task_run_name=stage, timeout_seconds=limit)
            stages[stage] = stage_task(project, stage, limit)
        push_outputs.with_options(**io_retries)(project)
        registration = register.with_options(**io_retries)(project)
        # Read inside the slot: the next queued run rewrites these files as soon as it gets it.
        metrics = read_json(env.project_dir / EVALUATE_METRICS)
        gates = read_json(env.project_dir / GATES_FILE)

    summary = {
        "reason": reason,
        "data_rev": data_rev,
        "data_pointers": pointers,
        "params_overrides": params_overrides,
        "stages": stages,
        "registration": registration,
        "duration_s": time.monotonic() - started,
    }
    use_experiment(env)
    run = MlflowClient().get_run(registration["run_id"])
    link = mlflow_run_link(env.tracking_uri, run.info.experiment_id, run.info.run_id)
    create_markdown_artifact(
        summary_markdown(summary, metrics, gates, link),
        key=ARTIFACT_KEY,
        description=f"continuous-training ({reason}): {registration['name']} v{registration['version']}",
    )
    return {**summary, "metrics": metrics, "gates_passed": gates.get("passed")}
