"""Auth paths on a minimal FastAPI app: none, bad key, revoked, expired/forged JWT, wrong scope, good;
generic 401 bodies, a JWKS endpoint that never answers, and failed-auth floods per client address."""

# No `from __future__ import annotations`: FastAPI resolves the endpoint annotations, which name a
# dependency built inside a fixture.
import datetime as dt
import json
import logging
import socket
import threading
import time
from pathlib import Path
from typing import Annotated

import jwt
import pytest
from cryptography.hazmat.primitives import serialization
from cryptography.hazmat.primitives.asymmetric import rsa
from fastapi import Depends, FastAPI, HTTPException
from fastapi.testclient import TestClient

from serving.auth import (
    UNAUTHORIZED_DETAIL,
    ApiKeyStore,
    Authenticator,
    JwtSettings,
    JwtVerifier,
    Principal,
    authenticator_from_environment,
    create_api_key,
    list_api_keys,
    revoke_api_key,
)
from serving.limits import Refusal, refusal_handler
from tuneloop.cli import main
from tuneloop.config import Environment

ISSUER = "https://idp.example.test/"
AUDIENCE = "tuneloop-gateway"


@pytest.fixture(scope="module")
def rsa_keys() -> tuple[str, str]:
    private = rsa.generate_private_key(public_exponent=65537, key_size=2048)
    private_pem = private.private_bytes(
        serialization.Encoding.PEM, serialization.PrivateFormat.PKCS8, serialization.NoEncryption()
    ).decode()
    public_pem = (
        private.public_key()
        .public_bytes(serialization.Encoding.PEM, serialization.PublicFormat.SubjectPublicKeyInfo)
        .decode()
    )
    return private_pem, public_pem


def make_token(
    private_pem: str, *, scope: str | list[str] = "predict", expires_in_s: int = 300, **claims
) -> str:
    now = dt.datetime.now(dt.UTC)
    payload = {
        "iss": ISSUER,
        "aud": AUDIENCE,
        "sub": "client-42",
        "iat": now,
        "exp": now + dt.timedelta(seconds=expires_in_s),
        ("scope" if isinstance(scope, str) else "scp"): scope,
    } | claims
    return jwt.encode(payload, private_pem, algorithm="RS256")


@pytest.fixture()
def keys_path(tmp_path: Path) -> Path:
    return tmp_path / "api_keys.json"


def app_with(auth: Authenticator) -> FastAPI:
    """A minimal app with /predict and /feedback behind ``auth``, refusals in the gateway's format."""
    app = FastAPI()
    app.add_exception_handler(Refusal, refusal_handler)

    @app.post("/predict")
    async def predict(principal: Annotated[Principal, Depends(auth.require("predict"))]) -> dict:
        return {"subject": principal.subject, "method": principal.method}

    @app.post("/feedback")
    async def feedback(principal: Annotated[Principal, Depends(auth.require("feedback"))]) -> dict:
        return {"subject": principal.subject}

    return app


@pytest.fixture()
def client(keys_path: Path, rsa_keys: tuple[str, str]) -> TestClient:
    settings = JwtSettings(issuer=ISSUER, audience=AUDIENCE, key=rsa_keys[1], leeway_s=0)
    return TestClient(
        app_with(Authenticator(api_keys=ApiKeyStore(keys_path), jwt_verifier=JwtVerifier(settings)))
    )


def test_no_credentials_is_401_with_a_challenge(client: TestClient) -> None:
    response = client.post("/predict")
    assert response.status_code == 401
    assert response.headers["WWW-Authenticate"] == 'Bearer realm="tuneloop"'
    assert response.json()["detail"] == UNAUTHORIZED_DETAIL


@pytest.mark.parametrize(
    "headers",
    [
        {"X-API-Key": "tlk_0123456789ab_not-the-secret"},
        {"Authorization": "Bearer tlk_0123456789ab_not-the-secret"},
        {"X-API-Key": "something-else"},
        {"Authorization": "Bearer not.a.jwt"},
        {"Authorization": "Basic dXNlcjpwYXNz"},
    ],
)
def test_bad_credentials_are_401(client: TestClient, keys_path: Path, headers: dict) -> None:
    create_api_key(keys_path, "real", ["predict"])
    response = client.post("/predict", headers=headers)
    assert response.status_code == 401
    assert "WWW-Authenticate" in response.headers


def test_good_api_key_in_either_header(client: TestClient, keys_path: Path) -> None:
    key = create_api_key(keys_path, "svc", ["predict"])
    for headers in ({"X-API-Key": key}, {"Authorization": f"Bearer {key}"}):
        response = client.post("/predict", headers=headers)
        assert response.status_code == 200, response.text
        assert response.json()["method"] == "api_key"


