"""The admin socket's policy: the one in force, a bundle's verification before activation, its import.

    GET  /admin/policy[?document=1]        version, digest, signers, scope, validity, trust, a summary
    POST /admin/policy/verify   <bundle>   every import check and the diff, nothing activated
    POST /admin/policy/import?sha256=HEX   the same, then activation (the digest of what was verified)
    POST /admin/policy/reload              look for a new policy or trust file now

Owns: those endpoints; a refused bundle answered as a report (``{"ok": false, "check", "message"}``, 200),
so the console can show it; the import's ``admin`` record (``bundle_import.activate`` commits it with the
activation and a checkpoint) and the switch of this gateway to the new policy at once.
Never: activates a bundle other than the one the operator verified (``sha256`` must match); activates one
the importer refused.
"""

from __future__ import annotations

import asyncio
import json
from typing import Any

from appliance import bundle_import, timestamps
from appliance.admin.api import AdminCall, AdminContext, Handler
from appliance.errors import BadRequest, BundleRejected, Conflict
from appliance.policy import dsse, importer


async def in_force(ctx: AdminContext, call: AdminCall) -> dict[str, Any]:
    keeper = ctx.keeper
    state = keeper.current
    active = ctx.vault.policies.current()
    trust = ctx.home.trust()
    doc: dict[str, Any] = {
        "in_force": state is not None,
        "reason": keeper.reason,
        "version": None,
        "sha256": None,
        "imported_at": None,
        "issued_at": None,
        "expires_at": None,
        "expires_in_s": None,
        "scope": None,
        "keyids": [],
        "trust": {
            "threshold": trust.threshold,
            "keys": [
                {"keyid": key.keyid, "scheme": key.scheme, "added_at": key.added_at}
                for key in trust.entries()
            ],
        },
        "summary": None,
        "document": None,
    }
    if state is None or active is None:
        return doc
    policy = state.policy
    envelope = dsse.parse_envelope(active.envelope)
    remaining = keeper.remaining_s()
    doc.update(
        version=policy.version,
        sha256=active.sha256,
        imported_at=active.imported_at,
        issued_at=timestamps.rfc3339(policy.issued_at),
        expires_at=timestamps.rfc3339(policy.expires_at),
        expires_in_s=round(remaining, 1) if remaining is not None else None,
        scope=policy.scope.model_dump(mode="json"),
        keyids=sorted({signature.keyid for signature in envelope.signatures if trust.key(signature.keyid)}),
        summary={
            "routes": [
                {"name": name, "kind": route.kind, "data_classes": list(route.data_classes)}
                for name, route in sorted(policy.routes.items())
            ],
            "models": sorted(policy.models),
            "organizations": [
                {"org": org, "roles": sorted(organization.roles)}
                for org, organization in sorted(policy.organizations.items())
            ],
        },
        # the whole document (up to 1 MiB) on request only: the console polls this once a second
        document=json.loads(envelope.payload) if call.query.get("document") in ("1", "true") else None,
    )
    return doc


async def verify(ctx: AdminContext, call: AdminCall) -> dict[str, Any]:
    data = await _bundle(call)
    return await asyncio.to_thread(_report, ctx, data, None)


async def import_bundle(ctx: AdminContext, call: AdminCall) -> dict[str, Any]:
    data = await _bundle(call)
    expected = call.query.get("sha256")
    if not expected:
        raise BadRequest("sha256 is required: the digest of the bundle you verified", param="sha256")
    doc = await asyncio.to_thread(_report, ctx, data, (expected, call.os_user))
    if doc.get("imported"):
        ctx.keeper.refresh(force=True)
    return doc


def _report(ctx: AdminContext, data: bytes, activate: tuple[str, str] | None) -> dict[str, Any]:
    """Verify ``data`` (and with ``activate`` = (expected digest, OS user): import it)."""
    vault = ctx.vault
    old = bundle_import.policy_in_force(vault)
    try:
        vb = bundle_import.verify(ctx.home, vault, data)
    except BundleRejected as exc:
        return {"ok": False, "imported": False, "check": exc.check, "message": str(exc)}
    checks = bundle_import.passed_checks(
        vb, ctx.home.trust(), ctx.home.settings().site, vault.policies.current_version()
    )
    if activate is not None:
        expected, os_user = activate
        if expected.lower() != vb.sha256:
            raise Conflict(
                f"this bundle's sha256 is {vb.sha256}, not the {expected[:16]}… that was verified: "
                "verify it again"
            )
        bundle_import.activate(ctx.home, vault, vb, os_user)
    return {**bundle_import.document(vb, old, imported=activate is not None, lines=True), "checks": checks}


async def _bundle(call: AdminCall) -> bytes:
    data = await call.data()
    if not data:
        raise BadRequest("the body must be the bundle file's bytes")
    if len(data) > importer.MAX_BUNDLE_BYTES:
        raise BadRequest(f"the bundle is larger than {importer.MAX_BUNDLE_BYTES} bytes")
    return data


async def reload(ctx: AdminContext, call: AdminCall) -> dict[str, Any]:
    swapped = ctx.keeper.refresh(force=True)
    state = ctx.keeper.current
    await ctx.record(call, "policy_reload")
    return {"swapped": swapped, "version": state.version if state else None, "reason": ctx.keeper.reason}


ROUTES: dict[tuple[str, str], Handler] = {
    ("GET", "/admin/policy"): in_force,
    ("POST", "/admin/policy/verify"): verify,
    ("POST", "/admin/policy/import"): import_bundle,
    ("POST", "/admin/policy/reload"): reload,
}
