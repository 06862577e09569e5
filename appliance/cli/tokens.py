"""``phi-gateway token …``: caller tokens (<caller-id>:<48 hex>), stored only as SHA-256.

Owns: the command line of those verbs and their ``admin`` records. Never: prints a token except once, alone
on the last line of standard output, at ``token issue``; lists or records a token's secret.
"""

from __future__ import annotations

import json
import re
from datetime import UTC, datetime, timedelta
from pathlib import Path

import click

from appliance import files
from appliance.cli.options import home_option, open_home, record_admin
from appliance.errors import OperatorError
from appliance.home import Vault
from appliance.policy import dsse
from appliance.policy.schema import Policy


@click.group("token")
def token_group() -> None:
    """Caller tokens (<caller-id>:<48 hex>), stored only as SHA-256."""


_DURATION = re.compile(r"^(\d+)([dhm])$")
_UNITS = {"d": "days", "h": "hours", "m": "minutes"}
_LATEST_EXPIRY = datetime(9000, 1, 1, tzinfo=UTC)
"""Far enough for any token, and far from datetime's year 9999, so no later arithmetic overflows."""
_USAGE = "use 30d, 12h, 45m or an ISO 8601 time"
_OUT_OF_RANGE = f"out of range (a token expires before {_LATEST_EXPIRY.year})"


def _parse_expiry(value: str | None) -> datetime | None:
    """``--expires``: a duration from now or a moment; out-of-range values are a message, not a crash."""
    if value is None:
        return None
    match = _DURATION.match(value)
    try:
        if match:
            amount, unit = int(match.group(1)), _UNITS[match.group(2)]
            moment = datetime.now(UTC) + timedelta(**{unit: amount})
        else:
            moment = datetime.fromisoformat(value.replace("Z", "+00:00"))
            moment = (moment if moment.tzinfo else moment.replace(tzinfo=UTC)).astimezone(UTC)
    except OverflowError:
        raise OperatorError(f"--expires {value!r}: {_OUT_OF_RANGE}") from None
    except ValueError as exc:
        raise OperatorError(f"--expires {value!r}: {_USAGE}") from exc
    if moment >= _LATEST_EXPIRY:
        raise OperatorError(f"--expires {value!r}: {_OUT_OF_RANGE}")
    return moment


@token_group.command("issue")
@home_option
@click.option("--caller", required=True, help="Caller id: letters, digits, '.', '_', '-'.")
@click.option("--org", required=True)
@click.option("--role", required=True)
@click.option("--expires", default=None, help="30d, 12h, 45m or an ISO 8601 time (default: no expiry).")
@click.option("--note", default=None)
@click.option(
    "--allow-unknown-role", is_flag=True, help="Issue even if the policy in force lacks the org/role."
)
def token_issue(
    home: Path | None,
    caller: str,
    org: str,
    role: str,
    expires: str | None,
    note: str | None,
    allow_unknown_role: bool,
) -> None:
    """Issue a token for CALLER; it is printed once, alone on the last line."""
    with open_home(home).open_vault() as vault:
        if not allow_unknown_role:
            _require_role(vault, org, role)
        token = vault.tokens.issue(caller, org, role, expires_at=_parse_expiry(expires), note=note)
        record_admin(vault, f"token_issue org={org} role={role}", claw_id=caller)
    click.echo(
        f"token for {caller} ({org}/{role}); shown once, store it in the application's secret store:",
        err=True,
    )
    click.echo(token)


def _require_role(vault: Vault, org: str, role: str) -> None:
    """Refuse an org/role the policy in force lacks (a typo would issue a token that is always refused)."""
    active = vault.policies.current()
    if active is None:
        return
    policy = Policy.model_validate_json(dsse.parse_envelope(active.envelope).payload)
    organization = policy.organizations.get(org)
    if organization is None or role not in organization.roles:
        raise OperatorError(
            f"policy v{policy.version} has no role {org}/{role}; "
            "check the spelling or pass --allow-unknown-role"
        )


@token_group.command("list")
@home_option
@click.option("--all", "include_revoked", is_flag=True, help="Include revoked tokens.")
def token_list(home: Path | None, include_revoked: bool) -> None:
    """List tokens (never their secrets)."""
    with open_home(home).open_vault() as vault:
        rows = vault.tokens.list(include_revoked=include_revoked)
    for row in rows:
        click.echo(json.dumps(row, default=str))


@token_group.command("revoke")
@home_option
@click.argument("caller")
def token_revoke(home: Path | None, caller: str) -> None:
    """Revoke every token of CALLER (effective on the next request, no restart)."""
    with open_home(home).open_vault() as vault:
        count = vault.tokens.revoke(caller)
        if count == 0:
            raise OperatorError(f"{caller} has no active token")
        record_admin(vault, f"token_revoke count={count}", claw_id=caller)
    click.echo(f"revoked {count} token(s) of {caller}")


@token_group.command("import-cllama")
@home_option
@click.argument("directory", type=click.Path(exists=True, file_okay=False, path_type=Path))
@click.option(
    "--org", required=True, help="Organization for imported callers (unless their metadata names one)."
)
@click.option("--role", required=True, help="Role for imported callers (unless their metadata names one).")
@click.option(
    "--allow-unknown-role", is_flag=True, help="Import even if the policy in force lacks the org/role."
)
def token_import_cllama(
    home: Path | None, directory: Path, org: str, role: str, allow_unknown_role: bool
) -> None:
    """Import tokens from a cllama context directory (<agent-id>/metadata.json)."""
    _require_regular_metadata(directory)
    with open_home(home).open_vault() as vault:
        if not allow_unknown_role:
            _require_role(vault, org, role)
        results = vault.tokens.import_cllama(directory, org=org, role=role)
        for caller, outcome in results:
            if outcome == "imported":
                record_admin(vault, f"token_import_cllama org={org} role={role}", claw_id=caller)
            click.echo(f"{caller}: {outcome}")


CLLAMA_METADATA = files.Input("cllama metadata.json", 1 << 20)


def _require_regular_metadata(directory: Path) -> None:
    """Refuse the import, before anything is read, if an agent's metadata.json is a FIFO, a device or
    too large (the token store reads each one itself and would block on a FIFO)."""
    try:
        entries = sorted(directory.iterdir())
    except OSError as exc:
        raise OperatorError(f"cannot read {directory}: {exc.strerror or exc}") from None
    for entry in entries:
        meta = entry / "metadata.json"
        if entry.is_dir() and meta.exists():
            files.require_regular(meta, CLLAMA_METADATA)
