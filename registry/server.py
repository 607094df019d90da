"""`mlflow server --app-name tuneloop`: MLflow's basic-auth app plus the rules of ``registry.server_rules``.

Registered as an ``mlflow.app`` entry point. MLflow's own auth app authenticates every request and
applies its per-model permissions first; the hooks here then refuse what the promotion rules forbid
(403 with the reason) and, after a write succeeds, record in server-only tags who registered,
approved and promoted, with the time, so that nothing a client sends can forge them. The records are
written through the server's own stores, in the same process, never through the REST API.
"""

from __future__ import annotations

import hashlib
import json
import logging
import tempfile
import time
from pathlib import Path
from typing import Any

from filelock import FileLock
from flask import Flask, Response, g, jsonify, request
from mlflow.entities import RunTag
from mlflow.entities.model_registry import ModelVersionTag, RegisteredModelTag
from mlflow.environment_variables import MLFLOW_AUTH_CONFIG_PATH
from mlflow.exceptions import MlflowException
from mlflow.server import app as mlflow_flask_app
from mlflow.server.auth import create_app as create_auth_app
from mlflow.server.auth import store as auth_store
from mlflow.server.handlers import _get_model_registry_store, _get_tracking_store

from registry.server_rules import (
    APPROVAL_RECORD,
    APPROVAL_TAG,
    AUDIT_RECORD,
    CREATED_BY,
    DECISIONS,
    PROMOTION_RECORD,
    PROTECTED_ALIASES,
    REGISTERED_BY,
    RUN_CREATED_BY,
    ApprovalRecord,
    Caller,
    PromotionRecord,
    VersionRecord,
    Write,
    endpoint_of,
    reserved_key_refusal,
    tuneloop_roles,
    write_of,
    write_refusal,
)

log = logging.getLogger(__name__)


def _now() -> str:
    return time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime())


def _params() -> dict[str, Any]:
    """The request's parameters as MLflow's handlers read them: JSON body or query, plus view args."""
    body = request.get_json(silent=True) if request.method != "GET" else None
    params: dict[str, Any] = dict(request.args.items())
    if isinstance(body, dict):
        params.update(body)
    return params | (request.view_args or {})


def _caller() -> Caller | None:
    username = g.get("mlflow_authenticated_user") or (
        request.authorization.username if request.authorization else None
    )
    if not username:
        return None
    try:
        user = auth_store.get_user(username)
    except MlflowException:
        return Caller(username)
    roles = tuneloop_roles([role.name for role in auth_store.list_user_roles(user.id)])
    return Caller(username, roles, bool(user.is_admin))


def _version_record(name: str | None, version: str | None) -> VersionRecord | None:
    if not name or not version:
        return None
    try:
        mv = _get_model_registry_store().get_model_version(name, version)
    except MlflowException:
        return None
    return VersionRecord.from_tags({tag.key: tag.value for tag in _tags_of(mv)})


def _tags_of(entity: Any) -> list[Any]:
    tags = entity.tags
    if isinstance(tags, dict):
        return [ModelVersionTag(k, v) for k, v in tags.items()]
    return list(tags or [])


def _alias_holder(name: str | None, alias: str | None) -> str | None:
    if not name or not alias:
        return None
    try:
        return str(_get_model_registry_store().get_model_version_by_alias(name, alias).version)
    except MlflowException:
        return None


def _forbidden(reason: str) -> Response:
    response = jsonify({"error_code": "PERMISSION_DENIED", "message": reason})
    response.status_code = 403
    return response


def enforce_rules() -> Response | None:
    """before_request, after MLflow's auth hook: refuse what the promotion rules forbid."""
    if endpoint_of(request.path) is None:
        return None
    params = _params()
    refusal = reserved_key_refusal(request.method, request.get_json(silent=True))
    write = write_of(request.method, request.path, params)
    caller = _caller()
    if refusal is None and write is not None and caller is not None:
        target = _alias_holder(write.name, write.alias) if write.kind == "delete_alias" else write.version
        refusal = write_refusal(caller, write, _version_record(write.name, target))
        if write.kind in ("set_alias", "delete_alias"):
            g.tuneloop_alias_before = _alias_holder(write.name, write.alias)
    if refusal is not None:
        who = caller.username if caller else "?"
        log.warning("refused %s %s by %s: %s", request.method, request.path, who, refusal)
        return _forbidden(refusal)
    g.tuneloop_write = write
    g.tuneloop_caller = caller
    return None


