"""Tokens per second of the generation `train` step (`pipelines.sft.train_generator`) against a bare
torch + peft loop, in one run.

    python -m benchmarks.sft_throughput --examples 256 --repeats 3
    python -m benchmarks.sft_throughput --base /models/Qwen2.5-0.5B-Instruct --device cuda

Both sides fine-tune the same causal LM (by default a tiny decoder built offline by
``tests.support.build_tiny_decoder``; ``--base`` takes a local model folder) with the same LoRA config,
(message, target) pairs from ``data/sample/support-pairs.csv``, sequences (`PromptTargetPairs`: prompt
then answer, loss on the answer only), collator (`DataCollatorForSeq2Seq`, dynamic padding), batch size,
AdamW (the fused implementation the Trainer picks, same learning rate and weight decay), linear schedule
with the same warm-up, epochs and device (bf16 autocast on a GPU, as the step uses). The step also clips
gradients (Trainer's default) and shuffles with its own sampler, so its batches pad a little
differently; the bare loop does the least a LoRA fine-tune has to do.

The step is timed by its own clock of the training loop (``TrainResult.loop_seconds``: validation,
loading and saving excluded); its ``total_seconds`` (loading, tokenising, the loop, validation, saving)
is reported beside it. The bare loop is timed over its optimisation loop only. Rates count the tokens
the model processes: non-pad input tokens (prompt + answer) and answer (target) tokens, times epochs.
Runs alternate (bare, step; step, bare; …) after one untimed warm-up, so drift in machine load hits
both; ``benchmarks/results/sft_throughput.json`` keeps every run.
"""

from __future__ import annotations

import argparse
import importlib
import json
import logging
import math
import os
import platform
import shlex
import statistics
import sys
import tempfile
import time
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path

import pandas as pd
import peft
import torch
import transformers
from peft import TaskType, get_peft_model
from torch.utils.data import DataLoader
from tqdm.auto import tqdm
from transformers import AutoTokenizer, DataCollatorForSeq2Seq, get_scheduler, set_seed

from pipelines.sft import IGNORED, PromptTargetPairs, train_generator
from pipelines.train import lora_config
from serving.generation import load_base_generator
from serving.inference import resolve_base_model, select_device, with_pad_token
from tuneloop.config import GenerationParams, ModelParams, TrainParams, load_params

log = logging.getLogger("benchmarks.sft_throughput")

PAIRS_PATH = Path("data/sample/support-pairs.csv")
VAL_PAIRS_PATH = Path("data/sample/support-pairs-test.csv")


def load_pairs(path: Path, count: int, seed: int) -> pd.DataFrame:
    """``count`` pairs drawn (seeded) from ``path``; drawn with replacement when it holds fewer."""
    frame = pd.read_csv(path)
    return frame.sample(n=count, replace=count > len(frame), random_state=seed).reset_index(drop=True)


def make_pairs(frame: pd.DataFrame, tokenizer, generation: GenerationParams) -> PromptTargetPairs:
    """The sequences `train_generator` builds from ``frame``."""
    return PromptTargetPairs(
        frame[generation.input_column].astype(str).tolist(),
        frame[generation.target_column].astype(str).tolist(),
        tokenizer,
        generation,
    )


def token_counts(pairs: PromptTargetPairs) -> dict[str, int]:
    """Non-pad input tokens and answer tokens in one pass over ``pairs``."""
    return {
        "input_tokens": sum(len(example["input_ids"]) for example in pairs.examples),
        "target_tokens": pairs.target_tokens,
    }


@contextmanager
def model_folder(base: str | None, architecture: str) -> Iterator[tuple[str, str]]:
    """The model folder to train and how to describe it: ``base``, or a tiny decoder built offline."""
    if base is not None:
        yield base, base
        return
    # The test suite's helper, the one place the project builds its tiny decoders from a config. Imported
    # by name so that `mypy` (which covers benchmarks/, not tests/: pyproject.toml) does not follow it.
    build_tiny_decoder = importlib.import_module("tests.support").build_tiny_decoder

    with tempfile.TemporaryDirectory(prefix=f"tiny-{architecture}-") as folder:
        built = build_tiny_decoder(Path(folder), architecture)
        yield str(built), f"tiny {architecture} (tests.support.build_tiny_decoder: 2 layers, 64 wide)"


