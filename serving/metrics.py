"""Prometheus metrics of one gateway: traffic, latency, errors, predicted labels, model version, log health.

Each app gets its own ``CollectorRegistry`` (not prometheus_client's global one) so that several
gateways in one process (tests, dev + prod) never clash. The drift job's latest result is exported
here too: the job writes its summary with :func:`write_drift_summary`, :class:`DriftGaugeCollector`
reads it at scrape time.
"""

from __future__ import annotations

import json
import logging
import tempfile
import threading
from collections.abc import Iterator
from datetime import datetime
from pathlib import Path
from typing import Any

from prometheus_client import (
    CONTENT_TYPE_LATEST,
    CollectorRegistry,
    Counter,
    Gauge,
    Histogram,
    generate_latest,
)
from prometheus_client.core import CounterMetricFamily, GaugeMetricFamily
from prometheus_client.registry import Collector

from serving.inference_log import InferenceLogWriter
from tuneloop.config import cost_per_1000_predictions

log = logging.getLogger(__name__)

# Model calls take milliseconds on a GPU and up to seconds for a large CPU batch.
LATENCY_BUCKETS_S = (0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 5.0, 10.0, 30.0)


class _InferenceLogCollector(Collector):
    """Queue depth and row counters read from the writer at scrape time (no bookkeeping twice)."""

    def __init__(self, writer: InferenceLogWriter) -> None:
        self.writer = writer

    def collect(self) -> Iterator:
        yield GaugeMetricFamily(
            "tuneloop_inference_log_queue_depth",
            "Requests waiting to be written",
            value=self.writer.queue_depth,
        )
        for name, value, doc in (
            ("written", self.writer.written_rows, "Rows written to the inference log"),
            ("dropped", self.writer.dropped_rows, "Rows dropped because the log queue stayed full"),
            (
                "dead_lettered",
                self.writer.dead_lettered_rows,
                "Rows the database would not take, in the dead-letter file",
            ),
            (
                "failed",
                self.writer.failed_rows,
                "Rows lost: neither the database nor the dead-letter file took them",
            ),
        ):
            yield CounterMetricFamily(f"tuneloop_inference_log_{name}", doc, value=value)


class _CostCollector(Collector):
    """Cost per 1,000 predictions, computed at scrape time from the measured model-server time."""

    def __init__(self, metrics: GatewayMetrics, device_hour_usd: float) -> None:
        self.metrics = metrics
        self.device_hour_usd = device_hour_usd

    def collect(self) -> Iterator:
        yield GaugeMetricFamily(
            "tuneloop_device_hour_usd",
            "List price of one hour of the model server's device (params.yaml cost)",
            value=self.device_hour_usd,
        )
        seconds, texts = self.metrics.model_server_totals()
        per_1000 = cost_per_1000_predictions(seconds, texts, self.device_hour_usd)
        if per_1000 is not None:
            yield GaugeMetricFamily(
                "tuneloop_cost_per_1000_predictions_usd",
                "USD per 1,000 predictions served: model-server seconds measured at the gateway x the "
                "device-hour price / predictions (computed or cached) x 1000 (since the gateway started)",
                value=per_1000,
            )


