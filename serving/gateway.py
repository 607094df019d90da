"""The stable address of an environment: an ASGI gateway in front of MLflow's model server.

Clients always call the gateway; the supervisor decides which model server stands behind it, so an
alias move never changes the address and never drops a request. Routing and swapping live in
:mod:`serving.routing` and :mod:`serving.supervisor`; this app adds what production traffic needs:

- auth (:mod:`serving.auth`) on every endpoint but ``/healthz``, ``/readyz`` and the OpenAPI docs:
  ``predict`` for predictions, ``feedback`` for true labels, ``admin`` for ``/metrics`` and ``/v1/status``;
- limits (:mod:`serving.limits`): per-credential rate charged per text, body size, content type,
  UTF-8, control characters, text length, batch size — each refusal a 4xx whose JSON body says what
  was wrong; ``/v1/predict`` and ``/invocations`` (JSON or CSV) are held to the same rules;
- the inference log (:mod:`serving.inference_log`): one row per predicted text, PII masked, with the
  caller's principal and optional end-user id (``X-Subject-Id``), written off the response path and
  flushed on shutdown; ``POST /v1/feedback`` attaches the true label later, to the caller's own
  requests only (``admin`` excepted);
- Prometheus metrics (:mod:`serving.metrics`) at ``GET /metrics``.

Every answer carries a request id (``X-Request-ID`` header, and ``request_id`` in JSON bodies).
"""

from __future__ import annotations

import asyncio
import contextlib
import csv
import io
import json
import logging
import time
import uuid
from collections.abc import AsyncIterator, Awaitable, Callable, Sequence
from contextlib import asynccontextmanager
from pathlib import Path
from typing import Annotated, Any

import anyio
import httpx
from fastapi import Depends, FastAPI, Header, Request
from fastapi.exceptions import RequestValidationError
from fastapi.responses import JSONResponse, PlainTextResponse, Response
from pydantic import BaseModel, ConfigDict, Field, ValidationError, model_validator
from starlette.exceptions import HTTPException as StarletteHTTPException

from serving.auth import Authenticator, Principal, authenticator_from_environment
from serving.inference_log import (
    FeedbackRecord,
    InferenceLogWriter,
    PredictionRecord,
    default_dead_letter_path,
    utc_now,
)
from serving.limits import (
    Refusal,
    TextLimits,
    TokenBucketLimiter,
    check_no_control_characters,
    media_type,
    parse_json,
    read_body,
    read_json_model,
    refusal_handler,
    unexpected_error_handler,
    validation_error_handler,
    validation_problems,
)
from serving.metrics import GatewayMetrics
from serving.model_server import invocation_body
from serving.pii import PiiMasker
from serving.routing import BackendPool, NoBackend
from serving.supervisor import AliasSupervisor, SupervisorCollector
from tuneloop.config import Environment, GatewayParams, Params

log = logging.getLogger(__name__)

MODEL_VERSION_HEADER = "X-Model-Version"
REQUEST_ID_HEADER = "X-Request-ID"
SUBJECT_HEADER = "X-Subject-Id"
RETRY_AFTER_NO_BACKEND_S = "5"
# MLflow's scoring protocol also takes CSV; /v1 endpoints take JSON only.
INVOCATION_TYPES = ("application/json", "text/csv")
_HTTP_ERROR_CODES = {401: "unauthorized", 403: "forbidden", 404: "not_found", 405: "method_not_allowed"}
# An end user's id as the caller knows it (pseudonymous, please): visible ASCII, stored for erasure.
SubjectHeader = Annotated[
    str | None,
    Header(
        alias=SUBJECT_HEADER,
        pattern=r"^[!-~]{1,256}$",
        description="Optional id of the end user the texts are about (1-256 visible ASCII characters), "
        "stored on the log rows so that `tuneloop erase --subject` can find them. Use a pseudonymous id.",
    ),
]


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


class RefusalBody(BaseModel):
    """Every refusal: a stable error code and what was wrong (never the input, never a stack trace)."""

    model_config = ConfigDict(extra="allow")

    error: str
    detail: str
    request_id: str | None = None


def _refusals(*statuses: int) -> dict[int | str, dict[str, Any]]:
    return {
        status: {"model": RefusalBody, "description": _REFUSAL_DESCRIPTIONS[status]} for status in statuses
    }


