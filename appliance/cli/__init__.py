"""``phi-gateway``: the operator's command line (the documented interface runbooks are written against).

Owns: argument parsing, what each verb prints, exit codes (0 ok, 1 operator error, 2 usage), and the
``admin`` ledger record of every change an operator makes (init, policy import, trust, keys, tokens).
Never: echoes a provider key; prints a token except once, on its own last line, at ``token issue``;
writes the vault except through the vault's single writer.
"""

from __future__ import annotations

import hashlib
import json
import logging
import re
import sqlite3
import sys
from collections.abc import Callable
from datetime import UTC, datetime, timedelta
from pathlib import Path
from typing import Any, TypeVar

import click

from appliance import __version__, demo, signing_keys
from appliance.admin import AdminClient
from appliance.errors import BundleRejected, GatewayError, OperatorError
from appliance.home import Home, Vault, resolve_home
from appliance.policy import dsse, importer
from appliance.policy.diff import summarize_change
from appliance.policy.explain import explain
from appliance.policy.schema import Policy, parse_policy
from local_models.registry import ModelRegistry

F = TypeVar("F", bound=Callable[..., Any])


class _Group(click.Group):
    def invoke(self, ctx: click.Context) -> Any:
        try:
            return super().invoke(ctx)
        except (OperatorError, GatewayError) as exc:  # GatewayError: the vault cannot be written, say
            click.echo(f"error: {exc}", err=True)
            ctx.exit(1)
        except sqlite3.Error as exc:
            click.echo(f"error: the vault database failed: {exc}", err=True)
            ctx.exit(1)


def home_option(fn: F) -> F:
    return click.option(
        "--home",
        envvar="PHI_HOME",
        type=click.Path(file_okay=False, path_type=Path),
        default=None,
        help="Gateway home directory (env PHI_HOME; default /var/lib/phi-gateway).",
    )(fn)


def _home(path: Path | None, *, initialized: bool = True) -> Home:
    home = Home(resolve_home(path))
    if initialized:
        home.require_initialized()
    return home


def _audit(vault: Vault, detail: str, claw_id: str | None = None) -> None:
    vault.ledger.append_sync({"type": "admin", "claw_id": claw_id, "detail": detail})


@click.group(cls=_Group, context_settings={"help_option_names": ["-h", "--help"]})
@click.version_option(__version__, prog_name="phi-gateway")
def main() -> None:
    """Phi Gateway: an air-gapped AI gateway for protected health data."""
    logging.basicConfig(
        level=logging.INFO, format="%(asctime)s %(levelname)s %(name)s: %(message)s", stream=sys.stderr
    )


# -- set-up and serving ----------------------------------------------------------------------------------


@main.command()
@home_option
@click.option(
    "--site", required=True, help="This appliance's site id (policy bundles must name it in scope)."
)
def init(home: Path | None, site: str) -> None:
    """Create a gateway home: vault, master key (0600), appliance signing key, settings."""
    for line in _home(home, initialized=False).init(site):
        click.echo(f"created {line}")


@main.command()
@home_option
@click.option("--host", default=None, help="Listen address (default from settings: 0.0.0.0).")
@click.option("--port", type=int, default=None, help="Listen port (default from settings: 8080).")
def serve(home: Path | None, host: str | None, port: int | None) -> None:
    """Serve the API until SIGTERM/SIGINT, then drain in-flight requests."""
    from appliance.gateway import Gateway

    Gateway(_home(home), audit_out=sys.stdout).run(host, port)


