"""Typed settings parsed from ``params.yaml`` (the one source of numbers) and the environment.

Each pipeline stage receives only its own section; nothing here reads the environment at import.
"""

from __future__ import annotations

import os
import ssl
from pathlib import Path
from typing import Literal

import yaml
from pydantic import BaseModel, ConfigDict, Field, SecretStr, field_validator

from tuneloop.paths import HomePaths
from tuneloop.stores import SharedStores

# Where `tuneloop serve --env <alias>` listens unless told otherwise, and the local stack's servers.
DEFAULT_GATEWAY_PORTS = {"prod": 8000, "dev": 8001}
DEFAULT_MLFLOW_PORT = 5000
DEFAULT_PREFECT_PORT = 4200
DEFAULT_POSTGRES_PORT = 55432
DEFAULT_S3_PORT = 9090
# Names a Prefect work pool that overrides orchestration.work_pool (read here, in Environment.from_env).
WORK_POOL_ENV = "TUNELOOP_WORK_POOL"


# What the pipeline fine-tunes for: labels for texts, or generated answers for messages.
Task = Literal["classification", "generation"]


class _Frozen(BaseModel):
    model_config = ConfigDict(frozen=True, extra="forbid")


class DataParams(_Frozen):
    raw_path: str
    # Optional frozen test file (same columns as raw). When set, raw data is split into train/val
    # only and every model is scored on this same file.
    test_path: str | None
    text_column: str
    label_column: str
    group_columns: tuple[str, ...]
    labels: tuple[str, ...] = Field(min_length=2)

    @field_validator("labels")
    @classmethod
    def _labels_unique(cls, labels: tuple[str, ...]) -> tuple[str, ...]:
        if len(set(labels)) != len(labels):
            raise ValueError("data.labels has duplicates")
        return labels


class PrepareParams(_Frozen):
    seed: int
    val_fraction: float = Field(gt=0, lt=0.5)
    test_fraction: float = Field(gt=0, lt=0.5)
    # With a frozen test file (data.test_path): drop training rows whose text is also in it.
    # Off by default so that `validate` reports such leakage rather than hiding it.
    drop_test_overlap: bool


class ValidateParams(_Frozen):
    min_text_chars: int = Field(ge=1)
    max_text_chars: int = Field(ge=1)
    min_examples_per_class: int = Field(ge=1)
    max_duplicate_share: float = Field(ge=0, le=1)
    examples_per_failure: int = Field(ge=1)


class ModelParams(_Frozen):
    base: str


class TrainParams(_Frozen):
    seed: int
    lora_rank: int = Field(ge=1)
    lora_alpha: int = Field(ge=1)
    lora_dropout: float = Field(ge=0, lt=1)
    # Module names, or "auto" (the attention projections peft knows for the architecture: query/value
    # for BERT, q_proj/v_proj for Llama and Qwen2, c_attn for GPT-2), or "all-linear".
    target_modules: tuple[str, ...] | Literal["auto", "all-linear"]
    learning_rate: float = Field(gt=0)
    head_learning_rate: float = Field(gt=0)
    lr_scheduler: str
    warmup_fraction: float = Field(ge=0, lt=1)
    weight_decay: float = Field(ge=0)
    epochs: float = Field(gt=0)
    batch_size: int = Field(ge=1)
    eval_batch_size: int = Field(ge=1)
    max_length: int = Field(ge=8)
    early_stopping_patience: int = Field(ge=1)
    device: Literal["auto", "cpu", "cuda"]
    # Cap on training examples (0 = all); for smoke runs and benchmarks.
    max_train_examples: int = Field(ge=0)
    # Data-parallel training processes (DDP: NCCL on GPUs, gloo on CPU); 1 = a single process.
    # batch_size stays the global batch: each process takes batch_size / processes examples per step.
    processes: int = Field(ge=1)
    # Recompute activations in the backward pass: less memory for larger decoders, about a third slower.
    gradient_checkpointing: bool
    # "4bit": QLoRA (the frozen base in NF4 with bitsandbytes), CUDA only; "none" elsewhere.
    quantization: Literal["none", "4bit"]


