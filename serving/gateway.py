"""The stable address of an environment: an ASGI gateway in front of MLflow's model server.

Clients always call the gateway; the supervisor decides which model server stands behind it, so an
alias move never changes the address and never drops a request. Routing and swapping live in
:mod:`serving.routing` and :mod:`serving.supervisor`; this app adds what production traffic needs:

- auth (:mod:`serving.auth`) on every endpoint but ``/healthz``, ``/readyz`` and the OpenAPI docs:
  ``predict`` for predictions, ``feedback`` for true labels, ``admin`` for ``/metrics`` and ``/v1/status``;
- limits (:mod:`serving.limits`): per-credential rate, body size, content type, UTF-8, text length,
  batch size — each refusal a 4xx whose JSON body says what was wrong;
- the inference log (:mod:`serving.inference_log`): one row per predicted text, PII masked, written off
  the response path and flushed on shutdown; ``POST /v1/feedback`` attaches the true label later;
- Prometheus metrics (:mod:`serving.metrics`) at ``GET /metrics``.

Every answer carries a request id (``X-Request-ID`` header, and ``request_id`` in JSON bodies).
"""

from __future__ import annotations

import asyncio
import contextlib
import json
import logging
import time
import uuid
from collections.abc import AsyncIterator, Awaitable, Callable, Sequence
from contextlib import asynccontextmanager
from pathlib import Path

import anyio
import httpx
from fastapi import Depends, FastAPI, Request
from fastapi.exceptions import RequestValidationError
from fastapi.responses import JSONResponse, Response
from pydantic import BaseModel, ConfigDict, Field, model_validator
from starlette.exceptions import HTTPException as StarletteHTTPException

from serving.auth import Authenticator, Principal, authenticator_from_environment
from serving.inference_log import FeedbackRecord, InferenceLogWriter, PredictionRecord, utc_now
from serving.limits import (
    Refusal,
    TextLimits,
    TokenBucketLimiter,
    parse_json,
    read_body,
    read_json_model,
    refusal_handler,
    unexpected_error_handler,
    validation_error_handler,
)
from serving.metrics import GatewayMetrics
from serving.model_server import invocation_body
from serving.pii import PiiMasker
from serving.routing import BackendPool, NoBackend
from serving.supervisor import AliasSupervisor
from tuneloop.config import Environment, GatewayParams, Params

log = logging.getLogger(__name__)

MODEL_VERSION_HEADER = "X-Model-Version"
REQUEST_ID_HEADER = "X-Request-ID"
RETRY_AFTER_NO_BACKEND_S = "5"
# MLflow's scoring protocol also takes CSV; /v1 endpoints take JSON only.
INVOCATION_TYPES = ("application/json", "text/csv")
_HTTP_ERROR_CODES = {401: "unauthorized", 403: "forbidden", 404: "not_found", 405: "method_not_allowed"}


class PredictRequest(BaseModel):
    """One text (``text``) or a batch (``texts``); ``top_k`` alternatives per text."""

    model_config = ConfigDict(extra="forbid")

    text: str | None = None
    texts: list[str] | None = Field(None, min_length=1)
    top_k: int | None = Field(None, ge=1, le=100)

    @model_validator(mode="after")
    def _exactly_one_input(self) -> PredictRequest:
        if (self.text is None) == (self.texts is None):
            raise ValueError("give exactly one of `text` (a string) or `texts` (a list of strings)")
        return self

    def all_texts(self) -> list[str]:
        return [self.text] if self.text is not None else list(self.texts or [])


class LabelScore(BaseModel):
    label: str
    score: float


class Prediction(BaseModel):
    label: str
    score: float
    top_k: list[LabelScore]


class PredictResponse(BaseModel):
    request_id: str
    model_name: str
    model_version: str
    predictions: list[Prediction]


class FeedbackRequest(BaseModel):
    """The true label of one predicted text: the ``request_id`` of its answer and its index in the batch."""

    model_config = ConfigDict(extra="forbid")

    request_id: str = Field(pattern=r"^[A-Za-z0-9_-]{1,64}$")
    item_index: int = Field(0, ge=0)
    true_label: str = Field(min_length=1, max_length=256)


