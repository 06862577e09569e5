"""What an auditor asks the CLI to check is checked, and an operator's admin records say what happened.

Each test here is a gap the README walk-through of issue 11 found (the auditor's tools ignoring a kept
checkpoint, a proof without its checkpoint, admin records that name the wrong role, no new key ids, no OS
user), run as an operator or an auditor runs it: real homes, real Ed25519 keys, the real CLI.
"""

from __future__ import annotations

import asyncio
import json
import os
import socket
import sqlite3
import time
from pathlib import Path
from typing import Any

import pytest
from click.testing import CliRunner

from appliance import signing_keys
from appliance.admin.client import AdminClient
from appliance.cli import main
from appliance.home import Home
from appliance.ledger import signed_note
from tests.cli.test_cli import _bundle, _rotation, _run, _setup, _sign_both
from tests.ledger.test_evidence import _append, _home
from tests.support.gateway import GatewayHarness

try:
    import pwd
except ImportError:  # pragma: no cover - Windows
    pwd = None  # type: ignore[assignment]


def _key(home: Home) -> str:
    return _run("audit", "key", "--home", str(home.root)).output.strip()


def _kept(home: Home, path: Path) -> Path:
    _run("audit", "checkpoint", "--home", str(home.root), "--out", str(path))
    return path


def _admin_records(home: Path) -> list[dict[str, Any]]:
    conn = sqlite3.connect(home / "vault.db")
    try:
        rows = conn.execute("SELECT record FROM ledger WHERE type = 'admin' ORDER BY seq").fetchall()
    finally:
        conn.close()
    return [json.loads(row[0]) for row in rows]


def _forged(home: Home, size: int, root: bytes) -> str:
    """What the appliance key's holder can sign: a checkpoint of ``size`` records with another root."""
    key = signing_keys.load_signing_key(home.appliance_key)
    with home.open_vault() as vault:
        origin = vault.ledger.verifier().name
    cp = signed_note.Checkpoint(origin, size, root, "2026-01-01T00:00:00.000Z", "manual")
    return signed_note.sign(cp, key)


# -- 1. --checkpoint is checked in every verify mode -------------------------------------------------------


def test_verify_of_bundles_checks_every_kept_checkpoint(tmp_path: Path) -> None:
    home = _home(tmp_path, 300)
    key = _key(home)
    kept = _kept(home, tmp_path / "kept-300.txt")
    with home.open_vault() as vault:
        asyncio.run(_append(vault.ledger, 20))
    export = tmp_path / "nov.jsonl"
    _run("audit", "export", "--home", str(home.root), "--since-seq", "100", "--out", str(export))

    ok = _run("audit", "verify", str(export), "--key", key, "--checkpoint", str(kept)).output
    assert "kept checkpoint kept-300.txt" in ok and "matches" in ok and "nov.jsonl" in ok

    junk = tmp_path / "junk.txt"
    junk.write_text("not a checkpoint\n")
    other = _home(tmp_path, 5, name="other")
    stranger = _kept(other, tmp_path / "other.txt")
    tampered = tmp_path / "tampered.txt"
    text = kept.read_text()
    tampered.write_text(text.replace("\n300\n", "\n299\n"))
    forged = tmp_path / "forged.txt"
    forged.write_text(_forged(home, 300, b"\x01" * 32))
    early = tmp_path / "early.txt"  # a true checkpoint of 50 records: the export starts at record 100
    early.write_text(_forged(home, 50, b"\x02" * 32))
    for bad, why in (
        (junk, "junk.txt"),
        (stranger, "unknown key"),
        (tampered, "signature does not verify"),
        (forged, "does not match"),
        (early, "cannot be checked"),
    ):
        result = _run("audit", "verify", str(export), "--key", key, "--checkpoint", str(bad), ok=False)
        assert result.exit_code == 1, (bad.name, result.output)
        assert why in result.output and "FAILED" in result.output, (bad.name, result.output)


def test_verify_of_bundles_refuses_a_kept_checkpoint_of_another_origin(tmp_path: Path) -> None:
    home, other = _home(tmp_path, 30), _home(tmp_path, 30, name="other")
    export = tmp_path / "a.jsonl"
    _run("audit", "export", "--home", str(home.root), "--out", str(export))
    kept = _kept(other, tmp_path / "other.txt")  # signed by a key the auditor trusts, for another ledger
    result = _run(
        "audit", "verify", str(export), "--key", _key(home), "--key", _key(other), "--checkpoint", str(kept),
        ok=False,
    )  # fmt: skip
    assert result.exit_code == 1 and "no bundle given is of" in result.output


