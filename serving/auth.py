"""Who may call the gateway: API keys stored hashed, and JWT bearer tokens from an OAuth2 issuer.

Scopes: ``predict`` (``/v1/predict``, ``/invocations``), ``feedback`` (``/v1/feedback``) and ``admin``
(``/metrics``, ``/v1/status``); ``admin`` includes the other two.

API keys look like ``tlk_<key id>_<secret>``. The key file keeps, per key id, the SHA-256 of the whole
key and its scopes; the key itself is printed once when created and never stored. SHA-256 rather than
a slow password hash (argon2, bcrypt) because the secret is 256 random bits, not a human password:
no dictionary applies and brute force is out of reach, while a slow hash would add tens of
milliseconds to every request.

JWTs are what an OAuth2 client-credentials flow hands a service: signed by the issuer, checked here
for signature, ``exp``, ``iss`` and ``aud``; scopes come from the ``scope`` claim (space-separated,
RFC 8693/9068) or ``scp`` (a list, as Okta and Entra ID write it). The key is a shared secret (HS*),
a PEM public key, or the issuer's JWKS URL, fetched with a short timeout: an issuer that does not
answer makes requests fail fast with a 503, never hang.

A refusal tells the caller nothing about which check failed (a 401 body is the same for a missing,
malformed, unknown, revoked or expired credential, and never echoes a token's ``kid``); the reason
goes to the server log. Failed attempts are rate-limited per client address before any hashing,
token decoding or key fetching, so an unauthenticated flood costs the gateway little.
"""

from __future__ import annotations

import datetime as dt
import hashlib
import hmac
import json
import logging
import os
import secrets
import tempfile
import time
from collections.abc import Awaitable, Callable, Iterable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Literal

import anyio
import jwt
from fastapi import HTTPException, Request, Security
from fastapi.security import APIKeyHeader, HTTPAuthorizationCredentials, HTTPBearer
from filelock import FileLock

from serving.limits import Refusal, TokenBucketLimiter
from tuneloop.config import Environment

log = logging.getLogger(__name__)

SCOPES = ("predict", "feedback", "admin")
API_KEY_PREFIX = "tlk_"
API_KEY_HEADER = "X-API-Key"
REALM = "tuneloop"
# The one 401 message: which check failed is in the server log only.
UNAUTHORIZED_DETAIL = (
    f"authentication required: send a valid API key ({API_KEY_HEADER} or Authorization: Bearer) "
    "or access token"
)
JWKS_RETRY_AFTER_S = "5"


@dataclass(frozen=True)
class Principal:
    """An authenticated caller: a key id or a token subject, and what it may do."""

    subject: str
    scopes: frozenset[str]
    method: Literal["api_key", "jwt"]

    def allows(self, scope: str) -> bool:
        return scope in self.scopes or "admin" in self.scopes

    @property
    def is_admin(self) -> bool:
        return "admin" in self.scopes

    @property
    def id(self) -> str:
        """``api_key:<key id>`` or ``jwt:<subject>``: stored on log rows; the prefix keeps the two apart."""
        return f"{self.method}:{self.subject}"

    @property
    def rate_limit_key(self) -> str:
        return self.id


class AuthError(Exception):
    """Credentials were given but are not acceptable; the message says why, for the server log only."""


class AuthUnavailable(Exception):
    """The credential cannot be checked now (the issuer's JWKS endpoint did not answer in time)."""


def _check_scopes(scopes: Iterable[str]) -> tuple[str, ...]:
    scopes = tuple(dict.fromkeys(scope.strip() for scope in scopes if scope.strip()))
    unknown = sorted(set(scopes) - set(SCOPES))
    if unknown or not scopes:
        raise ValueError(f"scopes must be a non-empty subset of {list(SCOPES)}; got unknown {unknown}")
    return scopes


def _sha256(key: str) -> str:
    return hashlib.sha256(key.encode("utf-8")).hexdigest()


# ---------------------------------------------------------------------------------------------- API keys


def _read_key_file(path: Path) -> dict:
    if not path.exists():
        return {"keys": []}
    with open(path, encoding="utf-8") as handle:
        return json.load(handle)


