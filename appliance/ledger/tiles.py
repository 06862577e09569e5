"""The ledger's Merkle tree (RFC 9162 §2.1) as stored: tiles, the writer's running state, subtree hashes.

Leaf ``i`` (0-based) is record ``seq = i + 1``; its entry is the record's stored JSON text as UTF-8, the
same bytes the hash chain covers (an exported audit line is that text with ``,"seq":N`` added before its
closing brace). Nothing but leaves is needed to recompute the tree, so nothing here is trusted by
``verify``: it recomputes every tile and every signed root from the records.

What is stored is one hash per complete tile: the root of 256 consecutive leaves (``ledger_tile``,
``idx`` = first leaf // 256). Any subtree the RFC's proof algorithms ask for is either inside one tile
(hashed from at most 256 records) or starts on a tile boundary (the tiles it covers, plus at most one
partial tile), so a proof for a ledger of n records reads about n/256 tile hashes and one tile of records.

Tiles outlive the records: ``audit archive`` deletes records, never tiles, so the tree over archived
records stays whole in the vault at tile granularity. A subtree inside an archived tile needs that tile's
256 records, read back from the archive bundle that holds them (``ArchivedTiles``, given by the caller)
and believed only when they hash to the tile the vault kept (``archived_leaves``).

Owns: the ``ledger_tile`` table, ``TreeState`` (what the writer thread carries from commit to commit:
size, the newest chain hash, the RFC compact range of the tree, and the leaf hashes of the unfinished
tile), ``SubtreeReader`` (subtree hashes and entries for proofs, from one read snapshot, archived tiles
included), ``compact_range`` and ``archived_leaves``.
Never: trusts a stored tile while verifying; keeps state across a commit it cannot vouch for (the state
names the newest record's seq and chain hash, and the writer reloads it when the file says otherwise);
takes a record read from an archive bundle that does not hash to the vault's tile.
"""

from __future__ import annotations

import sqlite3
from collections.abc import Callable, Iterable, Sequence
from dataclasses import dataclass, field
from typing import Final

import sqlite_utils

from appliance.errors import ArchivedRecordsUnavailable, TreeInconsistent
from appliance.ledger import merkle
from appliance.ledger.chain import GENESIS
from appliance.vault.db import Migration

TILE_LEAVES: Final = 256


def _create_tiles(db: sqlite_utils.Database) -> None:
    db.execute("CREATE TABLE ledger_tile (idx INTEGER PRIMARY KEY, hash BLOB NOT NULL)")
    for event in ("UPDATE", "DELETE"):
        db.execute(
            f"CREATE TRIGGER ledger_tile_append_only_{event.lower()} BEFORE {event} ON ledger_tile"
            " BEGIN SELECT RAISE(ABORT, 'the audit ledger is append-only'); END"
        )
    # Ledgers written before the tree existed get their tiles now, in the migration's transaction.
    leaves: list[bytes] = []
    idx = 0
    for (text,) in db.execute("SELECT record FROM ledger ORDER BY seq"):
        leaves.append(merkle.leaf_hash(text.encode()))
        if len(leaves) == TILE_LEAVES:
            db.execute("INSERT INTO ledger_tile (idx, hash) VALUES (?, ?)", (idx, merkle.mth(leaves)))
            leaves.clear()
            idx += 1


MIGRATION = Migration("ledger-0004-merkle-tiles", _create_tiles)


def entry_leaf(record_text: str) -> bytes:
    """The leaf hash of a record: RFC 9162 ``SHA-256(0x00 || entry)`` over its stored JSON text."""
    return merkle.leaf_hash(record_text.encode())


