"""The admin socket's provider keys: names and fingerprints, set, rotate and remove.

    GET  /admin/keys                         route, fingerprint, updated_at; routes still needing a key
    POST /admin/keys/set {"route", "key"}    sealed in the vault (a key already set: rotated)
    POST /admin/keys/remove {"route"}

Owns: those endpoints and their ``admin`` records (``key_set``, ``key_rotate``, ``key_remove``, with the
new fingerprint). Never: returns, records or logs a key's value (only its fingerprint); keeps the value
after sealing it.
"""

from __future__ import annotations

import asyncio
from typing import Any

from appliance.admin.api import AdminCall, AdminContext, Handler, text_field
from appliance.errors import BadRequest, NotFound
from appliance.vault.provider_keys import fingerprint as fingerprint_of


async def listing(ctx: AdminContext, call: AdminCall) -> dict[str, Any]:
    keys = [
        {"route": row["name"], "fingerprint": row["fingerprint"], "updated_at": row["updated_at"]}
        for row in ctx.vault.keys.list()
    ]
    state = ctx.keeper.current
    have = {row["route"] for row in keys}
    needing = (
        sorted(
            name for name, route in state.policy.routes.items() if route.auth != "none" and name not in have
        )
        if state is not None
        else []
    )
    return {"keys": keys, "routes_needing_keys": needing}


async def set_key(ctx: AdminContext, call: AdminCall) -> dict[str, Any]:
    doc = await call.json()
    route = text_field(doc, "route")
    assert route is not None
    secret = doc.pop("key", None)
    if not isinstance(secret, str) or not secret.strip():
        raise BadRequest("'key' is required (the provider key, a non-empty string)", param="key")
    _require_keyed_route(ctx, route)
    replaced: list[int] = []
    sealed_fingerprint = fingerprint_of(secret.strip())  # what ProviderKeys.set will answer

    def detail(rows: int) -> str:
        replaced.append(rows)
        return f"{'key_rotate' if rows else 'key_set'} route={route} {sealed_fingerprint}"

    recorded = ctx.record_with(call, detail)
    fingerprint = await asyncio.to_thread(lambda: ctx.vault.keys.set(route, secret, recorded))
    return {"route": route, "fingerprint": fingerprint, "rotated": bool(replaced and replaced[0])}


async def remove(ctx: AdminContext, call: AdminCall) -> dict[str, Any]:
    route = text_field(await call.json(), "route")
    assert route is not None
    recorded = ctx.record_with(call, lambda n: f"key_remove route={route}" if n else None)
    if not await asyncio.to_thread(lambda: ctx.vault.keys.remove(route, recorded)):
        raise NotFound("no key is set for that route (keys are listed by GET /admin/keys)")
    return {"route": route, "removed": True}


def _require_keyed_route(ctx: AdminContext, route: str) -> None:
    """A key may be set for a route of the policy in force that authenticates; the refusal does not repeat
    the name (a key pasted into the route field must not come back in a message)."""
    state = ctx.keeper.current
    if state is None:
        raise BadRequest(
            "no policy is in force: import one, then set the keys of its routes (phi-gateway keys set works "
            "without one)",
            param="route",
        )
    keyed = sorted(name for name, spec in state.policy.routes.items() if spec.auth != "none")
    if route not in keyed:
        raise BadRequest(
            f"policy v{state.version} has no route of that name that takes a key; its routes that do: "
            f"{', '.join(keyed) or 'none'}",
            param="route",
        )


ROUTES: dict[tuple[str, str], Handler] = {
    ("GET", "/admin/keys"): listing,
    ("POST", "/admin/keys/set"): set_key,
    ("POST", "/admin/keys/remove"): remove,
}
