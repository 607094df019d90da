"""`serving.quantize`: the merged tiny classifier in dynamic int8 on CPU (bf16 on CUDA), the pyfunc's
choice of precision (model config, overridden by TUNELOOP_SERVING_QUANTIZE), and the quantised gates.

The tiny adapter (tests/conftest.py) is trained once per session in a few seconds.
"""

from __future__ import annotations

import numpy as np
import pandas as pd
import pytest
import torch
from mlflow.pyfunc import PythonModelContext
from torch.ao.nn.quantized.dynamic import Linear as DynamicInt8Linear

from evaluation.gates import evaluate_gates
from registry.register import (
    dev_decision,
    quantized_gate_failures,
    quantized_metrics,
    with_quantized_gates,
)
from serving.inference import IntentClassifier, backbone_linear_names
from serving.pyfunc_model import ADAPTER_ARTIFACT, QUANTIZE_ENV, IntentPyfunc, serving_quantize
from tests.support import two_label_slice

CONFIG = {"default_top_k": 2, "batch_size": 8}


@pytest.fixture(scope="module")
def texts() -> list[str]:
    return two_label_slice(rows_per_label=24)["text"].tolist()


@pytest.fixture(scope="module")
def fp32(tiny_adapter) -> IntentClassifier:
    return IntentClassifier.load(tiny_adapter, device="cpu")


@pytest.fixture(scope="module")
def int8(tiny_adapter) -> IntentClassifier:
    return IntentClassifier.load(tiny_adapter, device="cpu", quantize="int8")


def test_int8_replaces_every_backbone_linear_and_keeps_the_head_fp32(fp32, int8):
    backbone = backbone_linear_names(fp32.model)
    assert backbone, "the tiny BERT has Linear layers in its backbone"
    modules = dict(int8.model.named_modules())
    assert all(isinstance(modules[name], DynamicInt8Linear) for name in backbone)
    # Nothing of the LoRA wrapper is left: the adapter was merged before quantising.
    assert not any("lora" in name for name in modules)
    head = [m for name, m in modules.items() if name not in backbone and isinstance(m, torch.nn.Linear)]
    assert len(head) == 1 and type(head[0]) is torch.nn.Linear
    assert torch.equal(head[0].weight, dict(fp32.model.named_modules())["classifier"].weight)
    assert int8.precision == "int8-dynamic" and fp32.precision == "fp32"


def test_int8_predictions_match_fp32_closely(fp32, int8, texts):
    full, small = fp32.predict_proba(texts), int8.predict_proba(texts)
    assert small.shape == full.shape == (len(texts), len(fp32.label_names))
    np.testing.assert_allclose(small.sum(axis=1), 1.0, rtol=1e-5)
    agreement = float(np.mean(full.argmax(1) == small.argmax(1)))
    assert agreement >= 0.9, f"int8 agrees with fp32 on only {agreement:.0%} of the texts"
    assert np.abs(full - small).max() < 0.1
    labels = {p["label"] for p in int8.predict(texts)}
    assert labels <= set(fp32.label_names)


def test_quantize_none_is_what_load_gave_before(tiny_adapter, fp32, texts):
    explicit = IntentClassifier.load(tiny_adapter, device="cpu", quantize="none")
    assert not any(isinstance(m, DynamicInt8Linear) for m in explicit.model.modules())
    assert all(p.dtype == torch.float32 for p in explicit.model.parameters())
    np.testing.assert_array_equal(explicit.predict_proba(texts), fp32.predict_proba(texts))


def test_an_unknown_quantize_value_is_refused(tiny_adapter):
    with pytest.raises(ValueError, match="quantize must be one of"):
        IntentClassifier.load(tiny_adapter, device="cpu", quantize="int4")


@pytest.mark.parametrize(
    ("config", "environ", "expected"),
    [
        ({}, {}, "none"),  # a version logged before `quantize` existed
        ({"quantize": "int8"}, {}, "int8"),
        ({"quantize": "int8"}, {QUANTIZE_ENV: "none"}, "none"),
        ({"quantize": "none"}, {QUANTIZE_ENV: "int8"}, "int8"),
        ({"quantize": "int8"}, {QUANTIZE_ENV: " "}, "int8"),  # set but empty: not an override
    ],
)
def test_the_environment_overrides_the_logged_quantize(config, environ, expected):
    assert serving_quantize(config, environ) == expected