def test_verify_of_bundles_does_not_pass_for_the_ledger_named_by_home(tmp_path: Path) -> None:
    home = _home(tmp_path, 30)
    export = tmp_path / "a.jsonl"
    _run("audit", "export", "--home", str(home.root), "--out", str(export))
    result = _run("audit", "verify", str(export), "--key", _key(home), "--home", str(home.root), ok=False)
    assert result.exit_code == 1 and "only those bundles are verified" in result.output
    assert "audit verify --home DIR" in result.output
    env = CliRunner(env={"PHI_HOME": str(home.root)}).invoke(
        main, ["audit", "verify", str(export), "--key", _key(home)]
    )
    assert env.exit_code == 0, env.output  # a home from the environment is not a request to check it


def _bad_kept(home: Home, tmp_path: Path) -> tuple[Path, Path, Path]:
    """Kept "checkpoints" of 40 records that must never pass: not a checkpoint, another root signed by
    this appliance, and one of another appliance."""
    junk = tmp_path / "junk.txt"
    junk.write_text("hello\n")
    forged = tmp_path / "forged.txt"
    forged.write_text(_forged(home, 40, b"\x01" * 32))
    stranger = _kept(_home(tmp_path, 40, name="other"), tmp_path / "other.txt")
    return junk, forged, stranger


def test_verify_of_the_ledger_refuses_a_kept_checkpoint_it_cannot_vouch_for(tmp_path: Path) -> None:
    home = _home(tmp_path, 40)
    kept = _kept(home, tmp_path / "kept.txt")
    ok = _run("audit", "verify", "--home", str(home.root), "--checkpoint", str(kept)).output
    assert ok.startswith("ok:") and "kept checkpoint(s) kept.txt match it" in ok
    junk, forged, stranger = _bad_kept(home, tmp_path)
    for bad, why in ((junk, "junk.txt"), (forged, "no longer has the root"), (stranger, "unknown key")):
        result = _run("audit", "verify", "--home", str(home.root), "--checkpoint", str(bad), ok=False)
        assert result.exit_code == 1 and why in result.output, (bad.name, result.output)


def test_verify_proof_refuses_a_kept_checkpoint_it_cannot_vouch_for(tmp_path: Path) -> None:
    home = _home(tmp_path, 40)
    key = _key(home)
    kept = _kept(home, tmp_path / "kept.txt")
    proof = tmp_path / "p.json"
    _run("audit", "prove", "--home", str(home.root), "--record", "7", "--size", "40", "--out", str(proof))
    assert _run(
        "audit", "verify-proof", str(proof), "--key", key, "--checkpoint", str(kept)
    ).output.startswith("ok: record 7")
    junk, forged, stranger = _bad_kept(home, tmp_path)
    for bad, why in ((junk, "kept checkpoint"), (forged, "different roots"), (stranger, "unknown key")):
        result = _run("audit", "verify-proof", str(proof), "--key", key, "--checkpoint", str(bad), ok=False)
        assert result.exit_code == 1 and why in result.output, (bad.name, result.output)


def test_verify_proof_checks_every_kept_checkpoint_of_a_size(tmp_path: Path) -> None:
    home = _home(tmp_path, 40)
    key = _key(home)
    good = _kept(home, tmp_path / "good.txt")
    forged = tmp_path / "forged.txt"
    forged.write_text(_forged(home, 40, b"\x01" * 32))
    proof = tmp_path / "p.json"
    _run("audit", "prove", "--home", str(home.root), "--record", "7", "--size", "40", "--out", str(proof))
    for order in ((forged, good), (good, forged)):  # neither one may stand in for the other
        args = [a for kept in order for a in ("--checkpoint", str(kept))]
        result = _run("audit", "verify-proof", str(proof), "--key", key, *args, ok=False)
        assert result.exit_code == 1 and "different roots" in result.output, result.output


# -- 6. no proof without its checkpoint unless asked for ----------------------------------------------------


