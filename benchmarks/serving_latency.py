"""Latency and throughput of a registered model through the stable address, against in-process predict.

    python -m benchmarks.serving_latency --adapter .tuneloop/banking77/adapter --calls 100

The adapter (by default the one `python -m benchmarks.banking77` trains) is logged as tuneloop's pyfunc
with the default base bundled, registered in a throwaway registry and aliased `prod`; `tuneloop serve`
then serves it as a user would. Three ways to get the same predictions are timed in one run, call by
call and interleaved in rounds so that machine load hits them alike:

- ``in_process``: the pyfunc loaded from the registry, ``predict`` on a DataFrame (the floor);
- ``model_server``: POST to the `mlflow models serve` process directly;
- ``gateway``: POST /v1/predict at the stable address (API-key check, limits, request log, then the
  model server).

Each call sends a batch of 1 or 32 banking77 test texts, one call at a time. JSON goes to
``benchmarks/results/serving_latency.json`` with p50/p99 per call, texts per second, and the ratios.
"""

from __future__ import annotations

import argparse
import json
import logging
import os
import platform
import statistics
import subprocess
import sys
import tempfile
import time
from collections.abc import Callable
from pathlib import Path

import httpx
import mlflow
import pandas as pd
import torch
import yaml
from mlflow.tracking import MlflowClient
from tqdm.auto import tqdm

from benchmarks.banking77 import DEFAULT_DATA_DIR
from serving.auth import API_KEY_HEADER, create_api_key
from serving.model_server import free_port, invocation_body
from serving.pyfunc_model import log_intent_model
from tuneloop.config import load_params

log = logging.getLogger("benchmarks.serving_latency")

MODEL_NAME = "banking77-intent"
BATCH_SIZES = (1, 32)
MODES = ("in_process", "model_server", "gateway")


def percentile(values: list[float], q: float) -> float:
    ordered = sorted(values)
    index = min(len(ordered) - 1, max(0, round(q / 100 * (len(ordered) - 1))))
    return ordered[index]


def summarise(latencies_s: list[float], batch_size: int) -> dict:
    total = sum(latencies_s)
    return {
        "calls": len(latencies_s),
        "p50_ms": round(1000 * percentile(latencies_s, 50), 2),
        "p99_ms": round(1000 * percentile(latencies_s, 99), 2),
        "mean_ms": round(1000 * statistics.fmean(latencies_s), 2),
        "texts_per_second": round(batch_size * len(latencies_s) / total, 1),
    }


def register_adapter(adapter: Path, base: str, home: Path) -> str:
    """Log and register the adapter as version 1 of MODEL_NAME with alias prod; return the tracking URI."""
    uri = f"sqlite:///{home / 'mlflow.db'}"
    mlflow.set_tracking_uri(uri)
    experiment = mlflow.create_experiment("serving-latency", artifact_location=str(home / "artifacts"))
    client = MlflowClient(uri, uri)
    client.create_registered_model(MODEL_NAME)
    with mlflow.start_run(experiment_id=experiment):
        info = log_intent_model(adapter, base, load_params("params.yaml").serving)
    version = client.create_model_version(MODEL_NAME, info.model_uri, info.run_id)
    client.set_registered_model_alias(MODEL_NAME, "prod", version.version)
    return uri


def start_gateway(
    project: Path, uri: str, home: Path, serving_overrides: dict | None = None
) -> tuple[subprocess.Popen, str]:
    """`tuneloop serve` of MODEL_NAME@prod with params.yaml, ``serving_overrides`` applied."""
    params = yaml.safe_load(Path("params.yaml").read_text())
    params["registry"]["model_name"] = MODEL_NAME
    # Clients calling back to back measure the serving path, not the per-key rate limit.
    params["gateway"].update(rate_limit_per_s=100_000, rate_limit_burst=100_000)
    params["serving"].update(serving_overrides or {})
    (project / "params.yaml").write_text(yaml.safe_dump(params))
    port = free_port()
    bin_dir = Path(sys.executable).parent
    env = {
        **os.environ,
        "PATH": f"{bin_dir}{os.pathsep}{os.environ.get('PATH', '')}",
        "MLFLOW_TRACKING_URI": uri,
        "TUNELOOP_HOME": str(home),
        "HF_HUB_OFFLINE": "1",
    }
    process = subprocess.Popen(
        [str(bin_dir / "tuneloop"), "serve", "--env", "prod", "--port", str(port)],
        cwd=project,
        env=env,
        stdout=open(project / "gateway.log", "w"),  # noqa: SIM115 - lives as long as the process
        stderr=subprocess.STDOUT,
    )
    url = f"http://127.0.0.1:{port}"
    deadline = time.monotonic() + 600
    while time.monotonic() < deadline:
        if process.poll() is not None:
            tail = "\n".join((project / "gateway.log").read_text().splitlines()[-20:])
            raise SystemExit(f"tuneloop serve exited with {process.returncode}:\n{tail}")
        try:
            if httpx.get(f"{url}/readyz", timeout=2).status_code == 200:
                return process, url
        except httpx.HTTPError:
            pass
        time.sleep(1)
    process.terminate()
    raise SystemExit(f"the gateway was not ready after 600 s; see {project / 'gateway.log'}")


