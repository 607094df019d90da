"""Decoder LLMs as classifiers: tiny Llama, Qwen2 and GPT-2 models built from configs, LoRA-tuned
through the same `train` step as the encoder, reloaded the way evaluation and serving load them."""

from __future__ import annotations

from pathlib import Path
from types import SimpleNamespace

import pytest
from peft import get_peft_model
from safetensors import safe_open
from transformers import AutoTokenizer

from pipelines.train import lora_config, train
from serving.inference import IntentClassifier
from tests.support import DECODER_ARCHITECTURES, TWO_LABELS, build_tiny_decoder, settings, two_label_slice
from tuneloop.config import ModelParams

pytestmark = pytest.mark.slow

OVERFIT = {
    "epochs": 8,
    "learning_rate": 0.01,
    "batch_size": 8,
    "lora_rank": 8,
    "warmup_fraction": 0.0,
    "early_stopping_patience": 8,
    "max_length": 32,
    "device": "cpu",
    "target_modules": "auto",
}


@pytest.fixture(scope="module", params=DECODER_ARCHITECTURES)
def decoder(request, tmp_path_factory) -> tuple[str, Path]:
    return request.param, build_tiny_decoder(tmp_path_factory.mktemp(f"tiny-{request.param}"), request.param)


def test_a_decoder_learns_two_intents_and_reloads_with_its_head_and_pad_token(decoder, tmp_path):
    architecture, base = decoder
    frame = two_label_slice()
    result = train(
        frame, frame, TWO_LABELS, ModelParams(base=str(base)), settings("train", **OVERFIT), tmp_path
    )

    assert result.history[-1]["val_accuracy"] == 1.0, result.history
    # The score head is new: it is saved with the adapter, or the reloaded model would classify at random.
    with safe_open(str(tmp_path / "adapter_model.safetensors"), "pt") as weights:
        names = list(weights.keys())
    assert any(".score." in name for name in names), names
    assert any("lora_A" in name for name in names), names
    # GPT-2 and Llama tokenizers have no pad token: the saved one pads with end-of-sequence.
    tokenizer = AutoTokenizer.from_pretrained(str(tmp_path))
    assert tokenizer.pad_token is not None
    if AutoTokenizer.from_pretrained(str(base)).pad_token is None:
        assert tokenizer.pad_token == tokenizer.eos_token

    reloaded = IntentClassifier.load(tmp_path, device="cpu")
    predicted = [row["label"] for row in reloaded.predict(frame["text"].tolist(), batch_size=5)]
    assert predicted == frame["label"].tolist(), f"{architecture}: the reloaded adapter lost what it learned"


def test_auto_target_modules_follow_the_architecture(decoder):
    architecture, base = decoder
    from transformers import AutoModelForSequenceClassification

    model = AutoModelForSequenceClassification.from_pretrained(str(base), num_labels=2, pad_token_id=1)
    adapted = get_peft_model(model, lora_config(settings("train", target_modules="auto"), model))
    targets = set(adapted.peft_config["default"].target_modules)
    assert (
        targets
        == {"llama": {"q_proj", "v_proj"}, "qwen2": {"q_proj", "v_proj"}, "gpt2": {"c_attn"}}[architecture]
    )
    assert lora_config(settings("train", target_modules="all-linear"), model).target_modules == "all-linear"


def test_auto_target_modules_name_the_fix_for_an_unknown_architecture():
    model = SimpleNamespace(config=SimpleNamespace(model_type="my-new-llm"))
    with pytest.raises(ValueError, match=r"no default modules for model type 'my-new-llm'.*all-linear"):
        lora_config(settings("train", target_modules="auto"), model)  # type: ignore[arg-type]


def test_gradient_checkpointing_recomputes_layers_and_trains_the_same_model(tmp_path, monkeypatch):
    """With it on, each decoder layer runs under torch's checkpoint; the gradients, so the losses, stay."""
    import transformers.modeling_utils

    calls = []
    checkpoint = transformers.modeling_utils.checkpoint  # what gradient_checkpointing_enable wraps

    def counted(*args, **kwargs):
        calls.append(1)
        return checkpoint(*args, **kwargs)

    monkeypatch.setattr(transformers.modeling_utils, "checkpoint", counted)
    base = build_tiny_decoder(tmp_path / "base", "llama")
    frame = two_label_slice()
    runs, recomputed_layers = {}, {}
    for checkpointing in (False, True):
        calls.clear()
        params = settings(
            "train", **{**OVERFIT, "epochs": 2, "lora_dropout": 0.0}, gradient_checkpointing=checkpointing
        )
        out = tmp_path / f"adapter-{checkpointing}"
        runs[checkpointing] = train(
            frame, frame, TWO_LABELS, ModelParams(base=str(base)), params, out
        ).history
        recomputed_layers[checkpointing] = len(calls)
    steps = 2 * -(-len(frame) // OVERFIT["batch_size"])
    assert recomputed_layers == {False: 0, True: 2 * steps}  # two layers, every training step
    for plain, recomputed in zip(runs[False], runs[True], strict=True):
        assert recomputed["train_loss"] == pytest.approx(plain["train_loss"], rel=1e-4)
        assert recomputed["val_loss"] == pytest.approx(plain["val_loss"], rel=1e-4)