class FeedbackResponse(BaseModel):
    request_id: str
    feedback_for: str
    item_index: int
    true_label: str
    status: str = "accepted"


def predictions_from_server(payload: dict) -> list[Prediction]:
    """The pyfunc's rows (``top_k`` is a JSON string so every MLflow format carries it) as objects."""
    return [
        Prediction(label=row["label"], score=row["score"], top_k=json.loads(row["top_k"]))
        for row in payload["predictions"]
    ]


def texts_of_invocation(payload: object) -> list[str] | None:
    """The texts of an MLflow-protocol JSON body (split, records, inputs, instances); None if not found."""
    if not isinstance(payload, dict):
        return None
    if isinstance(split := payload.get("dataframe_split"), dict):
        columns, data = split.get("columns") or [], split.get("data") or []
        if "text" in columns and all(isinstance(row, list) for row in data):
            at = columns.index("text")
            return _only_strings([row[at] if at < len(row) else None for row in data])
        return None
    for key in ("dataframe_records", "inputs", "instances"):
        if key not in payload:
            continue
        value = payload[key]
        if isinstance(value, dict):
            value = value.get("text")
        if isinstance(value, str):
            value = [value]
        if isinstance(value, list):
            return _only_strings([item.get("text") if isinstance(item, dict) else item for item in value])
    return None


def _only_strings(values: list[object]) -> list[str] | None:
    """``values`` when every one is a string, else None."""
    strings = [value for value in values if isinstance(value, str)]
    return strings if len(strings) == len(values) else None


def _no_backend(error: NoBackend) -> Refusal:
    return Refusal(503, "no_model", str(error), headers={"Retry-After": RETRY_AFTER_NO_BACKEND_S})


def _upstream_failed(error: httpx.HTTPError) -> Refusal:
    log.error("model server call failed: %r", error)
    return Refusal(502, "upstream_unavailable", f"the model server did not answer: {type(error).__name__}")