def rates(seconds: float, counts: dict[str, int], epochs: float) -> dict[str, float]:
    return {
        "tokens_per_second": counts["input_tokens"] * epochs / seconds,
        "target_tokens_per_second": counts["target_tokens"] * epochs / seconds,
    }


def bare_loop(
    frame: pd.DataFrame, base: str, params: TrainParams, generation: GenerationParams, epochs: int
) -> dict:
    """Plain torch + peft on what the step trains on; times the optimisation loop only."""
    set_seed(params.seed)
    device = select_device(params.device)
    tokenizer = with_pad_token(AutoTokenizer.from_pretrained(resolve_base_model(base)))
    causal_lm = load_base_generator(base, params.quantization, device)
    causal_lm.config.pad_token_id = tokenizer.pad_token_id
    model = get_peft_model(causal_lm, lora_config(params, causal_lm, TaskType.CAUSAL_LM)).to(device.device)
    data = make_pairs(frame, tokenizer, generation)
    loader = DataLoader(
        data,
        batch_size=params.batch_size,
        shuffle=True,
        generator=torch.Generator().manual_seed(params.seed),
        collate_fn=DataCollatorForSeq2Seq(tokenizer, label_pad_token_id=IGNORED, padding=True),
    )
    optimizer = torch.optim.AdamW(
        [p for p in model.parameters() if p.requires_grad],
        lr=params.learning_rate,
        weight_decay=params.weight_decay,
        fused=True,
    )
    steps = len(loader) * epochs
    scheduler = get_scheduler(
        params.lr_scheduler,
        optimizer,
        num_warmup_steps=warmup_steps(params.warmup_fraction, steps),
        num_training_steps=steps,
    )
    model.train()
    padded_tokens = 0
    # Summed on the device and read once at the end, as the Trainer does: no host sync per step.
    epoch_loss = torch.zeros((), device=device.device)
    if device.device.type == "cuda":
        torch.cuda.synchronize()
    started = time.perf_counter()
    with tqdm(total=steps, desc="bare loop", unit="batch", leave=False) as progress:
        for _ in range(epochs):
            epoch_loss.zero_()
            for batch in loader:
                batch = {key: value.to(device.device) for key, value in batch.items()}
                padded_tokens += batch["input_ids"].numel()
                with torch.autocast(device.device.type, dtype=torch.bfloat16, enabled=device.bf16):
                    loss = model(**batch).loss
                loss.backward()
                epoch_loss += loss.detach()
                optimizer.step()
                scheduler.step()
                optimizer.zero_grad()
                progress.update()
    if device.device.type == "cuda":
        torch.cuda.synchronize()
    seconds = time.perf_counter() - started
    counts = token_counts(data)
    return {
        "side": "bare",
        "loop_seconds": seconds,
        **rates(seconds, counts, epochs),
        "padded_tokens_per_epoch": padded_tokens // epochs,
        # Mean over the last epoch's batches: the step's logged train loss, to check both learn alike.
        "train_loss": float(epoch_loss) / len(loader),
    }


def warmup_steps(fraction: float, steps: int) -> int:
    """Warm-up steps as `TrainingArguments(warmup_steps=fraction)` counts them for a fraction below 1."""
    return int(fraction) if fraction >= 1 else math.ceil(steps * fraction)


def step_run(
    frame: pd.DataFrame,
    val_frame: pd.DataFrame,
    base: str,
    params: TrainParams,
    generation: GenerationParams,
    counts: dict[str, int],
) -> dict:
    """One call of the generation `train` step, into a throwaway folder."""
    with tempfile.TemporaryDirectory(prefix="sft-throughput-") as out_dir:
        result = train_generator(frame, val_frame, ModelParams(base=base), params, generation, Path(out_dir))
    if result.extra["train_target_tokens"] != counts["target_tokens"]:
        raise RuntimeError(
            f"the step trained on {result.extra['train_target_tokens']} answer tokens, the benchmark "
            f"counted {counts['target_tokens']}: the two sides no longer build the same sequences"
        )
    return {
        "side": "step",
        "loop_seconds": result.loop_seconds,
        **rates(result.loop_seconds, counts, result.epochs_run),
        "total_seconds": result.total_seconds,
        "tokens_per_second_total": counts["input_tokens"] * result.epochs_run / result.total_seconds,
        "epochs_run": result.epochs_run,
        "train_loss": result.history[-1]["train_loss"] if result.history else None,
    }


