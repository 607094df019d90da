"""Time and peak memory of the drift job at 10k and 100k logged requests.

    python -m benchmarks.drift_scale --sizes 10000 100000

For each size, a child process fills a fresh SQLite inference log through the gateway's own writer
(``serving.inference_log.InferenceLogWriter``) with rows synthesised from the sample and its drifted
batch (70/30, with feedback on 10% of rows), then runs the job on a window of all of them:
read the window, compute the drift summary (``monitoring.monitor.evaluate_window``: Evidently text,
descriptor and label drift, concept-drift tests), render the HTML reports. Each phase is timed.

Memory: the child's peak resident set size (``resource.getrusage(...).ru_maxrss``, which counts
native allocations that tracemalloc would miss), and its RSS after imports and log filling, so the
job's own share is ``peak - before_job``. A fresh process per size keeps one size's peak from
hiding the other's. The 10k run is the baseline: the JSON gives the 100k/10k ratios.

The same run then measures the latency the gateway adds (``gateway_latency``): a trained adapter
(``--gateway-adapter``, by default the banking77 one that ``python -m benchmarks.banking77`` writes)
is registered and served by `tuneloop serve`, and single-text and 32-text calls go, interleaved, to the
model server directly and through the gateway (auth, limits, PII-masked request log included); see
``benchmarks/serving_latency.py``, which also compares with in-process ``predict``. Skipped, and said
so, when no adapter is there.

Writes ``benchmarks/results/drift_scale.json`` under the keys ``drift_job`` and ``gateway_latency``.
"""

from __future__ import annotations

import argparse
import json
import logging
import platform
import resource
import subprocess
import sys
import tempfile
import time
import uuid
from datetime import UTC, datetime, timedelta
from pathlib import Path

import numpy as np
import pandas as pd
import psutil
from tqdm.auto import tqdm

REPO_ROOT = Path(__file__).resolve().parents[1]
RESULTS = REPO_ROOT / "benchmarks/results/drift_scale.json"
log = logging.getLogger("benchmarks.drift_scale")


def synthesise_log(db_url: str, size: int, seed: int) -> int:
    """Fill the inference log with ``size`` predictions (70% sample texts, 30% drifted), 10% with feedback."""
    from serving.inference_log import FeedbackRecord, InferenceLogWriter, PredictionRecord

    rng = np.random.default_rng(seed)
    sample = pd.read_csv(REPO_ROOT / "data/sample/intents.csv")
    drifted = pd.read_csv(REPO_ROOT / "data/sample/drifted.csv")
    from_drifted = rng.random(size) < 0.3
    rows = pd.concat(
        [
            sample.iloc[rng.integers(0, len(sample), int((~from_drifted).sum()))],
            drifted.iloc[rng.integers(0, len(drifted), int(from_drifted.sum()))],
        ]
    ).sample(frac=1, random_state=seed)
    labels = sorted(sample["intent"].unique())
    # A model that is right 85% of the time and otherwise picks any label.
    predicted = np.where(rng.random(size) < 0.85, rows["intent"].to_numpy(), rng.choice(labels, size))
    start = datetime.now(UTC) - timedelta(seconds=size)
    writer = InferenceLogWriter(db_url, queue_size=20_000, batch_size=2_000).start()
    try:
        chunk = 500
        for first in tqdm(range(0, size, chunk), desc=f"log {size:,} rows", unit="chunk"):
            last = min(first + chunk, size)
            records = [
                PredictionRecord(
                    request_id=uuid.UUID(int=int(rng.integers(0, 2**63)) + i).hex,
                    item_index=0,
                    created_at=start + timedelta(seconds=i),
                    model_name="tuneloop-intent",
                    model_version="1",
                    text=str(rows["text"].iloc[i]),
                    label=str(predicted[i]),
                    score=0.9,
                    latency_ms=5.0,
                )
                for i in range(first, last)
            ]
            while not writer.submit(records):
                time.sleep(0.05)
            feedback = [
                FeedbackRecord(r.request_id, 0, str(rows["intent"].iloc[first + k]), r.created_at)
                for k, r in enumerate(records)
                if (first + k) % 10 == 0
            ]
            while not writer.submit(feedback):
                time.sleep(0.05)
    finally:
        writer.close(timeout_s=600)
    return writer.written_rows


