"""The inference log: one row per predicted text, and the true labels that feedback attaches later.

The gateway must answer without waiting for a database, yet lose no row. So request handlers put
their rows on a bounded queue and one writer thread masks PII and inserts them in batches (one
transaction per batch). What happens when the database cannot keep up or refuses:

- the queue absorbs bursts (``log_queue_size`` requests);
- when it is full, a request waits up to ``log_enqueue_timeout_s`` for room (back-pressure, off the
  event loop), then its rows are dropped — counted in :attr:`InferenceLogWriter.dropped_rows`
  (exported as ``tuneloop_inference_log_dropped_total``) and logged, never silently;
- a write the store cannot take now (locked, unreachable) is retried ``write_attempts`` times with
  exponential back-off; a write it refuses (a row breaks a constraint) is split per request so that
  only the offending request's rows are set aside. Rows that still cannot be written go, masked, to
  the dead-letter file (JSON lines, :attr:`InferenceLogWriter.dead_letter_path`), counted in
  :attr:`InferenceLogWriter.dead_lettered_rows`, and the writer goes on with the next batch. While
  the store is down each batch gets one attempt, so the queue keeps moving instead of filling up;
- :meth:`InferenceLogWriter.close` (the gateway's shutdown) writes everything still queued.

Every row records the ``principal`` that the gateway authenticated (``api_key:<id>`` or
``jwt:<subject>``); prediction rows may also carry ``subject``, an end-user id the caller chose to
send (header ``X-Subject-Id``), which is what :func:`erase` looks for. Tables created before these
columns existed get them on first open (:func:`ensure_schema`).

SQLAlchemy Core makes the same code run on SQLite (the default, in WAL mode so the drift job can read
while the gateway writes) and on PostgreSQL at scale (install a driver such as ``psycopg``).
"""

from __future__ import annotations

import collections
import datetime as dt
import json
import logging
import os
import queue
import tempfile
import threading
import time
from collections.abc import Iterable, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import anyio
import numpy as np
import pandas as pd
from filelock import FileLock
from sqlalchemy import (
    BigInteger,
    Boolean,
    Column,
    DateTime,
    Engine,
    Float,
    Index,
    Integer,
    MetaData,
    String,
    Table,
    Text,
    and_,
    create_engine,
    delete,
    event,
    func,
    insert,
    inspect,
    select,
    text,
)
from sqlalchemy.engine import make_url
from sqlalchemy.exc import DataError, IntegrityError, SQLAlchemyError

from serving.pii import PiiMasker

log = logging.getLogger(__name__)

WINDOW_COLUMNS = (
    "request_id",
    "item_index",
    "created_at",
    "model_name",
    "model_version",
    "text",
    "label",
    "score",
    "latency_ms",
    "true_label",
    # Who asked for the prediction, and who gave the latest feedback on it (None: not recorded).
    "principal",
    "feedback_principal",
)

_Id = BigInteger().with_variant(Integer, "sqlite")  # SQLite autoincrements only INTEGER PRIMARY KEY
metadata = MetaData()
predictions = Table(
    "predictions",
    metadata,
    Column("id", _Id, primary_key=True, autoincrement=True),
    Column("request_id", String(64), nullable=False),
    Column("item_index", Integer, nullable=False),
    Column("created_at", DateTime(timezone=True), nullable=False, index=True),
    Column("model_name", String(256), nullable=False),
    Column("model_version", String(64), nullable=False),
    Column("text", Text, nullable=False),
    Column("label", String(256), nullable=False),
    Column("score", Float, nullable=False),
    Column("latency_ms", Float, nullable=False),
    # Added after the first release: nullable, so ensure_schema can add them to existing tables.
    Column("principal", String(256), nullable=True),
    Column("subject", String(256), nullable=True),
    # Generation rows (POST /v1/generate): the answer (PII masked) and its token counts; NULL on
    # classification rows. A generation row's label is "" and its score 0 (NOT NULL since the first
    # release); read_window leaves generation rows out, read_generations reads them.
    Column("generated", Text, nullable=True),
    Column("prompt_tokens", Integer, nullable=True),
    Column("new_tokens", Integer, nullable=True),
    Index("ix_predictions_request", "request_id", "item_index"),
    Index("ix_predictions_subject", "subject"),
)
feedback = Table(
    "feedback",
    metadata,
    Column("id", _Id, primary_key=True, autoincrement=True),
    Column("request_id", String(64), nullable=False),
    Column("item_index", Integer, nullable=False),
    Column("true_label", String(256), nullable=False),
    Column("created_at", DateTime(timezone=True), nullable=False),
    Column("principal", String(256), nullable=True),
    # Feedback on a generation: the answer accepted as it was, or the caller's corrected text (PII
    # masked); true_label is "" on these rows.
    Column("accepted", Boolean, nullable=True),
    Column("edited_output", Text, nullable=True),
    Index("ix_feedback_request", "request_id", "item_index"),
)