def median(runs: list[dict], side: str, key: str) -> float:
    return statistics.median(run[key] for run in runs if run["side"] == side)


def summarise(runs: list[dict]) -> dict:
    """Medians per side, the ratio step / bare and the per-repeat ratios (their spread is the noise)."""
    medians = {
        "bare": {key: median(runs, "bare", key) for key in ("tokens_per_second", "target_tokens_per_second")},
        "step": {
            key: median(runs, "step", key)
            for key in ("tokens_per_second", "target_tokens_per_second", "tokens_per_second_total")
        },
    }
    medians["bare"]["loop_seconds"] = median(runs, "bare", "loop_seconds")
    medians["step"]["loop_seconds"] = median(runs, "step", "loop_seconds")
    medians["step"]["total_seconds"] = median(runs, "step", "total_seconds")
    per_repeat = [
        step["tokens_per_second"] / bare["tokens_per_second"]
        for bare, step in zip(
            [run for run in runs if run["side"] == "bare"],
            [run for run in runs if run["side"] == "step"],
            strict=True,
        )
    ]
    return {
        "medians": medians,
        "ratio": medians["step"]["tokens_per_second"] / medians["bare"]["tokens_per_second"],
        "ratio_with_loading_validation_and_saving": (
            medians["step"]["tokens_per_second_total"] / medians["bare"]["tokens_per_second"]
        ),
        "ratio_per_repeat": per_repeat,
    }


def interpretation(summary: dict, device: str) -> str:
    medians = summary["medians"]
    spread = summary["ratio_per_repeat"]
    return (
        f"On {device} the generation train step (Trainer + peft) ran its training loop at "
        f"{summary['ratio']:.2f}x the bare torch + peft loop's token rate "
        f"({medians['step']['tokens_per_second']:.0f} vs {medians['bare']['tokens_per_second']:.0f} non-pad "
        f"tokens/s, {medians['step']['target_tokens_per_second']:.0f} vs "
        f"{medians['bare']['target_tokens_per_second']:.0f} answer tokens/s; per-repeat ratios "
        f"{min(spread):.2f}-{max(spread):.2f}); counting its loading, tokenising, validation and saving, "
        f"{summary['ratio_with_loading_validation_and_saving']:.2f}x."
    )


