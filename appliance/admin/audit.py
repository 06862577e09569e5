"""The admin socket's audit endpoints: pages of records, one record, a live stream, and a record's proof.

    GET  /admin/audit?after=&before=&limit=&<filters>    a page of records (newest ``limit`` by default)
    GET  /admin/audit/record?seq=N                       one record
    GET  /admin/audit/stream?after=&<filters>            NDJSON: each new durable record, as it commits
    POST /admin/audit/prove {"seq": N}                   its inclusion proof against the signed head

Filters are exact matches (text ignoring case) on ``caller`` (the record's ``claw_id``), ``route``,
``model``, ``decision``, ``status``, ``intervention``, ``type``, ``org``, ``role`` and ``request_id``,
applied here (server side), so a console tailing one caller receives only that caller's records.

Owns: reading the ledger table by seq for those endpoints (on the reading thread's own connection, off
the event loop), the stream's pacing (woken by ``Activity`` when records commit, at most
``_STREAM_PACE_S`` apart, a heartbeat line when idle, which also picks up records another process wrote)
and the proof (``proofs.inclusion_proof`` against the signed head, checked with ``proofs.verify_proof``
before it is returned; it writes nothing).
Never: returns anything but the audit line's fields (records never hold prompt text or secrets); holds a
stream's records in memory (it reads pages by seq, as fast as the client takes them).
"""

from __future__ import annotations

import asyncio
import json
from typing import Any, Final

from appliance import timestamps
from appliance.admin.api import AdminCall, AdminContext, Handler, int_field
from appliance.errors import BadRequest, ClientDisconnected, Conflict, NotFound
from appliance.ledger import proofs, signed_note

FILTERS: Final = {
    "caller": "claw_id",
    "route": "route",
    "model": "model",
    "decision": "decision",
    "status": "status_code",
    "intervention": "intervention",
    "type": "type",
    "org": "org",
    "role": "role",
    "request_id": "request_id",
}
MAX_PAGE: Final = 1000
_DEFAULT_PAGE: Final = 100
_READ_ROWS: Final = 500
_MAX_SCANNED: Final = 50_000
"""A page with filters stops after this many records read (a rare caller's records in a large ledger)."""
_STREAM_PACE_S: Final = 0.1
_HEARTBEAT_S: Final = 2.0
_PROVE_WAIT_S: Final = 3.0
"""How long a proof waits for the signed head to cover its record (signed every second)."""
_NDJSON = [(b"Content-Type", b"application/x-ndjson"), (b"Cache-Control", b"no-cache")]

Filters = dict[str, Any]
Page = list[dict[str, Any]]
_AFTER: Final = "SELECT seq, record FROM ledger WHERE seq > ? ORDER BY seq LIMIT ?"
_BEFORE: Final = "SELECT seq, record FROM ledger WHERE seq < ? ORDER BY seq DESC LIMIT ?"


def filters_of(call: AdminCall) -> Filters:
    """The record fields to match, from the query (``status`` is a number)."""
    found: Filters = {}
    for name, field in FILTERS.items():
        value = call.query.get(name)
        if value is None or value == "":
            continue
        found[field] = call.int_param(name) if name == "status" else value.casefold()
    return found


def _matches(record: dict[str, Any], filters: Filters) -> bool:
    """Exact matches; text ignores case (``caller=Radiology-Bot`` finds ``radiology-bot``)."""
    for field, value in filters.items():
        found = record.get(field)
        if isinstance(value, str):
            if not isinstance(found, str) or found.casefold() != value:
                return False
        elif found != value:
            return False
    return True


def _rows(ctx: AdminContext, sql: str, args: tuple[Any, ...]) -> list[dict[str, Any]]:
    out = []
    for seq, text in ctx.vault.db.reader().execute(sql, args).fetchall():
        record = json.loads(text)
        record["seq"] = seq
        out.append(record)
    return out


def read_after(ctx: AdminContext, after: int, filters: Filters, limit: int) -> tuple[Page, int]:
    """Matching records with seq > ``after``, oldest first, at most ``limit``; and the last seq read."""
    found, last = _scan(ctx, _AFTER, after, filters, limit)
    return found, after if last is None else last


def read_before(ctx: AdminContext, before: int | None, filters: Filters, limit: int) -> Page:
    """The newest ``limit`` matching records with seq < ``before`` (all when None), oldest first."""
    cursor = before if before is not None else ctx.vault.ledger.count() + 1
    found, _ = _scan(ctx, _BEFORE, cursor, filters, limit)
    found.reverse()
    return found


def _scan(ctx: AdminContext, sql: str, cursor: int, filters: Filters, limit: int) -> tuple[Page, int | None]:
    """Read pages of ``_READ_ROWS`` from ``cursor`` in the order of ``sql`` (``_AFTER`` or ``_BEFORE``)
    until ``limit`` match or ``_MAX_SCANNED`` were read; the matches, and the last seq read."""
    found: Page = []
    last: int | None = None
    scanned = 0
    while len(found) < limit and scanned < _MAX_SCANNED:
        rows = _rows(ctx, sql, (cursor, _READ_ROWS))
        for record in rows:
            cursor = last = record["seq"]
            if _matches(record, filters):
                found.append(record)
                if len(found) == limit:
                    break
        scanned += len(rows)
        if len(rows) < _READ_ROWS:
            break
    return found, last


