"""Drift monitoring of a generation model on a real SQLite inference log, real Evidently, real answers.

The model is the tiny Llama adapter (``tiny_generator``): it answers the handful of pairs it memorised
exactly (valid JSON) and writes broken JSON for every other message. Windows are written through the
gateway's log writer as `/v1/generate` writes them (PII masked, label "" and score 0), with feedback,
and `monitor_once` judges them with ``task: generation`` and the adapter folder as the model, so no
registry is needed. What each test sees:

- stable: the sample's test messages and the model's own answers; the reference share of valid answers
  comes from the model's answers on the held-out ``val`` split (broken like the window's): no drift;
- drifted prompts: ``support-pairs-drifted.csv`` messages (new wording, typos, emoji): prompt drift;
- validity drift: the held-out split is the memorised messages (all answered validly), the window the
  test messages (answered with broken JSON): output-validity drift, and the prompts do not drift.
"""

from __future__ import annotations

import datetime as dt
import json
from pathlib import Path

import mlflow
import pandas as pd
import pytest
import yaml
from mlflow.tracking import MlflowClient

from evaluation.drift import GENERATED, VALID
from monitoring.monitor import (
    GENERATION_ALERT_ONLY,
    MONITORING_EXPERIMENT,
    MonitorOutcome,
    NotEnoughTraffic,
    build_generation_reference,
    monitor_once,
)
from pipelines.prepare import prepare_pairs, write_prepared
from serving.generation import TextGenerator
from serving.inference_log import FeedbackRecord, InferenceLogWriter, PredictionRecord
from tests.support import REPO_ROOT, memorised_pairs, settings
from tuneloop.config import Environment, load_params
from tuneloop.io import read_json

pytestmark = pytest.mark.slow

SAMPLE = REPO_ROOT / "data/sample"
COLUMNS = ["message", "target", "channel"]
WINDOW = 120  # the test and drifted files have 120 messages each
MODEL_NAME = "tuneloop-support-json"


@pytest.fixture(scope="module")
def prepared_pairs(tmp_path_factory) -> Path:
    """The generative sample prepared as `task: generation` prepares it (train/val, frozen test file)."""
    params = load_params(REPO_ROOT / "params.yaml")
    out = tmp_path_factory.mktemp("prepared-pairs")
    result = prepare_pairs(
        SAMPLE / "support-pairs.csv",
        params.generation,
        ("channel",),
        params.prepare,
        SAMPLE / "support-pairs-test.csv",
    )
    write_prepared(result, SAMPLE / "support-pairs.csv", out)
    return out


@pytest.fixture(scope="module")
def prepared_memorised(prepared_pairs, tmp_path_factory) -> Path:
    """The same train split; the held-out split is the messages the tiny model answers validly."""
    out = tmp_path_factory.mktemp("prepared-memorised")
    pd.read_parquet(prepared_pairs / "train.parquet").to_parquet(out / "train.parquet", index=False)
    memorised_pairs()[COLUMNS].to_parquet(out / "val.parquet", index=False)
    return out


@pytest.fixture(scope="module")
def generator(tiny_generator) -> TextGenerator:
    return TextGenerator.load(tiny_generator, device="cpu")


@pytest.fixture(scope="module")
def home(tmp_path_factory):
    """One TUNELOOP_HOME (MLflow store, reference cache, latest summary) for the module's tests."""
    folder = tmp_path_factory.mktemp("home")
    with pytest.MonkeyPatch.context() as patch:
        patch.setenv("TUNELOOP_HOME", str(folder))
        for name in (
            "MLFLOW_TRACKING_URI",
            "TUNELOOP_INFERENCE_LOG_URL",
            "TUNELOOP_DATABASE_URL",
            "TUNELOOP_S3_URL",
            "TUNELOOP_S3_ENDPOINT_URL",
        ):
            patch.delenv(name, raising=False)
        yield folder


@pytest.fixture
def env(home, tmp_path) -> Environment:
    """The module's home with a fresh inference log for this test."""
    return Environment.from_env(tmp_path).model_copy(
        update={"inference_log_url": f"sqlite:///{tmp_path / 'log' / 'inference_log.db'}"}
    )


