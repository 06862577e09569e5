"""Proofs an auditor can check without the ledger: inclusion of one record, consistency of two checkpoints.

A proof is a small JSON document (``FORMAT``) holding what RFC 9162 verification needs, and the signed
checkpoint(s) whose root it leads to:

    {"format": "phi-gateway-proof/v1", "kind": "inclusion", "record": 42, "tree_size": 1000,
     "entry": "<the record's stored JSON text>", "path": ["<base64 hash>", ...], "checkpoint": "<note>"}
    {"format": "phi-gateway-proof/v1", "kind": "consistency", "old_size": 500, "new_size": 1000,
     "path": [...], "old_checkpoint": "<note>" | null, "new_checkpoint": "<note>"}

``verify_proof`` checks it with the appliance's verifier key and, ideally, a checkpoint the auditor kept
off the appliance (then the proof's own checkpoint is not needed, or must agree with it). An exported
audit line is the entry with ``,"seq":N`` added before its closing brace (``entry_of_line``).

Owns: building proofs from the ledger's stored tiles (``tiles.SubtreeReader``; the records of an archived
tile from the archive bundle that holds them), and checking them.
Never: trusts a proof's checkpoint without its signature, or a size that no signed checkpoint states.
"""

from __future__ import annotations

import base64
import json
import re
import sqlite3
from collections.abc import Sequence
from dataclasses import dataclass
from typing import Any, Final

from appliance.errors import CheckpointError, OperatorError, ProofError, ProofRejected
from appliance.ledger import merkle, signed_note
from appliance.ledger.tiles import ArchivedTiles, SubtreeReader, entry_leaf

FORMAT: Final = "phi-gateway-proof/v1"
_SEQ_SUFFIX: Final = re.compile(r',"seq":([1-9][0-9]*)\}\n?$')


def entry_of_line(line: str) -> tuple[int, str]:
    """(seq, stored entry text) of an exported audit line: the line without its trailing seq member."""
    match = _SEQ_SUFFIX.search(line)
    if match is None:
        raise ProofRejected('not an exported audit line (it must end with ,"seq":N})')
    return int(match.group(1)), line[: match.start()] + "}"


def _b64(hashes: Sequence[bytes]) -> list[str]:
    return [base64.b64encode(h).decode() for h in hashes]


def _unb64(values: Any, what: str) -> list[bytes]:
    if not isinstance(values, list) or not all(isinstance(v, str) for v in values):
        raise ProofRejected(f"{what} must be a list of base64 hashes")
    try:
        return [base64.b64decode(v, validate=True) for v in values]
    except ValueError:
        raise ProofRejected(f"{what} holds a value that is not base64") from None


def stored_checkpoint_at(conn: sqlite3.Connection, size: int) -> str | None:
    """The newest stored checkpoint (history or head) of exactly ``size`` records, if any."""
    row = conn.execute(
        "SELECT note FROM ledger_checkpoint WHERE size = ? ORDER BY id DESC LIMIT 1", (size,)
    ).fetchone()
    if row is None:
        row = conn.execute("SELECT note FROM ledger_head WHERE id = 1 AND size = ?", (size,)).fetchone()
    return None if row is None else str(row[0])


def stored_sizes_around(conn: sqlite3.Connection, size: int) -> tuple[int | None, int | None]:
    """The sizes of the stored checkpoints (history or head) nearest below and above ``size``."""
    below = conn.execute(
        "SELECT MAX(size) FROM (SELECT size FROM ledger_checkpoint UNION ALL SELECT size FROM ledger_head)"
        " WHERE size < ?",
        (size,),
    ).fetchone()[0]
    above = conn.execute(
        "SELECT MIN(size) FROM (SELECT size FROM ledger_checkpoint UNION ALL SELECT size FROM ledger_head)"
        " WHERE size > ?",
        (size,),
    ).fetchone()[0]
    return below, above


