"""Adaptive micro-batching and the prediction cache in front of the model servers.

A forward pass over 32 texts costs little more than over one, but the model server answers one HTTP
call at a time per worker: under concurrency, one call per request leaves most of its time in
queueing and per-call overhead. The gateway therefore coalesces requests that arrive together into
one model-server call. Written here because the libraries that do this (Ray Serve's ``@serve.batch``,
Triton's dynamic batcher) come with their own serving runtime; ours is ``mlflow models serve``.
"""

from __future__ import annotations

import asyncio
import unicodedata
from collections.abc import Awaitable, Callable, Hashable, Sequence
from dataclasses import dataclass, field

from cachetools import LRUCache

from serving.limits import Refusal


@dataclass(frozen=True)
class BatchAnswer:
    """The model server's rows for the texts sent (in order), and the version that answered."""

    rows: list[dict]
    version: str


SendBatch = Callable[[Hashable, list[str]], Awaitable[BatchAnswer]]


@dataclass(eq=False)
class _Waiting:
    texts: list[str]
    answer: asyncio.Future[BatchAnswer]


@dataclass(eq=False)
class _Lane:
    """Requests for one key (a backend role and top_k): only these can share a model-server call."""

    pending: list[_Waiting] = field(default_factory=list)
    pending_texts: int = 0
    in_flight: int = 0
    timer: asyncio.TimerHandle | None = None


class MicroBatcher:
    """Coalesces concurrent calls with the same key into model-server calls of at most ``max_texts``.

    Adaptive: a request that finds no call of its lane running goes at once (an idle server is never
    kept waiting). While calls are running, later requests gather: with a worker still free they go
    after at most ``max_wait_s``; with all ``max_in_flight`` workers busy they go together when a
    call returns; a full batch goes at once. So batches grow with the load and a lone caller pays no
    wait. ``max_wait_s == 0`` turns batching off: every request is sent on its own.

    When a coalesced call is refused as a whole (4xx: one request's text was rejected by the model),
    each request is sent again on its own, so one caller's bad input never fails another's.
    """

    def __init__(self, send: SendBatch, max_texts: int, max_wait_s: float, max_in_flight: int = 1) -> None:
        self.send = send
        self.max_texts = max_texts
        self.max_wait_s = max_wait_s
        self.max_in_flight = max_in_flight
        self._lanes: dict[Hashable, _Lane] = {}
        self.calls = 0
        self.sizes: list[int] = []

    async def submit(self, key: Hashable, texts: Sequence[str]) -> BatchAnswer:
        if self.max_wait_s <= 0:
            return await self._call(key, list(texts))
        lane = self._lanes.setdefault(key, _Lane())
        waiting = _Waiting(list(texts), asyncio.get_running_loop().create_future())
        lane.pending.append(waiting)
        lane.pending_texts += len(waiting.texts)
        if lane.pending_texts >= self.max_texts or lane.in_flight == 0:
            self._flush(key, lane)
        elif lane.in_flight < self.max_in_flight and lane.timer is None:
            lane.timer = asyncio.get_running_loop().call_later(self.max_wait_s, self._flush, key, lane)
        return await waiting.answer

    def _flush(self, key: Hashable, lane: _Lane) -> None:
        if lane.timer is not None:
            lane.timer.cancel()
            lane.timer = None
        while lane.pending:
            batch: list[_Waiting] = []
            size = 0
            while lane.pending and (not batch or size + len(lane.pending[0].texts) <= self.max_texts):
                waiting = lane.pending.pop(0)
                batch.append(waiting)
                size += len(waiting.texts)
            lane.pending_texts -= size
            lane.in_flight += 1
            asyncio.get_running_loop().create_task(self._run(key, lane, batch))
            if lane.pending_texts < self.max_texts:
                break
        if lane.pending and lane.timer is None and lane.in_flight < self.max_in_flight:
            lane.timer = asyncio.get_running_loop().call_later(self.max_wait_s, self._flush, key, lane)

    async def _run(self, key: Hashable, lane: _Lane, batch: list[_Waiting]) -> None:
        texts = [text for waiting in batch for text in waiting.texts]
        try:
            answer = await self._call(key, texts)
        except Refusal as refusal:
            if len(batch) > 1 and 400 <= refusal.status < 500:
                await asyncio.gather(*(self._alone(key, waiting) for waiting in batch))
            else:
                _fail(batch, refusal)
        # Every waiter must hear of any failure, or it waits forever.
        except BaseException as error:  # noqa: BLE001
            _fail(batch, error)
        else:
            start = 0
            for waiting in batch:
                end = start + len(waiting.texts)
                if not waiting.answer.done():
                    waiting.answer.set_result(BatchAnswer(answer.rows[start:end], answer.version))
                start = end
        finally:
            lane.in_flight -= 1
            if lane.pending and lane.timer is None:
                self._flush(key, lane)

    async def _alone(self, key: Hashable, waiting: _Waiting) -> None:
        try:
            answer = await self._call(key, waiting.texts)
        except BaseException as error:  # noqa: BLE001 - handed to the waiter, who raises it
            _fail([waiting], error)
        else:
            if not waiting.answer.done():
                waiting.answer.set_result(answer)

    async def _call(self, key: Hashable, texts: list[str]) -> BatchAnswer:
        self.calls += 1
        self.sizes.append(len(texts))
        del self.sizes[:-1000]
        answer = await self.send(key, texts)
        if len(answer.rows) != len(texts):
            raise Refusal(502, "upstream_error", "the model server answered a different number of texts")
        return answer


def _fail(batch: list[_Waiting], error: BaseException) -> None:
    for waiting in batch:
        if not waiting.answer.done():
            waiting.answer.set_exception(error)


def normalised(text: str) -> str:
    """The cache key of a text: Unicode NFC with runs of whitespace as one space, trimmed.

    Only changes the tokenizer cannot see, so a cached answer is the answer the model would give.
    """
    return " ".join(unicodedata.normalize("NFC", text).split())


class PredictionCache:
    """Answers by (model version, top_k, normalised text), least recently used dropped first.

    The version is part of the key, so a swap or a canary never returns another version's answer.
    ``size == 0`` caches nothing.
    """

    def __init__(self, size: int) -> None:
        self._rows: LRUCache[tuple[str, int, str], dict] | None = LRUCache(size) if size > 0 else None
        self.hits = 0
        self.misses = 0

    @property
    def enabled(self) -> bool:
        return self._rows is not None

    def lookup(self, version: str | None, top_k: int, texts: Sequence[str]) -> list[dict | None]:
        if self._rows is None or version is None:
            return [None] * len(texts)
        found = [self._rows.get((version, top_k, normalised(text))) for text in texts]
        hits = sum(row is not None for row in found)
        self.hits += hits
        self.misses += len(texts) - hits
        return found

    def store(self, version: str, top_k: int, texts: Sequence[str], rows: Sequence[dict]) -> None:
        if self._rows is None:
            return
        for text, row in zip(texts, rows, strict=True):
            self._rows[(version, top_k, normalised(text))] = row
