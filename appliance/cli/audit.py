"""``phi-gateway audit …``: the operator's and the auditor's verbs for the ledger.

On the appliance (``--home``): verify, tail, pending, key, checkpoint, checkpoints, prove, export, archive.
Anywhere, without the ledger (an auditor's laptop): ``verify-proof`` and ``verify EXPORT…``, given the
appliance's verifier key (``audit key`` prints it) and the checkpoints the auditor kept.

Owns: the command line of those verbs. Never: prints a secret (the verifier key is public), or reports
success for a check it did not run.
"""

from __future__ import annotations

import json
import signal
import sqlite3
import sys
import threading
from pathlib import Path

import click
from click.core import ParameterSource

from appliance import files
from appliance.cli.options import home_option, open_home
from appliance.errors import CheckpointError, OperatorError
from appliance.ledger import operations, proofs, signed_note
from appliance.ledger.archive import archive_files
from appliance.ledger.archive_bundles import ArchiveBundles
from appliance.ledger.census import census
from appliance.ledger.export import sidecar_paths
from appliance.ledger.export_verify import verify_bundles
from appliance.ledger.follow import ExportFollower, exported_through
from appliance.os_user import this_os_user

_PENDING_SHOWN = 100
VERIFIER_KEYS = files.Input("verifier key file", 1 << 20)
CHECKPOINT = files.Input("checkpoint", signed_note.MAX_NOTE_BYTES)
PROOF = files.Input("proof", 16 << 20)
EXPORT = files.Input("export file", 1 << 40)
"""Read a line at a time by ``export_verify``: the cap only bounds a runaway file."""
EXPORT_PREFIX = files.Input("export's .prefix.json", 1 << 30)
"""Holds a root per 16 exported records: about 300 MB for 100 million records."""


@click.group("audit")
def audit_group() -> None:
    """The tamper-evident audit ledger: verify, prove, export, archive."""


def _verifiers(keys: tuple[str, ...]) -> list[signed_note.Verifier]:
    """``--key`` values: a verifier key string, or a file holding one per line."""
    found: list[signed_note.Verifier] = []
    for value in keys:
        path = Path(value)
        is_file = "+" not in value and path.exists()
        lines = files.read_text(path, VERIFIER_KEYS).split() if is_file else [value]
        for line in lines:
            try:
                found.append(signed_note.Verifier.parse(line.strip()))
            except CheckpointError as exc:
                raise OperatorError(f"--key {value}: {exc}") from None
    return found


def _read_notes(paths: tuple[Path, ...]) -> list[tuple[str, str]]:
    return [(f"kept checkpoint {path.name}", files.read_text(path, CHECKPOINT)) for path in paths]


_KEY_HELP = "A verifier key (name+hash+key, as `audit key` prints it) or a file of them; repeatable."
_KEPT_HELP = (
    "A checkpoint you kept off the appliance; it must be signed and match the ledger (or, with EXPORTS, "
    "the bundles). Repeatable."
)
_ARCHIVE_HELP = (
    "An archive bundle (the .jsonl `audit archive` wrote), for checkpoints and proofs over archived "
    "records; repeatable."
)


