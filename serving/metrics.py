"""Prometheus metrics of one gateway: traffic, latency, errors, predicted labels, model version, log health.

Each app gets its own ``CollectorRegistry`` (not prometheus_client's global one) so that several
gateways in one process (tests, dev + prod) never clash. The drift job's latest result is exported
here too, through the collector that :mod:`pipelines.monitor` offers, read at scrape time.
"""

from __future__ import annotations

import importlib
import logging
from collections.abc import Iterator
from pathlib import Path

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
            ("failed", self.writer.failed_rows, "Rows the database refused even after retries"),
        ):
            yield CounterMetricFamily(f"tuneloop_inference_log_{name}", doc, value=value)


class GatewayMetrics:
    """The gateway's instruments, on a registry of their own."""

    def __init__(self) -> None:
        self.registry = CollectorRegistry()
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
        self.model_info = Gauge(
            "tuneloop_model_info",
            "1 for the model version serving now (by name, alias and version)",
            ["model_name", "alias", "model_version"],
            registry=self.registry,
        )

    def set_serving(self, model_name: str, alias: str, version: str | None) -> None:
        """Point the info gauge at the version now serving (a swap moves it)."""
        self.model_info.clear()
        if version is not None:
            self.model_info.labels(model_name, alias, version).set(1)

    def watch_inference_log(self, writer: InferenceLogWriter) -> None:
        self.registry.register(_InferenceLogCollector(writer))

    def watch_drift(self, home_dir: Path) -> bool:
        """Export the drift job's latest summary when :mod:`pipelines.monitor` offers its collector."""
        try:
            monitor = importlib.import_module("pipelines.monitor")
        except Exception as error:  # a broken drift module must not keep the gateway from starting
            log.error("drift gauges not exported: cannot import pipelines.monitor (%r)", error)
            return False
        collector_class = getattr(monitor, "DriftGaugeCollector", None)
        if collector_class is None:
            return False
        self.registry.register(collector_class(monitor.monitoring_dir(home_dir) / "latest.json"))
        return True

    def exposition(self) -> tuple[bytes, str]:
        """The text format Prometheus scrapes, and its content type."""
        return generate_latest(self.registry), CONTENT_TYPE_LATEST
