"""`tuneloop serve-flows`: every deployment of prefect.yaml, served by this one process.

The one-process alternative to `tuneloop deploy` + `tuneloop worker`: `prefect.serve` registers the
same deployments (same names, schedules and parameters, read from prefect.yaml) and runs their flow
runs as subprocesses until stopped with Ctrl-C. Run it from the project folder.
"""

from __future__ import annotations

import logging
from pathlib import Path
from typing import Any

from prefect import serve
from prefect.client.orchestration import get_client
from prefect.exceptions import ObjectNotFound
from prefect.flows import Flow, load_flow_from_entrypoint
from prefect.schedules import Cron, Interval, Schedule

from flows.admin import ensure_concurrency_limit
from flows.deploy import declared_deployments
from tuneloop.config import OrchestrationParams

log = logging.getLogger(__name__)


def schedule_of(spec: dict) -> Schedule:
    """A prefect.yaml schedule entry (`cron` or `interval`, with `timezone`) as a Prefect schedule."""
    if "cron" in spec:
        return Cron(spec["cron"], timezone=spec.get("timezone"))
    if "interval" in spec:
        return Interval(spec["interval"], timezone=spec.get("timezone"))
    raise ValueError(f"prefect.yaml schedule {spec} has neither `cron` nor `interval`")


def drop_work_pool_deployments(client, deployments: list) -> None:
    """Delete same-named deployments that `tuneloop deploy` put on a work pool.

    Served over one of them, a deployment keeps its old pull steps and its runs fail to load their code.
    """
    for deployment in deployments:
        try:
            existing = client.read_deployment_by_name(f"{deployment.flow_name}/{deployment.name}")
        except ObjectNotFound:
            continue
        if existing.work_pool_name:
            log.warning(
                "replacing deployment %s/%s of work pool %r with a served one",
                deployment.flow_name,
                deployment.name,
                existing.work_pool_name,
            )
            client.delete_deployment(existing.id)


def runner_deployments(project_dir: Path) -> list:
    deployments = []
    for spec in declared_deployments(project_dir):
        flow: Flow[..., Any] = load_flow_from_entrypoint(str(project_dir / spec["entrypoint"]))
        deployments.append(
            flow.to_deployment(
                name=spec["name"],
                description=spec.get("description"),
                tags=spec.get("tags"),
                parameters=spec.get("parameters") or {},
                schedules=[schedule_of(s) for s in spec.get("schedules") or []],
            )
        )
    return deployments


def serve_deployments(project_dir: Path, settings: OrchestrationParams) -> None:
    """Register prefect.yaml's deployments as runner deployments and run them until stopped."""
    deployments = runner_deployments(project_dir)
    with get_client(sync_client=True) as client:
        ensure_concurrency_limit(client, settings.concurrency_limit, settings.max_concurrent_trainings)
        drop_work_pool_deployments(client, deployments)
    serve(*deployments)
