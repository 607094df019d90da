"""The tracking server's promotion rules on single requests (no server: pure functions)."""

from __future__ import annotations

import json

import pytest

from registry.server_rules import (
    APPROVAL_RECORD,
    PROMOTION_RECORD,
    REGISTERED_BY,
    RUN_CREATED_BY,
    Caller,
    VersionRecord,
    reserved_key_refusal,
    serving_refusals,
    write_of,
    write_refusal,
)

SET_TAG = "/ajax-api/2.0/mlflow/model-versions/set-tag"
ALIAS = "/api/2.0/mlflow/registered-models/alias"
REGISTERED = VersionRecord(registered_by="trainer", run_created_by="trainer")
APPROVED = VersionRecord("trainer", "trainer", {"decision": "approved", "by": "alice", "at": "t"})


def approval(value: str, version: str = "3") -> object:
    return write_of("POST", SET_TAG, {"name": "m", "version": version, "key": "approval", "value": value})


def test_ui_and_client_paths_parse_to_the_same_write() -> None:
    body = {"name": "m", "version": "3", "key": "approval", "value": "approved"}
    ui = write_of("POST", SET_TAG, body)
    client = write_of("POST", SET_TAG.replace("/ajax-api/", "/api/"), body)
    assert ui == client
    assert ui is not None and ui.kind == "set_version_tag" and ui.value == "approved"
    assert write_of("GET", "/api/2.0/mlflow/registered-models/get", {"name": "m"}) is None


@pytest.mark.parametrize(
    ("caller", "value", "record", "refused_because"),
    [
        (Caller("trainer", frozenset({"trainer"})), "approved", REGISTERED, "not an approver"),
        (Caller("root", frozenset(), is_admin=True), "approved", REGISTERED, "not an approver"),
        (
            Caller("bob", frozenset({"trainer", "approver"})),
            "approved",
            VersionRecord("bob", "x"),
            "four eyes",
        ),
        (Caller("bob", frozenset({"approver"})), "approved", VersionRecord("x", "bob"), "four eyes"),
        (Caller("alice", frozenset({"approver"})), "approved", VersionRecord(), "no server record"),
        (Caller("alice", frozenset({"approver"})), "pending", REGISTERED, "must be one of"),
        (Caller("alice", frozenset({"approver"})), "approved", REGISTERED, None),
        (Caller("bob", frozenset({"approver"})), "rejected", VersionRecord("bob", "bob"), None),
    ],
)
def test_approval_rules(caller, value, record, refused_because) -> None:
    refusal = write_refusal(caller, approval(value), record)
    if refused_because is None:
        assert refusal is None
    else:
        assert refusal is not None and refused_because in refusal


def test_only_the_deployer_moves_prod_and_only_to_an_approved_version() -> None:
    move = write_of("POST", ALIAS, {"name": "m", "alias": "prod", "version": "3"})
    delete = write_of("DELETE", ALIAS, {"name": "m", "alias": "previous-prod"})
    deployer = Caller("ci-deployer", frozenset({"deployer"}))
    assert "not the deployer" in (
        write_refusal(Caller("trainer", frozenset({"trainer"})), move, APPROVED) or ""
    )
    assert "no server-recorded approval" in (write_refusal(deployer, move, REGISTERED) or "")
    assert write_refusal(deployer, move, APPROVED) is None
    assert write_refusal(deployer, delete, None) is None
    # An admin may (break-glass); the supervisor then refuses to serve what is not approved.
    assert write_refusal(Caller("root", is_admin=True), move, REGISTERED) is None
    dev = write_of("POST", ALIAS, {"name": "m", "alias": "dev", "version": "3"})
    assert write_refusal(Caller("trainer", frozenset({"trainer"})), dev, REGISTERED) is None


def test_a_new_version_cannot_arrive_approved() -> None:
    create = "/api/2.0/mlflow/model-versions/create"
    trainer = Caller("trainer", frozenset({"trainer"}))
    pending = write_of("POST", create, {"name": "m", "tags": [{"key": "approval", "value": "pending"}]})
    approved = write_of("POST", create, {"name": "m", "tags": [{"key": "approval", "value": "approved"}]})
    assert write_refusal(trainer, pending, None) is None
    assert "pending" in (write_refusal(trainer, approved, None) or "")


def test_server_keys_cannot_be_written_by_any_client() -> None:
    body = {"name": "m", "version": "1", "key": "tuneloop.server.approval", "value": "{}"}
    assert "tracking server only" in (reserved_key_refusal("POST", body) or "")
    batch = {
        "run_id": "r",
        "tags": [{"key": "a", "value": "1"}, {"key": "tuneloop.server.created_by", "value": "x"}],
    }
    assert reserved_key_refusal("POST", batch) is not None
    assert reserved_key_refusal("DELETE", {"key": "tuneloop.server.audit.1"}) is not None
    assert reserved_key_refusal("POST", {"key": "tuneloop.gates_passed", "value": "true"}) is None
    assert reserved_key_refusal("GET", body) is None


def _tags(approved_by: str | None, promoted_version: str | None, promoted_approver: str | None) -> dict:
    tags = {REGISTERED_BY: "trainer", RUN_CREATED_BY: "trainer"}
    if approved_by:
        metrics = {"quality/accuracy": 0.9}
        tags[APPROVAL_RECORD] = json.dumps(
            {"decision": "approved", "by": approved_by, "at": "t", "run_metrics": metrics}
        )
    if promoted_version:
        tags[PROMOTION_RECORD + "prod"] = json.dumps(
            {"version": promoted_version, "approved_by": promoted_approver}
        )
    return tags


def test_serving_needs_matching_approval_and_promotion_records() -> None:
    assert serving_refusals("3", "prod", _tags("alice", "3", "alice")) == []
    assert any(
        "no server-recorded approval" in r for r in serving_refusals("3", "prod", _tags(None, "3", None))
    )
    assert any(
        "no server audit entry" in r for r in serving_refusals("3", "prod", _tags("alice", None, None))
    )
    assert any("names v2" in r for r in serving_refusals("3", "prod", _tags("alice", "2", "alice")))
    assert any("approver" in r for r in serving_refusals("3", "prod", _tags("alice", "3", "mallory")))


def test_serving_rechecks_gates_on_the_approved_run_metrics() -> None:
    tags = _tags("alice", "3", "alice")
    assert serving_refusals("3", "prod", tags, {"min_accuracy": 0.8}) == []
    failing = serving_refusals("3", "prod", tags, {"min_accuracy": 0.95})
    assert failing and "fails its gates" in failing[0]
    unknown = serving_refusals("3", "prod", tags, {"min_macro_f1": 0.5})
    assert unknown and "lack the metrics" in unknown[0]
