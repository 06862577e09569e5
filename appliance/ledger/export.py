"""Audit exports: JSON lines for SIEMs, and the export bundle an auditor checks without the ledger.

Every export uses the stdout audit line: a record's stored JSON text with ``,"seq":N`` added before its
closing brace (``audit_line``; ``line_seq`` reads the seq back), one per line, in seq order.

- ``export_range`` / ``first_seq_since``: records first..last as lines, streamed (``audit export --since``).
- ``write_bundle``: an export bundle, three files an auditor checks without the ledger::

      FILE              the lines of records s..N
      FILE.checkpoint   a checkpoint of the N records, signed for this export (reason "export") or an
                        archive (reason "archive")
      FILE.prefix.json  {"format": "phi-gateway-export/v1", "origin", "first_seq": s, "last_seq": N,
                         "verifier_key", "prefix": [the compact range of records 1..s-1: base64 roots of
                         its perfect aligned subtrees, largest first], "chunk_leaves": 16,
                         "chunks": [base64 roots of the aligned 16-record subtrees wholly inside s..N]}

  The auditor rebuilds the tree of N records from the prefix and the lines and compares its root with the
  signed one (``export_verify``). Signing the checkpoint and writing the bundle of it is
  ``operations.write_export``; continuous export (``[audit] export_file``, ``audit export --follow``) is
  ``follow``.

Owns: the audit line and the export bundle format (``FORMAT``, ``sidecar_paths``, ``Chunking``), writing
lines and bundles from a read connection. Never: writes to the ledger, signs, or knows of ``Ledger`` (the
checkpoint comes in as a note); leaves a bundle in place whose records do not give its signed root (each
file is written beside its name and renamed into place only after the check).
"""

from __future__ import annotations

import base64
import contextlib
import json
import os
import re
import sqlite3
from collections.abc import Iterator
from dataclasses import dataclass
from datetime import UTC, datetime, timedelta
from pathlib import Path
from typing import IO, Any, Final, TextIO

from appliance.errors import OperatorError, ProofRejected
from appliance.ledger import merkle, signed_note
from appliance.ledger.proofs import entry_of_line
from appliance.ledger.tiles import SubtreeReader, entry_leaf

FORMAT: Final = "phi-gateway-export/v1"
CHUNK_LEAVES: Final = 16
"""Records per chunk hash in an export's sidecar: about 3 bytes a record, and names 16 records at most."""
MAX_LINE_BYTES: Final = 64 * 1024
"""An audit line is under 4 KiB (``store.MAX_RECORD_CHARS``); anything this long is not one."""

_SELECT_RANGE: Final = "SELECT seq, record FROM ledger WHERE seq >= ? AND seq <= ? ORDER BY seq"
_SINCE: Final = re.compile(
    r"([0-9]{4}-[0-9]{2}-[0-9]{2})"  # date
    r"(?:[Tt]([0-9]{2}:[0-9]{2}:[0-9]{2})(?:\.([0-9]{1,9}))?([Zz]|[+-][0-9]{2}:[0-9]{2}))?"  # time, zone
)
_DIR_FSYNC: Final = os.name == "posix"  # Windows cannot open a directory to fsync it


def audit_line(seq: int, record: str) -> str:
    """The audit line of record ``seq`` (as stdout prints it), newline included."""
    return f'{record[:-1]},"seq":{seq}}}\n'


def line_seq(raw: bytes) -> int | None:
    """The seq of an audit line (bytes, as read from a file), or None when it is not one."""
    try:
        return entry_of_line(raw.decode("utf-8"))[0]
    except (UnicodeDecodeError, ProofRejected):
        return None


def sidecar_paths(path: Path) -> tuple[Path, Path]:
    """(``FILE.checkpoint``, ``FILE.prefix.json``) of the export bundle ``FILE``."""
    return path.with_name(path.name + ".checkpoint"), path.with_name(path.name + ".prefix.json")


# -- plain exports ----------------------------------------------------------------------------------------


