"""`python -m flows.serve`: every deployment of prefect.yaml, served by this one process.

The one-process alternative to `tuneloop deploy` + `tuneloop worker`: `prefect.serve` registers the
same deployments (same names, schedules and parameters, read from prefect.yaml) and runs their flow
runs as subprocesses until stopped with Ctrl-C. Run it from the project folder.
"""

from __future__ import annotations

import argparse
import logging
from pathlib import Path

from prefect import serve
from prefect.client.orchestration import get_client
from prefect.exceptions import ObjectNotFound
from prefect.flows import load_flow_from_entrypoint
from prefect.schedules import Cron, Interval, Schedule

from flows.admin import ensure_concurrency_limit
from flows.deploy import declared_deployments
from pipelines.config import load_params

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
        flow = load_flow_from_entrypoint(str(project_dir / spec["entrypoint"]))
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


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("--project-dir", default=".", help="the folder with prefect.yaml and params.yaml")
    parser.add_argument("--params", default="params.yaml")
    args = parser.parse_args(argv)
    logging.basicConfig(level=logging.INFO, format="%(levelname)s %(name)s: %(message)s")
    project_dir = Path(args.project_dir).resolve()
    settings = load_params(project_dir / args.params).orchestration
    deployments = runner_deployments(project_dir)
    with get_client(sync_client=True) as client:
        ensure_concurrency_limit(client, settings.concurrency_limit, settings.max_concurrent_trainings)
        drop_work_pool_deployments(client, deployments)
    serve(*deployments)


if __name__ == "__main__":
    main()
