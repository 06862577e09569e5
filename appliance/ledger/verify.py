"""``audit verify``: recompute the ledger's chain and Merkle tree from its records and check every signature.

One streaming pass over the records (constant memory but the tile list, n/256 hashes), in one read
snapshot. For each record, in order:
- seqs are contiguous from the ledger's start, each record chains to the one before it, its stored hash
  is the hash of its text (``chain.chain_hash``, the rule the writer used), and its indexed columns copy
  its text;
- its leaf goes into the recomputed tree; every 256 leaves the stored tile must equal the recomputed one;
- when the tree reaches the size of a checkpoint (stored, the head, or one an auditor kept and passed
  in), the checkpoint's root must equal the recomputed root.
Before the pass every checkpoint's signature is checked against the verifier keys, and the stored
history must only grow, in size and time. After it, no checkpoint may name more records than remain.

After an archive the pass starts from the archive row's signed compact range; the tiles of the archived
records (kept for good) must give that range, so they stand for the archived tree. A checkpoint over
archived records is checked against them: from the tiles alone at a tile boundary, and with the records
of its partial tile, read back from an archive bundle (``tiles.archived_leaves``), inside one; a kept one
that cannot be checked fails verify with the reason, never passes unchecked.

The first failure is reported with the record it concerns (``first_bad_seq``), as precisely as the
evidence allows: a chain break names its record; a rewrite that recomputed the chain (so only a signed
root catches it) names the range between the last checkpoint that still matches and the first that
does not.

Owns: the order and wording of those checks. Never: writes; trusts a stored tile, head or hash it can
recompute; accepts a checkpoint whose signature it could not check.
"""

from __future__ import annotations

import sqlite3
from collections import defaultdict
from collections.abc import Callable, Sequence
from dataclasses import dataclass

from appliance.errors import ArchivedRecordsUnavailable, CheckpointError
from appliance.ledger import merkle, signed_note
from appliance.ledger.archive import ArchivedPrefix, archive_roots, archived_prefix, check_prefix
from appliance.ledger.chain import GENESIS, chain_hash
from appliance.ledger.checkpoints import StoredCheckpoint, stored_checkpoints, stored_origin
from appliance.ledger.tiles import TILE_LEAVES, ArchivedTiles, archived_leaves, compact_range


@dataclass(frozen=True)
class VerifyReport:
    ok: bool
    records: int
    """Records checked and found good (all of them when ``ok``)."""
    first_bad_seq: int | None
    message: str
    checkpoints: int = 0
    """Signed checkpoints checked against the recomputed tree (the head and any kept ones included)."""


# The ts/type/request_id/claw_id columns copy the record for queries, so verify checks the copies too.
# CASE, unlike AND, never parses invalid JSON.
_ROWS = (
    "SELECT seq, record, prev_hash, hash, CASE WHEN json_valid(record) THEN"
    " ts IS json_extract(record, '$.ts') AND type IS json_extract(record, '$.type')"
    " AND request_id IS json_extract(record, '$.request_id') AND claw_id IS json_extract(record, '$.claw_id')"
    " ELSE 0 END FROM ledger ORDER BY seq"
)


@dataclass(frozen=True)
class _Due:
    label: str
    checkpoint: signed_note.Checkpoint
    kept: bool = False


class _Failed(Exception):
    def __init__(self, records: int, first_bad: int | None, message: str) -> None:
        super().__init__(message)
        self.records = records
        self.first_bad = first_bad
        self.message = message


def verify_database(
    conn: sqlite3.Connection,
    verifiers: Sequence[signed_note.Verifier],
    kept: Sequence[tuple[str, str]] = (),
    progress: Callable[[int], None] | None = None,
    bundles: ArchivedTiles | None = None,
) -> VerifyReport:
    """Verify the ledger in ``conn`` (a read connection; blocking: run it off the event loop).

    ``verifiers``: the keys whose checkpoints count (the appliance's own); with none, signatures are not
    required and only the chain and tree are checked. ``kept``: (label, note text) of checkpoints an
    auditor kept off the appliance; they must be signed by one of ``verifiers`` and match the tree.
    ``bundles``: archived records, by tile, for kept checkpoints inside an archived tile.
    """
    conn.execute("BEGIN")  # one snapshot for records, tiles and checkpoints
    try:
        return _verify(conn, verifiers, kept, progress, bundles)
    except _Failed as failed:
        return VerifyReport(False, failed.records, failed.first_bad, failed.message + _file_damage(conn))
    except sqlite3.DatabaseError as exc:  # a page SQLite itself cannot read
        return VerifyReport(False, 0, None, f"the vault file is damaged: {exc}{_file_damage(conn)}")
    finally:
        conn.execute("COMMIT")


def _file_damage(conn: sqlite3.Connection) -> str:
    """After a failure: whether the file itself is torn (then "missing" may mean "lost", not "deleted")."""
    try:
        rows = [str(row[0]) for row in conn.execute("PRAGMA quick_check(4)")]
    except sqlite3.DatabaseError as exc:
        return f"; the database file itself is damaged ({exc})"
    if rows == ["ok"]:
        return ""
    lines = [line for row in rows for line in row.splitlines() if line and not line.startswith("***")]
    problems = lines[:3] or ["SQLite's quick_check failed"]
    return (
        "; the database file itself is damaged (torn or corrupted), so records may be lost rather than "
        f"deleted: {'; '.join(problems)}"
    )