_REFUSAL_DESCRIPTIONS = {
    400: "Malformed body: invalid JSON, CSV or UTF-8, a control character, an input MLflow cannot read",
    401: "Missing or invalid credentials",
    403: "The credentials lack the scope",
    404: "Unknown request id (or another caller's)",
    413: "Body too large",
    415: "Unsupported content type",
    422: "The body does not match the schema or breaks a limit",
    429: "Rate limited (see Retry-After)",
    502: "The model server failed",
    503: "No model is being served, or credentials cannot be checked now (see Retry-After)",
}
_AUTH_REFUSALS = (401, 403, 429, 503)


class InvocationParams(BaseModel):
    """``params`` of an ``/invocations`` body: the same ``top_k`` as ``/v1/predict``, nothing else."""

    model_config = ConfigDict(extra="forbid")

    top_k: int | None = Field(None, ge=1, le=100)


# What TextLimits accepts, as JSON Schema, so the API docs (and clients generated from them) say it.
_NO_CONTROL_CHARACTERS = "^[^\u0000-\u0008\u000b-\u001f\u007f-\u009f]*$"


def text_schemas(limits: TextLimits) -> tuple[dict, dict]:
    """One text and a batch of texts as the limits allow them (blank texts are still a 422 at run time)."""
    text = {
        "type": "string",
        "minLength": 1,
        "maxLength": limits.max_text_chars,
        "pattern": _NO_CONTROL_CHARACTERS,
        "description": "No control characters but tab and newline",
    }
    return text, {"type": "array", "items": text, "minItems": 1, "maxItems": limits.max_batch_size}


def predict_request_schema(limits: TextLimits) -> dict:
    """PredictRequest's schema with the limits filled in and "exactly one of text or texts" spelled out."""
    schema = PredictRequest.model_json_schema()
    text, texts = text_schemas(limits)
    schema["properties"]["text"] = {"anyOf": [text, {"type": "null"}], "default": None}
    schema["properties"]["texts"] = {"anyOf": [texts, {"type": "null"}], "default": None}
    given = {"text": {"required": ["text"], "properties": {"text": {"type": "string"}}}}
    given["texts"] = {"required": ["texts"], "properties": {"texts": {"type": "array"}}}
    # A null counts as absent, as PredictRequest reads it.
    schema["oneOf"] = [given["text"] | {"not": given["texts"]}, given["texts"] | {"not": given["text"]}]
    return schema


def invocation_content(limits: TextLimits) -> dict:
    """MLflow's JSON formats and CSV for the pyfunc's one `text` column, as :func:`texts_of_invocation`
    and :func:`texts_of_csv` read them."""
    text, texts = text_schemas(limits)
    params = {"params": {"anyOf": [InvocationParams.model_json_schema(), {"type": "null"}]}}
    one_or_many = {"anyOf": [text, texts]}
    records = {
        "type": "array",
        "items": {"type": "object", "required": ["text"], "properties": {"text": text}},
        "minItems": 1,
        "maxItems": limits.max_batch_size,
    }
    by_key = {
        "anyOf": [
            text,
            texts,
            records,
            {"type": "object", "required": ["text"], "properties": {"text": one_or_many}},
        ]
    }
    # The pyfunc's own form (one `text` column), then the general one MLflow also reads (extra columns
    # are ignored; rows must hold a string where `text` is).
    one_column = {
        "type": "object",
        "required": ["columns", "data"],
        "properties": {
            "columns": {"type": "array", "prefixItems": [{"const": "text"}], "minItems": 1, "maxItems": 1},
            "data": {
                "type": "array",
                "items": {"type": "array", "prefixItems": [text], "minItems": 1, "maxItems": 1},
                "minItems": 1,
                "maxItems": limits.max_batch_size,
            },
        },
    }
    any_columns = {
        "type": "object",
        "required": ["columns", "data"],
        "properties": {
            "columns": {"type": "array", "items": {"type": "string"}, "contains": {"const": "text"}},
            "data": {
                "type": "array",
                "items": {"type": "array"},
                "minItems": 1,
                "maxItems": limits.max_batch_size,
            },
        },
    }
    split = {"anyOf": [one_column, any_columns]}
    return {
        "application/json": {
            "schema": {
                "anyOf": [
                    {"type": "object", "required": [key], "properties": {key: value, **params}}
                    for key, value in (
                        ("dataframe_split", split),
                        ("dataframe_records", records),
                        ("inputs", by_key),
                        ("instances", by_key),
                    )
                ]
            }
        },
        "text/csv": {
            "schema": {
                "type": "string",
                "pattern": "^[^\\r\\n]*\\btext\\b",
                "description": "CSV with a header row that has a `text` column",
            }
        },
    }


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