@audit_group.command("verify")
@home_option
@click.option(
    "--checkpoint",
    "kept",
    multiple=True,
    type=click.Path(exists=True, dir_okay=False, path_type=Path),
    help=_KEPT_HELP,
)
@click.option("--key", "keys", multiple=True, help=_KEY_HELP + " (for EXPORTS, or extra keys for the ledger)")
@click.option(
    "--archive",
    "archives",
    multiple=True,
    type=click.Path(exists=True, dir_okay=False, path_type=Path),
    help=_ARCHIVE_HELP + " Each is verified too, and must be this ledger's.",
)
@click.argument("exports", nargs=-1, type=click.Path(exists=True, dir_okay=False, path_type=Path))
def audit_verify(
    home: Path | None,
    kept: tuple[Path, ...],
    keys: tuple[str, ...],
    archives: tuple[Path, ...],
    exports: tuple[Path, ...],
) -> None:
    """Recompute chain and Merkle tree, check every checkpoint; exit 1 naming the first bad record.

    A kept checkpoint (--checkpoint) over records since archived is checked from the tiles the vault keeps,
    and, inside a tile, with that tile's records from its archive bundle (--archive).

    With EXPORTS (files written by `audit export --out` or `audit archive`, from one appliance or several
    behind a load balancer), verify those instead, without a ledger: each against its signed checkpoint,
    with the verifier keys given by --key, and each kept checkpoint against the bundles that hold its records.
    """
    if exports:
        if archives:
            raise OperatorError("--archive is for checking the ledger; without it, list the bundles as FILE…")
        if click.get_current_context().get_parameter_source("home") is ParameterSource.COMMANDLINE:
            raise OperatorError(
                "with FILE… only those bundles are verified, not the ledger --home names: run "
                "`audit verify --home DIR` for the ledger (--archive FILE checks archive bundles against it)"
            )
        _verify_exports(exports, _verifiers(keys), _read_notes(kept))
        return
    target = open_home(home)
    with target.open_vault() as vault:
        extra = _verifiers(keys)
        bundle_notes = _verify_archives(archives, [vault.ledger.verifier(), *extra])
        bundles = ArchiveBundles(archives, archive_files(vault.db.reader()))
        report = vault.ledger.verify(
            kept=[*_read_notes(kept), *bundle_notes], extra_verifiers=extra, bundles=bundles
        )
        newest = vault.ledger.count()
    setting = target.settings().audit.export_file
    export_file = None if setting is None else target.root / setting
    exported = None if export_file is None else exported_through(export_file)
    if report.ok and exported is not None and exported > newest:
        raise OperatorError(
            f"ledger verification FAILED: records {newest + 1} to {exported} were exported to "
            f"{export_file} (continuous export) but are not in the ledger: cut from its end"
        )
    if not report.ok:
        raise OperatorError(f"ledger verification FAILED after {report.records} records: {report.message}")
    if report.records == 0:
        raise OperatorError("ledger verification FAILED: the ledger is empty (init always writes record 1)")
    matched = "" if not kept else f"; your kept checkpoint(s) {', '.join(p.name for p in kept)} match it"
    click.echo(f"ok: {report.message}{matched}")


def _require_bundle_files(paths: tuple[Path, ...]) -> None:
    for path in paths:  # export_verify opens these itself: refuse a FIFO or a device before it does
        checkpoint_path, prefix_path = sidecar_paths(path)
        files.require_regular(path, EXPORT)
        for sidecar, kind in ((checkpoint_path, CHECKPOINT), (prefix_path, EXPORT_PREFIX)):
            if sidecar.exists():  # a missing one is export_verify's to report, with the rest
                files.require_regular(sidecar, kind)


def _verify_exports(
    paths: tuple[Path, ...], verifiers: list[signed_note.Verifier], kept: list[tuple[str, str]]
) -> None:
    if not verifiers:
        raise OperatorError("verifying exports needs the verifier key of each appliance: --key")
    _require_bundle_files(paths)
    reports, kept_reports = verify_bundles(list(paths), verifiers, kept)
    for report in reports:
        click.echo(report.describe())
    for kept_report in kept_reports:
        click.echo(kept_report.describe())
    failed = sum(not report.ok for report in reports)
    failed_kept = sum(not report.ok for report in kept_reports)
    if failed or failed_kept:
        raise OperatorError(
            f"{failed} of {len(reports)} export(s) and {failed_kept} of {len(kept_reports)} kept "
            "checkpoint(s) FAILED verification"
        )
    found = census((report.origin or "", report.path) for report in reports)
    click.echo(found.describe())
    if not found.ok:
        raise OperatorError("the exports FAILED verification as one set: a request is in two ledgers")