def _open_all(
    conn: sqlite3.Connection, verifiers: Sequence[signed_note.Verifier], kept: Sequence[tuple[str, str]]
) -> tuple[list[_Due], bool]:
    history, head = stored_checkpoints(conn)
    stored: list[StoredCheckpoint] = [*history, *([head] if head else [])]
    due: list[_Due] = []
    if not verifiers:
        return due, head is not None
    origin = stored_origin(conn)
    for item in stored:
        due.append(_Due(item.label, _open(item.label, item.note, verifiers, origin)))
    for label, text in kept:
        due.append(_Due(label, _open(label, text, verifiers, origin), kept=True))
    # The history only grows (sizes, in the order written; times are not compared: a clock may step back).
    # A later, smaller checkpoint means records were cut and the ledger written on: name the cut.
    previous: _Due | None = None
    for entry in due[: len(history)]:
        if previous is not None and entry.checkpoint.size < previous.checkpoint.size:
            before, now = previous.checkpoint, entry.checkpoint
            raise _Failed(
                now.size,
                now.size + 1,
                f"records (at least {now.size + 1} to {before.size}) were cut from the end and the ledger "
                "written on: "
                f"{previous.label} signed {before.size} records at {before.timestamp}, {entry.label} only "
                f"{now.size} at {now.timestamp}",
            )
        previous = entry
    return due, head is not None


def _open(
    label: str, text: str, verifiers: Sequence[signed_note.Verifier], origin: str | None
) -> signed_note.Checkpoint:
    try:
        cp = signed_note.open_note(text, verifiers)
    except CheckpointError as exc:
        raise _Failed(0, None, f"{label}: {exc}") from None
    if origin is not None and cp.origin != origin:
        raise _Failed(0, None, f"{label} is for another ledger ({cp.origin}; this one is {origin})")
    return cp


def _verify(
    conn: sqlite3.Connection,
    verifiers: Sequence[signed_note.Verifier],
    kept: Sequence[tuple[str, str]],
    progress: Callable[[int], None] | None,
    bundles: ArchivedTiles | None,
) -> VerifyReport:
    due, has_head = _open_all(conn, verifiers, kept)
    by_size: dict[int, list[_Due]] = defaultdict(list)
    for entry in due:
        by_size[entry.checkpoint.size].append(entry)
    tiles = [bytes(row[0]) for row in conn.execute("SELECT hash FROM ledger_tile ORDER BY idx")]

    link, leaf_hash = chain_hash, merkle.leaf_hash
    frontier = merkle.Frontier()
    expected = 1
    last = GENESIS
    matched = 0  # size of the last checkpoint found to match
    checked = 0
    try:
        archived = archived_prefix(conn)
    except sqlite3.DatabaseError as exc:
        raise _Failed(0, None, f"the archive rows are damaged: {exc}") from None
    if archived is not None:
        # Records up to last_seq live in archive files (verified on their own): go on from the signed
        # compact range and chain hash the vault kept of them.
        problem = check_prefix(archived, list(verifiers))
        if problem is not None:
            raise _Failed(0, archived.last_seq, problem)
        _check_archived_tiles(archived, tiles)
        frontier = archived.frontier.copy()
        expected, last, matched = archived.last_seq + 1, archived.chain, archived.last_seq
        boundaries = archive_roots(conn)
        for size in [size for size in by_size if size <= archived.last_seq]:
            for entry in by_size.pop(size):  # signed over archived records
                if size in boundaries:
                    root = boundaries[size]
                elif entry.kept or not size % TILE_LEAVES:  # an auditor's copy is checked, or verify fails
                    root = _archived_root(entry, archived, tiles, bundles)
                else:  # a stored one inside an archived tile: the archive files prove those records
                    continue
                if entry.checkpoint.root != root:
                    raise _Failed(
                        0,
                        None,
                        f"{entry.label} (size {size}, {entry.checkpoint.timestamp}) does not match the "
                        f"archived records: the tree of records 1 to {size} that the vault's tiles give has "
                        "another root; the appliance signed two different histories (keep both as evidence)",
                    )
                checked += 1
    append = frontier.append
    partial: list[bytes] = []
    cur = conn.execute(_ROWS)
    try:
        for seq, record, prev, stored, columns_match in cur:
            if seq != expected:
                raise _Failed(expected - 1, expected, f"record {expected} is missing (deleted)")
            if prev != last:
                if seq == 1:
                    message = "record 1 does not start the chain (its previous hash is not the genesis value)"
                elif archived is not None and seq == archived.last_seq + 1:
                    message = f"record {seq} does not chain to the archived record {seq - 1}"
                else:
                    message = f"record {seq} does not chain to record {seq - 1}"
                raise _Failed(seq - 1, seq, message)
            try:
                data = record.encode()  # once for both the link and the leaf
            except AttributeError:  # not text (a BLOB written over it): hashed as its repr, it cannot match
                data = str(record).encode()
            computed = link(prev, data)
            if computed != stored:
                following = cur.fetchone()
                if following is not None and following[2] == computed:
                    message = f"record {seq}: its stored hash was altered"
                else:
                    message = f"record {seq}: content does not match its hash (edited)"
                raise _Failed(seq - 1, seq, message)
            if not columns_match:
                raise _Failed(
                    seq - 1, seq, f"record {seq}: its indexed columns do not match its content (edited)"
                )
            leaf = leaf_hash(data)
            append(leaf)
            partial.append(leaf)
            if len(partial) == TILE_LEAVES:
                idx = (seq - 1) // TILE_LEAVES
                if idx >= len(tiles) or tiles[idx] != merkle.mth(partial):
                    first = idx * TILE_LEAVES + 1
                    raise _Failed(
                        first - 1, first, f"tile {idx} (records {first} to {seq}) does not match its records"
                    )
                partial.clear()
            if seq in by_size:
                root = frontier.root()
                for entry in by_size.pop(seq):
                    if entry.checkpoint.root != root:
                        raise _Failed(
                            matched,
                            matched + 1,
                            f"records {matched + 1} to {seq}: the tree no longer has the root that "
                            f"{entry.label} (size {seq}, {entry.checkpoint.timestamp}) signed; a record "
                            "in that range was altered and the chain recomputed to hide it",
                        )
                    checked += 1
                matched = seq
            last = stored
            expected += 1
            if progress is not None and not expected & 0xFFFF:
                progress(expected - 1)
    finally:
        cur.close()
    records = expected - 1
    report = _after_pass(records, by_size, tiles, due, checked, has_head, bool(verifiers), progress)
    if archived is not None and report.ok:
        message = f"{report.message}; records 1 to {archived.last_seq} are in {archived.segments} archive(s)"
        return VerifyReport(True, records, None, message, report.checkpoints)
    return report