@dataclass(frozen=True)
class PredictionRecord:
    """One predicted text as the gateway saw it (``text`` raw here; masked by the writer).

    ``principal``: the authenticated caller; ``subject``: the end-user id the caller sent, if any.
    A generation's row has ``generated`` (raw here; masked by the writer) and its token counts, with
    ``label=""`` and ``score=0.0``.
    """

    request_id: str
    item_index: int
    created_at: dt.datetime
    model_name: str
    model_version: str
    text: str
    label: str
    score: float
    latency_ms: float
    principal: str | None = None
    subject: str | None = None
    generated: str | None = None
    prompt_tokens: int | None = None
    new_tokens: int | None = None

    @property
    def is_generation(self) -> bool:
        return self.generated is not None


@dataclass(frozen=True)
class FeedbackRecord:
    """A true label (classification), or on a generation ``accepted=True`` or ``edited_output``
    (raw here; masked by the writer) with ``true_label=""``."""

    request_id: str
    item_index: int
    true_label: str
    created_at: dt.datetime
    principal: str | None = None
    accepted: bool | None = None
    edited_output: str | None = None


@dataclass(frozen=True)
class RequestOwner:
    """How many texts a logged request predicted, the principal that asked, and whether it generated."""

    items: int
    principal: str | None
    generation: bool = False


MASKING_FAILED = "<MASKING_FAILED>"
LogItem = tuple[PredictionRecord, ...] | tuple[FeedbackRecord, ...]
_STOP = object()


def utc_now() -> dt.datetime:
    return dt.datetime.now(dt.UTC)


def open_engine(db_url: str, busy_timeout_s: float = 30.0) -> Engine:
    """An engine for the log; SQLite gets its folder created, WAL mode and a busy timeout."""
    url = make_url(db_url)
    if url.get_backend_name() != "sqlite":
        return create_engine(url, pool_pre_ping=True)
    if url.database and url.database != ":memory:":
        Path(url.database).parent.mkdir(parents=True, exist_ok=True)
    engine = create_engine(url, connect_args={"timeout": busy_timeout_s})

    @event.listens_for(engine, "connect")
    def _sqlite_pragmas(connection, _record) -> None:
        cursor = connection.cursor()
        cursor.execute("PRAGMA journal_mode=WAL")
        cursor.execute("PRAGMA synchronous=NORMAL")
        cursor.close()

    return engine


def ensure_schema(engine: Engine) -> list[str]:
    """Create missing tables, add columns and indexes that tables from older releases lack.

    A light migration: every column added since the first release is nullable, so ``ALTER TABLE ...
    ADD COLUMN`` is enough on SQLite and PostgreSQL. Returns the columns it added (``table.column``).
    Two processes migrating at once are fine: the loser's ALTER fails and the column is there.
    """
    metadata.create_all(engine)
    added = []
    preparer = engine.dialect.identifier_preparer
    for table in metadata.sorted_tables:
        present = {column["name"] for column in inspect(engine).get_columns(table.name)}
        for column in table.columns:
            if column.name in present:
                continue
            statement = (
                f"ALTER TABLE {preparer.quote(table.name)} ADD COLUMN {preparer.quote(column.name)} "
                f"{column.type.compile(dialect=engine.dialect)}"
            )
            try:
                with engine.begin() as connection:
                    connection.execute(text(statement))
            except SQLAlchemyError:
                if column.name not in {c["name"] for c in inspect(engine).get_columns(table.name)}:
                    raise
            added.append(f"{table.name}.{column.name}")
        for index in table.indexes:
            index.create(engine, checkfirst=True)
    if added:
        log.info("inference log: added columns %s to tables created by an older release", added)
    return added


