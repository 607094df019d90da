"""The MLflow pyfunc that a registered tuneloop version is: adapter (+ base when local) as artifacts.

A PEFT model with a local base must not go through ``mlflow.transformers`` (it reloads with random
LoRA weights), so the version carries the adapter folder and, when the base resolves to a folder, the
base itself, and rebuilds :class:`IntentClassifier` from them on load. The ``serving`` package travels
as code so a machine with only the registry can load the model.

Quantised serving: the classifier pyfunc runs at the precision ``serving.quantize`` names. The value
logged in its model config (``quantize``, from the settings at registration) is the default; the
environment variable ``TUNELOOP_SERVING_QUANTIZE`` (``none`` or ``int8``) overrides it in the process
that loads the model, which is how `tuneloop serve` passes today's ``serving.quantize`` to the model
servers it starts (serving/supervisor.py). The generation pyfunc ignores both: it always serves the
merged causal LM as trained.
"""

from __future__ import annotations

import json
import os
import tempfile
from collections.abc import Mapping
from importlib.metadata import version as installed_version
from pathlib import Path
from typing import Any

import mlflow
import pandas as pd
from mlflow.models import ModelSignature
from mlflow.models.model import ModelInfo
from mlflow.pyfunc import PythonModel, PythonModelContext
from mlflow.types import ColSpec, ParamSchema, ParamSpec, Schema

from serving.generation import TextGenerator, merge_adapter
from serving.inference import MANIFEST_FILE, QUANTIZE_CHOICES, IntentClassifier, resolve_base_model
from tuneloop.config import ServingParams

# Set by the model server's launcher to today's `serving.quantize`; overrides the logged model config.
QUANTIZE_ENV = "TUNELOOP_SERVING_QUANTIZE"
ADAPTER_ARTIFACT = "adapter"
BASE_ARTIFACT = "base"
MERGED_ARTIFACT = "merged"
INPUT_EXAMPLE = pd.DataFrame({"text": ["where is my order?", "I want my money back for the broken lamp"]})


def model_signature(serving: ServingParams) -> ModelSignature:
    """Input, output and request params (defaults: ``serving.default_top_k`` and ``serving.batch_size``)."""
    return ModelSignature(
        inputs=Schema([ColSpec("string", "text")]),
        outputs=Schema([ColSpec("string", "label"), ColSpec("double", "score"), ColSpec("string", "top_k")]),
        params=ParamSchema(
            [
                ParamSpec("top_k", "long", serving.default_top_k),
                ParamSpec("batch_size", "long", serving.batch_size),
            ]
        ),
    )


def pinned_requirements() -> list[str]:
    """Exact versions from this environment; torch without its local tag so the CPU/CUDA wheel is free."""
    pins = {name: installed_version(name) for name in ("transformers", "peft", "mlflow", "pandas", "numpy")}
    torch_version = installed_version("torch").split("+")[0]
    return [f"torch=={torch_version}", *(f"{name}=={value}" for name, value in pins.items())]


def predictions_frame(predictions: list[dict]) -> pd.DataFrame:
    """One row per text; ``top_k`` is a JSON string so every serving format carries it unchanged."""
    return pd.DataFrame(
        {
            "label": [p["label"] for p in predictions],
            "score": [p["score"] for p in predictions],
            "top_k": [json.dumps(p["top_k"]) for p in predictions],
        }
    )


def serving_quantize(model_config: dict[str, Any] | None, environ: Mapping[str, str] = os.environ) -> str:
    """The precision to load at: ``TUNELOOP_SERVING_QUANTIZE`` when set and not empty, else the model
    config's ``quantize`` (versions logged before it existed have none: ``none``)."""
    value = environ.get(QUANTIZE_ENV, "").strip() or str((model_config or {}).get("quantize", "none"))
    if value not in QUANTIZE_CHOICES:
        source = QUANTIZE_ENV if environ.get(QUANTIZE_ENV, "").strip() else "the model config's quantize"
        raise ValueError(f"{source} is {value!r}; it must be one of {', '.join(QUANTIZE_CHOICES)}")
    return value


class IntentPyfunc(PythonModel):
    """Predicts label, score and top-k (JSON) for a DataFrame with a string ``text`` column.

    Loads at the precision :func:`serving_quantize` gives (model config ``quantize``, overridden by
    the ``TUNELOOP_SERVING_QUANTIZE`` environment variable).
    """

    def load_context(self, context: PythonModelContext) -> None:
        base = context.artifacts.get(BASE_ARTIFACT)
        config = dict(context.model_config or {})
        self.classifier = IntentClassifier.load(
            context.artifacts[ADAPTER_ARTIFACT], base=base, quantize=serving_quantize(config)
        )
        # log_intent_model's model_config: default_top_k and batch_size (and quantize, read above).
        self.defaults: dict[str, int] = {key: int(config[key]) for key in ("default_top_k", "batch_size")}

    def predict(
        self, context: PythonModelContext, model_input: pd.DataFrame, params: dict[str, Any] | None = None
    ) -> pd.DataFrame:
        request_params = params or {}
        texts = [str(text) for text in model_input["text"].tolist()]
        predictions = self.classifier.predict(
            texts,
            top_k=int(request_params.get("top_k", self.defaults["default_top_k"])),
            batch_size=int(request_params.get("batch_size", self.defaults["batch_size"])),
        )
        return predictions_frame(predictions)


