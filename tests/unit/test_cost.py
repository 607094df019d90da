"""Cost figures: the price table's arithmetic (tuneloop/config.py), the train stage's cost metrics, the
evaluation card's Cost section and the gateway's cost per 1,000 predictions, on made-up numbers."""

from __future__ import annotations

import pytest
from pydantic import ValidationError

from tuneloop.config import CostParams, cost_per_1000_predictions, device_hours, device_kind, load_params

# Round prices so that every expected figure can be checked by hand.
PRICES = {"device_hour_usd": {"cpu": 0.5, "cuda": 3.0}, "storage_gb_month_usd": 0.02, "serving_device": "cpu"}


@pytest.fixture()
def cost() -> CostParams:
    return CostParams.model_validate(PRICES)


@pytest.mark.parametrize(
    ("name", "kind"),
    [("cpu", "cpu"), ("cuda", "cuda"), ("cuda (bf16 autocast)", "cuda"), ("cuda:1", "cuda")],
)
def test_device_kind_reads_the_train_stages_device_names(name: str, kind: str) -> None:
    assert device_kind(name) == kind


@pytest.mark.parametrize("name", ["mps", "", "tpu (v5)"])
def test_a_device_without_a_price_is_refused_by_name(name: str) -> None:
    with pytest.raises(ValueError, match="no price for device"):
        device_kind(name)


def test_device_hours_count_every_process() -> None:
    assert device_hours(1800, 1) == 0.5
    assert device_hours(1800, 4) == 2.0
    with pytest.raises(ValueError):
        device_hours(10, 0)
    with pytest.raises(ValueError):
        device_hours(-1, 1)


def test_training_cost_is_device_hours_at_the_device_kinds_price(cost: CostParams) -> None:
    assert cost.training_cost(3600, 2, "cuda (bf16 autocast)") == {
        "cost/device_hours": 2.0,
        "cost/training_usd": 6.0,
    }
    assert cost.training_cost(720, 1, "cpu") == {"cost/device_hours": 0.2, "cost/training_usd": 0.1}


def test_storage_cost_per_month(cost: CostParams) -> None:
    assert cost.storage_cost(2_500_000_000) == {"cost/artifact_gb": 2.5, "cost/storage_usd_per_month": 0.05}


def test_cost_per_1000_predictions_from_measured_seconds() -> None:
    # 36 s of model time at $1/hour is $0.01 for 500 texts: $0.02 per 1,000.
    assert cost_per_1000_predictions(36, 500, 1.0) == pytest.approx(0.02)
    assert cost_per_1000_predictions(0.0, 0, 1.0) is None


@pytest.mark.parametrize(
    "prices",
    [
        PRICES | {"device_hour_usd": {"cpu": 0.5}},
        PRICES | {"device_hour_usd": {"cpu": 0.5, "cuda": -1.0}},
        PRICES | {"device_hour_usd": {"cpu": 0.5, "cuda": 1.0, "tpu": 1.0}},
        PRICES | {"storage_gb_month_usd": -0.1},
        PRICES | {"serving_device": "gpu"},
    ],
)
def test_a_wrong_price_table_fails_when_params_load(prices: dict) -> None:
    with pytest.raises(ValidationError):
        CostParams.model_validate(prices)


def test_the_projects_params_have_a_price_for_every_device_kind() -> None:
    from tests.support import REPO_ROOT

    cost = load_params(REPO_ROOT / "params.yaml").cost
    assert set(cost.device_hour_usd) == {"cpu", "cuda"}
    assert cost.device_hour_price(cost.serving_device) >= 0


def test_train_metrics_carry_the_runs_cost(cost: CostParams) -> None:
    from pipelines.train import TrainResult, train_metrics

    history = [{"epoch": 1.0, "train_loss": 1.0, "val_loss": 0.5, "val_accuracy": 0.9, "val_macro_f1": 0.8}]
    result = TrainResult(
        history=history,
        best_epoch=1.0,
        train_examples=100,
        epochs_run=1.0,
        loop_seconds=1000.0,
        total_seconds=1800.0,
        device="cuda (bf16 autocast)",
        trainable_parameters=10,
        total_parameters=100,
        processes=2,
    )
    metrics = train_metrics(result, cost, adapter_bytes=500_000_000)
    assert metrics["cost/device_hours"] == 1.0
    assert metrics["cost/training_usd"] == 3.0
    assert metrics["cost/storage_usd_per_month"] == 0.01
    assert not any(key.startswith("cost/") for key in train_metrics(result))


def test_the_evaluation_card_has_a_cost_section_only_when_the_run_logged_one() -> None:
    from registry.register import Lineage, evaluation_card

    lineage = Lineage(data_md5="d", git_commit="g", dvc_lock_md5="l")
    common = ("m", {"quality/accuracy": 0.9}, {"passed": True}, {}, None, None, {}, [], lineage, "run")
    cost = {
        "cost/device_hours": 0.25,
        "cost/training_usd": 0.125,
        "cost/artifact_gb": 0.005,
        "cost/storage_usd_per_month": 0.0001,
    }
    card = evaluation_card(*common, cost)
    assert "## Cost" in card
    assert "- training: 0.2500 device-hours, $0.125000" in card
    assert "- adapter storage: 0.0050 GB, $0.000100 per month" in card
    assert card.index("## Cost") < card.index("## Lineage")
    assert "## Cost" not in evaluation_card(*common)


def test_the_gateway_exports_cost_per_1000_predictions_at_scrape_time() -> None:
    from serving.metrics import GatewayMetrics

    metrics = GatewayMetrics(device_hour_usd=3.6)
    assert b"tuneloop_cost_per_1000_predictions_usd" not in metrics.exposition()[0]
    metrics.observe_model_call(1.5, 3)
    metrics.observe_model_call(0.5, 1)
    metrics.observe_model_call(0.2, 0)  # a failed call costs time but answers nothing
    text = metrics.exposition()[0].decode()
    # 2.2 s at $3.60/hour = $0.0022 for 4 texts: $0.55 per 1,000.
    assert "tuneloop_cost_per_1000_predictions_usd 0.55" in text
    assert "tuneloop_model_server_texts_total 4.0" in text
    assert "tuneloop_device_hour_usd 3.6" in text
    assert "tuneloop_cost_per_1000" not in GatewayMetrics().exposition()[0].decode()