def reference_from_sample(seed: int):
    """The job's reference without a model: the sample's train split, 'predicted' = its labels.

    The job's cost does not depend on which model made the predictions; leaving the model out keeps
    its inference time (reference predictions are cached per version in production) out of the numbers.
    """
    from evaluation.drift import document_frequencies
    from monitoring.monitor import Reference
    from pipelines.prepare import prepare
    from tuneloop.config import load_params

    params = load_params(REPO_ROOT / "params.yaml")
    splits = prepare(REPO_ROOT / "data/sample/intents.csv", params.data, params.prepare).splits
    train = splits["train"].sample(
        n=min(params.monitoring.reference_size, len(splits["train"])), random_state=seed
    )
    frame = pd.DataFrame({"text": train["text"].astype(str), "label": train["label"].astype(str)})
    quality = pd.DataFrame(
        {"text": splits["test"]["text"].astype(str), "label": splits["test"]["label"].astype(str)}
    )
    quality["true_label"] = quality["label"]
    vocabulary = document_frequencies(splits["train"]["text"].astype(str))
    return Reference(
        frame.reset_index(drop=True), quality.reset_index(drop=True), vocabulary, "benchmark"
    ), params


def rss_mb() -> float:
    return psutil.Process().memory_info().rss / 2**20


def peak_rss_mb() -> float:
    """Peak RSS of this process so far (Linux reports ru_maxrss in KiB)."""
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024


def run_one(size: int, seed: int) -> dict:
    """In a child process: fill a log of ``size`` rows, then time the job's phases on all of them."""
    from monitoring.monitor import evaluate_window, read_log

    with tempfile.TemporaryDirectory(prefix="tuneloop-drift-scale-") as folder:
        db_url = f"sqlite:///{Path(folder) / 'inference_log.db'}"
        fill_started = time.perf_counter()
        written = synthesise_log(db_url, size, seed)
        fill_seconds = time.perf_counter() - fill_started
        reference, params = reference_from_sample(seed)
        monitoring = params.monitoring.model_copy(update={"window_size": size})
        before_job = rss_mb()
        peak_before_job = peak_rss_mb()
        phases = {}
        started = time.perf_counter()
        window = read_log(db_url, last_n=monitoring.window_size)
        phases["read_window"] = time.perf_counter() - started
        mark = time.perf_counter()
        result = evaluate_window(window, reference, params.data.labels, monitoring)
        phases["drift_summary"] = time.perf_counter() - mark
        if result.quality_report is None:
            raise RuntimeError("the synthesised log has feedback, yet the job made no quality report")
        mark = time.perf_counter()
        for report in (result.data_report, result.prediction_report, result.quality_report):
            report.save_html(str(Path(folder) / f"{uuid.uuid4().hex}.html"))
        phases["render_html"] = time.perf_counter() - mark
        total = time.perf_counter() - started
    return {
        "logged_requests": size,
        "rows_written": written,
        "window_rows": int(result.summary["n_current"]),
        "labelled_rows": int(result.summary["n_labelled"]),
        "fill_log_seconds": round(fill_seconds, 2),
        "job_seconds": round(total, 2),
        "phase_seconds": {name: round(value, 2) for name, value in phases.items()},
        "rss_before_job_mb": round(before_job, 1),
        "peak_rss_mb": round(peak_rss_mb(), 1),
        "peak_rss_before_job_mb": round(peak_before_job, 1),
        "job_peak_increase_mb": round(peak_rss_mb() - before_job, 1),
        "drift_detected": bool(result.summary["drift_detected"]),
        "drifted_signals": result.summary["data_drift"]["drifted_signals"],
        "text_auc": result.summary["data_drift"]["signals"]["text"]["score"],
    }