def _write_key_file(path: Path, content: dict) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    with tempfile.NamedTemporaryFile("w", dir=path.parent, delete=False, suffix=".tmp") as handle:
        json.dump(content, handle, indent=2)
        handle.write("\n")
    os.chmod(handle.name, 0o600)
    os.replace(handle.name, path)


def _key_file_lock(path: Path) -> FileLock:
    return FileLock(str(path) + ".lock", timeout=30)


def create_api_key(path: Path, name: str, scopes: Iterable[str]) -> str:
    """Add a key with these scopes to the key file and return it; only its hash is stored."""
    scopes = _check_scopes(scopes)
    key_id = secrets.token_hex(6)
    key = f"{API_KEY_PREFIX}{key_id}_{secrets.token_urlsafe(32)}"
    with _key_file_lock(path):
        content = _read_key_file(path)
        content["keys"].append(
            {
                "key_id": key_id,
                "name": name,
                "sha256": _sha256(key),
                "scopes": list(scopes),
                "created_at": dt.datetime.now(dt.UTC).isoformat(timespec="seconds"),
                "revoked": False,
            }
        )
        _write_key_file(path, content)
    return key


def revoke_api_key(path: Path, key_id: str) -> None:
    """Mark a key revoked (kept in the file for audit); a running gateway refuses it from its next request."""
    with _key_file_lock(path):
        content = _read_key_file(path)
        matches = [entry for entry in content["keys"] if entry["key_id"] == key_id]
        if not matches:
            raise KeyError(f"no API key with id {key_id!r} in {path}")
        for entry in matches:
            entry["revoked"] = True
        _write_key_file(path, content)


def list_api_keys(path: Path) -> list[dict]:
    """The key file's entries without their hashes."""
    return [{k: v for k, v in entry.items() if k != "sha256"} for entry in _read_key_file(path)["keys"]]


class ApiKeyStore:
    """The key file as the gateway sees it, re-read when it changes so keys work without a restart."""

    def __init__(self, path: Path) -> None:
        self.path = path
        self._stamp: tuple[int, int] | None = None
        self._by_id: dict[str, dict] = {}

    def _refresh(self) -> None:
        try:
            stat = self.path.stat()
        except FileNotFoundError:
            self._stamp, self._by_id = None, {}
            return
        stamp = (stat.st_mtime_ns, stat.st_size)
        if stamp != self._stamp:
            entries = _read_key_file(self.path)["keys"]
            self._by_id = {entry["key_id"]: entry for entry in entries}
            self._stamp = stamp

    def verify(self, key: str) -> Principal:
        if not key.startswith(API_KEY_PREFIX) or key.count("_") < 2:
            raise AuthError("malformed API key")
        key_id = key[len(API_KEY_PREFIX) :].split("_", 1)[0]
        self._refresh()
        entry = self._by_id.get(key_id)
        # Compare digests in constant time; an unknown id still costs one hash so timing says nothing.
        expected = entry["sha256"] if entry else _sha256("")
        if not hmac.compare_digest(_sha256(key), expected) or entry is None:
            raise AuthError("unknown API key")
        if entry.get("revoked"):
            raise AuthError("revoked API key")
        return Principal(subject=key_id, scopes=frozenset(entry["scopes"]), method="api_key")


# -------------------------------------------------------------------------------------------------- JWT


@dataclass(frozen=True)
class JwtSettings:
    """How bearer tokens are checked; ``key`` (secret or PEM) or ``jwks_url`` gives the signing key."""

    issuer: str
    audience: str
    algorithms: tuple[str, ...] = ("RS256",)
    key: str | None = None
    jwks_url: str | None = None
    leeway_s: float = 30.0
    # Longest wait for the issuer's JWKS endpoint; past it the request is a 503, not a hang.
    jwks_timeout_s: float = 3.0

    def __post_init__(self) -> None:
        if (self.key is None) == (self.jwks_url is None):
            raise ValueError("JWT verification needs exactly one of a key (secret or PEM) or a JWKS URL")
        if not self.audience:
            raise ValueError("JWT verification needs an audience (TUNELOOP_JWT_AUDIENCE)")
        if self.jwks_timeout_s <= 0:
            raise ValueError("jwks_timeout_s must be > 0")


