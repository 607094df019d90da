"""What the gateway refuses before a request reaches a model server, and how it says so.

Every refusal is a :class:`Refusal`: a 4xx whose JSON body names the rule (``error``) and explains it
(``detail``), never a stack trace and never the refused input echoed back (it may hold PII).

The per-key rate limit is a token bucket kept in the gateway process, charged one token per predicted
text (a batch of 50 costs 50), so batching cannot multiply a caller's allowance. ``/v1/generate`` has
a second bucket counted in generated tokens: it reserves the requested budget up front and gives back
what was not generated (:meth:`TokenBucketLimiter.give_back`). It is written here
rather than taken from the ``limits`` package because that package offers fixed and moving windows,
not a bucket that allows a burst and then a steady rate, and one process needs no shared storage. With
several gateway replicas each enforces its own bucket (the effective limit is replicas × rate); a
shared limit would need Redis, which ``limits`` supports.
"""

from __future__ import annotations

import json
import math
import re
import threading
import time
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass
from typing import Any, TypeVar

from fastapi import Request
from fastapi.exceptions import RequestValidationError
from fastapi.responses import JSONResponse
from pydantic import BaseModel, ValidationError

JSON_TYPES = ("application/json",)
ModelT = TypeVar("ModelT", bound=BaseModel)


class Refusal(Exception):
    """A request the gateway will not serve: HTTP status, a stable error code, a human explanation."""

    def __init__(
        self, status: int, error: str, detail: str, headers: Mapping[str, str] | None = None, **extra: Any
    ) -> None:
        super().__init__(detail)
        self.status, self.error, self.detail, self.headers, self.extra = status, error, detail, headers, extra

    def response(self, request: Request | None = None) -> JSONResponse:
        body = {"error": self.error, "detail": self.detail} | self.extra
        request_id = getattr(request.state, "request_id", None) if request is not None else None
        if request_id is not None:
            body["request_id"] = request_id
        if request is not None:
            request.state.refusal = self.error
        return JSONResponse(body, status_code=self.status, headers=self.headers)


async def refusal_handler(request: Request, refusal: Refusal) -> JSONResponse:
    return refusal.response(request)


async def validation_error_handler(request: Request, error: RequestValidationError) -> JSONResponse:
    """FastAPI's own validation errors, in the refusal format and without echoing the input."""
    refusal = Refusal(
        422,
        "invalid_request",
        "the request does not match the schema",
        problems=validation_problems(error.errors()),
    )
    return refusal.response(request)


async def unexpected_error_handler(request: Request, _: Exception) -> JSONResponse:
    """A bug must not leak a stack trace to the caller; the server log has it (Starlette logs it)."""
    request_id = getattr(request.state, "request_id", None)
    body = {
        "error": "internal_error",
        "detail": "the gateway failed to handle the request",
        "request_id": request_id,
    }
    return JSONResponse(body, status_code=500)


def validation_problems(errors: Sequence[Any]) -> list[dict[str, str]]:
    return [
        {
            "location": ".".join(str(part) for part in error.get("loc", ())),
            "problem": str(error.get("msg", "")),
        }
        for error in errors
    ]


# ------------------------------------------------------------------------------------------- rate limit


@dataclass
class _Bucket:
    tokens: float
    updated: float


class TokenBucketLimiter:
    """Per-key token bucket: ``burst`` tokens at once, refilled at ``rate_per_s``.

    ``unit`` names what one token stands for in refusals: ``"texts"`` for prediction, ``"tokens"``
    for /v1/generate's bucket of generated tokens.
    """

    # Buckets idle long enough to be full again carry no state; drop them past this many keys.
    MAX_TRACKED_KEYS = 10_000

    def __init__(
        self,
        rate_per_s: float,
        burst: int,
        clock: Callable[[], float] = time.monotonic,
        *,
        unit: str = "texts",
    ) -> None:
        if rate_per_s <= 0 or burst < 1:
            raise ValueError("rate_per_s must be > 0 and burst >= 1")
        self.rate_per_s, self.burst, self._clock, self.unit = rate_per_s, burst, clock, unit
        self._buckets: dict[str, _Bucket] = {}
        self._lock = threading.Lock()

    def try_acquire(self, key: str, cost: float = 1.0, *, take: bool = True) -> float:
        """Take ``cost`` tokens; 0.0 when allowed, else the seconds to wait before it would be.

        ``take=False`` only asks: a caller whose bucket is empty is refused before any work is done.
        """
        with self._lock:
            now = self._clock()
            bucket = self._buckets.get(key)
            if bucket is None:
                if len(self._buckets) >= self.MAX_TRACKED_KEYS:
                    self._forget_full_buckets(now)
                bucket = self._buckets[key] = _Bucket(tokens=float(self.burst), updated=now)
            bucket.tokens = min(self.burst, bucket.tokens + (now - bucket.updated) * self.rate_per_s)
            bucket.updated = now
            if bucket.tokens >= cost:
                if take:
                    bucket.tokens -= cost
                return 0.0
            return (cost - bucket.tokens) / self.rate_per_s

    def check(self, key: str, cost: int = 1, *, take: bool = True) -> None:
        """Raise a 429 refusal with ``Retry-After`` (whole seconds, rounded up) when over the limit.

        ``cost`` is the number of texts (of ``unit``); a batch larger than the burst could never pass,
        so it is a 422 that says so rather than a 429 that would be retried forever.
        """
        if cost > self.burst:
            raise Refusal(
                422,
                "batch_too_large",
                f"{cost} {self.unit} in one request; the rate limit of these credentials allows at most "
                f"{self.burst} at once",
            )
        wait_s = self.try_acquire(key, cost, take=take)
        if wait_s > 0:
            raise self.refusal(
                wait_s,
                f"rate limit of {self.rate_per_s:g} {self.unit}/s (burst {self.burst}) exceeded for these "
                f"credentials (this request needs {cost})",
            )

    def give_back(self, key: str, tokens: float) -> None:
        """Return ``tokens`` taken but not used (a reservation settled lower); never above the burst."""
        if tokens <= 0:
            return
        with self._lock:
            bucket = self._buckets.get(key)
            if bucket is None:  # forgotten because it was full again: nothing to return
                return
            now = self._clock()
            bucket.tokens = min(self.burst, bucket.tokens + (now - bucket.updated) * self.rate_per_s + tokens)
            bucket.updated = now

    @staticmethod
    def refusal(wait_s: float, why: str, error: str = "rate_limited") -> Refusal:
        retry_after = max(1, math.ceil(wait_s))
        return Refusal(
            429, error, f"{why}; retry after {retry_after} s", headers={"Retry-After": str(retry_after)}
        )

    def _forget_full_buckets(self, now: float) -> None:
        full_after_s = self.burst / self.rate_per_s
        self._buckets = {k: b for k, b in self._buckets.items() if now - b.updated < full_after_s}


