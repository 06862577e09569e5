"""Importing a signed policy bundle into a home: every import check, then the activation, its ``admin`` record
and a signed checkpoint in one transaction, then the trust rotation the bundle carries.

Owns: what ``phi-gateway policy verify|import`` and the admin socket's ``/admin/policy/verify|import`` do
alike: ``verify`` (the importer's checks against this home's trust, site and policy in force), ``activate``,
the verification report of a bundle that passed (``passed_checks``) and the document both print
(``document``).
Never: activates a bundle the importer has not verified; installs a new trust set before the activation
that carries it is durable (a crash in between leaves the stored bundle verifying against the old set).
"""

from __future__ import annotations

import sqlite3
from typing import Any

from appliance.home import Home, Vault
from appliance.policy import dsse, importer
from appliance.policy.diff import changes
from appliance.policy.schema import Policy
from appliance.policy.trust import TrustStore


def policy_in_force(vault: Vault) -> Policy | None:
    active = vault.policies.current()
    return (
        None if active is None else Policy.model_validate_json(dsse.parse_envelope(active.envelope).payload)
    )


def verify(home: Home, vault: Vault, data: bytes) -> importer.VerifiedBundle:
    """Every import check of the bundle ``data``; raises ``BundleRejected`` naming the check that failed."""
    return importer.verify_bundle(
        data, home.trust(), site=home.settings().site, current_version=vault.policies.current_version()
    )


def activate(home: Home, vault: Vault, vb: importer.VerifiedBundle, os_user: str | None) -> str:
    """Make ``vb`` the policy in force, with its ``admin`` record and a checkpoint covering it committed
    together; then install the trust set it rotates to. Returns the record's detail."""
    detail = (
        f"policy_import v{vb.policy.version} sha256:{vb.sha256[:16]} "
        f"keys={','.join(k[:16] for k in vb.keyids)}"
    )
    if vb.new_trust is not None:
        detail += " " + home.trust().rotation_detail(vb.new_trust)
    ledger = vault.ledger

    def record_and_checkpoint(conn: sqlite3.Connection) -> None:
        ledger.record_in(conn, {"type": "admin", "detail": detail, "os_user": os_user})
        ledger.checkpoint_in(conn, "policy-import")

    vault.policies.activate(vb, also=record_and_checkpoint)
    if vb.new_trust is not None:
        home.trust().replace(vb.new_trust)
    return detail


def passed_checks(
    vb: importer.VerifiedBundle, trust: TrustStore, site: str, previous: int | None
) -> list[dict[str, Any]]:
    """The importer's checks, in its order, each with what it found in this bundle (all passed)."""
    policy = vb.policy
    rotation = (
        "no trust change"
        if vb.new_trust is None
        else f"rotates trust to {len(vb.new_trust.keys)} key(s), threshold {vb.new_trust.threshold}: "
        "signed by both the old and the new threshold"
    )
    return [
        {
            "check": "size",
            "ok": True,
            "detail": f"{len(vb.envelope)} bytes (limit {importer.MAX_BUNDLE_BYTES})",
        },
        {"check": "format", "ok": True, "detail": f"DSSE envelope, payloadType {dsse.PAYLOAD_TYPE}"},
        {
            "check": "signature",
            "ok": True,
            "detail": f"{len(vb.keyids)} trusted key(s) verified ({', '.join(k[:16] for k in vb.keyids)}); "
            f"threshold {trust.threshold}",
        },
        {"check": "schema", "ok": True, "detail": f"policy v{policy.version} is a valid policy document"},
        {"check": "rotation", "ok": True, "detail": rotation},
        {
            "check": "freshness",
            "ok": True,
            "detail": f"issued {policy.issued_at.isoformat()}, expires {policy.expires_at.isoformat()}",
        },
        {"check": "scope", "ok": True, "detail": f"this site {site!r} is in {', '.join(policy.scope.sites)}"},
        {
            "check": "rollback",
            "ok": True,
            "detail": f"v{policy.version} is newer than v{previous} in force"
            if previous is not None
            else "no policy in force yet",
        },
    ]


def document(
    vb: importer.VerifiedBundle, old: Policy | None, *, imported: bool, lines: bool = False
) -> dict[str, Any]:
    """The bundle and what it changes (``policy verify|import --json``, the admin socket's answer; with
    ``lines`` each change also carries the operator's ``line``, as the CLI prints it)."""
    trust = vb.new_trust
    return {
        "ok": True,
        "imported": imported,
        "version": vb.policy.version,
        "previous_version": None if old is None else old.version,
        "sha256": vb.sha256,
        "keyids": list(vb.keyids),
        "trust_rotation": None
        if trust is None
        else {"threshold": trust.threshold, "keyids": sorted(trust.keys)},
        "changes": [
            {**change.document(), "line": change.line()} if lines else change.document()
            for change in changes(old, vb.policy)
        ],
    }
