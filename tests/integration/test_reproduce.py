"""`tuneloop reproduce` end to end: train and register a tiny model from a clean commit, rebuild it in a
scratch worktree, and compare metrics, data and adapter bytes; refusals for versions that cannot be
rebuilt. Real git, DVC, MLflow (SQLite) and training, in a throwaway copy of the repo (slow). The
verdict on adapters that differ is checked on small folders written here (fast).
"""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch
from mlflow.tracking import MlflowClient
from safetensors.torch import save_file

from registry.register import HEADLINE_METRICS
from registry.reproduce import MetricRow, ReproductionReport, compare_adapters
from tests.support import git, make_project, run_cli
from tuneloop.config import Environment, load_params


def _commit_all(project: Path, message: str) -> None:
    git(project, "-c", "user.name=t", "-c", "user.email=t@t", "add", "-A")
    git(project, "-c", "user.name=t", "-c", "user.email=t@t", "commit", "-qm", message)


def _worktrees(project: Path) -> list[str]:
    listing = git(project, "worktree", "list", "--porcelain")
    return [line for line in listing.splitlines() if line.startswith("worktree ")]


def _run_count(client: MlflowClient) -> int:
    experiments = [e.experiment_id for e in client.search_experiments()]
    return len(client.search_runs(experiments, max_results=1000))


@pytest.fixture(scope="module")
def registered(tmp_path_factory, tiny_base):
    """A project whose trained adapter is version 1, registered from a clean, committed tree."""
    root = tmp_path_factory.mktemp("reproduce")
    with pytest.MonkeyPatch.context() as patch:
        patch.setenv("TUNELOOP_HOME", str(root / "home"))
        patch.setenv("TUNELOOP_DVC_REMOTE", str(root / "remote"))
        patch.setenv("DVC_NO_ANALYTICS", "1")
        patch.delenv("MLFLOW_TRACKING_URI", raising=False)
        project = make_project(root / "project", tiny_base)
        run = run_cli("tuneloop", "run", "--skip-init", cwd=project)
        assert run.returncode == 0, run.stdout[-3000:] + run.stderr[-3000:]
        _commit_all(project, "pipeline outputs")
        register = run_cli("tuneloop", "register", cwd=project)
        assert register.returncode == 0, register.stdout[-3000:] + register.stderr[-3000:]
        assert "v1 (new)" in register.stdout
        env = Environment.from_env(project)
        yield project, MlflowClient(env.tracking_uri, env.tracking_uri)


@pytest.mark.slow
def test_a_registered_version_is_rebuilt_bit_for_bit_without_touching_the_real_store(registered):
    project, client = registered
    runs_before = _run_count(client)

    result = run_cli("tuneloop", "reproduce", "--version", "1", cwd=project)
    output = result.stdout
    assert result.returncode == 0, output + result.stderr[-3000:]
    assert "Verdict: REPRODUCED" in output
    # A classifier's headline metrics, each compared; a generator's are not listed for it.
    for metric in HEADLINE_METRICS:
        rows = [line for line in output.splitlines() if line.strip().startswith(metric + " ")]
        if metric.startswith("generation/") or "field" in metric:
            assert rows == [], rows
            continue
        assert len(rows) == 1 and rows[0].rstrip().endswith("yes"), rows
    assert "Data md5:" in output and ": match" in output
    # Training on CPU with a fixed seed is deterministic on one machine: the weights are the same bits.
    assert "adapter_model.safetensors: equal" in output
    assert "Adapter bytes" in output
    assert "tuneloop.json: not compared" in output
    assert "Scratch worktree removed" in output

    # The scratch run logged into its own store: the real one has no new run and no new version.
    assert _run_count(client) == runs_before
    name = load_params(project / "params.yaml").registry.model_name
    assert [str(v.version) for v in client.search_model_versions(f"name = '{name}'")] == ["1"]
    assert len(_worktrees(project)) == 1
    assert git(project, "status", "--porcelain", "--untracked-files=no") == ""


