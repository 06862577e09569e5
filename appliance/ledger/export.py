"""Audit exports: JSON lines for SIEMs, export bundles an auditor checks offline, and a follower for shippers.

Every export uses the stdout audit line: a record's stored JSON text with ``,"seq":N`` added before its
closing brace (``audit_line``), one per line, in seq order.

- ``export_range`` / ``first_seq_since``: records first..last as lines, streamed (``audit export --since``).
- ``write_export`` / ``verify_exports``: an export bundle, three files an auditor checks without the ledger::

      FILE              the lines of records s..N
      FILE.checkpoint   a checkpoint of the N records, signed for this export (reason "export")
      FILE.prefix.json  {"format": "phi-gateway-export/v1", "origin", "first_seq": s, "last_seq": N,
                         "verifier_key", "prefix": [the compact range of records 1..s-1: base64 roots of
                         its perfect aligned subtrees, largest first], "chunk_leaves": 16,
                         "chunks": [base64 roots of the aligned 16-record subtrees wholly inside s..N]}

  The auditor rebuilds the tree of N records from the prefix and the lines and compares its root with the
  signed one. Nothing in the sidecar is trusted: the prefix counts only because, with the lines, it gives
  the signed root; the chunks are used only to say where the records differ when the root does not match
  (they are believed only if, with the prefix and the edge records, they give the signed root). Exports of
  several nodes (each its own ledger and key) are checked together, and exports of one origin must agree
  wherever they cover the same records.
- Continuous export (``[audit] export_file``, ``audit export --follow``) is ``audit_follow``.

Owns: the export bundle format and its verification, the follower's output and ``<out>.state`` files.
Never: writes to the ledger (an export's checkpoint is signed through ``Ledger.checkpoint``); accepts an
export whose root no trusted key signed for its origin; skips or repeats a record in a followed file (a
torn last line is cut back to the newline before it, and the resume point is the later of the file's
last line and the state file); lets an error out of the follower's thread (it is logged and retried).
"""

from __future__ import annotations

import base64
import binascii
import contextlib
import json
import logging
import os
import re
import sqlite3
from collections.abc import Iterator, Sequence
from dataclasses import dataclass, field
from datetime import UTC, datetime, timedelta
from pathlib import Path
from typing import IO, Any, Final, TextIO

from appliance.errors import CheckpointError, OperatorError, ProofRejected
from appliance.ledger import merkle, signed_note
from appliance.ledger.proofs import entry_of_line
from appliance.ledger.store import Ledger
from appliance.ledger.tiles import SubtreeReader, entry_leaf

log = logging.getLogger("phi.audit_export")

FORMAT: Final = "phi-gateway-export/v1"
CHUNK_LEAVES: Final = 16
"""Records per chunk hash in an export's sidecar: about 3 bytes a record, and names 16 records at most."""
MAX_LINE_BYTES: Final = 64 * 1024
"""An audit line is under 4 KiB (``ledger.MAX_RECORD_CHARS``); anything this long is not one."""

_SELECT_RANGE: Final = "SELECT seq, record FROM ledger WHERE seq >= ? AND seq <= ? ORDER BY seq"
_SINCE: Final = re.compile(
    r"([0-9]{4}-[0-9]{2}-[0-9]{2})"  # date
    r"(?:[Tt]([0-9]{2}:[0-9]{2}:[0-9]{2})(?:\.([0-9]{1,9}))?([Zz]|[+-][0-9]{2}:[0-9]{2}))?"  # time, zone
)
_DIR_FSYNC: Final = os.name == "posix"  # Windows cannot open a directory to fsync it


def audit_line(seq: int, record: str) -> str:
    """The audit line of record ``seq`` (as stdout prints it), newline included."""
    return f'{record[:-1]},"seq":{seq}}}\n'


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


# -- the tree arithmetic both sides of a bundle share ------------------------------------------------------


def _compact_ranges(size: int) -> Iterator[tuple[int, int]]:
    """The perfect aligned subtrees decomposing [0, size), largest first (one per set bit of ``size``)."""
    start = 0
    for bit in reversed(range(size.bit_length())):
        if size >> bit & 1:
            yield start, start + (1 << bit)
            start += 1 << bit


def _append_subtree(frontier: merkle.Frontier, root: bytes, leaves: int) -> None:
    """Add a perfect subtree of ``leaves`` (a power of two) leaves at an aligned position, by its root."""
    level = leaves.bit_length() - 1
    if frontier.size % leaves:
        raise ValueError(f"a subtree of {leaves} leaves cannot start at leaf {frontier.size}")
    size = frontier.size >> level
    frontier.size += leaves
    while size & 1:
        root = merkle.node_hash(frontier.hashes.pop(), root)
        size >>= 1
    frontier.hashes.append(root)


