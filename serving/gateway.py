"""The stable address of an environment: an ASGI gateway in front of MLflow's model server.

Clients always call the gateway; the supervisor decides which model server stands behind it, so an
alias move never changes the address and never drops a request. The monitoring work extends this app
(auth, limits, request log, metrics); routing and swapping live in :mod:`serving.routing` and
:mod:`serving.supervisor`.
"""

from __future__ import annotations

import asyncio
import contextlib
import json
import logging
import uuid
from collections.abc import AsyncIterator
from contextlib import asynccontextmanager

import httpx
from fastapi import FastAPI, Request
from fastapi.responses import JSONResponse, Response
from pydantic import BaseModel, ConfigDict, Field, model_validator

from serving.model_server import invocation_body
from serving.routing import BackendPool, NoBackend
from serving.supervisor import AliasSupervisor

log = logging.getLogger(__name__)

MODEL_VERSION_HEADER = "X-Model-Version"
RETRY_AFTER_NO_BACKEND_S = "5"


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


def predictions_from_server(payload: dict) -> list[Prediction]:
    """The pyfunc's rows (``top_k`` is a JSON string so every MLflow format carries it) as objects."""
    return [
        Prediction(label=row["label"], score=row["score"], top_k=json.loads(row["top_k"]))
        for row in payload["predictions"]
    ]


def _error(status: int, message: str, **headers: str) -> JSONResponse:
    return JSONResponse({"detail": message}, status_code=status, headers=headers or None)


def create_app(
    pool: BackendPool,
    supervisor: AliasSupervisor | None = None,
    *,
    default_top_k: int = 3,
    upstream_timeout_s: float = 60.0,
) -> FastAPI:
    """The gateway for one environment. With a supervisor, its alias-following loop runs in the app."""

    @asynccontextmanager
    async def lifespan(app: FastAPI) -> AsyncIterator[None]:
        app.state.http = httpx.AsyncClient(
            timeout=upstream_timeout_s, limits=httpx.Limits(max_connections=200, max_keepalive_connections=50)
        )
        watcher = asyncio.create_task(supervisor.run_forever()) if supervisor else None
        try:
            yield
        finally:
            if watcher is not None:
                watcher.cancel()
                with contextlib.suppress(asyncio.CancelledError):
                    await watcher
                await supervisor.shutdown()
            await app.state.http.aclose()

    app = FastAPI(
        title="tuneloop gateway",
        summary=f"Stable address of {pool.model_name}@{pool.alias}",
        lifespan=lifespan,
    )

    async def call_model_server(request_body: dict) -> tuple[httpx.Response, str]:
        async with pool.lease() as backend:
            response = await app.state.http.post(f"{backend.url}/invocations", json=request_body)
            return response, backend.version

    @app.post("/v1/predict", response_model=PredictResponse)
    async def predict(body: PredictRequest) -> PredictResponse | JSONResponse:
        request_id = uuid.uuid4().hex
        top_k = body.top_k or default_top_k
        try:
            response, version = await call_model_server(invocation_body(body.all_texts(), top_k=top_k))
        except NoBackend as error:
            return _error(503, str(error), **{"Retry-After": RETRY_AFTER_NO_BACKEND_S})
        except httpx.HTTPError as error:
            log.error("model server call failed: %r", error)
            return _error(502, f"the model server did not answer: {type(error).__name__}")
        if response.status_code != 200:
            status = 400 if 400 <= response.status_code < 500 else 502
            return _error(status, f"the model server refused the input: {response.text[:500]}")
        return PredictResponse(
            request_id=request_id,
            model_name=pool.model_name,
            model_version=version,
            predictions=predictions_from_server(response.json()),
        )

    @app.post("/invocations")
    async def invocations(request: Request) -> Response:
        """MLflow's scoring protocol, passed through unchanged, for clients written against it."""
        content_type = request.headers.get("content-type", "application/json")
        try:
            async with pool.lease() as backend:
                upstream = await app.state.http.post(
                    f"{backend.url}/invocations",
                    content=await request.body(),
                    headers={"content-type": content_type},
                )
        except NoBackend as error:
            return _error(503, str(error), **{"Retry-After": RETRY_AFTER_NO_BACKEND_S})
        except httpx.HTTPError as error:
            return _error(502, f"the model server did not answer: {type(error).__name__}")
        return Response(
            upstream.content,
            status_code=upstream.status_code,
            media_type=upstream.headers.get("content-type"),
            headers={MODEL_VERSION_HEADER: backend.version},
        )

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

    @app.get("/v1/status")
    async def status() -> dict:
        """What this environment serves and its recent swaps (for `tuneloop status` and operators)."""
        if supervisor is not None:
            return supervisor.describe()
        current = pool.current
        version = current.version if current else None
        return {"model_name": pool.model_name, "alias": pool.alias, "serving_version": version}

    return app