def test_a_proof_without_its_signed_checkpoint_is_refused_unless_asked_for(tmp_path: Path) -> None:
    home = _home(tmp_path, 50)
    key = _key(home)
    proof = tmp_path / "p.json"
    refused = _run(
        "audit", "prove", "--home", str(home.root), "--record", "3", "--size", "40", "--out", str(proof),
        ok=False,
    )  # fmt: skip
    assert refused.exit_code == 1 and not proof.exists()
    assert "no checkpoint of 40 records is stored" in refused.output
    assert "audit checkpoint" in refused.output and "50" in refused.output  # how to get one; what exists
    assert "--allow-unsigned" in refused.output

    unsigned = _run(
        "audit", "prove", "--home", str(home.root), "--record", "3", "--size", "40", "--allow-unsigned",
        "--out", str(proof),
    )  # fmt: skip
    assert "UNSIGNED" in unsigned.output
    assert json.loads(proof.read_text())["checkpoint"] is None
    bad = _run("audit", "verify-proof", str(proof), "--key", key, ok=False)
    assert bad.exit_code == 1 and "carries no checkpoint" in bad.output

    consistency = _run(
        "audit", "prove", "--home", str(home.root), "--from-size", "30", "--size", "50", ok=False
    )
    assert consistency.exit_code == 1 and "no checkpoint of 30 records is stored" in consistency.output
    allowed = _run(
        "audit", "prove", "--home", str(home.root), "--from-size", "30", "--size", "50", "--allow-unsigned"
    )
    assert json.loads(allowed.stdout)["old_checkpoint"] is None and "UNSIGNED" in allowed.output


# -- 3. the role actually granted ------------------------------------------------------------------------


def _agent(context: Path, name: str, **metadata: str) -> None:
    (context / name).mkdir(parents=True)
    token = f"{name}:" + os.urandom(24).hex()
    (context / name / "metadata.json").write_text(json.dumps({"token": token, **metadata}))


def test_import_cllama_records_the_org_and_role_each_token_got(tmp_path: Path) -> None:
    home, author = _setup(tmp_path)
    _run("policy", "import", str(_bundle(tmp_path, author)), "--home", str(home))
    context = tmp_path / "context"
    _agent(context, "reader-bot", role="billing")  # cllama metadata names its own role: it wins
    _agent(context, "plain-bot")
    out = _run(
        "token", "import-cllama", str(context), "--org", "stmarys", "--role", "radiology", "--home", str(home)
    ).stdout
    assert "reader-bot: imported as stmarys/billing (role from metadata.json)" in out
    assert "plain-bot: imported as stmarys/radiology" in out
    tokens = {
        row["caller"]: row
        for row in map(json.loads, _run("token", "list", "--home", str(home)).stdout.split("\n")[:-1])
    }
    records = {
        r["claw_id"]: r["detail"] for r in _admin_records(home) if "token_import_cllama" in r["detail"]
    }
    assert tokens["reader-bot"]["role"] == "billing"
    assert records["reader-bot"] == "token_import_cllama org=stmarys role=billing from_metadata=role"
    assert records["plain-bot"] == "token_import_cllama org=stmarys role=radiology"


def test_import_cllama_checks_a_role_the_metadata_names_against_the_policy(tmp_path: Path) -> None:
    home, author = _setup(tmp_path)
    _run("policy", "import", str(_bundle(tmp_path, author)), "--home", str(home))
    context = tmp_path / "context"
    _agent(context, "typo-bot", role="radiolgy")
    args = [
        "token",
        "import-cllama",
        str(context),
        "--org",
        "stmarys",
        "--role",
        "radiology",
        "--home",
        str(home),
    ]
    out = _run(*args).stdout
    assert "typo-bot: skipped: metadata.json names stmarys/radiolgy, which policy v1 lacks" in out
    assert "--allow-unknown-role" in out
    assert "typo-bot" not in _run("token", "list", "--home", str(home)).stdout
    assert "imported as stmarys/radiolgy" in _run(*args, "--allow-unknown-role").stdout


# -- 4. a trust rotation names the new keys -----------------------------------------------------------------


def test_a_trust_rotation_record_names_the_new_key_ids_and_threshold(tmp_path: Path) -> None:
    home, author = _setup(tmp_path)
    successor, new_pub, source = _rotation(tmp_path)
    both = _sign_both(source, author, successor, tmp_path / "both.bundle")
    _run("policy", "import", str(both), "--home", str(home))
    old = json.loads(Path(f"{author}.pub").read_text())["keyid"]
    (detail,) = [r["detail"] for r in _admin_records(home) if "trust_rotation" in r["detail"]]
    assert f"keys={new_pub['keyid'][:16]}" in detail and "threshold=1" in detail
    assert f"removed={old[:16]}" in detail


# -- 7. .pub files as policy keygen writes them -----------------------------------------------------------


