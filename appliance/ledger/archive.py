"""Retention: what the vault keeps of records moved to sealed archive files, so that verify can go on.

``audit archive --through N`` (``operations.run_archive``) writes records first..N (first: one after the
previous archive) as an export bundle (``export``: the lines, a checkpoint of exactly N records signed with
reason "archive", and the compact range before ``first``), reads the files back and verifies them, and
only then, in one transaction, stores a ``ledger_archive`` row and deletes those records from the vault
(``store`` here).

The row keeps what verification of the records after N needs: the chain hash of record N, the compact
range of the first N leaves, and the signed checkpoint of N records. ``verify`` checks that checkpoint's
signature and that the compact range gives its root, then continues the chain and the tree from there;
the archive files are verified on their own (`audit verify FILE…`), by anyone with the verifier key.
Tiles are never deleted: ``verify`` checks that those of archived records give the row's compact range, so
they stand for the archived tree, and proofs and kept checkpoints over archived records need at most one
tile's records back from a bundle (``tiles``). N must be a multiple of 256 (a whole tile), so no tile is
split between an archive and the vault.

Owns: ``ledger_archive`` and the one trigger that lets archived records (and only those) be deleted,
``plan`` (which records an archive may take), ``store`` (the row and the deletion, in the caller's write),
``check_prefix`` (``verify``'s check of a row) and ``archive_files`` (where each archive was written).
Never: archives records newer than the signed head; rewrites an archive row; writes or verifies the
archive files, or knows of ``Ledger`` (it imports neither ``store`` nor ``export``: ``operations``
combines them, and deletes nothing before the files verify).
"""

from __future__ import annotations

import base64
import json
import sqlite3
from dataclasses import dataclass
from pathlib import Path

import sqlite_utils

from appliance.errors import CheckpointError, OperatorError
from appliance.ledger import merkle, signed_note
from appliance.ledger.tiles import TILE_LEAVES, tile_frontier
from appliance.vault.db import Migration


def _create(db: sqlite_utils.Database) -> None:
    db.execute(
        "CREATE TABLE ledger_archive (id INTEGER PRIMARY KEY, first_seq INTEGER NOT NULL,"
        " last_seq INTEGER NOT NULL, chain TEXT NOT NULL, frontier TEXT NOT NULL, note TEXT NOT NULL,"
        " file TEXT NOT NULL, sha256 TEXT NOT NULL, archived_at TEXT NOT NULL)"
    )
    for event in ("UPDATE", "DELETE"):
        db.execute(
            f"CREATE TRIGGER ledger_archive_append_only_{event.lower()} BEFORE {event} ON ledger_archive"
            " BEGIN SELECT RAISE(ABORT, 'the audit ledger is append-only'); END"
        )
    db.execute("DROP TRIGGER IF EXISTS ledger_append_only_delete")
    db.execute(
        "CREATE TRIGGER ledger_append_only_delete BEFORE DELETE ON ledger"
        " WHEN OLD.seq > COALESCE((SELECT MAX(last_seq) FROM ledger_archive), 0)"
        " BEGIN SELECT RAISE(ABORT, 'the audit ledger is append-only (a record can be removed only once"
        " archived)'); END"
    )


MIGRATION = Migration("ledger-0006-archive", _create)


@dataclass(frozen=True)
class ArchivedPrefix:
    """What the vault keeps of records archived away: where its records now start, and how to go on."""

    last_seq: int
    chain: str
    frontier: merkle.Frontier
    note: str
    segments: int


def archived_prefix(conn: sqlite3.Connection) -> ArchivedPrefix | None:
    rows = conn.execute(
        "SELECT first_seq, last_seq, chain, frontier, note FROM ledger_archive ORDER BY id"
    ).fetchall()
    if not rows:
        return None
    expected = 1
    for first, last, *_ in rows:
        if first != expected or last < first:
            raise sqlite3.DatabaseError(
                f"the archive rows do not follow each other (records {first} to {last} after {expected - 1})"
            )
        expected = last + 1
    _, last, chain, frontier, note = rows[-1]
    return ArchivedPrefix(int(last), str(chain), decode_frontier(int(last), frontier), str(note), len(rows))


@dataclass(frozen=True)
class ArchiveFile:
    """Where ``audit archive`` wrote records ``first`` to ``last``, and the SHA-256 of that file."""

    first: int
    last: int
    file: str
    sha256: str