def predictions_from_server(payload: object) -> list[Prediction]:
    """The pyfunc's rows (``top_k`` is a JSON string so every MLflow format carries it) as objects.

    An answer of another shape is the model server's failure (502), never a 500 of ours.
    """
    try:
        rows = payload["predictions"]  # type: ignore[index]
        return [
            Prediction(label=row["label"], score=row["score"], top_k=json.loads(row["top_k"])) for row in rows
        ]
    except (KeyError, TypeError, ValueError, ValidationError) as error:
        log.error("model server answered with an unexpected shape: %r", error)
        raise Refusal(
            502, "upstream_error", "the model server gave an answer the gateway cannot read"
        ) from error


def texts_of_invocation(payload: object) -> list[str] | None:
    """The texts of an MLflow-protocol JSON body; None when the body holds no list of strings to find.

    ``dataframe_split`` (a ``text`` column, other columns ignored), ``dataframe_records`` (objects with
    ``text``), ``inputs`` / ``instances`` (a string, strings, objects with ``text``, or ``{"text": ...}``).
    """
    if not isinstance(payload, dict):
        return None
    if "dataframe_split" in payload:
        split = payload["dataframe_split"]
        columns = split.get("columns") if isinstance(split, dict) else None
        data = split.get("data") if isinstance(split, dict) else None
        if not (isinstance(columns, list) and "text" in columns and isinstance(data, list)):
            return None
        if not all(isinstance(name, str) for name in columns) or not all(
            isinstance(row, list) for row in data
        ):
            return None
        at = columns.index("text")
        return _only_strings([row[at] if at < len(row) else None for row in data])
    if "dataframe_records" in payload:
        records = payload["dataframe_records"]
        if not (isinstance(records, list) and all(isinstance(record, dict) for record in records)):
            return None
        return _only_strings([record.get("text") for record in records])
    for key in ("inputs", "instances"):
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
    return None


