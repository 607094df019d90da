"""Inference for a LoRA-fine-tuned causal LM: prompts built the way training built them, greedy
decoding in left-padded batches. Training, evaluation and the generation pyfunc share this module;
it never imports training code.
"""

from __future__ import annotations

import importlib.util
import json
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch
from jinja2 import TemplateError
from peft import PeftModel
from tqdm.auto import tqdm
from transformers import AutoModelForCausalLM, AutoTokenizer, PreTrainedModel

from serving.inference import (
    MANIFEST_FILE,
    DeviceChoice,
    batched,
    resolve_base_model,
    select_device,
    with_pad_token,
)

GENERATION_TASK = "generation"


def build_prompt(tokenizer, system_prompt: str, message: str) -> str:
    """The text the model continues: the tokenizer's chat template when it has one, else a plain frame.

    Instruction-tuned bases (Llama-3-Instruct, Qwen2-Instruct…) were trained on their chat template,
    so a fine-tune that keeps it starts from what the base already does; a base without one gets a
    short, fixed frame that ends where the answer starts.
    """
    if tokenizer.chat_template:
        try:
            return tokenizer.apply_chat_template(
                [{"role": "system", "content": system_prompt}, {"role": "user", "content": message}],
                tokenize=False,
                add_generation_prompt=True,
            )
        except TemplateError:
            # Some templates (Mistral's, Gemma's) refuse a system turn: the instructions open the user turn.
            return tokenizer.apply_chat_template(
                [{"role": "user", "content": f"{system_prompt}\n\n{message}"}],
                tokenize=False,
                add_generation_prompt=True,
            )
    return f"{system_prompt}\n\n### Message\n{message}\n\n### JSON\n"


def prompt_token_ids(tokenizer, prompt: str, max_input_tokens: int) -> list[int]:
    """The prompt's ids, cut to ``max_input_tokens`` from the left so that its end (where the answer
    starts) survives; a chat template already holds its special tokens, a plain frame gets BOS."""
    ids = tokenizer(prompt, add_special_tokens=False)["input_ids"]
    if not tokenizer.chat_template and tokenizer.bos_token_id is not None:
        ids = [tokenizer.bos_token_id, *ids]
    return ids[-max_input_tokens:]


def load_base_generator(
    base: str, quantization: str = "none", device: DeviceChoice | None = None
) -> PreTrainedModel:
    """The base causal LM; with ``quantization="4bit"`` its weights in NF4 on the GPU (QLoRA)."""
    if quantization == "4bit":
        if device is None or device.device.type != "cuda":
            raise ValueError(
                "train.quantization: 4bit (QLoRA with bitsandbytes) needs a CUDA GPU; on CPU set "
                "train.quantization: none"
            )
        if importlib.util.find_spec("bitsandbytes") is None:
            raise ValueError("train.quantization: 4bit needs bitsandbytes: pip install 'tuneloop[gpu]'")
        from transformers import BitsAndBytesConfig

        return AutoModelForCausalLM.from_pretrained(
            resolve_base_model(base),
            quantization_config=BitsAndBytesConfig(
                load_in_4bit=True,
                bnb_4bit_quant_type="nf4",
                bnb_4bit_use_double_quant=True,
                bnb_4bit_compute_dtype=torch.bfloat16,
            ),
            dtype=torch.bfloat16,
        )
    if quantization != "none":
        raise ValueError(f"train.quantization is 'none' or '4bit', not {quantization!r}")
    return AutoModelForCausalLM.from_pretrained(resolve_base_model(base))


def read_generation_manifest(folder: Path) -> dict:
    manifest = json.loads((folder / MANIFEST_FILE).read_text(encoding="utf-8"))
    if manifest.get("task") != GENERATION_TASK:
        raise ValueError(f"{folder} holds a {manifest.get('task', 'classification')} adapter")
    return manifest


