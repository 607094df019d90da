"""Load and chaos: steady locust traffic while prod's model server is killed once and prod moves once.

    python -m benchmarks.load_chaos --adapter .tuneloop/banking77/adapter --rate 20 --seconds 180

The adapter is registered three times in a throwaway registry (v1 = previous-prod, v2 = prod, v3 the
version prod moves to) and served by `tuneloop serve`. Locust (headless, loopback only, for a fixed
time) sends one banking77 test text per request at ``--rate`` requests/s. At ``--kill-at`` seconds
prod's model server is killed (SIGKILL to its process group); at ``--swap-at`` the prod alias moves to
v3. The gateway's /v1/status is sampled every 0.25 s meanwhile. JSON goes to
``benchmarks/results/load_chaos.json``: requests, failures, p50/p99 (locust), answers per version,
and the recovery times: breaker open, first answer by previous-prod, prod serving again, the swap.
"""

from __future__ import annotations

import csv
import json
import logging
import os
import platform
import signal
import subprocess
import sys
import tempfile
import threading
import time
from pathlib import Path
from urllib.parse import urlparse

import httpx
from mlflow.tracking import MlflowClient

from serving.auth import API_KEY_HEADER, create_api_key
from serving.model_server import port_owner

log = logging.getLogger("benchmarks.load_chaos")

LOCUSTFILE = Path(__file__).with_name("locustfile.py")
USERS = 10


def kill_model_server(upstream: str) -> int:
    """SIGKILL the process group of the model server listening at ``upstream``; its pid."""
    port = urlparse(upstream).port
    pid = port_owner(port) if port else None
    if pid is None:
        raise RuntimeError(f"nothing listens at {upstream}")
    os.killpg(os.getpgid(pid), signal.SIGKILL)
    return pid


class StatusSampler:
    """/v1/status every 0.25 s in a thread: what served, the breaker, the fallback, with timestamps."""

    def __init__(self, url: str, headers: dict[str, str]) -> None:
        self.url, self.headers = url, headers
        self.samples: list[dict] = []
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._run, daemon=True)

    def _run(self) -> None:
        with httpx.Client(timeout=5, headers=self.headers) as client:
            while not self._stop.is_set():
                try:
                    status = client.get(f"{self.url}/v1/status").json()
                    self.samples.append(
                        {
                            "t": time.monotonic(),
                            "version": status.get("serving_version"),
                            "upstream": status.get("upstream"),
                            "breaker_open": status["breaker"]["open"],
                        }
                    )
                except (httpx.HTTPError, ValueError, KeyError):
                    pass
                time.sleep(0.25)

    def __enter__(self) -> StatusSampler:
        self._thread.start()
        return self

    def __exit__(self, *exc: object) -> None:
        self._stop.set()
        self._thread.join(timeout=10)

    def first(self, after: float, condition) -> float | None:
        """Seconds from ``after`` to the first sample meeting ``condition``, or None."""
        for sample in self.samples:
            if sample["t"] >= after and condition(sample):
                return round(sample["t"] - after, 2)
        return None


def locust_stats(prefix: Path) -> dict:
    """The locust CSV summary: the predict endpoint's totals and answers per version."""
    rows = list(csv.DictReader(open(f"{prefix}_stats.csv", encoding="utf-8")))  # noqa: SIM115
    predict = next(row for row in rows if row["Name"] == "/v1/predict")
    versions = {row["Name"]: int(row["Request Count"]) for row in rows if row["Type"] == "VERSION"}
    return {
        "requests": int(predict["Request Count"]),
        "failures": int(predict["Failure Count"]),
        "p50_ms": float(predict["50%"]),
        "p99_ms": float(predict["99%"]),
        "max_ms": float(predict["Max Response Time"]),
        "requests_per_second": round(float(predict["Requests/s"]), 2),
        "answers_per_version": versions,
    }


