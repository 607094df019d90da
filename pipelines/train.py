"""`train` stage: LoRA fine-tuning of a sequence classifier with peft and the transformers Trainer.

Writes the adapter, tokenizer, label map and a manifest to ``models/adapter`` and opens the MLflow
run of this pipeline execution (its id goes into the manifest; `evaluate` adds to the same run).

With ``train.processes > 1`` the stage starts that many data-parallel processes with torchrun
(DDP: gloo on CPU, NCCL on CUDA); under a launcher that already started them (torchrun, accelerate
launch) it runs as its rank. Only rank 0 logs, writes files and talks to MLflow.
"""

from __future__ import annotations

import argparse
import json
import logging
import os
import shutil
import socket
import subprocess
import sys
import tempfile
import time
from collections.abc import Callable, Iterator, Sequence
from contextlib import contextmanager
from dataclasses import dataclass, field
from pathlib import Path

import mlflow
import numpy as np
import pandas as pd
import psutil
import torch
import torch.distributed as dist
from accelerate import PartialState
from peft import LoraConfig, PeftModel, TaskType, get_peft_model
from peft.utils.constants import TRANSFORMERS_MODELS_TO_LORA_TARGET_MODULES_MAPPING
from transformers import (
    AutoTokenizer,
    DataCollatorWithPadding,
    EarlyStoppingCallback,
    PreTrainedModel,
    PrinterCallback,
    Trainer,
    TrainerCallback,
    TrainingArguments,
    set_seed,
)

from evaluation.plots import training_curves_figure
from evaluation.quality import headline_metrics
from serving.inference import (
    LABELS_FILE,
    MANIFEST_FILE,
    DeviceChoice,
    load_base_classifier,
    resolve_base_model,
    select_device,
    with_pad_token,
)
from tuneloop.config import CostParams, Environment, ModelParams, Params, TrainParams, load_params
from tuneloop.io import read_json, write_json
from tuneloop.paths import ADAPTER_DIR, PREPARED_DIR, TRAIN_METRICS, TRAINING_HISTORY
from tuneloop.progress import epoch_line, interactive, quiet_library_bars
from tuneloop.tracking import flatten, git_commit, use_experiment

log = logging.getLogger(__name__)

EpochLogger = Callable[[dict], None]


class TrainingRefused(ValueError):
    """Settings or inputs training cannot start with; the stage prints why and exits without a traceback."""


class EncodedTexts(torch.utils.data.Dataset):
    """Tokenised texts and label ids; padding is left to the collator so batches stay short."""

    def __init__(self, texts: list[str], labels: list[int], tokenizer, max_length: int):
        self.encodings = tokenizer(texts, truncation=True, max_length=max_length)
        self.labels = labels

    def __len__(self) -> int:
        return len(self.labels)

    def __getitem__(self, index: int) -> dict:
        item = {key: values[index] for key, values in self.encodings.items()}
        item["labels"] = self.labels[index]
        return item


@dataclass
class TrainResult:
    history: list[dict]
    best_epoch: float | None
    train_examples: int
    epochs_run: float
    loop_seconds: float
    total_seconds: float
    device: str
    trainable_parameters: int
    total_parameters: int
    # Data-parallel processes that trained together, and their torch.distributed backend (None: one).
    processes: int = 1
    ddp_backend: str | None = None
    extra: dict = field(default_factory=dict)

    @property
    def examples_per_second(self) -> float:
        """Training-loop throughput: examples seen per second of optimisation, validation excluded.

        Every process counts the whole training set and the loop time is rank 0's, so with several
        processes this is the total across them.
        """
        return self.train_examples * self.epochs_run / max(self.loop_seconds, 1e-9)


@dataclass(frozen=True)
class Ranks:
    """This process's place among the data-parallel training processes."""

    world_size: int
    rank: int
    # "gloo" or "nccl" when several processes train together; None for one process.
    backend: str | None

    @property
    def is_main(self) -> bool:
        return self.rank == 0


def join_processes(device: DeviceChoice) -> Ranks:
    """Join the process group a launcher (torchrun, accelerate launch) set up; one process without one.

    accelerate's ``PartialState`` reads the launcher's variables and initialises torch.distributed:
    gloo on CPU, NCCL on CUDA. The ``Trainer`` later finds that group and trains with DDP in it.
    """
    state = PartialState(cpu=device.device.type == "cpu")
    if state.num_processes == 1:
        return Ranks(world_size=1, rank=0, backend=None)
    backend = dist.get_backend() if dist.is_initialized() else state.backend
    return Ranks(world_size=state.num_processes, rank=state.process_index, backend=str(backend))