@dataclass(frozen=True)
class _Chunking:
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


def write_export(
    ledger: Ledger,
    conn: sqlite3.Connection,
    out_path: Path,
    first_seq: int,
    *,
    chunk_leaves: int = CHUNK_LEAVES,
) -> ExportSummary:
    """Write the export bundle of records first_seq..N, N being the size of a checkpoint signed now.

    ``conn``: a read connection to the ledger's vault (``vault.db.reader()``), used in one read snapshot.
    """
    note = ledger.checkpoint("export")
    return write_bundle(conn, out_path, first_seq, note, ledger.verifier(), chunk_leaves=chunk_leaves)


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
    chunking = _Chunking(chunk_leaves, first_seq - 1, size)
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


# -- verifying export bundles -----------------------------------------------------------------------------


@dataclass
class ExportReport:
    """What ``verify_exports`` found for one export; ``problems`` is empty when it holds."""

    path: Path
    origin: str | None = None
    first_seq: int | None = None
    last_seq: int | None = None
    lines: int = 0
    problems: list[str] = field(default_factory=list)

    @property
    def ok(self) -> bool:
        return not self.problems

    def describe(self) -> str:
        origin = self.origin or "unknown origin"
        span = "" if self.first_seq is None else f" records {self.first_seq}..{self.last_seq}"
        verdict = "ok" if self.ok else "FAILED: " + "; ".join(self.problems)
        return f"{self.path}: {origin}{span}: {verdict}"


@dataclass
class _Bundle:
    report: ExportReport
    checkpoint: signed_note.Checkpoint
    prefix: list[bytes]
    chunking: _Chunking | None
    chunks: list[bytes]
    wanted: set[int] = field(default_factory=set)
    """Tree sizes at which to keep this export's frontier, to compare with other exports of its origin."""
    frontiers: dict[int, list[bytes]] = field(default_factory=dict)


def _hashes(value: Any, what: str) -> list[bytes]:
    if not isinstance(value, list) or not all(isinstance(v, str) for v in value):
        raise ValueError(f"{what} is not a list of base64 hashes")
    try:
        hashes = [base64.b64decode(v, validate=True) for v in value]
    except binascii.Error:
        raise ValueError(f"{what} holds a value that is not base64") from None
    if any(len(h) != merkle.HASH_SIZE for h in hashes):
        raise ValueError(f"{what} holds a value that is not a {merkle.HASH_SIZE}-byte hash")
    return hashes


def _open_bundle(path: Path, verifiers: Sequence[signed_note.Verifier]) -> _Bundle | ExportReport:
    """The export's checkpoint (signature checked) and sidecar (shape checked), or its failed report."""
    report = ExportReport(path)
    checkpoint_path, prefix_path = sidecar_paths(path)
    try:
        text = prefix_path.read_text(encoding="utf-8")
        note = checkpoint_path.read_text(encoding="utf-8")
    except OSError as exc:
        report.problems.append(
            f"cannot read the bundle ({path.name} with .checkpoint and .prefix.json): {exc}"
        )
        return report
    except UnicodeDecodeError as exc:
        report.problems.append(f"{prefix_path.name} or {checkpoint_path.name} is not UTF-8 text: {exc}")
        return report
    try:
        sidecar = json.loads(text)
    except ValueError as exc:
        report.problems.append(f"{prefix_path.name} is not JSON: {exc}")
        return report
    if not isinstance(sidecar, dict) or sidecar.get("format") != FORMAT:
        report.problems.append(f"{prefix_path.name} is not a {FORMAT} sidecar")
        return report
    origin, first, last = sidecar.get("origin"), sidecar.get("first_seq"), sidecar.get("last_seq")
    report.origin = origin if isinstance(origin, str) else None
    if isinstance(first, int) and isinstance(last, int):
        report.first_seq, report.last_seq = first, last
    try:
        checkpoint = signed_note.open_note(note, verifiers)
    except CheckpointError as exc:
        problem = f"{checkpoint_path.name}: {exc}"
        if str(exc).startswith("signed by an unknown key") and isinstance(sidecar.get("verifier_key"), str):
            problem += f" (the export names {sidecar['verifier_key']}: pass it with --key if you trust it)"
        report.problems.append(problem)
        return report
    if checkpoint.origin != origin:
        report.problems.append(f"the checkpoint is of {checkpoint.origin} but the export names {origin!r}")
    report.origin = checkpoint.origin
    if type(first) is not int or type(last) is not int or not 1 <= first <= last:
        report.problems.append(f"{prefix_path.name}: first_seq and last_seq are not a range of records")
        return report
    if last != checkpoint.size:
        report.problems.append(
            f"the checkpoint covers {checkpoint.size} records but the export says it ends at {last}"
        )
        return report
    try:
        prefix = _hashes(sidecar.get("prefix"), "prefix")
        merkle.Frontier(first - 1, prefix)
    except ValueError as exc:
        report.problems.append(f"{prefix_path.name}: {exc}")
        return report
    chunking: _Chunking | None = None
    chunks: list[bytes] = []
    leaves = sidecar.get("chunk_leaves")
    if type(leaves) is int and leaves > 0 and not leaves & (leaves - 1):
        with contextlib.suppress(ValueError):  # the chunks only locate a difference: without them, no detail
            chunks = _hashes(sidecar.get("chunks"), "chunks")
            candidate = _Chunking(leaves, first - 1, last)
            chunking = candidate if len(chunks) == candidate.count else None
    return _Bundle(report, checkpoint, prefix, chunking, chunks)


