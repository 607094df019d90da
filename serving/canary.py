"""Canary and shadow releases: a candidate version on a slice of live traffic, judged against prod.

``canary``: a sticky share of callers (a hash of who calls, so one caller never flips between
versions) is answered by the candidate. ``shadow``: every request is also sent to the candidate in
the background and only prod's answer is returned. Either way both versions' calls are timed and
counted, labels are compared on texts both answered, and the canary ends itself, with an audit
entry, when the candidate breaks an SLO (error rate or p99 latency in ``params.yaml`` ``canary:``).
"""

from __future__ import annotations

import datetime as dt
import hashlib
import json
import logging
import math
import threading
from collections import deque
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Literal

import numpy as np
import pandas as pd
from scipy.stats import mannwhitneyu
from statsmodels.stats.proportion import proportion_confint, proportions_ztest

from tuneloop.config import CanaryParams

log = logging.getLogger(__name__)

Mode = Literal["canary", "shadow"]
LATENCY_SAMPLES = 5000


def caller_bucket(caller: str) -> float:
    """Where a caller falls in [0, 100): stable across requests, gateways and restarts."""
    digest = hashlib.sha256(caller.encode()).digest()
    return int.from_bytes(digest[:8], "big") % 10_000 / 100


@dataclass
class VersionStats:
    """Calls answered by one side of the experiment: outcome counts and recent latencies."""

    version: str | None = None
    # Texts this side answered the callers (cached or not): the traffic share.
    texts: int = 0
    # Model-server calls (a micro-batch is one call): errors and latency are judged on these.
    calls: int = 0
    errors: int = 0
    latencies_ms: deque[float] = field(default_factory=lambda: deque(maxlen=LATENCY_SAMPLES))

    def record(self, version: str | None, ok: bool, latency_ms: float) -> None:
        self.version = version or self.version
        self.calls += 1
        if ok:
            self.latencies_ms.append(latency_ms)
        else:
            self.errors += 1

    @property
    def error_rate(self) -> float:
        return self.errors / self.calls if self.calls else 0.0

    def latency_ms(self, quantile: float) -> float | None:
        return float(np.quantile(list(self.latencies_ms), quantile)) if self.latencies_ms else None

    def summary(self) -> dict:
        p50, p99 = self.latency_ms(0.5), self.latency_ms(0.99)
        return {
            "version": self.version,
            "texts": self.texts,
            "calls": self.calls,
            "errors": self.errors,
            "error_rate": round(self.error_rate, 4),
            "p50_ms": None if p50 is None else round(p50, 1),
            "p99_ms": None if p99 is None else round(p99, 1),
        }


@dataclass
class AuditEntry:
    at: str
    action: str
    actor: str
    mode: str
    percent: float
    candidate_version: str | None
    prod_version: str | None
    reason: str


def _now() -> str:
    return dt.datetime.now(dt.UTC).isoformat(timespec="seconds")