def _to_db_time(moment: dt.datetime, engine: Engine) -> dt.datetime:
    """UTC; naive for SQLite, which stores no offset (every stored time is UTC)."""
    moment = moment.replace(tzinfo=dt.UTC) if moment.tzinfo is None else moment.astimezone(dt.UTC)
    return moment.replace(tzinfo=None) if engine.dialect.name == "sqlite" else moment


def default_dead_letter_path(db_url: str) -> Path:
    """Beside a SQLite log (``<name>.deadletter.jsonl``); for a server database, in the working folder."""
    url = make_url(db_url)
    if url.get_backend_name() == "sqlite" and url.database and url.database != ":memory:":
        database = Path(url.database)
        return database.with_name(f"{database.stem}.deadletter.jsonl")
    return Path.cwd() / "inference_log.deadletter.jsonl"


def _dead_letter_lock(path: Path) -> FileLock:
    return FileLock(str(path) + ".lock", timeout=30)


def _json_value(value: object) -> object:
    return value.isoformat() if isinstance(value, dt.datetime) else str(value)


class InferenceLogWriter:
    """Bounded queue + one writer thread that batches inserts; :meth:`start` it, :meth:`close` it."""

    # Request ids remembered in memory so feedback can be checked before their rows reach the database.
    RECENT_REQUESTS = 100_000
    RETRY_MAX_DELAY_S = 5.0

    def __init__(
        self,
        db_url: str,
        *,
        queue_size: int = 10_000,
        batch_size: int = 500,
        flush_interval_s: float = 0.5,
        enqueue_timeout_s: float = 1.0,
        masker: PiiMasker | None = None,
        write_attempts: int = 5,
        retry_delay_s: float = 0.2,
        busy_timeout_s: float = 5.0,
        dead_letter_path: Path | None = None,
    ) -> None:
        """``write_attempts`` tries per batch, ``retry_delay_s`` doubling between them (at most 5 s);
        ``busy_timeout_s``: how long one SQLite write waits for a lock; ``dead_letter_path``: where
        rows the store would not take go (default: :func:`default_dead_letter_path`)."""
        if write_attempts < 1:
            raise ValueError("write_attempts must be >= 1")
        self.db_url = db_url
        self.batch_size = batch_size
        self.flush_interval_s = flush_interval_s
        self.enqueue_timeout_s = enqueue_timeout_s
        self.masker = masker or PiiMasker()
        self.write_attempts = write_attempts
        self.retry_delay_s = retry_delay_s
        self.busy_timeout_s = busy_timeout_s
        self.dead_letter_path = Path(dead_letter_path or default_dead_letter_path(db_url))
        self._queue: queue.Queue = queue.Queue(maxsize=queue_size)
        self._thread: threading.Thread | None = None
        self._engine: Engine | None = None
        self._counts_lock = threading.Lock()
        self._recent: collections.OrderedDict[str, RequestOwner] = collections.OrderedDict()
        # Set when a batch exhausted its retries because the store is down; cleared by the next success.
        self._store_down = False
        self.written_rows = 0
        self.dropped_rows = 0
        self.failed_rows = 0
        self.dead_lettered_rows = 0

    # ------------------------------------------------------------------------------------- lifecycle

    def start(self) -> InferenceLogWriter:
        self._engine = open_engine(self.db_url, busy_timeout_s=self.busy_timeout_s)
        ensure_schema(self._engine)
        self._thread = threading.Thread(target=self._run, name="inference-log-writer", daemon=True)
        self._thread.start()
        return self

    def close(self, timeout_s: float = 60.0) -> None:
        """Write everything queued, then stop. Rows still queued after ``timeout_s`` are counted as failed."""
        if self._thread is None:
            return
        self._queue.put(_STOP)  # blocks only while the writer drains a full queue
        self._thread.join(timeout_s)
        if self._thread.is_alive():
            log.error(
                "inference log writer did not finish within %.0f s; %d requests unwritten",
                timeout_s,
                self._queue.qsize(),
            )
        self._thread = None
        if self._engine is not None:
            self._engine.dispose()

    @property
    def queue_depth(self) -> int:
        return self._queue.qsize()

    # ------------------------------------------------------------------------------------ producers

    def submit(self, records: Sequence[PredictionRecord] | Sequence[FeedbackRecord]) -> bool:
        """Queue one request's rows from a thread; False (and counted) when dropped for lack of room."""
        item = tuple(records)
        self._remember(item)
        try:
            self._queue.put(item, timeout=self.enqueue_timeout_s)
        except queue.Full:
            self._count_drop(item)
            return False
        return True

    async def asubmit(self, records: Sequence[PredictionRecord] | Sequence[FeedbackRecord]) -> bool:
        """Queue one request's rows from the event loop; waits for room in a worker thread, not the loop."""
        item = tuple(records)
        self._remember(item)
        try:
            self._queue.put_nowait(item)
            return True
        except queue.Full:
            pass
        try:
            await anyio.to_thread.run_sync(lambda: self._queue.put(item, timeout=self.enqueue_timeout_s))
        except queue.Full:
            self._count_drop(item)
            return False
        return True

    def _remember(self, item: tuple) -> None:
        if item and isinstance(item[0], PredictionRecord):
            with self._counts_lock:
                self._recent[item[0].request_id] = RequestOwner(
                    len(item), item[0].principal, item[0].is_generation
                )
                while len(self._recent) > self.RECENT_REQUESTS:
                    self._recent.popitem(last=False)

    def _count_drop(self, item: tuple) -> None:
        with self._counts_lock:
            self.dropped_rows += len(item)
            dropped = self.dropped_rows
        log.error(
            "inference log queue full for %.1f s: dropped %d rows (%d dropped in total)",
            self.enqueue_timeout_s,
            len(item),
            dropped,
        )

    def request_owner(self, request_id: str) -> RequestOwner | None:
        """How many texts a request predicted and for whom (None when unknown), for checking feedback."""
        with self._counts_lock:
            if request_id in self._recent:
                return self._recent[request_id]
        engine = self._engine
        if engine is None:
            return None
        with engine.connect() as connection:
            count, principal, generated = connection.execute(
                select(
                    func.count(), func.max(predictions.c.principal), func.count(predictions.c.generated)
                ).where(predictions.c.request_id == request_id)
            ).one()
        return RequestOwner(count, principal, bool(generated)) if count else None

    def items_in_request(self, request_id: str) -> int | None:
        """How many texts a request predicted (None when unknown)."""
        owner = self.request_owner(request_id)
        return owner.items if owner is not None else None

    # --------------------------------------------------------------------------------------- writer

    def _run(self) -> None:
        stopping = False
        while not stopping:
            try:
                first = self._queue.get(timeout=self.flush_interval_s)
            except queue.Empty:
                continue
            items, rows = [], 0
            if first is _STOP:
                stopping = True
            else:
                items.append(first)
                rows += len(first)
            # Drain what is already queued, up to one batch, so a burst becomes few transactions.
            while not stopping and rows < self.batch_size:
                try:
                    nxt = self._queue.get_nowait()
                except queue.Empty:
                    break
                if nxt is _STOP:
                    stopping = True
                else:
                    items.append(nxt)
                    rows += len(nxt)
            if items:
                self._write_or_count(items)
        # Anything queued behind the stop marker (a producer racing the shutdown) is written too.
        leftovers = []
        while True:
            try:
                leftovers.append(self._queue.get_nowait())
            except queue.Empty:
                break
        leftovers = [item for item in leftovers if item is not _STOP]
        if leftovers:
            self._write_or_count(leftovers)

    def _write_or_count(self, items: list[tuple]) -> None:
        """Write; a bug in building rows must not kill the writer thread, so it is counted and logged."""
        try:
            self._write(items)
        except Exception:
            rows = sum(len(item) for item in items)
            with self._counts_lock:
                self.failed_rows += rows
            log.exception("inference log: could not write %d rows", rows)

    def _write(self, items: list[tuple]) -> None:
        engine = self._engine
        if engine is None:
            raise RuntimeError("inference log writer has no database engine: call start() before writing")
        prediction_rows, feedback_rows = self._rows(items, engine)
        total = len(prediction_rows) + len(feedback_rows)
        try:
            self._insert_with_retries(engine, prediction_rows, feedback_rows)
        except (IntegrityError, DataError) as refused:
            if len(items) > 1:
                # One request's bad row must not cost the others theirs: write each request alone.
                log.warning(
                    "inference log refused a batch of %d requests (%r); writing them one by one",
                    len(items),
                    refused,
                )
                for item in items:
                    self._write([item])
                return
            self._dead_letter(prediction_rows, feedback_rows, refused)
            return
        except SQLAlchemyError as error:
            self._store_down = True
            self._dead_letter(prediction_rows, feedback_rows, error)
            return
        self._store_down = False
        with self._counts_lock:
            self.written_rows += total

    def _insert_with_retries(self, engine: Engine, prediction_rows: list, feedback_rows: list) -> None:
        """One transaction, retried with back-off while the store cannot take it; a refusal is not retried."""
        attempts = 1 if self._store_down else self.write_attempts
        delay_s = self.retry_delay_s
        for attempt in range(1, attempts + 1):
            try:
                with engine.begin() as connection:
                    if prediction_rows:
                        connection.execute(insert(predictions), prediction_rows)
                    if feedback_rows:
                        connection.execute(insert(feedback), feedback_rows)
                return
            except (IntegrityError, DataError):
                raise
            except SQLAlchemyError as error:
                if attempt == attempts:
                    raise
                log.warning(
                    "inference log write failed (attempt %d of %d, retrying in %.1f s): %r",
                    attempt,
                    attempts,
                    delay_s,
                    error,
                )
                time.sleep(delay_s)
                delay_s = min(delay_s * 2, self.RETRY_MAX_DELAY_S)

    def _dead_letter(self, prediction_rows: list[dict], feedback_rows: list[dict], error: Exception) -> None:
        """Append the rows (text already masked) to the dead-letter file, one JSON object per line."""
        failed_at = utc_now().isoformat()
        reason = f"{type(error).__name__}: {str(error).splitlines()[0] if str(error) else ''}"[:500]
        lines = [
            json.dumps(
                {"table": table, "row": row, "error": reason, "dead_lettered_at": failed_at},
                default=_json_value,
                ensure_ascii=False,
            )
            for table, rows in (("predictions", prediction_rows), ("feedback", feedback_rows))
            for row in rows
        ]
        try:
            self.dead_letter_path.parent.mkdir(parents=True, exist_ok=True)
            with (
                _dead_letter_lock(self.dead_letter_path),
                open(self.dead_letter_path, "a", encoding="utf-8") as out,
            ):
                out.write("".join(line + "\n" for line in lines))
        except OSError:
            with self._counts_lock:
                self.failed_rows += len(lines)
            log.exception(
                "inference log: %d rows lost: the dead-letter file could not be written", len(lines)
            )
            return
        with self._counts_lock:
            self.dead_lettered_rows += len(lines)
        log.error(
            "inference log: %d rows the store would not take (%s) written to %s",
            len(lines),
            reason,
            self.dead_letter_path,
        )

    def _rows(self, items: list[tuple], engine: Engine) -> tuple[list[dict], list[dict]]:
        prediction_rows, feedback_rows = [], []
        for item in items:
            for record in item:
                if isinstance(record, PredictionRecord):
                    prediction_rows.append(self._prediction_row(record, engine))
                else:
                    feedback_rows.append(
                        {
                            "request_id": record.request_id,
                            "item_index": record.item_index,
                            "true_label": record.true_label,
                            "created_at": _to_db_time(record.created_at, engine),
                            "principal": record.principal,
                            "accepted": record.accepted,
                            "edited_output": (
                                None if record.edited_output is None else self._masked(record.edited_output)
                            ),
                        }
                    )
        return prediction_rows, feedback_rows

    def _masked(self, text: str) -> str:
        # The row is kept (its label, score and version still count for drift) but an unmasked text
        # never reaches the database.
        try:
            return self.masker.mask(text)
        except Exception:
            log.exception("PII masking failed; the text is stored as %s", MASKING_FAILED)
            return MASKING_FAILED

    def _prediction_row(self, record: PredictionRecord, engine: Engine) -> dict:
        return {
            "request_id": record.request_id,
            "item_index": record.item_index,
            "created_at": _to_db_time(record.created_at, engine),
            "model_name": record.model_name,
            "model_version": record.model_version,
            "text": self._masked(record.text),
            "label": record.label,
            "score": float(record.score),
            "latency_ms": float(record.latency_ms),
            "principal": record.principal,
            "subject": record.subject,
            "generated": None if record.generated is None else self._masked(record.generated),
            "prompt_tokens": record.prompt_tokens,
            "new_tokens": record.new_tokens,
        }


