"""The audit ledger: append-only, hash-chained records in the vault, echoed as JSON lines on stdout.

Owns: the ``ledger`` table, the record shape (``Ledger.FIELDS``: the cllama audit line first, then ours),
the hash chain (``hash = sha256(prev_hash + "\\n" + its stored JSON text)``, genesis ``"0" * 64``), the
stdout audit line, and ``verify``, which recomputes the chain (and checks the ts/type/request_id/claw_id
columns kept beside each record for queries) and names the first bad record.

Every append is a vault write: the write function reads the previous ``(seq, hash)`` inside the writer's
transaction (an operator's CLI process may have appended in between; nothing is cached across batches),
and the stdout line is printed only after the batch is durable. A record that cannot be written fails
its future with ``LedgerUnavailable`` so the gateway answers 503 (fail closed).

Must never: hold prompt or completion text, token secrets or provider keys (records are metadata and
SHA-256 digests; long strings in an oversized record are clipped to length and digest); update or
delete a record (nothing here does; ``verify`` catches whoever does it with the file); print a line for
a record that is not on disk.
"""

from __future__ import annotations

import asyncio
import functools
import hashlib
import json
import logging
import sqlite3
import sys
import time
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any, Final, TextIO

import sqlite_utils

from appliance import ledger_head
from appliance.audit_stdout import AuditPrinter
from appliance.errors import LedgerUnavailable, StorageUnavailable
from appliance.ledger_head import HeadSigner
from appliance.vault.db import Database, Migration

log = logging.getLogger("phi.ledger")

GENESIS: Final = "0" * 64
TYPES: Final = frozenset({"request", "response", "error", "intervention", "admin"})
MAX_RECORD_CHARS: Final = 4096
"""A record is a few hundred characters of metadata; anything this large is text that must not be here."""
CLIP_CHARS: Final = 128
"""In an oversized record, string values longer than this are replaced by their length and digest."""

# The stored text of a record is its audit line without ``seq``: fields in FIELDS order, compact. One
# encoding serves the chain and the stdout line; verify hashes the stored text, so order need not be sorted.
_CANONICAL = json.JSONEncoder(
    separators=(",", ":"), ensure_ascii=False, allow_nan=False, check_circular=False
).encode

_LAST = "SELECT seq, hash FROM ledger ORDER BY seq DESC LIMIT 1"
# The ts/type/request_id/claw_id columns copy the record for queries (pending_outcomes); the chain covers
# only the record, so verify also checks the copies. CASE, unlike AND, never parses invalid JSON.
_VERIFY = (
    "SELECT seq, record, prev_hash, hash, CASE WHEN json_valid(record) THEN"
    " ts IS json_extract(record, '$.ts') AND type IS json_extract(record, '$.type')"
    " AND request_id IS json_extract(record, '$.request_id') AND claw_id IS json_extract(record, '$.claw_id')"
    " ELSE 0 END FROM ledger ORDER BY seq"
)
_INSERT_HEAD = "INSERT INTO ledger (seq, ts, type, request_id, claw_id, record, prev_hash, hash) VALUES "
_ROWS_PER_INSERT = 256  # 8 parameters a row: well under SQLite's 32766 bound variables


@functools.cache
def _insert_sql(rows: int) -> str:
    placeholders = ",".join(["(?,?,?,?,?,?,?,?)"] * rows)  # placeholders only: every value is bound
    return _INSERT_HEAD + placeholders


def _create_table(db: sqlite_utils.Database) -> None:
    db.execute(
        "CREATE TABLE ledger ("
        " seq INTEGER PRIMARY KEY,"
        " ts TEXT NOT NULL,"
        " type TEXT NOT NULL,"
        " request_id TEXT,"
        " claw_id TEXT,"
        " record TEXT NOT NULL,"
        " prev_hash TEXT NOT NULL,"
        " hash TEXT NOT NULL)"
    )
    db.execute("CREATE INDEX ledger_request_id ON ledger (request_id)")