def record_writes(response: Response) -> Response:
    """after_request: record who did a successful write, in tags only the server may write."""
    if response.status_code != 200 or endpoint_of(request.path) is None:
        return response
    caller: Caller | None = g.get("tuneloop_caller")
    if caller is None:
        return response
    try:
        _record(caller, g.get("tuneloop_write"), response)
    # Deliberately broad: the write already happened; a missing record makes approval and serving
    # refuse (fail closed), which the log explains.
    except Exception:
        log.exception("could not record %s %s by %s", request.method, request.path, caller.username)
    return response


def _record(caller: Caller, write: Write | None, response: Response) -> None:
    endpoint = endpoint_of(request.path)
    registry = _get_model_registry_store()
    if endpoint == "runs/create" and request.method == "POST":
        run_id = (response.get_json(silent=True) or {}).get("run", {}).get("info", {}).get("run_id")
        if run_id:
            _get_tracking_store().set_tag(run_id, RunTag(CREATED_BY, caller.username))
        return
    if write is None:
        return
    if write.kind == "create_version":
        created = (response.get_json(silent=True) or {}).get("model_version", {})
        name, version, run_id = created.get("name"), str(created.get("version")), created.get("run_id")
        registry.set_model_version_tag(name, version, ModelVersionTag(REGISTERED_BY, caller.username))
        if run_id:
            run_tags = _get_tracking_store().get_run(run_id).data.tags
            if CREATED_BY in run_tags:
                registry.set_model_version_tag(
                    name, version, ModelVersionTag(RUN_CREATED_BY, run_tags[CREATED_BY])
                )
        return
    if write.kind == "set_version_tag" and write.key == APPROVAL_TAG and write.value in DECISIONS:
        mv = registry.get_model_version(write.name, write.version)
        metrics = _get_tracking_store().get_run(mv.run_id).data.metrics if mv.run_id else {}
        approval = ApprovalRecord(str(write.value), caller.username, _now(), dict(metrics))
        registry.set_model_version_tag(
            write.name, write.version, ModelVersionTag(APPROVAL_RECORD, approval.to_json())
        )
        log.info("%s v%s %s by %s", write.name, write.version, write.value, caller.username)
        return
    if write.kind in ("set_alias", "delete_alias") and write.alias in PROTECTED_ALIASES:
        _record_alias_move(caller, write)


def _record_alias_move(caller: Caller, write: Write) -> None:
    registry = _get_model_registry_store()
    target = write.version if write.kind == "set_alias" else None
    approval = _version_record(write.name, target) if target else None
    entry = PromotionRecord(
        action="set" if write.kind == "set_alias" else "delete",
        model=str(write.name),
        alias=str(write.alias),
        version=target,
        from_version=g.get("tuneloop_alias_before"),
        by=caller.username,
        by_admin=caller.is_admin,
        by_roles=sorted(caller.roles),
        approved_by=approval.approved_by if approval else None,
        approved_at=(approval.approval or {}).get("at") if approval else None,
        at=_now(),
    )
    payload = entry.to_json()
    stamp = f"{entry.at}.{time.time_ns() % 1_000_000_000:09d}"
    registry.set_registered_model_tag(entry.model, RegisteredModelTag(AUDIT_RECORD + stamp, payload))
    if target:
        registry.set_model_version_tag(
            entry.model, target, ModelVersionTag(PROMOTION_RECORD + entry.alias, payload)
        )
    log.info("audit: %s", payload)


def create_app(app: Flask = mlflow_flask_app) -> Any:
    """MLflow's auth app with the tuneloop rules after its authentication and permission checks."""
    # `mlflow server` starts several workers; each creates the users database on first start. MLflow
    # does that once before spawning them only for its own app name, so this app serialises it.
    config = MLFLOW_AUTH_CONFIG_PATH.get() or "default"
    lock_name = f"tuneloop-mlflow-auth-{hashlib.sha256(config.encode()).hexdigest()[:16]}.lock"
    with FileLock(str(Path(tempfile.gettempdir()) / lock_name), timeout=120):
        served = create_auth_app(app)
    # Flask runs before_request hooks in registration order: MLflow's authentication comes first.
    app.before_request(enforce_rules)
    app.after_request(record_writes)
    return served


def audit_entries(tags: dict[str, str]) -> list[dict]:
    """The server's audit entries among a registered model's tags, oldest first."""
    return [json.loads(tags[key]) for key in sorted(tags) if key.startswith(AUDIT_RECORD)]
