"""Archive bundles an operator names (``--archive FILE``), read back one tile of records at a time.

A kept checkpoint or a proof over archived records needs at most the 256 records of one tile (the vault
keeps every tile hash for good: ``tiles``). ``ArchiveBundles`` is the ``tiles.ArchivedTiles`` the command
line hands down: asked for a tile, it finds the bundle among those given that holds all of the tile's
records and returns their stored texts (each audit line without its ``seq``); whoever asked checks them
against the tile the vault kept (``tiles.archived_leaves``). When no bundle given holds them, its message
names the file ``audit archive`` wrote them to (``archive.archive_files``) and the option that gives it.

Owns: ``ArchiveBundles`` and the wording of what it cannot find. Never: trusts what it reads (the vault's
tile decides), reads the vault, or writes; keeps more than one tile of records in memory per tile asked.
"""

from __future__ import annotations

from collections.abc import Sequence
from pathlib import Path

from appliance.errors import ArchivedRecordsUnavailable, ProofRejected
from appliance.ledger.archive import ArchiveFile
from appliance.ledger.export import MAX_LINE_BYTES
from appliance.ledger.proofs import entry_of_line
from appliance.ledger.tiles import TILE_LEAVES, ArchivedTile


class ArchiveBundles:
    """The records of archived tiles, from the bundle files given (``tiles.ArchivedTiles``)."""

    def __init__(self, paths: Sequence[Path], written: Sequence[ArchiveFile] = ()) -> None:
        """``paths``: the bundles' line files; ``written``: the archives the vault knows of (for messages)."""
        self.paths = list(paths)
        self._written = list(written)

    def __call__(self, idx: int) -> ArchivedTile:
        first, last = idx * TILE_LEAVES + 1, (idx + 1) * TILE_LEAVES
        for path in self.paths:
            texts = _tile_records(path, first, last)
            if texts is not None:
                return ArchivedTile(texts, path.name)
        raise ArchivedRecordsUnavailable(self._missing(first, last))

    def _missing(self, first: int, last: int) -> str:
        given = f" (none of {', '.join(p.name for p in self.paths)} holds them)" if self.paths else ""
        where = next((a for a in self._written if a.first <= first and last <= a.last), None)
        if where is None:
            return (
                f"records {first} to {last} are in no archive this vault knows of and not in the vault"
                f"{given}: run audit verify"
            )
        return (
            f"records {first} to {last} were archived to {where.file} (sha256 {where.sha256[:16]}…){given}: "
            "give that bundle with --archive FILE"
        )


def _tile_records(path: Path, first: int, last: int) -> list[str] | None:
    """The stored texts of records ``first`` to ``last`` if ``path`` holds every one of them, else None."""
    texts: list[str] = []
    try:
        with open(path, "rb") as handle:
            number = 0
            while raw := handle.readline(MAX_LINE_BYTES + 1):
                number += 1
                try:
                    seq, entry = entry_of_line(raw.decode("utf-8"))
                except (UnicodeDecodeError, ProofRejected):
                    raise ArchivedRecordsUnavailable(
                        f"{path.name} line {number} is not an audit line: not an archive bundle "
                        "(give the .jsonl file audit archive wrote)"
                    ) from None
                if seq > last or (seq > first and not texts):
                    break  # past the tile, or the file starts inside it
                if seq >= first:
                    texts.append(entry)
    except OSError as exc:
        raise ArchivedRecordsUnavailable(f"cannot read {path}: {exc.strerror or exc}") from None
    return texts if len(texts) == last - first + 1 else None