def merge_adapter(adapter_dir: Path, out_dir: Path, base: str | None = None) -> Path:
    """The adapter folded into its base, saved with the tokenizer and generation settings: a whole model
    that loads with transformers alone, without peft or the base's location."""
    manifest = read_generation_manifest(adapter_dir)
    base_model = load_base_generator(base or manifest["base_model"])
    merged = PeftModel.from_pretrained(base_model, str(adapter_dir)).merge_and_unload()
    out_dir.mkdir(parents=True, exist_ok=True)
    merged.save_pretrained(str(out_dir))
    AutoTokenizer.from_pretrained(str(adapter_dir)).save_pretrained(str(out_dir))
    (out_dir / MANIFEST_FILE).write_text(json.dumps({**manifest, "merged": True}, indent=2), encoding="utf-8")
    return out_dir


@dataclass(frozen=True)
class Generation:
    text: str
    prompt_tokens: int
    new_tokens: int


class TextGenerator:
    """A merged (adapter folded into the base) causal LM answering messages with greedy decoding."""

    def __init__(
        self,
        model: PreTrainedModel,
        tokenizer,
        system_prompt: str,
        max_input_tokens: int,
        max_new_tokens: int,
        device: DeviceChoice,
    ):
        self.model = model.to(device.device).eval()  # type: ignore[arg-type]
        # Left padding: every row's prompt ends at the same position, where generation continues.
        tokenizer.padding_side = "left"
        self.tokenizer = tokenizer
        self.system_prompt = system_prompt
        self.max_input_tokens = max_input_tokens
        self.max_new_tokens = max_new_tokens
        self.device = device

    @classmethod
    def load(cls, adapter_dir: str | Path, base: str | None = None, device: str = "auto") -> TextGenerator:
        """Load a folder written by `pipelines.sft` (adapter) or :func:`merge_adapter` (merged model);
        ``base`` overrides the adapter's recorded base."""
        adapter_dir = Path(adapter_dir)
        manifest = read_generation_manifest(adapter_dir)
        tokenizer = with_pad_token(AutoTokenizer.from_pretrained(str(adapter_dir)))
        if manifest.get("merged"):
            merged = AutoModelForCausalLM.from_pretrained(str(adapter_dir))
        else:
            base_model = load_base_generator(base or manifest["base_model"])
            merged = PeftModel.from_pretrained(base_model, str(adapter_dir)).merge_and_unload()
        return cls(
            merged,
            tokenizer,
            manifest["system_prompt"],
            manifest["max_input_tokens"],
            manifest["max_new_tokens"],
            select_device(device),
        )

    def prompt_ids(self, message: str) -> list[int]:
        return prompt_token_ids(
            self.tokenizer, build_prompt(self.tokenizer, self.system_prompt, message), self.max_input_tokens
        )

    @torch.inference_mode()
    def generate(
        self,
        messages: Sequence[str],
        max_new_tokens: int | None = None,
        batch_size: int = 16,
        progress: bool = False,
    ) -> list[Generation]:
        """One greedy answer per message, in input order; batches of similar prompt length pad little."""
        limit = min(max_new_tokens or self.max_new_tokens, self.max_new_tokens)
        prompts = [self.prompt_ids(message) for message in messages]
        order = np.argsort([len(ids) for ids in prompts], kind="stable")
        results: list[Generation | None] = [None] * len(messages)
        for indices in tqdm(
            list(batched(order, batch_size)), desc="generate", unit="batch", disable=not progress
        ):
            batch = self.tokenizer.pad(
                {"input_ids": [prompts[i] for i in indices]}, padding=True, return_tensors="pt"
            ).to(self.device.device)
            with torch.autocast(self.device.device.type, dtype=torch.bfloat16, enabled=self.device.bf16):
                output = self.model.generate(
                    **batch,
                    max_new_tokens=limit,
                    do_sample=False,
                    pad_token_id=self.tokenizer.pad_token_id,
                    eos_token_id=self.tokenizer.eos_token_id,
                )
            new = output[:, batch["input_ids"].shape[1] :]
            for row, index in enumerate(indices):
                ids = new[row].tolist()
                if self.tokenizer.eos_token_id in ids:
                    ids = ids[: ids.index(self.tokenizer.eos_token_id)]
                ids = [token for token in ids if token != self.tokenizer.pad_token_id]
                results[index] = Generation(
                    text=self.tokenizer.decode(ids, skip_special_tokens=True),
                    prompt_tokens=len(prompts[index]),
                    new_tokens=len(ids),
                )
        return [result for result in results if result is not None]