@pytest.fixture(scope="module")
def params_path(tmp_path_factory) -> Path:
    """The project's params.yaml with ``task: generation`` and windows the size of the sample files."""
    params = yaml.safe_load((REPO_ROOT / "params.yaml").read_text())
    params["task"] = "generation"
    params["monitoring"].update(window_size=WINDOW, min_window_size=100)
    path = tmp_path_factory.mktemp("params") / "params.yaml"
    path.write_text(yaml.safe_dump(params, sort_keys=False))
    return path


def log_generations(db_url: str, generator: TextGenerator, messages: list[str], answers=None) -> None:
    """The model's answers to ``messages`` (or ``answers``) logged as the gateway logs them, with
    feedback on the first ten: six accepted, two refused with an edit, two edited."""
    generations = generator.generate(messages, batch_size=32)
    start = dt.datetime.now(dt.UTC) - dt.timedelta(minutes=30)
    records = [
        PredictionRecord(
            f"gen-{i}",
            0,
            start + dt.timedelta(seconds=i),
            MODEL_NAME,
            "1",
            message,
            "",
            0.0,
            5.0,
            principal="api_key:test",
            generated=generation.text if answers is None else answers[i],
            prompt_tokens=generation.prompt_tokens,
            new_tokens=generation.new_tokens,
        )
        for i, (message, generation) in enumerate(zip(messages, generations, strict=True))
    ]
    edited = json.dumps({"intent": "other", "reply": "edited by a person"})
    feedback = [
        FeedbackRecord(
            f"gen-{i}",
            0,
            "",
            start + dt.timedelta(minutes=10),
            principal="api_key:test",
            accepted=True if i < 6 else (False if i < 8 else None),
            edited_output=None if i < 6 else edited,
        )
        for i in range(10)
    ]
    writer = InferenceLogWriter(db_url, flush_interval_s=0.01).start()
    assert writer.submit(records)
    assert writer.submit(feedback)
    writer.close()


def messages_of(name: str) -> list[str]:
    return pd.read_csv(SAMPLE / name)["message"].astype(str).tolist()[:WINDOW]


def judged(outcome) -> MonitorOutcome:
    assert isinstance(outcome, MonitorOutcome), outcome
    summary = outcome.summary
    validity = summary["validity_drift"]
    print(
        f"prompt drift {summary['prompt_drift']['drifted_signals']} "
        f"(text AUC {summary['data_drift']['signals']['text']['score']:.3f}, oov p "
        f"{summary['data_drift']['signals']['oov_share']['score']:.3g}); valid answers "
        f"{validity['reference_share']:.3f} (n={validity['n_reference']}) -> {validity['current_share']:.3f} "
        f"(n={validity['n_current']}), p = {validity['p_value']:.3g}; alpha {summary['alpha_per_test']:.4f}; "
        f"feedback {summary['feedback']}; decision {outcome.decision.reasons}"
    )
    assert summary["task"] == "generation" and summary["n_current"] == WINDOW
    assert summary["n_tests"] == 5 and summary["alpha_per_test"] == pytest.approx(0.01)
    assert summary["model_name"] == MODEL_NAME and summary["model_version"] == "1"
    # Feedback over the lookback: 10 answers, 6 accepted, 4 edited (the others have none).
    assert summary["feedback"] == {"n_feedback": 10, "n_accepted": 6, "accepted_share": 0.6, "n_edited": 4}
    assert summary["n_labelled"] == 10
    assert not outcome.decision.retrain and outcome.appended is None
    return outcome


def mlflow_run(env: Environment, run_id: str):
    client = MlflowClient(env.tracking_uri)
    run = client.get_run(run_id)
    artifacts = {item.path for item in client.list_artifacts(run_id, "drift")}
    return run, artifacts