def per_process_batch(batch_size: int, processes: int) -> int:
    """Each process's share of the global ``train.batch_size``; refuses a batch that does not split evenly.

    An uneven split would change the effective batch (and so the optimisation) with the process count.
    """
    if processes < 1:
        raise TrainingRefused(f"train.processes must be at least 1, not {processes}")
    if batch_size % processes:
        raise TrainingRefused(
            f"train.batch_size {batch_size} is the global batch and must split evenly over "
            f"{processes} processes; choose a multiple of {processes}"
        )
    return batch_size // processes


@contextmanager
def _checkpoint_dir(ranks: Ranks) -> Iterator[str]:
    """A temporary folder for the Trainer's checkpoints, the same one on every rank.

    Rank 0 saves the checkpoints and every rank loads the best one at the end, so they must share a
    folder: rank 0 makes it and sends its name to the others; it is removed once all are done with it.
    """
    if ranks.world_size == 1:
        with tempfile.TemporaryDirectory(prefix="tuneloop-ckpt-") as folder:
            yield folder
        return
    names = [tempfile.mkdtemp(prefix="tuneloop-ckpt-") if ranks.is_main else None]
    dist.broadcast_object_list(names, src=0)
    folder = str(names[0])
    try:
        yield folder
        dist.barrier()
    finally:
        if ranks.is_main:
            shutil.rmtree(folder, ignore_errors=True)


class _EpochRecorder(TrainerCallback):
    """Collects per-epoch train loss and validation metrics, times the loop, and forwards each epoch.

    Off a terminal (the Trainer's bar disabled, see `training_arguments`) it also logs each epoch as one
    line, which is then the whole of the training progress in a log file.
    """

    def __init__(self, on_epoch: EpochLogger | None):
        self.on_epoch = on_epoch
        self.history: list[dict] = []
        self.loop_seconds = 0.0
        self._epoch_started = 0.0
        self._last_train_loss: float | None = None

    def on_epoch_begin(self, args, state, control, **kwargs):
        self._epoch_started = time.perf_counter()

    def on_epoch_end(self, args, state, control, **kwargs):
        self.loop_seconds += time.perf_counter() - self._epoch_started

    def on_log(self, args, state, control, logs=None, **kwargs):
        if logs and "loss" in logs:
            self._last_train_loss = float(logs["loss"])

    def on_evaluate(self, args, state, control, metrics=None, **kwargs):
        row = {
            "epoch": round(float(state.epoch or 0), 3),
            "train_loss": self._last_train_loss,
            "val_loss": float(metrics["eval_loss"]),
            # Classifiers report accuracy and macro-F1 too; a generator's validation is its loss.
            **{
                f"val_{name}": float(metrics[f"eval_{name}"])
                for name in ("accuracy", "macro_f1")
                if f"eval_{name}" in metrics
            },
        }
        self.history.append(row)
        if args.disable_tqdm and state.is_world_process_zero:
            log.info(epoch_line(row, args.num_train_epochs))
        if self.on_epoch:
            self.on_epoch(row)


def _compute_metrics(prediction) -> dict[str, float]:
    logits, labels = prediction
    return headline_metrics(labels, np.argmax(logits, axis=-1))


def head_aware_optimizer(model: torch.nn.Module, params: TrainParams) -> torch.optim.Optimizer:
    """AdamW with its own learning rate for the new classification head.

    The head starts from random weights and needs larger steps than the LoRA matrices, which only
    nudge a pretrained encoder: with one rate for both, banking77 reached 0.08 validation accuracy
    after one 3,000-example epoch at 3e-4 and 0.55 after a full epoch at 3e-3.
    """
    head: list[torch.nn.Parameter] = []
    adapters: list[torch.nn.Parameter] = []
    for name, parameter in model.named_parameters():
        if parameter.requires_grad:
            (head if "classifier" in name or "score" in name else adapters).append(parameter)
    return torch.optim.AdamW(
        [
            {"params": adapters, "lr": params.learning_rate},
            {"params": head, "lr": params.head_learning_rate},
        ],
        weight_decay=params.weight_decay,
    )


