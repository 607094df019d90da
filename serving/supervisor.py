"""Keep an environment's stable address serving the version its registry alias points to.

A running `mlflow models serve` never notices an alias move (it resolves the URI once), so the
supervisor polls the alias and, when it moves, starts the new version beside the old one, waits until
it answers a warm-up prediction, switches traffic, drains the old one and stops it. A version that
fails to start is logged and left; the old one keeps serving.

With a ``vet`` check (the registry's server-side approval and promotion records), a version the
alias names but the records do not back is refused the same way: the old version keeps serving and
``describe()`` (``/v1/status``), the log and the ``tuneloop_serving_refused`` metric say why.
"""

from __future__ import annotations

import asyncio
import logging
import shutil
import time
from collections.abc import Callable, Iterator
from dataclasses import dataclass, field
from datetime import UTC, datetime
from pathlib import Path

from prometheus_client.core import CounterMetricFamily, GaugeMetricFamily
from prometheus_client.registry import Collector

from serving.model_server import ModelServer, ModelServerFailed, wait_until_ready
from serving.routing import Backend, BackendPool
from tuneloop.config import ServingParams

log = logging.getLogger(__name__)

VersionResolver = Callable[[], str | None]
ServerLauncher = Callable[[str], ModelServer]
# Every reason a version must not be served (empty: it may be).
VersionVetter = Callable[[str], list[str]]


@dataclass
class SwapRecord:
    """One attempt to serve a version: what, when, how long, and how it ended."""

    to_version: str
    from_version: str | None
    started_at: str
    ok: bool = False
    ready_s: float | None = None
    switched_at: str | None = None
    drained: bool | None = None
    total_s: float | None = None
    error: str | None = None


@dataclass
class SupervisorState:
    swaps: list[SwapRecord] = field(default_factory=list)
    failed_versions: dict[str, float] = field(default_factory=dict)
    last_error: str | None = None
    # The version the alias names but the vetter refused, with its reasons (None: nothing refused).
    refused: dict | None = None
    refusals: int = 0
    # The alias was unset at the last check (said once, not at every poll).
    reported_unset: bool = False


def _now() -> str:
    return datetime.now(UTC).isoformat(timespec="milliseconds")


class AliasSupervisor:
    """Follows ``pool.alias`` of ``pool.model_name``.

    ``resolve`` (which version the alias names) and ``launch`` (start a server for a version) are
    injected so the swap logic is the same whether the registry is SQLite, a server, or a test's.
    """

    def __init__(
        self,
        pool: BackendPool,
        resolve: VersionResolver,
        launch: ServerLauncher,
        settings: ServingParams,
        vet: VersionVetter | None = None,
    ) -> None:
        self.pool = pool
        self.resolve = resolve
        self.launch = launch
        self.settings = settings
        self.vet = vet
        self.state = SupervisorState()
        self._swap_lock = asyncio.Lock()

    async def run_forever(self) -> None:
        while True:
            try:
                await self.check_once()
            # Deliberately broad: a registry hiccup must not stop the supervisor; logged with its traceback.
            except Exception as error:
                self.state.last_error = f"{type(error).__name__}: {error}"
                log.exception("checking %s@%s failed; will retry", self.pool.model_name, self.pool.alias)
            await asyncio.sleep(self.settings.poll_interval_s)

    async def check_once(self) -> SwapRecord | None:
        """Serve the alias's version if it is not served yet; restart a server that died.

        Called by the poll loop and by the gateway's health check when prod's server died; a check
        while a swap is running does nothing (that swap decides what serves).
        """
        if self._swap_lock.locked():
            return None
        wanted = await asyncio.to_thread(self.resolve)
        current = self.pool.current
        if wanted is None:
            if current is None and not self.state.reported_unset:
                log.warning("%s@%s is not set: nothing to serve yet", self.pool.model_name, self.pool.alias)
            self.state.reported_unset = True
            return None
        self.state.reported_unset = False
        if current is not None and current.version == wanted:
            if current.server is None or (current.server.alive() and current.server.owns_port()):
                self.state.refused = None  # the alias is back on what is served: nothing is refused
                return None
            log.error("model server for v%s died or lost its port; starting it again", wanted)
        if self.vet is not None:
            reasons = await asyncio.to_thread(self.vet, wanted)
            if reasons:
                self._refuse(wanted, reasons)
                return None
            self.state.refused = None
        failed_at = self.state.failed_versions.get(wanted)
        if failed_at is not None and time.monotonic() - failed_at < self.settings.retry_failed_after_s:
            return None
        return await self.swap_to(wanted)

    def _refuse(self, version: str, reasons: list[str]) -> None:
        refused = self.state.refused
        if refused is None or refused["version"] != version or refused["reasons"] != reasons:
            current = self.pool.current
            keeps = f"v{current.version} keeps serving" if current else "nothing is served"
            log.error(
                "%s@%s names v%s, which is not served (%s): %s",
                self.pool.model_name,
                self.pool.alias,
                version,
                keeps,
                "; ".join(reasons),
            )
            self.state.refused = {"version": version, "reasons": reasons, "since": _now()}
            self.state.refusals += 1

    async def swap_to(self, version: str) -> SwapRecord:
        async with self._swap_lock:
            old = self.pool.current
            record = SwapRecord(version, old.version if old else None, _now())
            self.state.swaps.append(record)
            started = time.monotonic()
            server: ModelServer | None = None
            try:
                server = await asyncio.to_thread(self.launch, version)
                timeout_s = self.settings.start_timeout_s
                record.ready_s = await asyncio.to_thread(wait_until_ready, server, timeout_s)
            except (ModelServerFailed, OSError) as error:
                record.error = str(error)
                self.state.last_error = record.error
                self.state.failed_versions[version] = time.monotonic()
                keeps = f"v{old.version} keeps serving" if old else "nothing is served yet"
                log.error("v%s failed to start (%s): %s", version, keeps, error)
                if server is not None:
                    await asyncio.to_thread(server.stop)
                return record
            self.state.failed_versions.pop(version, None)
            previous = self.pool.switch(Backend(version, server.url, server))
            record.switched_at = _now()
            record.ok = True
            log.info("%s@%s now served by v%s", self.pool.model_name, self.pool.alias, version)
            if previous is not None:
                record.drained = await self.pool.drain(previous, self.settings.drain_timeout_s)
                if not record.drained:
                    waited = self.settings.drain_timeout_s
                    log.warning("v%s still had requests after %.0fs", previous.version, waited)
                if previous.server is not None:
                    await asyncio.to_thread(previous.server.stop)
            record.total_s = time.monotonic() - started
            return record

    async def shutdown(self) -> None:
        """Stop the served model server once its requests have finished (graceful gateway shutdown)."""
        current = self.pool.current
        if current is None or current.server is None:
            return
        await self.pool.drain(current, self.settings.drain_timeout_s)
        await asyncio.to_thread(current.server.stop)

    def describe(self) -> dict:
        current = self.pool.current
        return {
            "model_name": self.pool.model_name,
            "alias": self.pool.alias,
            "serving_version": current.version if current else None,
            "upstream": current.url if current else None,
            "in_flight": current.in_flight if current else 0,
            "last_error": self.state.last_error,
            "refused": self.state.refused,
            "swaps": [record.__dict__ for record in self.state.swaps[-10:]],
        }