def _read_lines(path: Path) -> Iterator[tuple[int, bytes]]:
    with open(path, "rb") as handle:
        number = 0
        while raw := handle.readline(MAX_LINE_BYTES + 1):
            number += 1
            yield number, raw


def line_seq(raw: bytes) -> int | None:
    try:
        return entry_of_line(raw.decode("utf-8"))[0]
    except (UnicodeDecodeError, ProofRejected):
        return None


def _order_problem(path: Path, number: int, seq: int, expected: int, first: int) -> str:
    if seq < expected:
        return f"line {number} (seq {seq}): out of order: it comes after seq {expected - 1} (lines reordered)"
    later = next((n for n, raw in _read_lines(path) if n > number and line_seq(raw) == expected), None)
    if later is not None:
        return f"line {number} (seq {seq}): out of order: seq {expected} comes later, at line {later}"
    missing = f"seq {expected}" if seq == expected + 1 else f"seqs {expected}..{seq - 1}"
    if expected == first:
        return f"{missing} missing at the start of the file (its first line is seq {seq})"
    return f"{missing} missing after {expected - 1}"


def _check_lines(bundle: _Bundle) -> None:
    """Stream the export: each line well formed, seqs contiguous, and the tree's root the signed one."""
    report, cp = bundle.report, bundle.checkpoint
    first, size, path = report.first_seq or 1, cp.size, report.path
    tree = merkle.Frontier(first - 1, bundle.prefix)
    if tree.size in bundle.wanted:
        bundle.frontiers[tree.size] = list(tree.hashes)
    chunking = bundle.chunking
    edges: list[list[bytes]] = [[], []]  # leaves before the first whole chunk, after the last
    chunk: list[bytes] = []
    bad_chunks: list[int] = []
    expected = first
    try:
        for number, raw in _read_lines(path):
            if len(raw) > MAX_LINE_BYTES:
                report.problems.append(
                    f"line {number}: longer than {MAX_LINE_BYTES} bytes, not an audit line"
                )
                return
            try:
                text = raw.decode("utf-8")
                seq, entry = entry_of_line(text)
            except UnicodeDecodeError:
                report.problems.append(f"line {number}: not UTF-8")
                return
            except ProofRejected as exc:
                report.problems.append(f"line {number}: {exc}")
                return
            if seq != expected:
                report.problems.append(_order_problem(path, number, seq, expected, first))
                return
            if seq > size:
                report.problems.append(
                    f"line {number} (seq {seq}): beyond the checkpoint, which covers records 1..{size}"
                )
                return
            try:
                parsed = json.loads(text)
            except ValueError as exc:
                report.problems.append(f"line {number} (seq {seq}): not valid JSON: {exc}")
                return
            if not isinstance(parsed, dict) or parsed.get("seq") != seq:
                report.problems.append(f"line {number} (seq {seq}): not an audit record")
                return
            leaf = entry_leaf(entry)
            tree.append(leaf)
            report.lines += 1
            if tree.size in bundle.wanted:
                bundle.frontiers[tree.size] = list(tree.hashes)
            if chunking is not None:
                if chunking.first < seq <= chunking.last:
                    chunk.append(leaf)
                    if len(chunk) == chunking.leaves:
                        index = (seq - chunking.leaves - chunking.first) // chunking.leaves
                        if merkle.mth(chunk) != bundle.chunks[index]:
                            bad_chunks.append(index)
                        chunk.clear()
                else:
                    edges[seq > chunking.last].append(leaf)
            expected += 1
    except OSError as exc:
        report.problems.append(f"cannot read {path}: {exc}")
        return
    if expected <= size:
        ends = (
            f"the file ends at {expected - 1}"
            if expected > first
            else f"the file holds none of {first}..{size}"
        )
        report.problems.append(f"truncated: the checkpoint covers {size} records, {ends}")
        return
    if tree.root() != cp.root:
        report.problems.append(_root_problem(bundle, edges, bad_chunks))