class Canary:
    """One gateway's canary or shadow experiment (at most one at a time); every change is audited.

    Runs on the gateway's event loop; the lock only guards the audit file and the report, which
    also run in worker threads.
    """

    def __init__(self, settings: CanaryParams, audit_path: Path) -> None:
        self.settings = settings
        self.audit_path = audit_path
        self.mode: Mode | None = None
        self.percent = 0.0
        self.started_at: dt.datetime | None = None
        self.ended: dict | None = None
        self.prod = VersionStats()
        self.candidate = VersionStats()
        self.compared = 0
        self.agreed = 0
        self._lock = threading.Lock()

    @property
    def active(self) -> bool:
        return self.mode is not None

    def start(
        self, mode: Mode, percent: float, actor: str, prod_version: str | None, candidate_version: str | None
    ) -> AuditEntry:
        self.mode, self.percent = mode, (percent if mode == "canary" else 0.0)
        self.started_at = dt.datetime.now(dt.UTC)
        self.ended = None
        self.prod, self.candidate = VersionStats(prod_version), VersionStats(candidate_version)
        self.compared = self.agreed = 0
        reason = f"{mode} started" + (f" at {percent:g}%" if mode == "canary" else "")
        return self._audit("start", actor, reason, prod_version)

    def stop(self, actor: str, reason: str) -> AuditEntry:
        entry = self._audit("stop", actor, reason, self.prod.version)
        self.ended = {"at": entry.at, "by": actor, "reason": reason, "report": self.summary()}
        self.mode, self.percent = None, 0.0
        return entry

    def routes_to_candidate(self, caller: str) -> bool:
        return self.mode == "canary" and caller_bucket(caller) < self.percent

    def record(
        self, role: Literal["prod", "candidate"], version: str | None, ok: bool, latency_ms: float
    ) -> None:
        (self.prod if role == "prod" else self.candidate).record(version, ok, latency_ms)

    def count_texts(self, side: Literal["prod", "candidate"], texts: int) -> None:
        (self.prod if side == "prod" else self.candidate).texts += texts

    def record_agreement(self, prod_labels: list[str], candidate_labels: list[str]) -> None:
        self.compared += len(prod_labels)
        self.agreed += sum(a == b for a, b in zip(prod_labels, candidate_labels, strict=True))

    def slo_breach(self) -> str | None:
        """Why the candidate must be stopped now, or None (judged once it answered min_requests)."""
        stats, slo = self.candidate, self.settings
        if not self.active or stats.calls < slo.min_requests:
            return None
        if stats.error_rate > slo.max_error_rate:
            return (
                f"error rate {stats.error_rate:.1%} over {stats.calls} calls is above "
                f"canary.max_error_rate {slo.max_error_rate:.1%}"
            )
        p99 = stats.latency_ms(0.99)
        if p99 is not None and p99 > slo.max_p99_latency_ms:
            return (
                f"p99 latency {p99:.0f} ms is above canary.max_p99_latency_ms {slo.max_p99_latency_ms:g} ms"
            )
        return None

    def summary(self) -> dict:
        """Counts, latencies and their tests; no inference-log read (cheap: every /v1/status)."""
        prod, candidate = self.prod, self.candidate
        alpha = self.settings.significance
        errors = _two_proportions(candidate.errors, candidate.calls, prod.errors, prod.calls, "larger")
        latency = None
        if len(prod.latencies_ms) >= 10 and len(candidate.latencies_ms) >= 10:
            test = mannwhitneyu(list(candidate.latencies_ms), list(prod.latencies_ms), alternative="greater")
            latency = {"test": "Mann-Whitney U (candidate slower)", "p_value": float(test.pvalue)}
        agreement = None
        if self.compared:
            low, high = proportion_confint(self.agreed, self.compared, alpha=alpha, method="wilson")
            agreement = {
                "texts": self.compared,
                "share": round(self.agreed / self.compared, 4),
                "interval": [round(float(low), 4), round(float(high), 4)],
            }
        return {
            "mode": self.mode,
            "percent": self.percent,
            "started_at": self.started_at.isoformat(timespec="seconds") if self.started_at else None,
            "prod": prod.summary(),
            "candidate": candidate.summary(),
            "traffic_share_candidate": round(candidate.texts / (candidate.texts + prod.texts), 4)
            if candidate.texts + prod.texts
            else None,
            "agreement": agreement,
            "error_rate_test": errors,
            "latency_test": latency,
            "significance": alpha,
            "slo": {
                "min_requests": self.settings.min_requests,
                "max_error_rate": self.settings.max_error_rate,
                "max_p99_latency_ms": self.settings.max_p99_latency_ms,
            },
            "ended": self.ended,
        }

    def _audit(self, action: str, actor: str, reason: str, prod_version: str | None) -> AuditEntry:
        entry = AuditEntry(
            at=_now(),
            action=action,
            actor=actor,
            mode=self.mode or "",
            percent=self.percent,
            candidate_version=self.candidate.version,
            prod_version=prod_version,
            reason=reason,
        )
        with self._lock:
            self.audit_path.parent.mkdir(parents=True, exist_ok=True)
            with open(self.audit_path, "a", encoding="utf-8") as handle:
                handle.write(json.dumps(asdict(entry), sort_keys=True) + "\n")
        log.warning("canary %s by %s: %s", action, actor, reason)
        return entry


def live_accuracy(
    window: pd.DataFrame, prod_version: str | None, candidate_version: str | None, alpha: float
) -> dict:
    """Accuracy on the feedback received for each version's answers, and whether the candidate is worse.

    ``window``: the inference log since the experiment started (:func:`read_window`). Shadow answers
    are not logged (only prod answered the caller), so in shadow mode the candidate has none.
    """
    labelled = window[window["true_label"].notna()]
    sides: dict[str, dict] = {}
    for side, version in (("prod", prod_version), ("candidate", candidate_version)):
        rows = (
            labelled[labelled["model_version"].astype(str) == str(version)] if version else labelled.iloc[:0]
        )
        correct = int((rows["label"] == rows["true_label"]).sum())
        sides[side] = {
            "version": version,
            "labelled": len(rows),
            "accuracy": round(correct / len(rows), 4) if len(rows) else None,
            "correct": correct,
        }
    test = _two_proportions(
        sides["candidate"]["correct"],
        sides["candidate"]["labelled"],
        sides["prod"]["correct"],
        sides["prod"]["labelled"],
        "smaller",
    )
    return {
        "prod": sides["prod"],
        "candidate": sides["candidate"],
        "candidate_worse_test": test,
        "alpha": alpha,
    }


def _two_proportions(count_a: int, n_a: int, count_b: int, n_b: int, alternative: str) -> dict | None:
    """Two-proportion z-test of a against b (``larger``: a's share is higher); None without data."""
    if n_a == 0 or n_b == 0:
        return None
    if count_a + count_b in (0, n_a + n_b):  # equal and degenerate: the z statistic is undefined
        return {"test": "two-proportion z", "p_value": 1.0}
    _, p_value = proportions_ztest([count_a, count_b], [n_a, n_b], alternative=alternative)
    return {"test": "two-proportion z", "p_value": float(p_value) if math.isfinite(p_value) else 1.0}