def lora_config(
    params: TrainParams, base: PreTrainedModel, task_type: TaskType = TaskType.SEQ_CLS
) -> LoraConfig:
    """LoRA for ``task_type``; a classifier's head (`classifier` or `score`) is trained in full and saved.

    ``auto`` leaves the choice of modules to peft's table of attention projections per architecture.
    """
    targets = None if params.target_modules == "auto" else params.target_modules
    if targets is None and base.config.model_type not in TRANSFORMERS_MODELS_TO_LORA_TARGET_MODULES_MAPPING:
        raise TrainingRefused(
            f"train.target_modules is `auto` but peft has no default modules for model type "
            f"'{base.config.model_type}': name them, or use `all-linear`"
        )
    return LoraConfig(
        task_type=task_type,
        r=params.lora_rank,
        lora_alpha=params.lora_alpha,
        lora_dropout=params.lora_dropout,
        target_modules=list(targets) if isinstance(targets, tuple) else targets,
    )


def to_ids(labels: pd.Series, label_names: tuple[str, ...]) -> list[int]:
    index = {name: i for i, name in enumerate(label_names)}
    unknown = sorted(set(labels) - set(index))
    if unknown:
        raise TrainingRefused(f"labels {unknown[:5]} are not in data.labels; did `validate` run?")
    return [index[label] for label in labels]


def training_arguments(
    params: TrainParams,
    device: DeviceChoice,
    ranks: Ranks,
    checkpoints: str,
    batch_per_process: int,
    best_metric: str,
    greater_is_better: bool = True,
    **task_specific,
) -> TrainingArguments:
    """What every LoRA fine-tune here trains with: per-epoch validation and checkpoints, the best epoch kept
    (by ``best_metric``), seeds, bf16 autocast on a GPU, DDP when a launcher started several processes."""
    return TrainingArguments(
        output_dir=checkpoints,
        num_train_epochs=params.epochs,
        per_device_train_batch_size=batch_per_process,
        per_device_eval_batch_size=params.eval_batch_size,
        learning_rate=params.learning_rate,
        lr_scheduler_type=params.lr_scheduler,
        warmup_steps=params.warmup_fraction,
        weight_decay=params.weight_decay,
        eval_strategy="epoch",
        save_strategy="epoch",
        logging_strategy="epoch",
        save_total_limit=2,
        load_best_model_at_end=True,
        metric_for_best_model=best_metric,
        greater_is_better=greater_is_better,
        seed=params.seed,
        data_seed=params.seed,
        bf16=device.bf16,
        use_cpu=device.device.type == "cpu",
        report_to="none",
        # A bar redrawn every step floods a log file: off a terminal _EpochRecorder logs each epoch instead.
        disable_tqdm=not interactive(),
        dataloader_num_workers=0,
        # None for one process: a backend named without a process group is refused by accelerate.
        ddp_backend=ranks.backend,
        # Every trainable parameter (LoRA matrices, head) takes part in every forward pass: DDP need not
        # search the graph for unused ones each step, and if one were unused DDP would say so.
        ddp_find_unused_parameters=False,
        activation_checkpointing=params.gradient_checkpointing,
        # The reentrant variant needs inputs that require grad, which a frozen embedding does not give.
        activation_checkpointing_kwargs={"use_reentrant": False},
        **task_specific,
    )


def trained_adapter(trainer: Trainer) -> PeftModel:
    """The PEFT model the trainer ends with: with load_best_model_at_end, the best epoch's weights."""
    trained = trainer.model
    if not isinstance(trained, PeftModel):
        raise TypeError(f"the trainer holds a {type(trained).__name__}, not the PEFT model it was given")
    return trained


def save_adapter(trained: PeftModel, tokenizer, out_dir: Path, json_files: dict[str, object]) -> None:
    """Replace ``out_dir`` with the adapter, its tokenizer and ``json_files`` (name -> content)."""
    if out_dir.exists():
        shutil.rmtree(out_dir)
    out_dir.mkdir(parents=True)
    trained.save_pretrained(str(out_dir))
    _sort_module_sets(out_dir / "adapter_config.json")
    tokenizer.save_pretrained(out_dir)
    for name, content in json_files.items():
        write_json(out_dir / name, content)


