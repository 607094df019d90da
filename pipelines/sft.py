"""Supervised fine-tuning of a causal LM with LoRA on (message, target) pairs: the generation task's
training step.

Each example is the prompt (`serving.generation.build_prompt`: the chat template when the tokenizer
has one) followed by the target and end-of-sequence; the loss is on the target tokens only, so the
model learns to answer, not to repeat messages. ``train.quantization: 4bit`` trains QLoRA on CUDA.
Writes the adapter, tokenizer and a manifest (``task: generation``) that `serving.generation` loads.
"""

from __future__ import annotations

import time
from pathlib import Path

import pandas as pd
import torch
from peft import TaskType, get_peft_model, prepare_model_for_kbit_training
from transformers import (
    AutoTokenizer,
    DataCollatorForSeq2Seq,
    EarlyStoppingCallback,
    PrinterCallback,
    Trainer,
    set_seed,
)

from pipelines.train import (
    EpochLogger,
    TrainingRefused,
    TrainResult,
    _checkpoint_dir,
    _EpochRecorder,
    join_processes,
    lora_config,
    per_process_batch,
    save_adapter,
    trained_adapter,
    training_arguments,
)
from serving.generation import GENERATION_TASK, build_prompt, load_base_generator, prompt_token_ids
from serving.inference import MANIFEST_FILE, resolve_base_model, select_device, with_pad_token
from tuneloop.config import GenerationParams, ModelParams, TrainParams

# Positions the loss ignores (the prompt, the padding): the label value PyTorch's cross-entropy skips.
IGNORED = -100


class PromptTargetPairs(torch.utils.data.Dataset):
    """Prompt + target token ids, with labels that mask the prompt; padding is the collator's."""

    def __init__(self, messages: list[str], targets: list[str], tokenizer, generation: GenerationParams):
        self.examples = []
        for message, target in zip(messages, targets, strict=True):
            prompt = prompt_token_ids(
                tokenizer,
                build_prompt(tokenizer, generation.system_prompt, message),
                generation.max_input_tokens,
            )
            answer = tokenizer(target, add_special_tokens=False)["input_ids"][: generation.max_target_tokens]
            answer = [*answer, tokenizer.eos_token_id]
            self.examples.append(
                {
                    "input_ids": prompt + answer,
                    "attention_mask": [1] * (len(prompt) + len(answer)),
                    "labels": [IGNORED] * len(prompt) + answer,
                }
            )

    def __len__(self) -> int:
        return len(self.examples)

    def __getitem__(self, index: int) -> dict:
        return self.examples[index]

    @property
    def target_tokens(self) -> int:
        return sum(sum(label != IGNORED for label in example["labels"]) for example in self.examples)


def check_sequence_length(config, generation: GenerationParams) -> None:
    """Refuse, before training, prompts plus answers longer than the model has positions for."""
    positions = getattr(config, "max_position_embeddings", None) or getattr(config, "n_positions", None)
    longest = generation.max_input_tokens + max(generation.max_target_tokens, generation.max_new_tokens) + 1
    if positions and longest > positions:
        raise TrainingRefused(
            f"generation.max_input_tokens + max_target_tokens/max_new_tokens + 1 = {longest} tokens, but the "
            f"base model has {positions} positions: lower them in params.yaml"
        )


def train_generator(
    train_frame: pd.DataFrame,
    val_frame: pd.DataFrame,
    model: ModelParams,
    params: TrainParams,
    generation: GenerationParams,
    out_dir: Path,
    on_epoch: EpochLogger | None = None,
) -> TrainResult:
    """Fine-tune the causal LM ``model.base`` with LoRA; keep the epoch with the lowest validation loss."""
    started = time.perf_counter()
    set_seed(params.seed)
    device = select_device(params.device)
    ranks = join_processes(device)
    batch_per_process = per_process_batch(params.batch_size, ranks.world_size)
    if params.max_train_examples:
        train_frame = train_frame.sample(
            n=min(params.max_train_examples, len(train_frame)), random_state=params.seed
        )
    tokenizer = with_pad_token(AutoTokenizer.from_pretrained(resolve_base_model(model.base)))
    base = load_base_generator(model.base, params.quantization, device)
    base.config.pad_token_id = tokenizer.pad_token_id
    check_sequence_length(base.config, generation)
    if params.quantization == "4bit":
        base = prepare_model_for_kbit_training(
            base,
            use_gradient_checkpointing=params.gradient_checkpointing,
            gradient_checkpointing_kwargs={"use_reentrant": False},
        )
    peft_model = get_peft_model(base, lora_config(params, base, TaskType.CAUSAL_LM))
    trainable, total = peft_model.get_nb_trainable_parameters()

    def pairs(frame: pd.DataFrame) -> PromptTargetPairs:
        return PromptTargetPairs(
            frame[generation.input_column].astype(str).tolist(),
            frame[generation.target_column].astype(str).tolist(),
            tokenizer,
            generation,
        )

    train_data, val_data = pairs(train_frame), pairs(val_frame)
    recorder = _EpochRecorder(on_epoch)
    with _checkpoint_dir(ranks) as checkpoints:
        arguments = training_arguments(
            params,
            device,
            ranks,
            checkpoints,
            batch_per_process,
            best_metric="eval_loss",
            greater_is_better=False,
        )
        trainer = Trainer(
            model=peft_model,
            args=arguments,
            train_dataset=train_data,
            eval_dataset=val_data,
            # Pads input ids with the pad token and labels with IGNORED, so padding is never learned.
            data_collator=DataCollatorForSeq2Seq(tokenizer, label_pad_token_id=IGNORED, padding=True),
            processing_class=tokenizer,
            callbacks=[
                recorder,
                EarlyStoppingCallback(early_stopping_patience=params.early_stopping_patience),
            ],
        )
        # As in `train`: off a terminal the recorder's line per epoch replaces the printed log dicts.
        trainer.remove_callback(PrinterCallback)
        output = trainer.train()
        best_epoch = next(
            (row["epoch"] for row in recorder.history if row["val_loss"] == trainer.state.best_metric), None
        )
        trained = trained_adapter(trainer)
        if ranks.is_main:
            save_adapter(
                trained,
                tokenizer,
                out_dir,
                {
                    MANIFEST_FILE: {
                        "task": GENERATION_TASK,
                        "base_model": model.base,
                        "system_prompt": generation.system_prompt,
                        "max_input_tokens": generation.max_input_tokens,
                        "max_new_tokens": generation.max_new_tokens,
                    }
                },
            )
    return TrainResult(
        history=recorder.history,
        best_epoch=best_epoch,
        train_examples=len(train_data),
        epochs_run=float(output.metrics.get("epoch", params.epochs)),
        loop_seconds=recorder.loop_seconds,
        total_seconds=time.perf_counter() - started,
        device=device.name,
        trainable_parameters=int(trainable),
        total_parameters=int(total),
        processes=ranks.world_size,
        ddp_backend=ranks.backend,
        extra={"train_target_tokens": train_data.target_tokens},
    )