def run_load_chaos(
    url: str,
    admin_headers: dict[str, str],
    api_key: str,
    client: MlflowClient,
    model_name: str,
    texts: list[str],
    *,
    rate_per_s: float,
    seconds: int,
    kill_at_s: float,
    swap_at_s: float,
    swap_to: str,
    work_dir: Path,
) -> dict:
    """Drive locust against the gateway at ``url`` and inject the two events; the measured report."""
    texts_file = work_dir / "texts.txt"
    texts_file.write_text("\n".join(text.replace("\n", " ") for text in texts), encoding="utf-8")
    prefix = work_dir / "locust"
    env = {
        **os.environ,
        "TUNELOOP_API_KEY": api_key,
        "LOAD_TEXTS_FILE": str(texts_file),
        "LOAD_RATE_PER_USER": str(rate_per_s / USERS),
    }
    command = [
        str(Path(sys.executable).parent / "locust"),
        "-f",
        str(LOCUSTFILE),
        "--headless",
        "--users",
        str(USERS),
        "--spawn-rate",
        str(USERS),
        "--run-time",
        f"{seconds}s",
        "--host",
        url,
        "--csv",
        str(prefix),
        "--only-summary",
        "--stop-timeout",
        "30",
    ]
    with StatusSampler(url, admin_headers) as sampler:
        started = time.monotonic()
        with open(work_dir / "locust.log", "w") as locust_log:
            locust = subprocess.Popen(command, env=env, stdout=locust_log, stderr=subprocess.STDOUT)
        try:
            time.sleep(kill_at_s)
            status = httpx.get(f"{url}/v1/status", headers=admin_headers, timeout=10).json()
            killed_version, killed_upstream = status["serving_version"], status["upstream"]
            killed_at = time.monotonic()
            pid = kill_model_server(killed_upstream)
            log.info(
                "killed the model server of v%s (pid %d) at %.1fs", killed_version, pid, killed_at - started
            )
            time.sleep(max(0.0, swap_at_s - (time.monotonic() - started)))
            swapped_at = time.monotonic()
            client.set_registered_model_alias(model_name, "prod", swap_to)
            log.info("moved prod to v%s at %.1fs", swap_to, swapped_at - started)
            locust.wait(timeout=seconds + 120)
        finally:
            if locust.poll() is None:
                locust.terminate()
                locust.wait(timeout=60)
    stats = locust_stats(prefix)
    return {
        "load": {"rate_per_s": rate_per_s, "seconds": seconds, "users": USERS},
        "events": {"kill_at_s": kill_at_s, "swap_at_s": swap_at_s, "killed_version": killed_version},
        **stats,
        "recovery_s": {
            "breaker_open_after_kill": sampler.first(killed_at, lambda s: s["breaker_open"]),
            "prod_serving_again_after_kill": sampler.first(
                killed_at,
                lambda s: s["upstream"] not in (None, killed_upstream) and not s["breaker_open"],
            ),
            "new_version_serving_after_alias_move": sampler.first(
                swapped_at, lambda s: s["version"] == swap_to
            ),
        },
    }


def main(argv: list[str] | None = None) -> None:
    from benchmarks.serving_latency import (
        MODEL_NAME,
        banking77_test,
        register_adapter,
        served_model_parser,
        start_gateway,
    )
    from tuneloop.config import load_params

    parser = served_model_parser(__doc__)
    parser.add_argument("--rate", type=float, default=20, help="requests per second, all users together")
    parser.add_argument("--seconds", type=int, default=180)
    parser.add_argument("--kill-at", type=float, default=60)
    parser.add_argument("--swap-at", type=float, default=120)
    parser.add_argument("--out", type=Path, default=Path("benchmarks/results/load_chaos.json"))
    args = parser.parse_args(argv)
    logging.basicConfig(level=logging.INFO, format="%(levelname)s %(name)s: %(message)s")
    texts = banking77_test(args.adapter, args.data_dir)["text"].astype(str).tolist()
    base = args.base or load_params("params.yaml").model.base
    with tempfile.TemporaryDirectory(prefix="load-chaos-") as scratch_dir:
        scratch = Path(scratch_dir)
        home, project = scratch / "home", scratch / "project"
        home.mkdir()
        project.mkdir()
        uri = register_adapter(args.adapter, base, home)  # v1, alias prod
        client = MlflowClient(uri, uri)
        source = client.get_model_version(MODEL_NAME, "1")
        for _ in range(2):  # v2 and v3: the same model, so answers stay comparable
            client.create_model_version(MODEL_NAME, str(source.source), source.run_id)
        client.set_registered_model_alias(MODEL_NAME, "previous-prod", "1")
        client.set_registered_model_alias(MODEL_NAME, "prod", "2")
        api_key = create_api_key(home / "api_keys.json", "load-chaos", ["admin"])
        process, url = start_gateway(project, uri, home, serving_overrides={"cache_size": 0})
        headers = {API_KEY_HEADER: api_key}
        try:
            deadline = time.monotonic() + 600
            while time.monotonic() < deadline:
                status = httpx.get(f"{url}/v1/status", headers=headers, timeout=10).json()
                if status["serving_version"] == "2" and status["fallback"]["version"] == "1":
                    break
                time.sleep(1)
            report = run_load_chaos(
                url,
                headers,
                api_key,
                client,
                MODEL_NAME,
                texts,
                rate_per_s=args.rate,
                seconds=args.seconds,
                kill_at_s=args.kill_at,
                swap_at_s=args.swap_at,
                swap_to="3",
                work_dir=scratch,
            )
        finally:
            process.terminate()
            process.wait(timeout=120)
    report |= {
        "model": f"LoRA adapter {args.adapter} on {base} (v1, v2, v3 the same model)",
        "machine": {"cpu_count": os.cpu_count(), "platform": platform.platform()},
        "measured_at": time.strftime("%Y-%m-%dT%H:%M:%S%z"),
    }
    args.out.parent.mkdir(parents=True, exist_ok=True)
    args.out.write_text(json.dumps(report, indent=2) + "\n")
    log.info("%s", json.dumps(report))


if __name__ == "__main__":
    main()
