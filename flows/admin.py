"""Prefect server objects the flows rely on: the work pool, the training concurrency limit, and the
recovery of runs whose process died with its worker.

Each function takes a synchronous Prefect client (``get_client(sync_client=True)``), so the same code
serves `tuneloop deploy`, `tuneloop worker` and the flows themselves.
"""

from __future__ import annotations

import logging
from dataclasses import dataclass

import psutil
from prefect.client.orchestration import SyncPrefectClient
from prefect.client.schemas.actions import (
    GlobalConcurrencyLimitCreate,
    GlobalConcurrencyLimitUpdate,
    WorkPoolCreate,
)
from prefect.client.schemas.filters import (
    FlowRunFilter,
    FlowRunFilterState,
    FlowRunFilterStateType,
    WorkPoolFilter,
    WorkPoolFilterName,
)
from prefect.client.schemas.objects import StateType
from prefect.exceptions import ObjectAlreadyExists, ObjectNotFound
from prefect.states import AwaitingRetry

from tuneloop.config import OrchestrationParams

log = logging.getLogger(__name__)


def work_pool_name(settings: OrchestrationParams, override: str | None) -> str:
    """The override (TUNELOOP_WORK_POOL: one pool per machine or environment), else params.yaml's name."""
    return override or settings.work_pool


def ensure_work_pool(client: SyncPrefectClient, name: str) -> bool:
    """Create a process work pool called ``name`` unless one exists; True if created now."""
    try:
        client.read_work_pool(name)
        return False
    except ObjectNotFound:
        pass
    try:
        client.create_work_pool(WorkPoolCreate(name=name, type="process"))
    except ObjectAlreadyExists:
        return False
    return True


def ensure_concurrency_limit(client: SyncPrefectClient, name: str, limit: int) -> None:
    """Make the global concurrency limit ``name`` exist, be active and allow ``limit`` slots."""
    try:
        existing = client.read_global_concurrency_limit_by_name(name)
    except ObjectNotFound:
        try:
            client.create_global_concurrency_limit(GlobalConcurrencyLimitCreate(name=name, limit=limit))
            return
        except ObjectAlreadyExists:
            existing = client.read_global_concurrency_limit_by_name(name)
    if existing.limit != limit or not existing.active:
        client.update_global_concurrency_limit(name, GlobalConcurrencyLimitUpdate(limit=limit, active=True))


@dataclass(frozen=True)
class RescheduledRun:
    flow_run_id: str
    name: str
    dead_pid: str


def reschedule_orphaned_runs(client: SyncPrefectClient, pool: str) -> list[RescheduledRun]:
    """Put back in the queue the runs of ``pool`` whose process is gone (killed with its worker).

    A process work pool runs its flows as child processes of the worker on one machine, and Prefect
    records each run's process id (``infrastructure_pid``). A run still marked PENDING or RUNNING
    whose process no longer exists on this machine died without reporting: it is set to
    AwaitingRetry, so the next worker polling the pool runs it again; DVC skips the stages it had
    finished. Runs whose process is alive (a worker killed alone leaves its runs running) are left
    alone. Call this only for a pool whose workers all run on this machine.
    """
    runs = client.read_flow_runs(
        flow_run_filter=FlowRunFilter(
            state=FlowRunFilterState(type=FlowRunFilterStateType(any_=[StateType.RUNNING, StateType.PENDING]))
        ),
        work_pool_filter=WorkPoolFilter(name=WorkPoolFilterName(any_=[pool])),
    )
    rescheduled = []
    for run in runs:
        pid = run.infrastructure_pid
        if not pid or not pid.isdigit() or psutil.pid_exists(int(pid)):
            continue
        message = f"Rescheduled by `tuneloop worker`: its process {pid} died without reporting"
        client.set_flow_run_state(run.id, AwaitingRetry(message=message), force=True)
        log.warning("flow run %s (%s): %s", run.name, run.id, message)
        rescheduled.append(RescheduledRun(str(run.id), run.name, pid))
    return rescheduled