def tile_frontier(conn: sqlite3.Connection, size: int) -> merkle.Frontier:
    """The compact range of the first ``size`` leaves (whole tiles) from the stored tiles alone."""
    if size % TILE_LEAVES:
        raise ValueError("only whole tiles")
    tiles = merkle.Frontier()  # over tile roots: each of its subtrees is 256 times larger in leaves
    for (digest,) in conn.execute(
        "SELECT hash FROM ledger_tile WHERE idx < ? ORDER BY idx", (size // TILE_LEAVES,)
    ):
        tiles.append(bytes(digest))
    if tiles.size * TILE_LEAVES != size:
        raise TreeInconsistent(
            f"the ledger's tiles cover {tiles.size * TILE_LEAVES} records, not {size}: run audit verify"
        )
    return merkle.Frontier(size, tiles.hashes)


def compact_range(size: int, tiles: Sequence[bytes], tail: Sequence[bytes]) -> merkle.Frontier:
    """The compact range of the first ``size`` leaves: from the hashes of the whole tiles before ``size``
    (``tiles``, at least that many) and the leaf hashes of its partial tile (``tail``, at least as many as
    ``size`` has past its last whole tile)."""
    whole, rest = divmod(size, TILE_LEAVES)
    if len(tiles) < whole or len(tail) < rest:
        raise ValueError(f"a compact range of {size} leaves needs {whole} tiles and {rest} leaves")
    upper = merkle.Frontier()  # over tile roots: each of its subtrees is 256 times larger in leaves
    for digest in tiles[:whole]:
        upper.append(digest)
    lower = merkle.Frontier()
    for leaf in tail[:rest]:
        lower.append(leaf)
    return merkle.Frontier(size, [*upper.hashes, *lower.hashes])  # larger subtrees first


@dataclass(frozen=True)
class ArchivedTile:
    """The records of one archived tile as an archive bundle holds them: 256 stored texts, in seq order."""

    texts: list[str]
    source: str
    """Where they were read (a bundle's file name), for messages."""


ArchivedTiles = Callable[[int], ArchivedTile]
"""Tile index -> its records, read back from an archive bundle; raises ``ArchivedRecordsUnavailable``
when no bundle at hand holds them (its message says which bundle does, and how to give it)."""


def archived_leaves(idx: int, stored: bytes, archived: ArchivedTiles | None) -> tuple[list[bytes], list[str]]:
    """The leaf hashes and texts of archived tile ``idx``, read through ``archived`` and accepted only if
    they give ``stored``, the tile hash the vault kept (which ``verify`` binds to the archive's signed
    checkpoint)."""
    first, last = idx * TILE_LEAVES + 1, (idx + 1) * TILE_LEAVES
    if archived is None:
        raise ArchivedRecordsUnavailable(
            f"records {first} to {last} are archived: give the archive bundle that holds them "
            "(--archive FILE)"
        )
    tile = archived(idx)
    leaves = [entry_leaf(text) for text in tile.texts]
    if len(leaves) != TILE_LEAVES or merkle.mth(leaves) != stored:
        raise ArchivedRecordsUnavailable(
            f"records {first} to {last} in {tile.source} do not give the tile the vault kept: that bundle is "
            "not this ledger's archive, or its records were altered"
        )
    return leaves, tile.texts


@dataclass
class TreeState:
    """The tree after record ``size``: its chain hash, compact range, and the unfinished tile's leaves."""

    size: int = 0
    chain: str = GENESIS
    frontier: merkle.Frontier = field(default_factory=merkle.Frontier)
    partial: list[bytes] = field(default_factory=list)

    @classmethod
    def load(cls, conn: sqlite3.Connection) -> TreeState:
        """Rebuild from the file: tiles give the compact range above 256 leaves, the last records the rest."""
        last = conn.execute("SELECT seq, hash FROM ledger ORDER BY seq DESC LIMIT 1").fetchone()
        size, chain = (0, GENESIS) if last is None else (int(last[0]), str(last[1]))
        tiles = size // TILE_LEAVES
        upper = tile_frontier(conn, tiles * TILE_LEAVES)
        start = tiles * TILE_LEAVES
        texts = [
            row[0] for row in conn.execute("SELECT record FROM ledger WHERE seq > ? ORDER BY seq", (start,))
        ]
        if len(texts) != size - start or not all(isinstance(text, str) for text in texts):
            raise TreeInconsistent(f"records {start + 1} to {size} are not all present: run audit verify")
        partial = [entry_leaf(text) for text in texts]
        lower = merkle.Frontier()
        for leaf in partial:
            lower.append(leaf)
        frontier = merkle.Frontier(size, [*upper.hashes, *lower.hashes])  # larger subtrees first
        return cls(size, chain, frontier, partial)

    def copy(self) -> TreeState:
        return TreeState(self.size, self.chain, self.frontier.copy(), list(self.partial))

    def matches(self, last: tuple[int, str] | None) -> bool:
        """Whether this state describes the file whose newest record is ``last`` (seq, chain hash)."""
        return (self.size, self.chain) == ((0, GENESIS) if last is None else (last[0], last[1]))

    def extend(self, leaves: Iterable[bytes], chain: str) -> list[tuple[int, bytes]]:
        """Add leaves (the batch just inserted, ending in chain hash ``chain``); the tiles they complete."""
        done: list[tuple[int, bytes]] = []
        append = self.frontier.append
        partial = self.partial
        for leaf in leaves:
            append(leaf)
            partial.append(leaf)
            if len(partial) == TILE_LEAVES:
                done.append(((self.frontier.size - 1) // TILE_LEAVES, merkle.mth(partial)))
                partial.clear()
        self.size = self.frontier.size
        self.chain = chain
        return done

    def root(self) -> bytes:
        return self.frontier.root()


def insert_tiles(conn: sqlite3.Connection, tiles: list[tuple[int, bytes]]) -> None:
    if tiles:
        conn.executemany("INSERT INTO ledger_tile (idx, hash) VALUES (?, ?)", tiles)


class SubtreeReader:
    """``subtree(start, end)`` for RFC 9162 proofs over the first ``size`` records of one read snapshot.

    Call it inside one read transaction (``BEGIN`` on the reader) so tiles and records agree. Records
    before the oldest one the vault holds were archived: they come from ``archived`` (see the module).
    """

    def __init__(self, conn: sqlite3.Connection, size: int, archived: ArchivedTiles | None = None) -> None:
        self._conn = conn
        self.size = size
        self._tiles = [
            bytes(row[0])
            for row in conn.execute(
                "SELECT hash FROM ledger_tile WHERE idx < ? ORDER BY idx", (size // TILE_LEAVES,)
            )
        ]
        if len(self._tiles) != size // TILE_LEAVES:
            raise TreeInconsistent("the ledger's tiles are incomplete: run audit verify")
        self._archived = archived
        self._read: dict[int, tuple[list[bytes], list[str]]] = {}  # archived tiles, once checked
        oldest = conn.execute("SELECT MIN(seq) FROM ledger").fetchone()[0]
        self._held_from = 1 if oldest is None else int(oldest)
        """The first record the vault holds: those before it were archived."""

    def _archived_tile(self, idx: int) -> tuple[list[bytes], list[str]]:
        if idx not in self._read:
            if idx < len(self._tiles):
                stored = self._tiles[idx]
            else:
                row = self._conn.execute("SELECT hash FROM ledger_tile WHERE idx = ?", (idx,)).fetchone()
                if row is None:
                    raise TreeInconsistent(f"tile {idx} of archived records is missing: run audit verify")
                stored = bytes(row[0])
            self._read[idx] = archived_leaves(idx, stored, self._archived)
        return self._read[idx]

    def entry(self, seq: int) -> str:
        """The stored text of record ``seq`` (from its archive bundle if it was archived)."""
        if seq < self._held_from:
            idx = (seq - 1) // TILE_LEAVES
            return self._archived_tile(idx)[1][seq - 1 - idx * TILE_LEAVES]
        row = self._conn.execute("SELECT record FROM ledger WHERE seq = ?", (seq,)).fetchone()
        if row is None:
            raise TreeInconsistent(f"record {seq} is not in the ledger: run audit verify")
        return str(row[0])

    def leaves(self, start: int, end: int) -> list[bytes]:
        """Leaf hashes of leaves ``start`` to ``end - 1`` (records start + 1 to end)."""
        held = max(start, self._held_from - 1)  # leaves before it belong to archived records
        found: list[bytes] = []
        if start < held:
            for idx in range(start // TILE_LEAVES, (min(end, held) - 1) // TILE_LEAVES + 1):
                base = idx * TILE_LEAVES
                tile = self._archived_tile(idx)[0]
                found += tile[max(start, base) - base : min(end, held, base + TILE_LEAVES) - base]
        if end > held:
            rows = self._conn.execute(
                "SELECT seq, record FROM ledger WHERE seq > ? AND seq <= ? ORDER BY seq", (held, end)
            ).fetchall()
            if len(rows) != end - held:
                raise TreeInconsistent(f"records {held + 1} to {end} are not all present: run audit verify")
            found += [entry_leaf(text) for _, text in rows]
        return found

    def subtree(self, start: int, end: int) -> bytes:
        if not 0 <= start < end <= self.size:
            raise ValueError(f"subtree [{start}, {end}) is outside a tree of {self.size} leaves")
        if end - start <= TILE_LEAVES and start // TILE_LEAVES == (end - 1) // TILE_LEAVES:
            if end - start == TILE_LEAVES:
                return self._tiles[start // TILE_LEAVES]
            return merkle.mth(self.leaves(start, end))
        if start % TILE_LEAVES:
            raise ValueError(f"subtree [{start}, {end}) does not start on a tile boundary")
        whole = end // TILE_LEAVES
        parts = self._tiles[start // TILE_LEAVES : whole]
        if end % TILE_LEAVES:
            parts = [*parts, merkle.mth(self.leaves(whole * TILE_LEAVES, end))]
        return merkle.mth(parts)