class GenerationParams(_Frozen):
    """Supervised fine-tuning of a causal LM on (message, target) pairs (`pipelines.sft`)."""

    input_column: str
    target_column: str
    system_prompt: str = Field(min_length=1)
    max_input_tokens: int = Field(ge=8)
    max_target_tokens: int = Field(ge=1)
    max_new_tokens: int = Field(ge=1)


class CounterfactualParams(_Frozen):
    max_examples: int = Field(ge=1)
    attributes: dict[str, tuple[str, ...]]


class GateParams(_Frozen):
    min_accuracy: float
    min_macro_f1: float
    max_group_accuracy_gap: float
    max_counterfactual_flip_rate: float
    max_counterfactual_accuracy_gap: float
    max_expected_calibration_error: float


class GenerationGateParams(_Frozen):
    """Gates of a generation model (`task: generation`; metrics of pipelines/evaluate_generation.py)."""

    min_json_valid_rate: float = Field(ge=0, le=1)
    min_exact_match: float = Field(ge=0, le=1)
    min_field_micro_f1: float = Field(ge=0, le=1)
    min_reply_rouge_l: float = Field(ge=0, le=1)
    max_group_field_accuracy_gap: float = Field(ge=0, le=1)
    max_counterfactual_field_change_rate: float = Field(ge=0, le=1)


class BehaviouralGateParams(_Frozen):
    """Optional gates on behavioural failure rates; None = report only, not checked."""

    # Worst of the four invariance failure rates (typos, casing, names, punctuation).
    max_inv_failure_rate: float | None = Field(ge=0, le=1)
    max_dir_failure_rate: float | None = Field(ge=0, le=1)
    max_mft_failure_rate: float | None = Field(ge=0, le=1)


class BehaviouralParams(_Frozen):
    """CheckList-style behavioural tests (evaluation/behavioural.py) run by the `evaluate` stage."""

    # YAML file of minimum-functionality and negation cases, keyed by intent (format at its top).
    cases_path: str
    # Test utterances perturbed for the invariance tests (a seeded sample when there are more).
    max_examples: int = Field(ge=1)
    seed: int
    # Perturbed versions per utterance for the typo and name tests (casing and punctuation use all theirs).
    variants_per_example: int = Field(ge=1)
    # Share of the words longer than 3 letters that get a typo (at least one word per utterance).
    typo_rate: float = Field(gt=0, le=1)
    names: tuple[str, ...] = Field(min_length=2)
    # How a name goes into an utterance that has none of `names`: each holds {name} and {text}.
    name_templates: tuple[str, ...] = Field(min_length=1)
    # Failing examples kept per test type in metrics/behavioural.json.
    failing_examples: int = Field(ge=0)
    gates: BehaviouralGateParams

    @field_validator("name_templates")
    @classmethod
    def _templates_have_slots(cls, templates: tuple[str, ...]) -> tuple[str, ...]:
        for template in templates:
            if "{name}" not in template or "{text}" not in template:
                raise ValueError(f"name template {template!r} must contain both {{name}} and {{text}}")
        return templates


class EvaluateParams(_Frozen):
    batch_size: int = Field(ge=1)
    counterfactual: CounterfactualParams
    gates: GateParams
    generation_gates: GenerationGateParams
    behavioural: BehaviouralParams

    def gate_thresholds(self, task: Task) -> dict[str, float | None]:
        """Every gate a model of ``task`` must pass (quality, bias and behavioural), by gate name."""
        task_gates = self.generation_gates if task == "generation" else self.gates
        return {**task_gates.model_dump(), **self.behavioural.gates.model_dump()}


class ModelGateParams(_Frozen):
    """Merge gate on pull requests: how far a headline metric may drop against the base branch."""

    max_metric_drop: dict[str, float]