def measure_drift_job(sizes: list[int], seed: int) -> dict:
    """Each size in its own process (``--child``) so that peaks are per size."""
    runs = []
    for size in sizes:
        child = subprocess.run(
            [sys.executable, "-m", "benchmarks.drift_scale", "--child", str(size), "--seed", str(seed)],
            cwd=REPO_ROOT,
            capture_output=True,
            text=True,
        )
        if child.returncode != 0:
            raise RuntimeError(f"the {size:,}-row run failed:\n{child.stderr[-4000:]}")
        runs.append(json.loads(child.stdout.strip().splitlines()[-1]))
        log.info("%s", runs[-1])
    baseline = runs[0]
    for run in runs[1:]:
        run["ratio_to_baseline"] = {
            "logged_requests": run["logged_requests"] / baseline["logged_requests"],
            "job_seconds": round(run["job_seconds"] / baseline["job_seconds"], 2),
            "job_peak_increase_mb": round(
                run["job_peak_increase_mb"] / max(baseline["job_peak_increase_mb"], 1), 2
            ),
        }
    return {
        "memory_method": "peak RSS (getrusage ru_maxrss) of a fresh child process per size; "
        "job share = peak - RSS before the job",
        "baseline": f"{baseline['logged_requests']:,} requests",
        "runs": runs,
    }


def measure_gateway_latency(adapter: Path, calls: int) -> dict:
    """p50/p99 through the gateway against the model server behind it, in this run (1 torch thread each)."""
    if not (adapter / "adapter_config.json").exists():
        log.warning("no adapter at %s: gateway latency not measured", adapter)
        return {"skipped": f"no adapter at {adapter} (python -m benchmarks.banking77 trains one)"}
    import os

    from benchmarks.serving_latency import gateway_overhead, serve_and_measure
    from tuneloop.config import load_params

    os.environ["OMP_NUM_THREADS"] = "1"
    texts = pd.read_csv(REPO_ROOT / "data/sample/intents.csv")["text"].astype(str).tolist()
    results, ready_s = serve_and_measure(
        adapter, load_params(REPO_ROOT / "params.yaml").model.base, texts, (1, 32), calls, 5, in_process=False
    )
    return {
        "adapter": str(adapter),
        "texts": "data/sample/intents.csv",
        "method": "sequential calls, model server direct vs gateway, interleaved in 5 rounds",
        "gateway_ready_after_start_s": round(ready_s, 1),
        "measured_at": datetime.now(UTC).isoformat(),
        "results": results,
        "gateway_added": {name: gateway_overhead(result) for name, result in results.items()},
    }


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("--sizes", type=int, nargs="+", default=[10_000, 100_000])
    parser.add_argument("--seed", type=int, default=42)
    parser.add_argument("--output", type=Path, default=RESULTS)
    parser.add_argument("--gateway-adapter", type=Path, default=REPO_ROOT / ".tuneloop/banking77/adapter")
    parser.add_argument("--gateway-calls", type=int, default=100, help="timed calls per mode and batch size")
    parser.add_argument("--child", type=int, help=argparse.SUPPRESS)
    args = parser.parse_args(argv)
    if args.child:
        logging.basicConfig(level=logging.WARNING)
        print(json.dumps(run_one(args.child, args.seed)))
        return
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(levelname)s %(name)s: %(message)s")
    existing = json.loads(args.output.read_text()) if args.output.exists() else {}
    existing["drift_job"] = {
        "machine": {
            "python": platform.python_version(),
            "cpus": psutil.cpu_count(),
            "platform": platform.platform(),
        },
        "measured_at": datetime.now(UTC).isoformat(),
        **measure_drift_job(sorted(args.sizes), args.seed),
    }
    existing["gateway_latency"] = measure_gateway_latency(args.gateway_adapter, args.gateway_calls)
    args.output.parent.mkdir(parents=True, exist_ok=True)
    args.output.write_text(json.dumps(existing, indent=2) + "\n")
    log.info("wrote %s", args.output)


if __name__ == "__main__":
    main()