def _append_only(db: sqlite_utils.Database) -> None:
    # A guard against mistakes and casual edits, not against someone with the file (they can drop these);
    # what catches them is verify, and, for a consistently rewritten chain, signed checkpoints.
    for event in ("UPDATE", "DELETE"):
        db.execute(
            f"CREATE TRIGGER ledger_append_only_{event.lower()} BEFORE {event} ON ledger"
            " BEGIN SELECT RAISE(ABORT, 'the audit ledger is append-only'); END"
        )


MIGRATIONS = [
    Migration("ledger-0001-create", _create_table),
    Migration("ledger-0002-append-only", _append_only),
    ledger_head.MIGRATION,
]


_second: tuple[int, str] = (-1, "")


def utc_now_iso() -> str:
    """Now as RFC 3339 UTC with milliseconds: ``2026-11-25T10:00:00.123Z``."""
    global _second
    secs, ms = divmod(int(time.time() * 1000), 1000)
    cached = _second
    if cached[0] != secs:
        cached = (secs, time.strftime("%Y-%m-%dT%H:%M:%S.", time.gmtime(secs)))
        _second = cached
    return f"{cached[1]}{ms:03d}Z"


def sha256_hex(data: bytes) -> str:
    return hashlib.sha256(data).hexdigest()


def chain_hash(prev_hash: str, record_json: str) -> str:
    """The link: SHA-256 over the previous hash (hex), a newline, and this record's canonical JSON."""
    return hashlib.sha256(f"{prev_hash}\n{record_json}".encode()).hexdigest()


@dataclass(frozen=True)
class VerifyReport:
    ok: bool
    records: int
    """Records checked and found good (all of them when ``ok``)."""
    first_bad_seq: int | None
    message: str


class _Stdout:
    """Default for ``Ledger(out=...)``: whatever ``sys.stdout`` is when the ledger is built."""


STDOUT: Final = _Stdout()


