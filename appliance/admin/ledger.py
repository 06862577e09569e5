"""The admin socket's ledger: its state, a full verification run in the background, a checkpoint now.

    GET  /admin/ledger               records, writable, owed outcomes, last checkpoint, verifier key, job
    GET  /admin/ledger/verify        the verify job: state, records checked of the total, the outcome
    POST /admin/ledger/verify        start one (409 while one runs)
    POST /admin/ledger/checkpoint    sign and store a checkpoint of the ledger as it is now

Owns: those endpoints (the job itself is ``verify_job.VerifyJob``) and their ``admin`` records
(``ledger_verify``, ``ledger_checkpoint``; the outcome of a verify is its own ``admin`` record when it
ends, so an auditor sees that it ran and what it found).
Never: reports a verification it did not finish as passed.
"""

from __future__ import annotations

import asyncio
from typing import Any

from appliance.admin.api import AdminCall, AdminContext, Handler
from appliance.admin.live import last_checkpoint


async def status(ctx: AdminContext, call: AdminCall) -> dict[str, Any]:
    ledger = ctx.vault.ledger
    conn = ctx.vault.db.reader()
    return {
        "records": ledger.count(),
        "writable": ledger.healthy,
        "owed_outcomes": ledger.owed_outcomes,
        "last_checkpoint": last_checkpoint(ctx),
        "checkpoints": conn.execute("SELECT count(*) FROM ledger_checkpoint").fetchone()[0],
        "verifier_key": await asyncio.to_thread(lambda: ledger.verifier().encode()),
        "verify": ctx.verify_job.document(),
    }


async def verify_job(ctx: AdminContext, call: AdminCall) -> dict[str, Any]:
    return ctx.verify_job.document()


async def start_verify(ctx: AdminContext, call: AdminCall) -> dict[str, Any]:
    job = ctx.verify_job
    job.begin(ctx.vault.ledger.count())
    try:
        await ctx.record(call, "ledger_verify started")
    except BaseException:  # not recorded, so not started: a later request may start it
        job.abandon()
        raise
    os_user = call.os_user
    loop = asyncio.get_running_loop()

    async def finish() -> None:
        passed, summary = await asyncio.to_thread(job.run, ctx.vault.ledger)
        record = {
            "type": "admin",
            "detail": f"ledger_verify {'passed' if passed else 'FAILED'} via admin socket: {summary[:200]}",
            "os_user": os_user,
        }
        await ctx.vault.ledger.append(record)

    task = loop.create_task(finish(), name="ledger-verify")
    _RUNNING.add(task)
    task.add_done_callback(_RUNNING.discard)
    return job.document()


_RUNNING: set[asyncio.Task[None]] = set()


async def checkpoint(ctx: AdminContext, call: AdminCall) -> dict[str, Any]:
    note = await asyncio.to_thread(ctx.vault.ledger.checkpoint, "manual")
    size = int(note.split("\n", 2)[1])
    await ctx.record(call, f"ledger_checkpoint size={size}")
    return {"size": size, "note": note}


ROUTES: dict[tuple[str, str], Handler] = {
    ("GET", "/admin/ledger"): status,
    ("GET", "/admin/ledger/verify"): verify_job,
    ("POST", "/admin/ledger/verify"): start_verify,
    ("POST", "/admin/ledger/checkpoint"): checkpoint,
}
