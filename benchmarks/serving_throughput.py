"""Throughput of the stable address under concurrency: micro-batching on and off, int8 against fp32.

    python -m benchmarks.serving_throughput --adapter .tuneloop/banking77/adapter --seconds 20

The adapter is registered in a throwaway registry (as benchmarks/serving_latency.py does) and served
by `tuneloop serve` three times, one configuration each, all in one run:

- ``fp32_unbatched``: every request its own model-server call (``micro_batch_max_wait_ms: 0``), the
  baseline;
- ``fp32_batched``: adaptive micro-batching (params.yaml's wait and batch size);
- ``int8_batched``: the same, with ``serving.quantize: int8``.

For each, 1, 8 and 32 concurrent clients send one banking77 test text per request, back to back, for
``--seconds`` each; the response cache is off, so every text is computed. The accuracy of int8 against
fp32 is measured in process on the whole banking77 test set. JSON goes to
``benchmarks/results/serving_throughput.json`` with texts/s, p50/p99 per request, and the ratios.
"""

from __future__ import annotations

import asyncio
import json
import logging
import os
import platform
import tempfile
import time
from pathlib import Path

import httpx
import numpy as np
import torch
from tqdm.auto import tqdm

from benchmarks.serving_latency import (
    banking77_test,
    percentile,
    register_adapter,
    served_model_parser,
    start_gateway,
)
from serving.auth import API_KEY_HEADER, create_api_key
from serving.inference import IntentClassifier
from tuneloop.config import load_params

log = logging.getLogger("benchmarks.serving_throughput")

CONCURRENCY = (1, 8, 32)
CONFIGURATIONS: dict[str, dict] = {
    "fp32_unbatched": {"micro_batch_max_wait_ms": 0, "quantize": "none"},
    "fp32_batched": {"quantize": "none"},
    "int8_batched": {"quantize": "int8"},
}


async def drive(url: str, api_key: str, texts: list[str], clients: int, seconds: float) -> dict:
    """``clients`` callers posting one text each, back to back, for ``seconds``; latency per request."""
    latencies: list[float] = []
    failures = 0
    deadline = time.perf_counter() + seconds

    async def caller(offset: int, http: httpx.AsyncClient) -> None:
        nonlocal failures
        index = offset
        while time.perf_counter() < deadline:
            started = time.perf_counter()
            response = await http.post(
                f"{url}/v1/predict",
                json={"text": texts[index % len(texts)]},
                headers={API_KEY_HEADER: api_key},
            )
            if response.status_code == 200:
                latencies.append(time.perf_counter() - started)
            else:
                failures += 1
            index += clients

    limits = httpx.Limits(max_connections=clients, max_keepalive_connections=clients)
    async with httpx.AsyncClient(timeout=120, limits=limits) as http:
        await caller(0, http)  # warm-up request, then the timed run
        latencies.clear()
        deadline = time.perf_counter() + seconds
        started = time.perf_counter()
        await asyncio.gather(*(caller(n, http) for n in range(clients)))
        elapsed = time.perf_counter() - started
    return {
        "clients": clients,
        "requests": len(latencies),
        "failures": failures,
        "texts_per_second": round(len(latencies) / elapsed, 1),
        "p50_ms": round(1000 * percentile(latencies, 50), 1) if latencies else None,
        "p99_ms": round(1000 * percentile(latencies, 99), 1) if latencies else None,
    }


def measure_configuration(
    name: str, overrides: dict, uri: str, home: Path, scratch: Path, texts: list[str], seconds: float
) -> dict:
    project = scratch / name
    project.mkdir()
    api_key = create_api_key(home / "api_keys.json", f"throughput-{name}", ["admin"])
    serving = {"cache_size": 0, **overrides}
    process, url = start_gateway(project, uri, home, serving_overrides=serving)
    try:
        results = {}
        for clients in tqdm(CONCURRENCY, desc=name, unit="level"):
            results[f"clients_{clients}"] = asyncio.run(drive(url, api_key, texts, clients, seconds))
            log.info("%s, %d clients: %s", name, clients, json.dumps(results[f"clients_{clients}"]))
        status = httpx.get(f"{url}/v1/status", headers={API_KEY_HEADER: api_key}, timeout=10).json()
        results["micro_batching"] = status.get("micro_batching")
    finally:
        process.terminate()
        process.wait(timeout=120)
    return results