def _sort_module_sets(config_file: Path) -> None:
    """Sort the module names peft keeps as sets and writes in hash order, which changes from process to
    process: the same training must give the same bytes, since DVC records the adapter's md5 in dvc.lock.
    """
    config = read_json(config_file)
    for key in ("target_modules", "exclude_modules"):
        if isinstance(config.get(key), list):
            config[key] = sorted(config[key])
    config_file.write_text(json.dumps(config, indent=2, sort_keys=True), encoding="utf-8")


def train(
    train_frame: pd.DataFrame,
    val_frame: pd.DataFrame,
    label_names: tuple[str, ...],
    model: ModelParams,
    params: TrainParams,
    out_dir: Path,
    on_epoch: EpochLogger | None = None,
) -> TrainResult:
    """Fine-tune ``model.base`` with LoRA on ``train_frame``; keep the best epoch by validation macro-F1.

    Saves adapter + classification head, tokenizer, label map and a manifest into ``out_dir``.
    """
    started = time.perf_counter()
    set_seed(params.seed)
    device = select_device(params.device)
    ranks = join_processes(device)
    if params.processes > 1 and ranks.world_size == 1:
        raise TrainingRefused(
            f"train.processes is {params.processes} but this process was not started by a launcher: run "
            "`python -m pipelines.train` (it starts the processes) or torchrun / accelerate launch"
        )
    if ranks.world_size != params.processes and ranks.is_main:
        log.warning(
            "train.processes is %d but the launcher started %d processes: training with %d",
            params.processes,
            ranks.world_size,
            ranks.world_size,
        )
    batch_per_process = per_process_batch(params.batch_size, ranks.world_size)
    if params.max_train_examples:
        train_frame = train_frame.sample(
            n=min(params.max_train_examples, len(train_frame)), random_state=params.seed
        )
    base_path = resolve_base_model(model.base)
    tokenizer = with_pad_token(AutoTokenizer.from_pretrained(base_path))
    classifier = load_base_classifier(model.base, label_names, tokenizer.pad_token_id)
    peft_model = get_peft_model(classifier, lora_config(params, classifier))
    trainable, total = peft_model.get_nb_trainable_parameters()
    log.info(
        "LoRA: %d trainable of %d parameters (%.2f%%) on %s, %d process(es) of %d examples per step",
        trainable,
        total,
        100 * trainable / total,
        device.name,
        ranks.world_size,
        batch_per_process,
    )

    train_data = EncodedTexts(
        train_frame["text"].tolist(), to_ids(train_frame["label"], label_names), tokenizer, params.max_length
    )
    val_data = EncodedTexts(
        val_frame["text"].tolist(), to_ids(val_frame["label"], label_names), tokenizer, params.max_length
    )
    recorder = _EpochRecorder(on_epoch)
    with _checkpoint_dir(ranks) as checkpoints:
        arguments = training_arguments(
            params,
            device,
            ranks,
            checkpoints,
            batch_per_process,
            best_metric="macro_f1",
            # The Trainer multiplies the loss by the process count when the model's forward takes
            # **kwargs, expecting a loss summed over the global token count; sequence classifiers
            # (BertForSequenceClassification) ignore that count and return a mean, so with the default
            # every gradient would be `processes` times too large. DDP's gradient mean is right as it is.
            # With one process the factor is 1, so this changes nothing there.
            average_tokens_across_devices=False,
        )
        trainer = Trainer(
            model=peft_model,
            optimizers=(head_aware_optimizer(peft_model, params), None),
            args=arguments,
            train_dataset=train_data,
            eval_dataset=val_data,
            data_collator=DataCollatorWithPadding(tokenizer),
            processing_class=tokenizer,
            compute_metrics=_compute_metrics,
            callbacks=[
                recorder,
                EarlyStoppingCallback(early_stopping_patience=params.early_stopping_patience),
            ],
        )
        # Without a bar the Trainer prints each log dict (two per epoch); the recorder's line replaces them.
        trainer.remove_callback(PrinterCallback)
        output = trainer.train()
        best_checkpoint = trainer.state.best_model_checkpoint
        best_epoch = next(
            (
                row["epoch"]
                for row in recorder.history
                if best_checkpoint and row["val_macro_f1"] == trainer.state.best_metric
            ),
            None,
        )
        trained = trained_adapter(trainer)
        if ranks.is_main:
            save_adapter(
                trained,
                tokenizer,
                out_dir,
                {
                    LABELS_FILE: list(label_names),
                    MANIFEST_FILE: {"base_model": model.base, "max_length": params.max_length},
                },
            )
        # Leaving the block waits for every rank, so each returns with the adapter on disk.
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
    )