def _latest_feedback_id():
    """The id of a prediction's newest feedback row (a correlated subquery on ``predictions``)."""
    later = feedback.alias("later")
    return (
        select(func.max(later.c.id))
        .where(
            and_(
                later.c.request_id == predictions.c.request_id,
                later.c.item_index == predictions.c.item_index,
            )
        )
        .correlate(predictions)
        .scalar_subquery()
    )


def read_window(db_url: str, *, last_n: int | None = None, since: dt.datetime | None = None) -> pd.DataFrame:
    """Logged predictions (oldest first) with their latest feedback label (None when none was given).

    Classification rows only: generation rows (``/v1/generate``) are read by :func:`read_generations`.

    ``last_n`` keeps the most recent n rows, ``since`` the rows created at or after that time (naive
    times are taken as UTC); both together apply both. ``created_at`` comes back as UTC timestamps.
    """
    engine = open_engine(db_url)
    try:
        ensure_schema(engine)
        latest_feedback = _latest_feedback_id()
        query = select(
            predictions.c.id,
            *(predictions.c[name] for name in WINDOW_COLUMNS[:-3]),
            feedback.c.true_label,
            predictions.c.principal,
            feedback.c.principal.label("feedback_principal"),
        ).select_from(predictions.outerjoin(feedback, feedback.c.id == latest_feedback))
        query = query.where(predictions.c.generated.is_(None))
        if since is not None:
            query = query.where(predictions.c.created_at >= _to_db_time(since, engine))
        query = query.order_by(predictions.c.id.desc())
        if last_n is not None:
            query = query.limit(last_n)
        with engine.connect() as connection:
            rows = connection.execute(query).all()
    finally:
        engine.dispose()
    frame = pd.DataFrame([row[1:] for row in reversed(rows)], columns=list(WINDOW_COLUMNS))
    frame["created_at"] = pd.to_datetime(frame["created_at"], utc=True)
    for column in ("true_label", "principal", "feedback_principal"):
        frame[column] = frame[column].astype(object).where(frame[column].notna(), None)
    return frame