def test_a_bad_override_names_the_variable():
    with pytest.raises(ValueError, match=QUANTIZE_ENV):
        serving_quantize({"quantize": "none"}, {QUANTIZE_ENV: "fp8"})


@pytest.mark.parametrize(
    ("logged", "env", "expected"),
    [("none", "int8", "int8"), ("int8", None, "int8"), ("int8", "none", "none")],
)
def test_the_pyfunc_loads_at_the_precision_asked(tiny_adapter, monkeypatch, texts, logged, env, expected):
    if env is None:
        monkeypatch.delenv(QUANTIZE_ENV, raising=False)
    else:
        monkeypatch.setenv(QUANTIZE_ENV, env)
    pyfunc = IntentPyfunc()
    pyfunc.load_context(
        PythonModelContext({ADAPTER_ARTIFACT: str(tiny_adapter)}, {**CONFIG, "quantize": logged})
    )
    assert pyfunc.classifier.quantize == expected
    quantized = any(isinstance(m, DynamicInt8Linear) for m in pyfunc.classifier.model.modules())
    assert quantized == (expected == "int8")
    assert pyfunc.defaults == CONFIG
    answer = pyfunc.predict(None, pd.DataFrame({"text": texts[:3]}))  # type: ignore[arg-type]
    assert list(answer.columns) == ["label", "score", "top_k"] and len(answer) == 3


def test_quantized_metrics_and_deltas():
    truth = np.array(["a", "a", "b", "b"])
    metrics = quantized_metrics(truth, np.array(["a", "a", "b", "b"]), np.array(["a", "b", "b", "b"]))
    assert metrics["quantized/accuracy"] == pytest.approx(0.75)
    assert metrics["quantized/fp32_accuracy"] == pytest.approx(1.0)
    assert metrics["quantized/accuracy_delta"] == pytest.approx(-0.25)
    assert metrics["quantized/macro_f1_delta"] == pytest.approx(metrics["quantized/macro_f1"] - 1.0)
    assert metrics["quantized/agreement"] == pytest.approx(0.75)


def test_a_quantised_model_below_the_gate_blocks_dev_though_fp32_passes():
    fp32 = {"quality/accuracy": 0.90, "quality/macro_f1": 0.90}
    gates = evaluate_gates(fp32, {"min_accuracy": 0.85, "min_macro_f1": None})
    assert gates["passed"]
    quantized = {"quantized/accuracy": 0.84, "quantized/macro_f1": 0.83}
    verdict = with_quantized_gates(gates, quantized)
    assert not verdict["passed"] and verdict["failed"] == ["quantized_min_accuracy"]
    reasons = dev_decision(verdict, None, require_improvement=False)
    assert reasons == ["gate failed: quantized/accuracy = 0.8400, must be >= 0.8500: FAILED"]
    # The macro-F1 gate is off, so it is not applied to the quantised model either.
    assert [g["name"] for g in verdict["gates"]] == ["min_accuracy", "quantized_min_accuracy"]
    # Promotion's re-check with today's thresholds reads the same tags.
    assert quantized_gate_failures({"min_accuracy": 0.85, "min_macro_f1": 0.8}, quantized) == [
        "quantized/accuracy = 0.8400, must be >= 0.8500: FAILED"
    ]
    # Without quantised numbers (serving.quantize: none) nothing changes.
    assert with_quantized_gates(gates, {}) is gates
    assert with_quantized_gates(gates, {"quantized/accuracy": 0.86, "quantized/macro_f1": 0.1})["passed"]


@pytest.mark.gpu
@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA device")
def test_int8_on_cuda_serves_half_precision(tiny_adapter, fp32, texts):
    gpu = IntentClassifier.load(tiny_adapter, device="cuda", quantize="int8")
    expected = torch.bfloat16 if torch.cuda.is_bf16_supported() else torch.float16
    assert all(p.dtype == expected for p in gpu.model.parameters())
    assert gpu.precision in {"bf16", "fp16"}
    agreement = float(np.mean(gpu.predict_proba(texts).argmax(1) == fp32.predict_proba(texts).argmax(1)))
    assert agreement >= 0.9
