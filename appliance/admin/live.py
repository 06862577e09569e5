"""The admin socket's view of now: status, the dashboard's activity, local models, and the metrics text.

Owns: ``/admin/status``, ``/admin/activity`` (one document a second for the console's dashboard and
``phi-gateway top``), ``/admin/models`` with ``load``/``unload``, and ``/metrics``.
Never: returns anything a caller sent (only counts, names the policy gave, and timings).
"""

from __future__ import annotations

import time
from typing import Any

from appliance import timestamps
from appliance.activity import WINDOW_S
from appliance.admin.api import AdminCall, AdminContext, Handler, text_field
from appliance.home import Vault


async def status(ctx: AdminContext, call: AdminCall) -> dict[str, Any]:
    return ctx.status()


async def metrics(ctx: AdminContext, call: AdminCall) -> None:
    body, content_type = ctx.metrics()
    await call.responder.send(200, [(b"Content-Type", content_type.encode())], body)


async def activity(ctx: AdminContext, call: AdminCall) -> dict[str, Any]:
    live = ctx.activity
    series = live.series()
    series["now"]["in_flight"] = ctx.in_flight()
    totals = {**live.totals, "cost_usd": round(live.cost_usd, 6)}
    return {
        "at": timestamps.now(),
        "uptime_s": round(time.monotonic() - ctx.started, 1),
        "window_s": WINDOW_S,
        **series,
        "totals": totals,
        "spend_today": live.spend_today(),
        "local": [
            {
                "model": row["model"],
                "state": row["state"],
                "queue_depth": row["queue_depth"],
                "active": row["active"],
                "slots": row["slots"],
                "tokens_per_s": row["tokens_per_s"],
            }
            for row in model_rows(ctx)
        ],
        "ledger": ledger_summary(ctx),
        "policy": policy_summary(ctx),
    }


def model_rows(ctx: AdminContext) -> list[dict[str, Any]]:
    """Each pinned local model (and instances retiring): state, memory, load and throughput."""
    status = ctx.local.status()
    rates = ctx.activity.local_rates(status)
    pinned = set(ctx.local.registry.names())
    rows = []
    for name, row in status.items():
        entry = ctx.local.registry.get(name) if name in pinned else None
        rows.append(
            {
                "model": name,
                "file": entry.path.name if entry is not None else None,
                "sha256": entry.sha256 if entry is not None else None,
                "n_ctx": row.get("n_ctx", entry.n_ctx if entry is not None else None),
                "state": row.get("state", "not loaded"),
                "memory_bytes": row.get("memory_bytes"),
                "slots": row.get("slots"),
                "active": row.get("active", 0),
                "queue_depth": row.get("queue_depth", 0),
                "tokens_per_s": rates.get(name, 0.0),
                "generated_tokens": row.get("generated_tokens", 0),
                "prompt_tokens": row.get("prompt_tokens", 0),
                "cached_prompt_tokens": row.get("cached_prompt_tokens", 0),
                "idle_s": row.get("idle_s"),
            }
        )
    return rows


def ledger_summary(ctx: AdminContext) -> dict[str, Any]:
    ledger = ctx.vault.ledger
    last = last_checkpoint(ctx)
    at = timestamps.epoch(last["at"]) if last is not None else None
    age = round(time.time() - at, 1) if at is not None else None
    return {
        "writable": ledger.healthy,
        "records": ledger.count(),
        "owed_outcomes": ledger.owed_outcomes,
        "last_checkpoint_at": last["at"] if last else None,
        "last_checkpoint_age_s": age,
    }


def last_checkpoint(ctx: AdminContext) -> dict[str, Any] | None:
    return last_checkpoint_of(ctx.vault)


def last_checkpoint_of(vault: Vault) -> dict[str, Any] | None:
    """The newest stored (signed) checkpoint: its tree size, time and reason."""
    row = (
        vault.db.reader()
        .execute("SELECT size, ts, reason FROM ledger_checkpoint ORDER BY id DESC LIMIT 1")
        .fetchone()
    )
    return None if row is None else {"size": row[0], "at": row[1], "reason": row[2]}


def policy_summary(ctx: AdminContext) -> dict[str, Any]:
    keeper = ctx.keeper
    state = keeper.current
    remaining = keeper.remaining_s() if state is not None else None
    return {
        "in_force": state is not None,
        "version": state.version if state else None,
        "expires_at": timestamps.rfc3339(state.policy.expires_at) if state else None,
        "expires_in_s": round(remaining, 1) if remaining is not None else None,
        "reason": keeper.reason,
    }


async def models(ctx: AdminContext, call: AdminCall) -> dict[str, Any]:
    return {"models": model_rows(ctx)}


async def load_model(ctx: AdminContext, call: AdminCall) -> dict[str, Any]:
    model = text_field(await call.json(), "model")
    assert model is not None
    instance = await ctx.local.ensure_loaded(model)
    await ctx.record(call, f"model_load {model}")
    name = instance.split("@", 1)[0]
    return {"model": name, "instance": instance, **ctx.local.status().get(name, {})}


async def unload_model(ctx: AdminContext, call: AdminCall) -> dict[str, Any]:
    model = text_field(await call.json(), "model")
    assert model is not None
    await ctx.local.unload(model)
    await ctx.record(call, f"model_unload {model}")
    return {"model": model, "state": "not loaded"}


ROUTES: dict[tuple[str, str], Handler] = {
    ("GET", "/metrics"): metrics,
    ("GET", "/admin/status"): status,
    ("GET", "/admin/activity"): activity,
    ("GET", "/admin/models"): models,
    ("POST", "/admin/models/load"): load_model,
    ("POST", "/admin/models/unload"): unload_model,
}
