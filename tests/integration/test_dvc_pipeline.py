"""`tuneloop run` and `dvc repro` end to end in a fresh copy of the repo, with the tiny model.

Real DVC (repo, local remote, stages), real GX, real training and a real MLflow SQLite store.
"""

from __future__ import annotations

import json
from pathlib import Path

import mlflow
import pandas as pd
import pytest
import yaml
from mlflow.tracking import MlflowClient

from tests.support import run_cli
from tuneloop.config import Environment
from tuneloop.io import file_md5

pytestmark = pytest.mark.slow

STAGES = ["prepare", "validate", "train", "evaluate"]


def stages_run(output: str) -> list[str]:
    """Stages DVC actually executed, read from its `Running stage '<name>':` lines."""
    return [s for s in STAGES if f"Running stage '{s}'" in output]


def test_fresh_clone_runs_everything_then_nothing_then_only_what_changed(project):
    first = run_cli("tuneloop", "run", cwd=project)
    assert first.returncode == 0, first.stdout[-3000:] + first.stderr[-3000:]
    assert stages_run(first.stdout + first.stderr) == STAGES

    env = Environment.from_env(project)
    raw = project / "data/raw/intents.csv"
    md5 = file_md5(raw)
    remote_files = [p for p in Path(env.dvc_remote_url).rglob("*") if p.is_file()]
    assert any(md5 in str(p).replace("/", "") for p in remote_files), "the raw data must be in the DVC remote"
    assert yaml.safe_load((project / "data/raw/intents.csv.dvc").read_text())["outs"][0]["md5"] == md5
    # The frozen test file: the sample's own, DVC-tracked and pushed, and exactly the test split.
    frozen = project / "data/raw/intents-test.csv"
    assert frozen.read_bytes() == (project / "data/sample/intents-test.csv").read_bytes()
    test_md5 = file_md5(frozen)
    assert (
        yaml.safe_load((project / "data/raw/intents-test.csv.dvc").read_text())["outs"][0]["md5"] == test_md5
    )
    assert any(test_md5 in str(p).replace("/", "") for p in remote_files), "the test file must be pushed"
    prepared_test = pd.read_parquet(project / "data/prepared/test.parquet")
    assert len(prepared_test) == len(pd.read_csv(frozen))
    assert set(prepared_test["text"]).isdisjoint(
        pd.read_parquet(project / "data/prepared/train.parquet")["text"]
    )

    for output in [
        "data/prepared/train.parquet",
        "reports/validation/data_docs/index.html",
        "models/adapter/adapter_model.safetensors",
        "metrics/evaluate.json",
        "metrics/gates.json",
        "metrics/bias.json",
        "plots/confusion_matrix.png",
        "plots/confusion.csv",
    ]:
        assert (project / output).exists(), output
    metrics = json.loads((project / "metrics/evaluate.json").read_text())
    assert 0 <= metrics["quality/accuracy"] <= 1
    gates = json.loads((project / "metrics/gates.json").read_text())
    assert {g["name"] for g in gates["gates"]} >= {"min_accuracy", "max_counterfactual_flip_rate"}

    mlflow.set_tracking_uri(env.tracking_uri)
    run_id = json.loads((project / "models/adapter/tuneloop.json").read_text())["mlflow_run_id"]
    run = MlflowClient().get_run(run_id)
    assert run.data.params["train.lora_rank"] == "16"
    assert run.data.tags["tuneloop.data_md5"] == md5
    assert len(run.data.tags["tuneloop.git_commit"]) >= 40
    assert run.data.metrics["quality/accuracy"] == pytest.approx(metrics["quality/accuracy"], abs=1e-6)
    history = MlflowClient().get_metric_history(run_id, "epoch/val_accuracy")
    assert [m.step for m in history] == [1, 2]
    artifacts = {a.path for a in MlflowClient().list_artifacts(run_id, "plots")}
    assert {"plots/confusion_matrix.png", "plots/training_curves.png"} <= artifacts
    lock = MlflowClient().download_artifacts(run_id, "lineage/dvc.lock")
    assert "evaluate:" in Path(lock).read_text()

    again = run_cli("tuneloop", "init", cwd=project)
    assert again.returncode == 0, again.stderr
    assert f"md5 {md5}" in again.stdout and "0 file(s) pushed" in again.stdout
    frozen.unlink()
    assert run_cli("tuneloop", "init", cwd=project).returncode == 0
    assert file_md5(frozen) == test_md5, "init brings the same frozen test file back, never a new draw"

    second = run_cli("dvc", "repro", cwd=project)
    assert second.returncode == 0, second.stderr
    assert stages_run(second.stdout) == []

    params = yaml.safe_load((project / "params.yaml").read_text())
    params["train"]["learning_rate"] = 0.004
    (project / "params.yaml").write_text(yaml.safe_dump(params, sort_keys=False))
    third = run_cli("dvc", "repro", cwd=project)
    assert third.returncode == 0, third.stderr
    assert stages_run(third.stdout) == ["train", "evaluate"]


def _corrupt_raw(project, corrupt) -> None:
    raw = project / "data/raw/intents.csv"
    frame = pd.read_csv(raw, dtype=str, keep_default_na=False)
    corrupt(frame).to_csv(raw, index=False)


def _null_text(frame):
    frame.loc[5, "text"] = ""
    return frame


def _blank_text(frame):
    frame.loc[5, "text"] = "    "
    return frame


def _unknown_label(frame):
    frame.loc[:3, "intent"] = "refund_statuss"
    return frame


def _two_labels(frame):
    row = frame.iloc[[0]].copy()
    row["intent"] = "speak_to_agent" if row["intent"].iloc[0] != "speak_to_agent" else "cancel_order"
    return pd.concat([frame, row])


def _class_below_minimum(frame):
    rows = frame.index[frame["intent"] == "request_invoice"]
    return frame.drop(index=rows[10:])


@pytest.mark.parametrize(
    ("corrupt", "check"),
    [
        (_null_text, "text_not_null"),
        (_blank_text, "text_not_blank"),
        (_unknown_label, "label_in_known_set"),
        (_two_labels, "one_label_per_text"),
        (_class_below_minimum, "min_examples_per_class"),
        ("leak", "no_test_text_in_train"),
    ],
)
def test_bad_data_stops_the_pipeline_before_train(project, corrupt, check):
    assert run_cli("tuneloop", "init", cwd=project).returncode == 0
    if corrupt == "leak":
        # A frozen test file whose rows are also in the training data, with dropping them switched off.
        raw = pd.read_csv(project / "data/raw/intents.csv", dtype=str)
        raw.sample(60, random_state=0).to_csv(project / "data/frozen_test.csv", index=False)
        params = yaml.safe_load((project / "params.yaml").read_text())
        params["data"]["test_path"] = "data/frozen_test.csv"
        params["prepare"]["drop_test_overlap"] = False
        (project / "params.yaml").write_text(yaml.safe_dump(params, sort_keys=False))
    else:
        _corrupt_raw(project, corrupt)
    result = run_cli("dvc", "repro", cwd=project)
    output = result.stdout + result.stderr
    assert result.returncode != 0
    assert check in output, output[-3000:]
    assert stages_run(output) == ["prepare", "validate"]
    assert not (project / "models/adapter").exists()
    summary = json.loads((project / "reports/validation/summary.json").read_text())
    assert check in {failure["check"] for failure in summary["failed"]}