class JwtVerifier:
    def __init__(self, settings: JwtSettings) -> None:
        self.settings = settings
        self._jwks = (
            jwt.PyJWKClient(settings.jwks_url, timeout=settings.jwks_timeout_s) if settings.jwks_url else None
        )

    @property
    def needs_network(self) -> bool:
        return self._jwks is not None

    def verify(self, token: str) -> Principal:
        settings = self.settings
        try:
            if self._jwks is not None:
                key = self._jwks.get_signing_key_from_jwt(token).key
            elif settings.key is not None:
                key = settings.key
            else:  # JwtSettings refuses this combination; a bug, not the caller's fault
                raise RuntimeError("JWT verification has neither a key nor a JWKS URL")
            claims = jwt.decode(
                token,
                key,
                algorithms=list(settings.algorithms),
                audience=settings.audience,
                issuer=settings.issuer,
                leeway=settings.leeway_s,
                options={"require": ["exp", "iss", "aud"]},
            )
        except jwt.ExpiredSignatureError as error:
            raise AuthError("token expired") from error
        except jwt.PyJWKClientConnectionError as error:
            raise AuthUnavailable(f"JWKS endpoint {settings.jwks_url} failed: {error}") from error
        except jwt.PyJWKClientError as error:
            raise AuthError(f"token signing key not found: {error}") from error
        except jwt.InvalidTokenError as error:
            raise AuthError(f"invalid token: {error}") from error
        subject = claims.get("sub") or claims.get("client_id") or claims.get("azp")
        if not subject:
            raise AuthError("invalid token: no sub, client_id or azp claim")
        return Principal(subject=str(subject), scopes=_token_scopes(claims), method="jwt")


def _token_scopes(claims: dict) -> frozenset[str]:
    raw = claims.get("scope", claims.get("scp", ""))
    values = raw.split() if isinstance(raw, str) else [str(value) for value in raw]
    return frozenset(values)


def jwt_settings_from_environment(
    environment: Environment, leeway_s: float, jwks_timeout_s: float = 3.0
) -> JwtSettings | None:
    """JWT settings from the environment, or None when no issuer is configured (API keys only)."""
    if not environment.jwt_issuer:
        return None
    key = environment.jwt_key.get_secret_value() if environment.jwt_key else None
    if key is None and environment.jwt_key_path is not None:
        key = environment.jwt_key_path.read_text(encoding="utf-8")
    return JwtSettings(
        issuer=environment.jwt_issuer,
        audience=environment.jwt_audience or "",
        algorithms=environment.jwt_algorithms,
        key=key,
        jwks_url=environment.jwt_jwks_url,
        leeway_s=leeway_s,
        jwks_timeout_s=jwks_timeout_s,
    )


# ---------------------------------------------------------------------------------- FastAPI dependencies


def _unauthorized(presented: bool) -> HTTPException:
    """The same 401 whatever failed; ``error="invalid_token"`` only says a credential was sent (RFC 6750)."""
    challenge = f'Bearer realm="{REALM}"' + (', error="invalid_token"' if presented else "")
    return HTTPException(status_code=401, detail=UNAUTHORIZED_DETAIL, headers={"WWW-Authenticate": challenge})


def client_address(request: Request) -> str:
    """The peer's address (behind a proxy, run uvicorn with --proxy-headers to get the real client)."""
    return request.client.host if request.client else "unknown"


