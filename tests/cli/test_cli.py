"""The operator's command line, verb by verb, as the README's runbook uses it."""

from __future__ import annotations

import json
import os
import re
import sqlite3
import stat
from pathlib import Path

from click.testing import CliRunner, Result

from appliance.cli import main
from tests.support.gateway import policy_doc

SECRET_KEY = "sk-live-cli-test-0123456789abcdef"


def _run(*args: str, input: str | None = None, ok: bool = True) -> Result:
    result = CliRunner().invoke(main, list(args), input=input, catch_exceptions=False)
    if ok:
        assert result.exit_code == 0, result.output
    return result


def _setup(tmp_path: Path, site: str = "stmarys-main") -> tuple[Path, Path]:
    home = tmp_path / "home"
    out = _run("init", "--home", str(home), "--site", site).stdout
    assert "master.key" in out
    author = tmp_path / "author"
    _run("policy", "keygen", "--out", str(author))
    _run("trust", "add", f"{author}.pub", "--home", str(home))
    return home, author


def _sign_both(source: Path, author: Path, successor: Path, out: Path) -> Path:
    """``source`` signed by the authoring key trusted now and its successor: what a rotation needs."""
    _run(
        "policy",
        "sign",
        str(source),
        "--key",
        f"{author}.key",
        "--key",
        f"{successor}.key",
        "--out",
        str(out),
    )
    return out


def _bundle(tmp_path: Path, author: Path, version: int = 1, site: str = "stmarys-main") -> Path:
    doc = policy_doc("http://127.0.0.1:9", version=version, scope={"sites": [site]})
    source = tmp_path / f"policy-v{version}.json"
    source.write_text(json.dumps(doc))
    bundle = tmp_path / f"site-v{version}.bundle"
    _run("policy", "sign", str(source), "--key", f"{author}.key", "--out", str(bundle))
    return bundle


def test_the_runbook_end_to_end(tmp_path: Path) -> None:
    home, author = _setup(tmp_path)
    assert stat.S_IMODE(os.stat(home / "master.key").st_mode) == 0o600
    assert stat.S_IMODE(os.stat(f"{author}.key").st_mode) == 0o600
    assert stat.S_IMODE(os.stat(home).st_mode) == 0o700

    imported = _run("policy", "import", str(_bundle(tmp_path, author)), "--home", str(home)).stdout
    assert "policy v1 imported" in imported
    changed = _run("policy", "import", str(_bundle(tmp_path, author, 2)), "--home", str(home)).stdout
    assert "v1" in changed and "v2" in changed

    keys = _run("keys", "set", "openai", "--home", str(home), input=SECRET_KEY + "\n")
    assert SECRET_KEY not in keys.output and "sha256:" in keys.stdout
    listed = _run("keys", "list", "--home", str(home)).stdout
    assert "openai" in listed and SECRET_KEY not in listed

    issued = _run(
        "token",
        "issue",
        "--caller",
        "radiology-bot",
        "--org",
        "stmarys",
        "--role",
        "radiology",
        "--home",
        str(home),
    )
    token = issued.stdout.strip().splitlines()[-1]
    assert re.fullmatch(r"radiology-bot:[0-9a-f]{48}", token)
    tokens = _run("token", "list", "--home", str(home)).stdout
    assert "radiology-bot" in tokens and token.split(":")[1] not in tokens

    assert "revoked 1" in _run("token", "revoke", "radiology-bot", "--home", str(home)).stdout
    assert _run("token", "revoke", "radiology-bot", "--home", str(home), ok=False).exit_code == 1

    verified = _run("audit", "verify", "--home", str(home)).stdout
    assert verified.startswith("ok:")
    details = [
        json.loads(line)["detail"] for line in _run("audit", "tail", "--home", str(home)).stdout.splitlines()
    ]
    assert any(d.startswith("policy_import v2") for d in details) and any("key_set" in d for d in details)
    everything = "\n".join(details)
    assert SECRET_KEY not in everything and token not in everything


def test_import_rejections_change_nothing(tmp_path: Path) -> None:
    home, author = _setup(tmp_path)
    _run("policy", "import", str(_bundle(tmp_path, author, 3)), "--home", str(home))
    rollback = _run("policy", "import", str(_bundle(tmp_path, author, 2)), "--home", str(home), ok=False)
    assert rollback.exit_code == 1 and "rollback" in rollback.output
    wrong_site = _run(
        "policy", "import", str(_bundle(tmp_path, author, 4, site="elsewhere")), "--home", str(home), ok=False
    )
    assert "scope" in wrong_site.output
    stranger = tmp_path / "stranger"
    _run("policy", "keygen", "--out", str(stranger))
    unknown = _run("policy", "import", str(_bundle(tmp_path, stranger, 5)), "--home", str(home), ok=False)
    assert "unknown_key" in unknown.output
    shown = json.loads(_run("policy", "show", "--home", str(home)).stdout)
    assert shown["version"] == 3


def test_unknown_role_is_refused_unless_forced(tmp_path: Path) -> None:
    home, author = _setup(tmp_path)
    _run("policy", "import", str(_bundle(tmp_path, author)), "--home", str(home))
    refused = _run(
        "token",
        "issue",
        "--caller",
        "x",
        "--org",
        "stmarys",
        "--role",
        "radiolgy",
        "--home",
        str(home),
        ok=False,
    )
    assert refused.exit_code == 1 and "radiolgy" in refused.output
    forced = _run(
        "token",
        "issue",
        "--caller",
        "x",
        "--org",
        "stmarys",
        "--role",
        "radiolgy",
        "--allow-unknown-role",
        "--home",
        str(home),
    )
    assert forced.stdout.strip().startswith("x:")