# Figures that depend on how long the run took, or where, rather than on its inputs (the same run twice
# gives other values): MLflow and the timing file get them, never a DVC metrics file, whose md5
# dvc.lock records. The adapter's size is one: its manifest records the run id and the project's
# paths, so two fresh clones in different folders measured 3,455,892 and 3,455,886 bytes.
TIMED_METRICS = frozenset(
    {
        "train/examples_per_second",
        "train/loop_seconds",
        "train/total_seconds",
        "cost/device_hours",
        "cost/training_usd",
        "cost/artifact_gb",
        "cost/storage_usd_per_month",
    }
)
# Evaluation's timings (pipelines/evaluate.py, pipelines/evaluate_generation.py) are named by prefix.
TIMED_PREFIXES = ("latency/", "speed/")
# Untracked (reports/ is in .gitignore) and not a DVC output: a fresh clone's run leaves git's files alone.
TRAIN_TIMING = Path("reports/timing/train.json")


def split_timed(metrics: dict[str, float]) -> tuple[dict[str, float], dict[str, float]]:
    """``metrics`` as (reproducible, timed): what a rerun on the same inputs repeats, and the wall-clock
    figures that it does not (:data:`TIMED_METRICS`, :data:`TIMED_PREFIXES`)."""
    timed = {k: v for k, v in metrics.items() if k in TIMED_METRICS or k.startswith(TIMED_PREFIXES)}
    return {k: v for k, v in metrics.items() if k not in timed}, timed


def train_metrics(
    result: TrainResult, cost: CostParams | None = None, adapter_bytes: int | None = None
) -> dict[str, float]:
    """The run's summary metrics; with a price table, its device-hours and their cost (``cost/...``).

    Device-hours are the whole stage's wall time (loading, training, validation, saving) times the
    processes, each of which holds one device; ``adapter_bytes`` adds the artifact's storage cost.
    """
    best = next((row for row in result.history if row["epoch"] == result.best_epoch), result.history[-1])
    priced: dict[str, float] = {}
    if cost is not None:
        priced = cost.training_cost(result.total_seconds, result.processes, result.device)
        if adapter_bytes is not None:
            priced |= cost.storage_cost(adapter_bytes)
    return {
        "train/examples_per_second": round(result.examples_per_second, 2),
        "train/loop_seconds": round(result.loop_seconds, 2),
        "train/total_seconds": round(result.total_seconds, 2),
        "train/epochs_run": result.epochs_run,
        "train/best_epoch": result.best_epoch or result.epochs_run,
        "train/best_val_loss": best["val_loss"],
        # A classifier's validation also scores labels; a generator's is its loss on the targets.
        **{f"train/best_{key}": best[key] for key in ("val_accuracy", "val_macro_f1") if key in best},
        "train/trainable_parameters": result.trainable_parameters,
        "train/processes": result.processes,
        **priced,
    }


def folder_bytes(folder: Path) -> int:
    """Total size of the files under ``folder``."""
    return sum(path.stat().st_size for path in folder.rglob("*") if path.is_file())


def stage_command(python: str, params: Path, prepared: Path, out: Path) -> list[str]:
    """The `train` stage's command line writing everything under ``out`` (benchmarks and tests run it)."""
    return [
        python,
        "-m",
        "pipelines.train",
        "--params",
        str(params),
        "--prepared-dir",
        str(prepared),
        "--out-dir",
        str(out / "adapter"),
        "--metrics-path",
        str(out / "metrics.json"),
        "--timing-path",
        str(out / "timing.json"),
        "--history-path",
        str(out / "history.csv"),
    ]


def launch_command(python: str, processes: int, master_port: int, stage_args: Sequence[str]) -> list[str]:
    """torchrun starting ``processes`` ranks of this stage on this machine, meeting on loopback only.

    ``python -m torch.distributed.run`` is torchrun from the same interpreter, so the ranks run in the
    stage's own virtualenv whatever is first on PATH.
    """
    return [
        python,
        "-m",
        "torch.distributed.run",
        "--nnodes",
        "1",
        "--nproc-per-node",
        str(processes),
        "--master-addr",
        "127.0.0.1",
        "--master-port",
        str(master_port),
        "-m",
        "pipelines.train",
        *stage_args,
    ]


