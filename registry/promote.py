"""Promotion and rollback of registered versions: pure rules, then thin MLflow alias wiring.

Only an approved, never-rejected version that is or was `dev` and still passes its gates may become
`prod`. Each move remembers the previous holder as `previous-<alias>` and leaves an audit entry in a
JSON-lines file and on the registered model. A file lock serialises read-check-move so that concurrent
promotions cannot leave the aliases pointing at an inconsistent pair.
"""

from __future__ import annotations

import getpass
import json
import logging
import time
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any

from filelock import FileLock
from mlflow.tracking import MlflowClient

from evaluation.gates import GATE_METRICS, evaluate_gates
from registry.register import (
    DEV_ALIAS,
    PROD_ALIAS,
    current_version,
    metrics_from_tags,
    quantized_gate_failures,
)

log = logging.getLogger(__name__)

LOCK_TIMEOUT_SECONDS = 120


class PromotionRefused(Exception):
    """A promotion or rollback that the rules do not allow; the message says every reason."""

    def __init__(self, name: str, version: str | None, reasons: list[str]):
        self.reasons = reasons
        target = f"{name} v{version}" if version else name
        super().__init__(f"refusing to move {target}: " + "; ".join(reasons))


class AliasesInconsistent(RuntimeError):
    """The aliases read back after a move are not what was written: someone moved them concurrently."""


@dataclass(frozen=True)
class VersionFacts:
    """What the rules need to know about a version, read from the registry."""

    version: str
    tags: dict[str, str]
    aliases: tuple[str, ...]


@dataclass(frozen=True)
class AuditEntry:
    action: str  # "promote" or "rollback"
    model: str
    alias: str
    from_version: str | None
    to_version: str
    actor: str
    reason: str
    at: str


def previous_alias(alias: str) -> str:
    return f"previous-{alias}"


def promotion_refusals(
    facts: VersionFacts, to: str, gate_thresholds: dict[str, float | None] | None = None
) -> list[str]:
    """Every reason ``facts`` may not take alias ``to``; empty when it may.

    ``gate_thresholds`` (today's params) re-applies the gates to the version's recorded metrics, so a
    version approved before the gates were tightened does not slip through.
    """
    reasons = []
    v = facts.version
    approval = facts.tags.get("approval", "")
    if approval == "rejected":
        reasons.append(f"v{v} was rejected by a reviewer (tag approval=rejected)")
    elif approval != "approved":
        reasons.append(
            f"v{v} is not approved (tag approval={approval or '<unset>'}); "
            "a reviewer must set approval=approved"
        )
    if DEV_ALIAS not in facts.aliases and facts.tags.get("was_dev") != "true":
        reasons.append(
            f"v{v} was never `{DEV_ALIAS}`: only versions that passed registration may be promoted"
        )
    if facts.tags.get("tuneloop.gates_passed") != "true":
        failed = facts.tags.get("tuneloop.gates_failed") or "unknown gates"
        reasons.append(f"v{v} failed its gates at registration ({failed})")
    elif gate_thresholds:
        recorded = metrics_from_tags(facts.tags)
        missing = sorted(
            gate
            for gate, threshold in gate_thresholds.items()
            if threshold is not None and GATE_METRICS[gate] not in recorded
        )
        if missing:
            reasons.append(f"v{v} has no recorded metric for gates {missing}; cannot re-check them")
        else:
            verdict = evaluate_gates(recorded, gate_thresholds)
            if not verdict["passed"]:
                reasons.append(f"v{v} no longer passes its gates: " + "; ".join(verdict["reasons"]))
            # A version served quantised is held to today's thresholds on its int8 figures too.
            reasons += [f"v{v} (int8): {r}" for r in quantized_gate_failures(gate_thresholds, recorded)]
    if to in facts.aliases:
        reasons.append(f"v{v} is already `{to}`")
    return reasons


def rollback_refusals(previous: VersionFacts | None, to: str) -> list[str]:
    """Rollback needs a remembered previous holder that a reviewer has not rejected since."""
    if previous is None:
        return [f"there is no `{previous_alias(to)}` version to roll back to"]
    if previous.tags.get("approval") == "rejected":
        return [f"`{previous_alias(to)}` v{previous.version} has since been rejected (tag approval=rejected)"]
    return []


def _facts(client: MlflowClient, name: str, version: str) -> VersionFacts:
    mv = client.get_model_version(name, version)
    return VersionFacts(version=str(mv.version), tags=dict(mv.tags), aliases=tuple(mv.aliases))


def _now() -> str:
    return time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime())


def default_actor() -> str:
    try:
        return getpass.getuser()
    except (KeyError, OSError):
        return "unknown"


def _lock(audit_path: Path, name: str) -> FileLock:
    audit_path.parent.mkdir(parents=True, exist_ok=True)
    return FileLock(str(audit_path.parent / f"registry-{name}.lock"), timeout=LOCK_TIMEOUT_SECONDS)


