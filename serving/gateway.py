"""The stable address of an environment: an ASGI gateway in front of MLflow's model server.

Clients always call the gateway; the supervisor decides which model server stands behind it, so an
alias move never changes the address and never drops a request. Routing and swapping live in
:mod:`serving.routing` and :mod:`serving.supervisor`; this app adds what production traffic needs:

- auth (:mod:`serving.auth`) on every endpoint but ``/healthz``, ``/readyz`` and the OpenAPI docs:
  ``predict`` for predictions and generations, ``feedback`` for true labels and verdicts on generated
  answers, ``admin`` for ``/metrics`` and ``/v1/status``;
- ``POST /v1/generate`` for generation models (answers to messages; see :func:`create_app`'s
  ``generate``), held to the same text limits, charged in generated tokens on a bucket of its own;
- limits (:mod:`serving.limits`): per-credential rate charged per text, body size, content type,
  UTF-8, control characters, text length, batch size — each refusal a 4xx whose JSON body says what
  was wrong; ``/v1/predict`` and ``/invocations`` (JSON or CSV) are held to the same rules;
- the inference log (:mod:`serving.inference_log`): one row per predicted text, PII masked, with the
  caller's principal and optional end-user id (``X-Subject-Id``), written off the response path and
  flushed on shutdown; ``POST /v1/feedback`` attaches the true label later, to the caller's own
  requests only (``admin`` excepted);
- Prometheus metrics (:mod:`serving.metrics`) at ``GET /metrics``.

Every answer carries a request id (``X-Request-ID`` header, and ``request_id`` in JSON bodies): the
caller's own ``X-Request-ID`` when it is a sane one, else a new one (:mod:`serving.logs`). It is on every
log line written while the request is handled, and it goes on to the model server.
"""

from __future__ import annotations

