"""Data-parallel training (`train.processes`): the launch command, the refusals, and 2 CPU processes
(gloo on 127.0.0.1) trained through the real `python -m pipelines.train` against 1 process."""

from __future__ import annotations

import json
import logging
import subprocess
import sys
import time
from pathlib import Path

import numpy as np
import pandas as pd
import pytest
import torch
import yaml
from mlflow.tracking import MlflowClient

from pipelines import train as train_stage
from pipelines.train import launch_command, launch_environment, main, per_process_batch, stage_command, train
from serving.inference import IntentClassifier, select_device
from tests.support import REPO_ROOT, build_tiny_base, settings, venv_env
from tuneloop.config import ModelParams

LABELS = ("cancel_order", "check_order_status")
ROWS_PER_LABEL = 16
# Global batch 8 = 2 processes x 4, and the 32 rows fill every batch: no rank pads a short last batch
# with repeated rows, so both runs take the same examples in every optimiser step.
BATCH_SIZE = 8
# The seeded tiny base leaves chance level after about 4 epochs and knows all 32 texts by the 8th.
EPOCHS = 10


def write_params(path: Path, base: Path, processes: int, **train: object) -> Path:
    """params.yaml with ``base`` and a quick CPU training with ``processes`` processes, no LoRA dropout."""
    params = yaml.safe_load((REPO_ROOT / "params.yaml").read_text())
    params["model"]["base"] = str(base)
    params["train"].update(
        {
            "epochs": EPOCHS,
            "learning_rate": 0.01,
            "head_learning_rate": 0.01,
            "batch_size": BATCH_SIZE,
            "warmup_fraction": 0.0,
            "lora_rank": 8,
            "lora_dropout": 0.0,
            "max_length": 32,
            "early_stopping_patience": EPOCHS,
            "device": "cpu",
            "processes": processes,
            **train,
        }
    )
    path.write_text(yaml.safe_dump(params, sort_keys=False))
    return path


def write_prepared(folder: Path) -> Path:
    """A prepared-data folder as `prepare` writes it, with validation = training rows.

    The tiny model starts from random weights and learns its training texts in seconds but nothing
    beyond them, so memorising them is the learning the two runs are compared on.
    """
    sample = pd.read_csv(REPO_ROOT / "data/sample/intents.csv").rename(columns={"intent": "label"})
    rows = pd.concat(sample[sample["label"] == label].head(ROWS_PER_LABEL) for label in LABELS)
    rows = rows[["text", "label"]].reset_index(drop=True)
    folder.mkdir(parents=True)
    rows.to_parquet(folder / "train.parquet")
    rows.to_parquet(folder / "val.parquet")
    (folder / "labels.json").write_text(json.dumps(list(LABELS)))
    meta = {"source_path": "data/sample/intents.csv", "source_md5": "test", "rows": {"train": len(rows)}}
    (folder / "meta.json").write_text(json.dumps(meta))
    return folder


StageRun = tuple[subprocess.CompletedProcess, Path]


def run_stage(work: Path, params: Path, prepared: Path, name: str) -> StageRun:
    """`python -m pipelines.train` in ``work`` (no git repo), into its own experiment of a SQLite store."""
    out = work / name
    command = stage_command(sys.executable, params, prepared, out)
    env = venv_env(
        MLFLOW_TRACKING_URI=f"sqlite:///{work / 'mlflow.db'}",
        TUNELOOP_HOME=str(work / "home"),
        TUNELOOP_EXPERIMENT=name,
        HF_HUB_OFFLINE="1",
    )
    finished = subprocess.run(command, cwd=work, env=env, capture_output=True, text=True, timeout=300)
    return finished, out


# --- the launch and the refusals (fast) ---


def test_launch_command_starts_this_stage_under_torchrun_on_loopback():
    command = launch_command("/venv/bin/python", 2, 29511, ["--params", "p.yaml", "--out-dir", "models/a b"])
    assert command == [
        "/venv/bin/python",
        "-m",
        "torch.distributed.run",
        "--nnodes",
        "1",
        "--nproc-per-node",
        "2",
        "--master-addr",
        "127.0.0.1",
        "--master-port",
        "29511",
        "-m",
        "pipelines.train",
        "--params",
        "p.yaml",
        "--out-dir",
        "models/a b",
    ]


def test_launch_environment_splits_the_cpus_and_keeps_gloo_on_loopback():
    assert launch_environment(2, 16, "lo") == {"OMP_NUM_THREADS": "8", "GLOO_SOCKET_IFNAME": "lo"}
    assert launch_environment(4, 2, None) == {"OMP_NUM_THREADS": "1"}


@pytest.mark.parametrize(("batch_size", "processes", "per_process"), [(32, 1, 32), (32, 2, 16), (8, 8, 1)])
def test_global_batch_splits_over_processes(batch_size, processes, per_process):
    assert per_process_batch(batch_size, processes) == per_process