class GatewayMetrics:
    """The gateway's instruments, on a registry of their own.

    With ``device_hour_usd`` (the serving device's list price) it also exports the cost per 1,000
    predictions; the model-server time it is computed from is always exported.
    """

    def __init__(self, device_hour_usd: float | None = None) -> None:
        self.registry = CollectorRegistry()
        self._model_server_seconds = 0.0
        self._model_server_texts = 0
        self._cached_texts = 0
        self._totals_lock = threading.Lock()
        self.model_server_seconds = Counter(
            "tuneloop_model_server_seconds",
            "Seconds spent waiting for the model server's answers: its compute time, measured at the gateway",
            registry=self.registry,
        )
        self.model_server_texts = Counter(
            "tuneloop_model_server_texts",
            "Texts the model server answered successfully",
            registry=self.registry,
        )
        if device_hour_usd is not None:
            self.registry.register(_CostCollector(self, device_hour_usd))
        self.requests = Counter(
            "tuneloop_gateway_requests",
            "Requests answered, by endpoint and HTTP status",
            ["endpoint", "status"],
            registry=self.registry,
        )
        self.latency = Histogram(
            "tuneloop_gateway_request_latency_seconds",
            "Time from request to answer, by endpoint",
            ["endpoint"],
            buckets=LATENCY_BUCKETS_S,
            registry=self.registry,
        )
        self.errors = Counter(
            "tuneloop_gateway_errors",
            "Requests refused or failed, by endpoint and reason (rate_limited, text_too_long, upstream, ...)",
            ["endpoint", "reason"],
            registry=self.registry,
        )
        self.predictions = Counter(
            "tuneloop_predictions",
            "Texts predicted, by predicted label and model version",
            ["label", "model_version"],
            registry=self.registry,
        )
        self.feedback = Counter(
            "tuneloop_feedback",
            "Feedback labels received, by true label",
            ["true_label"],
            registry=self.registry,
        )
        self.generations = Counter(
            "tuneloop_generations",
            "Answers generated (/v1/generate), by model version and whether the answer is a JSON object",
            ["model_version", "valid_json"],
            registry=self.registry,
        )
        self.generated_tokens = Counter(
            "tuneloop_generated_tokens",
            "New tokens generated (/v1/generate), by model version",
            ["model_version"],
            registry=self.registry,
        )
        self.generation_feedback = Counter(
            "tuneloop_generation_feedback",
            "Feedback on generated answers, by kind (accepted, rejected, edited)",
            ["kind"],
            registry=self.registry,
        )
        self.model_info = Gauge(
            "tuneloop_model_info",
            "1 for the model version serving now (by name, alias and version)",
            ["model_name", "alias", "model_version"],
            registry=self.registry,
        )

        self.model_calls = Counter(
            "tuneloop_model_calls",
            "Model-server calls by version, role (prod, canary, shadow, fallback) and outcome (ok, error)",
            ["model_version", "role", "outcome"],
            registry=self.registry,
        )
        self.model_call_latency = Histogram(
            "tuneloop_model_call_latency_seconds",
            "Time a model server took to answer, by role (prod, canary, shadow, fallback)",
            ["role"],
            buckets=LATENCY_BUCKETS_S,
            registry=self.registry,
        )
        self.breaker_open = Gauge(
            "tuneloop_circuit_breaker_open",
            "1 while the breaker on the prod model server is open (requests go to the fallback or get 503)",
            registry=self.registry,
        )
        self.canary_percent = Gauge(
            "tuneloop_canary_percent",
            "Share of callers sent to the canary version (0: no canary; shadow traffic is not counted)",
            registry=self.registry,
        )
        self.canary_agreement = Counter(
            "tuneloop_canary_comparisons",
            "Texts answered by both prod and the shadow/canary version, by whether their labels agreed",
            ["agreed"],
            registry=self.registry,
        )
        self.micro_batch_texts = Histogram(
            "tuneloop_micro_batch_texts",
            "Texts per coalesced model-server call (micro-batching)",
            buckets=(1, 2, 4, 8, 16, 32, 64, 128, 256),
            registry=self.registry,
        )
        self.cache_lookups = Counter(
            "tuneloop_cache_lookups",
            "Prediction-cache lookups per text, by result (hit, miss)",
            ["result"],
            registry=self.registry,
        )

    def observe_model_call(self, seconds: float, texts: int) -> None:
        """One call to the model server: how long it took and how many texts it answered (0: failed)."""
        with self._totals_lock:
            self._model_server_seconds += seconds
            self._model_server_texts += texts
        self.model_server_seconds.inc(seconds)
        self.model_server_texts.inc(texts)

    def observe_cache_hits(self, texts: int) -> None:
        """Texts answered from the prediction cache: predictions served without model-server time."""
        with self._totals_lock:
            self._cached_texts += texts
        self.cache_lookups.labels("hit").inc(texts)

    def model_server_totals(self) -> tuple[float, int]:
        """Model-server seconds, and predictions served (computed or cached) since this gateway started."""
        with self._totals_lock:
            return self._model_server_seconds, self._model_server_texts + self._cached_texts

    def set_serving(self, model_name: str, alias: str, version: str | None) -> None:
        """Point the info gauge at the version now serving (a swap moves it)."""
        self.model_info.clear()
        if version is not None:
            self.model_info.labels(model_name, alias, version).set(1)

    def watch_inference_log(self, writer: InferenceLogWriter) -> None:
        self.registry.register(_InferenceLogCollector(writer))

    def watch_drift(self, summary_path: Path) -> None:
        """Export the drift job's latest summary (written by another process) at every scrape."""
        self.registry.register(DriftGaugeCollector(summary_path))

    def exposition(self) -> tuple[bytes, str]:
        """The text format Prometheus scrapes, and its content type."""
        return generate_latest(self.registry), CONTENT_TYPE_LATEST