def create_app(
    pool: BackendPool,
    supervisor: AliasSupervisor | None = None,
    *,
    authenticator: Authenticator,
    inference_log: InferenceLogWriter,
    labels: Sequence[str],
    settings: GatewayParams,
    metrics: GatewayMetrics | None = None,
    drift_summary_path: Path | None = None,
    default_top_k: int,
    upstream_timeout_s: float,
) -> FastAPI:
    """The gateway for one environment. With a supervisor, its alias-following loop runs in the app.

    ``inference_log`` is started with the app and closed (everything queued written) on shutdown;
    ``labels`` is the label set feedback is checked against; ``drift_summary_path`` makes
    ``/metrics`` export the drift job's latest result.
    """
    metrics = metrics or GatewayMetrics()
    metrics.watch_inference_log(inference_log)
    if drift_summary_path is not None:
        metrics.watch_drift(drift_summary_path)
    limiter = TokenBucketLimiter(settings.rate_limit_per_s, settings.rate_limit_burst)
    text_limits = TextLimits(settings.max_text_chars, settings.max_batch_size)
    known_labels = frozenset(labels)

    @asynccontextmanager
    async def lifespan(app: FastAPI) -> AsyncIterator[None]:
        inference_log.start()
        app.state.http = httpx.AsyncClient(
            timeout=upstream_timeout_s, limits=httpx.Limits(max_connections=200, max_keepalive_connections=50)
        )
        watcher = asyncio.create_task(supervisor.run_forever()) if supervisor is not None else None
        try:
            yield
        finally:
            # uvicorn calls this after in-flight requests have finished: their log rows are queued.
            if supervisor is not None and watcher is not None:
                watcher.cancel()
                with contextlib.suppress(asyncio.CancelledError):
                    await watcher
                await supervisor.shutdown()
            await app.state.http.aclose()
            await anyio.to_thread.run_sync(inference_log.close)
            log.info(
                "inference log closed: %d rows written, %d dropped, %d failed",
                inference_log.written_rows,
                inference_log.dropped_rows,
                inference_log.failed_rows,
            )

    app = FastAPI(
        title="tuneloop gateway",
        summary=f"Stable address of {pool.model_name}@{pool.alias}",
        lifespan=lifespan,
    )
    app.state.inference_log = inference_log
    app.state.metrics = metrics
    # Starlette types a handler as taking `Exception`, so one for a subclass is rejected although
    # Starlette only calls it with that subclass (Kludex/starlette#2417; fix proposed in #2403).
    app.add_exception_handler(Refusal, refusal_handler)  # type: ignore[arg-type]
    app.add_exception_handler(RequestValidationError, validation_error_handler)  # type: ignore[arg-type]
    app.add_exception_handler(StarletteHTTPException, _http_error_handler)  # type: ignore[arg-type]
    app.add_exception_handler(Exception, unexpected_error_handler)

    @app.middleware("http")
    async def request_id_and_metrics(request: Request, call_next: Callable[[Request], Awaitable[Response]]):
        request.state.request_id = uuid.uuid4().hex
        request.state.started = time.perf_counter()
        try:
            response = await call_next(request)
        except Exception:
            _observe(request, 500, "internal_error")
            raise
        response.headers[REQUEST_ID_HEADER] = request.state.request_id
        _observe(request, response.status_code, getattr(request.state, "refusal", None))
        return response

    def _observe(request: Request, status: int, reason: str | None) -> None:
        route = request.scope.get("route")
        endpoint = getattr(route, "path", "unmatched")  # the template, so ids in paths add no series
        metrics.requests.labels(endpoint, str(status)).inc()
        metrics.latency.labels(endpoint).observe(time.perf_counter() - request.state.started)
        if status >= 400:
            metrics.errors.labels(endpoint, reason or _HTTP_ERROR_CODES.get(status, f"http_{status}")).inc()

    def rate_limited(scope: str) -> Callable[[Principal], Awaitable[Principal]]:
        """Authenticate with ``scope``, then charge the caller's token bucket."""
        authenticate = authenticator.require(scope)

        # `Depends` as a default, not in `Annotated`: postponed annotations are resolved in the module's
        # globals, where the local `authenticate` does not exist.
        async def dependency(principal: Principal = Depends(authenticate)) -> Principal:  # noqa: B008 - FastAPI DI
            limiter.check(principal.rate_limit_key)
            return principal

        return dependency

    predict_caller = rate_limited("predict")
    feedback_caller = rate_limited("feedback")
    admin_caller = authenticator.require("admin")

    async def call_model_server(request_body: dict) -> tuple[httpx.Response, str]:
        async with pool.lease() as backend:
            response = await app.state.http.post(f"{backend.url}/invocations", json=request_body)
            return response, backend.version

    async def log_predictions(
        request: Request, texts: Sequence[str], predictions: list, version: str
    ) -> None:
        created_at = request.state.created_at
        latency_ms = (time.perf_counter() - request.state.started) * 1000
        records = [
            PredictionRecord(
                request_id=request.state.request_id,
                item_index=index,
                created_at=created_at,
                model_name=pool.model_name,
                model_version=version,
                text=text,
                label=prediction["label"] if isinstance(prediction, dict) else prediction.label,
                score=prediction["score"] if isinstance(prediction, dict) else prediction.score,
                latency_ms=latency_ms,
            )
            for index, (text, prediction) in enumerate(zip(texts, predictions, strict=True))
        ]
        for record in records:
            metrics.predictions.labels(record.label, version).inc()
        await inference_log.asubmit(records)

    predict_schema = {"content": {"application/json": {"schema": PredictRequest.model_json_schema()}}}

    @app.post(
        "/v1/predict",
        response_model=PredictResponse,
        dependencies=[Depends(predict_caller)],
        openapi_extra={"requestBody": {"required": True, **predict_schema}},
    )
    async def predict(request: Request) -> PredictResponse:
        """Label one text or a batch. Needs scope ``predict``."""
        request.state.created_at = utc_now()
        body = await read_json_model(request, PredictRequest, settings.max_body_bytes)
        texts = body.all_texts()
        text_limits.check(texts)
        top_k = body.top_k or default_top_k
        try:
            response, version = await call_model_server(invocation_body(texts, top_k=top_k))
        except NoBackend as error:
            raise _no_backend(error) from error
        except httpx.HTTPError as error:
            raise _upstream_failed(error) from error
        if response.status_code != 200:
            raise _upstream_refusal(response)
        predictions = predictions_from_server(response.json())
        await log_predictions(request, texts, predictions, version)
        return PredictResponse(
            request_id=request.state.request_id,
            model_name=pool.model_name,
            model_version=version,
            predictions=predictions,
        )

    @app.post("/invocations", dependencies=[Depends(predict_caller)])
    async def invocations(request: Request) -> Response:
        """MLflow's scoring protocol, passed through unchanged, for clients written against it.

        Needs scope ``predict``; JSON bodies are held to the same limits as ``/v1/predict`` and logged.
        """
        request.state.created_at = utc_now()
        content_type = request.headers.get("content-type", "application/json")
        raw = await read_body(request, settings.max_body_bytes, INVOCATION_TYPES)
        texts = None
        if content_type.startswith("application/json"):
            texts = texts_of_invocation(parse_json(raw))
            if texts is not None:
                text_limits.check(texts)
        try:
            async with pool.lease() as backend:
                upstream = await app.state.http.post(
                    f"{backend.url}/invocations",
                    content=raw.encode("utf-8"),
                    headers={"content-type": content_type},
                )
        except NoBackend as error:
            raise _no_backend(error) from error
        except httpx.HTTPError as error:
            raise _upstream_failed(error) from error
        if upstream.status_code != 200:
            raise _upstream_refusal(upstream)
        if upstream.status_code == 200:
            rows = _prediction_rows(upstream)
            if texts is not None and rows is not None and len(rows) == len(texts):
                await log_predictions(request, texts, rows, backend.version)
            else:
                # CSV, or a body whose texts could not be matched to answers: answered but not logged.
                metrics.errors.labels("/invocations", "not_logged").inc()
                log.warning("answered an /invocations request whose texts could not be logged")
        return Response(
            upstream.content,
            status_code=upstream.status_code,
            media_type=upstream.headers.get("content-type"),
            headers={MODEL_VERSION_HEADER: backend.version},
        )

    feedback_schema = {"content": {"application/json": {"schema": FeedbackRequest.model_json_schema()}}}

    @app.post(
        "/v1/feedback",
        response_model=FeedbackResponse,
        dependencies=[Depends(feedback_caller)],
        openapi_extra={"requestBody": {"required": True, **feedback_schema}},
    )
    async def feedback(request: Request) -> FeedbackResponse:
        """True label of a predicted text: its answer's ``request_id``, ``item_index``. Scope ``feedback``."""
        body = await read_json_model(request, FeedbackRequest, settings.max_body_bytes)
        if body.true_label not in known_labels:
            shown = sorted(known_labels)
            raise Refusal(
                422,
                "unknown_label",
                f"{body.true_label!r} is not one of the {len(shown)} labels",
                labels=shown,
            )
        items = await anyio.to_thread.run_sync(inference_log.items_in_request, body.request_id)
        if items is None:
            raise Refusal(404, "unknown_request", f"no logged prediction has request id '{body.request_id}'")
        if body.item_index >= items:
            raise Refusal(
                422,
                "item_index_out_of_range",
                f"request '{body.request_id}' predicted {items} texts; item_index must be below {items}",
            )
        record = FeedbackRecord(body.request_id, body.item_index, body.true_label, utc_now())
        if not await inference_log.asubmit([record]):
            raise Refusal(503, "log_full", "the inference log cannot take feedback now; retry later")
        metrics.feedback.labels(body.true_label).inc()
        return FeedbackResponse(
            request_id=request.state.request_id,
            feedback_for=body.request_id,
            item_index=body.item_index,
            true_label=body.true_label,
        )

    @app.get("/metrics", dependencies=[Depends(admin_caller)])
    async def prometheus_metrics() -> Response:
        """Prometheus exposition. Scope ``admin``."""
        current = pool.current
        metrics.set_serving(pool.model_name, pool.alias, current.version if current else None)
        content, media_type = metrics.exposition()
        return Response(content, media_type=media_type)

    @app.get("/healthz")
    async def healthz() -> dict:
        return {"status": "ok"}

    @app.get("/readyz")
    async def readyz() -> JSONResponse:
        current = pool.current
        body = {
            "ready": current is not None,
            "model_name": pool.model_name,
            "alias": pool.alias,
            "model_version": current.version if current else None,
        }
        return JSONResponse(body, status_code=200 if current else 503)

    @app.get("/v1/status", dependencies=[Depends(admin_caller)])
    async def status() -> dict:
        """What this environment serves and its recent swaps (for operators). Scope ``admin``."""
        if supervisor is not None:
            return supervisor.describe()
        current = pool.current
        version = current.version if current else None
        return {"model_name": pool.model_name, "alias": pool.alias, "serving_version": version}

    return app