def _root_problem(bundle: _Bundle, edges: list[list[bytes]], bad_chunks: list[int]) -> str:
    """Say where the records differ from what the signed root vouches for, as closely as the chunks allow."""
    first, size = bundle.report.first_seq or 1, bundle.checkpoint.size
    mismatch = f"the root of records 1..{size} does not match the signed checkpoint"
    chunking = bundle.chunking
    if chunking is not None and bad_chunks:
        vouched = merkle.Frontier(first - 1, bundle.prefix)
        for leaf in edges[0]:
            vouched.append(leaf)
        for root in bundle.chunks:
            _append_subtree(vouched, root, chunking.leaves)
        for leaf in edges[1]:
            vouched.append(leaf)
        if vouched.root() == bundle.checkpoint.root:  # so the chunk hashes are the signed records'
            start = chunking.first + bad_chunks[0] * chunking.leaves + 1
            end = start + chunking.leaves - 1
            where = f"record {start} was" if start == end else f"records in {start}..{end} were"
            more = f" (and in {len(bad_chunks) - 1} more ranges)" if len(bad_chunks) > 1 else ""
            return f"{where} altered, deleted or reordered{more}: {mismatch}"
    if first > 1:
        return (
            f"{mismatch}: the prefix hashes of records 1..{first - 1} or records {first}..{size} of this file"
            " were altered, deleted or reordered"
        )
    return f"records 1..{size} of this file were altered, deleted or reordered: {mismatch}"


def _first_difference(a: _Bundle, b: _Bundle, start: int, end: int) -> int | None:
    """The first seq in start..end whose line differs between two exports (both already checked)."""

    def lines(bundle: _Bundle) -> Iterator[bytes]:
        offset = start - (bundle.report.first_seq or 1)
        for number, raw in _read_lines(bundle.report.path):
            if number > offset:
                yield raw.rstrip(b"\n")

    for seq, (x, y) in enumerate(zip(lines(a), lines(b), strict=False), start):
        if seq > end:
            break
        if x != y:
            return seq
    return None


def _cross_check(bundles: list[_Bundle]) -> None:
    """Exports of one origin that cover the same records must agree on them: compare their trees there."""
    checked = [b for b in bundles if b.report.ok]  # each pair judged on its own, before any verdict here
    for i, a in enumerate(checked):
        for b in checked[i + 1 :]:
            at = _overlap(a, b)
            if at is None or a.frontiers.get(at) == b.frontiers.get(at):
                continue
            start = max(a.report.first_seq or 1, b.report.first_seq or 1)
            differs = _first_difference(a, b, start, at) if start <= at else None
            where = f"record {differs} differs" if differs else f"their trees of records 1..{at} differ"
            for this, other in ((a, b), (b, a)):
                this.report.problems.append(
                    f"inconsistent with {other.report.path.name} (also {a.checkpoint.origin}): {where};"
                    " the same key signed two different histories (keep both as evidence)"
                )


def _overlap(a: _Bundle, b: _Bundle) -> int | None:
    """The tree size both exports can state (the smaller end), if it lies within both; else None."""
    if a.checkpoint.origin != b.checkpoint.origin or a.report.path.resolve() == b.report.path.resolve():
        return None
    at = min(a.checkpoint.size, b.checkpoint.size)
    if at < max(a.report.first_seq or 1, b.report.first_seq or 1) - 1:
        return None  # a gap between them: nothing to compare without the records in between
    return at


def verify_exports(paths: Sequence[Path], verifiers: Sequence[signed_note.Verifier]) -> list[ExportReport]:
    """Check export bundles, of one node or of several (each node's ledger has its own origin and key).

    ``verifiers``: the keys the auditor trusts (every node's); a checkpoint is accepted only when a key
    named for its origin signed it. One report per path, in order.
    """
    opened = [_open_bundle(Path(p), verifiers) for p in paths]
    bundles = [b for b in opened if isinstance(b, _Bundle)]
    for i, a in enumerate(bundles):
        for b in bundles[i + 1 :]:
            at = _overlap(a, b)
            if at is not None:
                a.wanted.add(at)
                b.wanted.add(at)
    for bundle in bundles:
        if bundle.report.ok:
            _check_lines(bundle)
    _cross_check(bundles)
    return [b.report if isinstance(b, _Bundle) else b for b in opened]
