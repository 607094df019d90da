"""On a CUDA machine: bf16 LoRA and QLoRA (4-bit) supervised fine-tuning of the same decoder, built from a
config, with their peak GPU memory and tokens/s written to ``$TUNELOOP_GPU_RESULTS`` (JSON) when set.
Skipped where there is no CUDA device (or, for QLoRA, no bitsandbytes)."""

from __future__ import annotations

import importlib.util
import json
import os
from pathlib import Path

import pytest
import torch

from pipelines.sft import train_generator
from serving.generation import TextGenerator
from tests.support import MEMORISE_PAIRS, memorised_pairs, settings
from tuneloop.config import ModelParams

pytestmark = [
    pytest.mark.gpu,
    pytest.mark.slow,
    pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA device"),
]

# About 1.1 B parameters: Llama-shaped, large enough that 4-bit weights visibly save memory.
LARGE_LLAMA = {
    "hidden_size": 2048,
    "intermediate_size": 5632,
    "num_hidden_layers": 22,
    "num_attention_heads": 32,
}


@pytest.fixture(scope="module")
def large_llama(tmp_path_factory) -> Path:
    from tests.support import build_tiny_decoder

    return build_tiny_decoder(tmp_path_factory.mktemp("llama-1b"), "llama", shape=LARGE_LLAMA)


def fine_tune(base: Path, out: Path, quantization: str) -> dict:
    pairs = memorised_pairs()
    params = settings(
        "train",
        **{**MEMORISE_PAIRS, "epochs": 3, "device": "cuda", "learning_rate": 2e-4},
        quantization=quantization,
        gradient_checkpointing=True,
    )
    torch.cuda.empty_cache()
    torch.cuda.reset_peak_memory_stats()
    result = train_generator(pairs, pairs, ModelParams(base=str(base)), params, settings("generation"), out)
    return {
        "quantization": quantization,
        "peak_memory_gb": round(torch.cuda.max_memory_allocated() / 1e9, 3),
        "target_tokens_per_second": round(
            result.extra["train_target_tokens"] * result.epochs_run / max(result.loop_seconds, 1e-9), 1
        ),
        "loop_seconds": round(result.loop_seconds, 2),
        "device": result.device,
        "trainable_parameters": result.trainable_parameters,
        "total_parameters": result.total_parameters,
    }


def test_bf16_lora_and_qlora_train_and_generate_and_qlora_needs_less_memory(large_llama, tmp_path):
    runs = [fine_tune(large_llama, tmp_path / "bf16", "none")]
    assert "bf16" in runs[0]["device"]
    answers = TextGenerator.load(tmp_path / "bf16", device="cuda").generate(
        ["where is NW-1?"], max_new_tokens=8
    )
    assert answers[0].new_tokens <= 8
    if importlib.util.find_spec("bitsandbytes") is not None:
        runs.append(fine_tune(large_llama, tmp_path / "qlora", "4bit"))
        assert runs[1]["peak_memory_gb"] < runs[0]["peak_memory_gb"]
    results = os.environ.get("TUNELOOP_GPU_RESULTS")
    if results:
        Path(results).write_text(json.dumps({"model": LARGE_LLAMA, "runs": runs}, indent=2))
    print(json.dumps(runs, indent=2))
