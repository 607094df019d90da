"""`tuneloop up --prometheus`: the Prometheus service the stack starts beside its gateways."""

from __future__ import annotations

import subprocess

import pytest
import yaml

from flows.stack import StackPorts, prometheus_service
from serving.auth import list_api_keys
from tests.support import REPO_ROOT
from tuneloop.config import Environment


@pytest.fixture()
def env(tmp_path, monkeypatch) -> Environment:
    monkeypatch.setenv("TUNELOOP_HOME", str(tmp_path / "home"))
    monkeypatch.delenv("TUNELOOP_API_KEYS_FILE", raising=False)
    monkeypatch.delenv("TUNELOOP_TLS_CERT_FILE", raising=False)
    return Environment.from_env(REPO_ROOT)


def test_prometheus_scrapes_every_gateway_with_its_own_admin_key(env) -> None:
    service = prometheus_service(env, StackPorts.from_env(env))
    config_path = env.home_dir / "prometheus" / "prometheus.yml"
    config = yaml.safe_load(config_path.read_text())
    targets = [
        target for group in config["scrape_configs"][0]["static_configs"] for target in group["targets"]
    ]
    assert sorted(targets) == ["127.0.0.1:8000", "127.0.0.1:8001"]
    key_file = env.home_dir / "secrets" / "prometheus-scrape.key"
    assert config["scrape_configs"][0]["authorization"]["credentials_file"] == str(key_file)
    assert oct(key_file.stat().st_mode & 0o777) == "0o600"
    keys = list_api_keys(env.api_keys_path)
    assert [key["name"] for key in keys] == ["prometheus-scrape"] and keys[0]["scopes"] == ["admin"]
    assert key_file.read_text() not in env.api_keys_path.read_text()  # only its hash is stored
    assert "--web.listen-address=127.0.0.1:9095" in service.args
    assert service.health_url == "http://127.0.0.1:9095/-/ready"
    # A second `tuneloop up` keeps the key it made.
    prometheus_service(env, StackPorts.from_env(env))
    assert len(list_api_keys(env.api_keys_path)) == 1


def test_the_written_config_passes_promtool(env) -> None:
    promtool = pytest.importorskip("shutil").which("promtool")
    if promtool is None:
        pytest.skip("promtool is not installed (Debian package `prometheus`)")
    prometheus_service(env, StackPorts.from_env(env))
    checked = subprocess.run(
        [promtool, "check", "config", str(env.home_dir / "prometheus" / "prometheus.yml")],
        capture_output=True,
        text=True,
    )
    assert checked.returncode == 0, checked.stdout + checked.stderr
