"""Signed checkpoints of the ledger's Merkle tree: the head, the stored history, and checking them.

A checkpoint is the appliance key's Ed25519 signature over (origin, tree size, root hash, time, reason), as
a C2SP signed note (``appliance.ledger.signed_note``): a small text file an auditor keeps off the
appliance and checks with the appliance's verifier key (``phi-gateway audit key``).

Two kinds are written, always inside the same transaction as the records they cover:
- the **head** (one row, replaced): signed at most once per ``HEAD_INTERVAL_S`` while records flow, by the
  gateway's once-a-second tick when it is stale, and when a vault is closed. It is what makes records cut
  from the end of the ledger show: ``verify`` requires the ledger to reach the head's size with its root.
- the **history** (``ledger_checkpoint``, append-only): one every ``CHECKPOINT_INTERVAL_S`` while records
  flow, and one for each policy import, gateway shutdown, export, archive or proof that asks for it.
  ``verify`` checks every one against the tree recomputed from the records, and that successive ones only
  grow (which, with every root matching, is what consistency between them means).

If the writer finds fewer records than the head names (someone cut the file), it moves that head into the
history before signing a new one, so the cut stays visible to ``verify`` for good.

Owns: ``ledger_meta`` (the ledger's origin, fixed at its first checkpoint), ``ledger_head``,
``ledger_checkpoint``, ``CheckpointSigner``. Never: signs a size the file does not hold; deletes or
rewrites a stored checkpoint; stands in for checkpoints kept off the appliance (the key holder can re-sign
a rewritten ledger; only checkpoints an auditor kept elsewhere catch that).
"""

from __future__ import annotations

import sqlite3
import time
from dataclasses import dataclass
from typing import Final

import sqlite_utils

from appliance import timestamps
from appliance.ledger import signed_note
from appliance.ledger.tiles import TreeState
from appliance.signing_keys import SigningKey
from appliance.vault.db import Migration

HEAD_INTERVAL_S: Final = 1.0
CHECKPOINT_INTERVAL_S: Final = 300.0


def _create_tables(db: sqlite_utils.Database) -> None:
    db.execute("DROP TABLE IF EXISTS ledger_head")  # v1 signed (seq, chain hash); the next write signs v2
    db.execute("CREATE TABLE ledger_meta (name TEXT PRIMARY KEY, value TEXT NOT NULL)")
    db.execute(
        "CREATE TABLE ledger_head (id INTEGER PRIMARY KEY CHECK (id = 1),"
        " size INTEGER NOT NULL, note TEXT NOT NULL)"
    )
    db.execute(
        "CREATE TABLE ledger_checkpoint (id INTEGER PRIMARY KEY, size INTEGER NOT NULL,"
        " ts TEXT NOT NULL, reason TEXT NOT NULL, note TEXT NOT NULL)"
    )
    for table, what in (("ledger_checkpoint", "checkpoint"), ("ledger_meta", "meta")):
        for event in ("UPDATE", "DELETE"):
            db.execute(
                f"CREATE TRIGGER ledger_{what}_append_only_{event.lower()} BEFORE {event} ON {table}"
                " BEGIN SELECT RAISE(ABORT, 'the audit ledger is append-only'); END"
            )


MIGRATION = Migration("ledger-0005-checkpoints", _create_tables)


def default_origin(site: str, node: str) -> str:
    """``phi-gateway.<site>/<node>``: names this appliance's ledger in every checkpoint and verifier key."""
    return f"phi-gateway.{site}/{node}"


def stored_origin(conn: sqlite3.Connection) -> str | None:
    row = conn.execute("SELECT value FROM ledger_meta WHERE name = 'origin'").fetchone()
    return None if row is None else str(row[0])


@dataclass(frozen=True)
class StoredCheckpoint:
    """A checkpoint as the ledger keeps it: ``id`` 0 is the head, others are the history's row ids."""

    id: int
    note: str

    @property
    def label(self) -> str:
        return "the signed head" if self.id == 0 else f"checkpoint #{self.id}"


def stored_checkpoints(conn: sqlite3.Connection) -> tuple[list[StoredCheckpoint], StoredCheckpoint | None]:
    """The history in the order written, and the head (None when there is none)."""
    history = [
        StoredCheckpoint(int(i), str(note))
        for i, note in conn.execute("SELECT id, note FROM ledger_checkpoint ORDER BY id")
    ]
    head = conn.execute("SELECT note FROM ledger_head WHERE id = 1").fetchone()
    return history, None if head is None else StoredCheckpoint(0, str(head[0]))