def test_audit_verify_exits_nonzero_on_tampering(tmp_path: Path) -> None:
    home, author = _setup(tmp_path)
    _run("policy", "import", str(_bundle(tmp_path, author)), "--home", str(home))
    with sqlite3.connect(home / "vault.db") as raw:
        raw.execute(
            "DROP TRIGGER ledger_append_only_update"
        )  # someone with the file can; verify still sees it
        raw.execute(
            "UPDATE ledger SET record = replace(record, 'policy_import', 'policy_imp0rt') WHERE seq = ("
            "SELECT max(seq) FROM ledger)"
        )
    result = _run("audit", "verify", "--home", str(home), ok=False)
    assert result.exit_code == 1 and "FAILED" in result.output


def test_home_from_environment_and_errors_for_uninitialized(tmp_path: Path) -> None:
    result = CliRunner(env={"PHI_HOME": str(tmp_path / "nowhere")}).invoke(main, ["token", "list"])
    assert result.exit_code == 1 and "not an initialized gateway home" in result.output
    home, _ = _setup(tmp_path)
    again = _run("init", "--home", str(home), "--site", "x", ok=False)
    assert again.exit_code == 1 and "already initialized" in again.output


def test_import_cllama_context_directory(tmp_path: Path) -> None:
    home, _ = _setup(tmp_path)
    context = tmp_path / "context"
    (context / "agent-7").mkdir(parents=True)
    token = "agent-7:" + "ab" * 24
    (context / "agent-7" / "metadata.json").write_text(json.dumps({"token": token}))
    out = _run(
        "token", "import-cllama", str(context), "--org", "stmarys", "--role", "radiology", "--home", str(home)
    ).stdout
    assert "agent-7: imported" in out
    listed = _run("token", "list", "--home", str(home)).stdout
    assert "agent-7" in listed and "ab" * 24 not in listed


def test_trust_remove_by_prefix(tmp_path: Path) -> None:
    home, author = _setup(tmp_path)
    keyid = json.loads(Path(f"{author}.pub").read_text())["keyid"]
    assert _run("trust", "remove", keyid[:7], "--home", str(home), ok=False).exit_code == 1
    assert keyid in _run("trust", "remove", keyid[:16], "--home", str(home)).stdout
    assert keyid not in _run("trust", "list", "--home", str(home)).stdout


def test_policy_explain_names_the_deciding_rule(tmp_path: Path) -> None:
    home, author = _setup(tmp_path)
    _run("policy", "import", str(_bundle(tmp_path, author)), "--home", str(home))
    _run(
        "token",
        "issue",
        "--caller",
        "billing-bot",
        "--org",
        "stmarys",
        "--role",
        "billing",
        "--home",
        str(home),
    )
    allowed = _run(
        "policy", "explain", "--caller", "billing-bot", "--model", "openai/gpt-4o-mini", "--home", str(home)
    )
    assert "allow" in allowed.stdout.lower()
    denied = _run(
        "policy",
        "explain",
        "--org",
        "stmarys",
        "--role",
        "billing",
        "--model",
        "openai/gpt-4o",
        "--home",
        str(home),
    )
    assert "model_not_allowed" in denied.stdout and "roles.billing.models" in denied.stdout
    missing = _run("policy", "explain", "--model", "openai/gpt-4o", "--home", str(home), ok=False)
    assert missing.exit_code == 1 and "--caller" in missing.output


def _rotation(tmp_path: Path) -> tuple[Path, dict[str, str], Path]:
    """A successor key and a policy document that rotates the trust set to it."""
    successor = tmp_path / "successor"
    _run("policy", "keygen", "--out", str(successor))
    new_pub = json.loads(Path(f"{successor}.pub").read_text())
    doc = policy_doc("http://127.0.0.1:9", version=1, scope={"sites": ["stmarys-main"]})
    doc["trust"] = {
        "threshold": 1,
        "keys": {new_pub["keyid"]: {"keytype": "ed25519", "scheme": "ed25519", "public": new_pub["public"]}},
    }
    source = tmp_path / "rotate.json"
    source.write_text(json.dumps(doc))
    return successor, new_pub, source


def test_a_bundle_rotating_the_trust_set_installs_it(tmp_path: Path) -> None:
    home, author = _setup(tmp_path)
    successor, new_pub, source = _rotation(tmp_path)
    alone = tmp_path / "alone.bundle"
    _run("policy", "sign", str(source), "--key", f"{successor}.key", "--out", str(alone))
    refused = _run("policy", "import", str(alone), "--home", str(home), ok=False)
    assert refused.exit_code == 1  # a key carried in a bundle is never trusted on its own
    both = _sign_both(source, author, successor, tmp_path / "both.bundle")
    assert "trust rotated" in _run("policy", "import", str(both), "--home", str(home)).stdout
    listed = _run("trust", "list", "--home", str(home)).stdout
    assert new_pub["keyid"] in listed and json.loads(Path(f"{author}.pub").read_text())["keyid"] not in listed


def test_an_interrupted_rotation_is_completed_by_importing_the_bundle_again(tmp_path: Path) -> None:
    home, author = _setup(tmp_path)
    successor, new_pub, source = _rotation(tmp_path)
    both = _sign_both(source, author, successor, tmp_path / "both.bundle")
    trust_before = (home / "trust.json").read_bytes()
    _run("policy", "import", str(both), "--home", str(home))
    (home / "trust.json").write_bytes(trust_before)  # as if the process died before writing the new set
    assert "completed" in _run("policy", "import", str(both), "--home", str(home)).stdout
    assert new_pub["keyid"] in _run("trust", "list", "--home", str(home)).stdout
    again = _run("policy", "import", str(both), "--home", str(home), ok=False)
    assert again.exit_code == 1 and "already in force" in again.output