def _records(conn: sqlite3.Connection, first: int, last: int) -> Iterator[tuple[int, str]]:
    """(seq, record text) of records first..last, streamed; a missing record is an error, never skipped."""
    expected = first
    for seq, text in conn.execute(_SELECT_RANGE, (first, last)):
        if seq != expected:
            raise OperatorError(f"records {expected}..{seq - 1} are not in the ledger: run audit verify")
        yield seq, text
        expected += 1
    if expected <= last:
        raise OperatorError(f"records {expected}..{last} are not in the ledger (it ends at {expected - 1})")


def export_range(conn: sqlite3.Connection, first_seq: int, last_seq: int, out: TextIO) -> int:
    """Write the audit lines of records first_seq..last_seq to ``out`` in seq order; the number written.

    Streams (one statement, so one read snapshot): memory does not grow with the range.
    """
    if first_seq < 1 or last_seq < first_seq - 1:
        raise OperatorError(f"no such range of records: {first_seq}..{last_seq}")
    count = 0
    try:
        for seq, text in _records(conn, first_seq, last_seq):
            out.write(audit_line(seq, text))
            count += 1
    except sqlite3.Error as exc:
        raise OperatorError(f"cannot read the audit ledger: {exc}") from exc
    return count


def since_timestamp(since: str) -> str:
    """``since`` (RFC 3339: a date, or a time with ``Z`` or an offset) as the ledger's ``ts`` text in UTC.

    Fractions beyond milliseconds round up, so that ``ts >= result`` means "at or after ``since``".
    """
    match = _SINCE.fullmatch(since.strip())
    if match is None:
        raise OperatorError(
            f"--since {since!r} is not an RFC 3339 UTC time: give 2026-11-25, 2026-11-25T10:00:00Z or"
            " 2026-11-25T10:00:00.123Z"
        )
    date, clock, fraction, zone = match.groups()
    offset = "+00:00" if zone is None or zone in "Zz" else zone
    try:
        when = datetime.fromisoformat(f"{date}T{clock or '00:00:00'}{offset}")
    except ValueError as exc:
        raise OperatorError(f"--since {since!r} is not a real date and time: {exc}") from None
    if fraction:
        whole, rest = divmod(int(fraction.ljust(3, "0")), 10 ** max(0, len(fraction) - 3))
        when += timedelta(milliseconds=whole + (1 if rest else 0))
    when = when.astimezone(UTC)
    return f"{when:%Y-%m-%dT%H:%M:%S}.{when.microsecond // 1000:03d}Z"


def first_seq_since(conn: sqlite3.Connection, since: str) -> int | None:
    """The first seq whose ``ts`` is at or after ``since`` (see ``since_timestamp``); None if none is."""
    ts = since_timestamp(since)
    try:
        row = conn.execute("SELECT seq FROM ledger WHERE ts >= ? ORDER BY seq LIMIT 1", (ts,)).fetchone()
    except sqlite3.Error as exc:
        raise OperatorError(f"cannot read the audit ledger: {exc}") from exc
    return None if row is None else int(row[0])


# -- the tree arithmetic of a bundle (``Chunking`` is export_verify's too) --------------------------------


def _compact_ranges(size: int) -> Iterator[tuple[int, int]]:
    """The perfect aligned subtrees decomposing [0, size), largest first (one per set bit of ``size``)."""
    start = 0
    for bit in reversed(range(size.bit_length())):
        if size >> bit & 1:
            yield start, start + (1 << bit)
            start += 1 << bit


