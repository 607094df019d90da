"""The inference log: one row per predicted text, and the true labels that feedback attaches later.

The gateway must answer without waiting for a database, yet lose no row. So request handlers put
their rows on a bounded queue and one writer thread masks PII and inserts them in batches (one
transaction per batch). What happens when the database cannot keep up:

- the queue absorbs bursts (``log_queue_size`` requests);
- when it is full, a request waits up to ``log_enqueue_timeout_s`` for room (back-pressure, off the
  event loop), then its rows are dropped — counted in :attr:`InferenceLogWriter.dropped_rows`
  (exported as ``tuneloop_inference_log_dropped_total``) and logged, never silently;
- a failed insert is retried with back-off until it succeeds or the writer is closed; rows that still
  fail then are counted in :attr:`InferenceLogWriter.failed_rows`;
- :meth:`InferenceLogWriter.close` (the gateway's shutdown) writes everything still queued.

SQLAlchemy Core makes the same code run on SQLite (the default, in WAL mode so the drift job can read
while the gateway writes) and on PostgreSQL at scale (install a driver such as ``psycopg``).
"""

from __future__ import annotations

import collections
import datetime as dt
import logging
import queue
import threading
import time
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path

import anyio
import pandas as pd
from sqlalchemy import (
    BigInteger,
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
    event,
    func,
    insert,
    select,
)
from sqlalchemy.engine import make_url
from sqlalchemy.exc import SQLAlchemyError

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
    Index("ix_predictions_request", "request_id", "item_index"),
)
feedback = Table(
    "feedback",
    metadata,
    Column("id", _Id, primary_key=True, autoincrement=True),
    Column("request_id", String(64), nullable=False),
    Column("item_index", Integer, nullable=False),
    Column("true_label", String(256), nullable=False),
    Column("created_at", DateTime(timezone=True), nullable=False),
    Index("ix_feedback_request", "request_id", "item_index"),
)


@dataclass(frozen=True)
class PredictionRecord:
    """One predicted text as the gateway saw it (``text`` raw here; masked by the writer)."""

    request_id: str
    item_index: int
    created_at: dt.datetime
    model_name: str
    model_version: str
    text: str
    label: str
    score: float
    latency_ms: float


@dataclass(frozen=True)
class FeedbackRecord:
    request_id: str
    item_index: int
    true_label: str
    created_at: dt.datetime


MASKING_FAILED = "<MASKING_FAILED>"
LogItem = tuple[PredictionRecord, ...] | tuple[FeedbackRecord, ...]
_STOP = object()


def utc_now() -> dt.datetime:
    return dt.datetime.now(dt.UTC)


def open_engine(db_url: str) -> Engine:
    """An engine for the log; SQLite gets its folder created, WAL mode and a busy timeout."""
    url = make_url(db_url)
    if url.get_backend_name() != "sqlite":
        return create_engine(url, pool_pre_ping=True)
    if url.database and url.database != ":memory:":
        Path(url.database).parent.mkdir(parents=True, exist_ok=True)
    engine = create_engine(url, connect_args={"timeout": 30})

    @event.listens_for(engine, "connect")
    def _sqlite_pragmas(connection, _record) -> None:
        cursor = connection.cursor()
        cursor.execute("PRAGMA journal_mode=WAL")
        cursor.execute("PRAGMA synchronous=NORMAL")
        cursor.close()

    return engine


def _to_db_time(moment: dt.datetime, engine: Engine) -> dt.datetime:
    """UTC; naive for SQLite, which stores no offset (every stored time is UTC)."""
    moment = moment.replace(tzinfo=dt.UTC) if moment.tzinfo is None else moment.astimezone(dt.UTC)
    return moment.replace(tzinfo=None) if engine.dialect.name == "sqlite" else moment