def _check_archived_tiles(archived: ArchivedPrefix, tiles: list[bytes]) -> None:
    """The tiles of archived records must give the archive's signed compact range: then they, not the
    deleted records, stand for the archived tree (in checks of kept checkpoints, and in proofs)."""
    whole = archived.last_seq // TILE_LEAVES
    if len(tiles) < whole or compact_range(archived.last_seq, tiles, ()) != archived.frontier:
        raise _Failed(
            0,
            archived.last_seq,
            f"the tiles of the archived records 1 to {archived.last_seq} do not give the archive's signed "
            "root: the vault's record of archived records was altered",
        )


def _archived_root(
    entry: _Due, archived: ArchivedPrefix, tiles: list[bytes], bundles: ArchivedTiles | None
) -> bytes:
    """The root of the first ``entry``'s size records, all archived: from the tiles, and inside a tile from
    that tile's records as an archive bundle holds them (checked against the tile)."""
    size = entry.checkpoint.size
    whole, rest = divmod(size, TILE_LEAVES)
    tail: list[bytes] = []
    if rest:
        try:
            tail = archived_leaves(whole, tiles[whole], bundles)[0]
        except ArchivedRecordsUnavailable as exc:
            raise _Failed(
                0,
                None,
                f"{entry.label} signs {size} records, inside the archived records 1 to {archived.last_seq}, "
                f"so it is checked with the archived records of its tile: {exc}",
            ) from None
    return compact_range(size, tiles, tail).root()


def _after_pass(
    records: int,
    left: dict[int, list[_Due]],
    tiles: list[bytes],
    due: list[_Due],
    checked: int,
    has_head: bool,
    signed: bool,
    progress: Callable[[int], None] | None,
) -> VerifyReport:
    empty = left.pop(0, [])  # a checkpoint of the empty tree (a kept one, say) has nothing to recompute
    for entry in empty:
        if entry.checkpoint.root != merkle.EMPTY_ROOT:
            raise _Failed(
                0, None, f"{entry.label} claims an empty tree with a root that is not the empty root"
            )
        checked += 1
    if left:
        size = max(left)
        entry = left[size][0]
        raise _Failed(
            records,
            records + 1,
            f"records {records + 1} to {size} are missing (deleted from the end; {entry.label} signed "
            f"{size} records at {entry.checkpoint.timestamp})",
        )
    if len(tiles) > records // TILE_LEAVES:
        first = records + 1
        raise _Failed(
            records, first, f"records from {first} are missing (deleted; tile {len(tiles) - 1} covers them)"
        )
    if signed and records and not has_head:
        raise _Failed(
            records, None, "the ledger has no signed head: records may have been deleted from its end"
        )
    if progress is not None:
        progress(records)
    if not records:
        return VerifyReport(True, 0, None, "the ledger is empty", checked)
    newest = max((entry.checkpoint.size for entry in due), default=0)
    message = f"{records} records: hash chain and Merkle tree intact"
    if signed:
        message += f", {checked} signed checkpoint(s) match"
        if newest < records:
            message += f" ({records - newest} record(s) after the newest signature, not yet signed)"
    return VerifyReport(True, records, None, message, checked)