def _write_audit(client: MlflowClient, entry: AuditEntry, audit_path: Path) -> None:
    """One JSON line in the file, the same entry on the registered model and on the target version."""
    payload = json.dumps(asdict(entry), sort_keys=True)
    with open(audit_path, "a", encoding="utf-8") as handle:
        handle.write(payload + "\n")
    stamp = f"{entry.at}.{time.time_ns() % 1_000_000_000:09d}"
    client.set_registered_model_tag(entry.model, f"audit.{stamp}", payload)
    client.set_registered_model_tag(entry.model, "audit.last", payload)
    client.set_model_version_tag(
        entry.model, entry.to_version, f"audit.{entry.action}.{entry.alias}", payload
    )


def _check_aliases(client: MlflowClient, name: str, expected: dict[str, str | None]) -> None:
    for alias, version in expected.items():
        holder = current_version(client, name, alias)
        actual = holder.version if holder else None
        if str(actual) != str(version) and not (actual is None and version is None):
            raise AliasesInconsistent(f"{name}@{alias} is v{actual} after the move, expected v{version}")


def promote(
    client: MlflowClient,
    name: str,
    audit_path: Path,
    to: str = PROD_ALIAS,
    version: str | None = None,
    actor: str | None = None,
    reason: str = "",
    gate_thresholds: dict[str, float | None] | None = None,
) -> AuditEntry:
    """Move ``to`` (default `prod`) to ``version`` (default: the current `dev`) if the rules allow it."""
    actor = actor or default_actor()
    with _lock(audit_path, name):
        if version is None:
            dev = current_version(client, name, DEV_ALIAS)
            if dev is None:
                raise PromotionRefused(name, None, [f"no version given and no `{DEV_ALIAS}` alias is set"])
            version = dev.version
        version = str(version)
        refusals = promotion_refusals(_facts(client, name, version), to, gate_thresholds)
        if refusals:
            raise PromotionRefused(name, version, refusals)
        old = current_version(client, name, to)
        old_version = str(old.version) if old else None
        if old_version is not None:
            client.set_registered_model_alias(name, previous_alias(to), old_version)
        client.set_registered_model_alias(name, to, version)
        _check_aliases(
            client, name, {to: version, **({previous_alias(to): old_version} if old_version else {})}
        )
        entry = AuditEntry("promote", name, to, old_version, version, actor, reason or "approved", _now())
        _write_audit(client, entry, audit_path)
    log.info("%s@%s: v%s -> v%s by %s", name, to, old_version, version, actor)
    return entry


def rollback(
    client: MlflowClient,
    name: str,
    audit_path: Path,
    to: str = PROD_ALIAS,
    actor: str | None = None,
    reason: str = "",
) -> AuditEntry:
    """Put ``to`` back on `previous-<to>` and drop that alias, so a second rollback cannot bounce back."""
    actor = actor or default_actor()
    with _lock(audit_path, name):
        previous = current_version(client, name, previous_alias(to))
        facts = _facts(client, name, str(previous.version)) if previous else None
        refusals = rollback_refusals(facts, to)
        # A missing previous version is always one of the refusals; the check says so to the type checker.
        if refusals or previous is None:
            raise PromotionRefused(name, None, refusals)
        current = current_version(client, name, to)
        current_v = str(current.version) if current else None
        client.set_registered_model_alias(name, to, str(previous.version))
        client.delete_registered_model_alias(name, previous_alias(to))
        _check_aliases(client, name, {to: str(previous.version), previous_alias(to): None})
        if current_v is not None:
            client.set_model_version_tag(name, current_v, "tuneloop.rolled_back", "true")
        entry = AuditEntry(
            "rollback", name, to, current_v, str(previous.version), actor, reason or "rollback", _now()
        )
        _write_audit(client, entry, audit_path)
    log.info("%s@%s rolled back: v%s -> v%s by %s", name, to, current_v, previous.version, actor)
    return entry


def registry_status(client: MlflowClient, name: str, aliases: tuple[str, ...] | None = None) -> dict:
    """For each alias: the version it points to, that version's metrics, approval and gate verdict."""
    aliases = aliases or (DEV_ALIAS, PROD_ALIAS, previous_alias(PROD_ALIAS))
    status: dict[str, dict[str, Any] | None] = {}
    for alias in aliases:
        mv = current_version(client, name, alias)
        if mv is None:
            status[alias] = None
            continue
        status[alias] = {
            "version": str(mv.version),
            "approval": mv.tags.get("approval", "<unset>"),
            "gates_passed": mv.tags.get("tuneloop.gates_passed"),
            "metrics": metrics_from_tags(mv.tags),
            "run_id": mv.run_id,
        }
    return status