class GatewayParams(_Frozen):
    """What the gateway accepts per request and per API key, and how its inference log is written."""

    # Longest text (characters) and largest batch one /v1/predict request may carry.
    max_text_chars: int = Field(ge=1)
    max_batch_size: int = Field(ge=1)
    # Largest request body (bytes) read before refusing with 413.
    max_body_bytes: int = Field(ge=1)
    # Token bucket per API key / token subject, one token per text: sustained texts per second, burst.
    rate_limit_per_s: float = Field(gt=0)
    rate_limit_burst: int = Field(ge=1)
    # Inference log: bounded queue between request handlers and the writer thread.
    log_queue_size: int = Field(ge=1)
    # Rows per INSERT transaction, and the longest a row waits in the writer before it is written.
    log_batch_size: int = Field(ge=1)
    log_flush_interval_s: float = Field(gt=0)
    # When the queue is full, a request waits this long for room; then its log rows are dropped and counted.
    log_enqueue_timeout_s: float = Field(ge=0)
    # Region assumed for phone numbers written without a country code when masking PII.
    pii_phone_region: str
    # Clock skew tolerated on JWT exp/nbf/iat.
    jwt_leeway_s: float = Field(ge=0)
    # Longest wait for the identity provider's JWKS before a request gets 503 (not a hang).
    jwt_jwks_timeout_s: float = Field(gt=0)
    # Failed authentication attempts per client address: refill per second and burst (then 429).
    failed_auth_rate_per_s: float = Field(gt=0)
    failed_auth_burst: int = Field(ge=1)
    # Attempts (with doubling back-off) to write a log batch before its rows go to the dead-letter file.
    log_write_attempts: int = Field(ge=1)
    # Dead-letter file (JSON lines, PII masked), relative to TUNELOOP_HOME; null: beside the SQLite log.
    log_dead_letter_path: str | None
    # Inference and feedback rows older than this are deleted by the retention flow.
    log_retention_days: float = Field(gt=0)
    # /v1/generate: most new tokens one answer may ask for (more is a 422 that names this limit).
    max_new_tokens: int = Field(160, ge=1)
    # /v1/generate's own token bucket per API key / token subject, in generated tokens: each text
    # reserves its max_new_tokens before the model runs; the part not generated is given back after.
    generate_tokens_per_s: float = Field(200.0, gt=0)
    generate_token_burst: int = Field(10240, ge=1)


class RegistryParams(_Frozen):
    """Champion/challenger knobs: how sure and how much better a candidate must be than `prod`."""

    model_name: str
    # McNemar p-value below which a difference in correctness against prod counts as real.
    significance_level: float = Field(gt=0, lt=1)
    # Smallest accuracy gain (absolute) that a significant difference needs to be called an improvement.
    min_improvement: float = Field(ge=0, lt=1)
    # When true, a candidate that is not a significant improvement over prod is not promoted to dev.
    require_improvement: bool
    # `tuneloop reproduce`: largest absolute difference per headline metric, registered vs rebuilt.
    reproduce_tolerance: float = Field(ge=0)


class ServingParams(_Frozen):
    """How `tuneloop serve` follows its alias and swaps model servers without dropping requests."""

    # How often the registry alias is read; an alias move is served at most this much later (+ start-up).
    poll_interval_s: float = Field(gt=0)
    # A new model server must answer /ping and a warm-up prediction within this time, or it is abandoned.
    start_timeout_s: float = Field(gt=0)
    # Longest wait for requests still running on the old server before it is stopped anyway.
    drain_timeout_s: float = Field(gt=0)
    # A version that failed to start is retried after this long (the old one keeps serving meanwhile).
    retry_failed_after_s: float = Field(gt=0)
    workers: int = Field(ge=1)
    # Per-request limit inside the model server and for the gateway's call to it.
    request_timeout_s: int = Field(ge=1)
    default_top_k: int = Field(ge=1)
    # Texts per forward pass inside the model server (a request's batch is split into these).
    batch_size: int = Field(ge=1)
    # Aliases served only when the tracking server's own approval and promotion records back the
    # version (registry/server_rules.py); applies when the registry is a tracking server.
    vetted_aliases: tuple[str, ...]
    # The gateway's log lines: `text` for a terminal, `json` (one object per line, with request_id) for
    # a log pipeline. TUNELOOP_LOG_FORMAT overrides it.
    log_format: Literal["text", "json"] = "text"
    # Gateway micro-batching: coalesced texts per model-server call, and the longest wait for others
    # while a model-server worker is free (0 = off; an idle server is never kept waiting).
    micro_batch_max_texts: int = Field(default=64, ge=1)
    micro_batch_max_wait_ms: float = Field(default=5, ge=0)
    # Answers cached per gateway, keyed by version, top_k and normalised text (0 = no cache).
    cache_size: int = Field(default=10000, ge=0)
    # `int8`: dynamically quantised Linear layers on CPU, bf16 on GPU; `none`: as trained.
    quantize: Literal["none", "int8"] = "none"
    # Circuit breaker: failures in a row that open it, how long it stays open before a trial call,
    # and how often the model server's /ping is probed.
    breaker_failures: int = Field(default=5, ge=1)
    breaker_open_s: float = Field(default=10, gt=0)
    health_check_interval_s: float = Field(default=2, gt=0)
    # Alias loaded beside prod to answer while the breaker is open ("" = none).
    fallback_alias: str = "previous-prod"