def _verify_archives(paths: tuple[Path, ...], verifiers: list[signed_note.Verifier]) -> list[tuple[str, str]]:
    """Verify each archive bundle given to a ledger check on its own; its checkpoint is then checked
    against the ledger like a kept one (so the bundle must be this ledger's, not only well signed)."""
    if not paths:
        return []
    _require_bundle_files(paths)
    reports, _ = verify_bundles(list(paths), verifiers)
    for report in reports:
        if report.ok:
            click.echo(f"archive {report.path.name}: ok, records {report.first_seq} to {report.last_seq}")
        else:
            click.echo(f"archive {report.path.name}: FAILED: {'; '.join(report.problems)}")
    failed = [report.path.name for report in reports if not report.ok]
    if failed:
        raise OperatorError(
            f"ledger verification FAILED: archive bundle(s) {', '.join(failed)} do not verify, so nothing "
            "was checked against them"
        )
    return [
        (f"the checkpoint of archive {path.name}", files.read_text(sidecar_paths(path)[0], CHECKPOINT))
        for path in paths
    ]


@audit_group.command("tail")
@home_option
@click.option("-n", "count", default=20, show_default=True)
def audit_tail(home: Path | None, count: int) -> None:
    """Print the last N records as JSON lines."""
    with open_home(home).open_vault() as vault:
        rows = vault.ledger.tail(count)
    for row in rows:
        click.echo(json.dumps(row))


@audit_group.command("pending")
@home_option
def audit_pending(home: Path | None) -> None:
    """Requests forwarded whose outcome was never recorded (e.g. a crash mid-request)."""
    with open_home(home).open_vault() as vault:
        ids = vault.ledger.pending_outcomes(limit=_PENDING_SHOWN)
    for request_id in ids:
        click.echo(request_id)
    shown = f"the first {len(ids)}" if len(ids) == _PENDING_SHOWN else str(len(ids))
    click.echo(f"{shown} request(s) without an outcome record", err=True)


@audit_group.command("key")
@home_option
def audit_key(home: Path | None) -> None:
    """Print this appliance's checkpoint verifier key (public; give it to your auditors)."""
    with open_home(home).open_vault() as vault:
        click.echo(vault.ledger.verifier().encode())


def _write_or_print(text: str, out: Path | None) -> None:
    if out is None:
        click.echo(text, nl=False)
        return
    try:
        out.write_text(text, encoding="utf-8")
    except OSError as exc:
        raise OperatorError(f"cannot write {out}: {exc.strerror or exc}") from None
    click.echo(f"written to {out}", err=True)


@audit_group.command("checkpoint")
@home_option
@click.option(
    "--out",
    type=click.Path(dir_okay=False, path_type=Path),
    default=None,
    help="Write the signed checkpoint to this file (default: print it).",
)
def audit_checkpoint(home: Path | None, out: Path | None) -> None:
    """Sign and store a checkpoint of the ledger now; keep the text off the appliance."""
    with open_home(home).open_vault() as vault:
        note = vault.ledger.checkpoint("manual")
    _write_or_print(note, out)


@audit_group.command("checkpoints")
@home_option
@click.option("-n", "count", default=20, show_default=True, help="How many of the newest to list.")
def audit_checkpoints(home: Path | None, count: int) -> None:
    """List the stored checkpoints, newest last: id, size, time, reason."""
    with open_home(home).open_vault() as vault:
        rows = (
            vault.db.reader()
            .execute("SELECT id, size, ts, reason FROM ledger_checkpoint ORDER BY id DESC LIMIT ?", (count,))
            .fetchall()
        )
    for row in reversed(rows):
        click.echo(f"#{row[0]:<6} size {row[1]:<10} {row[2]}  {row[3]}")