def machine(device: str) -> dict:
    return {
        "cpu_count": os.cpu_count(),
        "torch_threads": torch.get_num_threads(),
        "platform": platform.platform(),
        "python": platform.python_version(),
        "torch": torch.__version__,
        "transformers": transformers.__version__,
        "peft": peft.__version__,
        "device": device,
        "gpu": torch.cuda.get_device_name() if device.startswith("cuda") else None,
        # 1, 5 and 15 minutes, read as the run ends: above cpu_count, other work shared the cores.
        "load_average": [round(load, 2) for load in os.getloadavg()],
    }


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("--architecture", default="llama", choices=("llama", "qwen2", "gpt2"))
    parser.add_argument("--base", help="a local causal LM folder instead of the tiny decoder")
    parser.add_argument("--examples", type=int, default=256)
    parser.add_argument("--epochs", type=int, default=1)
    parser.add_argument("--batch-size", type=int, help="default: train.batch_size from params")
    parser.add_argument("--repeats", type=int, default=3)
    parser.add_argument("--device", default="auto", choices=("auto", "cpu", "cuda"))
    # params.yaml's train.target_modules names the classifier's (BERT) modules, which decoders lack.
    parser.add_argument(
        "--target-modules",
        default="auto",
        help="LoRA modules: auto, all-linear or comma-separated names (default auto: peft's attention "
        "projections for the architecture)",
    )
    parser.add_argument("--params", type=Path, default=Path("params.yaml"))
    parser.add_argument("--out", type=Path, default=Path("benchmarks/results/sft_throughput.json"))
    args = parser.parse_args(argv)
    if args.examples < 1 or args.epochs < 1 or args.repeats < 1:
        parser.error("--examples, --epochs and --repeats must be at least 1")
    logging.basicConfig(level=logging.INFO, format="%(levelname)s %(name)s: %(message)s")

    params = load_params(args.params)
    generation = params.generation
    target_modules = (
        args.target_modules
        if args.target_modules in {"auto", "all-linear"}
        else tuple(args.target_modules.split(","))
    )
    train_params = TrainParams.model_validate(
        {
            **params.train.model_dump(),
            "epochs": args.epochs,
            "batch_size": args.batch_size or params.train.batch_size,
            "device": args.device,
            "target_modules": target_modules,
            # Every example, every epoch, on both sides: no cap and no early stop.
            "max_train_examples": 0,
            "early_stopping_patience": max(params.train.early_stopping_patience, args.epochs),
            "processes": 1,
        }
    )
    if train_params.quantization != "none" or train_params.gradient_checkpointing:
        raise SystemExit(
            "the bare loop trains the base in full precision without activation checkpointing: run with a "
            "--params file whose train.quantization is none and train.gradient_checkpointing false"
        )
    device = select_device(train_params.device).name
    frame = load_pairs(PAIRS_PATH, args.examples, train_params.seed)
    val_frame = pd.read_csv(VAL_PAIRS_PATH).head(train_params.eval_batch_size)

    with model_folder(args.base, args.architecture) as (base, model_name):
        tokenizer = with_pad_token(AutoTokenizer.from_pretrained(resolve_base_model(base)))
        counts = token_counts(make_pairs(frame, tokenizer, generation))
        log.info(
            "%s on %s: %d pairs, %d non-pad tokens (%d answer tokens) per epoch, %d epoch(s), batch %d",
            model_name,
            device,
            len(frame),
            counts["input_tokens"],
            counts["target_tokens"],
            args.epochs,
            train_params.batch_size,
        )
        log.info("warm-up (untimed): one bare epoch on %d pairs", train_params.batch_size)
        bare_loop(frame.head(train_params.batch_size), base, train_params, generation, 1)

        runs: list[dict] = []
        for repeat in range(args.repeats):
            order = ("bare", "step") if repeat % 2 == 0 else ("step", "bare")
            for side in order:
                log.info(
                    "repeat %d/%d: %s", repeat + 1, args.repeats, "bare loop" if side == "bare" else "step"
                )
                run = (
                    bare_loop(frame, base, train_params, generation, args.epochs)
                    if side == "bare"
                    else step_run(frame, val_frame, base, train_params, generation, counts)
                )
                runs.append({"repeat": repeat, **run})
                log.info(
                    "repeat %d/%d: %s %.0f tokens/s, %.0f answer tokens/s (loop %.1f s%s)",
                    repeat + 1,
                    args.repeats,
                    side,
                    run["tokens_per_second"],
                    run["target_tokens_per_second"],
                    run["loop_seconds"],
                    f", total {run['total_seconds']:.1f} s" if side == "step" else "",
                )

    summary = summarise(runs)
    report = {
        "what": (
            "tokens/s of pipelines.sft.train_generator (the generation train step: Trainer + peft) vs a "
            "bare torch + peft loop on the same model, pairs, LoRA, batch size, optimiser and epochs"
        ),
        "command": shlex.join(["python", "-m", "benchmarks.sft_throughput", *sys.argv[1:]]),
        "machine": machine(device),
        "settings": {
            "model": model_name,
            "data": f"{len(frame)} pairs drawn from {PAIRS_PATH} (seed {train_params.seed})",
            "validation": f"{len(val_frame)} pairs from {VAL_PAIRS_PATH} (the step only, outside its loop)",
            "epochs": args.epochs,
            "batch_size": train_params.batch_size,
            "learning_rate": train_params.learning_rate,
            "weight_decay": train_params.weight_decay,
            "lr_scheduler": train_params.lr_scheduler,
            "warmup_fraction": train_params.warmup_fraction,
            "lora_rank": train_params.lora_rank,
            "lora_alpha": train_params.lora_alpha,
            "lora_dropout": train_params.lora_dropout,
            "target_modules": args.target_modules,
            "max_input_tokens": generation.max_input_tokens,
            "max_target_tokens": generation.max_target_tokens,
            "input_tokens_per_epoch": counts["input_tokens"],
            "target_tokens_per_epoch": counts["target_tokens"],
            "mean_sequence_tokens": counts["input_tokens"] / len(frame),
            "repeats": args.repeats,
            "order": "one untimed warm-up, then bare/step alternating: bare first in even repeats",
        },
        "runs": runs,
        **summary,
        "interpretation": interpretation(summary, device),
    }
    args.out.parent.mkdir(parents=True, exist_ok=True)
    args.out.write_text(json.dumps(report, indent=2) + "\n")
    log.info("%s -> %s", report["interpretation"], args.out)


if __name__ == "__main__":
    main()
