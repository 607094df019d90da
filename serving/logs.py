"""Log lines as JSON (for a log pipeline) or text (for a terminal), with the request id on each one.

:func:`configure_logging` puts one handler on the root logger whose formatter is structlog's
``ProcessorFormatter``, so our ``logging.getLogger`` lines, uvicorn's access and error logs and MLflow's
all come out in the one format. :class:`RequestIdMiddleware` gives every HTTP request an id (the
caller's ``X-Request-ID`` when it is a sane one) and holds it in :data:`request_id_var` while the
request is handled, so each line logged meanwhile carries ``request_id``.
"""

from __future__ import annotations

import contextlib
import logging
import re
import sys
import uuid
from collections.abc import Iterator, MutableMapping
from contextvars import ContextVar
from typing import Any, Literal, TextIO

import structlog
from starlette.types import ASGIApp, Receive, Scope, Send

LogFormat = Literal["text", "json"]
LOG_FORMATS: tuple[LogFormat, ...] = ("text", "json")

log = logging.getLogger(__name__)

# The id of the request being handled, None outside a request. Worker threads started with
# `anyio.to_thread.run_sync` see it too (anyio copies the context).
request_id_var: ContextVar[str | None] = ContextVar("tuneloop_request_id", default=None)

# A caller's id is kept only if it is short and plain: nothing that could break a log line or a header.
_SANE_REQUEST_ID = re.compile(r"[A-Za-z0-9._:-]{1,128}")
# Loggers that come with handlers of their own; they propagate to the root's instead.
# (MLflow's are set when mlflow is imported: import it before configure_logging.)
ROUTED_LOGGERS = (
    "uvicorn",
    "uvicorn.error",
    "uvicorn.access",
    "uvicorn.asgi",
    "mlflow",
    "sqlalchemy.engine",
    "alembic",
)


def is_sane_request_id(value: str | None) -> bool:
    """1 to 128 characters of ``[A-Za-z0-9._:-]`` (no spaces, line breaks or quotes)."""
    return value is not None and _SANE_REQUEST_ID.fullmatch(value) is not None


def new_request_id() -> str:
    return uuid.uuid4().hex


def request_id_for(incoming: str | None) -> str:
    """The caller's id when it is sane, else a new one (an invalid id is never echoed back)."""
    if incoming is not None and is_sane_request_id(incoming):
        return incoming
    return new_request_id()


@contextlib.contextmanager
def bound_request_id(request_id: str) -> Iterator[None]:
    """Hold ``request_id`` in :data:`request_id_var` for the ``with`` block."""
    token = request_id_var.set(request_id)
    try:
        yield
    finally:
        request_id_var.reset(token)


class RequestIdMiddleware:
    """Pure ASGI middleware: picks the request's id (see :func:`request_id_for`), puts it in
    ``request.state.request_id`` and holds it in :data:`request_id_var` until the response is sent, so
    the server's access log line carries it too. Setting the ``X-Request-ID`` response header is the
    app's business."""

    def __init__(self, app: ASGIApp, header: str = "X-Request-ID") -> None:
        self.app = app
        self.header = header.lower().encode("latin-1")

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] != "http":
            await self.app(scope, receive, send)
            return
        raw = next((value for name, value in scope["headers"] if name == self.header), None)
        incoming = raw.decode("latin-1") if raw is not None else None
        request_id = request_id_for(incoming)
        scope.setdefault("state", {})["request_id"] = request_id
        with bound_request_id(request_id):
            if incoming is not None and request_id != incoming:
                # The header's value is not logged: it is what was found unsafe.
                log.debug("incoming X-Request-ID (%d characters) is not a sane id; replaced", len(incoming))
            await self.app(scope, receive, send)


def add_request_id(_: Any, __: str, event_dict: MutableMapping[str, Any]) -> MutableMapping[str, Any]:
    """structlog processor: ``request_id`` from :data:`request_id_var`, when inside a request."""
    request_id = request_id_var.get()
    if request_id is not None:
        event_dict.setdefault("request_id", request_id)
    return event_dict


def render_text(_: Any, __: str, event_dict: MutableMapping[str, Any]) -> str:
    """``LEVEL logger: event key=value …`` — the plain format tuneloop printed before, plus the fields."""
    fields = dict(event_dict)
    fields.pop("timestamp", None)
    level = str(fields.pop("level", "")).upper()
    name = fields.pop("logger", "")
    event = fields.pop("event", "")
    trace = fields.pop("exception", None)
    extra = " ".join(f"{key}={value}" for key, value in fields.items())
    line = f"{level} {name}: {event}" + (f" [{extra}]" if extra else "")
    return f"{line}\n{trace}" if trace else line


def _shared_processors() -> list[Any]:
    return [
        structlog.stdlib.add_log_level,
        structlog.stdlib.add_logger_name,
        structlog.processors.TimeStamper(fmt="iso", utc=True),
        add_request_id,
    ]


def log_formatter(format: LogFormat) -> structlog.stdlib.ProcessorFormatter:
    """A stdlib formatter rendering every record (ours, uvicorn's, MLflow's) as one JSON object or line."""
    if format not in LOG_FORMATS:
        raise ValueError(f"log format must be one of {LOG_FORMATS}, not {format!r}")
    renderer = structlog.processors.JSONRenderer() if format == "json" else render_text
    return structlog.stdlib.ProcessorFormatter(
        foreign_pre_chain=_shared_processors(),
        processors=[
            structlog.stdlib.ProcessorFormatter.remove_processors_meta,
            structlog.processors.format_exc_info,
            renderer,
        ],
    )


def configure_logging(
    format: LogFormat = "text", level: int | str = logging.INFO, stream: TextIO | None = None
) -> logging.Handler:
    """Route all logging through one handler on the root logger in ``format``; returns the handler.

    Replaces the root's handlers (``basicConfig``'s, an earlier call's) and makes uvicorn's loggers
    propagate to it, so run uvicorn with ``log_config=None`` afterwards. structlog's own loggers
    (``structlog.get_logger()``) go through the same handler.
    """
    handler = logging.StreamHandler(stream if stream is not None else sys.stderr)
    handler.setFormatter(log_formatter(format))
    root = logging.getLogger()
    for old in list(root.handlers):
        root.removeHandler(old)
    root.addHandler(handler)
    root.setLevel(level)
    for name in ROUTED_LOGGERS:
        logger = logging.getLogger(name)
        logger.handlers.clear()
        logger.propagate = True
    structlog.configure(
        processors=[
            structlog.stdlib.filter_by_level,
            *_shared_processors(),
            structlog.stdlib.PositionalArgumentsFormatter(),
            structlog.stdlib.ProcessorFormatter.wrap_for_formatter,
        ],
        logger_factory=structlog.stdlib.LoggerFactory(),
        wrapper_class=structlog.stdlib.BoundLogger,
        cache_logger_on_first_use=True,
    )
    return handler


def log_format_from(configured: LogFormat, override: str | None) -> LogFormat:
    """``override`` (``TUNELOOP_LOG_FORMAT``) when set, else ``serving.log_format``; anything else fails."""
    chosen = (override or configured).strip().lower()
    if chosen not in LOG_FORMATS:
        raise ValueError(f"TUNELOOP_LOG_FORMAT must be one of {', '.join(LOG_FORMATS)}, not {override!r}")
    return chosen
