"""Throughput of the `train` step against a bare torch + peft loop, in one run.

    python -m benchmarks.train_throughput --examples 1280 --repeats 2

Both sides use the same base model, LoRA config, data, batch size, max length and dynamic padding.
The step is measured by its training-loop time (its per-epoch validation is reported separately);
the bare loop has no validation. Runs alternate (bare, step, bare, step…) so drift in machine load
hits both; the JSON in ``benchmarks/results/train_throughput.json`` keeps every repeat.
"""

from __future__ import annotations

import argparse
import json
import logging
import platform
import statistics
import tempfile
import time
from pathlib import Path

import pandas as pd
import torch
from peft import get_peft_model
from torch.utils.data import DataLoader
from transformers import AutoTokenizer, DataCollatorWithPadding, get_scheduler, set_seed

from benchmarks.banking77 import DEFAULT_DATA_DIR
from pipelines.train import EncodedTexts, lora_config, to_ids, train
from serving.inference import load_base_classifier, resolve_base_model, select_device, with_pad_token
from tuneloop.config import load_params

log = logging.getLogger("benchmarks.train_throughput")


def load_examples(count: int, seed: int) -> tuple[pd.DataFrame, tuple[str, ...], str]:
    """banking77 from ../shared when present (the realistic case), else the repo's sample."""
    if (DEFAULT_DATA_DIR / "train.csv").exists():
        frame = pd.read_csv(DEFAULT_DATA_DIR / "train.csv").rename(columns={"category": "label"})
        labels = tuple(json.loads((DEFAULT_DATA_DIR / "categories.json").read_text()))
        source = "banking77 train"
    else:
        frame = pd.read_csv("data/sample/intents.csv").rename(columns={"intent": "label"})
        labels = tuple(load_params().data.labels)
        source = "tuneloop sample"
    return frame.sample(n=min(count, len(frame)), random_state=seed), labels, source


def bare_loop(frame: pd.DataFrame, labels: tuple[str, ...], base: str, params) -> float:
    """Plain torch + peft: the least a LoRA fine-tune has to do. Returns examples per second."""
    set_seed(params.seed)
    device = select_device(params.device)
    tokenizer = with_pad_token(AutoTokenizer.from_pretrained(resolve_base_model(base)))
    classifier = load_base_classifier(base, labels, tokenizer.pad_token_id)
    model = get_peft_model(classifier, lora_config(params, classifier)).to(device.device)
    data = EncodedTexts(frame["text"].tolist(), to_ids(frame["label"], labels), tokenizer, params.max_length)
    loader = DataLoader(
        data, batch_size=params.batch_size, shuffle=True, collate_fn=DataCollatorWithPadding(tokenizer)
    )
    optimizer = torch.optim.AdamW(
        model.parameters(), lr=params.learning_rate, weight_decay=params.weight_decay
    )
    scheduler = get_scheduler(
        params.lr_scheduler, optimizer, num_warmup_steps=0, num_training_steps=len(loader)
    )
    model.train()
    started = time.perf_counter()
    for batch in loader:
        batch = {k: v.to(device.device) for k, v in batch.items()}
        with torch.autocast(device.device.type, dtype=torch.bfloat16, enabled=device.bf16):
            loss = model(**batch).loss
        loss.backward()
        optimizer.step()
        scheduler.step()
        optimizer.zero_grad()
    if device.device.type == "cuda":
        torch.cuda.synchronize()
    return len(data) / (time.perf_counter() - started)


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("--examples", type=int, default=1280)
    parser.add_argument("--repeats", type=int, default=2)
    parser.add_argument("--params", type=Path, default=Path("params.yaml"))
    parser.add_argument("--out", type=Path, default=Path("benchmarks/results/train_throughput.json"))
    args = parser.parse_args(argv)
    logging.basicConfig(level=logging.INFO, format="%(levelname)s %(name)s: %(message)s")
    params = load_params(args.params)
    train_params = params.train.model_copy(update={"epochs": 1})
    frame, labels, source = load_examples(args.examples, train_params.seed)
    val = frame.head(train_params.eval_batch_size)

    bare, step, step_with_validation = [], [], []
    for repeat in range(args.repeats):
        bare.append(bare_loop(frame, labels, params.model.base, train_params))
        with tempfile.TemporaryDirectory() as out_dir:
            result = train(frame, val, labels, params.model, train_params, Path(out_dir))
        step.append(result.examples_per_second)
        step_with_validation.append(len(frame) / result.total_seconds)
        log.info(
            "repeat %d: bare %.1f ex/s, train step %.1f ex/s (%.1f with validation and saving)",
            repeat,
            bare[-1],
            step[-1],
            step_with_validation[-1],
        )

    report = {
        "what": "examples/s of pipelines.train.train (Trainer + peft) vs a bare torch + peft loop",
        "data": f"{len(frame)} examples from {source}",
        "model": params.model.base,
        "device": select_device(train_params.device).name,
        "batch_size": train_params.batch_size,
        "max_length": train_params.max_length,
        "lora_rank": train_params.lora_rank,
        "torch_threads": torch.get_num_threads(),
        "platform": platform.platform(),
        "bare_loop_examples_per_second": bare,
        "train_step_examples_per_second": step,
        "train_step_with_validation_and_saving_examples_per_second": step_with_validation,
        "ratio_median": statistics.median(step) / statistics.median(bare),
        "ratio_with_validation_median": statistics.median(step_with_validation) / statistics.median(bare),
        "target_ratio": 0.95,
    }
    args.out.parent.mkdir(parents=True, exist_ok=True)
    args.out.write_text(json.dumps(report, indent=2) + "\n")
    log.info(
        "ratio train step / bare loop = %.3f (with validation %.3f) -> %s",
        report["ratio_median"],
        report["ratio_with_validation_median"],
        args.out,
    )


if __name__ == "__main__":
    main()
