"""The merge gate (registry/model_gate.py): verdicts on metric drops and promotion gates, and the report."""

import json
import subprocess
import sys
from pathlib import Path

import pytest
import yaml

from evaluation.gates import evaluate_gates
from registry.model_gate import COMMENT_MARKER, judge, render_markdown

REPO_ROOT = Path(__file__).resolve().parents[2]
TOLERANCES = {"quality/accuracy": 0.02, "quality/macro_f1": 0.02, "quality/expected_calibration_error": 0.03}
GATES = {
    "min_accuracy": 0.80,
    "min_macro_f1": 0.78,
    "max_group_accuracy_gap": 0.20,
    "max_counterfactual_flip_rate": 0.10,
    "max_counterfactual_accuracy_gap": 0.05,
    "max_expected_calibration_error": 0.15,
}


def metrics(accuracy: float, macro_f1: float, ece: float = 0.05) -> dict[str, float]:
    return {
        "quality/accuracy": accuracy,
        "quality/macro_f1": macro_f1,
        "quality/expected_calibration_error": ece,
        "bias/max_group_accuracy_gap": 0.04,
        "bias/counterfactual_flip_rate": 0.02,
        "bias/counterfactual_accuracy_gap": 0.01,
    }


def verdict_for(base: dict[str, float] | None, head: dict[str, float]):
    return judge(head, evaluate_gates(head, GATES), base, TOLERANCES)


def test_a_better_model_passes_and_each_headline_metric_says_so():
    verdict = verdict_for(metrics(0.88, 0.86), metrics(0.91, 0.90))
    assert verdict.passed and verdict.reasons == ()
    assert {check.metric: check.verdict for check in verdict.checks}["quality/accuracy"] == "✅ better"


def test_a_drop_equal_to_the_tolerance_passes_and_one_beyond_it_fails():
    assert verdict_for(metrics(0.90, 0.88), metrics(0.88, 0.86)).passed
    failed = verdict_for(metrics(0.90, 0.88), metrics(0.87, 0.88))
    assert not failed.passed
    assert failed.reasons == ("quality/accuracy: worse by 0.0300, more than 0.0200",)


def test_calibration_error_going_up_is_a_drop():
    assert not verdict_for(metrics(0.9, 0.9, ece=0.02), metrics(0.9, 0.9, ece=0.06)).passed
    assert verdict_for(metrics(0.9, 0.9, ece=0.06), metrics(0.9, 0.9, ece=0.02)).passed


def test_a_failed_promotion_gate_fails_the_merge_even_when_metrics_improve():
    verdict = verdict_for(metrics(0.60, 0.58), metrics(0.70, 0.68))
    assert not verdict.passed
    assert any(
        reason.startswith("promotion gate min_accuracy failed: quality/accuracy = 0.7000")
        for reason in verdict.reasons
    )


def test_without_base_metrics_only_the_gates_apply_and_the_report_says_so():
    verdict = verdict_for(None, metrics(0.90, 0.88))
    assert verdict.passed
    report = render_markdown(verdict, "origin/main")
    assert "No base metrics: `origin/main` has no committed `metrics/evaluate.json`" in report


def test_a_toleranced_metric_missing_from_the_head_fails():
    head = metrics(0.9, 0.9)
    del head["quality/macro_f1"]
    verdict = judge(
        head, {"passed": True, "failed": [], "reasons": [], "gates": []}, metrics(0.9, 0.9), TOLERANCES
    )
    assert not verdict.passed
    assert verdict.reasons == ("quality/macro_f1: missing from the head's metrics/evaluate.json",)


def write_metrics_dir(folder: Path, values: dict[str, float]) -> Path:
    folder.mkdir(parents=True)
    (folder / "evaluate.json").write_text(json.dumps(values))
    (folder / "gates.json").write_text(json.dumps(evaluate_gates(values, GATES)))
    return folder


@pytest.fixture
def gate_files(tmp_path: Path) -> Path:
    """The repo's params.yaml with fixed tolerances, and the diffs `make model-gate` hands over."""
    params = yaml.safe_load((REPO_ROOT / "params.yaml").read_text())
    params["model_gate"] = {"max_metric_drop": TOLERANCES}
    (tmp_path / "params.yaml").write_text(yaml.safe_dump(params))
    (tmp_path / "params-diff.md").write_text(
        "| Path | Param | HEAD | workspace |\n| params.yaml | train.epochs | 8 | 4 |\n"
    )
    (tmp_path / "metrics-diff.md").write_text("")
    write_metrics_dir(tmp_path / "base", metrics(0.90, 0.88))
    return tmp_path


def run_gate(folder: Path, head: dict[str, float]) -> tuple[subprocess.CompletedProcess, str, str]:
    head_dir = write_metrics_dir(folder / "head", head)
    summary = folder / "summary.md"
    summary.write_text("earlier step\n")
    result = subprocess.run(
        [
            sys.executable,
            "-m",
            "tuneloop.cli",
            *("--params", str(folder / "params.yaml"), "model-gate"),
            *("--base-metrics-dir", str(folder / "base"), "--head-metrics-dir", str(head_dir)),
            *("--base-label", "origin/main"),
            *(
                "--metrics-diff",
                str(folder / "metrics-diff.md"),
                "--params-diff",
                str(folder / "params-diff.md"),
            ),
            *("--markdown-out", str(folder / "gate.md"), "--step-summary", str(summary)),
        ],
        cwd=REPO_ROOT,
        capture_output=True,
        text=True,
    )
    return result, (folder / "gate.md").read_text(), summary.read_text()


def test_cli_passes_a_better_model_and_writes_the_report(gate_files):
    result, report, summary = run_gate(gate_files, metrics(0.92, 0.90))
    assert result.returncode == 0, result.stderr
    assert report.startswith(f"{COMMENT_MARKER}\n## ✅ Model gate passed")
    assert "| `quality/accuracy` | 0.9000 | 0.9200 | +0.0200 | 0.0200 | ✅ better |" in report
    assert "| `min_accuracy` | `quality/accuracy` | 0.9200 | >= 0.8000 | ✅ |" in report
    assert "| params.yaml | train.epochs | 8 | 4 |" in report
    assert "<details><summary>dvc metrics diff origin/main</summary>\n\n_No changes._" in report
    assert summary == "earlier step\n" + report


def test_cli_fails_a_model_that_drops_beyond_the_tolerance(gate_files):
    result, report, _ = run_gate(gate_files, metrics(0.85, 0.87))
    assert result.returncode == 1
    assert "quality/accuracy: worse by 0.0500, more than 0.0200" in result.stderr
    assert "## ❌ Model gate failed" in report
    assert "- quality/accuracy: worse by 0.0500, more than 0.0200" in report
    assert (
        "| `quality/accuracy` | 0.9000 | 0.8500 | -0.0500 | 0.0200 | ❌ worse by 0.0500, more than 0.0200 |"
        in report
    )
    assert "| `quality/macro_f1` | 0.8800 | 0.8700 | -0.0100 | 0.0200 | ✅ within 0.0200 |" in report


def test_cli_passes_the_first_model_when_the_base_has_no_metrics(gate_files):
    (gate_files / "base" / "evaluate.json").unlink()
    (gate_files / "base" / "gates.json").unlink()
    result, report, _ = run_gate(gate_files, metrics(0.85, 0.87))
    assert result.returncode == 0, result.stderr
    assert "> No base metrics:" in report
    assert "| `quality/accuracy` | – | 0.8500 | – | 0.0200 | no base value to compare |" in report