# ----------------------------------------------------------------------------------------- request body


def media_type(request: Request) -> str:
    return request.headers.get("content-type", "").split(";", 1)[0].strip().lower()


async def read_body(request: Request, max_bytes: int, allowed_types: Sequence[str] = JSON_TYPES) -> str:
    """The body as text, after the content-type, size and UTF-8 checks (415, 413, 400)."""
    given = media_type(request)
    if given not in allowed_types:
        raise Refusal(
            415,
            "unsupported_media_type",
            f"Content-Type must be {' or '.join(allowed_types)}; got {given or 'none'}",
        )
    declared = request.headers.get("content-length")
    if declared is not None and declared.isdigit() and int(declared) > max_bytes:
        raise _too_large(max_bytes)
    chunks, size = [], 0
    async for chunk in request.stream():
        size += len(chunk)
        if size > max_bytes:
            raise _too_large(max_bytes)
        chunks.append(chunk)
    raw = b"".join(chunks)
    try:
        return raw.decode("utf-8")
    except UnicodeDecodeError as error:
        raise Refusal(
            400, "invalid_utf8", f"the body is not valid UTF-8 (byte offset {error.start})"
        ) from error


def _too_large(max_bytes: int) -> Refusal:
    return Refusal(413, "body_too_large", f"the body is larger than {max_bytes} bytes")


def parse_json(text: str) -> Any:
    """JSON text to Python, or a 400 that says why (malformed, or nested deeper than the parser goes)."""
    try:
        return json.loads(text)
    except json.JSONDecodeError as error:
        raise Refusal(400, "invalid_json", f"the body is not valid JSON: {error}") from error
    except RecursionError as error:
        raise Refusal(400, "invalid_json", "the body is nested too deeply") from error


async def read_json_model(request: Request, model: type[ModelT], max_bytes: int) -> ModelT:
    """Read, check and validate a JSON body into ``model`` (415, 413, 400 invalid UTF-8/JSON, 422)."""
    payload = parse_json(await read_body(request, max_bytes))
    try:
        return model.model_validate(payload)
    except ValidationError as error:
        raise Refusal(
            422,
            "invalid_request",
            "the request does not match the schema",
            problems=validation_problems(error.errors()),
        ) from error


# C0 and C1 control characters and DEL, except tab and newline: a NUL truncates text in C libraries and
# PostgreSQL refuses it, and the others only hide content from whoever reads the log.
_CONTROL_CHARACTER = re.compile(r"[\x00-\x08\x0b-\x1f\x7f-\x9f]")


def check_no_control_characters(value: str, what: str, **extra: Any) -> None:
    """A 400 naming the first control character (other than tab and newline) in ``value`` and where it is.

    Refused rather than stripped so that what is predicted, logged and labelled is what the caller sent.
    """
    found = _CONTROL_CHARACTER.search(value)
    if found is not None:
        raise Refusal(
            400,
            "control_character",
            f"{what} contains the control character U+{ord(found.group()):04X} at position "
            f"{found.start()}; only tab and newline are allowed",
            **extra,
        )


@dataclass(frozen=True)
class TextLimits:
    """Size and content rules on the texts of one prediction request, whatever its format."""

    max_text_chars: int
    max_batch_size: int

    def check(self, texts: Sequence[str]) -> None:
        if not texts:
            raise Refusal(422, "empty_batch", "the request holds no text to predict")
        if len(texts) > self.max_batch_size:
            raise Refusal(
                422, "batch_too_large", f"{len(texts)} texts in one request; at most {self.max_batch_size}"
            )
        for index, text in enumerate(texts):
            try:
                text.encode("utf-8")
            except UnicodeEncodeError as error:
                # JSON escapes can spell lone surrogates ("\\ud800") that no UTF-8 text contains.
                raise Refusal(
                    400,
                    "invalid_utf8",
                    f"text {index} is not valid Unicode (lone surrogate)",
                    item_index=index,
                ) from error
            check_no_control_characters(text, f"text {index}", item_index=index)
            if len(text) > self.max_text_chars:
                raise Refusal(
                    422,
                    "text_too_long",
                    f"text {index} has {len(text)} characters; at most {self.max_text_chars}",
                    item_index=index,
                )
            if not text.strip():
                raise Refusal(422, "empty_text", f"text {index} is empty", item_index=index)
