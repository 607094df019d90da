"""The inference log on a real SQLite file: no loss under a concurrent burst, drops counted, the read API,
dead letters when the store refuses, principals and the migration that adds them, the feedback-share
cap, retention and erasure."""

from __future__ import annotations

import asyncio
import datetime as dt
import json
import sqlite3
import threading
import time
from pathlib import Path

import pandas as pd
import pytest
from sqlalchemy import create_engine, func, select

from serving.inference_log import (
    WINDOW_COLUMNS,
    FeedbackRecord,
    InferenceLogWriter,
    PredictionRecord,
    RequestOwner,
    cap_feedback_share,
    delete_older_than,
    ensure_schema,
    erase,
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
    # Producers may wait for room as long as it takes (drops on a full queue are tested below): on a
    # busy 2-core machine the writer thread can be starved for over a second.
    writer = InferenceLogWriter(
        db_url, queue_size=500, batch_size=200, flush_interval_s=0.05, enqueue_timeout_s=30
    ).start()
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


# ------------------------------------------------------------------------- dead letters, principals


def dead_letters(path: Path) -> list[dict]:
    return [json.loads(line) for line in path.read_text().splitlines()] if path.exists() else []


def sqlite_execute(db_url: str, *statements: str) -> None:
    with sqlite3.connect(db_url.removeprefix("sqlite:///")) as connection:
        for statement in statements:
            connection.execute(statement)


def wait_until(condition, seconds: float = 10.0) -> None:
    deadline = time.monotonic() + seconds
    while not condition():
        assert time.monotonic() < deadline, "timed out"
        time.sleep(0.02)


def test_a_refused_batch_goes_to_the_dead_letter_file_and_later_batches_are_written(db_url: str) -> None:
    """A trigger makes the store refuse every insert; the batch is set aside (masked), the writer goes
    on, and once the store takes rows again the next batches land in the table."""
    writer = InferenceLogWriter(db_url, flush_interval_s=0.01, retry_delay_s=0.01).start()
    sqlite_execute(
        db_url,
        "CREATE TRIGGER refuse_all BEFORE INSERT ON predictions "
        "BEGIN SELECT RAISE(ABORT, 'store refuses'); END",
    )
    try:
        writer.submit([prediction("refused", 0, text="mail me at jo@example.com"), prediction("refused", 1)])
        wait_until(lambda: writer.dead_lettered_rows == 2)
        sqlite_execute(db_url, "DROP TRIGGER refuse_all")
        writer.submit([prediction("later", 0)])
        writer.submit([FeedbackRecord("later", 0, "cancel_order", dt.datetime.now(dt.UTC), "api_key:k1")])
    finally:
        writer.close()
    assert writer.dead_lettered_rows == 2 and writer.written_rows == 2 and writer.failed_rows == 0
    window = read_window(db_url)
    assert list(window["request_id"]) == ["later"] and list(window["true_label"]) == ["cancel_order"]
    letters = dead_letters(writer.dead_letter_path)
    assert writer.dead_letter_path == Path(db_url.removeprefix("sqlite:///")).with_name(
        "inference_log.deadletter.jsonl"
    )
    assert [(letter["table"], letter["row"]["item_index"]) for letter in letters] == [
        ("predictions", 0),
        ("predictions", 1),
    ]
    assert "store refuses" in letters[0]["error"]
    assert letters[0]["row"]["text"] == f"mail me at {EMAIL_MASK}"  # masked before it left memory


def test_one_bad_row_costs_only_its_own_request(db_url: str, tmp_path: Path) -> None:
    """A constraint that one request's row breaks: the requests batched with it are still written."""
    writer = InferenceLogWriter(
        db_url, batch_size=100, flush_interval_s=0.3, dead_letter_path=tmp_path / "dl" / "letters.jsonl"
    ).start()
    sqlite_execute(
        db_url,
        "CREATE TRIGGER no_poison BEFORE INSERT ON predictions WHEN NEW.text LIKE '%poison%' "
        "BEGIN SELECT RAISE(ABORT, 'row breaks a constraint'); END",
    )
    try:
        for n in range(5):
            text = "poison pill" if n == 2 else f"text {n}"
            writer.submit([prediction(f"r{n}", 0, text=text), prediction(f"r{n}", 1)])
    finally:
        writer.close()
    assert set(read_window(db_url)["request_id"]) == {"r0", "r1", "r3", "r4"}
    letters = dead_letters(tmp_path / "dl" / "letters.jsonl")
    assert {letter["row"]["request_id"] for letter in letters} == {"r2"} and len(letters) == 2
    assert writer.written_rows == 8 and writer.dead_lettered_rows == 2


def test_a_locked_store_is_retried_with_backoff_then_dead_lettered_and_the_writer_recovers(
    db_url: str,
) -> None:
    writer = InferenceLogWriter(
        db_url, flush_interval_s=0.01, write_attempts=3, retry_delay_s=0.05, busy_timeout_s=0.05
    ).start()
    blocker = sqlite3.connect(db_url.removeprefix("sqlite:///"), timeout=0)
    blocker.execute("BEGIN EXCLUSIVE")
    try:
        started = time.monotonic()
        writer.submit([prediction("while-locked", 0)])
        wait_until(lambda: writer.dead_lettered_rows == 1)
        # Three attempts with 0.05 s and 0.1 s between them: bounded, not forever.
        assert time.monotonic() - started < 5
        # While the store stays down, a batch gets one attempt, so the queue keeps moving.
        writer.submit([prediction("still-locked", 0)])
        wait_until(lambda: writer.dead_lettered_rows == 2)
    finally:
        blocker.rollback()
        blocker.close()
    writer.submit([prediction("after", 0)])
    writer.close()
    assert list(read_window(db_url)["request_id"]) == ["after"]
    letters = dead_letters(writer.dead_letter_path)
    assert [letter["row"]["request_id"] for letter in letters] == ["while-locked", "still-locked"]
    assert "locked" in letters[0]["error"]


def test_old_tables_get_the_new_columns_and_rows_carry_their_principal(db_url: str) -> None:
    """A log created by the release before principals: its rows survive, new rows record who asked."""
    path = Path(db_url.removeprefix("sqlite:///"))
    path.parent.mkdir(parents=True)
    sqlite_execute(
        db_url,
        "CREATE TABLE predictions (id INTEGER PRIMARY KEY, request_id VARCHAR(64) NOT NULL, "
        "item_index INTEGER NOT NULL, created_at DATETIME NOT NULL, model_name VARCHAR(256) NOT NULL, "
        "model_version VARCHAR(64) NOT NULL, text TEXT NOT NULL, label VARCHAR(256) NOT NULL, "
        "score FLOAT NOT NULL, latency_ms FLOAT NOT NULL)",
        "CREATE TABLE feedback (id INTEGER PRIMARY KEY, request_id VARCHAR(64) NOT NULL, item_index INTEGER "
        "NOT NULL, true_label VARCHAR(256) NOT NULL, created_at DATETIME NOT NULL)",
        "INSERT INTO predictions VALUES (1, 'legacy', 0, '2026-01-01 00:00:00', 'm', '1', 'old text', "
        "'cancel_order', 0.5, 3.0)",
    )
    writer = InferenceLogWriter(db_url, flush_interval_s=0.01).start()
    writer.submit([prediction("new", 0, principal="api_key:abc", subject="user-7")])
    writer.submit([FeedbackRecord("new", 0, "cancel_order", dt.datetime.now(dt.UTC), "api_key:abc")])
    assert writer.request_owner("new") == RequestOwner(1, "api_key:abc")
    writer.close()
    window = read_window(db_url)
    assert list(window["request_id"]) == ["legacy", "new"]
    assert list(window["principal"]) == [None, "api_key:abc"]
    assert list(window["feedback_principal"]) == [None, "api_key:abc"]
    reopened = InferenceLogWriter(db_url).start()
    try:
        assert reopened.request_owner("new") == RequestOwner(1, "api_key:abc")
        assert reopened.request_owner("legacy") == RequestOwner(1, None)
    finally:
        reopened.close()
    engine = create_engine(db_url)
    try:
        assert ensure_schema(engine) == []  # idempotent
    finally:
        engine.dispose()


# ------------------------------------------------------------------------------- feedback share cap


def labelled_frame(principals: list[str | None]) -> pd.DataFrame:
    start = dt.datetime(2026, 3, 1, tzinfo=dt.UTC)
    return pd.DataFrame(
        {
            "request_id": [f"r{n}" for n in range(len(principals))],
            "created_at": [start + dt.timedelta(minutes=n) for n in range(len(principals))],
            "true_label": ["cancel_order"] * len(principals),
            "feedback_principal": principals,
        }
    )


def test_cap_keeps_every_principal_under_the_share_oldest_rows_first() -> None:
    frame = labelled_frame(["jwt:flood"] * 80 + ["api_key:a"] * 10 + ["api_key:b"] * 10)
    # Shuffled rows: "oldest first" is by created_at, not by position.
    shuffled = frame.sample(frac=1, random_state=3)
    capped = cap_feedback_share(shuffled, 0.4)
    shares = capped["feedback_principal"].value_counts(normalize=True)
    assert shares.max() <= 0.4
    flood = capped[capped["feedback_principal"] == "jwt:flood"]
    assert len(flood) == 13  # the largest c with c <= 0.4 * (c + 20)
    assert set(flood["request_id"]) == {f"r{n}" for n in range(13)}
    assert (capped["feedback_principal"] != "jwt:flood").sum() == 20
    assert list(capped.index) == [i for i in shuffled.index if i in set(capped.index)]  # order kept
    assert capped.equals(cap_feedback_share(shuffled, 0.4))  # deterministic


def test_cap_leaves_unlabelled_and_unattributed_rows_and_is_off_at_one() -> None:
    frame = labelled_frame(["k1"] * 6 + [None] * 4)
    frame.loc[0, "true_label"] = None  # a prediction without feedback is not feedback
    capped = cap_feedback_share(frame, 0.5)
    assert "r0" in set(capped["request_id"])
    assert capped["feedback_principal"].isna().sum() == 4
    labelled_k1 = capped[capped["true_label"].notna() & (capped["feedback_principal"] == "k1")]
    assert len(labelled_k1) == 4  # of 5: the largest c with c <= 0.5 * (c + 4)
    assert cap_feedback_share(frame, 1.0).equals(frame)
    single = labelled_frame(["only"] * 5)
    assert cap_feedback_share(single, 0.9).empty  # one source is 100% of itself
    with pytest.raises(ValueError, match="max_share"):
        cap_feedback_share(frame, 0)


# --------------------------------------------------------------------------- retention and erasure


def test_delete_older_than_removes_old_rows_and_their_feedback(db_url: str) -> None:
    now = dt.datetime(2026, 6, 1, tzinfo=dt.UTC)
    old, recent = now - dt.timedelta(days=40), now - dt.timedelta(days=2)
    writer = InferenceLogWriter(db_url, flush_interval_s=0.01).start()
    writer.submit([prediction("old", 0, created_at=old), prediction("old", 1, created_at=old)])
    writer.submit([prediction("new", 0, created_at=recent)])
    # Feedback given recently on an old prediction goes with it; old feedback on a new one goes too.
    writer.submit([FeedbackRecord("old", 1, "cancel_order", recent)])
    writer.submit([FeedbackRecord("new", 0, "cancel_order", old), FeedbackRecord("new", 0, "refund", recent)])
    writer.close()
    assert delete_older_than(db_url, 30, now=now, batch_size=1) == 4
    window = read_window(db_url)
    assert list(window["request_id"]) == ["new"] and list(window["true_label"]) == ["refund"]
    assert delete_older_than(db_url, 30, now=now) == 0


def test_erase_removes_a_subjects_requests_everywhere_and_says_what(db_url: str, tmp_path: Path) -> None:
    writer = InferenceLogWriter(db_url, flush_interval_s=0.01).start()
    writer.submit([prediction("a1", 0, subject="user-1"), prediction("a1", 1, subject="user-1")])
    writer.submit([prediction("a2", 0, subject="user-1")])
    writer.submit([prediction("b1", 0, subject="user-2")])
    writer.submit([prediction("c1", 0)])
    writer.submit([FeedbackRecord("a1", 0, "cancel_order", dt.datetime.now(dt.UTC))])
    writer.close()
    # A row of user-1 that the store had refused sits in the dead-letter file: it is erased too.
    with open(writer.dead_letter_path, "w") as out:
        for request_id, subject in (("a3", "user-1"), ("b2", "user-2")):
            row = {"request_id": request_id, "item_index": 0, "subject": subject, "text": "x"}
            out.write(json.dumps({"table": "predictions", "row": row, "error": "e"}) + "\n")

    removed = erase(db_url, subject="user-1", request_ids=["c1", "never-logged"])
    assert removed == {
        "predictions": 4,
        "feedback": 1,
        "dead_letter": 1,
        "request_ids": ["a1", "a2", "a3", "c1"],
    }
    assert list(read_window(db_url)["request_id"]) == ["b1"]
    assert [letter["row"]["request_id"] for letter in dead_letters(writer.dead_letter_path)] == ["b2"]
    assert erase(db_url, subject="user-1")["request_ids"] == []
    with pytest.raises(ValueError, match="subject or request ids"):
        erase(db_url)


@pytest.mark.slow
def test_the_retention_flow_deletes_what_is_past_the_period(
    prefect_harness, db_url: str, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    from flows.retention import inference_log_retention

    monkeypatch.setenv("TUNELOOP_HOME", str(tmp_path / "home"))
    monkeypatch.setenv("TUNELOOP_INFERENCE_LOG_URL", db_url)
    writer = InferenceLogWriter(db_url, flush_interval_s=0.01).start()
    writer.submit([prediction("ancient", 0, created_at=dt.datetime.now(dt.UTC) - dt.timedelta(days=400))])
    writer.submit([prediction("fresh", 0)])
    writer.close()
    result = inference_log_retention(max_age_days=90, project_dir=str(tmp_path))
    assert result["deleted_rows"] == 1 and result["max_age_days"] == 90
    assert list(read_window(db_url)["request_id"]) == ["fresh"]