def write_drift_summary(summary: dict[str, Any], path: Path) -> Path:
    """Atomically replace the drift job's latest summary, where :class:`DriftGaugeCollector` reads it."""
    path.parent.mkdir(parents=True, exist_ok=True)
    with tempfile.NamedTemporaryFile(
        "w", dir=path.parent, suffix=".json", delete=False, encoding="utf-8"
    ) as out:
        json.dump(summary, out, indent=2, default=str)
    Path(out.name).replace(path)
    return path


class DriftGaugeCollector:
    """Prometheus collector of the latest drift summary, read at scrape time.

    A
    collector rather than gauges set by the job, because the job and the gateway are different
    processes: the file is their interface, and a scrape always shows the newest result.
    """

    def __init__(self, path: Path):
        self.path = Path(path)

    def describe(self) -> list:
        return []  # no fixed description: the metrics exist only once a summary does

    def collect(self) -> Iterator:
        from prometheus_client.core import GaugeMetricFamily

        if not self.path.exists():
            return
        try:
            summary = json.loads(self.path.read_text(encoding="utf-8"))
        except (OSError, json.JSONDecodeError) as error:
            log.warning("cannot read drift summary %s: %s", self.path, error)
            return
        detected = GaugeMetricFamily(
            "tuneloop_drift_detected", "1 when the latest drift job flagged drift", labels=["kind"]
        )
        detected.add_metric(["data"], float(summary["data_drift"]["detected"]))
        concept = summary.get("concept_drift")
        detected.add_metric(["concept"], float(bool(concept and concept["detected"])))
        estimate_drop = summary.get("performance_estimate") or {}
        detected.add_metric(["estimated_accuracy"], float(bool(estimate_drop.get("drifted"))))
        yield detected
        score = GaugeMetricFamily(
            "tuneloop_drift_score",
            "Drift score per signal: p-value, or ROC AUC for text",
            labels=["signal", "method"],
        )
        flagged = GaugeMetricFamily(
            "tuneloop_drift_signal_drifted", "1 when a signal drifted", labels=["signal"]
        )
        for name, signal in summary["data_drift"]["signals"].items():
            if signal["score"] is not None:
                score.add_metric([name, signal["method"]], float(signal["score"]))
            flagged.add_metric([name], float(signal["drifted"]))
        yield score
        yield flagged
        if concept:
            quality = GaugeMetricFamily(
                "tuneloop_drift_quality",
                "Quality on labelled feedback vs reference",
                labels=["metric", "which"],
            )
            for name, test in concept["tests"].items():
                quality.add_metric([name, "reference"], float(test["reference"]))
                quality.add_metric([name, "current"], float(test["current"]))
            yield quality
        estimate = summary.get("performance_estimate")
        if estimate:
            estimated = GaugeMetricFamily(
                "tuneloop_drift_estimated_accuracy",
                "Accuracy estimated from confidence without labels (CBPE), its interval and the reference",
                labels=["which"],
            )
            for which, key in (("estimate", "current"), ("low", "current_low"), ("high", "current_high")):
                estimated.add_metric([which], float(estimate[key]))
            estimated.add_metric(["reference"], float(estimate["reference"]))
            yield estimated
        window = GaugeMetricFamily(
            "tuneloop_drift_window_rows", "Rows in the latest drift window", labels=["kind"]
        )
        window.add_metric(["predictions"], float(summary["n_current"]))
        window.add_metric(["labelled"], float(summary["n_labelled"]))
        yield window
        if summary.get("finished_at"):
            finished = datetime.fromisoformat(summary["finished_at"]).timestamp()
            yield GaugeMetricFamily(
                "tuneloop_drift_last_run_timestamp_seconds",
                "When the latest drift job finished",
                value=finished,
            )