def launch_environment(processes: int, cpus: int, loopback_interface: str | None) -> dict[str, str]:
    """What the ranks need beyond the caller's environment.

    The CPU threads are split between the ranks (torchrun's default is one thread each), and gloo is
    bound to the loopback interface: by default it takes the address the host name resolves to, which
    may face the network.
    """
    environment = {"OMP_NUM_THREADS": str(max(1, cpus // processes))}
    if loopback_interface:
        environment["GLOO_SOCKET_IFNAME"] = loopback_interface
    return environment


def loopback_interface() -> str | None:
    """The name of the network interface that holds 127.0.0.1 (``lo`` on Linux), None if none does."""
    for name, addresses in psutil.net_if_addrs().items():
        if any(a.family == socket.AF_INET and a.address == "127.0.0.1" for a in addresses):
            return name
    return None


def free_port() -> int:
    """A TCP port on 127.0.0.1 that nothing listens on now, for the ranks' rendezvous."""
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as probe:
        probe.bind(("127.0.0.1", 0))
        return int(probe.getsockname()[1])


def launch_and_wait(params: TrainParams, device: DeviceChoice, stage_args: Sequence[str]) -> int:
    """Run this stage as ``params.processes`` data-parallel ranks and wait; their exit status.

    Settings the ranks would refuse are refused here, before any process starts.
    """
    per_process_batch(params.batch_size, params.processes)
    if device.device.type == "cuda" and torch.cuda.device_count() < params.processes:
        raise TrainingRefused(
            f"train.processes is {params.processes} but torch sees {torch.cuda.device_count()} CUDA "
            "device(s): NCCL needs one device per process"
        )
    cpus = len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else os.cpu_count() or 1
    command = launch_command(sys.executable, params.processes, free_port(), stage_args)
    # The ranks inherit this process's environment; a variable the caller set wins over ours.
    environment = {**launch_environment(params.processes, cpus, loopback_interface()), **os.environ}
    log.info("starting %d training processes: %s", params.processes, " ".join(command))
    status = subprocess.run(command, env=environment, check=False).returncode
    if status != 0:
        log.error(
            "train: the %d training processes failed (torchrun exit status %d); torchrun's summary "
            "above names the failed rank and its error",
            params.processes,
            status,
        )
    return status


# What the `prepare` stage writes and training reads (meta.json: the data's lineage for MLflow).
PREPARED_INPUTS = ("train.parquet", "val.parquet", "labels.json", "meta.json")


def _read_prepared(prepared: Path) -> tuple[pd.DataFrame, pd.DataFrame, tuple[str, ...]]:
    return (
        pd.read_parquet(prepared / "train.parquet"),
        pd.read_parquet(prepared / "val.parquet"),
        tuple(read_json(prepared / "labels.json")),
    )


def train_for_task(
    params: Params, prepared: Path, out_dir: Path, on_epoch: EpochLogger | None = None
) -> TrainResult:
    """The training step of ``params.task``: a classifier (`train`) or a generator (`pipelines.sft`)."""
    train_frame, val_frame, labels = _read_prepared(prepared)
    if params.task == "generation":
        from pipelines.sft import train_generator

        return train_generator(
            train_frame, val_frame, params.model, params.train, params.generation, out_dir, on_epoch
        )
    return train(train_frame, val_frame, labels, params.model, params.train, out_dir, on_epoch=on_epoch)


def _train_and_record(args: argparse.Namespace, params: Params, ranks: Ranks) -> None:
    """Rank 0's part (the only one for a single process): train, and write MLflow and the outputs."""
    env = Environment.from_env()
    prepared = Path(args.prepared_dir)
    meta = read_json(prepared / "meta.json")
    use_experiment(env)
    with mlflow.start_run(run_name=f"train-{time.strftime('%Y%m%d-%H%M%S')}") as run:
        mlflow.set_tags(
            {
                "tuneloop.git_commit": git_commit(env.project_dir),
                "tuneloop.data_md5": meta["source_md5"],
                "tuneloop.data_path": meta["source_path"],
                "tuneloop.base_model": params.model.base,
                "tuneloop.task": params.task,
                "tuneloop.processes": ranks.world_size,
                "tuneloop.ddp_backend": ranks.backend or "none",
            }
        )
        mlflow.log_params(
            flatten(
                "",
                {
                    "model": params.model.model_dump(),
                    "train": params.train.model_dump(),
                    "prepare": params.prepare.model_dump(),
                    "data.rows": meta["rows"],
                    "data.source_md5": meta["source_md5"],
                },
            )
        )

        def log_epoch(row: dict) -> None:
            step = int(round(row["epoch"]))
            mlflow.log_metrics(
                {f"epoch/{k}": v for k, v in row.items() if k != "epoch" and v is not None}, step=step
            )

        result = train_for_task(params, prepared, Path(args.out_dir), on_epoch=log_epoch)
        metrics = train_metrics(result, params.cost, folder_bytes(Path(args.out_dir)))
        mlflow.log_metrics(metrics)
        mlflow.set_tag("tuneloop.device", result.device)
        mlflow.set_tag("tuneloop.device_hour_usd", params.cost.device_hour_price(result.device))
        mlflow.log_figure(training_curves_figure(result.history), "plots/training_curves.png")
        manifest = read_json(Path(args.out_dir) / MANIFEST_FILE)
        write_json(Path(args.out_dir) / MANIFEST_FILE, {**manifest, "mlflow_run_id": run.info.run_id})
    reproducible, timed = split_timed(metrics)
    write_json(args.metrics_path, reproducible)
    write_json(args.timing_path, timed)
    Path(args.history_path).parent.mkdir(parents=True, exist_ok=True)
    pd.DataFrame(result.history).to_csv(args.history_path, index=False)
    log.info(
        "trained in %.1fs (%.1f examples/s in the loop, %d process(es), %.4f device-hours, $%.4f); "
        "best epoch %s: %s",
        result.total_seconds,
        result.examples_per_second,
        result.processes,
        metrics["cost/device_hours"],
        metrics["cost/training_usd"],
        result.best_epoch,
        metrics,
    )


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("--params", default="params.yaml")
    parser.add_argument("--prepared-dir", default=str(PREPARED_DIR))
    parser.add_argument("--out-dir", default=str(ADAPTER_DIR))
    parser.add_argument("--metrics-path", default=str(TRAIN_METRICS))
    parser.add_argument("--timing-path", default=str(TRAIN_TIMING))
    parser.add_argument("--history-path", default=str(TRAINING_HISTORY))
    args = parser.parse_args(argv)
    params = load_params(args.params)
    try:
        device = select_device(params.train.device)
    except RuntimeError as no_device:
        raise TrainingRefused(str(no_device)) from None
    ranks = join_processes(device)
    rank_label = f" [rank {ranks.rank}]" if ranks.world_size > 1 else ""
    logging.basicConfig(
        level=logging.INFO if ranks.is_main else logging.WARNING,
        format=f"%(levelname)s{rank_label} %(name)s: %(message)s",
    )
    quiet_library_bars()
    if ranks.world_size == 1 and params.train.processes > 1:
        status = launch_and_wait(params.train, device, sys.argv[1:] if argv is None else argv)
        if status != 0:
            sys.exit(status)
        return
    missing = [name for name in PREPARED_INPUTS if not (Path(args.prepared_dir) / name).is_file()]
    if missing:
        raise TrainingRefused(
            f"{args.prepared_dir} has no {', '.join(missing)}. The `prepare` and `validate` stages write "
            "them: run `dvc repro validate` (or `tuneloop run`) first."
        )
    try:
        if ranks.is_main:
            _train_and_record(args, params, ranks)
        else:
            train_for_task(params, Path(args.prepared_dir), Path(args.out_dir))
        if ranks.world_size > 1:
            # The other ranks stay until rank 0 has written its outputs and closed its MLflow run.
            dist.barrier()
    finally:
        if dist.is_initialized():
            dist.destroy_process_group()


if __name__ == "__main__":
    # An expected refusal is a message to act on, not a bug: no traceback (`main` itself raises it, for
    # callers that handle it).
    try:
        main()
    except TrainingRefused as refused:
        raise SystemExit(f"train: {refused}") from None
