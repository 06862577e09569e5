"""``phi-gateway token …``: caller tokens (<caller-id>:<48 hex>), stored only as SHA-256.

Owns: the command line of those verbs and their ``admin`` records. Never: prints a token except once, alone
on the last line of standard output, at ``token issue``; lists or records a token's secret.
"""

from __future__ import annotations

import hashlib
import json
import os
import sqlite3
from pathlib import Path

import click

from appliance import bundle_import, files
from appliance.cli.options import home_option, open_home, record_admin
from appliance.errors import OperatorError
from appliance.identity import CllamaAgent, parse_expiry
from appliance.os_user import this_os_user
from appliance.policy.schema import Policy


@click.group("token")
def token_group() -> None:
    """Caller tokens (<caller-id>:<48 hex>), stored only as SHA-256."""


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
            _require_role(bundle_import.policy_in_force(vault), org, role)
        token = vault.tokens.issue(
            caller, org, role, expires_at=parse_expiry(expires, "--expires"), note=note
        )
        record_admin(vault, f"token_issue org={org} role={role}", claw_id=caller)
    click.echo(
        f"token for {caller} ({org}/{role}); shown once, store it in the application's secret store:",
        err=True,
    )
    click.echo(token)


def _has_role(policy: Policy, org: str, role: str) -> bool:
    organization = policy.organizations.get(org)
    return organization is not None and role in organization.roles


def _require_role(policy: Policy | None, org: str, role: str) -> None:
    """Refuse an org/role the policy in force lacks (a typo would issue a token that is always refused)."""
    if policy is not None and not _has_role(policy, org, role):
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
    "--allow-unknown-role",
    is_flag=True,
    help="Import even if the policy in force lacks the org/role (given here or named by a metadata.json).",
)
def token_import_cllama(
    home: Path | None, directory: Path, org: str, role: str, allow_unknown_role: bool
) -> None:
    """Import tokens from a cllama context directory (<agent-id>/metadata.json).

    An agent whose metadata.json names an org or role gets that one (the one it was set up with);
    --org/--role are for the others. Each import is recorded with the org and role the token got.
    """
    _require_regular_metadata(directory)
    with open_home(home).open_vault() as vault:
        policy = None if allow_unknown_role else bundle_import.policy_in_force(vault)
        _require_role(policy, org, role)
        agents = [
            _check_metadata_role(agent, policy)
            for agent in vault.tokens.read_cllama(directory, org=org, role=role)
        ]
        granted = {agent.caller: agent for agent in agents}
        for caller, outcome in vault.tokens.import_agents(agents):
            if outcome == "imported":
                agent = granted[caller]
                named = " and ".join(agent.from_metadata)
                detail = f"token_import_cllama org={agent.org} role={agent.role}"
                if named:
                    detail += f" from_metadata={','.join(agent.from_metadata)}"
                record_admin(vault, detail, claw_id=caller)
                outcome = f"imported as {agent.org}/{agent.role}" + (
                    f" ({named} from metadata.json)" if named else ""
                )
            click.echo(f"{caller}: {outcome}")


def _check_metadata_role(agent: CllamaAgent, policy: Policy | None) -> CllamaAgent:
    """Skip an agent whose metadata.json names an org/role the policy in force lacks (the defaults given
    on the command line were checked already)."""
    if policy is None or agent.problem or not agent.from_metadata or _has_role(policy, agent.org, agent.role):
        return agent
    return agent.skipped(
        f"skipped: metadata.json names {agent.org}/{agent.role}, which policy v{policy.version} lacks "
        "(check the spelling, or --allow-unknown-role imports it anyway)"
    )


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


TOKEN_EXPORT = files.Input("token export", 64 << 20)


@token_group.command("export")
@home_option
@click.option("--out", type=click.Path(dir_okay=False, path_type=Path), required=True)
def token_export(home: Path | None, out: Path) -> None:
    """Write every token's hash, caller, org, role, expiry and revocation (never a secret) to OUT, for
    `token import` on the other nodes of the site (all nodes then accept the same tokens)."""
    with open_home(home).open_vault() as vault:
        rows = vault.tokens.export_rows()
    text = "".join(json.dumps(row, sort_keys=True) + "\n" for row in rows)
    fd = os.open(out, os.O_WRONLY | os.O_CREAT | os.O_TRUNC | getattr(os, "O_BINARY", 0), 0o600)
    with os.fdopen(fd, "w", encoding="utf-8") as handle:
        handle.write(text)
    click.echo(f"{len(rows)} token(s) written to {out} (hashes only; import them with `token import`)")


@token_group.command("import")
@home_option
@click.argument("export", type=click.Path(exists=True, dir_okay=False, path_type=Path))
@click.option(
    "--allow-unknown-role", is_flag=True, help="Import even if the policy in force lacks an org/role."
)
def token_import(home: Path | None, export: Path, allow_unknown_role: bool) -> None:
    """Make this node's tokens match EXPORT (from `token export` on another node): new tokens are added,
    revocations and expiries follow; run it again after every change on the node that issues tokens."""
    raw = files.read_bytes(export, TOKEN_EXPORT)
    source = hashlib.sha256(raw).hexdigest()[:16]
    rows = []
    for number, line in enumerate(raw.decode("utf-8", "replace").splitlines(), 1):
        try:
            rows.append(json.loads(line))
        except ValueError:
            raise OperatorError(f"{export} line {number}: not JSON (expected `token export`)") from None
    with open_home(home).open_vault() as vault:
        if not allow_unknown_role:
            policy = bundle_import.policy_in_force(vault)
            for row in rows:
                if isinstance(row, dict):
                    _require_role(policy, str(row.get("org")), str(row.get("role")))
        os_user = this_os_user()

        def record(conn: sqlite3.Connection, caller: str, detail: str) -> None:
            entry = {
                "type": "admin",
                "claw_id": caller,
                "detail": f"{detail} from={source}",
                "os_user": os_user,
            }
            vault.ledger.record_in(conn, entry)

        for caller, outcome in vault.tokens.import_rows(rows, record):
            click.echo(f"{caller}: {outcome}")
