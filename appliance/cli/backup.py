"""``phi-gateway backup`` and ``restore``: a sealed, consistent copy of a home, so an appliance can be
replaced (or moved to a newer image) without losing its vault, keys, tokens, policy or ledger.

Owns: the command line of those verbs, how the passphrase is read, and the ``admin`` record of a backup.
Never: echoes the passphrase, takes it from the command line or the environment (both are visible to
other users of the machine), or writes a backup file other users can read.
"""

from __future__ import annotations

import os
from pathlib import Path

import click

from appliance import files
from appliance.backup.archive import make_backup, restore_backup
from appliance.cli.options import home_option, open_home, record_admin
from appliance.errors import OperatorError
from appliance.home import resolve_home
from appliance.ledger import operations

MIN_PASSPHRASE = 12
PASSPHRASE_FILE = files.Input("passphrase file", 4 << 10)


def _passphrase(path: Path | None, *, confirm: bool) -> bytes:
    if path is not None:
        lines = files.read_text(path, PASSPHRASE_FILE).splitlines()
        text = lines[0] if lines else ""
    else:
        text = click.prompt("backup passphrase", hide_input=True, confirmation_prompt=confirm, err=True)
    if len(text) < MIN_PASSPHRASE:
        raise OperatorError(f"the passphrase must be at least {MIN_PASSPHRASE} characters")
    return text.encode()


_FILE_HELP = (
    "A file whose first line is the passphrase (keep it offline, apart from the backups); "
    "without it, the passphrase is asked for on the terminal."
)


@click.command("backup")
@home_option
@click.option("--out", type=click.Path(dir_okay=False, path_type=Path), required=True, help="Backup file.")
@click.option("--passphrase-file", type=click.Path(dir_okay=False, path_type=Path), help=_FILE_HELP)
@click.option("--with-models", is_flag=True, help="Include the model files (large; else only their names).")
def backup_cmd(home: Path | None, out: Path, passphrase_file: Path | None, with_models: bool) -> None:
    """Write a sealed backup of the home: vault (a consistent copy, safe while serving), keys, settings,
    trust, TLS identity. Restore it with `phi-gateway restore FILE`."""
    target = open_home(home)
    if out.exists():
        raise OperatorError(f"{out} exists; choose a new name (a backup never overwrites a file)")
    inside = out.resolve().is_relative_to(target.root.resolve())
    if inside and not out.name.endswith(".phibak"):
        raise OperatorError(f"{out} is inside the home: name it *.phibak (backups never copy those)")
    secret = _passphrase(passphrase_file, confirm=True)
    partial = out.with_name(out.name + ".partial")  # a backup written into the home ends in .phibak
    try:
        fd = os.open(partial, os.O_WRONLY | os.O_CREAT | os.O_EXCL | getattr(os, "O_BINARY", 0), 0o600)
    except OSError as exc:
        raise OperatorError(f"cannot create {partial}: {exc.strerror or exc}") from None
    try:
        with os.fdopen(fd, "wb") as handle:
            summary = make_backup(target, handle, secret, with_models=with_models)
            handle.flush()
            os.fsync(handle.fileno())
        partial.rename(out)
    except BaseException:
        partial.unlink(missing_ok=True)
        raise
    digest = operations.file_sha256(out)
    with target.open_vault() as vault:
        record_admin(vault, f"backup sha256={digest} records={summary.ledger_records} files={summary.files}")
    click.echo(
        f"backup written: {out} ({out.stat().st_size} bytes, {summary.files} files, "
        f"ledger records 1..{summary.ledger_records}); sha256 {digest}"
    )
    if summary.models_skipped:
        click.echo(f"model files not included (copy them separately): {', '.join(summary.models_skipped)}")


@click.command("restore")
@home_option
@click.argument("backup", type=click.Path(exists=True, dir_okay=False, path_type=Path))
@click.option("--passphrase-file", type=click.Path(dir_okay=False, path_type=Path), help=_FILE_HELP)
def restore_cmd(home: Path | None, backup: Path, passphrase_file: Path | None) -> None:
    """Restore BACKUP into a new home (absent or empty): every chunk and file is checked and the ledger
    verified before the home is put in place; a newer version's migrations run on it."""
    target = resolve_home(home)
    files.require_regular(backup, files.Input("backup file", 1 << 62))
    secret = _passphrase(passphrase_file, confirm=False)
    with backup.open("rb") as handle:
        summary = restore_backup(handle, secret, target)
    header = summary.header
    click.echo(
        f"restored {summary.files} files into {target} from the backup of site {header.get('site')} "
        f"made {header.get('created')} by version {header.get('gateway_version')}"
    )
    click.echo(f"ledger: {summary.ledger_message}")
    if summary.models_missing:
        missing = ", ".join(summary.models_missing)
        click.echo(f"copy these model files into {target / 'models'} before serving: {missing}")