class CanaryParams(_Frozen):
    """`tuneloop canary`: which alias is tried on live traffic and the SLOs that end it automatically."""

    candidate_alias: str = "dev"
    # The SLOs are judged only once the canary answered this many requests.
    min_requests: int = Field(default=50, ge=1)
    max_error_rate: float = Field(default=0.02, ge=0, le=1)
    max_p99_latency_ms: float = Field(default=1500, gt=0)
    significance: float = Field(default=0.05, gt=0, lt=1)


class DemoParams(_Frozen):
    """`tuneloop demo`: how much traffic each scene sends, and how long a step may take before it fails."""

    stable_requests: int = Field(default=200, ge=1)
    # The drift job reads the newest monitoring.window_size predictions: fill it with drifted ones.
    drifted_requests: int = Field(default=500, ge=1)
    request_rate_per_s: float = Field(default=20.0, gt=0)
    seed: int = 0
    stack_timeout_s: float = Field(default=300, gt=0)
    serve_timeout_s: float = Field(default=300, gt=0)
    training_timeout_s: float = Field(default=1800, gt=0)


class FalseAlarmWeights(_Frozen):
    """Shares of ``monitoring.false_alarm_rate`` per test (weighted Bonferroni): only ratios matter."""

    accuracy: float = Field(gt=0)
    estimated_accuracy: float = Field(gt=0)
    macro_f1: float = Field(gt=0)
    # Each of the five data signals: text, its three descriptors, predicted labels.
    each_data_signal: float = Field(gt=0)


class MonitoringParams(_Frozen):
    """Drift job and retraining trigger: window, reference, false-alarm budget, labelled-data gates."""

    window_size: int = Field(ge=1)
    min_window_size: int = Field(ge=1)
    reference_size: int = Field(ge=10)
    reference_seed: int
    # Held-out splits (never trained on) whose answers are the reference quality and calibrate CBPE.
    quality_reference_splits: tuple[Literal["train", "val", "test"], ...] = Field(min_length=1)
    # Per-window chance of any false drift flag on unchanged traffic, split over its tests by weight.
    false_alarm_rate: float = Field(gt=0, lt=1)
    test_weights: FalseAlarmWeights
    # The accuracy CUSUM's threshold holds over the labels it runs on, rounded up to a multiple of this.
    cusum_step_labels: int = Field(ge=10)
    text_method: Literal["perc_text_content_drift", "abs_text_content_drift"]
    text_auc_threshold: float = Field(gt=0.5, lt=1)
    min_accuracy_drop: float = Field(ge=0, lt=1)
    min_macro_f1_drop: float = Field(ge=0, lt=1)
    bootstrap_samples: int = Field(ge=100)
    # Concept drift is tested only on windows with at least this much feedback.
    min_labelled_for_quality: int = Field(ge=5)
    min_labelled_examples: int = Field(ge=1)
    # Feedback on predictions older than this is not looked at (it is read from the log each run).
    feedback_lookback_hours: float = Field(gt=0)
    cooldown_hours: float = Field(ge=0)
    retrain_on_data_drift: bool
    feedback_group_value: str
    # Branch the appended data version's `.dvc` pointer is committed on; None: the checked-out branch.
    data_branch: str | None
    # Largest share of the labelled feedback one principal (API key / JWT subject) may contribute to
    # the data the drift job appends for retraining; 1.0 = no cap.
    max_feedback_share_per_principal: float = Field(gt=0, le=1)
    # `task: generation`: the held-out split the model answers for the reference share of valid
    # answers, and the smallest drop of that share (absolute) that counts as output-validity drift.
    generation_reference_split: Literal["train", "val", "test"] = "val"
    min_validity_drop: float = Field(default=0.05, ge=0, lt=1)


