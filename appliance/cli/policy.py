"""``phi-gateway policy …``: authoring keys, signing, verifying, importing and explaining policy bundles,
and printing the policy document's schema.

Owns: the command line of those verbs, their ``--json`` documents for scripts (``verify``, ``import``:
``_bundle_document``; ``explain``: ``Explanation.document``), and the ``admin`` record of an import
(committed with it). Never: prints a signing key; activates a bundle the importer has not verified; signs
a document the import would refuse.
"""

from __future__ import annotations

import hashlib
import json
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path

import click

from appliance import bundle_import, files, signing_keys
from appliance.admin.client import AdminClient
from appliance.cli.options import home_option, open_home, record_admin
from appliance.errors import BundleRejected, OperatorError
from appliance.os_user import this_os_user
from appliance.policy import dsse, importer, reference
from appliance.policy.client_certificates import Certificate
from appliance.policy.diff import changes
from appliance.policy.explain import explain_request
from appliance.policy.schema import DATA_CLASSES, Policy, parse_policy
from appliance.x509_names import canonical

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


_JSON_OPTION = click.option(
    "--json", "as_json", is_flag=True, help="Print one JSON document for scripts (keys in the README)."
)


@policy_group.command("schema")
@click.option("--markdown", is_flag=True, help="The README's policy reference (markdown) instead.")
@click.option("--out", type=click.Path(dir_okay=False, path_type=Path), default=None, help="Write to OUT.")
def policy_schema(markdown: bool, out: Path | None) -> None:
    """Print the JSON Schema of the policy document (every field, its default and description)."""
    text = reference.reference_markdown() if markdown else json.dumps(reference.policy_schema(), indent=2)
    if out is None:
        click.echo(text)
        return
    out.write_text(text + "\n", encoding="utf-8")
    click.echo(f"wrote {out}")


@policy_group.command("verify")
@home_option
@_JSON_OPTION
@click.argument("bundle", type=click.Path(exists=True, dir_okay=False, path_type=Path))
def policy_verify(home: Path | None, as_json: bool, bundle: Path) -> None:
    """Run every import check on BUNDLE without activating it; prints what importing it would change."""
    target = open_home(home)
    data = files.read_bytes(bundle, BUNDLE)
    with target.open_vault() as vault, _rejections_as_json(as_json):
        old = bundle_import.policy_in_force(vault)
        vb = bundle_import.verify(target, vault, data)
    if as_json:
        click.echo(json.dumps(bundle_import.document(vb, old, imported=False), indent=2))
        return
    click.echo(
        f"ok: policy v{vb.policy.version}, sha256 {vb.sha256}, signed by {len(vb.keyids)} trusted key(s)"
    )
    _print_changes("importing it would change:", old, vb.policy)


@policy_group.command("import")
@home_option
@_JSON_OPTION
@click.argument("bundle", type=click.Path(exists=True, dir_okay=False, path_type=Path))
def policy_import(home: Path | None, as_json: bool, bundle: Path) -> None:
    """Verify BUNDLE and make it the policy in force; prints what changed."""
    target = open_home(home)
    data = files.read_bytes(bundle, BUNDLE)
    with target.open_vault() as vault, _rejections_as_json(as_json):
        active = vault.policies.current()
        old = bundle_import.policy_in_force(vault)
        if active is not None and old is not None and hashlib.sha256(data).hexdigest() == active.sha256:
            # The bundle in force, given again: finish a trust rotation an interruption left half done (it
            # was verified against both key sets when it was activated); anything else is a no-op.
            trust = target.trust()
            if old.trust is None or trust.matches(old.trust):
                raise OperatorError(f"policy v{old.version} is this bundle, and it is already in force")
            rotation = trust.rotation_detail(old.trust)
            trust.replace(old.trust)
            record_admin(vault, f"trust_rotation_completed v{old.version} {rotation}")
            click.echo(
                json.dumps(
                    {"ok": True, "imported": False, "trust_rotation_completed": True, "version": old.version}
                )
                if as_json
                else f"trust rotation of policy v{old.version} completed"
            )
            return
        vb = bundle_import.verify(target, vault, data)
        bundle_import.activate(target, vault, vb, this_os_user())
    if vb.new_trust is not None and not as_json:
        click.echo(f"trust rotated: {len(vb.new_trust.keys)} key(s), threshold {vb.new_trust.threshold}")
    if as_json:
        click.echo(json.dumps(bundle_import.document(vb, old, imported=True), indent=2))
        return
    _print_changes(
        f"policy v{vb.policy.version} imported and in force (running gateways switch within seconds)",
        old,
        vb.policy,
    )


@policy_group.command("explain")
@home_option
@click.option("--caller", default=None, help="A caller id: its token's organization and role are used.")
@click.option("--org", default=None, help="Organization (instead of --caller).")
@click.option("--role", default=None, help="Role (instead of --caller).")
@click.option("--model", required=True, help="provider/model or an alias.")
@click.option("--data-class", type=click.Choice(DATA_CLASSES), default=None)
@click.option("--tools", default="", help="Comma-separated tool names the request would carry.")
@click.option("--max-tokens", type=int, default=None)
@click.option(
    "--client-cert",
    "client_cert",
    default=None,
    metavar="SUBJECT",
    help="The RFC 4514 subject of the client certificate the connection presents (default: none).",
)
@_JSON_OPTION
def policy_explain(
    home: Path | None,
    caller: str | None,
    org: str | None,
    role: str | None,
    model: str,
    data_class: str | None,
    tools: str,
    max_tokens: int | None,
    client_cert: str | None,
    as_json: bool,
) -> None:
    """Print what the policy in force decides for such a request, and the rules that decide; sends nothing."""
    target = open_home(home)
    client_ca = target.settings().server.tls.client_ca_file is not None
    with target.open_vault() as vault:
        policy = bundle_import.policy_in_force(vault)
        if caller is not None:
            rows = [row for row in vault.tokens.list() if row["caller"] == caller]
            if not rows:
                raise OperatorError(f"{caller} has no active token")
            org, role = rows[-1]["org"], rows[-1]["role"]
    if org is None or role is None:
        raise OperatorError("name the caller (--caller) or its organization and role (--org and --role)")
    if policy is None:
        raise OperatorError("no policy has been imported: every request is refused")
    names = [name.strip() for name in tools.split(",") if name.strip()]
    explanation = explain_request(
        policy,
        org=org,
        role=role,
        model=model,
        data_class=data_class,
        tools=names,
        max_tokens=max_tokens,
        certificate=Certificate(
            presented=client_cert is not None, subject=_subject(client_cert), client_ca=client_ca
        ),
    )
    if as_json:
        click.echo(json.dumps(explanation.document(), indent=2))
        return
    for line in explanation.lines():
        click.echo(line)


def _print_changes(heading: str, old: Policy | None, new: Policy) -> None:
    click.echo(heading)
    for change in changes(old, new):
        click.echo(f"  {change.line()}")


def _subject(written: str | None) -> str | None:
    """``--client-cert`` in the form the gateway compares (``appliance.x509_names``)."""
    if written is None:
        return None
    try:
        return canonical(written)
    except ValueError as exc:
        raise OperatorError(f"--client-cert: {exc}") from None


@contextmanager
def _rejections_as_json(as_json: bool) -> Iterator[None]:
    """With ``--json``, a refused bundle is a document too: ``{"ok": false, "check", "message"}``, exit 1."""
    try:
        yield
    except BundleRejected as exc:
        if not as_json:
            raise
        click.echo(json.dumps({"ok": False, "check": exc.check, "message": str(exc)}, indent=2))
        raise click.exceptions.Exit(1) from exc


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