def callers(
    model, http: httpx.Client, gateway_url: str, server_url: str, api_key: str
) -> dict[str, Callable]:
    """One function per mode that predicts a batch of texts and checks it got one answer per text."""

    def in_process(texts: list[str]) -> None:
        assert len(model.predict(pd.DataFrame({"text": texts}))) == len(texts)

    def model_server(texts: list[str]) -> None:
        response = http.post(f"{server_url}/invocations", json=invocation_body(texts, top_k=3))
        response.raise_for_status()
        assert len(response.json()["predictions"]) == len(texts)

    def gateway(texts: list[str]) -> None:
        response = http.post(
            f"{gateway_url}/v1/predict", json={"texts": texts, "top_k": 3}, headers={API_KEY_HEADER: api_key}
        )
        response.raise_for_status()
        assert len(response.json()["predictions"]) == len(texts)

    return {"in_process": in_process, "model_server": model_server, "gateway": gateway}


def measure(calls: dict[str, Callable], texts: list[str], batch_size: int, count: int, rounds: int) -> dict:
    latencies: dict[str, list[float]] = {mode: [] for mode in calls}
    per_round = max(1, count // rounds)
    batches = [texts[i : i + batch_size] for i in range(0, len(texts) - batch_size + 1, batch_size)]
    for call in calls.values():
        call(batches[0])  # warm-up, not timed
    with tqdm(total=per_round * rounds * len(calls), desc=f"batch {batch_size}", unit="call") as bar:
        for round_index in range(rounds):
            for mode, call in calls.items():
                for i in range(per_round):
                    batch = batches[(round_index * per_round + i) % len(batches)]
                    started = time.perf_counter()
                    call(batch)
                    latencies[mode].append(time.perf_counter() - started)
                    bar.update()
    return {mode: summarise(values, batch_size) for mode, values in latencies.items()}


def serve_and_measure(
    adapter: Path,
    base: str,
    texts: list[str],
    batch_sizes: tuple[int, ...],
    calls_per_mode: int,
    rounds: int,
    in_process: bool,
) -> tuple[dict, float]:
    """Register ``adapter`` in a throwaway registry, run `tuneloop serve`, time every mode per batch size.

    Returns the per-batch-size results and how long the gateway took to become ready.
    """
    with tempfile.TemporaryDirectory(prefix="serving-latency-") as scratch:
        home, project = Path(scratch) / "home", Path(scratch) / "project"
        home.mkdir()
        project.mkdir()
        uri = register_adapter(adapter, base, home)
        log.info("registered %s v1 (alias prod) in %s; starting tuneloop serve", MODEL_NAME, uri)
        started = time.monotonic()
        api_key = create_api_key(home / "api_keys.json", "serving-latency-benchmark", ["admin"])
        gateway_process, gateway_url = start_gateway(project, uri, home)
        ready_s = time.monotonic() - started
        try:
            with httpx.Client(timeout=120) as http:
                status = http.get(f"{gateway_url}/v1/status", headers={API_KEY_HEADER: api_key})
                server_url = status.json()["upstream"]
                model = mlflow.pyfunc.load_model(f"models:/{MODEL_NAME}/1") if in_process else None
                calls = callers(model, http, gateway_url, server_url, api_key)
                if not in_process:
                    calls.pop("in_process")
                results = {
                    f"batch_{size}": measure(calls, texts, size, calls_per_mode, rounds)
                    for size in batch_sizes
                }
        finally:
            gateway_process.terminate()
            gateway_process.wait(timeout=120)
    return results, ready_s


def _ratio(results: dict, a: str, b: str, key: str) -> float:
    return round(results[a][key] / results[b][key], 3)


def gateway_overhead(results: dict) -> dict:
    """What the gateway adds on top of the model server behind it."""
    return {
        "gateway_vs_model_server_p50": _ratio(results, "gateway", "model_server", "p50_ms"),
        "gateway_vs_model_server_p99": _ratio(results, "gateway", "model_server", "p99_ms"),
        "gateway_added_p50_ms": round(results["gateway"]["p50_ms"] - results["model_server"]["p50_ms"], 2),
        "gateway_added_p99_ms": round(results["gateway"]["p99_ms"] - results["model_server"]["p99_ms"], 2),
    }


def ratios(results: dict) -> dict:
    return {
        "gateway_vs_in_process_p50": _ratio(results, "gateway", "in_process", "p50_ms"),
        "gateway_vs_in_process_p99": _ratio(results, "gateway", "in_process", "p99_ms"),
        "model_server_vs_in_process_p50": _ratio(results, "model_server", "in_process", "p50_ms"),
        **gateway_overhead(results),
    }


def served_model_parser(description: str | None) -> argparse.ArgumentParser:
    """The arguments every serving benchmark takes: which adapter on which base, and banking77's folder."""
    parser = argparse.ArgumentParser(
        description=description, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("--adapter", type=Path, default=Path(".tuneloop/banking77/adapter"))
    parser.add_argument("--base", default=None, help="default: params.yaml model.base")
    parser.add_argument("--data-dir", type=Path, default=DEFAULT_DATA_DIR)
    return parser


def banking77_test(adapter: Path, data_dir: Path) -> pd.DataFrame:
    """banking77's official test set, once it and ``adapter`` are known to exist (else exit, saying why)."""
    if not (adapter / "adapter_config.json").exists():
        raise SystemExit(f"no adapter at {adapter}: train one first (python -m benchmarks.banking77)")
    test_csv = data_dir / "test.csv"
    if not test_csv.exists():
        raise SystemExit(f"banking77 not found at {data_dir} (expected test.csv)")
    return pd.read_csv(test_csv)


def main(argv: list[str] | None = None) -> None:
    parser = served_model_parser(__doc__)
    parser.add_argument("--calls", type=int, default=100, help="timed calls per mode and batch size")
    parser.add_argument("--rounds", type=int, default=5)
    parser.add_argument(
        "--torch-threads",
        type=int,
        default=1,
        help="torch threads in this process and in the model server (OMP_NUM_THREADS), the same for both",
    )
    parser.add_argument("--out", type=Path, default=Path("benchmarks/results/serving_latency.json"))
    args = parser.parse_args(argv)
    logging.basicConfig(level=logging.INFO, format="%(levelname)s %(name)s: %(message)s")
    test_csv = args.data_dir / "test.csv"
    texts = banking77_test(args.adapter, args.data_dir)["text"].astype(str).tolist()
    args.base = args.base or load_params("params.yaml").model.base
    # The same thread budget on both sides: on a busy 2-core machine, torch's default of one thread per
    # core makes its OpenMP workers wait on each other and in-process latency grows several-fold.
    os.environ["OMP_NUM_THREADS"] = str(args.torch_threads)
    torch.set_num_threads(args.torch_threads)

    results, ready_s = serve_and_measure(
        args.adapter, args.base, texts, BATCH_SIZES, args.calls, args.rounds, in_process=True
    )
    report = {
        "model": f"LoRA adapter {args.adapter} on {args.base}, registered as an MLflow pyfunc (base bundled)",
        "data": f"banking77 official test texts ({test_csv})",
        "method": "sequential calls, modes interleaved in rounds; latency per call (whole batch)",
        "gateway_ready_after_start_s": round(ready_s, 1),
        "machine": {"cpu_count": os.cpu_count(), "platform": platform.platform()},
        "torch_threads_per_process": args.torch_threads,
        "results": results,
        "ratios": {name: ratios(result) for name, result in results.items()},
        "measured_at": time.strftime("%Y-%m-%dT%H:%M:%S%z"),
    }
    args.out.parent.mkdir(parents=True, exist_ok=True)
    args.out.write_text(json.dumps(report, indent=2) + "\n")
    for name, result in results.items():
        log.info("%s: %s | %s", name, json.dumps(result), json.dumps(report["ratios"][name]))


if __name__ == "__main__":
    main()