import csv
import io
import json
import logging
import time
from collections.abc import AsyncIterator, Awaitable, Callable, Iterable, Sequence
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
from serving.canary import Canary, live_accuracy
from serving.inference_log import (
    FeedbackRecord,
    InferenceLogWriter,
    PredictionRecord,
    default_dead_letter_path,
    read_window,
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
from serving.logs import RequestIdMiddleware, new_request_id
from serving.metrics import GatewayMetrics
from serving.pii import PiiMasker
from serving.routing import BackendPool, CircuitBreaker
from serving.supervisor import AliasSupervisor, SupervisorCollector, registry_version_resolver
from serving.traffic import (
    REQUEST_ID_HEADER,
    TrafficRouter,
    TrafficSettings,
    served_task,
    upstream_refusal,
    wrong_task,
)
from tuneloop.config import Environment, GatewayParams, Params

log = logging.getLogger(__name__)

MODEL_VERSION_HEADER = "X-Model-Version"
SUBJECT_HEADER = "X-Subject-Id"
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


class TextsInput(BaseModel):
    """One text (``text``) or a batch (``texts``), exactly one of them."""

    model_config = ConfigDict(extra="forbid")

    text: str | None = None
    texts: list[str] | None = Field(None, min_length=1)

    @model_validator(mode="after")
    def _exactly_one_input(self) -> TextsInput:
        if (self.text is None) == (self.texts is None):
            raise ValueError("give exactly one of `text` (a string) or `texts` (a list of strings)")
        return self

    def all_texts(self) -> list[str]:
        return [self.text] if self.text is not None else list(self.texts or [])


class PredictRequest(TextsInput):
    """One text (``text``) or a batch (``texts``); ``top_k`` alternatives per text."""

    top_k: int | None = Field(None, ge=1, le=100)


class GenerateRequest(TextsInput):
    """One message (``text``) or a batch (``texts``); at most ``max_new_tokens`` new tokens per answer
    (default and ceiling: ``gateway.max_new_tokens``)."""

    max_new_tokens: int | None = Field(None, ge=1)


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
    409: "The served model does the other task (a classifier for /v1/generate, a generator for prediction)",
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


def predict_request_schema(limits: TextLimits, model: type[TextsInput] = PredictRequest) -> dict:
    """``model``'s schema with the limits filled in and "exactly one of text or texts" spelled out."""
    schema = model.model_json_schema()
    text, texts = text_schemas(limits)
    schema["properties"]["text"] = {"anyOf": [text, {"type": "null"}], "default": None}
    schema["properties"]["texts"] = {"anyOf": [texts, {"type": "null"}], "default": None}
    given = {"text": {"required": ["text"], "properties": {"text": {"type": "string"}}}}
    given["texts"] = {"required": ["texts"], "properties": {"texts": {"type": "array"}}}
    # A null counts as absent, as PredictRequest reads it.
    schema["oneOf"] = [given["text"] | {"not": given["texts"]}, given["texts"] | {"not": given["text"]}]
    return schema


def generate_request_schema(limits: TextLimits, max_new_tokens: int) -> dict:
    """GenerateRequest's schema with the text limits and the ``max_new_tokens`` ceiling filled in."""
    schema = predict_request_schema(limits, GenerateRequest)
    schema["properties"]["max_new_tokens"] = {
        "anyOf": [{"type": "integer", "minimum": 1, "maximum": max_new_tokens}, {"type": "null"}],
        "default": None,
        "description": f"New tokens per answer at most (1 to {max_new_tokens}; default {max_new_tokens})",
    }
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


class GeneratedAnswer(BaseModel):
    """One answer: its text, the prompt's and the answer's token counts, and whether it is a JSON object."""

    text: str
    prompt_tokens: int
    new_tokens: int
    valid_json: bool


class GenerateResponse(BaseModel):
    request_id: str
    model_name: str
    model_version: str
    generations: list[GeneratedAnswer]


FEEDBACK_KINDS = ("true_label", "accepted", "edited_output")


class CanaryRequest(BaseModel):
    """``percent`` of callers to the candidate, or ``shadow`` to mirror all traffic to it."""

    model_config = ConfigDict(extra="forbid")
    percent: float | None = Field(default=None, gt=0, le=100)
    shadow: bool = False

    @model_validator(mode="after")
    def _exactly_one_mode(self) -> CanaryRequest:
        if self.shadow == (self.percent is not None):
            raise ValueError("give either `percent` (a canary) or `shadow: true`, not both or neither")
        return self


class FeedbackRequest(BaseModel):
    """Feedback on one answered text: the ``request_id`` of its answer and its index in the batch, with
    exactly one of ``true_label`` (a prediction's true label), ``accepted`` (a generated answer was
    right as it was: true, or wrong: false) or ``edited_output`` (a generated answer, corrected)."""

    model_config = ConfigDict(extra="forbid")

    request_id: str = Field(pattern=r"^[A-Za-z0-9_-]{1,64}$")
    item_index: int = Field(0, ge=0)
    true_label: str | None = Field(None, min_length=1, max_length=256)
    accepted: bool | None = None
    edited_output: str | None = Field(None, min_length=1)

    @model_validator(mode="after")
    def _exactly_one_kind(self) -> FeedbackRequest:
        given = [kind for kind in FEEDBACK_KINDS if getattr(self, kind) is not None]
        if len(given) != 1:
            raise ValueError(
                "give exactly one of `true_label` (a prediction), `accepted` or `edited_output` "
                "(a generation)"
            )
        return self

    @property
    def about_generation(self) -> bool:
        return self.true_label is None


class FeedbackResponse(BaseModel):
    request_id: str
    feedback_for: str
    item_index: int
    true_label: str | None = None
    accepted: bool | None = None
    edited: bool = False
    status: str = "accepted"


def feedback_request_schema(labels: Iterable[str], max_output_chars: int) -> dict:
    """FeedbackRequest's schema with the label set, the length limit and "exactly one of" spelled out."""
    schema = FeedbackRequest.model_json_schema()
    properties = schema["properties"]
    properties["true_label"] = {"anyOf": [{"type": "string", "enum": sorted(labels)}, {"type": "null"}]}
    properties["edited_output"] = {
        "anyOf": [
            {
                "type": "string",
                "minLength": 1,
                "maxLength": max_output_chars,
                "pattern": _NO_CONTROL_CHARACTERS,
            },
            {"type": "null"},
        ]
    }
    given = {
        "true_label": {"type": "string"},
        "accepted": {"type": "boolean"},
        "edited_output": {"type": "string"},
    }
    present = {kind: {"required": [kind], "properties": {kind: value}} for kind, value in given.items()}
    # A null counts as absent, as FeedbackRequest reads it.
    schema["oneOf"] = [
        present[kind] | {"not": {"anyOf": [present[other] for other in given if other != kind]}}
        for kind in given
    ]
    return schema


def is_json_object(text: str) -> bool:
    """Whether ``text`` (surrounding white space aside) is exactly one JSON object.

    The gateway checks the form only; whether the object has the fields a task expects is the
    evaluation's business (``evaluation.generation.is_valid``, which serving may not import).
    """
    try:
        return isinstance(json.loads(text), dict)
    except (ValueError, RecursionError):
        return False


def generations_from_server(payload: object, expected: int) -> list[GeneratedAnswer]:
    """The generation pyfunc's rows (``generated``, ``prompt_tokens``, ``new_tokens``) as answers.

    A classifier's rows are a 409 that says to use /v1/predict; any other shape, or another number of
    rows than texts, is the model server's failure (502).
    """
    if served_task(payload) == "classification":
        raise wrong_task("classification")
    try:
        rows = payload["predictions"]  # type: ignore[index]
        answers = [
            GeneratedAnswer(
                text=row["generated"],
                prompt_tokens=row["prompt_tokens"],
                new_tokens=row["new_tokens"],
                valid_json=is_json_object(row["generated"]),
            )
            for row in rows
        ]
    except (KeyError, TypeError, ValidationError) as error:
        log.error("model server answered with an unexpected shape: %r", error)
        raise Refusal(
            502, "upstream_error", "the model server gave an answer the gateway cannot read"
        ) from error
    if len(answers) != expected:
        raise Refusal(502, "upstream_error", "the model server answered a different number of texts")
    return answers


def generation_body(texts: Sequence[str], max_new_tokens: int) -> dict:
    """The generation pyfunc's input: one ``text`` column, and the new-token budget as a param."""
    return {
        "dataframe_split": {"columns": ["text"], "data": [[text] for text in texts]},
        "params": {"max_new_tokens": max_new_tokens},
    }


def _top_k(value: object) -> Any:
    """A row's ``top_k``: the pyfunc sends it as a JSON string, so that every MLflow format carries it."""
    return json.loads(value) if isinstance(value, str) else value


def predictions_from_server(payload: object) -> list[Prediction]:
    """The pyfunc's rows (``top_k`` a JSON string, or already a list) as objects.

    An answer of another shape is the model server's failure (502), never a 500 of ours; a generation
    model's answer is a 409 that says to use /v1/generate.
    """
    if served_task(payload) == "generation":
        raise wrong_task("generation")
    try:
        rows = payload["predictions"]  # type: ignore[index]
        return [
            Prediction(label=row["label"], score=row["score"], top_k=_top_k(row["top_k"])) for row in rows
        ]
    except (KeyError, TypeError, ValueError, ValidationError) as error:
        log.error("model server answered with an unexpected shape: %r", error)
        raise Refusal(
            502, "upstream_error", "the model server gave an answer the gateway cannot read"
        ) from error


def invocation_rows(rows: list[dict]) -> list[dict]:
    """The records ``/invocations`` answers with: ``top_k`` a JSON array of ``{label, score}``, the shape
    MLflow's scoring server gives a list column, so that a client need not parse a string inside the JSON.
    """
    return [prediction.model_dump() for prediction in predictions_from_server({"predictions": rows})]


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


def canary_caller(principal: Principal, subject: str | None) -> str:
    """Who a canary keeps on one version: the end user (``X-Subject-Id``) when the caller names one.

    A service calling for many users would otherwise put all of them on one side of the canary.
    """
    return f"{principal.id}/{subject}" if subject else principal.id


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
    router: TrafficRouter | None = None,
) -> FastAPI:
    """The gateway for one environment. With a supervisor, its alias-following loop runs in the app.

    ``inference_log`` is started with the app and closed (everything queued written) on shutdown;
    ``labels`` is the label set feedback is checked against; ``drift_summary_path`` makes
    ``/metrics`` export the drift job's latest result. ``router`` decides which model server answers
    (breaker, fallback, canary, micro-batching, cache); without one, prod alone, one call per request.
    """
    metrics = metrics or GatewayMetrics()
    router = router or TrafficRouter(
        pool, metrics, TrafficSettings(), supervisor=supervisor, timeout_s=upstream_timeout_s
    )
    metrics.watch_inference_log(inference_log)
    if supervisor is not None:
        metrics.registry.register(SupervisorCollector(supervisor))
    if drift_summary_path is not None:
        metrics.watch_drift(drift_summary_path)
    limiter = TokenBucketLimiter(settings.rate_limit_per_s, settings.rate_limit_burst)
    # /v1/generate's own bucket, counted in generated tokens (see `generate`).
    token_limiter = TokenBucketLimiter(
        settings.generate_tokens_per_s, settings.generate_token_burst, unit="tokens"
    )
    text_limits = TextLimits(settings.max_text_chars, settings.max_batch_size)
    known_labels = frozenset(labels)

    @asynccontextmanager
    async def lifespan(app: FastAPI) -> AsyncIterator[None]:
        inference_log.start()
        await router.start()
        app.state.http = router.http
        try:
            yield
        finally:
            # uvicorn calls this after in-flight requests have finished: their log rows are queued.
            await router.stop()
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
    app.state.router = router
    # Starlette types a handler as taking `Exception`, so one for a subclass is rejected although
    # Starlette only calls it with that subclass (Kludex/starlette#2417; fix proposed in #2403).
    app.add_exception_handler(Refusal, refusal_handler)  # type: ignore[arg-type]
    app.add_exception_handler(RequestValidationError, validation_error_handler)  # type: ignore[arg-type]
    app.add_exception_handler(StarletteHTTPException, _http_error_handler)  # type: ignore[arg-type]
    app.add_exception_handler(Exception, unexpected_error_handler)

    @app.middleware("http")
    async def request_id_and_metrics(request: Request, call_next: Callable[[Request], Awaitable[Response]]):
        # RequestIdMiddleware (outermost, added below) has picked the id and bound it for the log.
        if getattr(request.state, "request_id", None) is None:
            request.state.request_id = new_request_id()
        request.state.started = time.perf_counter()
        try:
            response = await call_next(request)
        except Exception:
            _observe(request, 500, "internal_error")
            raise
        response.headers[REQUEST_ID_HEADER] = request.state.request_id
        _observe(request, response.status_code, getattr(request.state, "refusal", None))
        return response

    # Added last, so it runs first: the id is bound before anything else (auth, limits) logs.
    app.add_middleware(RequestIdMiddleware, header=REQUEST_ID_HEADER)

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
    authenticate_predict = authenticator.require("predict")

    async def generate_caller(principal: Principal = Depends(authenticate_predict)) -> Principal:  # noqa: B008 - FastAPI DI
        """Scope ``predict``; a caller without a generated token left is refused before its body is read."""
        token_limiter.check(principal.rate_limit_key, take=False)
        return principal

    feedback_caller = rate_limited("feedback")
    admin_caller = authenticator.require("admin")

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

    async def log_generations(
        request: Request,
        texts: Sequence[str],
        answers: list[GeneratedAnswer],
        version: str,
        subject: str | None,
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
                label="",
                score=0.0,
                latency_ms=latency_ms,
                principal=principal.id,
                subject=subject,
                generated=answer.text,
                prompt_tokens=answer.prompt_tokens,
                new_tokens=answer.new_tokens,
            )
            for index, (text, answer) in enumerate(zip(texts, answers, strict=True))
        ]
        for answer in answers:
            metrics.generations.labels(version, str(answer.valid_json).lower()).inc()
            metrics.generated_tokens.labels(version).inc(answer.new_tokens)
        await inference_log.asubmit(records)

    predict_schema = {"content": {"application/json": {"schema": predict_request_schema(text_limits)}}}

    @app.post(
        "/v1/predict",
        response_model=PredictResponse,
        dependencies=[Depends(predict_caller)],
        openapi_extra={"requestBody": {"required": True, **predict_schema}},
        responses=_refusals(400, 409, 413, 415, 422, 502, *_AUTH_REFUSALS),
    )
    async def predict(request: Request, response: Response, subject: SubjectHeader = None) -> PredictResponse:
        """Label one text or a batch. Needs scope ``predict``; costs one rate-limit token per text.

        ``model_version`` (and the ``X-Model-Version`` header) says which version answered: prod,
        the canary for callers in its share, or ``previous-prod`` while prod's breaker is open.
        """
        request.state.created_at = utc_now()
        body = await read_json_model(request, PredictRequest, settings.max_body_bytes)
        texts = body.all_texts()
        text_limits.check(texts)
        principal = charge(request, len(texts))
        top_k = body.top_k or default_top_k
        answer = await router.predict_rows(canary_caller(principal, subject), texts, top_k)
        predictions = predictions_from_server({"predictions": answer.rows})
        await log_predictions(request, texts, predictions, answer.version, subject)
        response.headers[MODEL_VERSION_HEADER] = answer.version
        return PredictResponse(
            request_id=request.state.request_id,
            model_name=pool.model_name,
            model_version=answer.version,
            predictions=predictions,
        )

    @app.post(
        "/invocations",
        dependencies=[Depends(predict_caller)],
        openapi_extra={"requestBody": {"required": True, "content": invocation_content(text_limits)}},
        responses={
            200: {
                "description": "MLflow's answer: `predictions` records, a classifier's `top_k` a JSON array",
                "content": {"application/json": {}},
            },
            **_refusals(400, 409, 413, 415, 422, 502, *_AUTH_REFUSALS),
        },
    )
    async def invocations(request: Request, subject: SubjectHeader = None) -> Response:
        """MLflow's scoring protocol, for clients written against it. Needs scope ``predict``.

        JSON (``dataframe_split``, ``dataframe_records``, ``inputs``, ``instances``, with optional
        ``params``) or CSV with a ``text`` column: held to the same limits as ``/v1/predict``, charged
        per text, logged. The model server gets the texts the gateway checked (as ``dataframe_split``),
        so what is predicted is exactly what is logged; its answer comes back as MLflow's records, with a
        classifier's ``top_k`` a JSON array of ``{label, score}`` rather than the pyfunc's JSON string.
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
        principal = charge(request, len(texts))
        top_k = (params or {}).get("top_k") or default_top_k
        answer = await router.predict_rows(canary_caller(principal, subject), texts, top_k)
        await log_predictions(request, texts, answer.rows, answer.version, subject)
        return JSONResponse(
            {"predictions": invocation_rows(answer.rows)}, headers={MODEL_VERSION_HEADER: answer.version}
        )

    generate_schema = {
        "content": {
            "application/json": {"schema": generate_request_schema(text_limits, settings.max_new_tokens)}
        }
    }

    @app.post(
        "/v1/generate",
        response_model=GenerateResponse,
        openapi_extra={"requestBody": {"required": True, **generate_schema}},
        responses=_refusals(400, 409, 413, 415, 422, 502, *_AUTH_REFUSALS),
    )
    async def generate(
        request: Request,
        response: Response,
        principal: Principal = Depends(generate_caller),  # noqa: B008 - FastAPI DI, see rate_limited
        subject: SubjectHeader = None,
    ) -> GenerateResponse:
        """Answer one message or a batch with the served generation model. Needs scope ``predict``.

        Body: ``text`` or ``texts`` (the same limits as ``/v1/predict``: characters per text, batch
        size, body bytes) and optional ``max_new_tokens`` (1 to ``gateway.max_new_tokens``, which is
        also the default; above it a 422 that says the limit). The model may stop earlier, at its own
        ``generation.max_new_tokens`` or at the end of the answer.

        Input tokens: the gateway has no tokenizer, so it bounds the input in characters; the model
        cuts each prompt from the left to its ``generation.max_input_tokens`` (the end of the message,
        where the answer starts, is kept). ``prompt_tokens`` in the answer is what it kept.

        Rate limit: a bucket of generated tokens per caller (``gateway.generate_tokens_per_s``,
        ``generate_token_burst``), separate from the texts bucket of ``/v1/predict``. Each text
        reserves its ``max_new_tokens`` before the model runs (a request reserving more than the burst
        is a 422, one over what is left a 429 with ``Retry-After``); once the answer is in, the tokens
        not generated are given back, so a caller pays for the new tokens it got. A failed call gives
        the whole reservation back.

        Each answer: ``text``, ``prompt_tokens``, ``new_tokens`` and ``valid_json`` (the text is one
        JSON object). A classifier being served is a 409. Every answer is logged (PII masked) and can
        get ``/v1/feedback`` with ``accepted`` or ``edited_output``.
        """
        request.state.created_at = utc_now()
        body = await read_json_model(request, GenerateRequest, settings.max_body_bytes)
        texts = body.all_texts()
        text_limits.check(texts)
        max_new_tokens = body.max_new_tokens or settings.max_new_tokens
        if max_new_tokens > settings.max_new_tokens:
            raise Refusal(
                422,
                "max_new_tokens_too_large",
                f"max_new_tokens is {max_new_tokens}; at most {settings.max_new_tokens}",
                limit=settings.max_new_tokens,
            )
        key = principal.rate_limit_key
        reserved = max_new_tokens * len(texts)
        token_limiter.check(key, reserved)
        try:
            upstream, version = await router.call_prod(generation_body(texts, max_new_tokens), len(texts))
            if upstream.status_code != 200:
                raise upstream_refusal(upstream)
            answers = generations_from_server(_json_or_none(upstream), len(texts))
        except BaseException:
            token_limiter.give_back(key, reserved)
            raise
        generated = sum(min(max(answer.new_tokens, 0), max_new_tokens) for answer in answers)
        token_limiter.give_back(key, reserved - generated)
        await log_generations(request, texts, answers, version, subject)
        response.headers[MODEL_VERSION_HEADER] = version
        return GenerateResponse(
            request_id=request.state.request_id,
            model_name=pool.model_name,
            model_version=version,
            generations=answers,
        )

    feedback_body = feedback_request_schema(known_labels, settings.max_text_chars)
    feedback_schema = {"content": {"application/json": {"schema": feedback_body}}}

    @app.post(
        "/v1/feedback",
        response_model=FeedbackResponse,
        dependencies=[Depends(feedback_caller)],
        openapi_extra={"requestBody": {"required": True, **feedback_schema}},
        responses=_refusals(400, 404, 413, 415, 422, *_AUTH_REFUSALS),
    )
    async def feedback(request: Request) -> FeedbackResponse:
        """Feedback on an answered text: its answer's ``request_id``, ``item_index``. Scope ``feedback``.

        Exactly one of ``true_label`` (a ``/v1/predict`` or ``/invocations`` answer), ``accepted``
        (a ``/v1/generate`` answer was right as it was, or wrong) or ``edited_output`` (a generated
        answer, corrected; at most ``max_text_chars`` characters, stored PII masked). Feedback of the
        other task's kind is a 422. Only on the caller's own requests (same API key or token subject);
        ``admin`` may label any.
        """
        body = await read_json_model(request, FeedbackRequest, settings.max_body_bytes)
        for kind in ("true_label", "edited_output"):
            value = getattr(body, kind)
            if value is not None:
                check_no_control_characters(value, kind)
        if body.edited_output is not None and len(body.edited_output) > settings.max_text_chars:
            raise Refusal(
                422,
                "text_too_long",
                f"edited_output has {len(body.edited_output)} characters; at most {settings.max_text_chars}",
            )
        principal = charge(request, 1)
        if body.true_label is not None and body.true_label not in known_labels:
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
        if body.about_generation != owner.generation:
            raise Refusal(
                422,
                "wrong_feedback_kind",
                f"request '{body.request_id}' "
                + (
                    "generated text: give `accepted` or `edited_output`, not `true_label`"
                    if owner.generation
                    else "predicted labels: give `true_label`, not `accepted` or `edited_output`"
                ),
            )
        record = FeedbackRecord(
            body.request_id,
            body.item_index,
            body.true_label or "",
            utc_now(),
            principal.id,
            accepted=body.accepted,
            edited_output=body.edited_output,
        )
        if not await inference_log.asubmit([record]):
            raise Refusal(503, "log_full", "the inference log cannot take feedback now; retry later")
        if body.true_label is not None:
            metrics.feedback.labels(body.true_label).inc()
        else:
            kind = "edited" if body.edited_output is not None else "accepted" if body.accepted else "rejected"
            metrics.generation_feedback.labels(kind).inc()
        return FeedbackResponse(
            request_id=request.state.request_id,
            feedback_for=body.request_id,
            item_index=body.item_index,
            true_label=body.true_label,
            accepted=body.accepted,
            edited=body.edited_output is not None,
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

    @app.get("/readyz", responses={503: {"description": "No model can answer now"}})
    async def readyz() -> JSONResponse:
        """Ready when a request would be answered: prod with its breaker closed, or the fallback."""
        current = pool.current
        fallback = router.fallback_pool.current if router.fallback_pool else None
        breaker_open = pool.breaker.is_open
        prod_ok = current is not None and not breaker_open
        answering = current if prod_ok else fallback
        body = {
            "ready": answering is not None,
            "model_name": pool.model_name,
            "alias": pool.alias,
            "model_version": answering.version if answering else None,
            "breaker_open": breaker_open,
            "degraded": answering is not None and not prod_ok,
        }
        if breaker_open:
            body["reason"] = pool.breaker.last_reason
        return JSONResponse(body, status_code=200 if answering else 503)

    @app.get("/v1/status", dependencies=[Depends(admin_caller)], responses=_refusals(*_AUTH_REFUSALS))
    async def status() -> dict:
        """What this environment serves, its swaps, breaker, fallback and canary. Scope ``admin``."""
        if supervisor is not None:
            described = supervisor.describe()
        else:
            current = pool.current
            version = current.version if current else None
            described = {"model_name": pool.model_name, "alias": pool.alias, "serving_version": version}
        return described | router.describe()

    @app.post(
        "/v1/canary",
        dependencies=[Depends(admin_caller)],
        responses=_refusals(409, 422, *_AUTH_REFUSALS),
    )
    async def start_canary(request: Request, body: CanaryRequest) -> dict:
        """Start a canary (``percent`` of callers, sticky) or a shadow (``shadow: true``). Scope ``admin``.

        Loads ``canary.candidate_alias``'s version on a model server of its own first (the call
        waits for it); 409 when it cannot be served, is prod's version, or an experiment is running.
        """
        principal: Principal = request.state.principal
        if body.shadow:
            return await router.start_candidate("shadow", 0.0, principal.id)
        return await router.start_candidate("canary", body.percent or 0.0, principal.id)

    @app.delete("/v1/canary", dependencies=[Depends(admin_caller)], responses=_refusals(409, *_AUTH_REFUSALS))
    async def stop_canary(request: Request, reason: str = "stopped by an operator") -> dict:
        """End the experiment (audit entry) and stop the candidate's model server. Scope ``admin``."""
        principal: Principal = request.state.principal
        return await router.stop_candidate(principal.id, reason[:500])

    @app.get("/v1/canary", dependencies=[Depends(admin_caller)], responses=_refusals(*_AUTH_REFUSALS))
    async def canary_report() -> dict:
        """The comparison so far, with live accuracy from the feedback in the inference log."""
        canary = router.canary
        if canary is None:
            return {"mode": None, "detail": "this gateway runs no canaries (only prod's does)"}
        report = canary.summary()
        if canary.started_at is not None:
            window = await anyio.to_thread.run_sync(
                lambda: read_window(inference_log.db_url, since=canary.started_at)
            )
            report["live_accuracy"] = live_accuracy(
                window, canary.prod.version, canary.candidate.version, canary.settings.significance
            )
        return report

    return app