class InferenceLogWriter:
    """Bounded queue + one writer thread that batches inserts; :meth:`start` it, :meth:`close` it."""

    # Request ids remembered in memory so feedback can be checked before their rows reach the database.
    RECENT_REQUESTS = 100_000

    def __init__(
        self,
        db_url: str,
        *,
        queue_size: int = 10_000,
        batch_size: int = 500,
        flush_interval_s: float = 0.5,
        enqueue_timeout_s: float = 1.0,
        masker: PiiMasker | None = None,
    ) -> None:
        self.db_url = db_url
        self.batch_size = batch_size
        self.flush_interval_s = flush_interval_s
        self.enqueue_timeout_s = enqueue_timeout_s
        self.masker = masker or PiiMasker()
        self._queue: queue.Queue = queue.Queue(maxsize=queue_size)
        self._thread: threading.Thread | None = None
        self._engine: Engine | None = None
        self._closing = threading.Event()
        self._counts_lock = threading.Lock()
        self._recent: collections.OrderedDict[str, int] = collections.OrderedDict()
        self.written_rows = 0
        self.dropped_rows = 0
        self.failed_rows = 0

    # ------------------------------------------------------------------------------------- lifecycle

    def start(self) -> InferenceLogWriter:
        self._engine = open_engine(self.db_url)
        metadata.create_all(self._engine)
        self._thread = threading.Thread(target=self._run, name="inference-log-writer", daemon=True)
        self._thread.start()
        return self

    def close(self, timeout_s: float = 60.0) -> None:
        """Write everything queued, then stop. Rows still queued after ``timeout_s`` are counted as failed."""
        if self._thread is None:
            return
        self._closing.set()
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
                self._recent[item[0].request_id] = len(item)
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

    def items_in_request(self, request_id: str) -> int | None:
        """How many texts a request predicted (None when unknown), for validating feedback."""
        with self._counts_lock:
            if request_id in self._recent:
                return self._recent[request_id]
        engine = self._engine
        if engine is None:
            return None
        with engine.connect() as connection:
            count = connection.execute(
                select(func.count()).select_from(predictions).where(predictions.c.request_id == request_id)
            ).scalar_one()
        return count or None

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
                        }
                    )
        total = len(prediction_rows) + len(feedback_rows)
        delay_s, attempt = 0.1, 0
        while True:
            attempt += 1
            try:
                with engine.begin() as connection:
                    if prediction_rows:
                        connection.execute(insert(predictions), prediction_rows)
                    if feedback_rows:
                        connection.execute(insert(feedback), feedback_rows)
                with self._counts_lock:
                    self.written_rows += total
                return
            except SQLAlchemyError as error:  # any database failure: retried, then counted
                if self._closing.is_set() and attempt >= 3:
                    with self._counts_lock:
                        self.failed_rows += total
                    log.error(
                        "inference log: gave up on %d rows after %d attempts: %r", total, attempt, error
                    )
                    return
                log.warning(
                    "inference log write failed (attempt %d, retrying in %.1f s): %r", attempt, delay_s, error
                )
                time.sleep(delay_s)
                delay_s = min(delay_s * 2, 5.0)

    def _masked(self, text: str) -> str:
        # The row is kept (its label, score and version still count for drift) but an unmasked text
        # never reaches the database.
        try:
            return self.masker.mask(text)
        except Exception:  # any masking bug
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
        }


def read_window(db_url: str, *, last_n: int | None = None, since: dt.datetime | None = None) -> pd.DataFrame:
    """Logged predictions (oldest first) with their latest feedback label (None when none was given).

    ``last_n`` keeps the most recent n rows, ``since`` the rows created at or after that time (naive
    times are taken as UTC); both together apply both. ``created_at`` comes back as UTC timestamps.
    """
    engine = open_engine(db_url)
    try:
        metadata.create_all(engine)
        later = feedback.alias("later")
        latest_feedback = (
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
        query = select(
            predictions.c.id,
            *(predictions.c[name] for name in WINDOW_COLUMNS[:-1]),
            feedback.c.true_label,
        ).select_from(predictions.outerjoin(feedback, feedback.c.id == latest_feedback))
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
    frame["true_label"] = frame["true_label"].astype(object).where(frame["true_label"].notna(), None)
    return frame
