"""Checking export bundles without the ledger: what ``audit verify EXPORT…`` runs on an auditor's machine.

A bundle (``export``: the lines of records s..N, ``FILE.checkpoint``, ``FILE.prefix.json``) holds when a
key the auditor trusts for its origin signed the checkpoint, the lines are audit lines of records s..N in
order, and the prefix's compact range of records 1..s-1 extended by their leaves gives the signed root.
Nothing in the sidecar is trusted: the prefix counts only because, with the lines, it gives the signed
root; the chunks are used only to say where the records differ when the root does not match (they are
believed only if, with the prefix and the edge records, they give the signed root). Exports of several
nodes (each its own ledger and key) are checked together, and exports of one origin must agree wherever
they cover the same records.

Checkpoints the auditor kept (``verify_bundles``'s ``kept``) are checked against the bundles too: each
must be signed by a trusted key, and some bundle of its origin that holds record N (or starts right after
it) must give, from its prefix and lines, the same root for the first N records. A kept checkpoint that no
bundle given can check is a failure with the reason, never passed over.

Owns: ``verify_bundles``, ``verify_exports``, ``ExportReport`` and ``KeptReport``, and the wording of what
they find. Never: reads the ledger or the vault (it runs where neither is); accepts an export whose root no
trusted key signed for its origin; stops at a problem without naming the line or records it concerns;
reports a kept checkpoint as checked when it was not.
"""

from __future__ import annotations

import base64
import binascii
import contextlib
import json
from collections.abc import Iterator, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from appliance.errors import CheckpointError, ProofRejected
from appliance.ledger import merkle, signed_note
from appliance.ledger.export import FORMAT, MAX_LINE_BYTES, Chunking, line_seq, sidecar_paths
from appliance.ledger.proofs import entry_of_line
from appliance.ledger.tiles import entry_leaf


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
class KeptReport:
    """What ``verify_bundles`` found for one checkpoint the auditor kept (``problem`` None: it holds)."""

    label: str
    checkpoint: signed_note.Checkpoint | None = None
    matched: list[Path] = field(default_factory=list)
    problem: str | None = None

    @property
    def ok(self) -> bool:
        return self.problem is None

    def describe(self) -> str:
        if self.problem is not None:
            return f"{self.label}: FAILED: {self.problem}"
        cp = self.checkpoint
        assert cp is not None
        names = ", ".join(path.name for path in self.matched)
        return f"{self.label} ({cp.size} records of {cp.origin}, {cp.timestamp}): matches {names}"


@dataclass
class _Bundle:
    report: ExportReport
    checkpoint: signed_note.Checkpoint
    prefix: list[bytes]
    chunking: Chunking | None
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
    chunking: Chunking | None = None
    chunks: list[bytes] = []
    leaves = sidecar.get("chunk_leaves")
    if type(leaves) is int and leaves > 0 and not leaves & (leaves - 1):
        with contextlib.suppress(ValueError):  # the chunks only locate a difference: without them, no detail
            chunks = _hashes(sidecar.get("chunks"), "chunks")
            candidate = Chunking(leaves, first - 1, last)
            chunking = candidate if len(chunks) == candidate.count else None
    return _Bundle(report, checkpoint, prefix, chunking, chunks)


def _read_lines(path: Path) -> Iterator[tuple[int, bytes]]:
    with open(path, "rb") as handle:
        number = 0
        while raw := handle.readline(MAX_LINE_BYTES + 1):
            number += 1
            yield number, raw


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
    return verify_bundles(paths, verifiers)[0]


def verify_bundles(
    paths: Sequence[Path], verifiers: Sequence[signed_note.Verifier], kept: Sequence[tuple[str, str]] = ()
) -> tuple[list[ExportReport], list[KeptReport]]:
    """``verify_exports``, and each of ``kept`` ((label, note text) of checkpoints the auditor kept)
    checked against the bundles: one report per path and one per kept checkpoint, in order."""
    opened = [_open_bundle(Path(p), verifiers) for p in paths]
    bundles = [b for b in opened if isinstance(b, _Bundle)]
    for i, a in enumerate(bundles):
        for b in bundles[i + 1 :]:
            at = _overlap(a, b)
            if at is not None:
                a.wanted.add(at)
                b.wanted.add(at)
    checks = [_open_kept(label, text, verifiers, bundles) for label, text in kept]
    for bundle in bundles:
        if bundle.report.ok:
            _check_lines(bundle)
    _cross_check(bundles)
    for report, covering in checks:
        if report.ok:
            _judge_kept(report, covering)
    return [b.report if isinstance(b, _Bundle) else b for b in opened], [report for report, _ in checks]


def _open_kept(
    label: str, text: str, verifiers: Sequence[signed_note.Verifier], bundles: list[_Bundle]
) -> tuple[KeptReport, list[_Bundle]]:
    """A kept checkpoint's signature, and the bundles of its origin that can state its tree (which are
    asked to keep their compact range at its size)."""
    report = KeptReport(label)
    try:
        cp = report.checkpoint = signed_note.open_note(text, verifiers)
    except CheckpointError as exc:
        report.problem = str(exc)
        return report, []
    same = [b for b in bundles if b.checkpoint.origin == cp.origin]
    if not same:
        report.problem = (
            f"no bundle given is of {cp.origin}, the ledger it signs: give an export or archive bundle of it"
        )
        return report, []
    covering = [b for b in same if (b.report.first_seq or 1) - 1 <= cp.size <= b.checkpoint.size]
    if not covering:
        held = ", ".join(f"{b.report.first_seq}..{b.checkpoint.size}" for b in same)
        report.problem = (
            f"it signs {cp.size} records and cannot be checked: the bundles of {cp.origin} given hold "
            f"records {held}; give the export or archive bundle that holds record {cp.size}"
        )
        return report, []
    for bundle in covering:
        bundle.wanted.add(cp.size)
    return report, covering


def _judge_kept(report: KeptReport, covering: list[_Bundle]) -> None:
    """Compare the kept root with the one each bundle that verified gives for the same records."""
    cp = report.checkpoint
    assert cp is not None
    checked = [b for b in covering if b.report.ok and cp.size in b.frontiers]
    if not checked:
        names = ", ".join(b.report.path.name for b in covering)
        report.problem = f"it signs {cp.size} records and cannot be checked: {names} failed verification"
        return
    for bundle in checked:
        if merkle.Frontier(cp.size, bundle.frontiers[cp.size]).root() != cp.root:
            report.problem = (
                f"does not match {bundle.report.path.name}: the records 1..{cp.size} that bundle vouches for "
                "give another root than the one you kept; the appliance signed two different histories "
                "(keep both as evidence)"
            )
            return
        report.matched.append(bundle.report.path)
