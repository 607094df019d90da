"""Lease counting, switching and draining at a stable address; the supervisor's retry rules.

The real swap (processes, HTTP, a steady request stream) is tests/integration/test_serving.py; these
pin the ordering rules that make it lossless.
"""

from __future__ import annotations

import asyncio

import pytest

from serving.model_server import ModelServerFailed, check_warmup_answer
from serving.routing import Backend, BackendPool, NoBackend
from serving.supervisor import AliasSupervisor
from tests.support import settings


def run(coroutine):
    return asyncio.run(coroutine)


def test_without_a_backend_requests_are_told_nothing_is_served():
    async def scenario():
        async with BackendPool("m", "prod").lease():
            pass

    with pytest.raises(NoBackend, match="no version of m@prod is being served yet"):
        run(scenario())


def test_a_request_in_flight_finishes_on_the_old_backend_and_drain_waits_for_it():
    async def scenario():
        pool = BackendPool("m", "prod")
        pool.switch(Backend("1", "http://old"))
        release = asyncio.Event()
        served_by = []

        async def slow_request():
            async with pool.lease() as backend:
                await release.wait()
                served_by.append(backend.version)

        request = asyncio.create_task(slow_request())
        await asyncio.sleep(0)
        old = pool.switch(Backend("2", "http://new"))
        async with pool.lease() as backend:
            served_by.append(backend.version)
        drain = asyncio.create_task(pool.drain(old, timeout_s=5))
        await asyncio.sleep(0.05)
        assert not drain.done(), "drain returned while a request still held the old backend"
        release.set()
        assert await drain is True
        await request
        return old, served_by

    old, served_by = run(scenario())
    assert old.retired and old.in_flight == 0
    assert served_by == ["2", "1"]


def test_drain_gives_up_after_its_timeout():
    async def scenario():
        pool = BackendPool("m", "prod")
        pool.switch(Backend("1", "http://old"))
        stuck = asyncio.Event()

        async def hung_request():
            async with pool.lease():
                await stuck.wait()

        task = asyncio.create_task(hung_request())
        await asyncio.sleep(0)
        old = pool.switch(Backend("2", "http://new"))
        drained = await pool.drain(old, timeout_s=0.05)
        stuck.set()
        await task
        return drained

    assert run(scenario()) is False


def test_a_version_that_fails_to_start_is_not_retried_until_the_backoff_passes():
    launches = []

    def failing_launch(version):
        launches.append(version)
        raise ModelServerFailed(f"v{version} exited with code 1")

    async def scenario():
        pool = BackendPool("m", "prod")
        pool.switch(Backend("1", "http://old"))
        serving = settings("serving", retry_failed_after_s=3600)
        supervisor = AliasSupervisor(pool, lambda: "2", failing_launch, serving)
        first = await supervisor.check_once()
        second = await supervisor.check_once()
        return pool, first, second, supervisor

    pool, first, second, supervisor = run(scenario())
    assert launches == ["2"]
    assert first is not None and not first.ok and "exited with code 1" in first.error
    assert second is None
    assert pool.current.version == "1"
    assert supervisor.describe()["last_error"] == "v2 exited with code 1"


def test_an_unset_alias_keeps_what_is_served():
    async def scenario():
        pool = BackendPool("m", "prod")
        pool.switch(Backend("1", "http://old"))
        supervisor = AliasSupervisor(pool, lambda: None, lambda version: None, settings("serving"))
        return pool, await supervisor.check_once()

    pool, outcome = run(scenario())
    assert outcome is None and pool.current.version == "1"


@pytest.mark.parametrize(
    "payload, problem",
    [
        ({"predictions": [{"label": "a"}]}, "expected 2 predictions"),
        ({"predictions": [{"label": "a"}, {"score": 1.0}]}, "without a label"),
        ({"predictions": [{"generated": "{"}, {"new_tokens": 1}]}, "without a label or generated text"),
        ({"error_code": "BAD_REQUEST"}, "expected 2 predictions"),
    ],
)
def test_a_server_is_not_ready_until_its_warmup_answer_is_usable(payload, problem):
    with pytest.raises(ValueError, match=problem):
        check_warmup_answer(payload, expected_rows=2)
    check_warmup_answer({"predictions": [{"label": "a"}, {"label": "b"}]}, expected_rows=2)
    check_warmup_answer({"predictions": [{"generated": "{", "new_tokens": 1}] * 2}, expected_rows=2)
