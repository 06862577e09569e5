"""``phi-gateway policy …``: authoring keys, signing, verifying, importing and explaining policy bundles.

Owns: the command line of those verbs, and the ``admin`` record of an import (committed with it).
Never: prints a signing key; activates a bundle the importer has not verified; signs a document the
import would refuse.
"""

from __future__ import annotations

import hashlib
import json
import sqlite3
from pathlib import Path

import click

from appliance import files, signing_keys
from appliance.admin import AdminClient
from appliance.cli.options import home_option, open_home, record_admin
from appliance.errors import BundleRejected, OperatorError
from appliance.policy import dsse, importer
from appliance.policy.diff import summarize_change
from appliance.policy.explain import explain
from appliance.policy.schema import DATA_CLASSES, Policy, parse_policy

BUNDLE = files.Input("policy bundle", importer.MAX_BUNDLE_BYTES)
"""A bundle larger than the importer accepts is refused before it is read (``files.read_bytes``)."""
POLICY_DOCUMENT = files.Input("policy document", importer.MAX_BUNDLE_BYTES)


@click.group("policy")
def policy_group() -> None:
    """Policy bundles: author keys, sign, verify, import, show."""


@policy_group.command("keygen")
@click.option(
    "--out",
    required=True,
    type=click.Path(dir_okay=False, path_type=Path),
    help="Writes OUT.key (0600) and OUT.pub.",
)
def policy_keygen(out: Path) -> None:
    """Create an Ed25519 policy-authoring key pair."""
    keyid = signing_keys.generate(out)
    click.echo(f"wrote {out}.key (0600) and {out}.pub\nkey id {keyid}")


@policy_group.command("sign")
@click.argument("policy_file", type=click.Path(exists=True, dir_okay=False, path_type=Path))
@click.option(
    "--key",
    "key_files",
    required=True,
    multiple=True,
    type=click.Path(exists=True, dir_okay=False, path_type=Path),
    help="Signing key (repeatable).",
)
@click.option("--out", required=True, type=click.Path(dir_okay=False, path_type=Path))
def policy_sign(policy_file: Path, key_files: tuple[Path, ...], out: Path) -> None:
    """Sign a policy JSON document into a bundle (DSSE envelope)."""
    payload = files.read_bytes(policy_file, POLICY_DOCUMENT)
    try:
        parse_policy(payload)  # the same strict parser the import uses: refuse to sign what would be refused
    except BundleRejected as exc:
        raise OperatorError(f"{policy_file} is not a valid policy: {exc}") from exc
    for path in key_files:
        files.require_regular(path, files.KEY_FILE)  # signing_keys opens it itself: no FIFO may block that
    signers = [signing_keys.load_signing_key(path) for path in key_files]
    out.write_bytes(dsse.sign(payload, signers))
    click.echo(f"wrote {out} signed by {', '.join(s.keyid[:16] for s in signers)}")


@policy_group.command("verify")
@home_option
@click.argument("bundle", type=click.Path(exists=True, dir_okay=False, path_type=Path))
def policy_verify(home: Path | None, bundle: Path) -> None:
    """Run every import check on BUNDLE without activating it."""
    target = open_home(home)
    data = files.read_bytes(bundle, BUNDLE)
    with target.open_vault() as vault:
        vb = importer.verify_bundle(
            data,
            target.trust(),
            site=target.settings().site,
            current_version=vault.policies.current_version(),
        )
    click.echo(
        f"ok: policy v{vb.policy.version}, sha256 {vb.sha256}, signed by {len(vb.keyids)} trusted key(s)"
    )