def _json_or_none(response: httpx.Response) -> object:
    try:
        return response.json()
    except ValueError:
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
    metrics = GatewayMetrics(device_hour_usd=params.cost.device_hour_price(params.cost.serving_device))
    return create_app(
        pool,
        supervisor,
        router=traffic_router(pool, supervisor, params, env, metrics),
        authenticator=authenticator,
        inference_log=inference_log,
        labels=params.data.labels,
        settings=gateway,
        metrics=metrics,
        drift_summary_path=env.paths.drift_summary,
        default_top_k=params.serving.default_top_k,
        upstream_timeout_s=params.serving.request_timeout_s,
    )


def traffic_router(
    pool: BackendPool,
    supervisor: AliasSupervisor | None,
    params: Params,
    env: Environment,
    metrics: GatewayMetrics,
) -> TrafficRouter:
    """Breaker, micro-batching and cache from ``serving:``; for ``prod``, the fallback and the canary.

    The fallback (``serving.fallback_alias``) and the canary's candidate (``canary.candidate_alias``)
    get model servers of their own, started and swapped by supervisors like prod's.
    """
    serving = params.serving
    pool.breaker = CircuitBreaker(serving.breaker_failures, serving.breaker_open_s)
    settings = TrafficSettings(
        micro_batch_max_texts=serving.micro_batch_max_texts,
        micro_batch_max_wait_ms=serving.micro_batch_max_wait_ms,
        cache_size=serving.cache_size,
        health_check_interval_s=serving.health_check_interval_s,
        model_server_workers=serving.workers,
    )
    follows_prod = supervisor is not None and pool.alias == "prod"

    def follower(alias: str) -> tuple[BackendPool, AliasSupervisor]:
        assert supervisor is not None
        other = BackendPool(pool.model_name, alias)
        resolve = registry_version_resolver(env.tracking_uri, pool.model_name, alias)
        return other, AliasSupervisor(other, resolve, supervisor.launch, serving)

    return TrafficRouter(
        pool,
        metrics,
        settings,
        supervisor=supervisor,
        fallback=follower(serving.fallback_alias) if follows_prod and serving.fallback_alias else None,
        canary=Canary(params.canary, env.paths.serving_dir(pool.alias) / "canary-audit.jsonl")
        if follows_prod
        else None,
        candidate_factory=(lambda: follower(params.canary.candidate_alias)) if follows_prod else None,
        timeout_s=serving.request_timeout_s,
    )


def dead_letter_path(configured: str | Path | None, env: Environment) -> Path:
    """The configured path (relative to TUNELOOP_HOME), else beside a SQLite log, else in TUNELOOP_HOME."""
    if configured:
        return env.home_dir / Path(configured)
    if env.inference_log_url.startswith("sqlite"):
        return default_dead_letter_path(env.inference_log_url)
    return env.home_dir / "inference_log.deadletter.jsonl"
