"""The inference log on a real SQLite file: no loss under a concurrent burst, drops counted, the read API."""

from __future__ import annotations

import asyncio
import datetime as dt
import sqlite3
import threading
import time
from pathlib import Path

import pytest
from sqlalchemy import create_engine, func, select

from serving.inference_log import (
    WINDOW_COLUMNS,
    FeedbackRecord,
    InferenceLogWriter,
    PredictionRecord,
    predictions,
    read_window,
)
from serving.pii import CARD_MASK, EMAIL_MASK

BURST_REQUESTS = 2_400
PRODUCER_THREADS = 8


def prediction(request_id: str, item_index: int = 0, text: str = "where is my order", **overrides):
    fields = {
        "request_id": request_id,
        "item_index": item_index,
        "created_at": dt.datetime.now(dt.UTC),
        "model_name": "tuneloop-intent",
        "model_version": "3",
        "text": text,
        "label": "check_order_status",
        "score": 0.9,
        "latency_ms": 12.5,
    }
    return PredictionRecord(**(fields | overrides))


def count_rows(db_url: str) -> int:
    engine = create_engine(db_url)
    try:
        with engine.connect() as connection:
            return connection.execute(select(func.count()).select_from(predictions)).scalar_one()
    finally:
        engine.dispose()


@pytest.fixture()
def db_url(tmp_path: Path) -> str:
    return f"sqlite:///{tmp_path / 'log' / 'inference_log.db'}"


def test_burst_from_concurrent_producers_then_shutdown_loses_nothing(db_url: str) -> None:
    """Threads and an event loop write at once, faster than one insert each; close() flushes all."""
    writer = InferenceLogWriter(db_url, queue_size=500, batch_size=200, flush_interval_s=0.05).start()
    accepted = []

    def thread_producer(worker: int) -> None:
        for n in range(BURST_REQUESTS // (2 * PRODUCER_THREADS)):
            batch = [prediction(f"t{worker}-{n}", i) for i in range(1 + n % 3)]
            if writer.submit(batch):
                accepted.append(len(batch))

    async def loop_producer() -> None:
        async def one(n: int) -> None:
            batch = [
                prediction(f"a-{n}", i, text=f"mail me at user{n}@example.com") for i in range(1 + n % 3)
            ]
            if await writer.asubmit(batch):
                accepted.append(len(batch))

        await asyncio.gather(*(one(n) for n in range(BURST_REQUESTS // 2)))

    threads = [threading.Thread(target=thread_producer, args=(w,)) for w in range(PRODUCER_THREADS)]
    for thread in threads:
        thread.start()
    asyncio.run(loop_producer())
    for thread in threads:
        thread.join()
    writer.close()

    submitted_requests = len(accepted)
    submitted_rows = sum(accepted)
    assert submitted_requests == BURST_REQUESTS
    assert writer.dropped_rows == 0 and writer.failed_rows == 0
    assert writer.written_rows == submitted_rows
    assert count_rows(db_url) == submitted_rows
    window = read_window(db_url)
    assert len(window) == submitted_rows
    assert not window["text"].str.contains("@example.com").any()
    print(f"\nburst: {submitted_requests} requests, {submitted_rows} rows submitted and in the log")


def test_full_queue_drops_are_counted_never_silent(db_url: str) -> None:
    """With the database locked by another process' transaction, the queue fills; drops are counted and
    everything accepted is written once the lock goes."""
    writer = InferenceLogWriter(
        db_url, queue_size=2, batch_size=1, flush_interval_s=0.01, enqueue_timeout_s=0.01
    )
    writer.start()
    path = db_url.removeprefix("sqlite:///")
    blocker = sqlite3.connect(path, timeout=0)
    blocker.execute("BEGIN EXCLUSIVE")
    try:
        results = [writer.submit([prediction(f"r{n}")]) for n in range(20)]
        time.sleep(0.3)
    finally:
        blocker.rollback()
        blocker.close()
    writer.close()
    accepted = sum(results)
    assert writer.dropped_rows == 20 - accepted > 0
    assert count_rows(db_url) == accepted == writer.written_rows


def test_read_window_columns_order_filters_and_latest_feedback(db_url: str) -> None:
    writer = InferenceLogWriter(db_url, flush_interval_s=0.01).start()
    old = dt.datetime(2026, 1, 1, 12, 0, tzinfo=dt.UTC)
    writer.submit([prediction("old", 0, created_at=old)])
    writer.submit(
        [
            prediction("new", 0, text="card 4111 1111 1111 1111 declined"),
            prediction("new", 1, text="I am jo@example.org", label="login_problem"),
        ]
    )
    writer.submit([FeedbackRecord("new", 1, "close_account", dt.datetime.now(dt.UTC))])
    writer.submit([FeedbackRecord("new", 1, "login_problem", dt.datetime.now(dt.UTC))])
    assert writer.items_in_request("new") == 2
    writer.close()

    window = read_window(db_url)
    assert tuple(window.columns) == WINDOW_COLUMNS
    assert list(window["request_id"]) == ["old", "new", "new"]
    assert list(window["text"])[1:] == [f"card {CARD_MASK} declined", f"I am {EMAIL_MASK}"]
    assert list(window["true_label"]) == [None, None, "login_problem"]
    assert str(window["created_at"].dt.tz) == "UTC"
    assert window["created_at"].iloc[0] == old

    assert list(read_window(db_url, last_n=2)["item_index"]) == [0, 1]
    recent = read_window(db_url, since=dt.datetime(2026, 1, 2))
    assert set(recent["request_id"]) == {"new"}
    assert len(read_window(db_url, last_n=1, since=old)) == 1


def test_request_lookup_falls_back_to_the_database(db_url: str) -> None:
    first = InferenceLogWriter(db_url, flush_interval_s=0.01).start()
    first.submit([prediction("abc", 0), prediction("abc", 1), prediction("abc", 2)])
    first.close()
    second = InferenceLogWriter(db_url).start()
    try:
        assert second.items_in_request("abc") == 3
        assert second.items_in_request("nope") is None
    finally:
        second.close()


def test_empty_log_reads_as_an_empty_frame_with_the_columns(db_url: str) -> None:
    window = read_window(db_url)
    assert window.empty and tuple(window.columns) == WINDOW_COLUMNS