async def page(ctx: AdminContext, call: AdminCall) -> dict[str, Any]:
    filters = filters_of(call)
    limit = call.int_param("limit", _DEFAULT_PAGE)
    if limit is None or not 1 <= limit <= MAX_PAGE:
        raise BadRequest(f"limit must be 1 to {MAX_PAGE}", param="limit")
    after = call.int_param("after")
    if after is not None:
        records, _ = await asyncio.to_thread(read_after, ctx, after, filters, limit)
    else:
        records = await asyncio.to_thread(read_before, ctx, call.int_param("before"), filters, limit)
    return {"records": records, "head": ctx.vault.ledger.count()}


async def record(ctx: AdminContext, call: AdminCall) -> dict[str, Any]:
    seq = call.int_param("seq")
    if seq is None:
        raise BadRequest("seq is required", param="seq")
    rows = await asyncio.to_thread(_rows, ctx, "SELECT seq, record FROM ledger WHERE seq = ?", (seq,))
    if not rows:
        raise NotFound(f"there is no record {seq} in the ledger")
    return {"record": rows[0]}


async def stream(ctx: AdminContext, call: AdminCall) -> None:
    """New records as they become durable, one JSON line each; a heartbeat line when idle."""
    filters = filters_of(call)
    start = call.int_param("after")
    after: int = start if start is not None else ctx.vault.ledger.count()
    responder = call.responder
    woken = ctx.activity.listen()
    loop = asyncio.get_running_loop()
    quiet_since = loop.time()
    try:
        await responder.start(200, _NDJSON)
        while not ctx.stopping.is_set():
            woken.clear()  # before reading: a commit during the read wakes the next wait
            found, after = await asyncio.to_thread(read_after, ctx, after, filters, _READ_ROWS)
            if found:
                await responder.write(b"".join(_line(record) for record in found))
                quiet_since = loop.time()
            elif loop.time() - quiet_since >= _HEARTBEAT_S:
                await responder.write(_line({"heartbeat": timestamps.now(), "head": after}))
                quiet_since = loop.time()
            if len(found) == _READ_ROWS:
                continue  # behind: read on at once
            await asyncio.sleep(_STREAM_PACE_S)  # many commits a second are read together
            if not woken.is_set():
                try:
                    await asyncio.wait_for(woken.wait(), _HEARTBEAT_S)
                except TimeoutError:
                    pass  # idle: read anyway (another process may have appended), then a heartbeat
        await responder.end()
    except ClientDisconnected:
        return
    finally:
        ctx.activity.unlisten(woken)


def _line(doc: dict[str, Any]) -> bytes:
    return json.dumps(doc, separators=(",", ":"), ensure_ascii=False).encode() + b"\n"


async def prove(ctx: AdminContext, call: AdminCall) -> dict[str, Any]:
    """The record's inclusion proof against the newest signed checkpoint (the head, which the gateway signs
    within a second of a commit), checked with the ledger's verifier key before it is returned. Writes
    nothing: a read-only console may ask for it."""
    seq = int_field(await call.json(), "seq")
    loop = asyncio.get_running_loop()
    deadline = loop.time() + _PROVE_WAIT_S
    while True:
        proof = await asyncio.to_thread(_prove, ctx, seq)
        if proof is not None:
            return proof
        if loop.time() >= deadline:
            raise Conflict(
                f"record {seq} is not covered by a signed checkpoint yet (the gateway signs its head every "
                "second): try again"
            )
        await asyncio.sleep(0.2)


def _prove(ctx: AdminContext, seq: int) -> dict[str, Any] | None:
    """The proof, or None while the signed head does not cover ``seq`` yet."""
    ledger = ctx.vault.ledger
    if not 1 <= seq <= ledger.count():
        raise NotFound(f"there is no record {seq} in the ledger")
    conn = ctx.vault.db.reader()
    conn.execute("BEGIN")
    try:
        head = conn.execute("SELECT size, note FROM ledger_head WHERE id = 1").fetchone()
        if head is None or head[0] < seq:
            return None
        size, note = int(head[0]), str(head[1])
        doc = proofs.inclusion_proof(conn, seq, size, note)
    finally:
        conn.execute("COMMIT")
    result = proofs.verify_proof(doc, [ledger.verifier()])
    return {
        "seq": seq,
        "tree_size": size,
        "root_sha256": signed_note.parse_unverified(note).root.hex(),
        "checkpoint": note,
        "proof": doc,
        "verified": True,
        "message": result.message,
    }


ROUTES: dict[tuple[str, str], Handler] = {
    ("GET", "/admin/audit"): page,
    ("GET", "/admin/audit/record"): record,
    ("GET", "/admin/audit/stream"): stream,
    ("POST", "/admin/audit/prove"): prove,
}