def archive_files(conn: sqlite3.Connection) -> list[ArchiveFile]:
    """Every archive's records and file, oldest first (for messages that name the bundle a check needs)."""
    rows = conn.execute("SELECT first_seq, last_seq, file, sha256 FROM ledger_archive ORDER BY id").fetchall()
    return [ArchiveFile(int(first), int(last), str(file), str(digest)) for first, last, file, digest in rows]


def archive_roots(conn: sqlite3.Connection) -> dict[int, bytes]:
    """The root of the first N records at each archive boundary N, from the rows' compact ranges."""
    rows = conn.execute("SELECT last_seq, frontier FROM ledger_archive").fetchall()
    return {int(last): decode_frontier(int(last), text).root() for last, text in rows}


def encode_frontier(frontier: merkle.Frontier) -> str:
    return json.dumps([base64.b64encode(h).decode() for h in frontier.hashes])


def decode_frontier(size: int, text: object) -> merkle.Frontier:
    """An archive row's compact range; a damaged one is a damaged database, as verify reports it."""
    try:
        hashes = [base64.b64decode(h, validate=True) for h in json.loads(str(text))]
        return merkle.Frontier(size, hashes)
    except (ValueError, TypeError) as exc:
        raise sqlite3.DatabaseError(f"the archive row of records up to {size} is damaged: {exc}") from None


@dataclass(frozen=True)
class ArchivePlan:
    first: int
    last: int
    frontier: merkle.Frontier
    chain: str
    prefix: merkle.Frontier


def plan(conn: sqlite3.Connection, through: int) -> ArchivePlan:
    """Check ``through`` and read what the archive needs, in the caller's read snapshot."""
    done = archived_prefix(conn)
    first = 1 if done is None else done.last_seq + 1
    head = conn.execute("SELECT size FROM ledger_head WHERE id = 1").fetchone()
    signed = 0 if head is None else int(head[0])
    if through % TILE_LEAVES:
        lower = through - through % TILE_LEAVES
        raise OperatorError(f"archive through a multiple of {TILE_LEAVES} records (e.g. --through {lower})")
    if through < first:
        raise OperatorError(f"records up to {first - 1} are archived already; nothing to archive")
    if through > signed:
        raise OperatorError(f"the signed head covers {signed} records; archive at most that many")
    newest = conn.execute("SELECT MAX(seq) FROM ledger").fetchone()[0] or 0
    if through >= newest:  # the newest record stays: the writer goes on from it
        raise OperatorError(f"the newest record ({newest}) stays in the vault; archive through fewer records")
    row = conn.execute("SELECT hash FROM ledger WHERE seq = ?", (through,)).fetchone()
    if row is None:
        raise OperatorError(f"record {through} is not in the ledger")
    prefix = done.frontier if done is not None else merkle.Frontier()
    return ArchivePlan(first, through, tile_frontier(conn, through), str(row[0]), prefix)


def store(
    conn: sqlite3.Connection, archive: ArchivePlan, note: str, file: Path, file_sha256: str, at: str
) -> int:
    """Inside the writer's transaction: keep the row, delete the archived records; returns how many."""
    conn.execute(
        "INSERT INTO ledger_archive (first_seq, last_seq, chain, frontier, note, file, sha256, archived_at)"
        " VALUES (?, ?, ?, ?, ?, ?, ?, ?)",
        (
            archive.first,
            archive.last,
            archive.chain,
            encode_frontier(archive.frontier),
            note,
            str(file),
            file_sha256,
            at,
        ),
    )
    cur = conn.execute("DELETE FROM ledger WHERE seq >= ? AND seq <= ?", (archive.first, archive.last))
    return int(cur.rowcount)


def check_prefix(prefix: ArchivedPrefix, verifiers: list[signed_note.Verifier]) -> str | None:
    """None if the archive row's signed checkpoint names its compact range's size and root."""
    try:
        cp = (
            signed_note.open_note(prefix.note, verifiers)
            if verifiers
            else signed_note.parse_unverified(prefix.note)
        )
    except CheckpointError as exc:
        return f"the archive checkpoint of records 1 to {prefix.last_seq}: {exc}"
    if cp.reason != "archive" or prefix.last_seq % TILE_LEAVES:
        return (
            f"the archive row for records up to {prefix.last_seq} is not an archive's (its checkpoint's "
            f"reason is {cp.reason!r}): records were deleted under a forged archive row"
        )
    if cp.size != prefix.last_seq or cp.root != prefix.frontier.root():
        return (
            f"the archive row for records up to {prefix.last_seq} does not match its signed checkpoint "
            f"(size {cp.size}): the vault's record of archived records was altered"
        )
    return None