GENERATION_COLUMNS = (
    "request_id",
    "item_index",
    "created_at",
    "model_name",
    "model_version",
    "text",
    "generated",
    "prompt_tokens",
    "new_tokens",
    "latency_ms",
    "principal",
    # The latest feedback on the answer: accepted as it was, or the corrected text (None: none given).
    "accepted",
    "edited_output",
    "feedback_principal",
)


def read_generations(
    db_url: str, *, last_n: int | None = None, since: dt.datetime | None = None
) -> pd.DataFrame:
    """Logged generations (oldest first; ``last_n`` most recent) with their latest feedback, if any.

    ``since`` keeps the rows created at or after that time (naive times are taken as UTC), as in
    :func:`read_window`.
    """
    engine = open_engine(db_url)
    try:
        ensure_schema(engine)
        latest_feedback = _latest_feedback_id()
        query = (
            select(
                predictions.c.id,
                *(predictions.c[name] for name in GENERATION_COLUMNS[:-3]),
                feedback.c.accepted,
                feedback.c.edited_output,
                feedback.c.principal.label("feedback_principal"),
            )
            .select_from(predictions.outerjoin(feedback, feedback.c.id == latest_feedback))
            .where(predictions.c.generated.is_not(None))
            .order_by(predictions.c.id.desc())
        )
        if since is not None:
            query = query.where(predictions.c.created_at >= _to_db_time(since, engine))
        if last_n is not None:
            query = query.limit(last_n)
        with engine.connect() as connection:
            rows = connection.execute(query).all()
    finally:
        engine.dispose()
    frame = pd.DataFrame([row[1:] for row in reversed(rows)], columns=list(GENERATION_COLUMNS))
    frame["created_at"] = pd.to_datetime(frame["created_at"], utc=True)
    for column in ("principal", "accepted", "edited_output", "feedback_principal"):
        frame[column] = frame[column].astype(object).where(frame[column].notna(), None)
    return frame


