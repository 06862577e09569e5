"""``phi-gateway audit …``: the operator's and the auditor's verbs for the ledger.

On the appliance (``--home``): verify, tail, pending, key, checkpoint, checkpoints, prove, export, archive.
Anywhere, without the ledger (an auditor's laptop): ``verify-proof`` and ``verify EXPORT…``, given the
appliance's verifier key (``audit key`` prints it) and the checkpoints the auditor kept.

Owns: the command line of those verbs. Never: prints a secret (the verifier key is public), or reports
success for a check it did not run.
"""

from __future__ import annotations

import json
import sys
from pathlib import Path

import click

from appliance import checkpoint as notes
from appliance import ledger_proofs
from appliance.cli import _home, home_option
from appliance.errors import OperatorError

_PENDING_SHOWN = 100


@click.group("audit")
def audit_group() -> None:
    """The tamper-evident audit ledger: verify, prove, export, archive."""


def _verifiers(keys: tuple[str, ...]) -> list[notes.Verifier]:
    """``--key`` values: a verifier key string, or a file holding one per line."""
    found: list[notes.Verifier] = []
    for value in keys:
        path = Path(value)
        lines = path.read_text().split() if "+" not in value and path.is_file() else [value]
        for line in lines:
            try:
                found.append(notes.Verifier.parse(line.strip()))
            except notes.CheckpointError as exc:
                raise OperatorError(f"--key {value}: {exc}") from None
    return found


def _read_notes(paths: tuple[Path, ...]) -> list[tuple[str, str]]:
    return [(f"kept checkpoint {path.name}", path.read_text(encoding="utf-8")) for path in paths]


_KEY_HELP = "A verifier key (name+hash+key, as `audit key` prints it) or a file of them; repeatable."
_KEPT_HELP = "A checkpoint you kept off the appliance; it must be signed and match the ledger. Repeatable."


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
@click.argument("exports", nargs=-1, type=click.Path(exists=True, dir_okay=False, path_type=Path))
def audit_verify(
    home: Path | None, kept: tuple[Path, ...], keys: tuple[str, ...], exports: tuple[Path, ...]
) -> None:
    """Recompute chain and Merkle tree, check every checkpoint; exit 1 naming the first bad record.

    With EXPORTS (files written by `audit export --out` or `audit archive`, from one appliance or several
    behind a load balancer), verify those instead, without a ledger: each against its signed checkpoint,
    with the verifier keys given by --key.
    """
    if exports:
        _verify_exports(exports, _verifiers(keys))
        return
    with _home(home).open_vault() as vault:
        report = vault.ledger.verify(kept=_read_notes(kept), extra_verifiers=_verifiers(keys))
    if not report.ok:
        raise OperatorError(f"ledger verification FAILED after {report.records} records: {report.message}")
    if report.records == 0:
        raise OperatorError("ledger verification FAILED: the ledger is empty (init always writes record 1)")
    click.echo(f"ok: {report.message}")


def _verify_exports(paths: tuple[Path, ...], verifiers: list[notes.Verifier]) -> None:
    from appliance import audit_export

    if not verifiers:
        raise OperatorError("verifying exports needs the verifier key of each appliance: --key")
    reports = audit_export.verify_exports(list(paths), verifiers)
    failed = 0
    for report in reports:
        click.echo(str(report))
        failed += not report.ok
    if failed:
        raise OperatorError(f"{failed} of {len(reports)} export(s) FAILED verification")


@audit_group.command("tail")
@home_option
@click.option("-n", "count", default=20, show_default=True)
def audit_tail(home: Path | None, count: int) -> None:
    """Print the last N records as JSON lines."""
    with _home(home).open_vault() as vault:
        rows = vault.ledger.tail(count)
    for row in rows:
        click.echo(json.dumps(row))


@audit_group.command("pending")
@home_option
def audit_pending(home: Path | None) -> None:
    """Requests forwarded whose outcome was never recorded (e.g. a crash mid-request)."""
    with _home(home).open_vault() as vault:
        ids = vault.ledger.pending_outcomes(limit=_PENDING_SHOWN)
    for request_id in ids:
        click.echo(request_id)
    shown = f"the first {len(ids)}" if len(ids) == _PENDING_SHOWN else str(len(ids))
    click.echo(f"{shown} request(s) without an outcome record", err=True)


@audit_group.command("key")
@home_option
def audit_key(home: Path | None) -> None:
    """Print this appliance's checkpoint verifier key (public; give it to your auditors)."""
    with _home(home).open_vault() as vault:
        click.echo(vault.ledger.verifier().encode())


def _write_or_print(text: str, out: Path | None) -> None:
    if out is None:
        click.echo(text, nl=False)
    else:
        out.write_text(text, encoding="utf-8")
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
    with _home(home).open_vault() as vault:
        note = vault.ledger.checkpoint("manual")
    _write_or_print(note, out)


@audit_group.command("checkpoints")
@home_option
@click.option("-n", "count", default=20, show_default=True, help="How many of the newest to list.")
def audit_checkpoints(home: Path | None, count: int) -> None:
    """List the stored checkpoints, newest last: id, size, time, reason."""
    with _home(home).open_vault() as vault:
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
@click.option("--out", type=click.Path(dir_okay=False, path_type=Path), default=None)
def audit_prove(
    home: Path | None, record: int | None, size: int | None, from_size: int | None, out: Path | None
) -> None:
    """Print an RFC 9162 inclusion proof (--record) or consistency proof (--from-size) as JSON.

    The proof carries the signed checkpoint it leads to (a new one is signed when proving against the
    ledger as it is now); `audit verify-proof` checks it anywhere, without the ledger.
    """
    if (record is None) == (from_size is None):
        raise OperatorError("give --record N (inclusion) or --from-size M (consistency)")
    with _home(home).open_vault() as vault:
        ledger = vault.ledger
        if size is None:
            note: str | None = ledger.checkpoint("manual")
            size = notes.parse_unverified(note or "").size
        conn = vault.db.reader()
        conn.execute("BEGIN")
        try:
            if size > ledger.count():
                raise OperatorError(f"the ledger has {ledger.count()} records, fewer than --size {size}")
            note = ledger_proofs.stored_checkpoint_at(conn, size)
            if record is not None:
                doc = ledger_proofs.inclusion_proof(conn, record, size, note)
            else:
                assert from_size is not None
                old = ledger_proofs.stored_checkpoint_at(conn, from_size)
                doc = ledger_proofs.consistency_proof(conn, from_size, size, old, note)
        finally:
            conn.execute("COMMIT")
    _write_or_print(ledger_proofs.dumps(doc), out)


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
        doc = json.loads(proof.read_text(encoding="utf-8"))
    except (UnicodeDecodeError, json.JSONDecodeError) as exc:
        raise OperatorError(f"{proof}: not a proof file ({exc})") from None
    result = ledger_proofs.verify_proof(doc, _verifiers(keys), [text for _, text in _read_notes(kept)])
    click.echo(f"ok: {result.message}")


def _stdout_is_terminal() -> bool:
    return sys.stdout.isatty()
