"""The promotion rules the tracking server enforces, as pure functions over one write request.

MLflow's permissions are per experiment and per registered model: whoever may EDIT a model may set
any of its tags and move any of its aliases, and the server records no creator on a model version.
These rules add what a four-eyes promotion needs (``registry.server`` wires them into MLflow's auth
app): only approvers decide `approval`, never on a version they registered or trained; only the
deployer moves `prod` and `previous-prod`, and only to an approved version; and keys under
``SERVER_PREFIX`` are written by the server alone, so what it records cannot be forged by a client.
"""

from __future__ import annotations

import json
import re
from collections.abc import Callable, Iterator, Mapping
from dataclasses import asdict, dataclass, field
from typing import Any

from mlflow.tracking import MlflowClient

from evaluation.gates import GATE_METRICS, evaluate_gates
from registry.register import PROD_ALIAS

# Keys only the server writes: a client write of one is refused, whoever the client is (admin included).
SERVER_PREFIX = "tuneloop.server."
REGISTERED_BY = SERVER_PREFIX + "registered_by"
RUN_CREATED_BY = SERVER_PREFIX + "run_created_by"
CREATED_BY = SERVER_PREFIX + "created_by"  # on a run
APPROVAL_RECORD = SERVER_PREFIX + "approval"
PROMOTION_RECORD = SERVER_PREFIX + "promotion."  # + alias, on the version the alias moved to
AUDIT_RECORD = SERVER_PREFIX + "audit."  # + timestamp, on the registered model

APPROVAL_TAG = "approval"
DECISIONS = ("approved", "rejected")
PENDING = "pending"
PROTECTED_ALIASES = (PROD_ALIAS, f"previous-{PROD_ALIAS}")

TRAINER, APPROVER, DEPLOYER, VIEWER = "trainer", "approver", "deployer", "viewer"
ROLE_PREFIX = "tuneloop-"

_API_PATH = re.compile(r"^/(?:api|ajax-api)/[0-9.]+/mlflow/(?P<endpoint>.+)$")


@dataclass(frozen=True)
class Caller:
    """Who sends the request, as MLflow's auth app authenticated them, with their tuneloop roles."""

    username: str
    roles: frozenset[str] = frozenset()
    is_admin: bool = False


@dataclass(frozen=True)
class Write:
    """One registry write a rule looks at; ``kind`` names the REST endpoint and method."""

    kind: str
    name: str | None = None
    version: str | None = None
    key: str | None = None
    value: str | None = None
    alias: str | None = None
    tags: Mapping[str, str] = field(default_factory=dict)


@dataclass(frozen=True)
class VersionRecord:
    """What the server recorded itself about a version (None where it recorded nothing)."""

    registered_by: str | None = None
    run_created_by: str | None = None
    approval: dict[str, Any] | None = None

    @classmethod
    def from_tags(cls, tags: Mapping[str, str]) -> VersionRecord:
        raw = tags.get(APPROVAL_RECORD)
        return cls(
            registered_by=tags.get(REGISTERED_BY),
            run_created_by=tags.get(RUN_CREATED_BY),
            approval=json.loads(raw) if raw else None,
        )

    @property
    def approved_by(self) -> str | None:
        if self.approval and self.approval.get("decision") == "approved":
            return str(self.approval.get("by"))
        return None


@dataclass(frozen=True)
class ApprovalRecord:
    decision: str
    by: str
    at: str
    # The run's logged metrics when the approver decided: gates are re-checked on these, not on tags.
    run_metrics: dict[str, float]

    def to_json(self) -> str:
        return json.dumps(asdict(self), sort_keys=True)


@dataclass(frozen=True)
class PromotionRecord:
    action: str  # "set" or "delete"
    model: str
    alias: str
    version: str | None
    from_version: str | None
    by: str
    by_admin: bool
    by_roles: list[str]
    approved_by: str | None
    approved_at: str | None
    at: str

    def to_json(self) -> str:
        return json.dumps(asdict(self), sort_keys=True)


def role_name(role: str) -> str:
    """The MLflow RBAC role that carries a tuneloop role."""
    return ROLE_PREFIX + role


def tuneloop_roles(mlflow_role_names: list[str]) -> frozenset[str]:
    return frozenset(n[len(ROLE_PREFIX) :] for n in mlflow_role_names if n.startswith(ROLE_PREFIX))


def _tag_keys(body: Any) -> Iterator[str]:
    """Every tag key a JSON body names, at any depth (``{"key": ...}`` entries and the ``key`` field)."""
    if isinstance(body, dict):
        key = body.get("key")
        if isinstance(key, str):
            yield key
        for value in body.values():
            yield from _tag_keys(value)
    elif isinstance(body, list):
        for item in body:
            yield from _tag_keys(item)


def endpoint_of(path: str) -> str | None:
    match = _API_PATH.match(path)
    return match.group("endpoint") if match else None


def write_of(method: str, path: str, params: Mapping[str, Any]) -> Write | None:
    """The registry write a request makes, or None when no promotion rule concerns it."""
    endpoint = endpoint_of(path)
    if endpoint is None:
        return None

    def text(key: str) -> str | None:
        value = params.get(key)
        return None if value is None else str(value)

    if endpoint == "model-versions/set-tag" and method == "POST":
        return Write("set_version_tag", text("name"), text("version"), text("key"), text("value"))
    if endpoint == "model-versions/delete-tag" and method == "DELETE":
        return Write("delete_version_tag", text("name"), text("version"), text("key"))
    if endpoint == "registered-models/alias" and method in ("POST", "DELETE"):
        kind = "set_alias" if method == "POST" else "delete_alias"
        return Write(kind, text("name"), text("version"), alias=text("alias"))
    if endpoint == "model-versions/create" and method == "POST":
        tags = {
            str(t.get("key")): str(t.get("value", ""))
            for t in params.get("tags") or []
            if isinstance(t, dict)
        }
        return Write("create_version", text("name"), tags=tags)
    return None


