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


async def listing(ctx: AdminContext, call: AdminCall) -> dict[str, Any]:
    keys = [
        {"route": row["name"], "fingerprint": row["fingerprint"], "updated_at": row["updated_at"]}
        for row in ctx.vault.keys.list()
    ]
    state = ctx.keeper.current
    have = {row["route"] for row in keys}
    needing = (
        sorted(
            name
            for name, route in state.policy.routes.items()
            if getattr(route, "auth", "none") != "none" and name not in have
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
    rotated = any(row["name"] == route for row in ctx.vault.keys.list())
    fingerprint = await asyncio.to_thread(ctx.vault.keys.set, route, secret)
    del secret
    await ctx.record(call, f"{'key_rotate' if rotated else 'key_set'} route={route} {fingerprint}")
    return {"route": route, "fingerprint": fingerprint, "rotated": rotated}


async def remove(ctx: AdminContext, call: AdminCall) -> dict[str, Any]:
    route = text_field(await call.json(), "route")
    assert route is not None
    if not await asyncio.to_thread(ctx.vault.keys.remove, route):
        raise NotFound(f"no key is set for route {route}")
    await ctx.record(call, f"key_remove route={route}")
    return {"route": route, "removed": True}


ROUTES: dict[tuple[str, str], Handler] = {
    ("GET", "/admin/keys"): listing,
    ("POST", "/admin/keys/set"): set_key,
    ("POST", "/admin/keys/remove"): remove,
}
