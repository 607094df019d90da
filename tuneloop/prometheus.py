"""A Prometheus beside the stack: its configuration for the gateways, and the server on loopback.

The alert rules are the checked-in ``deploy/monitoring/prometheus/alerts.yml`` (CI runs ``promtool`` on
them); only the scrape targets, their credentials and the intervals change between the checked-in
``prometheus.yml``, ``tuneloop up`` and the integration test, so they are rendered here from one
function. The server is Prometheus' own binary (Debian's ``prometheus`` package, or the release
tarball), run as a child process the caller stops: nothing is downloaded at run time.
"""

from __future__ import annotations

import shutil
import subprocess
from collections.abc import Mapping
from pathlib import Path
from typing import IO
from urllib.parse import urlsplit

import yaml

# 9090 (Prometheus' usual port) is the local S3 endpoint's (tuneloop.config.DEFAULT_S3_PORT).
DEFAULT_PROMETHEUS_PORT = 9095
# Relative to the project root, like every checked-in path.
ALERT_RULES = Path("deploy/monitoring/prometheus/alerts.yml")
GATEWAY_JOB = "tuneloop-gateway"
# Prometheus' defaults, fine for production; the integration test scrapes and evaluates every second.
DEFAULT_INTERVAL_S = 15.0
# A scrape may take at most this long, and never longer than its interval (Prometheus refuses that).
MAX_SCRAPE_TIMEOUT_S = 10.0
HEADER = (
    "# Prometheus scraping tuneloop's gateways (`tuneloop serve`); rendered by tuneloop/prometheus.py,\n"
    "# which `tuneloop up` also uses. Each gateway's /metrics needs an API key with scope admin, sent as\n"
    "# a bearer token read from credentials_file: `tuneloop keys create --name prometheus --scopes admin`.\n"
)


class PrometheusNotFound(FileNotFoundError):
    """The ``prometheus`` binary is not installed where it was looked for."""


def _duration(seconds: float) -> str:
    """Seconds as a Prometheus duration (``15s``, ``500ms``)."""
    if seconds <= 0:
        raise ValueError(f"an interval must be positive, got {seconds}")
    milliseconds = round(seconds * 1000)
    return f"{milliseconds // 1000}s" if milliseconds % 1000 == 0 else f"{milliseconds}ms"


def _split_targets(gateway_urls: Mapping[str, str]) -> tuple[str, dict[str, str]]:
    """The one scheme of the gateways' URLs and each environment's ``host:port``."""
    schemes = set()
    targets = {}
    for env, url in gateway_urls.items():
        parts = urlsplit(url)
        if parts.scheme not in ("http", "https") or not parts.hostname:
            raise ValueError(f"gateway URL for {env!r} must be http(s)://host[:port], got {url!r}")
        schemes.add(parts.scheme)
        port = parts.port or (443 if parts.scheme == "https" else 80)
        targets[env] = f"{parts.hostname}:{port}"
    if len(schemes) != 1:
        raise ValueError(f"the gateways must all use one scheme (http or https), got {sorted(schemes)}")
    return schemes.pop(), targets


def render_prometheus_config(
    gateway_urls: Mapping[str, str],
    rules_path: Path | str,
    *,
    credentials_file: Path | str | None = None,
    ca_file: Path | str | None = None,
    scrape_interval_s: float = DEFAULT_INTERVAL_S,
    evaluation_interval_s: float = DEFAULT_INTERVAL_S,
) -> str:
    """A prometheus.yml scraping each gateway, its target labelled with its environment (``env``).

    Args:
        gateway_urls: environment (``prod``, ``dev``) -> the gateway's base URL, as in
            ``Environment.gateway_urls``; all http or all https.
        rules_path: the alert rules (``ALERT_RULES`` under the project); a relative path is read from
            the folder the config is written to, as Prometheus does.
        credentials_file: a file holding an admin API key, sent as ``Authorization: Bearer``; without
            it the gateways answer the scrapes 401.
        ca_file: the CA that signed the gateways' certificate, for https with a private CA.
        scrape_interval_s: how often each gateway is scraped.
        evaluation_interval_s: how often the rules are evaluated.
    """
    if not gateway_urls:
        raise ValueError("no gateway to scrape")
    scheme, targets = _split_targets(gateway_urls)
    scrape_timeout_s = min(MAX_SCRAPE_TIMEOUT_S, scrape_interval_s)
    job: dict = {
        "job_name": GATEWAY_JOB,
        "scheme": scheme,
        "metrics_path": "/metrics",
        "static_configs": [{"targets": [target], "labels": {"env": env}} for env, target in targets.items()],
    }
    if credentials_file is not None:
        job["authorization"] = {"type": "Bearer", "credentials_file": str(credentials_file)}
    if ca_file is not None:
        job["tls_config"] = {"ca_file": str(ca_file)}
    config = {
        "global": {
            "scrape_interval": _duration(scrape_interval_s),
            "scrape_timeout": _duration(scrape_timeout_s),
            "evaluation_interval": _duration(evaluation_interval_s),
        },
        "rule_files": [str(rules_path)],
        "scrape_configs": [job],
    }
    return HEADER + yaml.safe_dump(config, sort_keys=False)