@pytest.mark.parametrize(("batch_size", "processes"), [(30, 4), (3, 2), (1, 2)])
def test_batch_that_does_not_split_evenly_is_refused(batch_size, processes):
    with pytest.raises(ValueError, match=f"must split evenly over {processes} processes"):
        per_process_batch(batch_size, processes)


def test_stage_refuses_an_uneven_batch_before_starting_any_process(tmp_path, monkeypatch):
    def no_process(*args, **kwargs):
        raise AssertionError("a process was started")

    monkeypatch.setattr(subprocess, "run", no_process)
    params = write_params(tmp_path / "params.yaml", tmp_path / "no-base", processes=4, batch_size=30)
    with pytest.raises(ValueError, match="batch_size 30 is the global batch"):
        main(["--params", str(params), "--prepared-dir", str(tmp_path / "absent")])


def test_train_step_refuses_several_processes_without_a_launcher(tmp_path):
    params = settings("train", processes=2, device="cpu")
    frame = pd.DataFrame({"text": ["a", "b"], "label": ["x", "y"]})
    with pytest.raises(ValueError, match="not started by a launcher"):
        train(frame, frame, ("x", "y"), ModelParams(base=str(tmp_path / "no-base")), params, tmp_path / "out")


@pytest.mark.skipif(torch.cuda.is_available(), reason="needs a machine without a CUDA device")
def test_train_stage_asked_for_cuda_without_a_gpu_says_so_without_a_traceback(tmp_path):
    params = write_params(tmp_path / "params.yaml", tmp_path / "no-base", processes=1, device="cuda")
    stage = subprocess.run(
        [sys.executable, "-m", "pipelines.train", "--params", str(params), "--prepared-dir", str(tmp_path)],
        cwd=REPO_ROOT,
        capture_output=True,
        text=True,
        timeout=300,
    )
    assert stage.returncode == 1
    assert "train: train.device is 'cuda' but torch sees no CUDA device" in stage.stderr
    assert "Traceback" not in stage.stderr


# --- 1 process against 2 processes, through the real stage (slow) ---

# Without dropout (none in the base, none in LoRA) the two runs compute the same thing: the same seed,
# the same shuffle (accelerate synchronises the sampler's generator across ranks), the same examples
# per step, and DDP's mean of two half-batch gradients equals the full batch's. What differs is float
# rounding (summation order in gloo's all-reduce, kernels on 4 rows instead of 8), which the steep part
# of training amplifies: measured here, the per-epoch losses agree to 1e-6 early and 1.2e-4 (relative)
# at worst, the metrics exactly. The tolerances leave room for that and little more: losses to 1e-3
# relative, accuracy and macro-F1 to one of the 32 predictions. A broken setup is far outside them: a
# gradient doubled by the Trainer's loss scaling (a trap this test caught) doubles every reported loss,
# an unsplit batch changes the steps per epoch and so the whole trajectory.
LOSS_TOLERANCE = 1e-3
METRIC_TOLERANCE = 1 / (len(LABELS) * ROWS_PER_LABEL)


@pytest.fixture(scope="module")
def tiny_base_without_dropout(tmp_path_factory) -> Path:
    """The tiny base with fixed initial weights (so it learns the same way in every session), dropout off."""
    base = build_tiny_base(tmp_path_factory.mktemp("tiny-base-no-dropout"), seed=0)
    config = json.loads((base / "config.json").read_text())
    config.update(hidden_dropout_prob=0.0, attention_probs_dropout_prob=0.0)
    (base / "config.json").write_text(json.dumps(config))
    return base


@pytest.fixture(scope="module")
def one_and_two_processes(tiny_base_without_dropout, tmp_path_factory):
    work = tmp_path_factory.mktemp("ddp")
    prepared = write_prepared(work / "prepared")
    runs = {}
    for processes in (1, 2):
        params = write_params(work / f"params-{processes}.yaml", tiny_base_without_dropout, processes)
        runs[processes] = run_stage(work, params, prepared, f"p{processes}")
    return work, prepared, runs


def finished_ok(run: StageRun) -> Path:
    finished, out = run
    assert finished.returncode == 0, finished.stdout[-3000:] + finished.stderr[-6000:]
    return out


@pytest.mark.slow
def test_both_runs_finish_and_write_every_output(one_and_two_processes):
    _, _, runs = one_and_two_processes
    for processes in (1, 2):
        out = finished_ok(runs[processes])
        assert {"adapter_config.json", "adapter_model.safetensors", "labels.json", "tuneloop.json"} <= {
            p.name for p in (out / "adapter").iterdir()
        }
        metrics = json.loads((out / "metrics.json").read_text())
        assert metrics["train/processes"] == processes
        # Its cost at the list prices of params.yaml: device-hours of every process, and their price,
        # with the wall times they come from, beside the metrics rather than in them.
        timing = json.loads((out / "timing.json").read_text())
        assert timing["cost/device_hours"] > 0 and timing["cost/training_usd"] > 0
        assert not {"cost/device_hours", "train/total_seconds"} & set(metrics)
        assert len(pd.read_csv(out / "history.csv")) == EPOCHS


