"""`tuneloop deploy` and `tuneloop worker`: prefect.yaml's deployments on a process work pool.

`deploy` creates what the deployments need on the Prefect server (the process work pool, the
training concurrency limit), then runs `prefect deploy --all` in the project, the same command a
user would type. `worker` first puts back in the queue the runs a killed worker left behind, then
becomes a `prefect worker start` process on the pool.
"""

from __future__ import annotations

import logging
import os
import subprocess
import sys
from pathlib import Path

import yaml
from prefect.client.orchestration import get_client
from prefect.settings import PREFECT_API_URL

from flows.admin import (
    ensure_concurrency_limit,
    ensure_work_pool,
    reschedule_orphaned_runs,
    work_pool_name,
)
from tuneloop.config import WORK_POOL_ENV, OrchestrationParams

log = logging.getLogger(__name__)

PREFECT_YAML = "prefect.yaml"


def prefect_command(*args: str) -> list[str]:
    return [sys.executable, "-m", "prefect", *args]


def declared_deployments(project_dir: Path) -> list[dict]:
    """The deployments prefect.yaml declares (name, entrypoint, schedules, parameters, ...)."""
    config = yaml.safe_load((project_dir / PREFECT_YAML).read_text(encoding="utf-8"))
    return list(config.get("deployments") or [])


def require_prefect_server() -> str:
    """PREFECT_API_URL (from the environment or the Prefect profile); a clear error when unset.

    Without it Prefect would start a temporary server that dies with this process: deployments
    registered there, or a worker polling it, would be lost.
    """
    url = PREFECT_API_URL.value()
    if not url:
        raise SystemExit(
            "PREFECT_API_URL is not set: start a server (`prefect server start`, or `tuneloop up`) and "
            "export PREFECT_API_URL=http://127.0.0.1:4200/api"
        )
    return url


def deploy(project_dir: Path, settings: OrchestrationParams, pool_override: str | None = None) -> str:
    """Register prefect.yaml's deployments against PREFECT_API_URL; returns the work pool name."""
    require_prefect_server()
    pool = work_pool_name(settings, pool_override)
    with get_client(sync_client=True) as client:
        if ensure_work_pool(client, pool):
            log.info("created process work pool %r", pool)
        ensure_concurrency_limit(client, settings.concurrency_limit, settings.max_concurrent_trainings)
    env = {**os.environ, WORK_POOL_ENV: pool}
    subprocess.run(prefect_command("--no-prompt", "deploy", "--all"), cwd=project_dir, env=env, check=True)
    return pool


def start_worker(
    settings: OrchestrationParams, name: str | None = None, pool_override: str | None = None
) -> None:
    """Reschedule runs orphaned by a dead worker, then replace this process with a process worker."""
    require_prefect_server()
    pool = work_pool_name(settings, pool_override)
    with get_client(sync_client=True) as client:
        ensure_work_pool(client, pool)
        reschedule_orphaned_runs(client, pool)
    args = prefect_command("worker", "start", "--pool", pool, "--type", "process")
    if name:
        args += ["--name", name]
    sys.stdout.flush()
    sys.stderr.flush()
    # exec, not a child: signals (Ctrl-C, SIGTERM from a supervisor) reach the worker itself.
    os.execv(sys.executable, args)