def write_prometheus_config(
    config_dir: Path,
    gateway_urls: Mapping[str, str],
    rules_path: Path,
    *,
    credentials_file: Path | None = None,
    ca_file: Path | None = None,
    scrape_interval_s: float = DEFAULT_INTERVAL_S,
    evaluation_interval_s: float = DEFAULT_INTERVAL_S,
) -> Path:
    """Write :func:`render_prometheus_config`'s file to ``config_dir/prometheus.yml`` and return its path.

    ``rules_path`` and ``credentials_file`` are made absolute: the config lives outside the project.
    """
    config_dir.mkdir(parents=True, exist_ok=True)
    path = config_dir / "prometheus.yml"
    content = render_prometheus_config(
        gateway_urls,
        rules_path.resolve(),
        credentials_file=credentials_file.resolve() if credentials_file else None,
        ca_file=ca_file.resolve() if ca_file else None,
        scrape_interval_s=scrape_interval_s,
        evaluation_interval_s=evaluation_interval_s,
    )
    path.write_text(content, encoding="utf-8")
    return path


def prometheus_binary(binary: str = "prometheus") -> str:
    """The path of ``binary`` (a name on PATH or a path), or an error that says how to install it."""
    found = shutil.which(binary)
    if found is None:
        raise PrometheusNotFound(
            f"Prometheus is not installed ({binary!r} is not an executable on PATH): "
            "`apt-get install prometheus` on Debian/Ubuntu, or put the `prometheus` binary of a release "
            "from https://prometheus.io/download/ on PATH"
        )
    return found


def prometheus_command(
    config_path: Path, data_dir: Path, port: int = DEFAULT_PROMETHEUS_PORT, binary: str = "prometheus"
) -> list[str]:
    """The command that runs Prometheus on ``127.0.0.1:port`` only, its database in ``data_dir``."""
    return [
        prometheus_binary(binary),
        f"--config.file={config_path}",
        f"--storage.tsdb.path={data_dir}",
        f"--web.listen-address=127.0.0.1:{port}",
    ]


def prometheus_url(port: int = DEFAULT_PROMETHEUS_PORT) -> str:
    return f"http://127.0.0.1:{port}"


def ready_url(port: int = DEFAULT_PROMETHEUS_PORT) -> str:
    """Answers 200 once Prometheus has loaded its config and rules and serves queries."""
    return f"{prometheus_url(port)}/-/ready"


def start_prometheus(
    config_path: Path,
    data_dir: Path,
    port: int = DEFAULT_PROMETHEUS_PORT,
    *,
    log: IO[bytes] | None = None,
    binary: str = "prometheus",
) -> subprocess.Popen:
    """Start Prometheus on loopback with ``config_path``; the caller waits for ``ready_url`` and stops it.

    Its output goes to ``log`` (inherited when None). Started in a session of its own, like the stack's
    other services, so that a Ctrl-C reaches only the supervisor, which stops it in order.
    """
    command = prometheus_command(config_path, data_dir, port, binary)
    data_dir.mkdir(parents=True, exist_ok=True)
    return subprocess.Popen(
        command,
        stdout=log,
        stderr=subprocess.STDOUT if log is not None else None,
        start_new_session=True,
    )