def test_key_with_a_wrong_secret_for_a_real_id_is_refused(client: TestClient, keys_path: Path) -> None:
    key = create_api_key(keys_path, "svc", ["predict"])
    forged = key[:-4] + ("AAAA" if not key.endswith("AAAA") else "BBBB")
    assert client.post("/predict", headers={"X-API-Key": forged}).status_code == 401


def test_missing_scope_is_403_and_admin_has_every_scope(client: TestClient, keys_path: Path) -> None:
    feedback_only = create_api_key(keys_path, "labeller", ["feedback"])
    admin = create_api_key(keys_path, "ops", ["admin"])
    refused = client.post("/predict", headers={"X-API-Key": feedback_only})
    assert refused.status_code == 403
    assert "predict" in refused.json()["detail"]
    assert 'error="insufficient_scope"' in refused.headers["WWW-Authenticate"]
    assert client.post("/feedback", headers={"X-API-Key": feedback_only}).status_code == 200
    assert client.post("/predict", headers={"X-API-Key": admin}).status_code == 200


def test_revoked_key_is_refused_without_restart(
    client: TestClient, keys_path: Path, caplog: pytest.LogCaptureFixture
) -> None:
    key = create_api_key(keys_path, "svc", ["predict"])
    assert client.post("/predict", headers={"X-API-Key": key}).status_code == 200
    revoke_api_key(keys_path, key.split("_")[1])
    with caplog.at_level(logging.WARNING, logger="serving.auth"):
        response = client.post("/predict", headers={"X-API-Key": key})
    assert response.status_code == 401
    assert response.json()["detail"] == UNAUTHORIZED_DETAIL
    assert "revoked API key" in caplog.text and key not in caplog.text


def test_key_file_stores_only_hashes(keys_path: Path) -> None:
    key = create_api_key(keys_path, "svc", ["predict", "feedback"])
    stored = keys_path.read_text()
    assert key not in stored
    assert key.split("_", 2)[2] not in stored
    entry = json.loads(stored)["keys"][0]
    assert entry["scopes"] == ["predict", "feedback"] and len(entry["sha256"]) == 64
    assert "sha256" not in list_api_keys(keys_path)[0]


def test_unknown_scope_is_rejected_at_creation(keys_path: Path) -> None:
    with pytest.raises(ValueError, match="scopes"):
        create_api_key(keys_path, "svc", ["predict", "delete-everything"])


def test_good_jwt_with_scope_string_or_scp_list(client: TestClient, rsa_keys: tuple[str, str]) -> None:
    for scope in ("feedback predict", ["predict"]):
        token = make_token(rsa_keys[0], scope=scope)
        response = client.post("/predict", headers={"Authorization": f"Bearer {token}"})
        assert response.status_code == 200, response.text
        assert response.json() == {"subject": "client-42", "method": "jwt"}


def test_jwt_without_the_scope_is_403(client: TestClient, rsa_keys: tuple[str, str]) -> None:
    token = make_token(rsa_keys[0], scope="feedback")
    assert client.post("/predict", headers={"Authorization": f"Bearer {token}"}).status_code == 403


@pytest.mark.parametrize(
    ("claims", "reason"),
    [
        ({"expires_in_s": -60}, "token expired"),
        ({"aud": "someone-else"}, "audience"),
        ({"iss": "https://evil.example.test/"}, "issuer"),
    ],
)
def test_expired_or_foreign_jwt_is_401(
    client: TestClient, rsa_keys: tuple[str, str], claims: dict, reason: str, caplog: pytest.LogCaptureFixture
) -> None:
    token = make_token(rsa_keys[0], **claims)
    with caplog.at_level(logging.WARNING, logger="serving.auth"):
        response = client.post("/predict", headers={"Authorization": f"Bearer {token}"})
    assert response.status_code == 401
    assert response.json()["detail"] == UNAUTHORIZED_DETAIL
    assert response.headers["WWW-Authenticate"] == 'Bearer realm="tuneloop", error="invalid_token"'
    # Which check failed is for the operator, in the server log only.
    assert reason in caplog.text.lower() and reason not in response.text.lower()


