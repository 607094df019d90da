"""The small pure pieces of the flows: which version the promotion poll picks, params overrides,
schedules read from prefect.yaml, the run summary."""

from __future__ import annotations

import shutil
from pathlib import Path

import pytest
import yaml
from mlflow.entities.model_registry import ModelVersion, ModelVersionTag
from pydantic import ValidationError

from flows.continuous_training import summary_markdown, write_params_overrides
from flows.deploy import declared_deployments
from flows.promotion import newest_approved
from flows.serve import schedule_of

REPO_ROOT = Path(__file__).resolve().parents[2]


def version(number: int, **tags: str) -> ModelVersion:
    return ModelVersion("m", str(number), 0, tags=[ModelVersionTag(k, v) for k, v in tags.items()])


@pytest.mark.parametrize(
    ("versions", "prod", "expected"),
    [
        ([version(1, approval="approved", was_dev="true")], None, "1"),
        (
            [version(1, approval="approved", was_dev="true"), version(2, approval="pending", was_dev="true")],
            None,
            "1",
        ),
        (
            [
                version(1, approval="approved", was_dev="true"),
                version(3, approval="approved", was_dev="true"),
            ],
            None,
            "3",
        ),
        # never dev (failed its gates): not a candidate even when approved
        ([version(4, approval="approved")], None, None),
        ([version(2, approval="approved", was_dev="true")], "2", None),
        ([version(2, approval="approved", was_dev="true")], "5", None),
        ([version(1, approval="rejected", was_dev="true")], None, None),
        ([], None, None),
    ],
)
def test_the_poll_picks_the_newest_approved_version_that_was_dev_and_is_newer_than_prod(
    versions, prod, expected
):
    picked = newest_approved(versions, prod)
    assert (picked.version if picked else None) == expected


def test_params_overrides_are_validated_merged_and_keep_the_comments(tmp_path):
    params = tmp_path / "params.yaml"
    shutil.copy(REPO_ROOT / "params.yaml", params)
    original = params.read_text()

    merged = write_params_overrides(params, {"train": {"epochs": 3, "lora_rank": 4}})

    assert merged.train.epochs == 3 and merged.train.lora_rank == 4
    text = params.read_text()
    assert "# Every tunable number the pipeline reads." in text
    written = yaml.safe_load(text)
    assert written["train"]["epochs"] == 3 and written["train"]["lora_alpha"] == 32
    assert {k: v for k, v in written.items() if k != "train"} == {
        k: v for k, v in yaml.safe_load(original).items() if k != "train"
    }


@pytest.mark.parametrize("bad", [{"train": {"lora_rank": 0}}, {"train": {"no_such_knob": 1}}, {"nope": {}}])
def test_a_bad_override_is_refused_and_params_yaml_is_left_alone(tmp_path, bad):
    params = tmp_path / "params.yaml"
    shutil.copy(REPO_ROOT / "params.yaml", params)
    before = params.read_text()
    with pytest.raises(ValidationError):
        write_params_overrides(params, bad)
    assert params.read_text() == before


def test_every_deployment_in_prefect_yaml_has_a_valid_schedule_and_entrypoint():
    deployments = declared_deployments(REPO_ROOT)
    assert {d["name"] for d in deployments} >= {"nightly", "poll"}
    for spec in deployments:
        path, function = spec["entrypoint"].split(":")
        assert f"def {function}(" in (REPO_ROOT / path).read_text()
        for schedule in spec["schedules"]:
            assert schedule_of(schedule).timezone == "UTC"
    with pytest.raises(ValueError, match="neither"):
        schedule_of({"rrule": "FREQ=DAILY"})


def test_the_summary_says_what_ran_the_metrics_each_gate_and_the_verdict():
    summary = {
        "reason": "drift",
        "data_rev": "abc123",
        "data_pointers": ["data/raw/intents.csv.dvc"],
        "params_overrides": None,
        "stages": {"prepare": False, "validate": False, "train": True, "evaluate": True},
        "registration": {
            "name": "m",
            "version": "7",
            "new_version": True,
            "promoted_to_dev": False,
            "reasons": ["gate failed: quality/accuracy = 0.5"],
        },
        "duration_s": 12.5,
    }
    gates = {"gates": [{"name": "min_accuracy", "passed": False, "reason": "0.5 < 0.8"}]}
    text = summary_markdown(summary, {"quality/accuracy": 0.5}, gates, "[run](http://x)")
    assert "# continuous-training (drift)" in text
    assert "`m` v7 is NOT `dev`: gate failed: quality/accuracy = 0.5" in text
    assert "prepare skipped" in text and "train ran" in text
    assert "| quality/accuracy | 0.5000 |" in text and "| min_accuracy | **FAIL** | 0.5 < 0.8 |" in text
    assert "[run](http://x)" in text
