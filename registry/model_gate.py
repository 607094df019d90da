"""Merge gate: a pull request's model must pass its promotion gates and lose no more than
``model_gate.max_metric_drop`` (params.yaml) on a headline metric against the base branch.

The verdict and its Markdown report live here, not in the workflow, so that ``make model-gate`` on a
laptop and .github/workflows/model-gate.yml judge alike. Reads files only; runs no tools.
"""

from __future__ import annotations

import json
import math
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from evaluation.gates import GATE_METRICS

# Lets the workflow find and update its own earlier pull-request comment instead of adding another.
COMMENT_MARKER = "<!-- tuneloop-model-gate -->"
# Metrics are written rounded to 6 decimals: a drop equal to the tolerance must not fail on float noise.
_EPSILON = 1e-9
# Errors and gaps (the metrics bounded by a ``max_*`` promotion gate) get worse when they go up.
LOWER_IS_BETTER = frozenset(metric for gate, metric in GATE_METRICS.items() if gate.startswith("max_"))


@dataclass(frozen=True)
class MetricCheck:
    metric: str
    base: float | None
    head: float | None
    max_drop: float
    passed: bool
    verdict: str


@dataclass(frozen=True)
class GateVerdict:
    passed: bool
    reasons: tuple[str, ...]
    checks: tuple[MetricCheck, ...]
    head_gates: dict[str, Any] | None
    has_base: bool


def worsening(metric: str, base: float, head: float) -> float:
    """How much worse ``head`` is than ``base`` (negative: better); errors and gaps count upwards."""
    return head - base if metric in LOWER_IS_BETTER else base - head


def check_metric(
    metric: str, max_drop: float, base: dict[str, float] | None, head: dict[str, float]
) -> MetricCheck:
    head_value = head.get(metric)
    base_value = None if base is None else base.get(metric)
    if head_value is None:
        verdict = "❌ missing from the head's metrics/evaluate.json"
        return MetricCheck(metric, base_value, None, max_drop, False, verdict)
    if base_value is None:
        verdict = "no base value to compare" if base is None else "new metric: no base value"
        return MetricCheck(metric, None, head_value, max_drop, True, verdict)
    worse = worsening(metric, base_value, head_value)
    if worse > max_drop + _EPSILON:
        verdict = f"❌ worse by {worse:.4f}, more than {max_drop:.4f}"
        return MetricCheck(metric, base_value, head_value, max_drop, False, verdict)
    verdict = "✅ better" if worse < -_EPSILON else f"✅ within {max_drop:.4f}"
    return MetricCheck(metric, base_value, head_value, max_drop, True, verdict)


def judge(
    head_metrics: dict[str, float] | None,
    head_gates: dict[str, Any] | None,
    base_metrics: dict[str, float] | None,
    max_metric_drop: dict[str, float],
) -> GateVerdict:
    """The merge verdict: the head's promotion gates, then each toleranced metric against the base.

    ``base_metrics`` is None when the base branch has no committed metrics yet (the first model): then
    only the promotion gates apply.
    """
    reasons: list[str] = []
    if head_gates is None:
        reasons.append("metrics/gates.json is missing: the evaluate stage did not run to the end")
    elif not head_gates.get("passed", False):
        failed = head_gates.get("failed", [])
        details = head_gates.get("reasons", [])
        reasons.extend(
            f"promotion gate {name} failed: {detail}" for name, detail in zip(failed, details, strict=False)
        )
        if not failed:
            reasons.append("metrics/gates.json says the promotion gates failed")
    if head_metrics is None:
        reasons.append("metrics/evaluate.json is missing: the evaluate stage did not run to the end")
    checks = tuple(
        check_metric(metric, max_drop, base_metrics, head_metrics or {})
        for metric, max_drop in max_metric_drop.items()
    )
    reasons.extend(
        f"{check.metric}: {check.verdict.removeprefix('❌ ')}" for check in checks if not check.passed
    )
    return GateVerdict(not reasons, tuple(reasons), checks, head_gates, base_metrics is not None)


def _number(value: float | None, signed: bool = False) -> str:
    if value is None:
        return "–"
    return f"{value:+.4f}" if signed else f"{value:.4f}"