@pytest.mark.slow
def test_versions_that_cannot_be_rebuilt_are_refused_with_the_reason(registered):
    project, client = registered
    name = load_params(project / "params.yaml").registry.model_name
    original = client.get_model_version(name, "1")
    commit = original.tags["tuneloop.git_commit"]

    unknown = run_cli("tuneloop", "reproduce", "--version", "99", cwd=project)
    assert unknown.returncode == 1
    assert "NOT REPRODUCED" in unknown.stdout and "has no version 99" in unknown.stdout

    missing_alias = run_cli("tuneloop", "reproduce", "--alias", "prod", cwd=project)
    assert missing_alias.returncode == 1 and "has no alias 'prod'" in missing_alias.stdout

    for bad_commit, reason in [
        (f"{commit}-dirty", "uncommitted changes"),
        ("0" * 40, "unknown to the git repository"),
        ("unknown", "has no git commit"),
    ]:
        copy = client.create_model_version(
            name,
            # The storage location, not `models:/m-...`: that form is resolved through MLflow's global URI.
            source=client.get_model_version_download_uri(name, "1"),
            run_id=original.run_id,
            tags={**original.tags, "tuneloop.git_commit": bad_commit},
        )
        refused = run_cli("tuneloop", "reproduce", "--version", str(copy.version), cwd=project)
        assert refused.returncode == 1, refused.stdout + refused.stderr[-2000:]
        assert "refused:" in refused.stdout and reason in refused.stdout, refused.stdout
    assert len(_worktrees(project)) == 1


def _adapter(folder: Path, weights: dict, target_modules: list[str], labels: str, run_id: str) -> Path:
    folder.mkdir(parents=True)
    save_file(weights, str(folder / "adapter_model.safetensors"))
    (folder / "adapter_config.json").write_text(json.dumps({"r": 8, "target_modules": target_modules}))
    (folder / "labels.json").write_text(labels)
    (folder / "tuneloop.json").write_text(json.dumps({"max_length": 32, "mlflow_run_id": run_id}))
    return folder


def _report(files, note: str) -> ReproductionReport:
    report = ReproductionReport(
        "m", "1", "v1", tolerance=0.005, data_md5_registered="a", data_md5_reproduced="a"
    )
    report.metrics = [MetricRow("quality/accuracy", 0.9, 0.902, 0.005)]
    report.adapter_files, report.manifest_note = files, note
    return report


def test_weights_that_differ_are_measured_and_judged_by_the_metrics(tmp_path):
    weights = {"a": torch.ones(3, 2), "b": torch.zeros(4)}
    nudged = {"a": torch.ones(3, 2) + 1e-4, "b": torch.zeros(4)}
    registered = _adapter(tmp_path / "reg", weights, ["query", "value"], '["x", "y"]', "run-1")
    rebuilt = _adapter(tmp_path / "new", nudged, ["value", "query"], '["x", "y"]', "run-2")

    files, note = compare_adapters(registered, rebuilt)
    by_name = {item.path: item for item in files}
    assert set(by_name) == {"adapter_model.safetensors", "adapter_config.json", "labels.json"}
    weights_file = by_name["adapter_model.safetensors"]
    assert not weights_file.equal and weights_file.max_abs_diff == pytest.approx(1e-4, rel=1e-3)
    assert "1 of 2 tensors differ" in weights_file.note
    assert (
        by_name["adapter_config.json"].equivalent and "target_modules" in by_name["adapter_config.json"].note
    )
    assert "run-1" in note and "run-2" in note and "rest identical" in note

    report = _report(files, note)
    assert report.reproduced and not report.bit_equal and not report.weights_bit_equal
    assert "NOT bit-equal (max |diff| 0.0001" in report.summary()

    report.metrics = [MetricRow("quality/accuracy", 0.9, 0.91, 0.005)]
    assert not report.reproduced
    assert "quality/accuracy outside ±0.005" in report.summary()


def test_a_different_label_map_is_never_reproduced(tmp_path):
    weights = {"a": torch.ones(2)}
    registered = _adapter(tmp_path / "reg", weights, ["query"], '["x", "y"]', "run-1")
    rebuilt = _adapter(tmp_path / "new", weights, ["query"], '["y", "x"]', "run-2")
    report = _report(*compare_adapters(registered, rebuilt))
    assert report.weights_bit_equal and not report.reproduced
    assert "adapter file labels.json differs" in report.summary()