def test_every_401_says_the_same_and_echoes_nothing(
    client: TestClient, keys_path: Path, rsa_keys: tuple[str, str]
) -> None:
    """A prober learns nothing from which 401 it got: bodies and challenges are the same for all."""
    key = create_api_key(keys_path, "svc", ["predict"])
    revoke_api_key(keys_path, key.split("_")[1])
    other = rsa.generate_private_key(public_exponent=65537, key_size=2048)
    forged = jwt.encode(
        {"iss": ISSUER, "aud": AUDIENCE, "sub": "x", "exp": 4102444800},
        other,
        algorithm="RS256",
        headers={"kid": "kid-the-prober-chose"},
    )
    credentials = [
        key,  # revoked
        "tlk_0123456789ab_unknown",
        "garbage",
        make_token(rsa_keys[0], expires_in_s=-60),
        make_token(rsa_keys[0], aud="elsewhere"),
        forged,
    ]
    answers = {
        (r.status_code, r.text, r.headers["WWW-Authenticate"])
        for r in (
            client.post("/predict", headers={"Authorization": f"Bearer {credential}"})
            for credential in credentials
        )
    }
    assert len(answers) == 1, answers
    status, body, _ = answers.pop()
    assert status == 401 and json.loads(body)["detail"] == UNAUTHORIZED_DETAIL
    assert "kid-the-prober-chose" not in body


def test_jwt_signed_by_another_key_or_unsigned_is_401(client: TestClient) -> None:
    other = rsa.generate_private_key(public_exponent=65537, key_size=2048)
    other_pem = other.private_bytes(
        serialization.Encoding.PEM, serialization.PrivateFormat.PKCS8, serialization.NoEncryption()
    ).decode()
    now = dt.datetime.now(dt.UTC)
    claims = {
        "iss": ISSUER,
        "aud": AUDIENCE,
        "sub": "x",
        "exp": now + dt.timedelta(minutes=5),
        "scope": "admin",
    }
    for token in (make_token(other_pem), jwt.encode(claims, None, algorithm="none")):
        assert client.post("/predict", headers={"Authorization": f"Bearer {token}"}).status_code == 401


