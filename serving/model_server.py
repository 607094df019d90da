"""Start, probe and stop `mlflow models serve` processes: one per model version the supervisor runs.

MLflow's model server is the real thing we serve with; this module only launches it with the local
environment (the default env manager builds a virtualenv and needs the network), checks that it
answers a real prediction before it gets traffic, and stops it.

A model version is code (a pyfunc), so its server runs with least privilege: it serves a local copy
of the model, starts from an allow-listed environment (no gateway secrets, database URLs, registry
or cloud credentials), listens on loopback only, and the caller checks that the process answering
on its port is the one it started.
"""

from __future__ import annotations

import ipaddress
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
from urllib.parse import urlparse

import httpx
import psutil

log = logging.getLogger(__name__)

WARMUP_TEXTS = ("where is my order?", "I want my money back")

# What a model server inherits from the gateway: enough to run Python, find its packages and the
# offline model files, and size its threads. Nothing else: no keys, tokens, URLs or passwords.
INHERITED_ENVIRONMENT = (
    "PATH",
    "HOME",
    "USER",
    "LANG",
    "LC_ALL",
    "LC_CTYPE",
    "TZ",
    "TMPDIR",
    "VIRTUAL_ENV",
    "PYTHONPATH",
    "HF_HOME",
    "HF_HUB_OFFLINE",
    "TRANSFORMERS_OFFLINE",
    "TOKENIZERS_PARALLELISM",
    "OMP_NUM_THREADS",
    "MKL_NUM_THREADS",
    "CUDA_VISIBLE_DEVICES",
    "NVIDIA_VISIBLE_DEVICES",
)


class UnsafeModelServer(ValueError):
    """A model server asked to run where model code could reach more than it needs."""


def model_server_environment(parent: Mapping[str, str], extra: Mapping[str, str]) -> dict[str, str]:
    """A model server's environment: the ``INHERITED_ENVIRONMENT`` part of ``parent``, then ``extra``."""
    env = {name: parent[name] for name in INHERITED_ENVIRONMENT if name in parent}
    env.update(extra)
    return env


def require_loopback(host: str) -> None:
    """Model servers are reached through the gateway only: refuse any address but loopback."""
    if host == "localhost":
        return
    try:
        loopback = ipaddress.ip_address(host).is_loopback
    except ValueError:
        loopback = False
    if not loopback:
        raise UnsafeModelServer(
            f"model servers listen on loopback only (127.0.0.1 or ::1), not {host!r}: the gateway is the "
            "one way in"
        )


def port_owner(port: int) -> int | None:
    """The pid listening on TCP ``port`` on this machine, None when nobody (or it cannot be seen)."""
    try:
        connections = psutil.net_connections(kind="tcp")
    except psutil.AccessDenied:
        return None
    for connection in connections:
        if connection.status == psutil.CONN_LISTEN and connection.laddr and connection.laddr.port == port:
            return connection.pid
    return None


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

    def owns_port(self) -> bool:
        """Whether the process listening on this server's port is ours (in the group we started).

        Guards against talking to an impostor: a process that took the port after ours died.
        """
        port = urlparse(self.url).port
        owner = port_owner(port) if port else None
        if owner is None:
            return False
        try:
            return os.getpgid(owner) == self.process.pid
        except ProcessLookupError:
            return False

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
    """Launch the server in its own process group and return at once; see :func:`wait_until_ready`.

    ``extra_env`` is all the server gets besides ``INHERITED_ENVIRONMENT``; ``host`` must be loopback.
    """
    require_loopback(host)
    port = port or free_port(host)
    log_dir.mkdir(parents=True, exist_ok=True)
    log_path = log_dir / f"model-server-v{version}-{port}.log"
    bin_dir = Path(sys.executable).parent
    env = model_server_environment(os.environ, extra_env)
    # `mlflow models serve` starts a bare `uvicorn` command: this interpreter's bin/ must come first.
    env["PATH"] = f"{bin_dir}{os.pathsep}{env.get('PATH', '')}"
    # Its output goes to a log file, where transformers' weight-loading bar is a run of redraws.
    env.setdefault("HF_HUB_DISABLE_PROGRESS_BARS", "1")
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


def warmup_body() -> dict:
    """The warm-up request for either task: each model ignores the other's parameter (MLflow drops
    parameters its signature does not name), and a generator writes one token, not a whole answer."""
    body = invocation_body(WARMUP_TEXTS, top_k=1)
    body["params"]["max_new_tokens"] = 1
    return body


def check_warmup_answer(payload: dict, expected_rows: int) -> None:
    """A server is only ready when it returns one prediction per warm-up text: a label, or generated text."""
    rows = payload.get("predictions")
    if not isinstance(rows, list) or len(rows) != expected_rows:
        raise ValueError(f"expected {expected_rows} predictions, got {str(payload)[:200]}")
    if not all(
        isinstance(row, dict) and (row.get("label") or isinstance(row.get("generated"), str)) for row in rows
    ):
        raise ValueError(f"predictions without a label or generated text: {str(rows)[:200]}")


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
        if not server.owns_port():
            raise server.failure(
                f"answered on {server.url}, but the listener there is not the process started"
            )
        response = client.post(f"{server.url}/invocations", json=warmup_body())
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