def reserved_key_refusal(method: str, body: Any) -> str | None:
    """Refuse any client write that names a server-only key: only the server records who did what."""
    if method not in ("POST", "PATCH", "PUT", "DELETE"):
        return None
    for key in _tag_keys(body):
        if key.startswith(SERVER_PREFIX):
            return f"tag keys under {SERVER_PREFIX!r} are written by the tracking server only ({key!r})"
    return None


def write_refusal(caller: Caller, write: Write, record: VersionRecord | None) -> str | None:
    """Why ``caller`` may not make ``write`` (None: MLflow's own permissions decide).

    ``record`` is what the server recorded about the version the write concerns (for an alias move:
    the version the alias would point to).
    """
    if write.kind == "create_version":
        value = write.tags.get(APPROVAL_TAG)
        if value is not None and value != PENDING:
            return f"a new version may only carry {APPROVAL_TAG}={PENDING}; a reviewer decides later"
        return None
    if write.kind in ("set_version_tag", "delete_version_tag") and write.key == APPROVAL_TAG:
        return _approval_refusal(caller, write, record)
    if write.kind in ("set_alias", "delete_alias") and write.alias in PROTECTED_ALIASES:
        return _alias_refusal(caller, write, record)
    return None


def _approval_refusal(caller: Caller, write: Write, record: VersionRecord | None) -> str | None:
    if write.kind == "delete_version_tag":
        return f"{APPROVAL_TAG} is never deleted: set it to `rejected` to withdraw an approval"
    if APPROVER not in caller.roles:
        return f"only the {APPROVER} role may set {APPROVAL_TAG}; {caller.username!r} is not an {APPROVER}"
    if write.value not in DECISIONS:
        return f"{APPROVAL_TAG} must be one of {', '.join(DECISIONS)}, not {write.value!r}"
    if write.value == "rejected":
        return None
    if record is None or record.registered_by is None:
        return (
            f"v{write.version} has no server record of who registered it (registered before this "
            "server enforced approvals?): register it again to approve it"
        )
    authors = {record.registered_by, record.run_created_by} - {None}
    if caller.username in authors:
        return (
            f"four eyes: {caller.username!r} registered v{write.version} or created its run and may not "
            "approve it; another approver must"
        )
    return None


def _alias_refusal(caller: Caller, write: Write, record: VersionRecord | None) -> str | None:
    """Only the deployer moves the production aliases, and `prod` only to an approved version.

    An admin passes (MLflow admins are its break-glass accounts) but the server still records the
    move, and the serving supervisor refuses to serve a `prod` version without a matching approval.
    """
    if caller.is_admin:
        return None
    if DEPLOYER not in caller.roles:
        return f"only the {DEPLOYER} role may move `{write.alias}`; {caller.username!r} is not the {DEPLOYER}"
    unapproved = record is None or record.approved_by is None
    if write.kind == "set_alias" and write.alias == PROD_ALIAS and unapproved:
        return f"v{write.version} has no server-recorded approval: an approver must approve it first"
    return None


def serving_refusals(
    version: str,
    alias: str,
    version_tags: Mapping[str, str],
    gate_thresholds: Mapping[str, float | None] | None = None,
) -> list[str]:
    """Why a supervisor must not serve ``version`` for ``alias``: both server records must exist and match.

    ``gate_thresholds`` are re-applied to the run metrics the server copied into the approval record
    (not to tags a client can write).
    """
    record = VersionRecord.from_tags(version_tags)
    reasons = []
    if record.approved_by is None:
        decision = (record.approval or {}).get("decision", "no approval")
        reasons.append(f"v{version} has no server-recorded approval ({decision})")
    elif gate_thresholds:
        metrics = (record.approval or {}).get("run_metrics") or {}
        missing = sorted(
            g for g, t in gate_thresholds.items() if t is not None and GATE_METRICS[g] not in metrics
        )
        if missing:
            reasons.append(f"v{version}'s approved run metrics lack the metrics of gates {missing}")
        else:
            verdict = evaluate_gates(metrics, dict(gate_thresholds))
            if not verdict["passed"]:
                reasons.append(
                    f"v{version} fails its gates on its run's metrics: " + "; ".join(verdict["reasons"])
                )
    raw = version_tags.get(PROMOTION_RECORD + alias)
    if not raw:
        reasons.append(f"v{version} has no server audit entry for a promotion to `{alias}`")
    else:
        promotion = json.loads(raw)
        if str(promotion.get("version")) != str(version):
            reasons.append(f"the `{alias}` audit entry names v{promotion.get('version')}, not v{version}")
        if record.approved_by is not None and promotion.get("approved_by") != record.approved_by:
            reasons.append(
                f"the `{alias}` audit entry names approver {promotion.get('approved_by')!r}, the approval "
                f"record {record.approved_by!r}"
            )
    return reasons


def registry_vetter(
    client: MlflowClient,
    model_name: str,
    alias: str,
    gate_thresholds: Mapping[str, float | None] | None = None,
) -> Callable[[str], list[str]]:
    """A supervisor's check of a version against the server's records (see :func:`serving_refusals`)."""

    def vet(version: str) -> list[str]:
        tags = client.get_model_version(model_name, version).tags
        return serving_refusals(version, alias, tags, gate_thresholds)

    return vet