def int8_accuracy(
    adapter: Path, base: str, texts: list[str], labels: list[str], batch_size: int = 64
) -> dict:
    """Accuracy and texts/s of fp32 and int8 on the same texts, in process."""
    figures: dict[str, dict[str, float]] = {}
    predicted = {}
    for quantize in ("none", "int8"):
        classifier = IntentClassifier.load(adapter, base=base, device="cpu", quantize=quantize)
        classifier.predict_proba(texts[:batch_size], batch_size=batch_size)  # warm-up
        started = time.perf_counter()
        probabilities = classifier.predict_proba(texts, batch_size=batch_size, progress=True)
        elapsed = time.perf_counter() - started
        predicted[quantize] = np.asarray(classifier.label_names)[probabilities.argmax(axis=1)]
        figures["fp32" if quantize == "none" else "int8"] = {
            "accuracy": round(float((predicted[quantize] == np.asarray(labels)).mean()), 4),
            "texts_per_second": round(len(texts) / elapsed, 1),
        }
    fp32, int8 = figures["fp32"], figures["int8"]
    return figures | {
        "accuracy_delta_points": round(100 * (int8["accuracy"] - fp32["accuracy"]), 2),
        "int8_speedup": round(int8["texts_per_second"] / fp32["texts_per_second"], 2),
        "label_agreement": round(float((predicted["none"] == predicted["int8"]).mean()), 4),
    }


def main(argv: list[str] | None = None) -> None:
    parser = served_model_parser(__doc__)
    parser.add_argument("--seconds", type=float, default=20, help="timed seconds per concurrency level")
    parser.add_argument("--out", type=Path, default=Path("benchmarks/results/serving_throughput.json"))
    args = parser.parse_args(argv)
    logging.basicConfig(level=logging.INFO, format="%(levelname)s %(name)s: %(message)s")
    test_csv = args.data_dir / "test.csv"
    test = banking77_test(args.adapter, args.data_dir)
    texts = test["text"].astype(str).tolist()
    params = load_params("params.yaml")
    args.base = args.base or params.model.base

    with tempfile.TemporaryDirectory(prefix="serving-throughput-") as scratch_dir:
        scratch = Path(scratch_dir)
        home = scratch / "home"
        home.mkdir()
        uri = register_adapter(args.adapter, args.base, home)
        results = {
            name: measure_configuration(name, overrides, uri, home, scratch, texts, args.seconds)
            for name, overrides in CONFIGURATIONS.items()
        }
    accuracy = int8_accuracy(args.adapter, args.base, texts, test["category"].astype(str).tolist())

    def ratio(a: str, b: str, clients: int) -> float:
        key = f"clients_{clients}"
        return round(results[a][key]["texts_per_second"] / results[b][key]["texts_per_second"], 2)

    report = {
        "model": f"LoRA adapter {args.adapter} on {args.base}, registered as an MLflow pyfunc (base bundled)",
        "data": f"banking77 official test texts ({test_csv}), one text per request",
        "method": f"N concurrent clients back to back for {args.seconds:g} s per level; cache off; "
        f"micro-batching at params.yaml's {params.serving.micro_batch_max_texts} texts / "
        f"{params.serving.micro_batch_max_wait_ms:g} ms; serving.workers {params.serving.workers}",
        "machine": {"cpu_count": os.cpu_count(), "platform": platform.platform(), "torch": torch.__version__},
        "results": results,
        "ratios": {
            f"batched_vs_unbatched_{clients}_clients": ratio("fp32_batched", "fp32_unbatched", clients)
            for clients in CONCURRENCY
        }
        | {
            f"int8_vs_fp32_batched_{clients}_clients": ratio("int8_batched", "fp32_batched", clients)
            for clients in CONCURRENCY
        },
        "int8_in_process": accuracy,
        "measured_at": time.strftime("%Y-%m-%dT%H:%M:%S%z"),
    }
    args.out.parent.mkdir(parents=True, exist_ok=True)
    args.out.write_text(json.dumps(report, indent=2) + "\n")
    log.info("ratios: %s", json.dumps(report["ratios"]))
    log.info("int8 in process: %s", json.dumps(accuracy))


if __name__ == "__main__":
    main()