def inclusion_proof(
    conn: sqlite3.Connection,
    record: int,
    size: int,
    note: str | None,
    archived: ArchivedTiles | None = None,
) -> dict[str, Any]:
    """The proof that record ``record`` is in the tree of the first ``size`` records (one read snapshot).

    ``archived``: records of archived tiles, when the proof needs some (see ``tiles``)."""
    if not 1 <= record <= size:
        raise OperatorError(f"record {record} is not in a tree of {size} records")
    reader = SubtreeReader(conn, size, archived)
    entry = reader.entry(record)
    path = merkle.inclusion_path(record - 1, size, reader.subtree)
    return {
        "format": FORMAT,
        "kind": "inclusion",
        "record": record,
        "tree_size": size,
        "entry": entry,
        "path": _b64(path),
        "checkpoint": note,
    }


def consistency_proof(
    conn: sqlite3.Connection,
    old_size: int,
    new_size: int,
    old_note: str | None,
    new_note: str | None,
    archived: ArchivedTiles | None = None,
) -> dict[str, Any]:
    """The proof that the tree of ``new_size`` records extends the one of ``old_size`` (one read snapshot);
    an ``old_size`` inside an archived tile needs that tile's records (``archived``)."""
    if not 0 < old_size <= new_size:
        raise OperatorError(
            f"a consistency proof needs 0 < old size <= new size (got {old_size}, {new_size})"
        )
    reader = SubtreeReader(conn, new_size, archived)
    return {
        "format": FORMAT,
        "kind": "consistency",
        "old_size": old_size,
        "new_size": new_size,
        "path": _b64(merkle.consistency_path(old_size, new_size, reader.subtree)),
        "old_checkpoint": old_note,
        "new_checkpoint": new_note,
    }


@dataclass(frozen=True)
class ProofResult:
    kind: str
    message: str


def _checkpoint(
    label: str, embedded: Any, kept: Sequence[str], size: int, verifiers: Sequence[signed_note.Verifier]
) -> signed_note.Checkpoint:
    """The signed checkpoint of ``size`` the proof leads to: the auditor's kept one when given (every one
    of that size, which must all agree with each other and with the proof's own)."""
    candidates: list[tuple[str, str]] = []
    named = f"{label} checkpoint" if label else "checkpoint"
    candidates += [(f"your kept {named}", text) for text in kept]
    if isinstance(embedded, str):
        candidates.append((f"the proof's {named}", embedded))
    if not candidates:
        raise ProofRejected(
            f"the proof carries no {named} of size {size}: pass the one you kept (--checkpoint)"
        )
    opened: list[signed_note.Checkpoint] = []
    for what, text in candidates:
        try:
            cp = signed_note.open_note(text, verifiers)
        except CheckpointError as exc:
            raise ProofRejected(f"{what}: {exc}") from None
        if cp.size != size:
            raise ProofRejected(
                f"{what} is of {cp.size} records but the proof is for {size}: "
                f"ask for a proof at size {cp.size} (audit prove ... --size {cp.size})"
            )
        opened.append(cp)
    if any((cp.root, cp.origin) != (opened[0].root, opened[0].origin) for cp in opened[1:]):
        raise ProofRejected(
            f"the {named}s given (the proof's and yours) are all signed for {size} records but have "
            "different roots: the appliance signed two different histories (keep both as evidence)"
        )
    return opened[0]


_SIZES = {"inclusion": ("tree_size",), "consistency": ("old_size", "new_size")}
"""The tree sizes each kind of proof is about: the only ones a kept checkpoint may be matched against."""


