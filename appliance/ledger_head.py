"""The ledger's signed head: the appliance key's signature over the newest record's seq and hash.

A hash chain shows an edited, reordered or missing record between two others, but not records cut from
its end: what remains is still a valid chain. The head closes that gap. Inside the same transaction as
the records it covers, the appliance's Ed25519 key signs ``(seq, hash)`` of the newest record: at most
once per ``HEAD_INTERVAL_S`` while records flow, and again whenever the vault is closed (a CLI command,
a gateway's shutdown). ``verify`` then requires the signed record to exist with that hash, so deleting
records from the end, or the head itself, is reported. Records newer than the last signature (under a
second's worth while serving) are covered by the next one.

Owns: the ``ledger_head`` table, the signed message, signing and checking it.
Never: stands in for checkpoints kept off the appliance: someone holding the appliance key can re-sign
a truncated ledger. Exported, externally kept checkpoints are what detect that.
"""

from __future__ import annotations

import base64
import sqlite3
import time
from datetime import UTC, datetime
from typing import Final

import sqlite_utils
from cryptography.exceptions import InvalidSignature
from cryptography.hazmat.primitives.asymmetric.ed25519 import Ed25519PublicKey

from appliance.policy.keys import SigningKey
from appliance.vault.db import Migration

HEAD_INTERVAL_S: Final = 1.0
_CONTEXT: Final = b"phi-gateway ledger head v1\n"


def _create_table(db: sqlite_utils.Database) -> None:
    db.execute(
        "CREATE TABLE ledger_head (id INTEGER PRIMARY KEY CHECK (id = 1), seq INTEGER NOT NULL,"
        " hash TEXT NOT NULL, signed_at TEXT NOT NULL, keyid TEXT NOT NULL, sig TEXT NOT NULL)"
    )


MIGRATION = Migration("ledger-0003-signed-head", _create_table)


def message(seq: int, digest: str) -> bytes:
    return _CONTEXT + f"{seq}\n{digest}".encode()


class HeadSigner:
    """Signs the head inside the ledger's write transactions; only the vault's writer thread calls it."""

    def __init__(self, key: SigningKey, interval_s: float = HEAD_INTERVAL_S) -> None:
        self.key = key
        self._interval = interval_s
        self._last = float("-inf")

    def after_append(self, conn: sqlite3.Connection, seq: int, digest: str) -> None:
        """Called with the newest record of each batch; signs when the interval has passed."""
        now = time.monotonic()
        if now - self._last >= self._interval:
            self._write(conn, seq, digest)
            self._last = now

    def seal(self, conn: sqlite3.Connection) -> None:
        """Sign the newest record now (closing), unless the head already names it."""
        last = conn.execute("SELECT seq, hash FROM ledger ORDER BY seq DESC LIMIT 1").fetchone()
        head = conn.execute("SELECT seq FROM ledger_head WHERE id = 1").fetchone()
        if last is not None and (head is None or head[0] != last[0]):
            self._write(conn, last[0], last[1])

    def _write(self, conn: sqlite3.Connection, seq: int, digest: str) -> None:
        sig = base64.b64encode(self.key.private.sign(message(seq, digest))).decode()
        signed_at = datetime.now(UTC).strftime("%Y-%m-%dT%H:%M:%S.%fZ")
        conn.execute(
            "INSERT OR REPLACE INTO ledger_head (id, seq, hash, signed_at, keyid, sig)"
            " VALUES (1, ?, ?, ?, ?, ?)",
            (seq, digest, signed_at, self.key.keyid, sig),
        )


def check(
    conn: sqlite3.Connection, records: int, public: Ed25519PublicKey | None
) -> tuple[int | None, str] | None:
    """None if the head agrees with a chain of ``records`` intact records; else (first bad seq, message)."""
    head = conn.execute("SELECT seq, hash, sig FROM ledger_head WHERE id = 1").fetchone()
    if head is None:
        if public is None or records == 0:
            return None
        return None, "the ledger has no signed head: records may have been deleted from its end"
    seq, digest, sig = head
    if seq > records:
        return (
            records + 1,
            f"records {records + 1} to {seq} are missing (deleted from the end; "
            f"the signed head names record {seq})",
        )
    row = conn.execute("SELECT hash FROM ledger WHERE seq = ?", (seq,)).fetchone()
    if row is None or row[0] != digest:
        return seq, f"record {seq} does not match the signed head"
    if public is not None:
        try:
            public.verify(base64.b64decode(sig, validate=True), message(seq, digest))
        except (InvalidSignature, ValueError):
            return None, "the ledger head's signature does not verify (forged, or made by another key)"
    return None