@dataclass
class Authenticator:
    """Turns a request's credentials into a :class:`Principal`, or a 401/403/429/503.

    ``failed_auth_rate_per_s`` / ``failed_auth_burst``: a token bucket per client address charged one
    token per failed attempt; while it is empty the address gets a 429 before its credential is looked at.
    ``clock``: the bucket's time source (a test steps it instead of racing a loaded machine).
    """

    api_keys: ApiKeyStore | None = None
    jwt_verifier: JwtVerifier | None = None
    failed_auth_rate_per_s: float = 1.0
    failed_auth_burst: int = 20
    clock: Callable[[], float] = field(default=time.monotonic, repr=False)
    _failures: TokenBucketLimiter = field(init=False, repr=False)

    def __post_init__(self) -> None:
        if self.api_keys is None and self.jwt_verifier is None:
            raise ValueError("an Authenticator needs an API key file, JWT settings, or both")
        self._failures = TokenBucketLimiter(
            self.failed_auth_rate_per_s, self.failed_auth_burst, clock=self.clock
        )

    async def authenticate(self, request: Request) -> Principal:
        address = client_address(request)
        wait_s = self._failures.try_acquire(address, take=False)
        if wait_s > 0:
            raise TokenBucketLimiter.refusal(
                wait_s, "too many failed authentication attempts from this address", "auth_rate_limited"
            )
        credential, kind = _presented_credential(request)
        try:
            return await self._verify(credential, kind)
        except AuthError as error:
            self._failures.try_acquire(address)
            # repr: a token's claims or `kid` could carry line breaks into the log.
            log.warning(
                "authentication failed from %s (%s): %r", address, kind or "no credential", str(error)
            )
            raise _unauthorized(presented=credential is not None) from error
        except AuthUnavailable as error:
            self._failures.try_acquire(address)
            log.error("authentication unavailable for a request from %s: %r", address, str(error))
            raise Refusal(
                503,
                "auth_unavailable",
                "the credentials cannot be verified right now; retry later",
                headers={"Retry-After": JWKS_RETRY_AFTER_S},
            ) from error

    async def _verify(self, credential: str | None, kind: str) -> Principal:
        if credential is None:
            raise AuthError("no credentials")
        if kind == "api_key" or credential.startswith(API_KEY_PREFIX):
            if self.api_keys is None:
                raise AuthError("API keys are not enabled on this gateway")
            return self.api_keys.verify(credential)
        if self.jwt_verifier is None:
            raise AuthError("bearer tokens are not enabled on this gateway; use an API key")
        if self.jwt_verifier.needs_network:
            return await anyio.to_thread.run_sync(self.jwt_verifier.verify, credential)
        return self.jwt_verifier.verify(credential)

    def require(self, scope: str) -> Callable[..., Awaitable[Principal]]:
        """A FastAPI dependency: the caller, who must hold ``scope`` (or ``admin``)."""
        if scope not in SCOPES:
            raise ValueError(f"unknown scope {scope!r}")

        # The security schemes make OpenAPI (and the /docs "Authorize" button) show both ways in; the
        # credential itself is read from the request by `authenticate`, whose refusals are ours to write.
        async def dependency(
            request: Request,
            api_key: str | None = _API_KEY_PARAM,
            bearer: HTTPAuthorizationCredentials | None = _BEARER_PARAM,
        ) -> Principal:
            principal = await self.authenticate(request)
            if not principal.allows(scope):
                held = sorted(principal.scopes)
                challenge = f'Bearer realm="{REALM}", error="insufficient_scope", scope="{scope}"'
                raise HTTPException(
                    status_code=403,
                    detail=f"the credentials lack the scope '{scope}' (they have: {held})",
                    headers={"WWW-Authenticate": challenge},
                )
            request.state.principal = principal
            return principal

        return dependency


_api_key_scheme = APIKeyHeader(name=API_KEY_HEADER, auto_error=False, description="An API key (tlk_...)")
_bearer_scheme = HTTPBearer(auto_error=False, description="An API key or an OAuth2 access token (JWT)")
_API_KEY_PARAM = Security(_api_key_scheme)
_BEARER_PARAM = Security(_bearer_scheme)


def _presented_credential(request: Request) -> tuple[str | None, str]:
    api_key = request.headers.get(API_KEY_HEADER)
    if api_key:
        return api_key.strip(), "api_key"
    authorization = request.headers.get("Authorization", "")
    scheme, _, value = authorization.partition(" ")
    if scheme.lower() == "bearer" and value.strip():
        return value.strip(), "bearer"
    return None, ""


def authenticator_from_environment(
    environment: Environment,
    leeway_s: float = 30.0,
    *,
    jwks_timeout_s: float = 3.0,
    failed_auth_rate_per_s: float = 1.0,
    failed_auth_burst: int = 20,
) -> Authenticator:
    """The gateway's authenticator: the key file (always) and JWT verification when configured."""
    settings = jwt_settings_from_environment(environment, leeway_s, jwks_timeout_s)
    keys_path = environment.api_keys_path or environment.home_dir / "api_keys.json"
    return Authenticator(
        api_keys=ApiKeyStore(keys_path),
        jwt_verifier=JwtVerifier(settings) if settings else None,
        failed_auth_rate_per_s=failed_auth_rate_per_s,
        failed_auth_burst=failed_auth_burst,
    )