class Ledger:
    """Appends audit records (hot path, from the event loop) and answers the operator's questions."""

    FIELDS: Final = (
        # the cllama audit line
        "ts",
        "claw_id",
        "type",
        "model",
        "latency_ms",
        "status_code",
        "tokens_in",
        "tokens_out",
        "cost_usd",
        "intervention",
        # ours
        "request_id",
        "org",
        "role",
        "route",
        "decision",
        "policy_version",
        "request_sha256",
        "response_sha256",
        "data_class",
        "detail",
        "rule",
    )
    _FIELD_SET: Final = frozenset(FIELDS)

    def __init__(
        self, db: Database, out: TextIO | _Stdout | None = STDOUT, *, signer: HeadSigner | None = None
    ) -> None:
        """``signer``: the appliance key's head signer; without it no head is signed or required."""
        self._db = db
        self._signer = signer
        stream: TextIO | None = sys.stdout if isinstance(out, _Stdout) else out
        self._printer = None if stream is None else AuditPrinter(stream)
        self._ok = True  # only the writer thread changes it, so it follows commit order

    @property
    def healthy(self) -> bool:
        """False after a ledger write failed, until a later one succeeds."""
        return self._ok and self._db.healthy

    # -- appending ----------------------------------------------------------------------------------------

    def append(self, record: dict[str, Any], *, lazy: bool = False) -> asyncio.Future[int]:
        """Queue ``record``; the future gives its seq once it is durable, or raises LedgerUnavailable.

        ``lazy``: the record asks for no fsync of its own and joins the next commit (a few ms at most);
        for records nobody waits on before answering (outcomes), so they share the next request's fsync.

        A record with unknown fields or a bad type raises ValueError at once (a programming error); in an
        oversized record, long strings are clipped to their length and digest (``CLIP_CHARS``).
        """
        return self._db.awrite_batched(self, self._prepare(record), lazy=lazy)

    def append_sync(self, record: dict[str, Any]) -> int:
        """Blocking append (CLI commands); returns the record's seq."""
        seq: int = self._db.write_batched(self, self._prepare(record))
        self.flush_output()
        return seq

    def record_in(self, conn: sqlite3.Connection, record: dict[str, Any]) -> int:
        """Append ``record`` inside a write the caller is already in (the writer thread), so that an
        operator change and its audit record commit together; no stdout line (the terminal says it)."""
        return self.write_batch(conn, [self._prepare(record)])[0]

    def _prepare(self, record: dict[str, Any]) -> tuple[dict[str, Any], str]:
        if not self._FIELD_SET.issuperset(record):
            unknown = sorted(set(record) - self._FIELD_SET)
            raise ValueError(f"unknown audit record fields: {unknown}")
        if record.get("type") not in TYPES:
            raise ValueError(f"audit record type must be one of {sorted(TYPES)}, got {record.get('type')!r}")
        ordered = dict.fromkeys(self.FIELDS)
        ordered.update(record)
        if ordered["ts"] is None:
            ordered["ts"] = utc_now_iso()
        for column in ("ts", "request_id", "claw_id"):  # copied into TEXT columns: must stay strings
            if not isinstance(ordered[column], str | None):
                raise ValueError(f"audit record field {column} must be a string or null")
        canonical = _CANONICAL(ordered)
        if len(canonical) > MAX_RECORD_CHARS:
            # Some values come from the client (a model name): clip them rather than lose the record.
            for name, value in ordered.items():
                if isinstance(value, str) and len(value) > CLIP_CHARS:
                    ordered[name] = f"[clipped: {len(value)} chars, sha256:{sha256_hex(value.encode())[:16]}]"
            canonical = _CANONICAL(ordered)
            if len(canonical) > MAX_RECORD_CHARS:
                raise ValueError(
                    f"audit record is {len(canonical)} characters; metadata only, at most {MAX_RECORD_CHARS}"
                )
        return ordered, canonical

    # -- the vault's BatchWriter: every record queued for one commit is written by one call ----------------

    def write_batch(self, conn: sqlite3.Connection, items: list[tuple[dict[str, Any], str]]) -> list[int]:
        """Chain and insert ``items`` with one SELECT and one multi-row INSERT per chunk; their seqs."""
        try:
            last = conn.execute(_LAST).fetchone()
            seq, prev = (0, GENESIS) if last is None else (last[0], last[1])
            rows: list[Any] = []
            seqs: list[int] = []
            for ordered, canonical in items:
                seq += 1
                digest = chain_hash(prev, canonical)
                rows += (
                    seq,
                    ordered["ts"],
                    ordered["type"],
                    ordered["request_id"],
                    ordered["claw_id"],
                    canonical,
                    prev,
                    digest,
                )
                seqs.append(seq)
                prev = digest
            for start in range(0, len(seqs), _ROWS_PER_INSERT):
                count = min(_ROWS_PER_INSERT, len(seqs) - start)
                conn.execute(_insert_sql(count), rows[start * 8 : (start + count) * 8])
            if self._signer is not None:
                self._signer.after_append(conn, seq, prev)
        except sqlite3.Error as exc:
            self._ok = False
            raise LedgerUnavailable(f"the audit ledger cannot be written: {exc}") from exc
        return seqs

    def after_commit(self, items: list[tuple[dict[str, Any], str]], seqs: list[int]) -> None:
        """Hand one audit line per durable record to the stdout printer (which never blocks the writer)."""
        self._ok = True
        if self._printer is not None:
            self._printer.put(
                "".join(
                    f'{canonical[:-1]},"seq":{seq}}}\n'
                    for (_, canonical), seq in zip(items, seqs, strict=True)
                )
            )

    @property
    def dropped_lines(self) -> int:
        """Audit lines stdout's reader did not take in time (their records are in the ledger)."""
        return 0 if self._printer is None else self._printer.dropped_lines

    def flush_output(self) -> None:
        """Wait until every line of a durable record has been written to stdout."""
        if self._printer is not None:
            self._printer.wait()

    def seal_head(self) -> None:
        """Sign the newest record now (the vault is about to close); no-op without a signer."""
        signer = self._signer
        if signer is not None:
            self._db.write(signer.seal)

    def close(self) -> None:
        """Stop the stdout printer after writing what is pending (the vault's writer is closed first)."""
        if self._printer is not None:
            self._printer.close()

    def commit_failed(self, exc: StorageUnavailable) -> Exception:
        self._ok = False
        error = LedgerUnavailable(f"the audit ledger cannot be written: {exc}")
        error.__cause__ = exc
        return error

    # -- reading ------------------------------------------------------------------------------------------

    def count(self) -> int:
        """Number of records (the last seq: seqs are contiguous from 1, which ``verify`` checks)."""
        row = self._db.reader().execute(_LAST).fetchone()
        return 0 if row is None else int(row[0])

    def tail(self, n: int) -> list[dict[str, Any]]:
        """The last ``n`` records, oldest first, each with its ``seq``."""
        rows = (
            self._db.reader()
            .execute("SELECT seq, record FROM ledger ORDER BY seq DESC LIMIT ?", (max(0, n),))
            .fetchall()
        )
        result = []
        for seq, text in reversed(rows):
            record = json.loads(text)
            entry = {name: record.get(name) for name in self.FIELDS}
            entry["seq"] = seq
            result.append(entry)
        return result

    def pending_outcomes(self, limit: int = 100) -> list[str]:
        """Request ids with a "request" record and no later "response"/"error" record, oldest first.

        After a crash these are the requests that were let through with no recorded outcome.
        """
        rows = (
            self._db.reader()
            .execute(
                "SELECT r.request_id FROM ledger AS r"
                " WHERE r.type = 'request' AND r.request_id IS NOT NULL"
                " AND NOT EXISTS (SELECT 1 FROM ledger AS o WHERE o.request_id = r.request_id"
                "   AND o.seq > r.seq AND o.type IN ('response', 'error'))"
                " ORDER BY r.seq LIMIT ?",
                (limit,),
            )
            .fetchall()
        )
        return [row[0] for row in rows]

    def verify(self, progress: Callable[[int], None] | None = None) -> VerifyReport:
        """Recompute the chain from record 1 and report the first record that breaks it.

        Streams rows (constant memory) on this thread's read connection, one snapshot. Blocking: call it
        from a worker thread, not the event loop. ``progress(n)`` is called every 65,536 records.
        """
        cur = self._db.reader().execute(_VERIFY)
        sha256 = hashlib.sha256
        expected = 1
        last = GENESIS
        try:
            for seq, record, prev, stored, columns_match in cur:
                if seq != expected:
                    return VerifyReport(
                        False, expected - 1, expected, f"record {expected} is missing (deleted)"
                    )
                if prev != last:
                    if seq == 1:
                        message = (
                            "record 1 does not start the chain (its previous hash is not the genesis value)"
                        )
                    else:
                        message = f"record {seq} does not chain to record {seq - 1}"
                    return VerifyReport(False, seq - 1, seq, message)
                computed = sha256(f"{prev}\n{record}".encode()).hexdigest()
                if computed != stored:
                    following = cur.fetchone()
                    if following is not None and following[2] == computed:
                        message = f"record {seq}: its stored hash was altered"
                    else:
                        message = f"record {seq}: content does not match its hash (edited)"
                    return VerifyReport(False, seq - 1, seq, message)
                if not columns_match:
                    message = f"record {seq}: its indexed columns do not match its content (edited)"
                    return VerifyReport(False, seq - 1, seq, message)
                last = stored
                expected += 1
                if progress is not None and not expected & 0xFFFF:
                    progress(expected - 1)
        finally:
            cur.close()
        records = expected - 1
        problem = ledger_head.check(
            self._db.reader(), records, self._signer.key.public if self._signer else None
        )
        if problem is not None:
            return VerifyReport(False, records, problem[0], problem[1])
        if progress is not None:
            progress(records)
        message = f"{records} records, hash chain intact" if records else "the ledger is empty"
        return VerifyReport(True, records, None, message)