def test_a_pub_file_is_accepted_as_written_and_a_wrong_keyid_names_both(tmp_path: Path) -> None:
    home, author = _setup(tmp_path)  # trust add of author.pub, keyid field and all
    pub = json.loads(Path(f"{author}.pub").read_text())
    assert pub["keyid"] in _run("trust", "list", "--home", str(home)).stdout
    other = tmp_path / "other"
    signing_keys.generate(other)
    wrong = json.loads(Path(f"{other}.pub").read_text())
    stated = "ab" * 32
    wrong["keyid"] = stated
    bad_pub = tmp_path / "wrong.pub"
    bad_pub.write_text(json.dumps(wrong))
    result = _run("trust", "add", str(bad_pub), "--home", str(home), ok=False)
    actual = signing_keys.load_public_key(Path(f"{other}.pub"))[0]
    assert result.exit_code == 1 and stated in result.output and actual in result.output


def test_a_rotation_takes_pub_entries_as_written(tmp_path: Path) -> None:
    home, author = _setup(tmp_path)
    successor, new_pub, source = _rotation(tmp_path)
    doc = json.loads(source.read_text())
    doc["trust"]["keys"] = {new_pub["keyid"]: new_pub}  # the .pub's content pasted as it is, keyid included
    source.write_text(json.dumps(doc))
    both = _sign_both(source, author, successor, tmp_path / "both.bundle")
    assert "trust rotated" in _run("policy", "import", str(both), "--home", str(home)).stdout


# -- 5. the OS user who acted -----------------------------------------------------------------------------


def _me() -> str:
    if pwd is None:  # pragma: no cover - Windows
        import getpass

        return getpass.getuser()
    return f"{pwd.getpwuid(os.getuid()).pw_name} uid={os.getuid()}"


def test_admin_records_of_the_cli_name_the_os_user(tmp_path: Path) -> None:
    home, _ = _setup(tmp_path)
    _run(
        "token", "issue", "--caller", "bot", "--org", "o", "--role", "r", "--allow-unknown-role",
        "--home", str(home),
    )  # fmt: skip
    _run("token", "revoke", "bot", "--home", str(home))
    _run("trust", "threshold", "1", "--home", str(home))
    _run("keys", "remove", "openai", "--home", str(home), ok=False)  # refused: nothing recorded
    archived = _home(tmp_path, 300, name="archived")
    _run("audit", "archive", "--home", str(archived.root), "--through", "256", "--out", str(tmp_path / "a"))
    records = [r for r in _admin_records(home) if not r["detail"].startswith("init")]
    records += [r for r in _admin_records(archived.root) if r["detail"].startswith("audit_archive")]
    assert len(records) == 5  # trust add (setup), token issue and revoke, trust threshold, archive
    for record in records:
        assert record["os_user"] == f"{_me()} pid={os.getpid()}", record


def test_admin_records_of_the_admin_socket_name_the_peer(harness: GatewayHarness) -> None:
    AdminClient(harness.home.admin_socket).call("POST", "/admin/policy/reload")
    deadline = time.monotonic() + 5
    while not (found := [r for r in harness.audit.records() if r["type"] == "admin"]):
        assert time.monotonic() < deadline, "no admin record of the reload"
        time.sleep(0.02)
    assert found[0]["detail"] == "policy_reload via admin socket"
    expected = f"{_me()} pid={os.getpid()}" if hasattr(socket, "SO_PEERCRED") else "unknown"
    assert found[0]["os_user"].startswith(expected)  # this process is the socket's peer


@pytest.mark.parametrize(
    ("kind_args", "stray"), [(("--record", "5"), "old_size"), (("--from-size", "64"), "tree_size")]
)
def test_verify_proof_refuses_a_size_of_the_other_kind(
    tmp_path: Path, kind_args: tuple[str, str], stray: str
) -> None:
    """A stray size in the proof document must not make a kept checkpoint count as used, unopened."""
    home = _home(tmp_path, 120)
    key = _key(home)
    kept = tmp_path / "kept-100.txt"  # of another history: must never pass
    kept.write_text(_forged(home, 100, b"\x07" * 32))
    proof = tmp_path / "p.json"
    _run("audit", "prove", "--home", str(home.root), *kind_args, "--out", str(proof), "--allow-unsigned")
    doc = json.loads(proof.read_text())
    doc[stray] = 100
    proof.write_text(json.dumps(doc))
    result = _run("audit", "verify-proof", str(proof), "--key", key, "--checkpoint", str(kept), ok=False)
    assert result.exit_code == 1 and f"has no {stray}" in result.output
    for kind in (["inclusion"], {"a": 1}, None, "other"):
        doc["kind"] = kind
        proof.write_text(json.dumps(doc))
        result = _run("audit", "verify-proof", str(proof), "--key", key, ok=False)
        assert result.exit_code == 1 and "unknown proof kind" in result.output, result.output