class OrchestrationParams(_Frozen):
    """Prefect: work pool, one-training-at-a-time limit, timeouts and retries of the flow tasks."""

    # Default pool name; TUNELOOP_WORK_POOL overrides it (see flows/deploy.py).
    work_pool: str
    concurrency_limit: str
    max_concurrent_trainings: int = Field(ge=1)
    # Prefect renews a held slot while its run lives; a dead run's slot frees this long after (min 60 s).
    slot_lease_s: float = Field(ge=60)
    train_timeout_s: float = Field(gt=0)
    stage_timeout_s: float = Field(gt=0)
    io_retries: int = Field(ge=0)
    io_retry_delays_s: tuple[float, ...] = Field(min_length=1)


# What a device kind costs by the hour (`cost.device_hour_usd`); the train stage's device names start with it.
DeviceKind = Literal["cpu", "cuda"]


class CostParams(_Frozen):
    """Price table (list prices, set them for your own cloud) and the cost arithmetic on it.

    Pure functions of their arguments: the train stage, the registry's evaluation card, the gateway's
    cost gauge and `tuneloop status` all compute with these, so one price table gives one figure.
    """

    # USD per hour of one device (one process's CPU share or one GPU), by device kind.
    device_hour_usd: dict[DeviceKind, float]
    # USD per GB (10^9 bytes) of artifact storage per month.
    storage_gb_month_usd: float = Field(ge=0)
    # The device kind the model servers run on, whose hourly price the gateway's cost gauge uses.
    serving_device: DeviceKind

    @field_validator("device_hour_usd")
    @classmethod
    def _prices_known_and_non_negative(cls, prices: dict[str, float]) -> dict[str, float]:
        missing = {"cpu", "cuda"} - set(prices)
        if missing:
            raise ValueError(f"cost.device_hour_usd lacks a price for {sorted(missing)}")
        negative = sorted(kind for kind, price in prices.items() if price < 0)
        if negative:
            raise ValueError(f"cost.device_hour_usd is negative for {negative}")
        return prices

    def device_hour_price(self, device: str) -> float:
        """USD per hour of ``device``: a kind (``cuda``) or a device name (``cuda (bf16 autocast)``)."""
        kind = device_kind(device)
        return self.device_hour_usd[kind]

    def training_cost(self, seconds: float, processes: int, device: str) -> dict[str, float]:
        """Device-hours (wall time x processes, each holding one device) and their USD at list price."""
        hours = device_hours(seconds, processes)
        return {
            "cost/device_hours": _significant(hours),
            "cost/training_usd": _significant(hours * self.device_hour_price(device)),
        }

    def storage_cost(self, size_bytes: int) -> dict[str, float]:
        """An artifact's size in GB and what keeping it costs per month."""
        gigabytes = size_bytes / 1e9
        return {
            "cost/artifact_gb": _significant(gigabytes),
            "cost/storage_usd_per_month": _significant(gigabytes * self.storage_gb_month_usd),
        }


def _significant(value: float, digits: int = 6) -> float:
    """``value`` to ``digits`` significant digits: a small run's cents keep their precision."""
    return float(f"{value:.{digits}g}")


def device_kind(device: str) -> DeviceKind:
    """``cpu`` or ``cuda`` from a device name such as ``cuda (bf16 autocast)`` or ``cuda:0``."""
    kind = device.split()[0].split(":")[0] if device.strip() else ""
    if kind not in ("cpu", "cuda"):
        raise ValueError(f"no price for device {device!r}: cost.device_hour_usd knows cpu and cuda")
    return "cuda" if kind == "cuda" else "cpu"


def device_hours(seconds: float, processes: int) -> float:
    """Hours of device time: ``seconds`` of wall time on each of ``processes`` devices."""
    if seconds < 0 or processes < 1:
        raise ValueError(f"device time needs seconds >= 0 and processes >= 1, not {seconds}, {processes}")
    return seconds * processes / 3600


def cost_per_1000_predictions(
    compute_seconds: float, predictions: int, device_hour_usd: float
) -> float | None:
    """USD per 1,000 predictions from the measured compute time they took; None before any prediction."""
    if predictions <= 0:
        return None
    return compute_seconds / 3600 * device_hour_usd / predictions * 1000