@main.command("demo")
@click.option(
    "--home",
    type=click.Path(file_okay=False, path_type=Path),
    default=Path("demo-home"),
    show_default=True,
    help="Demo home (created if missing).",
)
@click.option("--host", default="127.0.0.1", show_default=True)
@click.option("--port", type=int, default=8080, show_default=True)
def demo_cmd(home: Path, host: str, port: int) -> None:
    """Prepare a demo home (demo key, signed demo policy, a token) and serve it."""
    from appliance.gateway import Gateway

    target = Home(home.resolve())
    token, done = demo.prepare(target)
    for line in done:
        click.echo(line, err=True)
    click.echo(
        f"\nPhi Gateway demo on http://{host}:{port}/v1 (home {target.root})\n"
        f"  curl -s http://{host}:{port}/v1/models -H 'Authorization: Bearer {token}'\n"
        f"  curl -s http://{host}:{port}/v1/chat/completions -H 'Authorization: Bearer {token}' "
        f'-d \'{{"model": "local/demo", "messages": [{{"role": "user", "content": "hi"}}]}}\'\n'
        f"  OpenAI SDK: OpenAI(base_url='http://{host}:{port}/v1', api_key='{token}')\n"
        f"token: {token}\n",
        err=True,
    )
    Gateway(target, audit_out=sys.stdout).run(host, port)


@main.command("status")
@home_option
def status_cmd(home: Path | None) -> None:
    """Ask the running gateway how it is (policy, ledger, local models), through its admin socket."""
    click.echo(json.dumps(AdminClient(_home(home).admin_socket).call("GET", "/admin/status"), indent=2))


@main.group("config")
def config_group() -> None:
    """Settings."""


@config_group.command("show")
@home_option
def config_show(home: Path | None) -> None:
    """Print the validated settings (gateway.toml plus PHI_ overrides)."""
    click.echo(_home(home).settings().masked())


# -- policy ----------------------------------------------------------------------------------------------


@main.group("policy")
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
    payload = policy_file.read_bytes()
    try:
        parse_policy(payload)  # the same strict parser the import uses: refuse to sign what would be refused
    except BundleRejected as exc:
        raise OperatorError(f"{policy_file} is not a valid policy: {exc}") from exc
    signers = [signing_keys.load_signing_key(path) for path in key_files]
    out.write_bytes(dsse.sign(payload, signers))
    click.echo(f"wrote {out} signed by {', '.join(s.keyid[:16] for s in signers)}")


def _read_bundle(path: Path) -> bytes:
    size = path.stat().st_size
    if size > importer.MAX_BUNDLE_BYTES:
        raise OperatorError(
            f"bundle rejected (size): {path} is {size} bytes, over {importer.MAX_BUNDLE_BYTES}"
        )
    return path.read_bytes()


