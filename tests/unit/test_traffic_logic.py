"""Pure logic of the traffic layer: micro-batching, the prediction cache, the breaker, canary stats."""

from __future__ import annotations

import asyncio
import json

import pytest

from serving.batching import BatchAnswer, MicroBatcher, PredictionCache, normalised
from serving.canary import Canary, caller_bucket
from serving.limits import Refusal
from serving.routing import CircuitBreaker
from tuneloop.config import CanaryParams


def echo_rows(texts: list[str]) -> list[dict]:
    return [{"label": text.upper(), "score": 1.0, "top_k": "[]"} for text in texts]


def test_requests_arriving_while_a_call_runs_share_the_next_call_and_get_their_own_rows() -> None:
    calls: list[list[str]] = []

    async def send(key, texts):
        calls.append(list(texts))
        await asyncio.sleep(0.01)
        return BatchAnswer(echo_rows(texts), "7")

    async def scenario():
        batcher = MicroBatcher(send, max_texts=64, max_wait_s=0.05)
        requests = [[f"a{i}", f"b{i}"] if i % 2 else [f"c{i}"] for i in range(10)]
        answers = await asyncio.gather(*(batcher.submit(("prod", 3), texts) for texts in requests))
        return requests, answers

    requests, answers = asyncio.run(scenario())
    # The first finds the server idle and goes at once; the nine behind it go together.
    assert [len(call) for call in calls] == [1, 14]
    for texts, answer in zip(requests, answers, strict=True):
        assert [row["label"] for row in answer.rows] == [text.upper() for text in texts]
        assert answer.version == "7"


def test_a_full_batch_goes_at_once_and_keys_never_mix() -> None:
    calls: list[tuple] = []

    async def send(key, texts):
        calls.append((key, len(texts)))
        return BatchAnswer(echo_rows(texts), "1")

    async def scenario():
        batcher = MicroBatcher(send, max_texts=4, max_wait_s=10, max_in_flight=2)
        opening = [batcher.submit(("prod", 3), ["t0"]), batcher.submit(("prod", 5), ["x0"])]
        # Each lane has one call running and a worker free: only a full batch goes before 10 s.
        first = [batcher.submit(("prod", 3), [f"t{i}"]) for i in range(1, 5)]
        other = batcher.submit(("prod", 5), ["x"] * 4)
        await asyncio.wait_for(asyncio.gather(*opening, *first, other), timeout=2)

    asyncio.run(scenario())
    assert sorted(calls) == [(("prod", 3), 1), (("prod", 3), 4), (("prod", 5), 1), (("prod", 5), 4)]


def test_a_lone_request_to_an_idle_server_is_not_kept_waiting() -> None:
    async def send(key, texts):
        return BatchAnswer(echo_rows(texts), "1")

    async def scenario():
        batcher = MicroBatcher(send, max_texts=64, max_wait_s=10)
        return await asyncio.wait_for(batcher.submit("k", ["alone"]), timeout=1)

    assert asyncio.run(scenario()).rows[0]["label"] == "ALONE"


def test_without_a_wait_every_request_is_sent_alone() -> None:
    sizes: list[int] = []

    async def send(key, texts):
        sizes.append(len(texts))
        return BatchAnswer(echo_rows(texts), "1")

    async def scenario():
        batcher = MicroBatcher(send, max_texts=64, max_wait_s=0)
        await asyncio.gather(*(batcher.submit("k", ["a", "b"]) for _ in range(5)))

    asyncio.run(scenario())
    assert sizes == [2] * 5


def test_one_callers_rejected_text_does_not_fail_the_others_in_its_batch() -> None:
    calls: list[list[str]] = []

    async def send(key, texts):
        calls.append(list(texts))
        await asyncio.sleep(0.01)
        if "bad" in texts:
            raise Refusal(400, "rejected_by_model", "the model server refused the input: bad")
        return BatchAnswer(echo_rows(texts), "1")

    async def scenario():
        batcher = MicroBatcher(send, max_texts=64, max_wait_s=0.05)
        return await asyncio.gather(
            batcher.submit("k", ["first"]),  # keeps the server busy, so the next two share a call
            batcher.submit("k", ["good"]),
            batcher.submit("k", ["bad"]),
            return_exceptions=True,
        )

    _, good, bad = asyncio.run(scenario())
    assert calls[1] == ["good", "bad"]  # coalesced, refused as a whole, then each sent alone
    assert isinstance(good, BatchAnswer) and good.rows[0]["label"] == "GOOD"
    assert isinstance(bad, Refusal) and bad.status == 400


