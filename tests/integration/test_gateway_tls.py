"""`tuneloop serve` over HTTPS, as a user runs it: a client that trusts the CA predicts, others cannot."""

from __future__ import annotations

import json
import os
import signal
import ssl
import subprocess
import time

import httpx
import pytest
import trustme
import yaml

from serving.auth import create_api_key
from serving.model_server import free_port
from tests.support import (
    REPO_ROOT,
    VENV_BIN,
    sqlite_registry_with,
    venv_env,
)

pytestmark = pytest.mark.slow

NAME = "tuneloop-tls-test"


def test_https_gateway_is_verified_and_plain_http_fails(tmp_path, tiny_base, tiny_adapter) -> None:
    ca = trustme.CA()
    issued = ca.issue_cert("127.0.0.1", "localhost")
    cert_file, key_file, ca_file = tmp_path / "gateway.crt", tmp_path / "gateway.key", tmp_path / "ca.crt"
    cert_file.write_bytes(b"".join(pem.bytes() for pem in issued.cert_chain_pems))
    issued.private_key_pem.write_to_path(str(key_file))
    ca.cert_pem.write_to_path(str(ca_file))

    home, project = tmp_path / "home", tmp_path / "project"
    project.mkdir()
    uri, _ = sqlite_registry_with(home, NAME, [tiny_adapter], tiny_base)
    params = yaml.safe_load((REPO_ROOT / "params.yaml").read_text())
    params["registry"]["model_name"] = NAME
    (project / "params.yaml").write_text(yaml.safe_dump(params))
    keys = home / "api_keys.json"
    key = create_api_key(keys, "client", ["predict"])
    port = free_port()
    environment = venv_env(
        TUNELOOP_HOME=str(home),
        MLFLOW_TRACKING_URI=uri,
        TUNELOOP_API_KEYS_FILE=str(keys),
        TUNELOOP_TLS_CERT_FILE=str(cert_file),
        TUNELOOP_TLS_KEY_FILE=str(key_file),
    )
    with open(tmp_path / "serve.log", "wb") as log_file:
        process = subprocess.Popen(
            [str(VENV_BIN / "tuneloop"), "serve", "--env", "prod", "--port", str(port)],
            cwd=project,
            env=environment,
            stdout=log_file,
            stderr=subprocess.STDOUT,
            start_new_session=True,
        )
    trusted = ssl.create_default_context(cafile=str(ca_file))
    base = f"https://127.0.0.1:{port}"
    try:
        deadline = time.monotonic() + 240
        while True:
            assert process.poll() is None, (tmp_path / "serve.log").read_text()[-2000:]
            assert time.monotonic() < deadline, (tmp_path / "serve.log").read_text()[-2000:]
            try:
                if httpx.get(f"{base}/readyz", verify=trusted, timeout=5).status_code == 200:
                    break
            except httpx.TransportError:
                pass
            time.sleep(1)
        answer = httpx.post(
            f"{base}/v1/predict", json={"text": "cancel my order"}, headers={"X-API-Key": key}, verify=trusted
        )
        outcomes = {"https with the CA": answer.status_code}
        with pytest.raises(httpx.ConnectError, match="CERTIFICATE_VERIFY_FAILED"):
            httpx.get(f"{base}/healthz", timeout=5)  # the system trust store does not know this CA
        outcomes["https without the CA"] = "certificate verify failed"
        with pytest.raises(httpx.TransportError):
            httpx.get(f"http://127.0.0.1:{port}/healthz", timeout=5)
        outcomes["plain http to the TLS port"] = "connection failed"
        print(json.dumps(outcomes | {"prediction": answer.json()["predictions"][0]["label"]}, indent=2))
        assert answer.status_code == 200
        assert answer.json()["predictions"][0]["label"] in {"cancel_order", "check_order_status"}
    finally:
        os.killpg(process.pid, signal.SIGTERM)
        process.wait(timeout=60)