@policy_group.command("verify")
@home_option
@click.argument("bundle", type=click.Path(exists=True, dir_okay=False, path_type=Path))
def policy_verify(home: Path | None, bundle: Path) -> None:
    """Run every import check on BUNDLE without activating it."""
    target = _home(home)
    with target.open_vault() as vault:
        vb = importer.verify_bundle(
            _read_bundle(bundle),
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
    target = _home(home)
    data = _read_bundle(bundle)
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
            _audit(vault, f"trust_rotation_completed v{old.version}")
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
@click.option("--data-class", type=click.Choice(["phi", "deidentified", "public"]), default=None)
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
    with _home(home).open_vault() as vault:
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
    doc = AdminClient(_home(home).admin_socket).call("POST", "/admin/policy/reload")
    click.echo(
        f"policy v{doc['version']} in force" if doc["version"] else f"no policy in force: {doc['reason']}"
    )


@policy_group.command("show")
@home_option
def policy_show(home: Path | None) -> None:
    """Print the policy in force."""
    with _home(home).open_vault() as vault:
        active = vault.policies.current()
    if active is None:
        raise OperatorError("no policy has been imported: every API request is refused")
    click.echo(json.dumps(json.loads(dsse.parse_envelope(active.envelope).payload), indent=2))


@policy_group.command("history")
@home_option
def policy_history(home: Path | None) -> None:
    """List every imported policy version."""
    with _home(home).open_vault() as vault:
        rows = vault.policies.history()
    for row in rows:
        click.echo(json.dumps(row, default=str))


# -- local models --------------------------------------------------------------------------------------


@main.group("models")
def models_group() -> None:
    """Local GGUF models, pinned by SHA-256 in the policy, files in <home>/models."""


def _registry(home: Path | None) -> ModelRegistry:
    target = _home(home)
    with target.open_vault() as vault:
        active = vault.policies.current()
    if active is None:
        raise OperatorError("no policy has been imported: no local model is pinned")
    policy = Policy.model_validate_json(dsse.parse_envelope(active.envelope).payload)
    return ModelRegistry(target.models_dir, dict(policy.models))


@models_group.command("list")
@home_option
def models_list(home: Path | None) -> None:
    """The local models the policy in force pins, and whether their files are present."""
    for row in _registry(home).listing():
        size = f"{row['size_bytes']} bytes" if row["present"] else "MISSING"
        click.echo(f"{row['name']}\t{row['file']}\t{size}\tsha256 {row['sha256']}")


@models_group.command("verify")
@home_option
def models_verify(home: Path | None) -> None:
    """Hash every pinned file; exit 1 if any is missing or differs from its pin."""
    results = _registry(home).verify_all()
    for model, outcome in results:
        click.echo(f"{model}: {outcome}")
    if any(outcome != "ok" for _, outcome in results):
        raise OperatorError("some local models do not match the policy's pins")


@models_group.command("load")
@home_option
@click.argument("model")
def models_load(home: Path | None, model: str) -> None:
    """Verify and load MODEL (local/<name>) in the running gateway."""
    _model_verb(home, model, "load")


@models_group.command("unload")
@home_option
@click.argument("model")
def models_unload(home: Path | None, model: str) -> None:
    """Unload MODEL from the running gateway (it loads again on its next request)."""
    _model_verb(home, model, "unload")


def _model_verb(home: Path | None, model: str, verb: str) -> None:
    doc = AdminClient(_home(home).admin_socket).call("POST", f"/admin/models/{verb}", {"model": model})
    click.echo(f"{doc['model']} {verb}ed")


# -- trust -----------------------------------------------------------------------------------------------


@main.group("trust")
def trust_group() -> None:
    """Policy-authoring keys this appliance trusts."""


@trust_group.command("add")
@home_option
@click.argument("pubfile", type=click.Path(exists=True, dir_okay=False, path_type=Path))
def trust_add(home: Path | None, pubfile: Path) -> None:
    """Pin an authoring public key."""
    target = _home(home)
    trust = target.trust()
    keyid = trust.add(pubfile)
    trust.save()
    _audit_change(target, f"trust_add {keyid[:16]}")
    click.echo(f"trusted key {keyid} (threshold {trust.threshold} of {len(trust.keys)})")


@trust_group.command("remove")
@home_option
@click.argument("keyid")
def trust_remove(home: Path | None, keyid: str) -> None:
    """Unpin an authoring key, by its id or a unique prefix of 8+ digits (a policy it alone signed stops
    verifying: running gateways then refuse requests)."""
    target = _home(home)
    trust = target.trust()
    keyid = trust.resolve(keyid)
    trust.remove(keyid)
    trust.save()
    _audit_change(target, f"trust_remove {keyid[:16]}")
    click.echo(f"removed key {keyid}")


@trust_group.command("threshold")
@home_option
@click.argument("n", type=int)
def trust_threshold(home: Path | None, n: int) -> None:
    """Require N distinct trusted signatures on every bundle."""
    target = _home(home)
    trust = target.trust()
    trust.set_threshold(n)
    trust.save()
    _audit_change(target, f"trust_threshold {n}")
    click.echo(f"threshold {n} of {len(trust.keys)}")


@trust_group.command("list")
@home_option
def trust_list(home: Path | None) -> None:
    """List trusted keys and the threshold."""
    trust = _home(home).trust()
    click.echo(f"threshold {trust.threshold}")
    for keyid in trust.keys:
        click.echo(keyid)


def _audit_change(home: Home, detail: str, claw_id: str | None = None) -> None:
    with home.open_vault() as vault:
        _audit(vault, detail, claw_id)


# -- provider keys ---------------------------------------------------------------------------------------


@main.group("keys")
def keys_group() -> None:
    """Provider keys, sealed in the vault (the applications never hold them)."""


@keys_group.command("set")
@home_option
@click.argument("route")
def keys_set(home: Path | None, route: str) -> None:
    """Seal the provider key for ROUTE, read from standard input (never echoed)."""
    if sys.stdin.isatty():
        secret = click.prompt(f"provider key for {route}", hide_input=True)
    else:
        secret = sys.stdin.read()
    if not secret.strip():
        raise OperatorError("no key on standard input; usage: phi-gateway keys set ROUTE < key.txt")
    with _home(home).open_vault() as vault:
        fingerprint = vault.keys.set(route, secret)
        _audit(vault, f"key_set route={route} {fingerprint}")
    click.echo(f"key for route {route} sealed ({fingerprint})")


@keys_group.command("list")
@home_option
def keys_list(home: Path | None) -> None:
    """List provider keys: route names and fingerprints only."""
    with _home(home).open_vault() as vault:
        rows = vault.keys.list()
    for row in rows:
        click.echo(f"{row['name']}\t{row['fingerprint']}\tupdated {row['updated_at']}")


@keys_group.command("remove")
@home_option
@click.argument("route")
def keys_remove(home: Path | None, route: str) -> None:
    """Delete the provider key for ROUTE."""
    with _home(home).open_vault() as vault:
        if not vault.keys.remove(route):
            raise OperatorError(f"no key is set for route {route}")
        _audit(vault, f"key_remove route={route}")
    click.echo(f"key for route {route} removed")


# -- tokens ----------------------------------------------------------------------------------------------


@main.group("token")
def token_group() -> None:
    """Caller tokens (<caller-id>:<48 hex>), stored only as SHA-256."""


_DURATION = re.compile(r"^(\d+)([dhm])$")


def _parse_expiry(value: str | None) -> datetime | None:
    if value is None:
        return None
    match = _DURATION.match(value)
    if match:
        amount, unit = int(match.group(1)), match.group(2)
        delta = {"d": timedelta(days=amount), "h": timedelta(hours=amount), "m": timedelta(minutes=amount)}[
            unit
        ]
        return datetime.now(UTC) + delta
    try:
        moment = datetime.fromisoformat(value.replace("Z", "+00:00"))
    except ValueError as exc:
        raise OperatorError(f"--expires {value!r}: use 30d, 12h, 45m or an ISO 8601 time") from exc
    return moment if moment.tzinfo else moment.replace(tzinfo=UTC)


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
    with _home(home).open_vault() as vault:
        if not allow_unknown_role:
            _require_role(vault, org, role)
        token = vault.tokens.issue(caller, org, role, expires_at=_parse_expiry(expires), note=note)
        _audit(vault, f"token_issue org={org} role={role}", claw_id=caller)
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
    with _home(home).open_vault() as vault:
        rows = vault.tokens.list(include_revoked=include_revoked)
    for row in rows:
        click.echo(json.dumps(row, default=str))


@token_group.command("revoke")
@home_option
@click.argument("caller")
def token_revoke(home: Path | None, caller: str) -> None:
    """Revoke every token of CALLER (effective on the next request, no restart)."""
    with _home(home).open_vault() as vault:
        count = vault.tokens.revoke(caller)
        if count == 0:
            raise OperatorError(f"{caller} has no active token")
        _audit(vault, f"token_revoke count={count}", claw_id=caller)
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
    with _home(home).open_vault() as vault:
        if not allow_unknown_role:
            _require_role(vault, org, role)
        results = vault.tokens.import_cllama(directory, org=org, role=role)
        for caller, outcome in results:
            if outcome == "imported":
                _audit(vault, f"token_import_cllama org={org} role={role}", claw_id=caller)
            click.echo(f"{caller}: {outcome}")


# -- audit: appliance/cli_audit.py ------------------------------------------------------------------------

from appliance.cli.audit import audit_group  # noqa: E402 - it uses this module's options and helpers

main.add_command(audit_group)