@dataclass(frozen=True)
class Chunking:
    """Where the aligned chunks of ``leaves`` records lie in an export of leaf indices [start, end)."""

    leaves: int
    start: int
    end: int

    @property
    def first(self) -> int:
        """Leaf index where the first whole chunk begins (``end`` when there is none)."""
        first = -(-self.start // self.leaves) * self.leaves
        return first if first <= self.last else self.end

    @property
    def last(self) -> int:
        """Leaf index where the whole chunks end."""
        return self.end // self.leaves * self.leaves

    @property
    def count(self) -> int:
        return max(0, (self.last - self.first) // self.leaves)


def _b64(value: bytes) -> str:
    return base64.b64encode(value).decode("ascii")


# -- writing an export bundle -----------------------------------------------------------------------------


@dataclass(frozen=True)
class ExportSummary:
    path: Path
    checkpoint_path: Path
    prefix_path: Path
    origin: str
    first_seq: int
    last_seq: int
    lines: int
    root: bytes


def _temp(path: Path) -> Path:
    return path.with_name(f".{path.name}.{os.getpid()}.tmp")


def fsync_dir(path: Path) -> None:
    if _DIR_FSYNC:
        fd = os.open(path, os.O_RDONLY)
        try:
            os.fsync(fd)
        finally:
            os.close(fd)


def _durable(handle: IO[Any]) -> None:
    handle.flush()
    os.fsync(handle.fileno())


def write_bundle(
    conn: sqlite3.Connection,
    out_path: Path,
    first_seq: int,
    note: str,
    verifier: signed_note.Verifier,
    *,
    chunk_leaves: int = CHUNK_LEAVES,
) -> ExportSummary:
    """Write the bundle of records first_seq..N, N being the size ``note`` signs (an archive's, say).

    Each file is written beside its name and renamed into place; the bundle is checked before it is:
    if the records do not give the signed root, nothing is written and the operator is told.
    """
    if chunk_leaves < 1 or chunk_leaves & (chunk_leaves - 1):
        raise ValueError(f"chunk_leaves must be a power of two, got {chunk_leaves}")
    signed = signed_note.open_note(note, [verifier])
    size = signed.size
    if not 1 <= first_seq <= size:
        raise OperatorError(f"nothing to export from record {first_seq}: the ledger holds {size} records")
    checkpoint_path, prefix_path = sidecar_paths(out_path)
    final = (out_path, checkpoint_path, prefix_path)
    temps = tuple(_temp(p) for p in final)
    chunking = Chunking(chunk_leaves, first_seq - 1, size)
    lines = 0
    try:
        own_snapshot = not conn.in_transaction
        if own_snapshot:
            conn.execute("BEGIN")
        try:
            reader = SubtreeReader(conn, size)
            prefix = [reader.subtree(start, end) for start, end in _compact_ranges(first_seq - 1)]
            frontier = merkle.Frontier(first_seq - 1, prefix)
            header = {
                "format": FORMAT,
                "origin": signed.origin,
                "first_seq": first_seq,
                "last_seq": size,
                "verifier_key": verifier.encode(),
                "prefix": [_b64(h) for h in prefix],
                "chunk_leaves": chunk_leaves,
            }
            with (
                open(temps[0], "w", encoding="utf-8", newline="\n") as out,
                open(temps[2], "w", encoding="utf-8", newline="\n") as side,
            ):
                # The chunks are streamed into the sidecar: memory stays flat for any range.
                side.write(json.dumps(header)[:-1] + ', "chunks": [')
                chunk: list[bytes] = []
                for seq, text in _records(conn, first_seq, size):
                    out.write(audit_line(seq, text))
                    leaf = entry_leaf(text)
                    frontier.append(leaf)
                    if chunking.first < seq <= chunking.last:
                        chunk.append(leaf)
                        if len(chunk) == chunk_leaves:
                            side.write(("" if seq - chunk_leaves == chunking.first else ", ") + '"')
                            side.write(_b64(merkle.mth(chunk)) + '"')
                            chunk.clear()
                    lines += 1
                side.write("]}\n")
                _durable(out)
                _durable(side)
        finally:
            if own_snapshot:
                conn.execute("COMMIT")
        if frontier.root() != signed.root:
            raise OperatorError(
                f"the ledger's records 1..{size} do not give the root that was signed: run audit verify"
            )
        with open(temps[1], "w", encoding="utf-8", newline="\n") as cp_out:
            cp_out.write(note)
            _durable(cp_out)
        # The lines last: a bundle whose lines are in place has the sidecars that belong to them.
        for temp, path in zip(temps[1:] + temps[:1], final[1:] + final[:1], strict=True):
            os.replace(temp, path)
        fsync_dir(out_path.parent)
    except sqlite3.Error as exc:
        raise OperatorError(f"cannot read the audit ledger: {exc}") from exc
    except OSError as exc:
        raise OperatorError(f"cannot write the export {out_path}: {exc}") from exc
    finally:
        for temp in temps:
            with contextlib.suppress(OSError):
                temp.unlink()
    return ExportSummary(
        out_path, checkpoint_path, prefix_path, signed.origin, first_seq, size, lines, signed.root
    )
