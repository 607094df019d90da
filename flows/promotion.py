"""The `promote-to-prod` flow: polls the registry and promotes the newest approved `dev` version.

A reviewer approves in the MLflow UI (version tag `approval` = `approved`); this flow, scheduled every
few minutes, turns that into a `prod` move through `registry.promote.promote`, which applies the
promotion rules, remembers the previous `prod` for rollback and writes the audit entry. A refusal is
logged and the poll ends normally: it is an answer, not a failure.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

from mlflow.entities.model_registry import ModelVersion
from mlflow.tracking import MlflowClient
from prefect import flow, get_run_logger, task
from prefect.artifacts import create_markdown_artifact

from registry.promote import PromotionRefused, promote
from registry.register import PROD_ALIAS
from tuneloop.config import Environment, load_params
from tuneloop.paths import HomePaths
from tuneloop.tracking import acting_as, current_version, use_experiment

ACTOR = "prefect:promote-to-prod"


def newest_approved(versions: list[ModelVersion], prod_version: str | None) -> ModelVersion | None:
    """The newest version a reviewer approved that passed registration (is or was `dev`), newer than prod.

    Older approved versions are not candidates once a newer one exists: prod only moves forward, and
    an explicit `tuneloop promote --version N` remains for anything else.
    """
    floor = int(prod_version) if prod_version is not None else 0
    candidates = [
        v
        for v in versions
        if v.tags.get("approval") == "approved" and v.tags.get("was_dev") == "true" and int(v.version) > floor
    ]
    return max(candidates, key=lambda v: int(v.version), default=None)


@task(name="find-approved-version")
def find_approved_version(tracking_env: Environment, name: str) -> str | None:
    use_experiment(tracking_env)
    client = MlflowClient()
    prod = current_version(client, name, PROD_ALIAS)
    candidate = newest_approved(
        client.search_model_versions(f"name = '{name}'"), str(prod.version) if prod else None
    )
    return str(candidate.version) if candidate is not None else None


@task(name="promote")
def promote_version(tracking_env: Environment, params_path: str, version: str, to: str) -> dict:
    """`registry.promote.promote`; a refusal comes back as data so it is not retried like an outage."""
    params = load_params(params_path)
    use_experiment(tracking_env)
    try:
        entry = promote(
            MlflowClient(),
            params.registry.model_name,
            tracking_env.paths.registry_audit,
            to=to,
            version=version,
            actor=ACTOR,
            reason=f"approval=approved seen by the scheduled {to} promotion",
            gate_thresholds=params.evaluate.gate_thresholds(params.task),
        )
    except PromotionRefused as refused:
        get_run_logger().warning("%s", refused)
        return {"promoted": False, "version": version, "reasons": refused.reasons}
    get_run_logger().info("%s@%s: v%s -> v%s", entry.model, to, entry.from_version, entry.to_version)
    return {"promoted": True, "version": version, "from_version": entry.from_version, "at": entry.at}


@flow(name="promote-to-prod", persist_result=True)
def promote_to_prod(project_dir: str | None = None, to: str = PROD_ALIAS) -> dict:
    """Promote the newest approved `dev` version to ``to`` (default `prod`) if the rules allow it."""
    env = Environment.from_env(project_dir)
    if env.deployer_username and env.deployer_password_file:
        # A worker acts as the trainer; moving `prod` is the deployer's right alone.
        password = env.deployer_password_file.read_text(encoding="utf-8").strip()
        with acting_as(env.deployer_username, password):
            return _promote_newest_approved(env, to)
    return _promote_newest_approved(env, to)


def _promote_newest_approved(env: Environment, to: str) -> dict:
    logger = get_run_logger()
    params_path = env.project_dir / "params.yaml"
    params = load_params(params_path)
    settings = params.orchestration
    io_retries: dict[str, Any] = {
        "retries": settings.io_retries,
        "retry_delay_seconds": list(settings.io_retry_delays_s),
    }
    name = params.registry.model_name
    version = find_approved_version.with_options(**io_retries)(env, name)
    if version is None:
        logger.info("no approved version of %s newer than %s: nothing to promote", name, to)
        return {"promoted": False, "version": None, "reasons": ["no approved version newer than " + to]}
    result = promote_version.with_options(**io_retries)(env, str(params_path), version, to)
    if result["promoted"]:
        create_markdown_artifact(
            f"# {name}@{to}: v{result['from_version']} -> v{version}\n\n"
            f"Approved in the registry; moved by `{ACTOR}` at {result['at']}. "
            f"Audit log: `{HomePaths(Path(env.home_dir)).registry_audit}`. "
            f"Undo with `tuneloop rollback --to {to}`.\n",
            key=f"promote-to-{to}",
            description=f"{name}@{to} -> v{version}",
        )
    return result