@audit_group.command("prove")
@home_option
@click.option("--record", type=int, default=None, help="Prove this record (seq) is in the ledger.")
@click.option(
    "--size",
    type=int,
    default=None,
    help="Tree size to prove against (that of a checkpoint you kept); default: the ledger now.",
)
@click.option(
    "--from-size",
    type=int,
    default=None,
    help="Instead: prove the ledger of --size records extends the one of this many records.",
)
@click.option(
    "--archive",
    "archives",
    multiple=True,
    type=click.Path(exists=True, dir_okay=False, path_type=Path),
    help=_ARCHIVE_HELP,
)
@click.option(
    "--allow-unsigned",
    is_flag=True,
    help="Give the proof even without a stored checkpoint of its size(s); check it with one you kept.",
)
@click.option("--out", type=click.Path(dir_okay=False, path_type=Path), default=None)
def audit_prove(
    home: Path | None,
    record: int | None,
    size: int | None,
    from_size: int | None,
    archives: tuple[Path, ...],
    allow_unsigned: bool,
    out: Path | None,
) -> None:
    """Print an RFC 9162 inclusion proof (--record) or consistency proof (--from-size) as JSON.

    The proof carries the signed checkpoint(s) it leads to (a new one is signed when proving against the
    ledger as it is now); without a stored checkpoint of its size it is refused unless --allow-unsigned.
    `audit verify-proof` checks it anywhere, without the ledger. A proof over records since archived needs
    the archive bundle holding them (--archive).
    """
    if (record is None) == (from_size is None):
        raise OperatorError("give --record N (inclusion) or --from-size M (consistency)")
    for path in archives:  # read a tile at a time by ArchiveBundles: refuse a FIFO or a device first
        files.require_regular(path, EXPORT)
    with open_home(home).open_vault() as vault:
        ledger = vault.ledger
        if size is None:
            note: str | None = ledger.checkpoint("manual")
            size = signed_note.parse_unverified(note or "").size
        conn = vault.db.reader()
        conn.execute("BEGIN")
        try:
            if not 1 <= size <= ledger.count():
                raise OperatorError(f"--size must be 1 to {ledger.count()} (the records in the ledger)")
            if from_size is not None and not 1 <= from_size <= size:
                raise OperatorError(f"--from-size must be 1 to {size} (the tree it is proved against)")
            note = proofs.stored_checkpoint_at(conn, size)
            old = None if from_size is None else proofs.stored_checkpoint_at(conn, from_size)
            unsigned = [n for n, text in ((from_size, old), (size, note)) if n is not None and text is None]
            if unsigned and not allow_unsigned:
                raise OperatorError(_no_stored_checkpoint(conn, unsigned[0]))
            bundles = ArchiveBundles(archives, archive_files(conn))
            if record is not None:
                doc = proofs.inclusion_proof(conn, record, size, note, bundles)
            else:
                assert from_size is not None
                doc = proofs.consistency_proof(conn, from_size, size, old, note, bundles)
        finally:
            conn.execute("COMMIT")
    for n in unsigned:
        click.echo(
            f"warning: UNSIGNED proof: no stored checkpoint of {n} records; it proves nothing until checked "
            f"against a checkpoint of {n} records you kept (audit verify-proof PROOF --key KEY --checkpoint "
            "KEPT)",
            err=True,
        )
    _write_or_print(proofs.dumps(doc), out)


def _no_stored_checkpoint(conn: sqlite3.Connection, size: int) -> str:
    below, above = proofs.stored_sizes_around(conn, size)
    nearest = " and ".join(str(n) for n in (below, above) if n is not None) or "none"
    return (
        f"no checkpoint of {size} records is stored, so the proof would carry no signature (the nearest "
        f"stored sizes: {nearest}; `audit checkpoints` lists them). Prove at a stored size, or sign one of "
        f"the ledger as it is now with `audit checkpoint` and prove at its size; to check the proof only "
        f"against a checkpoint of {size} records you kept yourself, pass --allow-unsigned"
    )


@audit_group.command("verify-proof")
@click.argument("proof", type=click.Path(exists=True, dir_okay=False, path_type=Path))
@click.option("--key", "keys", multiple=True, required=True, help=_KEY_HELP)
@click.option(
    "--checkpoint",
    "kept",
    multiple=True,
    type=click.Path(exists=True, dir_okay=False, path_type=Path),
    help="A checkpoint you kept; used when its size is the proof's (then the proof's own is not needed).",
)
def audit_verify_proof(proof: Path, keys: tuple[str, ...], kept: tuple[Path, ...]) -> None:
    """Check a proof from `audit prove` without the ledger (what an auditor runs); exit 1 if it fails."""
    try:
        doc = json.loads(files.read_text(proof, PROOF))
    except (json.JSONDecodeError, RecursionError) as exc:
        raise OperatorError(f"{proof}: not a proof file ({exc})") from None
    result = proofs.verify_proof(doc, _verifiers(keys), [text for _, text in _read_notes(kept)])
    click.echo(f"ok: {result.message}")


