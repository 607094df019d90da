"""Supervised fine-tuning of tiny decoders (Llama, Qwen2 with a chat template, GPT-2) on message ->
JSON pairs from the sample: the loss is on the answer only, and a handful of pairs is learnt exactly."""

from __future__ import annotations

import json
from types import SimpleNamespace

import pytest
from transformers import AutoTokenizer

from pipelines.sft import IGNORED, PromptTargetPairs, check_sequence_length, train_generator
from serving.generation import TextGenerator, build_prompt, load_base_generator
from serving.inference import DeviceChoice, with_pad_token
from tests.support import MEMORISE_PAIRS, build_tiny_decoder, memorised_pairs, settings
from tuneloop.config import ModelParams

GENERATION = settings("generation")
HANDFUL = memorised_pairs()


@pytest.fixture(scope="module")
def qwen2_tokenizer(tmp_path_factory):
    base = build_tiny_decoder(tmp_path_factory.mktemp("tiny-qwen2"), "qwen2")
    return with_pad_token(AutoTokenizer.from_pretrained(str(base)))


def test_the_loss_is_on_the_answer_and_its_end_only(qwen2_tokenizer):
    message, target = HANDFUL.iloc[0]["message"], HANDFUL.iloc[0]["target"]
    example = PromptTargetPairs([message], [target], qwen2_tokenizer, GENERATION)[0]

    prompt = build_prompt(qwen2_tokenizer, GENERATION.system_prompt, message)
    assert prompt.startswith("<|im_start|>system\n") and prompt.endswith("<|im_start|>assistant\n")
    learnt = [token for token in example["labels"] if token != IGNORED]
    assert learnt[-1] == qwen2_tokenizer.eos_token_id
    assert qwen2_tokenizer.decode(learnt[:-1]) == target
    answer_start = len(example["labels"]) - len(learnt)
    assert example["labels"][:answer_start] == [IGNORED] * answer_start
    assert example["input_ids"][answer_start:] == learnt


def assert_learnt_exactly(adapter) -> None:
    generator = TextGenerator.load(adapter, device="cpu")
    answers = generator.generate(HANDFUL["message"].tolist(), batch_size=4)
    assert [answer.text for answer in answers] == HANDFUL["target"].tolist()
    assert all(json.loads(answer.text)["reply"] for answer in answers)
    assert all(answer.new_tokens > 10 and answer.prompt_tokens > 10 for answer in answers)


@pytest.mark.slow
def test_a_handful_of_pairs_is_learnt_to_exact_match_by_llama(tiny_generator):
    """The session's tiny Llama generator (tests/conftest.py), trained with MEMORISE_PAIRS."""
    assert_learnt_exactly(tiny_generator)


@pytest.mark.slow
@pytest.mark.parametrize("architecture", ["qwen2", "gpt2"])
def test_a_handful_of_pairs_is_learnt_to_exact_match(architecture, tmp_path):
    base = build_tiny_decoder(tmp_path / "base", architecture)
    params = settings("train", **MEMORISE_PAIRS)
    result = train_generator(
        HANDFUL, HANDFUL, ModelParams(base=str(base)), params, GENERATION, tmp_path / "a"
    )

    assert result.history[-1]["val_loss"] < result.history[0]["val_loss"]
    assert_learnt_exactly(tmp_path / "a")


def test_a_template_without_a_system_turn_gets_the_instructions_in_the_user_turn(qwen2_tokenizer):
    """Mistral's and Gemma's templates raise on a system message, as this one does."""
    strict = qwen2_tokenizer.__class__.from_pretrained(qwen2_tokenizer.name_or_path)
    strict.chat_template = (
        "{% for message in messages %}{% if message['role'] == 'system' %}"
        "{{ raise_exception('Conversation roles must alternate user/assistant') }}{% endif %}"
        "[INST] {{ message['content'] }} [/INST]{% endfor %}"
    )
    prompt = build_prompt(strict, GENERATION.system_prompt, "where is NW-1?")
    assert prompt == f"[INST] {GENERATION.system_prompt}\n\nwhere is NW-1? [/INST]"


def test_qlora_is_refused_on_cpu_with_what_to_change():
    with pytest.raises(ValueError, match=r"4bit \(QLoRA.*needs a CUDA GPU.*quantization: none"):
        load_base_generator(
            "unused", "4bit", DeviceChoice(device=__import__("torch").device("cpu"), bf16=False)
        )


def test_prompts_longer_than_the_model_are_refused_before_training():
    with pytest.raises(ValueError, match=r"417 tokens, but the base model has 256 positions"):
        check_sequence_length(SimpleNamespace(max_position_embeddings=256), GENERATION)
    check_sequence_length(SimpleNamespace(n_positions=1024), GENERATION)


def test_a_classifier_adapter_is_not_loaded_as_a_generator(tiny_adapter):
    with pytest.raises(ValueError, match="holds a classification adapter"):
        TextGenerator.load(tiny_adapter, device="cpu")