def texts_of_csv(raw: str) -> list[str]:
    """The ``text`` column of a CSV body with a header row (blank lines skipped, as MLflow's pandas does)."""
    try:
        rows = [row for row in csv.reader(io.StringIO(raw, newline="")) if row]
    except csv.Error as error:
        raise Refusal(400, "invalid_csv", f"the body is not valid CSV: {error}") from error
    # Spreadsheets write a byte-order mark before the first column name.
    header = [name.strip().lstrip("\ufeff") for name in rows[0]] if rows else []
    if "text" not in header:
        raise Refusal(400, "unrecognised_input", "a CSV body needs a header row with a `text` column")
    at = header.index("text")
    texts = []
    for number, row in enumerate(rows[1:], start=1):
        if at >= len(row):
            raise Refusal(400, "invalid_csv", f"CSV row {number} has no `text` value")
        texts.append(row[at])
    return texts


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
    if supervisor is not None:
        metrics.registry.register(SupervisorCollector(supervisor))
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
                "inference log closed: %d rows written, %d dropped, %d dead-lettered (%s), %d failed",
                inference_log.written_rows,
                inference_log.dropped_rows,
                inference_log.dead_lettered_rows,
                inference_log.dead_letter_path,
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
        """Authenticate with ``scope``; refuse a caller whose bucket is empty before its body is read.

        The bucket is charged per text once the texts are counted (:func:`charge`).
        """
        authenticate = authenticator.require(scope)

        # `Depends` as a default, not in `Annotated`: postponed annotations are resolved in the module's
        # globals, where the local `authenticate` does not exist.
        async def dependency(principal: Principal = Depends(authenticate)) -> Principal:  # noqa: B008 - FastAPI DI
            limiter.check(principal.rate_limit_key, take=False)
            return principal

        return dependency

    def charge(request: Request, texts: int) -> Principal:
        principal: Principal = request.state.principal
        limiter.check(principal.rate_limit_key, texts)
        return principal

    predict_caller = rate_limited("predict")
    feedback_caller = rate_limited("feedback")
    admin_caller = authenticator.require("admin")

    async def call_model_server(request_body: dict) -> tuple[httpx.Response, str]:
        """POST to the model server now serving; no backend is a 503, a failed call a 502."""
        try:
            async with pool.lease() as backend:
                response = await app.state.http.post(f"{backend.url}/invocations", json=request_body)
                return response, backend.version
        except NoBackend as error:
            raise _no_backend(error) from error
        except httpx.HTTPError as error:
            raise _upstream_failed(error) from error

    async def log_predictions(
        request: Request, texts: Sequence[str], predictions: list, version: str, subject: str | None
    ) -> None:
        created_at = request.state.created_at
        latency_ms = (time.perf_counter() - request.state.started) * 1000
        principal: Principal = request.state.principal
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
                principal=principal.id,
                subject=subject,
            )
            for index, (text, prediction) in enumerate(zip(texts, predictions, strict=True))
        ]
        for record in records:
            metrics.predictions.labels(record.label, version).inc()
        await inference_log.asubmit(records)

    predict_schema = {"content": {"application/json": {"schema": predict_request_schema(text_limits)}}}

    @app.post(
        "/v1/predict",
        response_model=PredictResponse,
        dependencies=[Depends(predict_caller)],
        openapi_extra={"requestBody": {"required": True, **predict_schema}},
        responses=_refusals(400, 413, 415, 422, 502, *_AUTH_REFUSALS),
    )
    async def predict(request: Request, subject: SubjectHeader = None) -> PredictResponse:
        """Label one text or a batch. Needs scope ``predict``; costs one rate-limit token per text."""
        request.state.created_at = utc_now()
        body = await read_json_model(request, PredictRequest, settings.max_body_bytes)
        texts = body.all_texts()
        text_limits.check(texts)
        charge(request, len(texts))
        top_k = body.top_k or default_top_k
        response, version = await call_model_server(invocation_body(texts, top_k=top_k))
        if response.status_code != 200:
            raise _upstream_refusal(response)
        predictions = predictions_from_server(_json_or_none(response))
        if len(predictions) != len(texts):
            raise Refusal(502, "upstream_error", "the model server answered a different number of texts")
        await log_predictions(request, texts, predictions, version, subject)
        return PredictResponse(
            request_id=request.state.request_id,
            model_name=pool.model_name,
            model_version=version,
            predictions=predictions,
        )

    @app.post(
        "/invocations",
        dependencies=[Depends(predict_caller)],
        openapi_extra={"requestBody": {"required": True, "content": invocation_content(text_limits)}},
        responses={
            200: {"description": "MLflow's answer, unchanged", "content": {"application/json": {}}},
            **_refusals(400, 413, 415, 422, 502, *_AUTH_REFUSALS),
        },
    )
    async def invocations(request: Request, subject: SubjectHeader = None) -> Response:
        """MLflow's scoring protocol, for clients written against it. Needs scope ``predict``.

        JSON (``dataframe_split``, ``dataframe_records``, ``inputs``, ``instances``, with optional
        ``params``) or CSV with a ``text`` column: held to the same limits as ``/v1/predict``, charged
        per text, logged. The model server gets the texts the gateway checked (as ``dataframe_split``),
        so what is predicted is exactly what is logged; its answer comes back unchanged.
        """
        request.state.created_at = utc_now()
        raw = await read_body(request, settings.max_body_bytes, INVOCATION_TYPES)
        params = None
        if media_type(request) == "text/csv":
            texts = texts_of_csv(raw)
        else:
            payload = parse_json(raw)
            found = texts_of_invocation(payload)
            if found is None:
                raise Refusal(
                    400,
                    "unrecognised_input",
                    "no list of strings under a `text` column in dataframe_split, dataframe_records, "
                    "inputs or instances",
                )
            texts = found
            if payload.get("params") is not None:
                try:
                    params = InvocationParams.model_validate(payload["params"]).model_dump(exclude_none=True)
                except ValidationError as error:
                    raise Refusal(
                        422,
                        "invalid_request",
                        "`params` takes only `top_k` (1 to 100)",
                        problems=validation_problems(error.errors()),
                    ) from error
        text_limits.check(texts)
        charge(request, len(texts))
        forwarded = invocation_body(texts)
        if params is not None:
            forwarded["params"] = params
        upstream, version = await call_model_server(forwarded)
        if upstream.status_code != 200:
            raise _upstream_refusal(upstream)
        rows = _prediction_rows(upstream)
        if rows is None or len(rows) != len(texts):
            raise Refusal(502, "upstream_error", "the model server answered a different number of texts")
        await log_predictions(request, texts, rows, version, subject)
        return Response(
            upstream.content,
            status_code=upstream.status_code,
            media_type=upstream.headers.get("content-type"),
            headers={MODEL_VERSION_HEADER: version},
        )

    feedback_body = FeedbackRequest.model_json_schema()
    feedback_body["properties"]["true_label"] = {"type": "string", "enum": sorted(known_labels)}
    feedback_schema = {"content": {"application/json": {"schema": feedback_body}}}

    @app.post(
        "/v1/feedback",
        response_model=FeedbackResponse,
        dependencies=[Depends(feedback_caller)],
        openapi_extra={"requestBody": {"required": True, **feedback_schema}},
        responses=_refusals(400, 404, 413, 415, 422, *_AUTH_REFUSALS),
    )
    async def feedback(request: Request) -> FeedbackResponse:
        """True label of a predicted text: its answer's ``request_id``, ``item_index``. Scope ``feedback``.

        Only on the caller's own requests (same API key or token subject); ``admin`` may label any.
        """
        body = await read_json_model(request, FeedbackRequest, settings.max_body_bytes)
        check_no_control_characters(body.true_label, "true_label")
        principal = charge(request, 1)
        if body.true_label not in known_labels:
            shown = sorted(known_labels)
            raise Refusal(
                422,
                "unknown_label",
                f"{body.true_label!r} is not one of the {len(shown)} labels",
                labels=shown,
            )
        owner = await anyio.to_thread.run_sync(inference_log.request_owner, body.request_id)
        # Another caller's request reads as unknown: its existence is not the caller's business.
        if owner is None or not (principal.is_admin or owner.principal == principal.id):
            raise Refusal(
                404, "unknown_request", f"no logged prediction of yours has request id '{body.request_id}'"
            )
        if body.item_index >= owner.items:
            raise Refusal(
                422,
                "item_index_out_of_range",
                f"request '{body.request_id}' predicted {owner.items} texts; "
                f"item_index must be below {owner.items}",
            )
        record = FeedbackRecord(body.request_id, body.item_index, body.true_label, utc_now(), principal.id)
        if not await inference_log.asubmit([record]):
            raise Refusal(503, "log_full", "the inference log cannot take feedback now; retry later")
        metrics.feedback.labels(body.true_label).inc()
        return FeedbackResponse(
            request_id=request.state.request_id,
            feedback_for=body.request_id,
            item_index=body.item_index,
            true_label=body.true_label,
        )

    @app.get(
        "/metrics",
        dependencies=[Depends(admin_caller)],
        response_class=PlainTextResponse,
        responses=_refusals(*_AUTH_REFUSALS),
    )
    async def prometheus_metrics() -> Response:
        """Prometheus exposition. Scope ``admin``."""
        current = pool.current
        metrics.set_serving(pool.model_name, pool.alias, current.version if current else None)
        content, media_type = metrics.exposition()
        return Response(content, media_type=media_type)

    @app.get("/healthz")
    async def healthz() -> dict:
        return {"status": "ok"}

    @app.get("/readyz", responses={503: {"description": "No model is being served yet"}})
    async def readyz() -> JSONResponse:
        current = pool.current
        body = {
            "ready": current is not None,
            "model_name": pool.model_name,
            "alias": pool.alias,
            "model_version": current.version if current else None,
        }
        return JSONResponse(body, status_code=200 if current else 503)

    @app.get("/v1/status", dependencies=[Depends(admin_caller)], responses=_refusals(*_AUTH_REFUSALS))
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


def _json_or_none(response: httpx.Response) -> object:
    try:
        return response.json()
    except ValueError:
        return None


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
    authenticator = authenticator_from_environment(
        env,
        leeway_s=gateway.jwt_leeway_s,
        jwks_timeout_s=gateway.jwt_jwks_timeout_s,
        failed_auth_rate_per_s=gateway.failed_auth_rate_per_s,
        failed_auth_burst=gateway.failed_auth_burst,
    )
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
        write_attempts=gateway.log_write_attempts,
        dead_letter_path=dead_letter_path(gateway.log_dead_letter_path, env),
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


def dead_letter_path(configured: str | Path | None, env: Environment) -> Path:
    """The configured path (relative to TUNELOOP_HOME), else beside a SQLite log, else in TUNELOOP_HOME."""
    if configured:
        return env.home_dir / Path(configured)
    if env.inference_log_url.startswith("sqlite"):
        return default_dead_letter_path(env.inference_log_url)
    return env.home_dir / "inference_log.deadletter.jsonl"