def cap_feedback_share(
    frame: pd.DataFrame,
    max_share: float,
    *,
    principal_column: str = "feedback_principal",
    label_column: str = "true_label",
    time_column: str = "created_at",
) -> pd.DataFrame:
    """``frame`` without the labelled rows that would let one principal exceed ``max_share`` of them.

    Why: feedback becomes training data, so one caller (a compromised key, a buggy labeller) must not
    be able to dominate what the drift monitor appends. After the cap no principal holds more than
    ``max_share`` of the labelled rows that remain: every principal keeps at most ``c`` of its rows,
    the oldest first (ties in time: the frame's order), with ``c`` the largest number for which that
    holds. Deterministic: the same frame always gives the same rows.

    Rows without a label pass untouched; labelled rows without a principal (logged before principals
    were recorded, or written by tools rather than the gateway) are kept and count in the total.
    With a single principal nothing can be below 100%: every labelled row of it is dropped unless
    ``max_share`` is 1, which turns the cap off. Returns a filtered copy, in the frame's order and index.
    """
    if not 0 < max_share <= 1:
        raise ValueError(f"max_share must be in (0, 1]; got {max_share}")
    if max_share == 1 or frame.empty:
        return frame.copy()
    labelled = frame[label_column].notna() & frame[principal_column].notna()
    counts = frame.loc[labelled, principal_column].value_counts()
    if counts.empty:
        return frame.copy()
    unattributed = int((frame[label_column].notna() & frame[principal_column].isna()).sum())

    def allowed(cap: int) -> bool:
        # The largest contributor keeps min(n_max, cap) = cap rows of sum(min(n, cap)) + unattributed.
        return cap <= max_share * (int(counts.clip(upper=cap).sum()) + unattributed) + 1e-9

    # allowed() holds on an interval [0, c*] (each step adds max_share * contributors - 1, which only
    # shrinks as contributors run out of rows), so a binary search finds c*.
    low, high = 0, int(counts.max())
    while low < high:
        middle = (low + high + 1) // 2
        if allowed(middle):
            low = middle
        else:
            high = middle - 1
    ordered = (
        frame.loc[labelled.to_numpy(), [principal_column, time_column]]
        .assign(_position=np.flatnonzero(labelled.to_numpy()))
        .reset_index(drop=True)
        .sort_values([time_column, "_position"], kind="stable")
    )
    rank = ordered.groupby(principal_column, sort=False).cumcount()
    keep = np.ones(len(frame), dtype=bool)
    keep[ordered.loc[rank >= low, "_position"].to_numpy()] = False
    if not keep.all():
        log.info(
            "feedback share capped at %.0f%%: kept at most %d labelled rows per principal, dropped %d",
            max_share * 100,
            low,
            int((~keep).sum()),
        )
    return frame[keep].copy()


