"""Which model server answers a request: prod behind a circuit breaker, the fallback, the canary.

The gateway's endpoints check, charge and log; this module decides where the texts go and gets
the rows back. Prediction requests pass through the prediction cache and the micro-batcher
(serving/batching.py); generation calls go straight to prod (no canary, batching or cache: each
answer depends on sampling settings and is expensive to keep).
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import time
import typing
from collections.abc import Awaitable, Callable, Hashable, Sequence
from dataclasses import dataclass

import httpx

from serving.batching import BatchAnswer, MicroBatcher, PredictionCache
from serving.canary import Canary, Mode
from serving.limits import Refusal
from serving.logs import request_id_var
from serving.metrics import GatewayMetrics
from serving.model_server import invocation_body
from serving.routing import Backend, BackendPool, NoBackend
from serving.supervisor import AliasSupervisor

log = logging.getLogger(__name__)

REQUEST_ID_HEADER = "X-Request-ID"
RETRY_AFTER_NO_BACKEND_S = "5"
PING_TIMEOUT_S = 2.0


@dataclass(frozen=True)
class TrafficSettings:
    """The ``serving:`` settings the router needs (ServingParams has them; tests build their own)."""

    micro_batch_max_texts: int = 64
    micro_batch_max_wait_ms: float = 0
    cache_size: int = 0
    health_check_interval_s: float = 2
    model_server_workers: int = 1


CandidateFactory = Callable[[], tuple[BackendPool, AliasSupervisor]]


def forwarded_request_id() -> dict[str, str]:
    """The request's id for the model server's own log (``X-Request-ID``), when inside a request."""
    request_id = request_id_var.get()
    return {REQUEST_ID_HEADER: request_id} if request_id is not None else {}


def upstream_refusal(response: httpx.Response) -> Refusal:
    """A model server's error as a refusal: its message only, never its stack trace."""
    if response.status_code >= 500 or response.status_code < 400:
        return Refusal(502, "upstream_error", f"the model server failed with HTTP {response.status_code}")
    try:
        message = str(response.json().get("message", ""))
    except (ValueError, AttributeError):
        message = response.text
    message = message.split("Traceback", 1)[0].strip()[:500]
    return Refusal(400, "rejected_by_model", f"the model server refused the input: {message}")


_WRONG_TASK = {
    "classification": "the served model is a classifier; use /v1/predict",
    "generation": "the served model generates text; use /v1/generate",
}


def served_task(payload: object) -> str | None:
    """``generation`` or ``classification`` from the rows of a model server's answer; None if neither."""
    rows = payload.get("predictions") if isinstance(payload, dict) else None
    if not isinstance(rows, list) or not rows or not all(isinstance(row, dict) for row in rows):
        return None
    if all("generated" in row for row in rows):
        return "generation"
    if all("label" in row for row in rows):
        return "classification"
    return None


def wrong_task(task: str) -> Refusal:
    return Refusal(409, "wrong_model_task", _WRONG_TASK[task], served_task=task)


def prediction_rows(response: httpx.Response) -> list[dict]:
    """The rows of a classifier's answer; any other answer is a refusal that says what went wrong."""
    if response.status_code != 200:
        raise upstream_refusal(response)
    try:
        payload = response.json()
    except ValueError as error:
        raise Refusal(
            502, "upstream_error", "the model server gave an answer the gateway cannot read"
        ) from error
    if served_task(payload) == "generation":
        raise wrong_task("generation")
    rows = payload.get("predictions") if isinstance(payload, dict) else None
    if isinstance(rows, list) and all(
        isinstance(row, dict) and "label" in row and "score" in row for row in rows
    ):
        return rows
    log.error("model server answered with an unexpected shape: %.200r", payload)
    raise Refusal(502, "upstream_error", "the model server gave an answer the gateway cannot read")