def model_artifacts(adapter_dir: Path, base: str) -> dict[str, str]:
    """The adapter always; the base folder too when ``base`` resolves to one, so the version is whole.

    A Hugging Face id is not bundled: the adapter's manifest records it and it loads from the hub.
    """
    artifacts = {ADAPTER_ARTIFACT: str(adapter_dir)}
    resolved = Path(resolve_base_model(base))
    if resolved.is_dir():
        artifacts[BASE_ARTIFACT] = str(resolved)
    return artifacts


def log_intent_model(
    adapter_dir: Path, base: str, serving_params: ServingParams, name: str = "model"
) -> ModelInfo:
    """Log the pyfunc into the active MLflow run and return its model info (URI, model id)."""
    import serving

    artifacts = model_artifacts(Path(adapter_dir), base)
    return mlflow.pyfunc.log_model(
        name=name,
        python_model=IntentPyfunc(),
        artifacts=artifacts,
        code_paths=[str(Path(serving.__file__).parent)],
        signature=model_signature(serving_params),
        model_config={
            "default_top_k": serving_params.default_top_k,
            "batch_size": serving_params.batch_size,
            "quantize": serving_params.quantize,
        },
        input_example=INPUT_EXAMPLE,
        pip_requirements=pinned_requirements(),
        metadata={"base_model": base, "base_bundled": BASE_ARTIFACT in artifacts},
    )


GENERATION_EXAMPLE = pd.DataFrame({"text": ["where is my order NW-12345?"]})


def generation_signature(max_new_tokens: int, batch_size: int) -> ModelSignature:
    """A message in, the generated text and its token counts out; ``max_new_tokens`` per request."""
    return ModelSignature(
        inputs=Schema([ColSpec("string", "text")]),
        outputs=Schema(
            [ColSpec("string", "generated"), ColSpec("long", "prompt_tokens"), ColSpec("long", "new_tokens")]
        ),
        params=ParamSchema(
            [ParamSpec("max_new_tokens", "long", max_new_tokens), ParamSpec("batch_size", "long", batch_size)]
        ),
    )


class GenerationPyfunc(PythonModel):
    """Greedy answers of the merged causal LM for a DataFrame with a string ``text`` column.

    ``serving.quantize`` (and ``TUNELOOP_SERVING_QUANTIZE``) do not apply: the generator is always
    served at the precision it was merged in; quantised generation is not built.
    """

    def load_context(self, context: PythonModelContext) -> None:
        self.generator = TextGenerator.load(context.artifacts[MERGED_ARTIFACT])

    def predict(
        self, context: PythonModelContext, model_input: pd.DataFrame, params: dict[str, Any] | None = None
    ) -> pd.DataFrame:
        request_params = params or {}
        answers = self.generator.generate(
            [str(text) for text in model_input["text"].tolist()],
            max_new_tokens=int(request_params.get("max_new_tokens", self.generator.max_new_tokens)),
            batch_size=int(request_params.get("batch_size", 8)),
        )
        return pd.DataFrame(
            {
                "generated": [answer.text for answer in answers],
                "prompt_tokens": [answer.prompt_tokens for answer in answers],
                "new_tokens": [answer.new_tokens for answer in answers],
            }
        )


def log_generation_model(adapter_dir: Path, serving_params: ServingParams, name: str = "model") -> ModelInfo:
    """Log the generation pyfunc (adapter merged into its base, tokenizer, generation settings)."""
    import serving

    with tempfile.TemporaryDirectory(prefix="tuneloop-merged-") as scratch:
        merged = merge_adapter(Path(adapter_dir), Path(scratch) / MERGED_ARTIFACT)
        manifest = json.loads((merged / MANIFEST_FILE).read_text(encoding="utf-8"))
        return mlflow.pyfunc.log_model(
            name=name,
            python_model=GenerationPyfunc(),
            artifacts={MERGED_ARTIFACT: str(merged)},
            code_paths=[str(Path(serving.__file__).parent)],
            signature=generation_signature(manifest["max_new_tokens"], serving_params.batch_size),
            input_example=GENERATION_EXAMPLE,
            pip_requirements=pinned_requirements(),
            metadata={"task": "generation", "base_model": manifest["base_model"]},
        )