# ------------------------------------------------------------------------------ retention and erasure


def _chunks(values: Sequence[Any], size: int) -> Iterable[Sequence[Any]]:
    for start in range(0, len(values), size):
        yield values[start : start + size]


def delete_older_than(
    db_url: str, max_age_days: float, *, now: dt.datetime | None = None, batch_size: int = 10_000
) -> int:
    """Delete predictions and feedback created more than ``max_age_days`` ago; return the rows deleted.

    Feedback on a deleted prediction goes with it (it would point at nothing). Deleted in batches of
    ``batch_size`` rows, one short transaction each, so the gateway's writer is never blocked for long.
    """
    if max_age_days < 0:
        raise ValueError("max_age_days must be >= 0")
    engine = open_engine(db_url)
    deleted = 0
    try:
        ensure_schema(engine)
        cutoff = _to_db_time((now or utc_now()) - dt.timedelta(days=max_age_days), engine)
        while True:
            with engine.begin() as connection:
                old = connection.execute(
                    select(predictions.c.id, predictions.c.request_id)
                    .where(predictions.c.created_at < cutoff)
                    .limit(batch_size)
                ).all()
                if not old:
                    break
                deleted += connection.execute(
                    delete(predictions).where(predictions.c.id.in_([row.id for row in old]))
                ).rowcount
                request_ids = sorted({row.request_id for row in old})
                deleted += connection.execute(
                    delete(feedback).where(feedback.c.request_id.in_(request_ids))
                ).rowcount
        while True:
            with engine.begin() as connection:
                ids = (
                    connection.execute(
                        select(feedback.c.id).where(feedback.c.created_at < cutoff).limit(batch_size)
                    )
                    .scalars()
                    .all()
                )
                if not ids:
                    break
                deleted += connection.execute(delete(feedback).where(feedback.c.id.in_(ids))).rowcount
    finally:
        engine.dispose()
    log.info("inference log retention: deleted %d rows older than %s days", deleted, max_age_days)
    return deleted