@pytest.mark.slow
def test_each_training_makes_exactly_one_mlflow_run(one_and_two_processes):
    work, _, runs = one_and_two_processes
    client = MlflowClient(f"sqlite:///{work / 'mlflow.db'}")
    for processes in (1, 2):
        out = finished_ok(runs[processes])
        experiment = client.get_experiment_by_name(f"p{processes}")
        assert experiment is not None
        found = client.search_runs([experiment.experiment_id])
        assert len(found) == 1, f"{len(found)} MLflow runs for {processes} process(es)"
        run = found[0]
        assert run.info.status == "FINISHED"
        manifest = json.loads((out / "adapter" / "tuneloop.json").read_text())
        assert manifest["mlflow_run_id"] == run.info.run_id
        assert run.data.params["train.processes"] == str(processes)
        assert run.data.tags["tuneloop.processes"] == str(processes)
        assert run.data.tags["tuneloop.ddp_backend"] == ("gloo" if processes == 2 else "none")
        assert run.data.metrics["train/processes"] == processes
    # Every experiment of the store is one of the two: rank 1 created none of its own.
    assert sorted(e.name for e in client.search_experiments()) == ["Default", "p1", "p2"]


@pytest.mark.slow
def test_two_processes_learn_what_one_learns(one_and_two_processes):
    _, prepared, runs = one_and_two_processes
    val = pd.read_parquet(prepared / "val.parquet")
    metrics, histories = {}, {}
    for processes in (1, 2):
        out = finished_ok(runs[processes])
        metrics[processes] = json.loads((out / "metrics.json").read_text())
        histories[processes] = pd.read_csv(out / "history.csv")
        classifier = IntentClassifier.load(out / "adapter", device="cpu")
        predicted = [p["label"] for p in classifier.predict(val["text"].tolist())]
        accuracy = sum(p == t for p, t in zip(predicted, val["label"], strict=True)) / len(val)
        # The saved adapter is the best epoch's: reloaded, it scores what the stage recorded for it.
        assert accuracy == pytest.approx(metrics[processes]["train/best_val_accuracy"], abs=1e-9)
    assert metrics[1]["train/best_val_accuracy"] >= 0.9, "1 process did not learn: nothing to compare"
    for key in ("train/best_val_accuracy", "train/best_val_macro_f1"):
        assert metrics[2][key] == pytest.approx(metrics[1][key], abs=METRIC_TOLERANCE), key
    for column in ("train_loss", "val_loss"):
        np.testing.assert_allclose(histories[2][column], histories[1][column], rtol=LOSS_TOLERANCE)


@pytest.mark.slow
def test_one_failing_rank_fails_the_stage(tmp_path, monkeypatch, caplog):
    """Rank 1 dies while rank 0 would wait for ever: torchrun ends both and the stage reports it."""
    script = tmp_path / "ranks.py"
    script.write_text(
        "import os, sys, time\nif os.environ['RANK'] == '1':\n    sys.exit(3)\ntime.sleep(300)\n"
    )
    real_command = train_stage.launch_command

    def ranks_script(python: str, processes: int, port: int, stage_args) -> list[str]:
        command = real_command(python, processes, port, stage_args)
        return [*command[: command.index("pipelines.train") - 1], str(script)]

    monkeypatch.setattr(train_stage, "launch_command", ranks_script)
    params = settings("train", processes=2, batch_size=8, device="cpu")
    started = time.monotonic()
    with caplog.at_level(logging.ERROR, logger="pipelines.train"):
        status = train_stage.launch_and_wait(params, select_device("cpu"), [])
    assert status != 0
    assert time.monotonic() - started < 120
    assert "the 2 training processes failed" in caplog.text


@pytest.mark.gpu
@pytest.mark.slow
@pytest.mark.skipif(torch.cuda.device_count() < 2, reason="needs 2 CUDA devices")
def test_two_gpu_processes_learn_what_one_learns(tiny_base_without_dropout, tmp_path):
    prepared = write_prepared(tmp_path / "prepared")
    metrics = {}
    for processes in (1, 2):
        params = write_params(
            tmp_path / f"params-{processes}.yaml", tiny_base_without_dropout, processes, device="cuda"
        )
        out = finished_ok(run_stage(tmp_path, params, prepared, f"gpu{processes}"))
        metrics[processes] = json.loads((out / "metrics.json").read_text())
    assert metrics[2]["train/processes"] == 2
    client = MlflowClient(f"sqlite:///{tmp_path / 'mlflow.db'}")
    experiment = client.get_experiment_by_name("gpu2")
    assert experiment is not None
    (run,) = client.search_runs([experiment.experiment_id])
    assert run.data.tags["tuneloop.ddp_backend"] == "nccl"
    # bf16 autocast on GPUs rounds far more coarsely than float32 on CPU: metrics only, same tolerance.
    for key in ("train/best_val_accuracy", "train/best_val_macro_f1"):
        assert metrics[2][key] == pytest.approx(metrics[1][key], abs=METRIC_TOLERANCE), key
