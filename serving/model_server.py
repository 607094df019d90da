"""Start, probe and stop `mlflow models serve` processes: one per model version the supervisor runs.

MLflow's model server is the real thing we serve with; this module only launches it with the local
environment (the default env manager builds a virtualenv and needs the network), checks that it
answers a real prediction before it gets traffic, and stops it.
"""

from __future__ import annotations

import logging
import os
import signal
import socket
import subprocess
import sys
import time
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path

import httpx

log = logging.getLogger(__name__)

WARMUP_TEXTS = ("where is my order?", "I want my money back")


class ModelServerFailed(RuntimeError):
    """A model server exited or did not answer in time; the message carries the end of its log."""


def free_port(host: str = "127.0.0.1") -> int:
    with socket.socket() as sock:
        sock.bind((host, 0))
        return sock.getsockname()[1]


def invocation_body(texts: Sequence[str], top_k: int | None = None) -> dict:
    """The JSON `/invocations` expects for the pyfunc's one string column."""
    body: dict = {"dataframe_split": {"columns": ["text"], "data": [[text] for text in texts]}}
    if top_k is not None:
        body["params"] = {"top_k": top_k}
    return body


def _log_tail(path: Path, lines: int = 20) -> str:
    try:
        return "\n".join(path.read_text(encoding="utf-8", errors="replace").splitlines()[-lines:])
    except OSError:
        return "<no log>"


@dataclass(eq=False)
class ModelServer:
    """A running `mlflow models serve` process for one model version."""

    version: str
    model_uri: str
    url: str
    process: subprocess.Popen
    log_path: Path

    def alive(self) -> bool:
        return self.process.poll() is None

    def failure(self, what: str) -> ModelServerFailed:
        tail = _log_tail(self.log_path)
        where = f"model server for {self.model_uri} ({self.url})"
        return ModelServerFailed(f"{where} {what}; last log lines:\n{tail}")

    def stop(self, grace_s: float = 15.0) -> None:
        """SIGTERM the whole process group (the CLI, uvicorn and its workers); SIGKILL what outlives grace.

        Waiting for the group, not just the CLI we started, is what guarantees the port is free and no
        worker is orphaned when this returns.
        """
        group = self.process.pid
        if not _group_alive(group):
            self.process.poll()
            return
        os.killpg(group, signal.SIGTERM)
        deadline = time.monotonic() + grace_s
        while _group_alive(group) and time.monotonic() < deadline:
            self.process.poll()  # reap the CLI so its zombie does not keep the group "alive"
            time.sleep(0.1)
        if _group_alive(group):
            log.warning("model server v%s ignored SIGTERM for %.0fs; killing it", self.version, grace_s)
            os.killpg(group, signal.SIGKILL)
        self.process.wait(timeout=grace_s)


def _group_alive(group: int) -> bool:
    try:
        os.killpg(group, 0)
    except ProcessLookupError:
        return False
    except PermissionError:
        return True
    return True


def start_model_server(
    model_uri: str,
    version: str,
    *,
    log_dir: Path,
    extra_env: Mapping[str, str],
    host: str = "127.0.0.1",
    port: int | None = None,
    workers: int = 1,
    request_timeout_s: int = 60,
) -> ModelServer:
    """Launch the server in its own process group and return at once; see :func:`wait_until_ready`."""
    port = port or free_port(host)
    log_dir.mkdir(parents=True, exist_ok=True)
    log_path = log_dir / f"model-server-v{version}-{port}.log"
    bin_dir = Path(sys.executable).parent
    env = {**os.environ, **extra_env}
    # `mlflow models serve` starts a bare `uvicorn` command: this interpreter's bin/ must come first.
    env["PATH"] = f"{bin_dir}{os.pathsep}{env.get('PATH', '')}"
    command = [
        str(bin_dir / "mlflow"),
        "models",
        "serve",
        "-m",
        model_uri,
        "--env-manager",
        "local",
        "--host",
        host,
        "--port",
        str(port),
        "--workers",
        str(workers),
        "--timeout",
        str(request_timeout_s),
    ]
    with open(log_path, "ab") as log_file:
        process = subprocess.Popen(
            command, env=env, stdout=log_file, stderr=subprocess.STDOUT, start_new_session=True
        )
    log.info("started model server v%s (%s) on %s:%s, pid %s", version, model_uri, host, port, process.pid)
    return ModelServer(version, model_uri, f"http://{host}:{port}", process, log_path)


def check_warmup_answer(payload: dict, expected_rows: int) -> None:
    """A server is only ready when it returns one labelled prediction per warm-up text."""
    rows = payload.get("predictions")
    if not isinstance(rows, list) or len(rows) != expected_rows:
        raise ValueError(f"expected {expected_rows} predictions, got {str(payload)[:200]}")
    if not all(isinstance(row, dict) and row.get("label") for row in rows):
        raise ValueError(f"predictions without a label: {str(rows)[:200]}")


def wait_until_ready(server: ModelServer, timeout_s: float, client: httpx.Client | None = None) -> float:
    """Block until `/ping` answers and a warm-up prediction is valid; return the seconds it took.

    Raises :class:`ModelServerFailed` (with the server's log tail) when the process exits or time runs out.
    """
    started = time.monotonic()
    deadline = started + timeout_s
    own_client = client is None
    client = client or httpx.Client(timeout=30)
    try:
        while True:
            if not server.alive():
                raise server.failure(f"exited with code {server.process.returncode} before it was ready")
            if time.monotonic() > deadline:
                raise server.failure(f"did not become ready within {timeout_s:.0f}s")
            try:
                if client.get(f"{server.url}/ping").status_code == 200:
                    break
            except httpx.HTTPError:
                pass
            time.sleep(0.25)
        response = client.post(f"{server.url}/invocations", json=invocation_body(WARMUP_TEXTS, top_k=1))
        if response.status_code != 200:
            raise server.failure(f"answered the warm-up with {response.status_code}: {response.text[:300]}")
        try:
            check_warmup_answer(response.json(), len(WARMUP_TEXTS))
        except ValueError as error:
            raise server.failure(f"gave an unusable warm-up answer ({error})") from error
        return time.monotonic() - started
    finally:
        if own_client:
            client.close()