def test_a_failed_call_reaches_every_waiter() -> None:
    async def send(key, texts):
        raise Refusal(502, "upstream_unavailable", "down")

    async def scenario():
        batcher = MicroBatcher(send, max_texts=64, max_wait_s=0.01)
        return await asyncio.gather(*(batcher.submit("k", ["a"]) for _ in range(3)), return_exceptions=True)

    assert all(isinstance(result, Refusal) and result.status == 502 for result in asyncio.run(scenario()))


def test_the_cache_is_per_version_and_top_k_and_ignores_spacing_only() -> None:
    cache = PredictionCache(size=10)
    row = {"label": "refund", "score": 0.9, "top_k": json.dumps([])}
    cache.store("3", 3, ["Where is  my order?\n"], [row])
    assert cache.lookup("3", 3, ["Where is my order?"]) == [row]
    assert cache.lookup("4", 3, ["Where is my order?"]) == [None]  # another version
    assert cache.lookup("3", 5, ["Where is my order?"]) == [None]  # another top_k
    assert cache.lookup("3", 3, ["where is my order?"]) == [None]  # case can change a cased model's answer
    assert (cache.hits, cache.misses) == (1, 3)
    assert normalised(" a \t b ") == "a b"
    off = PredictionCache(size=0)
    off.store("3", 3, ["x"], [row])
    assert off.lookup("3", 3, ["x"]) == [None] and not off.enabled


def test_the_breaker_opens_after_failures_then_lets_one_trial_through() -> None:
    now = [0.0]
    breaker = CircuitBreaker(failures=3, open_s=10, clock=lambda: now[0])
    for _ in range(2):
        breaker.record_failure("HTTP 500")
    assert breaker.allow() and not breaker.is_open
    breaker.record_failure("HTTP 500")
    assert breaker.is_open and not breaker.allow()
    assert breaker.retry_after_s() == 10
    now[0] = 10.5
    assert breaker.allow()  # the half-open trial
    assert not breaker.allow()  # only one at a time
    breaker.record_failure("still failing")
    assert breaker.is_open and not breaker.allow()
    now[0] = 21
    assert breaker.allow()
    breaker.record_success()
    assert not breaker.is_open and breaker.allow()


def test_a_failed_health_check_opens_the_breaker_at_once() -> None:
    breaker = CircuitBreaker(failures=5, open_s=1)
    breaker.trip("health check failed: ConnectError")
    assert breaker.is_open and breaker.describe()["last_reason"].startswith("health check")


def test_callers_are_sticky_and_spread_by_hash() -> None:
    buckets = [caller_bucket(f"api_key:svc/user-{i}") for i in range(2000)]
    assert all(0 <= bucket < 100 for bucket in buckets)
    share = sum(bucket < 20 for bucket in buckets) / len(buckets)
    assert 0.17 < share < 0.23
    assert caller_bucket("api_key:svc/user-1") == caller_bucket("api_key:svc/user-1")


def test_the_canary_ends_on_an_slo_breach_with_an_audit_entry(tmp_path) -> None:
    settings = CanaryParams(min_requests=20, max_error_rate=0.05, max_p99_latency_ms=200)
    canary = Canary(settings, tmp_path / "audit.jsonl")
    canary.start("canary", 20, "api_key:ops", "2", "3")
    for _ in range(19):
        canary.record("candidate", "3", True, 900)
        canary.record("prod", "2", True, 30)
    assert canary.slo_breach() is None  # not judged before min_requests
    canary.record("candidate", "3", True, 900)
    breach = canary.slo_breach()
    assert breach is not None and "p99 latency 900 ms" in breach
    summary = canary.summary()
    assert summary["latency_test"]["p_value"] < 0.001
    canary.stop("slo-guard", breach)
    entries = [json.loads(line) for line in (tmp_path / "audit.jsonl").read_text().splitlines()]
    assert [entry["action"] for entry in entries] == ["start", "stop"]
    assert entries[1]["actor"] == "slo-guard" and "p99" in entries[1]["reason"]
    assert not canary.active and canary.summary()["ended"]["by"] == "slo-guard"


def test_error_rates_are_compared_with_a_test(tmp_path) -> None:
    canary = Canary(CanaryParams(min_requests=50, max_error_rate=0.02), tmp_path / "audit.jsonl")
    canary.start("shadow", 0, "ops", "2", "3")
    for index in range(100):
        canary.record("prod", "2", True, 10)
        canary.record("candidate", "3", index % 10 != 0, 10)
    summary = canary.summary()
    assert summary["candidate"]["error_rate"] == pytest.approx(0.1)
    assert summary["error_rate_test"]["p_value"] < 0.01
    assert "error rate 10.0%" in (canary.slo_breach() or "")
    canary.record_agreement(["a", "b", "c", "d"], ["a", "b", "c", "x"])
    assert canary.summary()["agreement"]["share"] == 0.75
