"""Which model server answers at an environment's stable address, and how traffic moves between them.

Every request leases the current backend for its whole life; a switch only changes which backend new
requests lease, and the old one is stopped after its last lease ends (drain). This is why a swap loses
no request: nothing in flight ever sees its server disappear.
"""

from __future__ import annotations

import asyncio
import logging
import math
import time
from collections.abc import AsyncIterator, Callable
from contextlib import asynccontextmanager
from dataclasses import dataclass, field

from serving.model_server import ModelServer

log = logging.getLogger(__name__)


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

    def __init__(self, model_name: str, alias: str, breaker: CircuitBreaker | None = None) -> None:
        self.model_name = model_name
        self.alias = alias
        self._current: Backend | None = None
        # Guards the current backend; a switch to a fresh server resets it.
        self.breaker = breaker or CircuitBreaker(failures=5, open_s=10)

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
        self.breaker.reset()
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


class CircuitBreaker:
    """Stops sending requests to a model server that keeps failing, and lets one trial through later.

    Closed: calls go through; ``failures`` failed calls in a row (or a failed health check) open it.
    Open: calls are refused at once (the gateway answers from the fallback or with a fast 503) until
    ``open_s`` has passed; then one trial call is let through (half-open). Its success closes the
    breaker, its failure opens it again. A swap to a fresh server resets it. Hand-written: the
    breakers on PyPI (pybreaker, circuitbreaker, aiobreaker, purgatory) wrap a decorated call, while
    this one must also be tripped by an out-of-band health check and report its retry time for
    ``Retry-After``; the state machine is 60 lines.
    """

    def __init__(self, failures: int, open_s: float, clock: Callable[[], float] = time.monotonic) -> None:
        self.failures = failures
        self.open_s = open_s
        self.clock = clock
        self.consecutive_failures = 0
        self.opened_at: float | None = None
        self.trial_running = False
        self.opened_total = 0
        self.last_reason: str | None = None

    @property
    def is_open(self) -> bool:
        return self.opened_at is not None

    def allow(self) -> bool:
        """Whether a call may go to the server now (taking the half-open trial slot when due)."""
        if self.opened_at is None:
            return True
        if not self.trial_running and self.clock() - self.opened_at >= self.open_s:
            self.trial_running = True
            return True
        return False

    def retry_after_s(self) -> int:
        if self.opened_at is None:
            return 0
        return max(1, math.ceil(self.open_s - (self.clock() - self.opened_at)))

    def record_success(self) -> None:
        if self.opened_at is not None:
            log.info("circuit breaker closed: the model server answered again")
        self.consecutive_failures = 0
        self.opened_at = None
        self.trial_running = False

    def record_failure(self, reason: str) -> None:
        self.consecutive_failures += 1
        self.last_reason = reason
        if self.trial_running or self.consecutive_failures >= self.failures:
            self.trip(reason)

    def trip(self, reason: str) -> None:
        """Open now (a health check failed, or too many calls did)."""
        if self.opened_at is None:
            self.opened_total += 1
            log.error("circuit breaker opened: %s", reason)
        self.last_reason = reason
        self.opened_at = self.clock()
        self.trial_running = False

    def reset(self) -> None:
        """A new server took over: start closed."""
        self.record_success()

    def describe(self) -> dict:
        return {
            "open": self.is_open,
            "consecutive_failures": self.consecutive_failures,
            "opened_total": self.opened_total,
            "last_reason": self.last_reason,
            "retry_after_s": self.retry_after_s(),
        }