def test_hs256_secret_from_environment(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("TUNELOOP_HOME", str(tmp_path))
    monkeypatch.setenv("TUNELOOP_JWT_ISSUER", ISSUER)
    monkeypatch.setenv("TUNELOOP_JWT_AUDIENCE", AUDIENCE)
    monkeypatch.setenv("TUNELOOP_JWT_KEY", "a-shared-secret-of-at-least-32-bytes!")
    monkeypatch.setenv("TUNELOOP_JWT_ALGORITHMS", "HS256")
    auth = authenticator_from_environment(Environment.from_env(tmp_path))
    assert auth.api_keys is not None and auth.api_keys.path == tmp_path / "api_keys.json"
    token = jwt.encode(
        {"iss": ISSUER, "aud": AUDIENCE, "client_id": "batch-job", "exp": 4102444800, "scope": "predict"},
        "a-shared-secret-of-at-least-32-bytes!",
        algorithm="HS256",
    )
    principal = auth.jwt_verifier.verify(token)
    assert principal.subject == "batch-job" and principal.scopes == {"predict"}


def test_cli_prints_the_key_once_and_it_works(keys_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    assert (
        main(
            ["keys", "--keys-file", str(keys_path), "create", "--name", "ci", "--scopes", "predict,feedback"]
        )
        == 0
    )
    key = capsys.readouterr().out.strip()
    principal = ApiKeyStore(keys_path).verify(key)
    assert principal.scopes == {"predict", "feedback"}
    assert (
        main(
            [
                "keys",
                "--keys-file",
                str(keys_path),
                "create",
                "--name",
                "sim",
                "--scopes",
                "predict",
                "feedback",
            ]
        )
        == 0
    )
    assert ApiKeyStore(keys_path).verify(capsys.readouterr().out.strip()).scopes == {"predict", "feedback"}
    main(["keys", "--keys-file", str(keys_path), "list"])
    listed = capsys.readouterr().out
    assert key not in listed and principal.subject in listed


def test_jwt_verified_against_the_issuers_jwks_endpoint(rsa_keys: tuple[str, str]) -> None:
    """The usual IdP setup: the gateway fetches the signing key by `kid` from a JWKS URL (served locally)."""
    import asyncio
    import threading
    from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer

    from cryptography.hazmat.primitives.serialization import load_pem_public_key
    from starlette.requests import Request

    jwk = json.loads(jwt.algorithms.RSAAlgorithm.to_jwk(load_pem_public_key(rsa_keys[1].encode())))
    jwks = json.dumps({"keys": [jwk | {"kid": "key-1", "use": "sig", "alg": "RS256"}]}).encode()

    class Jwks(BaseHTTPRequestHandler):
        def do_GET(self) -> None:
            self.send_response(200)
            self.send_header("content-type", "application/json")
            self.end_headers()
            self.wfile.write(jwks)

        def log_message(self, *args) -> None:
            pass

    server = ThreadingHTTPServer(("127.0.0.1", 0), Jwks)
    threading.Thread(target=server.serve_forever, daemon=True).start()
    try:
        url = f"http://127.0.0.1:{server.server_address[1]}/.well-known/jwks.json"
        auth = Authenticator(
            jwt_verifier=JwtVerifier(JwtSettings(issuer=ISSUER, audience=AUDIENCE, jwks_url=url))
        )
        now = dt.datetime.now(dt.UTC)
        claims = {
            "iss": ISSUER,
            "aud": AUDIENCE,
            "sub": "svc",
            "exp": now + dt.timedelta(minutes=5),
            "scope": "admin",
        }
        good = jwt.encode(claims, rsa_keys[0], algorithm="RS256", headers={"kid": "key-1"})
        unknown_kid = jwt.encode(claims, rsa_keys[0], algorithm="RS256", headers={"kid": "key-2"})

        def request(token: str) -> Request:
            return Request({"type": "http", "headers": [(b"authorization", f"Bearer {token}".encode())]})

        principal = asyncio.run(auth.authenticate(request(good)))
        assert principal.subject == "svc" and principal.allows("predict")
        with pytest.raises(HTTPException) as refused:
            asyncio.run(auth.authenticate(request(unknown_kid)))
        assert refused.value.status_code == 401 and refused.value.detail == UNAUTHORIZED_DETAIL
        assert "key-2" not in str(refused.value.headers)
    finally:
        server.shutdown()


def test_a_jwks_endpoint_that_never_answers_fails_fast_with_503(rsa_keys: tuple[str, str]) -> None:
    """The issuer accepts the connection and then says nothing: the request is a 503 within the timeout."""
    silent = socket.socket()
    silent.bind(("127.0.0.1", 0))
    silent.listen(16)
    accepted: list[socket.socket] = []
    stop = threading.Event()

    def accept_and_hold() -> None:
        silent.settimeout(0.1)
        while not stop.is_set():
            try:
                accepted.append(silent.accept()[0])
            except TimeoutError:
                continue

    holder = threading.Thread(target=accept_and_hold, daemon=True)
    holder.start()
    url = f"http://127.0.0.1:{silent.getsockname()[1]}/jwks.json"
    settings = JwtSettings(issuer=ISSUER, audience=AUDIENCE, jwks_url=url, jwks_timeout_s=0.5)
    client = TestClient(app_with(Authenticator(jwt_verifier=JwtVerifier(settings))))
    token = jwt.encode(
        {"iss": ISSUER, "aud": AUDIENCE, "sub": "svc", "exp": 4102444800, "scope": "predict"},
        rsa_keys[0],
        algorithm="RS256",
        headers={"kid": "key-1"},
    )
    try:
        started = time.monotonic()
        response = client.post("/predict", headers={"Authorization": f"Bearer {token}"})
        elapsed = time.monotonic() - started
    finally:
        stop.set()
        holder.join()
        for connection in accepted:
            connection.close()
        silent.close()
    assert accepted, "the JWKS endpoint was never called"
    assert response.status_code == 503, response.text
    assert response.json()["error"] == "auth_unavailable" and response.headers["Retry-After"]
    assert elapsed < 3, f"took {elapsed:.1f} s with a 0.5 s JWKS timeout"


def test_failed_attempts_from_one_address_are_429_before_any_check(
    keys_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """After the burst of failures, the address is refused before its credential is even looked at;
    another address, and the same one once its bucket refills, are served as usual."""
    good = create_api_key(keys_path, "svc", ["predict"])
    store = ApiKeyStore(keys_path)
    checked = []
    real_verify = store.verify
    monkeypatch.setattr(store, "verify", lambda key: checked.append(key) or real_verify(key))
    now = [0.0]
    auth = Authenticator(
        api_keys=store, failed_auth_rate_per_s=2.0, failed_auth_burst=3, clock=lambda: now[0]
    )
    app = app_with(auth)
    flooder = TestClient(app, client=("203.0.113.7", 4000))
    bad = {"X-API-Key": "tlk_0123456789ab_wrong"}
    assert [flooder.post("/predict", headers=bad).status_code for _ in range(3)] == [401] * 3
    checked.clear()
    refused = [flooder.post("/predict", headers=bad) for _ in range(50)]
    assert {r.status_code for r in refused} == {429}
    assert refused[0].json()["error"] == "auth_rate_limited" and refused[0].headers["Retry-After"] == "1"
    assert flooder.post("/predict", headers={"X-API-Key": good}).status_code == 429
    assert checked == [], "a refused address still cost a key check"
    neighbour = TestClient(app, client=("203.0.113.8", 4000))
    assert neighbour.post("/predict", headers={"X-API-Key": good}).status_code == 200
    now[0] += 0.6
    assert flooder.post("/predict", headers={"X-API-Key": good}).status_code == 200
