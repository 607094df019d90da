"""Which model server answers at an environment's stable address, and how traffic moves between them.

Every request leases the current backend for its whole life; a switch only changes which backend new
requests lease, and the old one is stopped after its last lease ends (drain). This is why a swap loses
no request: nothing in flight ever sees its server disappear.
"""

from __future__ import annotations

import asyncio
from collections.abc import AsyncIterator
from contextlib import asynccontextmanager
from dataclasses import dataclass, field

from serving.model_server import ModelServer


class NoBackend(RuntimeError):
    """No model version is being served yet (alias unset, or its first server still starting)."""


@dataclass(eq=False)
class Backend:
    version: str
    url: str
    server: ModelServer | None = None
    in_flight: int = 0
    retired: bool = False
    _idle: asyncio.Event = field(default_factory=asyncio.Event)

    def __post_init__(self) -> None:
        self._idle.set()


class BackendPool:
    """The current backend of one environment, with lease counting for draining on a switch.

    All methods run on the gateway's event loop, so the counters need no lock.
    """

    def __init__(self, model_name: str, alias: str) -> None:
        self.model_name = model_name
        self.alias = alias
        self._current: Backend | None = None

    @property
    def current(self) -> Backend | None:
        return self._current

    @asynccontextmanager
    async def lease(self) -> AsyncIterator[Backend]:
        backend = self._current
        if backend is None:
            raise NoBackend(f"no version of {self.model_name}@{self.alias} is being served yet")
        backend.in_flight += 1
        backend._idle.clear()
        try:
            yield backend
        finally:
            backend.in_flight -= 1
            if backend.in_flight == 0:
                backend._idle.set()

    def switch(self, new: Backend) -> Backend | None:
        """Send new requests to ``new``; return the old backend, which the caller drains and stops."""
        old, self._current = self._current, new
        if old is not None:
            old.retired = True
        return old

    async def drain(self, backend: Backend, timeout_s: float) -> bool:
        """Wait until no request holds ``backend``; False when requests were still running at the timeout."""
        try:
            await asyncio.wait_for(backend._idle.wait(), timeout_s)
        except TimeoutError:
            return False
        return True