@policy_group.command("import")
@home_option
@click.argument("bundle", type=click.Path(exists=True, dir_okay=False, path_type=Path))
def policy_import(home: Path | None, bundle: Path) -> None:
    """Verify BUNDLE and make it the policy in force; prints what changed."""
    target = open_home(home)
    data = files.read_bytes(bundle, BUNDLE)
    with target.open_vault() as vault:
        active = vault.policies.current()
        old = Policy.model_validate_json(dsse.parse_envelope(active.envelope).payload) if active else None
        if active is not None and old is not None and hashlib.sha256(data).hexdigest() == active.sha256:
            # The bundle in force, given again: finish a trust rotation an interruption left half done (it
            # was verified against both key sets when it was activated); anything else is a no-op.
            trust = target.trust()
            if old.trust is None or trust.matches(old.trust):
                raise OperatorError(f"policy v{old.version} is this bundle, and it is already in force")
            trust.replace(old.trust)
            record_admin(vault, f"trust_rotation_completed v{old.version}")
            click.echo(f"trust rotation of policy v{old.version} completed")
            return
        vb = importer.verify_bundle(
            data,
            target.trust(),
            site=target.settings().site,
            current_version=active.version if active else None,
        )
        detail = (
            f"policy_import v{vb.policy.version} sha256:{vb.sha256[:16]} "
            f"keys={','.join(k[:16] for k in vb.keyids)}"
        )
        if vb.new_trust is not None:
            detail += f" trust_rotation threshold={vb.new_trust.threshold} keys={len(vb.new_trust.keys)}"
        ledger = vault.ledger

        def record_and_checkpoint(conn: sqlite3.Connection) -> None:
            # The import, its record and a signed checkpoint covering it commit together.
            ledger.record_in(conn, {"type": "admin", "detail": detail})
            ledger.checkpoint_in(conn, "policy-import")

        vault.policies.activate(vb, also=record_and_checkpoint)
    if vb.new_trust is not None:
        # After the activation: a crash in between leaves the stored bundle verifying against the old set.
        trust = target.trust()
        trust.replace(vb.new_trust)
        click.echo(f"trust rotated: {len(vb.new_trust.keys)} key(s), threshold {vb.new_trust.threshold}")
    click.echo(f"policy v{vb.policy.version} imported and in force (running gateways switch within seconds)")
    for line in summarize_change(old, vb.policy):
        click.echo(f"  {line}")


@policy_group.command("explain")
@home_option
@click.option("--caller", default=None, help="A caller id: its token's organization and role are used.")
@click.option("--org", default=None, help="Organization (instead of --caller).")
@click.option("--role", default=None, help="Role (instead of --caller).")
@click.option("--model", required=True, help="provider/model or an alias.")
@click.option("--data-class", type=click.Choice(DATA_CLASSES), default=None)
@click.option("--tools", default="", help="Comma-separated tool names the request would carry.")
@click.option("--max-tokens", type=int, default=None)
def policy_explain(
    home: Path | None,
    caller: str | None,
    org: str | None,
    role: str | None,
    model: str,
    data_class: str | None,
    tools: str,
    max_tokens: int | None,
) -> None:
    """Print what the policy in force decides for such a request, and the rules that decide; sends nothing."""
    with open_home(home).open_vault() as vault:
        active = vault.policies.current()
        if caller is not None:
            rows = [row for row in vault.tokens.list() if row["caller"] == caller]
            if not rows:
                raise OperatorError(f"{caller} has no active token")
            org, role = rows[-1]["org"], rows[-1]["role"]
    if org is None or role is None:
        raise OperatorError("name the caller (--caller) or its organization and role (--org and --role)")
    if active is None:
        raise OperatorError("no policy has been imported: every request is refused")
    policy = Policy.model_validate_json(dsse.parse_envelope(active.envelope).payload)
    names = [name.strip() for name in tools.split(",") if name.strip()]
    for line in explain(
        policy, org=org, role=role, model=model, data_class=data_class, tools=names, max_tokens=max_tokens
    ):
        click.echo(line)


@policy_group.command("reload")
@home_option
def policy_reload(home: Path | None) -> None:
    """Make the running gateway look for a new policy or trust file now (it also does every second)."""
    doc = AdminClient(open_home(home).admin_socket).call("POST", "/admin/policy/reload")
    click.echo(
        f"policy v{doc['version']} in force" if doc["version"] else f"no policy in force: {doc['reason']}"
    )


@policy_group.command("show")
@home_option
def policy_show(home: Path | None) -> None:
    """Print the policy in force."""
    with open_home(home).open_vault() as vault:
        active = vault.policies.current()
    if active is None:
        raise OperatorError("no policy has been imported: every API request is refused")
    click.echo(json.dumps(json.loads(dsse.parse_envelope(active.envelope).payload), indent=2))


@policy_group.command("history")
@home_option
def policy_history(home: Path | None) -> None:
    """List every imported policy version."""
    with open_home(home).open_vault() as vault:
        rows = vault.policies.history()
    for row in rows:
        click.echo(json.dumps(row, default=str))
