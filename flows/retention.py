"""The `inference-log-retention` flow: delete inference-log rows older than the retention period.

The log holds what users typed (masked, but still their words): keeping it only as long as drift
monitoring and retraining need it is the point. A thin call of
``serving.inference_log.delete_older_than``; erasure of one person's rows on request is
``serving.inference_log.erase`` (`tuneloop erase`), not this flow.
"""

from __future__ import annotations

from typing import Any

from prefect import flow, get_run_logger, task
from prefect.cache_policies import NO_CACHE
from sqlalchemy.engine import make_url

from serving.inference_log import delete_older_than
from tuneloop.config import Environment, load_params


@task(cache_policy=NO_CACHE, retries=2, retry_delay_seconds=[10, 60])
def delete_old_rows(db_url: str, max_age_days: float) -> int:
    """Retried: a locked or briefly unreachable database is an outage, not an answer."""
    return delete_older_than(db_url, max_age_days)


@flow(name="inference-log-retention", persist_result=True)
def inference_log_retention(
    max_age_days: float | None = None, project_dir: str | None = None
) -> dict[str, Any]:
    """Delete predictions and feedback older than ``max_age_days`` from the inference log.

    Args:
        max_age_days: rows created longer ago than this are deleted (feedback on them too); default
            ``gateway.log_retention_days`` of the project's params.yaml.
        project_dir: the project whose environment names the log (``TUNELOOP_INFERENCE_LOG_URL``).
    """
    env = Environment.from_env(project_dir)
    if max_age_days is None:
        max_age_days = load_params(env.project_dir / "params.yaml").gateway.log_retention_days
    deleted = delete_old_rows(env.inference_log_url, max_age_days)
    shown = make_url(env.inference_log_url).render_as_string(hide_password=True)
    get_run_logger().info("deleted %d rows older than %s days from %s", deleted, max_age_days, shown)
    return {"deleted_rows": deleted, "max_age_days": max_age_days, "inference_log": shown}