def test_stable_generations_are_no_drift(env, params_path, prepared_pairs, tiny_generator, generator):
    log_generations(env.inference_log_url, generator, messages_of("support-pairs-test.csv"))

    outcome = judged(monitor_once(env, params_path, prepared_pairs, adapter_dir=tiny_generator))

    summary = outcome.summary
    assert not summary["drift_detected"], summary["data_drift"]
    assert not summary["prompt_drift"]["detected"] and not summary["validity_drift"]["detected"]
    assert (outcome.decision.alert, outcome.decision.reasons) == (False, ("no drift",))
    # Summary for the gateway's /metrics and an MLflow run with the Evidently report.
    assert read_json(env.paths.drift_summary)["reference_key"] == summary["reference_key"]
    run, artifacts = mlflow_run(env, outcome.mlflow_run_id)
    assert run.data.tags["tuneloop.decision"] == "none" and run.data.tags["tuneloop.task"] == "generation"
    assert run.data.metrics["feedback/accepted_share"] == pytest.approx(0.6)
    assert {"drift/summary.json", "drift/text_drift.html", "drift/decision.json"} <= artifacts
    assert mlflow.get_experiment(run.info.experiment_id).name == MONITORING_EXPERIMENT


def test_drifted_prompts_are_prompt_drift(env, params_path, prepared_pairs, tiny_generator, generator):
    log_generations(env.inference_log_url, generator, messages_of("support-pairs-drifted.csv"))

    outcome = judged(monitor_once(env, params_path, prepared_pairs, adapter_dir=tiny_generator))

    summary = outcome.summary
    assert summary["drift_detected"] and summary["prompt_drift"]["detected"]
    assert "text" in summary["prompt_drift"]["drifted_signals"]
    assert summary["data_drift"]["signals"]["text"]["score"] > 0.6  # the domain classifier's ROC AUC
    assert outcome.decision.alert and outcome.decision.reasons[0].startswith("prompt drift in text")
    assert outcome.decision.reasons[-1] == GENERATION_ALERT_ONLY
    run, _ = mlflow_run(env, outcome.mlflow_run_id)
    assert run.data.tags["tuneloop.decision"] == "alert"


def test_invalid_answers_are_output_validity_drift(
    env, params_path, prepared_memorised, tiny_generator, generator
):
    log_generations(env.inference_log_url, generator, messages_of("support-pairs-test.csv"))

    outcome = judged(monitor_once(env, params_path, prepared_memorised, adapter_dir=tiny_generator))

    summary = outcome.summary
    validity = summary["validity_drift"]
    assert summary["drift_detected"] and validity["detected"]
    assert validity["reference_share"] == 1.0 and validity["current_share"] < 0.1
    assert validity["p_value"] < summary["alpha_per_test"]
    assert not summary["prompt_drift"]["detected"]  # the same messages as the stable window
    assert summary["data_drift"]["drifted_signals"] == ["output_validity"]
    assert outcome.decision.alert and outcome.decision.reasons[0].startswith("output validity drift")


def test_too_few_generations_are_not_judged(env, params_path, prepared_pairs, tiny_generator, generator):
    log_generations(env.inference_log_url, generator, messages_of("support-pairs-test.csv")[:50])
    outcome = monitor_once(env, params_path, prepared_pairs, adapter_dir=tiny_generator)
    assert isinstance(outcome, NotEnoughTraffic) and outcome.n_current == 50


def test_generation_reference_is_cached_per_model_and_data(prepared_pairs, tmp_path):
    calls = []

    def always_valid(messages):
        calls.append(len(messages))
        return pd.DataFrame({GENERATED: [memorised_pairs()["target"].iloc[0]] * len(messages)})

    params = settings("monitoring")
    first = build_generation_reference(always_valid, prepared_pairs, params, "message", "m1", tmp_path)
    n_val = len(pd.read_parquet(prepared_pairs / "val.parquet"))
    assert calls == [n_val] and first.validity[VALID].all() and len(first.validity) == n_val
    again = build_generation_reference(always_valid, prepared_pairs, params, "message", "m1", tmp_path)
    assert calls == [n_val] and again.key == first.key
    pd.testing.assert_frame_equal(again.validity, first.validity)
    other = build_generation_reference(always_valid, prepared_pairs, params, "message", "m2", tmp_path)
    assert len(calls) == 2 and other.key != first.key