class TrafficRouter:
    """Routes model calls of one gateway; its background tasks run inside the gateway's lifespan."""

    def __init__(
        self,
        pool: BackendPool,
        metrics: GatewayMetrics,
        settings: TrafficSettings,
        *,
        supervisor: AliasSupervisor | None = None,
        fallback: tuple[BackendPool, AliasSupervisor] | None = None,
        canary: Canary | None = None,
        candidate_factory: CandidateFactory | None = None,
        timeout_s: float = 60,
    ) -> None:
        self.pool = pool
        self.metrics = metrics
        self.settings = settings
        self.supervisor = supervisor
        self.fallback_pool: BackendPool | None = fallback[0] if fallback else None
        self.fallback_supervisor: AliasSupervisor | None = fallback[1] if fallback else None
        self.canary = canary
        self.candidate_factory = candidate_factory
        self.candidate_pool: BackendPool | None = None
        self.candidate_supervisor: AliasSupervisor | None = None
        self.timeout_s = timeout_s
        self.cache = PredictionCache(settings.cache_size)
        self.batcher = MicroBatcher(
            self._send_batch,
            settings.micro_batch_max_texts,
            settings.micro_batch_max_wait_ms / 1000,
            max_in_flight=settings.model_server_workers,
        )
        self.http: httpx.AsyncClient | None = None
        self._tasks: list[asyncio.Task] = []
        self._background: set[asyncio.Task] = set()
        self._candidate_task: asyncio.Task | None = None
        metrics.breaker_open.set_function(lambda: float(self.pool.breaker.is_open))
        metrics.canary_percent.set_function(lambda: self.canary.percent if self.canary else 0.0)

    # -- lifecycle ---------------------------------------------------------------------------

    async def start(self) -> None:
        self.http = httpx.AsyncClient(
            timeout=self.timeout_s, limits=httpx.Limits(max_connections=200, max_keepalive_connections=50)
        )
        for supervisor in (self.supervisor, self.fallback_supervisor):
            if supervisor is not None:
                self._tasks.append(asyncio.create_task(supervisor.run_forever()))
        self._tasks.append(asyncio.create_task(self._watch_health()))

    async def stop(self) -> None:
        tasks = [*self._tasks, *self._background, *([self._candidate_task] if self._candidate_task else [])]
        for task in tasks:
            task.cancel()
        for task in tasks:
            with contextlib.suppress(asyncio.CancelledError, Exception):
                await task
        for supervisor in (self.supervisor, self.fallback_supervisor, self.candidate_supervisor):
            if supervisor is not None:
                await supervisor.shutdown()
        if self.http is not None:
            await self.http.aclose()

    async def _watch_health(self) -> None:
        """Probe prod's /ping; a dead or silent server opens the breaker and is restarted at once."""
        while True:
            await asyncio.sleep(self.settings.health_check_interval_s)
            backend = self.pool.current
            if backend is None or self.http is None:
                continue
            problem = None
            if backend.server is not None and not backend.server.alive():
                problem = f"model server for v{backend.version} exited"
            else:
                try:
                    response = await self.http.get(f"{backend.url}/ping", timeout=PING_TIMEOUT_S)
                    if response.status_code != 200:
                        problem = f"health check of v{backend.version} answered HTTP {response.status_code}"
                except httpx.HTTPError as error:
                    problem = f"health check of v{backend.version} failed: {type(error).__name__}"
            if problem is None:
                continue
            self.pool.breaker.trip(problem)
            if self.supervisor is not None and backend.server is not None and not backend.server.alive():
                self._spawn(self.supervisor.check_once())

    def _spawn(self, work: Awaitable[object]) -> None:
        task = asyncio.ensure_future(work)
        self._background.add(task)
        task.add_done_callback(self._background.discard)

    # -- model calls -------------------------------------------------------------------------

    async def _post(self, backend: Backend, body: dict, texts: int, role: str) -> httpx.Response:
        assert self.http is not None, "TrafficRouter.start() runs in the gateway's lifespan"
        called = time.perf_counter()
        try:
            response = await self.http.post(
                f"{backend.url}/invocations", json=body, headers=forwarded_request_id()
            )
        except httpx.HTTPError:
            self.metrics.model_calls.labels(backend.version, role, "error").inc()
            self._record_canary(role, backend.version, False, time.perf_counter() - called)
            raise
        seconds = time.perf_counter() - called
        answered = response.status_code == 200
        if role in ("prod", "fallback"):
            self.metrics.observe_model_call(seconds, texts if answered else 0)
        self.metrics.model_calls.labels(backend.version, role, "ok" if answered else "error").inc()
        self.metrics.model_call_latency.labels(role).observe(seconds)
        self._record_canary(role, backend.version, response.status_code < 500, seconds)
        return response

    def _record_canary(self, role: str, version: str, ok: bool, seconds: float) -> None:
        canary = self.canary
        if canary is None or not canary.active or role not in ("prod", "canary", "shadow"):
            return
        canary.record("prod" if role == "prod" else "candidate", version, ok, seconds * 1000)
        if role != "prod":
            breach = canary.slo_breach()
            if breach is not None:
                # Ended here and now (no later request reaches the candidate); its server stops after.
                canary.stop("slo-guard", f"SLO breached: {breach}")
                self._spawn(self._unload_candidate())

    async def call_prod(self, body: dict, texts: int) -> tuple[httpx.Response, str]:
        """Prod's answer, or the fallback's while prod's breaker is open or prod just failed.

        Without a fallback: no backend or an open breaker is a 503 with ``Retry-After``; a failed
        call is a 502. A 4xx from the model server is its answer (the input), not a failure.
        """
        breaker = self.pool.breaker
        if not breaker.allow():
            answer = await self._call_fallback(body, texts)
            if answer is not None:
                return answer
            raise Refusal(
                503,
                "model_unavailable",
                f"the model server for {self.pool.model_name}@{self.pool.alias} is failing "
                f"({breaker.last_reason}); no fallback is loaded",
                headers={"Retry-After": str(breaker.retry_after_s())},
            )
        failure: Refusal
        try:
            async with self.pool.lease() as backend:
                response = await self._post(backend, body, texts, "prod")
        except NoBackend as error:
            answer = await self._call_fallback(body, texts)
            if answer is not None:
                return answer
            raise Refusal(
                503, "no_model", str(error), headers={"Retry-After": RETRY_AFTER_NO_BACKEND_S}
            ) from error
        except httpx.HTTPError as error:
            log.error("model server call failed: %r", error)
            breaker.record_failure(f"{type(error).__name__} calling v{backend.version}")
            failure = Refusal(
                502, "upstream_unavailable", f"the model server did not answer: {type(error).__name__}"
            )
        else:
            if response.status_code < 500:
                breaker.record_success()
                return response, backend.version
            breaker.record_failure(f"v{backend.version} answered HTTP {response.status_code}")
            failure = upstream_refusal(response)
        answer = await self._call_fallback(body, texts)
        if answer is not None:
            return answer
        raise failure

    async def _call_fallback(self, body: dict, texts: int) -> tuple[httpx.Response, str] | None:
        pool = self.fallback_pool
        if pool is None or pool.current is None:
            return None
        try:
            async with pool.lease() as backend:
                response = await self._post(backend, body, texts, "fallback")
        except (NoBackend, httpx.HTTPError) as error:
            log.error("the fallback failed too: %r", error)
            return None
        return (response, backend.version) if response.status_code < 500 else None

    async def _call_candidate(self, body: dict, texts: int, role: str) -> tuple[httpx.Response, str] | None:
        pool = self.candidate_pool
        if pool is None or pool.current is None:
            return None
        try:
            async with pool.lease() as backend:
                response = await self._post(backend, body, texts, role)
        except (NoBackend, httpx.HTTPError) as error:
            log.warning("the %s call failed: %r", role, error)
            return None
        return (response, backend.version) if response.status_code < 500 else None

    # -- predictions -------------------------------------------------------------------------

    async def predict_rows(self, caller: str, texts: Sequence[str], top_k: int) -> BatchAnswer:
        """Rows for ``texts`` from the cache and the model server ``caller`` is routed to."""
        role = "canary" if self._candidate_ready() and self.canary.routes_to_candidate(caller) else "prod"  # type: ignore[union-attr]
        serving_now = self._version_for(role)
        cached = self.cache.lookup(serving_now, top_k, texts)
        missing = [index for index, row in enumerate(cached) if row is None]
        if self.cache.enabled:
            self.metrics.observe_cache_hits(len(texts) - len(missing))
            self.metrics.cache_lookups.labels("miss").inc(len(missing))
        if self.canary is not None and self.canary.active:
            self.canary.count_texts("candidate" if role == "canary" else "prod", len(texts))
        if not missing:
            return BatchAnswer([row for row in cached if row is not None], serving_now or "")
        answer = await self.batcher.submit((role, top_k), [texts[index] for index in missing])
        if len(missing) < len(texts) and answer.version != serving_now:
            # A swap between lookup and answer: never mix two versions' answers in one response.
            answer = await self.batcher.submit((role, top_k), list(texts))
            rows = answer.rows
        else:
            rows = list(cached)  # type: ignore[arg-type]
            for index, row in zip(missing, answer.rows, strict=True):
                rows[index] = row
        self.cache.store(answer.version, top_k, [texts[index] for index in missing], answer.rows)
        if self._candidate_ready() and self.canary.mode == "shadow" and role == "prod":  # type: ignore[union-attr]
            self._spawn(self._compare(list(texts), top_k, rows, "shadow"))
        elif role == "canary":
            self._spawn(self._compare(list(texts), top_k, rows, "mirror"))
        return BatchAnswer(rows, answer.version)

    def _version_for(self, role: str) -> str | None:
        pool = self.candidate_pool if role == "canary" else self.pool
        if role == "prod" and self.pool.breaker.is_open:
            pool = self.fallback_pool
        current = pool.current if pool is not None else None
        return current.version if current else None

    async def _send_batch(self, key: Hashable, texts: list[str]) -> BatchAnswer:
        role, top_k = typing.cast(tuple[str, int], key)
        body = invocation_body(texts, top_k=top_k)
        self.metrics.micro_batch_texts.observe(len(texts))
        if role == "canary":
            answer = await self._call_candidate(body, len(texts), "canary")
            if answer is not None and answer[0].status_code == 200:
                return BatchAnswer(prediction_rows(answer[0]), answer[1])
            # The candidate failed (counted against it): the caller gets prod's answer.
        response, version = await self.call_prod(body, len(texts))
        return BatchAnswer(prediction_rows(response), version)

    async def _compare(self, texts: list[str], top_k: int, answered: list[dict], kind: str) -> None:
        """The other side's labels for texts one side answered: agreement, never the caller's answer."""
        body = invocation_body(texts, top_k=top_k)
        if kind == "shadow":
            other = await self._call_candidate(body, len(texts), "shadow")
        else:
            try:
                async with self.pool.lease() as backend:
                    response = await self.http.post(f"{backend.url}/invocations", json=body)  # type: ignore[union-attr]
                other = (response, backend.version)
            except (NoBackend, httpx.HTTPError):
                other = None
        if other is None or other[0].status_code != 200 or self.canary is None:
            return
        try:
            rows = prediction_rows(other[0])
        except Refusal:
            return
        if len(rows) != len(answered):
            return
        ours, theirs = [row["label"] for row in answered], [row["label"] for row in rows]
        prod_labels, candidate_labels = (ours, theirs) if kind == "shadow" else (theirs, ours)
        self.canary.record_agreement(prod_labels, candidate_labels)
        for prod_label, candidate_label in zip(prod_labels, candidate_labels, strict=True):
            self.metrics.canary_agreement.labels(str(prod_label == candidate_label).lower()).inc()

    # -- canary control ----------------------------------------------------------------------

    def _candidate_ready(self) -> bool:
        return (
            self.canary is not None
            and self.canary.active
            and self.candidate_pool is not None
            and self.candidate_pool.current is not None
        )

    async def start_candidate(self, mode: Mode, percent: float, actor: str) -> dict:
        """Load the candidate alias's version beside prod and start sending it traffic."""
        if self.canary is None or self.candidate_factory is None:
            raise Refusal(409, "canary_unavailable", "this gateway has no canary configured (only prod has)")
        if self.canary.active:
            raise Refusal(
                409, "canary_running", "a canary is running: stop it first (tuneloop canary --stop)"
            )
        prod = self.pool.current
        if prod is None:
            raise Refusal(409, "no_model", "prod serves nothing yet: there is nothing to compare with")
        pool, supervisor = self.candidate_factory()
        record = await supervisor.check_once()
        if pool.current is None:
            why = (
                record.error if record is not None and record.error else "the alias names no servable version"
            )
            await supervisor.shutdown()
            raise Refusal(
                409, "candidate_unavailable", f"{pool.model_name}@{pool.alias} cannot be served: {why}"
            )
        if pool.current.version == prod.version:
            await supervisor.shutdown()
            raise Refusal(
                409, "same_version", f"{pool.alias} and prod are both v{prod.version}: nothing to compare"
            )
        self.candidate_pool, self.candidate_supervisor = pool, supervisor
        self.canary.start(mode, percent, actor, prod.version, pool.current.version)
        self._candidate_task = asyncio.create_task(supervisor.run_forever())
        return self.canary.summary()

    async def stop_candidate(self, actor: str, reason: str) -> dict:
        """End the experiment (audit entry) and stop the candidate's model server."""
        if self.canary is None or not self.canary.active:
            raise Refusal(409, "no_canary", "no canary or shadow is running")
        self.canary.stop(actor, reason)
        await self._unload_candidate()
        return self.canary.summary()

    async def _unload_candidate(self) -> None:
        supervisor, self.candidate_supervisor, self.candidate_pool = self.candidate_supervisor, None, None
        task, self._candidate_task = self._candidate_task, None
        if task is not None:
            task.cancel()
            with contextlib.suppress(asyncio.CancelledError):
                await task
        if supervisor is not None:
            await supervisor.shutdown()

    def describe(self) -> dict:
        fallback = self.fallback_pool.current if self.fallback_pool else None
        return {
            "breaker": self.pool.breaker.describe(),
            "fallback": {
                "alias": self.fallback_pool.alias if self.fallback_pool else None,
                "version": fallback.version if fallback else None,
            },
            "micro_batching": {
                "max_texts": self.batcher.max_texts,
                "max_wait_ms": self.batcher.max_wait_s * 1000,
                "calls": self.batcher.calls,
                "mean_texts_per_call": round(sum(self.batcher.sizes) / len(self.batcher.sizes), 2)
                if self.batcher.sizes
                else None,
            },
            "cache": {"enabled": self.cache.enabled, "hits": self.cache.hits, "misses": self.cache.misses},
            "canary": self.canary.summary() if self.canary else None,
        }