def erase(
    db_url: str,
    *,
    subject: str | None = None,
    request_ids: Iterable[str] | None = None,
    dead_letter_path: Path | None = None,
) -> dict[str, Any]:
    """Remove one person's rows: every request logged with end-user id ``subject``, and ``request_ids``.

    ``subject`` is the end-user id a caller sent with its requests (header ``X-Subject-Id``); a request
    is removed whole, its predictions and all feedback on it, and from the dead-letter file too
    (default :func:`default_dead_letter_path`). Returns exactly what was removed:
    ``{"predictions": n, "feedback": n, "dead_letter": n, "request_ids": [...]}`` (sorted ids that
    had rows anywhere).
    """
    wanted = set(request_ids or ())
    if subject is None and not wanted:
        raise ValueError("erase needs a subject or request ids")
    engine = open_engine(db_url)
    removed: dict[str, Any] = {"predictions": 0, "feedback": 0, "dead_letter": 0}
    found: set[str] = set()
    try:
        ensure_schema(engine)
        with engine.begin() as connection:
            if subject is not None:
                wanted |= set(
                    connection.execute(
                        select(predictions.c.request_id).where(predictions.c.subject == subject).distinct()
                    ).scalars()
                )
            for chunk in _chunks(sorted(wanted), 500):
                for table in (predictions, feedback):
                    found |= set(
                        connection.execute(
                            select(table.c.request_id).where(table.c.request_id.in_(chunk)).distinct()
                        ).scalars()
                    )
                    removed[table.name] += connection.execute(
                        delete(table).where(table.c.request_id.in_(chunk))
                    ).rowcount
    finally:
        engine.dispose()
    dead_lettered, dead_ids = _erase_dead_letters(
        Path(dead_letter_path or default_dead_letter_path(db_url)), wanted, subject
    )
    removed["dead_letter"] = dead_lettered
    removed["request_ids"] = sorted(found | dead_ids)
    log.info(
        "erased %d prediction, %d feedback and %d dead-letter rows of %d requests",
        removed["predictions"],
        removed["feedback"],
        removed["dead_letter"],
        len(removed["request_ids"]),
    )
    return removed


def _erase_dead_letters(path: Path, request_ids: set[str], subject: str | None) -> tuple[int, set[str]]:
    """Rewrite the dead-letter file without the matching rows; the writer appends under the same lock."""
    if not path.exists():
        return 0, set()
    with _dead_letter_lock(path):
        kept, removed, ids = [], 0, set()
        for line in path.read_text(encoding="utf-8").splitlines(keepends=True):
            try:
                row = json.loads(line).get("row", {})
            except (json.JSONDecodeError, AttributeError):
                kept.append(line)
                continue
            by_subject = subject is not None and row.get("subject") == subject
            if row.get("request_id") in request_ids or by_subject:
                removed += 1
                ids.add(row["request_id"])
            else:
                kept.append(line)
        if removed:
            with tempfile.NamedTemporaryFile(
                "w", dir=path.parent, delete=False, suffix=".tmp", encoding="utf-8"
            ) as out:
                out.writelines(kept)
            os.replace(out.name, path)
    return removed, ids
