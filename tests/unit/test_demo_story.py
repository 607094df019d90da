"""The demo's story-telling and its safety on re-runs, without starting anything."""

from __future__ import annotations

import os

import pytest

from flows.demo import DemoFailed, Story, describe_decision, stack_is_ours


def test_each_step_prints_its_numbers_and_time_and_the_table_lists_them_all():
    lines: list[str] = []
    story = Story(write=lines.append)
    with story.step("train v1") as said:
        said.append("accuracy 0.913")
    with pytest.raises(DemoFailed), story.step("promote v1") as said:
        raise DemoFailed("v1 is not approved")

    assert lines[0] == "[ 1] train v1 ..."
    assert lines[1].startswith("     accuracy 0.913 (") and lines[1].endswith(" s)")
    assert lines[3].startswith("     FAILED after ") and lines[3].endswith(": v1 is not approved")
    table = story.table().splitlines()
    assert table[2].startswith("|  1 | train v1 ") and table[2].endswith("| accuracy 0.913")
    assert table[3].endswith("| FAILED: v1 is not approved")
    assert table[-1].startswith("total ")


def test_a_rerun_stops_only_the_stack_a_previous_demo_started(tmp_path):
    assert stack_is_ours(tmp_path) is None
    (tmp_path / "stack.pid").write_text(str(os.getpid()))  # a live process: some stack runs
    assert stack_is_ours(tmp_path) is False
    (tmp_path / "demo").mkdir()
    (tmp_path / "demo" / "stack.pid").write_text(str(os.getpid()))
    assert stack_is_ours(tmp_path) is True
    (tmp_path / "stack.pid").write_text("999999999")  # a pid file left by a dead stack
    assert stack_is_ours(tmp_path) is None


def test_the_drift_line_names_the_decision_and_each_quality_test():
    result = {
        "decision": {"reasons": ["concept drift: accuracy dropped"], "retrain": True},
        "summary": {
            "concept_drift": {
                "tests": {
                    "accuracy": {"reference": 0.913, "current": 0.81, "p_value": 0.0001, "drifted": True}
                }
            }
        },
    }
    assert describe_decision(result) == "concept drift: accuracy dropped; accuracy 0.913 -> 0.810 (p 0.0001)"
    assert describe_decision({"decision": {"reasons": []}, "summary": {}}) == "no drift"