def verify_proof(
    doc: Any, verifiers: Sequence[signed_note.Verifier], kept: Sequence[str] = ()
) -> ProofResult:
    """Check a proof document; ``kept``: checkpoint notes the auditor kept (used where their size fits)."""
    if not isinstance(doc, dict) or doc.get("format") != FORMAT:
        raise ProofRejected(f"not a proof ({FORMAT} expected)")
    kept_by_size: dict[int, list[str]] = {}
    for text in kept:
        try:
            kept_by_size.setdefault(signed_note.parse_unverified(text).size, []).append(text)
        except CheckpointError as exc:
            raise ProofRejected(f"your kept checkpoint: {exc}") from None
    kind = doc.get("kind")
    if not isinstance(kind, str) or kind not in _SIZES:
        raise ProofRejected(f"unknown proof kind {str(kind)[:40]!r} (inclusion or consistency)")
    stray = [name for names in _SIZES.values() for name in names if name in doc and name not in _SIZES[kind]]
    if stray:  # a size of the other kind would make a kept checkpoint look used without being opened
        raise ProofRejected(
            f"{'an' if kind == 'inclusion' else 'a'} {kind} proof has no {stray[0]}: this document is not "
            "one the appliance wrote"
        )
    path = _unb64(doc.get("path"), "path")
    sizes = {doc[name] for name in _SIZES[kind] if isinstance(doc.get(name), int)}
    unused = sorted(size for size in kept_by_size if size not in sizes)
    if unused:  # a kept checkpoint the proof does not lead to would be silently ignored: refuse instead
        raise ProofRejected(
            f"your kept checkpoint is of {unused[0]} records but this proof is about {sorted(sizes)}: "
            f"ask for a proof at that size (audit prove ... --size {unused[0]})"
        )
    try:
        if kind == "inclusion":
            return _verify_inclusion(doc, path, verifiers, kept_by_size)
        return _verify_consistency(doc, path, verifiers, kept_by_size)
    except ProofError as exc:
        raise ProofRejected(f"the proof does not hold: {exc}") from None


def _int(doc: dict[str, Any], name: str) -> int:
    value = doc.get(name)
    if not isinstance(value, int) or isinstance(value, bool) or value < 0:
        raise ProofRejected(f"{name} must be a non-negative integer")
    return value


def _verify_inclusion(
    doc: dict[str, Any],
    path: list[bytes],
    verifiers: Sequence[signed_note.Verifier],
    kept: dict[int, list[str]],
) -> ProofResult:
    record, size = _int(doc, "record"), _int(doc, "tree_size")
    entry = doc.get("entry")
    if not isinstance(entry, str):
        raise ProofRejected("entry must be the record's JSON text")
    cp = _checkpoint("", doc.get("checkpoint"), kept.get(size, []), size, verifiers)
    if record < 1:
        raise ProofRejected("record must be 1 or more")
    merkle.verify_inclusion(record - 1, size, entry_leaf(entry), path, cp.root)
    return ProofResult(
        "inclusion",
        f"record {record} is in {cp.origin}'s ledger of {size} records signed at {cp.timestamp}: {entry}",
    )


def _verify_consistency(
    doc: dict[str, Any],
    path: list[bytes],
    verifiers: Sequence[signed_note.Verifier],
    kept: dict[int, list[str]],
) -> ProofResult:
    old_size, new_size = _int(doc, "old_size"), _int(doc, "new_size")
    old = _checkpoint("old", doc.get("old_checkpoint"), kept.get(old_size, []), old_size, verifiers)
    new = _checkpoint("new", doc.get("new_checkpoint"), kept.get(new_size, []), new_size, verifiers)
    if old.origin != new.origin:
        raise ProofRejected(f"the two checkpoints are of different ledgers ({old.origin}, {new.origin})")
    merkle.verify_consistency(old_size, new_size, old.root, new.root, path)
    return ProofResult(
        "consistency",
        f"{new.origin}: the ledger of {new_size} records ({new.timestamp}) extends the one of {old_size} "
        f"records ({old.timestamp}) without changing any of them",
    )


def dumps(doc: dict[str, Any]) -> str:
    return json.dumps(doc, indent=2, ensure_ascii=False) + "\n"
