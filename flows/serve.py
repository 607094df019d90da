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
    with get_client(sync_client=True) as client:
        ensure_concurrency_limit(client, settings.concurrency_limit, settings.max_concurrent_trainings)
    serve(*runner_deployments(project_dir))


if __name__ == "__main__":
    main()