def _diff_section(title: str, markdown: str | None, collapsed: bool) -> list[str]:
    body = (markdown or "").strip() or "_No changes._"
    if collapsed:
        return ["", f"<details><summary>{title}</summary>", "", body, "", "</details>"]
    return ["", f"### {title}", "", body]


def render_markdown(
    verdict: GateVerdict,
    base_label: str,
    metrics_diff: str | None = None,
    params_diff: str | None = None,
) -> str:
    """The report for the job summary and the pull-request comment (starts with COMMENT_MARKER)."""
    title = "✅ Model gate passed" if verdict.passed else "❌ Model gate failed"
    lines = [
        COMMENT_MARKER,
        f"## {title}",
        "",
        f"This branch's `metrics/` (after `dvc repro`) against `{base_label}`; allowed drops from "
        "`model_gate.max_metric_drop` in `params.yaml`.",
    ]
    if verdict.reasons:
        lines += ["", "**Why it failed:**", "", *(f"- {reason}" for reason in verdict.reasons)]
    if not verdict.has_base:
        lines += [
            "",
            f"> No base metrics: `{base_label}` has no committed `metrics/evaluate.json` (the first model?), "
            "so no drop was checked; the promotion gates still apply.",
        ]
    lines += [
        "",
        "### Headline metrics",
        "",
        "| metric | base | head | change | allowed drop | verdict |",
        "|---|---:|---:|---:|---:|---|",
    ]
    for check in verdict.checks:
        change = None if check.base is None or check.head is None else check.head - check.base
        lines.append(
            f"| `{check.metric}` | {_number(check.base)} | {_number(check.head)} | {_number(change, True)} "
            f"| {check.max_drop:.4f} | {check.verdict} |"
        )
    lines += ["", "### Promotion gates (`evaluate.gates` in `params.yaml`)", ""]
    gates = (verdict.head_gates or {}).get("gates", [])
    if gates:
        lines += ["| gate | metric | value | threshold | verdict |", "|---|---|---:|---:|---|"]
        for gate in gates:
            mark = "✅" if gate["passed"] else "❌"
            lines.append(
                f"| `{gate['name']}` | `{gate['metric']}` | {gate['value']:.4f} "
                f"| {gate['direction']} {gate['threshold']:.4f} | {mark} |"
            )
    else:
        lines.append("_No gate verdicts: metrics/gates.json is missing._")
    lines += _diff_section(f"dvc params diff {base_label}", params_diff, collapsed=False)
    lines += _diff_section(f"dvc metrics diff {base_label}", metrics_diff, collapsed=True)
    return "\n".join(lines) + "\n"


def _read_json(path: Path) -> Any | None:
    return json.loads(path.read_text(encoding="utf-8")) if path.is_file() else None


def read_metrics_dir(folder: Path) -> tuple[dict[str, float] | None, dict[str, Any] | None]:
    """``evaluate.json`` (numbers only) and ``gates.json`` from a metrics folder; None where absent."""
    raw = _read_json(folder / "evaluate.json")
    metrics = None
    if raw is not None:
        metrics = {
            key: float(value)
            for key, value in raw.items()
            if isinstance(value, int | float) and not isinstance(value, bool) and math.isfinite(value)
        }
    return metrics, _read_json(folder / "gates.json")


def _read_text(path: Path | None) -> str | None:
    return path.read_text(encoding="utf-8") if path is not None and path.is_file() else None


def run_model_gate(
    head_metrics_dir: Path,
    base_metrics_dir: Path,
    max_drop: dict[str, float],
    base_label: str,
    metrics_diff: Path | None = None,
    params_diff: Path | None = None,
    markdown_out: Path | None = None,
    step_summary: Path | None = None,
) -> GateVerdict:
    """Judge the head metrics against the base's and write the Markdown report where asked."""
    head_metrics, head_gates = read_metrics_dir(head_metrics_dir)
    base_metrics, _ = read_metrics_dir(base_metrics_dir)
    verdict = judge(head_metrics, head_gates, base_metrics, max_drop)
    report = render_markdown(verdict, base_label, _read_text(metrics_diff), _read_text(params_diff))
    if markdown_out is None:
        print(report)
    else:
        markdown_out.parent.mkdir(parents=True, exist_ok=True)
        markdown_out.write_text(report, encoding="utf-8")
    if step_summary is not None:
        with step_summary.open("a", encoding="utf-8") as summary:
            summary.write(report)
    return verdict
