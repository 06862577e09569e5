"""The admin socket's callers: tokens' metadata, issuing, revoking and changing an expiry.

    GET  /admin/callers?all=1                    tokens by id (revoked ones with all=1), never a secret
    POST /admin/callers/issue {"caller","org","role","expires","note"}   the token, once
    POST /admin/callers/revoke {"caller"} | {"id"}
    POST /admin/callers/expiry {"id", "expires"}

Owns: those endpoints, their ``admin`` records (``token_issue``, ``token_revoke``, ``token_expiry``; the
same words as the CLI's), and the refusal to issue for an organization or role the policy in force lacks.
Never: returns a token except in the answer of its issue; records or logs one; returns a token's hash.
"""

from __future__ import annotations

import asyncio
from datetime import UTC, datetime
from typing import Any

from appliance import bundle_import, timestamps
from appliance.admin.api import AdminCall, AdminContext, Handler, int_field, text_field
from appliance.errors import BadRequest, NotFound
from appliance.identity import parse_expiry


def _state(row: dict[str, Any], now: str) -> str:
    if row.get("revoked_at"):
        return "revoked"
    expires = row.get("expires_at")
    return "expired" if expires and expires <= now else "active"


async def listing(ctx: AdminContext, call: AdminCall) -> dict[str, Any]:
    rows = ctx.vault.tokens.list(include_revoked=call.query.get("all") in ("1", "true", "yes"))
    now = timestamps.now()
    return {"tokens": [{**row, "state": _state(row, now)} for row in rows]}


async def issue(ctx: AdminContext, call: AdminCall) -> dict[str, Any]:
    doc = await call.json()
    caller, org, role = (text_field(doc, name) or "" for name in ("caller", "org", "role"))
    expires = _expiry(doc)
    note = text_field(doc, "note", required=False)
    policy = await asyncio.to_thread(bundle_import.policy_in_force, ctx.vault)
    if policy is not None:
        organization = policy.organizations.get(org)
        if organization is None or role not in organization.roles:
            raise BadRequest(
                f"policy v{policy.version} has no role {org}/{role}; check the spelling", param="role"
            )
    recorded = ctx.record_with(call, lambda _: f"token_issue org={org} role={role}", claw_id=caller)
    token = await asyncio.to_thread(
        ctx.vault.tokens.issue, caller, org, role, expires_at=expires, note=note, also=recorded
    )
    return {
        "token": token,
        "caller": caller,
        "org": org,
        "role": role,
        "expires_at": timestamps.rfc3339(expires) if expires is not None else None,
    }


async def revoke(ctx: AdminContext, call: AdminCall) -> dict[str, Any]:
    doc = await call.json()
    if doc.get("id") is not None:
        token_id = int_field(doc, "id")
        rows = [row for row in ctx.vault.tokens.list() if row["id"] == token_id]
        owner = rows[0]["caller"] if rows else None
        recorded = ctx.record_with(
            call, lambda n: f"token_revoke id={token_id}" if n else None, claw_id=owner
        )
        if not rows or not await asyncio.to_thread(lambda: ctx.vault.tokens.revoke_id(token_id, recorded)):
            raise NotFound(f"there is no active token #{token_id}")
        return {"revoked": 1, "caller": owner}
    caller = text_field(doc, "caller")
    assert caller is not None
    recorded = ctx.record_with(call, lambda n: f"token_revoke count={n}" if n else None, claw_id=caller)
    count = await asyncio.to_thread(lambda: ctx.vault.tokens.revoke(caller, recorded))
    if count == 0:
        raise NotFound(f"{caller} has no active token")
    return {"revoked": count, "caller": caller}


async def expiry(ctx: AdminContext, call: AdminCall) -> dict[str, Any]:
    doc = await call.json()
    token_id = int_field(doc, "id")
    expires = _expiry(doc)
    rows = [row for row in ctx.vault.tokens.list() if row["id"] == token_id]
    if not rows:
        raise NotFound(f"there is no active token #{token_id}")
    shown = timestamps.rfc3339(expires) if expires is not None else None
    detail = f"token_expiry id={token_id} expires={shown or 'never'}"
    recorded = ctx.record_with(call, lambda n: detail if n else None, claw_id=rows[0]["caller"])
    if not await asyncio.to_thread(lambda: ctx.vault.tokens.set_expiry(token_id, expires, recorded)):
        raise NotFound(f"there is no active token #{token_id}")
    return {"id": token_id, "caller": rows[0]["caller"], "expires_at": shown}


def _expiry(doc: dict[str, Any]) -> datetime | None:
    value = doc.get("expires")
    if value is not None and not isinstance(value, str):
        raise BadRequest("'expires' is 30d, 12h, 45m, an ISO 8601 time or null", param="expires")
    moment = parse_expiry(value or None, "expires")
    if moment is not None and moment <= datetime.now(UTC):
        raise BadRequest("'expires' is in the past", param="expires")
    return moment


ROUTES: dict[tuple[str, str], Handler] = {
    ("GET", "/admin/callers"): listing,
    ("POST", "/admin/callers/issue"): issue,
    ("POST", "/admin/callers/revoke"): revoke,
    ("POST", "/admin/callers/expiry"): expiry,
}