@audit_group.command("export")
@home_option
@click.option(
    "--since", default=None, help="From this time (2026-11-01, or RFC 3339 UTC); default: record 1."
)
@click.option("--since-seq", type=int, default=None, help="From this record (seq) instead.")
@click.option(
    "--format",
    "fmt",
    type=click.Choice(["jsonl"]),
    default="jsonl",
    show_default=True,
    help="JSON lines, the shape of the gateway's stdout audit lines.",
)
@click.option(
    "--out",
    type=click.Path(dir_okay=False, path_type=Path),
    default=None,
    help="Write a bundle: FILE (lines), FILE.checkpoint and FILE.prefix.json; default: lines to stdout.",
)
@click.option(
    "--follow", is_flag=True, help="Keep appending new records to --out until stopped (SIGINT/SIGTERM)."
)
@click.option(
    "--start",
    type=click.Choice(["beginning", "end"]),
    default="beginning",
    show_default=True,
    help="--follow with neither FILE nor its state: from record 1, or only new records.",
)
def audit_export_cmd(
    home: Path | None,
    since: str | None,
    since_seq: int | None,
    fmt: str,
    out: Path | None,
    follow: bool,
    start: str,
) -> None:
    """Export records as JSON lines for a SIEM, with the signed checkpoint that covers them.

    With --out, the bundle is verifiable off the appliance: `audit verify FILE --key KEY`. With --follow,
    new records are appended to --out as they become durable; restarts and log rotation lose nothing.
    """
    target = open_home(home)
    if follow:
        if out is None:
            raise OperatorError("--follow needs --out FILE (the file your log shipper tails)")
        _follow(target.vault_path, out, start)
        return
    with target.open_vault() as vault:
        if out is None:
            count = operations.export_lines(
                vault.ledger, vault.db, sys.stdout, since=since, since_seq=since_seq
            )
            click.echo(f"{count} record(s) exported", err=True)
            return
        summary = operations.export_bundle(vault.ledger, vault.db, out, since=since, since_seq=since_seq)
    click.echo(
        f"{summary.lines} record(s), {summary.first_seq} to {summary.last_seq} of {summary.origin}: {out}\n"
        f"checkpoint: {summary.checkpoint_path}\nprefix:     {summary.prefix_path}"
    )


def _follow(vault_path: Path, out: Path, start: str) -> None:
    if not out.parent.is_dir():
        raise OperatorError(f"{out.parent} is not a directory")
    follower = ExportFollower(vault_path, out, start="end" if start == "end" else "beginning")
    stop = threading.Event()
    for sig in (signal.SIGINT, signal.SIGTERM):
        signal.signal(sig, lambda *_: stop.set())
    click.echo(f"following the ledger into {out} (SIGINT or SIGTERM stops)", err=True)
    try:
        follower.run(stop)
    finally:
        follower.stop()


@audit_group.command("archive")
@home_option
@click.option(
    "--through", type=int, required=True, help="Archive records up to this seq (a multiple of 256)."
)
@click.option(
    "--out",
    "out_dir",
    type=click.Path(file_okay=False, path_type=Path),
    required=True,
    help="Directory for the archive bundle (keep it, and a copy, off the appliance).",
)
def audit_archive(home: Path | None, through: int, out_dir: Path) -> None:
    """Move old records into a sealed, verifiable archive bundle and remove them from the vault.

    The bundle is written, read back and verified before anything is deleted; verify goes on from the
    signed state the vault keeps of the archived records. Check the bundle later with `audit verify FILE`,
    and checkpoints kept from before with `audit verify --checkpoint KEPT --archive FILE`.
    """
    with open_home(home).open_vault() as vault:
        result = operations.run_archive(vault.ledger, vault.db, through, out_dir, os_user=this_os_user())
    click.echo(
        f"records {result.first} to {result.last} archived to {result.path} (sha256 {result.sha256}); "
        f"{result.deleted} removed from the vault"
    )