class Params(_Frozen):
    task: Task = "classification"
    data: DataParams
    prepare: PrepareParams
    validate_: ValidateParams = Field(alias="validate")
    model: ModelParams
    train: TrainParams
    generation: GenerationParams
    evaluate: EvaluateParams
    model_gate: ModelGateParams
    registry: RegistryParams
    gateway: GatewayParams
    serving: ServingParams
    canary: CanaryParams = CanaryParams()
    monitoring: MonitoringParams
    demo: DemoParams = DemoParams()
    orchestration: OrchestrationParams
    cost: CostParams


def load_params(path: str | Path = "params.yaml") -> Params:
    """Parse ``params.yaml`` into typed, validated settings; a wrong key or value fails here, early."""
    with open(path, encoding="utf-8") as handle:
        raw = yaml.safe_load(handle) or {}
    return Params.model_validate(raw)


def _optional_path(variable: str) -> Path | None:
    value = os.environ.get(variable)
    return Path(value) if value else None


class Environment(_Frozen):
    """Environment-specific settings, from variables with documented defaults (see README).

    This is the one place tuneloop reads its environment variables; everything else gets an
    ``Environment`` passed in.
    """

    project_dir: Path
    home_dir: Path
    # Shared stores (docs/shared-stores.md): a PostgreSQL server and an S3 location for the whole stack.
    database_url: SecretStr | None = None
    database_prefix: str = ""
    s3_url: str | None = None
    s3_endpoint_url: str | None = None
    tracking_uri: str
    experiment_name: str
    dvc_remote_url: str
    # Gateway: inference log (SQLAlchemy URL), API key file, JWT verification (off unless an issuer is set).
    inference_log_url: str
    api_keys_path: Path
    jwt_issuer: str | None = None
    jwt_audience: str | None = None
    jwt_key: SecretStr | None = None
    jwt_key_path: Path | None = None
    jwt_jwks_url: str | None = None
    jwt_algorithms: tuple[str, ...] = ("RS256",)
    # Stable address of each environment's gateway (`tuneloop serve --env dev|prod`).
    gateway_urls: dict[str, str]
    # The key `tuneloop simulate-traffic` sends (scopes predict + feedback).
    api_key: SecretStr | None = None
    # Prefect work pool override (one pool per machine or environment); None: params.yaml's.
    work_pool: str | None = None
    # Ports of the local stack that `tuneloop up` starts.
    mlflow_port: int
    prefect_port: int
    # `tuneloop up --stores postgres+s3`: where its local PostgreSQL and S3 endpoint listen.
    postgres_port: int = DEFAULT_POSTGRES_PORT
    s3_port: int = DEFAULT_S3_PORT
    # The password `tuneloop users add` gives a new user when no --password-file is given.
    new_user_password: SecretStr | None = None
    # `tuneloop serve` speaks HTTPS with this certificate chain and key (both or neither).
    tls_cert_file: Path | None = None
    tls_key_file: Path | None = None
    # The CA that tuneloop's clients trust for the gateways (default: the system's trust store).
    tls_ca_file: Path | None = None
    # `tuneloop serve`'s log format, overriding serving.log_format (`text` or `json`; checked at start).
    log_format: str | None = None
    # `tuneloop up`: the MLflow admin's password (default: generated into $TUNELOOP_HOME/secrets).
    mlflow_admin_password: SecretStr | None = None
    # The identity the promotion flow acts as on the tracking server (default: the process's own).
    deployer_username: str | None = None
    deployer_password_file: Path | None = None

    @property
    def stores(self) -> SharedStores:
        return SharedStores(
            self.database_url.get_secret_value() if self.database_url else None,
            self.s3_url,
            self.s3_endpoint_url,
            self.database_prefix,
        )

    def tls_client_context(self) -> ssl.SSLContext:
        """How tuneloop's HTTP clients verify a gateway: always, against ``tls_ca_file`` when set."""
        return ssl.create_default_context(cafile=str(self.tls_ca_file) if self.tls_ca_file else None)

    @classmethod
    def from_env(cls, project_dir: str | Path | None = None) -> Environment:
        project = Path(project_dir or os.getcwd()).resolve()
        home = Path(os.environ.get("TUNELOOP_HOME", project / ".tuneloop")).resolve()
        paths = HomePaths(home)
        # Empty means unset; the secrets are wrapped so that a repr or a log line never shows them.
        jwt_key = os.environ.get("TUNELOOP_JWT_KEY")
        jwt_key_file = os.environ.get("TUNELOOP_JWT_KEY_FILE")
        api_key = os.environ.get("TUNELOOP_API_KEY")
        new_password = os.environ.get("TUNELOOP_NEW_USER_PASSWORD")
        admin_password = os.environ.get("TUNELOOP_MLFLOW_ADMIN_PASSWORD")
        database_url = os.environ.get("TUNELOOP_DATABASE_URL") or None
        # Validated here, so that a wrong URL fails at start-up with the variable's name.
        stores = SharedStores(
            database_url,
            os.environ.get("TUNELOOP_S3_URL") or None,
            os.environ.get("TUNELOOP_S3_ENDPOINT_URL") or None,
            os.environ.get("TUNELOOP_DATABASE_PREFIX", ""),
        )
        return cls(
            project_dir=project,
            home_dir=home,
            database_url=SecretStr(database_url) if database_url else None,
            database_prefix=stores.database_prefix,
            s3_url=stores.s3_url,
            s3_endpoint_url=stores.s3_endpoint_url,
            tracking_uri=os.environ.get("MLFLOW_TRACKING_URI", f"sqlite:///{paths.mlflow_db}"),
            experiment_name=os.environ.get("TUNELOOP_EXPERIMENT", "tuneloop"),
            dvc_remote_url=os.environ.get(
                "TUNELOOP_DVC_REMOTE", stores.dvc_remote_url or str(paths.dvc_remote)
            ),
            inference_log_url=os.environ.get(
                "TUNELOOP_INFERENCE_LOG_URL",
                stores.inference_log_url or f"sqlite:///{paths.inference_log_db}",
            ),
            api_keys_path=Path(os.environ.get("TUNELOOP_API_KEYS_FILE", paths.api_keys)),
            jwt_issuer=os.environ.get("TUNELOOP_JWT_ISSUER") or None,
            jwt_audience=os.environ.get("TUNELOOP_JWT_AUDIENCE") or None,
            jwt_key=SecretStr(jwt_key) if jwt_key else None,
            jwt_key_path=Path(jwt_key_file) if jwt_key_file else None,
            jwt_jwks_url=os.environ.get("TUNELOOP_JWT_JWKS_URL") or None,
            jwt_algorithms=tuple(
                os.environ.get("TUNELOOP_JWT_ALGORITHMS", "RS256").replace(",", " ").split()
            ),
            gateway_urls={
                alias: os.environ.get(f"TUNELOOP_{alias.upper()}_URL", f"http://127.0.0.1:{port}")
                for alias, port in DEFAULT_GATEWAY_PORTS.items()
            },
            api_key=SecretStr(api_key) if api_key else None,
            work_pool=os.environ.get(WORK_POOL_ENV) or None,
            mlflow_port=int(os.environ.get("TUNELOOP_MLFLOW_PORT", DEFAULT_MLFLOW_PORT)),
            prefect_port=int(os.environ.get("TUNELOOP_PREFECT_PORT", DEFAULT_PREFECT_PORT)),
            postgres_port=int(os.environ.get("TUNELOOP_POSTGRES_PORT", DEFAULT_POSTGRES_PORT)),
            s3_port=int(os.environ.get("TUNELOOP_S3_PORT", DEFAULT_S3_PORT)),
            new_user_password=SecretStr(new_password) if new_password else None,
            tls_cert_file=_optional_path("TUNELOOP_TLS_CERT_FILE"),
            tls_key_file=_optional_path("TUNELOOP_TLS_KEY_FILE"),
            tls_ca_file=_optional_path("TUNELOOP_TLS_CA_FILE"),
            log_format=os.environ.get("TUNELOOP_LOG_FORMAT") or None,
            mlflow_admin_password=SecretStr(admin_password) if admin_password else None,
            deployer_username=os.environ.get("TUNELOOP_DEPLOYER_USERNAME") or None,
            deployer_password_file=_optional_path("TUNELOOP_DEPLOYER_PASSWORD_FILE"),
        )

    @property
    def paths(self) -> HomePaths:
        return HomePaths(self.home_dir)

    @property
    def artifact_root(self) -> Path:
        return self.paths.artifact_root
