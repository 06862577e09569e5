"""What an operator's command does that takes several ledger modules: archive, and export to a file.

- ``run_archive`` (``audit archive``): verify the ledger, sign a checkpoint of exactly the archived
  records, write them as an export bundle (``export``), read it back and verify it (``export_verify``),
  and only then store the archive row and delete the records (``archive``), with an admin record of it,
  in one write.
- ``export_bundle`` / ``export_lines`` (``audit export``): find the first record (``--since``,
  ``--since-seq``, or the oldest the vault still holds), then write a bundle under a checkpoint signed now
  (``write_export``), or the plain lines.

The top of the package: nothing in ``appliance.ledger`` imports it. The command line only parses options,
calls one of these and prints what it returns.

Owns: the order of those steps. Never: deletes a record before its archive bundle is durable and has
verified from the disk; writes an export bundle whose checkpoint was not signed for it; knows of the
command line, HTTP or the gateway.
"""

from __future__ import annotations

import hashlib
import sqlite3
from dataclasses import dataclass
from pathlib import Path
from typing import TextIO

from appliance import timestamps
from appliance.errors import OperatorError
from appliance.ledger import archive
from appliance.ledger.export import (
    CHUNK_LEAVES,
    ExportSummary,
    export_range,
    first_seq_since,
    write_bundle,
)
from appliance.ledger.export_verify import verify_exports
from appliance.ledger.store import Ledger
from appliance.vault.db import Database

# -- archive ----------------------------------------------------------------------------------------------


def file_sha256(path: Path) -> str:
    digest = hashlib.sha256()
    with path.open("rb") as handle:
        for block in iter(lambda: handle.read(1 << 20), b""):
            digest.update(block)
    return digest.hexdigest()


@dataclass(frozen=True)
class ArchiveResult:
    path: Path
    first: int
    last: int
    deleted: int
    sha256: str


def run_archive(
    ledger: Ledger, db: Database, through: int, out_dir: Path, *, os_user: str | None = None
) -> ArchiveResult:
    """Archive records up to ``through`` into ``out_dir`` (see ``archive`` for what the vault keeps);
    ``os_user``: who asked, for the admin record."""
    verified = ledger.verify()  # the archive's root comes from stored tiles: only once they are checked
    if not verified.ok:
        raise OperatorError(f"the ledger does not verify, nothing was archived: {verified.message}")
    conn = db.reader()
    conn.execute("BEGIN")
    try:
        planned = archive.plan(conn, through)
    finally:
        conn.execute("COMMIT")
    note = ledger.sign_size(planned.last, planned.frontier.root(), "archive")
    verifier = ledger.verifier()
    out_dir.mkdir(parents=True, exist_ok=True)
    name = f"{verifier.name.replace('/', '_')}-{planned.first:012d}-{planned.last:012d}.jsonl"
    path = out_dir / name
    write_bundle(conn, path, planned.first, note, verifier)
    (report,) = verify_exports([path], [verifier])  # read back from the disk
    if not report.ok:
        raise OperatorError(f"the archive {path} does not verify; nothing was deleted: {report.describe()}")
    digest = file_sha256(path)

    def commit(conn: sqlite3.Connection) -> int:
        again = archive.archived_prefix(conn)
        if (0 if again is None else again.last_seq) != planned.first - 1:
            raise OperatorError("another archive ran meanwhile; nothing was deleted: run it again")
        deleted = archive.store(conn, planned, note, path, digest, timestamps.now())
        detail = f"audit_archive records {planned.first}-{planned.last} file={name} sha256:{digest[:16]}"
        ledger.record_in(conn, {"type": "admin", "detail": detail, "os_user": os_user})
        return deleted

    deleted: int = db.write(commit)
    return ArchiveResult(path, planned.first, planned.last, deleted, digest)


# -- export -----------------------------------------------------------------------------------------------


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


def _first_seq(conn: sqlite3.Connection, since: str | None, since_seq: int | None) -> int:
    """Where ``audit export`` starts: ``since`` wins, then ``since_seq``, then the oldest record held."""
    oldest = conn.execute("SELECT MIN(seq) FROM ledger").fetchone()[0] or 1  # after archives, not 1
    first: int = max(since_seq, oldest) if since_seq is not None else oldest
    if since_seq is not None and since_seq < 1:
        raise OperatorError("--since-seq counts from 1")
    if since is not None:
        found = first_seq_since(conn, since)
        if found is None:
            raise OperatorError(f"no records since {since}")
        first = found
    return first


def export_bundle(
    ledger: Ledger, db: Database, out_path: Path, *, since: str | None = None, since_seq: int | None = None
) -> ExportSummary:
    """``audit export --out FILE``: the bundle of the records from the first one asked for to a checkpoint
    signed now (``write_export``)."""
    conn = db.reader()
    return write_export(ledger, conn, out_path, _first_seq(conn, since, since_seq))


def export_lines(
    ledger: Ledger, db: Database, out: TextIO, *, since: str | None = None, since_seq: int | None = None
) -> int:
    """``audit export`` without ``--out``: the audit lines from the first record asked for to the newest,
    written to ``out``; the number written."""
    conn = db.reader()
    return export_range(conn, _first_seq(conn, since, since_seq), ledger.count(), out)