class CheckpointSigner:
    """Signs checkpoints inside the writer's transactions; only the vault's writer thread calls it."""

    def __init__(
        self,
        key: SigningKey,
        origin: str,
        *,
        head_interval_s: float = HEAD_INTERVAL_S,
        checkpoint_interval_s: float = CHECKPOINT_INTERVAL_S,
    ) -> None:
        """``origin``: for a ledger that has none yet; a ledger keeps the origin of its first checkpoint."""
        self.key = key
        self.default_origin = origin
        self._origin: str | None = None
        self._head_interval = head_interval_s
        self._checkpoint_interval = checkpoint_interval_s
        self._last_head = float("-inf")
        self._last_checkpoint = (
            time.monotonic()
        )  # a process's first scheduled checkpoint comes one interval in
        self._head_size = -1

    def origin(self, conn: sqlite3.Connection) -> str:
        if self._origin is None:
            origin = stored_origin(conn)
            if origin is None:
                origin = self.default_origin
                conn.execute("INSERT INTO ledger_meta (name, value) VALUES ('origin', ?)", (origin,))
            self._origin = origin
        return self._origin

    def verifier(self, origin: str) -> signed_note.Verifier:
        return signed_note.Verifier.from_key(origin, self.key.public)

    def after_append(self, conn: sqlite3.Connection, state: TreeState) -> None:
        """After each batch: a new head when the interval has passed, a stored checkpoint when one is due."""
        now = time.monotonic()
        if now - self._checkpoint_interval >= self._last_checkpoint:
            self.store(conn, state, "schedule")
        elif now - self._head_interval >= self._last_head:
            self._write_head(conn, self._sign(conn, state, "head"), state.size)

    def after_tick(self, conn: sqlite3.Connection, state: TreeState) -> None:
        """The gateway's tick found the head behind: a stored checkpoint if one is due, else a head."""
        if time.monotonic() - self._checkpoint_interval >= self._last_checkpoint:
            self.store(conn, state, "schedule")
        else:
            self.seal(conn, state)

    def stale(self, size: int) -> bool:
        """Whether the head (as this process last wrote it) is behind a ledger of ``size`` records."""
        return size != self._head_size

    def seal(self, conn: sqlite3.Connection, state: TreeState) -> None:
        """Sign the head now, unless it already names this size (a vault closing, the gateway's tick)."""
        row = conn.execute("SELECT size FROM ledger_head WHERE id = 1").fetchone()
        if row is None or row[0] != state.size:
            self._write_head(conn, self._sign(conn, state, "head"), state.size)
        self._head_size = state.size

    def store(self, conn: sqlite3.Connection, state: TreeState, reason: str) -> str:
        """Sign, keep in the history and make it the head; returns the note."""
        note = self._sign(conn, state, reason)
        conn.execute(
            "INSERT INTO ledger_checkpoint (size, ts, reason, note) VALUES (?, ?, ?, ?)",
            (state.size, signed_note.parse_unverified(note).timestamp, reason, note),
        )
        self._write_head(conn, note, state.size)
        self._last_checkpoint = time.monotonic()
        return note

    def keep_cut_head(self, conn: sqlite3.Connection, size: int) -> bool:
        """Before signing over a ledger of ``size`` records: a head naming more moves to the history."""
        row = conn.execute("SELECT size, note FROM ledger_head WHERE id = 1").fetchone()
        if row is None or row[0] <= size:
            return False
        conn.execute(
            "INSERT INTO ledger_checkpoint (size, ts, reason, note) VALUES (?, ?, ?, ?)",
            (row[0], signed_note.parse_unverified(row[1]).timestamp, "head", row[1]),
        )
        return True

    def _sign(self, conn: sqlite3.Connection, state: TreeState, reason: str) -> str:
        return self.sign_at(conn, state.size, state.root(), reason)

    @staticmethod
    def _timestamp(conn: sqlite3.Connection) -> str:
        """Now, but never before the newest stored checkpoint (a clock stepped back keeps the order)."""
        now = timestamps.now()
        row = conn.execute("SELECT ts FROM ledger_checkpoint ORDER BY id DESC LIMIT 1").fetchone()
        return now if row is None or row[0] <= now else str(row[0])

    def sign_at(self, conn: sqlite3.Connection, size: int, root: bytes, reason: str) -> str:
        """Sign (not store) a checkpoint of the first ``size`` records, whose root the caller computed
        from the file (an archive's: the records it covers, not the ledger's newest)."""
        cp = signed_note.Checkpoint(
            origin=self.origin(conn), size=size, root=root, timestamp=self._timestamp(conn), reason=reason
        )
        return signed_note.sign(cp, self.key)

    def _write_head(self, conn: sqlite3.Connection, note: str, size: int) -> None:
        conn.execute("INSERT OR REPLACE INTO ledger_head (id, size, note) VALUES (1, ?, ?)", (size, note))
        self._last_head = time.monotonic()
        self._head_size = size