def _upstream_refusal(response: httpx.Response) -> Refusal:
    """A model server's error as a refusal: its message only, never its stack trace."""
    if response.status_code >= 500 or response.status_code < 400:
        return Refusal(502, "upstream_error", f"the model server failed with HTTP {response.status_code}")
    try:
        message = str(response.json().get("message", ""))
    except (ValueError, AttributeError):
        message = response.text
    message = message.split("Traceback", 1)[0].strip()[:500]
    return Refusal(400, "rejected_by_model", f"the model server refused the input: {message}")


def _prediction_rows(response: httpx.Response) -> list[dict] | None:
    try:
        rows = response.json().get("predictions")
    except (ValueError, AttributeError):
        return None
    if isinstance(rows, list) and all(
        isinstance(row, dict) and "label" in row and "score" in row for row in rows
    ):
        return rows
    return None


async def _http_error_handler(request: Request, error: StarletteHTTPException) -> JSONResponse:
    """401/403/404/405 in the refusal format (auth challenges keep their WWW-Authenticate header)."""
    code = _HTTP_ERROR_CODES.get(error.status_code, f"http_{error.status_code}")
    return Refusal(error.status_code, code, str(error.detail), headers=error.headers).response(request)


def create_gateway(
    pool: BackendPool, supervisor: AliasSupervisor | None, params: Params, env: Environment
) -> FastAPI:
    """The gateway as ``tuneloop serve`` runs it: settings from params.yaml, secrets and URLs from the env."""
    gateway = params.gateway
    authenticator = authenticator_from_environment(env, leeway_s=gateway.jwt_leeway_s)
    if authenticator.jwt_verifier is None and not (env.api_keys_path and env.api_keys_path.exists()):
        log.warning(
            "no API key file at %s and no JWT issuer configured: every request will be refused. "
            "Create a key with `tuneloop keys create --name <who> --scopes predict`.",
            env.api_keys_path,
        )
    inference_log = InferenceLogWriter(
        env.inference_log_url,
        queue_size=gateway.log_queue_size,
        batch_size=gateway.log_batch_size,
        flush_interval_s=gateway.log_flush_interval_s,
        enqueue_timeout_s=gateway.log_enqueue_timeout_s,
        masker=PiiMasker(phone_region=gateway.pii_phone_region),
    )
    return create_app(
        pool,
        supervisor,
        authenticator=authenticator,
        inference_log=inference_log,
        labels=params.data.labels,
        settings=gateway,
        drift_summary_path=env.paths.drift_summary,
        default_top_k=params.serving.default_top_k,
        upstream_timeout_s=params.serving.request_timeout_s,
    )