class SupervisorCollector(Collector):
    """`tuneloop_serving_refused`: 1 while the alias names a version the supervisor refuses to serve."""

    def __init__(self, supervisor: AliasSupervisor) -> None:
        self.supervisor = supervisor

    def collect(self) -> Iterator:
        refused = GaugeMetricFamily(
            "tuneloop_serving_refused",
            "1 while the alias names a version that is not served because its records do not back it",
            labels=["model_name", "alias", "model_version", "reason"],
        )
        state = self.supervisor.state
        if state.refused is not None:
            pool = self.supervisor.pool
            reason = "; ".join(state.refused["reasons"])[:300]
            refused.add_metric([pool.model_name, pool.alias, state.refused["version"], reason], 1)
        yield refused
        yield CounterMetricFamily(
            "tuneloop_serving_refusals", "Times an alias move was refused", value=state.refusals
        )


def registry_version_resolver(tracking_uri: str, model_name: str, alias: str) -> VersionResolver:
    """Read which version ``alias`` points to now (None when the alias is not set)."""
    from mlflow.tracking import MlflowClient

    from tuneloop.tracking import current_version

    client = MlflowClient(tracking_uri=tracking_uri, registry_uri=tracking_uri)

    def resolve() -> str | None:
        version = current_version(client, model_name, alias)
        return None if version is None else str(version.version)

    return resolve


def model_server_launcher(
    tracking_uri: str, model_name: str, log_dir: Path, settings: ServingParams, host: str = "127.0.0.1"
) -> ServerLauncher:
    """Start `mlflow models serve` for an exact version number, so what runs never changes under us.

    The supervisor downloads the version itself (with its own registry credentials) and the server
    serves that local copy: the model's code never sees the tracking URI or any credential.
    """
    import mlflow.artifacts

    from serving.model_server import start_model_server

    def launch(version: str) -> ModelServer:
        local_copy = Path(log_dir) / "models" / f"v{version}"
        if not (local_copy / "MLmodel").exists():
            staging = local_copy.with_name(f".v{version}.partial")
            shutil.rmtree(staging, ignore_errors=True)
            staging.mkdir(parents=True)
            mlflow.artifacts.download_artifacts(
                artifact_uri=f"models:/{model_name}/{version}",
                dst_path=str(staging),
                tracking_uri=tracking_uri,
                registry_uri=tracking_uri,
            )
            shutil.rmtree(local_copy, ignore_errors=True)
            staging.rename(local_copy)
        return start_model_server(
            str(local_copy),
            version,
            log_dir=log_dir,
            # The pyfunc reads TUNELOOP_SERVING_QUANTIZE at load (serving/pyfunc_model.py).
            extra_env={"HF_HUB_OFFLINE": "1", "TUNELOOP_SERVING_QUANTIZE": settings.quantize},
            host=host,
            workers=settings.workers,
            request_timeout_s=settings.request_timeout_s,
        )

    return launch
